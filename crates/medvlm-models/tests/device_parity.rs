//! The parity fixtures (tiny random-weight models and their reference outputs, made by
//! tools/make_parity_fixtures.py) loaded through `load_model` on the device named by
//! `MEDVLM_TEST_DEVICE`: `cpu` when unset, `cuda` for GPU 0 in a build with
//! `--features cuda`. `benchmarks/gpu_check.sh` runs this file on a GPU; on the CPU it checks
//! the device-generic loading path every user goes through.

mod support;

use candle_core::{DType, Device, Tensor};
use medvlm_models::openclip::OpenClipResNet;
use medvlm_models::{load_model, LoadMode, LoadOptions, TokenBatch, VisionLanguageModel};
use support::{fixture, load_st, max_abs_diff};

/// The device under test, refused loudly when it cannot be opened (never a silent CPU run).
fn device() -> Device {
    match std::env::var("MEDVLM_TEST_DEVICE").as_deref() {
        Err(_) | Ok("cpu") => Device::Cpu,
        Ok("cuda") => Device::new_cuda(0).unwrap_or_else(|e| {
            panic!("MEDVLM_TEST_DEVICE=cuda needs a CUDA GPU and --features cuda: {e}")
        }),
        Ok(other) => panic!("MEDVLM_TEST_DEVICE={other:?}: expected cpu or cuda"),
    }
}

/// Loads `family`'s fixture on the device under test through `load_model` (what every user
/// goes through) and compares both embeddings with the reference implementation's.
fn check(family: &str, pixels: &str, ids: &str, image_key: &str, text_key: &str, tol: f32) {
    let dev = device();
    let opts = LoadOptions {
        device: dev.clone(),
        dtype: DType::F32,
        ..LoadOptions::default()
    };
    let m = load_model(fixture(family).to_str().unwrap(), &opts)
        .unwrap_or_else(|e| panic!("{family}: loading on {dev:?}: {e}"));
    compare(
        family,
        m.model.as_ref(),
        pixels,
        ids,
        image_key,
        text_key,
        tol,
    );
}

/// Compares both embeddings of `model` (already on the device under test) with the reference
/// implementation's, within `tol` (max absolute difference).
fn compare(
    family: &str,
    model: &dyn VisionLanguageModel,
    pixels: &str,
    ids: &str,
    image_key: &str,
    text_key: &str,
    tol: f32,
) {
    let dev = device();
    let dir = fixture(family);
    let expected = load_st(dir.join("expected.safetensors"));
    let inputs = if dir.join("inputs.safetensors").exists() {
        load_st(dir.join("inputs.safetensors"))
    } else {
        expected.clone()
    };
    let to_dev = |t: &Tensor| t.to_device(&dev).unwrap();
    let input_ids = to_dev(&inputs[ids].to_dtype(DType::U32).unwrap());
    let attention_mask = match inputs.get("attention_mask") {
        Some(mask) => to_dev(&mask.to_dtype(DType::U32).unwrap()),
        // The open_clip layouts mask padding (id 0) themselves.
        None => input_ids.ne(0u32).unwrap().to_dtype(DType::U32).unwrap(),
    };
    let tokens = TokenBatch {
        input_ids,
        attention_mask,
    };
    let img = model.encode_image(&to_dev(&inputs[pixels])).unwrap();
    let txt = model.encode_text(&tokens).unwrap();
    assert!(
        img.embeds.device().same_device(&dev),
        "{family}: ran off the device"
    );
    for (what, got, key) in [
        ("image", &img.embeds, image_key),
        ("text", &txt.embeds, text_key),
    ] {
        let got = got.to_device(&Device::Cpu).unwrap();
        let d = max_abs_diff(&got, &expected[key]);
        assert!(
            d <= tol,
            "{family} {what} embeddings on {dev:?}: max |diff| {d} > {tol}"
        );
    }
}

#[test]
fn clip_fixture_matches_transformers_on_the_test_device() {
    check(
        "clip",
        "pixel_values",
        "input_ids",
        "image_embeds",
        "text_embeds",
        1e-4,
    );
}

#[test]
fn siglip_fixture_matches_transformers_on_the_test_device() {
    check(
        "siglip",
        "pixel_values",
        "input_ids",
        "image_embeds",
        "text_embeds",
        1e-4,
    );
}

#[test]
fn biomedclip_fixture_matches_open_clip_on_the_test_device() {
    check(
        "biomedclip",
        "pixel_values",
        "input_ids",
        "image_features",
        "text_features",
        1e-4,
    );
}

#[test]
fn openclip_resnet_fixture_matches_open_clip_on_the_test_device() {
    // The fixture holds open_clip's weights and config but no tokenizer file (its inputs are
    // token ids), so it is loaded as the model alone, on the device under test.
    let model = OpenClipResNet::from_dir(
        &fixture("openclip_resnet"),
        DType::F32,
        &device(),
        &LoadMode::Frozen,
    )
    .unwrap_or_else(|e| panic!("openclip_resnet: loading on {:?}: {e}", device()));
    compare(
        "openclip_resnet",
        &model,
        "pixel_values",
        "input_ids",
        "image_embeds",
        "text_embeds",
        1e-4,
    );
}
