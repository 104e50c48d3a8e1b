//! Single-image super-resolution of grey images: an EDSR-style residual network (Lim et al.,
//! "Enhanced Deep Residual Networks for Single Image Super-Resolution", CVPRW 2017; SwinIR,
//! Liang et al., ICCVW 2021, is the transformer successor, not implemented here) and the
//! bicubic resampling it is measured against.
//!
//! # Model ([`SrNet`])
//!
//! On the low-resolution input `x` (one channel, values in `[0, 1]`, shifted by -0.5): a head
//! 3x3 convolution to `features` channels; `blocks` residual blocks without batch norm
//! (`r <- r + res_scale * conv(relu(conv(r)))`, EDSR's block); a body 3x3 convolution and the
//! global skip from the head's output; upsampling by pixel shuffle (a 3x3 convolution to
//! `4 * features` channels then [`pixel_shuffle_nhwc`] by 2, once for x2 and twice for x4,
//! EDSR's upsampler); a tail 3x3 convolution to one channel. **The network predicts a
//! residual over the bicubic upsampling of its input** (VDSR's global residual, Kim et al.,
//! CVPR 2016, here added to EDSR): `output = bicubic(x) + net(x)`. The tail is initialised
//! to zero, so an untrained network returns the bicubic image exactly and training starts
//! from the baseline.
//!
//! **Text conditioning** (optional, `text_dim > 0`): after each residual block the body
//! features are modulated by FiLM from the report's L2-normalised text embedding `t`
//! (per-channel `r (1 + γ_i(t)) + β_i(t)`, one linear map per block;
//! [`crate::text_condition::Film`]). The FiLM maps start at zero, so the conditioned network
//! starts exactly as the unconditioned one of the same seed and the text's effect is learned.
//!
//! Convolutions are channels-last and run on `medvlm_models::conv::conv2d` (im2col + gemm
//! with its own backward, much faster than candle's CPU convolution backward).
//!
//! # Bicubic ([`bicubic_resize`])
//!
//! MATLAB's `imresize` (what BasicSR's `imresize` reimplements and what EDSR/SwinIR's
//! low-resolution sets were made with): Keys' cubic convolution with `a = -0.5`, pixel
//! centres aligned (`u = x / s + 0.5 (1 - 1 / s)`), the kernel widened by `1 / s` when
//! downscaling (antialiasing), weights normalised to sum to one, and out-of-range taps
//! mirrored (symmetric padding). Our own code, not the `image` crate's CatmullRom filter.
//!
//! # Training ([`train_sr`])
//!
//! L1 loss (EDSR) on random aligned crops of `patch` high-resolution pixels (whole images
//! when smaller), with the 8 flips/rotations as augmentation (EDSR), Adam (the engine's
//! [`medvlm_train::optim::AdamW`] with weight decay 0, betas 0.9/0.999, eps 1e-8) and a
//! cosine learning-rate decay to 0 after a short warm-up
//! ([`medvlm_train::schedule::WarmupCosine`]).
//!
//! Defaults ([`SrConfig::default`]): scale 2, 32 features, 4 residual blocks, residual
//! scaling 1.0 (EDSR-baseline; EDSR uses 0.1 only for its 256-wide model), patch 32 px,
//! 1500 steps of batch 16, learning rate 5e-4, 50 warm-up steps, seed 0, no text
//! conditioning (`text_dim` 0).

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use medvlm_train::init::{self, Init};
use medvlm_train::minibatch::adamw;
use medvlm_train::optim::{Gradients, NamedVar};
use medvlm_train::schedule::WarmupCosine;

use crate::text_condition::{check_text_input, Channels, Film};

/// Errors of the super-resolution model.
#[derive(Debug, thiserror::Error)]
pub enum SrError {
    /// Tensor error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Optimiser error.
    #[error(transparent)]
    Optim(#[from] medvlm_train::optim::OptimError),
    /// Inputs or settings that cannot work (the message says which).
    #[error("{0}")]
    Invalid(String),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, SrError>;

/// Smallest low-resolution side accepted (so that the SSIM window still fits after the
/// border crop at x4).
pub const MIN_LR_SIDE: usize = 8;

/// Shape and training settings of the network; defaults in the module doc.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SrConfig {
    /// Upscaling factor: 2 or 4.
    pub scale: usize,
    /// Channels of the residual body.
    pub features: usize,
    /// Residual blocks.
    pub blocks: usize,
    /// Residual scaling of each block's branch.
    pub res_scale: f64,
    /// Side of the square high-resolution training crop (a multiple of `scale`).
    pub patch: usize,
    /// Optimiser steps.
    pub steps: usize,
    /// Crops per step.
    pub batch: usize,
    /// Peak Adam learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup_steps: usize,
    /// Seed of the initialisation, crops and augmentation.
    pub seed: u64,
    /// Width of the text embedding that conditions the body by FiLM (0 = unconditioned;
    /// see the module doc).
    pub text_dim: usize,
}

impl Default for SrConfig {
    fn default() -> Self {
        Self {
            scale: 2,
            features: 32,
            blocks: 4,
            res_scale: 1.0,
            patch: 32,
            steps: 1500,
            batch: 16,
            lr: 5e-4,
            warmup_steps: 50,
            seed: 0,
            text_dim: 0,
        }
    }
}

impl SrConfig {
    /// Checks the settings; the error says which one is wrong.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(SrError::Invalid(m));
        if self.scale != 2 && self.scale != 4 {
            return bad(format!(
                "scale {} is not supported (x2 or x4 only)",
                self.scale
            ));
        }
        if self.features == 0 {
            return bad("features must be at least 1".into());
        }
        if self.patch == 0 || !self.patch.is_multiple_of(self.scale) || self.patch / self.scale < 2
        {
            return bad(format!(
                "patch {} must be a multiple of the scale {} of at least {}",
                self.patch,
                self.scale,
                2 * self.scale
            ));
        }
        if self.batch == 0 {
            return bad("batch must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("learning rate {} must be positive", self.lr));
        }
        if !self.res_scale.is_finite() {
            return bad("res_scale must be finite".into());
        }
        Ok(())
    }

    /// Number of x2 pixel-shuffle stages.
    pub fn stages(&self) -> usize {
        self.scale.trailing_zeros() as usize
    }
}

// ---------------------------------------------------------------------------------------
// Bicubic resampling (MATLAB imresize)
// ---------------------------------------------------------------------------------------

/// Keys' cubic kernel with `a = -0.5`.
fn cubic(x: f64) -> f64 {
    let ax = x.abs();
    if ax <= 1.0 {
        1.5 * ax * ax * ax - 2.5 * ax * ax + 1.0
    } else if ax < 2.0 {
        -0.5 * ax * ax * ax + 2.5 * ax * ax - 4.0 * ax + 2.0
    } else {
        0.0
    }
}

/// Per output index, its input taps `(index, weight)` (0-based), MATLAB's `contributions`.
fn contributions(in_len: usize, out_len: usize) -> Vec<Vec<(usize, f32)>> {
    let scale = out_len as f64 / in_len as f64;
    let antialias = scale < 1.0;
    let width = if antialias { 4.0 / scale } else { 4.0 };
    let taps = width.ceil() as i64 + 2;
    let period = 2 * in_len as i64;
    (1..=out_len)
        .map(|x| {
            let u = x as f64 / scale + 0.5 * (1.0 - 1.0 / scale);
            let left = (u - width / 2.0).floor() as i64;
            let mut w: Vec<(i64, f64)> = (0..taps)
                .map(|k| {
                    let idx = left + k;
                    let d = u - idx as f64;
                    let v = if antialias {
                        scale * cubic(scale * d)
                    } else {
                        cubic(d)
                    };
                    (idx, v)
                })
                .collect();
            let sum: f64 = w.iter().map(|p| p.1).sum();
            w.retain(|p| p.1 != 0.0);
            w.iter()
                .map(|&(idx, v)| {
                    // Symmetric padding: 1..n, n..1, repeated (1-based).
                    let m = (idx - 1).rem_euclid(period);
                    let i0 = if m < in_len as i64 { m } else { period - 1 - m };
                    (i0 as usize, (v / sum) as f32)
                })
                .collect()
        })
        .collect()
}

/// Bicubic resize of a row-major `rows x cols` single-channel image to `out_rows x out_cols`
/// (MATLAB `imresize` semantics, see the module doc). Values are not clipped.
pub fn bicubic_resize(
    data: &[f32],
    rows: usize,
    cols: usize,
    out_rows: usize,
    out_cols: usize,
) -> Result<Vec<f32>> {
    if data.len() != rows * cols || rows == 0 || cols == 0 || out_rows == 0 || out_cols == 0 {
        return Err(SrError::Invalid(format!(
            "cannot resize {} values as a {rows}x{cols} image to {out_rows}x{out_cols}",
            data.len()
        )));
    }
    let cw = contributions(cols, out_cols);
    let mut tmp = vec![0.0f32; rows * out_cols];
    for y in 0..rows {
        let src = &data[y * cols..(y + 1) * cols];
        for (x, taps) in cw.iter().enumerate() {
            tmp[y * out_cols + x] = taps.iter().map(|&(i, w)| w * src[i]).sum();
        }
    }
    let rw = contributions(rows, out_rows);
    let mut out = vec![0.0f32; out_rows * out_cols];
    for (y, taps) in rw.iter().enumerate() {
        for x in 0..out_cols {
            out[y * out_cols + x] = taps.iter().map(|&(i, w)| w * tmp[i * out_cols + x]).sum();
        }
    }
    Ok(out)
}

/// Rounds `[0, 1]` values to the 8-bit grid (as a saved PNG would hold them), clipping.
pub fn quantise_u8(values: &mut [f32]) {
    for v in values {
        *v = (v.clamp(0.0, 1.0) * 255.0).round() / 255.0;
    }
}

// ---------------------------------------------------------------------------------------
// Network
// ---------------------------------------------------------------------------------------

/// Pixel shuffle of a channels-last tensor: `[B, h, w, C r^2]` -> `[B, h r, w r, C]`, with
/// PyTorch's channel order (input channel `c r^2 + i r + j` goes to output pixel
/// `(y r + i, x r + j)`, channel `c`), so weights match `nn.PixelShuffle` after the NCHW/NHWC
/// transpose.
pub fn pixel_shuffle_nhwc(x: &Tensor, r: usize) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    if r == 0 || c % (r * r) != 0 {
        return Err(SrError::Invalid(format!(
            "pixel shuffle by {r} needs a multiple of {} channels, got {c}",
            r * r
        )));
    }
    let oc = c / (r * r);
    Ok(x.reshape((b, h, w, oc, r, r))?
        .permute((0, 1, 4, 2, 5, 3))?
        .contiguous()?
        .reshape((b, h * r, w * r, oc))?)
}

/// A 3x3 convolution (padding 1) with bias, channels-last, weight in PyTorch's layout.
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

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        medvlm_models::conv::conv2d(x, &self.weight, 1, 1)?.broadcast_add(&self.bias)
    }
}

/// The EDSR-style network (see the module doc).
pub struct SrNet {
    cfg: SrConfig,
    head: Conv3,
    blocks: Vec<(Conv3, Conv3)>,
    films: Vec<Film>,
    body_tail: Conv3,
    ups: Vec<Conv3>,
    tail: Conv3,
}

impl SrNet {
    /// A network with its parameters in `vb` (candle's default initialisation; training
    /// re-draws them from the seed, see [`train_sr`]); with `text_dim > 0` one FiLM map per
    /// residual block (`film.i`).
    pub fn new(vb: VarBuilder, cfg: &SrConfig) -> Result<Self> {
        cfg.validate()?;
        let f = cfg.features;
        let blocks = (0..cfg.blocks)
            .map(|i| {
                Ok((
                    Conv3::new(vb.pp(format!("body.{i}.conv1")), f, f)?,
                    Conv3::new(vb.pp(format!("body.{i}.conv2")), f, f)?,
                ))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let films = if cfg.text_dim > 0 {
            (0..cfg.blocks)
                .map(|i| Film::new(vb.pp(format!("film.{i}")), cfg.text_dim, f))
                .collect::<candle_core::Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let ups = (0..cfg.stages())
            .map(|i| Conv3::new(vb.pp(format!("up.{i}")), f, 4 * f))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            head: Conv3::new(vb.pp("head"), 1, f)?,
            blocks,
            films,
            body_tail: Conv3::new(vb.pp("body_tail"), f, f)?,
            ups,
            tail: Conv3::new(vb.pp("tail"), f, 1)?,
        })
    }

    /// The settings.
    pub fn config(&self) -> &SrConfig {
        &self.cfg
    }

    /// Super-resolved images `[B, H, W, 1]` from low-resolution ones `[B, h, w, 1]` (values
    /// in `[0, 1]`) and their bicubic upsampling `[B, H, W, 1]` (`H = s h`, `W = s w`),
    /// conditioned on text embeddings `[B, text_dim]` when the network has `text_dim > 0`
    /// (then required; refused otherwise).
    pub fn forward(&self, lr: &Tensor, bicubic: &Tensor, text: Option<&Tensor>) -> Result<Tensor> {
        let (b, h, w, c) = lr.dims4()?;
        let s = self.cfg.scale;
        if c != 1 || bicubic.dims() != [b, h * s, w * s, 1] {
            return Err(SrError::Invalid(format!(
                "inputs {:?} and {:?} are not a [B, h, w, 1] image and its x{s} bicubic upsampling",
                lr.dims(),
                bicubic.dims()
            )));
        }
        check_text_input(self.cfg.text_dim, text, b, "super-resolution network")
            .map_err(|e| SrError::Invalid(e.to_string()))?;
        let f0 = self.head.forward(&(lr - 0.5)?)?;
        let mut r = f0.clone();
        for (i, (c1, c2)) in self.blocks.iter().enumerate() {
            let branch = c2.forward(&c1.forward(&r)?.relu()?)?;
            r = (r + branch.affine(self.cfg.res_scale, 0.0)?)?;
            if let (Some(film), Some(t)) = (self.films.get(i), text) {
                r = film
                    .modulate(&r, t, Channels::Last)
                    .map_err(|e| SrError::Invalid(e.to_string()))?;
            }
        }
        let mut x = (self.body_tail.forward(&r)? + f0)?;
        for up in &self.ups {
            x = pixel_shuffle_nhwc(&up.forward(&x)?, 2)?;
        }
        Ok((self.tail.forward(&x)? + bicubic)?)
    }
}

/// Mean absolute error (EDSR's loss).
pub fn l1_loss(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    if pred.dims() != target.dims() {
        return Err(SrError::Invalid(format!(
            "L1 loss of {:?} against {:?}",
            pred.dims(),
            target.dims()
        )));
    }
    Ok((pred - target)?.abs()?.mean_all()?)
}

// ---------------------------------------------------------------------------------------
// Samples and training
// ---------------------------------------------------------------------------------------

/// A training or evaluation pair: the high-resolution image, its low-resolution version and
/// the bicubic upsampling of that, all row-major single-channel in `[0, 1]`.
#[derive(Debug, Clone)]
pub struct SrPair {
    /// High-resolution rows.
    pub rows: usize,
    /// High-resolution columns.
    pub cols: usize,
    /// Upscaling factor.
    pub scale: usize,
    /// `rows x cols` ground truth.
    pub hr: Vec<f32>,
    /// `rows / scale x cols / scale` input.
    pub lr: Vec<f32>,
    /// `rows x cols` bicubic upsampling of `lr`.
    pub bicubic: Vec<f32>,
    /// The text embedding that conditions a text-conditioned network on this image (its
    /// report's); `None` for an unconditioned one.
    pub text: Option<Vec<f32>>,
}

impl SrPair {
    /// The pair of a high-resolution image under the bicubic degradation: `lr` is the
    /// antialiased bicubic downsampling by `scale`, rounded to 8 bits (as BasicSR's saved
    /// low-resolution PNGs). Errors when `scale` does not divide the size or the
    /// low-resolution image would be smaller than [`MIN_LR_SIDE`].
    pub fn from_hr(hr: Vec<f32>, rows: usize, cols: usize, scale: usize) -> Result<Self> {
        check_hr_size(rows, cols, scale)?;
        if hr.len() != rows * cols {
            return Err(SrError::Invalid(format!(
                "{} values for a {rows}x{cols} image",
                hr.len()
            )));
        }
        let mut lr = bicubic_resize(&hr, rows, cols, rows / scale, cols / scale)?;
        quantise_u8(&mut lr);
        let bicubic = bicubic_resize(&lr, rows / scale, cols / scale, rows, cols)?;
        Ok(Self {
            rows,
            cols,
            scale,
            hr,
            lr,
            bicubic,
            text: None,
        })
    }
}

/// Checks that a `rows x cols` high-resolution image can be used at `scale`.
pub fn check_hr_size(rows: usize, cols: usize, scale: usize) -> Result<()> {
    if scale != 2 && scale != 4 {
        return Err(SrError::Invalid(format!(
            "scale {scale} is not supported (x2 or x4 only)"
        )));
    }
    if !rows.is_multiple_of(scale) || !cols.is_multiple_of(scale) {
        return Err(SrError::Invalid(format!(
            "the scale {scale} does not divide the image size {rows}x{cols}"
        )));
    }
    if rows / scale < MIN_LR_SIDE || cols / scale < MIN_LR_SIDE {
        return Err(SrError::Invalid(format!(
            "a {rows}x{cols} image is too small for x{scale} (at least {} px per side)",
            MIN_LR_SIDE * scale
        )));
    }
    Ok(())
}

/// Re-draws every parameter from a seeded generator (candle's initialisers use the thread's
/// RNG): weights Kaiming-normal `N(0, 2 / fan_in)`, biases zero, the tail convolution zero
/// (so the untrained network is the bicubic baseline), the FiLM maps zero (so the conditioned
/// network starts as the plain one; no draw is spent on them, so the other parameters equal
/// the plain network's of the same seed). Parameters are visited in name order.
fn seeded_init(params: &[NamedVar], seed: u64) -> Result<()> {
    Ok(init::seeded_init(params, seed, 0x5e_ed5a, |name, dims| {
        if name.ends_with("bias") || name.starts_with("tail.") || name.starts_with("film.") {
            Init::Zeros
        } else {
            Init::Normal {
                std: init::kaiming_std(dims),
            }
        }
    })?)
}

/// One of the 8 flips/rotations of a square `n x n` image (`k` in `0..8`: bit 0 flips
/// columns, bit 1 flips rows, bit 2 transposes).
fn dihedral(src: &[f32], n: usize, k: u8) -> Vec<f32> {
    let mut out = vec![0.0; n * n];
    for y in 0..n {
        for x in 0..n {
            let (mut sy, mut sx) = (y, x);
            if k & 4 != 0 {
                std::mem::swap(&mut sy, &mut sx);
            }
            if k & 2 != 0 {
                sy = n - 1 - sy;
            }
            if k & 1 != 0 {
                sx = n - 1 - sx;
            }
            out[y * n + x] = src[sy * n + sx];
        }
    }
    out
}

fn crop(src: &[f32], cols: usize, y0: usize, x0: usize, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * n);
    for y in y0..y0 + n {
        out.extend_from_slice(&src[y * cols + x0..y * cols + x0 + n]);
    }
    out
}

/// A trained network with its parameters.
pub struct TrainedSr {
    /// The network.
    pub net: SrNet,
    /// Its parameters.
    pub varmap: VarMap,
    /// Loss of each step.
    pub losses: Vec<f32>,
}

/// Trains a network on `pairs` (all at `cfg.scale`; with `cfg.text_dim > 0` each pair
/// carries its `text_dim`-wide text embedding, which conditions its crops); `progress(step,
/// loss)` is called after each step.
pub fn train_sr(
    cfg: &SrConfig,
    pairs: &[SrPair],
    device: &Device,
    progress: &mut dyn FnMut(usize, f32),
) -> Result<TrainedSr> {
    cfg.validate()?;
    if pairs.is_empty() {
        return Err(SrError::Invalid("no training images".into()));
    }
    if let Some(p) = pairs.iter().find(|p| p.scale != cfg.scale) {
        return Err(SrError::Invalid(format!(
            "a x{} training pair for a x{} network",
            p.scale, cfg.scale
        )));
    }
    // Text exactly when conditioned, of the network's width: nothing is dropped silently.
    if let Some((i, p)) = pairs
        .iter()
        .enumerate()
        .find(|(_, p)| p.text.as_ref().map_or(0, Vec::len) != cfg.text_dim)
    {
        return Err(SrError::Invalid(match (&p.text, cfg.text_dim) {
            (Some(_), 0) => format!(
                "training pair {i} has a text embedding but the network is not text-conditioned"
            ),
            (None, d) => format!(
                "training pair {i} has no text embedding for a network conditioned on {d}-wide text"
            ),
            (Some(t), d) => format!(
                "training pair {i} has a {}-wide text embedding; the network reads {d}",
                t.len()
            ),
        }));
    }
    let s = cfg.scale;
    // Square crops: the patch, or the largest multiple of the scale that fits every image.
    let min_side = pairs.iter().map(|p| p.rows.min(p.cols)).min().unwrap_or(0);
    let patch = cfg.patch.min(min_side / s * s);
    let lp = patch / s;
    let varmap = VarMap::new();
    let net = SrNet::new(VarBuilder::from_varmap(&varmap, DType::F32, device), cfg)?;
    let params = medvlm_train::optim::varmap_params(&varmap);
    seeded_init(&params, cfg.seed)?;
    let mut opt = adamw(params.clone(), 0.0)?;
    let schedule = WarmupCosine {
        base_lr: cfg.lr,
        warmup_steps: cfg.warmup_steps.min(cfg.steps) as u64,
        total_steps: cfg.steps as u64,
        min_lr: 0.0,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut losses = Vec::with_capacity(cfg.steps);
    for step in 0..cfg.steps {
        let (mut lr_b, mut bic_b, mut hr_b) = (Vec::new(), Vec::new(), Vec::new());
        let mut text_b = Vec::new();
        for _ in 0..cfg.batch {
            let p = &pairs[rng.random_range(0..pairs.len())];
            if let Some(t) = &p.text {
                text_b.extend_from_slice(t);
            }
            let ly = rng.random_range(0..=p.rows / s - lp);
            let lx = rng.random_range(0..=p.cols / s - lp);
            let k: u8 = rng.random_range(0..8);
            lr_b.extend(dihedral(&crop(&p.lr, p.cols / s, ly, lx, lp), lp, k));
            bic_b.extend(dihedral(
                &crop(&p.bicubic, p.cols, ly * s, lx * s, patch),
                patch,
                k,
            ));
            hr_b.extend(dihedral(
                &crop(&p.hr, p.cols, ly * s, lx * s, patch),
                patch,
                k,
            ));
        }
        let b = cfg.batch;
        let lr_t = Tensor::from_vec(lr_b, (b, lp, lp, 1), device)?;
        let bic_t = Tensor::from_vec(bic_b, (b, patch, patch, 1), device)?;
        let hr_t = Tensor::from_vec(hr_b, (b, patch, patch, 1), device)?;
        let text_t = (cfg.text_dim > 0)
            .then(|| Tensor::from_vec(text_b, (b, cfg.text_dim), device))
            .transpose()?;
        let loss = l1_loss(&net.forward(&lr_t, &bic_t, text_t.as_ref())?, &hr_t)?;
        let grads = Gradients::from_grad_store(&loss.backward()?, &params);
        opt.step(&grads, schedule.lr(step as u64))?;
        let l = loss.to_scalar::<f32>()?;
        if !l.is_finite() {
            return Err(SrError::Invalid(format!(
                "the loss became {l} at step {step}; lower the learning rate"
            )));
        }
        losses.push(l);
        progress(step, l);
    }
    Ok(TrainedSr {
        net,
        varmap,
        losses,
    })
}

/// Super-resolves one low-resolution image (row-major `rows x cols`, `[0, 1]`) with an
/// unconditioned `net`: returns the `s rows x s cols` output clipped to `[0, 1]` (not
/// quantised).
pub fn upscale(net: &SrNet, lr: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>> {
    upscale_conditioned(net, lr, rows, cols, None)
}

/// [`upscale`] with the text embedding `text` (`text_dim` wide) that a text-conditioned
/// network needs (and an unconditioned one refuses).
pub fn upscale_conditioned(
    net: &SrNet,
    lr: &[f32],
    rows: usize,
    cols: usize,
    text: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let s = net.config().scale;
    if rows < MIN_LR_SIDE || cols < MIN_LR_SIDE {
        return Err(SrError::Invalid(format!(
            "a {rows}x{cols} input is too small (at least {MIN_LR_SIDE} px per side)"
        )));
    }
    let bic = bicubic_resize(lr, rows, cols, rows * s, cols * s)?;
    let device = net.head.weight.device().clone();
    let lr_t = Tensor::from_slice(lr, (1, rows, cols, 1), &device)?;
    let bic_t = Tensor::from_vec(bic, (1, rows * s, cols * s, 1), &device)?;
    let text_t = text
        .map(|t| Tensor::from_slice(t, (1, t.len()), &device))
        .transpose()?;
    let out = net
        .forward(&lr_t, &bic_t, text_t.as_ref())?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(out.into_iter().map(|v| v.clamp(0.0, 1.0)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn pixel_shuffle_known_answer_and_pytorch_order() {
        let dev = Device::Cpu;
        // One pixel, 4 channels [0, 1, 2, 3] -> a 2x2 image [[0, 1], [2, 3]].
        let x = Tensor::from_vec(vec![0f32, 1., 2., 3.], (1, 1, 1, 4), &dev).unwrap();
        let y = pixel_shuffle_nhwc(&x, 2).unwrap();
        assert_eq!(y.dims(), &[1, 2, 2, 1]);
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0., 1., 2., 3.]
        );
        // Two output channels on a 2x3 grid against candle's NCHW pixel_shuffle (PyTorch's
        // semantics) after the layout transposes.
        let v: Vec<f32> = (0..2 * 3 * 8).map(|i| i as f32).collect();
        let x = Tensor::from_vec(v, (1, 2, 3, 8), &dev).unwrap();
        let ours = pixel_shuffle_nhwc(&x, 2).unwrap();
        let nchw = x.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap();
        let theirs = candle_nn::ops::pixel_shuffle(&nchw, 2)
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap()
            .contiguous()
            .unwrap();
        assert_eq!(ours.dims(), &[1, 4, 6, 2]);
        assert_eq!(
            ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        // Input channel c*4 + i*2 + j at pixel (y, x) lands at (2y + i, 2x + j), channel c:
        // channel 5 = c 1, i 0, j 1 of pixel (1, 2) -> (2, 5), channel 1.
        let src = (5 * 8 + 5) as f32;
        let got = ours
            .get(0)
            .unwrap()
            .get(2)
            .unwrap()
            .get(5)
            .unwrap()
            .get(1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(got, src);
        assert!(
            pixel_shuffle_nhwc(&Tensor::zeros((1, 2, 2, 6), DType::F32, &dev).unwrap(), 2).is_err()
        );
    }

    #[test]
    fn bicubic_upsampling_reproduces_a_ramp_in_the_interior() {
        // f(y, x) = 3x + 2y + 1 on a 10x12 grid; upsampled x2 the output at 0-based (Y, X)
        // samples f at input coordinates ((Y + 0.5) / 2 - 0.5, (X + 0.5) / 2 - 0.5).
        let (r, c) = (10, 12);
        let f = |y: f64, x: f64| 3.0 * x + 2.0 * y + 1.0;
        let data: Vec<f32> = (0..r * c)
            .map(|i| f((i / c) as f64, (i % c) as f64) as f32)
            .collect();
        let up = bicubic_resize(&data, r, c, 2 * r, 2 * c).unwrap();
        let mut checked = 0;
        for y in 4..2 * r - 4 {
            for x in 4..2 * c - 4 {
                let want = f((y as f64 + 0.5) / 2.0 - 0.5, (x as f64 + 0.5) / 2.0 - 0.5);
                let got = f64::from(up[y * 2 * c + x]);
                assert!((got - want).abs() < 1e-4, "({y}, {x}): {got} vs {want}");
                checked += 1;
            }
        }
        assert!(checked > 100);
        // Not a nearest or bilinear resize: a step edge overshoots (negative lobe of the
        // a = -0.5 kernel).
        let step: Vec<f32> = (0..16)
            .map(|i| if i % 16 < 8 { 0.0 } else { 1.0 })
            .collect();
        let up = bicubic_resize(&step, 1, 16, 1, 32).unwrap();
        assert!(up.iter().any(|&v| v < -0.01) && up.iter().any(|&v| v > 1.01));
        // Downsampling with antialiasing keeps a constant and averages a checkerboard.
        let checker: Vec<f32> = (0..64).map(|i| ((i / 8 + i % 8) % 2) as f32).collect();
        let down = bicubic_resize(&checker, 8, 8, 4, 4).unwrap();
        assert!(down.iter().all(|v| (v - 0.5).abs() < 0.1), "{down:?}");
        let flat = bicubic_resize(&[0.25; 64], 8, 8, 4, 4).unwrap();
        assert!(flat.iter().all(|v| (v - 0.25).abs() < 1e-6));
    }

    #[test]
    fn untrained_network_is_the_bicubic_baseline() {
        let cfg = SrConfig {
            features: 8,
            blocks: 1,
            steps: 0,
            ..SrConfig::default()
        };
        let hr: Vec<f32> = (0..32 * 32)
            .map(|i| ((i % 32) as f32 / 31.0 * 3.0).sin().abs())
            .collect();
        let pair = SrPair::from_hr(hr, 32, 32, 2).unwrap();
        let t = train_sr(
            &cfg,
            std::slice::from_ref(&pair),
            &Device::Cpu,
            &mut |_, _| {},
        )
        .unwrap();
        let out = upscale(&t.net, &pair.lr, 16, 16).unwrap();
        for (o, b) in out.iter().zip(&pair.bicubic) {
            assert!((o - b.clamp(0.0, 1.0)).abs() < 1e-6);
        }
    }

    #[test]
    fn bad_sizes_and_settings_are_refused() {
        let e = SrPair::from_hr(vec![0.0; 30 * 30], 30, 30, 4).unwrap_err();
        assert!(e.to_string().contains("does not divide"), "{e}");
        let e = SrPair::from_hr(vec![0.0; 12 * 12], 12, 12, 2).unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
        let e = SrPair::from_hr(vec![0.0; 48 * 48], 48, 48, 3).unwrap_err();
        assert!(e.to_string().contains("x2 or x4"), "{e}");
        let cfg = SrConfig {
            scale: 3,
            ..SrConfig::default()
        };
        assert!(cfg.validate().is_err());
        let cfg = SrConfig {
            patch: 30,
            scale: 4,
            ..SrConfig::default()
        };
        assert!(cfg.validate().is_err());
    }

    fn small_text_cfg(text_dim: usize, steps: usize) -> SrConfig {
        SrConfig {
            features: 8,
            blocks: 2,
            patch: 16,
            steps,
            batch: 4,
            lr: 2e-3,
            warmup_steps: 2,
            text_dim,
            ..SrConfig::default()
        }
    }

    fn texted_pairs(texts: &[Vec<f32>]) -> Vec<SrPair> {
        synthetic_images(texts.len(), 32, 5)
            .into_iter()
            .zip(texts)
            .map(|(hr, t)| {
                let mut p = SrPair::from_hr(hr, 32, 32, 2).unwrap();
                p.text = (!t.is_empty()).then(|| t.clone());
                p
            })
            .collect()
    }

    fn set_param(varmap: &VarMap, name: &str, f: impl Fn(usize) -> f32) {
        let (_, var) = medvlm_train::optim::varmap_params(varmap)
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap();
        let t = var.as_tensor();
        let v: Vec<f32> = (0..t.elem_count()).map(f).collect();
        var.set(&Tensor::from_vec(v, t.dims(), t.device()).unwrap())
            .unwrap();
    }

    #[test]
    fn zero_film_is_the_plain_network_of_the_same_seed() {
        let plain_pairs = texted_pairs(&[vec![], vec![]]);
        let text_pairs = texted_pairs(&[vec![0.6, 0.0, 0.8], vec![0.0, 1.0, 0.0]]);
        let dev = Device::Cpu;
        let plain = train_sr(&small_text_cfg(0, 0), &plain_pairs, &dev, &mut |_, _| {}).unwrap();
        let cond = train_sr(&small_text_cfg(3, 0), &text_pairs, &dev, &mut |_, _| {}).unwrap();
        // Every parameter the plain network has is drawn identically; the FiLM maps are zero.
        let cp: HashMap<String, Vec<f32>> = medvlm_train::optim::varmap_params(&cond.varmap)
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
            .collect();
        let pp = medvlm_train::optim::varmap_params(&plain.varmap);
        for (name, var) in &pp {
            let v: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(Some(&v), cp.get(name), "{name}");
        }
        let films: Vec<&String> = cp.keys().filter(|n| n.starts_with("film.")).collect();
        assert_eq!(films.len(), 4, "a weight and a bias per block");
        assert_eq!(cp.len(), pp.len() + 4);
        assert!(films.iter().all(|n| cp[*n].iter().all(|&v| v == 0.0)));
        // The untrained tail is zero (output = bicubic whatever the body does): give both the
        // same non-zero tail so the body, FiLM included, reaches the output.
        for vm in [&plain.varmap, &cond.varmap] {
            set_param(vm, "tail.weight", |i| 0.05 * ((i as f32) * 0.7).sin());
        }
        let lr = &text_pairs[0].lr;
        let a = upscale(&plain.net, lr, 16, 16).unwrap();
        let b = upscale_conditioned(&cond.net, lr, 16, 16, Some(&[0.6, 0.0, 0.8])).unwrap();
        assert!(a
            .iter()
            .zip(&text_pairs[0].bicubic)
            .any(|(x, y)| (x - y.clamp(0.0, 1.0)).abs() > 1e-3));
        assert_eq!(a, b);
        // A non-zero FiLM map would change the output (so the equality above is not vacuous).
        set_param(&cond.varmap, "film.0.weight", |i| 0.3 * (i % 3) as f32);
        let c = upscale_conditioned(&cond.net, lr, 16, 16, Some(&[0.6, 0.0, 0.8])).unwrap();
        assert!(a.iter().zip(&c).any(|(x, y)| (x - y).abs() > 1e-4));
    }

    #[test]
    fn trained_film_makes_two_texts_give_two_outputs() {
        let (ta, tb) = (vec![1.0f32, 0.0], vec![0.0f32, 1.0]);
        let pairs = texted_pairs(&[ta.clone(), tb.clone(), ta.clone(), tb.clone()]);
        let dev = Device::Cpu;
        let lr = &pairs[0].lr;
        let gap = |t: &TrainedSr| -> f32 {
            let a = upscale_conditioned(&t.net, lr, 16, 16, Some(&ta)).unwrap();
            let b = upscale_conditioned(&t.net, lr, 16, 16, Some(&tb)).unwrap();
            a.iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max)
        };
        // Untrained, FiLM is zero: the text changes nothing.
        let t0 = train_sr(&small_text_cfg(2, 0), &pairs, &dev, &mut |_, _| {}).unwrap();
        assert_eq!(gap(&t0), 0.0);
        let t = train_sr(&small_text_cfg(2, 20), &pairs, &dev, &mut |_, _| {}).unwrap();
        let g = gap(&t);
        assert!(g > 1e-4, "two texts gave one output (max difference {g})");
    }

    #[test]
    fn text_must_match_the_conditioning() {
        let dev = Device::Cpu;
        // Text given to an unconditioned network, missing or of the wrong width for a
        // conditioned one.
        let e = train_sr(
            &small_text_cfg(0, 1),
            &texted_pairs(&[vec![1.0, 0.0]]),
            &dev,
            &mut |_, _| {},
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("not text-conditioned"), "{e}");
        let e = train_sr(
            &small_text_cfg(2, 1),
            &texted_pairs(&[vec![1.0, 0.0], vec![]]),
            &dev,
            &mut |_, _| {},
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("pair 1 has no text embedding"), "{e}");
        let e = train_sr(
            &small_text_cfg(3, 1),
            &texted_pairs(&[vec![1.0, 0.0]]),
            &dev,
            &mut |_, _| {},
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("2-wide") && e.contains("reads 3"), "{e}");
        let plain = train_sr(
            &small_text_cfg(0, 0),
            &texted_pairs(&[vec![]]),
            &dev,
            &mut |_, _| {},
        )
        .unwrap();
        let cond = train_sr(
            &small_text_cfg(2, 0),
            &texted_pairs(&[vec![1.0, 0.0]]),
            &dev,
            &mut |_, _| {},
        )
        .unwrap();
        let lr = vec![0.5f32; 16 * 16];
        let e = upscale_conditioned(&plain.net, &lr, 16, 16, Some(&[1.0, 0.0]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not text-conditioned"), "{e}");
        let e = upscale(&cond.net, &lr, 16, 16).unwrap_err().to_string();
        assert!(e.contains("text-conditioned: give a prompt"), "{e}");
        let e = upscale_conditioned(&cond.net, &lr, 16, 16, Some(&[1.0]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[1, 2]"), "{e}");
    }

    /// Synthetic images with sharp edges (discs and bars of random grey levels), which the
    /// bicubic baseline blurs.
    pub(crate) fn synthetic_images(n: usize, side: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let mut img = vec![rng.random_range(0.1f32..0.3); side * side];
                for _ in 0..4 {
                    let (cy, cx) = (
                        rng.random_range(0.0..side as f32),
                        rng.random_range(0.0..side as f32),
                    );
                    let rad = rng.random_range(2.0f32..side as f32 / 4.0);
                    let v = rng.random_range(0.4f32..0.95);
                    for y in 0..side {
                        for x in 0..side {
                            let (dy, dx) = (y as f32 - cy, x as f32 - cx);
                            if dy * dy + dx * dx <= rad * rad {
                                img[y * side + x] = v;
                            }
                        }
                    }
                }
                let bar = rng.random_range(2..side - 4);
                for y in 0..side {
                    img[y * side + bar] = 1.0;
                    img[y * side + bar + 1] = 1.0;
                }
                quantise_u8(&mut img);
                img
            })
            .collect()
    }

    fn mean_l1(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| f64::from((x - y).abs()))
            .sum::<f64>()
            / a.len() as f64
    }

    #[test]
    fn tiny_training_beats_bicubic_on_unseen_images() {
        let side = 32;
        let pairs: Vec<SrPair> = synthetic_images(12, side, 1)
            .into_iter()
            .map(|hr| SrPair::from_hr(hr, side, side, 2).unwrap())
            .collect();
        let cfg = SrConfig {
            features: 16,
            blocks: 2,
            patch: 16,
            steps: 150,
            batch: 8,
            lr: 2e-3,
            warmup_steps: 10,
            ..SrConfig::default()
        };
        let t = train_sr(&cfg, &pairs, &Device::Cpu, &mut |_, _| {}).unwrap();
        let first: f32 = t.losses[..10].iter().sum::<f32>() / 10.0;
        let last: f32 = t.losses[t.losses.len() - 10..].iter().sum::<f32>() / 10.0;
        assert!(last < first, "loss {first} -> {last}");
        let (mut net_l1, mut bic_l1) = (0.0, 0.0);
        for hr in synthetic_images(6, side, 99) {
            let p = SrPair::from_hr(hr, side, side, 2).unwrap();
            let out = upscale(&t.net, &p.lr, side / 2, side / 2).unwrap();
            net_l1 += mean_l1(&out, &p.hr);
            let bic: Vec<f32> = p.bicubic.iter().map(|v| v.clamp(0.0, 1.0)).collect();
            bic_l1 += mean_l1(&bic, &p.hr);
        }
        assert!(
            net_l1 < 0.9 * bic_l1,
            "network L1 {net_l1} vs bicubic {bic_l1}"
        );
    }
}
