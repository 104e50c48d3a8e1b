//! TaskRes (Yu et al., CVPR 2023, "Task Residual for Tuning Vision-Language
//! Models").
//!
//! The zero-shot text classifier `T` `[C, D]` is kept frozen and a learnable
//! task residual `X` `[C, D]`, initialised at zero, is added with a scaling
//! factor: `W = T + alpha X`; logits are `s * norm(f) . norm(W_c)` (the
//! official code renormalises the prototypes).
//!
//! Defaults: `alpha = 0.5` (the paper's value for most datasets), trained
//! with cross-entropy. The paper uses SGD (lr 2e-3 for most datasets, 2e-4
//! for ImageNet) for 100-200 epochs on augmented images; here: AdamW
//! (lr 1e-3, no weight decay, cosine decay) for 200 full-batch steps on the
//! cached support embeddings. Why 1e-3: with CLIP's logit scale of 100 the
//! gradient of a residual element is of order one, so the paper's SGD moves
//! each element by about its learning rate (2e-3) per step, and AdamW moves
//! each element by about its learning rate whatever the gradient's scale.
//! (Until 2026-11-30 the default was 1e-4, ten times smaller than that; on
//! the quickstart model, whose embedding has 64 dimensions, the residual then
//! did not change a single prediction: docs/adapt.md.)

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::{train_full_batch, Optimizer};
use crate::fewshot::TaskKind;
use crate::method::{
    l2_normalize, make_card, normalized_input, AdaptInput, AdaptationMethod, AdaptedClassifier,
    ClassifierCard, MethodError, Result, SavedTensors,
};

/// TaskRes hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRes {
    /// Scaling of the residual.
    pub alpha: f64,
    /// Full-batch training steps.
    pub steps: usize,
    /// Optimiser.
    pub optimizer: Optimizer,
}

impl Default for TaskRes {
    fn default() -> Self {
        Self {
            alpha: 0.5,
            steps: 200,
            optimizer: Optimizer::AdamW {
                lr: 1e-3,
                weight_decay: 0.0,
                eps: 1e-8,
            },
        }
    }
}

/// `s * f . norm(T + alpha X)^T` for normalised `f`.
pub fn taskres_logits(
    f: &Tensor,
    base: &Tensor,
    residual: &Tensor,
    alpha: f64,
    scale: f64,
) -> Result<Tensor> {
    let w = l2_normalize(&(base + (residual * alpha)?)?)?;
    Ok((f.matmul(&w.t()?)? * scale)?)
}

impl AdaptationMethod for TaskRes {
    fn name(&self) -> &'static str {
        "taskres"
    }

    fn requires_encoder(&self) -> bool {
        false
    }

    fn hyperparameters(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    fn fit(&self, input: &AdaptInput) -> Result<Box<dyn AdaptedClassifier>> {
        input.require_multi_class(self.name())?;
        let base = input.texts.ensemble_weights()?;
        let residual = Var::zeros(base.dims(), DType::F32, base.device())?;
        let f = l2_normalize(&input.support.features.to_dtype(DType::F32)?)?;
        let targets = input.support.class_indices()?;
        let scale = input.scale();
        let final_loss = train_full_batch(
            std::slice::from_ref(&residual),
            self.steps,
            self.optimizer,
            || {
                let logits = taskres_logits(&f, &base, residual.as_tensor(), self.alpha, scale)?;
                Ok(candle_nn::loss::cross_entropy(&logits, &targets)?)
            },
        )?;
        let card = make_card(
            self,
            input,
            TaskKind::MultiClass,
            self.hyperparameters(),
            serde_json::json!({ "final_loss": final_loss }),
        )?;
        Ok(Box::new(TaskResClassifier {
            card,
            base,
            residual: residual.as_tensor().detach(),
            alpha: self.alpha,
        }))
    }
}

/// A fitted TaskRes classifier.
#[derive(Debug, Clone)]
pub struct TaskResClassifier {
    card: ClassifierCard,
    base: Tensor,
    residual: Tensor,
    alpha: f64,
}

impl TaskResClassifier {
    /// Rebuilds from a saved card and tensors.
    pub fn from_saved(card: ClassifierCard, saved: &SavedTensors) -> Result<Self> {
        let hp: TaskRes = serde_json::from_value(card.hyperparameters.clone()).map_err(|e| {
            MethodError::BadCheckpoint {
                path: saved.path().to_path_buf(),
                reason: format!("hyperparameters: {e}"),
            }
        })?;
        let shape = [card.class_names.len(), card.feature_dim];
        Ok(Self {
            base: saved.get_shaped("text_weights", &shape)?,
            residual: saved.get_shaped("task_residual", &shape)?,
            alpha: hp.alpha,
            card,
        })
    }
}

impl AdaptedClassifier for TaskResClassifier {
    fn card(&self) -> &ClassifierCard {
        &self.card
    }

    fn logits(&self, image_features: &Tensor) -> Result<Tensor> {
        let f = normalized_input(&self.card, image_features)?;
        taskres_logits(
            &f,
            &self.base,
            &self.residual,
            self.alpha,
            self.card.logit_scale,
        )
    }

    fn tensors(&self) -> Vec<(String, Tensor)> {
        vec![
            ("text_weights".into(), self.base.clone()),
            ("task_residual".into(), self.residual.clone()),
        ]
    }
}
