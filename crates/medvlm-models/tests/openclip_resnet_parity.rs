//! open_clip CLIP with CLIP's ModifiedResNet image tower against open_clip itself, on a tiny
//! random-weight model (every weight and batch-norm statistic random; fixture from
//! tools/make_openclip_resnet_fixture.py): the stem and final feature maps, the
//! attention-pooled image embeddings, the text embeddings with argmax and eos pooling, and
//! the train-mode forward (batch statistics) with the running statistics it leaves behind.

mod support;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use medvlm_models::openclip::{OpenClipConfig, OpenClipResNet, TextPool, CONFIG_FILE};
use medvlm_models::{
    ImageEncoder, LinearLayers, LoadMode, TextEncoder, TokenBatch, VisionLanguageModel,
    VisualPrompts, WeightFile,
};
use support::{assert_close, fixture, load_st};

const FIXTURE: &str = "openclip_resnet";

fn load(pool: Option<TextPool>, mode: &LoadMode) -> OpenClipResNet {
    let dir = fixture(FIXTURE);
    let mut cfg = OpenClipConfig::from_file(&dir.join(CONFIG_FILE)).unwrap();
    if let Some(p) = pool {
        cfg.text.pool = p;
    }
    let file = WeightFile::open(dir.join("open_clip_model.safetensors")).unwrap();
    file.load(
        DType::F32,
        &Device::Cpu,
        mode,
        &["num_batches_tracked"],
        |vb| OpenClipResNet::load(vb, &cfg),
    )
    .unwrap()
}

fn tokens() -> TokenBatch {
    let i = load_st(fixture(FIXTURE).join("inputs.safetensors"));
    let input_ids = i["input_ids"].to_dtype(DType::U32).unwrap();
    let attention_mask = input_ids.ne(0u32).unwrap().to_dtype(DType::U32).unwrap();
    TokenBatch {
        input_ids,
        attention_mask,
    }
}

fn pixels() -> Tensor {
    load_st(fixture(FIXTURE).join("inputs.safetensors"))["pixel_values"].clone()
}

fn nchw(t: &Tensor) -> Tensor {
    t.permute((0, 3, 1, 2)).unwrap()
}

#[test]
fn resnet_clip_matches_open_clip_in_eval_mode() {
    let exp = load_st(fixture(FIXTURE).join("expected.safetensors"));
    let m = OpenClipResNet::from_dir(
        &fixture(FIXTURE),
        DType::F32,
        &Device::Cpu,
        &LoadMode::Frozen,
    )
    .unwrap();
    let x = pixels()
        .permute((0, 2, 3, 1))
        .unwrap()
        .contiguous()
        .unwrap();
    assert_close(
        "stem",
        &nchw(&m.visual.stem(&x).unwrap()),
        &exp["stem"],
        1e-4,
    );
    assert_close(
        "layer4",
        &nchw(&m.visual.feature_map(&x).unwrap()),
        &exp["layer4"],
        1e-4,
    );
    let img = m.encode_image(&pixels()).unwrap();
    assert_close("image_embeds", &img.embeds, &exp["image_embeds"], 1e-4);
    assert_eq!(img.last_hidden_state.dims(), &[2, 4, 128]);
    let txt = m.encode_text(&tokens()).unwrap();
    assert_close("text_embeds", &txt.embeds, &exp["text_embeds"], 1e-4);
    let scale = m
        .logit_scale()
        .to_dtype(DType::F32)
        .unwrap()
        .reshape(1)
        .unwrap();
    assert_close("logit_scale", &scale, &exp["logit_scale"], 0.0);
    assert_eq!(m.family().name(), "openclip");
    // Attention pool q/k/v/c + per text block q/k/v/out/c_fc/c_proj + text projection.
    assert_eq!(m.linear_layers().len(), 4 + 2 * 6 + 1);
    assert!(m
        .linear_paths()
        .contains(&"transformer.resblocks.1.attn.v_proj".to_string()));

    let eos = load(Some(TextPool::Eos(5)), &LoadMode::Frozen);
    let txt = eos.encode_text(&tokens()).unwrap();
    assert_close(
        "text_embeds_eos",
        &txt.embeds,
        &exp["text_embeds_eos"],
        1e-4,
    );
}

#[test]
fn training_mode_uses_batch_statistics_and_updates_running_statistics() {
    let exp = load_st(fixture(FIXTURE).join("expected.safetensors"));
    let varmap = VarMap::new();
    let m = load(None, &LoadMode::Trainable(varmap.clone()));
    m.set_training(true);
    let img = m.encode_image(&pixels()).unwrap();
    assert_close(
        "image_embeds_train",
        &img.embeds,
        &exp["image_embeds_train"],
        1e-4,
    );
    let vars = varmap.data().lock().unwrap();
    for (name, key) in [
        ("visual.bn1.running_mean", "bn1_running_mean_after"),
        ("visual.bn1.running_var", "bn1_running_var_after"),
        (
            "visual.layer2.0.downsample.1.running_mean",
            "ds_running_mean_after",
        ),
        (
            "visual.layer2.0.downsample.1.running_var",
            "ds_running_var_after",
        ),
    ] {
        assert_close(name, vars[name].as_tensor(), &exp[key], 1e-5);
    }
    drop(vars);
    // Back in evaluation mode the (updated) running statistics are used: not the batch's.
    m.set_training(false);
    let eval = m.encode_image(&pixels()).unwrap();
    let d = support::max_abs_diff(&eval.embeds, &exp["image_embeds_train"]);
    assert!(d > 1e-3, "evaluation mode should not use batch statistics");
}

#[test]
fn visual_prompts_and_wrong_input_sizes_are_errors() {
    let m = load(None, &LoadMode::Frozen);
    let prompts = VisualPrompts {
        shallow: Some(Tensor::zeros((2, 128), DType::F32, &Device::Cpu).unwrap()),
        deep: vec![],
    };
    let e = m
        .encode_image_with(&pixels(), Some(&prompts))
        .unwrap_err()
        .to_string();
    assert!(e.contains("ResNet"), "{e}");
    let small = pixels().narrow(2, 0, 32).unwrap().narrow(3, 0, 32).unwrap();
    let e = m.encode_image(&small).unwrap_err().to_string();
    assert!(e.contains("[B, 3, 64, 64]"), "{e}");
}
