//! GPT-2 causal language model (Radford et al. 2019, "Language Models are Unsupervised
//! Multitask Learners"), in the Hugging Face `GPT2LMHeadModel` checkpoint layout: the report
//! decoder of report generation (ClipCap's prefix mapping, Mokady et al. 2021, feeds image
//! features as prefix embeddings through [`Gpt2LmHeadModel::forward_embeds`]).
//!
//! Semantics follow `transformers.GPT2LMHeadModel`: token + learned absolute position
//! embeddings; pre-norm blocks `x + attn(ln_1(x))`, `x + mlp(ln_2(x))`; causal self-attention
//! scaled by `1/sqrt(head_dim)` with padded keys masked; the MLP is `c_fc -> gelu_new (tanh
//! GELU) -> c_proj`; a final `ln_f`; the LM head is the token embedding transposed (tied, the
//! GPT-2 default) or a separate `lm_head.weight`. The projections are GPT-2's `Conv1D`, whose
//! weight is stored `[in, out]` and applied as `x W + b`; they are kept in that layout so a
//! model loaded as trainable `Var`s updates in place.
//!
//! Checkpoints come in two layouts, both read: `transformer.*` keys (what
//! `GPT2LMHeadModel.save_pretrained` writes) and bare `GPT2Model` keys (`wte.weight`,
//! `h.0.attn.c_attn.weight`, ...; the original `openai-community/gpt2` files).
//!
//! Decoding ([`Gpt2LmHeadModel::greedy`], [`Gpt2LmHeadModel::beam_search`]) recomputes the
//! whole sequence at each step (no key/value cache): reports are tens of tokens, and the
//! decoders medvlm trains are small.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::error::{ModelError, Result};
use crate::transformer::{layer_norm, LayerNorm};
use crate::weights::{LoadMode, WeightFile, DEFAULT_IGNORED};

fn default_activation() -> String {
    "gelu_new".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}

/// `config.json` of a GPT-2 checkpoint (the keys medvlm reads; others are ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Gpt2Config {
    /// Token vocabulary size.
    pub vocab_size: usize,
    /// Longest sequence (learned position embeddings).
    pub n_positions: usize,
    /// Model width.
    pub n_embd: usize,
    /// Number of blocks.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// MLP width (`None`: 4 x `n_embd`).
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// MLP activation: `gelu_new` (GPT-2's tanh GELU), `gelu_pytorch_tanh` or `gelu`.
    #[serde(default = "default_activation")]
    pub activation_function: String,
    /// Layer-norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// Beginning-of-sequence token.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token (GPT-2: `<|endoftext|>`, also its beginning).
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// Attention scores divided by `sqrt(head_dim)` (GPT-2: true).
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    /// Scores further divided by the layer index + 1 (a GPT-2 variant; refused).
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// LM head tied to the token embedding (GPT-2: true).
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// Cross-attention blocks (encoder-decoder use; refused).
    #[serde(default)]
    pub add_cross_attention: bool,
}

impl Gpt2Config {
    /// Read and check `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::MissingFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        cfg.validate().map_err(|reason| ModelError::Config {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(cfg)
    }

    /// Whether the settings describe a model this module computes exactly.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.n_embd == 0 || self.n_head == 0 || self.n_layer == 0 || self.vocab_size == 0 {
            return Err("n_embd, n_head, n_layer and vocab_size must be positive".into());
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(format!(
                "n_embd {} is not a multiple of n_head {}",
                self.n_embd, self.n_head
            ));
        }
        if self.n_positions == 0 {
            return Err("n_positions must be positive".into());
        }
        if self.add_cross_attention {
            return Err(
                "add_cross_attention = true (an encoder-decoder GPT-2) is not supported".into(),
            );
        }
        if self.scale_attn_by_inverse_layer_idx {
            return Err("scale_attn_by_inverse_layer_idx = true is not supported".into());
        }
        if !matches!(
            self.activation_function.as_str(),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" | "gelu"
        ) {
            return Err(format!(
                "activation_function {:?}: expected gelu_new, gelu_pytorch_tanh, gelu_fast or gelu",
                self.activation_function
            ));
        }
        Ok(())
    }

    /// A small decoder for training from scratch: `vocab_size` tokens, `width`, `layers`,
    /// `heads`, `n_positions` positions; GPT-2's other defaults.
    pub fn small(
        vocab_size: usize,
        n_positions: usize,
        width: usize,
        layers: usize,
        heads: usize,
    ) -> Self {
        Self {
            vocab_size,
            n_positions,
            n_embd: width,
            n_layer: layers,
            n_head: heads,
            n_inner: None,
            activation_function: default_activation(),
            layer_norm_epsilon: default_eps(),
            bos_token_id: None,
            eos_token_id: None,
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            tie_word_embeddings: true,
            add_cross_attention: false,
        }
    }

    /// MLP width.
    pub fn inner_dim(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }
}

/// Initialisation of a decoder trained from scratch (a checkpoint's values replace it):
/// GPT-2's normal(0, 0.02) for embeddings and projections; biases 0, layer norms 1 and 0.
const GPT2_INIT: candle_nn::Init = crate::transformer::EMBED_INIT;

/// GPT-2's `Conv1D`: `y = x W + b` with `W` stored `[in, out]`.
#[derive(Debug, Clone)]
pub struct Conv1D {
    weight: Tensor,
    bias: Tensor,
}

impl Conv1D {
    /// Load `weight` `[in, out]` and `bias` `[out]` under `vb`.
    pub fn load(vb: VarBuilder, n_in: usize, n_out: usize) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints((n_in, n_out), "weight", GPT2_INIT)?,
            bias: vb.get_with_hints(n_out, "bias", candle_nn::Init::Const(0.0))?,
        })
    }
}

impl Module for Conv1D {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.broadcast_matmul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// Causal multi-head self-attention.
#[derive(Debug, Clone)]
struct Attention {
    c_attn: Conv1D,
    c_proj: Conv1D,
    n_head: usize,
    scale: f64,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &Gpt2Config) -> candle_core::Result<Self> {
        let e = cfg.n_embd;
        let head_dim = e / cfg.n_head;
        Ok(Self {
            c_attn: Conv1D::load(vb.pp("c_attn"), e, 3 * e)?,
            c_proj: Conv1D::load(vb.pp("c_proj"), e, e)?,
            n_head: cfg.n_head,
            scale: if cfg.scale_attn_weights {
                1.0 / (head_dim as f64).sqrt()
            } else {
                1.0
            },
        })
    }

    /// `x` `[B, T, E]`, `bias` the additive mask `[B, 1, T, T]`.
    fn forward(&self, x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, e) = x.dims3()?;
        let d = e / self.n_head;
        let qkv = self.c_attn.forward(x)?;
        let heads = |i: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(D::Minus1, i * e, e)?
                .reshape((b, t, self.n_head, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
        let scores = (q.matmul(&k.t()?)? * self.scale)?.broadcast_add(bias)?;
        let probs = crate::transformer::softmax_last_dim(&scores)?;
        let y = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, e))?;
        self.c_proj.forward(&y)
    }
}

#[derive(Debug, Clone)]
struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    c_fc: Conv1D,
    c_proj: Conv1D,
    exact_gelu: bool,
}

impl Block {
    fn load(vb: VarBuilder, cfg: &Gpt2Config) -> candle_core::Result<Self> {
        let (e, inner) = (cfg.n_embd, cfg.inner_dim());
        Ok(Self {
            ln_1: layer_norm(vb.pp("ln_1"), e, cfg.layer_norm_epsilon)?,
            attn: Attention::load(vb.pp("attn"), cfg)?,
            ln_2: layer_norm(vb.pp("ln_2"), e, cfg.layer_norm_epsilon)?,
            c_fc: Conv1D::load(vb.pp("mlp").pp("c_fc"), e, inner)?,
            c_proj: Conv1D::load(vb.pp("mlp").pp("c_proj"), inner, e)?,
            exact_gelu: cfg.activation_function == "gelu",
        })
    }

    fn forward(&self, x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln_1.forward(x)?, bias)?)?;
        let h = self.c_fc.forward(&self.ln_2.forward(&x)?)?;
        let h = if self.exact_gelu {
            crate::fused::gelu_erf(&h)?
        } else {
            h.gelu()?
        };
        x + self.c_proj.forward(&h)?
    }
}

/// The GPT-2 transformer (`GPT2Model`): embeddings, blocks and the final layer norm.
#[derive(Debug, Clone)]
pub struct Gpt2Model {
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    cfg: Gpt2Config,
}

impl Gpt2Model {
    /// Load from `vb` at the `GPT2Model` root (`wte`, `wpe`, `h.N`, `ln_f`).
    pub fn load(vb: VarBuilder, cfg: &Gpt2Config) -> candle_core::Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        Ok(Self {
            wte: vb.get_with_hints((cfg.vocab_size, cfg.n_embd), "wte.weight", GPT2_INIT)?,
            wpe: vb.get_with_hints((cfg.n_positions, cfg.n_embd), "wpe.weight", GPT2_INIT)?,
            blocks: (0..cfg.n_layer)
                .map(|i| Block::load(vb.pp("h").pp(i.to_string()), cfg))
                .collect::<candle_core::Result<_>>()?,
            ln_f: layer_norm(vb.pp("ln_f"), cfg.n_embd, cfg.layer_norm_epsilon)?,
            cfg: cfg.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Gpt2Config {
        &self.cfg
    }

    /// The token embedding table `[V, E]`.
    pub fn token_embedding(&self) -> &Tensor {
        &self.wte
    }

    /// Token embeddings `[B, T, E]` of `input_ids` `[B, T]`.
    pub fn embed_tokens(&self, input_ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        self.wte
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.n_embd))
    }

    /// Final hidden states `[B, T, E]` (after `ln_f`) of input embeddings `[B, T, E]`
    /// (positions 0..T added here); `attention_mask` `[B, T]` (1 = token, 0 = padding).
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, e) = embeds.dims3()?;
        if e != self.cfg.n_embd {
            candle_core::bail!(
                "input embeddings are {e} wide, the model {}",
                self.cfg.n_embd
            );
        }
        if t == 0 || t > self.cfg.n_positions {
            candle_core::bail!(
                "sequence of {t} positions; the model takes 1 to {}",
                self.cfg.n_positions
            );
        }
        let bias = attention_bias(b, t, attention_mask, embeds.dtype(), embeds.device())?;
        let mut x = embeds.broadcast_add(&self.wpe.narrow(0, 0, t)?.unsqueeze(0)?)?;
        for block in &self.blocks {
            x = block.forward(&x, &bias)?;
        }
        self.ln_f.forward(&x)
    }

    /// Final hidden states of `input_ids` `[B, T]`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        self.forward_embeds(&self.embed_tokens(input_ids)?, attention_mask)
    }
}

/// Additive attention bias `[B, 1, T, T]`: 0 where query `i` may see key `j` (`j <= i` and
/// key `j` is not padding), the dtype's lowest value elsewhere (as transformers masks).
fn attention_bias(
    b: usize,
    t: usize,
    attention_mask: Option<&Tensor>,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let lowest = crate::bert::mask_value(dtype) as f32;
    let keys: Vec<f32> = match attention_mask {
        Some(m) => {
            if m.dims() != [b, t] {
                candle_core::bail!("attention mask {:?}, expected [{b}, {t}]", m.dims());
            }
            m.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?
        }
        None => vec![1.0; b * t],
    };
    let mut bias = vec![0f32; b * t * t];
    for r in 0..b {
        for i in 0..t {
            for j in 0..t {
                if j > i || keys[r * t + j] == 0.0 {
                    bias[(r * t + i) * t + j] = lowest;
                }
            }
        }
    }
    Tensor::from_vec(bias, (b, 1, t, t), device)?.to_dtype(dtype)
}

/// GPT-2 with its language-model head.
#[derive(Debug, Clone)]
pub struct Gpt2LmHeadModel {
    /// The transformer.
    pub transformer: Gpt2Model,
    /// A separate LM head `[V, E]` when the embeddings are not tied.
    lm_head: Option<Tensor>,
}

/// A decoded continuation and its total log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// The new tokens (the prompt not included; EOS included when it ended the text).
    pub tokens: Vec<u32>,
    /// Sum of the tokens' log-probabilities.
    pub log_prob: f64,
}

impl Gpt2LmHeadModel {
    /// Load from `vb` at the checkpoint root, where the transformer sits under
    /// `transformer_prefix` (`"transformer"` or `""` for bare `GPT2Model` files).
    pub fn load(
        vb: VarBuilder,
        cfg: &Gpt2Config,
        transformer_prefix: &str,
    ) -> candle_core::Result<Self> {
        let tvb = if transformer_prefix.is_empty() {
            vb.clone()
        } else {
            vb.pp(transformer_prefix)
        };
        let transformer = Gpt2Model::load(tvb, cfg)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(vb.get_with_hints((cfg.vocab_size, cfg.n_embd), "lm_head.weight", GPT2_INIT)?)
        };
        Ok(Self {
            transformer,
            lm_head,
        })
    }

    /// Load `dir/config.json` and `dir/model.safetensors` (or `pytorch_model.bin`), in either
    /// key layout; a missing or unused tensor is an error listing them.
    pub fn from_dir(dir: &Path, dtype: DType, device: &Device, mode: &LoadMode) -> Result<Self> {
        let cfg = Gpt2Config::from_file(&dir.join("config.json"))?;
        let weights = ["model.safetensors", "pytorch_model.bin"]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.is_file())
            .ok_or_else(|| ModelError::MissingFile {
                path: dir.join("model.safetensors"),
                reason: "no GPT-2 weights (model.safetensors or pytorch_model.bin) in the folder"
                    .into(),
            })?;
        Self::from_weights(&WeightFile::open(&weights)?, &cfg, dtype, device, mode)
    }

    /// Load from an opened weight file and a config.
    pub fn from_weights(
        file: &WeightFile,
        cfg: &Gpt2Config,
        dtype: DType,
        device: &Device,
        mode: &LoadMode,
    ) -> Result<Self> {
        let names: Vec<&str> = file.tensors().map(|(n, _, _)| n).collect();
        let prefix = if names.contains(&"transformer.wte.weight") {
            "transformer"
        } else if names.contains(&"wte.weight") {
            ""
        } else {
            return Err(ModelError::Weights {
                path: file.path().to_path_buf(),
                reason: "no GPT-2 token embedding (transformer.wte.weight or wte.weight)".into(),
            });
        };
        // Old checkpoints store the causal-mask buffers `attn.bias` / `attn.masked_bias`, and
        // tied checkpoints may repeat the embedding as `lm_head.weight`.
        let mut ignore: Vec<&str> = DEFAULT_IGNORED.to_vec();
        ignore.extend([".attn.bias", ".attn.masked_bias"]);
        if cfg.tie_word_embeddings {
            ignore.push("lm_head.weight");
        }
        file.load(dtype, device, mode, &ignore, |vb| {
            Self::load(vb, cfg, prefix)
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Gpt2Config {
        self.transformer.config()
    }

    /// Next-token logits `[B, T, V]` of final hidden states `[B, T, E]`.
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        let head = self.lm_head.as_ref().unwrap_or(&self.transformer.wte);
        hidden.broadcast_matmul(&head.t()?)
    }

    /// Logits `[B, T, V]` of `input_ids` `[B, T]`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        self.logits(&self.transformer.forward(input_ids, attention_mask)?)
    }

    /// Logits `[B, T, V]` of input embeddings `[B, T, E]` (e.g. a ClipCap prefix followed by
    /// token embeddings).
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        self.logits(&self.transformer.forward_embeds(embeds, attention_mask)?)
    }

    /// Log-probabilities `[K, V]` of the next token after each of `K` sequences, each the
    /// `prefix` `[P, E]` (if any) followed by the embeddings of its tokens (all sequences of
    /// one length).
    fn next_log_probs(&self, prefix: Option<&Tensor>, seqs: &[Vec<u32>]) -> Result<Tensor> {
        let k = seqs.len();
        let len = seqs[0].len();
        let dev = self.transformer.wte.device();
        let flat: Vec<u32> = seqs.iter().flatten().copied().collect();
        let mut parts = Vec::new();
        if let Some(p) = prefix {
            parts.push(p.unsqueeze(0)?.repeat((k, 1, 1))?);
        }
        if len > 0 {
            let ids = Tensor::from_vec(flat, (k, len), dev)?;
            parts.push(self.transformer.embed_tokens(&ids)?);
        }
        if parts.is_empty() {
            return Err(ModelError::invalid(
                "decoding needs a prefix or at least one prompt token",
            ));
        }
        let embeds = Tensor::cat(&parts, 1)?;
        let t = embeds.dim(1)?;
        let logits = self.forward_embeds(&embeds, None)?.i((.., t - 1, ..))?;
        Ok(candle_nn::ops::log_softmax(
            &logits.to_dtype(DType::F32)?,
            D::Minus1,
        )?)
    }

    fn check_decode(&self, prefix: Option<&Tensor>, prompt: &[u32], max_new: usize) -> Result<()> {
        let p = match prefix {
            Some(p) => {
                let (p_len, e) = p.dims2()?;
                if e != self.config().n_embd {
                    return Err(ModelError::invalid(format!(
                        "prefix embeddings are {e} wide, the decoder {}",
                        self.config().n_embd
                    )));
                }
                p_len
            }
            None => 0,
        };
        let total = p + prompt.len() + max_new;
        if total > self.config().n_positions {
            return Err(ModelError::invalid(format!(
                "prefix ({p}) + prompt ({}) + new tokens ({max_new}) = {total} positions; the decoder has {}",
                prompt.len(),
                self.config().n_positions
            )));
        }
        if let Some(&bad) = prompt
            .iter()
            .find(|&&t| t as usize >= self.config().vocab_size)
        {
            return Err(ModelError::invalid(format!(
                "prompt token {bad} is outside the vocabulary of {}",
                self.config().vocab_size
            )));
        }
        Ok(())
    }

    /// Greedy decoding: up to `max_new` tokens after `prefix` `[P, E]` and `prompt`, stopping
    /// after `eos` when given.
    pub fn greedy(
        &self,
        prefix: Option<&Tensor>,
        prompt: &[u32],
        max_new: usize,
        eos: Option<u32>,
    ) -> Result<Decoded> {
        self.check_decode(prefix, prompt, max_new)?;
        let mut seq = prompt.to_vec();
        let mut out = Decoded {
            tokens: Vec::new(),
            log_prob: 0.0,
        };
        for _ in 0..max_new {
            let lp: Vec<f32> = self
                .next_log_probs(prefix, std::slice::from_ref(&seq))?
                .squeeze(0)?
                .to_vec1()?;
            let (best, &score) = lp
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .ok_or_else(|| ModelError::invalid("empty vocabulary"))?;
            let best = best as u32;
            seq.push(best);
            out.tokens.push(best);
            out.log_prob += score as f64;
            if Some(best) == eos {
                break;
            }
        }
        Ok(out)
    }

    /// Beam search with `beams` hypotheses: at each step every running beam is extended by
    /// every token and the `beams` best by summed log-probability are kept; a beam that
    /// emits `eos` is finished and scored `sum / len^length_penalty` (`len` = its new
    /// tokens); the search stops at `max_new` tokens, or once `beams` hypotheses are finished
    /// and no running beam can still beat the worst of them. Returns the best finished
    /// hypothesis, or the best running beam when none finished. Without EOS this is what
    /// transformers' `generate(num_beams=K)` returns.
    pub fn beam_search(
        &self,
        prefix: Option<&Tensor>,
        prompt: &[u32],
        max_new: usize,
        eos: Option<u32>,
        beams: usize,
        length_penalty: f64,
    ) -> Result<Decoded> {
        if beams == 0 {
            return Err(ModelError::invalid("beam search needs at least 1 beam"));
        }
        self.check_decode(prefix, prompt, max_new)?;
        // Running beams: (new tokens, summed log-probability).
        let mut running: Vec<(Vec<u32>, f64)> = vec![(Vec::new(), 0.0)];
        let mut finished: Vec<(Decoded, f64)> = Vec::new();
        let norm = |len: usize, sum: f64| sum / (len.max(1) as f64).powf(length_penalty);
        for step in 0..max_new {
            let seqs: Vec<Vec<u32>> = running
                .iter()
                .map(|(t, _)| prompt.iter().chain(t).copied().collect())
                .collect();
            let lp: Vec<Vec<f32>> = self.next_log_probs(prefix, &seqs)?.to_vec2()?;
            let mut cands: Vec<(usize, u32, f64)> = Vec::new();
            for (b, row) in lp.iter().enumerate() {
                for (tok, &l) in row.iter().enumerate() {
                    cands.push((b, tok as u32, running[b].1 + l as f64));
                }
            }
            cands.sort_by(|a, b| b.2.total_cmp(&a.2));
            let mut next = Vec::new();
            for (b, tok, score) in cands {
                if next.len() == beams {
                    break;
                }
                let mut tokens = running[b].0.clone();
                tokens.push(tok);
                if Some(tok) == eos {
                    let s = norm(tokens.len(), score);
                    finished.push((
                        Decoded {
                            tokens,
                            log_prob: score,
                        },
                        s,
                    ));
                } else {
                    next.push((tokens, score));
                }
            }
            running = next;
            finished.sort_by(|a, b| b.1.total_cmp(&a.1));
            finished.truncate(beams);
            if running.is_empty() {
                break;
            }
            // Log-probabilities only fall, so with length_penalty >= 0 a running beam's best
            // reachable score is its current sum normalised by the longest length left.
            if finished.len() == beams && length_penalty >= 0.0 {
                let worst = finished[beams - 1].1;
                let best_running = running
                    .iter()
                    .map(|(_, s)| {
                        let len = if *s >= 0.0 { step + 1 } else { max_new };
                        norm(len, *s)
                    })
                    .fold(f64::NEG_INFINITY, f64::max);
                if best_running <= worst {
                    break;
                }
            }
        }
        // Beams still running at the end compete with the finished ones on the same score.
        for (tokens, log_prob) in running {
            let s = norm(tokens.len(), log_prob);
            finished.push((Decoded { tokens, log_prob }, s));
        }
        finished
            .into_iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(d, _)| d)
            .ok_or_else(|| ModelError::invalid("beam search produced nothing"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::{Optimizer, VarMap};

    /// A decoder built on a `VarMap` trains in place: memorising one sequence drives its
    /// next-token loss towards zero, and greedy decoding then reproduces the sequence.
    #[test]
    fn a_trainable_decoder_memorises_a_sequence() {
        let dev = Device::Cpu;
        let cfg = Gpt2Config::small(20, 16, 32, 2, 4);
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let m = Gpt2LmHeadModel::load(vb, &cfg, "transformer").unwrap();
        let seq: Vec<u32> = vec![3, 7, 1, 9, 4, 4, 12, 5];
        let ids = Tensor::new(&seq[..seq.len() - 1], &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let targets = Tensor::new(&seq[1..], &dev).unwrap();
        let mut opt = candle_nn::AdamW::new_lr(varmap.all_vars(), 1e-2).unwrap();
        let loss_of = |m: &Gpt2LmHeadModel| {
            let logits = m.forward(&ids, None).unwrap().squeeze(0).unwrap();
            candle_nn::loss::cross_entropy(&logits, &targets).unwrap()
        };
        let first = loss_of(&m).to_scalar::<f32>().unwrap();
        for _ in 0..60 {
            opt.backward_step(&loss_of(&m)).unwrap();
        }
        let last = loss_of(&m).to_scalar::<f32>().unwrap();
        assert!(first > 2.0 && last < 0.05, "loss {first} -> {last}");
        let out = m.greedy(None, &seq[..1], seq.len() - 1, None).unwrap();
        assert_eq!(out.tokens, seq[1..]);
    }
}
