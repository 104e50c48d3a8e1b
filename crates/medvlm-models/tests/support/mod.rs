//! Shared helpers of the CLIP / SigLIP parity tests (fixtures made by
//! tools/make_parity_fixtures.py).
#![allow(dead_code)]

pub mod fake_hub;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use medvlm_models::{TokenBatch, VisionLanguageModel};

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

/// Largest absolute value of a tensor.
pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Cosine similarity of each row of `a` and `b` `[N, E]`, in f64.
pub fn row_cosines(a: &Tensor, b: &Tensor) -> Vec<f64> {
    let a: Vec<Vec<f32>> = a.to_dtype(DType::F32).unwrap().to_vec2().unwrap();
    let b: Vec<Vec<f32>> = b.to_dtype(DType::F32).unwrap().to_vec2().unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| {
            let dot: f64 = x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum();
            let nx: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
            let ny: f64 = y.iter().map(|q| (*q as f64).powi(2)).sum::<f64>().sqrt();
            dot / (nx * ny)
        })
        .collect()
}

/// A reduced-precision model's (`precision`: "bf16", "int8") image and text embeddings
/// against the f32 model's: every row within cosine 0.999, and not equal (max |diff| above
/// 1e-6; equal outputs would mean the f32 path ran). Prints the minimum cosine.
pub fn assert_embeddings_near_f32(
    name: &str,
    precision: &str,
    f32_model: &dyn VisionLanguageModel,
    model: &dyn VisionLanguageModel,
    pixels: &Tensor,
    tokens: &TokenBatch,
) {
    for (what, a, b) in [
        (
            "image",
            f32_model.encode_image(pixels).unwrap().embeds,
            model.encode_image(pixels).unwrap().embeds,
        ),
        (
            "text",
            f32_model.encode_text(tokens).unwrap().embeds,
            model.encode_text(tokens).unwrap().embeds,
        ),
    ] {
        let cos = row_cosines(&a, &b);
        assert!(!cos.is_empty());
        for (i, c) in cos.iter().enumerate() {
            assert!(
                *c >= 0.999,
                "{name} {what} embedding {i}: cosine {c} < 0.999"
            );
        }
        let d = max_abs_diff(&a, &b);
        assert!(
            d > 1e-6,
            "{name} {what}: {precision} equals f32 (max |diff| {d})"
        );
        eprintln!(
            "{name} {what} in {precision}: min cosine {:.6}, max |diff| {d:.2e}",
            cos.iter().cloned().fold(1.0, f64::min)
        );
    }
}
