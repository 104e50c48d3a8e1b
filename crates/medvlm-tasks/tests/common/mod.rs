//! Helpers shared by the task tests that run on the tiny CLIP parity fixture (random weights,
//! 32 px, a 4x4 patch grid; `mod common;` in each test file).
// Each test binary compiles its own copy of this module and uses a subset of it.
#![allow(dead_code)]

use std::path::PathBuf;

/// The CLIP parity fixture's folder, as a model spec.
pub fn fixture() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../medvlm-models/tests/fixtures/clip")
        .display()
        .to_string()
}

/// The CLIP parity fixture, loaded on the CPU.
pub fn model() -> medvlm_models::LoadedModel {
    medvlm_models::load_model(&fixture(), &Default::default()).unwrap()
}

/// The largest absolute difference between two tensors of one shape.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A 32 px phantom set of `n` studies of `modalities` (one finding at most, `normal_fraction`
/// of them normal, no registration copies) in `dir`; its manifest.
pub fn anomaly_phantoms(
    dir: &std::path::Path,
    n: u64,
    seed: u64,
    modalities: Vec<medvlm_phantoms::Modality>,
    normal_fraction: f32,
) -> PathBuf {
    medvlm_phantoms::write_dataset(&medvlm_phantoms::DatasetConfig {
        out: dir.to_path_buf(),
        n,
        seed,
        modalities,
        options: medvlm_phantoms::StudyOptions {
            size: 32,
            max_findings: 1,
            normal_fraction,
            registration: false,
            ..Default::default()
        },
        force: false,
    })
    .unwrap();
    dir.join("manifest.jsonl")
}
