//! The adaptation-method interface shared by all five strategies.
//!
//! A method ([`AdaptationMethod`]) takes the class texts (prompt embeddings
//! already encoded by the model's text tower), the support set (image
//! embeddings and labels) and the kind of access it has to the model
//! ([`FeatureAccess`]), and returns an [`AdaptedClassifier`] that maps image
//! embeddings to class logits and probabilities and can be saved
//! ([`save_classifier`]) and loaded back ([`load_classifier`]) as a
//! safetensors file plus a JSON card naming the method and its
//! hyperparameters.
//!
//! Conventions (those of CLIP and of the papers implemented here): image and
//! text embeddings are L2-normalised before any cosine score, and cosine
//! scores are multiplied by a logit scale of 100 ([`DEFAULT_LOGIT_SCALE`],
//! CLIP's learned temperature clamped value) unless the model's own scale is
//! given in [`AdaptInput::logit_scale`].
//!
//! Methods are looked up by name with [`method_by_name`]; [`METHOD_NAMES`]
//! lists every name, including the encoder-access methods of strategies 2
//! and 4, which give a clear error when only cached features are available.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

pub use crate::fewshot::{FewShotProtocol, HyperparameterPolicy, TaskKind};
use crate::methods;

/// CLIP's logit scale (exp of the learned temperature, clamped at 100).
pub const DEFAULT_LOGIT_SCALE: f64 = 100.0;

/// Version tag written into every classifier card.
pub const CARD_FORMAT: &str = "medvlm-adapted-classifier/1";

/// File names inside a saved classifier directory.
pub const CARD_FILE: &str = "classifier.json";
/// Tensor file inside a saved classifier directory.
pub const WEIGHTS_FILE: &str = "classifier.safetensors";

/// Errors of the adaptation methods. Messages say what to change.
#[derive(Debug, thiserror::Error)]
pub enum MethodError {
    /// Tensor arithmetic failed (usually a shape mismatch upstream).
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    /// Inputs are inconsistent (shapes, labels, classes).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The method needs the encoders but only cached features were given.
    #[error(
        "method '{method}' adapts the encoders themselves and cannot run on cached features; \
         run it with the model loaded (encoder access), or pick a frozen-feature method: {alternatives}"
    )]
    NeedsEncoder {
        /// Method name.
        method: String,
        /// Frozen-feature methods that would run.
        alternatives: String,
    },
    /// The method exists in the registry but is not implemented yet.
    #[error("method '{0}' is not implemented yet in this version of medvlm")]
    NotImplemented(String),
    /// The method does not support this task kind.
    #[error("method '{method}' does not support {task:?} tasks; {hint}")]
    UnsupportedTask {
        /// Method name.
        method: String,
        /// Task kind requested.
        task: TaskKind,
        /// What to use instead.
        hint: String,
    },
    /// Unknown method name.
    #[error("unknown adaptation method '{name}'; known methods: {known}")]
    UnknownMethod {
        /// Name given.
        name: String,
        /// Known names.
        known: String,
    },
    /// Hyperparameter overrides did not parse.
    #[error("bad hyperparameters for method '{method}': {reason}")]
    BadHyperparameters {
        /// Method name.
        method: String,
        /// Parser message.
        reason: String,
    },
    /// Class descriptions file problem (unknown class, missing class, bad JSON).
    #[error("class descriptions file {path}: {reason}")]
    Descriptions {
        /// File.
        path: PathBuf,
        /// What is wrong and what to change.
        reason: String,
    },
    /// I/O on a saved classifier.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A saved classifier is malformed.
    #[error("saved classifier {path}: {reason}")]
    BadCheckpoint {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, MethodError>;

/// Class texts, already encoded by the text tower.
///
/// `prompts[c]` is `[n_prompts_c, D]`: one row per prompt of class c (one
/// template, several templates, or several descriptions). For multi-label
/// tasks with positive/negative prompt pairs, `negative_prompts[c]` holds the
/// embeddings of the negative prompts of label c ("no {label}").
#[derive(Debug, Clone)]
pub struct ClassTexts {
    /// Class (or label) names, in class-index order.
    pub class_names: Vec<String>,
    /// Per class, `[n_prompts, D]` raw text embeddings.
    pub prompts: Vec<Tensor>,
    /// Per label, `[n_prompts, D]` negative-prompt embeddings (multi-label only).
    pub negative_prompts: Option<Vec<Tensor>>,
}

impl ClassTexts {
    /// Checks counts and shapes; returns the embedding dimension.
    pub fn validate(&self) -> Result<usize> {
        if self.class_names.is_empty() {
            return Err(MethodError::InvalidInput("no classes given".into()));
        }
        if self.prompts.len() != self.class_names.len() {
            return Err(MethodError::InvalidInput(format!(
                "{} classes but prompt embeddings for {}",
                self.class_names.len(),
                self.prompts.len()
            )));
        }
        let mut dim = None;
        let all = self.prompts.iter().map(|t| ("prompt", t)).chain(
            self.negative_prompts
                .iter()
                .flatten()
                .map(|t| ("negative prompt", t)),
        );
        for (i, (kind, t)) in all.enumerate() {
            let (n, d) = t.dims2().map_err(|_| {
                MethodError::InvalidInput(format!(
                    "{kind} embeddings #{i} must be [n_prompts, D], got {:?}",
                    t.dims()
                ))
            })?;
            if n == 0 {
                return Err(MethodError::InvalidInput(format!(
                    "{kind} embeddings #{i} are empty"
                )));
            }
            if *dim.get_or_insert(d) != d {
                return Err(MethodError::InvalidInput(format!(
                    "{kind} embeddings #{i} have dimension {d}, others {}",
                    dim.unwrap_or(d)
                )));
            }
        }
        if let Some(neg) = &self.negative_prompts {
            if neg.len() != self.class_names.len() {
                return Err(MethodError::InvalidInput(format!(
                    "{} labels but negative prompts for {}",
                    self.class_names.len(),
                    neg.len()
                )));
            }
        }
        dim.ok_or_else(|| MethodError::InvalidInput("no prompt embeddings".into()))
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// The zero-shot class weights `[C, D]`: per class, the mean of the
    /// L2-normalised prompt embeddings, renormalised (CLIP's prompt
    /// ensembling; with a single prompt this is just that prompt normalised).
    pub fn ensemble_weights(&self) -> Result<Tensor> {
        ensemble(&self.prompts)
    }

    /// The negative-prompt class weights `[C, D]`, same ensembling.
    pub fn negative_ensemble_weights(&self) -> Result<Option<Tensor>> {
        self.negative_prompts.as_deref().map(ensemble).transpose()
    }
}

fn ensemble(per_class: &[Tensor]) -> Result<Tensor> {
    let rows = per_class
        .iter()
        .map(|p| {
            let p = l2_normalize(&p.to_dtype(DType::F32)?)?;
            Ok(p.mean_keepdim(0)?)
        })
        .collect::<Result<Vec<_>>>()?;
    l2_normalize(&Tensor::cat(&rows, 0)?)
}

/// Labels of a support set.
#[derive(Debug, Clone, PartialEq)]
pub enum SupportLabels {
    /// One class index per image.
    MultiClass(Vec<usize>),
    /// One multi-hot row per image.
    MultiLabel(Vec<Vec<bool>>),
}

impl SupportLabels {
    /// Number of images labelled.
    pub fn len(&self) -> usize {
        match self {
            Self::MultiClass(v) => v.len(),
            Self::MultiLabel(v) => v.len(),
        }
    }

    /// Whether there are no labels.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The task kind these labels describe.
    pub fn task(&self) -> TaskKind {
        match self {
            Self::MultiClass(_) => TaskKind::MultiClass,
            Self::MultiLabel(_) => TaskKind::MultiLabel,
        }
    }
}

/// The labelled support set: raw image embeddings and labels.
#[derive(Debug, Clone)]
pub struct SupportSet {
    /// `[N, D]` raw (unnormalised) image embeddings, any float dtype.
    pub features: Tensor,
    /// N labels.
    pub labels: SupportLabels,
}

impl SupportSet {
    /// Builds a multi-class support set.
    pub fn multi_class(features: Tensor, labels: Vec<usize>) -> Self {
        Self {
            features,
            labels: SupportLabels::MultiClass(labels),
        }
    }

    /// The rows `indices` of a feature pool, with their labels: the usual way
    /// to turn a sampled few-shot draw into a support set.
    pub fn from_pool(pool: &Tensor, labels: &[usize], indices: &[usize]) -> Result<Self> {
        let idx: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        let n = pool.dim(0)?;
        if let Some(&bad) = indices.iter().find(|&&i| i >= n || i >= labels.len()) {
            return Err(MethodError::InvalidInput(format!(
                "support index {bad} outside the pool of {n} features / {} labels",
                labels.len()
            )));
        }
        let idx = Tensor::new(idx.as_slice(), pool.device())?;
        Ok(Self::multi_class(
            pool.index_select(&idx, 0)?,
            indices.iter().map(|&i| labels[i]).collect(),
        ))
    }

    /// The images `indices` of this support set with their labels (e.g. the training part
    /// of a cross-validation fold).
    pub fn subset(&self, indices: &[usize]) -> Result<Self> {
        let n = self.features.dim(0)?;
        if let Some(&bad) = indices.iter().find(|&&i| i >= n || i >= self.labels.len()) {
            return Err(MethodError::InvalidInput(format!(
                "support index {bad} outside the support set of {n} images"
            )));
        }
        let idx: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        let idx = Tensor::new(idx.as_slice(), self.features.device())?;
        let labels = match &self.labels {
            SupportLabels::MultiClass(l) => {
                SupportLabels::MultiClass(indices.iter().map(|&i| l[i]).collect())
            }
            SupportLabels::MultiLabel(rows) => {
                SupportLabels::MultiLabel(indices.iter().map(|&i| rows[i].clone()).collect())
            }
        };
        Ok(Self {
            features: self.features.index_select(&idx, 0)?,
            labels,
        })
    }

    /// Checks shapes against the class texts; returns (N, D).
    pub fn validate(&self, num_classes: usize, dim: usize) -> Result<(usize, usize)> {
        let (n, d) = self.features.dims2().map_err(|_| {
            MethodError::InvalidInput(format!(
                "support features must be [N, D], got {:?}",
                self.features.dims()
            ))
        })?;
        if d != dim {
            return Err(MethodError::InvalidInput(format!(
                "support features have dimension {d} but the text embeddings {dim}: \
                 were they computed with the same model?"
            )));
        }
        if n != self.labels.len() {
            return Err(MethodError::InvalidInput(format!(
                "{n} support features but {} labels",
                self.labels.len()
            )));
        }
        if n == 0 {
            return Err(MethodError::InvalidInput("the support set is empty".into()));
        }
        match &self.labels {
            SupportLabels::MultiClass(l) => {
                if let Some((i, &c)) = l.iter().enumerate().find(|(_, &c)| c >= num_classes) {
                    return Err(MethodError::InvalidInput(format!(
                        "support image {i} has label {c} but there are {num_classes} classes"
                    )));
                }
            }
            SupportLabels::MultiLabel(rows) => {
                if let Some((i, r)) = rows
                    .iter()
                    .enumerate()
                    .find(|(_, r)| r.len() != num_classes)
                {
                    return Err(MethodError::InvalidInput(format!(
                        "support image {i} has {} label entries but there are {num_classes} labels",
                        r.len()
                    )));
                }
            }
        }
        Ok((n, d))
    }

    /// The class labels (multi-class only; an error for multi-label sets).
    pub fn class_labels(&self) -> Result<&[usize]> {
        match &self.labels {
            SupportLabels::MultiClass(l) => Ok(l),
            SupportLabels::MultiLabel(_) => Err(MethodError::InvalidInput(
                "class labels requested for a multi-label support set".into(),
            )),
        }
    }

    /// Class indices as a u32 tensor (multi-class only).
    pub fn class_indices(&self) -> Result<Tensor> {
        match &self.labels {
            SupportLabels::MultiClass(l) => {
                let v: Vec<u32> = l.iter().map(|&c| c as u32).collect();
                Ok(Tensor::new(v.as_slice(), self.features.device())?)
            }
            SupportLabels::MultiLabel(_) => Err(MethodError::InvalidInput(
                "class indices requested for a multi-label support set".into(),
            )),
        }
    }

    /// Labels as a `[N, C]` f32 one-hot / multi-hot matrix.
    pub fn targets(&self, num_classes: usize) -> Result<Tensor> {
        let n = self.labels.len();
        let mut m = vec![0f32; n * num_classes];
        match &self.labels {
            SupportLabels::MultiClass(l) => {
                for (i, &c) in l.iter().enumerate() {
                    m[i * num_classes + c] = 1.0;
                }
            }
            SupportLabels::MultiLabel(rows) => {
                for (i, r) in rows.iter().enumerate() {
                    for (j, &p) in r.iter().enumerate() {
                        m[i * num_classes + j] = f32::from(u8::from(p));
                    }
                }
            }
        }
        Ok(Tensor::from_vec(
            m,
            (n, num_classes),
            self.features.device(),
        )?)
    }
}

/// What a method may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureAccess {
    /// Only cached, frozen image embeddings (strategies 1 and 3).
    FrozenFeatures,
    /// The encoders themselves (strategies 2, 4 and 5; not wired yet).
    EncoderAccess,
}

/// Everything a method's `fit` receives.
#[derive(Debug, Clone, Copy)]
pub struct AdaptInput<'a> {
    /// Class texts (prompt embeddings).
    pub texts: &'a ClassTexts,
    /// Labelled support set.
    pub support: &'a SupportSet,
    /// What the method may touch.
    pub access: FeatureAccess,
    /// The model's logit scale; [`DEFAULT_LOGIT_SCALE`] when `None`.
    pub logit_scale: Option<f64>,
    /// Fixed hyperparameters or support-set cross-validation.
    pub policy: HyperparameterPolicy,
    /// Seed for random initialisation and cross-validation folds.
    pub seed: u64,
    /// The few-shot protocol that drew the support set, if known; copied
    /// into the classifier's card so that every saved result names it.
    pub protocol: Option<&'a FewShotProtocol>,
}

impl<'a> AdaptInput<'a> {
    /// Frozen-feature input with the default scale, fixed policy, seed 0.
    pub fn frozen(texts: &'a ClassTexts, support: &'a SupportSet) -> Self {
        Self {
            texts,
            support,
            access: FeatureAccess::FrozenFeatures,
            logit_scale: None,
            policy: HyperparameterPolicy::Fixed,
            seed: 0,
            protocol: None,
        }
    }

    /// The logit scale to use.
    pub fn scale(&self) -> f64 {
        self.logit_scale.unwrap_or(DEFAULT_LOGIT_SCALE)
    }

    /// Validates texts and support together; returns (N, D).
    pub fn validate(&self) -> Result<(usize, usize)> {
        let dim = self.texts.validate()?;
        self.support.validate(self.texts.num_classes(), dim)
    }

    /// Validates, and errors if the task is not multi-class.
    pub fn require_multi_class(&self, method: &str) -> Result<(usize, usize)> {
        let nd = self.validate()?;
        if self.support.labels.task() != TaskKind::MultiClass {
            return Err(MethodError::UnsupportedTask {
                method: method.into(),
                task: TaskKind::MultiLabel,
                hint:
                    "for multi-label tasks use 'zero-shot-pairs', 'linear-probe', 'tip-adapter', \
                       'tip-adapter-f' or 'clip-adapter'"
                        .into(),
            });
        }
        Ok(nd)
    }
}

/// An adaptation method with its hyperparameters.
pub trait AdaptationMethod: Send + Sync {
    /// Registry name, e.g. `"tip-adapter-f"`.
    fn name(&self) -> &'static str;
    /// Whether the method needs the encoders (strategies 2, 4, 5).
    fn requires_encoder(&self) -> bool;
    /// The method's hyperparameters as JSON (written into the card).
    fn hyperparameters(&self) -> serde_json::Value;
    /// Adapts to the support set.
    fn fit(&self, input: &AdaptInput) -> Result<Box<dyn AdaptedClassifier>>;
}

/// The metadata saved next to a classifier's tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierCard {
    /// [`CARD_FORMAT`].
    pub format: String,
    /// Method registry name.
    pub method: String,
    /// Multi-class (softmax) or multi-label (sigmoid).
    pub task: TaskKind,
    /// Class names in index order.
    pub class_names: Vec<String>,
    /// Image embedding dimension.
    pub feature_dim: usize,
    /// Logit scale used.
    pub logit_scale: f64,
    /// The method's hyperparameters as used (after any support-set search).
    pub hyperparameters: serde_json::Value,
    /// Fit diagnostics (final training loss, chosen grid point, ...).
    #[serde(default)]
    pub fit_info: serde_json::Value,
    /// The few-shot protocol of the support set, when the caller gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<FewShotProtocol>,
}

/// A classifier produced by a method: image embeddings -> class scores.
pub trait AdaptedClassifier: Send + Sync {
    /// The card (method, classes, hyperparameters).
    fn card(&self) -> &ClassifierCard;
    /// `[M, C]` logits for `[M, D]` raw image embeddings. For multi-label
    /// tasks, sigmoid(logit) is the probability of each label.
    fn logits(&self, image_features: &Tensor) -> Result<Tensor>;
    /// The tensors needed to rebuild the classifier (see [`load_classifier`]).
    fn tensors(&self) -> Vec<(String, Tensor)>;
    /// `[M, C]` probabilities: softmax over classes (multi-class) or an
    /// independent sigmoid per label (multi-label).
    fn probabilities(&self, image_features: &Tensor) -> Result<Tensor> {
        let logits = self.logits(image_features)?;
        Ok(match self.card().task {
            TaskKind::MultiClass => candle_nn::ops::softmax_last_dim(&logits)?,
            TaskKind::MultiLabel => candle_nn::ops::sigmoid(&logits)?,
        })
    }
}

/// Checks that `image_features` is `[M, D]` with the card's D and returns
/// them L2-normalised in f32.
pub fn normalized_input(card: &ClassifierCard, image_features: &Tensor) -> Result<Tensor> {
    let (_, d) = image_features.dims2().map_err(|_| {
        MethodError::InvalidInput(format!(
            "image features must be [M, D], got {:?}",
            image_features.dims()
        ))
    })?;
    if d != card.feature_dim {
        return Err(MethodError::InvalidInput(format!(
            "image features have dimension {d} but the '{}' classifier was fitted on dimension {}",
            card.method, card.feature_dim
        )));
    }
    l2_normalize(&image_features.to_dtype(DType::F32)?)
}

/// Row-wise L2 normalisation (rows of zeros stay zero).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    Ok(x.broadcast_div(&norm)?)
}

/// Builds a card for a classifier fitted from `input`.
pub fn make_card(
    method: &dyn AdaptationMethod,
    input: &AdaptInput,
    task: TaskKind,
    hyperparameters: serde_json::Value,
    fit_info: serde_json::Value,
) -> Result<ClassifierCard> {
    Ok(ClassifierCard {
        format: CARD_FORMAT.into(),
        method: method.name().into(),
        task,
        class_names: input.texts.class_names.clone(),
        feature_dim: input.texts.validate()?,
        logit_scale: input.scale(),
        hyperparameters,
        fit_info,
        protocol: input.protocol.cloned(),
    })
}

/// medvlm-io's atomic writer around a writer that takes a path; its own error is carried
/// through the `io::Error` and restored.
fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let mut inner = None;
    let outcome = medvlm_io::atomic::write_atomic_via(path, |tmp| {
        write(tmp).map_err(|e| {
            let msg = e.to_string();
            inner = Some(e);
            std::io::Error::other(msg)
        })
    });
    match (outcome, inner) {
        (Ok(()), _) => Ok(()),
        (Err(_), Some(e)) => Err(e),
        (Err(e), None) => Err(MethodError::Io {
            path: path.to_path_buf(),
            source: e.into_io(),
        }),
    }
}

/// Saves a classifier into `dir` (created if needed): `classifier.safetensors`
/// with its tensors and `classifier.json` with its card, each written to a
/// temporary file then renamed.
pub fn save_classifier(classifier: &dyn AdaptedClassifier, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| MethodError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let tensors: HashMap<String, Tensor> = classifier.tensors().into_iter().collect();
    write_atomic(&dir.join(WEIGHTS_FILE), |tmp| {
        candle_core::safetensors::save(&tensors, tmp).map_err(|e| MethodError::BadCheckpoint {
            path: tmp.to_path_buf(),
            reason: format!("could not write: {e}"),
        })
    })?;
    let json = serde_json::to_string_pretty(classifier.card())
        .map_err(|e| MethodError::InvalidInput(format!("card does not serialise: {e}")))?;
    write_atomic(&dir.join(CARD_FILE), |tmp| {
        std::fs::write(tmp, json).map_err(|source| MethodError::Io {
            path: tmp.to_path_buf(),
            source,
        })
    })
}

/// The tensors of a saved classifier, looked up by name with clear errors.
pub struct SavedTensors {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl SavedTensors {
    /// A tensor by name, with an error naming the file if missing.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| MethodError::BadCheckpoint {
                path: self.path.clone(),
                reason: format!("tensor '{name}' is missing"),
            })
    }

    /// A tensor that must have exactly `dims`.
    pub fn get_shaped(&self, name: &str, dims: &[usize]) -> Result<Tensor> {
        let t = self.get(name)?;
        if t.dims() != dims {
            return Err(MethodError::BadCheckpoint {
                path: self.path.clone(),
                reason: format!(
                    "tensor '{name}' has shape {:?}, expected {dims:?}",
                    t.dims()
                ),
            });
        }
        Ok(t.to_dtype(DType::F32)?)
    }

    /// The file these tensors came from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Loads a classifier saved with [`save_classifier`].
pub fn load_classifier(dir: &Path) -> Result<Box<dyn AdaptedClassifier>> {
    let (card, saved) = read_saved(dir)?;
    methods::rebuild_classifier(card, &saved)
}

/// The card and tensors of a classifier saved with [`save_classifier`] in `dir`, with errors
/// naming the file.
pub fn read_saved(dir: &Path) -> Result<(ClassifierCard, SavedTensors)> {
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
    if card.format != CARD_FORMAT {
        return Err(MethodError::BadCheckpoint {
            path: card_path,
            reason: format!("format '{}' is not '{CARD_FORMAT}'", card.format),
        });
    }
    let weights_path = dir.join(WEIGHTS_FILE);
    let tensors = candle_core::safetensors::load(&weights_path, &Device::Cpu).map_err(|e| {
        MethodError::BadCheckpoint {
            path: weights_path.clone(),
            reason: e.to_string(),
        }
    })?;
    let saved = SavedTensors {
        path: weights_path,
        tensors,
    };
    Ok((card, saved))
}

/// Every registered method name, strategies 1 to 4.
pub const METHOD_NAMES: &[&str] = &[
    "zero-shot",
    "zero-shot-ensemble",
    "zero-shot-descriptions",
    "zero-shot-mixture",
    "zero-shot-pairs",
    "clip-adapter",
    "tip-adapter",
    "tip-adapter-f",
    "taskres",
    "linear-probe",
    "lp++",
    "clap",
    "coop",
    "cocoop",
    "kgcoop",
    "vpt",
    "maple",
    "lora",
    "bitfit",
    "partial-finetune",
    "full-finetune",
];

/// The frozen-feature methods (strategies 1 and 3).
pub fn frozen_feature_method_names() -> Vec<&'static str> {
    METHOD_NAMES
        .iter()
        .copied()
        .filter(|n| {
            method_by_name(n, None)
                .map(|m| !m.requires_encoder())
                .unwrap_or(false)
        })
        .collect()
}

/// Looks a method up by name with its default hyperparameters, overriding
/// any of them from `overrides` (a JSON object of field -> value).
pub fn method_by_name(
    name: &str,
    overrides: Option<&serde_json::Value>,
) -> Result<Box<dyn AdaptationMethod>> {
    methods::build_method(name, overrides)
}
