//! HF `CLIPModel` (Radford et al. 2021, "Learning Transferable Visual Models
//! From Natural Language Supervision"): OpenAI CLIP ViT-B/32, B/16, L/14,
//! PubMedCLIP (Eslami et al. 2023) and PLIP (Huang et al. 2023) share this layout.
//!
//! Files: `config.json` (`model_type: "clip"`, `text_config`, `vision_config`,
//! `projection_dim`, `logit_scale_init_value`) and `model.safetensors` or
//! `pytorch_model.bin`. Tensor names are exactly the checkpoint's
//! (`vision_model.embeddings.patch_embedding.weight`, ...).
//!
//! Text pooling follows HF: with the legacy `eos_token_id == 2` the pooled
//! token is at `argmax(input_ids)` (the EOT token has the largest id in
//! OpenAI's vocabulary); otherwise at the first `eos_token_id`.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Embedding, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::linear::{LinearLayer, LinearLayers};
use crate::transformer::{
    causal_mask, layer_norm, padding_mask, Activation, Encoder, EncoderDims, LayerNorm, EMBED_INIT,
};
use crate::vlm::{
    apply_text_prompt, insert_prompt_tokens, replace_prompt_tokens, Family, ImageEncoder,
    TextEncoder, TextOutput, TextPrompt, TokenBatch, VisionLanguageModel, VisionOutput,
    VisualPrompts,
};

fn d_vocab() -> usize {
    49408
}
fn d_text_hidden() -> usize {
    512
}
fn d_text_inter() -> usize {
    2048
}
fn d_layers() -> usize {
    12
}
fn d_text_heads() -> usize {
    8
}
fn d_ctx() -> usize {
    77
}
fn d_eps() -> f64 {
    1e-5
}
fn d_eos() -> u32 {
    49407
}
fn d_bos() -> u32 {
    49406
}
fn d_pad() -> u32 {
    1
}
fn d_vis_hidden() -> usize {
    768
}
fn d_vis_inter() -> usize {
    3072
}
fn d_vis_heads() -> usize {
    12
}
fn d_channels() -> usize {
    3
}
fn d_image() -> usize {
    224
}
fn d_patch() -> usize {
    32
}
fn d_proj() -> usize {
    512
}
fn d_logit_scale() -> f64 {
    2.6592
}
fn d_clip() -> String {
    "clip".into()
}

/// `text_config` of a CLIP config (defaults: OpenAI ViT-B/32 text tower).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_text_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_text_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_text_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_ctx")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub hidden_act: Activation,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_eos")]
    pub eos_token_id: u32,
    #[serde(default = "d_bos")]
    pub bos_token_id: u32,
    #[serde(default = "d_pad")]
    pub pad_token_id: u32,
}

/// `vision_config` of a CLIP config (defaults: OpenAI ViT-B/32).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "d_vis_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_vis_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_vis_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    #[serde(default = "d_image")]
    pub image_size: usize,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default)]
    pub hidden_act: Activation,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
}

/// A CLIP `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipConfig {
    #[serde(default = "d_clip")]
    pub model_type: String,
    pub text_config: ClipTextConfig,
    pub vision_config: ClipVisionConfig,
    #[serde(default = "d_proj")]
    pub projection_dim: usize,
    #[serde(default = "d_logit_scale")]
    pub logit_scale_init_value: f64,
}

impl ClipConfig {
    /// Parse and validate a config.json text; `path` is used in errors.
    pub fn from_json(text: &str, path: &std::path::Path) -> Result<Self> {
        let cfg: ClipConfig =
            serde_json::from_str(text).map_err(|e| ModelError::config(path, e))?;
        cfg.validate().map_err(|e| ModelError::config(path, e))?;
        Ok(cfg)
    }

    /// Read and validate `path`.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Structural checks that would otherwise fail deep inside the forward pass.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let v = &self.vision_config;
        let t = &self.text_config;
        if v.patch_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            return Err(format!(
                "vision_config.image_size {} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        if v.num_attention_heads == 0 || !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err("vision_config.hidden_size is not divisible by num_attention_heads".into());
        }
        if t.num_attention_heads == 0 || !t.hidden_size.is_multiple_of(t.num_attention_heads) {
            return Err("text_config.hidden_size is not divisible by num_attention_heads".into());
        }
        Ok(())
    }

    /// A small config for from-scratch pretraining and tests: widths 64, 2
    /// layers, 4 heads, context 32, projection 64. Token ids default to pad 0,
    /// bos 1, eos 2; eos 2 selects HF's legacy `argmax(ids)` pooling, so set
    /// `text_config.eos_token_id` to your tokenizer's end token.
    pub fn tiny(vocab_size: usize, image_size: usize, patch_size: usize) -> Self {
        ClipConfig {
            model_type: "clip".into(),
            text_config: ClipTextConfig {
                vocab_size,
                hidden_size: 64,
                intermediate_size: 128,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                max_position_embeddings: 32,
                hidden_act: Activation::QuickGelu,
                layer_norm_eps: 1e-5,
                eos_token_id: 2,
                bos_token_id: 1,
                pad_token_id: 0,
            },
            vision_config: ClipVisionConfig {
                hidden_size: 64,
                intermediate_size: 128,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_channels: 3,
                image_size,
                patch_size,
                hidden_act: Activation::QuickGelu,
                layer_norm_eps: 1e-5,
            },
            projection_dim: 64,
            logit_scale_init_value: 2.6592,
        }
    }
}

/// The CLIP text transformer (`text_model.*`).
#[derive(Debug, Clone)]
pub struct ClipTextTransformer {
    token_embedding: Embedding,
    position_embedding: Tensor,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
    cfg: ClipTextConfig,
}

impl ClipTextTransformer {
    /// Load from the `text_model` prefix.
    pub fn load(vb: VarBuilder, c: &ClipTextConfig) -> candle_core::Result<Self> {
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
            cfg: c.clone(),
        })
    }

    /// Positions of the pooled (EOT) token per row, as HF computes them.
    pub fn pool_positions(&self, input_ids: &Tensor) -> Result<Vec<u32>> {
        let ids: Vec<Vec<u32>> = input_ids.to_dtype(DType::U32)?.to_vec2()?;
        Ok(eot_positions(&ids, self.cfg.eos_token_id))
    }

    /// Returns (last_hidden_state after final layer norm, pooled).
    pub fn forward(
        &self,
        tokens: &TokenBatch,
        prompt: Option<&TextPrompt>,
    ) -> Result<(Tensor, Tensor)> {
        let (_, l) = tokens.input_ids.dims2()?;
        if l > self.cfg.max_position_embeddings {
            return Err(ModelError::invalid(format!(
                "text of {l} tokens exceeds the context length {}",
                self.cfg.max_position_embeddings
            )));
        }
        let mut x = self.token_embedding.forward(&tokens.input_ids)?;
        if let Some(p) = prompt {
            x = apply_text_prompt(&x, p)?;
        }
        let pos = self.position_embedding.narrow(0, 0, l)?.unsqueeze(0)?;
        let x = x.broadcast_add(&pos)?;
        let dev = x.device();
        let mask = causal_mask(l, dev)?.broadcast_add(&padding_mask(&tokens.attention_mask)?)?;
        let h = self.encoder.forward(&x, Some(&mask), None)?;
        let h = self.final_layer_norm.forward(&h)?;
        let pos = self.pool_positions(&tokens.input_ids)?;
        let pooled = gather_rows(&h, &pos)?;
        Ok((h, pooled))
    }
}

/// HF CLIP pooling positions: `argmax(ids)` (first maximum) when
/// `eos_token_id == 2` (legacy configs), else the first `eos_token_id`
/// (position 0 when absent, as `argmax` of an all-false row gives).
pub fn eot_positions(ids: &[Vec<u32>], eos_token_id: u32) -> Vec<u32> {
    ids.iter()
        .map(|row| {
            if eos_token_id == 2 {
                let mut best = 0;
                for (i, &v) in row.iter().enumerate() {
                    if v > row[best] {
                        best = i;
                    }
                }
                best as u32
            } else {
                row.iter().position(|&v| v == eos_token_id).unwrap_or(0) as u32
            }
        })
        .collect()
}

/// `h[b, pos[b], :]` for each row, `[B, D]`.
///
/// One `index_select` on the flattened `[B·L, D]` states: its backward is one scatter-add.
/// (Row-by-row `get` + `stack` put 2·B narrows in the graph, and each narrow's backward pads
/// its row to the full `[B, L, D]` with zeros and adds that into the states' gradient: B
/// full-size temporaries per text batch.)
pub fn gather_rows(h: &Tensor, pos: &[u32]) -> Result<Tensor> {
    let (b, l, d) = h.dims3()?;
    if pos.len() != b {
        return Err(crate::ModelError::invalid(format!(
            "gather_rows: {} positions for states {:?}",
            pos.len(),
            h.dims()
        )));
    }
    let flat: Vec<u32> = pos
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            if (p as usize) < l {
                Ok((i * l) as u32 + p)
            } else {
                Err(crate::ModelError::invalid(format!(
                    "gather_rows: position {p} of row {i} outside the {l} positions"
                )))
            }
        })
        .collect::<Result<_>>()?;
    let index = Tensor::new(flat, h.device())?;
    Ok(h.reshape((b * l, d))?.index_select(&index, 0)?)
}

/// The CLIP vision transformer (`vision_model.*`).
#[derive(Debug, Clone)]
pub struct ClipVisionTransformer {
    class_embedding: Tensor,
    patch_embedding: Conv2d,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    encoder: Encoder,
    post_layernorm: LayerNorm,
    cfg: ClipVisionConfig,
}

impl ClipVisionTransformer {
    /// Load from the `vision_model` prefix.
    pub fn load(vb: VarBuilder, c: &ClipVisionConfig) -> candle_core::Result<Self> {
        let emb = vb.pp("embeddings");
        let d = c.hidden_size;
        let n = (c.image_size / c.patch_size).pow(2) + 1;
        let patch_w = emb.pp("patch_embedding").get_with_hints(
            (d, c.num_channels, c.patch_size, c.patch_size),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let conv_cfg = Conv2dConfig {
            stride: c.patch_size,
            ..Default::default()
        };
        let dims = EncoderDims {
            hidden: d,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            layers: c.num_hidden_layers,
            eps: c.layer_norm_eps,
            act: c.hidden_act,
        };
        Ok(Self {
            class_embedding: emb.get_with_hints(d, "class_embedding", EMBED_INIT)?,
            patch_embedding: Conv2d::new(patch_w, None, conv_cfg),
            position_embedding: emb.pp("position_embedding").get_with_hints(
                (n, d),
                "weight",
                EMBED_INIT,
            )?,
            pre_layrnorm: layer_norm(vb.pp("pre_layrnorm"), d, c.layer_norm_eps)?,
            encoder: Encoder::load(vb.pp("encoder"), &dims)?,
            post_layernorm: layer_norm(vb.pp("post_layernorm"), d, c.layer_norm_eps)?,
            cfg: c.clone(),
        })
    }

    /// Returns (last_hidden_state before post_layernorm, pooled after it, prefix tokens).
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        prompts: Option<&VisualPrompts>,
    ) -> Result<(Tensor, Tensor, usize)> {
        let (x, n_prompt) = self.embed(pixel_values, prompts)?;
        let deep = prompts.map(|p| &p.deep);
        let between = |i: usize, x: Tensor| -> Result<Tensor> {
            match deep.and_then(|d| d.get(i)).and_then(|p| p.as_ref()) {
                Some(p) if n_prompt > 0 => replace_prompt_tokens(&x, p, 1, n_prompt),
                Some(_) => Err(ModelError::invalid(
                    "deep visual prompts need shallow prompts of the same length",
                )),
                None => Ok(x),
            }
        };
        let h = self.encoder.forward(&x, None, Some(&between))?;
        let pooled = self
            .post_layernorm
            .forward(&h.narrow(1, 0, 1)?.squeeze(1)?)?;
        Ok((h, pooled, 1 + n_prompt))
    }

    /// The outputs of encoder layers `layers` (counted from 1, HF's `hidden_states[k]`),
    /// before `post_layernorm`, without prompts; layer `num_hidden_layers` equals
    /// [`Self::forward`]'s last hidden state. Each is `[B, 1 + N, D]` (class token first).
    pub fn forward_layers(&self, pixel_values: &Tensor, layers: &[usize]) -> Result<Vec<Tensor>> {
        crate::vlm::check_vision_layers(layers, self.cfg.num_hidden_layers)?;
        let (x, _) = self.embed(pixel_values, None)?;
        self.encoder.forward_layers(&x, None, layers)
    }

    /// The pooled class token (after `post_layernorm`) of each window of patches, `[B, W, D]`
    /// (see [`crate::vlm::ImageEncoder::encode_image_windows`]); `pre_layrnorm` acts token by
    /// token, so choosing tokens after it is choosing them before it.
    pub fn forward_windows(&self, pixel_values: &Tensor, windows: &[Vec<usize>]) -> Result<Tensor> {
        let (x, _) = self.embed(pixel_values, None)?;
        let b = x.dim(0)?;
        let seqs = crate::vlm::window_token_sequences(&x, 1, windows)?;
        let h = self.encoder.forward(&seqs, None, None)?;
        let pooled = self
            .post_layernorm
            .forward(&h.narrow(1, 0, 1)?.squeeze(1)?)?;
        Ok(pooled.reshape((b, windows.len(), self.cfg.hidden_size))?)
    }

    /// The encoder's input (class token + patches + positions, prompts inserted, then
    /// `pre_layrnorm`) and the number of prompt tokens.
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
        let b = dims[0];
        let d = c.hidden_size;
        let px = pixel_values.to_dtype(self.class_embedding.dtype())?;
        let patches = crate::conv::patch_embedding(&self.patch_embedding, &px)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let cls = self
            .class_embedding
            .reshape((1, 1, d))?
            .broadcast_as((b, 1, d))?;
        let x = Tensor::cat(&[&cls, &patches], 1)?
            .broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        let n_prompt = prompts.map(|p| p.len()).unwrap_or(0);
        let x = match prompts.and_then(|p| p.shallow.as_ref()) {
            Some(p) => insert_prompt_tokens(&x, p, 1)?,
            None => x,
        };
        Ok((self.pre_layrnorm.forward(&x)?, n_prompt))
    }
}

/// A full CLIP model.
#[derive(Debug, Clone)]
pub struct ClipModel {
    pub text_model: ClipTextTransformer,
    pub vision_model: ClipVisionTransformer,
    pub visual_projection: LinearLayer,
    pub text_projection: LinearLayer,
    logit_scale: Tensor,
    cfg: ClipConfig,
    device: Device,
    dtype: DType,
}

impl ClipModel {
    /// Build from a VarBuilder rooted at the checkpoint's top level.
    pub fn load(vb: VarBuilder, cfg: &ClipConfig) -> candle_core::Result<Self> {
        let t = &cfg.text_config;
        let v = &cfg.vision_config;
        let logit_scale = vb.get_with_hints(
            (),
            "logit_scale",
            candle_nn::Init::Const(cfg.logit_scale_init_value),
        )?;
        Ok(Self {
            text_model: ClipTextTransformer::load(vb.pp("text_model"), t)?,
            vision_model: ClipVisionTransformer::load(vb.pp("vision_model"), v)?,
            visual_projection: LinearLayer::load(
                vb.pp("visual_projection"),
                v.hidden_size,
                cfg.projection_dim,
                false,
            )?,
            text_projection: LinearLayer::load(
                vb.pp("text_projection"),
                t.hidden_size,
                cfg.projection_dim,
                false,
            )?,
            logit_scale,
            cfg: cfg.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// The config.
    pub fn config(&self) -> &ClipConfig {
        &self.cfg
    }
}

impl TextEncoder for ClipModel {
    fn encode_text_with(
        &self,
        tokens: &TokenBatch,
        prompt: Option<&TextPrompt>,
    ) -> Result<TextOutput> {
        let (h, pooled) = self.text_model.forward(tokens, prompt)?;
        let embeds = self.text_projection.forward(&pooled)?;
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

impl ImageEncoder for ClipModel {
    fn encode_image_with(
        &self,
        pixel_values: &Tensor,
        prompts: Option<&VisualPrompts>,
    ) -> Result<VisionOutput> {
        let (h, pooled, num_prefix_tokens) = self.vision_model.forward(pixel_values, prompts)?;
        let embeds = self.visual_projection.forward(&pooled)?;
        Ok(VisionOutput {
            embeds,
            pooled,
            last_hidden_state: h,
            num_prefix_tokens,
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
    fn encode_image_layers(
        &self,
        pixel_values: &Tensor,
        layers: &[usize],
    ) -> Result<crate::vlm::VisionLayerStates> {
        Ok(crate::vlm::VisionLayerStates {
            layers: layers.to_vec(),
            hidden_states: self.vision_model.forward_layers(pixel_values, layers)?,
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
        let pooled = self.vision_model.forward_windows(pixel_values, windows)?;
        Ok(self.visual_projection.forward(&pooled)?)
    }
    fn project_patch_tokens(&self, out: &VisionOutput) -> Result<Option<Tensor>> {
        // The class token is pooled by post_layernorm + visual_projection; the same two maps
        // applied to every patch token give per-patch embeddings in the joint space.
        let normed = self
            .vision_model
            .post_layernorm
            .forward(&out.patch_tokens()?)?;
        Ok(Some(self.visual_projection.forward(&normed)?))
    }
}

impl LinearLayers for ClipModel {
    fn linear_layers(&self) -> Vec<&LinearLayer> {
        let mut v = self.text_model.encoder.linears();
        v.extend(self.vision_model.encoder.linears());
        v.push(&self.visual_projection);
        v.push(&self.text_projection);
        v
    }
    fn linear_layers_mut(&mut self) -> Vec<&mut LinearLayer> {
        let mut v = self.text_model.encoder.linears_mut();
        v.extend(self.vision_model.encoder.linears_mut());
        v.push(&mut self.visual_projection);
        v.push(&mut self.text_projection);
        v
    }
}

impl VisionLanguageModel for ClipModel {
    fn family(&self) -> Family {
        Family::Clip
    }
    fn embed_dim(&self) -> usize {
        self.cfg.projection_dim
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
    use super::{eot_positions, gather_rows};
    use candle_core::{Device, Tensor, Var};

    #[test]
    fn gather_rows_picks_each_rows_position_and_scatters_the_gradient_back() {
        let dev = Device::Cpu;
        // h[i, t, :] = [100 i + 10 t, 100 i + 10 t + 1]
        let vals: Vec<f32> = (0..3)
            .flat_map(|i| (0..4).flat_map(move |t| [0, 1].map(|c| (100 * i + 10 * t + c) as f32)))
            .collect();
        let h = Var::from_vec(vals, (3, 4, 2), &dev).unwrap();
        let pooled = gather_rows(h.as_tensor(), &[2, 0, 3]).unwrap();
        assert_eq!(
            pooled.to_vec2::<f32>().unwrap(),
            vec![vec![20.0, 21.0], vec![100.0, 101.0], vec![230.0, 231.0]]
        );
        let w = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev).unwrap();
        let grads = (pooled * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = grads.get(h.as_tensor()).unwrap().to_vec3::<f32>().unwrap();
        let mut expected = vec![vec![vec![0f32; 2]; 4]; 3];
        expected[0][2] = vec![1.0, 2.0];
        expected[1][0] = vec![3.0, 4.0];
        expected[2][3] = vec![5.0, 6.0];
        assert_eq!(g, expected);
        // A position outside the sequence or a position count that does not match: an error.
        assert!(gather_rows(h.as_tensor(), &[2, 0, 4]).is_err());
        assert!(gather_rows(h.as_tensor(), &[2, 0]).is_err());
    }

    #[test]
    fn eot_pooling_follows_hf_for_legacy_and_new_configs() {
        // Legacy eos_token_id == 2: argmax of ids, first maximum on ties
        // (OpenAI CLIP pads with EOT = 49407, the largest id).
        let ids = vec![
            vec![49406, 320, 49407, 49407, 49407],
            vec![49406, 9, 8, 49407, 0],
        ];
        assert_eq!(eot_positions(&ids, 2), vec![2, 3]);
        // New configs: first occurrence of eos_token_id, whatever the ids' values.
        let ids = vec![vec![5, 50, 7, 3, 7], vec![5, 7, 60, 7, 7]];
        assert_eq!(eot_positions(&ids, 7), vec![2, 1]);
        assert_eq!(eot_positions(&ids, 2), vec![1, 2]);
    }
}
