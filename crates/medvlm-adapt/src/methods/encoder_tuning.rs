//! Shared machinery of few-shot encoder fine-tuning (strategy 4): LoRA in the
//! CLIP-LoRA setting ([`super::clip_lora`]), BitFit ([`super::bitfit`]),
//! partial ([`super::partial_finetune`]) and full ([`super::full_finetune`])
//! fine-tuning.
//!
//! The setting is CLIP-LoRA's (Zanella & Ben Ayed, "Low-Rank Few-Shot
//! Adaptation of Vision-Language Models", CVPRW 2024), shared by the four
//! methods so that they differ only in *which* parameters move: the class
//! texts stay the classifier, scores are `exp(logit_scale) · cos(image,
//! class text)` with the model's own scale, and the loss is cross-entropy over
//! the classes on mini-batches of the support images. Gradients flow through
//! the towers being tuned (the text tower re-encodes the class prompts at every
//! step when it is tuned). AdamW with a cosine decay of the learning rate to
//! zero (no warm-up, as CLIP-LoRA); `iterations_per_shot · K` updates, K being
//! the support images per class (their mean in the realistic mode), as
//! CLIP-LoRA's `n_iters · shots`. Each class is the mean of its prompts'
//! normalised embeddings (one prompt: the prompt itself). No augmentation: the
//! images are used as the model's own preprocessing gives them.
//!
//! Which parameters move comes from the training engine ([`medvlm_train::finetune`]):
//! a [`FinetuneSpec`] selects base weights (BitFit: biases; partial: the last
//! k blocks and the heads; full: everything) or adds LoRA adapters. The model
//! must be loaded trainable ([`medvlm_models::LoadMode::Trainable`]) since
//! its weights change.
//!
//! A fit returns a [`TunedEncoderClassifier`]: the tuned tensors (LoRA's `A`
//! and `B` in PEFT names, or the trained base weights by checkpoint name) and
//! the tuned class text weights. [`TunedEncoderClassifier::apply_to`] puts the
//! tensors onto a freshly loaded base model, then
//! [`TunedEncoderClassifier::logits_for_images`] scores images. When only the
//! text tower was tuned, the image encoder is the base one and the classifier
//! also scores cached image embeddings ([`AdaptedClassifier::logits`]).

use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use medvlm_models::{TextTokenizer, VisionLanguageModel};
use serde::{Deserialize, Serialize};

use super::prompt_common::{cosine_logits, image_embeddings, model_scale, Batches, PromptEnsemble};
use super::{train_full_batch, Optimizer};
use crate::fewshot::TaskKind;
use crate::method::{
    l2_normalize, normalized_input, AdaptInput, AdaptationMethod, AdaptedClassifier,
    ClassifierCard, MethodError, Result, CARD_FORMAT, WEIGHTS_FILE,
};
use medvlm_train::finetune::{prepare, FinetuneError, FinetuneSpec, Towers};
use medvlm_train::lora::{install_lora_tensors, set_lora_training, LoraSpec};

/// Registry names of the encoder fine-tuning methods.
pub const TUNING_METHOD_NAMES: &[&str] = &["lora", "bitfit", "partial-finetune", "full-finetune"];

/// Saved tensor of the tuned, L2-normalised class text weights `[C, E]`.
pub const CLASS_WEIGHTS: &str = "class_weights";
/// Fit-info entry listing the saved tuned tensors.
const TUNED_KEY: &str = "tuned_tensors";

/// Optimisation settings shared by the four methods (flattened into each
/// method's hyperparameters).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TuningSchedule {
    /// Peak AdamW learning rate (cosine decay to zero).
    pub lr: f64,
    /// AdamW decoupled weight decay, on every tuned parameter.
    pub weight_decay: f64,
    /// Support images per update (all of them when the set is smaller).
    pub batch_size: usize,
    /// Updates per support image per class: `iterations_per_shot · K` in all.
    pub iterations_per_shot: usize,
}

impl TuningSchedule {
    /// CLIP-LoRA's schedule with learning rate `lr` and weight decay `weight_decay`: batch 32,
    /// 500 updates per shot.
    pub fn clip_lora(lr: f64, weight_decay: f64) -> Self {
        Self {
            lr,
            weight_decay,
            batch_size: 32,
            iterations_per_shot: 500,
        }
    }

    fn validate(&self, method: &str) -> Result<()> {
        let bad = |reason: &str| MethodError::BadHyperparameters {
            method: method.into(),
            reason: reason.into(),
        };
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(bad("lr must be a positive number"));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(bad("weight_decay must be a non-negative number"));
        }
        if self.batch_size == 0 {
            return Err(bad("batch_size must be at least 1"));
        }
        if self.iterations_per_shot == 0 {
            return Err(bad("iterations_per_shot must be at least 1"));
        }
        Ok(())
    }
}

/// What an encoder fine-tuning method trains and how.
#[derive(Debug, Clone, PartialEq)]
pub struct TuningPlan {
    /// The parameters that move (mode and towers).
    pub spec: FinetuneSpec,
    /// The optimisation.
    pub schedule: TuningSchedule,
}

/// What an encoder fine-tuning method is fitted on: the trainable model.
pub struct TuningInput<'a> {
    /// The model, loaded with [`medvlm_models::LoadMode::Trainable`]`(base)`.
    /// LoRA adapters are added to it; selected base weights change in place.
    pub model: &'a mut dyn VisionLanguageModel,
    /// The model's `VarMap` (its weights as variables).
    pub base: &'a VarMap,
    /// Its tokenizer.
    pub tokenizer: &'a TextTokenizer,
    /// Class names in class-index order.
    pub class_names: &'a [String],
    /// The prompts of each class (at least one per class), in class order.
    pub class_prompts: &'a [Vec<String>],
    /// Support images, preprocessed pixels `[N, 3, H, W]`.
    pub images: &'a Tensor,
    /// Class index of each support image.
    pub labels: &'a [usize],
    /// Seed of LoRA's initialisation, its dropout and the batch order.
    pub seed: u64,
}

/// A method that fine-tunes the encoders on the support set.
pub trait EncoderTuningMethod: AdaptationMethod {
    /// The parameters to train and the schedule.
    fn plan(&self) -> Result<TuningPlan>;

    /// Fine-tunes `input.model` on the support images (see the module documentation).
    fn fit_encoders(&self, input: &mut TuningInput) -> Result<TunedEncoderClassifier> {
        fit(self.name(), self.hyperparameters(), &self.plan()?, input)
    }
}

/// Builds an encoder fine-tuning method by name, with JSON overrides of its
/// hyperparameters (as [`crate::method::method_by_name`]); values out of range
/// are refused here, before any model is loaded.
pub fn tuning_method_by_name(
    name: &str,
    overrides: Option<&serde_json::Value>,
) -> Result<Box<dyn EncoderTuningMethod>> {
    use super::with_overrides;
    let method: Box<dyn EncoderTuningMethod> = match name {
        "lora" => Box::new(with_overrides(
            name,
            super::clip_lora::ClipLora::default(),
            overrides,
        )?),
        "bitfit" => Box::new(with_overrides(
            name,
            super::bitfit::BitFit::default(),
            overrides,
        )?),
        "partial-finetune" => Box::new(with_overrides(
            name,
            super::partial_finetune::PartialFinetune::default(),
            overrides,
        )?),
        "full-finetune" => Box::new(with_overrides(
            name,
            super::full_finetune::FullFinetune::default(),
            overrides,
        )?),
        other => {
            return Err(MethodError::UnknownMethod {
                name: other.into(),
                known: TUNING_METHOD_NAMES.join(", "),
            })
        }
    };
    method.plan()?.schedule.validate(name)?;
    Ok(method)
}

/// What [`AdaptationMethod::fit`] of a fine-tuning method answers: an
/// [`AdaptInput`] holds no model.
pub(crate) fn refuse_feature_fit(name: &str, input: &AdaptInput) -> MethodError {
    super::refuse_cached_features(
        name,
        input,
        "EncoderTuningMethod::fit_encoders on the trainable model and the support images",
    )
}

/// Implements [`AdaptationMethod`] for an encoder fine-tuning method type: its registry
/// name, its serialised fields as hyperparameters, and the refusal of cached features.
macro_rules! tuning_method_entry {
    ($ty:ty, $name:literal) => {
        impl $crate::method::AdaptationMethod for $ty {
            fn name(&self) -> &'static str {
                $name
            }
            fn requires_encoder(&self) -> bool {
                true
            }
            fn hyperparameters(&self) -> serde_json::Value {
                serde_json::to_value(self).unwrap_or_default()
            }
            fn fit(
                &self,
                input: &$crate::method::AdaptInput,
            ) -> $crate::method::Result<Box<dyn $crate::method::AdaptedClassifier>> {
                Err($crate::methods::encoder_tuning::refuse_feature_fit(
                    $name, input,
                ))
            }
        }
    };
}
pub(crate) use tuning_method_entry;

fn tuning_err(e: FinetuneError) -> MethodError {
    MethodError::InvalidInput(e.to_string())
}

/// The fit shared by the four methods.
fn fit(
    name: &str,
    hyperparameters: serde_json::Value,
    plan: &TuningPlan,
    input: &mut TuningInput,
) -> Result<TunedEncoderClassifier> {
    plan.schedule.validate(name)?;
    let c = input.class_names.len();
    if c < 2 {
        return Err(MethodError::InvalidInput(format!(
            "{name} needs at least 2 classes, got {c}"
        )));
    }
    if input.class_prompts.len() != c || input.class_prompts.iter().any(|p| p.is_empty()) {
        return Err(MethodError::InvalidInput(format!(
            "{name}: give at least one prompt for each of the {c} classes"
        )));
    }
    let dims = input.images.dims();
    if dims.len() != 4 || dims[1] != 3 {
        return Err(MethodError::InvalidInput(format!(
            "support images must be preprocessed pixels [N, 3, H, W], got {dims:?}"
        )));
    }
    let n = dims[0];
    if n == 0 || n != input.labels.len() {
        return Err(MethodError::InvalidInput(format!(
            "{n} support images but {} labels",
            input.labels.len()
        )));
    }
    if let Some(&l) = input.labels.iter().find(|&&l| l >= c) {
        return Err(MethodError::InvalidInput(format!(
            "a support image has label {l} but there are {c} classes"
        )));
    }

    // Trainable parameters: fails here if the mode does not fit the model.
    let adapters = VarMap::new();
    let prepared = prepare(
        &mut *input.model,
        input.base,
        &adapters,
        &plan.spec,
        input.seed,
    )
    .map_err(tuning_err)?;
    let model: &dyn VisionLanguageModel = &*input.model;
    let device = model.device().clone();
    let scale = model_scale(model)?;
    let towers = plan.spec.towers;
    let tune_text = towers != Towers::Vision;
    let tune_image = towers != Towers::Text;

    let ensemble = PromptEnsemble::new(input.tokenizer, input.class_prompts, &device)?;
    let fixed_text = if tune_text {
        None
    } else {
        Some(ensemble.weights(model)?.detach())
    };
    let images = input.images.to_device(&device)?;
    let fixed_images = if tune_image {
        None
    } else {
        let mut rows = Vec::new();
        for start in (0..n).step_by(plan.schedule.batch_size) {
            let len = plan.schedule.batch_size.min(n - start);
            rows.push(image_embeddings(model, &images.narrow(0, start, len)?, None)?.detach());
        }
        Some(Tensor::cat(&rows, 0)?)
    };
    let targets = Tensor::new(
        input
            .labels
            .iter()
            .map(|&l| l as u32)
            .collect::<Vec<_>>()
            .as_slice(),
        &device,
    )?;

    let per_class = (n as f64 / c as f64).round().max(1.0) as usize;
    let steps = plan.schedule.iterations_per_shot * per_class;
    let mut batches = Batches::new(n, plan.schedule.batch_size, input.seed, &device);
    let vars: Vec<candle_core::Var> = prepared.params.iter().map(|(_, v)| v.clone()).collect();
    set_lora_training(model, true);
    let trained = train_full_batch(
        &vars,
        steps,
        Optimizer::AdamW {
            lr: plan.schedule.lr,
            weight_decay: plan.schedule.weight_decay,
            eps: 1e-8,
        },
        || {
            let idx = batches.next_indices()?;
            let img = match &fixed_images {
                Some(all) => all.index_select(&idx, 0)?,
                None => image_embeddings(model, &images.index_select(&idx, 0)?, None)?,
            };
            let txt = match &fixed_text {
                Some(w) => w.clone(),
                None => ensemble.weights(model)?,
            };
            let logits = cosine_logits(&img, &txt, scale)?;
            Ok(candle_nn::loss::cross_entropy(
                &logits,
                &targets.index_select(&idx, 0)?,
            )?)
        },
    );
    set_lora_training(model, false);
    let final_loss = trained?;
    let weights = ensemble.weights(model)?.detach();

    let tuned: Vec<(String, Tensor)> = prepared
        .params
        .iter()
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    let names: Vec<&str> = tuned.iter().map(|(n, _)| n.as_str()).collect();
    let fit_info = serde_json::json!({
        TUNED_KEY: names,
        "mode": plan.spec.mode.name(),
        "towers": towers.to_string(),
        "lora_layers": prepared.lora_layers,
        "base_tensors_trained": prepared.base_selected,
        "trainable_scalars": prepared.num_scalars(),
        "iterations": steps,
        "final_loss": final_loss,
        "class_prompts": input.class_prompts,
    });
    let card: ClassifierCard = serde_json::from_value(serde_json::json!({
        "format": CARD_FORMAT,
        "method": name,
        "task": TaskKind::MultiClass,
        "class_names": input.class_names,
        "feature_dim": model.embed_dim(),
        "logit_scale": scale,
        "hyperparameters": hyperparameters,
        "fit_info": fit_info,
    }))
    .map_err(|e| MethodError::InvalidInput(format!("classifier card: {e}")))?;
    Ok(TunedEncoderClassifier {
        card,
        tuned,
        class_weights: weights,
    })
}

/// A fitted encoder fine-tuning method: the tuned tensors and class weights.
#[derive(Debug, Clone)]
pub struct TunedEncoderClassifier {
    card: ClassifierCard,
    tuned: Vec<(String, Tensor)>,
    class_weights: Tensor,
}

impl TunedEncoderClassifier {
    /// Rebuilds from the registry's saved tensors (see [`crate::method::load_classifier`]).
    pub fn from_saved(card: ClassifierCard, saved: &crate::method::SavedTensors) -> Result<Self> {
        let bad = |reason: String| MethodError::BadCheckpoint {
            path: saved.path().to_path_buf(),
            reason,
        };
        let names: Vec<String> = card
            .fit_info
            .get(TUNED_KEY)
            .cloned()
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| bad(format!("fit_info.{TUNED_KEY}: {e}")))?
            .ok_or_else(|| bad(format!("the card has no fit_info.{TUNED_KEY}")))?;
        let tuned = names
            .into_iter()
            .map(|n| {
                let t = saved.get(&n)?;
                Ok((n, t))
            })
            .collect::<Result<Vec<_>>>()?;
        let class_weights =
            saved.get_shaped(CLASS_WEIGHTS, &[card.class_names.len(), card.feature_dim])?;
        Ok(Self {
            card,
            tuned,
            class_weights,
        })
    }

    /// Loads a classifier saved with [`crate::method::save_classifier`] (keeps the concrete
    /// type, so [`Self::apply_to`] is available).
    pub fn load(dir: &std::path::Path) -> Result<Self> {
        let (card, saved) = crate::method::read_saved(dir)?;
        if !TUNING_METHOD_NAMES.contains(&card.method.as_str()) {
            return Err(MethodError::BadCheckpoint {
                path: dir.join(crate::method::CARD_FILE),
                reason: format!(
                    "method '{}' is not an encoder fine-tuning method ({})",
                    card.method,
                    TUNING_METHOD_NAMES.join(", ")
                ),
            });
        }
        Self::from_saved(card, &saved)
    }

    /// The towers that were tuned.
    pub fn towers(&self) -> Towers {
        match self.card.fit_info.get("towers").and_then(|t| t.as_str()) {
            Some("vision") => Towers::Vision,
            Some("text") => Towers::Text,
            _ => Towers::Both,
        }
    }

    /// The tuned tensors by name (LoRA `A`/`B` in PEFT names, or base weights).
    pub fn tuned_tensors(&self) -> &[(String, Tensor)] {
        &self.tuned
    }

    /// Puts the tuned tensors onto `model`, the base model the classifier was fitted on,
    /// freshly loaded with [`medvlm_models::LoadMode::Trainable`]`(base)`: LoRA adapters are
    /// added (dropout off), base weights are overwritten. Every name must exist with the same
    /// shape, else nothing is changed and the error names the tensor.
    pub fn apply_to(&self, model: &mut dyn VisionLanguageModel, base: &VarMap) -> Result<()> {
        let origin = std::path::Path::new(WEIGHTS_FILE);
        if self.card.method == "lora" {
            let m: super::clip_lora::ClipLora = super::with_overrides(
                "lora",
                super::clip_lora::ClipLora::default(),
                Some(&self.card.hyperparameters),
            )?;
            let spec = LoraSpec {
                towers: m.towers,
                ..m.lora_spec()
            };
            install_lora_tensors(model, &spec, self.tuned.clone(), &VarMap::new(), origin)
                .map_err(tuning_err)?;
            return Ok(());
        }
        let data = base
            .data()
            .lock()
            .map_err(|_| MethodError::InvalidInput("model VarMap lock poisoned".into()))?;
        if data.is_empty() {
            return Err(MethodError::InvalidInput(
                "the model was not loaded trainable (its VarMap is empty); load it with \
                 LoadMode::Trainable to apply fine-tuned weights"
                    .into(),
            ));
        }
        let mut planned = Vec::with_capacity(self.tuned.len());
        for (name, t) in &self.tuned {
            let var = data.get(name).ok_or_else(|| {
                MethodError::InvalidInput(format!(
                    "the model has no parameter '{name}': the '{}' classifier was fitted on \
                     another model",
                    self.card.method
                ))
            })?;
            if var.dims() != t.dims() {
                return Err(MethodError::InvalidInput(format!(
                    "parameter '{name}' is {:?} in the model but {:?} in the '{}' classifier",
                    var.dims(),
                    t.dims(),
                    self.card.method
                )));
            }
            planned.push((var, t.to_device(var.device())?.to_dtype(var.dtype())?));
        }
        for (var, t) in planned {
            var.set(&t)?;
        }
        Ok(())
    }

    /// Class logits `[N, C]` of preprocessed images `[N, 3, H, W]` through `model`, which
    /// must carry the tuned tensors ([`Self::apply_to`]).
    pub fn logits_for_images(
        &self,
        model: &dyn VisionLanguageModel,
        pixels: &Tensor,
    ) -> Result<Tensor> {
        if model.embed_dim() != self.card.feature_dim {
            return Err(MethodError::InvalidInput(format!(
                "the model embeds in dimension {} but the '{}' classifier has dimension {}",
                model.embed_dim(),
                self.card.method,
                self.card.feature_dim
            )));
        }
        let img = image_embeddings(model, pixels, None)?;
        let w = self.class_weights.to_device(img.device())?;
        Ok((l2_normalize(&img)?.matmul(&w.t()?)? * self.card.logit_scale)?)
    }

    /// Softmax probabilities `[N, C]` of images (see [`Self::logits_for_images`]).
    pub fn probabilities_for_images(
        &self,
        model: &dyn VisionLanguageModel,
        pixels: &Tensor,
    ) -> Result<Tensor> {
        let logits = self.logits_for_images(model, pixels)?;
        Ok(candle_nn::ops::softmax_last_dim(&logits)?)
    }
}

impl AdaptedClassifier for TunedEncoderClassifier {
    fn card(&self) -> &ClassifierCard {
        &self.card
    }

    /// Cached image embeddings of the *base* image encoder are valid only when the image
    /// tower was not tuned.
    fn logits(&self, image_features: &Tensor) -> Result<Tensor> {
        if self.towers() != Towers::Text {
            return Err(MethodError::InvalidInput(format!(
                "the '{}' classifier fine-tuned the image encoder, so cached embeddings of the \
                 base encoder do not fit it; apply it to the model \
                 (TunedEncoderClassifier::apply_to) and score the images",
                self.card.method
            )));
        }
        let f = normalized_input(&self.card, image_features)?;
        let w = self.class_weights.to_device(f.device())?;
        Ok((f.matmul(&w.t()?)? * self.card.logit_scale)?)
    }

    fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut t = self.tuned.clone();
        t.push((CLASS_WEIGHTS.to_string(), self.class_weights.clone()));
        t
    }
}
