//! Text-guided segmentation on a frozen VLM image tower (CLIPSeg's design, Lüddecke & Ecker,
//! CVPR 2022, "Image Segmentation Using Text and Image Prompts", reduced to one layer):
//! the patch tokens of the frozen image tower are reduced to a small width, conditioned on
//! the prompt's text embedding by FiLM (Perez et al., AAAI 2018: `x * (1 + gamma(t)) +
//! beta(t)`), and decoded to a mask by a light convolutional decoder that doubles the
//! resolution at each step (nearest upsampling + 3x3 convolutions) up to the input size, with
//! the input's grey level joined in before the last convolutions so borders can be sharper
//! than the patch grid. Loss: binary cross-entropy + soft Dice
//! ([`medvlm_train::losses::bce_with_logits`], [`medvlm_train::losses::soft_dice_loss`]).
//!
//! Several layers ([`SegHeadConfig::layers`], CLIPSeg reads blocks 3, 6 and 9 of ViT-B/16):
//! each chosen layer's patch tokens get their own linear reduction to the head's width and
//! are added into the decoder at successive stages on the patch grid, deepest first, as
//! CLIPSeg adds them between its decoder blocks (see [`TextSegHead`]). Default: the final
//! layer only.
//!
//! A pixel encoder ([`SegHeadConfig::pixel_width`]; U-Net's skips, see [`TextSegHead`]) gives
//! the decoder the image's own features at each resolution, for findings smaller than a
//! patch.
//!
//! Defaults ([`SegHeadConfig::new`]): width 64, AdamW lr 1e-3, weight decay 1e-4, 300
//! steps of batch 16, threshold 0.5 on the sigmoid, the final layer only, a pixel encoder of
//! width 16, the grey input standardised per image ([`SegHeadConfig::grey_standardise`]).
//! Only the head trains (unless the pipeline adds LoRA in the tower); the image and text
//! towers stay frozen, so their features are computed once ([`SegSample`]).

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Linear, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use medvlm_train::init::{self, Init};
use medvlm_train::losses::{bce_with_logits, soft_dice_loss};
use medvlm_train::minibatch::{adamw, ShuffledEpochs};
use medvlm_train::optim::{Gradients, NamedVar};

/// Errors of the segmentation head.
#[derive(Debug, thiserror::Error)]
pub enum SegError {
    /// Tensor error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Loss error.
    #[error(transparent)]
    Loss(#[from] medvlm_train::losses::LossError),
    /// Optimiser error.
    #[error(transparent)]
    Optim(#[from] medvlm_train::optim::OptimError),
    /// Inputs or settings that cannot work (the message says which).
    #[error("{0}")]
    Invalid(String),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, SegError>;

/// Shape and training settings of the head.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SegHeadConfig {
    /// Width of the reduced patch features and of the decoder.
    pub width: usize,
    /// Width of the image tower's patch tokens (of each layer read).
    pub feature_dim: usize,
    /// Width of the text embeddings.
    pub text_dim: usize,
    /// Patch grid `(rows, cols)` of the image tower.
    pub grid: (usize, usize),
    /// Input (and mask) size in pixels; a power-of-two multiple of the grid.
    pub image_size: usize,
    /// Optimiser steps.
    pub steps: usize,
    /// Samples per step.
    pub batch: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// Learning rate of the image tower's trained parameters (LoRA, bottleneck adapters)
    /// when they train with the head; `None` (the default, and what cards without the field
    /// mean): `lr`, one rate for all. A lower tower rate lets the head learn the small
    /// findings before the adapted tokens move (discriminative learning rates, ULMFiT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tower_lr: Option<f64>,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Sigmoid threshold of a predicted mask.
    pub threshold: f32,
    /// Seed of the initialisation and the sample order.
    pub seed: u64,
    /// Image-tower layers read, in increasing order, counted from 1 as HF's
    /// `hidden_states[k]` (the output of the `k`-th transformer block, before any final norm;
    /// `medvlm_models::ImageEncoder::encode_image_layers`). Empty (the default, and what cards
    /// without the field mean): the tower's final patch tokens as
    /// `medvlm_models::VisionOutput::patch_tokens` gives them. The head's patch input then
    /// holds the layers' tokens side by side, `[B, N, layers.len() * feature_dim]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<usize>,
    /// Width of the pixel encoder (see [`TextSegHead`]): a small trainable convolutional
    /// path on the grey input whose features at each decoder resolution are joined to the
    /// decoder there, U-Net's skip connections. 0 (what cards written before the encoder
    /// existed mean): no pixel encoder, the grey input joined before the last convolution
    /// only. Default 16.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pixel_width: usize,
    /// Standardise each image's grey input by its own mean and spread before the pixel
    /// encoder and the last convolution (per-image z-scoring, as nnU-Net normalises MRI), so
    /// that a site's brightness and contrast drop out. Default `true`; `false` (what cards
    /// written before the option existed mean): the grey levels in `[0, 1]` as read.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub grey_standardise: bool,
}

fn is_zero(v: &usize) -> bool {
    *v == 0
}

impl SegHeadConfig {
    /// Defaults (see the module doc) for a tower with these sizes.
    pub fn new(
        feature_dim: usize,
        text_dim: usize,
        grid: (usize, usize),
        image_size: usize,
    ) -> Self {
        Self {
            width: 64,
            feature_dim,
            text_dim,
            grid,
            image_size,
            steps: 300,
            batch: 16,
            lr: 1e-3,
            tower_lr: None,
            weight_decay: 1e-4,
            threshold: 0.5,
            seed: 0,
            layers: Vec::new(),
            pixel_width: 16,
            grey_standardise: true,
        }
    }

    /// Number of token sets the head reads: `layers.len()`, or 1 (the final tokens).
    pub fn n_layer_inputs(&self) -> usize {
        self.layers.len().max(1)
    }

    /// Checks `layers` (see the field): increasing, no repeats, counted from 1. The tower's
    /// depth is checked where the tower is known.
    pub fn check_layers(&self) -> Result<()> {
        if self.layers.first() == Some(&0) {
            return Err(SegError::Invalid(
                "image-tower layers are counted from 1 (layer 0 does not exist)".into(),
            ));
        }
        if self.layers.windows(2).any(|w| w[0] >= w[1]) {
            return Err(SegError::Invalid(format!(
                "image-tower layers {:?} must be listed in increasing order without repeats",
                self.layers
            )));
        }
        Ok(())
    }

    /// Number of x2 upsampling steps from the grid to the input size.
    pub fn upsample_steps(&self) -> Result<usize> {
        let (gh, gw) = self.grid;
        if gh == 0 || gw == 0 || gh != gw {
            return Err(SegError::Invalid(format!(
                "the patch grid {gh}x{gw} must be square and non-empty"
            )));
        }
        let ratio = self.image_size / gh;
        if ratio * gh != self.image_size || !ratio.is_power_of_two() {
            return Err(SegError::Invalid(format!(
                "image size {} is not a power-of-two multiple of the {gh}x{gw} patch grid",
                self.image_size
            )));
        }
        Ok(ratio.trailing_zeros() as usize)
    }
}

/// A 3x3 convolution (padding 1) with bias on channels-last tensors, its weight in PyTorch's
/// `[out, in, 3, 3]` layout. It runs on `medvlm_models::conv::conv2d` (im2col + gemm per
/// image, with its own backward): candle's CPU `conv2d` backward goes through a direct
/// `conv_transpose2d` loop that made a 300-step training take minutes at 32 px.
struct Conv3 {
    weight: Tensor,
    bias: Tensor,
}

impl Conv3 {
    fn new(vb: VarBuilder, cin: usize, cout: usize) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(
                (cout, cin, 3, 3),
                "weight",
                candle_nn::init::DEFAULT_KAIMING_NORMAL,
            )?,
            bias: vb.get_with_hints(cout, "bias", candle_nn::Init::Const(0.0))?,
        })
    }

    /// `[B, H, W, in]` -> `[B, H, W, out]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        medvlm_models::conv::conv2d(x, &self.weight, 1, 1)?.broadcast_add(&self.bias)
    }
}

/// Nearest-neighbour x2 upsampling of a channels-last `[B, H, W, C]` tensor (a broadcast,
/// whose backward is a sum).
fn upsample2_nhwc(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    x.reshape((b, h, 1, w, 1, c))?
        .broadcast_as((b, h, 2, w, 2, c))?
        .contiguous()?
        .reshape((b, 2 * h, 2 * w, c))
}

/// 2x2 average pooling of a channels-last `[B, H, W, C]` tensor with even `H` and `W`.
fn avgpool2_nhwc(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    x.reshape((b, h / 2, 2, w / 2, 2, c))?
        .sum(4)?
        .sum(2)?
        .affine(0.25, 0.0)
}

/// The pixel encoder's two 3x3 convolutions at one resolution.
struct PixelLevel {
    first: Conv3,
    second: Conv3,
}

impl PixelLevel {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.second.forward(&self.first.forward(x)?.relu()?)?.relu()
    }
}

/// The head: reduce + FiLM + decoder (channels-last inside).
///
/// With several layers (CLIPSeg's design): the deepest layer is reduced (`reduce`),
/// conditioned by FiLM and passed through the first grid convolution (`grid`), exactly as
/// with one layer; then each shallower layer, deepest first, is reduced by its own linear
/// map (`skip.{i}.reduce`), added to the running features and passed through its own 3x3
/// convolution on the grid (`skip.{i}.conv`), before the upsampling convolutions. This is
/// CLIPSeg's `a = block(reduce(activation) + a)` with a convolution for its transformer
/// block. Why not sum every layer before the decoder: adding them at successive stages lets
/// the shallower layers (closer to the pixels, less abstract) correct the conditioned deep
/// features through a non-linearity of their own, and FiLM acts once, on the layer that
/// carries the text-aligned content, as in CLIPSeg (conditioning at its first block).
///
/// With a pixel encoder ([`SegHeadConfig::pixel_width`] > 0): two 3x3 convolutions (ReLU)
/// on the grey input at full resolution (`pix.0`), then at each halved resolution (2x2
/// average pooling, `pix.{k}`) down to twice the patch grid; each upsampling convolution of
/// the decoder takes the encoder's features of its resolution beside its own, as U-Net's
/// skip connections (Ronneberger et al., MICCAI 2015) and the CNN branch of text-guided
/// medical segmenters (LViT, Li et al., IEEE TMI 2023). Why: a ViT's tokens hold one vector
/// per patch (8 px for the quickstart tower), and findings smaller than a patch (a nodule,
/// a pneumothorax rim) can only be drawn from pixels; the text still decides *which*
/// structure through the FiLM-conditioned tokens.
pub struct TextSegHead {
    cfg: SegHeadConfig,
    reduce: Linear,
    film: Linear,
    grid_conv: Conv3,
    /// Shallower layers, deepest first: (reduction, grid convolution).
    skips: Vec<(Linear, Conv3)>,
    up_convs: Vec<Conv3>,
    /// Pixel encoder, finest level first (empty without one).
    pixel_levels: Vec<PixelLevel>,
    pixel_conv: Conv3,
    out: Linear,
}

impl TextSegHead {
    /// A freshly initialised head (candle's default initialisation) with its parameters in
    /// `vb`.
    pub fn new(vb: VarBuilder, cfg: &SegHeadConfig) -> Result<Self> {
        let steps = cfg.upsample_steps()?;
        cfg.check_layers()?;
        let w = cfg.width;
        let pw = cfg.pixel_width;
        let up_convs = (0..steps)
            .map(|i| Conv3::new(vb.pp(format!("up.{i}")), w + pw, w))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let pixel_levels = if pw == 0 {
            Vec::new()
        } else {
            (0..steps)
                .map(|k| {
                    let vb = vb.pp(format!("pix.{k}"));
                    Ok(PixelLevel {
                        first: Conv3::new(vb.pp("a"), if k == 0 { 1 } else { pw }, pw)?,
                        second: Conv3::new(vb.pp("b"), pw, pw)?,
                    })
                })
                .collect::<candle_core::Result<Vec<_>>>()?
        };
        let skips = (1..cfg.n_layer_inputs())
            .map(|i| {
                let vb = vb.pp(format!("skip.{i}"));
                Ok((
                    candle_nn::linear(cfg.feature_dim, w, vb.pp("reduce"))?,
                    Conv3::new(vb.pp("conv"), w, w)?,
                ))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            reduce: candle_nn::linear(cfg.feature_dim, w, vb.pp("reduce"))?,
            film: candle_nn::linear(cfg.text_dim, 2 * w, vb.pp("film"))?,
            grid_conv: Conv3::new(vb.pp("grid"), w, w)?,
            skips,
            up_convs,
            pixel_levels,
            pixel_conv: Conv3::new(vb.pp("pixel"), w + 1, w)?,
            out: candle_nn::linear(w, 1, vb.pp("out"))?,
        })
    }

    /// The settings.
    pub fn config(&self) -> &SegHeadConfig {
        &self.cfg
    }

    /// Mask logits `[B, 1, S, S]` from patch tokens `[B, N, L * D]` (N = grid cells, the
    /// `L` layers of [`SegHeadConfig::layers`] side by side, shallowest first; `L = 1` by
    /// default), text embeddings `[B, E]` (normalised) and the grey input `[B, 1, S, S]`.
    pub fn forward(&self, patches: &Tensor, text: &Tensor, grey: &Tensor) -> Result<Tensor> {
        let (b, n, dim) = patches.dims3()?;
        let (gh, gw) = self.cfg.grid;
        if n != gh * gw {
            return Err(SegError::Invalid(format!(
                "{n} patch tokens for a {gh}x{gw} grid"
            )));
        }
        let n_layers = self.cfg.n_layer_inputs();
        let d = self.cfg.feature_dim;
        if dim != n_layers * d {
            return Err(SegError::Invalid(format!(
                "patch features of width {dim} for {n_layers} layer(s) of width {d}"
            )));
        }
        let layer = |i: usize| patches.narrow(2, i * d, d);
        let w = self.cfg.width;
        // Patch tokens are row-major over the grid, so [B, N, w] is already [B, gh, gw, w].
        let x = self
            .reduce
            .forward(&layer(n_layers - 1)?)?
            .reshape((b, gh, gw, w))?;
        let film = self.film.forward(text)?;
        let gamma = film.narrow(1, 0, w)?.reshape((b, 1, 1, w))?;
        let beta = film.narrow(1, w, w)?.reshape((b, 1, 1, w))?;
        let mut x = x.broadcast_mul(&(gamma + 1.0)?)?.broadcast_add(&beta)?;
        x = self.grid_conv.forward(&x)?.relu()?;
        for (i, (reduce, conv)) in self.skips.iter().enumerate() {
            let r = reduce
                .forward(&layer(n_layers - 2 - i)?)?
                .reshape((b, gh, gw, w))?;
            x = conv.forward(&(x + r)?)?.relu()?;
        }
        let s = self.cfg.image_size;
        // One channel: [B, 1, S, S] and [B, S, S, 1] hold the same values in the same order.
        let grey = if self.cfg.grey_standardise {
            let flat = grey.reshape((b, s * s))?;
            let centred = flat.broadcast_sub(&flat.mean_keepdim(1)?)?;
            let std = (centred.sqr()?.mean_keepdim(1)? + 1e-6)?.sqrt()?;
            centred.broadcast_div(&std)?.reshape((b, s, s, 1))?
        } else {
            grey.reshape((b, s, s, 1))?
        };
        // Pixel encoder features, finest first: [B, S / 2^k, S / 2^k, pw].
        let mut pixel = Vec::with_capacity(self.pixel_levels.len());
        for (k, level) in self.pixel_levels.iter().enumerate() {
            let input = if k == 0 {
                grey.clone()
            } else {
                avgpool2_nhwc(&pixel[k - 1])?
            };
            pixel.push(level.forward(&input)?);
        }
        let n_up = self.up_convs.len();
        for (i, conv) in self.up_convs.iter().enumerate() {
            let up = upsample2_nhwc(&x)?;
            // The i-th upsampling reaches S / 2^(n_up - 1 - i), the encoder's level there.
            let up = match pixel.get(n_up - 1 - i) {
                Some(p) => Tensor::cat(&[&up, p], 3)?,
                None => up,
            };
            x = conv.forward(&up)?.relu()?;
        }
        let x = Tensor::cat(&[&x, &grey], 3)?;
        let x = self.pixel_conv.forward(&x)?.relu()?;
        Ok(self.out.forward(&x)?.reshape((b, 1, s, s))?)
    }
}

/// One training or evaluation sample: a frozen image's patch tokens, a prompt's text
/// embedding and the target mask (all zeros when the prompted finding is absent).
#[derive(Debug, Clone)]
pub struct SegSample {
    /// Patch tokens `[N, D]` (`[N, L * D]` for `L` layers, see [`TextSegHead::forward`]).
    pub patches: Tensor,
    /// Text embedding `[E]` (L2-normalised).
    pub text: Tensor,
    /// Grey input `[1, S, S]` in `[0, 1]`.
    pub grey: Tensor,
    /// Target `[1, S, S]` of 0/1.
    pub mask: Tensor,
}

fn stack(samples: &[&SegSample]) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let p: Vec<&Tensor> = samples.iter().map(|s| &s.patches).collect();
    let t: Vec<&Tensor> = samples.iter().map(|s| &s.text).collect();
    let g: Vec<&Tensor> = samples.iter().map(|s| &s.grey).collect();
    let m: Vec<&Tensor> = samples.iter().map(|s| &s.mask).collect();
    Ok((
        Tensor::stack(&p, 0)?,
        Tensor::stack(&t, 0)?,
        Tensor::stack(&g, 0)?,
        Tensor::stack(&m, 0)?,
    ))
}

/// Re-draws every parameter from a seeded generator (candle's initialisers use the thread's
/// RNG, which the CPU device cannot seed): weights Kaiming-normal `N(0, 2 / fan_in)` as
/// candle's default, biases zero. Parameters are visited in name order, so a seed gives the
/// same head on every run.
fn seeded_init(params: &[NamedVar], seed: u64) -> Result<()> {
    Ok(init::seeded_init(
        params,
        seed,
        0x5e9_4ead,
        |name, dims| {
            if name.ends_with("bias") {
                Init::Zeros
            } else {
                Init::Normal {
                    std: init::kaiming_std(dims),
                }
            }
        },
    )?)
}

/// A trained head with its parameters.
pub struct TrainedSegHead {
    /// The head.
    pub head: TextSegHead,
    /// Its parameters (save with `varmap.save`).
    pub varmap: VarMap,
    /// Loss of each step.
    pub losses: Vec<f32>,
}

/// Trains a head on `samples` with AdamW (the engine's, [`medvlm_train::optim::AdamW`]).
pub fn train_head(
    cfg: &SegHeadConfig,
    samples: &[SegSample],
    device: &Device,
) -> Result<TrainedSegHead> {
    train_head_with(cfg, samples, None, device)
}

/// The image tower trained with the head (VLSM-Adapter's setting, Dhakal et al., MICCAI 2024:
/// adapters in a frozen VLM's image tower trained with the decoder): its trainable
/// parameters (e.g. LoRA's, [`medvlm_train::lora::apply_lora`]) and how to compute a batch's
/// patch tokens through it.
pub struct TunedTower<'a> {
    /// The tower's trainable parameters; they join the head's in one AdamW.
    pub params: Vec<NamedVar>,
    /// Patch tokens `[B, N, D]` (as [`SegSample::patches`]) of the samples at these indices,
    /// computed through the tower so that the loss reaches `params`.
    pub encode: &'a dyn Fn(&[usize]) -> Result<Tensor>,
}

/// [`train_head`], optionally training part of the image tower with the head: with `tower`,
/// each batch's patch tokens come from [`TunedTower::encode`] instead of the samples' frozen
/// [`SegSample::patches`], and the tower's parameters are updated with the head's (same
/// learning rate and weight decay).
pub fn train_head_with(
    cfg: &SegHeadConfig,
    samples: &[SegSample],
    tower: Option<&TunedTower>,
    device: &Device,
) -> Result<TrainedSegHead> {
    if samples.is_empty() {
        return Err(SegError::Invalid("no training samples".into()));
    }
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let head = TextSegHead::new(vb, cfg)?;
    let mut params = medvlm_train::optim::varmap_params(&varmap);
    seeded_init(&params, cfg.seed)?;
    // The tower's parameters join the head's AdamW, or get their own at `tower_lr`.
    let mut tower_opt = None;
    if let Some(t) = tower {
        match cfg.tower_lr {
            None => params.extend(t.params.iter().cloned()),
            Some(lr) => {
                tower_opt = Some((
                    t.params.clone(),
                    adamw(t.params.clone(), cfg.weight_decay)?,
                    lr,
                ))
            }
        }
    }
    let mut opt = adamw(params.clone(), cfg.weight_decay)?;
    let mut sampler = ShuffledEpochs::new(samples.len(), cfg.seed);
    let mut losses = Vec::with_capacity(cfg.steps);
    for _ in 0..cfg.steps {
        let idx = sampler.batch(cfg.batch);
        let batch: Vec<&SegSample> = idx.iter().map(|&i| &samples[i]).collect();
        let (frozen, t, g, m) = stack(&batch)?;
        let p = match tower {
            Some(tw) => (tw.encode)(&idx)?,
            None => frozen,
        };
        let logits = head.forward(&p, &t, &g)?;
        let loss = (bce_with_logits(&logits, &m)? + soft_dice_loss(&logits, &m, 1e-5)?)?;
        let store = loss.backward()?;
        opt.step(&Gradients::from_grad_store(&store, &params), cfg.lr)?;
        if let Some((tower_params, tower_adamw, lr)) = tower_opt.as_mut() {
            tower_adamw.step(&Gradients::from_grad_store(&store, tower_params), *lr)?;
        }
        losses.push(loss.to_scalar::<f32>()?);
    }
    Ok(TrainedSegHead {
        head,
        varmap,
        losses,
    })
}

/// Predicted probabilities `[1, S, S]` (the sigmoid of the head's logits) for samples (their
/// targets are not used).
pub fn predict_probabilities(head: &TextSegHead, samples: &[SegSample]) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(samples.len());
    for chunk in samples.chunks(32) {
        let refs: Vec<&SegSample> = chunk.iter().collect();
        let (p, t, g, _) = stack(&refs)?;
        let prob = candle_nn::ops::sigmoid(&head.forward(&p, &t, &g)?)?;
        for i in 0..chunk.len() {
            out.push(prob.get(i)?);
        }
    }
    Ok(out)
}

/// Predicted masks `[1, S, S]` of 0/1 (f32) for samples: the probabilities of
/// [`predict_probabilities`] at the head's threshold.
pub fn predict_masks(head: &TextSegHead, samples: &[SegSample]) -> Result<Vec<Tensor>> {
    let thr = head.config().threshold as f64;
    predict_probabilities(head, samples)?
        .into_iter()
        .map(|p| Ok(p.ge(thr)?.to_dtype(DType::F32)?))
        .collect()
}

/// The patch-text similarity baseline without training (MaskCLIP's idea, Zhou et al., ECCV
/// 2022): the cosine of each patch token with the text embedding (both already in the joint
/// space), upsampled to the input size and thresholded at `threshold`. Only meaningful for
/// towers whose patch tokens are projected into the text space.
pub fn similarity_masks(
    projected_patches: &Tensor,
    text: &Tensor,
    grid: (usize, usize),
    image_size: usize,
    threshold: f32,
) -> Result<Tensor> {
    let (b, n, _) = projected_patches.dims3()?;
    if n != grid.0 * grid.1 {
        return Err(SegError::Invalid(format!(
            "{n} patch tokens for a {}x{} grid",
            grid.0, grid.1
        )));
    }
    let norm = |t: &Tensor| -> candle_core::Result<Tensor> {
        t.broadcast_div(&t.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
    };
    let sim = norm(projected_patches)?
        .matmul(&norm(text)?.unsqueeze(2)?)?
        .reshape((b, 1, grid.0, grid.1))?;
    let up = sim.upsample_nearest2d(image_size, image_size)?;
    Ok(up.ge(threshold as f64)?.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod grey_tests {
    use super::*;

    fn head(standardise: bool) -> (TextSegHead, VarMap) {
        let mut cfg = SegHeadConfig::new(8, 4, (4, 4), 16);
        cfg.grey_standardise = standardise;
        let varmap = VarMap::new();
        let head = TextSegHead::new(
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
            &cfg,
        )
        .unwrap();
        seeded_init(&medvlm_train::optim::varmap_params(&varmap), 5).unwrap();
        (head, varmap)
    }

    /// With `grey_standardise` the head sees only where an image is brighter or darker than
    /// itself: a grey input and its affine copy (`0.4 g + 0.3`, a darker, flatter site) give
    /// the same logits; without it they differ. A card without the field reads `false`.
    #[test]
    fn standardised_grey_input_ignores_brightness_and_contrast() {
        let dev = Device::Cpu;
        let patches = Tensor::randn(0f32, 1.0, (2, 16, 8), &dev).unwrap();
        let text = Tensor::randn(0f32, 1.0, (2, 4), &dev).unwrap();
        let grey = Tensor::rand(0f32, 1.0, (2, 1, 16, 16), &dev).unwrap();
        let site = ((&grey * 0.4).unwrap() + 0.3).unwrap();
        let diff = |h: &TextSegHead| -> f32 {
            let a = h.forward(&patches, &text, &grey).unwrap();
            let b = h.forward(&patches, &text, &site).unwrap();
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let (on, _) = head(true);
        assert!(diff(&on) < 1e-3, "{}", diff(&on));
        let (off, _) = head(false);
        assert!(diff(&off) > 1e-2, "{}", diff(&off));
        let mut card = serde_json::to_value(on.config()).unwrap();
        assert_eq!(card["grey_standardise"], true);
        card.as_object_mut().unwrap().remove("grey_standardise");
        let old: SegHeadConfig = serde_json::from_value(card).unwrap();
        assert!(!old.grey_standardise);
    }
}
