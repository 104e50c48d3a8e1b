//! Text tokenisation from a model's `tokenizer.json` with the `tokenizers`
//! crate, plus the per-family context length, truncation and padding rules:
//!
//! - CLIP BPE: context 77 (from `text_config.max_position_embeddings`),
//!   truncation keeps `<|startoftext|>` and `<|endoftext|>` (the tokenizer's
//!   post-processor adds them after truncating the content), padding to the
//!   full context with the pad token (`<|endoftext|>` for OpenAI CLIP), as HF
//!   `padding="max_length"`. The model pools at the EOT token.
//! - SigLIP: padded to 64 tokens ("max_length"), `</s>` appended; pooling by
//!   the last token.
//! - BERT WordPiece: `[CLS] ... [SEP]`, padded to the longest text in the batch
//!   with an attention mask, truncated to the context length (256 for BiomedCLIP).
//!
//! Any `padding`/`truncation` stored in tokenizer.json is replaced by these rules.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::{ModelError, Result};
use crate::vlm::TokenBatch;

/// How a batch is padded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// Every text padded to the context length (CLIP, SigLIP).
    MaxLength,
    /// Padded to the longest text of the batch (BERT).
    Longest,
}

/// A tokenizer with its context length and padding rule.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    path: PathBuf,
    context_length: usize,
    pad_id: u32,
    padding: Padding,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .field("context_length", &self.context_length)
            .field("pad_id", &self.pad_id)
            .field("padding", &self.padding)
            .finish()
    }
}

/// Pad token names tried when no tokenizer_config.json names one.
const PAD_CANDIDATES: &[&str] = &["<pad>", "[PAD]", "<|endoftext|>", "<PAD>"];

impl TextTokenizer {
    /// Load `path` (a tokenizer.json). The pad token is, in order: the
    /// `pad_token` of a `tokenizer_config.json` beside it, the padding of
    /// tokenizer.json, one of `<pad>`, `[PAD]`, `<|endoftext|>`, else id 0.
    pub fn from_file(path: &Path, context_length: usize, padding: Padding) -> Result<Self> {
        if !path.is_file() {
            return Err(ModelError::MissingFile {
                path: path.to_path_buf(),
                reason: "tokenizer.json not found (medvlm needs the fast-tokenizer file; \
                         `AutoTokenizer.from_pretrained(M).save_pretrained(DIR)` writes it)"
                    .into(),
            });
        }
        let inner = Tokenizer::from_file(path).map_err(|e| ModelError::Tokenizer {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let pad_id = find_pad_id(&inner, path);
        Self::from_tokenizer(inner, path, context_length, padding, pad_id)
    }

    /// Wrap an in-memory tokenizer (e.g. one built for from-scratch pretraining).
    pub fn from_tokenizer(
        mut inner: Tokenizer,
        path: &Path,
        context_length: usize,
        padding: Padding,
        pad_id: u32,
    ) -> Result<Self> {
        if context_length < 2 {
            return Err(ModelError::Tokenizer {
                path: path.to_path_buf(),
                reason: format!("context length {context_length} is too short"),
            });
        }
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: context_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| ModelError::Tokenizer {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            inner,
            path: path.to_path_buf(),
            context_length,
            pad_id,
            padding,
        })
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
    /// Context length.
    pub fn context_length(&self) -> usize {
        self.context_length
    }
    /// Pad id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
    /// Id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
    /// The path the tokenizer was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Ids of one text with special tokens, truncated to the context length.
    pub fn encode_ids(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer {
                path: self.path.clone(),
                reason: format!("cannot encode {text:?}: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Tokenise and pad a batch: `input_ids` / `attention_mask` `[B, L]` u32.
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S], device: &Device) -> Result<TokenBatch> {
        if texts.is_empty() {
            return Err(ModelError::invalid("no texts to tokenise"));
        }
        let rows = texts
            .iter()
            .map(|t| self.encode_ids(t.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let len = match self.padding {
            Padding::MaxLength => self.context_length,
            Padding::Longest => rows.iter().map(|r| r.len()).max().unwrap_or(1),
        };
        let mut ids = Vec::with_capacity(rows.len() * len);
        let mut mask = Vec::with_capacity(rows.len() * len);
        for r in &rows {
            ids.extend_from_slice(r);
            mask.extend(std::iter::repeat_n(1u32, r.len()));
            ids.extend(std::iter::repeat_n(self.pad_id, len - r.len()));
            mask.extend(std::iter::repeat_n(0u32, len - r.len()));
        }
        let b = rows.len();
        Ok(TokenBatch {
            input_ids: Tensor::from_vec(ids, (b, len), device)?,
            attention_mask: Tensor::from_vec(mask, (b, len), device)?,
        })
    }
}

fn find_pad_id(tok: &Tokenizer, path: &Path) -> u32 {
    let cfg_path = path.with_file_name("tokenizer_config.json");
    if let Ok(text) = std::fs::read_to_string(&cfg_path) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            let name = match &v["pad_token"] {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .map(str::to_string),
                _ => None,
            };
            if let Some(id) = name.and_then(|n| tok.token_to_id(&n)) {
                return id;
            }
        }
    }
    if let Some(p) = tok.get_padding() {
        return p.pad_id;
    }
    PAD_CANDIDATES
        .iter()
        .find_map(|t| tok.token_to_id(t))
        .unwrap_or(0)
}
