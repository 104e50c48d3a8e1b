//! Hidden states of intermediate image-tower layers (`ImageEncoder::encode_image_layers`,
//! what CLIPSeg-style dense heads read) on the tiny random-weight parity fixtures (2-layer
//! vision towers):
//!
//! - the last layer equals the full forward's last hidden state: bit for bit against
//!   `encode_image` where the family returns it before the final norm (CLIP), and within 1e-4
//!   of the reference implementation's output once that norm is applied (SigLIP, BiomedCLIP);
//! - layer 1 equals the last hidden state of the same weights loaded as a 1-layer tower (an
//!   independent path through the existing forward);
//! - layers come back in the order asked; a layer 0, beyond the depth or none is an error
//!   naming the depth; a ResNet tower says it has no per-layer tokens.

mod support;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use medvlm_models::biomedclip::{BiomedClip, BiomedClipConfig};
use medvlm_models::clip::{ClipConfig, ClipModel};
use medvlm_models::openclip::OpenClipResNet;
use medvlm_models::siglip::{SiglipConfig, SiglipModel};
use medvlm_models::timm_vit::TimmVit;
use medvlm_models::weights::{LoadMode, WeightFile};
use medvlm_models::ImageEncoder;
use support::{assert_close, fixture, inputs, load_st, max_abs_diff};

fn clip(layers: usize) -> ClipModel {
    let mut cfg = ClipConfig::from_file(&fixture("clip").join("config.json")).unwrap();
    cfg.vision_config.num_hidden_layers = layers;
    let wf = WeightFile::open(fixture("clip").join("model.safetensors")).unwrap();
    // A truncated tower leaves the later layers' tensors unused.
    wf.load(
        DType::F32,
        &Device::Cpu,
        &LoadMode::Frozen,
        &["position_ids", "vision_model.encoder.layers.1."],
        |vb| ClipModel::load(vb, &cfg),
    )
    .unwrap()
}

fn siglip(layers: usize) -> SiglipModel {
    let mut cfg = SiglipConfig::from_file(&fixture("siglip").join("config.json")).unwrap();
    cfg.vision_config.num_hidden_layers = layers;
    let wf = WeightFile::open(fixture("siglip").join("model.safetensors")).unwrap();
    wf.load(
        DType::F32,
        &Device::Cpu,
        &LoadMode::Frozen,
        &["position_ids", "vision_model.encoder.layers.1."],
        |vb| SiglipModel::load(vb, &cfg),
    )
    .unwrap()
}

fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Tensor {
    use candle_core::Module;
    medvlm_models::transformer::LayerNorm::new(w.clone(), b.clone(), eps as f64)
        .forward(x)
        .unwrap()
}

#[test]
fn clip_last_layer_is_the_forward_and_layer_one_is_a_one_layer_tower() {
    let full = clip(2);
    let (px, _) = inputs("clip");
    let out = full.encode_image(&px).unwrap();
    let states = full.encode_image_layers(&px, &[2, 1]).unwrap();
    assert_eq!(states.layers, vec![2, 1]);
    assert_eq!(states.num_prefix_tokens, 1);
    assert_eq!(states.hidden_states[0].dims(), &[2, 17, 32]);
    // Layer 2 is the last hidden state (before post_layernorm): same computation, same bits.
    assert_eq!(
        max_abs_diff(&states.hidden_states[0], &out.last_hidden_state),
        0.0
    );
    assert_eq!(
        max_abs_diff(
            &states.patch_tokens(0).unwrap(),
            &out.patch_tokens().unwrap()
        ),
        0.0
    );
    // ... and transformers' CLIPVisionModel output.
    let exp = load_st(fixture("clip").join("expected.safetensors"));
    assert_close(
        "layer 2 vs transformers",
        &states.hidden_states[0],
        &exp["vision_last_hidden_state"],
        1e-4,
    );
    // Layer 1 = the output of a tower that has only the first layer.
    let one = clip(1).encode_image(&px).unwrap();
    assert_eq!(
        max_abs_diff(&states.hidden_states[1], &one.last_hidden_state),
        0.0
    );
    // The two layers differ (the check above is not comparing a tensor with itself).
    assert!(max_abs_diff(&states.hidden_states[0], &states.hidden_states[1]) > 1e-2);
    // Asking only for layer 1 runs one layer and gives the same tensor.
    let only = full.encode_image_layers(&px, &[1]).unwrap();
    assert_eq!(
        max_abs_diff(&only.hidden_states[0], &states.hidden_states[1]),
        0.0
    );
    assert!(states.patch_tokens(2).is_err());
}

#[test]
fn layer_out_of_range_is_an_error_naming_the_depth() {
    let m = clip(2);
    let (px, _) = inputs("clip");
    for bad in [vec![3], vec![1, 0], vec![]] {
        let err = m.encode_image_layers(&px, &bad).unwrap_err().to_string();
        if bad.is_empty() {
            assert!(err.contains("no image-tower layer"), "{err}");
        } else {
            assert!(err.contains("has 2 layers"), "{bad:?}: {err}");
        }
    }
}

#[test]
fn siglip_layers_match_transformers_after_the_final_norm() {
    let full = siglip(2);
    let (px, _) = inputs("siglip");
    let states = full.encode_image_layers(&px, &[1, 2]).unwrap();
    assert_eq!(states.num_prefix_tokens, 0);
    let w = load_st(fixture("siglip").join("model.safetensors"));
    let norm = |x: &Tensor| {
        layer_norm(
            x,
            &w["vision_model.post_layernorm.weight"],
            &w["vision_model.post_layernorm.bias"],
            1e-6,
        )
    };
    let exp = load_st(fixture("siglip").join("expected.safetensors"));
    assert_close(
        "post_layernorm(layer 2) vs transformers",
        &norm(&states.hidden_states[1]),
        &exp["vision_last_hidden_state"],
        1e-4,
    );
    let one = siglip(1).encode_image(&px).unwrap();
    assert_close(
        "post_layernorm(layer 1) vs a 1-layer tower",
        &norm(&states.hidden_states[0]),
        &one.last_hidden_state,
        1e-5,
    );
    assert!(max_abs_diff(&states.hidden_states[0], &states.hidden_states[1]) > 1e-2);
}

fn biomedclip_weights() -> HashMap<String, Tensor> {
    let path = fixture("biomedclip").join("open_clip_pytorch_model.bin");
    candle_core::pickle::read_all(&path)
        .unwrap()
        .into_iter()
        .collect()
}

#[test]
fn biomedclip_layers_match_open_clip_after_the_final_norm() {
    let dir = fixture("biomedclip");
    let m = BiomedClip::from_dir(&dir, DType::F32, &Device::Cpu, &LoadMode::Frozen).unwrap();
    let exp = load_st(dir.join("expected.safetensors"));
    let px = &exp["pixel_values"];
    let states = m.encode_image_layers(px, &[1, 2]).unwrap();
    assert_eq!(states.num_prefix_tokens, 1);
    let w = biomedclip_weights();
    let norm = |x: &Tensor| {
        layer_norm(
            x,
            &w["visual.trunk.norm.weight"],
            &w["visual.trunk.norm.bias"],
            1e-6,
        )
    };
    assert_close(
        "norm(layer 2) vs open_clip",
        &norm(&states.hidden_states[1]),
        &exp["image_tokens"],
        1e-4,
    );
    // Layer 1 against the trunk loaded with one block.
    let cfg = BiomedClipConfig::from_file(&dir.join("open_clip_config.json")).unwrap();
    let mut vcfg = cfg.vision.clone();
    vcfg.depth = 1;
    let wf = WeightFile::open(dir.join("open_clip_pytorch_model.bin")).unwrap();
    let trunk = wf
        .load(
            DType::F32,
            &Device::Cpu,
            &LoadMode::Frozen,
            &[
                "position_ids",
                "text.",
                "visual.head.",
                "logit_scale",
                "visual.trunk.blocks.1.",
            ],
            |vb| TimmVit::load(vb.pp("visual").pp("trunk"), &vcfg),
        )
        .unwrap();
    let (one, _) = trunk.forward_features(px, None).unwrap();
    assert_close(
        "norm(layer 1) vs a 1-block trunk",
        &norm(&states.hidden_states[0]),
        &one,
        1e-5,
    );
    assert!(max_abs_diff(&states.hidden_states[0], &states.hidden_states[1]) > 1e-2);
    let err = m.encode_image_layers(px, &[3]).unwrap_err().to_string();
    assert!(err.contains("has 2 layers"), "{err}");
}

#[test]
fn resnet_tower_has_no_layer_tokens() {
    let dir = fixture("openclip_resnet");
    let m = OpenClipResNet::from_dir(&dir, DType::F32, &Device::Cpu, &LoadMode::Frozen).unwrap();
    let px = load_st(dir.join("inputs.safetensors"))["pixel_values"].clone();
    let err = m.encode_image_layers(&px, &[1]).unwrap_err().to_string();
    assert!(err.contains("intermediate layers"), "{err}");
}
