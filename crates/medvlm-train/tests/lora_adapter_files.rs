//! LoRA adapters saved alone (PEFT layout) and put back onto a fresh base model give the same
//! outputs; adapters that do not fit the model are refused without touching it.

use std::path::PathBuf;

mod support;
use support::max_abs_diff;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use medvlm_models::{load_model_dir, LoadMode, LoadOptions, LoadedModel};
use medvlm_train::finetune::{prepare, FinetuneSpec, Mode, Towers};
use medvlm_train::lora::{
    load_lora_adapters, lora_adapters, save_lora_adapters, LoraSpec, ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../medvlm-models/tests/fixtures")
        .join(name)
}

fn load(name: &str) -> (LoadedModel, VarMap) {
    let vm = VarMap::new();
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype: DType::F32,
        mode: LoadMode::Trainable(vm.clone()),
    };
    (load_model_dir(&fixture(name), &opts).unwrap(), vm)
}

fn image_embeds(lm: &LoadedModel) -> Tensor {
    let px = Tensor::arange(0f32, (2 * 3 * 32 * 32) as f32, &Device::Cpu)
        .unwrap()
        .reshape((2, 3, 32, 32))
        .unwrap()
        .affine(1.0 / 3000.0, -1.0)
        .unwrap();
    lm.model.encode_image(&px).unwrap().embeds
}

#[test]
fn saved_adapters_reload_onto_a_fresh_model() {
    let (mut lm, vm) = load("clip");
    let spec = LoraSpec {
        rank: 2,
        alpha: 3.0,
        dropout: 0.1,
        targets: vec!["q".into(), "fc2".into()],
        towers: Towers::Vision,
    };
    let ft = FinetuneSpec {
        mode: Mode::Lora(spec.clone()),
        towers: Towers::Vision,
    };
    let prep = prepare(lm.model.as_mut(), &vm, &VarMap::new(), &ft, 3).unwrap();
    for (n, var) in &prep.params {
        if n.ends_with("lora_B.weight") {
            let t = Tensor::arange(0f32, var.as_tensor().elem_count() as f32, &Device::Cpu)
                .unwrap()
                .reshape(var.as_tensor().shape())
                .unwrap()
                .affine(0.01, -0.1)
                .unwrap();
            var.set(&t).unwrap();
        }
    }
    let adapted = image_embeds(&lm);
    let out = tempfile::tempdir().unwrap();
    assert_eq!(
        save_lora_adapters(lm.model.as_ref(), &spec, out.path()).unwrap(),
        4
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join(ADAPTER_CONFIG)).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 2);
    let names =
        candle_core::safetensors::load(out.path().join(ADAPTER_WEIGHTS), &Device::Cpu).unwrap();
    assert!(names.contains_key(
        "base_model.model.vision_model.encoder.layers.1.self_attn.q_proj.lora_A.weight"
    ));
    assert_eq!(names.len(), 8);

    let (mut fresh, _) = load("clip");
    let base = image_embeds(&fresh);
    let adapters = VarMap::new();
    let (back, vars) = load_lora_adapters(fresh.model.as_mut(), out.path(), &adapters).unwrap();
    assert_eq!(back, spec);
    assert_eq!(vars.len(), 8);
    let reloaded = image_embeds(&fresh);
    assert!(max_abs_diff(&base, &adapted) > 1e-4);
    assert_eq!(max_abs_diff(&adapted, &reloaded), 0.0);

    // The same adapter on a model with other layer names (BiomedCLIP fixture: timm/BERT
    // layout) is refused and leaves the model untouched.
    let (mut other, _) = load("biomedclip");
    let err = load_lora_adapters(other.model.as_mut(), out.path(), &VarMap::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("adapter_model.safetensors"), "{err}");
    assert!(err.contains("has no linear layer vision_model."), "{err}");
    assert!(lora_adapters(other.model.as_ref()).is_empty());
    // Loading twice onto the same model is refused.
    let err = load_lora_adapters(fresh.model.as_mut(), out.path(), &VarMap::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("already carries"), "{err}");
}

#[test]
fn a_rank_beyond_the_layers_full_rank_is_refused_before_touching_the_model() {
    let (mut lm, _) = load("clip");
    let spec = LoraSpec {
        rank: 1_000_000_000,
        alpha: 1.0,
        dropout: 0.0,
        targets: vec!["q".into()],
        towers: Towers::Vision,
    };
    let err = medvlm_train::lora::apply_lora(lm.model.as_mut(), &spec, &VarMap::new(), 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("exceeds the full rank 32"), "{err}");
    assert!(lora_adapters(lm.model.as_ref()).is_empty());
}
