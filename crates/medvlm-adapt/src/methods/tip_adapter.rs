//! Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022, "Tip-Adapter:
//! Training-free Adaption of CLIP for Few-shot Classification").
//!
//! A key-value cache built from the support set: keys `F` are the
//! L2-normalised support embeddings `[N, D]`, values `L` their one-hot labels
//! `[N, C]`. For a test embedding `f` (normalised), the affinity to each key
//! is `A = exp(-beta (1 - f F^T))` and the logits blend the cache with
//! zero-shot CLIP:
//!
//! `logits = s * f W_c^T + alpha * A L`
//!
//! with `W_c` the zero-shot text weights and `s` the logit scale (100).
//! Defaults are the paper's ImageNet values, `alpha = 1` (residual ratio) and
//! `beta = 5.5` (sharpness), the best values of its ImageNet ablation of
//! alpha and beta (the official ImageNet config instead starts its
//! validation search from alpha = 1.17, beta = 1).
//!
//! Tip-Adapter-F additionally fine-tunes the keys (initialised from the cache)
//! with cross-entropy, values and text weights frozen; the paper uses AdamW
//! (lr 1e-3, eps 1e-4, cosine schedule) for 20 epochs on augmented images;
//! here: the same optimiser for 200 full-batch steps on the cached support
//! embeddings (`steps`).
//!
//! The paper searches alpha and beta on a validation set. Under
//! [`HyperparameterPolicy::SupportCv`] we search the grid
//! `alpha in {0.25, 0.5, 1, 2, 3}`, `beta in {1, 2, 3, 4, 5.5, 7}` on the
//! support set only, by leave-one-out (each support image is scored with its
//! own key removed from the cache; ties keep the default); for Tip-Adapter-F
//! the search happens before fine-tuning. Under `Fixed` the defaults are used.
//!
//! Multi-label tasks (our extension; the paper is multi-class only): one
//! sigmoid per label, with the same blend
//!
//! `logits = s * f (P - N)^T + alpha * A (2 Y - 1)`
//!
//! where `P - N` are the positive minus negative prompt-pair weights of
//! `zero-shot-pairs` (so at `alpha = 0` it is exactly zero-shot-pairs) and
//! the cache values are the support images' multi-hot rows `Y` mapped to
//! `{-1, +1}`: a support image near `f` raises the log-odds of its findings
//! and lowers those of the findings it lacks. (With Tip-Adapter's `{0, 1}`
//! values the cache could only raise every label, which a softmax forgives
//! since it cancels a shift common to all classes, but a per-label sigmoid
//! does not.) Tip-Adapter-F fine-tunes the keys with the mean binary
//! cross-entropy instead of cross-entropy; the support-set search picks the
//! grid point with the lowest leave-one-out binary log-loss (mean over
//! images and labels) instead of the highest accuracy.

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::{bce_with_logits, pair_text_weights, train_full_batch, Optimizer};
use crate::fewshot::TaskKind;
use crate::method::{
    l2_normalize, make_card, normalized_input, AdaptInput, AdaptationMethod, AdaptedClassifier,
    ClassifierCard, HyperparameterPolicy, MethodError, Result, SavedTensors,
};

/// Tip-Adapter hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TipAdapter {
    /// Residual ratio alpha (weight of the cache logits).
    pub alpha: f64,
    /// Sharpness beta of the affinity.
    pub beta: f64,
    /// Whether the keys are fine-tuned (Tip-Adapter-F).
    pub fine_tune: bool,
    /// Full-batch fine-tuning steps (Tip-Adapter-F only).
    pub steps: usize,
    /// Optimiser of the fine-tuning.
    pub optimizer: Optimizer,
}

impl TipAdapter {
    /// Training-free Tip-Adapter with the paper's defaults.
    pub fn training_free() -> Self {
        Self {
            alpha: 1.0,
            beta: 5.5,
            fine_tune: false,
            steps: 0,
            optimizer: Optimizer::AdamW {
                lr: 1e-3,
                weight_decay: 0.01,
                eps: 1e-4,
            },
        }
    }

    /// Tip-Adapter-F with the paper's defaults.
    pub fn fine_tuned() -> Self {
        Self {
            fine_tune: true,
            steps: 200,
            ..Self::training_free()
        }
    }
}

/// Alpha grid of the support-set search.
pub const ALPHA_GRID: [f64; 5] = [0.25, 0.5, 1.0, 2.0, 3.0];
/// Beta grid of the support-set search.
pub const BETA_GRID: [f64; 6] = [1.0, 2.0, 3.0, 4.0, 5.5, 7.0];

/// The Tip-Adapter logits for normalised embeddings `f` `[M, D]`, keys
/// `[N, D]`, values `[N, C]` (one-hot; multi-label: multi-hot mapped to
/// `{-1, +1}`), text weights `[C, D]` (multi-label: positive minus negative
/// pair weights).
pub fn tip_logits(
    f: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    text: &Tensor,
    alpha: f64,
    beta: f64,
    scale: f64,
) -> Result<Tensor> {
    let zero_shot = (f.matmul(&text.t()?)? * scale)?;
    let cache = affinity(f, keys, beta)?.matmul(values)?;
    Ok((zero_shot + (cache * alpha)?)?)
}

/// `exp(-beta (1 - f keys^T))`, `[M, N]`.
pub fn affinity(f: &Tensor, keys: &Tensor, beta: f64) -> Result<Tensor> {
    let cos = f.matmul(&keys.t()?)?;
    Ok(((cos - 1.0)? * beta)?.exp()?)
}

/// Leave-one-out accuracy of (alpha, beta) on the support set.
fn loo_accuracy(
    zero_shot: &[Vec<f32>],
    cos: &[Vec<f32>],
    labels: &[usize],
    c: usize,
    alpha: f64,
    beta: f64,
) -> f64 {
    let n = labels.len();
    let mut correct = 0usize;
    for i in 0..n {
        let mut row: Vec<f64> = zero_shot[i].iter().map(|&z| f64::from(z)).collect();
        for j in 0..n {
            if j != i {
                row[labels[j]] += alpha * (-beta * (1.0 - f64::from(cos[i][j]))).exp();
            }
        }
        let pred = (0..c)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap_or(0);
        correct += usize::from(pred == labels[i]);
    }
    correct as f64 / n.max(1) as f64
}

/// Leave-one-out mean binary log-loss (over images and labels) of (alpha,
/// beta) on a multi-label support set with signed values `values[j][c]` in
/// `{-1, +1}`.
fn loo_log_loss(
    zero_shot: &[Vec<f32>],
    cos: &[Vec<f32>],
    values: &[Vec<f32>],
    alpha: f64,
    beta: f64,
) -> f64 {
    let n = values.len();
    let mut total = 0.0f64;
    let mut count = 0usize;
    for i in 0..n {
        let mut row: Vec<f64> = zero_shot[i].iter().map(|&z| f64::from(z)).collect();
        for j in (0..n).filter(|&j| j != i) {
            let a = alpha * (-beta * (1.0 - f64::from(cos[i][j]))).exp();
            for (r, &v) in row.iter_mut().zip(&values[j]) {
                *r += a * f64::from(v);
            }
        }
        for (&z, &v) in row.iter().zip(&values[i]) {
            let t = if v > 0.0 { 1.0 } else { 0.0 };
            total += z.max(0.0) - z * t + (-z.abs()).exp().ln_1p();
            count += 1;
        }
    }
    total / count.max(1) as f64
}

impl AdaptationMethod for TipAdapter {
    fn name(&self) -> &'static str {
        if self.fine_tune {
            "tip-adapter-f"
        } else {
            "tip-adapter"
        }
    }

    fn requires_encoder(&self) -> bool {
        false
    }

    fn hyperparameters(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    fn fit(&self, input: &AdaptInput) -> Result<Box<dyn AdaptedClassifier>> {
        input.validate()?;
        let task = input.support.labels.task();
        if !(self.beta.is_finite() && self.alpha.is_finite()) {
            return Err(MethodError::BadHyperparameters {
                method: self.name().into(),
                reason: "alpha and beta must be finite".into(),
            });
        }
        let c = input.texts.num_classes();
        let (text, negative) = match task {
            TaskKind::MultiClass => (input.texts.ensemble_weights()?, None),
            TaskKind::MultiLabel => {
                let (p, n) = pair_text_weights(input, self.name())?;
                (p, Some(n))
            }
        };
        let effective = match &negative {
            Some(n) => (&text - n)?,
            None => text.clone(),
        };
        let keys0 = l2_normalize(&input.support.features.to_dtype(DType::F32)?)?;
        // 0/1 one-hot (multi-class) or multi-hot (multi-label) rows.
        let hot = input.support.targets(c)?;
        let values = match task {
            TaskKind::MultiClass => hot.clone(),
            TaskKind::MultiLabel => hot.affine(2.0, -1.0)?,
        };
        let scale = input.scale();
        let (mut alpha, mut beta) = (self.alpha, self.beta);
        let mut fit_info = serde_json::Map::new();
        if let HyperparameterPolicy::SupportCv { .. } = input.policy {
            let zs: Vec<Vec<f32>> = (keys0.matmul(&effective.t()?)? * scale)?.to_vec2()?;
            let cos: Vec<Vec<f32>> = keys0.matmul(&keys0.t()?)?.to_vec2()?;
            // Higher is better: accuracy, or minus the binary log-loss.
            let score: Box<dyn Fn(f64, f64) -> Result<f64>> = match task {
                TaskKind::MultiClass => {
                    let labels = input.support.class_labels()?.to_vec();
                    Box::new(move |a, b| Ok(loo_accuracy(&zs, &cos, &labels, c, a, b)))
                }
                TaskKind::MultiLabel => {
                    let v: Vec<Vec<f32>> = values.to_vec2()?;
                    Box::new(move |a, b| Ok(-loo_log_loss(&zs, &cos, &v, a, b)))
                }
            };
            let mut best = score(alpha, beta)?;
            for &a in &ALPHA_GRID {
                for &b in &BETA_GRID {
                    let value = score(a, b)?;
                    if value > best {
                        (best, alpha, beta) = (value, a, b);
                    }
                }
            }
            match task {
                TaskKind::MultiClass => fit_info.insert("support_loo_accuracy".into(), best.into()),
                TaskKind::MultiLabel => {
                    fit_info.insert("support_loo_log_loss".into(), (-best).into())
                }
            };
            fit_info.insert("search".into(), "leave-one-out on the support set".into());
        }
        let keys = if self.fine_tune {
            // Queries are the frozen support embeddings; only the keys move.
            let keys = Var::from_tensor(&keys0)?;
            let targets = match task {
                TaskKind::MultiClass => Some(input.support.class_indices()?),
                TaskKind::MultiLabel => None,
            };
            let final_loss = train_full_batch(
                std::slice::from_ref(&keys),
                self.steps,
                self.optimizer,
                || {
                    let logits = tip_logits(
                        &keys0,
                        keys.as_tensor(),
                        &values,
                        &effective,
                        alpha,
                        beta,
                        scale,
                    )?;
                    match &targets {
                        Some(t) => Ok(candle_nn::loss::cross_entropy(&logits, t)?),
                        None => bce_with_logits(&logits, &hot),
                    }
                },
            )?;
            fit_info.insert("final_loss".into(), f64::from(final_loss).into());
            keys.as_tensor().detach()
        } else {
            keys0.clone()
        };
        let hyper = TipAdapter {
            alpha,
            beta,
            ..self.clone()
        };
        let card = make_card(self, input, task, hyper.hyperparameters(), fit_info.into())?;
        Ok(Box::new(TipAdapterClassifier {
            card,
            keys,
            values,
            text,
            negative,
            effective,
            alpha,
            beta,
        }))
    }
}

/// A fitted Tip-Adapter(-F).
#[derive(Debug, Clone)]
pub struct TipAdapterClassifier {
    card: ClassifierCard,
    keys: Tensor,
    values: Tensor,
    /// Zero-shot (multi-label: positive) text weights `[C, D]`.
    text: Tensor,
    /// Multi-label: negative text weights `[C, D]`.
    negative: Option<Tensor>,
    /// `text - negative` for multi-label, else `text`.
    effective: Tensor,
    alpha: f64,
    beta: f64,
}

impl TipAdapterClassifier {
    /// Rebuilds from a saved card and tensors.
    pub fn from_saved(card: ClassifierCard, saved: &SavedTensors) -> Result<Self> {
        let hp: TipAdapter = serde_json::from_value(card.hyperparameters.clone()).map_err(|e| {
            MethodError::BadCheckpoint {
                path: saved.path().to_path_buf(),
                reason: format!("hyperparameters: {e}"),
            }
        })?;
        let keys = saved.get("cache.keys")?;
        let n = keys.dim(0)?;
        let (c, d) = (card.class_names.len(), card.feature_dim);
        let text = saved.get_shaped("text_weights", &[c, d])?;
        let negative = match card.task {
            TaskKind::MultiClass => None,
            TaskKind::MultiLabel => Some(saved.get_shaped("negative_text_weights", &[c, d])?),
        };
        let effective = match &negative {
            Some(n) => (&text - n)?,
            None => text.clone(),
        };
        Ok(Self {
            keys: saved.get_shaped("cache.keys", &[n, d])?,
            values: saved.get_shaped("cache.values", &[n, c])?,
            text,
            negative,
            effective,
            alpha: hp.alpha,
            beta: hp.beta,
            card,
        })
    }
}

impl AdaptedClassifier for TipAdapterClassifier {
    fn card(&self) -> &ClassifierCard {
        &self.card
    }

    fn logits(&self, image_features: &Tensor) -> Result<Tensor> {
        let f = normalized_input(&self.card, image_features)?;
        tip_logits(
            &f,
            &self.keys,
            &self.values,
            &self.effective,
            self.alpha,
            self.beta,
            self.card.logit_scale,
        )
    }

    fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![
            ("cache.keys".into(), self.keys.clone()),
            ("cache.values".into(), self.values.clone()),
            ("text_weights".into(), self.text.clone()),
        ];
        if let Some(n) = &self.negative {
            v.push(("negative_text_weights".into(), n.clone()));
        }
        v
    }
}
