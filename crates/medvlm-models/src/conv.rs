//! Convolutional building blocks on channels-last (`[B, H, W, C]`) tensors, for the
//! convolutional image towers (CLIP's ModifiedResNet, [`crate::modified_resnet`]).
//!
//! Why channels-last and our own kernels: candle's CPU `conv2d` backward computes the kernel
//! gradient as a convolution whose "kernel" is the whole output gradient, and the input
//! gradient with a direct `conv_transpose2d` loop; both are far slower than the forward, and
//! its reductions over inner dimensions (batch-norm statistics, pooling) are single-threaded
//! strided loops. Here:
//! - a k×k convolution runs image by image (rayon over images): `im2col` of one image into a
//!   per-task buffer, then one gemm `y_i = cols_i · Wᵀ`; the backward recomputes the columns
//!   and does `dW += dy_iᵀ · cols_i` and `dx_i = col2im(dy_i · W)`. The column matrix of a
//!   whole batch (tens of MB for 64 images) is never allocated;
//! - a 1×1 convolution is a plain matrix product on `[B·H·W, C]`;
//! - training-mode batch norm is one fused kernel (per-channel statistics, normalisation and
//!   the closed-form backward), with the ReLU that follows it fused in where the network has
//!   one; the statistics are computed once per forward and shared with the backward and the
//!   running-statistics update; average pooling is another kernel.
//!
//! Weights keep PyTorch's `[O, C, kh, kw]` layout on disk.
//!
//! Other dtypes or devices fall back to candle's `conv2d` on NCHW (inference only needs it).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, Var, D};
use rayon::prelude::*;

/// Geometry of a 2-D convolution window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Kernel height and width.
    pub kernel: (usize, usize),
    /// Stride (both directions).
    pub stride: usize,
    /// Zero padding (both directions, both sides).
    pub padding: usize,
}

impl Window {
    /// Output height and width for an `h × w` input, or an error if the window does not fit.
    pub fn output_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let (kh, kw) = self.kernel;
        let (ph, pw) = (h + 2 * self.padding, w + 2 * self.padding);
        if self.stride == 0 || kh == 0 || kw == 0 || ph < kh || pw < kw {
            candle_core::bail!(
                "convolution window {:?} (stride {}, padding {}) does not fit a {h}x{w} input",
                self.kernel,
                self.stride,
                self.padding
            )
        }
        Ok(((ph - kh) / self.stride + 1, (pw - kw) / self.stride + 1))
    }
}

fn dims4(shape: &Shape, what: &str) -> Result<(usize, usize, usize, usize)> {
    match shape.dims() {
        &[b, h, w, c] => Ok((b, h, w, c)),
        d => candle_core::bail!("{what}: expected a [B, H, W, C] tensor, got {d:?}"),
    }
}

/// Calls `f(row, tap, iy, ix)` for every in-image tap of one image's windows: `row` =
/// `oy·Wo + ox`, `tap` = `i·kw + j`, and the input pixel `(iy, ix)` it reads.
#[inline]
fn for_each_tap(
    window: Window,
    (h, w): (usize, usize),
    (ho, wo): (usize, usize),
    mut f: impl FnMut(usize, usize, usize, usize),
) {
    let (kh, kw) = window.kernel;
    let (s, p) = (window.stride as isize, window.padding as isize);
    for oy in 0..ho {
        for ox in 0..wo {
            let row = oy * wo + ox;
            for i in 0..kh {
                let iy = oy as isize * s + i as isize - p;
                if iy < 0 || iy >= h as isize {
                    continue;
                }
                for j in 0..kw {
                    let ix = ox as isize * s + j as isize - p;
                    if ix < 0 || ix >= w as isize {
                        continue;
                    }
                    f(row, i * kw + j, iy as usize, ix as usize);
                }
            }
        }
    }
}

/// 2-D convolution without bias of a channels-last input `x` `[B, H, W, C]` with a PyTorch
/// weight `[O, C, kh, kw]`; returns `[B, Ho, Wo, O]`. Differentiable in `x` and the weight.
pub fn conv2d(x: &Tensor, weight: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (b, h, w, c) = dims4(x.shape(), "conv2d input")?;
    let (o, wc, kh, kw) = weight.dims4()?;
    if wc != c {
        candle_core::bail!(
            "conv2d: weight {:?} expects {wc} input channels, the input has {c}",
            weight.dims()
        )
    }
    let window = Window {
        kernel: (kh, kw),
        stride,
        padding,
    };
    let (ho, wo) = window.output_size(h, w)?;
    if !(x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32) {
        // NCHW through candle's kernel.
        let y = x
            .permute((0, 3, 1, 2))?
            .contiguous()?
            .conv2d(weight, padding, stride, 1, 1)?;
        return y.permute((0, 2, 3, 1))?.contiguous();
    }
    // [O, C, kh, kw] -> [O, kh, kw, C] so that a row matches the (i, j, c) order of `im2col`.
    let w2 = weight.permute((0, 2, 3, 1))?.reshape((o, kh * kw * c))?;
    if (kh, kw, stride, padding) == (1, 1, 1, 0) {
        return x
            .reshape((b * h * w, c))?
            .matmul(&w2.t()?)?
            .reshape((b, ho, wo, o));
    }
    x.contiguous()?
        .apply_op2(&w2.contiguous()?, Conv2dIm2col { window })?
        .reshape((b, ho, wo, o))
}

/// A ViT's patch embedding: candle's `Conv2d` with stride = kernel and no padding on `x`
/// `[B, C, H, W]`, giving `[B, O, H/p, W/p]`. While its weight is trained (tracked, f32 on the
/// CPU) it runs as the patches `[B·N, C·p·p]` times the flattened weight through the fused
/// linear layer: candle's convolution backward also computes the pixels' gradient (a
/// transposed convolution) that nothing uses, a quarter of the quickstart ViT's backward
/// pass. Otherwise (inference, a frozen tower) candle's convolution, as the parity fixtures
/// were checked with.
pub fn patch_embedding(conv: &candle_nn::Conv2d, x: &Tensor) -> Result<Tensor> {
    let w = conv.weight();
    let cfg = conv.config();
    let (o, c, kh, kw) = w.dims4()?;
    let applies = w.track_op()
        && crate::fused::fusable(w)
        && crate::fused::fusable(x)
        && x.rank() == 4
        && kh == kw
        && cfg.stride == kh
        && cfg.padding == 0
        && cfg.dilation == 1
        && cfg.groups == 1;
    if !applies {
        return candle_core::Module::forward(conv, x);
    }
    let (b, xc, h, wd) = x.dims4()?;
    if xc != c || h % kh != 0 || wd % kw != 0 {
        // Let candle's convolution report (or handle) the mismatch as it always has.
        return candle_core::Module::forward(conv, x);
    }
    let (gh, gw) = (h / kh, wd / kw);
    // Patch rows in the weight's (channel, row, column) order.
    let patches = x
        .reshape((b, c, gh, kh, gw, kw))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b * gh * gw, c * kh * kw))?;
    let w2 = w.reshape((o, c * kh * kw))?;
    let y = match conv.bias() {
        Some(bias) => crate::fused::linear(&patches, &w2, bias)?,
        None => patches.matmul(&w2.t()?)?,
    };
    y.reshape((b, gh, gw, o))?.permute((0, 3, 1, 2))
}

/// `y = A·B` (or `y += A·B`) on row-major buffers addressed by (row stride, column stride):
/// element `(i, j)` of `A` is `a[i·a_rs + j·a_cs]`. Single-threaded: callers parallelise over
/// images.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
) {
    assert!(dst.len() >= m * n);
    assert!(m == 0 || k == 0 || a.len() > (m - 1) * a_rs + (k - 1) * a_cs);
    assert!(k == 0 || n == 0 || b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    // SAFETY: the asserts above keep every address gemm reads or writes inside the slices;
    // dst is row-major [m, n] (column stride 1, row stride n).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Fills `cols` `[Ho·Wo, kh·kw·C]` from one image `[H, W, C]` (zeros outside the image).
fn im2col_image(img: &[f32], cols: &mut [f32], window: Window, (h, w, c): (usize, usize, usize)) {
    let (ho, wo) = window.output_size(h, w).unwrap_or((0, 0));
    let taps = window.kernel.0 * window.kernel.1;
    cols.fill(0.0);
    for_each_tap(window, (h, w), (ho, wo), |row, tap, iy, ix| {
        let dst = (row * taps + tap) * c;
        let src = (iy * w + ix) * c;
        cols[dst..dst + c].copy_from_slice(&img[src..src + c]);
    });
}

/// The columns of `images` consecutive images of `x` stacked: `[images·Ho·Wo, kh·kw·C]`, so
/// that one gemm serves them all (a late stage's 4×4 feature map alone would give gemm only
/// 16 rows, a quarter of its AVX-512 micro-kernel's 64).
fn im2col_images(
    x: &[f32],
    images: usize,
    window: Window,
    (h, w, c): (usize, usize, usize),
    cols_per_image: usize,
) -> Vec<f32> {
    let mut cols = vec![0f32; images * cols_per_image];
    for (ci, img) in cols
        .chunks_mut(cols_per_image.max(1))
        .zip(x.chunks((h * w * c).max(1)))
    {
        im2col_image(img, ci, window, (h, w, c));
    }
    cols
}

/// A strided / padded convolution image by image: `im2col` into a per-task buffer and one
/// gemm per image, so the `[B·Ho·Wo, kh·kw·C]` column matrix of the whole batch (tens of MB
/// for a 64-image batch) is never allocated. Inputs: `x` `[B, H, W, C]`, `w2` `[O, kh·kw·C]`;
/// output `[B, Ho·Wo, O]`.
struct Conv2dIm2col {
    window: Window,
}

/// Images per rayon task of the convolution kernels.
const IMAGES_PER_TASK: usize = 4;

impl candle_core::CustomOp2 for Conv2dIm2col {
    fn name(&self) -> &'static str {
        "medvlm-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = crate::fused::f32_slice(s1, l1, "conv2d (x)")?;
        let w2 = crate::fused::f32_slice(s2, l2, "conv2d (weight)")?;
        let (b, h, w, c) = dims4(l1.shape(), "conv2d")?;
        let (o, k) = l2.shape().dims2()?;
        let (ho, wo) = self.window.output_size(h, w)?;
        if k != self.window.kernel.0 * self.window.kernel.1 * c {
            candle_core::bail!("conv2d: weight [{o}, {k}] does not fit {c} input channels")
        }
        let (rows, img_len) = (ho * wo, h * w * c);
        let mut y = vec![0f32; b * rows * o];
        y.par_chunks_mut((IMAGES_PER_TASK * rows * o).max(1))
            .zip(x.par_chunks((IMAGES_PER_TASK * img_len).max(1)))
            .for_each(|(yb, xb)| {
                let images = xb.len() / img_len.max(1);
                let cols = im2col_images(xb, images, self.window, (h, w, c), rows * k);
                sgemm((images * rows, o, k), yb, false, &cols, (k, 1), w2, (1, k));
            });
        Ok((CpuStorage::F32(y), Shape::from((b, rows, o))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w2: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // The pixels entering the first convolution need no gradient: skip dx there (candle
        // would otherwise also zero-fill and add a gradient buffer the size of the input).
        let need_dx = x.track_op();
        let both = x.apply_op3_no_bwd(
            w2,
            &grad_res.contiguous()?,
            &Conv2dIm2colGrad {
                window: self.window,
                need_dx,
            },
        )?;
        let nx = if need_dx { x.elem_count() } else { 0 };
        let dw = both.narrow(0, nx, w2.elem_count())?.reshape(w2.shape())?;
        let dx = if need_dx {
            Some(both.narrow(0, 0, nx)?.reshape(x.shape())?)
        } else {
            None
        };
        Ok((dx, Some(dw)))
    }
}

/// Backward of [`Conv2dIm2col`] from `(x, w2, dy)`: `dx` (flattened) followed by `dw2`, per
/// image `dcols = dy·w2` scattered back by `col2im` and `dw2 += dyᵀ·cols` (the columns
/// recomputed, partial sums per task).
struct Conv2dIm2colGrad {
    window: Window,
    /// Whether to compute `dx` (false: the output holds `dw2` only).
    need_dx: bool,
}

impl candle_core::CustomOp3 for Conv2dIm2colGrad {
    fn name(&self) -> &'static str {
        "medvlm-conv2d-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = crate::fused::f32_slice(s1, l1, "conv2d grad (x)")?;
        let w2 = crate::fused::f32_slice(s2, l2, "conv2d grad (weight)")?;
        let dy = crate::fused::f32_slice(s3, l3, "conv2d grad (dy)")?;
        let (b, h, w, c) = dims4(l1.shape(), "conv2d grad")?;
        let (o, k) = l2.shape().dims2()?;
        let (ho, wo) = self.window.output_size(h, w)?;
        let (rows, img_len) = (ho * wo, h * w * c);
        if dy.len() != b * rows * o {
            candle_core::bail!("conv2d grad: {} gradients for [{b}, {rows}, {o}]", dy.len())
        }
        let taps = self.window.kernel.0 * self.window.kernel.1;
        // Without `need_dx` (the input is a leaf without gradient, such as the pixels) dx is
        // left empty and not computed. Room for `dw` after it, so appending `dw` at the end
        // does not copy `dx`.
        let mut dx = Vec::with_capacity(if self.need_dx { x.len() } else { 0 } + o * k);
        dx.resize(if self.need_dx { x.len() } else { 0 }, 0f32);
        let task_len = (IMAGES_PER_TASK * img_len).max(1);
        let dy_len = (IMAGES_PER_TASK * rows * o).max(1);
        // One task: adds its images' `dw` into `dw`, and writes their `dx` when asked. As in
        // the forward, one gemm per task for all its images.
        let task = |dw: &mut [f32], dxb: Option<&mut [f32]>, xb: &[f32], gb: &[f32]| {
            let images = xb.len() / img_len.max(1);
            let cols = im2col_images(xb, images, self.window, (h, w, c), rows * k);
            sgemm((o, k, images * rows), dw, true, gb, (1, o), &cols, (k, 1));
            if let Some(dxb) = dxb {
                let mut dcols = cols;
                sgemm(
                    (images * rows, k, o),
                    &mut dcols,
                    false,
                    gb,
                    (o, 1),
                    w2,
                    (k, 1),
                );
                for (dxi, dci) in dxb.chunks_mut(img_len).zip(dcols.chunks(rows * k)) {
                    for_each_tap(self.window, (h, w), (ho, wo), |row, tap, iy, ix| {
                        let src = (row * taps + tap) * c;
                        let dst = (iy * w + ix) * c;
                        for (d, v) in dxi[dst..dst + c].iter_mut().zip(&dci[src..src + c]) {
                            *d += v;
                        }
                    });
                }
            }
        };
        // The tasks in one contiguous group per thread, each group summing its own `dw`, and
        // the groups' sums added in order: the same sum in every run (rayon's `reduce`
        // groups partial sums as work stealing happens to split the tasks, so f32 results
        // could differ between runs, and a resumed training would not repeat its run).
        let n_tasks = x.len().div_ceil(task_len);
        let groups = rayon::current_num_threads().clamp(1, n_tasks.max(1));
        let per_group = n_tasks.div_ceil(groups).max(1);
        let (group_x, group_dy) = (per_group * task_len, per_group * dy_len);
        let run_group = |dxg: Option<&mut [f32]>, xg: &[f32], gg: &[f32]| {
            let mut dw = vec![0f32; o * k];
            let tasks = xg.chunks(task_len).zip(gg.chunks(dy_len));
            match dxg {
                Some(dxg) => {
                    for (dxb, (xb, gb)) in dxg.chunks_mut(task_len).zip(tasks) {
                        task(&mut dw, Some(dxb), xb, gb);
                    }
                }
                None => tasks.for_each(|(xb, gb)| task(&mut dw, None, xb, gb)),
            }
            dw
        };
        let groups_in = x.par_chunks(group_x).zip(dy.par_chunks(group_dy));
        let partials: Vec<Vec<f32>> = if self.need_dx {
            dx.par_chunks_mut(group_x)
                .zip(groups_in)
                .map(|(dxg, (xg, gg))| run_group(Some(dxg), xg, gg))
                .collect()
        } else {
            groups_in.map(|(xg, gg)| run_group(None, xg, gg)).collect()
        };
        let dw = crate::fastmath::sum_in_order(partials, o * k);
        let len = dx.len() + dw.len();
        dx.extend(dw);
        Ok((CpuStorage::F32(dx), Shape::from(len)))
    }
}

/// `k × k` average pooling with stride `k` (PyTorch `AvgPool2d(k)`, no padding) of a
/// channels-last tensor; `H` and `W` must be multiples of `k`. One pass forward and one
/// backward (f32 on CPU; candle's reductions over inner dimensions otherwise).
pub fn avg_pool2d(x: &Tensor, k: usize) -> Result<Tensor> {
    let (b, h, w, c) = dims4(x.shape(), "avg_pool2d")?;
    if k == 0 || !h.is_multiple_of(k) || !w.is_multiple_of(k) {
        candle_core::bail!("avg_pool2d: {h}x{w} is not divisible into {k}x{k} windows")
    }
    if k == 1 {
        return Ok(x.clone());
    }
    if !(x.device().is_cpu() && x.dtype() == DType::F32) {
        return x
            .reshape((b, h / k, k, w / k, k, c))?
            .sum(4)?
            .sum(2)?
            .affine(1.0 / (k * k) as f64, 0.0);
    }
    x.contiguous()?.apply_op1(AvgPool { k })
}

struct AvgPool {
    k: usize,
}

impl CustomOp1 for AvgPool {
    fn name(&self) -> &'static str {
        "medvlm-avg-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = crate::fused::f32_slice(s, l, "avg_pool2d")?;
        let (b, h, w, c) = dims4(l.shape(), "avg_pool2d")?;
        let k = self.k;
        let (ho, wo) = (h / k, w / k);
        let scale = 1.0 / (k * k) as f32;
        let mut y = vec![0f32; b * ho * wo * c];
        y.par_chunks_mut((ho * wo * c).max(1))
            .zip(x.par_chunks((h * w * c).max(1)))
            .for_each(|(out, img)| {
                for iy in 0..h {
                    for ix in 0..w {
                        let dst = ((iy / k) * wo + ix / k) * c;
                        let src = (iy * w + ix) * c;
                        for (o, v) in out[dst..dst + c].iter_mut().zip(&img[src..src + c]) {
                            *o += v * scale;
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((b, ho, wo, c))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // Every input pixel receives its window's gradient / k²: nearest upsampling, scaled.
        let (b, h, w, c) = dims4(arg.shape(), "avg_pool2d grad")?;
        let k = self.k;
        let g = grad_res.affine(1.0 / (k * k) as f64, 0.0)?;
        let g = g
            .reshape((b, h / k, 1, w / k, 1, c))?
            .broadcast_as((b, h / k, k, w / k, k, c))?
            .contiguous()?
            .reshape((b, h, w, c))?;
        Ok(Some(g))
    }
}

/// Rows per rayon task of the batch-norm kernels: about 16k values per task.
fn bn_rows_per_task(c: usize) -> usize {
    ((1 << 14) / c.max(1)).max(1)
}

/// Per-channel mean and biased variance of `x` `[N, C]` (rows in parallel). Sums of values and
/// of squares are f64, so `E[x²] − E[x]²` does not cancel catastrophically; the loops run over
/// zipped slices so that they vectorise.
fn channel_moments(x: &[f32], c: usize) -> (Vec<f32>, Vec<f32>) {
    let n = x.len() / c.max(1);
    let sums = x
        .par_chunks(bn_rows_per_task(c) * c)
        .map(|chunk| {
            let mut acc = vec![0f64; 2 * c];
            let (sum, sq) = acc.split_at_mut(c);
            for row in chunk.chunks_exact(c) {
                for ((s, q), &v) in sum.iter_mut().zip(sq.iter_mut()).zip(row) {
                    let v = f64::from(v);
                    *s += v;
                    *q += v * v;
                }
            }
            acc
        })
        .collect::<Vec<_>>();
    let sums = crate::fastmath::sum_in_order(sums, 2 * c);
    let mean: Vec<f64> = sums[..c].iter().map(|s| s / n as f64).collect();
    let var = sums[c..]
        .iter()
        .zip(&mean)
        .map(|(sq, m)| ((sq / n as f64) - m * m).max(0.0) as f32)
        .collect();
    (mean.into_iter().map(|m| m as f32).collect(), var)
}

/// The batch statistics of one training-mode forward, computed once by the forward kernel and
/// shared with its backward and with the running-statistics update (each used to recompute
/// them: three passes over the activation instead of one).
#[derive(Debug)]
struct BnStats {
    /// Batch mean per channel.
    mean: Vec<f32>,
    /// Biased batch variance per channel.
    var: Vec<f32>,
    /// `1 / √(var + ε)`.
    rstd: Vec<f32>,
    /// `w · rstd`: `y = x·scale + shift`.
    scale: Vec<f32>,
    /// `b − mean · scale`.
    shift: Vec<f32>,
}

type SharedStats = std::sync::Arc<std::sync::OnceLock<BnStats>>;

/// Training-mode batch norm of `x` `[N, C]` by its own column statistics, optionally followed by
/// a ReLU (`relu`), in one pass forward and two backward: `xhat = (x − μ) / √(σ² + ε)`,
/// `z = xhat·w + b`, `y = z` or `max(z, 0)`; with `g = dy` (or `dy·[z > 0]`):
/// `dx = w/√(σ² + ε) · (g − mean(g) − xhat·mean(g·xhat))`, `dw = Σ g·xhat`, `db = Σ g`.
/// Fusing the ReLU removes a node from the autograd graph, and with it a zero-filled
/// gradient buffer and an addition the size of the activation in every backward.
struct BatchNormTrain {
    eps: f32,
    relu: bool,
    stats: SharedStats,
}

fn bn_inputs<'a>(
    s1: &'a CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
    what: &str,
) -> Result<(&'a [f32], &'a [f32], usize)> {
    let x = crate::fused::f32_slice(s1, l1, what)?;
    let w = crate::fused::f32_slice(s2, l2, what)?;
    let (_, c) = l1.shape().dims2()?;
    if w.len() != c {
        candle_core::bail!("{what}: {} scales for {c} channels", w.len())
    }
    Ok((x, w, c))
}

impl candle_core::CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "medvlm-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, c) = bn_inputs(s1, l1, s2, l2, "batch norm")?;
        let b = crate::fused::f32_slice(s3, l3, "batch norm (bias)")?;
        let (mean, var) = channel_moments(x, c);
        let rstd: Vec<f32> = var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
        let scale: Vec<f32> = w.iter().zip(&rstd).map(|(w, r)| w * r).collect();
        let shift: Vec<f32> = (0..c).map(|j| b[j] - mean[j] * scale[j]).collect();
        let relu = self.relu;
        // Every element is written: no zero-fill of the output first.
        let y = crate::fastmath::par_fill(x.len(), bn_rows_per_task(c) * c, |i, out| {
            for (yr, xr) in out.chunks_mut(c).zip(x[i..].chunks(c)) {
                let row = yr.iter_mut().zip(xr).zip(&scale).zip(&shift);
                if relu {
                    for (((y, &x), &s), &t) in row {
                        y.write((x * s + t).max(0.0));
                    }
                } else {
                    for (((y, &x), &s), &t) in row {
                        y.write(x * s + t);
                    }
                }
            }
        });
        // A CustomOp can be run more than once only by calling it again on new inputs, which
        // `BatchNorm` never does; a second result would describe another batch, so keep the
        // first.
        let _ = self.stats.set(BnStats {
            mean,
            var,
            rstd,
            scale,
            shift,
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = x.dim(0)?;
        let all = x.apply_op3_no_bwd(
            weight,
            &grad_res.contiguous()?,
            &BatchNormTrainGrad {
                relu: self.relu,
                stats: self.stats.clone(),
            },
        )?;
        Ok((
            Some(all.narrow(0, 0, n)?),
            Some(all.get(n)?),
            Some(all.get(n + 1)?),
        ))
    }
}

/// Backward of [`BatchNormTrain`] from `(x, weight, dy)` and the forward's statistics:
/// `[N + 2, C]` holding `dx`, `dw`, `db`.
struct BatchNormTrainGrad {
    relu: bool,
    stats: SharedStats,
}

impl candle_core::CustomOp3 for BatchNormTrainGrad {
    fn name(&self) -> &'static str {
        "medvlm-batch-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, c) = bn_inputs(s1, l1, s2, l2, "batch norm grad")?;
        let dy = crate::fused::f32_slice(s3, l3, "batch norm grad (dy)")?;
        if dy.len() != x.len() {
            candle_core::bail!(
                "batch norm grad: {} gradients for {} values",
                dy.len(),
                x.len()
            )
        }
        let Some(st) = self.stats.get() else {
            candle_core::bail!("batch norm grad: the forward kernel left no statistics")
        };
        let n = x.len() / c;
        let rows = bn_rows_per_task(c) * c;
        // Pass 1: Σ g and Σ g·xhat per channel: f32 within a task (about 16k values, so at
        // most a few thousand rows per sum; f32 lanes vectorise twice as wide as f64), f64
        // across tasks.
        let sums = x
            .par_chunks(rows)
            .zip(dy.par_chunks(rows))
            .map(|(xb, gb)| {
                let mut acc = vec![0f32; 2 * c];
                let (sg, sgx) = acc.split_at_mut(c);
                for (xr, gr) in xb.chunks_exact(c).zip(gb.chunks_exact(c)) {
                    if self.relu {
                        bn_grad_row_sums::<true>(xr, gr, st, sg, sgx);
                    } else {
                        bn_grad_row_sums::<false>(xr, gr, st, sg, sgx);
                    }
                }
                acc.into_iter().map(f64::from).collect::<Vec<f64>>()
            })
            .collect::<Vec<_>>();
        let sums = crate::fastmath::sum_in_order(sums, 2 * c);
        let mean_g: Vec<f32> = sums[..c].iter().map(|s| (s / n as f64) as f32).collect();
        let mean_gx: Vec<f32> = sums[c..].iter().map(|s| (s / n as f64) as f32).collect();
        let coef: Vec<f32> = w.iter().zip(&st.rstd).map(|(w, r)| w * r).collect();
        let means = (mean_g.as_slice(), mean_gx.as_slice(), coef.as_slice());
        // Pass 2: dx, written without zero-filling first; then the two parameter rows (room
        // reserved for them, so appending them does not copy dx).
        let mut out = crate::fastmath::par_fill_with_room(n * c, 2 * c, rows, |i, out| {
            for ((dr, xr), gr) in out
                .chunks_mut(c)
                .zip(x[i..].chunks(c))
                .zip(dy[i..].chunks(c))
            {
                if self.relu {
                    bn_grad_row_dx::<true>(xr, gr, st, means, dr);
                } else {
                    bn_grad_row_dx::<false>(xr, gr, st, means, dr);
                }
            }
        });
        out.extend(sums[c..].iter().map(|&s| s as f32));
        out.extend(sums[..c].iter().map(|&s| s as f32));
        Ok((CpuStorage::F32(out), Shape::from((n + 2, c))))
    }
}

/// The gradient reaching the normalisation: `dy`, or with the fused ReLU `dy` where the
/// forward's `z = x·scale + shift` was positive (recomputed with the forward's expression, so
/// the mask is the forward's).
#[inline(always)]
fn bn_gate<const RELU: bool>(x: f32, dy: f32, scale: f32, shift: f32) -> f32 {
    if RELU && x * scale + shift <= 0.0 {
        0.0
    } else {
        dy
    }
}

/// Adds one row's `g` and `g·xhat` to the channel sums (pass 1 of the batch-norm backward).
#[inline(always)]
fn bn_grad_row_sums<const RELU: bool>(
    x: &[f32],
    dy: &[f32],
    st: &BnStats,
    sum_g: &mut [f32],
    sum_gx: &mut [f32],
) {
    let affine = st.scale.iter().zip(&st.shift);
    let norm = st.mean.iter().zip(&st.rstd);
    let acc = sum_g.iter_mut().zip(sum_gx.iter_mut());
    for ((((&x, &dy), (&s, &t)), (&m, &r)), (a, b)) in
        x.iter().zip(dy).zip(affine).zip(norm).zip(acc)
    {
        let g = bn_gate::<RELU>(x, dy, s, t);
        *a += g;
        *b += g * ((x - m) * r);
    }
}

/// One row of `dx = coef · (g − mean(g) − xhat·mean(g·xhat))` (pass 2 of the backward);
/// `means` is `(mean(g), mean(g·xhat), coef)` per channel.
#[inline(always)]
fn bn_grad_row_dx<const RELU: bool>(
    x: &[f32],
    dy: &[f32],
    st: &BnStats,
    means: (&[f32], &[f32], &[f32]),
    dx: &mut [std::mem::MaybeUninit<f32>],
) {
    let (mean_g, mean_gx, coef) = means;
    let affine = st.scale.iter().zip(&st.shift);
    let norm = st.mean.iter().zip(&st.rstd);
    let per_channel = mean_g.iter().zip(mean_gx).zip(coef);
    for (((((d, &x), &dy), (&s, &t)), (&m, &r)), ((&mg, &mgx), &k)) in dx
        .iter_mut()
        .zip(x)
        .zip(dy)
        .zip(affine)
        .zip(norm)
        .zip(per_channel)
    {
        let g = bn_gate::<RELU>(x, dy, s, t);
        d.write(k * (g - mg - (x - m) * r * mgx));
    }
}

/// Batch normalisation over the channel (last) dimension (Ioffe & Szegedy 2015, "Batch
/// Normalization"), with PyTorch's conventions: `eps` 1e-5, momentum 0.1, the running
/// variance updated with the unbiased batch variance, normalisation with the biased one.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    /// Scale `[C]`.
    pub weight: Tensor,
    /// Shift `[C]`.
    pub bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: f64,
    momentum: f64,
}

impl BatchNorm {
    /// Load `{prefix}.weight`, `bias`, `running_mean`, `running_var` (for from-scratch
    /// models: 1, 0, 0, 1).
    pub fn load(vb: candle_nn::VarBuilder, channels: usize) -> Result<Self> {
        use candle_nn::Init::Const;
        Ok(Self {
            weight: vb.get_with_hints(channels, "weight", Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", Const(0.0))?,
            running_mean: vb.get_with_hints(channels, "running_mean", Const(0.0))?,
            running_var: vb.get_with_hints(channels, "running_var", Const(1.0))?,
            eps: 1e-5,
            momentum: 0.1,
        })
    }

    /// Normalise `x` `[.., C]`. With `training`, by the statistics of this batch (all leading
    /// dimensions), updating the running statistics in place when they are trainable `Var`s
    /// (a frozen model's are left as they are); otherwise by the running statistics, which
    /// then take no gradient.
    pub fn forward(&self, x: &Tensor, training: bool) -> Result<Tensor> {
        self.forward_with(x, training, false)
    }

    /// [`Self::forward`] followed by a ReLU, fused into one kernel in training mode on CPU.
    pub fn forward_relu(&self, x: &Tensor, training: bool) -> Result<Tensor> {
        self.forward_with(x, training, true)
    }

    fn forward_with(&self, x: &Tensor, training: bool, relu: bool) -> Result<Tensor> {
        let c = x.dim(D::Minus1)?;
        if !training {
            let inv_std = (self.running_var.detach().to_dtype(x.dtype())? + self.eps)?
                .sqrt()?
                .recip()?;
            let scale = (self.weight.to_dtype(x.dtype())? * inv_std)?;
            let shift = (self.bias.to_dtype(x.dtype())?
                - (self.running_mean.detach().to_dtype(x.dtype())? * &scale)?)?;
            let y = x.broadcast_mul(&scale)?.broadcast_add(&shift)?;
            return if relu { crate::fused::relu(&y) } else { Ok(y) };
        }
        let n = x.elem_count() / c.max(1);
        if n < 2 {
            candle_core::bail!("batch norm in training mode needs more than one value per channel")
        }
        let x2 = x.reshape((n, c))?.contiguous()?;
        let fused = x.device().is_cpu()
            && [x.dtype(), self.weight.dtype(), self.bias.dtype()] == [DType::F32; 3];
        let (y, mean, var) = if fused {
            let stats = SharedStats::default();
            let y = x2.apply_op3(
                &self.weight.contiguous()?,
                &self.bias.contiguous()?,
                BatchNormTrain {
                    eps: self.eps as f32,
                    relu,
                    stats: stats.clone(),
                },
            )?;
            let Some(st) = stats.get() else {
                candle_core::bail!("batch norm: the forward kernel left no statistics")
            };
            let dev = x.device();
            (
                y,
                Tensor::new(st.mean.as_slice(), dev)?,
                Tensor::new(st.var.as_slice(), dev)?,
            )
        } else {
            let mean = x2.mean(0)?;
            let centred = x2.broadcast_sub(&mean)?;
            let var = centred.sqr()?.mean(0)?;
            let y = centred
                .broadcast_div(&(&var + self.eps)?.sqrt()?)?
                .broadcast_mul(&self.weight)?
                .broadcast_add(&self.bias)?;
            let y = if relu { crate::fused::relu(&y)? } else { y };
            (y, mean, var)
        };
        if self.running_mean.is_variable() && self.running_var.is_variable() {
            let m = self.momentum;
            let unbiased = var.detach().affine(n as f64 / (n - 1) as f64, 0.0)?;
            let rm = (self.running_mean.affine(1.0 - m, 0.0)? + mean.detach().affine(m, 0.0)?)?;
            let rv = (self.running_var.affine(1.0 - m, 0.0)? + unbiased.affine(m, 0.0)?)?;
            Var::from_tensor(&self.running_mean)?.set(&rm)?;
            Var::from_tensor(&self.running_var)?.set(&rv)?;
        }
        y.reshape(x.shape())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn nchw_conv(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
        x.permute((0, 3, 1, 2))?
            .contiguous()?
            .conv2d(w, padding, stride, 1, 1)?
            .permute((0, 2, 3, 1))
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    #[test]
    fn conv2d_matches_candle_for_strides_paddings_and_1x1() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 9, 7, 3), &dev)?;
        for (k, stride, padding) in [(3, 1, 1), (3, 2, 1), (1, 1, 0), (2, 2, 0), (3, 1, 0)] {
            let w = Tensor::randn(0f32, 1.0, (5, 3, k, k), &dev)?;
            let ours = conv2d(&x, &w, stride, padding)?;
            let reference = nchw_conv(&x, &w, stride, padding)?;
            assert_eq!(
                ours.dims(),
                reference.dims(),
                "k {k} s {stride} p {padding}"
            );
            let d = max_abs_diff(&ours, &reference)?;
            assert!(d < 1e-4, "k {k} s {stride} p {padding}: {d}");
        }
        Ok(())
    }

    #[test]
    fn conv2d_gradients_match_candle_autograd() -> Result<()> {
        let dev = Device::Cpu;
        // Square input: candle's own conv2d backward mis-sizes non-square inputs (its output
        // padding is taken from the height only).
        let x = Var::randn(0f32, 1.0, (2, 6, 6, 3), &dev)?;
        let w = Var::randn(0f32, 1.0, (4, 3, 3, 3), &dev)?;
        let probe = Tensor::randn(0f32, 1.0, (2, 3, 3, 4), &dev)?;
        let ours = (conv2d(&x, &w, 2, 1)? * &probe)?.sum_all()?.backward()?;
        let theirs = (nchw_conv(&x, &w, 2, 1)? * &probe)?.sum_all()?.backward()?;
        for v in [x.as_tensor(), w.as_tensor()] {
            let (a, b) = (ours.get(v).unwrap(), theirs.get(v).unwrap());
            let d = max_abs_diff(a, b)?;
            assert!(d < 1e-4, "gradient differs by {d}");
        }
        Ok(())
    }

    #[test]
    fn conv2d_batches_of_several_tasks_and_inputs_without_gradient() -> Result<()> {
        // 6 images: one task of IMAGES_PER_TASK stacked into one gemm and a shorter one.
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (6, 5, 5, 3), &dev)?;
        let w = Var::randn(0f32, 1.0, (4, 3, 3, 3), &dev)?;
        let probe = Tensor::randn(0f32, 1.0, (6, 5, 5, 4), &dev)?;
        let ours = conv2d(&x, &w, 1, 1)?;
        let theirs = nchw_conv(&x, &w, 1, 1)?;
        assert!(max_abs_diff(&ours, &theirs)? < 1e-4);
        let go = (ours * &probe)?.sum_all()?.backward()?;
        let gt = (theirs * &probe)?.sum_all()?.backward()?;
        for v in [x.as_tensor(), w.as_tensor()] {
            let d = max_abs_diff(go.get(v).unwrap(), gt.get(v).unwrap())?;
            assert!(d < 1e-4, "gradient differs by {d}");
        }
        // A plain tensor input (the pixels): the kernel gradient alone, still right.
        let pixels = x.as_tensor().detach();
        let g = (conv2d(&pixels, &w, 1, 1)? * &probe)?
            .sum_all()?
            .backward()?;
        assert!(g.get(&pixels).is_none());
        let d = max_abs_diff(
            g.get(w.as_tensor()).unwrap(),
            gt.get(w.as_tensor()).unwrap(),
        )?;
        assert!(d < 1e-4, "kernel gradient without dx differs by {d}");
        Ok(())
    }

    #[test]
    fn trained_patch_embedding_matches_candles_convolution_with_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = candle_nn::Conv2dConfig {
            stride: 4,
            ..Default::default()
        };
        let w = Var::randn(0f32, 0.2, (5, 3, 4, 4), &dev)?;
        let b = Var::randn(0f32, 0.2, 5, &dev)?;
        let conv = candle_nn::Conv2d::new(w.as_tensor().clone(), Some(b.as_tensor().clone()), cfg);
        // Non-square: 8 x 12 pixels, a 2 x 3 patch grid.
        let x = Tensor::randn(0f32, 1.0, (2, 3, 8, 12), &dev)?;
        let probe = Tensor::randn(0f32, 1.0, (2, 5, 2, 3), &dev)?;
        let ours = patch_embedding(&conv, &x)?;
        let theirs = candle_core::Module::forward(&conv, &x)?;
        assert_eq!(ours.dims(), &[2, 5, 2, 3]);
        assert!(max_abs_diff(&ours, &theirs)? < 1e-5);
        let g_ours = (ours * &probe)?.sum_all()?.backward()?;
        let g_theirs = (theirs * &probe)?.sum_all()?.backward()?;
        for v in [w.as_tensor(), b.as_tensor()] {
            let d = max_abs_diff(g_ours.get(v).unwrap(), g_theirs.get(v).unwrap())?;
            assert!(d < 1e-4, "patch-embedding gradient differs by {d}");
        }
        // A frozen weight (inference): candle's convolution itself, bit for bit.
        let frozen =
            candle_nn::Conv2d::new(w.as_tensor().detach(), Some(b.as_tensor().detach()), cfg);
        let y = patch_embedding(&frozen, &x)?;
        assert_eq!(
            max_abs_diff(&y, &candle_core::Module::forward(&frozen, &x)?)?,
            0.0
        );
        Ok(())
    }

    #[test]
    fn conv2d_backward_is_the_adjoint_on_non_square_inputs() -> Result<()> {
        // The convolution is linear in x and in w, so <conv(x, w), g> = <x, dx> = <w, dw>.
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (2, 7, 4, 3), &dev)?;
        let w = Var::randn(0f32, 1.0, (5, 3, 3, 3), &dev)?;
        let y = conv2d(&x, &w, 2, 1)?;
        assert_eq!(y.dims(), &[2, 4, 2, 5]);
        let g = Tensor::randn(0f32, 1.0, y.shape(), &dev)?;
        let lhs = (&y * &g)?.sum_all()?;
        let grads = lhs.backward()?;
        let lhs = lhs.to_scalar::<f32>()?;
        for v in [&x, &w] {
            let d = grads.get(v.as_tensor()).unwrap();
            let rhs = (v.as_tensor() * d)?.sum_all()?.to_scalar::<f32>()?;
            assert!(
                (lhs - rhs).abs() < 1e-3 * lhs.abs().max(1.0),
                "{lhs} vs {rhs}"
            );
        }
        Ok(())
    }

    #[test]
    fn avg_pool_averages_each_window() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 16., &dev)?.reshape((1, 4, 4, 1))?;
        let y = avg_pool2d(&x, 2)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(y, vec![2.5, 4.5, 10.5, 12.5]);
        assert!(avg_pool2d(&x, 3).is_err());
        Ok(())
    }

    #[test]
    fn fused_batch_norm_and_avg_pool_match_composed_ops_with_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(1f32, 2.0, (3, 4, 6, 5), &dev)?;
        let w = Var::randn(1f32, 0.3, 5, &dev)?;
        let b = Var::randn(0f32, 0.3, 5, &dev)?;
        let probe = Tensor::randn(0f32, 1.0, (3, 2, 3, 5), &dev)?;
        let bn = BatchNorm {
            weight: w.as_tensor().clone(),
            bias: b.as_tensor().clone(),
            running_mean: Tensor::zeros(5, DType::F32, &dev)?,
            running_var: Tensor::ones(5, DType::F32, &dev)?,
            eps: 1e-5,
            momentum: 0.1,
        };
        let ours = (avg_pool2d(&bn.forward(&x, true)?, 2)? * &probe)?.sum_all()?;
        // The same computation from candle's composed ops.
        let x2 = x.reshape((72, 5))?;
        let mean = x2.mean(0)?;
        let centred = x2.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean(0)?;
        let y = centred
            .broadcast_div(&(var + 1e-5)?.sqrt()?)?
            .broadcast_mul(w.as_tensor())?
            .broadcast_add(b.as_tensor())?
            .reshape((3, 2, 2, 3, 2, 5))?
            .sum(4)?
            .sum(2)?
            .affine(0.25, 0.0)?;
        let theirs = (y * &probe)?.sum_all()?;
        let d = (ours.to_scalar::<f32>()? - theirs.to_scalar::<f32>()?).abs();
        assert!(d < 1e-3, "values differ by {d}");
        let (go, gt) = (ours.backward()?, theirs.backward()?);
        for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
            let d = max_abs_diff(
                go.get(v.as_tensor()).unwrap(),
                gt.get(v.as_tensor()).unwrap(),
            )?;
            assert!(d < 1e-4, "gradient of {name} differs by {d}");
        }
        Ok(())
    }

    #[test]
    fn fused_batch_norm_relu_matches_batch_norm_then_relu_with_gradients() -> Result<()> {
        let dev = Device::Cpu;
        // Shifted inputs so that the ReLU cuts a good share of each channel, and more rows than
        // one rayon task of the kernels.
        let x = Var::randn(0.3f32, 1.5, (4, 16, 17, 7), &dev)?;
        let w = Var::randn(1f32, 0.5, 7, &dev)?;
        let b = Var::randn(0f32, 0.5, 7, &dev)?;
        let probe = Tensor::randn(0f32, 1.0, x.shape(), &dev)?;
        let varmap = candle_nn::VarMap::new();
        let bn_of = |prefix: &str| -> Result<BatchNorm> {
            let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev);
            let mut bn = BatchNorm::load(vb.pp(prefix), 7)?;
            bn.weight = w.as_tensor().clone();
            bn.bias = b.as_tensor().clone();
            Ok(bn)
        };
        let (fused_bn, plain_bn) = (bn_of("fused")?, bn_of("plain")?);
        let fused = fused_bn.forward_relu(&x, true)?;
        let plain = crate::fused::relu(&plain_bn.forward(&x, true)?)?;
        let zeros = fused
            .le(0f32)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        assert!(
            zeros > 0.2 * x.elem_count() as f32,
            "the ReLU cut only {zeros} values"
        );
        assert!(max_abs_diff(&fused, &plain)? < 1e-6);
        let go = (fused * &probe)?.sum_all()?.backward()?;
        let gp = (plain * &probe)?.sum_all()?.backward()?;
        for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
            let d = max_abs_diff(
                go.get(v.as_tensor()).unwrap(),
                gp.get(v.as_tensor()).unwrap(),
            )?;
            assert!(d < 1e-4, "gradient of {name} differs by {d}");
        }
        // Both updated their running statistics from the same batch statistics.
        for (a, b) in [
            (&fused_bn.running_mean, &plain_bn.running_mean),
            (&fused_bn.running_var, &plain_bn.running_var),
        ] {
            assert!(max_abs_diff(a, b)? < 1e-6);
            assert!(
                max_abs_diff(a, &a.ones_like()?)? > 1e-3,
                "statistics not updated"
            );
        }
        Ok(())
    }

    #[test]
    fn batch_norm_training_normalises_and_updates_running_statistics() -> Result<()> {
        let dev = Device::Cpu;
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let bn = BatchNorm::load(vb, 2)?;
        // Channel 0: 1, 2, 3, 6 (mean 3, biased var 3.5, unbiased 14/3); channel 1: constant 5.
        let x = Tensor::new(&[[1f32, 5.], [2., 5.], [3., 5.], [6., 5.]], &dev)?
            .reshape((1, 2, 2, 2))?;
        let y = bn.forward(&x, true)?.reshape((4, 2))?.to_vec2::<f32>()?;
        let expect0 = (1.0 - 3.0) / (3.5f32 + 1e-5).sqrt();
        assert!((y[0][0] - expect0).abs() < 1e-5);
        assert!(y.iter().all(|r| r[1].abs() < 1e-6));
        let rm = bn.running_mean.to_vec1::<f32>()?;
        let rv = bn.running_var.to_vec1::<f32>()?;
        assert!((rm[0] - 0.3).abs() < 1e-6 && (rm[1] - 0.5).abs() < 1e-6);
        assert!((rv[0] - (0.9 + 0.1 * 14.0 / 3.0)).abs() < 1e-5);
        assert!((rv[1] - 0.9).abs() < 1e-6);
        // Evaluation uses the running statistics.
        let e = bn.forward(&x, false)?.reshape((4, 2))?.to_vec2::<f32>()?;
        assert!((e[0][0] - (1.0 - rm[0]) / (rv[0] + 1e-5).sqrt()).abs() < 1e-5);
        Ok(())
    }
}
