//! An adapted model loaded for prediction: the artefact `medvlm adapt` wrote
//! ([`crate::artefact`]) with its base model, ready to give class probabilities of image
//! files ([`AdaptedModel::predict_files`], what `medvlm predict` prints) or of preprocessed
//! pixels already in memory ([`AdaptedModel::predict_pixels`], what a service decoding
//! uploads needs).
//!
//! The three kinds of artefact score the same way they were evaluated: frozen-feature
//! classifiers on the image embeddings, prompt learners through the model with their learned
//! prompts, and encoder fine-tuning artefacts with their tuned tensors (LoRA adapters,
//! biases, blocks) put onto a trainable copy of the base model.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use medvlm_models::embed::{for_each_pixel_batch, Skipped};
use medvlm_models::{LoadOptions, LoadedModel, ModelError};

use crate::artefact::{AdaptCard, ArtefactError};
use crate::encoders::{is_prompt_method, is_tuning_method, load_applied, EncoderError};
use crate::fewshot::TaskKind;
use crate::method::{load_classifier, AdaptedClassifier, MethodError};
use crate::methods::encoder_tuning::TunedEncoderClassifier;
use crate::methods::prompt_common::PromptClassifier;

/// Why an artefact could not be loaded or could not score.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    /// The artefact folder or its card.
    #[error(transparent)]
    Artefact(#[from] ArtefactError),
    /// The base model did not load.
    #[error("the model of {dir} ({model}; pass another model spec if it moved)")]
    Model {
        /// The artefact folder.
        dir: PathBuf,
        /// The model spec tried.
        model: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The saved classifier did not load or did not score.
    #[error(transparent)]
    Method(Box<MethodError>),
    /// The card and the saved classifier disagree.
    #[error("{dir}: adapt.json says {card:?} but the saved classifier is {saved:?}; re-run medvlm adapt")]
    Mismatch {
        /// The artefact folder.
        dir: PathBuf,
        /// Task kind in the card.
        card: TaskKind,
        /// Task kind of the classifier.
        saved: TaskKind,
    },
    /// No image could be read.
    #[error("none of the {0} images could be read")]
    NoneReadable(usize),
    /// Running the model failed, or an image could not be read without `skip_bad`
    /// ([`ModelError::UnreadableImage`], naming the file).
    #[error(transparent)]
    Compute(#[from] ModelError),
    /// Tensor error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<MethodError> for PredictError {
    fn from(e: MethodError) -> Self {
        PredictError::Method(Box::new(e))
    }
}

enum Scorer {
    Frozen(Box<dyn AdaptedClassifier>),
    Prompt(Box<PromptClassifier>),
    Tuned(Box<TunedEncoderClassifier>),
}

/// An artefact with its base model, ready to predict.
pub struct AdaptedModel {
    /// The card (`adapt.json`).
    pub card: AdaptCard,
    /// The base model (for tuning methods, with the tuned tensors applied).
    pub model: LoadedModel,
    scorer: Scorer,
}

/// Class probabilities of image files.
#[derive(Debug)]
pub struct Predictions {
    /// The images scored, in input order.
    pub paths: Vec<PathBuf>,
    /// Probabilities, row-major `[paths.len(), n_classes]`: a softmax over classes, or one
    /// independent sigmoid per label for a multi-label artefact.
    pub probabilities: Vec<f32>,
    /// Images skipped as unreadable (only when asked to skip).
    pub skipped: Vec<Skipped>,
}

impl AdaptedModel {
    /// Loads the artefact in `dir` and its base model: the one the card names, or `model`
    /// when given (the same weights, moved).
    pub fn load(dir: &Path, model: Option<&str>, device: &Device) -> Result<Self, PredictError> {
        let card = AdaptCard::read(dir)?;
        let spec = model.unwrap_or(&card.model).to_string();
        let model_error = |source: Box<dyn std::error::Error + Send + Sync>| PredictError::Model {
            dir: dir.to_path_buf(),
            model: spec.clone(),
            source,
        };
        let method = card.method.as_str();
        let (model, scorer) = if is_tuning_method(method) {
            // Fine-tuned weights go onto a trainable copy of the base model.
            let (clf, m) = load_applied(dir, &spec, device)
                .map_err(|e: EncoderError| model_error(Box::new(e)))?;
            (m, Scorer::Tuned(Box::new(clf)))
        } else {
            let opts = LoadOptions {
                device: device.clone(),
                ..LoadOptions::default()
            };
            let m =
                medvlm_models::load_model(&spec, &opts).map_err(|e| model_error(Box::new(e)))?;
            let scorer = if is_prompt_method(method) {
                Scorer::Prompt(Box::new(PromptClassifier::load(dir)?))
            } else {
                let clf = load_classifier(dir)?;
                let saved = clf.card().task;
                if saved != card.task {
                    return Err(PredictError::Mismatch {
                        dir: dir.to_path_buf(),
                        card: card.task,
                        saved,
                    });
                }
                Scorer::Frozen(clf)
            };
            (m, scorer)
        };
        Ok(Self {
            card,
            model,
            scorer,
        })
    }

    /// Class (or label) names in column order.
    pub fn class_names(&self) -> &[String] {
        &self.card.class_names
    }

    /// Multi-class or multi-label.
    pub fn task(&self) -> TaskKind {
        self.card.task
    }

    /// Probabilities `[B, C]` (f32, CPU) of preprocessed pixels `[B, 3, H, W]` (see
    /// [`LoadedModel::preprocess`]).
    pub fn predict_pixels(&self, pixels: &Tensor) -> Result<Tensor, PredictError> {
        let m = &self.model;
        let p = match &self.scorer {
            Scorer::Frozen(clf) => {
                let feats = m
                    .model
                    .encode_image(pixels)?
                    .embeds
                    .to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?;
                clf.probabilities(&feats)?
            }
            Scorer::Prompt(clf) => {
                clf.probabilities_for_images(m.model.as_ref(), &m.tokenizer, pixels)?
            }
            Scorer::Tuned(clf) => clf.probabilities_for_images(m.model.as_ref(), pixels)?,
        };
        Ok(p.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
    }

    /// Probabilities of image files (DICOM, NIfTI, PNG, ... as `medvlm embed` reads them), in
    /// batches of `batch`; unreadable files are an error naming the file, or with
    /// `skip_bad` are listed in the result. `on_progress(n)` is called after each batch.
    pub fn predict_files(
        &self,
        paths: &[PathBuf],
        batch: usize,
        skip_bad: bool,
        device: &Device,
        on_progress: &dyn Fn(u64),
    ) -> Result<Predictions, PredictError> {
        let mut probabilities = Vec::new();
        let pass = for_each_pixel_batch(
            &self.model,
            paths,
            batch,
            skip_bad,
            device,
            on_progress,
            |px| -> Result<(), PredictError> {
                let probs = self.predict_pixels(px)?;
                probabilities.extend(probs.flatten_all()?.to_vec1::<f32>()?);
                Ok(())
            },
        )?;
        let out = Predictions {
            paths: pass.paths,
            probabilities,
            skipped: pass.skipped,
        };
        if out.paths.is_empty() {
            return Err(PredictError::NoneReadable(paths.len()));
        }
        Ok(out)
    }
}
