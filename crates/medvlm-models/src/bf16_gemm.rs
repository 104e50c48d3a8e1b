//! bf16 matrix product for linear layers on the CPU: `y = x Wᵀ + b` with `x` `[m, k]` f32,
//! `W` `[n, k]` packed once into bf16, f32 accumulation and f32 output.
//!
//! Why: candle's CPU backend has no fast bf16 matrix product (and its convolution has no bf16
//! path at all), so `--dtype bf16` on a CPU used to be refused.
//! CPUs with AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake / Sapphire Rapids) have
//! `vdpbf16ps`, which in one instruction multiplies 16 pairs of bf16 values and adds both
//! products to 16 f32 accumulators: 32 multiply-adds, twice the 16 of an f32 FMA on the same
//! 512-bit register. Linear layers are most of the time of an encoder's forward pass, so doing
//! them in bf16, and everything else (layer norm, softmax, GELU, attention, the patch
//! convolution) in f32, is what PyTorch's CPU autocast does (`torch.autocast("cpu",
//! torch.bfloat16)` runs `linear`/`addmm` in bf16 and keeps norms and softmax in f32).
//!
//! What it computes, exactly:
//! - `x` is rounded to bf16 on the fly, to nearest even (`vcvtne2ps2bf16`; subnormal inputs
//!   become signed zeros and NaNs stay NaNs, which the scalar [`f32_to_bf16_bits`] matches);
//! - `W` is rounded the same way once, by [`PackedBf16Weight::pack`];
//! - the products of the rounded values are exact in f32 and summed in f32, two per
//!   instruction along `k`, starting from the bias (or zero).
//!
//! So the result differs from the f32 product by the rounding of the inputs (relative 2⁻⁹ per
//! value) plus f32 summation error; tests compare it with an f64 product of the rounded inputs.
//!
//! Layout: `W` is stored in panels of [`NR`] = 32 output columns; inside a panel, for each
//! pair of `k` indices `(2p, 2p+1)`, 32 `u32` words hold the two bf16 weights of each column
//! (low half `2p`, high half `2p+1`), the operand layout of `vdpbf16ps`. A 32-bit broadcast of
//! the input pair `(x[2p], x[2p+1])` times one 16-column half gives 16 outputs' two
//! multiply-adds. The micro-kernel keeps [`MR`] rows x 32 columns of accumulators in
//! registers (16 of the 32 zmm registers); a row block of `x` is converted once per task into a
//! per-thread buffer, and `k` is blocked so that a panel's slice (16 KiB) stays in L1 while it
//! is reused by every row of the block. Tasks (row blocks x column groups) run on rayon's pool.
//!
//! A portable scalar kernel computes the same thing (for tests, and the reference on CPUs
//! without the instruction), but models refuse bf16 linear layers on such CPUs up front
//! ([`require_cpu_support`]): the scalar kernel is far slower than the f32 path.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Output columns per packed panel: two 16-lane f32 accumulators per row.
pub const NR: usize = 32;
/// Rows per micro-kernel call (16 accumulators, 2 weight registers, 1 broadcast).
pub const MR: usize = 8;
/// Pairs of `k` per cache block: a panel slice is `KC · 128` bytes = 16 KiB, half of L1.
const KC: usize = 128;
/// Target size of a task's bf16 row block (`rows · k · 2` bytes): well inside L2.
const ROW_BLOCK_BYTES: usize = 256 * 1024;

/// One cache line of packed weights; the alignment keeps every 16-word load inside a line.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u32; 16]);

/// The bf16 bits of `x`, rounded to nearest even, with the conventions of `vcvtneps2bf16`:
/// subnormals become zeros of the same sign, NaNs stay (quiet) NaNs, overflow gives ±inf.
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x0040;
    }
    if b & 0x7f80_0000 == 0 {
        return ((b >> 16) & 0x8000) as u16;
    }
    // Adding 0x7fff plus the lowest kept bit rounds half-way cases to the even neighbour; a
    // carry into the exponent is the correct result (up to +inf).
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of bf16 bits.
pub fn bf16_bits_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Two bf16 values in one `u32`: `lo` in the low half, as `vdpbf16ps` pairs them.
fn pair(lo: f32, hi: f32) -> u32 {
    f32_to_bf16_bits(lo) as u32 | ((f32_to_bf16_bits(hi) as u32) << 16)
}

/// Whether this CPU has the bf16 dot-product instruction (AVX512-BF16 with AVX-512F) and this
/// build has the kernel for it (Rust 1.89 or later, see build.rs).
pub fn cpu_has_bf16_dot() -> bool {
    #[cfg(all(target_arch = "x86_64", medvlm_avx512bf16))]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(all(target_arch = "x86_64", medvlm_avx512bf16)))]
    {
        false
    }
}

/// `Ok` when `detected` (the result of [`cpu_has_bf16_dot`]) says this CPU runs bf16 linear
/// layers fast; otherwise the error a user sees before any work is done.
pub fn cpu_support(detected: bool) -> Result<(), String> {
    if detected {
        return Ok(());
    }
    let why = if cfg!(all(target_arch = "x86_64", medvlm_avx512bf16)) {
        "which this CPU does not report"
    } else if cfg!(target_arch = "x86_64") {
        "and this medvlm was built with a Rust older than 1.89, which cannot compile that kernel"
    } else {
        "an x86-64 instruction set"
    };
    Err(format!(
        "bf16 on the CPU needs the AVX512-BF16 instruction set (vdpbf16ps: AMD Zen 4 or later, \
         Intel Cooper Lake / Sapphire Rapids or later), {why}; use f32 here, or bf16 on a \
         CUDA GPU (build with --features cuda)"
    ))
}

/// [`cpu_support`] for this CPU.
pub fn require_cpu_support() -> Result<(), String> {
    cpu_support(cpu_has_bf16_dot())
}

/// Which micro-kernel runs a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// `vdpbf16ps` (AVX512-BF16).
    Avx512Bf16,
    /// Portable scalar loops over the same packed layout.
    Scalar,
}

impl Kernel {
    /// The fast kernel when the CPU has it, else the scalar one.
    pub fn best() -> Kernel {
        if cpu_has_bf16_dot() {
            Kernel::Avx512Bf16
        } else {
            Kernel::Scalar
        }
    }
}

/// A weight `[n, k]` rounded to bf16 and packed for the micro-kernel (see the module
/// documentation for the layout).
pub struct PackedBf16Weight {
    n: usize,
    k: usize,
    /// `ceil(k / 2)`: pairs along `k` (an odd `k` is padded with a zero weight).
    kp: usize,
    lines: Vec<Line>,
}

impl std::fmt::Debug for PackedBf16Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedBf16Weight[{}, {}]", self.n, self.k)
    }
}

impl PackedBf16Weight {
    /// Rounds and packs the row-major weight `w` `[n, k]`.
    pub fn pack(w: &[f32], n: usize, k: usize) -> candle_core::Result<Self> {
        if w.len() != n * k || n == 0 || k == 0 {
            candle_core::bail!(
                "bf16 packing: {} weights for a [{n}, {k}] matrix (both sides must be at least 1)",
                w.len()
            )
        }
        let kp = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut lines = vec![Line([0; 16]); panels * kp * 2];
        lines
            .par_chunks_mut(kp * 2)
            .enumerate()
            .for_each(|(j, panel)| {
                for (p, two) in panel.chunks_mut(2).enumerate() {
                    for c in 0..NR {
                        let col = j * NR + c;
                        if col >= n {
                            break;
                        }
                        let row = &w[col * k..(col + 1) * k];
                        let hi = if 2 * p + 1 < k { row[2 * p + 1] } else { 0.0 };
                        two[c / 16].0[c % 16] = pair(row[2 * p], hi);
                    }
                }
            });
        Ok(Self { n, k, kp, lines })
    }

    /// Packs a weight tensor `[n, k]` of any float dtype (read as f32).
    pub fn from_tensor(w: &Tensor) -> candle_core::Result<Self> {
        let (n, k) = w.dims2()?;
        let v = w
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Self::pack(&v, n, k)
    }

    /// Output features `n`.
    pub fn out_features(&self) -> usize {
        self.n
    }
    /// Input features `k`.
    pub fn in_features(&self) -> usize {
        self.k
    }

    /// The words of panel `j` (`kp` pairs x 32 columns).
    fn panel(&self, j: usize) -> *const u32 {
        self.lines[j * self.kp * 2..].as_ptr() as *const u32
    }
}

/// A raw output pointer that tasks writing disjoint parts of the output share.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of output elements (its rows x its columns).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The output element `i` (a method, so closures capture the `Sync` wrapper, not the
    /// raw pointer inside it).
    ///
    /// # Safety
    /// `i` must be inside the output.
    unsafe fn at(&self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}

thread_local! {
    /// Per-thread buffer of a task's row block of `x` in bf16 pairs.
    static ROWS: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// `y = x Wᵀ + b` for row-major `x` `[m, k]`, into a new row-major `[m, n]` vector.
pub fn matmul(
    x: &[f32],
    m: usize,
    w: &PackedBf16Weight,
    bias: Option<&[f32]>,
    kernel: Kernel,
) -> candle_core::Result<Vec<f32>> {
    let (n, k, kp) = (w.n, w.k, w.kp);
    if x.len() != m * k {
        candle_core::bail!(
            "bf16 linear: {} input values are not {m} rows of {k} features",
            x.len()
        )
    }
    if let Some(b) = bias {
        if b.len() != n {
            candle_core::bail!("bf16 linear: bias of {} for {n} outputs", b.len())
        }
    }
    if kernel == Kernel::Avx512Bf16 && !cpu_has_bf16_dot() {
        candle_core::bail!("bf16 linear: {}", cpu_support(false).unwrap_err())
    }
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    if m == 0 {
        return Ok(y);
    }
    // Rows per task: a row block of about ROW_BLOCK_BYTES in bf16, a multiple of MR.
    let mc = ((ROW_BLOCK_BYTES / (kp * 4)).max(MR) / MR * MR).min(m.next_multiple_of(MR));
    let row_blocks = m.div_ceil(mc);
    let panels = n.div_ceil(NR);
    // Few row blocks (small batches): split the columns too, so every thread has work.
    let want = 4 * candle_core::utils::get_num_threads().max(1);
    let groups = if row_blocks >= want {
        1
    } else {
        want.div_ceil(row_blocks).min(panels)
    };
    let per_group = panels.div_ceil(groups);
    let groups = panels.div_ceil(per_group);
    let out = OutPtr(y.spare_capacity_mut().as_mut_ptr() as *mut f32);
    (0..row_blocks * groups).into_par_iter().for_each(|t| {
        let (rb, g) = (t / groups, t % groups);
        let r0 = rb * mc;
        let rows = mc.min(m - r0);
        let j0 = g * per_group;
        let j1 = (j0 + per_group).min(panels);
        ROWS.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.resize(rows * kp, 0);
            for (r, dst) in buf.chunks_mut(kp).enumerate() {
                convert_row(&x[(r0 + r) * k..(r0 + r + 1) * k], dst, kernel);
            }
            for j in j0..j1 {
                let cols = NR.min(n - j * NR);
                let bias = bias.map(|b| &b[j * NR..j * NR + cols]);
                let panel = w.panel(j);
                for p0 in (0..kp).step_by(KC) {
                    let pk = KC.min(kp - p0);
                    for i in (0..rows).step_by(MR) {
                        let tile = Tile {
                            a: buf[i * kp + p0..].as_ptr(),
                            lda: kp,
                            // SAFETY: p0 < kp, inside panel j's kp * 32 words.
                            b: unsafe { panel.add(p0 * NR) },
                            pairs: pk,
                            // SAFETY: row r0 + i < m and column j * NR < n: inside [m, n].
                            c: unsafe { out.at((r0 + i) * n + j * NR) },
                            ldc: n,
                            rows: MR.min(rows - i),
                            cols,
                            init: if p0 == 0 { Some(bias) } else { None },
                        };
                        // SAFETY: the tile's pointers cover `rows` rows of `pairs` words of
                        // `a`, `pairs` x 32 words of `b` and `rows` x `cols` outputs, all in
                        // bounds; tasks write disjoint outputs.
                        unsafe { tile.run(kernel) };
                    }
                }
            }
        });
    });
    // SAFETY: the tasks cover every (row block, panel group) pair, and every output element
    // of a task's rows and columns was written by the k block starting at 0.
    unsafe { y.set_len(m * n) };
    Ok(y)
}

/// Converts one row of `x` (`k` values) to `ceil(k / 2)` bf16 pairs, zero-padded.
fn convert_row(src: &[f32], dst: &mut [u32], kernel: Kernel) {
    #[cfg(all(target_arch = "x86_64", medvlm_avx512bf16))]
    if kernel == Kernel::Avx512Bf16 {
        // SAFETY: the kernel was checked against the CPU in `matmul`.
        unsafe { avx512::convert_row(src, dst) };
        return;
    }
    let _ = kernel;
    convert_tail(src, dst, 0);
}

/// Scalar conversion of `src[from..]` (`from` even) into `dst[from / 2..]`.
fn convert_tail(src: &[f32], dst: &mut [u32], from: usize) {
    for (p, d) in dst.iter_mut().enumerate().skip(from / 2) {
        let lo = src[2 * p];
        let hi = src.get(2 * p + 1).copied().unwrap_or(0.0);
        *d = pair(lo, hi);
    }
}

/// One micro-kernel call: `rows` (<= MR) rows x `cols` (<= 32) columns over `pairs` pairs.
struct Tile<'a> {
    a: *const u32,
    lda: usize,
    b: *const u32,
    pairs: usize,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    /// `Some(bias)`: start from the bias (zero without one); `None`: add onto `c`.
    init: Option<Option<&'a [f32]>>,
}

impl Tile<'_> {
    /// # Safety
    /// The pointers must cover the tile (see the call in [`matmul`]); `kernel` must run on
    /// this CPU.
    unsafe fn run(&self, kernel: Kernel) {
        #[cfg(all(target_arch = "x86_64", medvlm_avx512bf16))]
        if kernel == Kernel::Avx512Bf16 {
            avx512::tile(self);
            return;
        }
        let _ = kernel;
        self.scalar();
    }

    /// The scalar kernel: same operands, same order of the two products per pair.
    unsafe fn scalar(&self) {
        for r in 0..self.rows {
            for c in 0..self.cols {
                let out = self.c.add(r * self.ldc + c);
                let mut acc = match self.init {
                    Some(Some(b)) => b[c],
                    Some(None) => 0.0,
                    None => *out,
                };
                for p in 0..self.pairs {
                    let xa = *self.a.add(r * self.lda + p);
                    let wb = *self.b.add(p * NR + c);
                    let lo = bf16_bits_to_f32(xa as u16) * bf16_bits_to_f32(wb as u16);
                    let hi =
                        bf16_bits_to_f32((xa >> 16) as u16) * bf16_bits_to_f32((wb >> 16) as u16);
                    acc += lo + hi;
                }
                *out = acc;
            }
        }
    }
}

#[cfg(all(target_arch = "x86_64", medvlm_avx512bf16))]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{convert_tail, Tile, MR, NR};

    /// `src` to bf16 pairs, 32 values per instruction; the tail in scalar code (same rounding).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn convert_row(src: &[f32], dst: &mut [u32]) {
        let k = src.len();
        let mut i = 0;
        while i + 32 <= k {
            let lo = _mm512_loadu_ps(src.as_ptr().add(i));
            let hi = _mm512_loadu_ps(src.as_ptr().add(i + 16));
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(dst.as_mut_ptr().add(i / 2) as *mut __m512i, v);
            i += 32;
        }
        convert_tail(src, dst, i);
    }

    /// Dispatches on the number of rows so that each count gets a fully unrolled kernel.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile(t: &Tile) {
        match t.rows {
            8 => kernel::<8>(t),
            7 => kernel::<7>(t),
            6 => kernel::<6>(t),
            5 => kernel::<5>(t),
            4 => kernel::<4>(t),
            3 => kernel::<3>(t),
            2 => kernel::<2>(t),
            _ => kernel::<1>(t),
        }
    }

    /// `R` rows x 32 columns of f32 accumulators; per pair of `k`: two weight loads, `R`
    /// broadcasts of the input pair, `2R` `vdpbf16ps`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    unsafe fn kernel<const R: usize>(t: &Tile) {
        const { assert!(R >= 1 && R <= MR) };
        let cols = t.cols;
        let m0: __mmask16 = if cols >= 16 {
            0xffff
        } else {
            (1u32 << cols) as u16 - 1
        };
        let m1: __mmask16 = if cols >= 32 {
            0xffff
        } else if cols > 16 {
            (1u32 << (cols - 16)) as u16 - 1
        } else {
            0
        };
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        match t.init {
            Some(Some(b)) => {
                let b0 = _mm512_maskz_loadu_ps(m0, b.as_ptr());
                let b1 = _mm512_maskz_loadu_ps(m1, b.as_ptr().add(16.min(cols)));
                for a in acc.iter_mut() {
                    *a = [b0, b1];
                }
            }
            Some(None) => {}
            None => {
                for (r, a) in acc.iter_mut().enumerate() {
                    let c = t.c.add(r * t.ldc);
                    a[0] = _mm512_maskz_loadu_ps(m0, c);
                    a[1] = _mm512_maskz_loadu_ps(m1, c.add(16.min(cols)));
                }
            }
        }
        let mut a = t.a;
        let mut b = t.b;
        for _ in 0..t.pairs {
            let w0: __m512bh = std::mem::transmute(_mm512_load_si512(b as *const __m512i));
            let w1: __m512bh = std::mem::transmute(_mm512_load_si512(b.add(16) as *const __m512i));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let xv: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r * t.lda) as i32));
                acc_r[0] = _mm512_dpbf16_ps(acc_r[0], xv, w0);
                acc_r[1] = _mm512_dpbf16_ps(acc_r[1], xv, w1);
            }
            a = a.add(1);
            b = b.add(NR);
        }
        for (r, a) in acc.iter().enumerate() {
            let c = t.c.add(r * t.ldc);
            _mm512_mask_storeu_ps(c, m0, a[0]);
            _mm512_mask_storeu_ps(c.add(16.min(cols)), m1, a[1]);
        }
    }
}

/// `x Wᵀ + b` for a CPU f32 tensor `x` `[.., k]` with a packed bf16 weight: the forward pass
/// of a [`crate::LinearLayer`] after [`crate::LinearLayer::pack_bf16`]. Inference only: an
/// `x` or bias that gradients would flow through is refused (the product has no backward
/// pass). `what` names the layer in errors.
pub fn linear(
    x: &Tensor,
    w: &std::sync::Arc<PackedBf16Weight>,
    bias: Option<&Tensor>,
    what: &str,
) -> candle_core::Result<Tensor> {
    if x.track_op() || bias.is_some_and(|b| b.track_op()) {
        candle_core::bail!(
            "{what}: bf16 linear layers compute inference only (no gradient flows through \
             them); train or learn prompts with an f32 model"
        )
    }
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        candle_core::bail!(
            "{what}: bf16 linear layers take f32 inputs on the CPU, got {:?} on {:?}",
            x.dtype(),
            x.device()
        )
    }
    let bias = match bias {
        Some(b) => Some(b.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?),
        None => None,
    };
    x.contiguous()?.apply_op1_no_bwd(&Bf16Linear {
        w: w.clone(),
        bias,
        kernel: Kernel::best(),
    })
}

struct Bf16Linear {
    w: std::sync::Arc<PackedBf16Weight>,
    bias: Option<Vec<f32>>,
    kernel: Kernel,
}

impl CustomOp1 for Bf16Linear {
    fn name(&self) -> &'static str {
        "medvlm-linear-bf16"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = crate::fused::f32_slice(s, l, "bf16 linear (x)")?;
        let k = l.shape().dims().last().copied().unwrap_or(0);
        if k != self.w.k {
            candle_core::bail!(
                "bf16 linear: input {:?} for a weight [{}, {}]",
                l.shape(),
                self.w.n,
                self.w.k
            )
        }
        let m = x.len() / k;
        let y = matmul(x, m, &self.w, self.bias.as_deref(), self.kernel)?;
        let mut dims = l.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.w.n;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use candle_core::{Device, Var};

    /// Deterministic values in [-3, 3) (no RNG dependency), different per `seed`.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let t = (i as f64 + 1.0) * 0.754_877_666_246_692_7
                    + seed as f64 * 0.569_840_290_998_053_2;
                ((t.fract() - 0.5) * 6.0) as f32
            })
            .collect()
    }

    fn round(v: f32) -> f64 {
        bf16_bits_to_f32(f32_to_bf16_bits(v)) as f64
    }

    /// Checks `got` `[m, n]` against an f64 product of the bf16-rounded inputs, within the
    /// bound of f32 summation of `k` terms: `k · 2⁻²⁴ · (Σ|xᵢwᵢ| + |b|)` (plus a little).
    fn check(
        got: &[f32],
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        (m, k, n): (usize, usize, usize),
    ) {
        assert_eq!(got.len(), m * n);
        for i in 0..m {
            for j in 0..n {
                let mut want = b.map_or(0.0, |b| b[j] as f64);
                let mut mag = want.abs();
                for t in 0..k {
                    let p = round(x[i * k + t]) * round(w[j * k + t]);
                    want += p;
                    mag += p.abs();
                }
                let tol = (k as f64 + 2.0) * 2f64.powi(-24) * mag * 1.01 + 1e-30;
                let g = got[i * n + j] as f64;
                assert!(
                    (g - want).abs() <= tol,
                    "[{m}x{k}x{n}] y[{i}][{j}] = {g}, want {want} (tolerance {tol:e})"
                );
            }
        }
    }

    #[test]
    fn rounding_is_to_nearest_even_with_the_instruction_conventions() {
        // 1 + 2⁻⁸ lies half-way between bf16 1 and 1 + 2⁻⁷: even is 1.
        assert_eq!(f32_to_bf16_bits(1.0 + 2f32.powi(-8)), 0x3f80);
        // 1 + 3·2⁻⁹ is above half-way: up.
        assert_eq!(f32_to_bf16_bits(1.0 + 3.0 * 2f32.powi(-9)), 0x3f81);
        // 1 + 3·2⁻⁸ is half-way between 1 + 2⁻⁷ (odd) and 1 + 2⁻⁶: up to even.
        assert_eq!(f32_to_bf16_bits(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        assert_eq!(f32_to_bf16_bits(-2.5), 0xc020);
        assert_eq!(f32_to_bf16_bits(f32::MAX), 0x7f80);
        assert_eq!(f32_to_bf16_bits(1e-39), 0x0000);
        assert_eq!(f32_to_bf16_bits(-1e-39), 0x8000);
        assert_eq!(f32_to_bf16_bits(f32::MIN_POSITIVE), 0x0080);
        assert!(bf16_bits_to_f32(f32_to_bf16_bits(f32::NAN)).is_nan());
        // The vector conversion rounds the same way, including its scalar tail.
        if cpu_has_bf16_dot() {
            let v: Vec<f32> = values(77, 3)
                .into_iter()
                .map(|x| x * 1.000_7)
                .chain([
                    1.0 + 2f32.powi(-8),
                    1.0 + 3.0 * 2f32.powi(-8),
                    1e-39,
                    -1e-39,
                ])
                .chain([f32::MAX])
                .collect();
            let mut fast = vec![0u32; v.len().div_ceil(2)];
            let mut slow = fast.clone();
            convert_row(&v, &mut fast, Kernel::Avx512Bf16);
            convert_row(&v, &mut slow, Kernel::Scalar);
            assert_eq!(fast, slow);
        }
    }

    #[test]
    fn the_input_is_rounded_to_bf16_before_the_product() {
        // y = x · 1: the output is bf16(x) exactly, not x.
        let w = PackedBf16Weight::pack(&[1.0], 1, 1).unwrap();
        let x = [
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-9),
            1.0 + 3.0 * 2f32.powi(-8),
            -std::f32::consts::PI,
        ];
        for kernel in [Kernel::Scalar, Kernel::best()] {
            let y = matmul(&x, 4, &w, None, kernel).unwrap();
            let want = [1.0, 1.0 + 2f32.powi(-7), 1.0 + 2f32.powi(-6), -3.140_625];
            assert_eq!(y, want, "{kernel:?}");
        }
    }

    #[test]
    fn products_match_an_f64_reference_for_awkward_shapes() {
        let kernel = Kernel::best();
        // Say which kernel ran: on a CPU without AVX512-BF16 only the scalar one is checked.
        eprintln!("bf16 kernel under test: {kernel:?} (and Scalar)");
        // (m, k, n): single values, odd k, n not a multiple of 32, k spanning several k
        // blocks (KC = 128 pairs), rows spanning several row blocks and the MR remainder.
        let shapes = [
            (1, 1, 1),
            (1, 7, 5),
            (3, 33, 31),
            (9, 64, 32),
            (8, 256, 64),
            (17, 257, 100),
            (1, 769, 77),
            (300, 96, 65),
            (100, 3001, 45),
        ];
        for (s, &(m, k, n)) in shapes.iter().enumerate() {
            let x = values(m * k, 2 * s as u64);
            let w = values(n * k, 2 * s as u64 + 1);
            let b: Vec<f32> = values(n, 99).iter().map(|v| v * 10.0).collect();
            let packed = PackedBf16Weight::pack(&w, n, k).unwrap();
            for kern in [Kernel::Scalar, kernel] {
                let y = matmul(&x, m, &packed, Some(&b), kern).unwrap();
                check(&y, &x, &w, Some(&b), (m, k, n));
                let y = matmul(&x, m, &packed, None, kern).unwrap();
                check(&y, &x, &w, None, (m, k, n));
            }
        }
    }

    #[test]
    fn the_tensor_entry_point_takes_strided_and_batched_inputs() {
        let dev = Device::Cpu;
        let (k, n) = (41, 70);
        // x [2, 5, 41] as a transposed view of [2, 41, 5]: not contiguous.
        let xt = Tensor::from_vec(values(2 * k * 5, 7), (2, k, 5), &dev).unwrap();
        let x = xt.transpose(1, 2).unwrap();
        assert!(!x.is_contiguous());
        let w = Tensor::from_vec(values(n * k, 8), (n, k), &dev).unwrap();
        let b = Tensor::from_vec(values(n, 9), n, &dev).unwrap();
        let packed = Arc::new(PackedBf16Weight::from_tensor(&w).unwrap());
        let y = linear(&x, &packed, Some(&b), "test").unwrap();
        assert_eq!(y.dims(), &[2, 5, n]);
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let ws: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let bs: Vec<f32> = b.to_vec1().unwrap();
        let ys: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        check(&ys, &xs, &ws, Some(&bs), (10, k, n));
        // A weight given transposed (as open_clip's text projection is) packs the same.
        let wt = Tensor::from_vec(ws.clone(), (n, k), &dev)
            .unwrap()
            .t()
            .unwrap()
            .contiguous()
            .unwrap()
            .t()
            .unwrap();
        let y2 = linear(
            &x,
            &Arc::new(PackedBf16Weight::from_tensor(&wt).unwrap()),
            Some(&b),
            "test",
        )
        .unwrap();
        assert_eq!(ys, y2.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }

    #[test]
    fn gradients_and_wrong_inputs_are_refused_with_the_layer_named() {
        let dev = Device::Cpu;
        let packed = Arc::new(PackedBf16Weight::pack(&values(12, 1), 3, 4).unwrap());
        let x = Var::from_tensor(&Tensor::ones((2, 4), candle_core::DType::F32, &dev).unwrap())
            .unwrap();
        let e = linear(x.as_tensor(), &packed, None, "blocks.0.fc1")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("blocks.0.fc1") && e.contains("inference only"),
            "{e}"
        );
        let x = Tensor::ones((2, 5), candle_core::DType::F32, &dev).unwrap();
        let e = linear(&x, &packed, None, "l").unwrap_err().to_string();
        assert!(e.contains("[3, 4]"), "{e}");
        let x = Tensor::ones((2, 4), candle_core::DType::F64, &dev).unwrap();
        let e = linear(&x, &packed, None, "l").unwrap_err().to_string();
        assert!(e.contains("f32 inputs"), "{e}");
    }

    #[test]
    fn a_cpu_without_the_instruction_is_refused_with_what_to_do() {
        assert!(cpu_support(true).is_ok());
        let e = cpu_support(false).unwrap_err();
        assert!(e.contains("AVX512-BF16") && e.contains("use f32"), "{e}");
        // The fast kernel cannot be asked for where it does not exist.
        if !cpu_has_bf16_dot() {
            let w = PackedBf16Weight::pack(&[1.0], 1, 1).unwrap();
            assert!(matmul(&[1.0], 1, &w, None, Kernel::Avx512Bf16).is_err());
        }
    }
}
