//! BitFit: Ben Zaken, Ravfogel & Goldberg, "BitFit: Simple Parameter-efficient
//! Fine-tuning for Transformer-based Masked Language-models", ACL 2022.
//!
//! Only the bias terms of the encoders move (every `*.bias` of the chosen
//! towers, including layer-norm biases), trained in the few-shot setting
//! shared with CLIP-LoRA ([`super::encoder_tuning`]): cross-entropy over the
//! class prompts on the support images. Defaults: both towers; AdamW lr 1e-3
//! (the top of the paper's 1e-4..1e-3 range: bias-only updates are small),
//! no weight decay; batch 32, 500 updates per shot, cosine decay.

use serde::{Deserialize, Serialize};

use super::encoder_tuning::{tuning_method_entry, EncoderTuningMethod, TuningPlan, TuningSchedule};
use crate::method::Result;
use medvlm_train::finetune::{FinetuneSpec, Mode, Towers};

/// BitFit few-shot fine-tuning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BitFit {
    /// Towers whose biases are trained.
    pub towers: Towers,
    /// Optimisation.
    #[serde(flatten)]
    pub schedule: TuningSchedule,
}

impl Default for BitFit {
    fn default() -> Self {
        Self {
            towers: Towers::Both,
            schedule: TuningSchedule::clip_lora(1e-3, 0.0),
        }
    }
}

tuning_method_entry!(BitFit, "bitfit");

impl EncoderTuningMethod for BitFit {
    fn plan(&self) -> Result<TuningPlan> {
        Ok(TuningPlan {
            spec: FinetuneSpec {
                mode: Mode::Bitfit,
                towers: self.towers,
            },
            schedule: self.schedule.clone(),
        })
    }
}
