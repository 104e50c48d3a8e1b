//! HF `SiglipModel` parity: tiny random-weight model from
//! tools/make_parity_fixtures.py; embeddings, logits (with bias) and hidden
//! states within 1e-4 (f32) for every weight format.

mod support;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use medvlm_models::siglip::{SiglipConfig, SiglipModel};
use medvlm_models::weights::{LoadMode, WeightFile, DEFAULT_IGNORED};
use medvlm_models::{
    ImageEncoder, LinearLayers, LinearWrapper, TextEncoder, TextPrompt, VisionLanguageModel,
    VisualPrompts,
};
use support::{assert_close, fixture, inputs, load_st, max_abs_diff};

fn load(file: &str) -> SiglipModel {
    let cfg = SiglipConfig::from_file(&fixture("siglip").join("config.json")).unwrap();
    let wf = WeightFile::open(fixture("siglip").join(file)).unwrap();
    wf.load(
        DType::F32,
        &Device::Cpu,
        &LoadMode::Frozen,
        DEFAULT_IGNORED,
        |vb| SiglipModel::load(vb, &cfg),
    )
    .unwrap()
}

fn check_outputs(model: &SiglipModel, suffix: &str, tol: f32) {
    let exp = load_st(fixture("siglip").join("expected.safetensors"));
    let e = |k: &str| exp[&format!("{k}{suffix}")].clone();
    let (px, tokens) = inputs("siglip");
    let img = model.encode_image(&px).unwrap();
    let txt = model.encode_text(&tokens).unwrap();
    assert_close("image_embeds", &img.embeds, &e("image_embeds"), tol);
    assert_close("text_embeds", &txt.embeds, &e("text_embeds"), tol);
    assert_close(
        "vision_last_hidden_state",
        &img.last_hidden_state,
        &e("vision_last_hidden_state"),
        tol,
    );
    assert_close(
        "text_last_hidden_state",
        &txt.last_hidden_state,
        &e("text_last_hidden_state"),
        tol,
    );
    let logits = model.logits_per_image(&img.embeds, &txt.embeds).unwrap();
    // exp(1.7) ~ 5.5 scales the cosine similarities.
    assert_close(
        "logits_per_image",
        &logits,
        &e("logits_per_image"),
        tol * 6.0,
    );
}

#[test]
fn siglip_safetensors_matches_transformers() {
    check_outputs(&load("model.safetensors"), "", 1e-4);
}

#[test]
fn siglip_pytorch_bin_matches_transformers() {
    check_outputs(&load("pytorch_model.bin"), "", 1e-4);
}

#[test]
fn siglip_f16_and_bf16_storage_match_rounded_reference() {
    check_outputs(&load("model_f16.safetensors"), "_f16", 1e-4);
    check_outputs(&load("model_bf16.safetensors"), "_bf16", 1e-4);
}

#[test]
fn siglip_bias_and_scale_are_read_from_the_checkpoint() {
    let m = load("model.safetensors");
    let s = m.logit_scale().to_scalar::<f32>().unwrap();
    let b = m.logit_bias().unwrap().to_scalar::<f32>().unwrap();
    assert!((s - 1.7).abs() < 1e-6 && (b + 2.5).abs() < 1e-6, "{s} {b}");
}

#[derive(Debug)]
struct AddConst(f32);
impl LinearWrapper for AddConst {
    fn kind(&self) -> &str {
        "add"
    }
    fn forward(&self, _x: &Tensor, y: Tensor) -> candle_core::Result<Tensor> {
        y + self.0 as f64
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[test]
fn siglip_extension_points() {
    let base = load("model.safetensors");
    let (px, tokens) = inputs("siglip");
    let img0 = base.encode_image(&px).unwrap();
    let txt0 = base.encode_text(&tokens).unwrap();
    // No class token: every token is a patch token.
    assert_eq!(img0.num_prefix_tokens, 0);
    assert_eq!(img0.patch_tokens().unwrap().dims(), &[2, 16, 32]);

    // Text prompt = own token embeddings: identical.
    let emb = base.token_embeddings(&tokens.input_ids).unwrap();
    let p = TextPrompt {
        positions: vec![0, 2],
        vectors: Tensor::cat(
            &[emb.narrow(1, 0, 1).unwrap(), emb.narrow(1, 2, 1).unwrap()],
            1,
        )
        .unwrap(),
    };
    let same = base.encode_text_with(&tokens, Some(&p)).unwrap();
    assert_eq!(max_abs_diff(&same.embeds, &txt0.embeds), 0.0);

    // Visual prompts at index 0.
    let vp = VisualPrompts {
        shallow: Some(Tensor::randn(0f32, 1.0, (3, 32), &Device::Cpu).unwrap()),
        deep: vec![],
    };
    let out = base.encode_image_with(&px, Some(&vp)).unwrap();
    assert_eq!(out.last_hidden_state.dims(), &[2, 19, 32]);
    assert_eq!(out.num_prefix_tokens, 3);
    assert!(max_abs_diff(&out.embeds, &img0.embeds) > 1e-3);

    // Wrapping the pooling head's packed projection changes only images.
    let mut m = base.clone();
    m.wrap_linear(
        "vision_model.head.attention.in_proj",
        Arc::new(AddConst(0.0)),
    )
    .unwrap();
    assert_eq!(
        max_abs_diff(&m.encode_image(&px).unwrap().embeds, &img0.embeds),
        0.0
    );
    m.wrap_linear(
        "vision_model.head.attention.out_proj",
        Arc::new(AddConst(0.5)),
    )
    .unwrap();
    assert!(max_abs_diff(&m.encode_image(&px).unwrap().embeds, &img0.embeds) > 1e-3);
    assert_eq!(
        max_abs_diff(&m.encode_text(&tokens).unwrap().embeds, &txt0.embeds),
        0.0
    );
}

#[test]
fn siglip_448_input_runs_with_784_patch_tokens() {
    // MedSigLIP geometry (448 px, patch 16) on a tiny random model.
    let mut cfg = SiglipConfig::from_file(&fixture("siglip").join("config.json")).unwrap();
    cfg.vision_config.image_size = 448;
    cfg.vision_config.patch_size = 16;
    let vm = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let m = SiglipModel::load(vb, &cfg).unwrap();
    let px = Tensor::randn(0f32, 1.0, (1, 3, 448, 448), &Device::Cpu).unwrap();
    let out = m.encode_image(&px).unwrap();
    assert_eq!(out.patch_tokens().unwrap().dims(), &[1, 784, 32]);
    assert_eq!(out.embeds.dims(), &[1, 32]);
    let wrong = Tensor::zeros((1, 3, 224, 224), DType::F32, &Device::Cpu).unwrap();
    let err = m.encode_image(&wrong).unwrap_err().to_string();
    assert!(err.contains("448"), "{err}");
}
