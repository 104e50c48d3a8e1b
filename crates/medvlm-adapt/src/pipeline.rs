//! The few-shot adaptation pipeline as library calls: what `medvlm adapt` does ([`adapt`],
//! then [`Adaptation::write`]) and the pieces `medvlm bench fewshot`
//! ([`crate::fewshot_sweep`]) repeats over shots and seeds: draw a support set
//! ([`AdaptContext::draw`]), fit a method on it ([`AdaptContext::fit`]), and evaluate the fit on
//! the test split with conformal sets calibrated on the calibration split
//! ([`AdaptContext::evaluate`]).
//!
//! An [`AdaptContext`] is prepared once per task and model ([`AdaptContext::new`]): the class
//! prompts encoded by the text tower, the model's logit scale, and the pool and test rows that
//! have image features. Three kinds of method fit on a support draw:
//!
//! * frozen-feature methods (zero-shot, probes, adapters) on the cached image features;
//! * prompt learners (CoOp, CoCoOp, KgCoOp, VPT, MaPLe) on the support images through the
//!   frozen model;
//! * encoder fine-tuning (LoRA, BitFit, partial, full) on a fresh trainable copy of the model.
//!
//! Multi-label tasks run only [`MULTI_LABEL_METHODS`], draw support sets with the greedy
//! multi-label sampler (at least K positives per finding), and are evaluated with per-label
//! AUROC, average precision and F1, and conformal risk control of the label sets'
//! false-negative rate instead of APS/RAPS sets.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use medvlm_eval::conformal::ConformalConfig;
use medvlm_eval::evaluation::{
    evaluate, evaluate_multilabel, Metrics, MultiLabelMetrics, MULTI_LABEL_THRESHOLD,
};
use medvlm_eval::plots::{reliability_plot, Plot, Size};
use medvlm_eval::EvalError;
use medvlm_models::LoadedModel;

use crate::artefact::{write_artefact_dir, AdaptCard, ArtefactError, ADAPT_CARD, ADAPT_FORMAT};
use crate::encoders::{
    fit_prompt_method, fit_tuning_method, is_prompt_method, is_tuning_method, prompt_probabilities,
    tuned_probabilities, EncoderError, SupportImages,
};
use crate::features::{model_fingerprint, FeaturesError, TaskFeatures};
use crate::fewshot::{sample_support_multilabel, FewShotProtocol, SamplingMode, TaskKind};
use crate::method::{
    method_by_name, save_classifier, AdaptInput, AdaptedClassifier, ClassTexts, FeatureAccess,
    MethodError, SupportSet,
};
use crate::methods::encoder_tuning::TunedEncoderClassifier;
use crate::methods::prompt_common::{model_refusal, PromptClassifier};
use crate::prompts::{encode_class_texts, model_logit_scale, PromptError};
use crate::task::{multi_hot_text, Task, TaskError};

/// The frozen-feature methods that fit multi-label tasks (one sigmoid per label):
/// CheXzero-style positive/negative prompt pairs, the linear probe with an independent
/// logistic loss per label, and Tip-Adapter(-F) and CLIP-Adapter on top of the prompt pairs
/// (signed multi-hot cache values, binary cross-entropy). Every other method is multi-class
/// only (a softmax over classes).
pub const MULTI_LABEL_METHODS: &[&str] = &[
    "zero-shot-pairs",
    "linear-probe",
    "tip-adapter",
    "tip-adapter-f",
    "clip-adapter",
];

/// The multi-label methods whose zero-shot part is the positive/negative prompt pairs (they
/// need negative prompts).
pub const PROMPT_PAIR_METHODS: &[&str] = &[
    "zero-shot-pairs",
    "tip-adapter",
    "tip-adapter-f",
    "clip-adapter",
];

/// Why a method cannot run on a multi-label task, or `None` if it can.
pub fn multi_label_refusal(method: &str) -> Option<String> {
    if MULTI_LABEL_METHODS.contains(&method) {
        return None;
    }
    let why = if method.starts_with("zero-shot") {
        "scores classes with a softmax over classes (one class per image); for multi-label \
         zero-shot use 'zero-shot-pairs' (positive/negative prompt pairs)"
    } else {
        "is multi-class only (one class per image)"
    };
    Some(format!(
        "'{method}' {why}; multi-label methods: {}",
        MULTI_LABEL_METHODS.join(", ")
    ))
}

/// Why a method cannot run on a task and model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MethodRefusal {
    /// The task is multi-label and the method is multi-class only.
    #[error("method {0}")]
    NotMultiLabel(String),
    /// The method scores positive/negative prompt pairs and needs a multi-label task.
    #[error(
        "method '{0}' scores each label with a positive/negative prompt pair and needs a \
         multi-label task; for a multi-class task use zero-shot or zero-shot-ensemble"
    )]
    NeedsMultiLabel(String),
    /// The model cannot run the method (visual prompts on a convolutional tower).
    #[error("{0}")]
    Model(String),
}

/// Refuses a method that cannot run on a task of this kind with this model, before any image
/// is read; `None` if it can.
pub fn method_refusal(method: &str, kind: TaskKind, model: &LoadedModel) -> Option<MethodRefusal> {
    match kind {
        TaskKind::MultiLabel => multi_label_refusal(method).map(MethodRefusal::NotMultiLabel),
        TaskKind::MultiClass if method == "zero-shot-pairs" => {
            Some(MethodRefusal::NeedsMultiLabel(method.to_string()))
        }
        TaskKind::MultiClass => {
            model_refusal(method, model.model.as_ref()).map(MethodRefusal::Model)
        }
    }
}

/// Prompt learning or encoder fine-tuning: fitted and scored through the model rather than on
/// cached features.
pub fn is_encoder_method(name: &str) -> bool {
    is_prompt_method(name) || is_tuning_method(name)
}

/// Why the pipeline stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The request cannot work (the message says why and what to do instead).
    #[error("{0}")]
    Refused(String),
    /// The method cannot run on this task or model.
    #[error(transparent)]
    NotApplicable(#[from] MethodRefusal),
    /// The support set could not be drawn.
    #[error(
        "K={shots}, seed {seed}: drawing the support set from the '{split}' split of {manifest}"
    )]
    Support {
        /// Shots per class.
        shots: usize,
        /// Seed of the draw.
        seed: u64,
        /// The pool split.
        split: String,
        /// The task's manifest.
        manifest: PathBuf,
        /// The sampler's reason.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A method failed to fit or to score (`what` names it, with K and the seed).
    #[error("{what}")]
    Fit {
        /// Method, K and seed.
        what: String,
        /// The cause.
        #[source]
        source: Box<PipelineError>,
    },
    /// A method's settings or fit.
    #[error(transparent)]
    Method(Box<MethodError>),
    /// Fitting or scoring through the encoders.
    #[error(transparent)]
    Encoder(Box<EncoderError>),
    /// Image features.
    #[error(transparent)]
    Features(#[from] FeaturesError),
    /// Task rows and labels.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// Class prompts.
    #[error(transparent)]
    Prompt(#[from] PromptError),
    /// Metrics or plots.
    #[error(transparent)]
    Eval(#[from] EvalError),
    /// Writing the artefact.
    #[error(transparent)]
    Artefact(#[from] ArtefactError),
    /// The model (its logit scale).
    #[error(transparent)]
    Model(#[from] medvlm_models::ModelError),
    /// Tensor error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A file could not be written.
    #[error("writing {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl From<MethodError> for PipelineError {
    fn from(e: MethodError) -> Self {
        PipelineError::Method(Box::new(e))
    }
}

impl From<EncoderError> for PipelineError {
    fn from(e: EncoderError) -> Self {
        PipelineError::Encoder(Box::new(e))
    }
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, PipelineError>;

/// Which splits play which part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Splits {
    /// The pool the support set is drawn from.
    pub train: String,
    /// The evaluated split (`None`: no evaluation).
    pub test: Option<String>,
    /// The split that only calibrates the conformal sets; without it, the pool images outside
    /// the support set do.
    pub calib: String,
}

impl Default for Splits {
    fn default() -> Self {
        Self {
            train: "train".into(),
            test: Some("test".into()),
            calib: "val".into(),
        }
    }
}

/// What the pipeline needs besides the method: the task, its image features, the model and
/// the prompts.
pub struct TaskSetup<'a> {
    /// The task ([`Task::from_manifests`]).
    pub task: &'a Task,
    /// Image features of the task's rows ([`crate::features::task_features`]).
    pub features: &'a TaskFeatures,
    /// The model the features came from.
    pub model: &'a LoadedModel,
    /// Its spec (folder, preset, hf:), written in cards and used to load trainable copies.
    pub model_spec: &'a str,
    /// The prompts of each class, in class order ([`crate::prompts::class_prompts`]).
    pub prompts: Vec<(String, Vec<String>)>,
    /// Multi-label tasks: the negative prompts of each label (required there, for the
    /// prompt-pair methods); ignored for multi-class tasks.
    pub negative_prompts: Option<Vec<(String, Vec<String>)>>,
    /// The manifest column used as label (written in cards).
    pub label_field: String,
    /// The `FIELD=VALUE` filters that selected the records (written in cards).
    pub filters: Vec<String>,
    /// Which split is the pool, the test set and the calibration set.
    pub splits: Splits,
    /// Conformal settings: score, alpha (multi-label: the target false-negative rate) and
    /// randomisation; the seed is replaced by each draw's seed.
    pub conformal: ConformalConfig,
    /// Images per batch when scoring through the model.
    pub batch: usize,
    /// Where the model runs.
    pub device: &'a Device,
}

/// A task and model prepared for fitting and evaluating methods.
pub struct AdaptContext<'a> {
    setup: TaskSetup<'a>,
    texts: ClassTexts,
    logit_scale: f64,
    pool_rows: Vec<usize>,
    test_rows: Vec<usize>,
}

/// One support draw.
#[derive(Debug, Clone)]
pub struct Support {
    /// The protocol it was drawn under.
    pub protocol: FewShotProtocol,
    /// The support images as task rows.
    pub rows: Vec<usize>,
}

/// A fitted method.
pub enum Fitted {
    /// A classifier on frozen image features.
    Frozen(Box<dyn AdaptedClassifier>),
    /// Learned prompts, scored through the frozen model.
    Prompt(Box<PromptClassifier>),
    /// Tuned encoder tensors and the tuned model they were fitted on.
    Tuned(Box<TunedEncoderClassifier>, Box<LoadedModel>),
}

impl Fitted {
    /// The fitted classifier (its card, its save).
    pub fn classifier(&self) -> &dyn AdaptedClassifier {
        match self {
            Fitted::Frozen(c) => c.as_ref(),
            Fitted::Prompt(c) => c.as_ref(),
            Fitted::Tuned(c, _) => c.as_ref(),
        }
    }
}

/// Metrics of one evaluation.
#[derive(Debug, Clone)]
pub enum TaskMetrics {
    /// Accuracy, balanced accuracy, F1, AUROC, ECE and the reliability bins, APS/RAPS sets.
    MultiClass(Metrics),
    /// Per-label AUROC, average precision and F1, conformal risk control of the FNR.
    MultiLabel(MultiLabelMetrics),
}

/// A fit evaluated on the test split.
#[derive(Debug, Clone)]
pub struct TestEvaluation {
    /// The test images as task rows.
    pub rows: Vec<usize>,
    /// Row-major probabilities `[rows, C]`.
    pub probabilities: Vec<f32>,
    /// The metrics.
    pub metrics: TaskMetrics,
    /// Seconds taken to score the test images.
    pub score_seconds: f64,
}

impl<'a> AdaptContext<'a> {
    /// Encodes the class prompts (and a multi-label task's negative prompts), reads the
    /// model's logit scale, and finds the pool and test rows that have image features.
    pub fn new(setup: TaskSetup<'a>) -> Result<Self> {
        let task = setup.task;
        let negatives = match task.kind {
            TaskKind::MultiClass => None,
            TaskKind::MultiLabel => match &setup.negative_prompts {
                Some(n) => Some(n.as_slice()),
                None => {
                    return Err(PipelineError::Refused(
                        "a multi-label task needs the negative prompts of each label (e.g. \
                         \"a medical image with no {}\")"
                            .into(),
                    ))
                }
            },
        };
        let texts = encode_class_texts(
            setup.model,
            &setup.prompts,
            negatives,
            setup.batch,
            setup.device,
        )?;
        let logit_scale = model_logit_scale(setup.model)?;
        let pool_rows = setup
            .features
            .available(&task.split_rows(&setup.splits.train));
        if pool_rows.is_empty() {
            return Err(PipelineError::Refused(format!(
                "manifest {} has no labelled '{}' images to draw the support set from",
                task.manifest_path.display(),
                setup.splits.train
            )));
        }
        let test_rows = match &setup.splits.test {
            Some(split) => setup.features.available(&task.split_rows(split)),
            None => Vec::new(),
        };
        Ok(Self {
            setup,
            texts,
            logit_scale,
            pool_rows,
            test_rows,
        })
    }

    /// The inputs.
    pub fn setup(&self) -> &TaskSetup<'a> {
        &self.setup
    }

    /// The task.
    pub fn task(&self) -> &'a Task {
        self.setup.task
    }

    /// The pool rows (train split, with features).
    pub fn pool_rows(&self) -> &[usize] {
        &self.pool_rows
    }

    /// The test rows (with features); empty without a test split.
    pub fn test_rows(&self) -> &[usize] {
        &self.test_rows
    }

    /// Refuses a method that cannot run on this task and model ([`method_refusal`]).
    pub fn refusal(&self, method: &str) -> Option<MethodRefusal> {
        method_refusal(method, self.task().kind, self.setup.model)
    }

    /// Draws the support set of `protocol` from the pool: the balanced or realistic sampler
    /// for multi-class tasks, the greedy multi-label sampler (at least K positives per
    /// finding) for multi-label ones.
    pub fn draw(&self, protocol: &FewShotProtocol) -> Result<Support> {
        let task = self.task();
        let failed = |source: Box<dyn std::error::Error + Send + Sync>| PipelineError::Support {
            shots: protocol.shots,
            seed: protocol.seed,
            split: self.setup.splits.train.clone(),
            manifest: task.manifest_path.clone(),
            source,
        };
        if protocol.shots == 0 {
            return Err(PipelineError::Refused(
                "shots must be at least 1 per class".into(),
            ));
        }
        if protocol.task != task.kind {
            return Err(PipelineError::Refused(format!(
                "the protocol is {:?} but the task is {:?}",
                protocol.task, task.kind
            )));
        }
        let picked = match task.kind {
            TaskKind::MultiClass => {
                let labels = task.classes(&self.pool_rows)?;
                protocol
                    .sample(&labels, &task.class_names)
                    .map_err(|e| failed(Box::new(e)))?
            }
            TaskKind::MultiLabel => {
                if protocol.mode != SamplingMode::Balanced {
                    return Err(PipelineError::Refused(
                        "realistic sampling draws classes by their prior and is defined for \
                         multi-class tasks; multi-label support sets use the greedy multi-label \
                         sampler (at least K positives per finding)"
                            .into(),
                    ));
                }
                let targets = task.multi_hot(&self.pool_rows)?;
                sample_support_multilabel(
                    &targets,
                    &task.class_names,
                    protocol.shots,
                    protocol.seed,
                )
                .map_err(|e| failed(Box::new(e)))?
            }
        };
        Ok(Support {
            protocol: protocol.clone(),
            rows: picked.iter().map(|&i| self.pool_rows[i]).collect(),
        })
    }

    /// A one-line description of a draw's protocol (multi-label: with the sampler's rule).
    pub fn describe(&self, protocol: &FewShotProtocol) -> String {
        match protocol.task {
            TaskKind::MultiClass => protocol.describe(),
            TaskKind::MultiLabel => format!(
                "{}; greedy multi-label sampler: at least {} positive(s) per finding, studies \
                 without findings not drawn",
                protocol.describe(),
                protocol.shots
            ),
        }
    }

    /// The support images of a draw with their labels as text (multi-label: findings joined
    /// with `;`, or `normal`), as cards and benchmark files record them.
    pub fn support_listing(&self, support: &Support) -> Vec<(String, String)> {
        let task = self.task();
        support
            .rows
            .iter()
            .map(|&r| (task.rows[r].path.display().to_string(), task.label_text(r)))
            .collect()
    }

    fn paths(&self, rows: &[usize]) -> Vec<PathBuf> {
        rows.iter()
            .map(|&r| self.task().rows[r].path.clone())
            .collect()
    }

    /// Fits `method` (with optional hyperparameter overrides) on a support draw.
    pub fn fit(
        &self,
        method: &str,
        overrides: Option<&serde_json::Value>,
        support: &Support,
    ) -> Result<Fitted> {
        if let Some(why) = self.refusal(method) {
            return Err(why.into());
        }
        let task = self.task();
        let seed = support.protocol.seed;
        if is_encoder_method(method) {
            let paths = self.paths(&support.rows);
            let labels = task.classes(&support.rows)?;
            let job = SupportImages {
                model: self.setup.model_spec,
                class_names: &task.class_names,
                prompts: &self.setup.prompts,
                support: &paths,
                labels: &labels,
                seed,
            };
            return Ok(if is_tuning_method(method) {
                let (clf, tuned) = fit_tuning_method(method, overrides, &job, self.setup.device)?;
                Fitted::Tuned(Box::new(clf), Box::new(tuned))
            } else {
                let clf = fit_prompt_method(
                    method,
                    overrides,
                    self.setup.model,
                    &job,
                    self.setup.device,
                )?;
                Fitted::Prompt(Box::new(clf))
            });
        }
        let m = method_by_name(method, overrides)?;
        if m.requires_encoder() {
            return Err(PipelineError::Refused(format!(
                "method '{method}' needs the encoders but has no few-shot fit; pick another \
                 method: {}",
                crate::method::METHOD_NAMES.join(", ")
            )));
        }
        let features = self.setup.features;
        let labelled = SupportSet {
            features: features.features_of(task, &support.rows)?,
            labels: task.support_labels(&support.rows)?,
        };
        let input = AdaptInput {
            texts: &self.texts,
            support: &labelled,
            access: FeatureAccess::FrozenFeatures,
            logit_scale: Some(self.logit_scale),
            policy: support.protocol.hyperparameter_policy,
            seed,
            protocol: Some(&support.protocol),
        };
        let clf = m.fit(&input)?;
        if clf.card().task != task.kind {
            return Err(PipelineError::Refused(format!(
                "method '{method}' returned a {:?} classifier for a {:?} task",
                clf.card().task,
                task.kind
            )));
        }
        Ok(Fitted::Frozen(clf))
    }

    /// Row-major probabilities `[rows, C]` of task rows under a fit.
    pub fn score(&self, fitted: &Fitted, rows: &[usize]) -> Result<Vec<f32>> {
        let (batch, device) = (self.setup.batch, self.setup.device);
        Ok(match fitted {
            Fitted::Frozen(clf) => {
                let f = self.setup.features.features_of(self.task(), rows)?;
                clf.probabilities(&f)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?
            }
            Fitted::Prompt(clf) => {
                prompt_probabilities(clf, self.setup.model, &self.paths(rows), batch, device)?
            }
            Fitted::Tuned(clf, tuned) => {
                tuned_probabilities(clf, tuned, &self.paths(rows), batch, device)?
            }
        })
    }

    /// The conformal calibration rows of a draw and a description of them: the calibration
    /// split, else the pool images outside the support set.
    pub fn calibration_rows(&self, support: &Support) -> (Vec<usize>, String) {
        self.setup.features.calibration_rows(
            self.task(),
            &self.setup.splits.calib,
            &self.setup.splits.train,
            &self.pool_rows,
            &support.rows,
        )
    }

    /// Evaluates a fit on the test split (`None` without test rows), with conformal sets
    /// calibrated on [`Self::calibration_rows`] and seeded by the draw's seed.
    pub fn evaluate(&self, fitted: &Fitted, support: &Support) -> Result<Option<TestEvaluation>> {
        if self.test_rows.is_empty() {
            return Ok(None);
        }
        let task = self.task();
        let t0 = Instant::now();
        let probs = self.score(fitted, &self.test_rows)?;
        let score_seconds = t0.elapsed().as_secs_f64();
        let (calib_rows, source) = self.calibration_rows(support);
        let calib_probs = if calib_rows.is_empty() {
            None
        } else {
            Some(self.score(fitted, &calib_rows)?)
        };
        let metrics = match task.kind {
            TaskKind::MultiClass => {
                let labels = task.classes(&self.test_rows)?;
                let calib_labels = task.classes(&calib_rows)?;
                let config = ConformalConfig {
                    seed: support.protocol.seed,
                    ..self.setup.conformal
                };
                TaskMetrics::MultiClass(evaluate(
                    &probs,
                    &labels,
                    task.class_names.len(),
                    calib_probs
                        .as_deref()
                        .map(|p| (p, calib_labels.as_slice(), source.clone())),
                    config,
                )?)
            }
            TaskKind::MultiLabel => {
                let targets = task.multi_hot(&self.test_rows)?;
                let calib_targets = task.multi_hot(&calib_rows)?;
                TaskMetrics::MultiLabel(evaluate_multilabel(
                    &probs,
                    &targets,
                    &task.class_names,
                    calib_probs
                        .as_deref()
                        .map(|p| (p, calib_targets.as_slice(), source.clone())),
                    self.setup.conformal.alpha,
                )?)
            }
        };
        Ok(Some(TestEvaluation {
            rows: self.test_rows.clone(),
            probabilities: probs,
            metrics,
            score_seconds,
        }))
    }

    /// The probability table of an evaluation (`image,<class>...,prediction`, or for
    /// multi-label tasks `image,<label>...,predicted_labels`).
    pub fn probability_csv(&self, evaluation: &TestEvaluation) -> String {
        let task = self.task();
        let paths: Vec<String> = evaluation
            .rows
            .iter()
            .map(|&r| task.rows[r].path.display().to_string())
            .collect();
        match task.kind {
            TaskKind::MultiClass => {
                probability_csv(&paths, &evaluation.probabilities, &task.class_names)
            }
            TaskKind::MultiLabel => {
                probability_csv_multilabel(&paths, &evaluation.probabilities, &task.class_names)
            }
        }
    }
}

/// What `medvlm adapt` is asked: a method, its overrides, and the few-shot protocol.
#[derive(Debug, Clone)]
pub struct AdaptRequest {
    /// Method registry name (see `docs/methods.md`).
    pub method: String,
    /// Hyperparameter overrides as a JSON object.
    pub overrides: Option<serde_json::Value>,
    /// Shots, seed, sampling mode and hyperparameter policy; its task kind must be the task's.
    pub protocol: FewShotProtocol,
}

/// A fitted, evaluated method, ready to be written as an artefact.
pub struct Adaptation {
    /// The fit.
    pub fitted: Fitted,
    /// The support draw.
    pub support: Support,
    /// The card `adapt.json` holds.
    pub card: AdaptCard,
    /// The test evaluation, if the task has a test split.
    pub evaluation: Option<TestEvaluation>,
    /// The test probabilities as CSV (`eval_predictions.csv`).
    pub eval_csv: Option<String>,
}

/// Draws the support set, fits the method, evaluates it on the test split and assembles the
/// artefact's card: `medvlm adapt` without its printing.
pub fn adapt(ctx: &AdaptContext, request: &AdaptRequest) -> Result<Adaptation> {
    let setup = ctx.setup();
    let task = ctx.task();
    let method = request.method.as_str();
    if let Some(why) = ctx.refusal(method) {
        return Err(why.into());
    }
    // Built once first so an unknown name or a bad override fails before any image is read.
    let built = method_by_name(method, request.overrides.as_ref())?;
    if built.requires_encoder() && !is_encoder_method(method) {
        return Err(PipelineError::Refused(format!(
            "method '{method}' needs the encoders but has no few-shot fit; pick another method: {}",
            crate::method::METHOD_NAMES.join(", ")
        )));
    }
    let support = ctx.draw(&request.protocol)?;
    let fitted = ctx.fit(method, request.overrides.as_ref(), &support)?;
    let evaluation = ctx.evaluate(&fitted, &support)?;
    let eval_csv = evaluation.as_ref().map(|e| ctx.probability_csv(e));
    let (metrics, multilabel_metrics) = match evaluation.as_ref().map(|e| &e.metrics) {
        Some(TaskMetrics::MultiClass(m)) => (Some(m.clone()), None),
        Some(TaskMetrics::MultiLabel(m)) => (None, Some(m.clone())),
        None => (None, None),
    };
    let mut notes = Vec::new();
    if task.kind == TaskKind::MultiLabel {
        if let Some(mx) = &multilabel_metrics {
            notes.push(mx.conformal.clone());
        }
        notes.push(
            "no reliability diagram: the top-class confidence it bins assumes one class per image"
                .to_string(),
        );
    }
    let negative_prompts = match task.kind {
        TaskKind::MultiLabel if PROMPT_PAIR_METHODS.contains(&method) => {
            setup.negative_prompts.clone()
        }
        _ => None,
    };
    let card = AdaptCard {
        format: ADAPT_FORMAT.into(),
        method: method.to_string(),
        hyperparameters: fitted.classifier().card().hyperparameters.clone(),
        model: setup.model_spec.to_string(),
        model_family: setup.model.family.to_string(),
        model_fingerprint: model_fingerprint(setup.model_spec, setup.model),
        data: task.manifests.clone(),
        data_sha256: task.manifest_sha256.clone(),
        label_field: setup.label_field.clone(),
        filters: setup.filters.clone(),
        task: task.kind,
        protocol_description: ctx.describe(&support.protocol),
        protocol: support.protocol.clone(),
        class_names: task.class_names.clone(),
        prompts: setup.prompts.clone(),
        negative_prompts,
        support: ctx.support_listing(&support),
        train_split: setup.splits.train.clone(),
        test_split: evaluation.as_ref().and(setup.splits.test.clone()),
        metrics,
        multilabel_metrics,
        notes,
        medvlm_version: env!("CARGO_PKG_VERSION").into(),
    };
    Ok(Adaptation {
        fitted,
        support,
        card,
        evaluation,
        eval_csv,
    })
}

impl Adaptation {
    /// Writes the artefact folder atomically (built in a sibling temporary folder, then
    /// moved): the classifier's own save, `adapt.json`, `eval_predictions.csv` and, for
    /// multi-class tasks with test metrics, `reliability.png`. Check the folder first with
    /// [`crate::artefact::check_out_dir`], before the fit.
    pub fn write(&self, out: &Path) -> Result<()> {
        write_artefact_dir(out, |tmp: &Path| -> Result<()> {
            save_classifier(self.fitted.classifier(), tmp)?;
            let card = serde_json::to_vec_pretty(&self.card).map_err(|e| PipelineError::Write {
                path: tmp.join(ADAPT_CARD),
                source: Box::new(e),
            })?;
            write_atomic(&tmp.join(ADAPT_CARD), &card)?;
            if let Some(csv) = &self.eval_csv {
                write_atomic(&tmp.join("eval_predictions.csv"), csv.as_bytes())?;
            }
            if let Some(mx) = &self.card.metrics {
                reliability_plot(
                    format!(
                        "{} {}-shot: reliability (ECE {:.3})",
                        self.card.method, self.card.protocol.shots, mx.ece
                    ),
                    &mx.reliability,
                )
                .write_png(&tmp.join("reliability.png"), Size::default())?;
            }
            Ok(())
        })?;
        Ok(())
    }
}

/// Writes bytes atomically (temporary file + rename), creating the parent folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let failed = |source: Box<dyn std::error::Error + Send + Sync>| PipelineError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| failed(Box::new(e)))?;
    }
    medvlm_io::atomic::write_atomic(path, bytes).map_err(|e| failed(Box::new(e)))
}

/// CSV field quoting.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// A probability table as CSV: `image,<class>...,prediction`.
pub fn probability_csv(paths: &[String], probs: &[f32], class_names: &[String]) -> String {
    let c = class_names.len();
    let mut out = String::from("image");
    for name in class_names {
        out.push(',');
        out.push_str(&csv_field(name));
    }
    out.push_str(",prediction\n");
    for (p, row) in paths.iter().zip(probs.chunks_exact(c.max(1))) {
        out.push_str(&csv_field(p));
        let mut best = 0;
        for (i, v) in row.iter().enumerate() {
            out.push_str(&format!(",{v:.6}"));
            if *v > row[best] {
                best = i;
            }
        }
        out.push(',');
        out.push_str(&csv_field(&class_names[best]));
        out.push('\n');
    }
    out
}

/// A multi-label probability table as CSV: `image,<label>...,predicted_labels`, where
/// `predicted_labels` lists the labels with probability >= [`MULTI_LABEL_THRESHOLD`] joined
/// with `;` (`normal` when none is).
pub fn probability_csv_multilabel(
    paths: &[String],
    probs: &[f32],
    class_names: &[String],
) -> String {
    let c = class_names.len();
    let mut out = String::from("image");
    for name in class_names {
        out.push(',');
        out.push_str(&csv_field(name));
    }
    out.push_str(",predicted_labels\n");
    for (p, row) in paths.iter().zip(probs.chunks_exact(c.max(1))) {
        out.push_str(&csv_field(p));
        for v in row {
            out.push_str(&format!(",{v:.6}"));
        }
        let hot: Vec<bool> = row.iter().map(|&v| v >= MULTI_LABEL_THRESHOLD).collect();
        out.push(',');
        out.push_str(&csv_field(&multi_hot_text(&hot, class_names)));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_label_refusals_name_the_alternatives() {
        for m in MULTI_LABEL_METHODS {
            assert!(multi_label_refusal(m).is_none(), "{m}");
        }
        assert!(multi_label_refusal("taskres")
            .unwrap()
            .contains("zero-shot-pairs, linear-probe, tip-adapter, tip-adapter-f, clip-adapter"));
        assert!(multi_label_refusal("zero-shot")
            .unwrap()
            .contains("use 'zero-shot-pairs'"));
    }

    #[test]
    fn probability_tables_quote_fields_and_pick_the_top_class() {
        let names = vec!["a,b".to_string(), "c".to_string()];
        let t = probability_csv(&["x.png".into()], &[0.2, 0.8], &names);
        assert_eq!(t, "image,\"a,b\",c,prediction\nx.png,0.200000,0.800000,c\n");
        let t = probability_csv_multilabel(&["y".into()], &[0.5, 0.49], &names);
        assert_eq!(
            t,
            "image,\"a,b\",c,predicted_labels\ny,0.500000,0.490000,\"a,b\"\n"
        );
        let t = probability_csv_multilabel(&["z".into()], &[0.1, 0.2], &names);
        assert!(t.ends_with(",normal\n"), "{t}");
    }
}
