//! Times the matmuls of one ViT-B/16 block at batch 32 through candle's CPU backend: a linear
//! layer's product (6304 x 768 x 3072) and the attention's batched q kᵀ and p v (384 heads of
//! 197 x 64). A measurement tool, not a test (docs/benchmarks.md compares it with PyTorch's
//! `addmm` / `bmm` on the same machine):
//!
//!     cargo run --release -p medvlm-models --example matmul_probe
use candle_core::{Device, Tensor};
fn time(
    name: &str,
    flops: f64,
    f: impl Fn() -> candle_core::Result<Tensor>,
) -> candle_core::Result<()> {
    for _ in 0..2 {
        f()?;
    }
    let t = std::time::Instant::now();
    for _ in 0..10 {
        f()?;
    }
    let dt = t.elapsed().as_secs_f64() / 10.0;
    println!(
        "{name}: {:.1} ms, {:.1} GFLOP/s",
        dt * 1e3,
        flops / dt / 1e9
    );
    Ok(())
}
fn main() -> candle_core::Result<()> {
    let x = Tensor::randn(0f32, 1.0, (6304, 768), &Device::Cpu)?;
    let w = Tensor::randn(0f32, 1.0, (3072, 768), &Device::Cpu)?;
    let wt = w.t()?;
    time(
        "linear 6304x768x3072",
        2.0 * 6304.0 * 768.0 * 3072.0,
        || x.matmul(&wt),
    )?;
    let q = Tensor::randn(0f32, 1.0, (32, 12, 197, 64), &Device::Cpu)?;
    let k = Tensor::randn(0f32, 1.0, (32, 12, 197, 64), &Device::Cpu)?;
    let kt = k.t()?;
    time(
        "scores q@k^T 384x197x64x197",
        2.0 * 384.0 * 197.0 * 64.0 * 197.0,
        || q.matmul(&kt),
    )?;
    let p = Tensor::randn(0f32, 1.0, (32, 12, 197, 197), &Device::Cpu)?;
    time(
        "ctx p@v 384x197x197x64",
        2.0 * 384.0 * 197.0 * 64.0 * 197.0,
        || p.matmul(&k),
    )?;
    Ok(())
}
