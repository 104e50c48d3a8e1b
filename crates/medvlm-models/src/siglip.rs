//! HF `SiglipModel` (Zhai et al. 2023, "Sigmoid Loss for Language Image
//! Pre-Training"); also MedSigLIP (Google Health 2025, 448-pixel input).
//!
//! Files: `config.json` (`model_type: "siglip"`) and `model.safetensors` or
//! `pytorch_model.bin`; tensor names as in the checkpoint.
//!
//! Differences from CLIP: no class token (pooling by a multi-head
//! attention "probe" head, `vision_model.head.*`), a patch-embedding bias, a
//! text head (`text_model.head`) applied to the *last* token, a scalar
//! `logit_bias`, and texts padded to 64 tokens ("max_length" padding).
//! The text tower runs without a padding mask, as SigLIP was trained (pad
//! tokens are attended; the tokenizer returns no attention mask), so
//! `TokenBatch::attention_mask` is ignored here.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Embedding, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::linear::{LinearLayer, LinearLayers};
use crate::transformer::{
    attention, layer_norm, Activation, Encoder, EncoderDims, LayerNorm, Mlp, EMBED_INIT,
};
use crate::vlm::{
    apply_text_prompt, insert_prompt_tokens, replace_prompt_tokens, Family, ImageEncoder,
    TextEncoder, TextOutput, TextPrompt, TokenBatch, VisionLanguageModel, VisionOutput,
    VisualPrompts,
};

fn d_vocab() -> usize {
    32000
}
fn d_hidden() -> usize {
    768
}
fn d_inter() -> usize {
    3072
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    12
}
fn d_ctx() -> usize {
    64
}
fn d_eps() -> f64 {
    1e-6
}
fn d_act() -> Activation {
    Activation::GeluTanh
}
fn d_channels() -> usize {
    3
}
fn d_image() -> usize {
    224
}
fn d_patch() -> usize {
    16
}
fn d_true() -> bool {
    true
}
fn d_siglip() -> String {
    "siglip".into()
}
fn d_pad() -> u32 {
    1
}
fn d_eos() -> u32 {
    1
}

/// `text_config` of a SigLIP config (defaults: siglip-base-patch16-224).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiglipTextConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_ctx")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_act")]
    pub hidden_act: Activation,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// Output size of `text_model.head` (defaults to `hidden_size`).
    #[serde(default)]
    pub projection_size: Option<usize>,
    #[serde(default = "d_pad")]
    pub pad_token_id: u32,
    #[serde(default = "d_eos")]
    pub eos_token_id: u32,
}

/// `vision_config` of a SigLIP config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiglipVisionConfig {
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    #[serde(default = "d_image")]
    pub image_size: usize,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default = "d_act")]
    pub hidden_act: Activation,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_true")]
    pub vision_use_head: bool,
}

/// A SigLIP `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiglipConfig {
    #[serde(default = "d_siglip")]
    pub model_type: String,
    pub text_config: SiglipTextConfig,
    pub vision_config: SiglipVisionConfig,
}

impl SiglipConfig {
    /// Parse and validate config.json text; `path` is used in errors.
    pub fn from_json(text: &str, path: &std::path::Path) -> Result<Self> {
        let cfg: SiglipConfig =
            serde_json::from_str(text).map_err(|e| ModelError::config(path, e))?;
        cfg.validate().map_err(|e| ModelError::config(path, e))?;
        Ok(cfg)
    }
    /// Read and validate `path`.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json(&text, path)
    }
    /// Structural checks.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let v = &self.vision_config;
        let t = &self.text_config;
        if v.patch_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            return Err(format!(
                "vision_config.image_size {} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        if !v.vision_use_head {
            return Err("vision_use_head = false is not supported (no pooled output)".into());
        }
        if v.num_attention_heads == 0 || !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err("vision_config.hidden_size is not divisible by num_attention_heads".into());
        }
        if t.num_attention_heads == 0 || !t.hidden_size.is_multiple_of(t.num_attention_heads) {
            return Err("text_config.hidden_size is not divisible by num_attention_heads".into());
        }
        if t.projection_size.unwrap_or(t.hidden_size) != v.hidden_size {
            return Err("text projection_size must equal vision hidden_size".into());
        }
        Ok(())
    }
    fn text_proj(&self) -> usize {
        self.text_config
            .projection_size
            .unwrap_or(self.text_config.hidden_size)
    }
}

/// SigLIP text transformer (`text_model.*`).
#[derive(Debug, Clone)]
pub struct SiglipTextTransformer {
    token_embedding: Embedding,
    position_embedding: Tensor,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
    head: LinearLayer,
    cfg: SiglipTextConfig,
}

impl SiglipTextTransformer {
    /// Load from the `text_model` prefix.
    pub fn load(vb: VarBuilder, c: &SiglipTextConfig, proj: usize) -> candle_core::Result<Self> {
        let emb = vb.pp("embeddings");
        let tok = emb.pp("token_embedding").get_with_hints(
            (c.vocab_size, c.hidden_size),
            "weight",
            EMBED_INIT,
        )?;
        let pos = emb.pp("position_embedding").get_with_hints(
            (c.max_position_embeddings, c.hidden_size),
            "weight",
            EMBED_INIT,
        )?;
        let dims = EncoderDims {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            layers: c.num_hidden_layers,
            eps: c.layer_norm_eps,
            act: c.hidden_act,
        };
        Ok(Self {
            token_embedding: Embedding::new(tok, c.hidden_size),
            position_embedding: pos,
            encoder: Encoder::load(vb.pp("encoder"), &dims)?,
            final_layer_norm: layer_norm(
                vb.pp("final_layer_norm"),
                c.hidden_size,
                c.layer_norm_eps,
            )?,
            head: LinearLayer::load(vb.pp("head"), c.hidden_size, proj, true)?,
            cfg: c.clone(),
        })
    }

    /// Returns (last_hidden_state, pooled = last token after final layer norm, embeds = head(pooled)).
    pub fn forward(
        &self,
        tokens: &TokenBatch,
        prompt: Option<&TextPrompt>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (_, l) = tokens.input_ids.dims2()?;
        if l > self.cfg.max_position_embeddings || l == 0 {
            return Err(ModelError::invalid(format!(
                "text of {l} tokens: SigLIP needs 1..={} tokens",
                self.cfg.max_position_embeddings
            )));
        }
        let mut x = self.token_embedding.forward(&tokens.input_ids)?;
        if let Some(p) = prompt {
            x = apply_text_prompt(&x, p)?;
        }
        let x = x.broadcast_add(&self.position_embedding.narrow(0, 0, l)?.unsqueeze(0)?)?;
        let h = self.encoder.forward(&x, None, None)?;
        let h = self.final_layer_norm.forward(&h)?;
        let pooled = h.narrow(1, l - 1, 1)?.squeeze(1)?;
        let embeds = self.head.forward(&pooled)?;
        Ok((h, pooled, embeds))
    }
}

/// Multi-head attention pooling head (`vision_model.head`): a learned probe
/// attends over all tokens (Lee et al. 2019, "Set Transformer" PMA).
#[derive(Debug, Clone)]
pub struct AttentionPoolingHead {
    probe: Tensor,
    in_proj: LinearLayer,
    out_proj: LinearLayer,
    layernorm: LayerNorm,
    mlp: Mlp,
    heads: usize,
}

impl AttentionPoolingHead {
    fn load(vb: VarBuilder, c: &SiglipVisionConfig) -> candle_core::Result<Self> {
        let d = c.hidden_size;
        let att = vb.pp("attention");
        let in_w = att.get_with_hints(
            (3 * d, d),
            "in_proj_weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let in_b = att.get(3 * d, "in_proj_bias")?;
        Ok(Self {
            probe: vb.get_with_hints((1, 1, d), "probe", EMBED_INIT)?,
            in_proj: LinearLayer::new(format!("{}.in_proj", att.prefix()), in_w, Some(in_b)),
            out_proj: LinearLayer::load(att.pp("out_proj"), d, d, true)?,
            layernorm: layer_norm(vb.pp("layernorm"), d, c.layer_norm_eps)?,
            mlp: Mlp::load(vb.pp("mlp"), d, c.intermediate_size, c.hidden_act)?,
            heads: c.num_attention_heads,
        })
    }

    /// `x` `[B, T, D]` -> pooled `[B, D]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / self.heads;
        // The probe is the query; keys/values come from the tokens. The
        // packed in_proj (PyTorch order q | k | v) runs whole, so wrappers on
        // it see the full projection; the probe's k/v and the tokens' q
        // thirds are discarded (one query token: negligible cost).
        let probe = self.probe.broadcast_as((b, 1, d))?;
        let q = self.in_proj.forward(&probe)?.narrow(2, 0, d)?;
        let kv = self.in_proj.forward(x)?;
        let k = kv.narrow(2, d, d)?;
        let v = kv.narrow(2, 2 * d, d)?;
        let split = |y: Tensor, n: usize| -> candle_core::Result<Tensor> {
            y.reshape((b, n, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let o = attention(&split(q, 1)?, &split(k, t)?, &split(v, t)?, None, hd)?
            .transpose(1, 2)?
            .reshape((b, 1, d))?;
        let o = self.out_proj.forward(&o)?;
        let h = (&o + self.mlp.forward(&self.layernorm.forward(&o)?)?)?;
        Ok(h.squeeze(1)?)
    }
}

/// SigLIP vision transformer (`vision_model.*`).
#[derive(Debug, Clone)]
pub struct SiglipVisionTransformer {
    patch_embedding: Conv2d,
    position_embedding: Tensor,
    encoder: Encoder,
    post_layernorm: LayerNorm,
    head: AttentionPoolingHead,
    cfg: SiglipVisionConfig,
}

impl SiglipVisionTransformer {
    /// Load from the `vision_model` prefix.
    pub fn load(vb: VarBuilder, c: &SiglipVisionConfig) -> candle_core::Result<Self> {
        let emb = vb.pp("embeddings");
        let d = c.hidden_size;
        let n = (c.image_size / c.patch_size).pow(2);
        let pe = emb.pp("patch_embedding");
        let w = pe.get_with_hints(
            (d, c.num_channels, c.patch_size, c.patch_size),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let b = pe.get(d, "bias")?;
        let dims = EncoderDims {
            hidden: d,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            layers: c.num_hidden_layers,
            eps: c.layer_norm_eps,
            act: c.hidden_act,
        };
        Ok(Self {
            patch_embedding: Conv2d::new(
                w,
                Some(b),
                Conv2dConfig {
                    stride: c.patch_size,
                    ..Default::default()
                },
            ),
            position_embedding: emb.pp("position_embedding").get_with_hints(
                (n, d),
                "weight",
                EMBED_INIT,
            )?,
            encoder: Encoder::load(vb.pp("encoder"), &dims)?,
            post_layernorm: layer_norm(vb.pp("post_layernorm"), d, c.layer_norm_eps)?,
            head: AttentionPoolingHead::load(vb.pp("head"), c)?,
            cfg: c.clone(),
        })
    }

    /// Returns (last_hidden_state after post_layernorm, pooled, prefix tokens).
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        prompts: Option<&VisualPrompts>,
    ) -> Result<(Tensor, Tensor, usize)> {
        let (x, n_prompt) = self.embed(pixel_values, prompts)?;
        let deep = prompts.map(|p| &p.deep);
        let between = |i: usize, x: Tensor| -> Result<Tensor> {
            match deep.and_then(|d| d.get(i)).and_then(|p| p.as_ref()) {
                Some(p) if n_prompt > 0 => replace_prompt_tokens(&x, p, 0, n_prompt),
                Some(_) => Err(ModelError::invalid(
                    "deep visual prompts need shallow prompts of the same length",
                )),
                None => Ok(x),
            }
        };
        let h = self.encoder.forward(&x, None, Some(&between))?;
        let h = self.post_layernorm.forward(&h)?;
        let pooled = self.head.forward(&h)?;
        Ok((h, pooled, n_prompt))
    }

    /// The outputs of encoder layers `layers` (counted from 1, HF's `hidden_states[k]`),
    /// before `post_layernorm` (so the last one is [`Self::forward`]'s last hidden state
    /// without that norm), without prompts; each `[B, N, D]` (no class token).
    pub fn forward_layers(&self, pixel_values: &Tensor, layers: &[usize]) -> Result<Vec<Tensor>> {
        crate::vlm::check_vision_layers(layers, self.cfg.num_hidden_layers)?;
        let (x, _) = self.embed(pixel_values, None)?;
        self.encoder.forward_layers(&x, None, layers)
    }

    /// The encoder's input (patches + positions, prompts inserted) and the number of prompt
    /// tokens.
    fn embed(
        &self,
        pixel_values: &Tensor,
        prompts: Option<&VisualPrompts>,
    ) -> Result<(Tensor, usize)> {
        let c = &self.cfg;
        let dims = pixel_values.dims();
        if dims.len() != 4
            || dims[1] != c.num_channels
            || dims[2] != c.image_size
            || dims[3] != c.image_size
        {
            return Err(ModelError::invalid(format!(
                "pixel_values must be [B, {}, {}, {}], got {:?}",
                c.num_channels, c.image_size, c.image_size, dims
            )));
        }
        let px = pixel_values.to_dtype(self.position_embedding.dtype())?;
        let x = crate::conv::patch_embedding(&self.patch_embedding, &px)?
            .flatten_from(2)?
            .transpose(1, 2)?
            .broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        let n_prompt = prompts.map(|p| p.len()).unwrap_or(0);
        let x = match prompts.and_then(|p| p.shallow.as_ref()) {
            Some(p) => insert_prompt_tokens(&x, p, 0)?,
            None => x,
        };
        Ok((x, n_prompt))
    }
}

/// A full SigLIP model.
#[derive(Debug, Clone)]
pub struct SiglipModel {
    pub text_model: SiglipTextTransformer,
    pub vision_model: SiglipVisionTransformer,
    logit_scale: Tensor,
    logit_bias: Tensor,
    cfg: SiglipConfig,
    device: Device,
    dtype: DType,
}

impl SiglipModel {
    /// Build from a VarBuilder rooted at the checkpoint's top level.
    pub fn load(vb: VarBuilder, cfg: &SiglipConfig) -> candle_core::Result<Self> {
        // Initial values of the SigLIP paper: t' = log 10, b = -10.
        let logit_scale =
            vb.get_with_hints(1, "logit_scale", candle_nn::Init::Const(10f64.ln()))?;
        let logit_bias = vb.get_with_hints(1, "logit_bias", candle_nn::Init::Const(-10.0))?;
        Ok(Self {
            text_model: SiglipTextTransformer::load(
                vb.pp("text_model"),
                &cfg.text_config,
                cfg.text_proj(),
            )?,
            vision_model: SiglipVisionTransformer::load(vb.pp("vision_model"), &cfg.vision_config)?,
            logit_scale,
            logit_bias,
            cfg: cfg.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }
    /// The config.
    pub fn config(&self) -> &SiglipConfig {
        &self.cfg
    }
}

impl TextEncoder for SiglipModel {
    fn encode_text_with(
        &self,
        tokens: &TokenBatch,
        prompt: Option<&TextPrompt>,
    ) -> Result<TextOutput> {
        let (h, pooled, embeds) = self.text_model.forward(tokens, prompt)?;
        Ok(TextOutput {
            embeds,
            pooled,
            last_hidden_state: h,
        })
    }
    fn token_embeddings(&self, input_ids: &Tensor) -> Result<Tensor> {
        Ok(self.text_model.token_embedding.forward(input_ids)?)
    }
    fn text_hidden_size(&self) -> usize {
        self.cfg.text_config.hidden_size
    }
    fn text_num_layers(&self) -> usize {
        self.cfg.text_config.num_hidden_layers
    }
    fn context_length(&self) -> usize {
        self.cfg.text_config.max_position_embeddings
    }
}

impl ImageEncoder for SiglipModel {
    fn encode_image_with(
        &self,
        pixel_values: &Tensor,
        prompts: Option<&VisualPrompts>,
    ) -> Result<VisionOutput> {
        let (h, pooled, n) = self.vision_model.forward(pixel_values, prompts)?;
        Ok(VisionOutput {
            embeds: pooled.clone(),
            pooled,
            last_hidden_state: h,
            num_prefix_tokens: n,
        })
    }
    fn encode_image_layers(
        &self,
        pixel_values: &Tensor,
        layers: &[usize],
    ) -> Result<crate::vlm::VisionLayerStates> {
        Ok(crate::vlm::VisionLayerStates {
            layers: layers.to_vec(),
            hidden_states: self.vision_model.forward_layers(pixel_values, layers)?,
            num_prefix_tokens: 0,
        })
    }
    fn vision_hidden_size(&self) -> usize {
        self.cfg.vision_config.hidden_size
    }
    fn vision_num_layers(&self) -> usize {
        self.cfg.vision_config.num_hidden_layers
    }
    fn image_size(&self) -> usize {
        self.cfg.vision_config.image_size
    }
}

impl LinearLayers for SiglipModel {
    fn linear_layers(&self) -> Vec<&LinearLayer> {
        let mut v = self.text_model.encoder.linears();
        v.push(&self.text_model.head);
        v.extend(self.vision_model.encoder.linears());
        let h = &self.vision_model.head;
        v.extend([&h.in_proj, &h.out_proj, &h.mlp.fc1, &h.mlp.fc2]);
        v
    }
    fn linear_layers_mut(&mut self) -> Vec<&mut LinearLayer> {
        let mut v = self.text_model.encoder.linears_mut();
        v.push(&mut self.text_model.head);
        v.extend(self.vision_model.encoder.linears_mut());
        let h = &mut self.vision_model.head;
        v.extend([
            &mut h.in_proj,
            &mut h.out_proj,
            &mut h.mlp.fc1,
            &mut h.mlp.fc2,
        ]);
        v
    }
}

impl VisionLanguageModel for SiglipModel {
    fn family(&self) -> Family {
        Family::Siglip
    }
    fn embed_dim(&self) -> usize {
        self.cfg.vision_config.hidden_size
    }
    fn logit_scale(&self) -> Tensor {
        self.logit_scale
            .reshape(())
            .unwrap_or_else(|_| self.logit_scale.clone())
    }
    fn logit_bias(&self) -> Option<Tensor> {
        Some(
            self.logit_bias
                .reshape(())
                .unwrap_or_else(|_| self.logit_bias.clone()),
        )
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
}
