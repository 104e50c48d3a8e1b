//! Exact resume: a tiny two-tower model trained N steps in one go must end bit-identical to
//! the same run stopped at step k, checkpointed, dropped, reloaded from disk and continued.
//! The loop uses everything that shapes a trajectory: shuffled data order per epoch, a
//! persistent augmentation RNG, gradient accumulation, clipping, AdamW with decay exclusions
//! and a warm-up + cosine schedule.

use candle_core::{DType, Device, Tensor, Var};
use medvlm_train::checkpoint::{sha256_hex, CheckpointDir, RngState, TrainState, LATEST_FILE};
use medvlm_train::losses::clip_loss;
use medvlm_train::optim::{AdamW, AdamWConfig, GradAccumulator, NamedVar, WeightDecayRule};
use medvlm_train::schedule::WarmupCosine;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const N_SAMPLES: usize = 24;
const MICRO_BATCH: usize = 2;
const ACCUM: usize = 2;
const SEED: u64 = 42;
const TOTAL_STEPS: u64 = 10;

struct Data {
    img: Tensor,
    txt: Tensor,
}

fn data() -> Data {
    let mut rng = ChaCha8Rng::seed_from_u64(1234);
    let mut v = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random::<f32>() - 0.5).collect() };
    Data {
        img: Tensor::from_vec(v(N_SAMPLES * 5), (N_SAMPLES, 5), &Device::Cpu).unwrap(),
        txt: Tensor::from_vec(v(N_SAMPLES * 6), (N_SAMPLES, 6), &Device::Cpu).unwrap(),
    }
}

/// Fresh parameters: deterministic init, or zeros (to prove the checkpoint overwrites them).
fn params(zeros: bool) -> Vec<NamedVar> {
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let mut init = |r: usize, c: usize| {
        let v: Vec<f32> = (0..r * c)
            .map(|_| {
                if zeros {
                    0.0
                } else {
                    rng.random::<f32>() - 0.5
                }
            })
            .collect();
        Var::from_vec(v, (r, c), &Device::Cpu).unwrap()
    };
    vec![
        ("visual.proj.weight".to_string(), init(5, 4)),
        ("text.proj.weight".to_string(), init(6, 4)),
        ("text.proj.bias".to_string(), init(1, 4)),
        (
            "logit_scale".to_string(),
            Var::new(if zeros { 0.0f32 } else { 2.0 }, &Device::Cpu).unwrap(),
        ),
    ]
}

fn optimizer(p: &[NamedVar]) -> AdamW {
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.98,
        eps: 1e-6,
        weight_decay: 0.2,
    };
    AdamW::new(p.to_vec(), cfg, &WeightDecayRule::default()).unwrap()
}

fn epoch_order(seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..N_SAMPLES).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(
        seed.wrapping_mul(1_000_003).wrapping_add(epoch),
    ));
    order
}

/// Trains until `state.step == until`, optionally checkpointing after given steps.
fn train(
    p: &[NamedVar],
    opt: &mut AdamW,
    state: &mut TrainState,
    aug: &mut ChaCha8Rng,
    until: u64,
    ckpt: Option<(&CheckpointDir, &[u64])>,
) {
    let d = data();
    let schedule = WarmupCosine {
        base_lr: 0.05,
        warmup_steps: 3,
        total_steps: TOTAL_STEPS,
        min_lr: 0.0,
    };
    let batches_per_epoch = (N_SAMPLES / MICRO_BATCH) as u64;
    let mut acc = GradAccumulator::new();
    while state.step < until {
        let order = epoch_order(state.seed, state.epoch);
        let start = state.batch_in_epoch as usize * MICRO_BATCH;
        let idx: Vec<u32> = order[start..start + MICRO_BATCH]
            .iter()
            .map(|&i| i as u32)
            .collect();
        let idx = Tensor::new(idx.as_slice(), &Device::Cpu).unwrap();
        let noise: Vec<f32> = (0..MICRO_BATCH * 5)
            .map(|_| 0.01 * (aug.random::<f32>() - 0.5))
            .collect();
        let noise = Tensor::from_vec(noise, (MICRO_BATCH, 5), &Device::Cpu).unwrap();
        let img = (d.img.index_select(&idx, 0).unwrap() + noise).unwrap();
        let txt = d.txt.index_select(&idx, 0).unwrap();
        let zi = img.matmul(p[0].1.as_tensor()).unwrap();
        let zt = txt
            .matmul(p[1].1.as_tensor())
            .unwrap()
            .broadcast_add(p[2].1.as_tensor())
            .unwrap();
        let loss = clip_loss(&zi, &zt, p[3].1.as_tensor()).unwrap();
        acc.add(&loss.backward().unwrap(), p).unwrap();
        state.batch_in_epoch += 1;
        if state.batch_in_epoch == batches_per_epoch {
            state.epoch += 1;
            state.batch_in_epoch = 0;
        }
        if acc.micro_batches() == ACCUM {
            let mut g = acc.finish().unwrap();
            g.clip_global_norm(1.0).unwrap();
            opt.step(&g, schedule.lr(state.step)).unwrap();
            state.step += 1;
            if let Some((dir, at)) = ckpt {
                if at.contains(&state.step) {
                    state.rng.insert("augment".into(), RngState::capture(aug));
                    dir.save(p, opt, state).unwrap();
                }
            }
        }
    }
}

fn bits(p: &[NamedVar]) -> Vec<Vec<u32>> {
    p.iter()
        .map(|(_, v)| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        })
        .collect()
}

fn config_hash() -> String {
    sha256_hex(b"tiny clip test config")
}

#[test]
fn resumed_training_is_bit_identical() {
    // Uninterrupted reference run.
    let p = params(false);
    let initial = bits(&p);
    let mut opt = optimizer(&p);
    let mut state = TrainState::new(SEED, config_hash());
    let mut aug = ChaCha8Rng::seed_from_u64(7);
    train(&p, &mut opt, &mut state, &mut aug, TOTAL_STEPS, None);
    let reference = bits(&p);
    assert_ne!(reference, initial, "training moved the weights");

    // Interrupted run: checkpoints at steps 2 and 4 (mid-epoch: 6 updates per epoch).
    let tmp = tempfile::tempdir().unwrap();
    let ckdir = CheckpointDir::new(tmp.path().join("ckpt"), Some(1)).unwrap();
    {
        let p = params(false);
        let mut opt = optimizer(&p);
        let mut state = TrainState::new(SEED, config_hash());
        let mut aug = ChaCha8Rng::seed_from_u64(7);
        train(
            &p,
            &mut opt,
            &mut state,
            &mut aug,
            4,
            Some((&ckdir, &[2, 4])),
        );
        // Everything of this "process" is dropped here.
    }
    let listed = ckdir.list().unwrap();
    assert_eq!(listed.len(), 1, "keep = 1 pruned step 2: {listed:?}");
    assert_eq!(listed[0].0, 4);
    let latest = std::fs::read_to_string(tmp.path().join("ckpt").join(LATEST_FILE)).unwrap();
    assert_eq!(latest.trim(), "step-000004");

    // New process: zero-initialised parameters, fresh optimiser, state from disk.
    let ckdir = CheckpointDir::new(tmp.path().join("ckpt"), Some(1)).unwrap();
    let p = params(true);
    let mut opt = optimizer(&p);
    let loaded = ckdir
        .load_latest(&Device::Cpu)
        .unwrap()
        .expect("a checkpoint exists");
    let mut state = loaded.restore(&p, &mut opt, Some(&config_hash())).unwrap();
    assert_eq!((state.step, state.epoch, state.batch_in_epoch), (4, 0, 8));
    let mut aug = state.rng["augment"].restore().unwrap();
    train(&p, &mut opt, &mut state, &mut aug, TOTAL_STEPS, None);
    assert_eq!(
        bits(&p),
        reference,
        "resumed run diverged from the uninterrupted one"
    );
}

#[test]
fn checkpoint_errors_name_the_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = CheckpointDir::new(tmp.path(), None).unwrap();
    assert!(dir.latest().unwrap().is_none());
    assert!(dir.load_latest(&Device::Cpu).unwrap().is_none());

    let p = params(false);
    let opt = optimizer(&p);
    let mut state = TrainState::new(SEED, config_hash());
    state.step = 3;
    // A stale temporary directory from a crashed save is cleaned up.
    std::fs::create_dir(tmp.path().join(".tmp-step-000002-1")).unwrap();
    std::fs::write(tmp.path().join(".latest.tmp-1"), b"step-000002").unwrap();
    let saved = dir.save(&p, &opt, &state).unwrap();
    assert!(!tmp.path().join(".tmp-step-000002-1").exists());
    assert!(!tmp.path().join(".latest.tmp-1").exists());
    // Saving the same step again replaces it.
    dir.save(&p, &opt, &state).unwrap();
    assert_eq!(dir.list().unwrap().len(), 1);

    // Config changed -> refused.
    let loaded = dir.load_latest(&Device::Cpu).unwrap().unwrap();
    let mut opt2 = optimizer(&p);
    let err = loaded.restore(&p, &mut opt2, Some("other")).unwrap_err();
    assert!(err.to_string().contains("config hash"), "{err}");
    // Different model -> refused, naming the parameter.
    let mut other = params(false);
    other[0] = (
        "visual.proj.weight".to_string(),
        Var::zeros((3, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    let mut opt3 = optimizer(&other);
    let err = loaded.restore(&other, &mut opt3, None).unwrap_err();
    assert!(err.to_string().contains("visual.proj.weight"), "{err}");

    // Corrupt state.json -> error naming the file.
    std::fs::write(saved.join("state.json"), b"{ not json").unwrap();
    let err = dir.load_latest(&Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("state.json"), "{err}");
    // Truncated weights -> error naming the file.
    std::fs::write(saved.join("state.json"), b"").unwrap();
    dir.save(&p, &opt, &state).unwrap();
    std::fs::write(saved.join("model.safetensors"), b"garbage").unwrap();
    let err = dir.load_latest(&Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    // A latest pointer to nowhere.
    std::fs::write(tmp.path().join(LATEST_FILE), b"step-000777\n").unwrap();
    let err = dir.latest().unwrap_err();
    assert!(err.to_string().contains("step-000777"), "{err}");
    std::fs::write(tmp.path().join(LATEST_FILE), b"../../etc\n").unwrap();
    assert!(dir.latest().is_err());
}

#[test]
fn rng_state_round_trips_mid_stream() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for _ in 0..37 {
        let _: u32 = rng.random();
    }
    let state = RngState::capture(&rng);
    let json = serde_json::to_string(&state).unwrap();
    let mut restored = serde_json::from_str::<RngState>(&json)
        .unwrap()
        .restore()
        .unwrap();
    let a: Vec<u64> = (0..10).map(|_| rng.random()).collect();
    let b: Vec<u64> = (0..10).map(|_| restored.random()).collect();
    assert_eq!(a, b);
}
