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

use super::encoder_tuning::{tuning_method_entry, EncoderTuningMethod, TuningPlan, TuningSchedule};
use crate::method::Result;
use medvlm_train::finetune::{FinetuneSpec, Mode, Towers};

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

tuning_method_entry!(FullFinetune, "full-finetune");

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
