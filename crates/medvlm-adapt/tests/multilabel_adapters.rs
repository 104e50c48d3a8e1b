//! Tip-Adapter(-F) and CLIP-Adapter on multi-label tasks (one sigmoid per
//! label, zero-shot part from positive/negative prompt pairs): the formulas
//! on tiny cases computed by hand in the comments, the stable binary
//! cross-entropy, the support-set search and the training objective.

use candle_core::{Device, Tensor};
use medvlm_adapt::fewshot::TaskKind;
use medvlm_adapt::method::{
    load_classifier, method_by_name, save_classifier, AdaptInput, ClassTexts, ClassifierCard,
    HyperparameterPolicy, SupportLabels, SupportSet, CARD_FORMAT,
};
use medvlm_adapt::methods::bce_with_logits;

fn t(rows: &[&[f32]]) -> Tensor {
    let d = rows[0].len();
    let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), d), &Device::Cpu).unwrap()
}

fn rows(x: &Tensor) -> Vec<Vec<f32>> {
    x.to_vec2::<f32>().unwrap()
}

fn close(a: &[f32], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert!((f64::from(*x) - y).abs() <= tol, "{a:?} vs {b:?}");
    }
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// Labels a, b in 3-D: positives p_a = e1, p_b = e3, negatives n_a = n_b = e2,
/// so the pair weights are p_a - n_a = (1, -1, 0) and p_b - n_b = (0, -1, 1).
fn pair_texts() -> ClassTexts {
    ClassTexts {
        class_names: vec!["a".into(), "b".into()],
        prompts: vec![t(&[&[1., 0., 0.]]), t(&[&[0., 0., 2.]])],
        negative_prompts: Some(vec![t(&[&[0., 3., 0.]]), t(&[&[0., 1., 0.]])]),
    }
}

#[test]
fn bce_with_logits_by_hand_and_finite_when_saturated() {
    // Entries (z, t): (0, 1) -> ln 2; (2, 0) -> 2 + ln(1 + e^-2);
    // (-3, 0) -> ln(1 + e^-3); (100, 1) -> ln(1 + e^-100) ~ 0.
    let z = t(&[&[0., 2.], &[-3., 100.]]);
    let y = t(&[&[1., 0.], &[0., 1.]]);
    let expect = (2f64.ln() + 2.0 + (-2f64).exp().ln_1p() + (-3f64).exp().ln_1p()) / 4.0;
    let got = bce_with_logits(&z, &y).unwrap().to_scalar::<f32>().unwrap();
    assert!((f64::from(got) - expect).abs() < 1e-5, "{got} vs {expect}");
    // A saturated wrong logit costs its size, not infinity (log of a sigmoid would be -inf).
    let got = bce_with_logits(&t(&[&[200.]]), &t(&[&[0.]]))
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((got - 200.0).abs() < 1e-3, "{got}");
}

#[test]
fn tip_adapter_multilabel_blends_pair_logits_with_signed_cache() {
    // Support: x1 = 3 e1 with {a}, x2 = 0.5 e2 with {a, b}; signed values
    // (+1, -1) and (+1, +1). f = (3, 4, 0) -> (0.6, 0.8, 0); scale 1,
    // alpha 1, beta 5.5: A = (exp(-5.5 * 0.4), exp(-5.5 * 0.2)) = (e^-2.2, e^-1.1).
    // Pair logits: a = 0.6 - 0.8 = -0.2, b = -0.8.
    // logits: a = -0.2 + e^-2.2 + e^-1.1, b = -0.8 - e^-2.2 + e^-1.1.
    let texts = pair_texts();
    let support = SupportSet {
        features: t(&[&[3., 0., 0.], &[0., 0.5, 0.]]),
        labels: SupportLabels::MultiLabel(vec![vec![true, false], vec![true, true]]),
    };
    let mut input = AdaptInput::frozen(&texts, &support);
    input.logit_scale = Some(1.0);
    let clf = method_by_name("tip-adapter", None)
        .unwrap()
        .fit(&input)
        .unwrap();
    assert_eq!(clf.card().task, TaskKind::MultiLabel);
    let (e22, e11) = ((-2.2f64).exp(), (-1.1f64).exp());
    let expect = [-0.2 + e22 + e11, -0.8 - e22 + e11];
    let f = t(&[&[3., 4., 0.]]);
    close(&rows(&clf.logits(&f).unwrap())[0], &expect, 1e-5);
    // Independent sigmoids, not a softmax.
    close(
        &rows(&clf.probabilities(&f).unwrap())[0],
        &[sigmoid(expect[0]), sigmoid(expect[1])],
        1e-6,
    );
    // Saved and loaded: the same multi-label classifier.
    let dir = tempfile::tempdir().unwrap();
    save_classifier(clf.as_ref(), dir.path()).unwrap();
    let back = load_classifier(dir.path()).unwrap();
    assert_eq!(back.card().task, TaskKind::MultiLabel);
    close(&rows(&back.logits(&f).unwrap())[0], &expect, 1e-5);

    // Without negative prompts the method says what is missing.
    let no_neg = ClassTexts {
        negative_prompts: None,
        ..texts.clone()
    };
    let err = method_by_name("tip-adapter", None)
        .unwrap()
        .fit(&AdaptInput::frozen(&no_neg, &support))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("negative prompts"), "{err}");
}

/// Six 5-D support images, two labels: label a on the first axis, label b
/// on the second, both on a third image kind. The prompt pairs are p_a = e3,
/// p_b = e4, n_a = n_b = e5, so the pair weights are e3 - e5 and e4 - e5:
/// the zero-shot logits of both labels are -s f_5, no signal about the
/// labels, which only the adapter or the cache can bring.
fn learnable() -> (ClassTexts, SupportSet) {
    let texts = ClassTexts {
        class_names: vec!["a".into(), "b".into()],
        prompts: vec![t(&[&[0., 0., 1., 0., 0.]]), t(&[&[0., 0., 0., 2., 0.]])],
        negative_prompts: Some(vec![
            t(&[&[0., 0., 0., 0., 1.]]),
            t(&[&[0., 0., 0., 0., 1.]]),
        ]),
    };
    let support = SupportSet {
        features: t(&[
            &[1., 0.1, 0., 0., 0.2],
            &[0.9, 0., 0., 0., 0.3],
            &[0.1, 1., 0., 0., 0.2],
            &[0., 0.8, 0., 0., 0.3],
            &[0.7, 0.7, 0., 0., 0.2],
            &[0.6, 0.8, 0., 0., 0.3],
        ]),
        labels: SupportLabels::MultiLabel(vec![
            vec![true, false],
            vec![true, false],
            vec![false, true],
            vec![false, true],
            vec![true, true],
            vec![true, true],
        ]),
    };
    (texts, support)
}

fn support_bce(clf: &dyn medvlm_adapt::method::AdaptedClassifier, support: &SupportSet) -> f32 {
    let logits = clf.logits(&support.features).unwrap();
    let targets = support.targets(2).unwrap();
    bce_with_logits(&logits, &targets)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn tip_adapter_f_and_clip_adapter_lower_the_support_bce() {
    let (texts, support) = learnable();
    let mut input = AdaptInput::frozen(&texts, &support);
    input.logit_scale = Some(10.0);
    for (method, untrained) in [
        ("tip-adapter-f", serde_json::json!({ "steps": 0 })),
        ("clip-adapter", serde_json::json!({ "steps": 0 })),
    ] {
        let before = method_by_name(method, Some(&untrained))
            .unwrap()
            .fit(&input)
            .unwrap();
        let after = method_by_name(method, None).unwrap().fit(&input).unwrap();
        assert_eq!(after.card().task, TaskKind::MultiLabel, "{method}");
        let (b, a) = (
            support_bce(before.as_ref(), &support),
            support_bce(after.as_ref(), &support),
        );
        assert!(a < b * 0.9, "{method}: support BCE {b} -> {a}");
        let reported = after.card().fit_info["final_loss"].as_f64().unwrap();
        // The reported loss is the last step's, evaluated before its update.
        assert!(reported < f64::from(b), "{method}: {reported} vs {b}");
        // Round trip.
        let dir = tempfile::tempdir().unwrap();
        save_classifier(after.as_ref(), dir.path()).unwrap();
        let back = load_classifier(dir.path()).unwrap();
        let (x, y) = (
            rows(&after.logits(&support.features).unwrap()),
            rows(&back.logits(&support.features).unwrap()),
        );
        for (r, s) in x.iter().zip(&y) {
            close(
                r,
                &s.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
                1e-5,
            );
        }
    }
}

#[test]
fn clip_adapter_with_ratio_zero_is_zero_shot_pairs() {
    // The blend f' = 0 * A(f) + 1 * f leaves f unchanged: the logits are
    // s f.(p_c - n_c) whatever the adapter learnt.
    let (texts, support) = learnable();
    let mut input = AdaptInput::frozen(&texts, &support);
    input.logit_scale = Some(10.0);
    let adapter = method_by_name(
        "clip-adapter",
        Some(&serde_json::json!({ "residual_ratio": 0.0, "steps": 5 })),
    )
    .unwrap()
    .fit(&input)
    .unwrap();
    let pairs = method_by_name("zero-shot-pairs", None)
        .unwrap()
        .fit(&input)
        .unwrap();
    let (x, y) = (
        rows(&adapter.logits(&support.features).unwrap()),
        rows(&pairs.logits(&support.features).unwrap()),
    );
    for (r, s) in x.iter().zip(&y) {
        close(
            r,
            &s.iter().map(|&v| f64::from(v)).collect::<Vec<_>>(),
            1e-5,
        );
    }
}

#[test]
fn clip_adapter_multilabel_forward_with_chosen_weights() {
    // As the multi-class hand case: W1 = [[1, 0], [0, -1]], W2 = [[0, 1], [1, 0]],
    // ratio 0.5, f = (0.6, 0.8) -> f' = (0.3, 0.7) / sqrt(0.58). Pairs: p_a = e1,
    // n_a = e2 -> (1, -1); p_b = e2, n_b = e1 -> (-1, 1). Scale 2:
    // logits = 2 (-0.4, 0.4) / sqrt(0.58).
    let dir = tempfile::tempdir().unwrap();
    let card = ClassifierCard {
        format: CARD_FORMAT.into(),
        method: "clip-adapter".into(),
        task: TaskKind::MultiLabel,
        class_names: vec!["a".into(), "b".into()],
        feature_dim: 2,
        logit_scale: 2.0,
        hyperparameters: serde_json::json!({
            "reduction": 1, "residual_ratio": 0.5, "steps": 0,
            "optimizer": { "kind": "adam-w", "lr": 0.001, "weight_decay": 0.0 }
        }),
        fit_info: serde_json::Value::Null,
        protocol: None,
    };
    std::fs::write(
        dir.path().join("classifier.json"),
        serde_json::to_string(&card).unwrap(),
    )
    .unwrap();
    let mut tensors: std::collections::HashMap<String, Tensor> = [
        ("adapter.w1".to_string(), t(&[&[1., 0.], &[0., -1.]])),
        ("adapter.w2".to_string(), t(&[&[0., 1.], &[1., 0.]])),
        ("text_weights".to_string(), t(&[&[1., 0.], &[0., 1.]])),
    ]
    .into_iter()
    .collect();
    candle_core::safetensors::save(&tensors, dir.path().join("classifier.safetensors")).unwrap();
    // A multi-label card without negative weights is a damaged checkpoint.
    let err = load_classifier(dir.path()).err().unwrap().to_string();
    assert!(err.contains("negative_text_weights"), "{err}");
    tensors.insert(
        "negative_text_weights".to_string(),
        t(&[&[0., 1.], &[1., 0.]]),
    );
    candle_core::safetensors::save(&tensors, dir.path().join("classifier.safetensors")).unwrap();
    let clf = load_classifier(dir.path()).unwrap();
    let n = 0.58f64.sqrt();
    let expect = [-0.8 / n, 0.8 / n];
    let f = t(&[&[0.6, 0.8]]);
    close(&rows(&clf.logits(&f).unwrap())[0], &expect, 1e-5);
    close(
        &rows(&clf.probabilities(&f).unwrap())[0],
        &[sigmoid(expect[0]), sigmoid(expect[1])],
        1e-6,
    );
}

/// Leave-one-out mean binary log-loss of Tip-Adapter on a multi-label
/// support set, written independently of the library from raw vectors.
fn loo_log_loss(
    f: &[Vec<f64>],
    y: &[Vec<bool>],
    w: &[Vec<f64>],
    scale: f64,
    alpha: f64,
    beta: f64,
) -> f64 {
    let norm = |v: &[f64]| -> Vec<f64> {
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter().map(|x| x / n).collect()
    };
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let f: Vec<Vec<f64>> = f.iter().map(|v| norm(v)).collect();
    let mut total = 0.0;
    let mut count = 0.0;
    for i in 0..f.len() {
        for c in 0..w.len() {
            let mut z = scale * dot(&f[i], &w[c]);
            for j in (0..f.len()).filter(|&j| j != i) {
                let a = (-beta * (1.0 - dot(&f[i], &f[j]))).exp();
                z += alpha * a * if y[j][c] { 1.0 } else { -1.0 };
            }
            let t = if y[i][c] { 1.0 } else { 0.0 };
            total += z.max(0.0) - z * t + (-z.abs()).exp().ln_1p();
            count += 1.0;
        }
    }
    total / count
}

#[test]
fn tip_adapter_multilabel_support_search_minimises_loo_log_loss() {
    let (texts, support) = learnable();
    let mut input = AdaptInput::frozen(&texts, &support);
    input.logit_scale = Some(10.0);
    input.policy = HyperparameterPolicy::SupportCv { folds: 3 };
    let clf = method_by_name("tip-adapter", None)
        .unwrap()
        .fit(&input)
        .unwrap();
    let info = &clf.card().fit_info;
    let reported = info["support_loo_log_loss"].as_f64().unwrap();
    let hp = &clf.card().hyperparameters;
    let (alpha, beta) = (hp["alpha"].as_f64().unwrap(), hp["beta"].as_f64().unwrap());

    let f: Vec<Vec<f64>> = rows(&support.features)
        .into_iter()
        .map(|r| r.into_iter().map(f64::from).collect())
        .collect();
    let SupportLabels::MultiLabel(y) = &support.labels else {
        unreachable!()
    };
    // Pair weights: the normalised positive minus negative prompts.
    let w = vec![vec![0., 0., 1., 0., -1.], vec![0., 0., 0., 1., -1.]];
    let at = |a: f64, b: f64| loo_log_loss(&f, y, &w, 10.0, a, b);
    assert!((reported - at(alpha, beta)).abs() < 1e-4, "{reported}");
    let mut best = at(1.0, 5.5);
    for a in [0.25, 0.5, 1.0, 2.0, 3.0] {
        for b in [1.0, 2.0, 3.0, 4.0, 5.5, 7.0] {
            best = best.min(at(a, b));
        }
    }
    assert!((reported - best).abs() < 1e-4, "{reported} vs best {best}");
    // The search moved off the default (the cache is the only signal here).
    assert!(reported < at(1.0, 5.5) - 1e-3);
}
