//! Full fine-tuning of both encoders with the class prompts as the classifier,
//! as in FLYP (Goyal et al., "Finetune like you pretrain", CVPR 2023) and
//! WiSE-FT's end-to-end fine-tuning (Wortsman et al., CVPR 2022), in the
//! few-shot setting shared with CLIP-LoRA ([`super::encoder_tuning`]):
//! cross-entropy over the class prompts on the support images.
//!
//! Defaults: every weight of both towers (the logit scale stays fixed);
//! AdamW lr 1e-5, weight decay 0.1 (those papers' settings for CLIP); batch
//! 32, 500 updates per shot, cosine decay. With a few images per class, full
//! fine-tuning is the strategy most prone to overfitting; it is here as the
//! reference point the parameter-efficient methods are measured against.

use serde::{Deserialize, Serialize};

use super::encoder_tuning::{refuse_feature_fit, EncoderTuningMethod, TuningPlan, TuningSchedule};
use crate::finetune::{FinetuneSpec, Mode, Towers};
use crate::method::{AdaptInput, AdaptationMethod, AdaptedClassifier, Result};

/// Few-shot full fine-tuning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FullFinetune {
    /// Towers trained.
    pub towers: Towers,
    /// Optimisation.
    #[serde(flatten)]
    pub schedule: TuningSchedule,
}

impl Default for FullFinetune {
    fn default() -> Self {
        Self {
            towers: Towers::Both,
            schedule: TuningSchedule::clip_lora(1e-5, 0.1),
        }
    }
}

impl AdaptationMethod for FullFinetune {
    fn name(&self) -> &'static str {
        "full-finetune"
    }
    fn requires_encoder(&self) -> bool {
        true
    }
    fn hyperparameters(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
    fn fit(&self, input: &AdaptInput) -> Result<Box<dyn AdaptedClassifier>> {
        Err(refuse_feature_fit(self.name(), input))
    }
}

impl EncoderTuningMethod for FullFinetune {
    fn plan(&self) -> Result<TuningPlan> {
        Ok(TuningPlan {
            spec: FinetuneSpec {
                mode: Mode::Full,
                towers: self.towers,
            },
            schedule: self.schedule.clone(),
        })
    }
}
