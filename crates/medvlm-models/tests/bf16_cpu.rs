//! bf16 on the CPU (linear layers in bf16 with f32 accumulation, everything else f32) against
//! f32 on the committed parity fixtures of every family: each image and text embedding within
//! cosine 0.999 of the f32 one, while not equal to it (the bf16 product really ran), through
//! `load_model` with `dtype: BF16` and through `LinearLayers::pack_linear_bf16`. Trainable
//! models are refused, and leave the model unchanged. On a CPU without AVX512-BF16 the tests
//! check the refusal instead (and say so).

mod support;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use medvlm_models::bf16_gemm::cpu_has_bf16_dot;
use medvlm_models::biomedclip::BiomedClip;
use medvlm_models::openclip::OpenClipResNet;
use medvlm_models::{
    load_model_dir, LinearLayers, LoadMode, LoadOptions, TokenBatch, VisionLanguageModel,
};
use support::{fixture, inputs, load_st};

/// The bf16 model's image and text embeddings against the f32 model's.
fn compare(
    name: &str,
    f32_model: &dyn VisionLanguageModel,
    bf16_model: &dyn VisionLanguageModel,
    pixels: &Tensor,
    tokens: &TokenBatch,
) {
    let layers = bf16_model.linear_layers();
    assert!(!layers.is_empty(), "{name}: no linear layers");
    assert!(
        layers.iter().all(|l| l.is_bf16()),
        "{name}: every linear layer runs in bf16"
    );
    assert!(f32_model.linear_layers().iter().all(|l| !l.is_bf16()));
    assert_eq!(bf16_model.dtype(), DType::F32, "{name}: f32 activations");
    support::assert_embeddings_near_f32(name, "bf16", f32_model, bf16_model, pixels, tokens);
}

fn bf16_options() -> LoadOptions {
    LoadOptions {
        dtype: DType::BF16,
        ..LoadOptions::default()
    }
}

/// On a CPU without AVX512-BF16, `load_model` with bf16 must be refused, naming it.
fn refused_here(family: &str) -> bool {
    if cpu_has_bf16_dot() {
        return false;
    }
    let e = load_model_dir(&fixture(family), &bf16_options())
        .unwrap_err()
        .to_string();
    assert!(e.contains("AVX512-BF16") && e.contains("use f32"), "{e}");
    eprintln!("{family}: no AVX512-BF16 kernel here (CPU or build); checked the refusal only");
    true
}

#[test]
fn clip_and_siglip_load_in_bf16_and_match_f32_embeddings() {
    for family in ["clip", "siglip"] {
        if refused_here(family) {
            continue;
        }
        let f = load_model_dir(&fixture(family), &LoadOptions::default()).unwrap();
        let b = load_model_dir(&fixture(family), &bf16_options()).unwrap();
        let (px, tokens) = inputs(family);
        compare(family, f.model.as_ref(), b.model.as_ref(), &px, &tokens);
    }
}

#[test]
fn biomedclip_in_bf16_matches_f32_embeddings() {
    if refused_here("biomedclip") {
        return;
    }
    let dir = fixture("biomedclip");
    let f = BiomedClip::from_dir(&dir, DType::F32, &Device::Cpu, &LoadMode::Frozen).unwrap();
    let b = load_model_dir(&dir, &bf16_options()).unwrap();
    let exp = load_st(dir.join("expected.safetensors"));
    let input_ids = exp["input_ids"].to_dtype(DType::U32).unwrap();
    let tokens = TokenBatch {
        attention_mask: f.text.pad_mask(&input_ids).unwrap(),
        input_ids,
    };
    compare(
        "biomedclip",
        &f,
        b.model.as_ref(),
        &exp["pixel_values"],
        &tokens,
    );
}

#[test]
fn openclip_resnet_packed_in_bf16_matches_f32_embeddings() {
    let dir = fixture("openclip_resnet");
    let load =
        || OpenClipResNet::from_dir(&dir, DType::F32, &Device::Cpu, &LoadMode::Frozen).unwrap();
    let (f, mut b) = (load(), load());
    if !cpu_has_bf16_dot() {
        let e = b.pack_linear_bf16().unwrap_err().to_string();
        assert!(e.contains("AVX512-BF16"), "{e}");
        assert!(b.linear_layers().iter().all(|l| !l.is_bf16()));
        eprintln!(
            "openclip_resnet: no AVX512-BF16 kernel here (CPU or build); checked the refusal only"
        );
        return;
    }
    let n = b.pack_linear_bf16().unwrap();
    assert_eq!(n, b.linear_layers().len());
    let i = load_st(dir.join("inputs.safetensors"));
    let input_ids = i["input_ids"].to_dtype(DType::U32).unwrap();
    let tokens = TokenBatch {
        attention_mask: input_ids.ne(0u32).unwrap().to_dtype(DType::U32).unwrap(),
        input_ids,
    };
    compare("openclip_resnet", &f, &b, &i["pixel_values"], &tokens);
}

#[test]
fn trainable_models_are_refused_and_left_unchanged() {
    let dir = fixture("clip");
    let e = load_model_dir(
        &dir,
        &LoadOptions {
            mode: LoadMode::Trainable(VarMap::new()),
            ..bf16_options()
        },
    )
    .unwrap_err()
    .to_string();
    if cpu_has_bf16_dot() {
        assert!(e.contains("inference") && e.contains("f32"), "{e}");
    } else {
        assert!(e.contains("AVX512-BF16"), "{e}");
    }
    let mut m = load_model_dir(
        &dir,
        &LoadOptions {
            mode: LoadMode::Trainable(VarMap::new()),
            ..LoadOptions::default()
        },
    )
    .unwrap();
    let e = m.model.pack_linear_bf16().unwrap_err().to_string();
    if cpu_has_bf16_dot() {
        // The first layer is named, and no layer was switched.
        let first = m.model.linear_layers()[0].path().to_string();
        assert!(e.contains(&first) && e.contains("trainable"), "{e}");
    }
    assert!(m.model.linear_layers().iter().all(|l| !l.is_bf16()));
}
