//! Text-conditioned image synthesis: a small conditional denoising diffusion model (DDPM, Ho,
//! Jain and Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020) conditioned on
//! the frozen VLM's text embedding of a prompt, with classifier-free guidance (Ho and
//! Salimans, "Classifier-Free Diffusion Guidance", NeurIPS 2021 workshop) and the DDIM sampler
//! (Song, Meng and Ermon, "Denoising Diffusion Implicit Models", ICLR 2021). RoentGen
//! (Chambon et al., 2022) is the medical anchor: a text-conditioned diffusion model of chest
//! X-rays; this is its phantom-size analogue, not a fine-tuned Stable Diffusion.
//!
//! # Diffusion ([`NoiseSchedule`])
//!
//! `T` steps (default 1000) of a linear variance schedule `beta_t` from `1e-4` to `0.02`
//! (DDPM) or the cosine schedule of Nichol and Dhariwal (ICML 2021, `s = 0.008`, betas
//! clipped at 0.999); `alpha_bar_t = prod_{s <= t} (1 - beta_s)`. The forward process is
//! sampled in closed form, `q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)`
//! ([`NoiseSchedule::q_sample`]). Images are scaled from `[0, 1]` to `[-1, 1]`.
//!
//! # Network ([`DiffusionUNet`])
//!
//! A small U-Net on channels-last tensors (convolutions on `medvlm_models::conv::conv2d`).
//! The image is first folded `patch x patch` (default 2x2) into channels (space-to-depth, as
//! PyTorch's `pixel_unshuffle`) and the output unfolded at the end, so the U-Net runs at half
//! the image size (a 4x cheaper step on CPU; the cost is some blockiness before training
//! converges). Then a 3x3 input convolution to `base` channels; per level one residual block (GroupNorm with
//! up to 8 groups, SiLU, 3x3 convolution, FiLM of the second GroupNorm by the embedding:
//! `h * (1 + scale) + shift`, SiLU, 3x3 convolution initialised to zero, 1x1 skip when the
//! width changes, as the "scale-shift norm" block of Dhariwal and Nichol 2021); stride-2 3x3
//! convolutions down, nearest upsampling + 3x3 convolution up, skip connections by
//! concatenation; two residual blocks in the middle; GroupNorm, SiLU and a zero-initialised
//! 3x3 output convolution. Unlike DDPM there is no self-attention (CPU budget). The
//! embedding is the sinusoidal embedding of `t` through a 2-layer MLP (Transformer
//! positions, as DDPM) **plus** a linear map of the condition `[text embedding * keep,
//! 1 - keep]`: the L2-normalised text embedding of the prompt, or zeros and a "no prompt"
//! indicator for the unconditional model.
//!
//! # Training ([`train_ddpm`])
//!
//! Epsilon prediction with the MSE loss `|eps - eps_theta(x_t, t, c)|^2` (DDPM's
//! `L_simple`), `t` uniform in `0..T`, each image's term weighted by min-SNR-gamma
//! (`min(SNR_t, 5) / SNR_t`, Hang et al., "Efficient Diffusion Training via Min-SNR
//! Weighting Strategy", ICCV 2023; [`SynthConfig::min_snr_gamma`], 0 for the plain MSE); the condition is dropped with probability `p_uncond`
//! (default 0.1, Ho and Salimans) so one network is both the conditional and the
//! unconditional model. AdamW (weight decay 0), warm-up and cosine decay, gradients clipped
//! to norm 1 (DDPM), and an exponential moving average of the weights (decay `ema`, default
//! 0.995 — DDPM's 0.9999 is for 800k steps) which is what is saved and sampled from.
//!
//! # Sampling ([`ddim_sample`])
//!
//! DDIM on `steps` (default 50) evenly spaced timesteps `t_i = floor(i T / steps)`, with
//! `eta` (default 0: deterministic given the initial noise; 1 is DDPM-like) and classifier-
//! free guidance `eps = eps_u + w (eps_c - eps_u)` with guidance scale `w` (default 3;
//! `w = 1` is the conditional model alone, `w = 1 + w'` in Ho and Salimans' notation).
//! The predicted `x_0` is clipped to `[-1, 1]` at each step (as DDPM/DDIM implementations do);
//! the initial noise and any `eta` noise come from a ChaCha8 generator seeded by the caller,
//! so a seed gives the same images.
//!
//! Defaults ([`SynthConfig::default`]): 64 px, 3 channels, base width 32, widths x1/x2/x2
//! at 32, 16 and 8 px after a 2x2 space-to-depth, 1000 linear-schedule steps, 3000 training
//! steps of batch 16 (about 12 minutes on 2 idle cores at 64 px), lr 1e-3 with 100 warm-up
//! steps, EMA 0.995, seed 0.

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Module, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use medvlm_train::init::{self, Init};
use medvlm_train::minibatch::adamw;
use medvlm_train::optim::{Gradients, NamedVar};
use medvlm_train::schedule::WarmupCosine;

/// Errors of the diffusion model.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
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
pub type Result<T> = std::result::Result<T, SynthError>;

fn invalid<T>(m: impl Into<String>) -> Result<T> {
    Err(SynthError::Invalid(m.into()))
}

/// The variance schedule's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// DDPM: linear from 1e-4 to 0.02 (scaled by 1000 / T for other T).
    Linear,
    /// Nichol and Dhariwal 2021: `alpha_bar(t) = cos^2((t / T + s) / (1 + s) pi / 2)`.
    Cosine,
}

/// Model and training settings; defaults in the module doc.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SynthConfig {
    /// Side of the square images generated.
    pub image_size: usize,
    /// Image channels (3: RGB; grey images are repeated).
    pub channels: usize,
    /// Side of the pixel blocks folded into channels before the U-Net (space-to-depth,
    /// unfolded after it; 1: none). 2 runs the U-Net at half the image size.
    pub patch: usize,
    /// Width of the first level.
    pub base: usize,
    /// Width multiplier of each level (one level per entry; each after the first halves
    /// the size).
    pub mults: Vec<usize>,
    /// Width of the text embedding conditioning the model (the VLM's joint space).
    pub text_dim: usize,
    /// Diffusion steps `T`.
    pub timesteps: usize,
    /// Variance schedule.
    pub schedule: BetaSchedule,
    /// Probability of dropping the condition in training (classifier-free guidance).
    pub p_uncond: f64,
    /// Min-SNR-gamma loss weighting (Hang et al., ICCV 2023): each image's noise MSE is
    /// weighted by `min(SNR_t, gamma) / SNR_t`, `SNR_t = alpha_bar_t / (1 - alpha_bar_t)`, so
    /// the nearly clean timesteps (where the diffusion noise is as faint as the images' own
    /// acquisition noise) stop dominating the gradient; 0 turns it off (DDPM's plain MSE).
    /// Default 5 (the paper's). Models saved before this setting existed read as 0, how they
    /// were trained.
    #[serde(default = "no_snr_weighting")]
    pub min_snr_gamma: f64,
    /// Optimiser steps.
    pub steps: usize,
    /// Images per step.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup_steps: usize,
    /// Decay of the exponential moving average of the weights (0: none).
    pub ema: f64,
    /// Seed of the initialisation and of the training draws.
    pub seed: u64,
}

fn no_snr_weighting() -> f64 {
    0.0
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            image_size: 64,
            channels: 3,
            patch: 2,
            base: 32,
            mults: vec![1, 2, 2],
            text_dim: 64,
            timesteps: 1000,
            schedule: BetaSchedule::Linear,
            p_uncond: 0.1,
            min_snr_gamma: 5.0,
            steps: 3000,
            batch: 16,
            lr: 1e-3,
            warmup_steps: 100,
            ema: 0.995,
            seed: 0,
        }
    }
}

impl SynthConfig {
    /// Checks the settings; the error says which one is wrong.
    pub fn validate(&self) -> Result<()> {
        if self.mults.is_empty() || self.mults.contains(&0) {
            return invalid("mults must list at least one positive width multiplier");
        }
        if self.patch == 0 {
            return invalid("patch must be at least 1");
        }
        let down = self.patch << (self.mults.len() - 1);
        if self.image_size == 0 || !self.image_size.is_multiple_of(down) {
            return invalid(format!(
                "image size {} must be a positive multiple of {down} (patch {}, {} levels)",
                self.image_size,
                self.patch,
                self.mults.len()
            ));
        }
        if self.channels == 0 || self.text_dim == 0 {
            return invalid("channels and text_dim must be at least 1");
        }
        if self.base == 0 || !self.base.is_multiple_of(groups(self.base)) {
            return invalid("base width must be at least 1");
        }
        if self.timesteps < 2 {
            return invalid(format!("{} diffusion steps; at least 2", self.timesteps));
        }
        if !(self.min_snr_gamma >= 0.0 && self.min_snr_gamma.is_finite()) {
            return invalid(format!(
                "min_snr_gamma {} must be >= 0 (0: off)",
                self.min_snr_gamma
            ));
        }
        if !(0.0..1.0).contains(&self.p_uncond) {
            return invalid(format!("p_uncond {} must be in [0, 1)", self.p_uncond));
        }
        if self.batch == 0 {
            return invalid("batch must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return invalid(format!("learning rate {} must be positive", self.lr));
        }
        if !(0.0..1.0).contains(&self.ema) {
            return invalid(format!("ema {} must be in [0, 1)", self.ema));
        }
        Ok(())
    }

    fn widths(&self) -> Vec<usize> {
        self.mults.iter().map(|m| m * self.base).collect()
    }

    fn embed_dim(&self) -> usize {
        4 * self.base
    }
}

// ---------------------------------------------------------------------------------------
// Noise schedule
// ---------------------------------------------------------------------------------------

/// `beta_t` and `alpha_bar_t` for `t` in `0..T` (see the module doc).
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    /// `beta_t`.
    pub betas: Vec<f64>,
    /// `alpha_bar_t = prod_{s <= t} (1 - beta_s)`.
    pub alpha_bar: Vec<f64>,
}

impl NoiseSchedule {
    /// The schedule of `kind` over `timesteps` steps.
    pub fn new(kind: BetaSchedule, timesteps: usize) -> Result<Self> {
        if timesteps < 2 {
            return invalid("a schedule needs at least 2 steps");
        }
        let t = timesteps as f64;
        let betas: Vec<f64> = match kind {
            BetaSchedule::Linear => {
                let scale = 1000.0 / t;
                let (b0, b1) = (scale * 1e-4, (scale * 0.02).min(0.999));
                (0..timesteps)
                    .map(|i| b0 + (b1 - b0) * i as f64 / (t - 1.0))
                    .collect()
            }
            BetaSchedule::Cosine => {
                let s = 0.008;
                let f = |i: f64| {
                    ((i / t + s) / (1.0 + s) * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..timesteps)
                    .map(|i| (1.0 - f(i as f64 + 1.0) / f(i as f64)).min(0.999))
                    .collect()
            }
        };
        let mut ab = 1.0;
        let alpha_bar = betas
            .iter()
            .map(|b| {
                ab *= 1.0 - b;
                ab
            })
            .collect();
        Ok(Self { betas, alpha_bar })
    }

    /// Number of steps `T`.
    pub fn len(&self) -> usize {
        self.betas.len()
    }

    /// Whether the schedule is empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.betas.is_empty()
    }

    /// `x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps` for a batch `[B, ...]` with
    /// one `t` per image (the closed form of `q(x_t | x_0)`).
    pub fn q_sample(&self, x0: &Tensor, t: &[usize], eps: &Tensor) -> Result<Tensor> {
        let b = x0.dim(0)?;
        if t.len() != b {
            return invalid(format!("{} timesteps for a batch of {b}", t.len()));
        }
        if let Some(&bad) = t.iter().find(|&&s| s >= self.len()) {
            return invalid(format!("timestep {bad} is not below T = {}", self.len()));
        }
        let mut shape = vec![b];
        shape.extend(std::iter::repeat_n(1, x0.rank() - 1));
        let coef = |f: &dyn Fn(f64) -> f64| -> Result<Tensor> {
            let v: Vec<f32> = t.iter().map(|&s| f(self.alpha_bar[s]) as f32).collect();
            Ok(Tensor::from_vec(v, shape.as_slice(), x0.device())?)
        };
        let a = coef(&|ab| ab.sqrt())?;
        let s = coef(&|ab| (1.0 - ab).sqrt())?;
        Ok((x0.broadcast_mul(&a)? + eps.broadcast_mul(&s)?)?)
    }

    /// The DDIM timesteps of a `steps`-step sampler, from the noisiest down:
    /// `floor(i T / steps)` for `i = steps - 1, ..., 0`.
    pub fn ddim_timesteps(&self, steps: usize) -> Result<Vec<usize>> {
        if steps == 0 || steps > self.len() {
            return invalid(format!(
                "{steps} sampling steps; between 1 and T = {}",
                self.len()
            ));
        }
        Ok((0..steps).rev().map(|i| i * self.len() / steps).collect())
    }
}

/// Standard normal values from a seeded generator.
pub fn normal_values(n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    use rand_distr::{Distribution, StandardNormal};
    (0..n).map(|_| StandardNormal.sample(rng)).collect()
}

/// Settings of one DDIM run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DdimOptions {
    /// Sampling steps (default 50).
    pub steps: usize,
    /// 0: deterministic DDIM; 1: DDPM-like noise.
    pub eta: f64,
    /// Clip the predicted `x_0` to `[-1, 1]` at each step.
    pub clip_x0: bool,
}

impl Default for DdimOptions {
    fn default() -> Self {
        Self {
            steps: 50,
            eta: 0.0,
            clip_x0: true,
        }
    }
}

/// DDIM (Song et al. 2021, eq. 12) from `x_T` with the noise predictor `eps_fn(x_t, t)`:
/// at each timestep `t` with previous timestep `p` (`alpha_bar_p = 1` after the last),
/// `x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)` (clipped if asked),
/// `sigma = eta sqrt((1 - ab_p) / (1 - ab_t)) sqrt(1 - ab_t / ab_p)`,
/// `x_p = sqrt(ab_p) x0 + sqrt(1 - ab_p - sigma^2) eps + sigma z`. Returns `x_0`.
pub fn ddim_sample(
    schedule: &NoiseSchedule,
    x_t: Tensor,
    opts: &DdimOptions,
    rng: &mut ChaCha8Rng,
    eps_fn: &mut dyn FnMut(&Tensor, usize) -> Result<Tensor>,
) -> Result<Tensor> {
    if !(opts.eta >= 0.0 && opts.eta.is_finite()) {
        return invalid(format!("eta {} must be >= 0", opts.eta));
    }
    let ts = schedule.ddim_timesteps(opts.steps)?;
    let mut x = x_t;
    for (k, &t) in ts.iter().enumerate() {
        let ab = schedule.alpha_bar[t];
        let ab_prev = ts.get(k + 1).map_or(1.0, |&p| schedule.alpha_bar[p]);
        let eps = eps_fn(&x, t)?;
        let mut x0 = ((&x - eps.affine((1.0 - ab).sqrt(), 0.0)?)? / ab.sqrt())?;
        if opts.clip_x0 {
            x0 = x0.clamp(-1f32, 1f32)?;
        }
        let sigma = opts.eta * ((1.0 - ab_prev) / (1.0 - ab)).sqrt() * (1.0 - ab / ab_prev).sqrt();
        let dir = (1.0 - ab_prev - sigma * sigma).max(0.0).sqrt();
        x = (x0.affine(ab_prev.sqrt(), 0.0)? + eps.affine(dir, 0.0)?)?;
        if sigma > 0.0 {
            let z = Tensor::from_vec(normal_values(x.elem_count(), rng), x.shape(), x.device())?;
            x = (x + z.affine(sigma, 0.0)?)?;
        }
    }
    Ok(x)
}

// ---------------------------------------------------------------------------------------
// Network
// ---------------------------------------------------------------------------------------

fn groups(c: usize) -> usize {
    (1..=8).rev().find(|g| c.is_multiple_of(*g)).unwrap_or(1)
}

struct GroupNorm {
    gamma: Tensor,
    beta: Tensor,
    groups: usize,
}

impl GroupNorm {
    fn new(vb: VarBuilder, c: usize) -> candle_core::Result<Self> {
        Ok(Self {
            gamma: vb.get_with_hints(c, "gamma", candle_nn::Init::Const(1.0))?,
            beta: vb.get_with_hints(c, "beta", candle_nn::Init::Const(0.0))?,
            groups: groups(c),
        })
    }

    /// GroupNorm of `[B, H, W, C]` then the affine map, and the FiLM `(1 + scale, shift)`
    /// `[B, 1, C]` when given, folded into one multiply-add. The group statistics are sums
    /// over pixels taken by a matrix product with a row of ones (gemm, forward and backward,
    /// much faster than candle's strided reductions); the variance is `E[x^2] - E[x]^2`.
    fn forward_film(
        &self,
        x: &Tensor,
        film: Option<(&Tensor, &Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let (g, cg) = (self.groups, c / self.groups);
        let x3 = x.reshape((b, h * w, c))?;
        let ones = Tensor::ones((b, 1, h * w), x.dtype(), x.device())?;
        let n = (h * w * cg) as f64;
        let stat = |t: &Tensor| -> candle_core::Result<Tensor> {
            ones.matmul(t)?.reshape((b, 1, g, cg))?.sum_keepdim(3)? / n
        };
        let mean = stat(&x3)?;
        let var = (stat(&x3.sqr()?)? - mean.sqr()?)?.relu()?;
        let inv = (var + 1e-5)?.sqrt()?.recip()?;
        let per_channel = |t: &Tensor| t.broadcast_as((b, 1, g, cg))?.reshape((b, 1, c));
        let (mean, inv) = (per_channel(&mean)?, per_channel(&inv)?);
        let mut scale = inv.broadcast_mul(&self.gamma)?;
        let mut shift = self.beta.broadcast_sub(&mean.mul(&scale)?)?;
        if let Some((s, t)) = film {
            let s1 = (s + 1.0)?;
            scale = scale.mul(&s1)?;
            shift = shift.mul(&s1)?.add(t)?;
        }
        x3.broadcast_mul(&scale)?
            .broadcast_add(&shift)?
            .reshape((b, h, w, c))
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_film(x, None)
    }
}

/// A convolution with bias, channels-last, weight in PyTorch's layout.
struct Conv {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv {
    fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(
                (cout, cin, k, k),
                "weight",
                candle_nn::init::DEFAULT_KAIMING_NORMAL,
            )?,
            bias: vb.get_with_hints(cout, "bias", candle_nn::Init::Const(0.0))?,
            stride,
            padding: k / 2,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        medvlm_models::conv::conv2d(x, &self.weight, self.stride, self.padding)?
            .broadcast_add(&self.bias)
    }
}

struct ResBlock {
    norm1: GroupNorm,
    conv1: Conv,
    film: candle_nn::Linear,
    norm2: GroupNorm,
    conv2: Conv,
    skip: Option<Conv>,
    cout: usize,
}

impl ResBlock {
    fn new(vb: VarBuilder, cin: usize, cout: usize, emb: usize) -> candle_core::Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), cin)?,
            conv1: Conv::new(vb.pp("conv1"), cin, cout, 3, 1)?,
            film: candle_nn::linear(emb, 2 * cout, vb.pp("film"))?,
            norm2: GroupNorm::new(vb.pp("norm2"), cout)?,
            conv2: Conv::new(vb.pp("conv2"), cout, cout, 3, 1)?,
            skip: if cin != cout {
                Some(Conv::new(vb.pp("skip"), cin, cout, 1, 1)?)
            } else {
                None
            },
            cout,
        })
    }

    /// `x` `[B, H, W, Cin]`, `emb` `[B, E]` (already through SiLU).
    fn forward(&self, x: &Tensor, emb: &Tensor) -> candle_core::Result<Tensor> {
        let b = x.dim(0)?;
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let ss = self.film.forward(emb)?.reshape((b, 1, 2 * self.cout))?;
        let scale = ss.narrow(2, 0, self.cout)?;
        let shift = ss.narrow(2, self.cout, self.cout)?;
        let h = self
            .norm2
            .forward_film(&h, Some((&scale, &shift)))?
            .silu()?;
        let h = self.conv2.forward(&h)?;
        match &self.skip {
            Some(s) => s.forward(x)? + h,
            None => x + h,
        }
    }
}

/// The sinusoidal embedding `[sin(t f_i), cos(t f_i)]`, `f_i = 10000^(-i / (d / 2))`, of each
/// timestep: `[B, d]`.
pub fn timestep_embedding(t: &[usize], dim: usize, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    let mut v = Vec::with_capacity(t.len() * dim);
    for &s in t {
        let row: Vec<f32> = (0..half)
            .map(|i| s as f64 * (-(10000f64.ln()) * i as f64 / half as f64).exp())
            .flat_map(|a| [a.sin() as f32, a.cos() as f32])
            .collect();
        // Sines then cosines.
        v.extend(row.iter().step_by(2));
        v.extend(row.iter().skip(1).step_by(2));
        v.extend(std::iter::repeat_n(0.0, dim - 2 * half));
    }
    Ok(Tensor::from_vec(v, (t.len(), dim), device)?)
}

/// The conditional U-Net `eps_theta(x_t, t, c)` (see the module doc).
pub struct DiffusionUNet {
    cfg: SynthConfig,
    time1: candle_nn::Linear,
    time2: candle_nn::Linear,
    cond: candle_nn::Linear,
    conv_in: Conv,
    down_blocks: Vec<ResBlock>,
    downsample: Vec<Conv>,
    mid: [ResBlock; 2],
    up_blocks: Vec<ResBlock>,
    upsample: Vec<Conv>,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl DiffusionUNet {
    /// A network with its parameters in `vb` (re-drawn from the seed by [`train_ddpm`]).
    pub fn new(vb: VarBuilder, cfg: &SynthConfig) -> Result<Self> {
        cfg.validate()?;
        let w = cfg.widths();
        let e = cfg.embed_dim();
        let n = w.len();
        let mut down_blocks = Vec::new();
        let mut downsample = Vec::new();
        let mut up_blocks = Vec::new();
        let mut upsample = Vec::new();
        let mut prev = cfg.base;
        for (i, &c) in w.iter().enumerate() {
            down_blocks.push(ResBlock::new(vb.pp(format!("down.{i}.res")), prev, c, e)?);
            if i + 1 < n {
                downsample.push(Conv::new(vb.pp(format!("down.{i}.pool")), c, c, 3, 2)?);
            }
            prev = c;
        }
        for (i, &c) in w.iter().enumerate() {
            up_blocks.push(ResBlock::new(vb.pp(format!("up.{i}.res")), 2 * c, c, e)?);
            if i > 0 {
                upsample.push(Conv::new(vb.pp(format!("up.{i}.conv")), c, w[i - 1], 3, 1)?);
            }
        }
        let last = w[n - 1];
        Ok(Self {
            cfg: cfg.clone(),
            time1: candle_nn::linear(cfg.base, e, vb.pp("time.0"))?,
            time2: candle_nn::linear(e, e, vb.pp("time.1"))?,
            cond: candle_nn::linear(cfg.text_dim + 1, e, vb.pp("cond"))?,
            conv_in: Conv::new(
                vb.pp("conv_in"),
                cfg.channels * cfg.patch * cfg.patch,
                cfg.base,
                3,
                1,
            )?,
            down_blocks,
            downsample,
            mid: [
                ResBlock::new(vb.pp("mid.0"), last, last, e)?,
                ResBlock::new(vb.pp("mid.1"), last, last, e)?,
            ],
            up_blocks,
            upsample,
            norm_out: GroupNorm::new(vb.pp("norm_out"), cfg.base)?,
            conv_out: Conv::new(
                vb.pp("out"),
                cfg.base,
                cfg.channels * cfg.patch * cfg.patch,
                3,
                1,
            )?,
        })
    }

    /// The settings.
    pub fn config(&self) -> &SynthConfig {
        &self.cfg
    }

    /// Predicted noise `[B, S, S, C]` of `x_t` `[B, S, S, C]` at timesteps `t` under the
    /// condition `cond` `[B, text_dim + 1]` (see [`condition_rows`]).
    pub fn forward(&self, x: &Tensor, t: &[usize], cond: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let s = self.cfg.image_size;
        if (h, w, c) != (s, s, self.cfg.channels) {
            return invalid(format!(
                "input {h}x{w}x{c}, the model takes {s}x{s}x{}",
                self.cfg.channels
            ));
        }
        if t.len() != b || cond.dims() != [b, self.cfg.text_dim + 1] {
            return invalid(format!(
                "{} timesteps and a condition {:?} for a batch of {b}",
                t.len(),
                cond.dims()
            ));
        }
        let temb = timestep_embedding(t, self.cfg.base, x.device())?;
        let temb = self.time2.forward(&self.time1.forward(&temb)?.silu()?)?;
        let emb = (temb + self.cond.forward(cond)?)?.silu()?;
        let p = self.cfg.patch;
        let mut hcur = self.conv_in.forward(&space_to_depth(x, p)?)?;
        let mut skips = Vec::with_capacity(self.down_blocks.len());
        for (i, blk) in self.down_blocks.iter().enumerate() {
            hcur = blk.forward(&hcur, &emb)?;
            skips.push(hcur.clone());
            if let Some(d) = self.downsample.get(i) {
                hcur = d.forward(&hcur)?;
            }
        }
        for m in &self.mid {
            hcur = m.forward(&hcur, &emb)?;
        }
        for i in (0..self.up_blocks.len()).rev() {
            let skip = skips.pop().expect("one skip per level");
            hcur = self.up_blocks[i].forward(&Tensor::cat(&[&hcur, &skip], D::Minus1)?, &emb)?;
            if i > 0 {
                let (b, h, w, c) = hcur.dims4()?;
                let up = hcur
                    .reshape((b, h, 1, w, 1, c))?
                    .broadcast_as((b, h, 2, w, 2, c))?
                    .reshape((b, 2 * h, 2 * w, c))?;
                hcur = self.upsample[i - 1].forward(&up)?;
            }
        }
        let out = self
            .conv_out
            .forward(&self.norm_out.forward(&hcur)?.silu()?)?;
        Ok(depth_to_space(&out, p)?)
    }
}

/// `[B, H, W, C]` -> `[B, H / r, W / r, C r^2]`: pixel `(y r + i, x r + j)`, channel `c` goes
/// to pixel `(y, x)`, channel `c r^2 + i r + j` (PyTorch's `pixel_unshuffle` order).
pub fn space_to_depth(x: &Tensor, r: usize) -> candle_core::Result<Tensor> {
    if r == 1 {
        return Ok(x.clone());
    }
    let (b, h, w, c) = x.dims4()?;
    x.reshape((b, h / r, r, w / r, r, c))?
        .permute((0, 1, 3, 5, 2, 4))?
        .contiguous()?
        .reshape((b, h / r, w / r, c * r * r))
}

/// The inverse of [`space_to_depth`] (PyTorch's `pixel_shuffle` order).
pub fn depth_to_space(x: &Tensor, r: usize) -> candle_core::Result<Tensor> {
    if r == 1 {
        return Ok(x.clone());
    }
    let (b, h, w, c) = x.dims4()?;
    let oc = c / (r * r);
    x.reshape((b, h, w, oc, r, r))?
        .permute((0, 1, 4, 2, 5, 3))?
        .contiguous()?
        .reshape((b, h * r, w * r, oc))
}

/// The condition rows `[B, E + 1]` of a batch: each text embedding `[E]` followed by 0, or
/// (where `keep` is false) zeros followed by 1 (the unconditional model).
pub fn condition_rows(
    text: &[Vec<f32>],
    keep: &[bool],
    dim: usize,
    device: &Device,
) -> Result<Tensor> {
    if text.len() != keep.len() {
        return invalid("one keep flag per condition");
    }
    let mut v = Vec::with_capacity(text.len() * (dim + 1));
    for (e, &k) in text.iter().zip(keep) {
        if e.len() != dim {
            return invalid(format!(
                "a {}-wide text embedding for a model conditioned on {dim}",
                e.len()
            ));
        }
        if k {
            v.extend_from_slice(e);
            v.push(0.0);
        } else {
            v.extend(std::iter::repeat_n(0.0, dim));
            v.push(1.0);
        }
    }
    Ok(Tensor::from_vec(v, (text.len(), dim + 1), device)?)
}

/// Re-draws every parameter from a seeded generator: convolution weights Kaiming-normal
/// `N(0, 2 / fan_in)`, linear weights `N(0, 1 / fan_in)`, biases and GroupNorm shifts zero,
/// GroupNorm scales one, and zero for each residual block's second convolution and the
/// output convolution (DDPM's zero-initialised layers, so the untrained model predicts 0).
fn seeded_init(params: &[NamedVar], seed: u64) -> Result<()> {
    Ok(init::seeded_init(
        params,
        seed,
        0xd1ff_0515,
        |name, dims| {
            if name.ends_with("gamma") {
                Init::Ones
            } else if name.ends_with("bias")
                || name.ends_with("beta")
                || name.starts_with("out.")
                || name.contains(".conv2.")
            {
                Init::Zeros
            } else if dims.len() == 4 {
                Init::Normal {
                    std: init::kaiming_std(dims),
                }
            } else {
                Init::Normal {
                    std: (1.0 / init::fan_in(dims) as f32).sqrt(),
                }
            }
        },
    )?)
}

/// One training image and the text embedding of its prompt.
#[derive(Debug, Clone)]
pub struct SynthSample {
    /// Pixels `[S, S, C]` channels-last in `[0, 1]`.
    pub pixels: Vec<f32>,
    /// L2-normalised text embedding `[E]` of its prompt.
    pub text: Vec<f32>,
}

/// A trained model.
pub struct TrainedDiffusion {
    /// The network holding the averaged (EMA) weights.
    pub net: DiffusionUNet,
    /// Its parameters.
    pub varmap: VarMap,
    /// Loss of each step.
    pub losses: Vec<f32>,
}

/// Trains the conditional DDPM on `samples` (see the module doc); `progress(step, loss)` after
/// each step.
pub fn train_ddpm(
    cfg: &SynthConfig,
    samples: &[SynthSample],
    device: &Device,
    progress: &mut dyn FnMut(usize, f32),
) -> Result<TrainedDiffusion> {
    cfg.validate()?;
    if samples.is_empty() {
        return invalid("no training images");
    }
    let s = cfg.image_size;
    let px = s * s * cfg.channels;
    if let Some(bad) = samples
        .iter()
        .find(|x| x.pixels.len() != px || x.text.len() != cfg.text_dim)
    {
        return invalid(format!(
            "a training sample of {} values and a {}-wide embedding; the model takes {s}x{s}x{} images and {}-wide embeddings",
            bad.pixels.len(),
            bad.text.len(),
            cfg.channels,
            cfg.text_dim
        ));
    }
    let schedule = NoiseSchedule::new(cfg.schedule, cfg.timesteps)?;
    let varmap = VarMap::new();
    let net = DiffusionUNet::new(VarBuilder::from_varmap(&varmap, DType::F32, device), cfg)?;
    let params = medvlm_train::optim::varmap_params(&varmap);
    seeded_init(&params, cfg.seed)?;
    // The averaged copy, sampled from after training.
    let ema_map = VarMap::new();
    let ema_net = DiffusionUNet::new(VarBuilder::from_varmap(&ema_map, DType::F32, device), cfg)?;
    let ema_params = medvlm_train::optim::varmap_params(&ema_map);
    for ((_, e), (_, p)) in ema_params.iter().zip(&params) {
        e.set(p.as_tensor())?;
    }
    let mut opt = adamw(params.clone(), 0.0)?;
    let lr_schedule = WarmupCosine {
        base_lr: cfg.lr,
        warmup_steps: cfg.warmup_steps.min(cfg.steps) as u64,
        total_steps: cfg.steps as u64,
        min_lr: 0.0,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut losses = Vec::with_capacity(cfg.steps);
    let b = cfg.batch;
    for step in 0..cfg.steps {
        let mut x0 = Vec::with_capacity(b * px);
        let mut text = Vec::with_capacity(b);
        let mut keep = Vec::with_capacity(b);
        let mut t = Vec::with_capacity(b);
        for _ in 0..b {
            let smp = &samples[rng.random_range(0..samples.len())];
            x0.extend(smp.pixels.iter().map(|v| 2.0 * v - 1.0));
            text.push(smp.text.clone());
            keep.push(rng.random::<f64>() >= cfg.p_uncond);
            t.push(rng.random_range(0..cfg.timesteps));
        }
        let x0 = Tensor::from_vec(x0, (b, s, s, cfg.channels), device)?;
        let eps = Tensor::from_vec(
            normal_values(b * px, &mut rng),
            (b, s, s, cfg.channels),
            device,
        )?;
        let x_t = schedule.q_sample(&x0, &t, &eps)?;
        let cond = condition_rows(&text, &keep, cfg.text_dim, device)?;
        let pred = net.forward(&x_t, &t, &cond)?;
        let loss = if cfg.min_snr_gamma > 0.0 {
            let w: Vec<f32> = t
                .iter()
                .map(|&s| min_snr_weight(schedule.alpha_bar[s], cfg.min_snr_gamma) as f32)
                .collect();
            let w = Tensor::from_vec(w, (b, 1, 1, 1), device)?;
            (pred - &eps)?.sqr()?.broadcast_mul(&w)?.mean_all()?
        } else {
            (pred - &eps)?.sqr()?.mean_all()?
        };
        let mut grads = Gradients::from_grad_store(&loss.backward()?, &params);
        grads.clip_global_norm(1.0)?;
        opt.step(&grads, lr_schedule.lr(step as u64))?;
        let l = loss.to_scalar::<f32>()?;
        if !l.is_finite() {
            return invalid(format!(
                "the loss became {l} at step {step}; lower the learning rate"
            ));
        }
        // EMA with the usual warm-up of the decay (min(ema, (1 + n) / (10 + n))).
        let decay = cfg.ema.min((1.0 + step as f64) / (10.0 + step as f64));
        for ((_, e), (_, p)) in ema_params.iter().zip(&params) {
            let v = ((e.as_tensor() * decay)? + (p.as_tensor() * (1.0 - decay))?)?;
            e.set(&v)?;
        }
        losses.push(l);
        progress(step, l);
    }
    Ok(TrainedDiffusion {
        net: ema_net,
        varmap: ema_map,
        losses,
    })
}

/// The min-SNR-gamma weight of a timestep with `alpha_bar` for noise prediction:
/// `min(SNR, gamma) / SNR`, `SNR = alpha_bar / (1 - alpha_bar)` (1 at and below gamma).
pub fn min_snr_weight(alpha_bar: f64, gamma: f64) -> f64 {
    let snr = alpha_bar / (1.0 - alpha_bar).max(1e-12);
    snr.min(gamma) / snr.max(1e-12)
}

/// Generates one image per text embedding (`[E]`, L2-normalised) with DDIM and classifier-
/// free guidance `guidance` (see the module doc), from noise drawn with `seed`. Returns
/// channels-last `[S, S, C]` pixel vectors in `[0, 1]`.
pub fn sample(
    net: &DiffusionUNet,
    text: &[Vec<f32>],
    guidance: f64,
    opts: &DdimOptions,
    seed: u64,
) -> Result<Vec<Vec<f32>>> {
    let cfg = net.config();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    if !guidance.is_finite() || guidance < 0.0 {
        return invalid(format!("guidance scale {guidance} must be >= 0"));
    }
    let schedule = NoiseSchedule::new(cfg.schedule, cfg.timesteps)?;
    let device = net.conv_in.weight.device().clone();
    let (b, s, c) = (text.len(), cfg.image_size, cfg.channels);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x_t = Tensor::from_vec(
        normal_values(b * s * s * c, &mut rng),
        (b, s, s, c),
        &device,
    )?;
    // One batch of 2B: the conditional rows, then the unconditional ones.
    let mut all_text = text.to_vec();
    all_text.extend(text.iter().cloned());
    let keep: Vec<bool> = (0..2 * b).map(|i| i < b).collect();
    let cond = condition_rows(&all_text, &keep, cfg.text_dim, &device)?;
    let cond_only = cond.narrow(0, 0, b)?;
    let mut eps_fn = |x: &Tensor, t: usize| -> Result<Tensor> {
        if guidance == 1.0 {
            return net.forward(x, &vec![t; b], &cond_only);
        }
        let xx = Tensor::cat(&[x, x], 0)?;
        let eps = net.forward(&xx, &vec![t; 2 * b], &cond)?;
        let (ec, eu) = (eps.narrow(0, 0, b)?, eps.narrow(0, b, b)?);
        Ok((&eu + ((ec - &eu)? * guidance)?)?)
    };
    let x0 = ddim_sample(&schedule, x_t, opts, &mut rng, &mut eps_fn)?;
    let flat = x0.flatten_all()?.to_vec1::<f32>()?;
    Ok(flat
        .chunks_exact(s * s * c)
        .map(|img| {
            img.iter()
                .map(|v| ((v + 1.0) / 2.0).clamp(0.0, 1.0))
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_to_depth_is_pixel_unshuffle_and_inverts() {
        let dev = Device::Cpu;
        let v: Vec<f32> = (0..2 * 4 * 6 * 3).map(|i| i as f32).collect();
        let x = Tensor::from_vec(v, (2, 4, 6, 3), &dev).unwrap();
        let d = space_to_depth(&x, 2).unwrap();
        assert_eq!(d.dims(), &[2, 2, 3, 12]);
        // Pixel (y 2 + 1, x 2 + 0) = (3, 4), channel 2 of image 1 -> (1, 2), channel 2*4 + 2.
        let want = x
            .get(1)
            .unwrap()
            .get(3)
            .unwrap()
            .get(4)
            .unwrap()
            .get(2)
            .unwrap();
        let got = d
            .get(1)
            .unwrap()
            .get(1)
            .unwrap()
            .get(2)
            .unwrap()
            .get(10)
            .unwrap();
        assert_eq!(
            want.to_scalar::<f32>().unwrap(),
            got.to_scalar::<f32>().unwrap()
        );
        let back = depth_to_space(&d, 2).unwrap();
        let diff = (back - &x).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn group_norm_matches_the_two_pass_definition() {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let gn = GroupNorm::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev), 16).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let v: Vec<f32> = normal_values(2 * 3 * 5 * 16, &mut rng)
            .into_iter()
            .map(|x| 3.0 * x + 1.5)
            .collect();
        let x = Tensor::from_vec(v.clone(), (2, 3, 5, 16), &dev).unwrap();
        let y = gn
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // 8 groups of 2 channels: statistics over 15 pixels x 2 channels per image.
        for b in 0..2 {
            for g in 0..8 {
                let idx: Vec<usize> = (0..15)
                    .flat_map(|p| (0..2).map(move |k| b * 240 + p * 16 + 2 * g + k))
                    .collect();
                let mean = idx.iter().map(|&i| f64::from(v[i])).sum::<f64>() / 30.0;
                let var = idx
                    .iter()
                    .map(|&i| (f64::from(v[i]) - mean).powi(2))
                    .sum::<f64>()
                    / 30.0;
                for &i in &idx {
                    let want = (f64::from(v[i]) - mean) / (var + 1e-5).sqrt();
                    assert!((f64::from(y[i]) - want).abs() < 1e-3, "{} vs {want}", y[i]);
                }
            }
        }
    }

    /// Min-SNR-gamma: 1 where the SNR is at most gamma, gamma / SNR above it (by hand on
    /// the linear schedule's ends), and a saved config without the setting reads as off.
    #[test]
    fn min_snr_weights_and_their_default() {
        let sched = NoiseSchedule::new(BetaSchedule::Linear, 1000).unwrap();
        let ab0 = sched.alpha_bar[0]; // 1 - 1e-4: SNR 9999
        assert!((min_snr_weight(ab0, 5.0) - 5.0 * (1.0 - ab0) / ab0).abs() < 1e-12);
        assert_eq!(min_snr_weight(sched.alpha_bar[999], 5.0), 1.0);
        assert_eq!(min_snr_weight(0.5, 5.0), 1.0); // SNR 1
        assert!((min_snr_weight(0.9, 5.0) - 5.0 / 9.0).abs() < 1e-12); // SNR 9
        let cfg = tiny_cfg();
        assert_eq!(SynthConfig::default().min_snr_gamma, 5.0);
        let mut old = serde_json::to_value(&cfg).unwrap();
        old.as_object_mut().unwrap().remove("min_snr_gamma");
        let old: SynthConfig = serde_json::from_value(old).unwrap();
        assert_eq!(old.min_snr_gamma, 0.0);
        assert!(SynthConfig {
            min_snr_gamma: f64::NAN,
            ..cfg.clone()
        }
        .validate()
        .is_err());
        // Wired into training: the untrained model predicts 0 (zero output layer), so the
        // first loss is the (weighted) mean of eps^2, and every weight is at most 1.
        let first = |gamma: f64| {
            let c = SynthConfig {
                steps: 1,
                min_snr_gamma: gamma,
                ..cfg.clone()
            };
            train_ddpm(&c, &tiny_samples(8), &Device::Cpu, &mut |_, _| {})
                .unwrap()
                .losses[0]
        };
        let (plain, weighted) = (first(0.0), first(5.0));
        assert!((plain - 1.0).abs() < 0.15, "{plain}");
        assert!(weighted < plain, "{weighted} vs {plain}");
    }

    fn tiny_cfg() -> SynthConfig {
        SynthConfig {
            image_size: 8,
            channels: 1,
            patch: 1,
            base: 8,
            mults: vec![1, 2],
            text_dim: 4,
            timesteps: 100,
            steps: 60,
            batch: 8,
            lr: 2e-3,
            warmup_steps: 5,
            ema: 0.0,
            ..SynthConfig::default()
        }
    }

    #[test]
    fn schedules_match_their_definitions() {
        let s = NoiseSchedule::new(BetaSchedule::Linear, 1000).unwrap();
        assert!((s.betas[0] - 1e-4).abs() < 1e-12 && (s.betas[999] - 0.02).abs() < 1e-12);
        // alpha_bar of the DDPM schedule at T: about 4.0e-5 (prod of 1 - beta).
        let direct: f64 = s.betas.iter().map(|b| 1.0 - b).product();
        assert!((s.alpha_bar[999] - direct).abs() < 1e-15);
        assert!(s.alpha_bar[999] < 1e-4 && s.alpha_bar[999] > 1e-5);
        let c = NoiseSchedule::new(BetaSchedule::Cosine, 1000).unwrap();
        let f = |t: f64| {
            ((t / 1000.0 + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                .cos()
                .powi(2)
        };
        for t in [0usize, 10, 500, 900] {
            let want = f(t as f64 + 1.0) / f(0.0);
            assert!((c.alpha_bar[t] - want).abs() < 1e-9, "t {t}");
        }
        assert_eq!(s.ddim_timesteps(4).unwrap(), vec![750, 500, 250, 0]);
        assert!(s.ddim_timesteps(0).is_err() && s.ddim_timesteps(1001).is_err());
    }

    #[test]
    fn forward_noising_matches_the_closed_form_statistics() {
        // q(x_t | x_0): mean sqrt(ab) x0 and variance 1 - ab, both for q_sample's formula
        // (exact) and for its empirical moments over many draws.
        let dev = Device::Cpu;
        let s = NoiseSchedule::new(BetaSchedule::Linear, 1000).unwrap();
        let n = 20000;
        let x0 = Tensor::full(0.6f32, (n, 1), &dev).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let eps = Tensor::from_vec(normal_values(n, &mut rng), (n, 1), &dev).unwrap();
        for t in [0usize, 100, 400, 999] {
            let xt = s
                .q_sample(&x0, &vec![t; n], &eps)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let ab = s.alpha_bar[t];
            // Exact per element.
            let e0 = eps.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
            let want0 = ab.sqrt() * 0.6 + (1.0 - ab).sqrt() * f64::from(e0);
            assert!((f64::from(xt[0]) - want0).abs() < 1e-5);
            // Moments.
            let mean = xt.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
            let var = xt
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / n as f64;
            assert!((mean - ab.sqrt() * 0.6).abs() < 0.02, "t {t}: mean {mean}");
            assert!(
                (var - (1.0 - ab)).abs() < 0.03 + 0.03 * (1.0 - ab),
                "t {t}: var {var}"
            );
        }
        assert!(s.q_sample(&x0, &[1000; 1], &eps).is_err());
    }

    #[test]
    fn ddim_with_the_true_noise_inverts_noising_exactly() {
        let dev = Device::Cpu;
        let s = NoiseSchedule::new(BetaSchedule::Cosine, 1000).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let x0: Vec<f32> = (0..64).map(|i| ((i as f32) * 0.37).sin() * 0.9).collect();
        let x0 = Tensor::from_vec(x0, (1, 8, 8, 1), &dev).unwrap();
        let eps = Tensor::from_vec(normal_values(64, &mut rng), (1, 8, 8, 1), &dev).unwrap();
        let opts = DdimOptions {
            steps: 20,
            eta: 0.0,
            clip_x0: false,
        };
        let t_first = s.ddim_timesteps(opts.steps).unwrap()[0];
        let x_t = s.q_sample(&x0, &[t_first], &eps).unwrap();
        // The oracle noise of x_t given the known x_0.
        let mut oracle = |x: &Tensor, t: usize| -> Result<Tensor> {
            let ab = s.alpha_bar[t];
            Ok(((x - x0.affine(ab.sqrt(), 0.0)?)? / (1.0 - ab).sqrt())?)
        };
        let out = ddim_sample(&s, x_t.clone(), &opts, &mut rng, &mut oracle).unwrap();
        let err = (out - &x0)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(err < 1e-4, "max error {err}");
        // A wrong noise predictor (zero) does not recover x_0.
        let mut zero = |x: &Tensor, _t: usize| -> Result<Tensor> { Ok(x.zeros_like()?) };
        let bad = ddim_sample(&s, x_t, &opts, &mut rng, &mut zero).unwrap();
        let err = (bad - &x0).unwrap().abs().unwrap().max_all().unwrap();
        assert!(err.to_scalar::<f32>().unwrap() > 0.1);
    }

    fn tiny_samples(n: usize) -> Vec<SynthSample> {
        // Two classes: a bright left half or a bright bottom half.
        (0..n)
            .map(|i| {
                let cls = i % 2;
                let pixels = (0..64)
                    .map(|p| {
                        let (y, x) = (p / 8, p % 8);
                        let on = if cls == 0 { x < 4 } else { y >= 4 };
                        if on {
                            0.9
                        } else {
                            0.1
                        }
                    })
                    .collect();
                let mut text = vec![0.0; 4];
                text[cls] = 1.0;
                SynthSample { pixels, text }
            })
            .collect()
    }

    #[test]
    fn training_lowers_the_loss_and_sampling_is_seeded() {
        let cfg = tiny_cfg();
        let t = train_ddpm(&cfg, &tiny_samples(8), &Device::Cpu, &mut |_, _| {}).unwrap();
        let first: f32 = t.losses[..10].iter().sum::<f32>() / 10.0;
        let last: f32 = t.losses[t.losses.len() - 10..].iter().sum::<f32>() / 10.0;
        assert!(last < 0.7 * first, "loss {first} -> {last}");
        let text = vec![vec![1.0, 0.0, 0.0, 0.0], vec![0.0, 1.0, 0.0, 0.0]];
        let opts = DdimOptions {
            steps: 10,
            ..DdimOptions::default()
        };
        let a = sample(&t.net, &text, 2.0, &opts, 4).unwrap();
        let b = sample(&t.net, &text, 2.0, &opts, 4).unwrap();
        let c = sample(&t.net, &text, 2.0, &opts, 5).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].len(), 64);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a[0].iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn guided_samples_follow_their_prompt() {
        // Long enough on the two-class set for the whole chain (conditioning, guidance, DDIM)
        // to draw each class's bright half; a sampler or conditioning bug fails this.
        let cfg = SynthConfig {
            steps: 400,
            batch: 16,
            ..tiny_cfg()
        };
        let t = train_ddpm(&cfg, &tiny_samples(16), &Device::Cpu, &mut |_, _| {}).unwrap();
        let opts = DdimOptions {
            steps: 20,
            ..DdimOptions::default()
        };
        let text = [vec![1.0, 0.0, 0.0, 0.0], vec![0.0, 1.0, 0.0, 0.0]];
        for (cls, e) in text.iter().enumerate() {
            let imgs = sample(&t.net, &vec![e.clone(); 8], 3.0, &opts, 11).unwrap();
            let (mut left, mut right, mut top, mut bottom) = (0.0, 0.0, 0.0, 0.0);
            for img in &imgs {
                for (p, v) in img.iter().enumerate() {
                    let (y, x) = (p / 8, p % 8);
                    if x < 4 {
                        left += v
                    } else {
                        right += v
                    }
                    if y < 4 {
                        top += v
                    } else {
                        bottom += v
                    }
                }
            }
            if cls == 0 {
                assert!(left > right + 50.0, "class 0: left {left} right {right}");
            } else {
                assert!(bottom > top + 50.0, "class 1: top {top} bottom {bottom}");
            }
        }
    }

    #[test]
    fn bad_settings_and_inputs_are_refused() {
        // Two levels need an even size.
        let cfg = SynthConfig {
            image_size: 7,
            ..tiny_cfg()
        };
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("multiple of 2"));
        let cfg = SynthConfig {
            patch: 2,
            image_size: 10,
            ..tiny_cfg()
        };
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("multiple of 4"));
        let cfg = SynthConfig {
            p_uncond: 1.0,
            ..tiny_cfg()
        };
        assert!(cfg.validate().is_err());
        let cfg = tiny_cfg();
        let bad = vec![SynthSample {
            pixels: vec![0.0; 10],
            text: vec![0.0; 4],
        }];
        let e = train_ddpm(&cfg, &bad, &Device::Cpu, &mut |_, _| {})
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("8x8x1"), "{e}");
        assert!(condition_rows(&[vec![0.0; 3]], &[true], 4, &Device::Cpu).is_err());
    }
}
