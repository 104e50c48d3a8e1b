//! CoCoOp: Conditional Context Optimization (Zhou, Yang, Loy & Liu, CVPR
//! 2022, "Conditional Prompt Learning for Vision-Language Models").
//!
//! CoOp's context is made image-conditional: a light meta-network
//! `h = Linear(E, E/r) → ReLU → Linear(E/r, D)` maps the normalised image
//! embedding `f` to a bias `π = h(f)` added to every context vector,
//! `v_m(f) = v_m + π`. Each image therefore has its own class prompts, and
//! the text tower runs once per (image, class) pair — `B·C` prompts per
//! batch, which is why CoCoOp is much slower than CoOp.
//!
//! Defaults (paper / official code): 4 context tokens initialised from "a
//! photo of a", class token at the end, meta-net reduction `r = 16`
//! (hidden size at least 1), PyTorch's default Linear initialisation; SGD,
//! lr 0.002, momentum 0.9, cosine decay (the paper: batch size 1, 10
//! epochs), which are the defaults here: 10 epochs of single images.

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::coop::Coop;
use super::prompt_common::{
    cosine_logits, encode_with_context, image_embeddings, model_scale, refuse_feature_fit,
    train_prompt_params, uniform_tensor, var, ClassPrompts, ClassTokenPosition, MiniBatchSchedule,
    PromptClassifier, PromptEnv, PromptInput, PromptLearningMethod,
};
use super::Optimizer;
use crate::method::{l2_normalize, AdaptInput, AdaptationMethod, AdaptedClassifier, Result};

const W1: &str = "meta_net.linear1.weight";
const B1: &str = "meta_net.linear1.bias";
const W2: &str = "meta_net.linear2.weight";
const B2: &str = "meta_net.linear2.bias";

/// CoCoOp hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cocoop {
    /// Number of context vectors (ignored when `ctx_init` is given).
    pub n_ctx: usize,
    /// Words initialising the context.
    pub ctx_init: Option<String>,
    /// Where the class name goes.
    pub class_token_position: ClassTokenPosition,
    /// Reduction factor of the meta-net's hidden layer.
    pub meta_reduction: usize,
    /// Passes over the support set.
    pub epochs: usize,
    /// Mini-batch size (0 = the whole support set).
    pub batch_size: usize,
    /// Optimiser.
    pub optimizer: Optimizer,
}

impl Default for Cocoop {
    fn default() -> Self {
        Self {
            n_ctx: 4,
            ctx_init: Some("a photo of a".into()),
            class_token_position: ClassTokenPosition::End,
            meta_reduction: 16,
            epochs: 10,
            batch_size: 1,
            optimizer: Optimizer::Sgd {
                lr: 0.002,
                momentum: 0.9,
            },
        }
    }
}

/// The meta-net's bias `π = W2 · relu(W1 · f + b1) + b2`, `[B, D]`, for
/// normalised image embeddings `f` `[B, E]`.
pub fn meta_net_bias(
    f: &Tensor,
    w1: &Tensor,
    b1: &Tensor,
    w2: &Tensor,
    b2: &Tensor,
) -> Result<Tensor> {
    let h = f.matmul(&w1.t()?)?.broadcast_add(b1)?.relu()?;
    Ok(h.matmul(&w2.t()?)?.broadcast_add(b2)?)
}

impl Cocoop {
    fn as_coop(&self) -> Coop {
        Coop {
            n_ctx: self.n_ctx,
            ctx_init: self.ctx_init.clone(),
            class_specific: false,
            class_token_position: self.class_token_position,
            ..Coop::default()
        }
    }

    /// Logits `[B, C]`: per image, the class prompts with context
    /// `ctx + π(f)` scored against that image.
    fn logits(
        model: &dyn medvlm_models::VisionLanguageModel,
        prompts: &ClassPrompts,
        feats: &Tensor,
        ctx: &Tensor,
        meta: [&Tensor; 4],
        scale: f64,
    ) -> Result<Tensor> {
        let f = l2_normalize(feats)?;
        let bias = meta_net_bias(&f, meta[0], meta[1], meta[2], meta[3])?;
        let b = f.dim(0)?;
        let mut rows = Vec::with_capacity(b);
        for i in 0..b {
            let ctx_i = ctx.broadcast_add(&bias.narrow(0, i, 1)?)?;
            let text = encode_with_context(model, prompts, &ctx_i)?;
            rows.push(cosine_logits(&f.narrow(0, i, 1)?, &text, scale)?);
        }
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// Class logits of images with the learned context and meta-net of `fitted`.
    pub(crate) fn logits_for_images(
        &self,
        env: &PromptEnv,
        fitted: &PromptClassifier,
        pixels: &Tensor,
    ) -> Result<Tensor> {
        let dev = env.model.device();
        let ctx = fitted.param_on("ctx", dev)?;
        let meta = [
            fitted.param_on(W1, dev)?,
            fitted.param_on(B1, dev)?,
            fitted.param_on(W2, dev)?,
            fitted.param_on(B2, dev)?,
        ];
        let prompts = self.as_coop().class_prompts(env)?;
        let feats = image_embeddings(env.model, pixels, None)?;
        Self::logits(
            env.model,
            &prompts,
            &feats,
            &ctx,
            [&meta[0], &meta[1], &meta[2], &meta[3]],
            fitted.card_scale(),
        )
    }
}

impl AdaptationMethod for Cocoop {
    fn name(&self) -> &'static str {
        "cocoop"
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

impl PromptLearningMethod for Cocoop {
    fn fit_prompts(&self, input: &PromptInput) -> Result<PromptClassifier> {
        input.validate()?;
        let coop = self.as_coop();
        let env = input.env();
        let model = input.model;
        let dev = model.device();
        let prompts = coop.class_prompts(&env)?;
        let ctx = var(&coop.initial_context(input)?)?;
        let e = model.embed_dim();
        let d = model.text_hidden_size();
        let hidden = (e / self.meta_reduction.max(1)).max(1);
        let bound1 = 1.0 / (e as f64).sqrt();
        let bound2 = 1.0 / (hidden as f64).sqrt();
        let s = input.seed;
        let meta = [
            Var::from_tensor(&uniform_tensor(s + 1, &[hidden, e], bound1, dev)?)?,
            Var::from_tensor(&uniform_tensor(s + 2, &[hidden], bound1, dev)?)?,
            Var::from_tensor(&uniform_tensor(s + 3, &[d, hidden], bound2, dev)?)?,
            Var::from_tensor(&uniform_tensor(s + 4, &[d], bound2, dev)?)?,
        ];
        let feats = image_embeddings(model, input.images, None)?.to_dtype(DType::F32)?;
        let scale = model_scale(model)?;
        let mut vars = vec![ctx.clone()];
        vars.extend(meta.iter().cloned());
        let schedule = MiniBatchSchedule::new(self.epochs, self.batch_size, self.optimizer);
        let loss = train_prompt_params(input, &vars, schedule, |idx| {
            let meta = [
                meta[0].as_tensor(),
                meta[1].as_tensor(),
                meta[2].as_tensor(),
                meta[3].as_tensor(),
            ];
            let feats = feats.index_select(idx, 0)?;
            Ok(Self::logits(model, &prompts, &feats, ctx.as_tensor(), meta, scale)?.into())
        })?;
        let params = vec![
            ("ctx".to_string(), ctx.as_tensor().detach()),
            (W1.to_string(), meta[0].as_tensor().detach()),
            (B1.to_string(), meta[1].as_tensor().detach()),
            (W2.to_string(), meta[2].as_tensor().detach()),
            (B2.to_string(), meta[3].as_tensor().detach()),
        ];
        PromptClassifier::new(
            self,
            input,
            scale,
            params,
            serde_json::json!({ "final_loss": loss, "meta_net_hidden": hidden }),
        )
    }
}
