//! LoRA on the tiny HF CLIP parity fixture (crates/medvlm-models/tests/fixtures/clip, made by
//! tools/make_clip_fixture.py): rank-r adapters train only their own parameters, merging
//! gives the wrapped model's outputs, and the exported directory loads back with them.

use std::path::PathBuf;

mod support;
use support::max_abs_diff;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use medvlm_models::{load_model_dir, LoadMode, LoadOptions, LoadedModel};
use medvlm_train::finetune::{
    export_model_dir, prepare, snapshot, train_contrastive, FinetuneError, FinetuneSpec, Mode,
    PairData, Towers,
};
use medvlm_train::lora::{
    lora_adapters, merge_lora, set_lora_enabled, set_lora_training, LoraSpec,
};
use medvlm_train::losses::{ContrastiveHead, LossKind};
use medvlm_train::optim::{AdamWConfig, NamedVar};
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

fn pairs(n: usize, seed: u64) -> PairData {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let texts = [
        "a chest x-ray with no finding",
        "an mri of the brain",
        "a skin lesion photo",
        "a histology slide",
        "a ct of the abdomen",
        "a fundus photo",
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

fn settings(steps: u64) -> LoopConfig {
    LoopConfig {
        seed: 3,
        epochs: 100,
        max_steps: Some(steps),
        batch_size: 4,
        grad_accum: 1,
        clip_norm: Some(1.0),
        lr: 1e-2,
        min_lr: 0.0,
        warmup_steps: 0,
        adamw: AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        },
        checkpoint_every: 1000,
        keep: 1,
        prefetch: 1,
    }
}

fn run_paths(dir: &std::path::Path) -> RunPaths {
    RunPaths {
        checkpoints: dir.join("checkpoints"),
        log: dir.join("train.jsonl"),
    }
}

fn head(lm: &LoadedModel, learnable: bool) -> ContrastiveHead {
    let s = medvlm_train::finetune::scalar_value(&lm.model.logit_scale()).unwrap();
    ContrastiveHead::new(LossKind::Clip, s, 0.0, learnable, DType::F32, &Device::Cpu).unwrap()
}

fn base_vars(vm: &VarMap) -> Vec<NamedVar> {
    let data = vm.data().lock().unwrap();
    let mut v: Vec<NamedVar> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn embeds(lm: &LoadedModel, data: &PairData) -> (Tensor, Tensor) {
    let px = lm.preprocess.batch(&data.images, &Device::Cpu).unwrap();
    let tok = lm
        .tokenizer
        .encode_batch(&data.texts, &Device::Cpu)
        .unwrap();
    (
        lm.model.encode_image(&px).unwrap().embeds,
        lm.model.encode_text(&tok).unwrap().embeds,
    )
}

fn lora_spec(rank: usize) -> FinetuneSpec {
    FinetuneSpec {
        mode: Mode::Lora(LoraSpec {
            rank,
            alpha: 2.0 * rank as f64,
            dropout: 0.0,
            targets: vec!["q".into(), "v_proj".into(), "mlp.fc2".into()],
            towers: Towers::Both,
        }),
        towers: Towers::Both,
    }
}

#[test]
fn lora_rank_r_trains_only_its_parameters_and_merges_exactly() {
    let (mut lm, vm) = load_trainable();
    let adapters = VarMap::new();
    let rank = 3;
    let prep = prepare(lm.model.as_mut(), &vm, &adapters, &lora_spec(rank), 11).unwrap();

    // 2 blocks x 2 towers x 3 targets (q_proj, v_proj, mlp.fc2), each with A and B.
    assert_eq!(prep.base_selected, 0);
    assert_eq!(prep.lora_layers.len(), 12);
    assert_eq!(prep.params.len(), 24);
    for (name, var) in &prep.params {
        let dims = var.as_tensor().dims().to_vec();
        if name.ends_with(".lora_A.weight") {
            // fc2's input is the MLP width 64, q/v take the hidden size 32.
            let fan_in = if name.contains("mlp.fc2") { 64 } else { 32 };
            assert_eq!(dims, vec![rank, fan_in], "{name}");
        } else {
            assert!(name.ends_with(".lora_B.weight"), "{name}");
            assert_eq!(dims, vec![32, rank], "{name}");
            // B starts at zero: the adapted model starts as the pretrained one.
            assert_eq!(
                var.as_tensor()
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
                0.0
            );
        }
    }
    assert!(prep
        .lora_layers
        .contains(&"vision_model.encoder.layers.1.self_attn.q_proj".to_string()));
    assert!(prep
        .lora_layers
        .contains(&"text_model.encoder.layers.0.mlp.fc2".to_string()));
    assert_eq!(
        prep.num_scalars(),
        2 * 2 * (2 * (rank * 32 + 32 * rank) + (rank * 64 + 32 * rank))
    );

    let data = pairs(8, 1);
    let (img0, txt0) = embeds(&lm, &data);
    let base_before = snapshot(&base_vars(&vm)).unwrap();
    let lora_before = snapshot(&prep.params).unwrap();
    let h = head(&lm, false);
    let run = tempfile::tempdir().unwrap();
    let summary = train_contrastive(
        lm.model.as_ref(),
        &lm.tokenizer,
        &lm.preprocess,
        &data,
        &prep.params,
        &h,
        Some(&vm),
        &settings(4),
        &run_paths(run.path()),
        false,
        "lora-test",
        &mut NoCallbacks,
    )
    .unwrap();
    assert_eq!(summary.steps, 4);
    assert_eq!(summary.records.len(), 4);
    assert!(summary.records.iter().all(|s| s.loss.is_finite()));

    // Base weights are bit-identical; every adapter matrix moved.
    for ((name, before), (_, var)) in base_before.iter().zip(base_vars(&vm).iter()) {
        let now = var.as_tensor();
        assert_eq!(
            before.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            now.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "base weight {name} changed under LoRA"
        );
    }
    for ((name, before), (_, var)) in lora_before.iter().zip(prep.params.iter()) {
        assert!(
            max_abs_diff(before, var.as_tensor()) > 0.0,
            "{name} did not train"
        );
    }

    // The adapted model's outputs moved away from the pretrained ones.
    let (img1, txt1) = embeds(&lm, &data);
    assert!(max_abs_diff(&img0, &img1) > 1e-4);
    assert!(max_abs_diff(&txt0, &txt1) > 1e-4);

    // Merge: same outputs, no adapters left, base vars now hold W + (alpha/r) B A.
    let merged = merge_lora(lm.model.as_mut(), Some(&vm)).unwrap();
    assert_eq!(merged.len(), 12);
    assert!(lora_adapters(lm.model.as_ref()).is_empty());
    let (img2, txt2) = embeds(&lm, &data);
    assert!(
        max_abs_diff(&img1, &img2) < 1e-5,
        "{}",
        max_abs_diff(&img1, &img2)
    );
    assert!(
        max_abs_diff(&txt1, &txt2) < 1e-5,
        "{}",
        max_abs_diff(&txt1, &txt2)
    );
    for ((name, before), (_, var)) in base_before.iter().zip(base_vars(&vm).iter()) {
        let changed = max_abs_diff(before, var.as_tensor()) > 0.0;
        let adapted = merged.iter().any(|p| name == &format!("{p}.weight"));
        assert_eq!(
            changed, adapted,
            "{name}: changed {changed}, adapted {adapted}"
        );
    }

    // Export and reload as a plain (frozen) model: same embeddings.
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("merged");
    export_model_dir(&fixture(), lm.family, &vm, &dir).unwrap();
    let back = load_model_dir(&dir, &LoadOptions::default()).unwrap();
    let (img3, txt3) = embeds(&back, &data);
    assert!(max_abs_diff(&img1, &img3) < 1e-5);
    assert!(max_abs_diff(&txt1, &txt3) < 1e-5);
}

#[test]
fn lora_dropout_only_in_training_and_reproducible() {
    let (mut lm, vm) = load_trainable();
    let adapters = VarMap::new();
    let spec = FinetuneSpec {
        mode: Mode::Lora(LoraSpec {
            dropout: 0.5,
            ..LoraSpec::clip_lora()
        }),
        towers: Towers::Vision,
    };
    let prep = prepare(lm.model.as_mut(), &vm, &adapters, &spec, 5).unwrap();
    // Vision only: 2 blocks x (q, k, v).
    assert_eq!(prep.lora_layers.len(), 6);
    assert!(prep
        .lora_layers
        .iter()
        .all(|p| p.starts_with("vision_model.")));
    // Give B non-zero values so the adapter path matters.
    for (name, var) in &prep.params {
        if name.ends_with("lora_B.weight") {
            let t = (var.as_tensor().ones_like().unwrap() * 0.5).unwrap();
            var.set(&t).unwrap();
        }
    }
    let data = pairs(2, 9);
    let (eval_a, _) = embeds(&lm, &data);
    let (eval_b, _) = embeds(&lm, &data);
    assert_eq!(max_abs_diff(&eval_a, &eval_b), 0.0);
    assert_eq!(set_lora_training(lm.model.as_ref(), true), 6);
    let (train_a, _) = embeds(&lm, &data);
    let (train_b, _) = embeds(&lm, &data);
    set_lora_training(lm.model.as_ref(), false);
    assert!(max_abs_diff(&eval_a, &train_a) > 1e-4);
    assert!(
        max_abs_diff(&train_a, &train_b) > 1e-4,
        "fresh masks per call"
    );
    let (eval_c, _) = embeds(&lm, &data);
    assert_eq!(max_abs_diff(&eval_a, &eval_c), 0.0);
}

#[test]
fn disabled_adapters_give_the_base_model_outputs() {
    let (mut lm, vm) = load_trainable();
    let data = pairs(2, 3);
    let (base_img, base_txt) = embeds(&lm, &data);
    let adapters = VarMap::new();
    let prep = prepare(lm.model.as_mut(), &vm, &adapters, &lora_spec(4), 1).unwrap();
    for (name, var) in &prep.params {
        if name.ends_with("lora_B.weight") {
            let t = (var.as_tensor().ones_like().unwrap() * 0.5).unwrap();
            var.set(&t).unwrap();
        }
    }
    let (on_img, on_txt) = embeds(&lm, &data);
    assert!(max_abs_diff(&on_img, &base_img) > 1e-3);
    assert!(max_abs_diff(&on_txt, &base_txt) > 1e-3);
    let n = set_lora_enabled(lm.model.as_ref(), false);
    assert_eq!(n, prep.lora_layers.len());
    let (off_img, off_txt) = embeds(&lm, &data);
    assert_eq!(max_abs_diff(&off_img, &base_img), 0.0);
    assert_eq!(max_abs_diff(&off_txt, &base_txt), 0.0);
    set_lora_enabled(lm.model.as_ref(), true);
    let (again, _) = embeds(&lm, &data);
    assert_eq!(max_abs_diff(&again, &on_img), 0.0);
}

#[test]
fn lora_targets_that_match_nothing_fail_before_training() {
    let (mut lm, vm) = load_trainable();
    let adapters = VarMap::new();
    let spec = FinetuneSpec {
        mode: Mode::Lora(LoraSpec {
            targets: vec!["q_proj".into(), "query".into()],
            ..LoraSpec::default()
        }),
        towers: Towers::Both,
    };
    let err = prepare(lm.model.as_mut(), &vm, &adapters, &spec, 0).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, FinetuneError::NoLoraTarget { .. }), "{msg}");
    assert!(msg.contains("\"query\""), "{msg}");
    assert!(
        msg.contains("text_model.encoder.layers.*.self_attn.q_proj"),
        "{msg}"
    );
    // Nothing was wrapped and no parameter created.
    assert!(lora_adapters(lm.model.as_ref()).is_empty());
    assert!(adapters.all_vars().is_empty());

    // A text-only target while only the vision tower is adapted.
    let spec = FinetuneSpec {
        mode: Mode::Lora(LoraSpec {
            targets: vec!["text:q".into()],
            ..LoraSpec::default()
        }),
        towers: Towers::Vision,
    };
    let msg = prepare(lm.model.as_mut(), &vm, &adapters, &spec, 0)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("text:q") && msg.contains("vision"), "{msg}");
    // Unknown tower prefix.
    let spec = FinetuneSpec {
        mode: Mode::Lora(LoraSpec {
            targets: vec!["image:q".into()],
            ..LoraSpec::default()
        }),
        towers: Towers::Both,
    };
    let msg = prepare(lm.model.as_mut(), &vm, &adapters, &spec, 0)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("tower prefixes"), "{msg}");
    assert!(lora_adapters(lm.model.as_ref()).is_empty());
    // Linear layers untouched by the failed attempts.
    assert!(lm
        .model
        .linear_layers()
        .iter()
        .all(|l| l.wrappers().is_empty()));
}
