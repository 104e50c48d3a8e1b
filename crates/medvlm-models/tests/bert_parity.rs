//! Generic BERT tower against `transformers.BertModel` on a tiny random-weight
//! model (fixture from tools/make_biomedclip_fixture.py): last hidden states,
//! CLS, masked-mean and tanh-pooler outputs within 1e-4, with padding and
//! token types, weights stored under a `bert.` prefix.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use medvlm_models::bert::{BertConfig, BertPooling, BertTextEncoder};
use medvlm_models::{LinearLayers, LoadMode, ModelError};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bert")
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

fn encoder(pooling: BertPooling) -> BertTextEncoder {
    BertTextEncoder::from_dir(
        &fixture_dir(),
        pooling,
        DType::F32,
        &Device::Cpu,
        &LoadMode::Frozen,
    )
    .expect("load tiny BERT fixture")
}

#[test]
fn bert_hidden_states_and_poolings_match_transformers() {
    let exp = expected();
    let enc = encoder(BertPooling::Cls);
    let ids = &exp["input_ids"];
    let mask = &exp["attention_mask"];
    let types = &exp["token_type_ids"];
    let hidden = enc.model.forward(ids, Some(mask), Some(types)).unwrap();
    let d = max_abs_diff(&hidden, &exp["last_hidden_state"]);
    assert!(d < 1e-4, "last_hidden_state differs by {d}");

    for (pooling, key) in [
        (BertPooling::Cls, "cls"),
        (BertPooling::Mean, "mean_pooled"),
        (BertPooling::Pooler, "pooler_output"),
    ] {
        let pooled = enc.model.pool(&hidden, Some(mask), pooling).unwrap();
        let d = max_abs_diff(&pooled, &exp[key]);
        assert!(d < 1e-4, "{key} differs by {d}");
    }
}

#[test]
fn bert_token_types_and_mask_matter() {
    // Guards the test above against passing by accident: dropping the token
    // types or the mask must change the hidden states well beyond tolerance.
    let exp = expected();
    let enc = encoder(BertPooling::Mean);
    let ids = &exp["input_ids"];
    let mask = &exp["attention_mask"];
    let no_types = enc.model.forward(ids, Some(mask), None).unwrap();
    assert!(max_abs_diff(&no_types, &exp["last_hidden_state"]) > 1e-2);
    let no_mask = enc
        .model
        .forward(ids, None, Some(&exp["token_type_ids"]))
        .unwrap();
    assert!(max_abs_diff(&no_mask, &exp["last_hidden_state"]) > 1e-2);
    // `embed` derives the mask from pad ids; without token types row 1 and 2
    // (all type 0) must equal the reference mean pooling.
    let e = enc.embed(ids, None).unwrap();
    let d = max_abs_diff(
        &e.narrow(0, 1, 2).unwrap(),
        &exp["mean_pooled"].narrow(0, 1, 2).unwrap(),
    );
    assert!(d < 1e-4, "embed() differs by {d}");
}

#[test]
fn bert_linear_layers_are_addressable_by_checkpoint_path() {
    let enc = encoder(BertPooling::Cls);
    let paths = enc.model.linear_paths();
    // 2 layers x (q, k, v, attn out, intermediate, output) + pooler
    assert_eq!(paths.len(), 13, "{paths:?}");
    assert!(paths.contains(&"bert.encoder.layer.1.attention.self.query".to_string()));
    assert!(paths.contains(&"bert.pooler.dense".to_string()));
}

#[test]
fn bert_missing_weights_and_bad_config_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture_dir().join("config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    let err = BertTextEncoder::from_dir(
        tmp.path(),
        BertPooling::Cls,
        DType::F32,
        &Device::Cpu,
        &LoadMode::Frozen,
    )
    .unwrap_err();
    assert!(matches!(err, ModelError::MissingFile { .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");

    let bad = tmp.path().join("config.json");
    std::fs::write(&bad, r#"{"vocab_size": 50, "hidden_size": 25, "num_hidden_layers": 1, "num_attention_heads": 3, "intermediate_size": 8, "max_position_embeddings": 8}"#).unwrap();
    let err = BertConfig::from_file(&bad).unwrap_err().to_string();
    assert!(
        err.contains(&bad.display().to_string()) && err.contains("multiple"),
        "{err}"
    );
}

#[test]
fn bert_weights_of_wrong_shape_are_listed() {
    // A config that disagrees with the checkpoint (intermediate 40 in the file).
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("config.json")).unwrap())
            .unwrap();
    cfg["intermediate_size"] = 48.into();
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        fixture_dir().join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let err = BertTextEncoder::from_dir(
        tmp.path(),
        BertPooling::Cls,
        DType::F32,
        &Device::Cpu,
        &LoadMode::Frozen,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(
        err.contains("bert.encoder.layer.0.intermediate.dense.weight"),
        "{err}"
    );
}
