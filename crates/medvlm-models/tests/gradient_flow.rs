//! Every weight of every family gets a gradient: a loss on both towers' embeddings of a
//! trainable model (the tiny parity fixtures) back-propagates into every parameter that the
//! forward pass uses. An op without a backward pass (candle's fused layer norm and softmax
//! are such ops) would cut the graph and leave earlier parameters, or the norms themselves,
//! without a gradient; fine-tuning (LoRA, BitFit, partial, full) depends on this.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use medvlm_models::{load_model_dir, LoadMode, LoadOptions};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A deterministic pattern of the given shape in [-1, 1].
fn pattern(dims: &[usize], seed: f64) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i as f64 * 0.618_034 + seed).fract() * 2.0 - 1.0) as f32)
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// Names of the parameters whose gradient is missing or zero.
fn without_gradient(name: &str) -> Vec<String> {
    let vm = VarMap::new();
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype: DType::F32,
        mode: LoadMode::Trainable(vm.clone()),
    };
    let m = load_model_dir(&fixture(name), &opts).expect("fixture loads");
    let s = m.model.image_size();
    let pixels = pattern(&[2, 3, s, s], 0.3);
    let tokens = m
        .tokenizer
        .encode_batch(
            &["a chest x-ray", "pleural effusion on the left"],
            &Device::Cpu,
        )
        .unwrap();
    let img = m.model.encode_image(&pixels).unwrap().embeds;
    let txt = m.model.encode_text(&tokens).unwrap().embeds;
    let loss = ((img.clone() * pattern(img.dims(), 0.1))
        .unwrap()
        .sum_all()
        .unwrap()
        + (txt.clone() * pattern(txt.dims(), 0.7))
            .unwrap()
            .sum_all()
            .unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    let data = vm.data().lock().unwrap();
    let mut missing: Vec<String> = data
        .iter()
        .filter(|(_, v)| {
            grads.get(v.as_tensor()).is_none_or(|g| {
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    == 0.0
            })
        })
        .map(|(k, _)| k.clone())
        .collect();
    missing.sort();
    missing
}

#[test]
fn clip_every_used_weight_gets_a_gradient() {
    // The logit scale is not part of the embeddings.
    assert_eq!(without_gradient("clip"), vec!["logit_scale"]);
}

#[test]
fn siglip_every_used_weight_gets_a_gradient() {
    assert_eq!(
        without_gradient("siglip"),
        vec!["logit_bias", "logit_scale"]
    );
}

#[test]
fn biomedclip_timm_vit_and_bert_towers_get_gradients_through_norms_and_attention() {
    // timm ViT and BERT towers: every layer norm and the query/key projections need the
    // layer-norm and softmax backward passes.
    let missing = without_gradient("biomedclip");
    assert_eq!(missing, vec!["logit_scale"], "{missing:?}");
}
