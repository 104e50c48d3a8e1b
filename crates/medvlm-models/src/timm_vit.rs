//! Vision Transformer in the timm `VisionTransformer` layout (Dosovitskiy et al.
//! 2021, "An Image is Worth 16x16 Words: Transformers for Image Recognition at
//! Scale"), as wrapped by open_clip's `TimmModel` (the image tower of
//! BiomedCLIP, `visual.trunk.*`).
//!
//! Semantics follow timm exactly for the configurations BiomedCLIP uses
//! (`class_token=True`, learned absolute position embeddings covering the
//! class token, no pre-norm, pre-norm blocks, LayerNorm eps 1e-6, exact GELU,
//! `global_pool="token"`): patchify with a strided convolution, prepend the
//! class token, add position embeddings, run the blocks, apply the final
//! norm, and pool the class token.
//!
//! Extension points: visual prompt tokens (VPT) are inserted right after the
//! class token once position embeddings were added
//! ([`crate::vlm::VisualPrompts`]); every `attn.qkv`, `attn.proj`, `mlp.fc1`
//! and `mlp.fc2` is a [`LinearLayer`].

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};

use crate::transformer::LayerNorm;
use serde::Deserialize;

use crate::error::{ModelError, Result};
use crate::linear::{LinearLayer, LinearLayers};
use crate::vlm::{insert_prompt_tokens, replace_prompt_tokens, VisualPrompts};

fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_eps() -> f64 {
    1e-6
}

/// Sizes of a timm ViT. Defaults: `mlp_ratio = 4`, `layer_norm_eps = 1e-6`
/// (timm's `partial(nn.LayerNorm, eps=1e-6)`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TimmVitConfig {
    /// Input resolution (square).
    pub image_size: usize,
    /// Patch size (square).
    pub patch_size: usize,
    /// Token width (timm `embed_dim`).
    pub width: usize,
    /// Number of blocks.
    pub depth: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// MLP hidden width / token width.
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

impl TimmVitConfig {
    /// ViT-B/16 at 224 px (`vit_base_patch16_224`): width 768, 12 blocks, 12 heads.
    pub fn vit_base_patch16_224() -> Self {
        Self {
            image_size: 224,
            patch_size: 16,
            width: 768,
            depth: 12,
            num_heads: 12,
            mlp_ratio: 4.0,
            layer_norm_eps: 1e-6,
        }
    }

    /// Sizes of a timm model name (`vit_{tiny,small,base,large}_patch{14,16,32}_{224,384,...}`,
    /// optional `.tag` suffix ignored). `None` for names medvlm does not know.
    pub fn from_timm_name(name: &str) -> Option<Self> {
        let base = name.split('.').next().unwrap_or(name);
        let mut parts = base.strip_prefix("vit_")?.split('_');
        let (width, depth, num_heads) = match parts.next()? {
            "tiny" => (192, 12, 3),
            "small" => (384, 12, 6),
            "base" => (768, 12, 12),
            "large" => (1024, 24, 16),
            _ => return None,
        };
        let patch_size: usize = parts.next()?.strip_prefix("patch")?.parse().ok()?;
        let image_size: usize = parts.next()?.parse().ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(Self {
            image_size,
            patch_size,
            width,
            depth,
            num_heads,
            mlp_ratio: 4.0,
            layer_norm_eps: 1e-6,
        })
    }

    /// Check internal consistency; returns the reason on failure.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.image_size.checked_rem(self.patch_size) != Some(0) {
            return Err(format!(
                "image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        if self.width.checked_rem(self.num_heads) != Some(0) {
            return Err(format!(
                "width {} is not a multiple of num_heads {}",
                self.width, self.num_heads
            ));
        }
        if self.depth == 0 || self.mlp_ratio <= 0.0 {
            return Err("depth and mlp_ratio must be > 0".into());
        }
        Ok(())
    }

    /// Number of patch tokens.
    pub fn num_patches(&self) -> usize {
        let g = self.image_size / self.patch_size;
        g * g
    }

    /// MLP hidden width.
    pub fn mlp_hidden(&self) -> usize {
        (self.width as f64 * self.mlp_ratio) as usize
    }
}

/// One pre-norm ViT block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`.
#[derive(Debug, Clone)]
pub struct TimmBlock {
    norm1: LayerNorm,
    /// `attn.qkv`: fused query/key/value projection `[3D, D]`.
    pub qkv: LinearLayer,
    /// `attn.proj`: attention output projection.
    pub proj: LinearLayer,
    norm2: LayerNorm,
    /// `mlp.fc1`.
    pub fc1: LinearLayer,
    /// `mlp.fc2`.
    pub fc2: LinearLayer,
    heads: usize,
}

impl TimmBlock {
    fn load(vb: VarBuilder, cfg: &TimmVitConfig) -> candle_core::Result<Self> {
        let d = cfg.width;
        let hidden = cfg.mlp_hidden();
        Ok(Self {
            norm1: crate::transformer::layer_norm(vb.pp("norm1"), d, cfg.layer_norm_eps)?,
            qkv: LinearLayer::load(vb.pp("attn").pp("qkv"), d, 3 * d, true)?,
            proj: LinearLayer::load(vb.pp("attn").pp("proj"), d, d, true)?,
            norm2: crate::transformer::layer_norm(vb.pp("norm2"), d, cfg.layer_norm_eps)?,
            fc1: LinearLayer::load(vb.pp("mlp").pp("fc1"), d, hidden, true)?,
            fc2: LinearLayer::load(vb.pp("mlp").pp("fc2"), hidden, d, true)?,
            heads: cfg.num_heads,
        })
    }

    fn attention(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / self.heads;
        // [B, T, 3, H, hd] -> [3, B, H, T, hd]
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((b, t, 3, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let ctx = crate::transformer::attention(
            &qkv.get(0)?,
            &qkv.get(1)?.contiguous()?,
            &qkv.get(2)?.contiguous()?,
            None,
            hd,
        )?;
        let ctx = ctx.transpose(1, 2)?.contiguous()?.reshape((b, t, d))?;
        self.proj.forward(&ctx)
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.attention(&self.norm1.forward(x)?)?)?;
        let h = crate::fused::gelu_erf(&self.fc1.forward(&self.norm2.forward(&x)?)?)?;
        x + self.fc2.forward(&h)?
    }
}

/// A timm VisionTransformer trunk (no classifier head).
#[derive(Debug, Clone)]
pub struct TimmVit {
    cfg: TimmVitConfig,
    patch_embed: Conv2d,
    cls_token: Tensor,
    pos_embed: Tensor,
    /// The blocks.
    pub blocks: Vec<TimmBlock>,
    norm: LayerNorm,
}

impl TimmVit {
    /// Load from `vb` at the trunk root (holding `cls_token`, `pos_embed`,
    /// `patch_embed.proj`, `blocks.N`, `norm`).
    pub fn load(vb: VarBuilder, cfg: &TimmVitConfig) -> candle_core::Result<Self> {
        if let Err(reason) = cfg.validate() {
            candle_core::bail!("invalid timm ViT config: {reason}")
        }
        let d = cfg.width;
        let p = cfg.patch_size;
        let conv_cfg = Conv2dConfig {
            stride: p,
            ..Default::default()
        };
        let patch_embed = candle_nn::conv2d(3, d, p, conv_cfg, vb.pp("patch_embed").pp("proj"))?;
        let cls_token = vb.get((1, 1, d), "cls_token")?;
        let pos_embed = vb.get((1, cfg.num_patches() + 1, d), "pos_embed")?;
        let blocks = (0..cfg.depth)
            .map(|i| TimmBlock::load(vb.pp("blocks").pp(i), cfg))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let norm = crate::transformer::layer_norm(vb.pp("norm"), d, cfg.layer_norm_eps)?;
        Ok(Self {
            cfg: cfg.clone(),
            patch_embed,
            cls_token,
            pos_embed,
            blocks,
            norm,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &TimmVitConfig {
        &self.cfg
    }

    /// Tokens after the final norm `[B, 1 + N_prompts + N_patches, D]` (timm's
    /// `forward_features`), with the number of prefix tokens (class + prompts).
    pub fn forward_features(
        &self,
        pixel_values: &Tensor,
        prompts: Option<&VisualPrompts>,
    ) -> Result<(Tensor, usize)> {
        let (mut x, n_prompts) = self.embed(pixel_values, prompts)?;
        for (i, block) in self.blocks.iter().enumerate() {
            if i > 0 && n_prompts > 0 {
                if let Some(Some(deep)) = prompts.and_then(|p| p.deep.get(i)) {
                    x = replace_prompt_tokens(&x, deep, 1, n_prompts)?;
                }
            }
            x = block.forward(&x)?;
        }
        Ok((self.norm.forward(&x)?, 1 + n_prompts))
    }

    /// The outputs of blocks `layers` (counted from 1 as HF's `hidden_states[k]`; timm's
    /// `blocks[k - 1]`), before the final norm, without prompts, each `[B, 1 + N, D]`
    /// (class token first); blocks after the deepest one asked are not run.
    pub fn forward_layers(&self, pixel_values: &Tensor, layers: &[usize]) -> Result<Vec<Tensor>> {
        crate::vlm::check_vision_layers(layers, self.blocks.len())?;
        let (mut x, _) = self.embed(pixel_values, None)?;
        let deepest = layers.iter().copied().max().unwrap_or(0);
        let mut states = Vec::with_capacity(deepest);
        for block in self.blocks.iter().take(deepest) {
            x = block.forward(&x)?;
            states.push(x.clone());
        }
        Ok(layers.iter().map(|&k| states[k - 1].clone()).collect())
    }

    /// The class token after the final norm for each window of patches, `[B, W, D]` (see
    /// [`crate::vlm::ImageEncoder::encode_image_windows`]).
    pub fn forward_windows(&self, pixel_values: &Tensor, windows: &[Vec<usize>]) -> Result<Tensor> {
        let (x, _) = self.embed(pixel_values, None)?;
        let b = x.dim(0)?;
        let mut x = crate::vlm::window_token_sequences(&x, 1, windows)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        let pooled = Self::pool(&self.norm.forward(&x)?)?;
        Ok(pooled.reshape((b, windows.len(), self.cfg.width))?)
    }

    /// The blocks' input (class token + patches + positions, prompts inserted) and the
    /// number of prompt tokens.
    fn embed(
        &self,
        pixel_values: &Tensor,
        prompts: Option<&VisualPrompts>,
    ) -> Result<(Tensor, usize)> {
        let dims = pixel_values.dims();
        let s = self.cfg.image_size;
        if dims.len() != 4 || dims[1] != 3 || dims[2] != s || dims[3] != s {
            return Err(ModelError::invalid(format!(
                "timm ViT expects pixel_values [B, 3, {s}, {s}], got {dims:?}"
            )));
        }
        let b = dims[0];
        let dtype = self.pos_embed.dtype();
        let x = crate::conv::patch_embedding(&self.patch_embed, &pixel_values.to_dtype(dtype)?)?;
        // [B, D, gh, gw] -> [B, N, D]
        let x = x.flatten_from(2)?.transpose(1, 2)?;
        let d = self.cfg.width;
        let cls = self.cls_token.broadcast_as((b, 1, d))?;
        let mut x = Tensor::cat(&[&cls, &x], 1)?.broadcast_add(&self.pos_embed)?;
        let mut n_prompts = 0;
        if let Some(p) = prompts {
            if let Some(shallow) = &p.shallow {
                x = insert_prompt_tokens(&x, shallow, 1)?;
                n_prompts = p.len();
            }
        }
        Ok((x, n_prompts))
    }

    /// Class-token pooling (timm `global_pool="token"`): `tokens[:, 0]`.
    pub fn pool(tokens: &Tensor) -> Result<Tensor> {
        Ok(tokens.narrow(1, 0, 1)?.squeeze(1)?)
    }

    /// Compute dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.pos_embed.dtype()
    }
}

impl LinearLayers for TimmVit {
    fn linear_layers(&self) -> Vec<&LinearLayer> {
        self.blocks
            .iter()
            .flat_map(|b| [&b.qkv, &b.proj, &b.fc1, &b.fc2])
            .collect()
    }
    fn linear_layers_mut(&mut self) -> Vec<&mut LinearLayer> {
        self.blocks
            .iter_mut()
            .flat_map(|b| [&mut b.qkv, &mut b.proj, &mut b.fc1, &mut b.fc2])
            .collect()
    }
}

/// A randomly initialised image tower (timm trunk + class-token pooling +
/// bias-free linear projection, BiomedCLIP's image encoder), for throughput and
/// memory benchmarks of the full-size architecture without a checkpoint.
///
/// The weights are plain tensors, not `Var`s: candle records the op graph of
/// every result computed from a `Var` (for backprop), which would keep all
/// activations of a forward pass alive and inflate peak memory.
#[derive(Debug, Clone)]
pub struct RandomVitTower {
    /// The trunk.
    pub vit: TimmVit,
    /// The projection to the embedding space.
    pub proj: LinearLayer,
    num_parameters: usize,
}

impl RandomVitTower {
    /// Parameters drawn from `N(0, 0.02²)` (LayerNorm weights 1, as timm
    /// initialises them), in `dtype` on `device`.
    pub fn new(
        cfg: &TimmVitConfig,
        embed_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let ((vit, proj), num_parameters) =
            crate::random_towers::build_with_random_weights(dtype, device, |vb| {
                Ok((
                    TimmVit::load(vb.pp("trunk"), cfg)?,
                    LinearLayer::load(vb.pp("head").pp("proj"), cfg.width, embed_dim, false)?,
                ))
            })?;
        Ok(Self {
            vit,
            proj,
            num_parameters,
        })
    }

    /// Number of parameters.
    pub fn num_parameters(&self) -> usize {
        self.num_parameters
    }

    /// Projected image embeddings `[B, E]` of `pixel_values` `[B, 3, S, S]`.
    pub fn embed(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (tokens, _) = self.vit.forward_features(pixel_values, None)?;
        Ok(self.proj.forward(&TimmVit::pool(&tokens)?)?)
    }
}

impl LinearLayers for RandomVitTower {
    fn linear_layers(&self) -> Vec<&LinearLayer> {
        let mut v = self.vit.linear_layers();
        v.push(&self.proj);
        v
    }
    fn linear_layers_mut(&mut self) -> Vec<&mut LinearLayer> {
        let mut v = self.vit.linear_layers_mut();
        v.push(&mut self.proj);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timm_names_resolve_to_their_sizes() {
        let b = TimmVitConfig::from_timm_name("vit_base_patch16_224").unwrap();
        assert_eq!(b, TimmVitConfig::vit_base_patch16_224());
        assert_eq!(b.num_patches(), 196);
        let l = TimmVitConfig::from_timm_name("vit_large_patch14_336.openai").unwrap();
        assert_eq!(
            (l.width, l.depth, l.patch_size, l.image_size),
            (1024, 24, 14, 336)
        );
        assert!(TimmVitConfig::from_timm_name("resnet50").is_none());
        assert!(TimmVitConfig::from_timm_name("vit_base_patch16_clip_224").is_none());
    }
}
