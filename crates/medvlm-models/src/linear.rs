//! [`LinearLayer`]: a linear map `y = x Wᵀ + b` that parameter-efficient
//! methods can wrap without touching the model code.
//!
//! Every attention projection (q, k, v, out) and MLP layer (fc1, fc2) of the
//! medvlm model families is a `LinearLayer`, addressable by its checkpoint
//! module path (e.g. `text_model.encoder.layers.3.self_attn.q_proj`).
//! A [`LinearWrapper`] sees the layer input and the output computed so far and
//! returns a new output, which covers:
//! - LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
//!   Models"): `y + (α/r) · x Aᵀ Bᵀ`;
//! - bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer
//!   Learning for NLP"): `y + f(y)`;
//! - BitFit (Ben Zaken et al. 2022) trains only biases: [`LinearLayer::set_bias`]
//!   swaps in a `Var` when the model was loaded frozen (when it was loaded
//!   trainable, every bias already is a `Var` in the model's `VarMap`).
//!
//! Wrappers run in the order they were pushed; with none the layer is exactly
//! `candle_nn::Linear`.
//!
//! For inference on a CPU with AVX512-BF16, [`LinearLayer::pack_bf16`] (or
//! [`LinearLayers::pack_linear_bf16`] for a whole model) makes the product `x Wᵀ + b` run in
//! bf16 with f32 accumulation ([`crate::bf16_gemm`]); inputs, outputs, bias and wrappers stay
//! f32, as under PyTorch's CPU autocast.

use std::any::Any;
use std::sync::Arc;

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::bf16_gemm::PackedBf16Weight;

/// A modification of a linear layer's output (LoRA, adapters, ...).
pub trait LinearWrapper: Send + Sync + std::fmt::Debug {
    /// Short name of the method, for listings (e.g. `"lora"`).
    fn kind(&self) -> &str;
    /// `x`: the layer input `[.., in]`; `y`: the output so far `[.., out]`.
    /// Returns the new output, same shape as `y`.
    fn forward(&self, x: &Tensor, y: Tensor) -> candle_core::Result<Tensor>;
    /// Downcasting, so a method can find its own wrappers again (e.g. to merge LoRA).
    fn as_any(&self) -> &dyn Any;
}

/// A linear layer `y = x Wᵀ + b` (weight `[out, in]`, PyTorch layout) with
/// optional wrappers, named by its checkpoint module path.
#[derive(Clone, Debug)]
pub struct LinearLayer {
    path: String,
    weight: Tensor,
    bias: Option<Tensor>,
    wrappers: Vec<Arc<dyn LinearWrapper>>,
    /// The weight rounded to bf16 and packed, when the product runs in bf16.
    bf16: Option<Arc<PackedBf16Weight>>,
}

impl LinearLayer {
    /// A layer from tensors; `path` is its module path (used to address it).
    pub fn new(path: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            path: path.into(),
            weight,
            bias,
            wrappers: Vec::new(),
            bf16: None,
        }
    }

    /// Load `{prefix}.weight` `[out, in]` and, if `bias`, `{prefix}.bias` `[out]`.
    pub fn load(
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> candle_core::Result<Self> {
        // Hints only matter for from-scratch models (VarMap): Kaiming-normal weights, zero biases.
        let weight = vb.get_with_hints(
            (out_dim, in_dim),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        // Frozen (non-Var) f32 CPU weights take the layout the inference product multiplies
        // fastest; trainable ones stay row-major, as their optimiser updates them.
        let weight = if weight.is_variable() {
            weight
        } else {
            crate::fused::inference_weight_layout(&weight)?
        };
        Ok(Self::new(vb.prefix(), weight, bias))
    }

    /// Module path, e.g. `vision_model.encoder.layers.0.mlp.fc1`.
    pub fn path(&self) -> &str {
        &self.path
    }
    /// The weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
    /// The bias `[out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    /// Input features.
    pub fn in_features(&self) -> usize {
        self.weight.dims().get(1).copied().unwrap_or(0)
    }
    /// Output features.
    pub fn out_features(&self) -> usize {
        self.weight.dims().first().copied().unwrap_or(0)
    }
    /// Replace the weight (e.g. after merging LoRA). Shape must stay `[out, in]`.
    pub fn set_weight(&mut self, weight: Tensor) -> candle_core::Result<()> {
        if weight.dims() != self.weight.dims() {
            candle_core::bail!(
                "{}: new weight shape {:?} differs from {:?}",
                self.path,
                weight.dims(),
                self.weight.dims()
            )
        }
        // A bf16 layer keeps computing in bf16, with the new weight.
        if self.bf16.is_some() {
            self.bf16 = Some(Arc::new(PackedBf16Weight::from_tensor(&weight)?));
        }
        self.weight = weight;
        Ok(())
    }
    /// Replace the bias (e.g. with a `Var` for BitFit). Shape must be `[out]`.
    pub fn set_bias(&mut self, bias: Option<Tensor>) -> candle_core::Result<()> {
        if let Some(b) = &bias {
            if b.dims() != [self.out_features()] {
                candle_core::bail!(
                    "{}: bias shape {:?}, expected [{}]",
                    self.path,
                    b.dims(),
                    self.out_features()
                )
            }
        }
        self.bias = bias;
        Ok(())
    }
    /// Append a wrapper (applied after the ones already present).
    pub fn push_wrapper(&mut self, wrapper: Arc<dyn LinearWrapper>) {
        self.wrappers.push(wrapper);
    }
    /// The wrappers, in application order.
    pub fn wrappers(&self) -> &[Arc<dyn LinearWrapper>] {
        &self.wrappers
    }
    /// Remove all wrappers and return them.
    pub fn take_wrappers(&mut self) -> Vec<Arc<dyn LinearWrapper>> {
        std::mem::take(&mut self.wrappers)
    }
    /// Makes the product run in bf16 with f32 accumulation ([`crate::bf16_gemm`]): the weight
    /// is rounded to bf16 and packed once (the f32 weight is kept, for [`Self::weight`] and
    /// [`Self::unpack_bf16`], as PyTorch's autocast keeps its bf16 copies next to the f32
    /// parameters); inputs are rounded to bf16 in every forward pass. Inference only: a
    /// trainable weight (a `Var`) is refused here, and a forward pass that gradients would
    /// flow through is refused there. Refused too on a device other than the CPU and on a
    /// CPU without AVX512-BF16 ([`crate::bf16_gemm::require_cpu_support`]).
    pub fn pack_bf16(&mut self) -> candle_core::Result<()> {
        self.check_bf16()?;
        self.bf16 = Some(Arc::new(PackedBf16Weight::from_tensor(&self.weight)?));
        Ok(())
    }

    /// Why [`Self::pack_bf16`] would refuse this layer, if it would.
    fn check_bf16(&self) -> candle_core::Result<()> {
        if let Err(e) = crate::bf16_gemm::require_cpu_support() {
            candle_core::bail!("{}: {e}", self.path)
        }
        if !self.weight.device().is_cpu() {
            candle_core::bail!(
                "{}: bf16 linear layers are a CPU mode (on a GPU, load the model in bf16)",
                self.path
            )
        }
        if self.weight.is_variable() {
            candle_core::bail!(
                "{}: bf16 linear layers are for inference, and this weight is trainable (a Var); \
                 load the model frozen, or keep f32",
                self.path
            )
        }
        Ok(())
    }

    /// Back to the f32 product (drops the packed bf16 weight).
    pub fn unpack_bf16(&mut self) {
        self.bf16 = None;
    }

    /// Whether the product runs in bf16 ([`Self::pack_bf16`]).
    pub fn is_bf16(&self) -> bool {
        self.bf16.is_some()
    }

    /// `x Wᵀ + b` without wrappers (with a bias, one matmul that accumulates onto it:
    /// [`crate::fused::linear`]; after [`Self::pack_bf16`], the bf16 product).
    pub fn forward_base(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(w) = &self.bf16 {
            return crate::bf16_gemm::linear(x, w, self.bias.as_ref(), &self.path);
        }
        match &self.bias {
            Some(b) => crate::fused::linear(x, &self.weight, b),
            None => candle_nn::Linear::new(self.weight.clone(), None).forward(x),
        }
    }
}

impl Module for LinearLayer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut y = self.forward_base(x)?;
        for w in &self.wrappers {
            y = w.forward(x, y)?;
        }
        Ok(y)
    }
}

/// Access to all [`LinearLayer`]s of a model, by module path.
pub trait LinearLayers {
    /// All linear layers (attention, MLP, projections).
    fn linear_layers(&self) -> Vec<&LinearLayer>;
    /// All linear layers, mutably (to wrap or modify them).
    fn linear_layers_mut(&mut self) -> Vec<&mut LinearLayer>;

    /// Module paths of all linear layers.
    fn linear_paths(&self) -> Vec<String> {
        self.linear_layers()
            .iter()
            .map(|l| l.path().to_string())
            .collect()
    }

    /// The layer at `path`, or an error that lists a few valid paths.
    fn linear_mut(&mut self, path: &str) -> crate::Result<&mut LinearLayer> {
        let paths = self.linear_paths();
        match self
            .linear_layers_mut()
            .into_iter()
            .find(|l| l.path() == path)
        {
            Some(l) => Ok(l),
            None => Err(crate::ModelError::invalid(format!(
                "no linear layer at {path:?}; the model has {} linear layers, e.g. {}",
                paths.len(),
                paths.iter().take(6).cloned().collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// Runs every linear layer's product in bf16 with f32 accumulation
    /// ([`LinearLayer::pack_bf16`]): the CPU's `--dtype bf16`. Everything else (norms,
    /// softmax, activations, attention, convolutions, embeddings) stays f32. Checks every
    /// layer first, so a refusal (no AVX512-BF16, a trainable weight, a GPU tensor) leaves the
    /// model unchanged. Returns the number of layers switched.
    fn pack_linear_bf16(&mut self) -> crate::Result<usize> {
        crate::bf16_gemm::require_cpu_support().map_err(crate::ModelError::Invalid)?;
        let mut layers = self.linear_layers_mut();
        for l in &layers {
            l.check_bf16()?;
        }
        for l in &mut layers {
            l.pack_bf16()?;
        }
        Ok(layers.len())
    }

    /// Push `wrapper` onto the layer at `path`.
    fn wrap_linear(&mut self, path: &str, wrapper: Arc<dyn LinearWrapper>) -> crate::Result<()> {
        self.linear_mut(path)?.push_wrapper(wrapper);
        Ok(())
    }
}
