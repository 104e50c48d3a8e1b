//! BiomedCLIP layout against open_clip on a tiny random-weight CustomTextCLIP
//! (timm ViT + HF BERT, fixture from tools/make_biomedclip_fixture.py), loaded
//! from `open_clip_pytorch_model.bin` through the pickle reader: image and text
//! embeddings, hidden states and logits within 1e-4 (f32), and the WordPiece
//! tokenizer's ids equal to those of HF's tokenizer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use medvlm_models::biomedclip::BiomedClip;
use medvlm_models::vlm::{l2_normalize, TextPrompt, VisualPrompts};
use medvlm_models::{
    ImageEncoder, LinearLayers, LoadMode, ModelError, TextEncoder, TokenBatch, VisionLanguageModel,
};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/biomedclip")
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir().join("expected.safetensors"), &Device::Cpu)
        .expect("fixture expected.safetensors")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn model() -> BiomedClip {
    BiomedClip::from_dir(&fixture_dir(), DType::F32, &Device::Cpu, &LoadMode::Frozen)
        .expect("load tiny BiomedCLIP fixture")
}

fn tokens(exp: &HashMap<String, Tensor>, m: &BiomedClip) -> TokenBatch {
    let input_ids = exp["input_ids"].to_dtype(DType::U32).unwrap();
    let attention_mask = m.text.pad_mask(&input_ids).unwrap();
    TokenBatch {
        input_ids,
        attention_mask,
    }
}

#[test]
fn biomedclip_embeddings_and_logits_match_open_clip() {
    let exp = expected();
    let m = model();
    let img = m.encode_image(&exp["pixel_values"]).unwrap();
    let txt = m.encode_text(&tokens(&exp, &m)).unwrap();
    for (name, got, key) in [
        ("image embeds", &img.embeds, "image_features"),
        ("text embeds", &txt.embeds, "text_features"),
        ("image tokens", &img.last_hidden_state, "image_tokens"),
        ("text tokens", &txt.last_hidden_state, "text_tokens"),
    ] {
        let d = max_abs_diff(got, &exp[key]);
        assert!(d < 1e-4, "{name} differ from open_clip by {d}");
    }
    let scale = m.logit_scale().exp().unwrap().reshape(1).unwrap();
    assert!(max_abs_diff(&scale, &exp["logit_scale"]) < 1e-4);
    let logits = m.logits_per_image(&img.embeds, &txt.embeds).unwrap();
    let d = max_abs_diff(&logits, &exp["logits_per_image"]);
    assert!(d < 1e-4, "logits differ by {d}");

    assert_eq!(img.num_prefix_tokens, 1);
    assert_eq!(img.patch_tokens().unwrap().dims(), &[2, 16, 32]);
    assert_eq!(m.context_length(), 16);
    assert_eq!(m.embed_dim(), 24);
}

#[test]
fn biomedclip_tokenizer_matches_hf_ids() {
    let exp = expected();
    let texts: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("texts.json")).unwrap())
            .unwrap();
    let mut tok = tokenizers::Tokenizer::from_file(fixture_dir().join("tokenizer.json")).unwrap();
    let ctx = model().context_length();
    tok.with_padding(Some(tokenizers::PaddingParams {
        strategy: tokenizers::PaddingStrategy::Fixed(ctx),
        pad_id: 0,
        pad_token: "[PAD]".into(),
        ..Default::default()
    }));
    tok.with_truncation(Some(tokenizers::TruncationParams {
        max_length: ctx,
        ..Default::default()
    }))
    .unwrap();
    let enc = tok.encode_batch(texts, true).unwrap();
    let ids: Vec<Vec<i64>> = enc
        .iter()
        .map(|e| e.get_ids().iter().map(|&i| i as i64).collect())
        .collect();
    let want: Vec<Vec<i64>> = exp["input_ids"].to_vec2().unwrap();
    assert_eq!(ids, want);
}

#[test]
fn biomedclip_extension_points_change_outputs_consistently() {
    let exp = expected();
    let m = model();
    let batch = tokens(&exp, &m);
    let base = m.encode_text(&batch).unwrap();

    // Replacing token embeddings by their own values is the identity ...
    let words = m.token_embeddings(&batch.input_ids).unwrap();
    let same = TextPrompt {
        positions: vec![1, 2],
        vectors: words.narrow(1, 1, 2).unwrap(),
    };
    let out = m.encode_text_with(&batch, Some(&same)).unwrap();
    assert!(max_abs_diff(&out.embeds, &base.embeds) < 1e-6);
    // ... and a different vector changes the text embedding.
    let other = TextPrompt {
        positions: vec![1],
        vectors: Tensor::ones((1, 32), DType::F32, &Device::Cpu).unwrap(),
    };
    let out = m.encode_text_with(&batch, Some(&other)).unwrap();
    assert!(max_abs_diff(&out.embeds, &base.embeds) > 1e-3);

    // Visual prompts: 3 tokens after the class token; patch tokens still 16.
    let prompts = VisualPrompts {
        shallow: Some(Tensor::randn(0f32, 1.0, (3, 32), &Device::Cpu).unwrap()),
        deep: vec![
            None,
            Some(Tensor::zeros((3, 32), DType::F32, &Device::Cpu).unwrap()),
        ],
    };
    let img = m
        .encode_image_with(&exp["pixel_values"], Some(&prompts))
        .unwrap();
    assert_eq!(img.num_prefix_tokens, 4);
    assert_eq!(img.last_hidden_state.dims(), &[2, 20, 32]);
    assert_eq!(img.patch_tokens().unwrap().dims(), &[2, 16, 32]);
    assert!(max_abs_diff(&img.embeds, &exp["image_features"]) > 1e-3);
    let n = l2_normalize(&img.embeds).unwrap();
    assert_eq!(n.dims(), &[2, 24]);

    // Every attention/MLP linear of both towers plus the projections.
    let paths = m.linear_paths();
    // vision: 2 blocks x 4 + head.proj; text: 2 layers x 6 + 2 proj
    assert_eq!(paths.len(), 2 * 4 + 1 + 2 * 6 + 2, "{paths:?}");
    for p in [
        "visual.trunk.blocks.1.attn.qkv",
        "visual.head.proj",
        "text.transformer.encoder.layer.0.attention.self.value",
        "text.proj.2",
    ] {
        assert!(paths.iter().any(|q| q == p), "missing {p} in {paths:?}");
    }
}

#[test]
fn biomedclip_wrong_image_shape_is_an_error() {
    let m = model();
    let x = Tensor::zeros((1, 3, 30, 32), DType::F32, &Device::Cpu).unwrap();
    let err = m.encode_image(&x).unwrap_err().to_string();
    assert!(err.contains("[B, 3, 32, 32]"), "{err}");
}

#[test]
fn biomedclip_missing_or_corrupt_weights_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture_dir().join("open_clip_config.json"),
        tmp.path().join("open_clip_config.json"),
    )
    .unwrap();
    let err =
        BiomedClip::from_dir(tmp.path(), DType::F32, &Device::Cpu, &LoadMode::Frozen).unwrap_err();
    assert!(matches!(err, ModelError::MissingFile { .. }), "{err}");
    assert!(
        err.to_string().contains("open_clip_pytorch_model.bin"),
        "{err}"
    );

    let bin = tmp.path().join("open_clip_pytorch_model.bin");
    std::fs::write(&bin, b"this is not a zip archive").unwrap();
    let err = BiomedClip::from_dir(tmp.path(), DType::F32, &Device::Cpu, &LoadMode::Frozen)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&bin.display().to_string()), "{err}");

    std::fs::remove_file(tmp.path().join("open_clip_config.json")).unwrap();
    let err = BiomedClip::from_dir(tmp.path(), DType::F32, &Device::Cpu, &LoadMode::Frozen)
        .unwrap_err()
        .to_string();
    assert!(err.contains("open_clip_config.json"), "{err}");
}

#[test]
fn biomedclip_config_mismatching_weights_lists_tensors() {
    // A config claiming 3 ViT blocks for a 2-block checkpoint.
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join("open_clip_config.json")).unwrap(),
    )
    .unwrap();
    cfg["medvlm_arch"]["vision"]["depth"] = 3.into();
    std::fs::write(tmp.path().join("open_clip_config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        fixture_dir().join("open_clip_pytorch_model.bin"),
        tmp.path().join("open_clip_pytorch_model.bin"),
    )
    .unwrap();
    let err = BiomedClip::from_dir(tmp.path(), DType::F32, &Device::Cpu, &LoadMode::Frozen)
        .unwrap_err()
        .to_string();
    assert!(err.contains("open_clip_pytorch_model.bin"), "{err}");
    assert!(
        err.contains("visual.trunk.blocks.2.attn.qkv.weight"),
        "{err}"
    );
}

/// open_clip reads `hf_model_name` / `hf_tokenizer_name` with transformers'
/// `from_pretrained`, which also takes a local folder: a model directory whose text tower
/// is described by `text_tower/config.json` (and `text_tower/tokenizer.json`) instead of a
/// `medvlm_arch` block loads and gives open_clip's embeddings.
#[test]
fn biomedclip_with_a_local_hf_text_folder_loads_like_open_clip() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join("open_clip_config.json")).unwrap(),
    )
    .unwrap();
    let mut bert = cfg["medvlm_arch"]["text"].take();
    cfg["medvlm_arch"].as_object_mut().unwrap().remove("text");
    bert["model_type"] = "bert".into();
    bert["architectures"] = serde_json::json!(["BertModel"]);
    let exp = expected();
    let texts: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("texts.json")).unwrap())
            .unwrap();
    let absolute = tmp.path().join("abs_text");
    for (name, folder) in [
        ("text_tower", tmp.path().join("model/text_tower")),
        (absolute.to_str().unwrap(), absolute.clone()),
    ] {
        let model = tmp.path().join("model");
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join("config.json"), bert.to_string()).unwrap();
        std::fs::copy(
            fixture_dir().join("tokenizer.json"),
            folder.join("tokenizer.json"),
        )
        .unwrap();
        cfg["model_cfg"]["text_cfg"]["hf_model_name"] = name.into();
        cfg["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = name.into();
        std::fs::write(model.join("open_clip_config.json"), cfg.to_string()).unwrap();
        std::fs::copy(
            fixture_dir().join("open_clip_pytorch_model.bin"),
            model.join("open_clip_pytorch_model.bin"),
        )
        .unwrap();
        assert!(!model.join("tokenizer.json").exists());
        let loaded = medvlm_models::load_model_dir(&model, &medvlm_models::LoadOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let batch = loaded.tokenizer.encode_batch(&texts, &Device::Cpu).unwrap();
        let want: Vec<Vec<i64>> = exp["input_ids"].to_vec2().unwrap();
        let got: Vec<Vec<i64>> = batch
            .input_ids
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(got, want, "{name}: token ids");
        let txt = loaded.model.encode_text(&batch).unwrap();
        let d = max_abs_diff(&txt.embeds, &exp["text_features"]);
        assert!(d < 1e-4, "{name}: text embeds differ from open_clip by {d}");
        std::fs::remove_dir_all(folder).unwrap();
    }

    // A text model that is not BERT is refused, naming the file.
    let folder = tmp.path().join("model/text_tower");
    std::fs::create_dir_all(&folder).unwrap();
    bert["model_type"] = "roberta".into();
    std::fs::write(folder.join("config.json"), bert.to_string()).unwrap();
    cfg["model_cfg"]["text_cfg"]["hf_model_name"] = "text_tower".into();
    std::fs::write(
        tmp.path().join("model/open_clip_config.json"),
        cfg.to_string(),
    )
    .unwrap();
    let err = medvlm_models::load_model_dir(
        &tmp.path().join("model"),
        &medvlm_models::LoadOptions::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("text_tower/config.json") && err.contains("roberta"),
        "{err}"
    );
}
