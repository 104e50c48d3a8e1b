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
//!   the closed-form backward), average pooling another.
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

/// `y = A·B` (or `y += A·B`) on row-major buffers addressed by (row stride, column stride):
/// element `(i, j)` of `A` is `a[i·a_rs + j·a_cs]`. Single-threaded: callers parallelise over
/// images.
#[allow(clippy::too_many_arguments)]
fn sgemm(
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
                let mut cols = vec![0f32; rows * k];
                for (yi, img) in yb.chunks_mut(rows * o).zip(xb.chunks(img_len)) {
                    im2col_image(img, &mut cols, self.window, (h, w, c));
                    sgemm((rows, o, k), yi, false, &cols, (k, 1), w2, (1, k));
                }
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
        let both = x.apply_op3_no_bwd(
            w2,
            &grad_res.contiguous()?,
            &Conv2dIm2colGrad {
                window: self.window,
            },
        )?;
        let nx = x.elem_count();
        Ok((
            Some(both.narrow(0, 0, nx)?.reshape(x.shape())?),
            Some(both.narrow(0, nx, w2.elem_count())?.reshape(w2.shape())?),
        ))
    }
}

/// Backward of [`Conv2dIm2col`] from `(x, w2, dy)`: `dx` (flattened) followed by `dw2`, per
/// image `dcols = dy·w2` scattered back by `col2im` and `dw2 += dyᵀ·cols` (the columns
/// recomputed, partial sums per task).
struct Conv2dIm2colGrad {
    window: Window,
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
        let mut dx = vec![0f32; x.len()];
        let dw = dx
            .par_chunks_mut((IMAGES_PER_TASK * img_len).max(1))
            .zip(x.par_chunks((IMAGES_PER_TASK * img_len).max(1)))
            .zip(dy.par_chunks((IMAGES_PER_TASK * rows * o).max(1)))
            .map(|((dxb, xb), gb)| {
                let mut cols = vec![0f32; rows * k];
                let mut dcols = vec![0f32; rows * k];
                let mut dw = vec![0f32; o * k];
                for ((dxi, img), gi) in dxb
                    .chunks_mut(img_len)
                    .zip(xb.chunks(img_len))
                    .zip(gb.chunks(rows * o))
                {
                    im2col_image(img, &mut cols, self.window, (h, w, c));
                    sgemm((o, k, rows), &mut dw, true, gi, (1, o), &cols, (k, 1));
                    sgemm((rows, k, o), &mut dcols, false, gi, (o, 1), w2, (k, 1));
                    for_each_tap(self.window, (h, w), (ho, wo), |row, tap, iy, ix| {
                        let src = (row * taps + tap) * c;
                        let dst = (iy * w + ix) * c;
                        for (d, v) in dxi[dst..dst + c].iter_mut().zip(&dcols[src..src + c]) {
                            *d += v;
                        }
                    });
                }
                dw
            })
            .reduce(
                || vec![0f32; o * k],
                |a, b| a.iter().zip(&b).map(|(x, y)| x + y).collect(),
            );
        dx.extend(dw);
        Ok((CpuStorage::F32(dx), Shape::from(x.len() + o * k)))
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

/// Per-channel mean and biased variance of `x` `[N, C]` (rows in parallel, f64 sums).
fn channel_moments(x: &[f32], c: usize) -> (Vec<f32>, Vec<f32>) {
    let n = x.len() / c.max(1);
    let rows_per_task = (1 << 14) / c.max(1) + 1;
    let sums = x
        .par_chunks(rows_per_task * c)
        .map(|chunk| {
            let mut acc = vec![0f64; 2 * c];
            for row in chunk.chunks(c) {
                for (j, &v) in row.iter().enumerate() {
                    acc[j] += v as f64;
                    acc[c + j] += (v as f64) * (v as f64);
                }
            }
            acc
        })
        .reduce(
            || vec![0f64; 2 * c],
            |a, b| a.iter().zip(&b).map(|(x, y)| x + y).collect(),
        );
    let mean: Vec<f64> = sums[..c].iter().map(|s| s / n as f64).collect();
    let var = sums[c..]
        .iter()
        .zip(&mean)
        .map(|(sq, m)| ((sq / n as f64) - m * m).max(0.0) as f32)
        .collect();
    (mean.into_iter().map(|m| m as f32).collect(), var)
}

/// Training-mode batch norm of `x` `[N, C]` by its own column statistics, one pass forward
/// and two backward: `xhat = (x − μ) / √(σ² + ε)`, `y = xhat·w + b`;
/// `dx = w/√(σ² + ε) · (dy − mean(dy) − xhat·mean(dy·xhat))`, `dw = Σ dy·xhat`, `db = Σ dy`.
struct BatchNormTrain {
    eps: f32,
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
        let (scale, shift): (Vec<f32>, Vec<f32>) = (0..c)
            .map(|j| {
                let s = w[j] / (var[j] + self.eps).sqrt();
                (s, b[j] - mean[j] * s)
            })
            .unzip();
        // Every element is written: no zero-fill of the output first.
        let y = crate::fastmath::par_fill(x.len(), c * 1024, |i, out| {
            for (yr, xr) in out.chunks_mut(c).zip(x[i..].chunks(c)) {
                for j in 0..c {
                    yr[j].write(xr[j] * scale[j] + shift[j]);
                }
            }
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
            &BatchNormTrainGrad { eps: self.eps },
        )?;
        Ok((
            Some(all.narrow(0, 0, n)?),
            Some(all.get(n)?),
            Some(all.get(n + 1)?),
        ))
    }
}

/// Backward of [`BatchNormTrain`] from `(x, weight, dy)`: `[N + 2, C]` holding `dx`, `dw`, `db`.
struct BatchNormTrainGrad {
    eps: f32,
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
        let n = x.len() / c;
        let (mean, var) = channel_moments(x, c);
        let rstd: Vec<f32> = var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
        // Pass 1: Σ dy and Σ dy·xhat per channel.
        let sums = x
            .par_chunks(c * 1024)
            .zip(dy.par_chunks(c * 1024))
            .map(|(xb, gb)| {
                let mut acc = vec![0f64; 2 * c];
                for (xr, gr) in xb.chunks(c).zip(gb.chunks(c)) {
                    for j in 0..c {
                        let xhat = (xr[j] - mean[j]) * rstd[j];
                        acc[j] += gr[j] as f64;
                        acc[c + j] += (gr[j] * xhat) as f64;
                    }
                }
                acc
            })
            .reduce(
                || vec![0f64; 2 * c],
                |a, b| a.iter().zip(&b).map(|(x, y)| x + y).collect(),
            );
        let mean_dy: Vec<f32> = sums[..c].iter().map(|s| (s / n as f64) as f32).collect();
        let mean_dyx: Vec<f32> = sums[c..].iter().map(|s| (s / n as f64) as f32).collect();
        let mut out = vec![0f32; (n + 2) * c];
        let (dx, params) = out.split_at_mut(n * c);
        // Pass 2: dx.
        dx.par_chunks_mut(c * 1024)
            .zip(x.par_chunks(c * 1024).zip(dy.par_chunks(c * 1024)))
            .for_each(|(db, (xb, gb))| {
                for ((dr, xr), gr) in db.chunks_mut(c).zip(xb.chunks(c)).zip(gb.chunks(c)) {
                    for j in 0..c {
                        let xhat = (xr[j] - mean[j]) * rstd[j];
                        dr[j] = w[j] * rstd[j] * (gr[j] - mean_dy[j] - xhat * mean_dyx[j]);
                    }
                }
            });
        for j in 0..c {
            params[j] = sums[c + j] as f32;
            params[c + j] = sums[j] as f32;
        }
        Ok((CpuStorage::F32(out), Shape::from((n + 2, c))))
    }
}

/// Per-channel batch mean and biased variance of `x` `[N, C]`, as a `[2, C]` tensor (no
/// gradient; for the running statistics).
struct ChannelMoments;

impl CustomOp1 for ChannelMoments {
    fn name(&self) -> &'static str {
        "medvlm-channel-moments"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = crate::fused::f32_slice(s, l, "channel moments")?;
        let (_, c) = l.shape().dims2()?;
        let (mut mean, var) = channel_moments(x, c);
        mean.extend(var);
        Ok((CpuStorage::F32(mean), Shape::from((2, c))))
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
        let c = x.dim(D::Minus1)?;
        if !training {
            let inv_std = (self.running_var.detach().to_dtype(x.dtype())? + self.eps)?
                .sqrt()?
                .recip()?;
            let scale = (self.weight.to_dtype(x.dtype())? * inv_std)?;
            let shift = (self.bias.to_dtype(x.dtype())?
                - (self.running_mean.detach().to_dtype(x.dtype())? * &scale)?)?;
            return x.broadcast_mul(&scale)?.broadcast_add(&shift);
        }
        let n = x.elem_count() / c.max(1);
        if n < 2 {
            candle_core::bail!("batch norm in training mode needs more than one value per channel")
        }
        let x2 = x.reshape((n, c))?.contiguous()?;
        let fused = x.device().is_cpu()
            && [x.dtype(), self.weight.dtype(), self.bias.dtype()] == [DType::F32; 3];
        let (y, mean, var) = if fused {
            let y = x2.apply_op3(
                &self.weight.contiguous()?,
                &self.bias.contiguous()?,
                BatchNormTrain {
                    eps: self.eps as f32,
                },
            )?;
            let moments = x2.detach().apply_op1_no_bwd(&ChannelMoments)?;
            (y, moments.get(0)?, moments.get(1)?)
        } else {
            let mean = x2.mean(0)?;
            let centred = x2.broadcast_sub(&mean)?;
            let var = centred.sqr()?.mean(0)?;
            let y = centred
                .broadcast_div(&(&var + self.eps)?.sqrt()?)?
                .broadcast_mul(&self.weight)?
                .broadcast_add(&self.bias)?;
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
