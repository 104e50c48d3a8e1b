//! Full-size towers with random weights, for throughput and memory benchmarks of the
//! published architectures without their checkpoints (`medvlm bench embed`).
//!
//! Each tower is built by the same `load` code that reads the real checkpoint, from tensors
//! drawn here, so a benchmark runs exactly the code a user's model runs:
//! - [`RandomTextTower::clip_b16`]: open_clip `ViT-B-16`'s text transformer (width 512,
//!   8 heads, 12 layers, context 77, vocabulary 49408, exact GELU as open_clip's non-OpenAI
//!   configs, argmax pooling) and its `text_projection` to 512 dimensions;
//! - [`RandomTextTower::pubmedbert`]: BiomedCLIP's text tower, PubMedBERT-base (width 768,
//!   12 heads, 12 layers, context 256, vocabulary 30522) with `[CLS]` pooling and the
//!   `mlp` projection 768 -> 640 -> 512.
//!
//! The weights are plain tensors, not `Var`s: candle records the op graph of every result
//! computed from a `Var` (for backprop), which would keep all activations of a forward
//! pass alive and inflate peak memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::bert::{BertConfig, BertModel, BertPooling};
use crate::biomedclip::{TextProjKind, TextProjection};
use crate::error::{ModelError, Result};
use crate::linear::{LinearLayer, LinearLayers};
use crate::openclip::{OpenClipText, OpenClipTextConfig, TextPool};
use crate::transformer::Activation;
use crate::vlm::TokenBatch;

/// Builds a model from tensors drawn as it asks for them: `N(0, 0.02²)`, layer-norm scales 1
/// (as timm and HF initialise them). Drawing on demand, rather than from a map of every
/// tensor, lets a layer that re-lays out its weight (the linear layers' inference layout)
/// free the drawn one at once, so peak memory stays one copy of the weights. Returns the
/// model and its number of parameters (each tensor name counted once).
pub fn build_with_random_weights<T>(
    dtype: DType,
    device: &Device,
    build: impl Fn(VarBuilder) -> candle_core::Result<T>,
) -> Result<(T, usize)> {
    let backend = RandomWeights::default();
    let model = build(VarBuilder::from_backend(
        Box::new(backend.clone()),
        dtype,
        device.clone(),
    ))?;
    let num_parameters = backend
        .counted
        .lock()
        .map_err(|_| ModelError::invalid("poisoned parameter count"))?
        .values()
        .sum();
    Ok((model, num_parameters))
}

/// The backend of [`build_with_random_weights`]: every `get` draws a fresh tensor and records
/// its size under its name.
#[derive(Clone, Default)]
struct RandomWeights {
    counted: Arc<Mutex<HashMap<String, usize>>>,
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _hint: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let is_norm_scale = (name.contains("norm") || name.contains("ln_"))
            && (name.ends_with("weight") || name.ends_with("gamma"));
        let t = if is_norm_scale {
            Tensor::ones(shape, dtype, device)?
        } else {
            Tensor::randn(0f32, 0.02, shape, device)?.to_dtype(dtype)?
        };
        self.counted
            .lock()
            .map_err(|_| candle_core::Error::Msg("poisoned parameter count".into()))?
            .insert(name.to_string(), t.elem_count());
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for {name}")
    }

    // As an empty `VarMap` answers: optional tensors are absent, so the model takes the same
    // branches as when it is built from scratch.
    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}

/// A text tower with random weights (see the module documentation).
#[derive(Debug)]
pub enum RandomTextTower {
    /// open_clip's text transformer with its projection.
    OpenClip(OpenClipText),
    /// BERT with a pooling rule and a projection (BiomedCLIP's text tower).
    Bert {
        /// The transformer.
        bert: Box<BertModel>,
        /// The projection of the pooled state.
        proj: TextProjection,
        /// The pooling rule.
        pooling: BertPooling,
        /// Context length.
        context: usize,
        /// Vocabulary size.
        vocab: usize,
    },
}

/// open_clip's `ViT-B-16` text configuration.
pub fn openclip_b16_text_config() -> OpenClipTextConfig {
    OpenClipTextConfig {
        context_length: 77,
        vocab_size: 49408,
        width: 512,
        heads: 8,
        layers: 12,
        mlp_ratio: 4.0,
        pool: TextPool::Argmax,
    }
}

impl RandomTextTower {
    /// open_clip `ViT-B-16`'s text tower, projecting to `embed_dim` (512 in the published
    /// model). Returns the tower and its number of parameters.
    pub fn clip_b16(embed_dim: usize, dtype: DType, device: &Device) -> Result<(Self, usize)> {
        let cfg = openclip_b16_text_config();
        let (text, n) = build_with_random_weights(dtype, device, |vb| {
            OpenClipText::load(vb, &cfg, embed_dim, Activation::Gelu)
        })?;
        Ok((Self::OpenClip(text), n))
    }

    /// BiomedCLIP's PubMedBERT text tower with its `mlp` projection to `embed_dim` (512 in
    /// the published model). Returns the tower and its number of parameters.
    pub fn pubmedbert(embed_dim: usize, dtype: DType, device: &Device) -> Result<(Self, usize)> {
        let cfg = BertConfig::pubmedbert_base();
        let (tower, n) = build_with_random_weights(dtype, device, |vb| {
            let bert = BertModel::load(vb.pp("transformer"), &cfg, false)?;
            let proj =
                TextProjection::load(vb.pp("proj"), TextProjKind::Mlp, cfg.hidden_size, embed_dim)?;
            Ok(Self::Bert {
                bert: Box::new(bert),
                proj,
                pooling: BertPooling::Cls,
                context: 256,
                vocab: cfg.vocab_size,
            })
        })?;
        Ok((tower, n))
    }

    /// The context length of the published model (77 or 256).
    pub fn context_length(&self) -> usize {
        match self {
            Self::OpenClip(t) => t.context_length(),
            Self::Bert { context, .. } => *context,
        }
    }

    /// The vocabulary size.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::OpenClip(t) => t.vocab_size(),
            Self::Bert { vocab, .. } => *vocab,
        }
    }

    /// A batch of `batch` texts filling the whole context: random token ids, the last
    /// position holding the highest id (open_clip pools at the argmax, its end-of-text
    /// token), every position attended. Deterministic in `seed`.
    pub fn full_context_batch(
        &self,
        batch: usize,
        seed: u64,
        device: &Device,
    ) -> Result<TokenBatch> {
        let l = self.context_length();
        let v = self.vocab_size() as u64;
        // SplitMix64: any fixed spread of ids will do, the cost does not depend on them.
        let mut state = seed;
        let mut next = || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let mut ids = Vec::with_capacity(batch * l);
        for _ in 0..batch {
            ids.extend((0..l - 1).map(|_| (1 + next() % (v - 2)) as u32));
            ids.push((v - 1) as u32);
        }
        Ok(TokenBatch {
            input_ids: Tensor::from_vec(ids, (batch, l), device)?,
            attention_mask: Tensor::ones((batch, l), DType::U32, device)?,
        })
    }

    /// Projected text embeddings `[B, E]`.
    pub fn embed(&self, tokens: &TokenBatch) -> Result<Tensor> {
        match self {
            Self::OpenClip(t) => Ok(t.forward(tokens, None)?.embeds),
            Self::Bert {
                bert,
                proj,
                pooling,
                ..
            } => {
                let mask = &tokens.attention_mask;
                let h = bert.forward(&tokens.input_ids, Some(mask), None)?;
                let pooled = bert.pool(&h, Some(mask), *pooling)?;
                Ok(proj.forward(&pooled)?)
            }
        }
    }
}

impl LinearLayers for RandomTextTower {
    fn linear_layers(&self) -> Vec<&LinearLayer> {
        match self {
            Self::OpenClip(t) => {
                let mut v = t.encoder.linears();
                v.push(&t.projection);
                v
            }
            Self::Bert { bert, proj, .. } => {
                let mut v = bert.linear_layers();
                match proj {
                    TextProjection::Mlp(a, b) => v.extend([a, b]),
                    TextProjection::Linear(l) => v.push(l),
                    TextProjection::Identity => {}
                }
                v
            }
        }
    }
    fn linear_layers_mut(&mut self) -> Vec<&mut LinearLayer> {
        match self {
            Self::OpenClip(t) => {
                let mut v = t.encoder.linears_mut();
                v.push(&mut t.projection);
                v
            }
            Self::Bert { bert, proj, .. } => {
                let mut v = bert.linear_layers_mut();
                match proj {
                    TextProjection::Mlp(a, b) => v.extend([a, b]),
                    TextProjection::Linear(l) => v.push(l),
                    TextProjection::Identity => {}
                }
                v
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_weights_follow_the_declared_shapes_and_norm_scales_are_one() {
        let dev = Device::Cpu;
        let cfg = OpenClipTextConfig {
            context_length: 6,
            vocab_size: 20,
            width: 8,
            heads: 2,
            layers: 1,
            mlp_ratio: 2.0,
            pool: TextPool::Argmax,
        };
        let (text, n) = build_with_random_weights(DType::F32, &dev, |vb| {
            OpenClipText::load(vb, &cfg, 4, Activation::Gelu)
        })
        .unwrap();
        // token 20x8 + positions 6x8 + in_proj 24x8+24 + out_proj 8x8+8 + c_fc 16x8+16
        // + c_proj 8x16+8 + ln_1, ln_2, ln_final 3x(8+8) + text_projection 8x4.
        let expected = 160 + 48 + (192 + 24) + (64 + 8) + (128 + 16) + (128 + 8) + 3 * 16 + 32;
        assert_eq!(n, expected);
        let tower = RandomTextTower::OpenClip(text);
        let tokens = tower.full_context_batch(3, 1, &dev).unwrap();
        let ids: Vec<Vec<u32>> = tokens.input_ids.to_vec2().unwrap();
        assert!(ids
            .iter()
            .all(|r| r.len() == 6 && r[5] == 19 && r[..5].iter().all(|&t| t < 19)));
        let e = tower.embed(&tokens).unwrap();
        assert_eq!(e.dims(), &[3, 4]);
        // Random weights: different texts give different embeddings.
        let e: Vec<Vec<f32>> = e.to_vec2().unwrap();
        assert!(e[0].iter().zip(&e[1]).any(|(a, b)| (a - b).abs() > 1e-4));
    }
}
