//! Benchmark (ignored by default; not a timed assertion): the frozen-feature
//! sweep of issue #6 on synthetic cached features: 10 classes, 512-D
//! embeddings (class signal in a 16-D subspace, as embeddings have a low
//! intrinsic dimension), a 2,000-image test set, K in {1, 2, 4, 8, 16} x 5 seeds, zero-shot
//! plus every strategy-3 method. Run with
//! `RAYON_NUM_THREADS=1 cargo test -p medvlm-adapt --test methods_bench -- --ignored --nocapture`
//! (`MEDVLM_BENCH_THREADS` sets the sweep's worker threads, default 2;
//! `MEDVLM_BENCH_POLICY=support-cv` switches to support-set cross-validation)
//! and copy the figures into docs/methods.md.

use std::time::Instant;

use medvlm_adapt::fewshot::{HyperparameterPolicy, SamplingMode, STANDARD_SHOTS};
use medvlm_adapt::methods::sweep::{
    sweep_frozen, synthetic_task, LabelledFeatures, SweepPlan, SyntheticSpec,
};

#[test]
#[ignore = "benchmark: run explicitly with --ignored"]
fn frozen_feature_sweep_10_classes_2000_test_images() {
    let task = synthetic_task(SyntheticSpec {
        classes: 10,
        dim: 512,
        signal_dim: 16,
        pool_per_class: 40,
        test_per_class: 200,
        image_noise: 0.2,
        text_offset: 1.5,
        modality_gap: 2.0,
        text_gap: 2.0,
        seed: 2024,
    })
    .unwrap();
    let methods = [
        "zero-shot",
        "clip-adapter",
        "tip-adapter",
        "tip-adapter-f",
        "taskres",
        "linear-probe",
        "lp++",
        "clap",
    ];
    let policy = match std::env::var("MEDVLM_BENCH_POLICY").as_deref() {
        Ok("support-cv") => HyperparameterPolicy::SupportCv { folds: 4 },
        _ => HyperparameterPolicy::Fixed,
    };
    let plan = SweepPlan {
        methods: methods.iter().map(|s| s.to_string()).collect(),
        shots: STANDARD_SHOTS.to_vec(),
        seeds: vec![1, 2, 3, 4, 5],
        mode: SamplingMode::Balanced,
        policy,
        logit_scale: None,
        threads: std::env::var("MEDVLM_BENCH_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2),
    };
    let t0 = Instant::now();
    let records = sweep_frozen(
        LabelledFeatures {
            features: &task.pool_features,
            labels: &task.pool_labels,
        },
        LabelledFeatures {
            features: &task.test_features,
            labels: &task.test_labels,
        },
        &task.texts,
        &plan,
    )
    .unwrap();
    let total = t0.elapsed().as_secs_f64();
    assert_eq!(records.len(), methods.len() * 5 * 5);
    println!(
        "policy {policy:?}, {} sweep threads: {} runs in {total:.2} s",
        plan.threads,
        records.len()
    );
    println!("method         fit+eval s  mean accuracy at K = 1 2 4 8 16");
    for m in methods {
        let secs: f64 = records
            .iter()
            .filter(|r| r.method == m)
            .map(|r| r.fit_seconds + r.predict_seconds)
            .sum();
        let accs: Vec<String> = STANDARD_SHOTS
            .iter()
            .map(|&k| {
                let v: Vec<f64> = records
                    .iter()
                    .filter(|r| r.method == m && r.protocol.shots == k)
                    .map(|r| r.accuracy)
                    .collect();
                format!("{:.3}", v.iter().sum::<f64>() / v.len() as f64)
            })
            .collect();
        println!("{m:14} {secs:9.2}  {}", accs.join(" "));
    }
}
