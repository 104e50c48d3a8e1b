//! Registry entries of the methods that adapt the encoders themselves:
//! strategy 2, prompt learning (CoOp, Zhou et al., IJCV 2022; CoCoOp, Zhou et
//! al., CVPR 2022; KgCoOp, Yao et al., CVPR 2023; VPT, Jia et al., ECCV 2022;
//! MaPLe, Khattak et al., CVPR 2023) and strategy 4, encoder fine-tuning
//! (CLIP-LoRA, Zanella & Ben Ayed, CVPRW 2024; BitFit, Ben Zaken et al., ACL
//! 2022; partial and full fine-tuning).
//!
//! They need gradients through the image or text tower, so they cannot run
//! on a feature cache: given [`FeatureAccess::FrozenFeatures`] they fail with
//! [`MethodError::NeedsEncoder`], which names the frozen-feature methods that
//! would run instead. Their training loops are not part of this crate yet;
//! with encoder access they report [`MethodError::NotImplemented`].

use crate::method::{
    AdaptInput, AdaptationMethod, AdaptedClassifier, FeatureAccess, MethodError, Result,
};

/// Names of the encoder-access methods.
pub const ENCODER_METHOD_NAMES: &[&str] = &[
    "coop",
    "cocoop",
    "kgcoop",
    "vpt",
    "maple",
    "lora",
    "bitfit",
    "partial-finetune",
    "full-finetune",
];

/// A registry entry for a method that needs encoder access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderMethod {
    name: &'static str,
}

impl EncoderMethod {
    /// The entry registered as `name`, if any.
    pub fn from_name(name: &str) -> Option<Self> {
        ENCODER_METHOD_NAMES
            .iter()
            .find(|&&n| n == name)
            .map(|&name| Self { name })
    }
}

impl AdaptationMethod for EncoderMethod {
    fn name(&self) -> &'static str {
        self.name
    }

    fn requires_encoder(&self) -> bool {
        true
    }

    fn hyperparameters(&self) -> serde_json::Value {
        serde_json::json!({})
    }

    fn fit(&self, input: &AdaptInput) -> Result<Box<dyn AdaptedClassifier>> {
        match input.access {
            FeatureAccess::FrozenFeatures => Err(MethodError::NeedsEncoder {
                method: self.name.into(),
                alternatives: crate::method::frozen_feature_method_names().join(", "),
            }),
            FeatureAccess::EncoderAccess => Err(MethodError::NotImplemented(self.name.into())),
        }
    }
}
