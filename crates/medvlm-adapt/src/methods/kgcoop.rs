//! KgCoOp: Knowledge-guided Context Optimization (Yao, Zhang & Xu, CVPR 2023,
//! "Visual-Language Prompt Tuning with Knowledge-guided Context
//! Optimization").
//!
//! CoOp ([`super::coop`]) plus a term that keeps the learned class text
//! embeddings close to the hand-crafted ones:
//! `L = L_ce + λ · (1/C) Σ_c ||w_c − w_c^clip||²`, with `w_c` the normalised
//! embedding of the learned prompt of class `c` and `w_c^clip` that of the
//! hand-written template (here "a photo of a {}."), both L2-normalised.
//! The paper's formula is implemented; the official code writes the same
//! term as `1 − mean cos(w, w^clip)`, which is half of it for unit vectors.
//!
//! Defaults (paper / official configs): `λ = 8.0`, 4 context tokens
//! initialised from "a photo of a", unified context, class token at the
//! end. The training schedule is CoOp's (SGD lr 0.002, momentum 0.9, cosine
//! decay, 200 epochs of mini-batches of 32); the paper's per-dataset
//! schedules were not reproduced.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::coop::Coop;
use super::prompt_common::{
    handcrafted_weights, model_scale, refuse_feature_fit, PromptClassifier, PromptInput,
    PromptLearningMethod, CLASS_WEIGHTS,
};
use crate::method::{AdaptInput, AdaptationMethod, AdaptedClassifier, Result};

/// KgCoOp hyperparameters: CoOp's plus the knowledge-guided weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KgCoop {
    /// The CoOp part.
    #[serde(flatten)]
    pub coop: Coop,
    /// Weight λ of the knowledge-guided term.
    pub lambda: f64,
    /// Hand-crafted template (`{}` = class name) giving `w^clip`.
    pub template: String,
}

impl Default for KgCoop {
    fn default() -> Self {
        Self {
            coop: Coop {
                n_ctx: 4,
                ctx_init: Some("a photo of a".into()),
                ..Coop::default()
            },
            lambda: 8.0,
            template: "a photo of a {}.".into(),
        }
    }
}

/// The knowledge-guided term `(1/C) Σ_c ||w_c − w_c^clip||²` (without λ) of
/// L2-normalised class embeddings `[C, E]`; a scalar tensor.
pub fn kg_penalty(learned: &Tensor, handcrafted: &Tensor) -> Result<Tensor> {
    let diff = (learned - handcrafted)?;
    Ok(diff.sqr()?.sum(1)?.mean(0)?)
}

impl KgCoop {
    /// The normalised hand-crafted class embeddings `w^clip` `[C, E]`: the ensemble of the
    /// input's class prompts when given, else the template.
    pub fn handcrafted_weights(&self, input: &PromptInput) -> Result<Tensor> {
        Ok(handcrafted_weights(input, &self.template)?.0)
    }
}

impl AdaptationMethod for KgCoop {
    fn name(&self) -> &'static str {
        "kgcoop"
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

impl PromptLearningMethod for KgCoop {
    fn fit_prompts(&self, input: &PromptInput) -> Result<PromptClassifier> {
        input.validate()?;
        let anchor = self.handcrafted_weights(input)?;
        let lambda = self.lambda;
        let extra = |w: &Tensor| -> Result<Tensor> { Ok((kg_penalty(w, &anchor)? * lambda)?) };
        let (ctx, weights, loss) = self.coop.train(input, Some(&extra))?;
        let penalty = kg_penalty(&weights, &anchor)?.to_scalar::<f32>()?;
        let scale = model_scale(input.model)?;
        PromptClassifier::new(
            self,
            input,
            scale,
            vec![("ctx".into(), ctx), (CLASS_WEIGHTS.into(), weights)],
            serde_json::json!({ "final_loss": loss, "final_kg_penalty": penalty }),
        )
    }
}
