//! Fused CPU kernels with backward passes: softmax and layer norm used while training (when
//! gradients are tracked), and the exact (erf) GELU used always.
//!
//! candle's fused softmax and layer-norm kernels have no backward pass, so training used to
//! compose them from elementwise ops: about ten full-size temporaries per layer norm and five
//! per attention softmax in the forward pass, and as many again in the backward pass, each a
//! fresh allocation and a pass over memory. These kernels do each in one pass forward and one
//! pass backward (the standard closed-form gradients), on f32 CPU tensors; other dtypes and
//! devices keep the composed form. Tests compare values and gradients with the composed form.
//!
//! * softmax: `y = exp(x - max) / sum`, `dx = y * (dy - sum(dy * y))` per row.
//! * layer norm: `xhat = (x - mean) * rstd`, `y = xhat * w + b`;
//!   `g = dy * w`, `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`,
//!   `dw = sum_rows(dy * xhat)`, `db = sum_rows(dy)`.
//! * quick GELU (OpenAI CLIP's): `y = x σ(1.702 x)`, `dx = dy (s + 1.702 x s (1 - s))` with
//!   `s = σ(1.702 x)`; one kernel instead of three ops and their temporaries.
//! * GELU: `y = x Φ(x) = 0.5 x (1 + erf(x / √2))`, `dx = dy (Φ(x) + x φ(x))`. candle's own
//!   `gelu_erf` calls libm's scalar `erff` on one thread; this one uses the vectorised
//!   [`fastmath::erf`] (PyTorch's approximation, within 1e-6) over the rayon pool, which
//!   matters for ViT-B MLP activations (tens of millions of elements per layer).
//!
//! The exponentials of all kernels are [`fastmath::exp`] (within 2e-7 relative).

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use crate::fastmath;

/// Rows per rayon task: below this much work a row loop is cheaper than the fork.
const ROWS_PER_TASK: usize = 64;

/// The contiguous f32 values of CPU storage, or an error naming `what` (the fused kernels'
/// inputs, and other crates' in-place CPU kernels).
pub fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: fused training kernels take f32 storage")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// The mutable counterpart of [`f32_slice`], for in-place kernels.
pub fn f32_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: in-place kernels take f32 storage")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut v[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// The two same-length f32 inputs of a backward kernel: the forward value it needs (`what`'s
/// first operand) and the output gradient.
fn value_and_grad<'a>(
    s1: &'a CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
    what: &str,
) -> Result<(&'a [f32], &'a [f32])> {
    let v = f32_slice(s1, l1, what)?;
    let g = f32_slice(s2, l2, what)?;
    if v.len() != g.len() {
        candle_core::bail!("{what}: {} values but {} gradients", v.len(), g.len());
    }
    Ok((v, g))
}

fn last_dim(shape: &Shape) -> Result<usize> {
    match shape.dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => candle_core::bail!("fused kernels need a non-empty last dimension, got {shape:?}"),
    }
}

/// Whether the fused path applies to `x`.
pub(crate) fn fusable(x: &Tensor) -> bool {
    x.dtype() == DType::F32 && x.device().is_cpu()
}

/// Softmax over the last dimension with a fused backward pass (f32 on CPU; otherwise
/// candle's composed, differentiable softmax).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !fusable(x) {
        return candle_nn::ops::softmax(x, candle_core::D::Minus1);
    }
    x.contiguous()?.apply_op1(SoftmaxLastDim)
}

struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "medvlm-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "softmax")?;
        let d = last_dim(l.shape())?;
        let y = fastmath::par_fill(x.len(), d * ROWS_PER_TASK, |i, out| {
            fastmath::softmax_rows(&x[i..i + out.len()], out, d)
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let dy = grad_res.contiguous()?;
        Ok(Some(res.contiguous()?.apply_op2_no_bwd(&dy, &SoftmaxGrad)?))
    }
}

/// `dx = y * (dy - sum(dy * y))` per row, from the softmax output `y` and its gradient `dy`.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "medvlm-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, dy) = value_and_grad(s1, l1, s2, l2, "softmax grad")?;
        let d = last_dim(l1.shape())?;
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(
                y.par_chunks(d * ROWS_PER_TASK)
                    .zip(dy.par_chunks(d * ROWS_PER_TASK)),
            )
            .for_each(|(db, (yb, gb))| {
                for ((o, yr), gr) in db.chunks_mut(d).zip(yb.chunks(d)).zip(gb.chunks(d)) {
                    let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
                    for ((o, &yv), &gv) in o.iter_mut().zip(yr).zip(gr) {
                        *o = yv * (gv - dot);
                    }
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Layer normalisation over the last dimension with a fused backward pass (f32 on CPU;
/// otherwise candle's composed, differentiable form).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if !(fusable(x) && fusable(weight) && fusable(bias)) {
        return candle_nn::ops::layer_norm_slow(x, weight, bias, eps as f32);
    }
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNorm { eps: eps as f32 },
    )
}

struct LayerNorm {
    eps: f32,
}

/// Mean and reciprocal standard deviation of one row.
#[inline]
fn moments(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "medvlm-layer-norm"
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
        let x = f32_slice(s1, l1, "layer norm (x)")?;
        let w = f32_slice(s2, l2, "layer norm (weight)")?;
        let b = f32_slice(s3, l3, "layer norm (bias)")?;
        let d = last_dim(l1.shape())?;
        if w.len() != d || b.len() != d {
            candle_core::bail!(
                "layer norm: weight {} and bias {} for a last dimension of {d}",
                w.len(),
                b.len()
            );
        }
        let eps = self.eps;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK))
            .for_each(|(yb, xb)| {
                for (yr, xr) in yb.chunks_mut(d).zip(xb.chunks(d)) {
                    let (mean, rstd) = moments(xr, eps);
                    for (j, (o, &v)) in yr.iter_mut().zip(xr).enumerate() {
                        *o = (v - mean) * rstd * w[j] + b[j];
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(candle_core::D::Minus1)?;
        let rows = x.elem_count() / d;
        // One pass gives all three gradients, stacked as rows: dx (rows), dw, db.
        let all = x.contiguous()?.apply_op3_no_bwd(
            weight,
            &grad_res.contiguous()?,
            &LayerNormGrad { eps: self.eps },
        )?;
        // Gradients only for what the graph tracks (a frozen norm's weight and bias are not).
        let dx = x
            .track_op()
            .then(|| all.narrow(0, 0, rows)?.reshape(x.shape()))
            .transpose()?;
        let dw = weight.track_op().then(|| all.get(rows)).transpose()?;
        let db = bias.track_op().then(|| all.get(rows + 1)).transpose()?;
        Ok((dx, dw, db))
    }
}

/// Backward of [`LayerNorm`] from `(x, weight, dy)`: a `[rows + 2, D]` tensor holding `dx`, then
/// `dw`, then `db`.
struct LayerNormGrad {
    eps: f32,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "medvlm-layer-norm-grad"
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
        let x = f32_slice(s1, l1, "layer norm grad (x)")?;
        let w = f32_slice(s2, l2, "layer norm grad (weight)")?;
        let dy = f32_slice(s3, l3, "layer norm grad (dy)")?;
        let d = last_dim(l1.shape())?;
        if dy.len() != x.len() || w.len() != d {
            candle_core::bail!("layer norm grad: shapes of x, weight and dy disagree");
        }
        let rows = x.len() / d;
        let eps = self.eps;
        let mut out = vec![0f32; (rows + 2) * d];
        let (dx, params) = out.split_at_mut(rows * d);
        // dx in parallel; per-task partial sums of dw and db, added up afterwards.
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(d * ROWS_PER_TASK)
            .zip(
                x.par_chunks(d * ROWS_PER_TASK)
                    .zip(dy.par_chunks(d * ROWS_PER_TASK)),
            )
            .map(|(dxb, (xb, gb))| {
                let mut acc = vec![0f32; 2 * d];
                let mut xhat = vec![0f32; d];
                for ((dxr, xr), gr) in dxb.chunks_mut(d).zip(xb.chunks(d)).zip(gb.chunks(d)) {
                    let (mean, rstd) = moments(xr, eps);
                    let (mut mean_g, mut mean_gx) = (0f32, 0f32);
                    for j in 0..d {
                        xhat[j] = (xr[j] - mean) * rstd;
                        let g = gr[j] * w[j];
                        mean_g += g;
                        mean_gx += g * xhat[j];
                        acc[j] += gr[j] * xhat[j];
                        acc[d + j] += gr[j];
                    }
                    mean_g /= d as f32;
                    mean_gx /= d as f32;
                    for j in 0..d {
                        dxr[j] = rstd * (gr[j] * w[j] - mean_g - xhat[j] * mean_gx);
                    }
                }
                acc
            })
            .collect();
        for p in partials {
            for (o, v) in params.iter_mut().zip(p) {
                *o += v;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, d))))
    }
}

/// Elements per rayon task of the elementwise kernels.
const ELEMS_PER_TASK: usize = 1 << 14;

/// Exact (erf) GELU with a backward pass, elementwise over the rayon pool (f32 on CPU;
/// otherwise candle's `gelu_erf`).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !fusable(x) {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(Act::Erf)
}

/// OpenAI CLIP's quick GELU `x σ(1.702 x)` with a backward pass, elementwise over the rayon
/// pool (f32 on CPU; otherwise the composed form).
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    if !fusable(x) {
        return x * candle_nn::ops::sigmoid(&(x * 1.702)?)?;
    }
    x.contiguous()?.apply_op1(Act::Quick)
}

const QUICK_GELU_SLOPE: f32 = 1.702;

/// ReLU `max(x, 0)` with a one-pass backward (`dy` where `x > 0`), elementwise over the rayon
/// pool (f32 on CPU; otherwise candle's `relu`). candle's own backward builds a mask tensor,
/// converts it and multiplies: three passes and two temporaries per activation, which add up
/// in a ResNet.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if !fusable(x) {
        return x.relu();
    }
    x.contiguous()?.apply_op1(Act::Relu)
}

/// The elementwise activations: forward through the vectorised slice kernels of
/// [`fastmath`], backward through their derivatives.
#[derive(Clone, Copy)]
enum Act {
    /// `max(x, 0)`; derivative 1 for `x > 0`, else 0 (PyTorch's convention at 0).
    Relu,
    /// `x Φ(x)`; derivative `Φ(x) + x φ(x)`.
    Erf,
    /// `x s`, `s = σ(1.702 x)`; derivative `s + 1.702 x s (1 - s)`.
    Quick,
}

impl Act {
    #[inline(always)]
    fn derivative(self, v: f32) -> f32 {
        match self {
            Act::Relu => {
                if v > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Act::Erf => {
                // 1 / sqrt(2 pi)
                const INV_SQRT_2PI: f32 = 0.398_942_3;
                let cdf = 0.5 * (1.0 + fastmath::erf(v * std::f32::consts::FRAC_1_SQRT_2));
                cdf + v * INV_SQRT_2PI * fastmath::exp(-0.5 * v * v)
            }
            Act::Quick => {
                let s = 1.0 / (1.0 + fastmath::exp(-(v * QUICK_GELU_SLOPE)));
                s + QUICK_GELU_SLOPE * v * s * (1.0 - s)
            }
        }
    }
}

impl CustomOp1 for Act {
    fn name(&self) -> &'static str {
        match self {
            Act::Relu => "medvlm-relu",
            Act::Erf => "medvlm-gelu-erf",
            Act::Quick => "medvlm-quick-gelu",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let y = fastmath::par_fill(x.len(), ELEMS_PER_TASK, |i, out| {
            let x = &x[i..i + out.len()];
            match self {
                Act::Relu => {
                    for (o, &v) in out.iter_mut().zip(x) {
                        o.write(v.max(0.0));
                    }
                }
                Act::Erf => fastmath::gelu_erf_slice(x, out),
                Act::Quick => fastmath::sigmoid_gate_slice(x, out, QUICK_GELU_SLOPE),
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let dy = grad_res.contiguous()?;
        Ok(Some(
            arg.contiguous()?.apply_op2_no_bwd(&dy, &ActGrad(*self))?,
        ))
    }
}

/// `dx = dy f'(x)` from the activation input `x` and the output gradient `dy`.
struct ActGrad(Act);

impl CustomOp2 for ActGrad {
    fn name(&self) -> &'static str {
        "medvlm-activation-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, dy) = value_and_grad(s1, l1, s2, l2, "gelu grad")?;
        // One loop per activation, so the derivative inlines without a per-element branch.
        fn map(x: &[f32], dy: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
            x.par_iter()
                .zip(dy.par_iter())
                .with_min_len(ELEMS_PER_TASK)
                .map(|(&v, &g)| g * f(v))
                .collect()
        }
        let dx = match self.0 {
            Act::Relu => map(x, dy, |v| Act::Relu.derivative(v)),
            Act::Erf => map(x, dy, |v| Act::Erf.derivative(v)),
            Act::Quick => map(x, dy, |v| Act::Quick.derivative(v)),
        };
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// `x Wᵀ + b` (`x` `[..., k]`, `W` `[n, k]`, `b` `[n]`) as one matmul that accumulates onto
/// the bias: the output is filled with the bias rows and the product is added in place, as
/// PyTorch's `addmm` does. candle's linear layer zero-fills the output, multiplies, then adds
/// the bias in another pass over it. Backward: `dx = dy W`, `dW = dyᵀ x`, `db = Σ dy`.
/// Other dtypes and devices use candle's linear layer.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !(fusable(x) && fusable(w) && fusable(b)) || w.rank() != 2 || b.rank() != 1 {
        return candle_nn::Module::forward(&candle_nn::Linear::new(w.clone(), Some(b.clone())), x);
    }
    // A weight already in the inference layout (see `inference_weight_layout`) is used as it
    // is; anything else strided is made row-major.
    let w = if is_transposed_row_major(w) {
        w.clone()
    } else {
        w.contiguous()?
    };
    x.contiguous()?.apply_op3(&w, &b.contiguous()?, LinearBias)
}

/// The same `[n, k]` weight (same shape and values) stored as the transpose of a row-major
/// `[k, n]` matrix: the inference layout of frozen f32 CPU weights. With it [`linear`]
/// computes `yᵀ = W xᵀ` with the weight as gemm's left operand in column-major order, which
/// the `gemm` crate multiplies without packing it (and the activations, as its right
/// operand, need no transposing copy either); with the row-major weight it repacks the
/// activations for every product. The results agree within f32 rounding (the kernel may
/// sum in another order); at the 197-token batch of one ViT-B/16 image the linear layers run
/// 1.1-2.4x faster (`examples/layout_probe`).
pub fn inference_weight_layout(w: &Tensor) -> Result<Tensor> {
    if !fusable(w) || w.rank() != 2 || is_transposed_row_major(w) {
        return Ok(w.clone());
    }
    w.t()?.contiguous()?.t()
}

/// Whether `w` `[n, k]` is the transpose of a row-major `[k, n]` matrix (strides `[1, n]`).
fn is_transposed_row_major(w: &Tensor) -> bool {
    transposed_row_major(w.dims(), w.stride())
}

/// [`is_transposed_row_major`] on a shape and its strides (with `n, k > 1`, so never also
/// row-major).
fn transposed_row_major(dims: &[usize], stride: &[usize]) -> bool {
    dims.len() == 2 && stride == [1, dims[0]] && dims[0] > 1 && dims[1] > 1
}

struct LinearBias;

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "medvlm-linear-bias"
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
        use gemm::{gemm, Parallelism};
        let x = f32_slice(s1, l1, "linear (x)")?;
        let (n, kw) = l2.shape().dims2()?;
        // Row-major [n, k], or the inference layout: the transpose of a row-major [k, n].
        let transposed = transposed_row_major(l2.dims(), l2.stride());
        let w = if transposed {
            let CpuStorage::F32(v) = s2 else {
                candle_core::bail!("linear (weight): f32 storage expected")
            };
            let start = l2.start_offset();
            v.get(start..start + n * kw)
                .ok_or_else(|| candle_core::Error::Msg("linear (weight): short storage".into()))?
        } else {
            f32_slice(s2, l2, "linear (weight)")?
        };
        let b = f32_slice(s3, l3, "linear (bias)")?;
        let k = last_dim(l1.shape())?;
        if kw != k || b.len() != n {
            candle_core::bail!(
                "linear: input [.., {k}], weight {:?}, bias [{}] do not fit",
                l2.shape(),
                b.len()
            );
        }
        let m = x.len() / k;
        let mut y = fastmath::par_fill(m * n, n * ROWS_PER_TASK, |_, out| {
            for row in out.chunks_mut(n) {
                for (o, &bv) in row.iter_mut().zip(b) {
                    o.write(bv);
                }
            }
        });
        let threads = candle_core::utils::get_num_threads();
        let parallelism = if threads > 1 {
            Parallelism::Rayon(threads)
        } else {
            Parallelism::None
        };
        // gemm's (rows, cols, dst col/row strides, lhs, its col/row strides, rhs, its col/row
        // strides) for the two weight layouts.
        let (rows, cols, dst_cs, dst_rs, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs) = if transposed {
            // y [m, n] row-major is yᵀ [n, m] column-major; w holds Wᵀ row-major, i.e. W
            // [n, k] column-major; x [m, k] row-major is xᵀ [k, m] column-major.
            (n, m, n, 1, w, n, 1, x, k, 1)
        } else {
            // y [m, n] and x [m, k] row-major; the row-major [n, k] weight read as Wᵀ [k, n].
            (m, n, 1, n, x, 1, k, w, k, 1)
        };
        // SAFETY: the strides above address exactly y's m * n, x's m * k and w's n * k
        // values (shapes checked above); with read_dst the product is added onto the bias
        // already in y.
        unsafe {
            gemm(
                rows,
                cols,
                k,
                y.as_mut_ptr(),
                dst_cs as isize,
                dst_rs as isize,
                true,
                lhs.as_ptr(),
                lhs_cs as isize,
                lhs_rs as isize,
                rhs.as_ptr(),
                rhs_cs as isize,
                rhs_rs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
        let mut dims = l1.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, k) = w.dims2()?;
        let m = x.elem_count() / k;
        let dy = grad_res.contiguous()?.reshape((m, n))?;
        // Only the gradients the graph needs: a frozen weight (LoRA, adapters, a frozen
        // tower) is not tracked, and its `dW = dyᵀ x` is a product as large as `dx` itself.
        let dx = if x.track_op() {
            Some(dy.matmul(w)?.reshape(x.shape())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(dy.t()?.matmul(&x.reshape((m, k))?)?)
        } else {
            None
        };
        let db = if b.track_op() {
            Some(dy.apply_op1_no_bwd(&ColumnSums)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// `Σᵢ yᵢ` over the rows of a contiguous f32 `[m, n]` tensor: a linear layer's bias
/// gradient. candle's `sum(0)` walks the reduced dimension with a strided loop per output
/// element, slower than the layer's whole `dx` product at the text towers' sizes; this adds
/// rows onto a running row, which vectorises (docs/benchmarks.md, the ResNet step's third
/// round). Partial sums of
/// [`COLUMN_SUM_ROWS`] rows each are added at the end, in order (the same sum in every run),
/// so the f32 sum of a long column is two-level rather than one running total.
struct ColumnSums;

/// Rows per partial sum (and per rayon task) of [`ColumnSums`].
const COLUMN_SUM_ROWS: usize = 256;

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "medvlm-column-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = f32_slice(s, l, "column sums")?;
        let (_, n) = l.shape().dims2()?;
        if n == 0 {
            return Ok((CpuStorage::F32(Vec::new()), Shape::from(0)));
        }
        let add_rows = |rows: &[f32]| {
            let mut acc = vec![0f32; n];
            for row in rows.chunks_exact(n) {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            }
            acc
        };
        let partials: Vec<Vec<f32>> = y.par_chunks(n * COLUMN_SUM_ROWS).map(add_rows).collect();
        Ok((
            CpuStorage::F32(fastmath::sum_in_order(partials, n)),
            Shape::from(n),
        ))
    }
}

/// Inputs and comparisons of the kernels' tests (here and in `attention`).
#[cfg(test)]
pub(crate) mod test_values {
    use candle_core::{Device, Tensor};

    /// A deterministic, non-trivial pattern in [-3, 3) (no RNG dependency).
    pub(crate) fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| {
                let t = (i as f64 + 1.0) * 0.7548776662466927 + seed as f64 * 0.5698402909980532;
                ((t.fract() - 0.5) * 6.0) as f32
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
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
}

#[cfg(test)]
mod tests {
    use super::test_values::{max_abs_diff, randn};
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn softmax_matches_the_composed_form_in_value_and_gradient() {
        let x = Var::from_tensor(&randn(&[3, 2, 5, 7], 1)).unwrap();
        // A weighted sum so that every output gets a different upstream gradient.
        let weights = randn(&[3, 2, 5, 7], 2);
        let fused = softmax_last_dim(x.as_tensor()).unwrap();
        let composed = candle_nn::ops::softmax(x.as_tensor(), candle_core::D::Minus1).unwrap();
        assert!(max_abs_diff(&fused, &composed) < 1e-6);
        let g_fused = (fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_comp = (composed * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a, b) = (g_fused.get(&x).unwrap(), g_comp.get(&x).unwrap());
        assert!(max_abs_diff(a, b) < 1e-5, "softmax gradients differ");
        // The gradient is not trivially zero.
        assert!(
            a.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 1e-2
        );
    }

    #[test]
    fn layer_norm_matches_the_composed_form_in_value_and_gradients() {
        // 130 rows: more than one rayon task, so the partial sums of dw and db are combined.
        let x = Var::from_tensor(&randn(&[2, 65, 16], 3)).unwrap();
        let w = Var::from_tensor(&randn(&[16], 4).affine(0.3, 1.0).unwrap()).unwrap();
        let b = Var::from_tensor(&randn(&[16], 5)).unwrap();
        let weights = randn(&[2, 65, 16], 6);
        let fused = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
        let composed =
            candle_nn::ops::layer_norm_slow(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)
                .unwrap();
        assert!(max_abs_diff(&fused, &composed) < 1e-5);
        let g_fused = (fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_comp = (composed * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
            let (a, c) = (g_fused.get(v).unwrap(), g_comp.get(v).unwrap());
            let scale = c
                .abs()
                .unwrap()
                .max_keepdim(0)
                .unwrap()
                .flatten_all()
                .unwrap();
            let scale = scale.max(0).unwrap().to_scalar::<f32>().unwrap().max(1.0);
            assert!(
                max_abs_diff(a, c) / scale < 1e-4,
                "{name} gradients differ by {}",
                max_abs_diff(a, c)
            );
        }
    }

    #[test]
    fn other_dtypes_fall_back_to_the_composed_form() {
        let x = randn(&[2, 3], 7).to_dtype(DType::F64).unwrap();
        let y = softmax_last_dim(&x).unwrap();
        assert_eq!(y.dtype(), DType::F64);
        let sums = y.sum(1).unwrap().to_vec1::<f64>().unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-12));
    }

    #[test]
    fn gelu_equals_candles_and_its_gradient_the_composed_form() {
        let x = Var::from_tensor(&randn(&[3, 5, 1000], 3)).unwrap();
        let weights = randn(&[3, 5, 1000], 4);
        let fused = gelu_erf(x.as_tensor()).unwrap();
        // libm's erff against the vectorised approximation: within 2e-6 for |x| <= 3.
        let candle = x.as_tensor().gelu_erf().unwrap();
        assert!(max_abs_diff(&fused, &candle) < 2e-6);
        let g_fused = (fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_candle = (candle * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a, b) = (g_fused.get(&x).unwrap(), g_candle.get(&x).unwrap());
        assert!(max_abs_diff(a, b) < 1e-5, "gelu gradients differ");
        assert!(
            a.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 1.0
        );
    }

    #[test]
    fn quick_gelu_matches_the_composed_form_in_value_and_gradient() {
        let x = Var::from_tensor(&randn(&[4, 3, 900], 5)).unwrap();
        let weights = randn(&[4, 3, 900], 6);
        let fused = quick_gelu(x.as_tensor()).unwrap();
        let xt = x.as_tensor();
        let composed = (xt * candle_nn::ops::sigmoid(&(xt * 1.702).unwrap()).unwrap()).unwrap();
        assert!(max_abs_diff(&fused, &composed) < 1e-6);
        let g_fused = (fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_comp = (composed * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a, b) = (g_fused.get(&x).unwrap(), g_comp.get(&x).unwrap());
        assert!(max_abs_diff(a, b) < 1e-5, "quick gelu gradients differ");
        assert!(
            a.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 1.0
        );
    }

    #[test]
    fn relu_matches_candles_in_value_and_gradient() {
        let x = Var::from_tensor(&randn(&[4, 3, 900], 7)).unwrap();
        let weights = randn(&[4, 3, 900], 8);
        let fused = relu(x.as_tensor()).unwrap();
        let theirs = x.as_tensor().relu().unwrap();
        assert_eq!(max_abs_diff(&fused, &theirs), 0.0);
        let grad = |y: Tensor| {
            (y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let (g_fused, g_theirs) = (grad(fused), grad(theirs));
        let (a, b) = (g_fused.get(&x).unwrap(), g_theirs.get(&x).unwrap());
        assert_eq!(max_abs_diff(a, b), 0.0, "relu gradients differ");
        // Half the inputs are positive: the gradient is neither all zero nor all `weights`.
        let kept = a
            .ne(0f32)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .mean_all()
            .unwrap();
        let kept = kept.to_scalar::<f32>().unwrap();
        assert!((0.4..0.6).contains(&kept), "{kept}");
    }

    #[test]
    fn linear_with_bias_matches_candle_in_value_and_gradients() {
        let x = Var::from_tensor(&randn(&[3, 70, 24], 10)).unwrap();
        let w = Var::from_tensor(&randn(&[40, 24], 11)).unwrap();
        let b = Var::from_tensor(&randn(&[40], 12)).unwrap();
        let weights = randn(&[3, 70, 40], 13);
        let fused = linear(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
        let reference = candle_nn::Module::forward(
            &candle_nn::Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone())),
            x.as_tensor(),
        )
        .unwrap();
        assert_eq!(fused.dims(), &[3, 70, 40]);
        assert!(max_abs_diff(&fused, &reference) < 1e-5);
        let g_fused = (fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_ref = (reference * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
            let (a, r) = (g_fused.get(v).unwrap(), g_ref.get(v).unwrap());
            assert!(
                max_abs_diff(a, r) < 1e-4,
                "linear gradient of {name} differs"
            );
        }
    }

    #[test]
    fn column_sums_add_every_row_across_partial_sums() {
        // 1000 rows: three full partial sums of COLUMN_SUM_ROWS and a shorter fourth.
        let (m, n) = (1000, 7);
        let vals: Vec<f32> = (0..m * n).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        let y = Tensor::from_vec(vals.clone(), (m, n), &Device::Cpu).unwrap();
        let sums = y
            .apply_op1_no_bwd(&ColumnSums)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Small integers: the f32 sums are exact, whatever the order.
        let expected: Vec<f32> = (0..n)
            .map(|j| (0..m).map(|i| vals[i * n + j]).sum())
            .collect();
        assert_eq!(sums, expected);
        assert_eq!(sums, y.sum(0).unwrap().to_vec1::<f32>().unwrap());
        // No rows: zeros; no columns: empty.
        let empty = Tensor::zeros((0, 3), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            empty
                .apply_op1_no_bwd(&ColumnSums)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            vec![0.0; 3]
        );
        let none = Tensor::zeros((4, 0), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(none.apply_op1_no_bwd(&ColumnSums).unwrap().dims(), &[0]);
    }

    #[test]
    fn linear_with_a_frozen_weight_gives_only_the_gradients_needed() {
        // The LoRA / frozen-tower case: x tracked, weight and bias plain tensors. The
        // gradient of x is candle's; none is produced for the weight or the bias.
        let x = Var::from_tensor(&randn(&[2, 50, 24], 30)).unwrap();
        let w = randn(&[40, 24], 31);
        let b = randn(&[40], 32);
        let weights = randn(&[2, 50, 40], 33);
        let loss = |y: Tensor| (y * &weights).unwrap().sum_all().unwrap();
        let g = loss(linear(x.as_tensor(), &w, &b).unwrap())
            .backward()
            .unwrap();
        let reference = candle_nn::Linear::new(w.clone(), Some(b.clone()));
        let g_ref = loss(candle_nn::Module::forward(&reference, x.as_tensor()).unwrap())
            .backward()
            .unwrap();
        assert!(max_abs_diff(g.get(&x).unwrap(), g_ref.get(&x).unwrap()) < 1e-4);
        assert!(g.get(&w).is_none() && g.get(&b).is_none());
        // Weight tracked, input not (a first layer): the weight's gradient, no input's.
        let wv = Var::from_tensor(&w).unwrap();
        let xs = randn(&[2, 50, 24], 30);
        let g = loss(linear(&xs, wv.as_tensor(), &b).unwrap())
            .backward()
            .unwrap();
        let g_ref = loss(
            candle_nn::Module::forward(
                &candle_nn::Linear::new(wv.as_tensor().clone(), Some(b.clone())),
                &xs,
            )
            .unwrap(),
        )
        .backward()
        .unwrap();
        assert!(max_abs_diff(g.get(&wv).unwrap(), g_ref.get(&wv).unwrap()) < 1e-4);
        assert!(g.get(&xs).is_none());
    }

    #[test]
    fn inference_weight_layout_gives_the_same_linear_layer() {
        // Same shape and values, the transposed storage; the product equals the row-major
        // weight's and candle's within rounding (the kernel may sum in another order), for a
        // batched input, one row, and widths that are not multiples of the kernel's tiles.
        for (rows, k, n) in [(70usize, 24usize, 40usize), (1, 33, 17), (197, 64, 96)] {
            let x = randn(&[2, rows, k], 20);
            let w = randn(&[n, k], 21);
            let b = randn(&[n], 22);
            let wt = inference_weight_layout(&w).unwrap();
            assert_eq!(wt.dims(), w.dims());
            assert!(
                !wt.is_contiguous(),
                "the inference layout is the transposed storage"
            );
            assert_eq!(max_abs_diff(&wt, &w), 0.0);
            // Applying it twice changes nothing.
            assert_eq!(inference_weight_layout(&wt).unwrap().stride(), wt.stride());
            let fast = linear(&x, &wt, &b).unwrap();
            let row_major = linear(&x, &w, &b).unwrap();
            let reference =
                candle_nn::Module::forward(&candle_nn::Linear::new(w.clone(), Some(b.clone())), &x)
                    .unwrap();
            assert_eq!(fast.dims(), &[2, rows, n]);
            assert!(max_abs_diff(&fast, &reference) < 1e-4, "({rows}, {k}, {n})");
            assert!(max_abs_diff(&fast, &row_major) < 1e-4, "({rows}, {k}, {n})");
            // Gradients through x with the frozen transposed weight (adapters train this way).
            let xv = Var::from_tensor(&x).unwrap();
            let g = linear(xv.as_tensor(), &wt, &b)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let expected = Tensor::ones((2, rows, n), DType::F32, &Device::Cpu)
                .unwrap()
                .broadcast_matmul(&w)
                .unwrap();
            assert!(max_abs_diff(g.get(&xv).unwrap(), &expected) < 1e-4);
        }
    }
}
