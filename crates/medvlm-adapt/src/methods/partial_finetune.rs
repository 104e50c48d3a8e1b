//! Partial fine-tuning: the last blocks of each encoder, with the final norms
//! and projections, the rest frozen — the "fine-tune the top layers" baseline
//! of transfer learning (Yosinski et al., NeurIPS 2014), here in the few-shot
//! setting shared with CLIP-LoRA ([`super::encoder_tuning`]): cross-entropy
//! over the class prompts on the support images.
//!
//! Defaults: the last block (`last_k = 1`) of both towers; AdamW lr 1e-5 and
//! weight decay 0.1 (the full fine-tuning settings of CLIP in WiSE-FT,
//! Wortsman et al., CVPR 2022, and FLYP, Goyal et al., CVPR 2023); batch 32,
//! 500 updates per shot, cosine decay.

use serde::{Deserialize, Serialize};

use super::encoder_tuning::{tuning_method_entry, EncoderTuningMethod, TuningPlan, TuningSchedule};
use crate::method::{AdaptationMethod, MethodError, Result};
use medvlm_train::finetune::{FinetuneSpec, Mode, Towers};

/// Few-shot fine-tuning of the last blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialFinetune {
    /// Blocks trained per tower, counted from the output.
    pub last_k: usize,
    /// Towers trained.
    pub towers: Towers,
    /// Optimisation.
    #[serde(flatten)]
    pub schedule: TuningSchedule,
}

impl Default for PartialFinetune {
    fn default() -> Self {
        Self {
            last_k: 1,
            towers: Towers::Both,
            schedule: TuningSchedule::clip_lora(1e-5, 0.1),
        }
    }
}

tuning_method_entry!(PartialFinetune, "partial-finetune");

impl EncoderTuningMethod for PartialFinetune {
    fn plan(&self) -> Result<TuningPlan> {
        if self.last_k == 0 {
            return Err(MethodError::BadHyperparameters {
                method: self.name().into(),
                reason: "last_k must be at least 1".into(),
            });
        }
        Ok(TuningPlan {
            spec: FinetuneSpec {
                mode: Mode::Partial {
                    last_k: self.last_k,
                },
                towers: self.towers,
            },
            schedule: self.schedule.clone(),
        })
    }
}
