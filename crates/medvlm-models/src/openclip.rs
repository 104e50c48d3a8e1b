//! open_clip's own CLIP layout with a convolutional image tower: OpenAI's RN50 / RN101 /
//! RN50x4 CLIP (Radford et al. 2021), PubMedCLIP-RN50 (Eslami et al. 2023, "PubMedCLIP: How
//! Much Does CLIP Benefit Visual Question Answering in the Medical Domain?") once converted to
//! open_clip's state dict, and medvlm's from-scratch convolutional CLIP (`medvlm quickstart`).
//!
//! Folder: `open_clip_config.json` (`model_cfg` with `vision_cfg.layers` a list of four block
//! counts) + `open_clip_model.safetensors` (or `open_clip_pytorch_model.bin`) +
//! `tokenizer.json` (open_clip bundles its BPE tokenizer in Python; medvlm reads the same
//! vocabulary from a tokenizer.json, e.g. the one of `openai/clip-vit-base-patch32`).
//!
//! - Image tower: [`ModifiedResNet`] under `visual.*`.
//! - Text tower: open_clip's `TextTransformer` flattened into the model: `token_embedding`,
//!   `positional_embedding`, pre-norm residual blocks `transformer.resblocks.{i}` (`ln_1`,
//!   `attn.in_proj_weight` / `in_proj_bias` holding q, k and v stacked, `attn.out_proj`,
//!   `ln_2`, `mlp.c_fc`, `mlp.c_proj`), causal attention mask (no padding mask: with the
//!   causal mask, padding after the pooled token cannot change it), `ln_final`, pooling at
//!   `text_cfg.pool_type` = `"argmax"` (the highest token id, OpenAI's end-of-text; default)
//!   or `"eos"` (the first `eos_id`), then `pooled @ text_projection` (`[width, embed_dim]`).
//!   The q, k and v projections are addressable as `transformer.resblocks.{i}.attn.q_proj`
//!   (`k_proj`, `v_proj`) for LoRA, as CLIP-LoRA's re-implementation of the attention names
//!   them; they are row blocks of `in_proj_weight`.
//! - Activation: QuickGELU when `model_cfg.quick_gelu` (OpenAI's weights), exact GELU otherwise.
//! - `logit_scale` (log space).
//!
//! Options open_clip offers that these checkpoints do not use (`embed_cls`, `no_causal_mask`,
//! `proj_bias`, layer scale, HF or timm towers) are refused with an error naming them.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::linear::{LinearLayer, LinearLayers};
use crate::modified_resnet::{ModifiedResNet, ModifiedResNetConfig};
use crate::transformer::{
    causal_mask, layer_norm, Activation, Encoder, EncoderLayer, LayerNorm, Mlp, SelfAttention,
    EMBED_INIT,
};
use crate::vlm::{
    apply_text_prompt, Family, ImageEncoder, TextEncoder, TextOutput, TextPrompt, TokenBatch,
    VisionLanguageModel, VisionOutput, VisualPrompts,
};
use crate::weights::{LoadMode, WeightFile, DEFAULT_IGNORED};

pub use crate::biomedclip::{find_weights, CONFIG_FILE, OPENAI_MEAN, OPENAI_STD};

/// Where the text tower pools (`text_cfg.pool_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextPool {
    /// The first position of the highest token id (OpenAI's end-of-text has the highest id).
    Argmax,
    /// The first position of this token id (position 0 when absent, as open_clip's argmax of
    /// an all-false row gives).
    Eos(u32),
}

/// open_clip `text_cfg` of the built-in text transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenClipTextConfig {
    pub context_length: usize,
    pub vocab_size: usize,
    pub width: usize,
    pub heads: usize,
    pub layers: usize,
    pub mlp_ratio: f64,
    pub pool: TextPool,
}

/// A resolved `open_clip_config.json` with a ModifiedResNet image tower.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenClipConfig {
    /// Shared embedding dimension.
    pub embed_dim: usize,
    /// QuickGELU (OpenAI's weights) instead of exact GELU in the text tower.
    pub quick_gelu: bool,
    pub vision: ModifiedResNetConfig,
    pub text: OpenClipTextConfig,
    /// Image normalisation (`preprocess_cfg`, OpenAI's values when absent).
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

#[derive(Debug, Deserialize, Serialize)]
struct RawVision {
    image_size: usize,
    layers: serde_json::Value,
    width: usize,
    #[serde(default = "d_64")]
    head_width: usize,
}

fn d_64() -> usize {
    64
}
fn d_ctx() -> usize {
    77
}
fn d_vocab() -> usize {
    49408
}
fn d_mlp() -> f64 {
    4.0
}
fn d_pool() -> String {
    "argmax".into()
}
fn d_eos() -> u32 {
    2
}

#[derive(Debug, Deserialize, Serialize)]
struct RawText {
    #[serde(default = "d_ctx")]
    context_length: usize,
    #[serde(default = "d_vocab")]
    vocab_size: usize,
    width: usize,
    heads: usize,
    layers: usize,
    #[serde(default = "d_mlp")]
    mlp_ratio: f64,
    #[serde(default = "d_pool")]
    pool_type: String,
    #[serde(default = "d_eos")]
    eos_id: u32,
    /// Everything else, checked against the options medvlm does not implement.
    #[serde(flatten)]
    other: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Deserialize, Serialize)]
struct RawModel {
    embed_dim: usize,
    #[serde(default)]
    quick_gelu: bool,
    vision_cfg: RawVision,
    text_cfg: RawText,
}

#[derive(Debug, Deserialize, Serialize, Default)]
struct RawPreprocess {
    mean: Option<[f32; 3]>,
    std: Option<[f32; 3]>,
}

#[derive(Debug, Deserialize, Serialize)]
struct RawConfig {
    model_cfg: RawModel,
    #[serde(default)]
    preprocess_cfg: RawPreprocess,
}

/// Whether an `open_clip_config.json` describes one of open_clip's own image towers (no
/// `vision_cfg.timm_model_name`): a ModifiedResNet (`layers` a list), or open_clip's
/// VisionTransformer, which [`OpenClipConfig::from_json`] refuses by name. A timm tower
/// means the BiomedCLIP layout.
pub fn is_native_config(json: &serde_json::Value) -> bool {
    json.pointer("/model_cfg/vision_cfg").is_some()
        && json
            .pointer("/model_cfg/vision_cfg/timm_model_name")
            .is_none_or(|n| n.is_null())
}

impl OpenClipConfig {
    /// Read and resolve an `open_clip_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Resolve the JSON text of an `open_clip_config.json` (`path` is used in errors).
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| ModelError::config(path, e))?;
        let err = |reason: String| ModelError::config(path, reason);
        let m = raw.model_cfg;
        let layers: Vec<usize> =
            serde_json::from_value(m.vision_cfg.layers.clone()).map_err(|_| {
                err(format!(
                "vision_cfg.layers = {}: medvlm implements open_clip's ModifiedResNet (a list of \
                 four block counts) and timm towers (BiomedCLIP), not open_clip's own \
                 VisionTransformer",
                m.vision_cfg.layers
            ))
            })?;
        let vision = ModifiedResNetConfig {
            layers,
            width: m.vision_cfg.width,
            image_size: m.vision_cfg.image_size,
            head_width: m.vision_cfg.head_width,
            output_dim: m.embed_dim,
        };
        vision
            .validate()
            .map_err(|r| err(format!("vision_cfg: {r}")))?;
        let t = m.text_cfg;
        for (key, value) in &t.other {
            let harmless = match key.as_str() {
                "embed_cls"
                | "no_causal_mask"
                | "proj_bias"
                | "output_tokens"
                | "final_ln_after_pool" => value == &serde_json::Value::Bool(false),
                "ls_init_value" | "hf_model_name" | "act_kwargs" | "norm_kwargs" => value.is_null(),
                "proj_type" => value == "linear",
                "pad_id" | "hf_tokenizer_name" | "tokenizer_kwargs" | "tokenizer_mode" => true,
                _ => false,
            };
            if !harmless {
                return Err(err(format!(
                    "text_cfg.{key} = {value} is not supported by medvlm's open_clip text tower"
                )));
            }
        }
        let pool = match t.pool_type.as_str() {
            "argmax" => TextPool::Argmax,
            "eos" => TextPool::Eos(t.eos_id),
            other => {
                return Err(err(format!(
                    "text_cfg.pool_type {other:?} is not supported (argmax, eos)"
                )))
            }
        };
        if t.heads == 0 || !t.width.is_multiple_of(t.heads) || t.layers == 0 || t.mlp_ratio <= 0.0 {
            return Err(err(format!(
                "text_cfg: width {} / heads {} / layers {} / mlp_ratio {} do not build a transformer",
                t.width, t.heads, t.layers, t.mlp_ratio
            )));
        }
        Ok(Self {
            embed_dim: m.embed_dim,
            quick_gelu: m.quick_gelu,
            vision,
            text: OpenClipTextConfig {
                context_length: t.context_length,
                vocab_size: t.vocab_size,
                width: t.width,
                heads: t.heads,
                layers: t.layers,
                mlp_ratio: t.mlp_ratio,
                pool,
            },
            mean: raw.preprocess_cfg.mean.unwrap_or(OPENAI_MEAN),
            std: raw.preprocess_cfg.std.unwrap_or(OPENAI_STD),
        })
    }

    /// The `open_clip_config.json` contents that [`OpenClipConfig::from_json`] reads back
    /// (and open_clip's `create_model` accepts as `model_cfg`).
    pub fn to_json(&self) -> serde_json::Value {
        let (pool_type, eos_id) = match self.text.pool {
            TextPool::Argmax => ("argmax", d_eos()),
            TextPool::Eos(id) => ("eos", id),
        };
        serde_json::json!({
            "model_cfg": {
                "embed_dim": self.embed_dim,
                "quick_gelu": self.quick_gelu,
                "vision_cfg": {
                    "image_size": self.vision.image_size,
                    "layers": self.vision.layers,
                    "width": self.vision.width,
                    "head_width": self.vision.head_width,
                },
                "text_cfg": {
                    "context_length": self.text.context_length,
                    "vocab_size": self.text.vocab_size,
                    "width": self.text.width,
                    "heads": self.text.heads,
                    "layers": self.text.layers,
                    "mlp_ratio": self.text.mlp_ratio,
                    "pool_type": pool_type,
                    "eos_id": eos_id,
                },
            },
            "preprocess_cfg": { "mean": self.mean, "std": self.std },
        })
    }

    fn activation(&self) -> Activation {
        if self.quick_gelu {
            Activation::QuickGelu
        } else {
            Activation::Gelu
        }
    }
}

/// open_clip's text transformer (the model's top-level text tensors).
#[derive(Debug, Clone)]
pub struct OpenClipText {
    token_embedding: Embedding,
    positional_embedding: Tensor,
    pub encoder: Encoder,
    ln_final: LayerNorm,
    /// `x @ text_projection` as a bias-free layer with weight `text_projectionᵀ`.
    pub projection: LinearLayer,
    cfg: OpenClipTextConfig,
}

impl OpenClipText {
    /// Load from the checkpoint root (open_clip keeps the text tensors at the top level).
    pub(crate) fn load(
        vb: VarBuilder,
        c: &OpenClipTextConfig,
        e: usize,
        act: Activation,
    ) -> candle_core::Result<Self> {
        let d = c.width;
        let tok =
            vb.pp("token_embedding")
                .get_with_hints((c.vocab_size, d), "weight", EMBED_INIT)?;
        let pos = vb.get_with_hints((c.context_length, d), "positional_embedding", EMBED_INIT)?;
        let blocks = vb.pp("transformer").pp("resblocks");
        let mut layers = Vec::with_capacity(c.layers);
        let hidden = (d as f64 * c.mlp_ratio).round() as usize;
        for i in 0..c.layers {
            let b = blocks.pp(i);
            let attn = b.pp("attn");
            let w = attn.get_with_hints(
                (3 * d, d),
                "in_proj_weight",
                candle_nn::init::DEFAULT_KAIMING_NORMAL,
            )?;
            let bias = attn.get_with_hints(3 * d, "in_proj_bias", candle_nn::Init::Const(0.0))?;
            let part = |k: usize, name: &str| -> candle_core::Result<LinearLayer> {
                Ok(LinearLayer::new(
                    format!("{}.{name}", attn.prefix()),
                    w.narrow(0, k * d, d)?,
                    Some(bias.narrow(0, k * d, d)?),
                ))
            };
            let self_attn = SelfAttention::new(
                part(0, "q_proj")?,
                part(1, "k_proj")?,
                part(2, "v_proj")?,
                LinearLayer::load(attn.pp("out_proj"), d, d, true)?,
                c.heads,
            )?;
            let mlp = Mlp::new(
                LinearLayer::load(b.pp("mlp").pp("c_fc"), d, hidden, true)?,
                LinearLayer::load(b.pp("mlp").pp("c_proj"), hidden, d, true)?,
                act,
            );
            layers.push(EncoderLayer {
                self_attn,
                layer_norm1: layer_norm(b.pp("ln_1"), d, 1e-5)?,
                mlp,
                layer_norm2: layer_norm(b.pp("ln_2"), d, 1e-5)?,
            });
        }
        let proj = vb.get_with_hints(
            (d, e),
            "text_projection",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        Ok(Self {
            token_embedding: Embedding::new(tok, d),
            positional_embedding: pos,
            encoder: Encoder { layers },
            ln_final: layer_norm(vb.pp("ln_final"), d, 1e-5)?,
            projection: LinearLayer::new("text_projection", proj.t()?, None),
            cfg: c.clone(),
        })
    }

    /// Pooled position of each row.
    pub fn pool_positions(&self, input_ids: &Tensor) -> Result<Vec<u32>> {
        let ids: Vec<Vec<u32>> = input_ids.to_dtype(DType::U32)?.to_vec2()?;
        Ok(ids
            .iter()
            .map(|row| {
                let at = match self.cfg.pool {
                    TextPool::Argmax => {
                        let mut best = 0;
                        for (i, &v) in row.iter().enumerate() {
                            if v > row[best] {
                                best = i;
                            }
                        }
                        best
                    }
                    TextPool::Eos(id) => row.iter().position(|&v| v == id).unwrap_or(0),
                };
                at as u32
            })
            .collect())
    }

    /// The context length.
    pub fn context_length(&self) -> usize {
        self.cfg.context_length
    }

    /// The vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    pub(crate) fn forward(
        &self,
        tokens: &TokenBatch,
        prompt: Option<&TextPrompt>,
    ) -> Result<TextOutput> {
        let (_, l) = tokens.input_ids.dims2()?;
        if l > self.cfg.context_length {
            return Err(ModelError::invalid(format!(
                "text of {l} tokens exceeds the context length {}",
                self.cfg.context_length
            )));
        }
        let ids = tokens.input_ids.to_dtype(DType::U32)?;
        let mut x = self.token_embedding.forward(&ids)?;
        if let Some(p) = prompt {
            x = apply_text_prompt(&x, p)?;
        }
        let x = x.broadcast_add(&self.positional_embedding.narrow(0, 0, l)?.unsqueeze(0)?)?;
        let mask = causal_mask(l, x.device())?;
        let h = self.encoder.forward(&x, Some(&mask), None)?;
        let h = self.ln_final.forward(&h)?;
        let pooled = crate::clip::gather_rows(&h, &self.pool_positions(&ids)?)?;
        Ok(TextOutput {
            embeds: self.projection.forward(&pooled)?,
            pooled,
            last_hidden_state: h,
        })
    }
}

/// An open_clip CLIP with a ModifiedResNet image tower.
#[derive(Debug)]
pub struct OpenClipResNet {
    cfg: OpenClipConfig,
    pub visual: ModifiedResNet,
    pub text: OpenClipText,
    logit_scale: Tensor,
    device: Device,
    dtype: DType,
}

impl OpenClipResNet {
    /// Build from a VarBuilder at the checkpoint root.
    pub fn load(vb: VarBuilder, cfg: &OpenClipConfig) -> candle_core::Result<Self> {
        let visual = ModifiedResNet::load(vb.pp("visual"), &cfg.vision)?;
        let text = OpenClipText::load(vb.clone(), &cfg.text, cfg.embed_dim, cfg.activation())?;
        let logit_scale = vb.get_with_hints(
            (),
            "logit_scale",
            candle_nn::Init::Const((1.0f64 / 0.07).ln()),
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            visual,
            text,
            device: logit_scale.device().clone(),
            dtype: logit_scale.dtype(),
            logit_scale,
        })
    }

    /// Load `dir/open_clip_config.json` and its weights. Tensors the model does not use are
    /// an error (listed), except the batch-norm step counters (`num_batches_tracked`).
    pub fn from_dir(dir: &Path, dtype: DType, device: &Device, mode: &LoadMode) -> Result<Self> {
        let cfg = OpenClipConfig::from_file(&dir.join(CONFIG_FILE))?;
        let file = WeightFile::open(find_weights(dir)?)?;
        file.load(dtype, device, mode, DEFAULT_IGNORED, |vb| {
            Self::load(vb, &cfg)
        })
    }

    /// The configuration.
    pub fn config(&self) -> &OpenClipConfig {
        &self.cfg
    }
}

impl TextEncoder for OpenClipResNet {
    fn encode_text_with(
        &self,
        tokens: &TokenBatch,
        prompt: Option<&TextPrompt>,
    ) -> Result<TextOutput> {
        self.text.forward(tokens, prompt)
    }

    fn token_embeddings(&self, input_ids: &Tensor) -> Result<Tensor> {
        Ok(self
            .text
            .token_embedding
            .forward(&input_ids.to_dtype(DType::U32)?)?)
    }

    fn text_hidden_size(&self) -> usize {
        self.cfg.text.width
    }

    fn text_num_layers(&self) -> usize {
        self.cfg.text.layers
    }

    fn context_length(&self) -> usize {
        self.cfg.text.context_length
    }
}

impl ImageEncoder for OpenClipResNet {
    /// `last_hidden_state` is the final feature map, flattened channels-last
    /// `[B, (S/32)², 32·width]`; `pooled` its global average; `embeds` the attention pool.
    fn encode_image_with(
        &self,
        pixel_values: &Tensor,
        prompts: Option<&VisualPrompts>,
    ) -> Result<VisionOutput> {
        if prompts.is_some_and(|p| !p.is_empty() || p.deep.iter().any(Option::is_some)) {
            return Err(ModelError::invalid(
                "visual prompts (VPT, MaPLe) need a vision transformer; this model's image \
                 tower is a ResNet (use a text-side method such as CoOp, or LoRA)",
            ));
        }
        let out = self.visual.forward(&pixel_values.to_dtype(self.dtype)?)?;
        Ok(VisionOutput {
            embeds: out.embeds,
            pooled: out.mean_features,
            last_hidden_state: out.features,
            num_prefix_tokens: 0,
        })
    }

    fn vision_hidden_size(&self) -> usize {
        self.cfg.vision.feature_dim()
    }

    fn vision_num_layers(&self) -> usize {
        self.visual.num_blocks()
    }

    fn image_size(&self) -> usize {
        self.cfg.vision.image_size
    }

    fn set_training(&self, on: bool) {
        self.visual.set_training(on);
    }

    fn supports_visual_prompts(&self) -> bool {
        false
    }
}

impl LinearLayers for OpenClipResNet {
    fn linear_layers(&self) -> Vec<&LinearLayer> {
        let mut v = self.visual.linears();
        v.extend(self.text.encoder.linears());
        v.push(&self.text.projection);
        v
    }

    fn linear_layers_mut(&mut self) -> Vec<&mut LinearLayer> {
        let mut v = self.visual.linears_mut();
        v.extend(self.text.encoder.linears_mut());
        v.push(&mut self.text.projection);
        v
    }
}

impl VisionLanguageModel for OpenClipResNet {
    fn family(&self) -> Family {
        Family::OpenClip
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

    fn cfg(text_extra: &str, layers: &str) -> String {
        format!(
            r#"{{"model_cfg": {{"embed_dim": 32, "vision_cfg": {{"image_size": 64, "layers": {layers}, "width": 4, "head_width": 32}},
               "text_cfg": {{"width": 32, "heads": 4, "layers": 2{text_extra}}}}}}}"#
        )
    }

    #[test]
    fn config_round_trips_and_refuses_what_medvlm_does_not_implement() {
        let p = Path::new("x/open_clip_config.json");
        let c = OpenClipConfig::from_json(
            &cfg(", \"pool_type\": \"eos\", \"eos_id\": 3", "[1, 1, 1, 1]"),
            p,
        )
        .unwrap();
        assert_eq!(c.text.pool, TextPool::Eos(3));
        assert_eq!(c.text.context_length, 77);
        let back = OpenClipConfig::from_json(&c.to_json().to_string(), p).unwrap();
        assert_eq!(back, c);
        for (extra, layers, needle) in [
            (", \"embed_cls\": true", "[1, 1, 1, 1]", "embed_cls"),
            (", \"pool_type\": \"first\"", "[1, 1, 1, 1]", "pool_type"),
            ("", "12", "VisionTransformer"),
            ("", "[1, 1, 1]", "four stages"),
        ] {
            let e = OpenClipConfig::from_json(&cfg(extra, layers), p)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(needle) && e.contains("open_clip_config.json"),
                "{e}"
            );
        }
    }
}
