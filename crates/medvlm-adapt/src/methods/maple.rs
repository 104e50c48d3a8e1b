//! MaPLe: Multi-modal Prompt Learning (Khattak, Rasheed, Maaz, Khan & Khan,
//! CVPR 2023).
//!
//! Language context vectors `P` `[M, D_t]` are learned in the text tower's
//! input space (as in CoOp) and the vision prompts are *coupled* to them:
//! `P̃ = F(P)` with a linear coupling function `F: D_t → D_v`, inserted as
//! prompt tokens of the image tower. Both prompts are trained jointly with
//! cross-entropy on `exp(logit_scale) · cos(f, t_c)`; the encoders stay
//! frozen.
//!
//! **Limitation (honest):** the paper uses deep prompting — independent
//! language prompts and their coupled vision prompts in the first `J = 9`
//! layers of both towers. medvlm's text extension point (`TextPrompt`)
//! only replaces *input* token embeddings, so this is *shallow* MaPLe
//! (`J = 1`): input-level language context plus coupled vision prompts at
//! the input of the image tower. `prompt_depth` is kept as a field so that
//! cards are explicit; any value other than 1 is refused.
//!
//! Defaults (paper / official config): 2 context tokens initialised from
//! the first two words of "a photo of a" (the rest, "of a", stays fixed text,
//! as in the official code), coupling initialised like PyTorch's
//! `nn.Linear`, SGD lr 0.0035, momentum 0.9, cosine decay (the paper: batch
//! size 4, 5 epochs), which are the defaults here.

use candle_core::{Tensor, Var};
use medvlm_models::VisualPrompts;
use serde::{Deserialize, Serialize};

use super::prompt_common::{
    build_class_prompts, cosine_logits, encode_with_context, image_embeddings, init_context,
    model_scale, refuse_feature_fit, train_prompt_params, uniform_tensor, var, ClassPrompts,
    ClassTokenPosition, MiniBatchSchedule, PromptClassifier, PromptEnv, PromptInput,
    PromptLearningMethod,
};
use super::Optimizer;
use crate::method::{AdaptInput, AdaptationMethod, AdaptedClassifier, MethodError, Result};

const COUPLING_W: &str = "coupling.weight";
const COUPLING_B: &str = "coupling.bias";

/// MaPLe hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Maple {
    /// Number of language context tokens (= vision prompt tokens).
    pub n_ctx: usize,
    /// Words initialising the context; the first `n_ctx` are learned, the
    /// rest stay as fixed text before the class name.
    pub ctx_init: Option<String>,
    /// Prompt depth J; only 1 (shallow) is supported, see the module docs.
    pub prompt_depth: usize,
    /// Passes over the support set.
    pub epochs: usize,
    /// Mini-batch size (0 = the whole support set).
    pub batch_size: usize,
    /// Optimiser.
    pub optimizer: Optimizer,
}

impl Default for Maple {
    fn default() -> Self {
        Self {
            n_ctx: 2,
            ctx_init: Some("a photo of a".into()),
            prompt_depth: 1,
            epochs: 5,
            batch_size: 4,
            optimizer: Optimizer::Sgd {
                lr: 0.0035,
                momentum: 0.9,
            },
        }
    }
}

/// The coupled vision prompts `F(P) = P Wᵀ + b`, `[M, D_v]`.
pub fn couple(ctx: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Ok(ctx.matmul(&weight.t()?)?.broadcast_add(bias)?)
}

impl Maple {
    fn check_depth(&self) -> Result<()> {
        if self.prompt_depth != 1 {
            return Err(MethodError::BadHyperparameters {
                method: "maple".into(),
                reason: format!(
                    "prompt_depth {} is not supported: the models' text extension point only \
                     replaces input token embeddings, so medvlm implements shallow MaPLe \
                     (prompt_depth 1)",
                    self.prompt_depth
                ),
            });
        }
        Ok(())
    }

    /// Fixed words after the learned context (from `ctx_init`).
    fn rest_words(&self) -> String {
        match &self.ctx_init {
            Some(w) => w
                .split_whitespace()
                .skip(self.n_ctx)
                .collect::<Vec<_>>()
                .join(" "),
            None => String::new(),
        }
    }

    fn class_prompts(&self, env: &PromptEnv) -> Result<ClassPrompts> {
        build_class_prompts(
            env.tokenizer,
            env.class_names,
            self.n_ctx,
            ClassTokenPosition::End,
            &self.rest_words(),
            env.model.device(),
        )
    }

    fn logits(
        model: &dyn medvlm_models::VisionLanguageModel,
        prompts: &ClassPrompts,
        pixels: &Tensor,
        ctx: &Tensor,
        coupling: [&Tensor; 2],
        scale: f64,
    ) -> Result<Tensor> {
        let text = encode_with_context(model, prompts, ctx)?;
        let visual = VisualPrompts {
            shallow: Some(couple(ctx, coupling[0], coupling[1])?),
            deep: Vec::new(),
        };
        let feats = image_embeddings(model, pixels, Some(&visual))?;
        cosine_logits(&feats, &text, scale)
    }

    /// Class logits of images with the learned prompts of `fitted`.
    pub(crate) fn logits_for_images(
        &self,
        env: &PromptEnv,
        fitted: &PromptClassifier,
        pixels: &Tensor,
    ) -> Result<Tensor> {
        self.check_depth()?;
        let dev = env.model.device();
        let ctx = fitted.param_on("ctx", dev)?;
        let w = fitted.param_on(COUPLING_W, dev)?;
        let b = fitted.param_on(COUPLING_B, dev)?;
        let prompts = self.class_prompts(env)?;
        Self::logits(
            env.model,
            &prompts,
            pixels,
            &ctx,
            [&w, &b],
            fitted.card_scale(),
        )
    }
}

impl AdaptationMethod for Maple {
    fn name(&self) -> &'static str {
        "maple"
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

impl PromptLearningMethod for Maple {
    fn needs_visual_prompts(&self) -> bool {
        true
    }

    fn fit_prompts(&self, input: &PromptInput) -> Result<PromptClassifier> {
        self.check_depth()?;
        input.validate()?;
        let model = input.model;
        let dev = model.device();
        let env = input.env();
        let prompts = self.class_prompts(&env)?;
        let (ctx0, _) = init_context(
            model,
            input.tokenizer,
            self.n_ctx,
            self.ctx_init.as_deref(),
            input.seed,
        )?;
        let ctx = var(&ctx0)?;
        let dt = model.text_hidden_size();
        let dv = model.vision_hidden_size();
        let bound = 1.0 / (dt as f64).sqrt();
        let w = Var::from_tensor(&uniform_tensor(input.seed + 1, &[dv, dt], bound, dev)?)?;
        let b = Var::from_tensor(&uniform_tensor(input.seed + 2, &[dv], bound, dev)?)?;
        // Mini-batches are index_select-ed on the model's device.
        let images = input.images.to_device(dev)?;
        let scale = model_scale(model)?;
        let vars = vec![ctx.clone(), w.clone(), b.clone()];
        let schedule = MiniBatchSchedule::new(self.epochs, self.batch_size, self.optimizer);
        let loss = train_prompt_params(input, &vars, schedule, |idx| {
            let pixels = images.index_select(idx, 0)?;
            let coupling = [w.as_tensor(), b.as_tensor()];
            Ok(Self::logits(model, &prompts, &pixels, ctx.as_tensor(), coupling, scale)?.into())
        })?;
        PromptClassifier::new(
            self,
            input,
            scale,
            vec![
                ("ctx".into(), ctx.as_tensor().detach()),
                (COUPLING_W.into(), w.as_tensor().detach()),
                (COUPLING_B.into(), b.as_tensor().detach()),
            ],
            serde_json::json!({ "final_loss": loss }),
        )
    }
}
