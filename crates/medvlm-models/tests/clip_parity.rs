//! HF `CLIPModel` parity: a tiny random-weight model made by
//! tools/make_parity_fixtures.py (transformers) must give the same
//! embeddings, logits and hidden states within 1e-4 (f32), from every
//! weight format, and the extension points must behave as documented.

mod support;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use medvlm_models::clip::{ClipConfig, ClipModel};
use medvlm_models::weights::{LoadMode, WeightFile, DEFAULT_IGNORED};
use medvlm_models::{
    ImageEncoder, LinearLayers, LinearWrapper, ModelError, TextEncoder, TextPrompt,
    VisionLanguageModel, VisualPrompts,
};
use support::{assert_close, fixture, inputs, load_st, max_abs_diff};

fn config() -> ClipConfig {
    ClipConfig::from_file(&fixture("clip").join("config.json")).unwrap()
}

fn load(file: &str, mode: &LoadMode) -> ClipModel {
    let cfg = config();
    let wf = WeightFile::open(fixture("clip").join(file)).unwrap();
    wf.load(DType::F32, &Device::Cpu, mode, DEFAULT_IGNORED, |vb| {
        ClipModel::load(vb, &cfg)
    })
    .unwrap()
}

fn check_outputs(model: &ClipModel, suffix: &str, tol: f32) {
    let exp = load_st(fixture("clip").join("expected.safetensors"));
    let e = |k: &str| exp[&format!("{k}{suffix}")].clone();
    let (px, tokens) = inputs("clip");
    let img = model.encode_image(&px).unwrap();
    let txt = model.encode_text(&tokens).unwrap();
    assert_close("image_embeds", &img.embeds, &e("image_embeds"), tol);
    assert_close("text_embeds", &txt.embeds, &e("text_embeds"), tol);
    assert_close("vision_pooled", &img.pooled, &e("vision_pooled"), tol);
    assert_close("text_pooled", &txt.pooled, &e("text_pooled"), tol);
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
    // Logits are scaled by exp(logit_scale) ~ 14.3: same relative tolerance.
    assert_close(
        "logits_per_image",
        &logits,
        &e("logits_per_image"),
        tol * 15.0,
    );
}

#[test]
fn clip_safetensors_matches_transformers() {
    check_outputs(&load("model.safetensors", &LoadMode::Frozen), "", 1e-4);
}

#[test]
fn clip_pytorch_bin_matches_transformers() {
    check_outputs(&load("pytorch_model.bin", &LoadMode::Frozen), "", 1e-4);
}

#[test]
fn clip_f16_and_bf16_storage_match_rounded_reference() {
    check_outputs(
        &load("model_f16.safetensors", &LoadMode::Frozen),
        "_f16",
        1e-4,
    );
    check_outputs(
        &load("model_bf16.safetensors", &LoadMode::Frozen),
        "_bf16",
        1e-4,
    );
}

#[test]
fn clip_wrong_config_lists_missing_and_misshapen_tensors() {
    let mut cfg = config();
    cfg.vision_config.num_hidden_layers = 3;
    cfg.projection_dim = 20;
    let wf = WeightFile::open(fixture("clip").join("model.safetensors")).unwrap();
    let err = wf
        .load(
            DType::F32,
            &Device::Cpu,
            &LoadMode::Frozen,
            DEFAULT_IGNORED,
            |vb| ClipModel::load(vb, &cfg),
        )
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ModelError::WeightsMismatch { .. }), "{msg}");
    assert!(msg.contains("model.safetensors"), "{msg}");
    assert!(
        msg.contains("missing:    vision_model.encoder.layers.2.mlp.fc1.weight [64, 32]"),
        "{msg}"
    );
    assert!(
        msg.contains("wrong shape: visual_projection.weight expected [20, 32], found [24, 32]"),
        "{msg}"
    );

    // Fewer layers than the file: the extra tensors are reported as unexpected.
    let mut cfg = config();
    cfg.text_config.num_hidden_layers = 1;
    let err = wf
        .load(
            DType::F32,
            &Device::Cpu,
            &LoadMode::Frozen,
            DEFAULT_IGNORED,
            |vb| ClipModel::load(vb, &cfg),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unexpected: text_model.encoder.layers.1.self_attn.q_proj.weight [32, 32]"),
        "{err}"
    );
}

#[test]
fn clip_trainable_load_registers_vars_and_gets_gradients() {
    let vm = candle_nn::VarMap::new();
    let model = load("model.safetensors", &LoadMode::Trainable(vm.clone()));
    let names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
    let file = WeightFile::open(fixture("clip").join("model.safetensors")).unwrap();
    assert_eq!(names.len(), file.tensors().count());
    let (px, tokens) = inputs("clip");
    let img = model.encode_image(&px).unwrap();
    let txt = model.encode_text(&tokens).unwrap();
    let loss = model
        .logits_per_image(&img.embeds, &txt.embeds)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let data = vm.data().lock().unwrap();
    for name in [
        "text_model.encoder.layers.0.self_attn.q_proj.bias",
        "vision_model.encoder.layers.1.mlp.fc2.bias",
        "logit_scale",
    ] {
        let g = grads.get(data[name].as_tensor()).expect(name);
        let n = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n > 0.0, "{name} has zero gradient");
    }
}

/// LoRA-style wrapper used to test the hook: y + x Aᵀ Bᵀ.
#[derive(Debug)]
struct LowRank {
    a: Tensor,
    b: Tensor,
}

impl LinearWrapper for LowRank {
    fn kind(&self) -> &str {
        "test-lora"
    }
    fn forward(&self, x: &Tensor, y: Tensor) -> candle_core::Result<Tensor> {
        let d = x
            .broadcast_matmul(&self.a.t()?)?
            .broadcast_matmul(&self.b.t()?)?;
        y + d
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[test]
fn clip_linear_wrappers_zero_lora_is_identity_and_nonzero_equals_merged_weight() {
    let (px, tokens) = inputs("clip");
    let base = load("model.safetensors", &LoadMode::Frozen);
    let base_txt = base.encode_text(&tokens).unwrap().embeds;
    let base_img = base.encode_image(&px).unwrap().embeds;
    let path = "text_model.encoder.layers.1.self_attn.v_proj";
    assert!(base.linear_paths().iter().any(|p| p == path));
    assert_eq!(base.linear_paths().len(), 2 * 2 * 6 + 2);

    let dev = Device::Cpu;
    let a = Tensor::randn(0f32, 0.3, (2, 32), &dev).unwrap();
    let zero_b = Tensor::zeros((32, 2), DType::F32, &dev).unwrap();
    let mut m = base.clone();
    m.wrap_linear(
        path,
        Arc::new(LowRank {
            a: a.clone(),
            b: zero_b,
        }),
    )
    .unwrap();
    assert_eq!(
        max_abs_diff(&m.encode_text(&tokens).unwrap().embeds, &base_txt),
        0.0
    );

    let b = Tensor::randn(0f32, 0.3, (32, 2), &dev).unwrap();
    let mut wrapped = base.clone();
    wrapped
        .wrap_linear(
            path,
            Arc::new(LowRank {
                a: a.clone(),
                b: b.clone(),
            }),
        )
        .unwrap();
    let got = wrapped.encode_text(&tokens).unwrap().embeds;
    assert!(max_abs_diff(&got, &base_txt) > 1e-3, "LoRA had no effect");
    let mut merged = base.clone();
    let layer = merged.linear_mut(path).unwrap();
    let w = (layer.weight() + b.matmul(&a).unwrap()).unwrap();
    layer.set_weight(w).unwrap();
    assert_close(
        "W+BA",
        &got,
        &merged.encode_text(&tokens).unwrap().embeds,
        1e-5,
    );
    // The vision tower is untouched by a text-layer wrapper.
    assert_eq!(
        max_abs_diff(&wrapped.encode_image(&px).unwrap().embeds, &base_img),
        0.0
    );
    assert!(merged
        .wrap_linear("text_model.nope", Arc::new(LowRank { a, b }))
        .is_err());
}

#[test]
fn clip_text_prompt_with_own_embeddings_is_identity() {
    let model = load("model.safetensors", &LoadMode::Frozen);
    let (_, tokens) = inputs("clip");
    let base = model.encode_text(&tokens).unwrap();
    let emb = model.token_embeddings(&tokens.input_ids).unwrap();
    // Per-text vectors [B, P, D] at positions 1..=3: the tokens' own embeddings.
    let own = emb.narrow(1, 1, 3).unwrap();
    let prompt = TextPrompt {
        positions: vec![1, 2, 3],
        vectors: own,
    };
    let same = model.encode_text_with(&tokens, Some(&prompt)).unwrap();
    assert_eq!(max_abs_diff(&same.embeds, &base.embeds), 0.0);
    // Shared context vectors [P, D] change the output.
    let ctx = Tensor::randn(0f32, 1.0, (3, 32), &Device::Cpu).unwrap();
    let changed = model
        .encode_text_with(
            &tokens,
            Some(&TextPrompt {
                positions: vec![1, 2, 3],
                vectors: ctx,
            }),
        )
        .unwrap();
    assert!(max_abs_diff(&changed.embeds, &base.embeds) > 1e-3);
}

#[test]
fn clip_visual_prompts_extend_the_sequence() {
    let model = load("model.safetensors", &LoadMode::Frozen);
    let (px, _) = inputs("clip");
    let base = model.encode_image(&px).unwrap();
    assert_eq!(base.patch_tokens().unwrap().dims(), &[2, 16, 32]);
    let dev = Device::Cpu;
    let shallow = Tensor::randn(0f32, 1.0, (4, 32), &dev).unwrap();
    let p = VisualPrompts {
        shallow: Some(shallow.clone()),
        deep: vec![],
    };
    let out = model.encode_image_with(&px, Some(&p)).unwrap();
    assert_eq!(out.num_prefix_tokens, 5);
    assert_eq!(out.last_hidden_state.dims(), &[2, 1 + 4 + 16, 32]);
    assert_eq!(out.patch_tokens().unwrap().dims(), &[2, 16, 32]);
    assert!(max_abs_diff(&out.embeds, &base.embeds) > 1e-3);
    // Deep prompts equal to the running tokens' replacement: a different
    // prompt before layer 1 changes the output; deep[0] is ignored.
    let deep = VisualPrompts {
        shallow: Some(shallow.clone()),
        deep: vec![Some(Tensor::zeros((4, 32), DType::F32, &dev).unwrap())],
    };
    let out0 = model.encode_image_with(&px, Some(&deep)).unwrap();
    assert_eq!(max_abs_diff(&out0.embeds, &out.embeds), 0.0);
    let deep1 = VisualPrompts {
        shallow: Some(shallow),
        deep: vec![None, Some(Tensor::randn(0f32, 1.0, (4, 32), &dev).unwrap())],
    };
    let out1 = model.encode_image_with(&px, Some(&deep1)).unwrap();
    assert!(max_abs_diff(&out1.embeds, &out.embeds) > 1e-3);
}

#[test]
fn clip_extension_points_are_differentiable() {
    // Frozen backbone; only the prompt vectors and the LoRA factors are Vars.
    let mut model = load("model.safetensors", &LoadMode::Frozen);
    let (px, tokens) = inputs("clip");
    let dev = Device::Cpu;
    let ctx = candle_core::Var::randn(0f32, 0.5, (2, 32), &dev).unwrap();
    let vpt = candle_core::Var::randn(0f32, 0.5, (3, 32), &dev).unwrap();
    let a = candle_core::Var::randn(0f32, 0.1, (2, 32), &dev).unwrap();
    let b = candle_core::Var::randn(0f32, 0.1, (64, 2), &dev).unwrap(); // fc1: 32 -> 64
    model
        .wrap_linear(
            "vision_model.encoder.layers.0.mlp.fc1",
            Arc::new(LowRank {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
            }),
        )
        .unwrap();
    let txt = model
        .encode_text_with(
            &tokens,
            Some(&TextPrompt {
                positions: vec![1, 2],
                vectors: ctx.as_tensor().clone(),
            }),
        )
        .unwrap();
    let img = model
        .encode_image_with(
            &px,
            Some(&VisualPrompts {
                shallow: Some(vpt.as_tensor().clone()),
                deep: vec![],
            }),
        )
        .unwrap();
    let loss = model
        .logits_per_image(&img.embeds, &txt.embeds)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    for (name, v) in [("ctx", &ctx), ("vpt", &vpt), ("lora A", &a), ("lora B", &b)] {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let n = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n > 0.0, "{name}: zero gradient");
    }
}

#[test]
fn clip_hub_style_config_parses_with_legacy_fields() {
    // Shape of openai/clip-vit-base-patch16's config.json (extra keys ignored).
    let text = r#"{
      "architectures": ["CLIPModel"], "initializer_factor": 1.0, "logit_scale_init_value": 2.6592,
      "model_type": "clip", "projection_dim": 512, "torch_dtype": "float32",
      "text_config": {"bos_token_id": 0, "eos_token_id": 2, "hidden_act": "quick_gelu",
        "hidden_size": 512, "intermediate_size": 2048, "max_position_embeddings": 77,
        "num_attention_heads": 8, "num_hidden_layers": 12, "vocab_size": 49408},
      "text_config_dict": {"hidden_size": 512},
      "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
        "num_hidden_layers": 12, "patch_size": 16, "image_size": 224},
      "vision_config_dict": null
    }"#;
    let cfg = ClipConfig::from_json(text, std::path::Path::new("config.json")).unwrap();
    assert_eq!(cfg.vision_config.patch_size, 16);
    assert_eq!(cfg.text_config.eos_token_id, 2);
    assert_eq!(cfg.text_config.layer_norm_eps, 1e-5);
    let bad = text.replace("\"patch_size\": 16", "\"patch_size\": 15");
    let err = ClipConfig::from_json(&bad, std::path::Path::new("cfg/config.json"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cfg/config.json") && err.contains("patch_size"),
        "{err}"
    );
}
