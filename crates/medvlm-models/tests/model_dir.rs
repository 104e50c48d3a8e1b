//! Model directories: family detection, loading through the normal path,
//! saving a from-scratch model that loads back, and model sources.

mod support;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use medvlm_models::clip::{ClipConfig, ClipModel};
use medvlm_models::model_dir::{save_model_dir, varmap_tensors, SaveModelDir};
use medvlm_models::preprocess::{PreprocessConfig, Resize};
use medvlm_models::source::{resolve_in_cache, ModelSource};
use medvlm_models::{load_model, load_model_dir, Family, LoadOptions, ModelError};
use support::{assert_close, fixture, inputs, load_st, max_abs_diff};

#[test]
fn fixture_dirs_load_with_tokenizer_and_preprocessing() {
    for (family, want, ctx) in [("clip", Family::Clip, 24), ("siglip", Family::Siglip, 64)] {
        let m = load_model(fixture(family).to_str().unwrap(), &LoadOptions::default()).unwrap();
        assert_eq!(m.family, want);
        assert_eq!(m.tokenizer.context_length(), ctx);
        assert_eq!(m.preprocess.output_size(), Some((32, 32)));
        let texts: Vec<String> = serde_json::from_str(
            &std::fs::read_to_string(fixture(family).join("texts.json")).unwrap(),
        )
        .unwrap();
        let tokens = m.tokenizer.encode_batch(&texts, &Device::Cpu).unwrap();
        let (px, _) = inputs(family);
        let exp = load_st(fixture(family).join("expected.safetensors"));
        let t = m.model.encode_text(&tokens).unwrap().embeds;
        let i = m.model.encode_image(&px).unwrap().embeds;
        assert_close("text", &t, &exp["text_embeds"], 1e-4);
        assert_close("image", &i, &exp["image_embeds"], 1e-4);
    }
}

#[test]
fn unknown_family_and_missing_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_model_dir(dir.path(), &LoadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("config.json"), "{err}");

    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let err = load_model_dir(dir.path(), &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, ModelError::UnknownFamily { .. }), "{err}");
    assert!(err.to_string().contains("llama") && err.to_string().contains("config.json"));

    std::fs::copy(
        fixture("clip").join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let err = load_model_dir(dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("pytorch_model.bin"),
        "{err}"
    );

    std::fs::write(dir.path().join("model.safetensors"), b"garbage").unwrap();
    let err = load_model_dir(dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");

    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "clip", "text_config": 3}"#,
    )
    .unwrap();
    let err = load_model_dir(dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("invalid config") && err.contains("config.json"),
        "{err}"
    );
}

#[test]
fn from_scratch_model_saves_and_loads_back() {
    let vocab = {
        let tok = tokenizers::Tokenizer::from_file(fixture("clip").join("tokenizer.json")).unwrap();
        tok.get_vocab_size(true)
    };
    let cfg = ClipConfig::tiny(vocab, 32, 8);
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let model = ClipModel::load(vb, &cfg).unwrap();
    // Random init (not all zeros) so the round trip is meaningful.
    let tensors = varmap_tensors(&vm).unwrap();
    let w = &tensors["text_model.encoder.layers.0.mlp.fc1.weight"];
    assert!(
        w.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny-clip");
    let tok = tokenizers::Tokenizer::from_file(fixture("clip").join("tokenizer.json")).unwrap();
    save_model_dir(
        &out,
        &SaveModelDir {
            config: serde_json::to_value(&cfg).unwrap(),
            tensors: &tensors,
            tokenizer: &tok,
            pad_token: Some("<|endoftext|>"),
            preprocess: &PreprocessConfig::clip(32),
            processor_type: "CLIPImageProcessor",
        },
    )
    .unwrap();
    let loaded = load_model_dir(&out, &LoadOptions::default()).unwrap();
    assert_eq!(loaded.family, Family::Clip);
    assert_eq!(loaded.preprocess.resize, Some(Resize::ShortestEdge(32)));
    assert_eq!(
        loaded.tokenizer.pad_id(),
        tok.token_to_id("<|endoftext|>").unwrap()
    );
    let (px, _) = inputs("clip");
    let a = model.encode_image_embeds(&px);
    let b = loaded.model.encode_image(&px).unwrap().embeds;
    // The trainable model runs the differentiable layer-norm/softmax path,
    // the loaded one the fused kernels: equal up to rounding.
    assert_close("round trip", &a, &b, 1e-5);
    assert!(max_abs_diff(&a, &b.zeros_like().unwrap()) > 1e-3);
}

trait Embeds {
    fn encode_image_embeds(&self, px: &candle_core::Tensor) -> candle_core::Tensor;
}
impl Embeds for ClipModel {
    fn encode_image_embeds(&self, px: &candle_core::Tensor) -> candle_core::Tensor {
        use medvlm_models::ImageEncoder;
        self.encode_image(px).unwrap().embeds
    }
}

#[test]
fn hub_cache_resolution_and_presets() {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--org--tiny");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots").join("abc123")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "abc123\n").unwrap();
    let p = resolve_in_cache(cache.path(), "org/tiny", None).unwrap();
    assert_eq!(p, repo.join("snapshots").join("abc123"));
    assert_eq!(
        resolve_in_cache(cache.path(), "org/tiny", Some("abc123")).unwrap(),
        p
    );
    let err = resolve_in_cache(cache.path(), "org/other", None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("models--org--other") && err.contains("config.json"),
        "{err}"
    );
    let err = resolve_in_cache(cache.path(), "org/tiny", Some("v2"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("v2"), "{err}");

    assert_eq!(
        ModelSource::parse("hf:google/medsiglip-448@main").unwrap(),
        ModelSource::Hub {
            repo: "google/medsiglip-448".into(),
            revision: Some("main".into())
        }
    );
    assert_eq!(
        ModelSource::parse("pubmedclip").unwrap(),
        ModelSource::Hub {
            repo: "flaviagiammarino/pubmed-clip-vit-base-patch32".into(),
            revision: None
        }
    );
    assert!(ModelSource::parse("hf:justone").is_err());
    assert!(ModelSource::parse("/no/such/dir/or/preset").is_err());
}

#[test]
fn biomedclip_layout_loads_through_the_common_path() {
    // Fixture made by tools/make_biomedclip_fixture.py (open_clip reference).
    let dir = fixture("biomedclip");
    let m = load_model(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(m.family, Family::Biomedclip);
    assert_eq!(m.tokenizer.context_length(), 16);
    assert_eq!(m.preprocess.output_size(), Some((32, 32)));
    let texts: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("texts.json")).unwrap()).unwrap();
    let tokens = m.tokenizer.encode_batch(&texts, &Device::Cpu).unwrap();
    let exp = load_st(dir.join("expected.safetensors"));
    let want_ids: Vec<Vec<u32>> = exp["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_eq!(tokens.input_ids.to_vec2::<u32>().unwrap(), want_ids);
    let t = m.model.encode_text(&tokens).unwrap().embeds;
    assert_close("biomedclip text", &t, &exp["text_features"], 1e-4);
    let i = m.model.encode_image(&exp["pixel_values"]).unwrap().embeds;
    assert_close("biomedclip image", &i, &exp["image_features"], 1e-4);
}

#[test]
fn open_clip_native_layouts_are_detected_and_the_vit_refused_by_name() {
    use medvlm_models::model_dir::detect_family;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("open_clip_config.json");
    std::fs::copy(
        fixture("openclip_resnet").join("open_clip_config.json"),
        &cfg,
    )
    .unwrap();
    assert_eq!(detect_family(dir.path()).unwrap(), Family::OpenClip);
    // Without weights: an error naming the files looked for.
    let err = load_model_dir(dir.path(), &LoadOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("open_clip_model.safetensors"),
        "{err}"
    );
    // open_clip's own ViT (an integer `layers`, no timm model) is refused by name.
    std::fs::write(
        &cfg,
        r#"{"model_cfg": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
            "text_cfg": {"width": 512, "heads": 8, "layers": 12}}}"#,
    )
    .unwrap();
    assert_eq!(detect_family(dir.path()).unwrap(), Family::OpenClip);
    let err = load_model_dir(dir.path(), &LoadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("VisionTransformer"), "{err}");
    // A timm tower is the BiomedCLIP layout.
    std::fs::copy(fixture("biomedclip").join("open_clip_config.json"), &cfg).unwrap();
    assert_eq!(detect_family(dir.path()).unwrap(), Family::Biomedclip);
}
