//! The pre-norm transformer encoder shared by HF CLIP and SigLIP
//! (Vaswani et al. 2017, "Attention Is All You Need"; pre-norm as in
//! Radford et al. 2021, "Learning Transferable Visual Models From Natural
//! Language Supervision").
//!
//! Tensor names follow the HF checkpoints:
//! `{prefix}.layers.{i}.self_attn.{q,k,v,out}_proj`, `layer_norm1`,
//! `mlp.fc1`, `mlp.fc2`, `layer_norm2`. Attention scores and softmax are
//! computed in f32 whatever the compute dtype, so f16/bf16 inference does not
//! overflow on masked positions.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::linear::LinearLayer;

/// Additive mask value for blocked positions (finite, so a fully masked row
/// never produces NaN; `exp` of it underflows to exactly 0 in f32).
pub const MASK_VALUE: f32 = -1e30;

/// Activation functions named as in HF configs (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Activation {
    /// `x · σ(1.702 x)` (OpenAI CLIP).
    #[serde(rename = "quick_gelu")]
    #[default]
    QuickGelu,
    /// Exact GELU with erf.
    #[serde(rename = "gelu")]
    Gelu,
    /// Tanh approximation of GELU (SigLIP).
    #[serde(rename = "gelu_pytorch_tanh", alias = "gelu_new", alias = "gelu_fast")]
    GeluTanh,
    /// ReLU.
    #[serde(rename = "relu")]
    Relu,
}

impl Activation {
    /// Apply the activation.
    pub fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::QuickGelu => crate::fused::quick_gelu(x),
            Activation::Gelu => crate::fused::gelu_erf(x),
            Activation::GeluTanh => x.gelu(),
            Activation::Relu => crate::fused::relu(x),
        }
    }
}

/// Shape of one encoder stack.
#[derive(Debug, Clone, Copy)]
pub struct EncoderDims {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub layers: usize,
    pub eps: f64,
    pub act: Activation,
}

/// Layer normalisation (Ba et al. 2016) that stays differentiable: candle's
/// fused layer-norm and softmax kernels have no backward pass, so when any
/// input tracks gradients (training) medvlm's own fused kernels with a backward
/// pass are used ([`crate::fused`]), and candle's kernel otherwise (inference).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// A layer norm from its affine parameters.
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }
    /// The scale `[D]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    /// The shift `[D]`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
}

impl Module for LayerNorm {
    // candle-nn's fused kernel is used only when no gradient is tracked.
    #[allow(clippy::disallowed_methods)]
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
        if x.track_op() || self.weight.track_op() || self.bias.track_op() {
            crate::fused::layer_norm(&x, &self.weight, &self.bias, self.eps)
        } else {
            candle_nn::ops::layer_norm(&x, &self.weight, &self.bias, self.eps as f32)
        }
    }
}

/// Softmax over the last dimension, differentiable: medvlm's fused kernel (vectorised
/// exponential, backward pass) for f32 on CPU, candle's composed form otherwise.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    crate::fused::softmax_last_dim(x)
}

/// Initialisation of embeddings for from-scratch models: N(0, 0.02²) as in CLIP.
pub const EMBED_INIT: candle_nn::Init = candle_nn::Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

/// Load a LayerNorm `{prefix}.weight`, `{prefix}.bias`.
pub fn layer_norm(vb: VarBuilder, dim: usize, eps: f64) -> candle_core::Result<LayerNorm> {
    let w = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?;
    let b = vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?;
    Ok(LayerNorm::new(w, b, eps))
}

/// Multi-head self-attention with q/k/v/out projections.
#[derive(Debug, Clone)]
pub struct SelfAttention {
    pub q_proj: LinearLayer,
    pub k_proj: LinearLayer,
    pub v_proj: LinearLayer,
    pub out_proj: LinearLayer,
    heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    /// Attention from its four projections (`[D, D]` weights) and the number of heads.
    pub fn new(
        q_proj: LinearLayer,
        k_proj: LinearLayer,
        v_proj: LinearLayer,
        out_proj: LinearLayer,
        heads: usize,
    ) -> candle_core::Result<Self> {
        let hidden = out_proj.in_features();
        if heads == 0 || !hidden.is_multiple_of(heads) {
            candle_core::bail!("hidden size {hidden} is not divisible by {heads} heads")
        }
        Ok(Self {
            q_proj,
            k_proj,
            v_proj,
            out_proj,
            heads,
            head_dim: hidden / heads,
        })
    }

    fn load(vb: VarBuilder, hidden: usize, heads: usize) -> candle_core::Result<Self> {
        let proj = |name: &str| LinearLayer::load(vb.pp(name), hidden, hidden, true);
        Self::new(
            proj("q_proj")?,
            proj("k_proj")?,
            proj("v_proj")?,
            proj("out_proj")?,
            heads,
        )
    }

    /// `x` `[B, T, D]`; `mask` additive f32, broadcastable to `[B, H, T, T]`.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let split = |y: Tensor| -> candle_core::Result<Tensor> {
            y.reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q_proj.forward(x)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        attention(&q, &k, &v, mask, self.head_dim)?
            .transpose(1, 2)?
            .reshape((b, t, d))
            .and_then(|y| self.out_proj.forward(&y))
    }
}

/// Scaled dot-product attention on `[B, H, T, hd]` tensors; scores and softmax
/// in f32, result in the input dtype, `[B, H, Tq, hd]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    head_dim: usize,
) -> candle_core::Result<Tensor> {
    let dtype = q.dtype();
    let scale = 1.0 / (head_dim as f64).sqrt();
    if let Some(ctx) = crate::attention::attention(q, k, v, mask, scale)? {
        return Ok(ctx);
    }
    let q32 = (q.to_dtype(DType::F32)? * scale)?;
    let k32 = k.to_dtype(DType::F32)?;
    let mut scores = q32.matmul(&k32.t()?)?;
    if let Some(m) = mask {
        scores = scores.broadcast_add(m)?;
    }
    let probs = softmax_last_dim(&scores)?;
    probs
        .matmul(&v.to_dtype(DType::F32)?.contiguous()?)?
        .to_dtype(dtype)
}

/// Two-layer MLP `fc2(act(fc1(x)))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub fc1: LinearLayer,
    pub fc2: LinearLayer,
    act: Activation,
}

impl Mlp {
    /// An MLP from its two layers.
    pub fn new(fc1: LinearLayer, fc2: LinearLayer, act: Activation) -> Self {
        Self { fc1, fc2, act }
    }

    /// Load `{prefix}.fc1`, `{prefix}.fc2`.
    pub fn load(
        vb: VarBuilder,
        hidden: usize,
        intermediate: usize,
        act: Activation,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            fc1: LinearLayer::load(vb.pp("fc1"), hidden, intermediate, true)?,
            fc2: LinearLayer::load(vb.pp("fc2"), intermediate, hidden, true)?,
            act,
        })
    }
    /// Apply the MLP.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.act.apply(&self.fc1.forward(x)?)?)
    }
}

/// One pre-norm encoder layer.
#[derive(Debug, Clone)]
pub struct EncoderLayer {
    pub self_attn: SelfAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: Mlp,
    pub layer_norm2: LayerNorm,
}

impl EncoderLayer {
    fn load(vb: VarBuilder, d: &EncoderDims) -> candle_core::Result<Self> {
        Ok(Self {
            self_attn: SelfAttention::load(vb.pp("self_attn"), d.hidden, d.heads)?,
            layer_norm1: layer_norm(vb.pp("layer_norm1"), d.hidden, d.eps)?,
            mlp: Mlp::load(vb.pp("mlp"), d.hidden, d.intermediate, d.act)?,
            layer_norm2: layer_norm(vb.pp("layer_norm2"), d.hidden, d.eps)?,
        })
    }
    /// `x + attn(ln1(x))`, then `+ mlp(ln2(.))`.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let h = (x + self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?)?;
        &h + self.mlp.forward(&self.layer_norm2.forward(&h)?)?
    }
    fn linears(&self) -> [&LinearLayer; 6] {
        [
            &self.self_attn.q_proj,
            &self.self_attn.k_proj,
            &self.self_attn.v_proj,
            &self.self_attn.out_proj,
            &self.mlp.fc1,
            &self.mlp.fc2,
        ]
    }
    fn linears_mut(&mut self) -> [&mut LinearLayer; 6] {
        [
            &mut self.self_attn.q_proj,
            &mut self.self_attn.k_proj,
            &mut self.self_attn.v_proj,
            &mut self.self_attn.out_proj,
            &mut self.mlp.fc1,
            &mut self.mlp.fc2,
        ]
    }
}

/// A stack of encoder layers (`{prefix}.layers.{i}`).
#[derive(Debug, Clone)]
pub struct Encoder {
    pub layers: Vec<EncoderLayer>,
}

/// Called before layer `i` (for `i >= 1`) to modify the running sequence (VPT-deep).
pub type BetweenLayers<'a> = &'a dyn Fn(usize, Tensor) -> crate::Result<Tensor>;

impl Encoder {
    /// Load `{prefix}.layers.0..n`.
    pub fn load(vb: VarBuilder, d: &EncoderDims) -> candle_core::Result<Self> {
        let vb = vb.pp("layers");
        let layers = (0..d.layers)
            .map(|i| EncoderLayer::load(vb.pp(i), d))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { layers })
    }

    /// Run all layers; `between(i, x)` runs before every layer `i >= 1`.
    pub fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        between: Option<BetweenLayers>,
    ) -> crate::Result<Tensor> {
        let mut x = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            if i > 0 {
                if let Some(f) = between {
                    x = f(i, x)?;
                }
            }
            x = layer.forward(&x, mask)?;
        }
        Ok(x)
    }

    /// The outputs of the layers `keep` (counted from 1: `k` is the output of layer `k - 1`
    /// of `self.layers`, HF's `hidden_states[k]`), in the order asked, each the running
    /// sequence exactly as [`Encoder::forward`] computes it without a `between` hook; layers
    /// after the deepest one asked are not run. `keep` is checked by the caller
    /// ([`crate::vlm::check_vision_layers`]); an index out of range is an error here too.
    pub fn forward_layers(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        keep: &[usize],
    ) -> crate::Result<Vec<Tensor>> {
        crate::vlm::check_vision_layers(keep, self.layers.len())?;
        let deepest = keep.iter().copied().max().unwrap_or(0);
        // states[k - 1] is the output of layer k.
        let mut states = Vec::with_capacity(deepest);
        let mut x = x.clone();
        for layer in self.layers.iter().take(deepest) {
            x = layer.forward(&x, mask)?;
            states.push(x.clone());
        }
        Ok(keep.iter().map(|&k| states[k - 1].clone()).collect())
    }

    /// All linear layers, in layer order.
    pub fn linears(&self) -> Vec<&LinearLayer> {
        self.layers.iter().flat_map(|l| l.linears()).collect()
    }
    /// All linear layers, mutably.
    pub fn linears_mut(&mut self) -> Vec<&mut LinearLayer> {
        self.layers
            .iter_mut()
            .flat_map(|l| l.linears_mut())
            .collect()
    }
}

/// Causal additive mask `[1, 1, T, T]` (f32), blocked above the diagonal.
pub fn causal_mask(t: usize, device: &Device) -> candle_core::Result<Tensor> {
    let data: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { MASK_VALUE } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (1, 1, t, t), device)
}

/// Padding additive mask `[B, 1, 1, T]` (f32) from a `[B, T]` 0/1 attention mask.
pub fn padding_mask(attention_mask: &Tensor) -> candle_core::Result<Tensor> {
    let (b, t) = attention_mask.dims2()?;
    let keep = attention_mask.to_dtype(DType::F32)?;
    // (1 - keep) * MASK_VALUE
    let m = ((keep - 1.0)? * (-(MASK_VALUE as f64)))?;
    m.reshape((b, 1, 1, t))
}
