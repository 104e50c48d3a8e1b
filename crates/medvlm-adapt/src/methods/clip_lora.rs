//! LoRA in the CLIP-LoRA setting: Zanella & Ben Ayed, "Low-Rank Few-Shot
//! Adaptation of Vision-Language Models", CVPR Workshops 2024.
//!
//! Low-rank adapters (Hu et al., ICLR 2022; [`medvlm_train::lora`]) on the query,
//! key and value projections of every block of both encoders, trained with
//! cross-entropy over the class prompts on the support images; the base
//! weights stay frozen. Defaults (the paper's): rank 2, alpha 1, dropout
//! 0.25, targets `q`, `k`, `v`, both towers; AdamW lr 2e-4, weight decay
//! 1e-2, batch 32, 500 updates per shot with a cosine decay. The shared loop
//! is [`super::encoder_tuning`].

use serde::{Deserialize, Serialize};

use super::encoder_tuning::{tuning_method_entry, EncoderTuningMethod, TuningPlan, TuningSchedule};
use crate::method::{MethodError, Result};
use medvlm_train::finetune::{FinetuneSpec, Mode, Towers};
use medvlm_train::lora::LoraSpec;

/// CLIP-LoRA few-shot fine-tuning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipLora {
    /// Adapter rank `r`.
    pub rank: usize,
    /// Scaling numerator: updates are `(alpha / rank) B A`.
    pub alpha: f64,
    /// Dropout on the adapter input during training.
    pub dropout: f64,
    /// Adapted layers (roles `q`, `k`, `v`, `out`, `fc1`, `fc2` or module names; see
    /// [`medvlm_train::lora`]).
    pub targets: Vec<String>,
    /// Towers that get adapters.
    pub towers: Towers,
    /// Optimisation.
    #[serde(flatten)]
    pub schedule: TuningSchedule,
}

impl Default for ClipLora {
    fn default() -> Self {
        let paper = LoraSpec::clip_lora();
        Self {
            rank: paper.rank,
            alpha: paper.alpha,
            dropout: paper.dropout,
            targets: paper.targets,
            towers: paper.towers,
            schedule: TuningSchedule::clip_lora(2e-4, 1e-2),
        }
    }
}

impl ClipLora {
    /// The adapters these hyperparameters describe.
    pub fn lora_spec(&self) -> LoraSpec {
        LoraSpec {
            rank: self.rank,
            alpha: self.alpha,
            dropout: self.dropout,
            targets: self.targets.clone(),
            towers: self.towers,
        }
    }
}

tuning_method_entry!(ClipLora, "lora");

impl EncoderTuningMethod for ClipLora {
    fn plan(&self) -> Result<TuningPlan> {
        let bad = |reason: &str| MethodError::BadHyperparameters {
            method: "lora".into(),
            reason: reason.into(),
        };
        if self.rank == 0 {
            return Err(bad("rank must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(bad("dropout must be in [0, 1)"));
        }
        if self.targets.is_empty() {
            return Err(bad("targets must name at least one layer"));
        }
        Ok(TuningPlan {
            spec: FinetuneSpec {
                mode: Mode::Lora(self.lora_spec()),
                towers: self.towers,
            },
            schedule: self.schedule.clone(),
        })
    }
}
