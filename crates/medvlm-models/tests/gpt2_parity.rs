//! GPT-2 decoder against `transformers.GPT2LMHeadModel` on a tiny random-weight model
//! (fixture from tools/make_gpt2_fixture.py): logits and final hidden states of a
//! right-padded batch, logits with a ClipCap-style prefix of input embeddings, greedy and
//! 3-beam continuations of `generate`, both checkpoint layouts, and the byte-level BPE
//! tokenizer's ids.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use medvlm_models::gpt2::{Gpt2Config, Gpt2LmHeadModel};
use medvlm_models::weights::WeightFile;
use medvlm_models::LoadMode;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2")
}

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join(name), &Device::Cpu).expect(name)
}

fn model() -> Gpt2LmHeadModel {
    Gpt2LmHeadModel::from_dir(&dir(), DType::F32, &Device::Cpu, &LoadMode::Frozen).unwrap()
}

/// Largest absolute difference over the valid (unpadded) positions of `[B, T, X]` tensors.
fn max_diff_valid(a: &Tensor, b: &Tensor, lens: &[usize]) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let mut worst = 0f32;
    for (r, &len) in lens.iter().enumerate() {
        let d = (a.i((r, ..len)).unwrap() - b.i((r, ..len)).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        worst = worst.max(d);
    }
    worst
}

fn valid_lengths(mask: &Tensor) -> Vec<usize> {
    mask.to_dtype(DType::F32)
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(|v| v as usize)
        .collect()
}

#[test]
fn logits_and_hidden_states_match_transformers() {
    let (inp, exp) = (load("inputs.safetensors"), load("expected.safetensors"));
    let m = model();
    let ids = inp["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = &inp["attention_mask"];
    let lens = valid_lengths(mask);
    let hidden = m.transformer.forward(&ids, Some(mask)).unwrap();
    let d = max_diff_valid(&hidden, &exp["last_hidden_state"], &lens);
    assert!(d < 1e-4, "hidden states differ by {d}");
    let logits = m.logits(&hidden).unwrap();
    let d = max_diff_valid(&logits, &exp["logits"], &lens);
    assert!(d < 1e-4, "logits differ by {d}");
    // The logits are not trivially small: a wrong block would show.
    let scale = exp["logits"]
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(scale > 1.0, "{scale}");
}

#[test]
fn a_prefix_of_input_embeddings_matches_transformers() {
    let (inp, exp) = (load("inputs.safetensors"), load("expected.safetensors"));
    let m = model();
    let ids = inp["input_ids"].to_dtype(DType::U32).unwrap();
    let prefix = &inp["prefix"];
    let p = prefix.dim(1).unwrap();
    let embeds = Tensor::cat(&[prefix, &m.transformer.embed_tokens(&ids).unwrap()], 1).unwrap();
    let ones = Tensor::ones((2, p), DType::I64, &Device::Cpu).unwrap();
    let mask = Tensor::cat(&[&ones, &inp["attention_mask"]], 1).unwrap();
    let lens = valid_lengths(&mask);
    let logits = m.forward_embeds(&embeds, Some(&mask)).unwrap();
    let d = max_diff_valid(&logits, &exp["prefix_logits"], &lens);
    assert!(d < 1e-4, "prefix logits differ by {d}");
}

#[test]
fn greedy_and_beam_continuations_match_generate() {
    let (inp, exp) = (load("inputs.safetensors"), load("expected.safetensors"));
    let m = model();
    let prompt: Vec<u32> = inp["prompt_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    let tail = |name: &str| -> Vec<u32> {
        let all: Vec<u32> = exp[name]
            .to_dtype(DType::U32)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(&all[..prompt.len()], prompt.as_slice());
        all[prompt.len()..].to_vec()
    };
    let greedy = m.greedy(None, &prompt, 12, None).unwrap();
    assert_eq!(greedy.tokens, tail("greedy_ids"));
    let beam = m.beam_search(None, &prompt, 12, None, 3, 1.0).unwrap();
    assert_eq!(beam.tokens, tail("beam3_ids"));
    assert_ne!(beam.tokens, greedy.tokens);
    // Each reported log-probability is the sum over its tokens under one forward pass.
    for d in [&greedy, &beam] {
        let seq: Vec<u32> = prompt.iter().chain(&d.tokens).copied().collect();
        let ids = Tensor::new(seq.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let lp =
            candle_nn::ops::log_softmax(&m.forward(&ids, None).unwrap().squeeze(0).unwrap(), 1)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
        let want: f64 = (prompt.len()..seq.len())
            .map(|i| lp[i - 1][seq[i] as usize] as f64)
            .sum();
        assert!((d.log_prob - want).abs() < 1e-3, "{} vs {want}", d.log_prob);
    }
}

#[test]
fn both_checkpoint_layouts_load_the_same_model() {
    let cfg = Gpt2Config::from_file(&dir().join("config.json")).unwrap();
    let bare = WeightFile::open(dir().join("model_bare.safetensors")).unwrap();
    let m2 =
        Gpt2LmHeadModel::from_weights(&bare, &cfg, DType::F32, &Device::Cpu, &LoadMode::Frozen)
            .unwrap();
    let ids = Tensor::new(&[[5u32, 9, 17, 2]], &Device::Cpu).unwrap();
    let a = model().forward(&ids, None).unwrap();
    let b = m2.forward(&ids, None).unwrap();
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0);
}

#[test]
fn the_tokenizer_reproduces_the_reference_ids() {
    let tok = tokenizers::Tokenizer::from_file(dir().join("tokenizer.json")).unwrap();
    let texts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("texts.json")).unwrap()).unwrap();
    for (t, ids) in texts["texts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(texts["ids"].as_array().unwrap())
    {
        let enc = tok.encode(t.as_str().unwrap(), false).unwrap();
        let want: Vec<u32> = ids
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(enc.get_ids(), want.as_slice());
        assert_eq!(
            tok.decode(enc.get_ids(), false).unwrap(),
            t.as_str().unwrap()
        );
    }
}

#[test]
fn unusable_configs_and_requests_are_refused() {
    let mut cfg = Gpt2Config::small(50, 16, 30, 1, 4);
    assert!(cfg.validate().unwrap_err().contains("multiple"));
    cfg.n_embd = 32;
    cfg.add_cross_attention = true;
    assert!(cfg.validate().is_err());
    let m = model();
    // Past the position table.
    let err = m
        .greedy(None, &[1, 2, 3], 100, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("positions"), "{err}");
    let err = m.greedy(None, &[100_000], 2, None).unwrap_err().to_string();
    assert!(err.contains("vocabulary"), "{err}");
    let wrong = Tensor::zeros((2, 16), DType::F32, &Device::Cpu).unwrap();
    let err = m
        .greedy(Some(&wrong), &[], 2, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("wide"), "{err}");
    let err = Gpt2LmHeadModel::from_dir(
        Path::new("/nonexistent"),
        DType::F32,
        &Device::Cpu,
        &LoadMode::Frozen,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("config.json"), "{err}");
}
