//! The shared interface: registry, save/load round trips, and bad input.

use candle_core::{Device, Tensor};
use medvlm_adapt::fewshot::{FewShotProtocol, HyperparameterPolicy, TaskKind};
use medvlm_adapt::method::{
    frozen_feature_method_names, load_classifier, method_by_name, save_classifier, AdaptInput,
    FeatureAccess, MethodError, SupportSet, METHOD_NAMES,
};
use medvlm_adapt::methods::sweep::{synthetic_task, SyntheticSpec, SyntheticTask};

fn task() -> SyntheticTask {
    synthetic_task(SyntheticSpec {
        classes: 3,
        dim: 16,
        signal_dim: 16,
        pool_per_class: 6,
        test_per_class: 5,
        image_noise: 0.2,
        text_offset: 1.5,
        modality_gap: 2.0,
        text_gap: 2.0,
        seed: 11,
    })
    .unwrap()
}

#[test]
fn registry_knows_every_strategy_and_rejects_unknown_names() {
    for name in METHOD_NAMES {
        let m = method_by_name(name, None).unwrap();
        assert_eq!(m.name(), *name);
    }
    let frozen = frozen_feature_method_names();
    assert_eq!(
        frozen,
        vec![
            "zero-shot",
            "zero-shot-ensemble",
            "zero-shot-descriptions",
            "zero-shot-mixture",
            "zero-shot-pairs",
            "clip-adapter",
            "tip-adapter",
            "tip-adapter-f",
            "taskres",
            "linear-probe",
            "lp++",
            "clap"
        ]
    );
    let err = method_by_name("tip_adaptor", None).err().unwrap();
    assert!(matches!(err, MethodError::UnknownMethod { .. }));
    assert!(err.to_string().contains("tip-adapter-f"), "{err}");
}

#[test]
fn hyperparameter_overrides_are_checked() {
    let m = method_by_name("tip-adapter", Some(&serde_json::json!({ "alpha": 2.5 }))).unwrap();
    assert_eq!(m.hyperparameters()["alpha"], 2.5);
    assert_eq!(m.hyperparameters()["beta"], 5.5);
    let err = method_by_name("tip-adapter", Some(&serde_json::json!({ "gamma": 1 })))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("unknown field 'gamma'") && err.contains("tip-adapter"),
        "{err}"
    );
    let err = method_by_name("taskres", Some(&serde_json::json!({ "alpha": "big" })))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("taskres"), "{err}");
    // The optimiser is spelled as serialised ("adam-w") or as users write it ("adamw").
    for kind in ["adam-w", "adamw"] {
        let opt = serde_json::json!({ "kind": kind, "lr": 0.01, "weight_decay": 0.0 });
        let m = method_by_name("taskres", Some(&serde_json::json!({ "optimizer": opt }))).unwrap();
        assert_eq!(m.hyperparameters()["optimizer"]["lr"], 0.01, "{kind}");
        assert_eq!(m.hyperparameters()["optimizer"]["kind"], "adam-w", "{kind}");
    }
}

#[test]
fn encoder_methods_on_cached_features_say_what_to_change() {
    let task = task();
    let support =
        SupportSet::from_pool(&task.pool_features, &task.pool_labels, &[0, 6, 12]).unwrap();
    let input = AdaptInput::frozen(&task.texts, &support);
    for name in [
        "coop",
        "cocoop",
        "kgcoop",
        "vpt",
        "maple",
        "lora",
        "bitfit",
        "partial-finetune",
        "full-finetune",
    ] {
        let m = method_by_name(name, None).unwrap();
        assert!(m.requires_encoder());
        let err = m.fit(&input).err().unwrap();
        assert!(
            matches!(err, MethodError::NeedsEncoder { .. }),
            "{name}: {err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(name) && msg.contains("cached features") && msg.contains("linear-probe"),
            "{msg}"
        );
        let with_encoder = AdaptInput {
            access: FeatureAccess::EncoderAccess,
            ..input
        };
        assert!(matches!(
            m.fit(&with_encoder).err().unwrap(),
            MethodError::NotImplemented(_)
        ));
    }
}

#[test]
fn save_load_round_trip_gives_identical_probabilities() {
    let task = task();
    let idx: Vec<usize> = (0..task.pool_labels.len()).collect();
    let support = SupportSet::from_pool(&task.pool_features, &task.pool_labels, &idx).unwrap();
    let mut input = AdaptInput::frozen(&task.texts, &support);
    input.seed = 5;
    input.policy = HyperparameterPolicy::SupportCv { folds: 3 };
    let protocol = FewShotProtocol::realistic(2, 5, TaskKind::MultiClass, input.policy);
    input.protocol = Some(&protocol);
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "zero-shot",
        "zero-shot-ensemble",
        "zero-shot-mixture",
        "clip-adapter",
        "tip-adapter",
        "tip-adapter-f",
        "taskres",
        "linear-probe",
        "lp++",
        "clap",
    ] {
        let over = match name {
            "clip-adapter" | "tip-adapter-f" | "taskres" | "clap" => {
                Some(serde_json::json!({ "steps": 20 }))
            }
            "lp++" => Some(serde_json::json!({ "steps": 30 })),
            _ => None,
        };
        let clf = method_by_name(name, over.as_ref())
            .unwrap()
            .fit(&input)
            .unwrap();
        let sub = dir.path().join(name);
        save_classifier(clf.as_ref(), &sub).unwrap();
        let back = load_classifier(&sub).unwrap();
        // Cards agree; fit diagnostics only up to JSON float parsing.
        let (a, b) = (clf.card(), back.card());
        assert_eq!(
            (&a.method, &a.task, &a.class_names, a.feature_dim),
            (&b.method, &b.task, &b.class_names, b.feature_dim)
        );
        assert_eq!(
            (a.logit_scale, &a.hyperparameters),
            (b.logit_scale, &b.hyperparameters),
            "{name}"
        );
        assert_eq!(
            b.protocol.as_ref(),
            Some(&protocol),
            "{name}: the card names the protocol"
        );
        let keys =
            |v: &serde_json::Value| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>());
        assert_eq!(keys(&a.fit_info), keys(&b.fit_info), "{name}");
        let a = clf
            .probabilities(&task.test_features)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let b = back
            .probabilities(&task.test_features)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(a, b, "{name}");
        for r in &a {
            assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{name}: {r:?}");
        }
        // No temporary files left behind.
        let leftovers: Vec<_> = std::fs::read_dir(&sub)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{name}");
    }
}

#[test]
fn fits_are_deterministic_given_the_seed() {
    let task = task();
    let idx: Vec<usize> = (0..task.pool_labels.len()).collect();
    let support = SupportSet::from_pool(&task.pool_features, &task.pool_labels, &idx).unwrap();
    let mut input = AdaptInput::frozen(&task.texts, &support);
    input.seed = 9;
    let over = serde_json::json!({ "steps": 10 });
    let m = method_by_name("clip-adapter", Some(&over)).unwrap();
    let a = m
        .fit(&input)
        .unwrap()
        .logits(&task.test_features)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let b = m
        .fit(&input)
        .unwrap()
        .logits(&task.test_features)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(a, b);
    input.seed = 10;
    let c = m
        .fit(&input)
        .unwrap()
        .logits(&task.test_features)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert_ne!(
        a, c,
        "a different seed should give a different initialisation"
    );
}

#[test]
fn bad_shapes_give_clear_errors() {
    let task = task();
    // Support features of the wrong dimension.
    let wrong = SupportSet::multi_class(
        Tensor::ones((2, 5), candle_core::DType::F32, &Device::Cpu).unwrap(),
        vec![0, 1],
    );
    let err = method_by_name("linear-probe", None)
        .unwrap()
        .fit(&AdaptInput::frozen(&task.texts, &wrong))
        .err()
        .unwrap();
    assert!(err.to_string().contains("dimension 5"), "{err}");
    // Label outside the classes.
    let bad = SupportSet::multi_class(task.pool_features.narrow(0, 0, 2).unwrap(), vec![0, 7]);
    let err = method_by_name("clap", None)
        .unwrap()
        .fit(&AdaptInput::frozen(&task.texts, &bad))
        .err()
        .unwrap();
    assert!(err.to_string().contains("label 7"), "{err}");
    // Multi-label support for a multi-class-only method.
    let ml = SupportSet {
        features: task.pool_features.narrow(0, 0, 2).unwrap(),
        labels: medvlm_adapt::method::SupportLabels::MultiLabel(vec![
            vec![true, false, true],
            vec![false, true, false],
        ]),
    };
    let err = method_by_name("taskres", None)
        .unwrap()
        .fit(&AdaptInput::frozen(&task.texts, &ml))
        .err()
        .unwrap();
    assert!(err.to_string().contains("linear-probe"), "{err}");
    // The linear probe handles multi-label: one sigmoid per label.
    let clf = method_by_name("linear-probe", None)
        .unwrap()
        .fit(&AdaptInput::frozen(&task.texts, &ml))
        .unwrap();
    let p = clf
        .probabilities(&task.pool_features.narrow(0, 0, 2).unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert!(
        p[0][0] > 0.5 && p[0][1] < 0.5 && p[0][2] > 0.5 && p[1][1] > 0.5,
        "{p:?}"
    );
    // Scoring features of the wrong dimension.
    let zs = method_by_name("zero-shot", None)
        .unwrap()
        .fit(&AdaptInput::frozen(&task.texts, &wrong))
        .unwrap();
    let err = zs
        .logits(&Tensor::ones((1, 4), candle_core::DType::F32, &Device::Cpu).unwrap())
        .err()
        .unwrap();
    assert!(err.to_string().contains("dimension 4"), "{err}");
}

#[test]
fn loading_a_damaged_classifier_names_the_file() {
    let task = task();
    let support =
        SupportSet::from_pool(&task.pool_features, &task.pool_labels, &[0, 6, 12]).unwrap();
    let clf = method_by_name("tip-adapter", None)
        .unwrap()
        .fit(&AdaptInput::frozen(&task.texts, &support))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_classifier(clf.as_ref(), dir.path()).unwrap();
    std::fs::write(
        dir.path().join("classifier.safetensors"),
        b"not safetensors",
    )
    .unwrap();
    let err = load_classifier(dir.path()).err().unwrap().to_string();
    assert!(err.contains("classifier.safetensors"), "{err}");
    std::fs::remove_file(dir.path().join("classifier.json")).unwrap();
    let err = load_classifier(dir.path()).err().unwrap().to_string();
    assert!(err.contains("classifier.json"), "{err}");
}
