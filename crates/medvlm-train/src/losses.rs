//! Contrastive image-text losses on candle tensors, all differentiable w.r.t. the embeddings
//! and the learnable temperature (and bias).
//!
//! Every loss takes raw embeddings `image: (n, d)` and `text: (n, d)` where row `i` of both
//! is a matching pair, L2-normalises them along `d` (so callers may pass normalised or raw
//! projections), and a learnable scalar parameter stored in log space.
//!
//! * [`clip_loss`]: symmetric InfoNCE of CLIP (Radford et al., "Learning Transferable Visual
//!   Models From Natural Language Supervision", ICML 2021). `logits = exp(s) * I T^T` with the
//!   learnable log-scale `s` clamped to at most `ln 100` as in CLIP; the loss is the mean of the
//!   image-to-text and text-to-image cross-entropies with targets on the diagonal. CLIP
//!   initialises `s = ln(1 / 0.07)` ([`CLIP_LOGIT_SCALE_INIT`]).
//! * [`siglip_loss`]: pairwise sigmoid loss of SigLIP (Zhai et al., "Sigmoid Loss for
//!   Language Image Pre-Training", ICCV 2023): `logits = exp(t') * I T^T + b`,
//!   `z_ij = +1` on the diagonal and `-1` elsewhere,
//!   `L = -(1/n) sum_ij log sigmoid(z_ij * logits_ij)`, initialised `t' = ln 10`, `b = -10`.
//! * [`label_aware_clip_loss`]: a MedCLIP-style semantic matching loss (Wang et al.,
//!   "MedCLIP: Contrastive Learning from Unpaired Medical Images and Text", EMNLP 2022): pairs
//!   that share findings are not punished as negatives. Our exact formula: with label vectors
//!   `y_i` (multi-hot, or one-hot from a class index), the similarity
//!   `A_ij = cos(y_i, y_j)` (0 when either vector is all-zero) and `A_ii = 1`; soft targets
//!   `P = A / rowsum(A)`; `L = 1/2 [ CE(P, softmax_rows(logits)) + CE(P^T..., softmax_rows(logits^T)) ]`
//!   where `CE(P, Q) = -(1/n) sum_ij P_ij log Q_ij` and the text-to-image direction uses the
//!   row-normalised `A^T` (= `A`, which is symmetric). With pairwise distinct labels `P = I`
//!   and the loss equals [`clip_loss`].

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::ops::log_softmax;
use serde::{Deserialize, Serialize};

use medvlm_models::{ModelError, VisionLanguageModel};

use crate::data::ImageTextBatch;
use crate::optim::NamedVar;
use crate::trainer::TrainError;

/// CLIP's initial log logit scale, `ln(1 / 0.07)`.
pub const CLIP_LOGIT_SCALE_INIT: f64 = 2.659_260_036_932_778;
/// CLIP's upper bound on the log logit scale, `ln(100)`.
pub const CLIP_LOGIT_SCALE_MAX: f64 = 4.605_170_185_988_092;
/// SigLIP's initial log temperature `t' = ln 10`.
pub const SIGLIP_LOGIT_SCALE_INIT: f64 = std::f64::consts::LN_10;
/// SigLIP's initial bias `b = -10`.
pub const SIGLIP_LOGIT_BIAS_INIT: f64 = -10.0;

/// Why a loss could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum LossError {
    /// Inputs with incompatible shapes.
    #[error("loss input shape error: {0}")]
    Shape(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias for losses.
pub type Result<T> = std::result::Result<T, LossError>;

fn check_pair(image: &Tensor, text: &Tensor) -> Result<usize> {
    let (ni, di) = image.dims2().map_err(|_| {
        LossError::Shape(format!(
            "image embeddings must be (n, d), got {:?}",
            image.dims()
        ))
    })?;
    let (nt, dt) = text.dims2().map_err(|_| {
        LossError::Shape(format!(
            "text embeddings must be (n, d), got {:?}",
            text.dims()
        ))
    })?;
    if ni != nt || di != dt {
        return Err(LossError::Shape(format!(
            "image embeddings {:?} and text embeddings {:?} must have the same shape",
            image.dims(),
            text.dims()
        )));
    }
    if ni == 0 {
        return Err(LossError::Shape("empty batch".into()));
    }
    Ok(ni)
}

fn check_scalar(name: &str, t: &Tensor) -> Result<Tensor> {
    if t.elem_count() != 1 {
        return Err(LossError::Shape(format!(
            "{name} must be a scalar, got shape {:?}",
            t.dims()
        )));
    }
    Ok(t.flatten_all()?.reshape(())?)
}

/// Row-wise L2 normalisation `x / ||x||`.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

/// Cosine-similarity logits `exp(min(s, ln 100)) * norm(I) norm(T)^T`, shape `(n, n)`.
pub fn clip_logits(image: &Tensor, text: &Tensor, logit_scale: &Tensor) -> Result<Tensor> {
    check_pair(image, text)?;
    let s = check_scalar("logit_scale", logit_scale)?;
    let scale = s.minimum(CLIP_LOGIT_SCALE_MAX)?.exp()?;
    let sim = l2_normalize(image)?.matmul(&l2_normalize(text)?.t()?)?;
    Ok(sim.broadcast_mul(&scale)?)
}

/// `-(1/n) sum_ij targets_ij * log_softmax(logits)_ij` along rows.
fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)? as f64;
    let lsm = log_softmax(logits, D::Minus1)?;
    Ok((lsm * targets)?.sum_all()?.affine(-1.0 / n, 0.0)?)
}

/// CLIP symmetric InfoNCE; see the module documentation. Returns a scalar tensor.
pub fn clip_loss(image: &Tensor, text: &Tensor, logit_scale: &Tensor) -> Result<Tensor> {
    let logits = clip_logits(image, text, logit_scale)?;
    let n = logits.dim(0)?;
    let eye = Tensor::eye(n, logits.dtype(), logits.device())?;
    let i2t = soft_cross_entropy(&logits, &eye)?;
    let t2i = soft_cross_entropy(&logits.t()?, &eye)?;
    Ok(((i2t + t2i)? * 0.5)?)
}

/// `log sigmoid(x) = min(x, 0) - ln(1 + exp(-|x|))`, stable for large `|x|`.
fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let neg_abs = x.abs()?.neg()?;
    Ok((x.minimum(0.0)? - (neg_abs.exp()? + 1.0)?.log()?)?)
}

/// SigLIP pairwise sigmoid loss; see the module documentation. `logit_scale` is `t'` (the
/// log temperature, not clamped) and `logit_bias` is `b`.
pub fn siglip_loss(
    image: &Tensor,
    text: &Tensor,
    logit_scale: &Tensor,
    logit_bias: &Tensor,
) -> Result<Tensor> {
    let n = check_pair(image, text)?;
    let t = check_scalar("logit_scale", logit_scale)?.exp()?;
    let b = check_scalar("logit_bias", logit_bias)?;
    let sim = l2_normalize(image)?.matmul(&l2_normalize(text)?.t()?)?;
    let logits = sim.broadcast_mul(&t)?.broadcast_add(&b)?;
    // z = 2 I - 1: +1 for matching pairs, -1 otherwise.
    let z = Tensor::eye(n, logits.dtype(), logits.device())?.affine(2.0, -1.0)?;
    let ll = log_sigmoid(&(logits * z)?)?;
    Ok(ll.sum_all()?.affine(-1.0 / n as f64, 0.0)?)
}

/// Soft targets `P = A / rowsum(A)` from multi-hot labels `(n, L)` (any float dtype);
/// `A_ij = cos(y_i, y_j)`, 0 if either row is all-zero, and `A_ii = 1`.
pub fn label_similarity_targets(labels: &Tensor) -> Result<Tensor> {
    let (n, _) = labels
        .dims2()
        .map_err(|_| LossError::Shape(format!("labels must be (n, L), got {:?}", labels.dims())))?;
    let dtype = labels.dtype();
    let y = labels.to_dtype(DType::F64)?;
    let norm = y.sqr()?.sum_keepdim(1)?.sqrt()?;
    // Rows of zeros: divide by 1 instead of 0 so they stay zero vectors.
    let safe = norm.maximum(f64::MIN_POSITIVE)?;
    let yn = y.broadcast_div(&safe)?;
    let cos = yn.matmul(&yn.t()?)?;
    let eye = Tensor::eye(n, DType::F64, labels.device())?;
    let off_diagonal = (eye.affine(-1.0, 1.0)? * cos)?;
    let a = (off_diagonal + &eye)?;
    let rows = a.sum_keepdim(1)?;
    Ok(a.broadcast_div(&rows)?.to_dtype(dtype)?)
}

/// Soft targets for single-label data: pairs with the same class index are positives.
pub fn class_similarity_targets(
    classes: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let n = classes.len();
    if n == 0 {
        return Err(LossError::Shape("empty batch".into()));
    }
    let mut a = vec![0f64; n * n];
    for i in 0..n {
        let same = classes.iter().filter(|&&c| c == classes[i]).count() as f64;
        for j in 0..n {
            if classes[i] == classes[j] {
                a[i * n + j] = 1.0 / same;
            }
        }
    }
    Ok(Tensor::from_vec(a, (n, n), device)?.to_dtype(dtype)?)
}

/// Label-aware (MedCLIP-style) contrastive loss with soft `targets` `(n, n)` from
/// [`label_similarity_targets`] or [`class_similarity_targets`] (rows summing to 1, symmetric
/// similarity). The text-to-image direction uses the row-normalised transpose.
pub fn label_aware_clip_loss(
    image: &Tensor,
    text: &Tensor,
    logit_scale: &Tensor,
    targets: &Tensor,
) -> Result<Tensor> {
    let logits = clip_logits(image, text, logit_scale)?;
    let n = logits.dim(0)?;
    if targets.dims() != [n, n] {
        return Err(LossError::Shape(format!(
            "targets must be ({n}, {n}), got {:?}",
            targets.dims()
        )));
    }
    let targets = targets.to_dtype(logits.dtype())?.detach();
    let tt = targets.t()?;
    let tt = tt.broadcast_div(&tt.sum_keepdim(1)?)?;
    let i2t = soft_cross_entropy(&logits, &targets)?;
    let t2i = soft_cross_entropy(&logits.t()?, &tt)?;
    Ok(((i2t + t2i)? * 0.5)?)
}

/// Which contrastive loss to train with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// CLIP symmetric InfoNCE ([`clip_loss`]).
    Clip,
    /// SigLIP pairwise sigmoid ([`siglip_loss`]).
    Siglip,
    /// Label-aware soft-target InfoNCE ([`label_aware_clip_loss`]); needs labels.
    LabelAware,
}

/// The learnable scalars of a contrastive loss (log logit scale, and the SigLIP bias) and the
/// loss itself. Parameter names are `logit_scale` and `logit_bias`, as in HF CLIP/SigLIP, so
/// they are excluded from weight decay by [`crate::optim::WeightDecayRule::default`].
#[derive(Debug, Clone)]
pub struct ContrastiveHead {
    kind: LossKind,
    logit_scale: Var,
    logit_bias: Option<Var>,
    learnable: bool,
}

impl ContrastiveHead {
    /// Creates the scalars: `logit_scale_init` is `ln(1/T)` (CLIP: [`CLIP_LOGIT_SCALE_INIT`],
    /// SigLIP: [`SIGLIP_LOGIT_SCALE_INIT`]); `bias_init` is used by SigLIP only
    /// ([`SIGLIP_LOGIT_BIAS_INIT`]). With `learnable == false` they stay fixed.
    pub fn new(
        kind: LossKind,
        logit_scale_init: f64,
        bias_init: f64,
        learnable: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let scalar = |v: f64| -> Result<Var> {
            Ok(Var::from_tensor(&Tensor::new(v, device)?.to_dtype(dtype)?)?)
        };
        Ok(Self {
            kind,
            logit_scale: scalar(logit_scale_init)?,
            logit_bias: match kind {
                LossKind::Siglip => Some(scalar(bias_init)?),
                _ => None,
            },
            learnable,
        })
    }

    /// The loss kind.
    pub fn kind(&self) -> LossKind {
        self.kind
    }

    /// Every scalar of the head, by name.
    pub fn vars(&self) -> Vec<NamedVar> {
        let mut v = vec![("logit_scale".to_string(), self.logit_scale.clone())];
        if let Some(b) = &self.logit_bias {
            v.push(("logit_bias".to_string(), b.clone()));
        }
        v
    }

    /// The scalars to hand to the optimiser (none when the temperature is fixed).
    pub fn trainable_vars(&self) -> Vec<NamedVar> {
        if self.learnable {
            self.vars()
        } else {
            Vec::new()
        }
    }

    /// Current log logit scale.
    pub fn logit_scale(&self) -> &Var {
        &self.logit_scale
    }

    /// Loss of a batch. `targets` (soft targets from [`label_similarity_targets`] or
    /// [`class_similarity_targets`]) is required by [`LossKind::LabelAware`] and ignored
    /// otherwise.
    pub fn loss(&self, image: &Tensor, text: &Tensor, targets: Option<&Tensor>) -> Result<Tensor> {
        let scale = if self.learnable {
            self.logit_scale.as_tensor().clone()
        } else {
            self.logit_scale.as_detached_tensor()
        };
        match self.kind {
            LossKind::Clip => clip_loss(image, text, &scale),
            LossKind::Siglip => {
                let b = self
                    .logit_bias
                    .as_ref()
                    .ok_or_else(|| LossError::Shape("SigLIP head without a bias".into()))?;
                let b = if self.learnable {
                    b.as_tensor().clone()
                } else {
                    b.as_detached_tensor()
                };
                siglip_loss(image, text, &scale, &b)
            }
            LossKind::LabelAware => {
                let t = targets.ok_or_else(|| {
                    LossError::Shape(
                        "the label-aware loss needs label targets for the batch".into(),
                    )
                })?;
                label_aware_clip_loss(image, text, &scale, t)
            }
        }
    }

    /// The loss of `model` on an image-text batch: both towers' projected embeddings, with
    /// label-similarity targets for [`LossKind::LabelAware`]. The one training objective of
    /// contrastive pretraining ([`crate::pretrain::ContrastiveModel`]) and fine-tuning
    /// ([`crate::finetune::ContrastiveTuning`]).
    pub fn batch_loss(
        &self,
        model: &dyn VisionLanguageModel,
        batch: &ImageTextBatch,
    ) -> crate::trainer::Result<Tensor> {
        let model_err = |e: ModelError| TrainError::Model(e.to_string());
        let image = model.encode_image(&batch.pixels).map_err(model_err)?.embeds;
        let text = model.encode_text(&batch.tokens).map_err(model_err)?.embeds;
        let targets = match self.kind {
            LossKind::LabelAware => Some(label_similarity_targets(&batch.labels)?),
            _ => None,
        };
        Ok(self.loss(&image, &text, targets.as_ref())?)
    }

    /// The current temperature `T = exp(-logit_scale)`.
    pub fn temperature(&self) -> Result<f64> {
        let s: f64 = self
            .logit_scale
            .as_tensor()
            .to_dtype(DType::F64)?
            .to_scalar()?;
        Ok((-s).exp())
    }

    /// The scalars logged after each update (`temperature`).
    pub fn log_scalars(&self) -> crate::trainer::Result<std::collections::BTreeMap<String, f64>> {
        Ok(std::collections::BTreeMap::from([(
            "temperature".to_string(),
            self.temperature()?,
        )]))
    }

    /// Clamps the CLIP log logit scale into `[0, ln 100]` in place, as open_clip does after
    /// every optimiser step (the loss also caps it, but clamping keeps the parameter from
    /// drifting where its gradient is zero). No-op for SigLIP.
    pub fn clamp_logit_scale(&self) -> Result<()> {
        if self.kind == LossKind::Siglip {
            return Ok(());
        }
        let clamped = self
            .logit_scale
            .as_tensor()
            .clamp(0.0, CLIP_LOGIT_SCALE_MAX)?;
        self.logit_scale.set(&clamped)?;
        Ok(())
    }
}

/// Mean binary cross-entropy of `logits` against `targets` in `[0, 1]` (same shape), in the
/// stable form `max(x, 0) - x t + ln(1 + exp(-|x|))` (PyTorch's
/// `binary_cross_entropy_with_logits`, mean reduction). Segmentation and other dense heads.
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.dims() != targets.dims() {
        return Err(LossError::Shape(format!(
            "logits {:?} and targets {:?} differ",
            logits.dims(),
            targets.dims()
        )));
    }
    let relu = logits.relu()?;
    let softplus_neg_abs = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    let per = ((relu - (logits * targets)?)? + softplus_neg_abs)?;
    Ok(per.mean_all()?)
}

/// Soft Dice loss `1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps)` per sample, averaged
/// over the batch, with `p = sigmoid(logits)`; `logits` and `targets` are `[B, ...]`. `eps`
/// (MONAI's `smooth_nr = smooth_dr`, 1e-5 by default there) keeps an empty target with an
/// empty prediction at a loss near 0.
pub fn soft_dice_loss(logits: &Tensor, targets: &Tensor, eps: f64) -> Result<Tensor> {
    if logits.dims() != targets.dims() || logits.rank() < 2 {
        return Err(LossError::Shape(format!(
            "logits {:?} and targets {:?} must have the same shape [B, ...]",
            logits.dims(),
            targets.dims()
        )));
    }
    let b = logits.dim(0)?;
    let p = candle_nn::ops::sigmoid(logits)?.reshape((b, ()))?;
    let t = targets.reshape((b, ()))?;
    let inter = (&p * &t)?.sum(1)?;
    let denom = (p.sum(1)? + t.sum(1)?)?;
    let dice = ((inter * 2.0)? + eps)?.div(&(denom + eps)?)?;
    Ok((dice.neg()? + 1.0)?.mean_all()?)
}

#[cfg(test)]
mod dense_loss_tests {
    use super::*;

    #[test]
    fn bce_and_dice_match_hand_values() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[0.0f32, 2.0], [-3.0, 1.0]], &dev).unwrap();
        let t = Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0]], &dev).unwrap();
        let bce: f32 = bce_with_logits(&x, &t).unwrap().to_scalar().unwrap();
        let sp = |v: f64| (1.0 + v.exp()).ln();
        // per element: softplus(x) - x t
        let want = (sp(0.0) + sp(2.0) + sp(-3.0) + (sp(1.0) - 1.0)) / 4.0;
        assert!((bce as f64 - want).abs() < 1e-6, "{bce} vs {want}");

        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        let d: f32 = soft_dice_loss(&x, &t, 0.0).unwrap().to_scalar().unwrap();
        let row = |p: [f64; 2], t: [f64; 2]| {
            1.0 - 2.0 * (p[0] * t[0] + p[1] * t[1]) / (p[0] + p[1] + t[0] + t[1])
        };
        let want =
            (row([sig(0.0), sig(2.0)], [1.0, 0.0]) + row([sig(-3.0), sig(1.0)], [0.0, 1.0])) / 2.0;
        assert!((d as f64 - want).abs() < 1e-6, "{d} vs {want}");
        assert!(bce_with_logits(&x, &t.reshape(4).unwrap()).is_err());
    }
}
