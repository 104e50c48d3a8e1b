//! Synthetic few-shot check: Gaussian class clusters in 32-D, text
//! embeddings near (but offset from) the class means. Zero-shot must be above
//! chance and every trained frozen-feature method at K = 16 must beat
//! zero-shot on the test set, averaged over seeds.

use medvlm_adapt::fewshot::{HyperparameterPolicy, SamplingMode};
use medvlm_adapt::methods::sweep::{
    sweep_frozen, synthetic_task, LabelledFeatures, SweepPlan, SyntheticSpec,
};

fn spec() -> SyntheticSpec {
    SyntheticSpec {
        classes: 5,
        dim: 32,
        signal_dim: 32,
        pool_per_class: 40,
        test_per_class: 60,
        image_noise: 0.2,
        text_offset: 1.5,
        modality_gap: 2.0,
        text_gap: 2.0,
        seed: 7,
    }
}

#[test]
fn trained_methods_beat_zero_shot_at_16_shots() {
    let task = synthetic_task(spec()).unwrap();
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
    let plan = SweepPlan {
        methods: methods.iter().map(|s| s.to_string()).collect(),
        shots: vec![1, 16],
        seeds: vec![1, 2],
        mode: SamplingMode::Balanced,
        policy: HyperparameterPolicy::Fixed,
        logit_scale: None,
        threads: 2,
    };
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
    let mean = |m: &str, k: usize| {
        let v: Vec<f64> = records
            .iter()
            .filter(|r| r.method == m && r.protocol.shots == k)
            .map(|r| r.accuracy)
            .collect();
        assert_eq!(v.len(), 2, "{m} K={k}");
        v.iter().sum::<f64>() / v.len() as f64
    };
    for k in [1, 16] {
        for m in methods {
            eprintln!("K={k:2} {m:14} acc {:.3}", mean(m, k));
        }
    }
    let zs = mean("zero-shot", 16);
    assert!(zs > 1.0 / 5.0 + 0.1, "zero-shot {zs} not above chance");
    for m in &methods[1..] {
        let acc = mean(m, 16);
        assert!(
            acc > zs + 0.02,
            "{m} at K=16: {acc} does not beat zero-shot {zs}"
        );
    }
}

#[test]
fn realistic_mode_with_support_cv_records_its_protocol() {
    let task = synthetic_task(spec()).unwrap();
    let plan = SweepPlan {
        methods: vec![
            "linear-probe".into(),
            "tip-adapter".into(),
            "zero-shot".into(),
        ],
        shots: vec![8],
        seeds: vec![3],
        mode: SamplingMode::Realistic { min_per_class: 1 },
        policy: HyperparameterPolicy::SupportCv { folds: 3 },
        logit_scale: None,
        threads: 1,
    };
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
    assert_eq!(records.len(), 3);
    let zs = records
        .iter()
        .find(|r| r.method == "zero-shot")
        .unwrap()
        .accuracy;
    for r in &records {
        assert_eq!(r.support_size, 8 * 5);
        assert!(!r.protocol.validation_set);
        let json = serde_json::to_value(&r.protocol).unwrap();
        assert_eq!(json["mode"]["kind"], "realistic");
        assert_eq!(json["hyperparameter_policy"]["kind"], "support-cv");
        assert_eq!(json["hyperparameter_policy"]["folds"], 3);
    }
    let lp = records
        .iter()
        .find(|r| r.method == "linear-probe")
        .unwrap()
        .accuracy;
    assert!(lp > zs, "linear probe {lp} vs zero-shot {zs}");
}

#[test]
fn sweep_results_do_not_depend_on_the_thread_count() {
    let task = synthetic_task(spec()).unwrap();
    let run = |threads: usize| {
        let plan = SweepPlan {
            methods: vec!["clap".into(), "linear-probe".into()],
            shots: vec![1, 2, 4],
            seeds: vec![1, 2],
            mode: SamplingMode::Balanced,
            policy: HyperparameterPolicy::Fixed,
            logit_scale: None,
            threads,
        };
        sweep_frozen(
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
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r.method,
                r.protocol.shots,
                r.protocol.seed,
                r.accuracy,
                r.balanced_accuracy,
            )
        })
        .collect::<Vec<_>>()
    };
    let sequential = run(1);
    assert_eq!(sequential.len(), 2 * 3 * 2);
    assert_eq!(sequential, run(3));
}
