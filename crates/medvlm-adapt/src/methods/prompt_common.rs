//! Shared machinery of the prompt-learning methods (strategy 2): CoOp
//! ([`super::coop`]), CoCoOp ([`super::cocoop`]), KgCoOp ([`super::kgcoop`]),
//! VPT ([`super::vpt`]) and MaPLe ([`super::maple`]).
//!
//! These methods need gradients through a frozen encoder, so they take a
//! [`PromptInput`] (the model, its tokenizer, the class names and the support
//! images as preprocessed pixel tensors) instead of cached features. The
//! encoders stay frozen: only the prompt parameters (context vectors, visual
//! prompt tokens, meta-net and coupling layers) are `Var`s.
//!
//! Text prompts are built the way the official CoOp code builds them: the
//! prompt `"X X ... X {class}."` is tokenised, and the token embeddings at the
//! `X` positions are replaced by the learned context through the model's
//! [`TextPrompt`] extension point (pooling still reads the real token ids).
//!
//! Scores are `exp(logit_scale) · cos(image, text)` with the model's own
//! learned scale, as in CLIP and all five papers; training minimises
//! cross-entropy over the classes.
//!
//! A fit returns a [`PromptClassifier`]: it classifies *images*
//! ([`PromptClassifier::logits_for_images`]) given the same model, and it
//! implements [`AdaptedClassifier`] so that it is saved / loaded with
//! [`save_classifier`](crate::method::save_classifier) like every other method.
//! On cached image embeddings ([`AdaptedClassifier::logits`]) only the methods
//! whose image side is the frozen encoder and whose text side does not depend
//! on the image work (CoOp, KgCoOp); the others give a clear error.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use medvlm_models::{TextPrompt, TextTokenizer, TokenBatch, VisionLanguageModel, VisualPrompts};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::fewshot::TaskKind;
use crate::method::{
    l2_normalize, normalized_input, AdaptInput, AdaptationMethod, AdaptedClassifier,
    ClassifierCard, MethodError, Result, CARD_FILE, CARD_FORMAT, WEIGHTS_FILE,
};

/// Registry names of the prompt-learning methods.
pub const PROMPT_METHOD_NAMES: &[&str] = &["coop", "cocoop", "kgcoop", "vpt", "maple"];

/// Name of the fit-info entry listing the saved prompt parameters.
const PARAMS_KEY: &str = "prompt_parameters";
/// Saved tensor holding the L2-normalised class text weights `[C, E]`
/// (methods whose text side does not depend on the image).
pub const CLASS_WEIGHTS: &str = "class_weights";

/// Converts a model error into a method error (the model crate has its own enum).
pub(crate) fn model_err(e: medvlm_models::ModelError) -> MethodError {
    MethodError::InvalidInput(format!("model: {e}"))
}

/// What a prompt-learning method is fitted on: the model itself.
#[derive(Clone, Copy)]
pub struct PromptInput<'a> {
    /// The frozen vision-language model.
    pub model: &'a dyn VisionLanguageModel,
    /// Its tokenizer.
    pub tokenizer: &'a TextTokenizer,
    /// Class names in class-index order.
    pub class_names: &'a [String],
    /// Support images, preprocessed pixels `[N, 3, H, W]`.
    pub images: &'a Tensor,
    /// Class index of each support image.
    pub labels: &'a [usize],
    /// Seed of the random initialisations.
    pub seed: u64,
    /// The task's hand-written prompts of each class, in class order (e.g. the prompts a
    /// zero-shot baseline uses). When given, the methods' hand-crafted class weights (VPT's
    /// zero-shot head, KgCoOp's anchor) are their normalised ensemble instead of the method's
    /// template filled with the class name.
    pub class_prompts: Option<&'a [Vec<String>]>,
}

impl PromptInput<'_> {
    /// Checks counts and shapes; returns (N, C).
    pub fn validate(&self) -> Result<(usize, usize)> {
        let c = self.class_names.len();
        if c < 2 {
            return Err(MethodError::InvalidInput(format!(
                "prompt learning needs at least 2 classes, got {c}"
            )));
        }
        let dims = self.images.dims();
        if dims.len() != 4 || dims[1] != 3 {
            return Err(MethodError::InvalidInput(format!(
                "support images must be preprocessed pixels [N, 3, H, W], got {dims:?}"
            )));
        }
        let n = dims[0];
        if n == 0 {
            return Err(MethodError::InvalidInput("the support set is empty".into()));
        }
        if n != self.labels.len() {
            return Err(MethodError::InvalidInput(format!(
                "{n} support images but {} labels",
                self.labels.len()
            )));
        }
        if let Some((i, &l)) = self.labels.iter().enumerate().find(|(_, &l)| l >= c) {
            return Err(MethodError::InvalidInput(format!(
                "support image {i} has label {l} but there are {c} classes"
            )));
        }
        Ok((n, c))
    }

    /// Labels as a u32 tensor on the model's device.
    pub(crate) fn targets(&self) -> Result<Tensor> {
        let v: Vec<u32> = self.labels.iter().map(|&l| l as u32).collect();
        Ok(Tensor::new(v.as_slice(), self.model.device())?)
    }

    /// The evaluation environment of this input.
    pub(crate) fn env(&self) -> PromptEnv<'_> {
        PromptEnv {
            model: self.model,
            tokenizer: self.tokenizer,
            class_names: self.class_names,
        }
    }
}

/// Model, tokenizer and classes: what evaluating learned prompts needs.
#[derive(Clone, Copy)]
pub(crate) struct PromptEnv<'a> {
    pub model: &'a dyn VisionLanguageModel,
    pub tokenizer: &'a TextTokenizer,
    pub class_names: &'a [String],
}

/// A prompt-learning method: fitted on the model, not on cached features.
pub trait PromptLearningMethod: AdaptationMethod {
    /// Learns the prompts on the support images.
    fn fit_prompts(&self, input: &PromptInput) -> Result<PromptClassifier>;
    /// Whether it inserts prompt tokens into the image tower (VPT, MaPLe).
    fn needs_visual_prompts(&self) -> bool {
        false
    }
}

/// Why the prompt-learning method `name` cannot run on `model`, if it cannot: checked before
/// any image is read, so a ResNet model refuses VPT and MaPLe up front.
pub fn model_refusal(name: &str, model: &dyn VisionLanguageModel) -> Option<String> {
    let method = prompt_method_by_name(name, None).ok()?;
    (method.needs_visual_prompts() && !model.supports_visual_prompts()).then(|| {
        format!(
            "{name} inserts prompt tokens into a vision transformer, and this model's image \
             tower is convolutional (use a text-side method such as coop, or lora)"
        )
    })
}

/// Builds a prompt-learning method by name, with JSON overrides of its
/// hyperparameters (as [`crate::method::method_by_name`]).
pub fn prompt_method_by_name(
    name: &str,
    overrides: Option<&serde_json::Value>,
) -> Result<Box<dyn PromptLearningMethod>> {
    use super::with_overrides;
    Ok(match name {
        "coop" => Box::new(with_overrides(
            name,
            super::coop::Coop::default(),
            overrides,
        )?),
        "cocoop" => Box::new(with_overrides(
            name,
            super::cocoop::Cocoop::default(),
            overrides,
        )?),
        "kgcoop" => Box::new(with_overrides(
            name,
            super::kgcoop::KgCoop::default(),
            overrides,
        )?),
        "vpt" => Box::new(with_overrides(name, super::vpt::Vpt::default(), overrides)?),
        "maple" => Box::new(with_overrides(
            name,
            super::maple::Maple::default(),
            overrides,
        )?),
        other => {
            return Err(MethodError::UnknownMethod {
                name: other.into(),
                known: PROMPT_METHOD_NAMES.join(", "),
            })
        }
    })
}

/// What [`AdaptationMethod::fit`] of a prompt-learning method answers: it has
/// no model in an [`AdaptInput`], so it explains what to call instead.
pub(crate) fn refuse_feature_fit(name: &str, input: &AdaptInput) -> MethodError {
    super::refuse_cached_features(
        name,
        input,
        "PromptLearningMethod::fit_prompts on the model and the support images",
    )
}

/// Where the class name goes relative to the learned context (CoOp's
/// `CLASS_TOKEN_POSITION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClassTokenPosition {
    /// `[ctx] {class}.` (the default).
    End,
    /// `[ctx/2] {class} [ctx/2].`
    Middle,
    /// `{class} [ctx].`
    Front,
}

/// Tokenised class prompts with the positions of the learned context.
#[derive(Debug, Clone)]
pub(crate) struct ClassPrompts {
    /// `[C, L]` token ids.
    pub tokens: TokenBatch,
    /// Per class, the `n_ctx` positions replaced by the context.
    pub positions: Vec<Vec<usize>>,
}

/// Number of special tokens before and after the content of a text
/// (e.g. CLIP: 1 and 1; SigLIP: 0 and 1), found from the placeholder `X`,
/// and the placeholder's id.
fn placeholder_layout(tok: &TextTokenizer) -> Result<(usize, usize, u32)> {
    let with_x = tok.encode_ids("X").map_err(model_err)?;
    let empty = tok.encode_ids("").map_err(model_err)?;
    if with_x.len() != empty.len() + 1 {
        return Err(MethodError::InvalidInput(format!(
            "tokenizer {} splits the placeholder 'X' into {} tokens; prompt learning needs a single-token placeholder",
            tok.path().display(),
            with_x.len().saturating_sub(empty.len())
        )));
    }
    // The content token is the first position where the two encodings differ.
    let lead = with_x
        .iter()
        .zip(empty.iter())
        .position(|(a, b)| a != b)
        .unwrap_or(empty.len());
    Ok((lead, empty.len() - lead, with_x[lead]))
}

/// Content token ids of `text` (without special tokens).
pub(crate) fn content_ids(tok: &TextTokenizer, text: &str) -> Result<Vec<u32>> {
    let (lead, trail, _) = placeholder_layout(tok)?;
    let ids = tok.encode_ids(text).map_err(model_err)?;
    let end = ids.len().saturating_sub(trail).max(lead);
    Ok(ids.get(lead..end).map(<[u32]>::to_vec).unwrap_or_default())
}

/// Content token ids of `text` with this tokenizer, without the special
/// tokens (e.g. the ids whose embeddings initialise a context).
pub fn tokenizer_content_ids(tok: &TextTokenizer, text: &str) -> Result<Vec<u32>> {
    content_ids(tok, text)
}

/// Builds `"X X ... X {rest} {class}."` style prompts for every class
/// (or the middle / front arrangements).
///
/// `rest` is fixed text after the context (MaPLe keeps the words of its
/// initialisation that are not learned, e.g. "of a"). The positions are
/// checked to hold the placeholder token, and a prompt that fills the whole
/// context (so that it may have been truncated) is an error.
pub(crate) fn build_class_prompts(
    tok: &TextTokenizer,
    class_names: &[String],
    n_ctx: usize,
    position: ClassTokenPosition,
    rest: &str,
    device: &Device,
) -> Result<ClassPrompts> {
    if n_ctx == 0 {
        return Err(MethodError::InvalidInput(
            "prompt learning needs at least one context token (n_ctx >= 1)".into(),
        ));
    }
    let (lead, _, x_id) = placeholder_layout(tok)?;
    let xs = |k: usize| vec!["X"; k].join(" ");
    let rest = rest.trim();
    let mut texts = Vec::with_capacity(class_names.len());
    let mut positions = Vec::with_capacity(class_names.len());
    for name in class_names {
        let name_len = content_ids(tok, name)?.len();
        let named = if rest.is_empty() {
            name.clone()
        } else {
            format!("{rest} {name}")
        };
        let named_len = content_ids(tok, &named)?.len();
        let (text, pos): (String, Vec<usize>) = match position {
            ClassTokenPosition::End => (
                format!("{} {named}.", xs(n_ctx)),
                (lead..lead + n_ctx).collect(),
            ),
            ClassTokenPosition::Middle => {
                let half = n_ctx / 2;
                let first = if half == 0 {
                    String::new()
                } else {
                    format!("{} ", xs(half))
                };
                let second_start = lead + half + named_len;
                (
                    format!("{first}{named} {}.", xs(n_ctx - half)),
                    (lead..lead + half)
                        .chain(second_start..second_start + n_ctx - half)
                        .collect(),
                )
            }
            ClassTokenPosition::Front => {
                let start = lead + name_len;
                let text = if rest.is_empty() {
                    format!("{name} {}.", xs(n_ctx))
                } else {
                    format!("{name} {} {rest}.", xs(n_ctx))
                };
                (text, (start..start + n_ctx).collect())
            }
        };
        let ids = tok.encode_ids(&text).map_err(model_err)?;
        if ids.len() >= tok.context_length() {
            return Err(MethodError::InvalidInput(format!(
                "the prompt of class '{name}' ({} tokens with {n_ctx} context tokens) fills the \
                 context length {} and would be truncated; use fewer context tokens or a shorter class name",
                ids.len(),
                tok.context_length()
            )));
        }
        if pos.iter().any(|&p| ids.get(p) != Some(&x_id)) {
            return Err(MethodError::InvalidInput(format!(
                "class '{name}': the tokenizer does not keep the context placeholders at the \
                 expected positions in {text:?}"
            )));
        }
        texts.push(text);
        positions.push(pos);
    }
    let tokens = tok.encode_batch(&texts, device).map_err(model_err)?;
    Ok(ClassPrompts { tokens, positions })
}

/// Raw text embeddings `[C, E]` of the class prompts with the context
/// `ctx` (`[M, D]` shared, or `[C, M, D]` class-specific) substituted.
pub(crate) fn encode_with_context(
    model: &dyn VisionLanguageModel,
    prompts: &ClassPrompts,
    ctx: &Tensor,
) -> Result<Tensor> {
    let c = prompts.positions.len();
    let class_specific = ctx.rank() == 3;
    let shared_positions = prompts.positions.windows(2).all(|w| w[0] == w[1]);
    if shared_positions {
        let prompt = TextPrompt {
            positions: prompts.positions[0].clone(),
            vectors: ctx.clone(),
        };
        return Ok(model
            .encode_text_with(&prompts.tokens, Some(&prompt))
            .map_err(model_err)?
            .embeds);
    }
    let mut rows = Vec::with_capacity(c);
    for (i, pos) in prompts.positions.iter().enumerate() {
        let tokens = TokenBatch {
            input_ids: prompts.tokens.input_ids.narrow(0, i, 1)?,
            attention_mask: prompts.tokens.attention_mask.narrow(0, i, 1)?,
        };
        let vectors = if class_specific {
            ctx.get(i)?
        } else {
            ctx.clone()
        };
        let prompt = TextPrompt {
            positions: pos.clone(),
            vectors,
        };
        rows.push(
            model
                .encode_text_with(&tokens, Some(&prompt))
                .map_err(model_err)?
                .embeds,
        );
    }
    Ok(Tensor::cat(&rows, 0)?)
}

/// Raw text embeddings `[C, E]` of a hand-written template (`{}` = class
/// name), e.g. the zero-shot head of VPT or KgCoOp's anchor.
pub(crate) fn template_text_embeddings(
    model: &dyn VisionLanguageModel,
    tok: &TextTokenizer,
    class_names: &[String],
    template: &str,
) -> Result<Tensor> {
    if !template.contains("{}") {
        return Err(MethodError::InvalidInput(format!(
            "template {template:?} has no '{{}}' for the class name"
        )));
    }
    let texts: Vec<String> = class_names
        .iter()
        .map(|n| template.replace("{}", n))
        .collect();
    let tokens = tok
        .encode_batch(&texts, model.device())
        .map_err(model_err)?;
    Ok(model.encode_text(&tokens).map_err(model_err)?.embeds)
}

/// Class prompts tokenised once, with the `[C, P]` matrix that averages each class's `P_c`
/// prompts: the prompt-ensemble classifier of CLIP (mean of the normalised prompt embeddings,
/// renormalised), recomputable through a text tower that is being trained.
pub(crate) struct PromptEnsemble {
    tokens: TokenBatch,
    average: Tensor,
}

impl PromptEnsemble {
    /// `prompts[c]`: the prompts of class `c` (at least one each).
    pub(crate) fn new(
        tok: &TextTokenizer,
        prompts: &[Vec<String>],
        device: &Device,
    ) -> Result<Self> {
        if prompts.is_empty() || prompts.iter().any(|p| p.is_empty()) {
            return Err(MethodError::InvalidInput(format!(
                "class prompts: give at least one prompt for each of the {} classes",
                prompts.len()
            )));
        }
        let flat: Vec<&str> = prompts.iter().flatten().map(String::as_str).collect();
        let tokens = tok.encode_batch(&flat, device).map_err(model_err)?;
        let mut avg = vec![0f32; prompts.len() * flat.len()];
        let mut col = 0;
        for (c, p) in prompts.iter().enumerate() {
            for _ in p {
                avg[c * flat.len() + col] = 1.0 / p.len() as f32;
                col += 1;
            }
        }
        let average = Tensor::from_vec(avg, (prompts.len(), flat.len()), device)?;
        Ok(Self { tokens, average })
    }

    /// Normalised class weights `[C, E]` through `model`'s text tower (differentiable).
    pub(crate) fn weights(&self, model: &dyn VisionLanguageModel) -> Result<Tensor> {
        let e = model.encode_text(&self.tokens).map_err(model_err)?.embeds;
        let e = l2_normalize(&e.to_dtype(DType::F32)?)?;
        l2_normalize(&self.average.matmul(&e)?)
    }
}

/// Normalised hand-crafted class weights `[C, E]` of `input`: the ensemble of its
/// `class_prompts` when given, else `template` filled with each class name. Also returns
/// which of the two was used, for the fit info.
pub(crate) fn handcrafted_weights(
    input: &PromptInput,
    template: &str,
) -> Result<(Tensor, &'static str)> {
    let Some(prompts) = input.class_prompts else {
        let w =
            template_text_embeddings(input.model, input.tokenizer, input.class_names, template)?;
        return Ok((l2_normalize(&w.to_dtype(DType::F32)?)?, "template"));
    };
    if prompts.len() != input.class_names.len() {
        return Err(MethodError::InvalidInput(format!(
            "class_prompts: {} prompt lists for {} classes",
            prompts.len(),
            input.class_names.len()
        )));
    }
    let ensemble = PromptEnsemble::new(input.tokenizer, prompts, input.model.device())?;
    Ok((ensemble.weights(input.model)?, "class prompts"))
}

/// Context vectors `[n_ctx, D]`: from the token embeddings of the first
/// `n_ctx` tokens of `init` when given (CoOp's `ctx_init`), else
/// N(0, 0.02²) as in the official code. Returns the vectors and the words of
/// `init` left after the learned ones (fixed text, MaPLe) — empty when all
/// of `init` is learned.
pub(crate) fn init_context(
    model: &dyn VisionLanguageModel,
    tok: &TextTokenizer,
    n_ctx: usize,
    init: Option<&str>,
    seed: u64,
) -> Result<(Tensor, String)> {
    let d = model.text_hidden_size();
    match init.map(str::trim).filter(|s| !s.is_empty()) {
        Some(words) => {
            let ids = content_ids(tok, words)?;
            if ids.len() < n_ctx {
                return Err(MethodError::InvalidInput(format!(
                    "context initialisation {words:?} has {} tokens but n_ctx is {n_ctx}",
                    ids.len()
                )));
            }
            let all: Vec<&str> = words.split_whitespace().collect();
            let learned_words = all
                .iter()
                .take(n_ctx)
                .copied()
                .collect::<Vec<_>>()
                .join(" ");
            if content_ids(tok, &learned_words)?.len() != n_ctx {
                return Err(MethodError::InvalidInput(format!(
                    "the first {n_ctx} words of the context initialisation {words:?} are not \
                     {n_ctx} tokens; choose words that are single tokens or set n_ctx to its token count"
                )));
            }
            let rest = all[n_ctx.min(all.len())..].join(" ");
            let ids = Tensor::new(&ids[..n_ctx], model.device())?.unsqueeze(0)?;
            let emb = model.token_embeddings(&ids).map_err(model_err)?;
            Ok((emb.squeeze(0)?.to_dtype(DType::F32)?, rest))
        }
        None => Ok((
            normal_init(seed, &[n_ctx, d], 0.02, model.device())?,
            String::new(),
        )),
    }
}

/// Deterministic N(0, std²) tensor.
pub(crate) fn normal_init(seed: u64, dims: &[usize], std: f64, dev: &Device) -> Result<Tensor> {
    use rand_distr::{Distribution, Normal};
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0, std).map_err(|e| MethodError::InvalidInput(e.to_string()))?;
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng) as f32).collect();
    Ok(Tensor::from_vec(v, dims, dev)?)
}

/// Deterministic U(-bound, bound) tensor.
pub(crate) fn uniform_tensor(
    seed: u64,
    dims: &[usize],
    bound: f64,
    dev: &Device,
) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = dims.iter().product();
    let flat = super::uniform_init(&mut rng, 1, n, bound, dev)?;
    Ok(flat.reshape(dims)?)
}

/// `exp(logit_scale)` of the model as f64.
pub(crate) fn model_scale(model: &dyn VisionLanguageModel) -> Result<f64> {
    Ok(model
        .logit_scale()
        .to_dtype(DType::F64)?
        .exp()?
        .to_scalar::<f64>()?)
}

/// `scale · norm(img) · norm(txt)ᵀ`, `[N, C]`.
pub(crate) fn cosine_logits(img: &Tensor, txt: &Tensor, scale: f64) -> Result<Tensor> {
    let img = l2_normalize(&img.to_dtype(DType::F32)?)?;
    let txt = l2_normalize(&txt.to_dtype(DType::F32)?)?;
    Ok((img.matmul(&txt.t()?)? * scale)?)
}

/// Image embeddings `[N, E]` (optionally with visual prompts).
pub(crate) fn image_embeddings(
    model: &dyn VisionLanguageModel,
    pixels: &Tensor,
    prompts: Option<&VisualPrompts>,
) -> Result<Tensor> {
    let pixels = pixels.to_device(model.device())?.to_dtype(model.dtype())?;
    Ok(model
        .encode_image_with(&pixels, prompts)
        .map_err(model_err)?
        .embeds
        .to_dtype(DType::F32)?)
}

/// Mini-batches over the support set, reshuffled every epoch with a seeded
/// RNG (as the papers' data loaders; the last batch of an epoch may be
/// smaller). `batch_size` 0 or at least N means full batch.
pub(crate) struct Batches {
    order: Vec<usize>,
    batch_size: usize,
    pos: usize,
    rng: ChaCha8Rng,
    device: Device,
}

impl Batches {
    pub(crate) fn new(n: usize, batch_size: usize, seed: u64, device: &Device) -> Self {
        let batch_size = if batch_size == 0 {
            n
        } else {
            batch_size.min(n)
        };
        Self {
            order: (0..n).collect(),
            batch_size: batch_size.max(1),
            pos: n,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_ba7c),
            device: device.clone(),
        }
    }

    /// Optimiser steps for `epochs` passes over the support set.
    pub(crate) fn steps(&self, epochs: usize) -> usize {
        epochs * self.order.len().div_ceil(self.batch_size)
    }

    /// Indices `[b]` (u32) of the next mini-batch.
    pub(crate) fn next_indices(&mut self) -> Result<Tensor> {
        use rand::seq::SliceRandom;
        if self.pos >= self.order.len() {
            self.order.shuffle(&mut self.rng);
            self.pos = 0;
        }
        let end = (self.pos + self.batch_size).min(self.order.len());
        let idx: Vec<u32> = self.order[self.pos..end]
            .iter()
            .map(|&i| i as u32)
            .collect();
        self.pos = end;
        Ok(Tensor::new(idx.as_slice(), &self.device)?)
    }
}

/// What one training step of a prompt learner computes on a mini-batch: the
/// class logits `[b, C]` of its images and, optionally, an extra loss term
/// added to their cross-entropy (KgCoOp's knowledge-guided penalty).
pub(crate) struct BatchScores {
    /// Class logits `[b, C]` of the mini-batch.
    pub logits: Tensor,
    /// Extra scalar loss term, if the method has one.
    pub extra_loss: Option<Tensor>,
}

impl From<Tensor> for BatchScores {
    fn from(logits: Tensor) -> Self {
        Self {
            logits,
            extra_loss: None,
        }
    }
}

/// A prompt learner's training schedule (each method's `epochs`,
/// `batch_size` and `optimizer` hyperparameters).
#[derive(Debug, Clone, Copy)]
pub(crate) struct MiniBatchSchedule {
    /// Passes over the support set.
    epochs: usize,
    /// Mini-batch size (0 = the whole support set).
    batch_size: usize,
    /// Optimiser (its learning rate decays along a cosine).
    optimizer: super::Optimizer,
}

impl MiniBatchSchedule {
    pub(crate) fn new(epochs: usize, batch_size: usize, optimizer: super::Optimizer) -> Self {
        Self {
            epochs,
            batch_size,
            optimizer,
        }
    }
}

/// The training loop shared by the prompt learners: `schedule.epochs` passes
/// over the support set in seeded, reshuffled mini-batches (see [`Batches`]),
/// each step minimising the cross-entropy of `scores(indices)` against the
/// labels of those support images (plus the optional extra term) with the
/// schedule's optimiser under a cosine learning-rate decay
/// ([`train_full_batch`](super::train_full_batch), which also refuses a
/// diverged loss). `scores` gets the u32 indices `[b]` of the mini-batch on
/// the model's device. Returns the last training loss.
pub(crate) fn train_prompt_params(
    input: &PromptInput,
    vars: &[Var],
    schedule: MiniBatchSchedule,
    mut scores: impl FnMut(&Tensor) -> Result<BatchScores>,
) -> Result<f32> {
    let targets = input.targets()?;
    let mut batches = Batches::new(
        input.labels.len(),
        schedule.batch_size,
        input.seed,
        input.model.device(),
    );
    let steps = batches.steps(schedule.epochs);
    super::train_full_batch(vars, steps, schedule.optimizer, || {
        let idx = batches.next_indices()?;
        let BatchScores { logits, extra_loss } = scores(&idx)?;
        let ce = candle_nn::loss::cross_entropy(&logits, &targets.index_select(&idx, 0)?)?;
        match extra_loss {
            Some(extra) => Ok((ce + extra)?),
            None => Ok(ce),
        }
    })
}

/// A trainable copy of a tensor.
pub(crate) fn var(t: &Tensor) -> Result<Var> {
    Ok(Var::from_tensor(&t.to_dtype(DType::F32)?)?)
}

/// A fitted prompt learner: the learned prompt parameters, by name.
#[derive(Debug, Clone)]
pub struct PromptClassifier {
    card: ClassifierCard,
    params: Vec<(String, Tensor)>,
}

impl PromptClassifier {
    /// Builds a fitted classifier. `fit_info` gets the list of parameter names.
    pub(crate) fn new(
        method: &dyn AdaptationMethod,
        input: &PromptInput,
        scale: f64,
        params: Vec<(String, Tensor)>,
        fit_info: serde_json::Value,
    ) -> Result<Self> {
        Self::build(
            method.name(),
            method.hyperparameters(),
            input.class_names,
            input.model.embed_dim(),
            scale,
            params,
            fit_info,
        )
    }

    /// A classifier from given prompt parameters, e.g. context vectors
    /// learned elsewhere (the official CoOp code's `ctx`) or edited ones.
    /// `hyperparameters` are the method's fields as JSON (missing ones take
    /// the defaults); `params` are named as a fit names them (`"ctx"`,
    /// `"vpt.shallow"`, `"vpt.deep.1"`, ...).
    pub fn from_parameters(
        method: &str,
        hyperparameters: Option<&serde_json::Value>,
        class_names: &[String],
        embed_dim: usize,
        logit_scale: f64,
        params: Vec<(String, Tensor)>,
    ) -> Result<Self> {
        let m = prompt_method_by_name(method, hyperparameters)?;
        Self::build(
            m.name(),
            m.hyperparameters(),
            class_names,
            embed_dim,
            logit_scale,
            params,
            serde_json::json!({}),
        )
    }

    fn build(
        method: &str,
        hyperparameters: serde_json::Value,
        class_names: &[String],
        embed_dim: usize,
        scale: f64,
        params: Vec<(String, Tensor)>,
        mut fit_info: serde_json::Value,
    ) -> Result<Self> {
        let names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
        if let Some(obj) = fit_info.as_object_mut() {
            obj.insert(PARAMS_KEY.into(), serde_json::json!(names));
        }
        let params = params
            .into_iter()
            .map(|(n, t)| Ok((n, t.detach().to_dtype(DType::F32)?)))
            .collect::<Result<Vec<_>>>()?;
        // Built through serde so that fields added to the card later (with
        // serde defaults) need no change here.
        let card: ClassifierCard = serde_json::from_value(serde_json::json!({
            "format": CARD_FORMAT,
            "method": method,
            "task": TaskKind::MultiClass,
            "class_names": class_names,
            "feature_dim": embed_dim,
            "logit_scale": scale,
            "hyperparameters": hyperparameters,
            "fit_info": fit_info,
        }))
        .map_err(|e| MethodError::InvalidInput(format!("classifier card: {e}")))?;
        Ok(Self { card, params })
    }

    /// Rebuilds from a card and a tensor lookup (names listed in the card).
    pub(crate) fn from_parts(
        card: ClassifierCard,
        get: impl Fn(&str) -> Result<Tensor>,
        path: &Path,
    ) -> Result<Self> {
        let names: Vec<String> = card
            .fit_info
            .get(PARAMS_KEY)
            .cloned()
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| MethodError::BadCheckpoint {
                path: path.to_path_buf(),
                reason: format!("fit_info.{PARAMS_KEY}: {e}"),
            })?
            .ok_or_else(|| MethodError::BadCheckpoint {
                path: path.to_path_buf(),
                reason: format!("the card has no fit_info.{PARAMS_KEY}"),
            })?;
        let params = names
            .into_iter()
            .map(|n| {
                let t = get(&n)?.to_dtype(DType::F32)?;
                Ok((n, t))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { card, params })
    }

    /// Rebuilds from the registry's saved tensors (see [`crate::method::load_classifier`]).
    pub fn from_saved(card: ClassifierCard, saved: &crate::method::SavedTensors) -> Result<Self> {
        let path = saved.path().to_path_buf();
        Self::from_parts(card, |n| saved.get(n), &path)
    }

    /// Loads a prompt classifier saved with [`crate::method::save_classifier`]
    /// (keeps the concrete type, so [`Self::logits_for_images`] is available).
    pub fn load(dir: &Path) -> Result<Self> {
        let card_path = dir.join(CARD_FILE);
        let text = std::fs::read_to_string(&card_path).map_err(|source| MethodError::Io {
            path: card_path.clone(),
            source,
        })?;
        let card: ClassifierCard =
            serde_json::from_str(&text).map_err(|e| MethodError::BadCheckpoint {
                path: card_path.clone(),
                reason: format!("not a classifier card: {e}"),
            })?;
        if card.format != CARD_FORMAT || !PROMPT_METHOD_NAMES.contains(&card.method.as_str()) {
            return Err(MethodError::BadCheckpoint {
                path: card_path,
                reason: format!(
                    "format '{}' / method '{}' is not a prompt-learning classifier ({CARD_FORMAT}; {})",
                    card.format,
                    card.method,
                    PROMPT_METHOD_NAMES.join(", ")
                ),
            });
        }
        let weights_path = dir.join(WEIGHTS_FILE);
        let tensors: HashMap<String, Tensor> =
            candle_core::safetensors::load(&weights_path, &Device::Cpu).map_err(|e| {
                MethodError::BadCheckpoint {
                    path: weights_path.clone(),
                    reason: e.to_string(),
                }
            })?;
        let get = |n: &str| {
            tensors
                .get(n)
                .cloned()
                .ok_or_else(|| MethodError::BadCheckpoint {
                    path: weights_path.clone(),
                    reason: format!("tensor '{n}' is missing"),
                })
        };
        Self::from_parts(card, get, &weights_path)
    }

    /// The logit scale the prompts were learned with.
    pub(crate) fn card_scale(&self) -> f64 {
        self.card.logit_scale
    }

    /// A learned parameter by name (e.g. `"ctx"`), if present.
    pub fn param(&self, name: &str) -> Option<&Tensor> {
        self.params.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// A learned parameter on `device`, with a clear error if missing.
    pub(crate) fn param_on(&self, name: &str, device: &Device) -> Result<Tensor> {
        let t = self.param(name).ok_or_else(|| {
            MethodError::InvalidInput(format!(
                "the '{}' classifier has no parameter '{name}'",
                self.card.method
            ))
        })?;
        Ok(t.to_device(device)?)
    }

    /// Class logits `[N, C]` of preprocessed images `[N, 3, H, W]`, running
    /// the (frozen) model with the learned prompts. The model and tokenizer
    /// must be those the prompts were learned with.
    pub fn logits_for_images(
        &self,
        model: &dyn VisionLanguageModel,
        tokenizer: &TextTokenizer,
        pixels: &Tensor,
    ) -> Result<Tensor> {
        if model.embed_dim() != self.card.feature_dim {
            return Err(MethodError::InvalidInput(format!(
                "the model embeds in dimension {} but the '{}' prompts were learned with dimension {}",
                model.embed_dim(),
                self.card.method,
                self.card.feature_dim
            )));
        }
        let env = PromptEnv {
            model,
            tokenizer,
            class_names: &self.card.class_names,
        };
        let hp = Some(&self.card.hyperparameters);
        let name = self.card.method.as_str();
        use super::with_overrides;
        match name {
            "coop" => with_overrides(name, super::coop::Coop::default(), hp)?
                .logits_for_images(&env, self, pixels),
            "kgcoop" => with_overrides(name, super::kgcoop::KgCoop::default(), hp)?
                .coop
                .logits_for_images(&env, self, pixels),
            "cocoop" => with_overrides(name, super::cocoop::Cocoop::default(), hp)?
                .logits_for_images(&env, self, pixels),
            "vpt" => with_overrides(name, super::vpt::Vpt::default(), hp)?
                .logits_for_images(&env, self, pixels),
            "maple" => with_overrides(name, super::maple::Maple::default(), hp)?
                .logits_for_images(&env, self, pixels),
            other => Err(MethodError::InvalidInput(format!(
                "'{other}' is not a prompt-learning method"
            ))),
        }
    }

    /// Softmax probabilities `[N, C]` of images.
    pub fn probabilities_for_images(
        &self,
        model: &dyn VisionLanguageModel,
        tokenizer: &TextTokenizer,
        pixels: &Tensor,
    ) -> Result<Tensor> {
        let logits = self.logits_for_images(model, tokenizer, pixels)?;
        Ok(candle_nn::ops::softmax_last_dim(&logits)?)
    }
}

impl AdaptedClassifier for PromptClassifier {
    fn card(&self) -> &ClassifierCard {
        &self.card
    }

    /// Works on cached image embeddings only when the learned classifier is
    /// a fixed set of class text weights over the frozen image encoder
    /// (CoOp, KgCoOp).
    fn logits(&self, image_features: &Tensor) -> Result<Tensor> {
        let Some(w) = self.param(CLASS_WEIGHTS) else {
            return Err(MethodError::InvalidInput(format!(
                "the '{}' classifier conditions the encoders on learned prompts, so it cannot \
                 score cached image embeddings; use PromptClassifier::logits_for_images with the model",
                self.card.method
            )));
        };
        let f = normalized_input(&self.card, image_features)?;
        let w = w.to_device(f.device())?;
        Ok((f.matmul(&w.t()?)? * self.card.logit_scale)?)
    }

    fn tensors(&self) -> Vec<(String, Tensor)> {
        self.params.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::Batches;
    use candle_core::Device;

    #[test]
    fn every_epoch_visits_each_support_image_once() {
        let mut b = Batches::new(7, 3, 42, &Device::Cpu);
        assert_eq!(b.steps(2), 6);
        for _ in 0..2 {
            let mut seen = Vec::new();
            let mut sizes = Vec::new();
            for _ in 0..3 {
                let idx: Vec<u32> = b.next_indices().unwrap().to_vec1().unwrap();
                sizes.push(idx.len());
                seen.extend(idx);
            }
            seen.sort();
            assert_eq!(seen, (0..7).collect::<Vec<u32>>());
            assert_eq!(sizes, vec![3, 3, 1]);
        }
        // 0 = full batch.
        let mut full = Batches::new(5, 0, 0, &Device::Cpu);
        assert_eq!(full.steps(4), 4);
        assert_eq!(full.next_indices().unwrap().dims(), &[5]);
    }
}
