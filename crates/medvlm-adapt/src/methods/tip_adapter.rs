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

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::{train_full_batch, Optimizer};
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
/// `[N, D]`, one-hot values `[N, C]`, text weights `[C, D]`.
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
        input.require_multi_class(self.name())?;
        if !(self.beta.is_finite() && self.alpha.is_finite()) {
            return Err(MethodError::BadHyperparameters {
                method: self.name().into(),
                reason: "alpha and beta must be finite".into(),
            });
        }
        let c = input.texts.num_classes();
        let text = input.texts.ensemble_weights()?;
        let keys0 = l2_normalize(&input.support.features.to_dtype(DType::F32)?)?;
        let values = input.support.targets(c)?;
        let labels = input.support.class_labels()?.to_vec();
        let scale = input.scale();
        let (mut alpha, mut beta) = (self.alpha, self.beta);
        let mut fit_info = serde_json::Map::new();
        if let HyperparameterPolicy::SupportCv { .. } = input.policy {
            let zs: Vec<Vec<f32>> = (keys0.matmul(&text.t()?)? * scale)?.to_vec2()?;
            let cos: Vec<Vec<f32>> = keys0.matmul(&keys0.t()?)?.to_vec2()?;
            let mut best = loo_accuracy(&zs, &cos, &labels, c, alpha, beta);
            for &a in &ALPHA_GRID {
                for &b in &BETA_GRID {
                    let acc = loo_accuracy(&zs, &cos, &labels, c, a, b);
                    if acc > best {
                        (best, alpha, beta) = (acc, a, b);
                    }
                }
            }
            fit_info.insert("support_loo_accuracy".into(), best.into());
            fit_info.insert("search".into(), "leave-one-out on the support set".into());
        }
        let keys = if self.fine_tune {
            // Queries are the frozen support embeddings; only the keys move.
            let keys = Var::from_tensor(&keys0)?;
            let targets = input.support.class_indices()?;
            let final_loss = train_full_batch(
                std::slice::from_ref(&keys),
                self.steps,
                self.optimizer,
                || {
                    let logits =
                        tip_logits(&keys0, keys.as_tensor(), &values, &text, alpha, beta, scale)?;
                    Ok(candle_nn::loss::cross_entropy(&logits, &targets)?)
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
        let card = make_card(
            self,
            input,
            TaskKind::MultiClass,
            hyper.hyperparameters(),
            fit_info.into(),
        )?;
        Ok(Box::new(TipAdapterClassifier {
            card,
            keys,
            values,
            text,
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
    text: Tensor,
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
        Ok(Self {
            keys: saved.get_shaped("cache.keys", &[n, d])?,
            values: saved.get_shaped("cache.values", &[n, c])?,
            text: saved.get_shaped("text_weights", &[c, d])?,
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
            &self.text,
            self.alpha,
            self.beta,
            self.card.logit_scale,
        )
    }

    fn tensors(&self) -> Vec<(String, Tensor)> {
        vec![
            ("cache.keys".into(), self.keys.clone()),
            ("cache.values".into(), self.values.clone()),
            ("text_weights".into(), self.text.clone()),
        ]
    }
}
