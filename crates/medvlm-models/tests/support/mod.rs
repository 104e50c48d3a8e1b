//! Shared helpers of the CLIP / SigLIP parity tests (fixtures made by
//! tools/make_parity_fixtures.py).
#![allow(dead_code)]

pub mod fake_hub;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use medvlm_models::TokenBatch;

pub fn fixture(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(family)
}

pub fn load_st(path: PathBuf) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn inputs(family: &str) -> (Tensor, TokenBatch) {
    let i = load_st(fixture(family).join("inputs.safetensors"));
    let ids = i["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = i["attention_mask"].to_dtype(DType::U32).unwrap();
    (
        i["pixel_values"].clone(),
        TokenBatch {
            input_ids: ids,
            attention_mask: mask,
        },
    )
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    a.to_dtype(DType::F32)
        .unwrap()
        .sub(&b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn assert_close(name: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let d = max_abs_diff(got, want);
    assert!(d <= tol, "{name}: max |diff| = {d} > {tol}");
}
