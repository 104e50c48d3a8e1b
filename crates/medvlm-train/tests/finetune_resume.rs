//! A LoRA fine-tuning run stopped after a checkpoint and resumed on a freshly loaded model
//! (adapters recreated from the seed, then restored from the checkpoint) ends with the same
//! adapter weights and temperature, bit for bit, as an uninterrupted run.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarMap;
use medvlm_models::{load_model_dir, LoadMode, LoadOptions};
use medvlm_train::finetune::{
    prepare, scalar_value, snapshot, train_contrastive, FinetuneSpec, Mode, PairData, Towers,
};
use medvlm_train::lora::LoraSpec;
use medvlm_train::losses::{ContrastiveHead, LossKind};
use medvlm_train::optim::AdamWConfig;
use medvlm_train::trainer::{LoopConfig, NoCallbacks, RunPaths};
use rand::{Rng, SeedableRng};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../medvlm-models/tests/fixtures/clip")
}

fn pairs() -> PairData {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
    let texts = [
        "a chest x-ray",
        "a brain mri",
        "a skin lesion",
        "a histology slide",
    ];
    PairData {
        images: (0..8)
            .map(|_| {
                (0..3 * 32 * 32)
                    .map(|_| rng.random_range(-2.0f32..2.0))
                    .collect()
            })
            .collect(),
        texts: (0..8).map(|i| texts[i % 4].to_string()).collect(),
    }
}

/// Loads the model, adds LoRA (dropout on, so its RNG matters too) and trains up to
/// `max_steps` (constant learning rate, so the schedule does not depend on the run length).
/// Returns the adapter values and the temperature.
fn run(dir: &Path, max_steps: u64, resume: bool) -> (Vec<Vec<f32>>, f64) {
    let vm = VarMap::new();
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype: DType::F32,
        mode: LoadMode::Trainable(vm.clone()),
    };
    let mut lm = load_model_dir(&fixture(), &opts).unwrap();
    let spec = FinetuneSpec {
        mode: Mode::Lora(LoraSpec {
            dropout: 0.0,
            ..LoraSpec::clip_lora()
        }),
        towers: Towers::Both,
    };
    let prep = prepare(lm.model.as_mut(), &vm, &VarMap::new(), &spec, 8).unwrap();
    let s = scalar_value(&lm.model.logit_scale()).unwrap();
    let head =
        ContrastiveHead::new(LossKind::Clip, s, 0.0, true, DType::F32, &Device::Cpu).unwrap();
    let cfg = LoopConfig {
        seed: 5,
        epochs: 10,
        max_steps: Some(max_steps),
        batch_size: 4,
        grad_accum: 1,
        clip_norm: Some(1.0),
        lr: 5e-3,
        min_lr: 5e-3,
        warmup_steps: 0,
        adamw: AdamWConfig::default(),
        checkpoint_every: 2,
        keep: 2,
        prefetch: 1,
    };
    let paths = RunPaths {
        checkpoints: dir.join("checkpoints"),
        log: dir.join("log.jsonl"),
    };
    let summary = train_contrastive(
        lm.model.as_ref(),
        &lm.tokenizer,
        &lm.preprocess,
        &pairs(),
        &prep.params,
        &head,
        Some(&vm),
        &cfg,
        &paths,
        resume,
        "resume-test",
        &mut NoCallbacks,
    )
    .unwrap();
    assert_eq!(summary.steps, max_steps);
    let values = snapshot(&prep.params)
        .unwrap()
        .into_iter()
        .map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect();
    (
        values,
        scalar_value(head.logit_scale().as_tensor()).unwrap(),
    )
}

#[test]
fn lora_run_resumes_exactly() {
    let whole = tempfile::tempdir().unwrap();
    let (a, ta) = run(whole.path(), 5, false);
    let split = tempfile::tempdir().unwrap();
    // 3 updates: stops in the middle of the second epoch (2 updates per epoch).
    let (b_partial, _) = run(split.path(), 3, false);
    assert_ne!(
        a, b_partial,
        "the first part must not already be the end state"
    );
    let (b, tb) = run(split.path(), 5, true);
    assert_eq!(a, b);
    assert_eq!(ta, tb);
}
