//! Methods that need the encoders, run on image files: prompt learning (CoOp, CoCoOp,
//! KgCoOp, VPT, MaPLe) and encoder fine-tuning (LoRA, BitFit, partial, full) fit on the
//! support images through the model and score images through it, where the frozen-feature
//! methods work on cached features ([`crate::features`]).
//!
//! Encoder fine-tuning changes the model's weights, so every fit loads a fresh trainable
//! copy ([`load_trainable`]); a saved tuned classifier is re-applied to its base model with
//! [`load_applied`].

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use medvlm_models::embed::{for_each_pixel_batch, preprocess_file};
use medvlm_models::{LoadMode, LoadOptions, LoadedModel, ModelError};
use medvlm_train::finetune::VarMap;
use rayon::prelude::*;

use crate::method::MethodError;
use crate::methods::encoder_tuning::{
    tuning_method_by_name, TunedEncoderClassifier, TuningInput, TUNING_METHOD_NAMES,
};
use crate::methods::prompt_common::{
    prompt_method_by_name, PromptClassifier, PromptInput, PROMPT_METHOD_NAMES,
};

/// Why a fit or a scoring through the model failed.
#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    /// Loading the model or reading an image failed (the error names the file).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The method failed (boxed: the method errors are large).
    #[error(transparent)]
    Method(Box<MethodError>),
    /// Tensor error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Loading the model trainable failed.
    #[error("loading model {model} (trainable)")]
    LoadTrainable {
        /// The model spec.
        model: String,
        /// The cause.
        #[source]
        source: ModelError,
    },
    /// Fine-tuning failed.
    #[error("fine-tuning {model} with {method}")]
    Tuning {
        /// The model spec.
        model: String,
        /// The method.
        method: String,
        /// The cause.
        #[source]
        source: Box<MethodError>,
    },
    /// Re-applying saved tuned weights failed.
    #[error("applying the fine-tuned weights of {dir} to {model}")]
    Apply {
        /// The artefact folder.
        dir: PathBuf,
        /// The model spec.
        model: String,
        /// The cause.
        #[source]
        source: Box<MethodError>,
    },
}

impl From<MethodError> for EncoderError {
    fn from(e: MethodError) -> Self {
        EncoderError::Method(Box::new(e))
    }
}

/// Whether `name` is a prompt-learning method (fits through the model).
pub fn is_prompt_method(name: &str) -> bool {
    PROMPT_METHOD_NAMES.contains(&name)
}

/// Whether `name` is an encoder fine-tuning method.
pub fn is_tuning_method(name: &str) -> bool {
    TUNING_METHOD_NAMES.contains(&name)
}

/// Preprocessed pixels `[N, 3, H, W]` of image files (read in parallel).
pub fn pixel_batch(
    m: &LoadedModel,
    paths: &[PathBuf],
    device: &Device,
) -> Result<Tensor, EncoderError> {
    let pre = paths
        .par_iter()
        .map(|p| preprocess_file(p, &m.preprocess))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(m.preprocess.batch(&pre, device)?)
}

/// Probabilities `[N * C]` of image files scored through the model, in batches: `score`
/// maps preprocessed pixels `[b, 3, H, W]` to class probabilities `[b, C]`.
pub fn probabilities_through_model(
    m: &LoadedModel,
    paths: &[PathBuf],
    batch: usize,
    device: &Device,
    score: impl Fn(&Tensor) -> Result<Tensor, MethodError>,
) -> Result<Vec<f32>, EncoderError> {
    let mut out = Vec::new();
    for_each_pixel_batch(m, paths, batch, false, device, &|_| {}, |px| {
        let p = score(px)?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        out.extend(p);
        Ok::<(), EncoderError>(())
    })?;
    Ok(out)
}

/// Probabilities `[N * C]` of a prompt classifier on image files, in batches.
pub fn prompt_probabilities(
    clf: &PromptClassifier,
    m: &LoadedModel,
    paths: &[PathBuf],
    batch: usize,
    device: &Device,
) -> Result<Vec<f32>, EncoderError> {
    probabilities_through_model(m, paths, batch, device, |px| {
        clf.probabilities_for_images(m.model.as_ref(), &m.tokenizer, px)
    })
}

/// What a fit on support image files needs besides the method.
pub struct SupportImages<'a> {
    /// Model spec (folder, preset, hf:), for loading a trainable copy.
    pub model: &'a str,
    /// Class names in index order.
    pub class_names: &'a [String],
    /// Prompts per class, in class order (the methods' hand-crafted class weights: VPT's
    /// head, KgCoOp's anchor, the tuning methods' zero-shot head).
    pub prompts: &'a [(String, Vec<String>)],
    /// Support image files.
    pub support: &'a [PathBuf],
    /// Class of each support image.
    pub labels: &'a [usize],
    /// Seed.
    pub seed: u64,
}

/// Fits prompt-learning method `name` on the support images through the frozen model `m`.
/// The classes are the prompts' class names with `_` read as spaces (as templates fill them
/// in).
pub fn fit_prompt_method(
    name: &str,
    overrides: Option<&serde_json::Value>,
    m: &LoadedModel,
    job: &SupportImages,
    device: &Device,
) -> Result<PromptClassifier, EncoderError> {
    let pm = prompt_method_by_name(name, overrides)?;
    let pixels = pixel_batch(m, job.support, device)?;
    let class_names: Vec<String> = job
        .prompts
        .iter()
        .map(|(c, _)| c.replace('_', " "))
        .collect();
    let class_prompts: Vec<Vec<String>> = job.prompts.iter().map(|(_, p)| p.clone()).collect();
    let input = PromptInput {
        model: m.model.as_ref(),
        tokenizer: &m.tokenizer,
        class_names: &class_names,
        images: &pixels,
        labels: job.labels,
        seed: job.seed,
        class_prompts: Some(&class_prompts),
    };
    Ok(pm.fit_prompts(&input)?)
}

/// Loads `spec` with its weights as variables (what fine-tuning and re-applying tuned
/// weights need).
pub fn load_trainable(spec: &str, device: &Device) -> Result<(LoadedModel, VarMap), EncoderError> {
    let base = VarMap::new();
    let opts = LoadOptions {
        device: device.clone(),
        mode: LoadMode::Trainable(base.clone()),
        ..LoadOptions::default()
    };
    let m =
        medvlm_models::load_model(spec, &opts).map_err(|source| EncoderError::LoadTrainable {
            model: spec.to_string(),
            source,
        })?;
    Ok((m, base))
}

/// Loads a fresh trainable copy of the model and fine-tunes it with `method` on the support
/// images. Returns the classifier and the tuned model.
pub fn fit_tuning_method(
    method: &str,
    overrides: Option<&serde_json::Value>,
    job: &SupportImages,
    device: &Device,
) -> Result<(TunedEncoderClassifier, LoadedModel), EncoderError> {
    let tuner = tuning_method_by_name(method, overrides)?;
    let (mut m, base) = load_trainable(job.model, device)?;
    let pixels = pixel_batch(&m, job.support, device)?;
    let class_prompts: Vec<Vec<String>> = job.prompts.iter().map(|(_, p)| p.clone()).collect();
    let mut input = TuningInput {
        model: m.model.as_mut(),
        base: &base,
        tokenizer: &m.tokenizer,
        class_names: job.class_names,
        class_prompts: &class_prompts,
        images: &pixels,
        labels: job.labels,
        seed: job.seed,
    };
    let clf = tuner
        .fit_encoders(&mut input)
        .map_err(|source| EncoderError::Tuning {
            model: job.model.to_string(),
            method: method.to_string(),
            source: Box::new(source),
        })?;
    Ok((clf, m))
}

/// Loads the base model of a saved tuned classifier and puts the tuned tensors onto it.
pub fn load_applied(
    dir: &Path,
    spec: &str,
    device: &Device,
) -> Result<(TunedEncoderClassifier, LoadedModel), EncoderError> {
    let clf = TunedEncoderClassifier::load(dir)?;
    let (mut m, base) = load_trainable(spec, device)?;
    clf.apply_to(m.model.as_mut(), &base)
        .map_err(|source| EncoderError::Apply {
            dir: dir.to_path_buf(),
            model: spec.to_string(),
            source: Box::new(source),
        })?;
    Ok((clf, m))
}

/// Probabilities `[N * C]` of image files under a tuned model, in batches.
pub fn tuned_probabilities(
    clf: &TunedEncoderClassifier,
    m: &LoadedModel,
    paths: &[PathBuf],
    batch: usize,
    device: &Device,
) -> Result<Vec<f32>, EncoderError> {
    probabilities_through_model(m, paths, batch, device, |px| {
        clf.probabilities_for_images(m.model.as_ref(), px)
    })
}
