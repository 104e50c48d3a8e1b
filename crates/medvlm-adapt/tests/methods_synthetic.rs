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

/// CLIP-Adapter under support-set cross-validation: where the text weights are far from the
/// image clusters (zero-shot is weak), the paper's generic ratio 0.2 leans too much on them;
/// the search on the support set alone picks a larger ratio and does better on the test set.
#[test]
fn clip_adapter_support_cv_chooses_its_residual_ratio_on_the_support_set() {
    use medvlm_adapt::method::{method_by_name, AdaptInput, SupportSet};
    let task = synthetic_task(SyntheticSpec {
        text_offset: 4.0,
        ..spec()
    })
    .unwrap();
    let test_acc = |clf: &dyn medvlm_adapt::method::AdaptedClassifier| {
        let pred: Vec<u32> = clf
            .logits(&task.test_features)
            .unwrap()
            .argmax(1)
            .unwrap()
            .to_vec1()
            .unwrap();
        let right = pred
            .iter()
            .zip(&task.test_labels)
            .filter(|(p, y)| **p as usize == **y)
            .count();
        right as f64 / pred.len() as f64
    };
    let (mut fixed_sum, mut cv_sum) = (0.0, 0.0);
    for seed in [1u64, 2] {
        // 16 images of each class, starting at another offset in each seed.
        let idx: Vec<usize> = (0..task.pool_labels.len())
            .filter(|&i| (i % 40 + seed as usize * 7) % 40 < 16)
            .collect();
        let support = SupportSet::from_pool(&task.pool_features, &task.pool_labels, &idx).unwrap();
        let mut input = AdaptInput::frozen(&task.texts, &support);
        input.seed = seed;
        // 200 steps keep the 17 fits of the search quick; the search is what is tested.
        let over = serde_json::json!({ "steps": 200 });
        let method = method_by_name("clip-adapter", Some(&over)).unwrap();
        let fixed = method.fit(&input).unwrap();
        input.policy = HyperparameterPolicy::SupportCv { folds: 4 };
        let cv = method.fit(&input).unwrap();
        let chosen = cv.card().hyperparameters["residual_ratio"]
            .as_f64()
            .unwrap();
        let info = &cv.card().fit_info;
        assert_eq!(info["cv_folds"], 4, "{info}");
        assert!(chosen > 0.2, "seed {seed}: chose {chosen} ({info})");
        let (a, b) = (test_acc(fixed.as_ref()), test_acc(cv.as_ref()));
        eprintln!("seed {seed}: fixed 0.2 -> {a:.3}, support-CV {chosen} -> {b:.3}");
        fixed_sum += a;
        cv_sum += b;
    }
    assert!(cv_sum > fixed_sum + 0.02, "{cv_sum} vs {fixed_sum}");

    // One image per class: no fold can hold a class out; the default is kept and said so.
    let idx: Vec<usize> = (0..5).map(|c| c * 40).collect();
    let support = SupportSet::from_pool(&task.pool_features, &task.pool_labels, &idx).unwrap();
    let mut input = AdaptInput::frozen(&task.texts, &support);
    input.policy = HyperparameterPolicy::SupportCv { folds: 4 };
    let over = serde_json::json!({ "steps": 20 });
    let clf = method_by_name("clip-adapter", Some(&over))
        .unwrap()
        .fit(&input)
        .unwrap();
    assert_eq!(clf.card().hyperparameters["residual_ratio"], 0.2);
    assert!(
        clf.card().fit_info["search"]
            .as_str()
            .unwrap()
            .starts_with("none"),
        "{}",
        clf.card().fit_info
    );
}
