//! TOML configuration of `medvlm pretrain` and `medvlm finetune`.
//!
//! Every table rejects unknown keys (`deny_unknown_fields`), so a typo such as `learning_rate`
//! instead of `lr` is an error naming the key and its location, never silently ignored.
//! [`TrainConfig::validate`] then checks value ranges and cross-field rules and names the
//! offending key (`optim.lr`, `finetune.lora.rank`, ...). Every key, its default and its
//! meaning are documented in `docs/training.md`; the defaults below follow CLIP / open_clip
//! where one exists.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use std::collections::BTreeSet;

use crate::checkpoint::sha256_hex;
use crate::losses::{SIGLIP_LOGIT_BIAS_INIT, SIGLIP_LOGIT_SCALE_INIT};
use crate::optim::{select_trainable, OptimError, TrainableSelection, DEFAULT_BLOCK_PREFIXES};
use crate::text_section::TextSection;

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Io {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TOML syntax error, unknown key or wrong type (the message names key and line).
    #[error("invalid config {path}: {message}")]
    Parse {
        /// The config file (or `<string>`).
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid config value {key}: {reason}")]
    Invalid {
        /// Dotted key, e.g. `optim.lr`.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, ConfigError>;

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
    }
}

/// Which command the configuration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Contrastive pretraining (`medvlm pretrain`).
    Pretrain,
    /// Fine-tuning of a pretrained model (`medvlm finetune`).
    Finetune,
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Seed of every random choice (initialisation, data order, augmentation). Default 0.
    #[serde(default)]
    pub seed: u64,
    /// Directory for checkpoints, logs, metrics and the report.
    pub output_dir: PathBuf,
    /// Model to train.
    pub model: ModelConfig,
    /// Training data.
    pub data: DataConfig,
    /// Contrastive loss.
    #[serde(default)]
    pub loss: LossConfig,
    /// Optimiser and schedule.
    #[serde(default)]
    pub optim: OptimConfig,
    /// Frozen towers.
    #[serde(default)]
    pub freeze: FreezeConfig,
    /// Fine-tuning mode (required by `medvlm finetune`, not allowed for `pretrain`).
    #[serde(default)]
    pub finetune: Option<FinetuneConfig>,
    /// Checkpointing.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Periodic evaluation.
    #[serde(default)]
    pub eval: EvalConfig,
}

/// `[model]`: a pretrained model directory, or a small CLIP built from scratch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Directory of a pretrained model (config.json, weights, tokenizer) or a preset name.
    #[serde(default)]
    pub source: Option<String>,
    /// From-scratch model (exclusive with `source`).
    #[serde(default)]
    pub scratch: Option<ScratchModelConfig>,
}

/// `[model.scratch]`: a small two-tower model initialised at random.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScratchModelConfig {
    /// Architecture family: `clip` or `siglip`. Default `clip`.
    #[serde(default = "d_family")]
    pub family: String,
    /// `tokenizer.json` to use (its vocabulary size sets the text embedding size).
    pub tokenizer: PathBuf,
    /// Shared embedding dimension. Default 64.
    #[serde(default = "d_64")]
    pub projection_dim: usize,
    /// Vision transformer width. Default 64.
    #[serde(default = "d_64")]
    pub vision_width: usize,
    /// Vision transformer blocks. Default 2.
    #[serde(default = "d_2")]
    pub vision_layers: usize,
    /// Vision attention heads. Default 4.
    #[serde(default = "d_4")]
    pub vision_heads: usize,
    /// Patch size in pixels. Default 8.
    #[serde(default = "d_8")]
    pub patch_size: usize,
    /// Text transformer width. Default 64.
    #[serde(default = "d_64")]
    pub text_width: usize,
    /// Text transformer blocks. Default 2.
    #[serde(default = "d_2")]
    pub text_layers: usize,
    /// Text attention heads. Default 4.
    #[serde(default = "d_4")]
    pub text_heads: usize,
    /// Maximum text length in tokens. Default 32.
    #[serde(default = "d_32")]
    pub context_length: usize,
    /// MLP hidden size as a multiple of the width. Default 2.
    #[serde(default = "d_2")]
    pub mlp_ratio: usize,
    /// Image tower: `"vit"` (default; HF CLIP layout, sized by the `vision_*` and
    /// `patch_size` keys) or `"resnet"` (CLIP's ModifiedResNet in open_clip's layout, sized by
    /// the `resnet_*` keys; the model directory is then an open_clip one).
    #[serde(default = "d_vit")]
    pub image_tower: String,
    /// ResNet bottleneck blocks per stage. Default `[1, 1, 1, 1]` (RN50 is `[3, 4, 6, 3]`).
    #[serde(default = "d_resnet_layers")]
    pub resnet_layers: Vec<usize>,
    /// ResNet stem width; the features have 32x as many channels. Default 32 (RN50: 64).
    #[serde(default = "d_32")]
    pub resnet_width: usize,
    /// Channels per head of the ResNet's attention pooling. Default 64 (as open_clip).
    #[serde(default = "d_64")]
    pub resnet_head_width: usize,
}

impl ScratchModelConfig {
    /// Vocabulary assumed by the estimates below (the tokenizer is read later): CLIP's
    /// 49,408 tokens rounded up.
    pub const ESTIMATE_VOCAB: f64 = 50_000.0;

    /// Approximate number of parameters of the model this section builds at `image_size`:
    /// ViT `depth x (4 w^2 + 2 mlp w^2)` plus patch and position embeddings; a ModifiedResNet
    /// scaled from RN50's image tower (38 M parameters at width 64 and blocks [3, 4, 6, 3]);
    /// the text transformer likewise, with [`Self::ESTIMATE_VOCAB`] token embeddings.
    pub fn estimated_parameters(&self, image_size: usize) -> f64 {
        let mlp = self.mlp_ratio as f64;
        let block = |w: f64| (4.0 + 2.0 * mlp) * w * w;
        let image = if self.image_tower == "resnet" {
            let width = self.resnet_width as f64 / 64.0;
            let blocks = self.resnet_layers.iter().sum::<usize>() as f64 / 16.0;
            38e6 * width * width * blocks
        } else {
            let w = self.vision_width as f64;
            let p = self.patch_size.max(1) as f64;
            let tokens = (image_size as f64 / p).powi(2) + 1.0;
            self.vision_layers as f64 * block(w) + 3.0 * p * p * w + tokens * w
        };
        let tw = self.text_width as f64;
        let text = self.text_layers as f64 * block(tw)
            + (Self::ESTIMATE_VOCAB + self.context_length as f64) * tw;
        let proj = (self.vision_width.max(self.resnet_width * 32) as f64 + tw)
            * self.projection_dim as f64;
        image + text + proj
    }

    /// Approximate bytes one training step holds in f32: each parameter with its gradient
    /// and AdamW's two moments (16 bytes), plus the activations kept for the backward pass
    /// (per layer and sample: the token features of the attention and MLP inputs and outputs,
    /// and one attention map per head), counted twice for their gradients.
    pub fn estimated_training_bytes(&self, image_size: usize, batch_size: usize) -> f64 {
        let b = batch_size as f64;
        let mlp = self.mlp_ratio as f64;
        let per_layer = |tokens: f64, width: f64, heads: f64| {
            tokens * width * (10.0 + 2.0 * mlp) + heads * tokens * tokens
        };
        let image = if self.image_tower == "resnet" {
            // Bottleneck stages keep about 20 feature maps of the stem's size per sample.
            20.0 * (image_size as f64).powi(2) * self.resnet_width as f64
        } else {
            let tokens = (image_size as f64 / self.patch_size.max(1) as f64).powi(2) + 1.0;
            self.vision_layers as f64
                * per_layer(tokens, self.vision_width as f64, self.vision_heads as f64)
        };
        let ctx = self.context_length as f64;
        let text = self.text_layers as f64
            * per_layer(ctx, self.text_width as f64, self.text_heads as f64);
        16.0 * self.estimated_parameters(image_size) + 2.0 * 4.0 * b * (image + text)
    }
}

fn d_vit() -> String {
    "vit".into()
}

fn d_resnet_layers() -> Vec<usize> {
    vec![1, 1, 1, 1]
}

/// `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training manifest (JSONL/CSV, see medvlm-io).
    pub manifest: PathBuf,
    /// Optional validation manifest for the periodic evaluation.
    #[serde(default)]
    pub val_manifest: Option<PathBuf>,
    /// Square input size in pixels. Default 224.
    #[serde(default = "d_224")]
    pub image_size: usize,
    /// Samples per optimiser update, before accumulation (micro-batch). Default 32.
    #[serde(default = "d_32")]
    pub batch_size: usize,
    /// Data-loading threads. Default 2.
    #[serde(default = "d_2")]
    pub workers: usize,
    /// Training-time augmentation.
    #[serde(default)]
    pub augment: AugmentConfig,
    /// Part of each report used as the training (and validation retrieval) text: `report`
    /// (default), `impression` or `exam_impression` (see [`crate::text_section`]).
    #[serde(default)]
    pub text_section: TextSection,
    /// `none` (default): batches are random samples. `group`: each batch is drawn from one
    /// group (the manifest's `modality` field) where possible, so every negative of the
    /// contrastive loss is of the same modality, as in single-modality corpora.
    #[serde(default)]
    pub batch_grouping: BatchGrouping,
}

/// `data.batch_grouping`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchGrouping {
    /// Random batches.
    #[default]
    None,
    /// One group (modality) per batch where possible.
    Group,
}

/// `[data.augment]`. Defaults are no augmentation: flips and rotations can change the
/// meaning of a medical image (laterality), so they are opt-in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AugmentConfig {
    /// Random-resized-crop area range `[min, max]` in (0, 1]; `[1.0, 1.0]` disables it.
    #[serde(default = "d_crop")]
    pub crop_scale: [f64; 2],
    /// Random horizontal flip with probability 0.5. Default false.
    #[serde(default)]
    pub horizontal_flip: bool,
    /// Maximum random rotation in degrees, 0 to 180. Default 0.
    #[serde(default)]
    pub rotation_degrees: f64,
    /// Maximum relative brightness change, 0 to 1. Default 0.
    #[serde(default)]
    pub brightness: f64,
    /// Maximum relative contrast change, 0 to 1. Default 0.
    #[serde(default)]
    pub contrast: f64,
    /// Gamma drawn log-uniformly in `[1 / (1 + g), 1 + g]`, 0 to 1. Default 0 (off).
    #[serde(default)]
    pub gamma: f64,
    /// Standard deviation of additive Gaussian noise on the `[0, 1]` scale, 0 to 0.5.
    /// Default 0 (off).
    #[serde(default)]
    pub noise_std: f64,
    /// Maximum sigma of a Gaussian blur in pixels at the training size (drawn uniformly
    /// from 0), 0 to 5. Default 0 (off). Blur, gamma and noise mimic other scanners and
    /// sites (acquisition point-spread, display curve, detector noise).
    #[serde(default)]
    pub blur_sigma: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            crop_scale: d_crop(),
            horizontal_flip: false,
            rotation_degrees: 0.0,
            brightness: 0.0,
            contrast: 0.0,
            gamma: 0.0,
            noise_std: 0.0,
            blur_sigma: 0.0,
        }
    }
}

pub use crate::losses::LossKind;

/// `[loss]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    /// `clip`, `siglip` or `label_aware`. Default `clip`.
    #[serde(default = "d_loss")]
    pub kind: LossKind,
    /// Initial temperature `T` (logit scale `1/T`). Default: 0.07 for `clip`/`label_aware`
    /// (CLIP), 0.1 for `siglip` (`t' = ln 10`).
    #[serde(default)]
    pub temperature_init: Option<f64>,
    /// Whether the temperature is trained. Default true.
    #[serde(default = "d_true")]
    pub learnable_temperature: bool,
    /// Initial SigLIP bias. Default -10.
    #[serde(default = "d_bias")]
    pub bias_init: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            kind: LossKind::Clip,
            temperature_init: None,
            learnable_temperature: true,
            bias_init: SIGLIP_LOGIT_BIAS_INIT,
        }
    }
}

impl LossConfig {
    /// Initial log logit scale `ln(1 / T)` with the per-loss default temperature.
    pub fn logit_scale_init(&self) -> f64 {
        match (self.temperature_init, self.kind) {
            (Some(t), _) => (1.0 / t).ln(),
            (None, LossKind::Siglip) => SIGLIP_LOGIT_SCALE_INIT,
            (None, _) => (1.0f64 / 0.07).ln(),
        }
    }
}

/// `[optim]`: AdamW with warm-up + cosine schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate. Default 5e-4.
    #[serde(default = "d_lr")]
    pub lr: f64,
    /// Final learning rate of the cosine decay. Default 0.
    #[serde(default)]
    pub min_lr: f64,
    /// Decoupled weight decay (norms, biases, embeddings, logit scale excluded). Default 0.2.
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    /// Adam `(beta1, beta2)`. Default `[0.9, 0.98]` (CLIP).
    #[serde(default = "d_betas")]
    pub betas: [f64; 2],
    /// Adam epsilon. Default 1e-6 (CLIP).
    #[serde(default = "d_eps")]
    pub eps: f64,
    /// Linear warm-up updates. Default 100.
    #[serde(default = "d_warmup")]
    pub warmup_steps: u64,
    /// Passes over the data. Default 10. The run ends at whichever of `epochs` and `max_steps`
    /// comes first.
    #[serde(default = "d_epochs")]
    pub epochs: u64,
    /// Optional cap on optimiser updates.
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Micro-batches accumulated per update. Default 1.
    #[serde(default = "d_1")]
    pub grad_accum: usize,
    /// Global gradient-norm clip; absent disables clipping. Default 1.0.
    #[serde(default = "d_clip_norm")]
    pub clip_norm: Option<f64>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: d_lr(),
            min_lr: 0.0,
            weight_decay: d_wd(),
            betas: d_betas(),
            eps: d_eps(),
            warmup_steps: d_warmup(),
            epochs: d_epochs(),
            max_steps: None,
            grad_accum: 1,
            clip_norm: d_clip_norm(),
        }
    }
}

/// Which tower to freeze.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FreezeMode {
    /// Train everything.
    None,
    /// Freeze the image tower (LiT-style locked image).
    Image,
    /// Freeze the text tower.
    Text,
    /// Train only the last `last_k` blocks of each tower (plus heads and logit scale).
    Partial,
}

/// `[freeze]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreezeConfig {
    /// `none`, `image`, `text` or `partial`. Default `none`.
    #[serde(default = "d_freeze")]
    pub mode: FreezeMode,
    /// Blocks left trainable per tower in `partial` mode.
    #[serde(default)]
    pub last_k: Option<usize>,
    /// Override of the image-tower parameter-name prefixes.
    #[serde(default)]
    pub image_prefixes: Option<Vec<String>>,
    /// Override of the text-tower parameter-name prefixes.
    #[serde(default)]
    pub text_prefixes: Option<Vec<String>>,
}

impl Default for FreezeConfig {
    fn default() -> Self {
        Self {
            mode: FreezeMode::None,
            last_k: None,
            image_prefixes: None,
            text_prefixes: None,
        }
    }
}

/// Default image-tower prefixes: HF CLIP/SigLIP (`vision_model.`, `visual_projection.`) and
/// open_clip (`visual.`).
pub const DEFAULT_IMAGE_PREFIXES: [&str; 3] = ["vision_model.", "visual_projection.", "visual."];
/// Default text-tower prefixes: HF (`text_model.`, `text_projection.`) and open_clip (`text.`).
pub const DEFAULT_TEXT_PREFIXES: [&str; 3] = ["text_model.", "text_projection.", "text."];

impl FreezeConfig {
    /// The parameter-name prefixes frozen by this setting (empty for `none` and `partial`,
    /// whose selection is made per block, see [`crate::optim::last_k_blocks`]).
    pub fn frozen_prefixes(&self) -> Vec<String> {
        let image = || {
            self.image_prefixes.clone().unwrap_or_else(|| {
                DEFAULT_IMAGE_PREFIXES
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
            })
        };
        let text = || {
            self.text_prefixes.clone().unwrap_or_else(|| {
                DEFAULT_TEXT_PREFIXES
                    .iter()
                    .map(|s| s.to_string())
                    .collect()
            })
        };
        match self.mode {
            FreezeMode::Image => image(),
            FreezeMode::Text => text(),
            FreezeMode::None | FreezeMode::Partial => Vec::new(),
        }
    }
}

/// Fine-tuning mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinetuneMode {
    /// All weights.
    Full,
    /// Last `last_k` blocks of each tower.
    Partial,
    /// Biases only (Ben Zaken et al., "BitFit", ACL 2022).
    Bitfit,
    /// Low-rank adapters (Hu et al., "LoRA", ICLR 2022).
    Lora,
}

/// `[finetune]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    /// `full`, `partial`, `bitfit` or `lora`.
    pub mode: FinetuneMode,
    /// Trainable blocks per tower for `partial`.
    #[serde(default)]
    pub last_k: Option<usize>,
    /// LoRA settings for `lora`.
    #[serde(default)]
    pub lora: Option<LoraConfig>,
}

/// `[finetune.lora]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank `r` of the update `B A`. Default 8.
    #[serde(default = "d_8")]
    pub rank: usize,
    /// Scaling numerator: the update is multiplied by `alpha / rank`. Default 16.
    #[serde(default = "d_alpha")]
    pub alpha: f64,
    /// Dropout on the adapter input, in [0, 1). Default 0.
    #[serde(default)]
    pub dropout: f64,
    /// Linear layers to adapt, matched against the last component of the module path.
    /// Default `["q_proj", "v_proj"]` (the LoRA paper's choice).
    #[serde(default = "d_targets")]
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: d_alpha(),
            dropout: 0.0,
            targets: d_targets(),
        }
    }
}

/// `[checkpoint]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save every N optimiser updates (and at the end of each epoch and of the run).
    /// Default 500.
    #[serde(default = "d_every")]
    pub every_n_steps: u64,
    /// Newest checkpoints kept on disk. Default 3.
    #[serde(default = "d_keep")]
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            every_n_steps: d_every(),
            keep: d_keep(),
        }
    }
}

/// `[eval]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Evaluate every N epochs (0 disables periodic evaluation). Default 1.
    #[serde(default = "d_1u64")]
    pub every_epochs: u64,
    /// Zero-shot classification accuracy on the validation manifest. Default true.
    #[serde(default = "d_true")]
    pub zero_shot: bool,
    /// Image-text retrieval recall@1/5/10 on the validation manifest. Default true.
    #[serde(default = "d_true")]
    pub retrieval: bool,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            every_epochs: 1,
            zero_shot: true,
            retrieval: true,
        }
    }
}

fn d_family() -> String {
    "clip".into()
}
fn d_1() -> usize {
    1
}
fn d_1u64() -> u64 {
    1
}
fn d_2() -> usize {
    2
}
fn d_4() -> usize {
    4
}
fn d_8() -> usize {
    8
}
fn d_32() -> usize {
    32
}
fn d_64() -> usize {
    64
}
fn d_224() -> usize {
    224
}
fn d_crop() -> [f64; 2] {
    [1.0, 1.0]
}
fn d_loss() -> LossKind {
    LossKind::Clip
}
fn d_true() -> bool {
    true
}
fn d_bias() -> f64 {
    SIGLIP_LOGIT_BIAS_INIT
}
fn d_lr() -> f64 {
    5e-4
}
fn d_wd() -> f64 {
    0.2
}
fn d_betas() -> [f64; 2] {
    [0.9, 0.98]
}
fn d_eps() -> f64 {
    1e-6
}
fn d_warmup() -> u64 {
    100
}
fn d_epochs() -> u64 {
    10
}
fn d_clip_norm() -> Option<f64> {
    Some(1.0)
}
fn d_freeze() -> FreezeMode {
    FreezeMode::None
}
fn d_alpha() -> f64 {
    16.0
}
fn d_targets() -> Vec<String> {
    vec!["q_proj".into(), "v_proj".into()]
}
fn d_every() -> u64 {
    500
}
fn d_keep() -> usize {
    3
}

fn positive_finite(key: &str, v: f64) -> Result<()> {
    if v > 0.0 && v.is_finite() {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("must be a positive finite number, got {v}"),
        ))
    }
}

fn in_range(key: &str, v: f64, lo: f64, hi: f64, hi_inclusive: bool) -> Result<()> {
    let ok = v >= lo && if hi_inclusive { v <= hi } else { v < hi };
    if ok {
        Ok(())
    } else {
        let bracket = if hi_inclusive { ']' } else { ')' };
        Err(invalid(
            key,
            format!("must be in [{lo}, {hi}{bracket}, got {v}"),
        ))
    }
}

fn at_least(key: &str, v: u64, lo: u64) -> Result<()> {
    if v >= lo {
        Ok(())
    } else {
        Err(invalid(key, format!("must be at least {lo}, got {v}")))
    }
}

impl TrainConfig {
    /// Parses TOML text; `origin` names the source in errors. Does not validate ranges.
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<Self> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Reads, parses and validates a config file for `command`.
    pub fn load(path: &Path, command: Command) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg = Self::from_toml_str(&text, path)?;
        cfg.validate(command)?;
        Ok(cfg)
    }

    /// Checks ranges and cross-field rules; the error names the key.
    pub fn validate(&self, command: Command) -> Result<()> {
        match (&self.model.source, &self.model.scratch) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "model",
                    "set either model.source or [model.scratch], not both",
                ))
            }
            (None, None) => {
                return Err(invalid(
                    "model",
                    "set model.source (pretrained) or [model.scratch]",
                ))
            }
            (Some(s), None) if s.trim().is_empty() => {
                return Err(invalid("model.source", "must not be empty"))
            }
            _ => {}
        }
        if let Some(s) = &self.model.scratch {
            if s.family != "clip" && s.family != "siglip" {
                return Err(invalid(
                    "model.scratch.family",
                    format!("must be \"clip\" or \"siglip\", got {:?}", s.family),
                ));
            }
            match s.image_tower.as_str() {
                "vit" => {}
                "resnet" => {
                    if s.family != "clip" {
                        return Err(invalid(
                            "model.scratch.image_tower",
                            "a ResNet image tower is built for family = \"clip\" (train it with loss.kind = \"siglip\" for the sigmoid loss)",
                        ));
                    }
                    crate::pretrain::scratch_resnet_config(s, self.data.image_size)
                        .validate()
                        .map_err(|r| invalid("model.scratch.resnet_*", r))?;
                }
                other => {
                    return Err(invalid(
                        "model.scratch.image_tower",
                        format!("must be \"vit\" or \"resnet\", got {other:?}"),
                    ))
                }
            }
            for (key, v) in [
                ("model.scratch.projection_dim", s.projection_dim),
                ("model.scratch.vision_width", s.vision_width),
                ("model.scratch.vision_layers", s.vision_layers),
                ("model.scratch.vision_heads", s.vision_heads),
                ("model.scratch.patch_size", s.patch_size),
                ("model.scratch.text_width", s.text_width),
                ("model.scratch.text_layers", s.text_layers),
                ("model.scratch.text_heads", s.text_heads),
                ("model.scratch.context_length", s.context_length),
                ("model.scratch.mlp_ratio", s.mlp_ratio),
            ] {
                at_least(key, v as u64, 1)?;
            }
            if !s.vision_width.is_multiple_of(s.vision_heads) {
                return Err(invalid(
                    "model.scratch.vision_heads",
                    format!(
                        "vision_width {} is not divisible by {} heads",
                        s.vision_width, s.vision_heads
                    ),
                ));
            }
            if !s.text_width.is_multiple_of(s.text_heads) {
                return Err(invalid(
                    "model.scratch.text_heads",
                    format!(
                        "text_width {} is not divisible by {} heads",
                        s.text_width, s.text_heads
                    ),
                ));
            }
            if s.image_tower == "vit" && !self.data.image_size.is_multiple_of(s.patch_size) {
                return Err(invalid(
                    "model.scratch.patch_size",
                    format!(
                        "data.image_size {} is not a multiple of patch_size {}",
                        self.data.image_size, s.patch_size
                    ),
                ));
            }
        }
        let d = &self.data;
        at_least("data.image_size", d.image_size as u64, 8)?;
        at_least("data.batch_size", d.batch_size as u64, 1)?;
        let a = &d.augment;
        if !(a.crop_scale[0] > 0.0 && a.crop_scale[0] <= a.crop_scale[1] && a.crop_scale[1] <= 1.0)
        {
            return Err(invalid(
                "data.augment.crop_scale",
                format!("must satisfy 0 < min <= max <= 1, got {:?}", a.crop_scale),
            ));
        }
        in_range(
            "data.augment.rotation_degrees",
            a.rotation_degrees,
            0.0,
            180.0,
            true,
        )?;
        in_range("data.augment.brightness", a.brightness, 0.0, 1.0, true)?;
        in_range("data.augment.contrast", a.contrast, 0.0, 1.0, true)?;
        in_range("data.augment.gamma", a.gamma, 0.0, 1.0, true)?;
        in_range("data.augment.noise_std", a.noise_std, 0.0, 0.5, true)?;
        in_range("data.augment.blur_sigma", a.blur_sigma, 0.0, 5.0, true)?;

        let l = &self.loss;
        if let Some(t) = l.temperature_init {
            positive_finite("loss.temperature_init", t)?;
            if 1.0 / t > 100.0 + 1e-9 && l.kind != LossKind::Siglip {
                return Err(invalid(
                    "loss.temperature_init",
                    format!("must be >= 0.01 (CLIP caps the logit scale at 100), got {t}"),
                ));
            }
        }
        if !l.bias_init.is_finite() {
            return Err(invalid("loss.bias_init", "must be finite"));
        }

        let o = &self.optim;
        positive_finite("optim.lr", o.lr)?;
        in_range("optim.min_lr", o.min_lr, 0.0, o.lr, true)?;
        in_range("optim.weight_decay", o.weight_decay, 0.0, f64::MAX, true)?;
        in_range("optim.betas", o.betas[0], 0.0, 1.0, false)?;
        in_range("optim.betas", o.betas[1], 0.0, 1.0, false)?;
        positive_finite("optim.eps", o.eps)?;
        at_least("optim.epochs", o.epochs, 1)?;
        at_least("optim.grad_accum", o.grad_accum as u64, 1)?;
        if let Some(m) = o.max_steps {
            at_least("optim.max_steps", m, 1)?;
            if o.warmup_steps >= m {
                return Err(invalid(
                    "optim.warmup_steps",
                    format!(
                        "{} warm-up steps leave nothing of max_steps = {m}",
                        o.warmup_steps
                    ),
                ));
            }
        }
        if let Some(c) = o.clip_norm {
            positive_finite("optim.clip_norm", c)?;
        }

        let f = &self.freeze;
        match f.mode {
            FreezeMode::Partial => {
                at_least(
                    "freeze.last_k",
                    f.last_k.ok_or_else(|| {
                        invalid("freeze.last_k", "required when freeze.mode = \"partial\"")
                    })? as u64,
                    1,
                )?;
            }
            _ if f.last_k.is_some() => {
                return Err(invalid(
                    "freeze.last_k",
                    "only used with freeze.mode = \"partial\"",
                ));
            }
            _ => {}
        }
        for (key, p) in [
            ("freeze.image_prefixes", &f.image_prefixes),
            ("freeze.text_prefixes", &f.text_prefixes),
        ] {
            if let Some(p) = p {
                if p.is_empty() || p.iter().any(|s| s.is_empty()) {
                    return Err(invalid(
                        key,
                        "must be a non-empty list of non-empty prefixes",
                    ));
                }
            }
        }

        match (command, &self.finetune) {
            (Command::Pretrain, Some(_)) => return Err(invalid(
                "finetune",
                "is only used by `medvlm finetune`; remove the [finetune] table for pretraining",
            )),
            (Command::Finetune, None) => {
                return Err(invalid(
                    "finetune",
                    "`medvlm finetune` needs a [finetune] table with a mode",
                ))
            }
            (Command::Finetune, Some(_)) if self.model.source.is_none() => {
                return Err(invalid(
                    "model.source",
                    "fine-tuning needs a pretrained model.source",
                ))
            }
            _ => {}
        }
        if let Some(ft) = &self.finetune {
            match ft.mode {
                FinetuneMode::Partial => {
                    at_least(
                        "finetune.last_k",
                        ft.last_k.ok_or_else(|| {
                            invalid(
                                "finetune.last_k",
                                "required when finetune.mode = \"partial\"",
                            )
                        })? as u64,
                        1,
                    )?;
                }
                _ if ft.last_k.is_some() => {
                    return Err(invalid(
                        "finetune.last_k",
                        "only used with finetune.mode = \"partial\"",
                    ));
                }
                _ => {}
            }
            match (ft.mode, &ft.lora) {
                (FinetuneMode::Lora, Some(lora)) => {
                    at_least("finetune.lora.rank", lora.rank as u64, 1)?;
                    positive_finite("finetune.lora.alpha", lora.alpha)?;
                    in_range("finetune.lora.dropout", lora.dropout, 0.0, 1.0, false)?;
                    if lora.targets.is_empty() || lora.targets.iter().any(|t| t.is_empty()) {
                        return Err(invalid(
                            "finetune.lora.targets",
                            "must list at least one layer name",
                        ));
                    }
                }
                (FinetuneMode::Lora, None) => {}
                (_, Some(_)) => {
                    return Err(invalid(
                        "finetune.lora",
                        "only used with finetune.mode = \"lora\"",
                    ))
                }
                _ => {}
            }
        }

        at_least("checkpoint.every_n_steps", self.checkpoint.every_n_steps, 1)?;
        at_least("checkpoint.keep", self.checkpoint.keep as u64, 1)?;
        Ok(())
    }

    /// The selection made by `[freeze]` alone.
    pub fn freeze_selection(&self) -> TrainableSelection {
        match self.freeze.mode {
            FreezeMode::None => TrainableSelection::All,
            FreezeMode::Image | FreezeMode::Text => {
                TrainableSelection::FreezePrefixes(self.freeze.frozen_prefixes())
            }
            FreezeMode::Partial => TrainableSelection::LastKBlocks {
                k: self.freeze.last_k.unwrap_or(1),
                block_prefixes: DEFAULT_BLOCK_PREFIXES
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            },
        }
    }

    /// The selection made by `[finetune]` alone (`All` when absent).
    pub fn finetune_selection(&self) -> TrainableSelection {
        match self.finetune.as_ref().map(|f| (f.mode, f.last_k)) {
            None | Some((FinetuneMode::Full, _)) => TrainableSelection::All,
            Some((FinetuneMode::Partial, k)) => TrainableSelection::LastKBlocks {
                k: k.unwrap_or(1),
                block_prefixes: DEFAULT_BLOCK_PREFIXES
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            },
            Some((FinetuneMode::Bitfit, _)) => TrainableSelection::BiasesOnly,
            Some((FinetuneMode::Lora, _)) => TrainableSelection::Nothing,
        }
    }

    /// Names of the model parameters to train: those selected by both `[freeze]` and
    /// `[finetune]` (LoRA adapters are new parameters and come on top of this set).
    pub fn trainable_names(
        &self,
        names: &[&str],
    ) -> std::result::Result<BTreeSet<String>, OptimError> {
        let a = select_trainable(names.iter().copied(), &self.freeze_selection())?;
        let b = select_trainable(names.iter().copied(), &self.finetune_selection())?;
        Ok(a.intersection(&b).cloned().collect())
    }

    /// LoRA settings with defaults filled in, when the mode is `lora`.
    pub fn lora(&self) -> Option<LoraConfig> {
        self.finetune
            .as_ref()
            .filter(|f| f.mode == FinetuneMode::Lora)
            .map(|f| f.lora.clone().unwrap_or_default())
    }

    /// SHA-256 of every setting that shapes the training trajectory (everything except
    /// `output_dir`, `data.workers`, `[checkpoint]` and `[eval]`), stored in checkpoints so a
    /// resume with a changed configuration is refused.
    pub fn trajectory_hash(&self) -> String {
        let mut c = self.clone();
        c.output_dir = PathBuf::new();
        c.data.workers = 0;
        c.checkpoint = CheckpointConfig::default();
        c.eval = EvalConfig::default();
        // serde_json of a struct is deterministic: fields in declaration order.
        let bytes = serde_json::to_vec(&c).unwrap_or_default();
        sha256_hex(&bytes)
    }
}
