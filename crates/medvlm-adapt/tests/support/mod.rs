//! Helpers shared by the integration tests that run methods on the tiny CLIP fixture.
#![allow(dead_code)]

use candle_core::{Device, Tensor};

/// `n` images of 32x32 for 3 classes (image `i` has class `i % 3`): a class-specific colour
/// offset plus a pseudo-random texture from `seed`, so the classes are separable but not
/// trivially. Returns the pixels `[n, 3, 32, 32]` and the labels.
pub fn class_colour_images(n: usize, seed: u32) -> (Tensor, Vec<usize>) {
    let hw = 32usize;
    let mut v = Vec::with_capacity(n * 3 * hw * hw);
    let mut state = seed;
    let mut labels = Vec::new();
    for i in 0..n {
        let c = i % 3;
        labels.push(c);
        for ch in 0..3 {
            for _ in 0..hw * hw {
                state = state.wrapping_mul(1664525).wrapping_add(1013904223);
                let noise = (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                let base = if ch == c { 1.0 } else { -0.5 };
                v.push(base + 0.5 * noise);
            }
        }
    }
    (
        Tensor::from_vec(v, (n, 3, hw, hw), &Device::Cpu).unwrap(),
        labels,
    )
}

// One definition for both crates' tests: the engine tests own it.
#[path = "../../../medvlm-train/tests/support/mod.rs"]
mod train_support;
pub use train_support::max_abs_diff;
