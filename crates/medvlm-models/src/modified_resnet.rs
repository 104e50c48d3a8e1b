//! CLIP's ModifiedResNet image tower (Radford et al. 2021, "Learning Transferable Visual
//! Models From Natural Language Supervision", section 2.4), the image encoder of OpenAI's
//! RN50 / RN101 / RN50x4 / RN50x16 / RN50x64 CLIP models and of PubMedCLIP-RN50, in the
//! open_clip checkpoint layout (`visual.*`).
//!
//! Differences from a torchvision ResNet, as the paper and open_clip implement them:
//! - a stem of three 3×3 convolutions (the first with stride 2; widths `width/2`, `width/2`,
//!   `width`), each followed by batch norm and ReLU, then a 2×2 average pool;
//! - anti-aliased downsampling: a stage with stride 2 average-pools *before* its 1×1
//!   expansion convolution (`avgpool` after `conv2`) and in its shortcut (`downsample.-1`),
//!   and every convolution has stride 1;
//! - bottleneck blocks (`conv1` 1×1, `conv2` 3×3, `conv3` 1×1 to 4× the planes), stages of
//!   `width`, `2·width`, `4·width`, `8·width` planes, so the features have `32·width`
//!   channels at 1/32 of the input size;
//! - attention pooling instead of global average pooling: the mean of the feature map is
//!   prepended as a query token, position embeddings `[(S/32)² + 1, 32·width]` are added, and
//!   one multi-head attention layer (`q_proj`, `k_proj`, `v_proj`, `c_proj`, heads
//!   `32·width / head_width`) maps the query token to the embedding (`c_proj` projects to
//!   the shared dimension, so there is no separate projection).
//!
//! Activations run channels-last ([`crate::conv`]). Batch norm uses running statistics
//! unless [`ModifiedResNet::set_training`] switched it to batch statistics (pretraining
//! from scratch); few-shot fine-tuning keeps the running statistics, as CLIP-LoRA and
//! open_clip's `lock` do.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::conv::{avg_pool2d, conv2d, BatchNorm};
use crate::fused::relu;
use crate::linear::LinearLayer;
use crate::transformer::attention;

/// Sizes of a ModifiedResNet (open_clip `vision_cfg` with a list of `layers`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModifiedResNetConfig {
    /// Bottleneck blocks per stage (RN50: `[3, 4, 6, 3]`).
    pub layers: Vec<usize>,
    /// Stem width (RN50: 64); the features have `32·width` channels.
    pub width: usize,
    /// Input size in pixels, a multiple of 32 (RN50: 224).
    pub image_size: usize,
    /// Channels per attention-pool head (open_clip `head_width`, default 64).
    pub head_width: usize,
    /// Output (shared embedding) dimension.
    pub output_dim: usize,
}

impl ModifiedResNetConfig {
    /// Channels of the final feature map.
    pub fn feature_dim(&self) -> usize {
        self.width * 32
    }
    /// Attention-pool heads.
    pub fn heads(&self) -> usize {
        self.feature_dim() / self.head_width.max(1)
    }
    /// Why the sizes cannot build a model, if they cannot.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.layers.len() != 4 || self.layers.contains(&0) {
            return Err(format!(
                "layers {:?}: a ModifiedResNet has four stages of at least one block",
                self.layers
            ));
        }
        if self.width < 2 || !self.width.is_multiple_of(2) {
            return Err(format!("width {} must be an even number >= 2", self.width));
        }
        if self.image_size < 32 || !self.image_size.is_multiple_of(32) {
            return Err(format!(
                "image_size {} must be a multiple of 32 (the tower downsamples 32x)",
                self.image_size
            ));
        }
        if self.head_width == 0 || !self.feature_dim().is_multiple_of(self.head_width) {
            return Err(format!(
                "head_width {} does not divide the {} feature channels",
                self.head_width,
                self.feature_dim()
            ));
        }
        if self.output_dim == 0 {
            return Err("output_dim must be positive".into());
        }
        Ok(())
    }
}

/// A convolution weight `[O, C, k, k]` (no bias) followed by batch norm.
#[derive(Debug, Clone)]
struct ConvBn {
    weight: Tensor,
    bn: BatchNorm,
    padding: usize,
}

impl ConvBn {
    fn load(
        conv: VarBuilder,
        bn: VarBuilder,
        c_in: usize,
        c_out: usize,
        k: usize,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            weight: conv.get_with_hints(
                (c_out, c_in, k, k),
                "weight",
                candle_nn::init::DEFAULT_KAIMING_NORMAL,
            )?,
            bn: BatchNorm::load(bn, c_out)?,
            padding: k / 2,
        })
    }

    fn forward(&self, x: &Tensor, stride: usize, training: bool) -> candle_core::Result<Tensor> {
        self.bn
            .forward(&conv2d(x, &self.weight, stride, self.padding)?, training)
    }

    /// `relu(bn(conv(x)))`, the batch norm and ReLU fused.
    fn forward_relu(
        &self,
        x: &Tensor,
        stride: usize,
        training: bool,
    ) -> candle_core::Result<Tensor> {
        self.bn
            .forward_relu(&conv2d(x, &self.weight, stride, self.padding)?, training)
    }
}

/// One bottleneck block (`layerN.i`).
#[derive(Debug, Clone)]
struct Bottleneck {
    conv1: ConvBn,
    conv2: ConvBn,
    conv3: ConvBn,
    stride: usize,
    /// `downsample.0` (1×1 conv) and `downsample.1` (batch norm), after `downsample.-1`
    /// (the average pool, no weights).
    downsample: Option<ConvBn>,
}

impl Bottleneck {
    const EXPANSION: usize = 4;

    fn load(
        vb: VarBuilder,
        inplanes: usize,
        planes: usize,
        stride: usize,
    ) -> candle_core::Result<Self> {
        let out = planes * Self::EXPANSION;
        let downsample = if stride > 1 || inplanes != out {
            let ds = vb.pp("downsample");
            Some(ConvBn::load(ds.pp("0"), ds.pp("1"), inplanes, out, 1)?)
        } else {
            None
        };
        Ok(Self {
            conv1: ConvBn::load(vb.pp("conv1"), vb.pp("bn1"), inplanes, planes, 1)?,
            conv2: ConvBn::load(vb.pp("conv2"), vb.pp("bn2"), planes, planes, 3)?,
            conv3: ConvBn::load(vb.pp("conv3"), vb.pp("bn3"), planes, out, 1)?,
            stride,
            downsample,
        })
    }

    fn forward(&self, x: &Tensor, training: bool) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward_relu(x, 1, training)?;
        let h = self.conv2.forward_relu(&h, 1, training)?;
        let h = avg_pool2d(&h, self.stride)?;
        let h = self.conv3.forward(&h, 1, training)?;
        let identity = match &self.downsample {
            Some(ds) => ds.forward(&avg_pool2d(x, self.stride)?, 1, training)?,
            None => x.clone(),
        };
        relu(&(h + identity)?)
    }
}

/// The attention pooling head (`visual.attnpool`).
#[derive(Debug, Clone)]
pub struct AttentionPool2d {
    positional_embedding: Tensor,
    pub q_proj: LinearLayer,
    pub k_proj: LinearLayer,
    pub v_proj: LinearLayer,
    pub c_proj: LinearLayer,
    heads: usize,
}

impl AttentionPool2d {
    fn load(vb: VarBuilder, c: &ModifiedResNetConfig) -> candle_core::Result<Self> {
        let d = c.feature_dim();
        let side = c.image_size / 32;
        Ok(Self {
            positional_embedding: vb.get_with_hints(
                (side * side + 1, d),
                "positional_embedding",
                crate::transformer::EMBED_INIT,
            )?,
            q_proj: LinearLayer::load(vb.pp("q_proj"), d, d, true)?,
            k_proj: LinearLayer::load(vb.pp("k_proj"), d, d, true)?,
            v_proj: LinearLayer::load(vb.pp("v_proj"), d, d, true)?,
            c_proj: LinearLayer::load(vb.pp("c_proj"), d, c.output_dim, true)?,
            heads: c.heads(),
        })
    }

    /// `features` `[B, T, D]` (the flattened feature map) → `[B, output_dim]`.
    pub fn forward(&self, features: &Tensor) -> crate::Result<Tensor> {
        let (b, t, d) = features.dims3()?;
        let expected = self.positional_embedding.dim(0)?;
        if t + 1 != expected {
            return Err(crate::ModelError::invalid(format!(
                "attention pooling: a {t}-position feature map, but the position embeddings \
                 cover {} (the tower was built for another input size)",
                expected - 1
            )));
        }
        let x = Tensor::cat(&[&features.mean_keepdim(1)?, features], 1)?
            .broadcast_add(&self.positional_embedding.to_dtype(features.dtype())?)?;
        let hd = d / self.heads;
        let split = |y: Tensor, len: usize| -> candle_core::Result<Tensor> {
            y.reshape((b, len, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q_proj.forward(&x.narrow(1, 0, 1)?)?, 1)?;
        let k = split(self.k_proj.forward(&x)?, t + 1)?;
        let v = split(self.v_proj.forward(&x)?, t + 1)?;
        let ctx = attention(&q, &k, &v, None, hd)?
            .transpose(1, 2)?
            .reshape((b, d))?;
        Ok(self.c_proj.forward(&ctx)?)
    }
}

/// What the tower returns.
#[derive(Debug, Clone)]
pub struct ResNetOutput {
    /// Attention-pooled embedding `[B, output_dim]`.
    pub embeds: Tensor,
    /// Global average of the final feature map `[B, 32·width]`.
    pub mean_features: Tensor,
    /// Final feature map, flattened channels-last: `[B, (S/32)², 32·width]`.
    pub features: Tensor,
}

/// CLIP's ModifiedResNet (`visual`).
#[derive(Debug)]
pub struct ModifiedResNet {
    cfg: ModifiedResNetConfig,
    stem: [ConvBn; 3],
    stages: Vec<Vec<Bottleneck>>,
    pub attnpool: AttentionPool2d,
    training: AtomicBool,
}

impl ModifiedResNet {
    /// Load `{prefix}.conv1..3`, `bn1..3`, `layer1..4`, `attnpool`.
    pub fn load(vb: VarBuilder, cfg: &ModifiedResNetConfig) -> candle_core::Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let w = cfg.width;
        let stem = [
            ConvBn::load(vb.pp("conv1"), vb.pp("bn1"), 3, w / 2, 3)?,
            ConvBn::load(vb.pp("conv2"), vb.pp("bn2"), w / 2, w / 2, 3)?,
            ConvBn::load(vb.pp("conv3"), vb.pp("bn3"), w / 2, w, 3)?,
        ];
        let mut inplanes = w;
        let mut stages = Vec::with_capacity(4);
        for (s, &blocks) in cfg.layers.iter().enumerate() {
            let planes = w << s;
            let stride = if s == 0 { 1 } else { 2 };
            let vs = vb.pp(format!("layer{}", s + 1));
            let mut stage = Vec::with_capacity(blocks);
            for i in 0..blocks {
                let st = if i == 0 { stride } else { 1 };
                stage.push(Bottleneck::load(vs.pp(i), inplanes, planes, st)?);
                inplanes = planes * Bottleneck::EXPANSION;
            }
            stages.push(stage);
        }
        Ok(Self {
            cfg: cfg.clone(),
            stem,
            stages,
            attnpool: AttentionPool2d::load(vb.pp("attnpool"), cfg)?,
            training: AtomicBool::new(false),
        })
    }

    /// The sizes.
    pub fn config(&self) -> &ModifiedResNetConfig {
        &self.cfg
    }

    /// Batch statistics (and running-statistic updates) when `on`, running statistics otherwise.
    pub fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed);
    }

    /// Whether batch norm uses batch statistics.
    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    /// Bottleneck blocks in all stages.
    pub fn num_blocks(&self) -> usize {
        self.stages.iter().map(Vec::len).sum()
    }

    /// The stem (three conv-BN-ReLU and the 2×2 average pool) of channels-last pixels.
    pub fn stem(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let training = self.is_training();
        let mut h = x.clone();
        for (i, layer) in self.stem.iter().enumerate() {
            h = layer.forward_relu(&h, if i == 0 { 2 } else { 1 }, training)?;
        }
        avg_pool2d(&h, 2)
    }

    /// The final feature map `[B, S/32, S/32, 32·width]` of channels-last pixels `[B, S, S, 3]`.
    pub fn feature_map(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let training = self.is_training();
        let mut h = self.stem(x)?;
        for block in self.stages.iter().flatten() {
            h = block.forward(&h, training)?;
        }
        Ok(h)
    }

    /// Encode `pixel_values` `[B, 3, S, S]` (NCHW, as every preprocessing returns them).
    pub fn forward(&self, pixel_values: &Tensor) -> crate::Result<ResNetOutput> {
        let (_, c, h, w) = pixel_values.dims4()?;
        let s = self.cfg.image_size;
        if c != 3 || h != s || w != s {
            return Err(crate::ModelError::invalid(format!(
                "ModifiedResNet: pixel values {:?}, expected [B, 3, {s}, {s}]",
                pixel_values.dims()
            )));
        }
        let x = pixel_values.permute((0, 2, 3, 1))?.contiguous()?;
        let fmap = self.feature_map(&x)?;
        let (b, fh, fw, d) = fmap.dims4()?;
        let features = fmap.reshape((b, fh * fw, d))?;
        Ok(ResNetOutput {
            embeds: self.attnpool.forward(&features)?,
            mean_features: features.mean(1)?,
            features,
        })
    }

    /// The attention pool's linear layers.
    pub fn linears(&self) -> Vec<&LinearLayer> {
        let a = &self.attnpool;
        vec![&a.q_proj, &a.k_proj, &a.v_proj, &a.c_proj]
    }
    /// The attention pool's linear layers, mutably.
    pub fn linears_mut(&mut self) -> Vec<&mut LinearLayer> {
        let a = &mut self.attnpool;
        vec![&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.c_proj]
    }
}
