//! BERT text encoder (Devlin et al. 2019, "BERT: Pre-training of Deep
//! Bidirectional Transformers for Language Understanding"), in the Hugging Face
//! `BertModel` checkpoint layout.
//!
//! Used as
//! - the text tower of BiomedCLIP (PubMedBERT, CLS pooling + MLP projection,
//!   see [`crate::biomedclip`]);
//! - a standalone sentence/report encoder for CXR-BERT, BioClinicalBERT,
//!   PubMedBERT or MiniLM-style checkpoints ([`BertTextEncoder`]), with CLS or
//!   mean pooling (mean over the attention mask, as sentence-transformers does).
//!
//! Semantics follow `transformers.BertModel` exactly: embeddings are
//! `word + absolute position + token type`, then LayerNorm; each layer is
//! post-norm self-attention (additive mask: padded keys get the dtype's
//! lowest value) followed by a post-norm MLP with the configured activation
//! (`"gelu"` is the exact erf GELU). The optional pooler is `tanh(W h_cls + b)`.
//!
//! Every attention projection (query, key, value, output dense) and MLP layer
//! (intermediate dense, output dense) is a [`LinearLayer`] addressable by its
//! checkpoint path, so LoRA / adapters can wrap it. Prompt learning replaces
//! input word embeddings through [`BertModel::forward_embeds`].

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, VarBuilder};

use crate::transformer::LayerNorm;
use serde::Deserialize;

use crate::error::{ModelError, Result};
use crate::linear::{LinearLayer, LinearLayers};
use crate::weights::{LoadMode, WeightFile, DEFAULT_IGNORED};

/// Activation of the BERT MLP, from `hidden_act` in config.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum BertActivation {
    /// Exact GELU, `x Φ(x)` with the erf (HF `"gelu"`).
    #[serde(rename = "gelu")]
    Gelu,
    /// tanh approximation of GELU (HF `"gelu_new"`, `"gelu_pytorch_tanh"`).
    #[serde(alias = "gelu_new", alias = "gelu_pytorch_tanh", rename = "gelu_tanh")]
    GeluTanh,
    /// ReLU.
    #[serde(rename = "relu")]
    Relu,
}

impl BertActivation {
    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            BertActivation::Gelu => crate::fused::gelu_erf(x),
            BertActivation::GeluTanh => x.gelu(),
            BertActivation::Relu => x.relu(),
        }
    }
}

fn default_act() -> BertActivation {
    BertActivation::Gelu
}
fn default_eps() -> f64 {
    1e-12
}
fn default_type_vocab() -> usize {
    2
}
fn default_position_type() -> String {
    "absolute".into()
}

/// BERT hyper-parameters, read from a Hugging Face `config.json`.
///
/// Defaults (when a key is absent) are those of `transformers.BertConfig`:
/// `hidden_act = "gelu"`, `layer_norm_eps = 1e-12`, `type_vocab_size = 2`,
/// `pad_token_id = 0`, `position_embedding_type = "absolute"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    /// Vocabulary size (rows of the word-embedding table).
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer (`hidden_size` must be a multiple).
    pub num_attention_heads: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// MLP activation.
    #[serde(default = "default_act")]
    pub hidden_act: BertActivation,
    /// Longest supported sequence (rows of the position-embedding table).
    pub max_position_embeddings: usize,
    /// Number of token types (segments).
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Id of the padding token (open_clip derives the attention mask from it).
    #[serde(default)]
    pub pad_token_id: u32,
    /// Only `"absolute"` is supported.
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
}

impl BertConfig {
    /// PubMedBERT / BiomedBERT base (uncased, abstract vocabulary): the text
    /// tower of BiomedCLIP. BERT-base sizes with a 30522-token vocabulary.
    pub fn pubmedbert_base() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: BertActivation::Gelu,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            position_embedding_type: "absolute".into(),
        }
    }

    /// Known Hugging Face model names whose config medvlm knows without a
    /// config.json (used for open_clip configs that only name the HF model).
    pub fn from_hf_name(name: &str) -> Option<Self> {
        let n = name.to_ascii_lowercase();
        (n.contains("pubmedbert") || n.contains("biomedbert") || n.contains("bert-base-uncased"))
            .then(Self::pubmedbert_base)
    }

    /// Parse a config.json file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| ModelError::config(path, e))?;
        cfg.validate().map_err(|r| ModelError::config(path, r))?;
        Ok(cfg)
    }

    /// Check internal consistency; returns the reason on failure.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.hidden_size.checked_rem(self.num_attention_heads) != Some(0) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.position_embedding_type != "absolute" {
            return Err(format!(
                "position_embedding_type {:?} is not supported (only \"absolute\")",
                self.position_embedding_type
            ));
        }
        if self.vocab_size == 0 || self.max_position_embeddings == 0 || self.type_vocab_size == 0 {
            return Err(
                "vocab_size, max_position_embeddings and type_vocab_size must be > 0".into(),
            );
        }
        Ok(())
    }

    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// How a sentence embedding is read from the last hidden states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BertPooling {
    /// Hidden state of the first ([CLS]) token (open_clip's
    /// `cls_last_hidden_state_pooler`, CXR-BERT's default).
    #[default]
    Cls,
    /// Mean of the hidden states over the attention mask (sentence-transformers'
    /// default, e.g. all-MiniLM-L6-v2).
    Mean,
    /// The trained pooler, `tanh(W h_cls + b)` (open_clip's `cls_pooler`);
    /// needs `pooler.dense` in the checkpoint.
    Pooler,
}

impl std::str::FromStr for BertPooling {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cls" | "cls_last_hidden_state_pooler" => Ok(BertPooling::Cls),
            "mean" | "mean_pooler" => Ok(BertPooling::Mean),
            "pooler" | "cls_pooler" => Ok(BertPooling::Pooler),
            other => Err(ModelError::invalid(format!(
                "unknown BERT pooling {other:?} (expected cls, mean or pooler)"
            ))),
        }
    }
}

/// Value added to attention scores of padded keys: the dtype's lowest finite
/// value, as `transformers` does (finite, so a fully padded row stays defined).
pub(crate) fn mask_value(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => -65504.0,
        DType::BF16 => -3.38e38,
        _ => f32::MIN as f64,
    }
}

/// Additive attention bias `[B, 1, 1, L]` from a 0/1 mask `[B, L]` (any dtype).
pub fn additive_mask(mask: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    let (b, l) = mask.dims2()?;
    let keep = mask.to_dtype(DType::F32)?;
    // (1 - keep) * lowest: 0 where attended, lowest where padded.
    let bias = ((keep.ones_like()? - keep)? * mask_value(dtype))?;
    bias.to_dtype(dtype)?.reshape((b, 1, 1, l))
}

/// Word, position and token-type embeddings followed by LayerNorm.
#[derive(Debug, Clone)]
pub struct BertEmbeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    layer_norm: LayerNorm,
    max_positions: usize,
}

impl BertEmbeddings {
    fn load(vb: VarBuilder, cfg: &BertConfig) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            word: candle_nn::embedding(cfg.vocab_size, h, vb.pp("word_embeddings"))?,
            position: candle_nn::embedding(
                cfg.max_position_embeddings,
                h,
                vb.pp("position_embeddings"),
            )?,
            token_type: candle_nn::embedding(
                cfg.type_vocab_size,
                h,
                vb.pp("token_type_embeddings"),
            )?,
            layer_norm: crate::transformer::layer_norm(vb.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            max_positions: cfg.max_position_embeddings,
        })
    }

    /// The word-embedding table `[vocab, hidden]`.
    pub fn word_table(&self) -> &Tensor {
        self.word.embeddings()
    }

    /// Look up word embeddings of `input_ids` `[B, L]` → `[B, L, H]`.
    pub fn words(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        self.word.forward(input_ids)
    }

    /// Add position and token-type embeddings to word embeddings `[B, L, H]`, then LayerNorm.
    fn finish(
        &self,
        word_embeds: &Tensor,
        token_type_ids: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (b, l, _) = word_embeds.dims3()?;
        if l > self.max_positions {
            candle_core::bail!(
                "sequence of {l} tokens exceeds max_position_embeddings {}",
                self.max_positions
            )
        }
        let device = word_embeds.device();
        let positions = Tensor::arange(0u32, l as u32, device)?;
        let pos = self.position.forward(&positions)?.unsqueeze(0)?;
        let types = match token_type_ids {
            Some(t) => self.token_type.forward(t)?,
            None => {
                let zeros = Tensor::zeros((b, l), DType::U32, device)?;
                self.token_type.forward(&zeros)?
            }
        };
        let x = word_embeds.broadcast_add(&pos)?.add(&types)?;
        self.layer_norm.forward(&x)
    }
}

/// One post-norm transformer layer of BERT.
#[derive(Debug, Clone)]
pub struct BertLayer {
    /// `attention.self.query`.
    pub query: LinearLayer,
    /// `attention.self.key`.
    pub key: LinearLayer,
    /// `attention.self.value`.
    pub value: LinearLayer,
    /// `attention.output.dense`.
    pub attn_out: LinearLayer,
    attn_norm: LayerNorm,
    /// `intermediate.dense` (MLP up-projection).
    pub intermediate: LinearLayer,
    /// `output.dense` (MLP down-projection).
    pub output: LinearLayer,
    out_norm: LayerNorm,
    heads: usize,
    head_dim: usize,
    act: BertActivation,
}

impl BertLayer {
    fn load(vb: VarBuilder, cfg: &BertConfig) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let att = vb.pp("attention");
        let sa = att.pp("self");
        Ok(Self {
            query: LinearLayer::load(sa.pp("query"), h, h, true)?,
            key: LinearLayer::load(sa.pp("key"), h, h, true)?,
            value: LinearLayer::load(sa.pp("value"), h, h, true)?,
            attn_out: LinearLayer::load(att.pp("output").pp("dense"), h, h, true)?,
            attn_norm: crate::transformer::layer_norm(
                att.pp("output").pp("LayerNorm"),
                h,
                cfg.layer_norm_eps,
            )?,
            intermediate: LinearLayer::load(
                vb.pp("intermediate").pp("dense"),
                h,
                cfg.intermediate_size,
                true,
            )?,
            output: LinearLayer::load(vb.pp("output").pp("dense"), cfg.intermediate_size, h, true)?,
            out_norm: crate::transformer::layer_norm(
                vb.pp("output").pp("LayerNorm"),
                h,
                cfg.layer_norm_eps,
            )?,
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
            act: cfg.hidden_act,
        })
    }

    /// `x` `[B, L, H]`, `bias` additive mask `[B, 1, 1, L]`.
    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, l, h) = x.dims3()?;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, l, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.query.forward(x)?)?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        let ctx = crate::transformer::attention(&q, &k, &v, bias, self.head_dim)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, l, h))?;
        let attn = self
            .attn_norm
            .forward(&(self.attn_out.forward(&ctx)? + x)?)?;
        let mid = self.act.apply(&self.intermediate.forward(&attn)?)?;
        self.out_norm.forward(&(self.output.forward(&mid)? + attn)?)
    }
}

/// A Hugging Face `BertModel`: embeddings, encoder layers and the optional pooler.
#[derive(Debug, Clone)]
pub struct BertModel {
    cfg: BertConfig,
    /// Embedding block.
    pub embeddings: BertEmbeddings,
    /// Encoder layers.
    pub layers: Vec<BertLayer>,
    /// `pooler.dense`, when the checkpoint has it.
    pub pooler: Option<LinearLayer>,
}

impl BertModel {
    /// Load from `vb` positioned at the model root (the level that holds
    /// `embeddings.`, `encoder.` and optionally `pooler.`).
    pub fn load(vb: VarBuilder, cfg: &BertConfig, with_pooler: bool) -> candle_core::Result<Self> {
        if let Err(reason) = cfg.validate() {
            candle_core::bail!("invalid BERT config: {reason}")
        }
        let embeddings = BertEmbeddings::load(vb.pp("embeddings"), cfg)?;
        let enc = vb.pp("encoder").pp("layer");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| BertLayer::load(enc.pp(i), cfg))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let pooler = if with_pooler {
            let h = cfg.hidden_size;
            Some(LinearLayer::load(vb.pp("pooler").pp("dense"), h, h, true)?)
        } else {
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            embeddings,
            layers,
            pooler,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// Attention mask `[B, L]` (u32 0/1) derived from padding: `ids != pad_token_id`,
    /// as open_clip's HFTextEncoder does.
    pub fn pad_mask(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        input_ids
            .ne(self.cfg.pad_token_id as f64)?
            .to_dtype(DType::U32)
    }

    /// Last hidden states `[B, L, H]` of `input_ids` `[B, L]` (u32 or i64).
    ///
    /// `attention_mask` `[B, L]` (1 = attend, 0 = padding; any dtype) defaults to
    /// all ones, `token_type_ids` `[B, L]` to zeros.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        token_type_ids: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let ids = input_ids.to_dtype(DType::U32)?;
        let words = self.embeddings.words(&ids)?;
        self.forward_embeds(&words, attention_mask, token_type_ids)
    }

    /// Last hidden states from word embeddings `[B, L, H]` instead of ids: the
    /// prompt-learning entry point (CoOp, Zhou et al. 2022, "Learning to Prompt
    /// for Vision-Language Models"): look up [`BertEmbeddings::words`], replace
    /// some positions by learned context vectors, and call this. Position and
    /// token-type embeddings and the LayerNorm are applied here, as in HF's
    /// `inputs_embeds`.
    pub fn forward_embeds(
        &self,
        word_embeds: &Tensor,
        attention_mask: Option<&Tensor>,
        token_type_ids: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let types = token_type_ids.map(|t| t.to_dtype(DType::U32)).transpose()?;
        let mut x = self.embeddings.finish(word_embeds, types.as_ref())?;
        let bias = attention_mask
            .map(|m| additive_mask(m, x.dtype()))
            .transpose()?;
        for layer in &self.layers {
            x = layer.forward(&x, bias.as_ref())?;
        }
        Ok(x)
    }

    /// Pool last hidden states `[B, L, H]` into `[B, H]`.
    ///
    /// Mean pooling divides by the number of attended tokens (clamped at 1e-9, as
    /// sentence-transformers does); without a mask it averages all tokens.
    pub fn pool(
        &self,
        hidden: &Tensor,
        attention_mask: Option<&Tensor>,
        pooling: BertPooling,
    ) -> candle_core::Result<Tensor> {
        match pooling {
            BertPooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1),
            BertPooling::Mean => mean_pool(hidden, attention_mask),
            BertPooling::Pooler => {
                let Some(pooler) = &self.pooler else {
                    candle_core::bail!("pooling \"pooler\" needs pooler.dense weights, which this BERT checkpoint lacks")
                };
                pooler.forward(&hidden.narrow(1, 0, 1)?.squeeze(1)?)?.tanh()
            }
        }
    }
}

/// Mean of `hidden` `[B, L, H]` over a 0/1 mask `[B, L]` (all tokens without a mask).
pub fn mean_pool(hidden: &Tensor, attention_mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
    match attention_mask {
        None => hidden.mean(1),
        Some(m) => {
            let m = m.to_dtype(hidden.dtype())?.unsqueeze(D::Minus1)?;
            let summed = hidden.broadcast_mul(&m)?.sum(1)?;
            let count = m.sum(1)?.clamp(1e-9, f64::INFINITY)?;
            summed.broadcast_div(&count)
        }
    }
}

impl LinearLayers for BertModel {
    fn linear_layers(&self) -> Vec<&LinearLayer> {
        let mut v = Vec::with_capacity(self.layers.len() * 6 + 1);
        for l in &self.layers {
            v.extend([
                &l.query,
                &l.key,
                &l.value,
                &l.attn_out,
                &l.intermediate,
                &l.output,
            ]);
        }
        v.extend(self.pooler.as_ref());
        v
    }
    fn linear_layers_mut(&mut self) -> Vec<&mut LinearLayer> {
        let mut v = Vec::with_capacity(self.layers.len() * 6 + 1);
        for l in &mut self.layers {
            v.extend([
                &mut l.query,
                &mut l.key,
                &mut l.value,
                &mut l.attn_out,
                &mut l.intermediate,
                &mut l.output,
            ]);
        }
        v.extend(self.pooler.as_mut());
        v
    }
}

/// Where the BERT tensors sit in a checkpoint: `""` (plain `BertModel`) or
/// `"bert."` (`BertForPreTraining` / `BertForMaskedLM`-style checkpoints, e.g.
/// PubMedBERT, BioClinicalBERT). Returns the prefix and whether a pooler is present.
pub fn detect_bert_prefix(file: &WeightFile) -> Result<(String, bool)> {
    let names: Vec<&str> = file.tensors().map(|(n, _, _)| n).collect();
    for prefix in ["", "bert.", "model.", "text.transformer."] {
        let key = format!("{prefix}embeddings.word_embeddings.weight");
        if names.contains(&key.as_str()) {
            let pooler = format!("{prefix}pooler.dense.weight");
            return Ok((prefix.to_string(), names.contains(&pooler.as_str())));
        }
    }
    Err(ModelError::Weights {
        path: file.path().to_path_buf(),
        reason: "no BERT word embeddings found (looked for embeddings.word_embeddings.weight, \
                 optionally under bert., model. or text.transformer.)"
            .into(),
    })
}

/// A standalone BERT sentence encoder (CXR-BERT, BioClinicalBERT, MiniLM, ...):
/// a [`BertModel`] plus a pooling rule, loaded from a Hugging Face folder.
#[derive(Debug, Clone)]
pub struct BertTextEncoder {
    /// The transformer.
    pub model: BertModel,
    /// Pooling used by [`BertTextEncoder::embed`].
    pub pooling: BertPooling,
    weights_path: PathBuf,
}

impl BertTextEncoder {
    /// Load `dir/config.json` and `dir/model.safetensors` (or, failing that,
    /// `dir/pytorch_model.bin`). Tensors may sit under a `bert.` prefix; heads of
    /// pre-training checkpoints (`cls.*`) are ignored, every other unused or
    /// missing tensor is an error listing them.
    pub fn from_dir(
        dir: &Path,
        pooling: BertPooling,
        dtype: DType,
        device: &Device,
        mode: &LoadMode,
    ) -> Result<Self> {
        let cfg = BertConfig::from_file(&dir.join("config.json"))?;
        let weights = ["model.safetensors", "pytorch_model.bin"]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.is_file())
            .ok_or_else(|| ModelError::MissingFile {
                path: dir.join("model.safetensors"),
                reason: "no BERT weights (model.safetensors or pytorch_model.bin) in the folder"
                    .into(),
            })?;
        let file = WeightFile::open(&weights)?;
        Self::from_weights(&file, &cfg, pooling, dtype, device, mode)
    }

    /// Load from an opened weight file and a config.
    pub fn from_weights(
        file: &WeightFile,
        cfg: &BertConfig,
        pooling: BertPooling,
        dtype: DType,
        device: &Device,
        mode: &LoadMode,
    ) -> Result<Self> {
        let (prefix, has_pooler) = detect_bert_prefix(file)?;
        if pooling == BertPooling::Pooler && !has_pooler {
            return Err(ModelError::Weights {
                path: file.path().to_path_buf(),
                reason: "pooling \"pooler\" requested but the checkpoint has no pooler.dense"
                    .into(),
            });
        }
        let mut ignore: Vec<&str> = DEFAULT_IGNORED.to_vec();
        // Pre-training heads (MLM / NSP) and the pooler when unused are not part of the encoder.
        ignore.push("cls.");
        let pooler_pattern = format!("{prefix}pooler.");
        let use_pooler = has_pooler;
        if !use_pooler {
            ignore.push(pooler_pattern.as_str());
        }
        let model = file.load(dtype, device, mode, &ignore, |vb| {
            let vb = if prefix.is_empty() {
                vb
            } else {
                vb.pp(prefix.trim_end_matches('.'))
            };
            BertModel::load(vb, cfg, use_pooler)
        })?;
        Ok(Self {
            model,
            pooling,
            weights_path: file.path().to_path_buf(),
        })
    }

    /// The weight file this encoder was loaded from.
    pub fn weights_path(&self) -> &Path {
        &self.weights_path
    }

    /// Pooled sentence embeddings `[B, H]` (not normalised) of `input_ids` `[B, L]`
    /// with attention mask `[B, L]` (padding derived from `pad_token_id` if `None`).
    pub fn embed(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let mask = match attention_mask {
            Some(m) => m.clone(),
            None => self.model.pad_mask(input_ids)?,
        };
        let hidden = self.model.forward(input_ids, Some(&mask), None)?;
        self.model.pool(&hidden, Some(&mask), self.pooling)
    }
}
