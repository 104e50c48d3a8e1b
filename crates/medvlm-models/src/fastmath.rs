//! Vectorisable f32 `exp` and `erf` for the elementwise CPU kernels (softmax, GELU), compiled
//! for AVX-512 and AVX2 and chosen at run time.
//!
//! libm's `expf` / `erff` are scalar calls with branches, so loops over them stay scalar; in a
//! ViT-B/16 forward pass they took about a tenth of the time (docs/benchmarks.md). These
//! versions are branch-free, so the compiler vectorises the loops:
//!
//! * `exp`: Cephes' `expf` scheme: `x = n ln 2 + r` with `|r| <= ln 2 / 2` (`ln 2` split in
//!   two parts for exactness), a degree-6 polynomial for `e^r`, and `2^n` built from the
//!   exponent bits. Inputs above 88.3 are clamped (no infinities), below -87.3 give exactly 0 (no subnormals).
//!   Relative error below 2e-7 (tested against `f64::exp`).
//! * `erf`: Abramowitz & Stegun 7.1.26, `1 - t (a1 + t (a2 + ... a5 t)) e^{-x^2}` with
//!   `t = 1 / (1 + p |x|)`, absolute error below 1.5e-7 in exact arithmetic and 1e-6 in f32
//!   (the cancellation in `1 - ...` near 0; tested): the
//!   approximation PyTorch's vectorised CPU `erf` (and so its exact GELU) uses.

use std::mem::MaybeUninit;

/// `e^x` (see the module documentation).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let input = x;
    let x = x.clamp(-87.3, 88.3);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // 2^n from the exponent bits. `n as i32` would be a saturating conversion, which the
    // compiler does not vectorise; adding 1.5 * 2^23 instead puts the integer n (|n| <= 127)
    // in the low mantissa bits of an exactly representable float.
    const SHIFTER: f32 = 12_582_912.0;
    let n_bits = (n + SHIFTER).to_bits().wrapping_sub(SHIFTER.to_bits());
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    // Below the normal range the result is 0, never a subnormal: masked attention scores
    // (-1e9 and the like) must give exactly 0, since subnormal operands make every later
    // multiply on x86 about a hundred times slower (the CLIP text tower's training step took
    // twice as long before this).
    if input < -87.3 {
        0.0
    } else {
        e_r * scale
    }
}

/// `erf(x)` (see the module documentation).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_7;
    const A4: f32 = -1.453_152;
    const A5: f32 = 1.061_405_4;
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A1 + t * (A2 + t * (A3 + t * (A4 + t * A5))));
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
}

/// Exact GELU `0.5 x (1 + erf(x / √2))` with [`erf`].
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Instruction sets the elementwise kernels are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// The target's baseline (SSE2 on x86-64).
    Baseline,
    /// AVX2 with FMA.
    Avx2,
    /// AVX-512 (F and DQ) with AVX2 and FMA.
    Avx512,
}

impl Isa {
    /// The best instruction set this CPU has.
    pub fn detected() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512dq")
            {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    }
}

/// Defines `$name(args)`, which runs `body` compiled for the best instruction set this CPU has,
/// and `$with(isa, args)`, which runs it compiled for `isa` or the best one below it that the
/// CPU has (so tests exercise every version on one machine).
macro_rules! dispatch {
    ($name:ident, $with:ident, ($($arg:ident : $ty:ty),*), $body:block) => {
        /// Elementwise kernel with run-time instruction-set dispatch.
        pub fn $name($($arg: $ty),*) {
            $with(Isa::detected(), $($arg),*)
        }

        /// The kernel compiled for `isa`, capped at what this CPU has.
        pub fn $with(isa: Isa, $($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) { body($($arg),*) }
                let isa = isa.min(Isa::detected());
                if isa == Isa::Avx512 {
                    // SAFETY: the features were detected on this CPU.
                    return unsafe { avx512($($arg),*) };
                }
                if isa == Isa::Avx2 {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            let _ = isa;
            body($($arg),*)
        }
    };
}

/// Lanes of the reductions: independent partial results the compiler keeps in one vector
/// register (a float sum or max over one accumulator cannot be vectorised, its order is fixed).
const LANES: usize = 16;

#[inline(always)]
fn lane_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = acc[i].max(c[i]);
        }
    }
    let m = rest.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    acc.iter().copied().fold(m, f32::max)
}

#[inline(always)]
fn lane_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

// The elementwise kernels write into uninitialised output (`MaybeUninit`), so the caller
// need not zero it first: every element is written exactly once.

dispatch!(gelu_erf_slice, gelu_erf_slice_with, (x: &[f32], y: &mut [MaybeUninit<f32>]), {
    for (o, &v) in y.iter_mut().zip(x) {
        o.write(gelu_erf(v));
    }
});

dispatch!(softmax_rows, softmax_rows_with, (x: &[f32], y: &mut [MaybeUninit<f32>], d: usize), {
    for (yr, xr) in y.chunks_mut(d).zip(x.chunks(d)) {
        let max = lane_max(xr);
        for (o, &v) in yr.iter_mut().zip(xr) {
            o.write(exp(v - max));
        }
        // SAFETY: every element of the row was written just above.
        let yr = unsafe { &mut *(yr as *mut [MaybeUninit<f32>] as *mut [f32]) };
        let inv = 1.0 / lane_sum(yr);
        yr.iter_mut().for_each(|o| *o *= inv);
    }
});

dispatch!(sigmoid_gate_slice, sigmoid_gate_slice_with, (x: &[f32], y: &mut [MaybeUninit<f32>], slope: f32), {
    for (o, &v) in y.iter_mut().zip(x) {
        o.write(v / (1.0 + exp(-(v * slope))));
    }
});

dispatch!(softmax_rows_in_place, softmax_rows_in_place_with, (x: &mut [f32], d: usize), {
    for row in x.chunks_mut(d) {
        let max = lane_max(row);
        for v in row.iter_mut() {
            *v = exp(*v - max);
        }
        let inv = 1.0 / lane_sum(row);
        row.iter_mut().for_each(|v| *v *= inv);
    }
});

/// Adds per-chunk partial sums (each `len` long) in chunk order. Kernels collect their
/// parallel partial sums and add them here rather than with rayon's `reduce`, whose grouping
/// follows work stealing: floating-point sums would then differ between runs of the same
/// computation, and a resumed training would not repeat the uninterrupted one bit for bit.
pub fn sum_in_order<T: Copy + Default + std::ops::AddAssign>(
    parts: Vec<Vec<T>>,
    len: usize,
) -> Vec<T> {
    let mut parts = parts.into_iter();
    let mut total = parts.next().unwrap_or_else(|| vec![T::default(); len]);
    for p in parts {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// Fills a new vector of `n` elements in parallel chunks of `chunk` elements: `fill(i, out)`
/// must write every element of `out`, the chunk starting at element `i`.
pub fn par_fill(
    n: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    par_fill_with_room(n, 0, chunk, fill)
}

/// [`par_fill`] with capacity for `room` more elements, for a kernel that appends a few values
/// after the filled ones (a backward pass's parameter gradients after `dx`): pushing past the
/// capacity of an exactly sized vector would reallocate and copy all `n` elements.
pub fn par_fill_with_room(
    n: usize,
    room: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    use rayon::prelude::*;
    let mut y: Vec<f32> = Vec::with_capacity(n + room);
    y.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(c, out)| fill(c * chunk.max(1), out));
    // SAFETY: the chunks cover all `n` elements and `fill` writes each of them.
    unsafe { y.set_len(n) };
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(lo: f32, hi: f32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| lo + (hi - lo) * i as f32 / (n - 1) as f32)
            .collect()
    }

    #[test]
    fn partial_sums_are_added_in_chunk_order() {
        // f32 addition is not associative: (1e8 + 1) - 1e8 = 0 (1e8 + 1 rounds to 1e8), while
        // (1e8 - 1e8) + 1 = 1. In chunk order, the first.
        let parts = vec![vec![1e8f32, 2.0], vec![1.0, 3.0], vec![-1e8, 4.0]];
        assert_eq!(sum_in_order(parts, 2), vec![0.0, 9.0]);
        let reordered = vec![vec![1e8f32, 2.0], vec![-1e8, 4.0], vec![1.0, 3.0]];
        assert_eq!(sum_in_order(reordered, 2), vec![1.0, 9.0]);
        // No parts: zeros of the asked length.
        assert_eq!(sum_in_order(Vec::<Vec<f64>>::new(), 3), vec![0.0; 3]);
    }

    #[test]
    fn exp_is_within_2e7_relative_of_f64() {
        for x in grid(-87.0, 88.0, 200_001) {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            assert!(
                ((got - want) / want).abs() < 2e-7,
                "exp({x}) = {got}, want {want}"
            );
        }
        // Finite at the top, exactly 0 (not subnormal) at the bottom.
        assert!(exp(1000.0).is_finite());
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(-1e9), 0.0);
        assert!(exp(-87.0).is_normal());
    }

    #[test]
    fn erf_is_within_1e6_of_libm() {
        for x in grid(-6.0, 6.0, 120_001) {
            let want = libm::erf(x as f64);
            assert!(
                (erf(x) as f64 - want).abs() < 1e-6,
                "erf({x}) = {}, want {want}",
                erf(x)
            );
        }
        assert!(erf(0.0).abs() < 1e-7);
    }

    #[test]
    fn dispatched_kernels_equal_the_scalar_formulas() {
        let x = grid(-9.0, 9.0, 4099);
        let y = par_fill(x.len(), 1000, |i, out| {
            gelu_erf_slice(&x[i..i + out.len()], out)
        });
        for (&v, &o) in x.iter().zip(&y) {
            let want = 0.5 * v as f64 * (1.0 + libm::erf(v as f64 / std::f64::consts::SQRT_2));
            assert!((o as f64 - want).abs() < 1e-6 * (1.0 + v.abs() as f64));
        }
        let d = 37;
        let x = grid(-20.0, 20.0, d * 5);
        let y = par_fill(x.len(), 2 * d, |i, out| {
            softmax_rows(&x[i..i + out.len()], out, d)
        });
        for (yr, xr) in y.chunks(d).zip(x.chunks(d)) {
            let m = xr.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let z: f64 = xr.iter().map(|&v| (v as f64 - m).exp()).sum();
            for (&o, &v) in yr.iter().zip(xr) {
                assert!((o as f64 - (v as f64 - m).exp() / z).abs() < 1e-6);
            }
        }
        let x = grid(-30.0, 30.0, 1001);
        let y = par_fill(x.len(), 64, |i, out| {
            sigmoid_gate_slice(&x[i..i + out.len()], out, 1.702)
        });
        for (&v, &o) in x.iter().zip(&y) {
            let want = v as f64 / (1.0 + (-(v as f64) * 1.702).exp());
            assert!((o as f64 - want).abs() < 1e-6 * (1.0 + v.abs() as f64));
        }
    }

    #[test]
    fn every_instruction_set_version_gives_the_same_values() {
        let x = grid(-12.0, 12.0, 3001);
        let d = 41;
        let n = x.len() / d * d;
        let run = |isa: Isa| {
            let g = par_fill(x.len(), 512, |i, out| {
                gelu_erf_slice_with(isa, &x[i..i + out.len()], out)
            });
            let s = par_fill(n, d * 4, |i, out| {
                softmax_rows_with(isa, &x[i..i + out.len()], out, d)
            });
            let q = par_fill(x.len(), 512, |i, out| {
                sigmoid_gate_slice_with(isa, &x[i..i + out.len()], out, 1.702)
            });
            let mut p = x[..n].to_vec();
            softmax_rows_in_place_with(isa, &mut p, d);
            (g, s, q, p)
        };
        let reference = run(Isa::Baseline);
        for isa in [Isa::Avx2, Isa::Avx512] {
            let got = run(isa);
            let close = |a: &[f32], b: &[f32]| {
                a.iter()
                    .zip(b)
                    .all(|(u, v)| (u - v).abs() <= 1e-6 * (1.0 + u.abs()))
            };
            assert!(close(&got.0, &reference.0), "{isa:?} gelu");
            assert!(close(&got.1, &reference.1), "{isa:?} softmax");
            assert!(close(&got.2, &reference.2), "{isa:?} quick gelu");
            assert!(close(&got.3, &reference.3), "{isa:?} in-place softmax");
            assert!(close(&got.1, &got.3), "{isa:?} softmax forms differ");
        }
    }
}
