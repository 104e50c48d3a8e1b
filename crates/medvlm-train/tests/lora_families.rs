//! LoRA on the SigLIP and BiomedCLIP parity fixtures (crates/medvlm-models/tests/fixtures):
//! the roles q / out / fc1 find each family's layers (HF SigLIP `q_proj`, BERT
//! `attention.self.query`, timm's fused `attn.qkv`), merging reproduces the adapted outputs,
//! and the exported directory reloads with them.

use std::path::PathBuf;

mod support;
use support::max_abs_diff;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use medvlm_models::{load_model_dir, LoadMode, LoadOptions, LoadedModel};
use medvlm_train::finetune::{export_model_dir, prepare, FinetuneSpec, Mode, Towers};
use medvlm_train::lora::{merge_lora, LoraSpec};
use rand::{Rng, SeedableRng};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../medvlm-models/tests/fixtures")
        .join(name)
}

fn embeds(lm: &LoadedModel, px: &Tensor) -> (Tensor, Tensor) {
    let tok = lm
        .tokenizer
        .encode_batch(&["a chest x-ray", "no finding"], &Device::Cpu)
        .unwrap();
    (
        lm.model.encode_image(px).unwrap().embeds,
        lm.model.encode_text(&tok).unwrap().embeds,
    )
}

/// Applies LoRA to q / out / fc1 of both towers, gives B random values (as training would),
/// then checks merge and export. Returns the adapted module paths.
fn roundtrip(name: &str) -> Vec<String> {
    let vm = VarMap::new();
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype: DType::F32,
        mode: LoadMode::Trainable(vm.clone()),
    };
    let mut lm = load_model_dir(&fixture(name), &opts).unwrap();
    let spec = FinetuneSpec {
        mode: Mode::Lora(LoraSpec {
            rank: 2,
            alpha: 4.0,
            dropout: 0.0,
            targets: vec!["q".into(), "out".into(), "fc1".into()],
            towers: Towers::Both,
        }),
        towers: Towers::Both,
    };
    let prep = prepare(lm.model.as_mut(), &vm, &VarMap::new(), &spec, 2).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    for (n, var) in &prep.params {
        if n.ends_with("lora_B.weight") {
            let dims = var.as_tensor().dims().to_vec();
            let vals: Vec<f32> = (0..dims.iter().product::<usize>())
                .map(|_| rng.random_range(-0.2f32..0.2))
                .collect();
            var.set(&Tensor::from_vec(vals, dims, &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let size = lm.model.image_size();
    let px = Tensor::randn(0f32, 1.0, (2, 3, size, size), &Device::Cpu).unwrap();

    let base = load_model_dir(&fixture(name), &LoadOptions::default()).unwrap();
    let (img0, txt0) = embeds(&base, &px);
    let (img1, txt1) = embeds(&lm, &px);
    assert!(
        max_abs_diff(&img0, &img1) > 1e-4,
        "{name}: adapters inactive"
    );
    assert!(
        max_abs_diff(&txt0, &txt1) > 1e-4,
        "{name}: adapters inactive"
    );

    merge_lora(lm.model.as_mut(), Some(&vm)).unwrap();
    let (img2, txt2) = embeds(&lm, &px);
    assert!(max_abs_diff(&img1, &img2) < 1e-5, "{name}");
    assert!(max_abs_diff(&txt1, &txt2) < 1e-5, "{name}");

    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("model");
    export_model_dir(&fixture(name), lm.family, &vm, &dir).unwrap();
    let back = load_model_dir(&dir, &LoadOptions::default()).unwrap();
    let (img3, txt3) = embeds(&back, &px);
    assert!(max_abs_diff(&img1, &img3) < 1e-5, "{name}");
    assert!(max_abs_diff(&txt1, &txt3) < 1e-5, "{name}");
    prep.lora_layers
}

#[test]
fn siglip_lora_merges_and_exports() {
    let layers = roundtrip("siglip");
    assert!(layers.contains(&"vision_model.encoder.layers.0.self_attn.q_proj".to_string()));
    assert!(layers.contains(&"text_model.encoder.layers.0.self_attn.out_proj".to_string()));
    assert!(layers.contains(&"text_model.encoder.layers.0.mlp.fc1".to_string()));
    assert!(layers
        .iter()
        .all(|l| !l.contains("k_proj") && !l.contains("fc2")));
}

#[test]
fn biomedclip_lora_merges_and_exports() {
    let layers = roundtrip("biomedclip");
    // timm ViT: q selects the fused qkv; BERT: query, attention output dense, intermediate.
    assert!(layers.contains(&"visual.trunk.blocks.0.attn.qkv".to_string()));
    assert!(layers.contains(&"visual.trunk.blocks.0.attn.proj".to_string()));
    assert!(layers.contains(&"visual.trunk.blocks.0.mlp.fc1".to_string()));
    assert!(layers
        .iter()
        .any(|l| l.starts_with("text.") && l.ends_with("attention.self.query")));
    assert!(layers
        .iter()
        .any(|l| l.starts_with("text.") && l.ends_with("attention.output.dense")));
    assert!(layers
        .iter()
        .any(|l| l.starts_with("text.") && l.ends_with("intermediate.dense")));
    assert!(layers.iter().all(|l| !l.ends_with("attention.self.key")));
    // fc1 must not pick BERT's MLP output (`output.dense`), which is fc2.
    assert!(layers
        .iter()
        .all(|l| !l.ends_with("output.dense") || l.ends_with("attention.output.dense")));
}
