//! Multi-task learning on a frozen VLM image tower: one shared trainable trunk on the
//! tower's pooled image embedding, read by three heads (multi-label findings
//! classification, visual question answering as answer classification, and ClipCap-style
//! report generation), trained jointly with per-task loss weights.
//!
//! The design follows hard parameter sharing (Caruana 1997, "Multitask Learning"; Ruder
//! 2017, "An Overview of Multi-Task Learning in Deep Neural Networks"): one shared
//! representation, task-specific heads, and a weighted sum of the task losses. The medical
//! multi-task VLMs of the literature (RadVLM, miniGPT-Med) share a whole vision-language
//! model; here the VLM tower stays frozen and the shared part is only the trunk (a full-tower
//! multi-task fine-tune is future work). Segmentation is not a head: the trunk works on the
//! pooled embedding, which has no spatial map.
//!
//! - Trunk ([`Trunk`]): `Linear(E -> W)`, then `layers` residual blocks
//!   `h <- LayerNorm(h + Linear(W -> W)(GELU(Linear(W -> W)(h))))`. Defaults: `W = 256`, 2
//!   blocks.
//! - Classification ([`MultiTaskNet::finding_logits`]): `Linear(W -> L)` over the training
//!   manifest's findings vocabulary, binary cross-entropy on each finding (sigmoid outputs).
//! - VQA ([`VqaHead`]): the question's text embedding (from the same VLM's text tower,
//!   frozen) is projected to `W`, and `[h, q, h * q] -> Linear(3W -> 256) -> GELU -> Linear
//!   (-> A)` classifies over the training answers (cross-entropy), the usual answer-
//!   classification formulation of medical VQA baselines.
//! - Report ([`crate::report_generation::ReportGenerator`]): the ClipCap prefix mapper and the
//!   GPT-2-layout decoder of the report task, reading the trunk output instead of the raw
//!   embedding; mean token cross-entropy.
//!
//! Joint training ([`train_multitask`]): every update draws a batch of images (a seeded
//! shuffle per epoch), and sums `w_t * L_t` over the heads whose weight is positive and that
//! have targets in the batch. A head of weight 0 is never run, so it receives no gradient and
//! AdamW leaves its parameters exactly at their initial values; a single-task baseline is the
//! same network trained with the other weights at 0. Defaults ([`MultiTaskConfig::default`]):
//! weights 1 each, 20 epochs, batch 32, AdamW lr 1e-3 with 5 % warm-up and cosine decay,
//! weight decay 0.01, seed 0.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Linear, VarBuilder, VarMap};
use medvlm_train::init::{self, Init};
use medvlm_train::minibatch::{EpochTraining, EpochTrainingConfig};
use medvlm_train::optim::{Gradients, NamedVar};
use serde::{Deserialize, Serialize};

use crate::report_generation::{pad_batch, ReportError, ReportGenConfig, ReportGenerator};

/// Errors of multi-task learning.
#[derive(Debug, thiserror::Error)]
pub enum MultiTaskError {
    /// Tensor error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Optimiser error.
    #[error(transparent)]
    Optim(#[from] medvlm_train::optim::OptimError),
    /// Model loading or embedding error.
    #[error(transparent)]
    Model(#[from] medvlm_models::ModelError),
    /// Metric error.
    #[error(transparent)]
    Eval(#[from] medvlm_eval::EvalError),
    /// Report head error.
    #[error(transparent)]
    Report(#[from] ReportError),
    /// A file could not be read, parsed or written.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// Inputs or settings that cannot work (the message says which).
    #[error("{0}")]
    Invalid(String),
}

/// Result of multi-task learning.
pub type Result<T> = std::result::Result<T, MultiTaskError>;

pub(crate) fn file_err(path: &Path, reason: impl std::fmt::Display) -> MultiTaskError {
    MultiTaskError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The heads, in the order the tables list them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Head {
    /// Multi-label findings.
    Classification,
    /// Visual question answering.
    Vqa,
    /// Report generation.
    Report,
}

impl Head {
    /// Every head.
    pub const ALL: [Head; 3] = [Head::Classification, Head::Vqa, Head::Report];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Head::Classification => "classification",
            Head::Vqa => "vqa",
            Head::Report => "report",
        }
    }
}

/// Loss weight of each head (0 switches a head off).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskWeights {
    /// Findings classification (default 1).
    pub classification: f64,
    /// VQA (default 1).
    pub vqa: f64,
    /// Report generation (default 1).
    pub report: f64,
}

impl Default for TaskWeights {
    fn default() -> Self {
        Self {
            classification: 1.0,
            vqa: 1.0,
            report: 1.0,
        }
    }
}

impl TaskWeights {
    /// The weight of `head`.
    pub fn get(&self, head: Head) -> f64 {
        match head {
            Head::Classification => self.classification,
            Head::Vqa => self.vqa,
            Head::Report => self.report,
        }
    }

    /// These weights with only `head` kept (the single-task baseline's).
    pub fn only(&self, head: Head) -> Self {
        let keep = |h: Head| if h == head { self.get(h) } else { 0.0 };
        Self {
            classification: keep(Head::Classification),
            vqa: keep(Head::Vqa),
            report: keep(Head::Report),
        }
    }

    /// Heads with a positive weight.
    pub fn active(&self) -> Vec<Head> {
        Head::ALL
            .into_iter()
            .filter(|&h| self.get(h) > 0.0)
            .collect()
    }
}

/// Shape and training settings of the multi-task model; see the module documentation for
/// the defaults. Read from JSON or TOML with [`MultiTaskConfig::load`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MultiTaskConfig {
    /// Per-task loss weights.
    pub weights: TaskWeights,
    /// Width of the shared trunk.
    pub trunk_width: usize,
    /// Residual blocks of the trunk.
    pub trunk_layers: usize,
    /// Hidden width of the VQA head.
    pub vqa_hidden: usize,
    /// Prefix embeddings of the report head.
    pub report_prefix: usize,
    /// Report decoder width.
    pub report_width: usize,
    /// Report decoder blocks.
    pub report_layers: usize,
    /// Report decoder attention heads.
    pub report_heads: usize,
    /// Longest report in tokens (with its end-of-text token); longer ones are cut.
    pub report_max_tokens: usize,
    /// Minimum count of a word to enter the report vocabulary.
    pub min_word_count: usize,
    /// Passes over the training images.
    pub epochs: usize,
    /// Images per update.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW weight decay (matrices only).
    pub weight_decay: f64,
    /// Seed of initialisation and batch order.
    pub seed: u64,
}

impl Default for MultiTaskConfig {
    fn default() -> Self {
        Self {
            weights: TaskWeights::default(),
            trunk_width: 256,
            trunk_layers: 2,
            vqa_hidden: 256,
            report_prefix: 10,
            report_width: 128,
            report_layers: 2,
            report_heads: 4,
            report_max_tokens: 120,
            min_word_count: 2,
            epochs: 20,
            batch: 32,
            lr: 1e-3,
            weight_decay: 0.01,
            seed: 0,
        }
    }
}

impl MultiTaskConfig {
    /// Whether the settings can work; the message names the setting and the reason.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(MultiTaskError::Invalid(m));
        for h in Head::ALL {
            let w = self.weights.get(h);
            if !(w.is_finite() && w >= 0.0) {
                return bad(format!(
                    "the {} loss weight is {w}; weights must be finite and >= 0",
                    h.name()
                ));
            }
        }
        if self.weights.active().is_empty() {
            return bad("every loss weight is 0: at least one head must be trained".into());
        }
        if self.trunk_width == 0 || self.vqa_hidden == 0 {
            return bad("trunk_width and vqa_hidden must be at least 1".into());
        }
        if self.epochs == 0 || self.batch == 0 {
            return bad("epochs and batch must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("lr {} must be positive", self.lr));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad(format!("weight_decay {} must be >= 0", self.weight_decay));
        }
        self.report_config().validate()?;
        Ok(())
    }

    /// The report head's settings (its epochs, batch, lr and seed are this config's).
    pub fn report_config(&self) -> ReportGenConfig {
        ReportGenConfig {
            prefix_len: self.report_prefix,
            width: self.report_width,
            layers: self.report_layers,
            heads: self.report_heads,
            max_tokens: self.report_max_tokens,
            epochs: self.epochs,
            batch: self.batch,
            lr: self.lr,
            weight_decay: self.weight_decay,
            seed: self.seed,
            min_word_count: self.min_word_count,
            findings: 0,
            image_dropout: 0.0,
        }
    }

    /// Reads a config file: TOML when it ends in `.toml`, JSON otherwise; missing keys take
    /// their defaults, unknown keys and unusable values are errors naming the file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
        let cfg: Self = if path.extension().is_some_and(|e| e == "toml") {
            toml::from_str(&text).map_err(|e| file_err(path, e))?
        } else {
            serde_json::from_str(&text).map_err(|e| file_err(path, e))?
        };
        cfg.validate().map_err(|e| file_err(path, e))?;
        Ok(cfg)
    }
}

/// Sizes the network is built for (from the data, recorded in the model card).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetDims {
    /// Width of the frozen image embedding.
    pub image_dim: usize,
    /// Width of the frozen question embedding.
    pub question_dim: usize,
    /// Findings in the vocabulary.
    pub n_findings: usize,
    /// Answers in the vocabulary.
    pub n_answers: usize,
    /// Report tokens in the vocabulary.
    pub vocab: usize,
}

/// The shared trunk (see the module documentation).
#[derive(Debug, Clone)]
pub struct Trunk {
    input: Linear,
    /// (fc1, fc2, norm weight, norm bias) of each block.
    blocks: Vec<(Linear, Linear, Tensor, Tensor)>,
}

impl Trunk {
    /// Parameters `input`, `block{i}.fc1|fc2|norm` under `vb`.
    pub fn new(vb: VarBuilder, image_dim: usize, width: usize, layers: usize) -> Result<Self> {
        let input = candle_nn::linear(image_dim, width, vb.pp("input"))?;
        let blocks = (0..layers)
            .map(|i| {
                let b = vb.pp(format!("block{i}"));
                Ok((
                    candle_nn::linear(width, width, b.pp("fc1"))?,
                    candle_nn::linear(width, width, b.pp("fc2"))?,
                    b.pp("norm")
                        .get_with_hints(width, "weight", candle_nn::Init::Const(1.0))?,
                    b.pp("norm")
                        .get_with_hints(width, "bias", candle_nn::Init::Const(0.0))?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self { input, blocks })
    }

    /// Shared features `[B, W]` of image embeddings `[B, E]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.input.forward(x)?;
        for (fc1, fc2, w, b) in &self.blocks {
            let r = fc2.forward(&fc1.forward(&h)?.gelu()?)?;
            // medvlm's layer norm: candle-nn's fused one has no backward pass, so the trunk
            // under it would never train.
            h = medvlm_models::fused::layer_norm(&(h + r)?, w, b, 1e-5)?;
        }
        Ok(h)
    }
}

/// The VQA head: answer classification from the shared features and the question embedding.
///
/// A small private head so that multi-task training needs nothing from the stand-alone VQA
/// module being built beside it; the two can be unified once that module lands.
#[derive(Debug, Clone)]
pub struct VqaHead {
    question: Linear,
    fc1: Linear,
    fc2: Linear,
}

impl VqaHead {
    /// Parameters `question`, `fc1`, `fc2` under `vb`.
    pub fn new(
        vb: VarBuilder,
        width: usize,
        question_dim: usize,
        hidden: usize,
        n_answers: usize,
    ) -> Result<Self> {
        Ok(Self {
            question: candle_nn::linear(question_dim, width, vb.pp("question"))?,
            fc1: candle_nn::linear(3 * width, hidden, vb.pp("fc1"))?,
            fc2: candle_nn::linear(hidden, n_answers.max(1), vb.pp("fc2"))?,
        })
    }

    /// Answer logits `[B, A]` of shared features `[B, W]` and question embeddings `[B, Q]`.
    pub fn forward(&self, h: &Tensor, q: &Tensor) -> Result<Tensor> {
        let q = self.question.forward(q)?;
        let joint = Tensor::cat(&[h, &q, &(h * &q)?], 1)?;
        Ok(self.fc2.forward(&self.fc1.forward(&joint)?.gelu()?)?)
    }
}

/// The trunk and its three heads.
#[derive(Debug, Clone)]
pub struct MultiTaskNet {
    /// Shared trunk (`trunk.*`).
    pub trunk: Trunk,
    /// Findings head (`classification.*`).
    pub classification: Linear,
    /// VQA head (`vqa.*`).
    pub vqa: VqaHead,
    /// Report head (`report.mapper.*`, `report.decoder.transformer.*`).
    pub report: ReportGenerator,
    /// Sizes.
    pub dims: NetDims,
}

impl MultiTaskNet {
    /// Builds (or loads, from a checkpoint's `vb`) the network.
    pub fn new(vb: VarBuilder, cfg: &MultiTaskConfig, dims: NetDims) -> Result<Self> {
        cfg.validate()?;
        let w = cfg.trunk_width;
        Ok(Self {
            trunk: Trunk::new(vb.pp("trunk"), dims.image_dim, w, cfg.trunk_layers)?,
            classification: candle_nn::linear(w, dims.n_findings.max(1), vb.pp("classification"))?,
            vqa: VqaHead::new(
                vb.pp("vqa"),
                w,
                dims.question_dim,
                cfg.vqa_hidden,
                dims.n_answers,
            )?,
            report: ReportGenerator::new(vb.pp("report"), &cfg.report_config(), w, dims.vocab)?,
            dims,
        })
    }

    /// Finding logits `[B, L]` of shared features `[B, W]`.
    pub fn finding_logits(&self, h: &Tensor) -> Result<Tensor> {
        Ok(self.classification.forward(h)?)
    }
}

/// Mean binary cross-entropy of `logits` against 0/1 `targets` (same shape), computed as
/// `max(z, 0) - z y + log(1 + exp(-|z|))` so large logits do not overflow.
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let softplus_neg_abs = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    let l = ((logits.relu()? - (logits * targets)?)? + softplus_neg_abs)?;
    Ok(l.mean_all()?)
}

/// Mean cross-entropy of `logits` `[B, C]` against class ids `[B]` (u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let lp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    Ok(lp
        .gather(&targets.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .mean_all()?
        .neg()?)
}

/// The training targets, one entry per image (embeddings precomputed by the frozen VLM).
#[derive(Debug, Clone)]
pub struct TrainTargets {
    /// Image embeddings `[N, E]`.
    pub images: Tensor,
    /// Multi-hot findings of each image (`None`: no findings given for it).
    pub findings: Vec<Option<Vec<f32>>>,
    /// Question embeddings `[Q, D]`, one per distinct question.
    pub questions: Tensor,
    /// Each image's question-answer pairs as (question row, answer id).
    pub qa: Vec<Vec<(u32, u32)>>,
    /// Each image's report token ids (ending with EOS), if it has one.
    pub reports: Vec<Option<Vec<u32>>>,
}

impl TrainTargets {
    fn n(&self) -> Result<usize> {
        Ok(self.images.dim(0)?)
    }

    /// Whether any image has targets for `head`.
    pub fn has(&self, head: Head) -> bool {
        match head {
            Head::Classification => self.findings.iter().any(Option::is_some),
            Head::Vqa => self.qa.iter().any(|q| !q.is_empty()),
            Head::Report => self.reports.iter().any(Option::is_some),
        }
    }
}

/// Mean per-task losses (unweighted) of one epoch; `None` for heads not trained.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct EpochLosses {
    /// Findings BCE.
    pub classification: Option<f32>,
    /// VQA cross-entropy.
    pub vqa: Option<f32>,
    /// Report token cross-entropy.
    pub report: Option<f32>,
    /// The weighted sum that was minimised (mean over updates).
    pub total: f32,
}

impl EpochLosses {
    /// The loss of `head`.
    pub fn get(&self, head: Head) -> Option<f32> {
        match head {
            Head::Classification => self.classification,
            Head::Vqa => self.vqa,
            Head::Report => self.report,
        }
    }
}

/// A trained network and its record.
pub struct TrainedMultiTask {
    /// The network.
    pub net: MultiTaskNet,
    /// Its parameters.
    pub varmap: VarMap,
    /// Losses of each epoch.
    pub epoch_losses: Vec<EpochLosses>,
}

/// Re-draws every parameter from a seeded generator (candle's initialisers use the thread's
/// RNG): biases 0, layer-norm scales 1, the report decoder's matrices and embeddings
/// N(0, 0.02) as GPT-2, other matrices N(0, 1 / fan_in). Parameters are visited in name order.
pub fn seeded_init(params: &[NamedVar], seed: u64) -> Result<()> {
    Ok(init::seeded_init(
        params,
        seed,
        0x6d75_6c74,
        |name, dims| {
            if name.ends_with("bias") {
                Init::Zeros
            } else if (name.contains(".ln_") || name.contains(".norm")) && name.ends_with("weight")
            {
                Init::Ones
            } else if name.starts_with("report.decoder.") {
                Init::Normal { std: 0.02 }
            } else {
                Init::Normal {
                    std: (1.0 / dims.get(1).copied().unwrap_or(1).max(1) as f32).sqrt(),
                }
            }
        },
    )?)
}

fn index_tensor(rows: &[usize], dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        rows.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        rows.len(),
        dev,
    )?)
}

/// The per-head losses of one batch of images (`chunk`: image rows), for the heads in
/// `heads` that have targets in the batch.
fn batch_losses(
    net: &MultiTaskNet,
    data: &TrainTargets,
    chunk: &[usize],
    heads: &[Head],
) -> Result<Vec<(Head, Tensor)>> {
    let dev = data.images.device();
    let x = data.images.index_select(&index_tensor(chunk, dev)?, 0)?;
    let h = net.trunk.forward(&x)?;
    let mut out = Vec::new();
    for &head in heads {
        match head {
            Head::Classification => {
                let local: Vec<usize> = (0..chunk.len())
                    .filter(|&j| data.findings[chunk[j]].is_some())
                    .collect();
                if local.is_empty() {
                    continue;
                }
                let l = net.dims.n_findings;
                let mut y: Vec<f32> = Vec::with_capacity(local.len() * l);
                for &j in &local {
                    y.extend(data.findings[chunk[j]].as_deref().unwrap_or_default());
                }
                let y = Tensor::from_vec(y, (local.len(), l), dev)?;
                let z = net.finding_logits(&h.index_select(&index_tensor(&local, dev)?, 0)?)?;
                out.push((head, bce_with_logits(&z, &y)?));
            }
            Head::Vqa => {
                let mut rows = Vec::new();
                let mut qs = Vec::new();
                let mut answers = Vec::new();
                for (j, &i) in chunk.iter().enumerate() {
                    for &(q, a) in &data.qa[i] {
                        rows.push(j);
                        qs.push(q as usize);
                        answers.push(a);
                    }
                }
                if rows.is_empty() {
                    continue;
                }
                let hv = h.index_select(&index_tensor(&rows, dev)?, 0)?;
                let qv = data.questions.index_select(&index_tensor(&qs, dev)?, 0)?;
                let n = answers.len();
                let y = Tensor::from_vec(answers, n, dev)?;
                out.push((head, cross_entropy(&net.vqa.forward(&hv, &qv)?, &y)?));
            }
            Head::Report => {
                let local: Vec<usize> = (0..chunk.len())
                    .filter(|&j| data.reports[chunk[j]].is_some())
                    .collect();
                if local.is_empty() {
                    continue;
                }
                let rows: Vec<&[u32]> = local
                    .iter()
                    .filter_map(|&j| data.reports[chunk[j]].as_deref())
                    .collect();
                let y = pad_batch(&rows, dev)?;
                let hr = h.index_select(&index_tensor(&local, dev)?, 0)?;
                out.push((head, net.report.loss(&hr, &y)?));
            }
        }
    }
    Ok(out)
}

/// Trains the network jointly on `data` (see the module documentation); `on_epoch(epoch,
/// losses)` after each epoch. Heads of weight 0 are built (so a saved model has every head)
/// but never run.
pub fn train_multitask(
    cfg: &MultiTaskConfig,
    dims: NetDims,
    data: &TrainTargets,
    on_epoch: &mut dyn FnMut(usize, &EpochLosses),
) -> Result<TrainedMultiTask> {
    cfg.validate()?;
    let n = data.n()?;
    if n == 0 {
        return Err(MultiTaskError::Invalid("no training images".into()));
    }
    if data.findings.len() != n || data.qa.len() != n || data.reports.len() != n {
        return Err(MultiTaskError::Invalid(format!(
            "{n} images but {} findings, {} question lists and {} reports",
            data.findings.len(),
            data.qa.len(),
            data.reports.len()
        )));
    }
    if data.images.dim(1)? != dims.image_dim {
        return Err(MultiTaskError::Invalid(format!(
            "image embeddings are {} wide, the network reads {}",
            data.images.dim(1)?,
            dims.image_dim
        )));
    }
    let heads = cfg.weights.active();
    if let Some(h) = heads.iter().find(|&&h| !data.has(h)) {
        return Err(MultiTaskError::Invalid(format!(
            "the {} head has weight {} but no training image has {} targets",
            h.name(),
            cfg.weights.get(*h),
            h.name()
        )));
    }
    if let Some(r) = data
        .reports
        .iter()
        .flatten()
        .find(|r| r.is_empty() || r.len() > cfg.report_max_tokens)
    {
        return Err(MultiTaskError::Invalid(format!(
            "a report has {} tokens; expected 1 to {}",
            r.len(),
            cfg.report_max_tokens
        )));
    }
    let dev = data.images.device().clone();
    let varmap = VarMap::new();
    let net = MultiTaskNet::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &dev),
        cfg,
        dims,
    )?;
    let params = medvlm_train::optim::varmap_params(&varmap);
    seeded_init(&params, cfg.seed)?;
    let mut run = EpochTraining::new(
        params.clone(),
        n,
        &EpochTrainingConfig {
            epochs: cfg.epochs,
            batch: cfg.batch,
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            seed: cfg.seed,
        },
    )?;
    let mut epoch_losses = Vec::with_capacity(cfg.epochs);
    for epoch in 0..cfg.epochs {
        let mut sums = [0.0f64; 3];
        let mut counts = [0usize; 3];
        let mut total_sum = 0.0f64;
        for chunk in run.epoch_batches() {
            let losses = batch_losses(&net, data, &chunk, &heads)?;
            if losses.is_empty() {
                continue;
            }
            let mut sum: Option<Tensor> = None;
            for (head, l) in &losses {
                let v = l.to_scalar::<f32>()?;
                if !v.is_finite() {
                    return Err(MultiTaskError::Invalid(format!(
                        "the {} loss is not finite ({v}) at update {}; lower the learning rate",
                        head.name(),
                        run.updates()
                    )));
                }
                let k = *head as usize;
                sums[k] += v as f64;
                counts[k] += 1;
                let weighted = (l * cfg.weights.get(*head))?;
                sum = Some(match sum {
                    None => weighted,
                    Some(s) => (s + weighted)?,
                });
            }
            let Some(loss) = sum else { continue };
            total_sum += loss.to_scalar::<f32>()? as f64;
            let grads = Gradients::from_grad_store(&loss.backward()?, &params);
            run.update(&grads)?;
        }
        let mean = |k: usize| (counts[k] > 0).then(|| (sums[k] / counts[k] as f64) as f32);
        let updates = counts.iter().copied().max().unwrap_or(0).max(1);
        let e = EpochLosses {
            classification: mean(0),
            vqa: mean(1),
            report: mean(2),
            total: (total_sum / updates as f64) as f32,
        };
        on_epoch(epoch, &e);
        epoch_losses.push(e);
    }
    Ok(TrainedMultiTask {
        net,
        varmap,
        epoch_losses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report_generation::EOS_ID;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Sixty images of two kinds (embeddings near two points): kind 0 has finding 0, answers
    /// 0 to question 0 and 1 to question 1, and report A; kind 1 the opposite and report B.
    fn toy(n: usize, seed: u64) -> TrainTargets {
        let dev = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut x = Vec::new();
        let mut findings = Vec::new();
        let mut qa = Vec::new();
        let mut reports = Vec::new();
        for i in 0..n {
            let k = i % 2;
            x.extend(
                (0..8)
                    .map(|d| (if d % 2 == k { 1.0 } else { 0.0 }) + rng.random_range(-0.1f32..0.1)),
            );
            findings.push(Some(if k == 0 {
                vec![1.0, 0.0]
            } else {
                vec![0.0, 1.0]
            }));
            qa.push(vec![(0, k as u32), (1, 1 - k as u32)]);
            reports.push(Some(if k == 0 {
                vec![4, 5, 6, EOS_ID]
            } else {
                vec![7, 6, EOS_ID]
            }));
        }
        let questions = Tensor::new(&[[1.0f32, 0.0, 0.0], [0.0, 1.0, 0.0]], &dev).unwrap();
        TrainTargets {
            images: Tensor::from_vec(x, (n, 8), &dev).unwrap(),
            findings,
            questions,
            qa,
            reports,
        }
    }

    fn dims() -> NetDims {
        NetDims {
            image_dim: 8,
            question_dim: 3,
            n_findings: 2,
            n_answers: 2,
            vocab: 10,
        }
    }

    fn small() -> MultiTaskConfig {
        MultiTaskConfig {
            trunk_width: 16,
            trunk_layers: 1,
            vqa_hidden: 16,
            report_prefix: 2,
            report_width: 16,
            report_layers: 1,
            report_heads: 2,
            report_max_tokens: 6,
            epochs: 20,
            batch: 16,
            lr: 3e-3,
            ..Default::default()
        }
    }

    #[test]
    fn joint_training_lowers_every_heads_loss() {
        let data = toy(64, 1);
        let mut seen = Vec::new();
        let t = train_multitask(&small(), dims(), &data, &mut |_, l| seen.push(*l)).unwrap();
        assert_eq!(seen, t.epoch_losses);
        let (first, last) = (seen[0], *seen.last().unwrap());
        for h in Head::ALL {
            let (a, b) = (first.get(h).unwrap(), last.get(h).unwrap());
            assert!(b < 0.5 * a, "{}: {a} -> {b}", h.name());
        }
        // The weighted total is the sum of the three (weights 1).
        assert!(last.total < first.total);
        // The trained heads answer correctly on fresh images of each kind.
        let test = toy(2, 9);
        let h = t.net.trunk.forward(&test.images).unwrap();
        let p = t
            .net
            .finding_logits(&h)
            .unwrap()
            .argmax(1)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        assert_eq!(p, vec![0, 1]);
        let q0 = test
            .questions
            .narrow(0, 0, 1)
            .unwrap()
            .repeat((2, 1))
            .unwrap();
        let a = t
            .net
            .vqa
            .forward(&h, &q0)
            .unwrap()
            .argmax(1)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        assert_eq!(a, vec![0, 1]);
        let r = t.net.report.generate_greedy(&h, 6).unwrap();
        assert_eq!(r, vec![vec![4, 5, 6], vec![7, 6]]);
    }

    #[test]
    fn a_head_of_weight_zero_gets_no_gradient_and_stays_at_init() {
        let data = toy(32, 2);
        let mut cfg = small();
        cfg.epochs = 2;
        cfg.weights = TaskWeights::default().only(Head::Vqa);
        let t = train_multitask(&cfg, dims(), &data, &mut |_, _| {}).unwrap();
        assert!(t.epoch_losses[0].classification.is_none());
        assert!(t.epoch_losses[0].report.is_none());
        assert!(t.epoch_losses[0].vqa.is_some());
        // The same seed's initial values.
        let init = VarMap::new();
        MultiTaskNet::new(
            VarBuilder::from_varmap(&init, DType::F32, &Device::Cpu),
            &cfg,
            dims(),
        )
        .unwrap();
        let p0 = medvlm_train::optim::varmap_params(&init);
        seeded_init(&p0, cfg.seed).unwrap();
        let p1 = medvlm_train::optim::varmap_params(&t.varmap);
        assert_eq!(p0.len(), p1.len());
        let mut moved = 0;
        for ((n0, v0), (n1, v1)) in p0.iter().zip(&p1) {
            assert_eq!(n0, n1);
            let diff = (v0.as_tensor() - v1.as_tensor())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            if n0.starts_with("classification.") || n0.starts_with("report.") {
                assert_eq!(diff, 0.0, "{n0} moved");
            } else if n0.ends_with("weight") {
                moved += usize::from(diff > 0.0);
            }
        }
        // Every matrix and scale of the trunk (input, fc1, fc2, norm) and of the VQA head
        // (question, fc1, fc2) did train.
        assert_eq!(moved, 7);
    }

    #[test]
    fn bce_matches_the_formula_and_survives_large_logits() {
        let dev = Device::Cpu;
        let z = Tensor::new(&[[2.0f32, -1.0], [0.0, 80.0]], &dev).unwrap();
        let y = Tensor::new(&[[1.0f32, 0.0], [1.0, 0.0]], &dev).unwrap();
        let got = bce_with_logits(&z, &y).unwrap().to_scalar::<f32>().unwrap();
        let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
        let want = (-(sig(2.0)).ln() - (1.0 - sig(-1.0)).ln() - (sig(0.0)).ln() + 80.0) / 4.0;
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        let mut c = MultiTaskConfig::default();
        c.weights.vqa = -1.0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("vqa loss weight is -1"), "{e}");
        let c = MultiTaskConfig {
            weights: TaskWeights {
                classification: 0.0,
                vqa: 0.0,
                report: 0.0,
            },
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("every loss weight is 0"));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mt.toml");
        std::fs::write(&p, "epochs = 3\n[weights]\nreport = -0.5\n").unwrap();
        let e = MultiTaskConfig::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("mt.toml") && e.contains("report loss weight"),
            "{e}"
        );
        std::fs::write(&p, "epochs = 3\n[weights]\nreport = 0.5\n").unwrap();
        let c = MultiTaskConfig::load(&p).unwrap();
        assert_eq!((c.epochs, c.weights.report, c.weights.vqa), (3, 0.5, 1.0));
        let j = dir.path().join("mt.json");
        std::fs::write(&j, r#"{"epochs": 2, "wieghts": {}}"#).unwrap();
        let e = MultiTaskConfig::load(&j).unwrap_err().to_string();
        assert!(e.contains("mt.json") && e.contains("wieghts"), "{e}");
        // A head with weight but no targets.
        let mut data = toy(4, 3);
        data.reports = vec![None; 4];
        let e = train_multitask(&small(), dims(), &data, &mut |_, _| {})
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("report head") && e.contains("no training image"),
            "{e}"
        );
    }
}
