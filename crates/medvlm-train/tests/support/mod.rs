//! Helpers shared by the training-engine integration tests (and, through a `#[path]` module,
//! by medvlm-adapt's method tests).
#![allow(dead_code)]

use candle_core::Tensor;

/// Largest absolute difference of two same-shaped f32 tensors.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
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
