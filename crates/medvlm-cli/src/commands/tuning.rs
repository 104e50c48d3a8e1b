//! Few-shot encoder fine-tuning (strategy 4: `lora`, `bitfit`,
//! `partial-finetune`, `full-finetune`) as the commands run it: the model is
//! loaded trainable once per fit (a fit changes its weights), tuned on the
//! support images, and the tuned model scores images. Shared by `medvlm
//! adapt`, `medvlm predict` and `medvlm bench fewshot`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::Device;
use medvlm_adapt::methods::encoder_tuning::{
    tuning_method_by_name, TunedEncoderClassifier, TuningInput, TUNING_METHOD_NAMES,
};
use medvlm_models::{LoadMode, LoadOptions, LoadedModel};
use medvlm_train::finetune::VarMap;

use super::adapt::{pixel_batch, probabilities_through_model};

/// Whether `name` is an encoder fine-tuning method.
pub fn is_tuning_method(name: &str) -> bool {
    TUNING_METHOD_NAMES.contains(&name)
}

/// Loads `spec` with its weights as variables (what fine-tuning and re-applying tuned
/// weights need).
pub fn load_trainable(spec: &str, device: &Device) -> anyhow::Result<(LoadedModel, VarMap)> {
    let base = VarMap::new();
    let opts = LoadOptions {
        device: device.clone(),
        mode: LoadMode::Trainable(base.clone()),
        ..LoadOptions::default()
    };
    let m = medvlm_models::load_model(spec, &opts)
        .with_context(|| format!("loading model {spec} (trainable)"))?;
    Ok((m, base))
}

/// What a fit needs besides the method.
pub struct TuningJob<'a> {
    /// Model spec (directory, preset, hf:).
    pub model: &'a str,
    /// Class names.
    pub class_names: &'a [String],
    /// Prompts per class, in class order.
    pub prompts: &'a [(String, Vec<String>)],
    /// Support image files.
    pub support: &'a [PathBuf],
    /// Class of each support image.
    pub labels: &'a [usize],
    /// Seed.
    pub seed: u64,
}

/// Loads a fresh trainable copy of the model and fine-tunes it with `method` on the
/// support images. Returns the classifier and the tuned model.
pub fn fit(
    method: &str,
    overrides: Option<&serde_json::Value>,
    job: &TuningJob,
    device: &Device,
) -> anyhow::Result<(TunedEncoderClassifier, LoadedModel)> {
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
        .with_context(|| format!("fine-tuning {} with {method}", job.model))?;
    Ok((clf, m))
}

/// Loads the base model of a saved classifier and puts the tuned tensors onto it.
pub fn load_applied(
    dir: &Path,
    spec: &str,
    device: &Device,
) -> anyhow::Result<(TunedEncoderClassifier, LoadedModel)> {
    let clf = TunedEncoderClassifier::load(dir)?;
    let (mut m, base) = load_trainable(spec, device)?;
    clf.apply_to(m.model.as_mut(), &base).with_context(|| {
        format!(
            "applying the fine-tuned weights of {} to {spec}",
            dir.display()
        )
    })?;
    Ok((clf, m))
}

/// Probabilities `[N * C]` of image files under a tuned model, in batches.
pub fn probabilities(
    clf: &TunedEncoderClassifier,
    m: &LoadedModel,
    paths: &[PathBuf],
    batch: usize,
    device: &Device,
) -> anyhow::Result<Vec<f32>> {
    probabilities_through_model(m, paths, batch, device, |px| {
        Ok(clf.probabilities_for_images(m.model.as_ref(), px)?)
    })
}
