//! Times the matmuls of one ViT-B/16 block at batch 32 through candle's CPU backend: a linear
//! layer's product (6304 x 768 x 3072) and the attention's batched q kᵀ and p v (384 heads of
//! 197 x 64). A measurement tool, not a test (docs/benchmarks.md compares it with PyTorch's
//! `addmm` / `bmm` on the same machine):
//!
//!     cargo run --release -p medvlm-models --example matmul_probe [-- bf16]
//!
//! With `bf16` it times instead the linear layers of a ViT-B/16 block at batch 32 (6304 rows)
//! and of open_clip's ViT-B-16 text block at batch 128 (9856 rows), f32 (medvlm's fused
//! linear) against the bf16 product with f32 accumulation (`medvlm_models::bf16_gemm`).
use std::sync::Arc;

use candle_core::{Device, Tensor};
use medvlm_models::bf16_gemm::PackedBf16Weight;
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
fn bf16_linears() -> candle_core::Result<()> {
    let shapes = [
        ("vit qkv", 6304, 768, 2304),
        ("vit proj", 6304, 768, 768),
        ("vit fc1", 6304, 768, 3072),
        ("vit fc2", 6304, 3072, 768),
        ("text qkv", 9856, 512, 512),
        ("text fc1", 9856, 512, 2048),
        ("text fc2", 9856, 2048, 512),
    ];
    for (name, m, k, n) in shapes {
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 0.02, (n, k), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 0.02, n, &Device::Cpu)?;
        let packed = Arc::new(PackedBf16Weight::from_tensor(&w)?);
        let flops = 2.0 * (m * k * n) as f64;
        time(&format!("{name} {m}x{k}x{n} f32 "), flops, || {
            medvlm_models::fused::linear(&x, &w, &b)
        })?;
        time(&format!("{name} {m}x{k}x{n} bf16"), flops, || {
            medvlm_models::bf16_gemm::linear(&x, &packed, Some(&b), name)
        })?;
    }
    Ok(())
}

fn main() -> candle_core::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("bf16") {
        return bf16_linears();
    }
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
