//! Zero-shot classification of image embeddings by class prompts (Radford et al. 2021), as
//! `medvlm zero-shot` prints it and the service returns it.
//!
//! Each class has one or more prompts. With [`Ensemble::Mean`] (CLIP's ensembling) the
//! normalised prompt embeddings of a class are averaged into one class weight; with
//! [`Ensemble::Mixture`] every prompt is scored and the probabilities are averaged, for prompt
//! sets that differ in content rather than wording. Probabilities are a softmax over classes
//! for CLIP-style models and an independent sigmoid per class (with the learned logit bias)
//! for SigLIP.

use candle_core::{DType, Device, Tensor};
use medvlm_models::vlm::l2_normalize;
use medvlm_models::{Family, LoadedModel, ModelError};

use crate::method::{ClassTexts, MethodError};

/// How the prompts of a class are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ensemble {
    /// Average the normalised prompt embeddings of a class (CLIP).
    #[default]
    Mean,
    /// Average the probabilities of the class's prompts (softmax models: log of the mean of
    /// `exp(logit)` over the prompts; SigLIP: mean of the prompts' sigmoids).
    Mixture,
}

/// Why zero-shot scores could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum ZeroShotError {
    /// The model failed (text tower, logit scale).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Tensor arithmetic failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The prompt ensembling failed.
    #[error(transparent)]
    Method(#[from] MethodError),
    /// The inputs are unusable (fewer than two classes, a class without prompts, an empty
    /// logit scale).
    #[error("zero-shot: {0}")]
    Invalid(String),
}

/// Each class's L2-normalised prompt embeddings `[P_c, D]` (f32, CPU), in class order.
pub fn class_prompt_embeddings(
    m: &LoadedModel,
    classes: &[(String, Vec<String>)],
    batch: usize,
    device: &Device,
) -> Result<Vec<Tensor>, ZeroShotError> {
    if classes.len() < 2 {
        return Err(ZeroShotError::Invalid(format!(
            "need at least two classes, got {}",
            classes.len()
        )));
    }
    let mut out = Vec::with_capacity(classes.len());
    for (class, prompts) in classes {
        if prompts.is_empty() {
            return Err(ZeroShotError::Invalid(format!(
                "class {class:?} has no prompts"
            )));
        }
        let e = medvlm_models::embed::embed_texts(m, prompts, batch, device)?;
        out.push(
            l2_normalize(&e)?
                .to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?,
        );
    }
    Ok(out)
}

fn first_value(t: Tensor, what: &str) -> Result<f32, ZeroShotError> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .first()
        .copied()
        .ok_or_else(|| ZeroShotError::Invalid(format!("the model's {what} is empty")))
}

fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = row.iter().map(|&z| (z - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.iter().map(|e| e / sum).collect()
}

/// Class probabilities, one row per image, of raw image embeddings `[N, D]` against the
/// normalised prompt embeddings of each class ([`class_prompt_embeddings`]).
pub fn zero_shot_probabilities(
    m: &LoadedModel,
    image_embeds: &Tensor,
    class_names: &[String],
    prompt_embeds: &[Tensor],
    ensemble: Ensemble,
) -> Result<Vec<Vec<f32>>, ZeroShotError> {
    if class_names.len() != prompt_embeds.len() {
        return Err(ZeroShotError::Invalid(format!(
            "{} class names but {} prompt sets",
            class_names.len(),
            prompt_embeds.len()
        )));
    }
    let img = l2_normalize(image_embeds)?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?;
    let scale = first_value(m.model.logit_scale().exp()?, "logit scale")?;
    let bias = m
        .model
        .logit_bias()
        .map(|b| first_value(b, "logit bias"))
        .transpose()?;
    let sigmoid = |z: f32| 1.0 / (1.0 + (-z).exp());
    Ok(match ensemble {
        Ensemble::Mean => {
            let txt = ClassTexts {
                class_names: class_names.to_vec(),
                prompts: prompt_embeds.to_vec(),
                negative_prompts: None,
            }
            .ensemble_weights()?;
            let logits = (img.matmul(&txt.t()?)? * scale as f64)?;
            let logits = (logits + bias.unwrap_or(0.0) as f64)?;
            logits
                .to_vec2::<f32>()?
                .iter()
                .map(|row| match m.family {
                    Family::Siglip => row.iter().map(|&z| sigmoid(z)).collect(),
                    _ => softmax(row),
                })
                .collect()
        }
        Ensemble::Mixture if m.family == Family::Siglip => {
            let mut cols = Vec::with_capacity(prompt_embeds.len());
            for pe in prompt_embeds {
                let z = ((img.matmul(&pe.t()?)? * scale as f64)? + bias.unwrap_or(0.0) as f64)?;
                let p = (z.neg()?.exp()? + 1.0)?.recip()?;
                cols.push(p.mean_keepdim(1)?);
            }
            Tensor::cat(&cols, 1)?.to_vec2::<f32>()?
        }
        Ensemble::Mixture => {
            let scores =
                medvlm_train::pretrain::prompt_mixture_scores(&img, prompt_embeds, scale as f64)
                    .map_err(|e| ZeroShotError::Invalid(format!("prompt mixture: {e}")))?;
            let scores = match bias {
                Some(b) => (scores + b as f64)?,
                None => scores,
            };
            scores
                .to_vec2::<f32>()?
                .iter()
                .map(|r| softmax(r))
                .collect()
        }
    })
}
