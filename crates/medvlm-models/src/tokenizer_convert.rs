//! `tokenizer.json` from the slow-tokenizer files a repo may ship instead: `vocab.txt` (BERT
//! WordPiece: PubMedBERT, BiomedBERT) or `vocab.json` + `merges.txt` (CLIP byte-level BPE).
//!
//! The pipelines are those transformers' `convert_slow_tokenizer` builds (`BertConverter`,
//! `CLIPConverter`), read from `tokenizer_config.json` where it sets an option
//! (`do_lower_case`, `tokenize_chinese_chars`, `strip_accents`, the special tokens). Tests
//! check the conversions against tokenizers made by transformers: the real all-MiniLM-L6-v2
//! `tokenizer.json` beside its `vocab.txt`, and the CLIP parity fixture's.

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::error::{ModelError, Result};

/// `tokenizer_config.json` of `dir`, or an empty object when there is none.
fn tokenizer_config(dir: &Path) -> Result<Value> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(json!({}));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::config(&path, e))
}

/// A special token's text from the config: a plain string or an `AddedToken` object.
fn special(cfg: &Value, key: &str, default: &str) -> String {
    match &cfg[key] {
        Value::String(s) => s.clone(),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or(default)
            .to_string(),
        _ => default.to_string(),
    }
}

fn added_token(id: u64, content: &str) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false,
           "rstrip": false, "normalized": false, "special": true})
}

/// Check that the JSON is a tokenizer the `tokenizers` crate loads, and serialise it.
fn finish(dir: &Path, value: Value) -> Result<String> {
    let text = serde_json::to_string(&value).map_err(|e| ModelError::Invalid(e.to_string()))?;
    text.parse::<tokenizers::Tokenizer>()
        .map_err(|e| ModelError::Tokenizer {
            path: dir.join("tokenizer.json"),
            reason: format!("the converted tokenizer does not load: {e}"),
        })?;
    Ok(text)
}

/// BERT WordPiece from `dir/vocab.txt` (one token per line, the line number is the id).
pub fn wordpiece_from_dir(dir: &Path) -> Result<String> {
    let vocab_path = dir.join("vocab.txt");
    let text = std::fs::read_to_string(&vocab_path).map_err(|e| ModelError::io(&vocab_path, e))?;
    let mut vocab = Map::new();
    // transformers' load_vocab: each line without its newline; a repeated token keeps the
    // later id.
    for (i, line) in text.lines().enumerate() {
        vocab.insert(line.to_string(), json!(i));
    }
    let cfg = tokenizer_config(dir)?;
    let id_of = |t: &str| -> Result<u64> {
        vocab
            .get(t)
            .and_then(|v| v.as_u64())
            .ok_or_else(|| ModelError::Tokenizer {
                path: vocab_path.clone(),
                reason: format!("special token {t:?} is not in the vocabulary"),
            })
    };
    let unk = special(&cfg, "unk_token", "[UNK]");
    let cls = special(&cfg, "cls_token", "[CLS]");
    let sep = special(&cfg, "sep_token", "[SEP]");
    let pad = special(&cfg, "pad_token", "[PAD]");
    let mask = special(&cfg, "mask_token", "[MASK]");
    let (cls_id, sep_id) = (id_of(&cls)?, id_of(&sep)?);
    let mut added = Vec::new();
    let mut specials: Vec<(u64, &str)> = Vec::new();
    for t in [&pad, &unk, &cls, &sep, &mask] {
        if let Ok(id) = id_of(t) {
            if !specials.iter().any(|(_, s)| s == t) {
                specials.push((id, t));
            }
        }
    }
    specials.sort();
    for (id, t) in specials {
        added.push(added_token(id, t));
    }
    let lowercase = cfg["do_lower_case"].as_bool().unwrap_or(true);
    let value = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {
            "type": "BertNormalizer",
            "clean_text": true,
            "handle_chinese_chars": cfg["tokenize_chinese_chars"].as_bool().unwrap_or(true),
            "strip_accents": cfg["strip_accents"].as_bool(),
            "lowercase": lowercase,
        },
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": cls, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": sep, "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": cls, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": sep, "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}},
                {"SpecialToken": {"id": sep, "type_id": 1}},
            ],
            "special_tokens": {
                cls.clone(): {"id": cls, "ids": [cls_id], "tokens": [cls]},
                sep.clone(): {"id": sep, "ids": [sep_id], "tokens": [sep]},
            },
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {
            "type": "WordPiece",
            "unk_token": unk,
            "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100,
            "vocab": vocab,
        },
    });
    finish(dir, value)
}

/// CLIP's pre-tokenisation pattern (transformers' `CLIPConverter`, from OpenAI's
/// `SimpleTokenizer`).
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The number of merges CLIP's slow tokenizer reads (`49152 - 256 - 2`); a longer file is cut
/// there, as transformers cuts it.
const CLIP_MAX_MERGES: usize = 49152 - 256 - 2;

/// CLIP byte-level BPE from `dir/vocab.json` and `dir/merges.txt`.
pub fn clip_bpe_from_dir(dir: &Path) -> Result<String> {
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    let vocab_text =
        std::fs::read_to_string(&vocab_path).map_err(|e| ModelError::io(&vocab_path, e))?;
    let vocab: Map<String, Value> =
        serde_json::from_str(&vocab_text).map_err(|e| ModelError::config(&vocab_path, e))?;
    let merges_text =
        std::fs::read_to_string(&merges_path).map_err(|e| ModelError::io(&merges_path, e))?;
    let mut merges = Vec::new();
    // The first line is the `#version` header; blank lines end nothing but carry no merge.
    for (n, line) in merges_text.trim().lines().enumerate().skip(1) {
        if merges.len() == CLIP_MAX_MERGES {
            break;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            [a, b] => merges.push(json!([a, b])),
            [] => continue,
            _ => {
                return Err(ModelError::Tokenizer {
                    path: merges_path.clone(),
                    reason: format!("line {}: expected two tokens, got {line:?}", n + 1),
                })
            }
        }
    }
    let cfg = tokenizer_config(dir)?;
    let bos = special(&cfg, "bos_token", "<|startoftext|>");
    let eos = special(&cfg, "eos_token", "<|endoftext|>");
    let unk = special(&cfg, "unk_token", "<|endoftext|>");
    let id_of = |t: &str| -> Result<u64> {
        vocab
            .get(t)
            .and_then(|v| v.as_u64())
            .ok_or_else(|| ModelError::Tokenizer {
                path: vocab_path.clone(),
                reason: format!("special token {t:?} is not in the vocabulary"),
            })
    };
    let (bos_id, eos_id) = (id_of(&bos)?, id_of(&eos)?);
    let value = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added_token(bos_id, &bos), added_token(eos_id, &eos)],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
                {"type": "Lowercase"},
            ],
        },
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": CLIP_SPLIT}, "behavior": "Removed",
                 "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                 "use_regex": true},
            ],
        },
        "post_processor": {
            "type": "RobertaProcessing",
            "sep": [eos, eos_id],
            "cls": [bos, bos_id],
            "trim_offsets": false,
            "add_prefix_space": false,
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "</w>",
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    });
    finish(dir, value)
}
