//! VPT: Visual Prompt Tuning (Jia, Tang, Chen, Cardie, Belongie, Hariharan &
//! Lim, ECCV 2022), in its CLIP form.
//!
//! `N` learnable prompt tokens are inserted into the frozen ViT right after
//! the class token ("shallow": at the input only; "deep": a new set replaces
//! the prompt slots before every layer). The paper trains a linear head on
//! the class token; with a vision-language model the natural head is the
//! frozen zero-shot text classifier (the embeddings of "a photo of a
//! {class}."), so only the prompt tokens are learned — the variant used as a
//! baseline in CLIP prompt-learning papers. Scores are
//! `exp(logit_scale) · cos(f, w_c)`, trained with cross-entropy.
//!
//! Defaults: `N = 10` tokens (the paper tunes N in {1, 5, 10, 50, 100, 200};
//! 10 is a common choice for ViT-B), deep prompts (the paper's main
//! variant), prompts initialised U(−v, v) with
//! `v = sqrt(6 / (3·patch² + D))` (Xavier-uniform as in the official code).
//! The paper trains 100 epochs with SGD and a per-task learning-rate
//! search; here AdamW, lr 1e-3, no weight decay, cosine decay, 100 epochs of
//! mini-batches of 32 (a fixed, documented choice; override `optimizer`,
//! `epochs`, `batch_size` as needed). Every step runs the image tower (with
//! gradients) on the mini-batch.

use candle_core::{Tensor, Var};
use medvlm_models::{VisionLanguageModel, VisualPrompts};
use serde::{Deserialize, Serialize};

use super::prompt_common::{
    cosine_logits, handcrafted_weights, image_embeddings, model_err, model_scale,
    refuse_feature_fit, train_prompt_params, uniform_tensor, MiniBatchSchedule, PromptClassifier,
    PromptEnv, PromptInput, PromptLearningMethod,
};
use super::Optimizer;
use crate::method::{AdaptInput, AdaptationMethod, AdaptedClassifier, MethodError, Result};

/// Saved name of the frozen text head `[C, E]`.
const HEAD: &str = "head_weights";
/// Saved name of the shallow prompts.
const SHALLOW: &str = "vpt.shallow";

/// VPT hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vpt {
    /// Number of prompt tokens `N`.
    pub n_tokens: usize,
    /// VPT-deep (new prompts before every layer) instead of VPT-shallow.
    pub deep: bool,
    /// Template of the frozen zero-shot head (`{}` = class name).
    pub template: String,
    /// Passes over the support set.
    pub epochs: usize,
    /// Mini-batch size (0 = the whole support set).
    pub batch_size: usize,
    /// Optimiser.
    pub optimizer: Optimizer,
}

impl Default for Vpt {
    fn default() -> Self {
        Self {
            n_tokens: 10,
            deep: true,
            template: "a photo of a {}.".into(),
            epochs: 100,
            batch_size: 32,
            optimizer: Optimizer::AdamW {
                lr: 1e-3,
                weight_decay: 0.0,
                eps: 1e-8,
            },
        }
    }
}

fn deep_name(layer: usize) -> String {
    format!("vpt.deep.{layer}")
}

/// Logits `[N, C]` of images with the given visual prompts (or none) against
/// a text head `[C, E]`: `scale · cos(image, head)`.
pub fn vpt_logits(
    model: &dyn VisionLanguageModel,
    head: &Tensor,
    prompts: Option<&VisualPrompts>,
    pixels: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let feats = image_embeddings(model, pixels, prompts)?;
    cosine_logits(&feats, head, scale)
}

impl Vpt {
    fn prompts(&self, shallow: Tensor, deep: Vec<Tensor>) -> VisualPrompts {
        let mut layers = vec![None];
        layers.extend(deep.into_iter().map(Some));
        VisualPrompts {
            shallow: Some(shallow),
            deep: if self.deep { layers } else { Vec::new() },
        }
    }

    /// Class logits of images with the learned prompts of `fitted`.
    pub(crate) fn logits_for_images(
        &self,
        env: &PromptEnv,
        fitted: &PromptClassifier,
        pixels: &Tensor,
    ) -> Result<Tensor> {
        let dev = env.model.device();
        let shallow = fitted.param_on(SHALLOW, dev)?;
        let deep = if self.deep {
            (1..env.model.vision_num_layers())
                .map(|l| fitted.param_on(&deep_name(l), dev))
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let head = fitted.param_on(HEAD, dev)?;
        let prompts = self.prompts(shallow, deep);
        vpt_logits(
            env.model,
            &head,
            Some(&prompts),
            pixels,
            fitted.card_scale(),
        )
    }
}

impl AdaptationMethod for Vpt {
    fn name(&self) -> &'static str {
        "vpt"
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

impl PromptLearningMethod for Vpt {
    fn needs_visual_prompts(&self) -> bool {
        true
    }

    fn fit_prompts(&self, input: &PromptInput) -> Result<PromptClassifier> {
        input.validate()?;
        if self.n_tokens == 0 {
            return Err(MethodError::BadHyperparameters {
                method: self.name().into(),
                reason: "n_tokens must be at least 1".into(),
            });
        }
        let model = input.model;
        let dev = model.device();
        let d = model.vision_hidden_size();
        // Patch size from the number of patch tokens of one image (the trait
        // exposes the image size, not the patch size).
        let probe = model
            .encode_image(
                &input
                    .images
                    .narrow(0, 0, 1)?
                    .to_device(dev)?
                    .to_dtype(model.dtype())?,
            )
            .map_err(model_err)?;
        let patches = probe.last_hidden_state.dim(1)? - probe.num_prefix_tokens;
        let side = (patches as f64).sqrt().round().max(1.0);
        let patch = model.image_size() as f64 / side;
        let bound = (6.0 / (3.0 * patch * patch + d as f64)).sqrt();
        let shallow = Var::from_tensor(&uniform_tensor(
            input.seed,
            &[self.n_tokens, d],
            bound,
            dev,
        )?)?;
        let deep: Vec<Var> = if self.deep {
            (1..model.vision_num_layers())
                .map(|l| {
                    Ok(Var::from_tensor(&uniform_tensor(
                        input.seed.wrapping_add(l as u64),
                        &[self.n_tokens, d],
                        bound,
                        dev,
                    )?)?)
                })
                .collect::<Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        let (head, head_source) = handcrafted_weights(input, &self.template)?;
        // Mini-batches are index_select-ed on the model's device.
        let images = input.images.to_device(dev)?;
        let scale = model_scale(model)?;
        let mut vars = vec![shallow.clone()];
        vars.extend(deep.iter().cloned());
        let schedule = MiniBatchSchedule::new(self.epochs, self.batch_size, self.optimizer);
        let loss = train_prompt_params(input, &vars, schedule, |idx| {
            let prompts = self.prompts(
                shallow.as_tensor().clone(),
                deep.iter().map(|v| v.as_tensor().clone()).collect(),
            );
            let pixels = images.index_select(idx, 0)?;
            Ok(vpt_logits(model, &head, Some(&prompts), &pixels, scale)?.into())
        })?;
        let mut params = vec![
            (SHALLOW.to_string(), shallow.as_tensor().detach()),
            (HEAD.to_string(), head),
        ];
        for (i, v) in deep.iter().enumerate() {
            params.push((deep_name(i + 1), v.as_tensor().detach()));
        }
        PromptClassifier::new(
            self,
            input,
            scale,
            params,
            serde_json::json!({ "final_loss": loss, "patch_size": patch, "head": head_source }),
        )
    }
}
