//! Fine-tuning modes on the tiny HF CLIP parity fixture (2 blocks per tower): after a few
//! optimiser steps exactly the selected parameters changed and every other one is
//! bit-identical; modes that do not fit the model fail before training.

use std::collections::BTreeSet;
use std::path::PathBuf;

use candle_core::{DType, Device};
use candle_nn::VarMap;
use medvlm_models::{load_model_dir, LoadMode, LoadOptions, LoadedModel};
use medvlm_train::finetune::{
    prepare, select_trainable, snapshot, train_contrastive, FinetuneSpec, Mode, PairData, Towers,
};
use medvlm_train::losses::{ContrastiveHead, LossKind};
use medvlm_train::optim::{AdamWConfig, NamedVar};
use medvlm_train::train_config::{Command, TrainConfig};
use medvlm_train::trainer::{LoopConfig, NoCallbacks, RunPaths};
use rand::{Rng, SeedableRng};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../medvlm-models/tests/fixtures/clip")
}

fn load_trainable() -> (LoadedModel, VarMap) {
    let vm = VarMap::new();
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype: DType::F32,
        mode: LoadMode::Trainable(vm.clone()),
    };
    (load_model_dir(&fixture(), &opts).expect("load fixture"), vm)
}

fn base_vars(vm: &VarMap) -> Vec<NamedVar> {
    let data = vm.data().lock().unwrap();
    let mut v: Vec<NamedVar> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn pairs(n: usize) -> PairData {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let texts = [
        "a chest x-ray",
        "a brain mri",
        "a skin lesion",
        "a histology slide",
    ];
    PairData {
        images: (0..n)
            .map(|_| {
                (0..3 * 32 * 32)
                    .map(|_| rng.random_range(-2.0f32..2.0))
                    .collect()
            })
            .collect(),
        texts: (0..n).map(|i| texts[i % texts.len()].to_string()).collect(),
    }
}

/// Runs 3 updates of `spec` and returns (selected names, names whose values changed).
fn train_and_diff(spec: &FinetuneSpec) -> (BTreeSet<String>, BTreeSet<String>, usize) {
    let (mut lm, vm) = load_trainable();
    let adapters = VarMap::new();
    let prep = prepare(lm.model.as_mut(), &vm, &adapters, spec, 1).unwrap();
    let selected: BTreeSet<String> = prep.params.iter().map(|(n, _)| n.clone()).collect();
    let before = snapshot(&base_vars(&vm)).unwrap();
    let s = medvlm_train::finetune::scalar_value(&lm.model.logit_scale()).unwrap();
    // Fixed temperature: the model's logit_scale must stay untouched too.
    let head =
        ContrastiveHead::new(LossKind::Clip, s, 0.0, false, DType::F32, &Device::Cpu).unwrap();
    let cfg = LoopConfig {
        seed: 0,
        epochs: 10,
        max_steps: Some(3),
        batch_size: 4,
        grad_accum: 1,
        clip_norm: None,
        lr: 1e-2,
        min_lr: 0.0,
        warmup_steps: 0,
        adamw: AdamWConfig::default(),
        checkpoint_every: 100,
        keep: 1,
        prefetch: 1,
    };
    let run = tempfile::tempdir().unwrap();
    let paths = RunPaths {
        checkpoints: run.path().join("ckpt"),
        log: run.path().join("log.jsonl"),
    };
    let summary = train_contrastive(
        lm.model.as_ref(),
        &lm.tokenizer,
        &lm.preprocess,
        &pairs(8),
        &prep.params,
        &head,
        Some(&vm),
        &cfg,
        &paths,
        false,
        "modes",
        &mut NoCallbacks,
    )
    .unwrap();
    assert_eq!(summary.steps, 3);
    let changed: BTreeSet<String> = before
        .iter()
        .zip(base_vars(&vm))
        .filter(|((_, b), (_, v))| {
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                != v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
        })
        .map(|((n, _), _)| n.clone())
        .collect();
    (selected, changed, before.len())
}

/// `changed` must equal `selected`, except for key-projection biases: adding a constant to
/// every key shifts each attention row's scores by the same amount, which the softmax
/// ignores, so their gradient is (numerically) zero and they may stay put.
fn assert_exactly(selected: &BTreeSet<String>, changed: &BTreeSet<String>) {
    let extra: Vec<_> = changed.difference(selected).collect();
    assert!(extra.is_empty(), "changed but not selected: {extra:?}");
    let missing: Vec<_> = selected
        .difference(changed)
        .filter(|n| !n.ends_with("k_proj.bias"))
        .collect();
    assert!(missing.is_empty(), "selected but unchanged: {missing:?}");
}

#[test]
fn full_trains_every_weight_but_the_head_scalars() {
    let spec = FinetuneSpec {
        mode: Mode::Full,
        towers: Towers::Both,
    };
    let (selected, changed, total) = train_and_diff(&spec);
    // Every model tensor except logit_scale (owned by the loss head).
    assert_eq!(selected.len(), total - 1);
    assert!(!selected.contains("logit_scale"));
    assert!(!changed.contains("logit_scale"));
    assert_exactly(&selected, &changed);
}

#[test]
fn partial_trains_last_k_blocks_and_what_follows() {
    let spec = FinetuneSpec {
        mode: Mode::Partial { last_k: 1 },
        towers: Towers::Both,
    };
    let (selected, changed, _) = train_and_diff(&spec);
    // Block 1 of each tower (16 tensors each: q/k/v/out and fc1/fc2 weights+biases, two
    // layer norms), the final norms and the projections.
    let mut expected = BTreeSet::new();
    for tower in ["text_model", "vision_model"] {
        for m in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "mlp.fc1",
            "mlp.fc2",
            "layer_norm1",
            "layer_norm2",
        ] {
            for p in ["weight", "bias"] {
                expected.insert(format!("{tower}.encoder.layers.1.{m}.{p}"));
            }
        }
    }
    for n in [
        "text_model.final_layer_norm.weight",
        "text_model.final_layer_norm.bias",
        "text_projection.weight",
        "vision_model.post_layernorm.weight",
        "vision_model.post_layernorm.bias",
        "visual_projection.weight",
    ] {
        expected.insert(n.to_string());
    }
    assert_eq!(selected, expected);
    assert_exactly(&selected, &changed);

    // Vision tower only.
    let spec = FinetuneSpec {
        mode: Mode::Partial { last_k: 2 },
        towers: Towers::Vision,
    };
    let (selected, changed, _) = train_and_diff(&spec);
    assert!(selected
        .iter()
        .all(|n| n.starts_with("vision_model.") || n == "visual_projection.weight"));
    assert!(selected.contains("vision_model.encoder.layers.0.mlp.fc1.weight"));
    assert!(!selected.contains("vision_model.embeddings.patch_embedding.weight"));
    assert!(!selected.contains("vision_model.pre_layrnorm.weight"));
    assert_eq!(selected.len(), 2 * 16 + 2 + 1);
    assert_exactly(&selected, &changed);
}

#[test]
fn bitfit_trains_biases_only() {
    let spec = FinetuneSpec {
        mode: Mode::Bitfit,
        towers: Towers::Both,
    };
    let (selected, changed, _) = train_and_diff(&spec);
    assert!(selected.iter().all(|n| n.ends_with(".bias")));
    // Per block: q/k/v/out, fc1/fc2 biases and two layer-norm biases = 8; 2 blocks x 2 towers,
    // plus text final_layer_norm, vision pre_layrnorm and post_layernorm biases.
    assert_eq!(selected.len(), 8 * 4 + 3);
    assert_exactly(&selected, &changed);

    let spec = FinetuneSpec {
        mode: Mode::Bitfit,
        towers: Towers::Text,
    };
    let (selected, changed, _) = train_and_diff(&spec);
    assert_eq!(selected.len(), 8 * 2 + 1);
    assert!(selected.iter().all(|n| n.starts_with("text_model.")));
    assert_exactly(&selected, &changed);
}

#[test]
fn partial_k_larger_than_the_model_fails_before_training() {
    let (mut lm, vm) = load_trainable();
    let adapters = VarMap::new();
    let spec = FinetuneSpec {
        mode: Mode::Partial { last_k: 3 },
        towers: Towers::Both,
    };
    let msg = prepare(lm.model.as_mut(), &vm, &adapters, &spec, 0)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("finetune.last_k"), "{msg}");
    assert!(msg.contains("3 is larger than the 2 blocks"), "{msg}");
    let zero = FinetuneSpec {
        mode: Mode::Partial { last_k: 0 },
        towers: Towers::Both,
    };
    assert!(prepare(lm.model.as_mut(), &vm, &adapters, &zero, 0).is_err());
}

#[test]
fn bitfit_without_biases_and_unloaded_models_are_refused() {
    // Names of a bias-free model (e.g. a projection-only module).
    let names = ["text_projection.weight", "visual_projection.weight"];
    let spec = FinetuneSpec {
        mode: Mode::Bitfit,
        towers: Towers::Both,
    };
    let msg = select_trainable(names, &spec, |_| 2)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("no bias parameters"), "{msg}");

    // A model loaded frozen has no vars to select.
    let mut lm = load_model_dir(&fixture(), &LoadOptions::default()).unwrap();
    let msg = prepare(lm.model.as_mut(), &VarMap::new(), &VarMap::new(), &spec, 0)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("Trainable"), "{msg}");
}

#[test]
fn spec_from_config_maps_freeze_to_towers_and_rejects_mismatches() {
    let base = r#"
output_dir = "out"
[model]
source = "m"
[data]
manifest = "m.jsonl"
"#;
    let parse = |extra: &str| {
        let cfg = TrainConfig::from_toml_str(&format!("{base}{extra}"), "t.toml".as_ref()).unwrap();
        cfg.validate(Command::Finetune).unwrap();
        FinetuneSpec::from_config(&cfg)
    };
    let s = parse("[finetune]\nmode = \"lora\"\n[finetune.lora]\nrank = 2\ntargets = [\"q\"]\n[freeze]\nmode = \"image\"\n").unwrap();
    assert_eq!(s.towers, Towers::Text);
    match s.mode {
        Mode::Lora(l) => {
            assert_eq!(l.rank, 2);
            assert_eq!(l.targets, vec!["q".to_string()]);
            assert_eq!(l.towers, Towers::Text);
        }
        m => panic!("{m:?}"),
    }
    let s = parse("[finetune]\nmode = \"partial\"\nlast_k = 1\n").unwrap();
    assert_eq!(s.mode, Mode::Partial { last_k: 1 });
    assert_eq!(s.towers, Towers::Both);
    let s = parse("[finetune]\nmode = \"bitfit\"\n[freeze]\nmode = \"text\"\n").unwrap();
    assert_eq!((s.mode, s.towers), (Mode::Bitfit, Towers::Vision));
    let err = parse("[finetune]\nmode = \"full\"\n[freeze]\nmode = \"partial\"\nlast_k = 1\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("freeze.mode"), "{err}");
}
