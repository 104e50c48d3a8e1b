//! BiomedCLIP (Zhang et al. 2023, "BiomedCLIP: a multimodal biomedical
//! foundation model pretrained from fifteen million scientific image-text
//! pairs") in the open_clip checkpoint layout: `open_clip_config.json` +
//! `open_clip_pytorch_model.bin` (or `open_clip_model.safetensors`).
//!
//! - Image tower: open_clip `TimmModel` = timm ViT-B/16 trunk
//!   (`visual.trunk.*`, [`TimmVit`]) with class-token pooling (`timm_pool: ""`
//!   keeps timm's default `"token"`) and a bias-free linear projection
//!   `visual.head.proj` (`timm_proj: "linear"`, `timm_proj_bias: false`).
//! - Text tower: open_clip `HFTextEncoder` = HF BERT (PubMedBERT,
//!   `text.transformer.*`, [`BertModel`]) with the attention mask
//!   `ids != pad_token_id`, pooling from `hf_pooler_type`
//!   (`cls_last_hidden_state_pooler` for BiomedCLIP) and projection from
//!   `hf_proj_type`: `"mlp"` = `Linear(d, (d+E)/2, bias=False)` → exact GELU →
//!   `Linear((d+E)/2, E, bias=False)` (`text.proj.0`, `text.proj.2`),
//!   `"linear"` = one bias-free `Linear` (`text.proj`).
//! - `logit_scale` (log space), logits `exp(scale) · cos(img, txt)`.
//! - Context length from `text_cfg.context_length` (256 for BiomedCLIP).
//!
//! open_clip configs only *name* the timm and HF models. medvlm knows the sizes
//! of `vit_{tiny,small,base,large}_patchP_S` and of PubMedBERT/BiomedBERT; any
//! other model needs a top-level `"medvlm_arch": {"vision": {...}, "text": {...}}`
//! block in open_clip_config.json with a [`TimmVitConfig`] and an HF
//! [`BertConfig`] (open_clip itself ignores that block).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::bert::{BertConfig, BertModel, BertPooling};
use crate::error::{ModelError, Result};
use crate::linear::{LinearLayer, LinearLayers};
use crate::timm_vit::{TimmVit, TimmVitConfig};
use crate::vlm::{
    apply_text_prompt, Family, ImageEncoder, TextEncoder, TextOutput, TextPrompt, TokenBatch,
    VisionLanguageModel, VisionOutput, VisualPrompts,
};
use crate::weights::{LoadMode, WeightFile, DEFAULT_IGNORED};

/// Name of the config file in an open_clip model folder.
pub const CONFIG_FILE: &str = "open_clip_config.json";
/// Weight files looked for, in order.
pub const WEIGHT_FILES: &[&str] = &["open_clip_model.safetensors", "open_clip_pytorch_model.bin"];

#[derive(Debug, Clone, Deserialize)]
struct RawVisionCfg {
    timm_model_name: Option<String>,
    #[serde(default)]
    timm_pool: Option<String>,
    #[serde(default)]
    timm_proj: Option<String>,
    #[serde(default)]
    timm_proj_bias: bool,
}

#[derive(Debug, Clone, Deserialize)]
struct RawTextCfg {
    hf_model_name: Option<String>,
    #[serde(default)]
    hf_tokenizer_name: Option<String>,
    #[serde(default)]
    hf_proj_type: Option<String>,
    #[serde(default)]
    hf_pooler_type: Option<String>,
    #[serde(default)]
    context_length: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
struct RawModelCfg {
    embed_dim: usize,
    vision_cfg: RawVisionCfg,
    text_cfg: RawTextCfg,
}

#[derive(Debug, Clone, Deserialize, Default)]
struct RawPreprocess {
    mean: Option<[f32; 3]>,
    std: Option<[f32; 3]>,
}

#[derive(Debug, Clone, Deserialize, Default)]
struct RawArch {
    vision: Option<TimmVitConfig>,
    text: Option<BertConfig>,
}

#[derive(Debug, Clone, Deserialize)]
struct RawOpenClipConfig {
    model_cfg: RawModelCfg,
    #[serde(default)]
    preprocess_cfg: RawPreprocess,
    #[serde(default)]
    medvlm_arch: RawArch,
}

/// Projection of the pooled text features (`hf_proj_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextProjKind {
    /// `Linear → GELU → Linear`, both bias-free, hidden `(d + E) / 2`.
    Mlp,
    /// One bias-free `Linear`.
    Linear,
    /// None (`d == E` and no `hf_proj_type`).
    Identity,
}

/// A resolved BiomedCLIP-layout configuration.
#[derive(Debug, Clone)]
pub struct BiomedClipConfig {
    /// Shared embedding dimension `E`.
    pub embed_dim: usize,
    /// Image tower sizes.
    pub vision: TimmVitConfig,
    /// Whether `visual.head.proj` has a bias (`timm_proj_bias`).
    pub vision_proj_bias: bool,
    /// Text tower sizes.
    pub text: BertConfig,
    /// Text pooling (`hf_pooler_type`).
    pub text_pooling: BertPooling,
    /// Text projection (`hf_proj_type`).
    pub text_proj: TextProjKind,
    /// Tokenizer context length (pad/truncate to this many tokens).
    pub context_length: usize,
    /// Per-channel mean of the image normalisation (open_clip `preprocess_cfg`;
    /// OpenAI CLIP's values when absent).
    pub mean: [f32; 3],
    /// Per-channel std of the image normalisation.
    pub std: [f32; 3],
    /// HF name of the tokenizer, informational.
    pub tokenizer_name: Option<String>,
    /// `tokenizer.json` of a local `hf_tokenizer_name` (else `hf_model_name`) folder, used
    /// when the model folder has none of its own.
    pub tokenizer_file: Option<PathBuf>,
}

/// OpenAI CLIP's image normalisation mean (open_clip's default).
pub const OPENAI_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// OpenAI CLIP's image normalisation std (open_clip's default).
pub const OPENAI_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

impl BiomedClipConfig {
    /// The published BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 sizes.
    pub fn biomedclip_base() -> Self {
        Self {
            embed_dim: 512,
            vision: TimmVitConfig::vit_base_patch16_224(),
            vision_proj_bias: false,
            text: BertConfig::pubmedbert_base(),
            text_pooling: BertPooling::Cls,
            text_proj: TextProjKind::Mlp,
            context_length: 256,
            mean: OPENAI_MEAN,
            std: OPENAI_STD,
            tokenizer_name: None,
            tokenizer_file: None,
        }
    }

    /// Read and resolve an `open_clip_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Resolve the JSON text of an `open_clip_config.json` (`path` is used in errors).
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let raw: RawOpenClipConfig =
            serde_json::from_str(text).map_err(|e| ModelError::config(path, e))?;
        let err = |reason: String| ModelError::config(path, reason);
        let m = raw.model_cfg;

        let vision = match (raw.medvlm_arch.vision, &m.vision_cfg.timm_model_name) {
            (Some(v), _) => v,
            (None, Some(name)) => TimmVitConfig::from_timm_name(name).ok_or_else(|| {
                err(format!(
                    "timm model {name:?} is not known to medvlm; add \
                     \"medvlm_arch\": {{\"vision\": {{image_size, patch_size, width, depth, num_heads}}}}"
                ))
            })?,
            (None, None) => {
                return Err(err(
                    "vision_cfg has no timm_model_name: not a BiomedCLIP (timm + HF) layout".into(),
                ))
            }
        };
        vision.validate().map_err(|r| err(format!("vision: {r}")))?;
        match m.vision_cfg.timm_pool.as_deref() {
            None | Some("") | Some("token") => {}
            Some(p) => {
                return Err(err(format!(
                    "timm_pool {p:?} is not supported (only \"\" / \"token\": class-token pooling)"
                )))
            }
        }
        match m.vision_cfg.timm_proj.as_deref() {
            None | Some("linear") => {}
            Some(p) => {
                return Err(err(format!(
                    "timm_proj {p:?} is not supported (only \"linear\")"
                )))
            }
        }

        let model_dir = path.parent().unwrap_or(Path::new("."));
        let text_cfg = match (raw.medvlm_arch.text, &m.text_cfg.hf_model_name) {
            (Some(t), _) => t,
            (None, Some(name)) => match local_hf_folder(name, model_dir) {
                Some(folder) => local_bert_config(&folder.join("config.json"))?,
                None => BertConfig::from_hf_name(name).ok_or_else(|| {
                    err(format!(
                        "HF text model {name:?} is not known to medvlm and is not a local \
                         folder with a config.json (looked in {} and as given); add \
                         \"medvlm_arch\": {{\"text\": <its BERT config.json>}}",
                        model_dir.join(name).display()
                    ))
                })?,
            },
            (None, None) => {
                return Err(err(
                    "text_cfg has no hf_model_name: not a BiomedCLIP (timm + HF) layout".into(),
                ))
            }
        };
        text_cfg.validate().map_err(|r| err(format!("text: {r}")))?;

        // open_clip's default pooler for model_type bert is cls_pooler.
        let text_pooling = match m.text_cfg.hf_pooler_type.as_deref() {
            None | Some("cls_pooler") => BertPooling::Pooler,
            Some("cls_last_hidden_state_pooler") => BertPooling::Cls,
            Some("mean_pooler") => BertPooling::Mean,
            Some(p) => return Err(err(format!("hf_pooler_type {p:?} is not supported"))),
        };
        let text_proj = match m.text_cfg.hf_proj_type.as_deref() {
            Some("mlp") => TextProjKind::Mlp,
            Some("linear") => TextProjKind::Linear,
            None if text_cfg.hidden_size == m.embed_dim => TextProjKind::Identity,
            None => TextProjKind::Linear,
            Some(p) => return Err(err(format!("hf_proj_type {p:?} is not supported"))),
        };
        let context_length = m
            .text_cfg
            .context_length
            .unwrap_or(text_cfg.max_position_embeddings);
        if context_length > text_cfg.max_position_embeddings {
            return Err(err(format!(
                "context_length {context_length} exceeds the BERT max_position_embeddings {}",
                text_cfg.max_position_embeddings
            )));
        }
        Ok(Self {
            embed_dim: m.embed_dim,
            vision,
            vision_proj_bias: m.vision_cfg.timm_proj_bias,
            text: text_cfg,
            text_pooling,
            text_proj,
            context_length,
            mean: raw.preprocess_cfg.mean.unwrap_or(OPENAI_MEAN),
            std: raw.preprocess_cfg.std.unwrap_or(OPENAI_STD),
            tokenizer_file: m
                .text_cfg
                .hf_tokenizer_name
                .as_deref()
                .or(m.text_cfg.hf_model_name.as_deref())
                .and_then(|name| local_hf_folder(name, model_dir))
                .map(|folder| folder.join("tokenizer.json"))
                .filter(|f| f.is_file()),
            tokenizer_name: m.text_cfg.hf_tokenizer_name,
        })
    }
}

/// The folder an open_clip `hf_model_name` / `hf_tokenizer_name` names when it is a local
/// path rather than a hub id, as transformers' `from_pretrained` reads it: relative to the
/// model folder first (a self-contained model directory), else as given (absolute, or
/// relative to the working directory). `None` for a hub id.
fn local_hf_folder(name: &str, model_dir: &Path) -> Option<PathBuf> {
    let given = Path::new(name);
    [model_dir.join(given), given.to_path_buf()]
        .into_iter()
        .find(|p| p.join("config.json").is_file() || p.join("tokenizer.json").is_file())
}

/// An HF `config.json` of the text tower in a local folder; only BERT is implemented.
fn local_bert_config(path: &Path) -> Result<BertConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::config(path, e))?;
    match value.get("model_type").and_then(|t| t.as_str()) {
        None | Some("bert") => BertConfig::from_file(path),
        Some(other) => Err(ModelError::config(
            path,
            format!("text model_type {other:?} is not supported (medvlm implements BERT)"),
        )),
    }
}

/// The text projection head.
#[derive(Debug, Clone)]
pub enum TextProjection {
    /// `proj.0` → GELU → `proj.2`.
    Mlp(LinearLayer, LinearLayer),
    /// `proj`.
    Linear(LinearLayer),
    /// No projection.
    Identity,
}

impl TextProjection {
    pub(crate) fn load(
        vb: VarBuilder,
        kind: TextProjKind,
        d: usize,
        e: usize,
    ) -> candle_core::Result<Self> {
        Ok(match kind {
            TextProjKind::Mlp => {
                let hidden = (d + e) / 2;
                TextProjection::Mlp(
                    LinearLayer::load(vb.pp("0"), d, hidden, false)?,
                    LinearLayer::load(vb.pp("2"), hidden, e, false)?,
                )
            }
            TextProjKind::Linear => TextProjection::Linear(LinearLayer::load(vb, d, e, false)?),
            TextProjKind::Identity => TextProjection::Identity,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            TextProjection::Mlp(a, b) => b.forward(&a.forward(x)?.gelu_erf()?),
            TextProjection::Linear(l) => l.forward(x),
            TextProjection::Identity => Ok(x.clone()),
        }
    }
}

/// A BiomedCLIP-layout dual encoder.
#[derive(Debug, Clone)]
pub struct BiomedClip {
    cfg: BiomedClipConfig,
    /// Image trunk (`visual.trunk`).
    pub vision: TimmVit,
    /// Image projection (`visual.head.proj`).
    pub vision_proj: LinearLayer,
    /// Text transformer (`text.transformer`).
    pub text: BertModel,
    /// Text projection (`text.proj`).
    pub text_proj: TextProjection,
    logit_scale: Tensor,
    device: Device,
    dtype: DType,
}

impl BiomedClip {
    /// Build from a VarBuilder at the checkpoint root.
    pub fn load(vb: VarBuilder, cfg: &BiomedClipConfig) -> candle_core::Result<Self> {
        let vision = TimmVit::load(vb.pp("visual").pp("trunk"), &cfg.vision)?;
        let vision_proj = LinearLayer::load(
            vb.pp("visual").pp("head").pp("proj"),
            cfg.vision.width,
            cfg.embed_dim,
            cfg.vision_proj_bias,
        )?;
        let with_pooler = cfg.text_pooling == BertPooling::Pooler;
        let text = BertModel::load(vb.pp("text").pp("transformer"), &cfg.text, with_pooler)?;
        let text_proj = TextProjection::load(
            vb.pp("text").pp("proj"),
            cfg.text_proj,
            cfg.text.hidden_size,
            cfg.embed_dim,
        )?;
        let logit_scale = vb.get((), "logit_scale")?;
        Ok(Self {
            cfg: cfg.clone(),
            vision,
            vision_proj,
            text,
            text_proj,
            device: logit_scale.device().clone(),
            dtype: logit_scale.dtype(),
            logit_scale,
        })
    }

    /// Load `dir/open_clip_config.json` and the weights
    /// (`open_clip_model.safetensors`, else `open_clip_pytorch_model.bin`).
    pub fn from_dir(dir: &Path, dtype: DType, device: &Device, mode: &LoadMode) -> Result<Self> {
        let cfg = BiomedClipConfig::from_file(&dir.join(CONFIG_FILE))?;
        let weights = find_weights(dir)?;
        let file = WeightFile::open(&weights)?;
        Self::from_weights(&file, &cfg, dtype, device, mode)
    }

    /// Load from an opened weight file. Tensors the model does not use are an
    /// error (listed), except buffers ([`DEFAULT_IGNORED`]) and an unused BERT pooler.
    pub fn from_weights(
        file: &WeightFile,
        cfg: &BiomedClipConfig,
        dtype: DType,
        device: &Device,
        mode: &LoadMode,
    ) -> Result<Self> {
        let mut ignore: Vec<&str> = DEFAULT_IGNORED.to_vec();
        if cfg.text_pooling != BertPooling::Pooler {
            ignore.push("text.transformer.pooler.");
        }
        file.load(dtype, device, mode, &ignore, |vb| Self::load(vb, cfg))
    }

    /// The configuration.
    pub fn config(&self) -> &BiomedClipConfig {
        &self.cfg
    }

    /// Text encoding from precomputed word embeddings (see [`TextEncoder`]).
    fn encode_words(&self, words: &Tensor, mask: &Tensor) -> Result<TextOutput> {
        let hidden = self.text.forward_embeds(words, Some(mask), None)?;
        let pooled = self.text.pool(&hidden, Some(mask), self.cfg.text_pooling)?;
        let embeds = self.text_proj.forward(&pooled)?;
        Ok(TextOutput {
            embeds,
            pooled,
            last_hidden_state: hidden,
        })
    }
}

/// The weight file of an open_clip folder, or an error naming what was looked for.
pub fn find_weights(dir: &Path) -> Result<PathBuf> {
    WEIGHT_FILES
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
        .ok_or_else(|| ModelError::MissingFile {
            path: dir.join(WEIGHT_FILES[1]),
            reason: format!(
                "no open_clip weights in {} (looked for {})",
                dir.display(),
                WEIGHT_FILES.join(", ")
            ),
        })
}

impl TextEncoder for BiomedClip {
    /// Attention mask: the batch's `attention_mask` (a BERT tokenizer padding
    /// with [PAD] gives exactly open_clip's `ids != pad_token_id`).
    fn encode_text_with(
        &self,
        tokens: &TokenBatch,
        prompt: Option<&TextPrompt>,
    ) -> Result<TextOutput> {
        let ids = tokens.input_ids.to_dtype(DType::U32)?;
        let mut words = self.text.embeddings.words(&ids)?;
        if let Some(p) = prompt {
            words = apply_text_prompt(&words, p)?;
        }
        self.encode_words(&words, &tokens.attention_mask)
    }

    fn token_embeddings(&self, input_ids: &Tensor) -> Result<Tensor> {
        Ok(self
            .text
            .embeddings
            .words(&input_ids.to_dtype(DType::U32)?)?)
    }

    fn text_hidden_size(&self) -> usize {
        self.cfg.text.hidden_size
    }

    fn text_num_layers(&self) -> usize {
        self.cfg.text.num_hidden_layers
    }

    fn context_length(&self) -> usize {
        self.cfg.context_length
    }
}

impl ImageEncoder for BiomedClip {
    /// `last_hidden_state` is timm's `forward_features` output (after the final norm).
    fn encode_image_with(
        &self,
        pixel_values: &Tensor,
        prompts: Option<&VisualPrompts>,
    ) -> Result<VisionOutput> {
        let (tokens, num_prefix_tokens) = self.vision.forward_features(pixel_values, prompts)?;
        let pooled = TimmVit::pool(&tokens)?;
        let embeds = self.vision_proj.forward(&pooled)?;
        Ok(VisionOutput {
            embeds,
            pooled,
            last_hidden_state: tokens,
            num_prefix_tokens,
        })
    }

    fn encode_image_layers(
        &self,
        pixel_values: &Tensor,
        layers: &[usize],
    ) -> Result<crate::vlm::VisionLayerStates> {
        Ok(crate::vlm::VisionLayerStates {
            layers: layers.to_vec(),
            hidden_states: self.vision.forward_layers(pixel_values, layers)?,
            num_prefix_tokens: 1,
        })
    }

    fn supports_image_windows(&self) -> bool {
        true
    }
    fn encode_image_windows(
        &self,
        pixel_values: &Tensor,
        windows: &[Vec<usize>],
    ) -> Result<Tensor> {
        let pooled = self.vision.forward_windows(pixel_values, windows)?;
        Ok(self.vision_proj.forward(&pooled)?)
    }

    fn vision_hidden_size(&self) -> usize {
        self.cfg.vision.width
    }

    fn vision_num_layers(&self) -> usize {
        self.cfg.vision.depth
    }

    fn image_size(&self) -> usize {
        self.cfg.vision.image_size
    }
}

impl LinearLayers for BiomedClip {
    fn linear_layers(&self) -> Vec<&LinearLayer> {
        let mut v = self.vision.linear_layers();
        v.push(&self.vision_proj);
        v.extend(self.text.linear_layers());
        match &self.text_proj {
            TextProjection::Mlp(a, b) => v.extend([a, b]),
            TextProjection::Linear(l) => v.push(l),
            TextProjection::Identity => {}
        }
        v
    }

    fn linear_layers_mut(&mut self) -> Vec<&mut LinearLayer> {
        let mut v = self.vision.linear_layers_mut();
        v.push(&mut self.vision_proj);
        v.extend(self.text.linear_layers_mut());
        match &mut self.text_proj {
            TextProjection::Mlp(a, b) => v.extend([a, b]),
            TextProjection::Linear(l) => v.push(l),
            TextProjection::Identity => {}
        }
        v
    }
}

impl VisionLanguageModel for BiomedClip {
    fn family(&self) -> Family {
        Family::Biomedclip
    }

    fn embed_dim(&self) -> usize {
        self.cfg.embed_dim
    }

    fn logit_scale(&self) -> Tensor {
        self.logit_scale.clone()
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_json(vision: &str, text: &str, arch: &str) -> String {
        format!(
            r#"{{"model_cfg": {{"embed_dim": 512, "vision_cfg": {vision}, "text_cfg": {text}}}{arch}}}"#
        )
    }

    const BIOMEDCLIP_VISION: &str = r#"{"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": false, "timm_pool": "", "timm_proj": "linear", "image_size": 224}"#;
    const BIOMEDCLIP_TEXT: &str = r#"{"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract", "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract", "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256}"#;

    #[test]
    fn published_config_resolves_to_biomedclip_base() {
        let p = Path::new("open_clip_config.json");
        let c = BiomedClipConfig::from_json(&cfg_json(BIOMEDCLIP_VISION, BIOMEDCLIP_TEXT, ""), p)
            .unwrap();
        let want = BiomedClipConfig::biomedclip_base();
        assert_eq!(c.vision, want.vision);
        assert_eq!(c.text, want.text);
        assert_eq!(c.text_pooling, BertPooling::Cls);
        assert_eq!(c.text_proj, TextProjKind::Mlp);
        assert_eq!(c.context_length, 256);
        assert!(!c.vision_proj_bias);
    }

    #[test]
    fn unknown_models_and_options_are_errors_naming_the_file() {
        let p = Path::new("/m/open_clip_config.json");
        let bad_vit = BIOMEDCLIP_VISION.replace("vit_base_patch16_224", "convnext_base");
        let e = BiomedClipConfig::from_json(&cfg_json(&bad_vit, BIOMEDCLIP_TEXT, ""), p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/m/open_clip_config.json") && e.contains("convnext_base"),
            "{e}"
        );
        let bad_pool = BIOMEDCLIP_VISION.replace(r#""timm_pool": """#, r#""timm_pool": "avg""#);
        let e = BiomedClipConfig::from_json(&cfg_json(&bad_pool, BIOMEDCLIP_TEXT, ""), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("timm_pool"), "{e}");
        let bad_text = BIOMEDCLIP_TEXT.replace(
            "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
            "roberta-base",
        );
        let e = BiomedClipConfig::from_json(&cfg_json(BIOMEDCLIP_VISION, &bad_text, ""), p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("roberta-base") && e.contains("medvlm_arch"),
            "{e}"
        );
        let e = BiomedClipConfig::from_json("{not json", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/m/open_clip_config.json"), "{e}");
    }
}
