//! CoOp: Context Optimization (Zhou, Yang, Loy & Liu, IJCV 2022, "Learning to
//! Prompt for Vision-Language Models").
//!
//! The hand-written prompt "a photo of a {class}." is replaced by `M`
//! learnable context vectors in the text tower's input embedding space:
//! `t_c = [V]_1 ... [V]_M [CLASS_c] .`; the class weights are the text
//! tower's embeddings of these prompts and an image is scored by
//! `exp(logit_scale) · cos(f, t_c)`. Both encoders are frozen; the context
//! is trained with cross-entropy on the support set.
//!
//! Implementation: the prompt `"X X ... X {class}."` is tokenised and the
//! embeddings at the `X` positions are replaced through the model's
//! `TextPrompt` extension point (as the official code does with its
//! `token_prefix` / `token_suffix` buffers). The image features do not depend
//! on the context, so they are computed once.
//!
//! Defaults (paper / official code): `M = 16` context vectors initialised from
//! N(0, 0.02²), unified context (shared by all classes; `class_specific` =
//! the paper's CSC variant), class token at the end (`middle`, `front` also
//! available); `ctx_init = "a photo of a"` gives the paper's 4-token
//! initialisation (then `M` is the number of its tokens). Optimiser: SGD,
//! lr 0.002, momentum 0.9, cosine decay, 200 epochs of mini-batches of 32
//! (the paper's 16-shot schedule; it uses 50 epochs for 1-2 shots and 100
//! for 4-8). No constant warm-up epoch (the official code warms up at lr
//! 1e-5 for one epoch). AdamW can be chosen through the `optimizer` field.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::prompt_common::{
    build_class_prompts, content_ids, cosine_logits, encode_with_context, image_embeddings,
    init_context, model_scale, normal_init, refuse_feature_fit, train_prompt_params, var,
    BatchScores, ClassPrompts, ClassTokenPosition, MiniBatchSchedule, PromptClassifier, PromptEnv,
    PromptInput, PromptLearningMethod, CLASS_WEIGHTS,
};
use super::Optimizer;
use crate::method::{l2_normalize, AdaptInput, AdaptationMethod, AdaptedClassifier, Result};

/// An extra training loss on the normalised class embeddings `[C, E]`.
pub(crate) type ExtraLoss<'a> = &'a dyn Fn(&Tensor) -> Result<Tensor>;

/// CoOp hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Coop {
    /// Number of context vectors `M` (ignored when `ctx_init` is given: then
    /// `M` is its token count).
    pub n_ctx: usize,
    /// Words whose token embeddings initialise the context (e.g. "a photo of a").
    pub ctx_init: Option<String>,
    /// One context per class (CSC) instead of one shared context.
    pub class_specific: bool,
    /// Where the class name goes.
    pub class_token_position: ClassTokenPosition,
    /// Passes over the support set.
    pub epochs: usize,
    /// Mini-batch size (0 = the whole support set).
    pub batch_size: usize,
    /// Optimiser.
    pub optimizer: Optimizer,
}

impl Default for Coop {
    fn default() -> Self {
        Self {
            n_ctx: 16,
            ctx_init: None,
            class_specific: false,
            class_token_position: ClassTokenPosition::End,
            epochs: 200,
            batch_size: 32,
            optimizer: Optimizer::Sgd {
                lr: 0.002,
                momentum: 0.9,
            },
        }
    }
}

impl Coop {
    /// The number of context vectors actually used with this tokenizer.
    pub fn effective_n_ctx(&self, tok: &medvlm_models::TextTokenizer) -> Result<usize> {
        match self
            .ctx_init
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            Some(words) => Ok(content_ids(tok, words)?.len()),
            None => Ok(self.n_ctx),
        }
    }

    /// The tokenised class prompts with their context positions.
    pub(crate) fn class_prompts(&self, env: &PromptEnv) -> Result<ClassPrompts> {
        build_class_prompts(
            env.tokenizer,
            env.class_names,
            self.effective_n_ctx(env.tokenizer)?,
            self.class_token_position,
            "",
            env.model.device(),
        )
    }

    /// The initial context: `[M, D]`, or `[C, M, D]` class-specific.
    pub(crate) fn initial_context(&self, input: &PromptInput) -> Result<Tensor> {
        let n_ctx = self.effective_n_ctx(input.tokenizer)?;
        let c = input.class_names.len();
        let d = input.model.text_hidden_size();
        match (&self.ctx_init, self.class_specific) {
            (None, true) => normal_init(input.seed, &[c, n_ctx, d], 0.02, input.model.device()),
            (init, csc) => {
                let (ctx, _) = init_context(
                    input.model,
                    input.tokenizer,
                    n_ctx,
                    init.as_deref(),
                    input.seed,
                )?;
                if csc {
                    Ok(ctx.unsqueeze(0)?.repeat((c, 1, 1))?)
                } else {
                    Ok(ctx)
                }
            }
        }
    }

    /// CoOp training, optionally with an extra loss on the normalised class
    /// embeddings (KgCoOp's knowledge-guided term). Returns the learned
    /// context, its normalised class weights and the last training loss.
    pub(crate) fn train(
        &self,
        input: &PromptInput,
        extra: Option<ExtraLoss>,
    ) -> Result<(Tensor, Tensor, f32)> {
        input.validate()?;
        let env = input.env();
        let prompts = self.class_prompts(&env)?;
        let ctx = var(&self.initial_context(input)?)?;
        let feats = image_embeddings(input.model, input.images, None)?;
        let scale = model_scale(input.model)?;
        let schedule = MiniBatchSchedule::new(self.epochs, self.batch_size, self.optimizer);
        let loss = train_prompt_params(input, std::slice::from_ref(&ctx), schedule, |idx| {
            let text = encode_with_context(input.model, &prompts, ctx.as_tensor())?;
            let logits = cosine_logits(&feats.index_select(idx, 0)?, &text, scale)?;
            let extra_loss = match extra {
                Some(f) => Some(f(&l2_normalize(&text)?)?),
                None => None,
            };
            Ok(BatchScores { logits, extra_loss })
        })?;
        let ctx = ctx.as_tensor().detach();
        let weights = l2_normalize(&encode_with_context(input.model, &prompts, &ctx)?)?;
        Ok((ctx, weights, loss))
    }

    /// Class logits of images with the learned context of `fitted`.
    pub(crate) fn logits_for_images(
        &self,
        env: &PromptEnv,
        fitted: &PromptClassifier,
        pixels: &Tensor,
    ) -> Result<Tensor> {
        let ctx = fitted.param_on("ctx", env.model.device())?;
        let prompts = self.class_prompts(env)?;
        let text = encode_with_context(env.model, &prompts, &ctx)?;
        let feats = image_embeddings(env.model, pixels, None)?;
        cosine_logits(&feats, &text, fitted.card().logit_scale)
    }
}

/// Raw class text embeddings `[C, E]` of CoOp prompts with context `ctx`
/// (`[M, D]` or `[C, M, D]`), e.g. to compare a context with a hand-written
/// prompt.
pub fn coop_text_embeddings(
    model: &dyn medvlm_models::VisionLanguageModel,
    tokenizer: &medvlm_models::TextTokenizer,
    class_names: &[String],
    position: ClassTokenPosition,
    ctx: &Tensor,
) -> Result<Tensor> {
    let n_ctx = ctx
        .dims()
        .get(ctx.rank().saturating_sub(2))
        .copied()
        .unwrap_or(0);
    let prompts = build_class_prompts(tokenizer, class_names, n_ctx, position, "", model.device())?;
    encode_with_context(model, &prompts, ctx)
}

impl AdaptationMethod for Coop {
    fn name(&self) -> &'static str {
        "coop"
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

impl PromptLearningMethod for Coop {
    fn fit_prompts(&self, input: &PromptInput) -> Result<PromptClassifier> {
        let (ctx, weights, loss) = self.train(input, None)?;
        let scale = model_scale(input.model)?;
        PromptClassifier::new(
            self,
            input,
            scale,
            vec![("ctx".into(), ctx), (CLASS_WEIGHTS.into(), weights)],
            serde_json::json!({ "final_loss": loss }),
        )
    }
}
