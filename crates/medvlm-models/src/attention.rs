//! Scaled dot-product attention `softmax(scale q kᵀ + mask) v` on `[B, H, T, hd]` f32 CPU
//! tensors, for inference and training, without a `[B, H, Tq, Tk]` tensor.
//!
//! Forward: one task per (batch, head) pair over the rayon pool, each running its two small
//! matmuls single-threaded with the probabilities `[Tq, Tk]` in a per-thread buffer. candle's
//! batched matmul instead runs B·H tiny matmuls one after the other, each split over the
//! threads, and half its time went to that synchronisation on ViT-B/16 (docs/benchmarks.md).
//!
//! Backward: the composed attention (`q kᵀ`, softmax, `p v` as candle ops) keeps the scores
//! and the probabilities of every layer alive until the backward pass: for ViT-B/16 at batch
//! 8, two `[8, 12, 197, 197]` tensors (15 MB each) per layer, about 360 MB over the 12 layers,
//! the difference between medvlm's and PyTorch's peak memory in a LoRA step (PyTorch's
//! `scaled_dot_product_attention` keeps none). This kernel keeps only its inputs and output:
//! the backward pass recomputes each pair's probabilities from `q` and `k` (the same function
//! as the forward, so the same bits), then
//!
//! `dv = pᵀ do`, `dp = do vᵀ`, `ds = p ∘ (dp − rowsum(do ∘ o))`, `dq = scale · ds k`,
//! `dk = scale · dsᵀ q`
//!
//! (the softmax backward with `rowsum(p ∘ dp) = rowsum(do ∘ o)`, as FlashAttention's backward
//! pass computes it; Dao et al. 2022, "FlashAttention", algorithm 4). Other dtypes and
//! devices: the caller composes the attention from candle ops.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::conv::sgemm;
use crate::fastmath;
use crate::fused::{f32_slice, fusable};

/// `softmax(scale q kᵀ + mask) v` on `[B, H, T, hd]` tensors, differentiable in `q`, `k` and
/// `v` (the backward pass of the module doc) when they are tracked. `mask` is an additive f32 mask
/// broadcastable to `[B, H, Tq, Tk]` with a full last dimension, as the text towers build
/// them: causal `[1, 1, T, T]`, padding `[B, 1, 1, T]`, or both `[B, 1, T, T]`; it is not
/// differentiated. Returns `None` when the kernel does not apply (not f32 on the CPU, other
/// ranks or shapes, a tracked or other mask): the caller composes the attention.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Option<Tensor>> {
    if [q, k, v].iter().any(|t| !fusable(t) || t.rank() != 4) {
        return Ok(None);
    }
    let (b, h, tq, d) = q.dims4()?;
    let (bk, hk, tk, dk) = k.dims4()?;
    if (bk, hk, dk) != (b, h, d) || v.dims() != k.dims() || tk == 0 || d == 0 {
        return Ok(None);
    }
    let Some(mask) = attention_mask(mask, (b, h, tq, tk))? else {
        return Ok(None);
    };
    let op = Attention {
        scale: scale as f32,
        mask: std::sync::Arc::new(mask),
    };
    Ok(Some(q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        op,
    )?))
}

/// The forward op: output `[B, H, Tq, hd]`; its backward pass is [`AttentionGrad`].
struct Attention {
    scale: f32,
    mask: std::sync::Arc<Option<AttentionMask>>,
}

/// The shape `(b, h, tq, tk, d)` of contiguous q `[b, h, tq, d]` and k `[b, h, tk, d]`.
fn dims(lq: &Layout, lk: &Layout) -> Result<(usize, usize, usize, usize, usize)> {
    let (b, h, tq, d) = lq.shape().dims4()?;
    let tk = lk.shape().dims4()?.2;
    Ok((b, h, tq, tk, d))
}

/// The mask of the fused attention kernels: `Ok(None)` when they cannot take it (tracked, not
/// f32 on the CPU, not broadcastable to `[B, H, Tq, Tk]` with a full last dimension), else
/// `Ok(Some(mask))` (`Some(None)` without a mask).
fn attention_mask(
    mask: Option<&Tensor>,
    (b, h, tq, tk): (usize, usize, usize, usize),
) -> Result<Option<Option<AttentionMask>>> {
    let Some(m) = mask else {
        return Ok(Some(None));
    };
    if !fusable(m) || m.track_op() || m.rank() != 4 {
        return Ok(None);
    }
    let (mb, mh, mq, mk) = m.dims4()?;
    let fits = |n: usize, full: usize| n == 1 || n == full;
    if !(fits(mb, b) && fits(mh, h) && fits(mq, tq) && mk == tk) {
        return Ok(None);
    }
    // Element strides of a contiguous copy, 0 along broadcast dimensions.
    let strides = [
        if mb == 1 { 0 } else { mh * mq * mk },
        if mh == 1 { 0 } else { mq * mk },
        if mq == 1 { 0 } else { mk },
    ];
    Ok(Some(Some(AttentionMask {
        values: m.flatten_all()?.to_vec1::<f32>()?,
        strides,
    })))
}

/// An additive mask read by the fused attention kernels: row `(bi, hi, qi)` of the scores
/// gets `values[bi * strides[0] + hi * strides[1] + qi * strides[2]..][..tk]` added.
struct AttentionMask {
    values: Vec<f32>,
    strides: [usize; 3],
}

/// The attention probabilities of one (batch, head) pair `i` (of `h` heads):
/// `softmax(scale q_i k_iᵀ + mask)` into `probs` `[tq, tk]`, from row-major `q_i` `[tq, d]`
/// and `k_i` `[tk, d]`. The forward and the backward pass (which recomputes them rather than
/// keeping a `[B, H, Tq, Tk]` tensor) both call this, so the backward pass sees the forward's
/// probabilities bit for bit.
#[allow(clippy::too_many_arguments)]
fn attention_probs(
    qi: &[f32],
    ki: &[f32],
    (tq, tk, d): (usize, usize, usize),
    scale: f32,
    mask: Option<&AttentionMask>,
    (i, h): (usize, usize),
    probs: &mut [f32],
) {
    use gemm::{gemm, Parallelism};
    assert!(qi.len() >= tq * d && ki.len() >= tk * d && probs.len() >= tq * tk);
    // SAFETY: the pointers and strides describe the row-major matrices q_i [tq, d], k_i
    // [tk, d] (read as kᵀ [d, tk]: column stride d, row stride 1) and probs [tq, tk], within
    // the lengths asserted above.
    unsafe {
        gemm(
            tq,
            tk,
            d,
            probs.as_mut_ptr(),
            1,
            tk as isize,
            false,
            qi.as_ptr(),
            1,
            d as isize,
            ki.as_ptr(),
            d as isize,
            1,
            0.0,
            scale,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
    let probs = &mut probs[..tq * tk];
    if let Some(m) = mask {
        let (bi, hi) = (i / h, i % h);
        for (qi, row) in probs.chunks_exact_mut(tk).enumerate() {
            let at = bi * m.strides[0] + hi * m.strides[1] + qi * m.strides[2];
            for (s, add) in row.iter_mut().zip(&m.values[at..at + tk]) {
                *s += add;
            }
        }
    }
    fastmath::softmax_rows_in_place(probs, tk);
}

thread_local! {
    /// Per-thread probabilities and their gradient, `[Tq, Tk]` each.
    static BUFFERS: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "medvlm-attention"
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
        let q = f32_slice(s1, l1, "attention (q)")?;
        let k = f32_slice(s2, l2, "attention (k)")?;
        let v = f32_slice(s3, l3, "attention (v)")?;
        let (b, h, tq, tk, d) = dims(l1, l2)?;
        let scale = self.scale;
        let y = fastmath::par_fill(b * h * tq * d, tq * d, |start, out| {
            let i = start / (tq * d);
            let (qi, ki, vi) = (
                &q[i * tq * d..(i + 1) * tq * d],
                &k[i * tk * d..(i + 1) * tk * d],
                &v[i * tk * d..(i + 1) * tk * d],
            );
            BUFFERS.with(|cell| {
                let (scores, _) = &mut *cell.borrow_mut();
                scores.resize(tq * tk, 0.0);
                attention_probs(
                    qi,
                    ki,
                    (tq, tk, d),
                    scale,
                    self.mask.as_ref().as_ref(),
                    (i, h),
                    scores,
                );
                // SAFETY: the pointers and strides describe the row-major probabilities
                // [tq, tk] and v_i [tk, d]; `out` holds tq * d elements, all of which the
                // product writes (read_dst = false).
                unsafe {
                    gemm(
                        tq,
                        d,
                        tk,
                        out.as_mut_ptr() as *mut f32,
                        1,
                        d as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        tk as isize,
                        vi.as_ptr(),
                        1,
                        d as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            });
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grads = q.apply_op3_no_bwd(
            k,
            v,
            &AttentionGrad {
                scale: self.scale,
                mask: self.mask.clone(),
                out: out.contiguous()?,
                grad_out: grad_out.contiguous()?,
            },
        )?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let part = |t: &Tensor, at: usize, n: usize| -> Result<Option<Tensor>> {
            t.track_op()
                .then(|| grads.narrow(0, at, n)?.reshape(t.shape()))
                .transpose()
        };
        Ok((part(q, 0, nq)?, part(k, nq, nk)?, part(v, nq + nk, nk)?))
    }
}

/// Backward of [`Attention`] from `(q, k, v)` and the forward's output and its gradient:
/// `dq`, `dk` and `dv` flattened one after the other.
struct AttentionGrad {
    scale: f32,
    mask: std::sync::Arc<Option<AttentionMask>>,
    out: Tensor,
    grad_out: Tensor,
}

/// The f32 values of a contiguous CPU tensor, read under its storage lock, passed to `f`.
fn with_f32<T>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("{what}: not a CPU tensor")
    };
    f(f32_slice(cpu, layout, what)?)
}

impl CustomOp3 for AttentionGrad {
    fn name(&self) -> &'static str {
        "medvlm-attention-grad"
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
        let q = f32_slice(s1, l1, "attention grad (q)")?;
        let k = f32_slice(s2, l2, "attention grad (k)")?;
        let v = f32_slice(s3, l3, "attention grad (v)")?;
        let (_, h, tq, tk, d) = dims(l1, l2)?;
        with_f32(&self.out, "attention grad (out)", |o| {
            with_f32(&self.grad_out, "attention grad (d out)", |dout| {
                if o.len() != q.len() || dout.len() != q.len() {
                    candle_core::bail!("attention grad: output and its gradient do not fit q")
                }
                let mut grads = vec![0f32; q.len() + 2 * k.len()];
                let (dq, dkv) = grads.split_at_mut(q.len());
                let (dk, dv) = dkv.split_at_mut(k.len());
                dq.par_chunks_mut(tq * d)
                    .zip(dk.par_chunks_mut(tk * d).zip(dv.par_chunks_mut(tk * d)))
                    .enumerate()
                    .for_each(|(i, (dqi, (dki, dvi)))| {
                        let (qi, ki, vi) = (
                            &q[i * tq * d..][..tq * d],
                            &k[i * tk * d..][..tk * d],
                            &v[i * tk * d..][..tk * d],
                        );
                        let (oi, doi) = (&o[i * tq * d..][..tq * d], &dout[i * tq * d..][..tq * d]);
                        BUFFERS.with(|cell| {
                            let (probs, dprobs) = &mut *cell.borrow_mut();
                            probs.resize(tq * tk, 0.0);
                            dprobs.resize(tq * tk, 0.0);
                            attention_probs(
                                qi,
                                ki,
                                (tq, tk, d),
                                self.scale,
                                self.mask.as_ref().as_ref(),
                                (i, h),
                                probs,
                            );
                            // dv = pᵀ do (pᵀ: row stride 1, column stride tk)
                            sgemm((tk, d, tq), dvi, false, probs, (1, tk), doi, (d, 1));
                            // dp = do vᵀ (vᵀ: row stride 1, column stride d)
                            sgemm((tq, tk, d), dprobs, false, doi, (d, 1), vi, (1, d));
                            // ds = scale · p ∘ (dp − rowsum(do ∘ o)), in place of dp
                            for ((ds, p), (or, dor)) in dprobs
                                .chunks_exact_mut(tk)
                                .zip(probs.chunks_exact(tk))
                                .zip(oi.chunks_exact(d).zip(doi.chunks_exact(d)))
                            {
                                let delta: f32 = or.iter().zip(dor).map(|(a, b)| a * b).sum();
                                for (g, &pv) in ds.iter_mut().zip(p) {
                                    *g = self.scale * pv * (*g - delta);
                                }
                            }
                            // dq = ds k; dk = dsᵀ q
                            sgemm((tq, d, tk), dqi, false, dprobs, (tk, 1), ki, (d, 1));
                            sgemm((tk, d, tq), dki, false, dprobs, (1, tk), qi, (d, 1));
                        })
                    });
                let n = grads.len();
                Ok((CpuStorage::F32(grads), Shape::from(n)))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::test_values::{max_abs_diff, randn};
    use candle_core::{DType, Device, Var, D};

    /// The composed attention (candle ops), the reference.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Tensor {
        let mut s = (q * scale).unwrap().matmul(&k.t().unwrap()).unwrap();
        if let Some(m) = mask {
            s = s.broadcast_add(m).unwrap();
        }
        candle_nn::ops::softmax(&s, D::Minus1)
            .unwrap()
            .matmul(&v.contiguous().unwrap())
            .unwrap()
    }

    /// Values and gradients of q, k and v against the composed form, under a weighted sum so
    /// that every output element has its own upstream gradient.
    fn check(b: usize, h: usize, tq: usize, tk: usize, d: usize, mask: Option<Tensor>) {
        let q = Var::from_tensor(&randn(&[b, h, tq, d], 1)).unwrap();
        let k = Var::from_tensor(&randn(&[b, h, tk, d], 2)).unwrap();
        let v = Var::from_tensor(&randn(&[b, h, tk, d], 3)).unwrap();
        let weights = randn(&[b, h, tq, d], 4);
        let scale = 1.0 / (d as f64).sqrt();
        let fused = attention(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            mask.as_ref(),
            scale,
        )
        .unwrap()
        .expect("the kernel applies to f32 CPU tensors");
        let reference = composed(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            mask.as_ref(),
            scale,
        );
        assert!(
            max_abs_diff(&fused, &reference) < 1e-5,
            "attention values differ"
        );
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
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, r) = (g_fused.get(x).unwrap(), g_ref.get(x).unwrap());
            let size = r
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(size > 1e-3, "gradient of {name} is trivially small");
            let diff = max_abs_diff(a, r);
            assert!(
                diff < 1e-5 * size.max(1.0),
                "gradient of {name} differs by {diff}"
            );
        }
    }

    #[test]
    fn matches_the_composed_attention_without_a_mask() {
        check(2, 3, 7, 7, 4, None);
    }

    #[test]
    fn matches_with_a_causal_and_a_padding_mask() {
        let t = 6;
        let causal: Vec<f32> = (0..t * t)
            .map(|i| {
                if i % t > i / t {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let causal = Tensor::from_vec(causal, (1, 1, t, t), &Device::Cpu).unwrap();
        check(2, 2, t, t, 4, Some(causal.clone()));
        // Padding of the second text's last two tokens, with the causal mask: [B, 1, T, T].
        let mut pad = vec![0f32; 2 * t];
        pad[2 * t - 1] = -1e9;
        pad[2 * t - 2] = -1e9;
        let pad = Tensor::from_vec(pad, (2, 1, 1, t), &Device::Cpu).unwrap();
        check(2, 2, t, t, 4, Some(pad.clone()));
        check(2, 2, t, t, 4, Some(causal.broadcast_add(&pad).unwrap()));
    }

    #[test]
    fn matches_under_masks_with_more_queries_than_keys() {
        // The masks the text towers build, here with Tq = 7 queries and Tk = 5 keys:
        // causal-like [1, 1, Tq, Tk], padding [B, 1, 1, Tk] (row 1 keeps only its first 2
        // keys) and both [B, 1, Tq, Tk]; blocked entries get a large finite negative value, as
        // `causal_mask` and BERT's `additive_mask` do.
        let block = -1e9f32;
        let causal: Vec<f32> = (0..7 * 5)
            .map(|i| if i % 5 > i / 5 { block } else { 0.0 })
            .collect();
        let causal = Tensor::from_vec(causal, (1, 1, 7, 5), &Device::Cpu).unwrap();
        let padding: Vec<f32> = (0..2 * 5)
            .map(|i| if i / 5 == 1 && i % 5 >= 2 { block } else { 0.0 })
            .collect();
        let padding = Tensor::from_vec(padding, (2, 1, 1, 5), &Device::Cpu).unwrap();
        let both = causal.broadcast_add(&padding).unwrap();
        let (q, k, v) = (
            randn(&[2, 3, 7, 16], 1),
            randn(&[2, 3, 5, 16], 2),
            randn(&[2, 3, 5, 16], 3),
        );
        for (name, m) in [("causal", causal), ("padding", padding), ("both", both)] {
            check(2, 3, 7, 5, 16, Some(m.clone()));
            // The mask matters: the unmasked result is far from it.
            let masked = attention(&q, &k, &v, Some(&m), 0.25).unwrap().unwrap();
            let unmasked = composed(&q, &k, &v, None, 0.25);
            assert!(max_abs_diff(&masked, &unmasked) > 1e-2, "{name}");
        }
        // A mask shape the kernel does not cover: the caller composes (None).
        let odd = Tensor::zeros((2, 3, 1, 1), DType::F32, &Device::Cpu).unwrap();
        assert!(attention(&q, &k, &v, Some(&odd), 0.25).unwrap().is_none());
    }

    #[test]
    fn matches_with_one_query_against_several_keys() {
        // The attention pool of CLIP's ModifiedResNet: the mean token queries all positions.
        check(3, 4, 1, 5, 8, None);
    }

    #[test]
    fn gives_gradients_only_to_tracked_inputs_and_refuses_what_it_cannot_run() {
        let q = Var::from_tensor(&randn(&[1, 2, 3, 4], 1)).unwrap();
        let (k, v) = (randn(&[1, 2, 3, 4], 2), randn(&[1, 2, 3, 4], 3));
        let y = attention(q.as_tensor(), &k, &v, None, 0.5)
            .unwrap()
            .unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(q.as_tensor()).is_some());
        assert!(grads.get(&k).is_none() && grads.get(&v).is_none());
        // Not f32, or not rank 4: the caller composes.
        let q16 = q.as_tensor().to_dtype(DType::F16).unwrap();
        let (k16, v16) = (
            k.to_dtype(DType::F16).unwrap(),
            v.to_dtype(DType::F16).unwrap(),
        );
        assert!(attention(&q16, &k16, &v16, None, 0.5).unwrap().is_none());
        let flat = q.as_tensor().flatten_to(1).unwrap();
        assert!(attention(&flat, &flat, &flat, None, 0.5).unwrap().is_none());
    }
}
