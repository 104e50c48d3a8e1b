//! Fine-tuning modes for every later adaptation strategy, and the contrastive fine-tuning run
//! behind `medvlm finetune`.
//!
//! Modes ([`Mode`]), each restricted to the towers in [`FinetuneSpec::towers`]:
//! - **full**: every weight of the model;
//! - **partial**: the last `k` transformer blocks of each chosen tower plus what follows them
//!   (final norm, pooling head, projection); embeddings, pre-norms and earlier blocks stay
//!   frozen. `k` larger than a tower's number of blocks is an error;
//! - **BitFit** (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
//!   Transformer-based Masked Language-models", ACL): bias terms only;
//! - **LoRA** (Hu et al. 2021, see [`crate::lora`]): only new low-rank adapters, base frozen.
//!
//! The model must be loaded with [`medvlm_models::LoadMode::Trainable`] (its weights are then
//! `Var`s in a `VarMap` under their checkpoint names); [`select_trainable`] picks vars from that
//! map, [`prepare`] also adds the LoRA adapters. The temperature (`logit_scale`, SigLIP's
//! `logit_bias`) is never part of the selection: the [`ContrastiveHead`] of the run owns it
//! and [`train_contrastive`] writes it back (when it is learnable, `[loss]`).
//!
//! Every check on the mode (no layer matching a LoRA target, `k` above the number of blocks,
//! a model without biases for BitFit) fails in [`prepare`], before any training.
//!
//! [`export_model_dir`] writes the fine-tuned model as a model directory of the same family
//! (LoRA merged into the weights first with [`crate::lora::merge_lora`]) that loads wherever a
//! hub model does.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
/// Re-exported so callers need no direct candle-nn dependency.
pub use candle_nn::VarMap;
use medvlm_models::model_dir::varmap_tensors;
use medvlm_models::preprocess::PreprocessConfig;
use medvlm_models::tokenizer::TextTokenizer;
use medvlm_models::weights::save_safetensors_atomic;
use medvlm_models::{Family, ModelError, VisionLanguageModel};
use serde::{Deserialize, Serialize};

use crate::data::ImageTextBatch;
use crate::lora::{apply_lora, set_lora_training, tower_of, LoraSpec};
use crate::losses::{ContrastiveHead, LossError};
use crate::optim::{block_index, last_k_blocks, NamedVar, OptimError};
use crate::train_config::{FinetuneMode, FreezeMode, TrainConfig};
use crate::trainer::{
    train, BatchSource, Callbacks, LoopConfig, Result as TrainResult, RunPaths, TrainError,
    TrainModel, TrainSummary,
};

/// Why fine-tuning could not be set up or run.
#[derive(Debug, thiserror::Error)]
pub enum FinetuneError {
    /// A setting does not fit the model or is out of range; `key` is the config key.
    #[error("invalid fine-tuning setting {key}: {reason}")]
    Setting {
        /// Dotted config key, e.g. `finetune.last_k`.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A LoRA target entry matches no linear layer of the model.
    #[error(
        "finetune.lora.targets: {target:?} matches no linear layer of the model (towers: {towers}); \
         the model's linear layers are: {available}"
    )]
    NoLoraTarget {
        /// The entry.
        target: String,
        /// The towers searched.
        towers: Towers,
        /// The model's linear layers, block indices collapsed to `*`.
        available: String,
    },
    /// A model directory problem.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// An optimiser problem.
    #[error(transparent)]
    Optim(#[from] OptimError),
    /// A loss problem.
    #[error(transparent)]
    Loss(#[from] LossError),
    /// The training loop failed.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Writing the output failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A saved LoRA adapter is unreadable or does not fit the model.
    #[error("LoRA adapter {path}: {reason}")]
    Adapter {
        /// The adapter file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An internal invariant broke (poisoned lock).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Result alias for fine-tuning.
pub type Result<T> = std::result::Result<T, FinetuneError>;

fn setting(key: &str, reason: impl Into<String>) -> FinetuneError {
    FinetuneError::Setting {
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// Which towers a mode touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Towers {
    /// Both encoders (default).
    Both,
    /// The image encoder only.
    Vision,
    /// The text encoder only.
    Text,
}

impl std::fmt::Display for Towers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Towers::Both => "both",
            Towers::Vision => "vision",
            Towers::Text => "text",
        })
    }
}

impl Towers {
    /// Whether a parameter / module path lies in these towers (paths outside both towers,
    /// such as `logit_scale`, count as inside only for [`Towers::Both`]).
    pub fn contains(&self, path: &str) -> bool {
        match self {
            Towers::Both => true,
            t => tower_of(path) == Some(*t),
        }
    }
}

/// A fine-tuning mode.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// Every weight.
    Full,
    /// The last `last_k` blocks of each chosen tower, plus final norms / heads / projections.
    Partial {
        /// Blocks per tower (>= 1, at most the tower's number of blocks).
        last_k: usize,
    },
    /// Bias terms only.
    Bitfit,
    /// LoRA adapters only.
    Lora(LoraSpec),
}

impl Mode {
    /// Lower-case name as in the config (`full`, `partial`, `bitfit`, `lora`).
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Partial { .. } => "partial",
            Mode::Bitfit => "bitfit",
            Mode::Lora(_) => "lora",
        }
    }
}

/// A mode and the towers it applies to.
#[derive(Debug, Clone, PartialEq)]
pub struct FinetuneSpec {
    /// The mode.
    pub mode: Mode,
    /// The towers trained (for LoRA: adapted). Default both.
    pub towers: Towers,
}

impl FinetuneSpec {
    /// From a validated `medvlm finetune` configuration: `[finetune]` gives the mode and
    /// `[freeze] mode = "image"` / `"text"` locks a tower (the other one is fine-tuned).
    /// `[freeze] mode = "partial"` is refused here (use `finetune.mode = "partial"`).
    pub fn from_config(cfg: &TrainConfig) -> Result<Self> {
        let ft = cfg
            .finetune
            .as_ref()
            .ok_or_else(|| setting("finetune", "the [finetune] table is missing"))?;
        let towers = match cfg.freeze.mode {
            FreezeMode::None => Towers::Both,
            FreezeMode::Image => Towers::Text,
            FreezeMode::Text => Towers::Vision,
            FreezeMode::Partial => {
                return Err(setting(
                    "freeze.mode",
                    "\"partial\" is a pretraining setting; for fine-tuning use finetune.mode = \"partial\" with finetune.last_k",
                ))
            }
        };
        if cfg.freeze.image_prefixes.is_some() || cfg.freeze.text_prefixes.is_some() {
            return Err(setting(
                "freeze.image_prefixes",
                "prefix overrides are not used by `medvlm finetune` (towers are found from the model's own names)",
            ));
        }
        let mode = match ft.mode {
            FinetuneMode::Full => Mode::Full,
            FinetuneMode::Partial => Mode::Partial {
                last_k: ft.last_k.ok_or_else(|| {
                    setting("finetune.last_k", "required with mode = \"partial\"")
                })?,
            },
            FinetuneMode::Bitfit => Mode::Bitfit,
            FinetuneMode::Lora => Mode::Lora(LoraSpec::from_config(
                &ft.lora.clone().unwrap_or_default(),
                towers,
            )),
        };
        Ok(Self { mode, towers })
    }
}

/// Parameters that are never selected from the model: the contrastive head owns them.
const HEAD_SCALARS: [&str; 2] = ["logit_scale", "logit_bias"];

/// Name fragments of parameters that sit before the first block of a tower (embeddings,
/// pre-norms); partial fine-tuning leaves them frozen.
const INPUT_SIDE: [&str; 10] = [
    "embed",
    "cls_token",
    "class_embedding",
    "pos_",
    "position",
    "token_type",
    "pre_layrnorm",
    "pre_layernorm",
    "ln_pre",
    "norm_pre",
];

/// Block-list prefixes per tower of the layouts medvlm loads.
const BLOCK_PREFIXES: [(&str, Towers); 6] = [
    ("vision_model.encoder.layers.", Towers::Vision),
    ("text_model.encoder.layers.", Towers::Text),
    ("visual.trunk.blocks.", Towers::Vision),
    ("text.transformer.encoder.layer.", Towers::Text),
    ("visual.transformer.resblocks.", Towers::Vision),
    ("transformer.resblocks.", Towers::Text),
];

/// Names of the base-model parameters (`names`: the trainable model's `VarMap` keys) that
/// `spec` trains. LoRA selects none (its adapters are new parameters, see [`prepare`]).
///
/// `num_blocks(tower)` gives a tower's number of transformer blocks, used to refuse a
/// `last_k` above it.
pub fn select_trainable<'a>(
    names: impl IntoIterator<Item = &'a str>,
    spec: &FinetuneSpec,
    num_blocks: impl Fn(Towers) -> usize,
) -> Result<BTreeSet<String>> {
    let names: Vec<&str> = names
        .into_iter()
        .filter(|n| !HEAD_SCALARS.contains(n) && spec.towers.contains(n))
        .collect();
    let out: BTreeSet<String> = match &spec.mode {
        Mode::Full => names.iter().map(|s| s.to_string()).collect(),
        Mode::Lora(_) => BTreeSet::new(),
        Mode::Bitfit => {
            let set: BTreeSet<String> = names
                .iter()
                .filter(|n| n.ends_with(".bias") || **n == "bias")
                .map(|s| s.to_string())
                .collect();
            if set.is_empty() {
                return Err(setting(
                    "finetune.mode",
                    format!(
                        "bitfit: the model has no bias parameters in the {} tower(s)",
                        spec.towers
                    ),
                ));
            }
            set
        }
        Mode::Partial { last_k } => {
            if *last_k == 0 {
                return Err(setting("finetune.last_k", "must be at least 1"));
            }
            if names.iter().any(|n| n.starts_with("visual.layer")) {
                // Without this, the ResNet's stages would count as "outside the blocks" and
                // train in full.
                return Err(setting(
                    "finetune.towers",
                    "partial fine-tuning counts transformer blocks, and this model's image \
                     tower is a ResNet: use towers = \"text\", or mode full / bitfit / lora",
                ));
            }
            let found: Vec<(&str, Towers)> = BLOCK_PREFIXES
                .iter()
                .copied()
                .filter(|(p, _)| names.iter().any(|n| block_index(n, p).is_some()))
                .collect();
            if found.is_empty() {
                return Err(setting(
                    "finetune.last_k",
                    format!(
                        "no transformer block list found in the {} tower(s) of the model",
                        spec.towers
                    ),
                ));
            }
            let mut set = BTreeSet::new();
            for (prefix, tower) in &found {
                let blocks = num_blocks(*tower);
                if *last_k > blocks {
                    return Err(setting(
                        "finetune.last_k",
                        format!(
                            "{last_k} is larger than the {blocks} blocks of the {tower} tower ({prefix}*)"
                        ),
                    ));
                }
                set.extend(last_k_blocks(names.iter().copied(), prefix, *last_k));
            }
            for n in &names {
                let in_block = found.iter().any(|(p, _)| block_index(n, p).is_some());
                let lower = n.to_lowercase();
                // Patch / conv stems are input side too, but "patch" alone would not do:
                // names like `...proj` must stay.
                let input_side =
                    INPUT_SIDE.iter().any(|p| lower.contains(p)) || lower.contains("patch_embed");
                if !in_block && !input_side {
                    set.insert(n.to_string());
                }
            }
            set
        }
    };
    Ok(out)
}

/// What [`prepare`] set up.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Every parameter to optimise (selected base weights, then LoRA adapters), by name.
    pub params: Vec<NamedVar>,
    /// How many of them are base-model weights.
    pub base_selected: usize,
    /// Module paths that got a LoRA adapter.
    pub lora_layers: Vec<String>,
}

impl Prepared {
    /// Number of trainable scalars.
    pub fn num_scalars(&self) -> usize {
        crate::lora::count_params(&self.params)
    }
}

/// Number of blocks of a tower of `model`.
pub fn tower_blocks(model: &dyn VisionLanguageModel, tower: Towers) -> usize {
    match tower {
        Towers::Vision => model.vision_num_layers(),
        Towers::Text => model.text_num_layers(),
        Towers::Both => model.vision_num_layers().min(model.text_num_layers()),
    }
}

/// Applies `spec` to a trainable model: selects base weights from `base` (the model's `VarMap`)
/// and, for LoRA, adds adapters whose parameters go into `adapters` (seeded by `seed`).
/// Everything that does not fit the model fails here, before any training.
pub fn prepare(
    model: &mut dyn VisionLanguageModel,
    base: &VarMap,
    adapters: &VarMap,
    spec: &FinetuneSpec,
    seed: u64,
) -> Result<Prepared> {
    let vars: Vec<NamedVar> = {
        let data = base
            .data()
            .lock()
            .map_err(|_| FinetuneError::Internal("base VarMap lock poisoned".into()))?;
        let mut v: Vec<NamedVar> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    if vars.is_empty() {
        return Err(setting(
            "model.source",
            "the model was not loaded trainable (its VarMap is empty); load it with LoadMode::Trainable",
        ));
    }
    let (vb, tb) = (model.vision_num_layers(), model.text_num_layers());
    let chosen = select_trainable(vars.iter().map(|(n, _)| n.as_str()), spec, |t| match t {
        Towers::Vision => vb,
        Towers::Text => tb,
        Towers::Both => vb.min(tb),
    })?;
    let mut params: Vec<NamedVar> = vars
        .into_iter()
        .filter(|(n, _)| chosen.contains(n))
        .collect();
    let base_selected = params.len();
    let mut lora_layers = Vec::new();
    if let Mode::Lora(lspec) = &spec.mode {
        let mut lspec = lspec.clone();
        lspec.towers = spec.towers;
        let new = apply_lora(model, &lspec, adapters, seed)?;
        lora_layers = new
            .iter()
            .filter_map(|(n, _)| n.strip_suffix(".lora_A.weight").map(str::to_string))
            .collect();
        params.extend(new);
    }
    if params.is_empty() {
        return Err(setting("finetune.mode", "nothing to train"));
    }
    Ok(Prepared {
        params,
        base_selected,
        lora_layers,
    })
}

/// Preprocessed image-text pairs: images as `3 * H * W` floats (see
/// [`PreprocessConfig::batch`], the model's own preprocessing as `medvlm embed` applies it)
/// and their texts.
#[derive(Debug, Clone, Default)]
pub struct PairData {
    /// Preprocessed images.
    pub images: Vec<Vec<f32>>,
    /// Texts, one per image.
    pub texts: Vec<String>,
}

/// [`BatchSource`] over [`PairData`] for [`crate::trainer::train`] (no augmentation: the
/// images are used as preprocessed).
pub struct PairBatches<'a> {
    /// The pairs.
    pub data: &'a PairData,
    /// The model's tokenizer.
    pub tokenizer: &'a TextTokenizer,
    /// The model's preprocessing (for the output size).
    pub preprocess: &'a PreprocessConfig,
    /// Compute device.
    pub device: Device,
    /// Compute dtype.
    pub dtype: DType,
}

impl BatchSource for PairBatches<'_> {
    type Batch = ImageTextBatch;
    fn len(&self) -> usize {
        self.data.images.len()
    }
    fn load(&self, indices: &[usize], _epoch: u64) -> TrainResult<ImageTextBatch> {
        let imgs: Vec<Vec<f32>> = indices
            .iter()
            .map(|&i| self.data.images[i].clone())
            .collect();
        let texts: Vec<&str> = indices
            .iter()
            .map(|&i| self.data.texts[i].as_str())
            .collect();
        let model_err = |e: ModelError| TrainError::Data(e.to_string());
        let pixels = self
            .preprocess
            .batch(&imgs, &self.device)
            .map_err(model_err)?
            .to_dtype(self.dtype)?;
        let tokens = self
            .tokenizer
            .encode_batch(&texts, &self.device)
            .map_err(model_err)?;
        // Fine-tuning has no label-aware loss (refused by the command), so no label columns.
        let labels = Tensor::zeros((indices.len(), 1), DType::F32, &self.device)?;
        Ok(ImageTextBatch {
            pixels,
            tokens,
            indices: indices.to_vec(),
            labels,
        })
    }
}

/// A model under contrastive fine-tuning: the encoders (with any LoRA adapters) and the loss
/// head. Implements [`TrainModel`] for the shared loop.
pub struct ContrastiveTuning<'a> {
    /// The model.
    pub model: &'a dyn VisionLanguageModel,
    /// Loss and temperature.
    pub head: &'a ContrastiveHead,
}

impl TrainModel<ImageTextBatch> for ContrastiveTuning<'_> {
    fn loss(&mut self, batch: &ImageTextBatch) -> TrainResult<Tensor> {
        self.head.batch_loss(self.model, batch)
    }
    fn after_update(&mut self) -> TrainResult<()> {
        Ok(self.head.clamp_logit_scale()?)
    }
    fn log_scalars(&self) -> TrainResult<BTreeMap<String, f64>> {
        self.head.log_scalars()
    }
}

/// Fine-tunes `params` of `model` with the contrastive loss of `head` on `data`, through the
/// shared loop [`crate::trainer::train`] (AdamW, warm-up + cosine, accumulation, clipping,
/// checkpoints in `paths`, exact resume). The head's learnable scalars are trained with the
/// parameters (checkpoint names `logit_scale`, `logit_bias`) and, at the end, written into
/// `base` where the model has them, so an export keeps the tuned temperature. LoRA dropout is
/// on during the run and off afterwards.
#[allow(clippy::too_many_arguments)]
pub fn train_contrastive<C: for<'m> Callbacks<ContrastiveTuning<'m>>>(
    model: &dyn VisionLanguageModel,
    tokenizer: &TextTokenizer,
    preprocess: &PreprocessConfig,
    data: &PairData,
    params: &[NamedVar],
    head: &ContrastiveHead,
    base: Option<&VarMap>,
    loop_cfg: &LoopConfig,
    paths: &RunPaths,
    resume: bool,
    config_hash: &str,
    callbacks: &mut C,
) -> Result<TrainSummary> {
    if data.images.len() != data.texts.len() {
        return Err(setting(
            "data.manifest",
            format!(
                "{} images but {} texts",
                data.images.len(),
                data.texts.len()
            ),
        ));
    }
    let mut all = params.to_vec();
    all.extend(head.trainable_vars());
    let source = PairBatches {
        data,
        tokenizer,
        preprocess,
        device: model.device().clone(),
        dtype: model.dtype(),
    };
    let mut tuning = ContrastiveTuning { model, head };
    set_lora_training(model, true);
    let result = train(
        all,
        &mut tuning,
        &source,
        loop_cfg,
        paths,
        resume,
        config_hash,
        callbacks,
    );
    set_lora_training(model, false);
    let summary = result?;
    if let Some(vm) = base {
        write_head_back(head, vm)?;
    }
    Ok(summary)
}

/// Copies the head's learnable scalars into the model's `logit_scale` / `logit_bias` vars.
fn write_head_back(head: &ContrastiveHead, base: &VarMap) -> Result<()> {
    let data = base
        .data()
        .lock()
        .map_err(|_| FinetuneError::Internal("base VarMap lock poisoned".into()))?;
    for (name, v) in head.trainable_vars() {
        if let Some(target) = data.get(&name) {
            let t = v.as_tensor().to_dtype(target.dtype())?;
            let t = t.reshape(target.shape())?;
            target.set(&t)?;
        }
    }
    Ok(())
}

/// A scalar of the model as f64 (e.g. its `logit_scale`, to initialise the head from it).
pub fn scalar_value(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?
        .flatten_all()?
        .get(0)?
        .to_scalar::<f64>()?)
}

/// Non-weight files a model directory may hold (configs, tokenizer, preprocessing); copied
/// as they are by [`export_model_dir`].
pub const MODEL_DIR_FILES: [&str; 9] = [
    "config.json",
    "open_clip_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
];

/// The weight file name an exported directory of `family` uses.
pub fn export_weight_name(family: Family) -> &'static str {
    match family {
        Family::Clip | Family::Siglip => "model.safetensors",
        Family::Biomedclip | Family::OpenClip => "open_clip_model.safetensors",
    }
}

fn copy_atomic(src: &Path, dst: &Path) -> Result<()> {
    let bytes = std::fs::read(src).map_err(|source| FinetuneError::Io {
        path: src.to_path_buf(),
        source,
    })?;
    medvlm_io::atomic::write_atomic(dst, &bytes).map_err(|e| FinetuneError::Io {
        path: dst.to_path_buf(),
        source: e.into_io(),
    })
}

/// Writes a model directory into `out_dir`: the non-weight files of `src_dir`
/// ([`MODEL_DIR_FILES`] present there) and the weights of `base` (the trainable model's
/// `VarMap`, with LoRA already merged, see [`crate::lora::merge_lora`]) as
/// [`export_weight_name`], every file atomically. The directory loads with
/// [`medvlm_models::load_model_dir`] like the source. Returns the files written.
pub fn export_model_dir(
    src_dir: &Path,
    family: Family,
    base: &VarMap,
    out_dir: &Path,
) -> Result<Vec<PathBuf>> {
    if src_dir.canonicalize().ok() == out_dir.canonicalize().ok() && out_dir.exists() {
        return Err(setting(
            "output_dir",
            format!(
                "{} is the source model directory; export elsewhere",
                out_dir.display()
            ),
        ));
    }
    std::fs::create_dir_all(out_dir).map_err(|source| FinetuneError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let mut written = Vec::new();
    for name in MODEL_DIR_FILES {
        let src = src_dir.join(name);
        if src.is_file() {
            let dst = out_dir.join(name);
            copy_atomic(&src, &dst)?;
            written.push(dst);
        }
    }
    let tensors = varmap_tensors(base)?;
    if tensors.is_empty() {
        return Err(setting(
            "model.source",
            "the model has no weights to export",
        ));
    }
    let wpath = out_dir.join(export_weight_name(family));
    save_safetensors_atomic(&wpath, &tensors)?;
    written.push(wpath);
    Ok(written)
}

/// Current values of `vars`, detached copies, by name (e.g. to compare before/after a run).
pub fn snapshot(vars: &[NamedVar]) -> Result<Vec<(String, Tensor)>> {
    vars.iter()
        .map(|(n, v): &(String, Var)| Ok((n.clone(), v.as_tensor().copy()?)))
        .collect()
}
