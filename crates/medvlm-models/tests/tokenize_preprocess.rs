//! Tokenizers and image preprocessing against the HF reference outputs
//! stored by tools/make_parity_fixtures.py.

mod support;

use candle_core::{DType, Device};
use medvlm_models::preprocess::{load_and_preprocess, PreprocessConfig, Resize};
use medvlm_models::tokenizer::{Padding, TextTokenizer};
use support::{fixture, load_st, max_abs_diff};

fn texts(family: &str) -> Vec<String> {
    serde_json::from_str(&std::fs::read_to_string(fixture(family).join("texts.json")).unwrap())
        .unwrap()
}

fn check_tokens(family: &str, ctx: usize) {
    let tok = TextTokenizer::from_file(
        &fixture(family).join("tokenizer.json"),
        ctx,
        Padding::MaxLength,
    )
    .unwrap();
    let batch = tok.encode_batch(&texts(family), &Device::Cpu).unwrap();
    let want = load_st(fixture(family).join("inputs.safetensors"));
    let ids: Vec<Vec<u32>> = batch.input_ids.to_vec2().unwrap();
    let want_ids: Vec<Vec<u32>> = want["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_eq!(ids, want_ids, "{family} input_ids");
    let mask: Vec<Vec<u32>> = batch.attention_mask.to_vec2().unwrap();
    let want_mask: Vec<Vec<u32>> = want["attention_mask"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_eq!(mask, want_mask, "{family} attention_mask");
}

#[test]
fn clip_bpe_matches_hf_with_truncation_keeping_eot() {
    check_tokens("clip", 24);
    let tok = TextTokenizer::from_file(
        &fixture("clip").join("tokenizer.json"),
        24,
        Padding::MaxLength,
    )
    .unwrap();
    let eot = tok.token_to_id("<|endoftext|>").unwrap();
    // The long text is cut to 24 tokens and still ends with EOT.
    let ids = tok.encode_ids(&texts("clip")[2]).unwrap();
    assert_eq!(ids.len(), 24);
    assert_eq!(*ids.last().unwrap(), eot);
    assert_eq!(tok.pad_id(), eot);
}

#[test]
fn siglip_tokens_padded_to_64_match_hf() {
    check_tokens("siglip", 64);
}

#[test]
fn longest_padding_pads_to_the_longest_text() {
    let tok = TextTokenizer::from_file(
        &fixture("clip").join("tokenizer.json"),
        24,
        Padding::Longest,
    )
    .unwrap();
    let b = tok
        .encode_batch(&["a", "the photo of"], &Device::Cpu)
        .unwrap();
    let ids: Vec<Vec<u32>> = b.input_ids.to_vec2().unwrap();
    let n1 = tok.encode_ids("the photo of").unwrap().len();
    assert_eq!(ids[0].len(), n1);
    let mask: Vec<Vec<u32>> = b.attention_mask.to_vec2().unwrap();
    assert_eq!(
        mask[0].iter().sum::<u32>() as usize,
        tok.encode_ids("a").unwrap().len()
    );
}

#[test]
fn missing_tokenizer_is_an_error_naming_the_file() {
    let err = TextTokenizer::from_file(&fixture("clip").join("nope.json"), 77, Padding::MaxLength)
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope.json"), "{err}");
}

fn check_preprocess(family: &str) {
    let cfg =
        PreprocessConfig::from_hf_file(&fixture(family).join("preprocessor_config.json")).unwrap();
    let want = load_st(fixture(family).join("preprocess.safetensors"))["pixel_values"].clone();
    let imgs = ["rgb.png", "grey.png"]
        .iter()
        .map(|f| load_and_preprocess(&fixture(family).join(f), &cfg).unwrap())
        .collect::<Vec<_>>();
    let got = cfg.batch(&imgs, &Device::Cpu).unwrap();
    let d = max_abs_diff(&got, &want);
    // Documented tolerance: PIL rounds the resized image to 8 bits (≤ 1/255
    // before normalisation, i.e. ≤ ~0.03 after dividing by std ~0.27).
    assert!(d < 3e-2, "{family}: max diff {d}");
    // The grey image has identical channels before normalisation.
    let g = &imgs[1];
    let n = g.len() / 3;
    for i in 0..n {
        let r = g[i] * cfg.std[0] + cfg.mean[0];
        let b = g[2 * n + i] * cfg.std[2] + cfg.mean[2];
        assert!((r - b).abs() < 1e-5);
    }
}

#[test]
fn clip_preprocessing_matches_hf_within_documented_tolerance() {
    let cfg =
        PreprocessConfig::from_hf_file(&fixture("clip").join("preprocessor_config.json")).unwrap();
    assert_eq!(cfg.resize, Some(Resize::ShortestEdge(32)));
    assert_eq!(cfg.crop, Some((32, 32)));
    check_preprocess("clip");
}

#[test]
fn siglip_preprocessing_matches_hf_within_documented_tolerance() {
    let cfg = PreprocessConfig::from_hf_file(&fixture("siglip").join("preprocessor_config.json"))
        .unwrap();
    assert_eq!(
        cfg.resize,
        Some(Resize::Exact {
            height: 32,
            width: 32
        })
    );
    assert_eq!(cfg.crop, None);
    check_preprocess("siglip");
}

#[test]
fn grey_array_is_replicated_and_normalised() {
    let cfg = PreprocessConfig::siglip(4);
    let out = cfg.apply_array(&[0.25; 16], 4, 4, 1).unwrap();
    assert_eq!(out.len(), 48);
    assert!(out.iter().all(|v| (v - (-0.5)).abs() < 1e-6));
    assert!(cfg.apply_array(&[0.0; 15], 4, 4, 1).is_err());
}

#[test]
fn unreadable_image_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken.png");
    std::fs::write(&p, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let err = load_and_preprocess(&p, &PreprocessConfig::clip(32))
        .unwrap_err()
        .to_string();
    assert!(err.contains("broken.png"), "{err}");
}

#[test]
fn bad_preprocessor_configs_are_errors_naming_the_file() {
    let p = std::path::Path::new("m/preprocessor_config.json");
    for text in [
        r#"{"size": {"shortest_edge": 0}, "do_center_crop": false}"#,
        r#"{"size": {"height": 32}}"#,
        r#"{"do_resize": false, "do_center_crop": false}"#,
        r#"{"size": 32, "image_std": [0.5, 0.0, 0.5]}"#,
        r#"{"size": 32, "image_mean": [0.5, 0.5]}"#,
        "not json",
    ] {
        let err = PreprocessConfig::from_hf_json(text, p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("m/preprocessor_config.json"), "{text}: {err}");
    }
    let ok = PreprocessConfig::from_hf_json(
        r#"{"size": 40, "crop_size": 32, "do_center_crop": true}"#,
        p,
    )
    .unwrap();
    assert_eq!(ok.resize, Some(Resize::ShortestEdge(40)));
    assert_eq!(ok.output_size(), Some((32, 32)));
}
