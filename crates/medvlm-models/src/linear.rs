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
//!
//! For int8 inference, [`LinearLayer::pack_int8`] (or [`LinearLayers::pack_linear_int8`])
//! quantises the weight to GGML's Q8_0 through candle's `quantized` module (int8 values in
//! blocks of 32 along the input dimension, one f16 scale per block; the f32 weight is dropped,
//! a quarter of its memory remains) and runs the product with candle's quantised matmul, which
//! quantises each input row to int8 too (blocks of 256, Q8_K) and accumulates in integers
//! (AVX512-VNNI where the CPU has it). Bias and wrappers stay f32.

use std::any::Any;
use std::sync::Arc;

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::bf16_gemm::PackedBf16Weight;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};

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
    /// The weight quantised to Q8_0, when the product runs in int8 (then `weight` is a
    /// placeholder of its shape that holds no data).
    int8: Option<Arc<QMatMul>>,
}

/// Input width a Q8_0 weight needs to be a multiple of (its block length).
pub const INT8_BLOCK: usize = 32;

impl LinearLayer {
    /// A layer from tensors; `path` is its module path (used to address it).
    pub fn new(path: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            path: path.into(),
            weight,
            bias,
            wrappers: Vec::new(),
            bf16: None,
            int8: None,
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
    /// The weight `[out, in]`. After [`Self::pack_int8`] a placeholder of that shape, device
    /// and dtype without data (zeros): the weight is the Q8_0 one ([`Self::is_int8`]).
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
        // A bf16 or int8 layer keeps computing in its precision, with the new weight.
        if self.bf16.is_some() {
            self.bf16 = Some(Arc::new(PackedBf16Weight::from_tensor(&weight)?));
        }
        if self.int8.is_some() {
            self.weight = weight;
            return self.pack_int8();
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
        if self.int8.is_some() {
            candle_core::bail!("{}: the layer already runs in int8", self.path)
        }
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

    /// Makes the product run in int8: the weight is quantised to Q8_0 (see the module
    /// documentation) and the f32 weight dropped ([`Self::weight`] becomes a placeholder).
    /// Inference only: refused for a trainable weight (a `Var`), a weight not on the CPU, a
    /// layer already in bf16, and an input width that is not a multiple of [`INT8_BLOCK`].
    pub fn pack_int8(&mut self) -> candle_core::Result<()> {
        self.check_int8()?;
        // A fresh buffer of exactly the weight's elements: candle's quantiser reads the whole
        // storage, and a fused projection's q/k/v weights are contiguous views of one buffer.
        let values = self
            .weight
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let w = Tensor::from_vec(values, self.weight.shape(), self.weight.device())?;
        let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
        self.int8 = Some(Arc::new(QMatMul::from_qtensor(q)?));
        // A zero-stride placeholder: the shape, device and dtype stay visible, the memory goes.
        self.weight = Tensor::zeros((), self.weight.dtype(), self.weight.device())?
            .broadcast_as(self.weight.dims())?;
        Ok(())
    }

    /// Why [`Self::pack_int8`] would refuse this layer, if it would.
    fn check_int8(&self) -> candle_core::Result<()> {
        if !self.weight.device().is_cpu() {
            candle_core::bail!("{}: int8 linear layers are a CPU mode", self.path)
        }
        if self.weight.is_variable() {
            candle_core::bail!(
                "{}: int8 linear layers are for inference, and this weight is trainable (a \
                 Var); load the model frozen, or keep f32",
                self.path
            )
        }
        if self.bf16.is_some() {
            candle_core::bail!("{}: the layer already runs in bf16", self.path)
        }
        if !self.in_features().is_multiple_of(INT8_BLOCK) {
            candle_core::bail!(
                "{}: input width {} is not a multiple of {INT8_BLOCK}, Q8_0's block length",
                self.path,
                self.in_features()
            )
        }
        Ok(())
    }

    /// Whether the product runs in int8 ([`Self::pack_int8`]).
    pub fn is_int8(&self) -> bool {
        self.int8.is_some()
    }

    /// The Q8_0 weight dequantised to f32 `[out, in]` (what the int8 product multiplies by),
    /// if the layer runs in int8.
    pub fn int8_weight(&self) -> candle_core::Result<Option<Tensor>> {
        match self.int8.as_deref() {
            Some(QMatMul::QTensor(q)) => Ok(Some(q.dequantize(self.weight.device())?)),
            Some(_) => candle_core::bail!("{}: int8 weight was not kept quantised", self.path),
            None => Ok(None),
        }
    }

    /// `x Wᵀ + b` without wrappers (with a bias, one matmul that accumulates onto it:
    /// [`crate::fused::linear`]; after [`Self::pack_bf16`], the bf16 product).
    pub fn forward_base(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if let Some(w) = &self.bf16 {
            return crate::bf16_gemm::linear(x, w, self.bias.as_ref(), &self.path);
        }
        if let Some(q) = &self.int8 {
            if x.track_op() {
                candle_core::bail!(
                    "{}: int8 linear layers have no backward pass (inference only)",
                    self.path
                )
            }
            let y = q.forward(&x.contiguous()?)?;
            return match &self.bias {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            };
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

/// What [`LinearLayers::pack_linear_int8`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Int8Packing {
    /// Layers now in int8.
    pub int8: usize,
    /// Module paths of the layers left in f32 (input width not a multiple of [`INT8_BLOCK`]).
    pub kept_f32: Vec<String>,
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

    /// Runs the linear layers' products in int8 ([`LinearLayer::pack_int8`]: Q8_0 weights,
    /// inputs quantised per row in each product). A layer whose input width is not a multiple
    /// of [`INT8_BLOCK`] stays f32 and is counted in the result; a trainable, non-CPU or bf16
    /// layer is refused (every layer is checked first, so a refusal leaves the model
    /// unchanged).
    fn pack_linear_int8(&mut self) -> crate::Result<Int8Packing> {
        let mut layers = self.linear_layers_mut();
        let fits = |l: &LinearLayer| l.in_features().is_multiple_of(INT8_BLOCK);
        for l in layers.iter().filter(|l| fits(l)) {
            l.check_int8()?;
        }
        let mut out = Int8Packing::default();
        for l in &mut layers {
            if fits(l) {
                l.pack_int8()?;
                out.int8 += 1;
            } else {
                out.kept_f32.push(l.path().to_string());
            }
        }
        if out.int8 == 0 {
            return Err(crate::ModelError::invalid(format!(
                "int8: no linear layer has an input width that is a multiple of {INT8_BLOCK} \
                 (Q8_0's block length); the model stays f32"
            )));
        }
        Ok(out)
    }

    /// Push `wrapper` onto the layer at `path`.
    fn wrap_linear(&mut self, path: &str, wrapper: Arc<dyn LinearWrapper>) -> crate::Result<()> {
        self.linear_mut(path)?.push_wrapper(wrapper);
        Ok(())
    }
}
