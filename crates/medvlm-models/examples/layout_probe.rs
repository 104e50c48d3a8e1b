//! Times a linear layer's product `x Wᵀ` (x `[m, k]`, W `[n, k]`) through the `gemm` crate
//! in the two weight layouts of `medvlm_models::fused::linear`: the row-major weight, and the
//! inference layout (the transpose of a row-major `[k, n]`, multiplied as `yᵀ = W xᵀ`). The
//! shapes are ViT-B/16's at batch 1 (197 tokens) and batch 32 (6304). A measurement tool, not
//! a test:
//!
//!     cargo run --release -p medvlm-models --example layout_probe
use gemm::{gemm, Parallelism};
fn main() {
    let threads = 2;
    for &(m, k, n) in &[
        (197usize, 768usize, 768usize),
        (197, 768, 3072),
        (197, 3072, 768),
        (6304, 768, 3072),
    ] {
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 104729) % 1000) as f32 * 1e-3)
            .collect();
        // wt: [k, n] row-major
        let mut wt = vec![0f32; k * n];
        for i in 0..n {
            for kk in 0..k {
                wt[kk * n + i] = w[i * k + kk];
            }
        }
        let mut y1 = vec![0f32; m * n];
        let mut y2 = vec![0f32; m * n];
        let par = Parallelism::Rayon(threads);
        let reps = if m > 1000 { 3 } else { 30 };
        let run1 = |y: &mut Vec<f32>| unsafe {
            gemm(
                m,
                n,
                k,
                y.as_mut_ptr(),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            )
        };
        // y^T [n, m] col-major = y row-major: dst' rows = n (out), cols = m (tokens): dst_rs = 1, dst_cs = n
        // lhs' = W as [n, k] from wt [k, n]: elem (i, kk) at kk*n + i -> rs 1, cs n
        // rhs' = x^T [k, m]: elem (kk, j) at j*k + kk -> rs 1, cs k
        let run2 = |y: &mut Vec<f32>| unsafe {
            gemm(
                n,
                m,
                k,
                y.as_mut_ptr(),
                n as isize,
                1,
                false,
                wt.as_ptr(),
                n as isize,
                1,
                x.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            )
        };
        for (name, f, y) in [
            ("x·Wᵀ (now)", &run1 as &dyn Fn(&mut Vec<f32>), &mut y1),
            ("(Wt)ᵀ·xᵀ", &run2, &mut y2),
        ] {
            f(y);
            f(y);
            let t = std::time::Instant::now();
            for _ in 0..reps {
                f(y);
            }
            let dt = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{m}x{k}x{n} {name}: {:.2} ms, {:.1} GFLOP/s",
                dt * 1e3,
                2.0 * (m * k * n) as f64 / dt / 1e9
            );
        }
        let d = y1
            .iter()
            .zip(&y2)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("  max diff {d}");
    }
}
