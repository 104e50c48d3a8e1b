//! Learned deformable registration of 2-D image pairs: a small U-Net reads the (moving,
//! fixed) pair and predicts a stationary velocity field, integrated by scaling and squaring
//! into a diffeomorphic displacement field, which a differentiable bilinear spatial
//! transformer uses to warp the moving image onto the fixed one. Trained without labels on
//! image similarity plus a smoothness penalty (VoxelMorph, Balakrishnan et al., IEEE TMI 2019;
//! its diffeomorphic variant, Dalca et al., MICCAI 2018; SynthMorph, Hoffmann et al., IEEE
//! TMI 2022, for the same architecture trained on synthetic pairs).
//!
//! # Conventions
//!
//! Images are `[B, C, H, W]` tensors; fields are `[B, 2, H, W]` displacements **in pixels**,
//! channel 0 = `dx` (along columns), channel 1 = `dy` (along rows), the layout of
//! `medvlm_eval::registration` and of the phantoms' `deformation/*.npy`. A field `u` is a
//! pull-back: `warp(I, u)(x) = I(x + u(x))`. Registering *moving* onto *fixed* means finding
//! `u` with `warp(moving, u) ≈ fixed`.
//!
//! # Spatial transformer
//!
//! candle has no `grid_sample`, so [`warp`] builds it: the sample point `x + u(x)` is clamped
//! to the image (replicated border: a point outside takes the nearest border value, and its
//! gradient along the clamped axis is zero), its four neighbours are read with `gather` on
//! the flattened image (integer corners computed on a detached copy), and the bilinear
//! weights are computed from the coordinates, so the gradient reaches the field through the
//! weights and the image through `gather`'s scatter-add. The same code warps a field by
//! itself during integration.
//!
//! # Defaults ([`RegConfig::default`])
//!
//! Width 16 (encoder 16-32-32-32 at full, 1/2, 1/4, 1/8 resolution, so `H` and `W` must be
//! divisible by `2^levels` = 8; decoder back up to 1/4), LeakyReLU 0.2, velocity predicted and
//! integrated at a quarter of the resolution (`field_downsize` 4, VoxelMorph's
//! `int_downsize`, enough for smooth fields and 8x cheaper than full resolution on the CPU)
//! with 7 scaling-and-squaring steps, then resized bilinearly to the image, similarity MSE
//! (or local NCC with a 9x9 window), smoothness weight λ = 0.1 on the squared spatial
//! gradient of the velocity field (VoxelMorph's `Grad('l2')` on the pre-integration flow),
//! optional soft-Dice weight 0 on warped masks, 3000 AdamW steps of batch 16 at lr 2e-3,
//! weight decay 0, seed 0.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use medvlm_tasks::registration::warp;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let img = Tensor::arange(0f32, 12.0, &Device::Cpu)?.reshape((1, 1, 3, 4))?;
//! // dx = 1 everywhere: each pixel takes its right neighbour (the last column is clamped).
//! let shift = Tensor::cat(&[Tensor::ones((1, 1, 3, 4), DType::F32, &Device::Cpu)?,
//!                           Tensor::zeros((1, 1, 3, 4), DType::F32, &Device::Cpu)?], 1)?;
//! let out = warp(&img, &shift)?.flatten_all()?.to_vec1::<f32>()?;
//! assert_eq!(&out[..4], &[1.0, 2.0, 3.0, 3.0]);
//! # Ok(())
//! # }
//! ```

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use medvlm_train::init::{self, Init};
use medvlm_train::minibatch::{adamw, ShuffledEpochs};
use medvlm_train::optim::{Gradients, NamedVar};

use crate::text_condition::{check_text_input, Channels, Film};

/// Errors of the registration network.
#[derive(Debug, thiserror::Error)]
pub enum RegError {
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
pub type Result<T> = std::result::Result<T, RegError>;

/// Image similarity term of the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Similarity {
    /// Mean squared intensity difference (same modality, same intensity scale).
    Mse,
    /// Negative local normalised cross-correlation over a square window (VoxelMorph's NCC).
    Ncc,
}

/// Network and training settings (see the module documentation for the defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegConfig {
    /// Channels of the first encoder level (deeper levels use twice this).
    pub width: usize,
    /// Number of stride-2 encoder levels.
    pub levels: usize,
    /// Scaling-and-squaring steps (the velocity is divided by `2^steps`).
    pub integration_steps: usize,
    /// The velocity is predicted and integrated at `1 / field_downsize` of the image
    /// resolution (1, 2, 4, ...; at most `2^levels`), then resized bilinearly.
    pub field_downsize: usize,
    /// Similarity term.
    pub similarity: Similarity,
    /// Side of the NCC window (odd).
    pub ncc_window: usize,
    /// Weight λ of the smoothness term.
    pub smoothness: f64,
    /// Weight of the soft Dice of warped masks (0 = images only).
    pub mask_dice_weight: f64,
    /// Optimiser steps.
    pub steps: usize,
    /// Pairs per step.
    pub batch: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Seed of the initialisation and the pair order.
    pub seed: u64,
    /// Width of the text embedding that conditions the network (0 = unconditioned): FiLM
    /// of the bottleneck features, `x (1 + γ(t)) + β(t)` with `(γ, β)` a linear map of the
    /// L2-normalised text embedding `t` (TextSCF's idea, Chen et al.;
    /// [`crate::text_condition::Film`]), initialised to zero so training starts from the
    /// unconditioned network.
    pub text_dim: usize,
}

impl Default for RegConfig {
    fn default() -> Self {
        Self {
            width: 16,
            levels: 3,
            integration_steps: 7,
            field_downsize: 4,
            similarity: Similarity::Mse,
            ncc_window: 9,
            smoothness: 0.1,
            mask_dice_weight: 0.0,
            steps: 3000,
            batch: 16,
            lr: 2e-3,
            weight_decay: 0.0,
            seed: 0,
            text_dim: 0,
        }
    }
}

impl RegConfig {
    /// `log2(field_downsize)`, checked to be a power of two not above `2^levels`.
    pub fn downsize_levels(&self) -> Result<usize> {
        let d = self.field_downsize;
        if d == 0 || !d.is_power_of_two() || d.trailing_zeros() as usize > self.levels {
            return Err(RegError::Invalid(format!(
                "field_downsize {d} must be a power of two between 1 and 2^levels = {}",
                1usize << self.levels.min(20)
            )));
        }
        Ok(d.trailing_zeros() as usize)
    }

    /// Checks the settings and that an `h x w` image fits the network.
    pub fn validate(&self, (h, w): (usize, usize)) -> Result<()> {
        let bad = |m: String| Err(RegError::Invalid(m));
        if self.width == 0 || self.batch == 0 {
            return bad("width and batch must be at least 1".into());
        }
        if self.levels > 6 {
            return bad(format!("levels {} is more than 6", self.levels));
        }
        if self.integration_steps > 20 {
            return bad(format!(
                "integration_steps {} is more than 20",
                self.integration_steps
            ));
        }
        if self.ncc_window.is_multiple_of(2) {
            return bad(format!("ncc_window {} must be odd", self.ncc_window));
        }
        for (name, v) in [
            ("smoothness", self.smoothness),
            ("mask_dice_weight", self.mask_dice_weight),
            ("weight_decay", self.weight_decay),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return bad(format!("{name} {v} must be finite and >= 0"));
            }
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("lr {} must be finite and > 0", self.lr));
        }
        self.downsize_levels()?;
        let step = 1usize << self.levels;
        if h < 2 || w < 2 || !h.is_multiple_of(step) || !w.is_multiple_of(step) {
            return bad(format!(
                "image size {h}x{w} must be at least 2x2 and divisible by 2^levels = {step}"
            ));
        }
        Ok(())
    }
}

/// Pixel coordinate grids `[1, 1, H, W]` (x = column, y = row) in `dtype`.
fn grids(h: usize, w: usize, dtype: DType, dev: &Device) -> Result<(Tensor, Tensor)> {
    let xs = Tensor::arange(0u32, w as u32, dev)?
        .to_dtype(dtype)?
        .reshape((1, 1, 1, w))?
        .broadcast_as((1, 1, h, w))?;
    let ys = Tensor::arange(0u32, h as u32, dev)?
        .to_dtype(dtype)?
        .reshape((1, 1, h, 1))?
        .broadcast_as((1, 1, h, w))?;
    Ok((xs, ys))
}

/// Differentiable bilinear pull-back warp (the spatial transformer): `out(x) = src(x +
/// field(x))`, `src` `[B, C, H, W]`, `field` `[B, 2, H, W]` in pixels, replicated border (see
/// the module documentation). Gradients flow to both `src` and `field`.
pub fn warp(src: &Tensor, field: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = src.dims4()?;
    let fd = field.dims4()?;
    if fd != (b, 2, h, w) {
        return Err(RegError::Invalid(format!(
            "field of shape {:?} for images of shape {:?}: expected [{b}, 2, {h}, {w}]",
            field.dims(),
            src.dims()
        )));
    }
    if h < 2 || w < 2 {
        return Err(RegError::Invalid(format!(
            "cannot warp a {h}x{w} image: at least 2x2"
        )));
    }
    let dtype = field.dtype();
    let (gx, gy) = grids(h, w, dtype, src.device())?;
    let sx = field
        .narrow(1, 0, 1)?
        .broadcast_add(&gx)?
        .clamp(0f64, (w - 1) as f64)?;
    let sy = field
        .narrow(1, 1, 1)?
        .broadcast_add(&gy)?
        .clamp(0f64, (h - 1) as f64)?;
    // Integer corners on detached copies (no gradient through floor); the last cell is
    // closed so that x1 = x0 + 1 stays inside and a point on the last column has weight 1.
    let x0 = sx.detach().floor()?.clamp(0f64, (w - 2) as f64)?;
    let y0 = sy.detach().floor()?.clamp(0f64, (h - 2) as f64)?;
    let wx = (&sx - &x0)?;
    let wy = (&sy - &y0)?;
    let ox = (1.0 - &wx)?;
    let oy = (1.0 - &wy)?;
    let flat = src.reshape((b, c, h * w))?;
    let corner = |dy: f64, dx: f64| -> Result<Tensor> {
        let idx = ((&y0 + dy)? * w as f64)?
            .add(&(&x0 + dx)?)?
            .to_dtype(DType::U32)?
            .reshape((b, 1, h * w))?
            .broadcast_as((b, c, h * w))?
            .contiguous()?;
        Ok(flat.gather(&idx, 2)?.reshape((b, c, h, w))?)
    };
    let v00 = corner(0.0, 0.0)?;
    let v01 = corner(0.0, 1.0)?;
    let v10 = corner(1.0, 0.0)?;
    let v11 = corner(1.0, 1.0)?;
    let top = (v00.broadcast_mul(&ox)? + v01.broadcast_mul(&wx)?)?;
    let bottom = (v10.broadcast_mul(&ox)? + v11.broadcast_mul(&wx)?)?;
    Ok((top.broadcast_mul(&oy)? + bottom.broadcast_mul(&wy)?)?)
}

/// Scaling and squaring (Arsigny et al., MICCAI 2006; as in Dalca et al., MICCAI 2018): the
/// displacement of `exp(v)` for a stationary velocity `v` `[B, 2, H, W]`, as
/// `u <- v / 2^steps`, then `steps` times `u <- u + warp(u, u)` (the transform composed with
/// itself). `steps = 0` returns `v`.
pub fn integrate(velocity: &Tensor, steps: usize) -> Result<Tensor> {
    let mut u = (velocity / f64::from(1u32 << steps))?;
    for _ in 0..steps {
        u = (&u + warp(&u, &u)?)?;
    }
    Ok(u)
}

/// Mean squared difference.
pub fn mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((a - b)?.sqr()?.mean_all()?)
}

/// Negative mean local normalised cross-correlation of single-channel images `[B, 1, H, W]`
/// over `window x window` neighbourhoods (zero padding), VoxelMorph's NCC: `-mean(cross² /
/// (var_a var_b + 1e-5))`; -1 for identical images with texture.
pub fn local_ncc(a: &Tensor, b: &Tensor, window: usize) -> Result<Tensor> {
    let (_, c, _, _) = a.dims4()?;
    if c != 1 {
        return Err(RegError::Invalid(format!(
            "local NCC takes single-channel images, got {c} channels"
        )));
    }
    let kernel = Tensor::ones((1, 1, window, window), a.dtype(), a.device())?;
    let pad = window / 2;
    let sum = |t: &Tensor| t.conv2d(&kernel, pad, 1, 1, 1);
    let n = (window * window) as f64;
    let (sa, sb) = (sum(a)?, sum(b)?);
    let (saa, sbb, sab) = (sum(&a.sqr()?)?, sum(&b.sqr()?)?, sum(&(a * b)?)?);
    let cross = (sab - (&sa * &sb)? / n)?;
    let var_a = (saa - sa.sqr()? / n)?;
    let var_b = (sbb - sb.sqr()? / n)?;
    let cc = (cross.sqr()? / ((var_a * var_b)? + 1e-5)?)?;
    Ok(cc.mean_all()?.neg()?)
}

/// Squared spatial gradient of a field `[B, 2, H, W]` (forward differences), the mean over
/// both axes' differences halved: VoxelMorph's `Grad('l2')`.
pub fn gradient_l2(field: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = field.dims4()?;
    let dx = (field.narrow(3, 1, w - 1)? - field.narrow(3, 0, w - 1)?)?;
    let dy = (field.narrow(2, 1, h - 1)? - field.narrow(2, 0, h - 1)?)?;
    Ok(((dx.sqr()?.mean_all()? + dy.sqr()?.mean_all()?)? * 0.5)?)
}

/// Soft Dice loss `1 - mean Dice` of masks `[B, 1, H, W]` in `[0, 1]`, over the samples
/// whose target is not empty (0 when none is).
pub fn soft_dice_loss(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    let inter = (pred * target)?.sum((1, 2, 3))?;
    let total = (pred.sum((1, 2, 3))? + target.sum((1, 2, 3))?)?;
    let dice = ((inter * 2.0)? / (total + 1e-6)?)?;
    let present = target.sum((1, 2, 3))?.gt(0f64)?.to_dtype(pred.dtype())?;
    let count = present.sum_all()?.to_scalar::<f32>()?;
    if count == 0.0 {
        return Ok(Tensor::zeros((), pred.dtype(), pred.device())?);
    }
    Ok((1.0 - ((dice * present)?.sum_all()? / f64::from(count))?)?)
}

fn leaky(x: &Tensor) -> Result<Tensor> {
    Ok(x.maximum(&(x * 0.2)?)?)
}

/// A 3x3 convolution (zero padding 1, stride 1 or 2) written as im2col + matmul: the nine
/// shifted views are concatenated on the channel axis and multiplied by the `[C_out, 9 C_in]`
/// weight. Its backward pass is made of matmuls, slices and concatenations, which candle runs
/// fast on the CPU (its own `conv2d` backward goes through a slow direct
/// `conv_transpose2d`).
pub struct Conv3x3 {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
}

impl Conv3x3 {
    /// Parameters `weight` `[c_out, 9 c_in]` and `bias` `[c_out]` under `vb`.
    pub fn new(vb: VarBuilder, c_in: usize, c_out: usize, stride: usize) -> Result<Self> {
        if !(stride == 1 || stride == 2) {
            return Err(RegError::Invalid(format!("stride {stride}: 1 or 2")));
        }
        Ok(Self {
            weight: vb.get_with_hints(
                (c_out, 9 * c_in),
                "weight",
                candle_nn::init::DEFAULT_KAIMING_NORMAL,
            )?,
            bias: vb.get_with_hints(c_out, "bias", candle_nn::Init::Const(0.0))?,
            stride,
        })
    }

    /// `[B, C_in, H, W]` -> `[B, C_out, H / stride, W / stride]` (`H`, `W` divisible by
    /// the stride).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let s = self.stride;
        if !h.is_multiple_of(s) || !w.is_multiple_of(s) {
            return Err(RegError::Invalid(format!(
                "a {h}x{w} input cannot be convolved with stride {s}"
            )));
        }
        let (oh, ow) = (h / s, w / s);
        let padded = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
        let mut views = Vec::with_capacity(9);
        for dy in 0..3 {
            for dx in 0..3 {
                let v = padded.narrow(2, dy, h)?.narrow(3, dx, w)?;
                let v = if s == 2 {
                    v.reshape((b, c, oh, 2, ow, 2))?
                        .narrow(3, 0, 1)?
                        .narrow(5, 0, 1)?
                        .reshape((b, c, oh, ow))?
                } else {
                    v
                };
                views.push(v);
            }
        }
        let cols = Tensor::cat(&views, 1)?.reshape((b, 9 * c, oh * ow))?;
        let c_out = self.bias.dim(0)?;
        let out = self
            .weight
            .broadcast_matmul(&cols)?
            .reshape((b, c_out, oh, ow))?;
        Ok(out.broadcast_add(&self.bias.reshape((1, c_out, 1, 1))?)?)
    }
}

/// `[out, inn]` matrix of 1-D linear interpolation from `inn` to `out` samples, pixel
/// centres aligned (`x_in = (x_out + 0.5) inn / out - 0.5`, clamped to the ends).
fn interp_matrix(out: usize, inn: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; out * inn];
    for o in 0..out {
        let x = ((o as f32 + 0.5) * inn as f32 / out as f32 - 0.5).clamp(0.0, (inn - 1) as f32);
        let x0 = (x.floor() as usize).min(inn - 1);
        let x1 = (x0 + 1).min(inn - 1);
        let t = x - x0 as f32;
        m[o * inn + x0] += 1.0 - t;
        m[o * inn + x1] += t;
    }
    Ok(Tensor::from_vec(m, (out, inn), dev)?.to_dtype(dtype)?)
}

/// Bilinear resize of a displacement field `[B, 2, h, w]` to `(H, W)`, the displacements
/// rescaled to the new pixel size (`× H / h`; the same factor on both axes is required).
pub fn resize_field(field: &Tensor, (h_out, w_out): (usize, usize)) -> Result<Tensor> {
    let (b, c, h, w) = field.dims4()?;
    if (h, w) == (h_out, w_out) {
        return Ok(field.clone());
    }
    if h_out * w != w_out * h {
        return Err(RegError::Invalid(format!(
            "a {h}x{w} field cannot be resized to {h_out}x{w_out} by one factor"
        )));
    }
    let ry = interp_matrix(h_out, h, field.dtype(), field.device())?;
    let rx = interp_matrix(w_out, w, field.dtype(), field.device())?.t()?;
    let flat = field.reshape((b * c, h, w))?;
    let up = ry.broadcast_matmul(&flat)?.broadcast_matmul(&rx)?;
    Ok((up.reshape((b, c, h_out, w_out))? * (h_out as f64 / h as f64))?)
}

/// The registration U-Net (VoxelMorph's layout, narrower): stride-2 3x3 convolutions down,
/// nearest upsampling and skip concatenations up to `1 / field_downsize` of the input
/// resolution, then a 3x3 convolution to the 2-channel velocity field, initialised near
/// zero so training starts from the identity. As VoxelMorph's `int_downsize`, the velocity
/// is integrated at that resolution and the displacement resized bilinearly to the input.
pub struct RegNet {
    enc: Vec<Conv3x3>,
    dec: Vec<Conv3x3>,
    refine: Conv3x3,
    velocity: Conv3x3,
    film: Option<Film>,
    cfg: RegConfig,
}

impl RegNet {
    /// Builds the network's parameters under `vb` (names `enc.i`, `dec.i`, `refine`,
    /// `velocity`, and `film` when `text_dim > 0`).
    pub fn new(vb: VarBuilder, cfg: &RegConfig) -> Result<Self> {
        if cfg.width == 0 {
            return Err(RegError::Invalid("width must be at least 1".into()));
        }
        let s = cfg.downsize_levels()?;
        let (w, w2) = (cfg.width, 2 * cfg.width);
        let mut enc = vec![Conv3x3::new(vb.pp("enc.0"), 2, w, 1)?];
        for i in 1..=cfg.levels {
            let cin = if i == 1 { w } else { w2 };
            enc.push(Conv3x3::new(vb.pp(format!("enc.{i}")), cin, w2, 2)?);
        }
        let mut dec = Vec::new();
        for i in (s + 1..=cfg.levels).rev() {
            let skip = if i == 1 { w } else { w2 };
            dec.push(Conv3x3::new(vb.pp(format!("dec.{i}")), w2 + skip, w2, 1)?);
        }
        let cin = if cfg.levels == 0 { w } else { w2 };
        let refine = Conv3x3::new(vb.pp("refine"), cin, w, 1)?;
        let velocity = Conv3x3::new(vb.pp("velocity"), w, 2, 1)?;
        let bottleneck = if cfg.levels == 0 { w } else { w2 };
        let film = (cfg.text_dim > 0)
            .then(|| Film::new(vb.pp("film"), cfg.text_dim, bottleneck))
            .transpose()?;
        Ok(Self {
            enc,
            dec,
            refine,
            velocity,
            film,
            cfg: cfg.clone(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &RegConfig {
        &self.cfg
    }

    /// Velocity field `[B, 2, H / d, W / d]` (`d` = `field_downsize`, in pixels of that grid)
    /// for moving and fixed images `[B, 1, H, W]`, conditioned on text embeddings `[B, D]`
    /// when the network has `text_dim = D > 0` (then required; refused otherwise).
    pub fn velocity(
        &self,
        moving: &Tensor,
        fixed: &Tensor,
        text: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, c, h, w) = moving.dims4()?;
        if fixed.dims4()? != (b, c, h, w) || c != 1 {
            return Err(RegError::Invalid(format!(
                "moving {:?} and fixed {:?} must both be [B, 1, H, W] of one shape",
                moving.dims(),
                fixed.dims()
            )));
        }
        self.cfg.validate((h, w))?;
        let mut skips = Vec::with_capacity(self.enc.len());
        let mut x = Tensor::cat(&[moving, fixed], 1)?;
        for conv in &self.enc {
            x = leaky(&conv.forward(&x)?)?;
            skips.push(x.clone());
        }
        skips.pop();
        check_text_input(self.cfg.text_dim, text, b, "registration network")
            .map_err(|e| RegError::Invalid(e.to_string()))?;
        if let (Some(film), Some(t)) = (&self.film, text) {
            x = film
                .modulate(&x, t, Channels::First)
                .map_err(|e| RegError::Invalid(e.to_string()))?;
        }
        for conv in &self.dec {
            let skip = skips
                .pop()
                .ok_or_else(|| RegError::Invalid("skip".into()))?;
            let (_, _, sh, sw) = skip.dims4()?;
            x = Tensor::cat(&[&x.upsample_nearest2d(sh, sw)?, &skip], 1)?;
            x = leaky(&conv.forward(&x)?)?;
        }
        x = leaky(&self.refine.forward(&x)?)?;
        self.velocity.forward(&x)
    }

    /// Velocity (at the reduced grid) and the integrated displacement field at the input
    /// size (pull-back, moving -> fixed).
    pub fn forward(
        &self,
        moving: &Tensor,
        fixed: &Tensor,
        text: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let (_, _, h, w) = moving.dims4()?;
        let v = self.velocity(moving, fixed, text)?;
        let u = resize_field(&integrate(&v, self.cfg.integration_steps)?, (h, w))?;
        Ok((v, u))
    }
}

/// He-normal weights and zero biases from `seed`; the velocity layer's weights get standard
/// deviation 1e-5 (VoxelMorph's initialisation of its flow layer), so the first fields are
/// near the identity; the FiLM layer starts at zero (no modulation).
fn seeded_init(params: &[NamedVar], seed: u64) -> Result<()> {
    Ok(init::seeded_init(
        params,
        seed,
        0x7e9_157e,
        |name, dims| {
            if name.ends_with("bias") || name.starts_with("film") {
                Init::Zeros
            } else if name.starts_with("velocity") {
                Init::Normal { std: 1e-5 }
            } else {
                Init::Normal {
                    std: init::kaiming_std(dims),
                }
            }
        },
    )?)
}

/// Training pairs held as tensors `[N, 1, H, W]`; masks (optional) `[N, 1, H, W]` of 0/1,
/// empty for pairs without one.
pub struct PairTensors {
    /// Moving images.
    pub moving: Tensor,
    /// Fixed images.
    pub fixed: Tensor,
    /// Moving and fixed masks, when the Dice term is used.
    pub masks: Option<(Tensor, Tensor)>,
    /// Text embeddings `[N, D]` of each pair's prompt, for a text-conditioned network.
    pub text: Option<Tensor>,
}

/// Loss terms of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossTerms {
    /// Total loss.
    pub total: f32,
    /// Similarity term.
    pub similarity: f32,
    /// Smoothness term (unweighted).
    pub smoothness: f32,
}

/// The loss of a batch and its terms: similarity(warp(moving, u), fixed) + λ grad² of the
/// velocity (+ the Dice weight times the soft Dice of warped moving masks, when given).
pub fn loss(
    net: &RegNet,
    moving: &Tensor,
    fixed: &Tensor,
    masks: Option<(&Tensor, &Tensor)>,
    text: Option<&Tensor>,
) -> Result<(Tensor, LossTerms)> {
    let cfg = net.config();
    let (v, u) = net.forward(moving, fixed, text)?;
    let warped = warp(moving, &u)?;
    let sim = match cfg.similarity {
        Similarity::Mse => mse(&warped, fixed)?,
        Similarity::Ncc => local_ncc(&warped, fixed, cfg.ncc_window)?,
    };
    let smooth = gradient_l2(&v)?;
    let mut total = (&sim + (&smooth * cfg.smoothness)?)?;
    if let (Some((mm, fm)), true) = (masks, cfg.mask_dice_weight > 0.0) {
        let wm = warp(mm, &u)?;
        total = (total + (soft_dice_loss(&wm, fm)? * cfg.mask_dice_weight)?)?;
    }
    let terms = LossTerms {
        total: total.to_scalar::<f32>()?,
        similarity: sim.to_scalar::<f32>()?,
        smoothness: smooth.to_scalar::<f32>()?,
    };
    Ok((total, terms))
}

/// A trained network with its parameters and loss history.
pub struct TrainedRegNet {
    /// The network.
    pub net: RegNet,
    /// Its parameters.
    pub varmap: VarMap,
    /// Loss terms of each step.
    pub history: Vec<LossTerms>,
}

/// Trains a [`RegNet`] on `pairs` with AdamW (the engine's), `cfg.steps` steps of
/// `cfg.batch` pairs drawn in seeded shuffled epochs. `progress` is called every 50 steps
/// with the step and the mean terms of those steps.
pub fn train(
    cfg: &RegConfig,
    pairs: &PairTensors,
    device: &Device,
    mut progress: impl FnMut(usize, &LossTerms),
) -> Result<TrainedRegNet> {
    let (n, _, h, w) = pairs.moving.dims4()?;
    if n == 0 {
        return Err(RegError::Invalid("no training pairs".into()));
    }
    cfg.validate((h, w))?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let net = RegNet::new(vb, cfg)?;
    let params = medvlm_train::optim::varmap_params(&varmap);
    seeded_init(&params, cfg.seed)?;
    let mut opt = adamw(params.clone(), cfg.weight_decay)?;
    let mut sampler = ShuffledEpochs::new(n, cfg.seed);
    let mut history = Vec::with_capacity(cfg.steps);
    for step in 0..cfg.steps {
        let idx: Vec<u32> = sampler
            .batch(cfg.batch)
            .into_iter()
            .map(|i| i as u32)
            .collect();
        let idx = Tensor::new(idx.as_slice(), device)?;
        let m = pairs.moving.index_select(&idx, 0)?;
        let f = pairs.fixed.index_select(&idx, 0)?;
        let masks = match &pairs.masks {
            Some((mm, fm)) => Some((mm.index_select(&idx, 0)?, fm.index_select(&idx, 0)?)),
            None => None,
        };
        let text = pairs
            .text
            .as_ref()
            .map(|t| t.index_select(&idx, 0))
            .transpose()?;
        let (total, terms) = loss(
            &net,
            &m,
            &f,
            masks.as_ref().map(|(a, b)| (a, b)),
            text.as_ref(),
        )?;
        if !terms.total.is_finite() {
            return Err(RegError::Invalid(format!(
                "the loss became {} at step {step}",
                terms.total
            )));
        }
        let grads = Gradients::from_grad_store(&total.backward()?, &params);
        opt.step(&grads, cfg.lr)?;
        history.push(terms);
        if (step + 1).is_multiple_of(50) || step + 1 == cfg.steps {
            let k = history.len().min(50);
            let recent = &history[history.len() - k..];
            let mean = LossTerms {
                total: recent.iter().map(|t| t.total).sum::<f32>() / k as f32,
                similarity: recent.iter().map(|t| t.similarity).sum::<f32>() / k as f32,
                smoothness: recent.iter().map(|t| t.smoothness).sum::<f32>() / k as f32,
            };
            progress(step + 1, &mean);
        }
    }
    Ok(TrainedRegNet {
        net,
        varmap,
        history,
    })
}

/// Predicted displacement fields `[N, 2, H, W]` (pull-back, moving -> fixed) in batches of
/// 32, with text embeddings `[N, D]` for a text-conditioned network.
pub fn predict_fields(
    net: &RegNet,
    moving: &Tensor,
    fixed: &Tensor,
    text: Option<&Tensor>,
) -> Result<Tensor> {
    let n = moving.dim(0)?;
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        let len = 32.min(n - start);
        let t = text.map(|t| t.narrow(0, start, len)).transpose()?;
        let (_, u) = net.forward(
            &moving.narrow(0, start, len)?,
            &fixed.narrow(0, start, len)?,
            t.as_ref(),
        )?;
        out.push(u.detach());
        start += len;
    }
    if out.is_empty() {
        return Err(RegError::Invalid("no pairs to register".into()));
    }
    Ok(Tensor::cat(&out, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> Device {
        Device::Cpu
    }

    fn constant_field(b: usize, h: usize, w: usize, dx: f64, dy: f64, dt: DType) -> Tensor {
        Tensor::cat(
            &[
                (Tensor::ones((b, 1, h, w), dt, &dev()).unwrap() * dx).unwrap(),
                (Tensor::ones((b, 1, h, w), dt, &dev()).unwrap() * dy).unwrap(),
            ],
            1,
        )
        .unwrap()
    }

    fn ramp(h: usize, w: usize) -> Tensor {
        let v: Vec<f32> = (0..h * w)
            .map(|i| ((i % w) as f32 * 0.7).sin() + ((i / w) as f32 * 0.4).cos())
            .collect();
        Tensor::from_vec(v, (1, 1, h, w), &dev()).unwrap()
    }

    #[test]
    fn zero_field_is_identity_and_integer_shift_is_exact() {
        let img = ramp(8, 10);
        let id = warp(&img, &constant_field(1, 8, 10, 0.0, 0.0, DType::F32)).unwrap();
        let diff = (&id - &img).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        let shifted = warp(&img, &constant_field(1, 8, 10, 2.0, -1.0, DType::F32)).unwrap();
        let a = img.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let s = shifted.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for y in 1..8 {
            for x in 0..8 {
                assert_eq!(s[y * 10 + x], a[(y - 1) * 10 + x + 2], "({y}, {x})");
            }
        }
    }

    #[test]
    fn warp_gradient_matches_finite_differences() {
        let (h, w) = (5, 6);
        let img = ramp(h, w).to_dtype(DType::F64).unwrap();
        // Fractional parts in [0.25, 0.6]: away from the bilinear kinks at integers.
        let vals: Vec<f64> = (0..2 * h * w)
            .map(|i| 0.25 + 0.35 * ((i * 7919 % 97) as f64 / 97.0))
            .collect();
        let weights: Vec<f64> = (0..h * w).map(|i| ((i * 31 % 11) as f64) - 5.0).collect();
        let weights = Tensor::from_vec(weights, (1, 1, h, w), &dev()).unwrap();
        let objective = |field: &Tensor| -> Tensor {
            (warp(&img, field).unwrap() * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let var = candle_core::Var::from_vec(vals.clone(), (1, 2, h, w), &dev()).unwrap();
        let grads = objective(var.as_tensor()).backward().unwrap();
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let eps = 1e-6;
        let mut checked = 0;
        for y in 0..h - 1 {
            for x in 0..w - 1 {
                for ch in 0..2 {
                    let i = ch * h * w + y * w + x;
                    let mut plus = vals.clone();
                    plus[i] += eps;
                    let mut minus = vals.clone();
                    minus[i] -= eps;
                    let f = |v: Vec<f64>| {
                        objective(&Tensor::from_vec(v, (1, 2, h, w), &dev()).unwrap())
                            .to_scalar::<f64>()
                            .unwrap()
                    };
                    let fd = (f(plus) - f(minus)) / (2.0 * eps);
                    assert!((fd - g[i]).abs() < 1e-6, "{i}: fd {fd} vs {}", g[i]);
                    checked += usize::from(fd.abs() > 1e-3);
                }
            }
        }
        assert!(
            checked > 20,
            "too few non-zero gradients checked: {checked}"
        );
    }

    #[test]
    fn scaling_and_squaring_of_a_constant_velocity_is_the_translation() {
        let v = constant_field(1, 16, 16, 1.5, -0.75, DType::F32);
        let u = integrate(&v, 7).unwrap();
        let d = (&u - &v).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-4);
    }

    #[test]
    fn integrated_rotation_velocity_is_the_rotation() {
        // v(x) = A (x - c) with A the generator of rotations at rate 0.8: exp(v) rotates by
        // 0.8 rad about c. Checked where every intermediate point stays inside the image.
        let (h, w) = (16, 16);
        let n = h * w;
        let theta = 0.8f32;
        let mut vals = vec![0f32; 2 * n];
        for y in 0..h {
            for x in 0..w {
                let (cx, cy) = (x as f32 - 7.5, y as f32 - 7.5);
                vals[y * w + x] = -theta * cy;
                vals[n + y * w + x] = theta * cx;
            }
        }
        let v = Tensor::from_vec(vals, (1, 2, h, w), &dev()).unwrap();
        let u = integrate(&v, 7)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let (s, c) = theta.sin_cos();
        for y in 5..11 {
            for x in 5..11 {
                let (cx, cy) = (x as f32 - 7.5, y as f32 - 7.5);
                let ex = c * cx - s * cy - cx;
                let ey = s * cx + c * cy - cy;
                let i = y * w + x;
                assert!(
                    (u[i] - ex).abs() < 0.05 && (u[n + i] - ey).abs() < 0.05,
                    "({y}, {x})"
                );
            }
        }
        let det = medvlm_eval::registration::jacobian_determinant(&u, (h, w)).unwrap();
        assert!((5..11).all(|y| (5..11).all(|x| (det[y * w + x] - 1.0).abs() < 0.05)));
    }

    #[test]
    fn ncc_of_identical_images_is_minus_one_and_mse_zero() {
        let img = ramp(16, 16);
        let ncc = local_ncc(&img, &img, 9)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((ncc + 1.0).abs() < 0.01, "{ncc}");
        let other = ramp(16, 16).t().unwrap().contiguous().unwrap();
        let ncc2 = local_ncc(&img, &other, 9)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(ncc2 > -0.9, "{ncc2}");
        assert_eq!(mse(&img, &img).unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn gradient_l2_of_a_linear_field() {
        // dx = 0.5 * column: x-differences 0.5, y-differences 0 -> (0.25/2 + 0) / 2.
        let v: Vec<f32> = (0..2 * 4 * 4)
            .map(|i| if i < 16 { 0.5 * (i % 4) as f32 } else { 0.0 })
            .collect();
        let f = Tensor::from_vec(v, (1, 2, 4, 4), &dev()).unwrap();
        let g = gradient_l2(&f).unwrap().to_scalar::<f32>().unwrap();
        assert!((g - 0.0625).abs() < 1e-6, "{g}");
    }

    #[test]
    fn im2col_convolution_matches_candle_conv2d() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev());
        let x = Tensor::randn(0f32, 1.0, (2, 3, 8, 6), &dev()).unwrap();
        for stride in [1, 2] {
            let conv = Conv3x3::new(vb.pp(format!("c{stride}")), 3, 4, stride).unwrap();
            // Our weight [4, 9 * 3] is ordered (ky, kx, c_in); candle's is [4, 3, 3, 3].
            let w = conv
                .weight
                .reshape((4, 3, 3, 3))
                .unwrap()
                .permute((0, 3, 1, 2))
                .unwrap()
                .contiguous()
                .unwrap();
            let reference = x
                .conv2d(&w, 1, stride, 1, 1)
                .unwrap()
                .broadcast_add(&conv.bias.reshape((1, 4, 1, 1)).unwrap())
                .unwrap();
            let ours = conv.forward(&x).unwrap();
            assert_eq!(ours.dims(), reference.dims());
            let d = (ours - reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-4, "stride {stride}");
        }
    }

    #[test]
    fn resized_constant_and_linear_fields() {
        // A constant 1-px shift on an 8x8 grid is a 2-px shift on 16x16.
        let u = resize_field(&constant_field(1, 8, 8, 1.0, -0.5, DType::F32), (16, 16)).unwrap();
        let v = u.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v[..256].iter().all(|d| (d - 2.0).abs() < 1e-6));
        assert!(v[256..].iter().all(|d| (d + 1.0).abs() < 1e-6));
        // dx = column index on 8 columns, resized x2: interior values follow the line.
        let lin: Vec<f32> = (0..2 * 64)
            .map(|i| if i < 64 { (i % 8) as f32 } else { 0.0 })
            .collect();
        let f = Tensor::from_vec(lin, (1, 2, 8, 8), &dev()).unwrap();
        let up = resize_field(&f, (16, 16))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Output column 5 sits at input 2.25 -> 2.25 px of the coarse grid -> 4.5 px.
        assert!((up[16 * 3 + 5] - 4.5).abs() < 1e-5, "{}", up[16 * 3 + 5]);
        assert!(resize_field(&f, (16, 8)).is_err());
    }

    #[test]
    fn bad_shapes_are_errors() {
        let img = ramp(8, 8);
        assert!(warp(&img, &constant_field(1, 8, 4, 0.0, 0.0, DType::F32)).is_err());
        let cfg = RegConfig {
            width: 4,
            levels: 2,
            ..RegConfig::default()
        };
        let net = RegNet::new(
            VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev()),
            &cfg,
        )
        .unwrap();
        // 10 is not divisible by 2^2.
        let odd = ramp(10, 10);
        assert!(net.velocity(&odd, &odd, None).is_err());
        assert!(net.velocity(&img, &ramp(8, 16), None).is_err());
        // An unconditioned network takes no text; a conditioned one needs [B, text_dim].
        let t = Tensor::ones((1, 3), DType::F32, &dev()).unwrap();
        assert!(net.velocity(&img, &img, Some(&t)).is_err());
        let cond = RegNet::new(
            VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev()),
            &RegConfig {
                text_dim: 3,
                ..cfg.clone()
            },
        )
        .unwrap();
        assert!(cond.velocity(&img, &img, None).is_err());
        assert!(cond
            .velocity(
                &img,
                &img,
                Some(&Tensor::ones((1, 4), DType::F32, &dev()).unwrap())
            )
            .is_err());
        assert!(cond.velocity(&img, &img, Some(&t)).is_ok());
        assert!(RegConfig {
            ncc_window: 4,
            ..RegConfig::default()
        }
        .validate((64, 64))
        .is_err());
        assert!(RegConfig {
            field_downsize: 3,
            ..RegConfig::default()
        }
        .validate((64, 64))
        .is_err());
    }

    #[test]
    fn text_conditioning_starts_as_the_plain_network_and_learns_to_use_the_text() {
        let base = RegConfig {
            width: 4,
            levels: 2,
            integration_steps: 4,
            steps: 40,
            batch: 4,
            lr: 5e-3,
            smoothness: 0.01,
            ..RegConfig::default()
        };
        // Pairs: the fixed image is the moving one shifted by one pixel, right or down.
        let mut mv = Vec::new();
        let mut fx = Vec::new();
        let mut tx = Vec::new();
        for k in 0..8 {
            let img = ramp(16, 16)
                .affine(1.0, 0.1 * k as f64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let (dx, dy) = if k % 2 == 0 { (1, 0) } else { (0, 1) };
            let mut f = vec![0f32; 256];
            for y in 0..16 {
                for x in 0..16 {
                    f[y * 16 + x] = img[(y + dy).min(15) * 16 + (x + dx).min(15)];
                }
            }
            mv.extend(img);
            fx.extend(f);
            tx.extend(if k % 2 == 0 { [1f32, 0.0] } else { [0.0, 1.0] });
        }
        let pairs = PairTensors {
            moving: Tensor::from_vec(mv, (8, 1, 16, 16), &dev()).unwrap(),
            fixed: Tensor::from_vec(fx, (8, 1, 16, 16), &dev()).unwrap(),
            masks: None,
            text: Some(Tensor::from_vec(tx, (8, 2), &dev()).unwrap()),
        };
        let plain = train(
            &RegConfig {
                steps: 0,
                ..base.clone()
            },
            &pairs,
            &dev(),
            |_, _| {},
        )
        .unwrap();
        let cond_cfg = RegConfig {
            text_dim: 2,
            ..base.clone()
        };
        let cond0 = train(
            &RegConfig {
                steps: 0,
                ..cond_cfg.clone()
            },
            &pairs,
            &dev(),
            |_, _| {},
        )
        .unwrap();
        // Same seed, FiLM at zero: the conditioned network starts as the plain one.
        let t = pairs.text.as_ref().unwrap();
        let a = plain
            .net
            .velocity(&pairs.moving, &pairs.fixed, None)
            .unwrap();
        let b = cond0
            .net
            .velocity(&pairs.moving, &pairs.fixed, Some(t))
            .unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        // Trained, the FiLM layer is used: two prompts give two fields for one pair.
        let trained = train(&cond_cfg, &pairs, &dev(), |_, _| {}).unwrap();
        let first = trained.history[..5].iter().map(|t| t.total).sum::<f32>();
        let last = trained.history[35..].iter().map(|t| t.total).sum::<f32>();
        assert!(last < first, "loss {first} -> {last}");
        let pair_m = pairs.moving.narrow(0, 0, 1).unwrap();
        let pair_f = pairs.fixed.narrow(0, 0, 1).unwrap();
        let field = |row: usize| {
            trained
                .net
                .velocity(&pair_m, &pair_f, Some(&t.narrow(0, row, 1).unwrap()))
                .unwrap()
        };
        let gap = (field(0) - field(1))
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(gap > 1e-6, "the prompt changes nothing ({gap})");
    }
}
