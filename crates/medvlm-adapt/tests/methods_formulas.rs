//! Each method's core formula on tiny cases computed by hand (2 classes,
//! 2- or 3-dimensional features). The expected numbers are worked out in the
//! comments.

use candle_core::{Device, Tensor};
use medvlm_adapt::method::{
    load_classifier, method_by_name, AdaptInput, ClassTexts, ClassifierCard, MethodError,
    SupportSet, CARD_FORMAT,
};
use medvlm_adapt::methods::{clap, linear_probe, lp_plus_plus, taskres, tip_adapter};

fn t(rows: &[&[f32]]) -> Tensor {
    let d = rows[0].len();
    let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), d), &Device::Cpu).unwrap()
}

fn row(x: &Tensor) -> Vec<f32> {
    x.to_vec2::<f32>().unwrap().remove(0)
}

fn close(a: &[f32], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert!((f64::from(*x) - y).abs() <= tol, "{a:?} vs {b:?}");
    }
}

/// Class 0: prompts e1 and e2 (first is e1); class 1: prompt 2 e3.
fn texts() -> ClassTexts {
    ClassTexts {
        class_names: vec!["a".into(), "b".into()],
        prompts: vec![t(&[&[1., 0., 0.], &[0., 1., 0.]]), t(&[&[0., 0., 2.]])],
        negative_prompts: None,
    }
}

fn empty_support() -> SupportSet {
    SupportSet::multi_class(
        Tensor::zeros((0, 3), candle_core::DType::F32, &Device::Cpu).unwrap(),
        vec![],
    )
}

#[test]
fn zero_shot_single_template_and_ensemble() {
    let texts = texts();
    let support = empty_support();
    let input = AdaptInput::frozen(&texts, &support);
    // f = (3, 4, 0) -> (0.6, 0.8, 0).
    let f = t(&[&[3., 4., 0.]]);
    // Single template: w0 = e1, w1 = e3 -> 100 * (0.6, 0).
    let single = method_by_name("zero-shot", None)
        .unwrap()
        .fit(&input)
        .unwrap();
    close(&row(&single.logits(&f).unwrap()), &[60.0, 0.0], 1e-4);
    // Ensemble: w0 = norm(mean(e1, e2)) = (1, 1, 0)/sqrt2 -> 100 * 1.4/sqrt2.
    let ens = method_by_name("zero-shot-ensemble", None)
        .unwrap()
        .fit(&input)
        .unwrap();
    close(
        &row(&ens.logits(&f).unwrap()),
        &[100.0 * 1.4 / 2f64.sqrt(), 0.0],
        1e-3,
    );
    // Probabilities: softmax of (98.99, 0) -> (1, ~0), summing to 1.
    let p = row(&ens.probabilities(&f).unwrap());
    assert!((p[0] + p[1] - 1.0).abs() < 1e-6 && p[0] > 0.999);
}

#[test]
fn zero_shot_mixture_averages_each_prompts_exp_logit_and_survives_saving() {
    let texts = texts();
    let support = empty_support();
    let mut input = AdaptInput::frozen(&texts, &support);
    input.logit_scale = Some(10.0);
    let clf = method_by_name("zero-shot-mixture", None)
        .unwrap()
        .fit(&input)
        .unwrap();
    // f = (0.6, 0.8, 0): class 0's prompts e1, e2 give cosines 0.6 and 0.8, so its logit is
    // ln((e^6 + e^8) / 2); class 1's single prompt e3 (normalised) gives 0.
    let f = t(&[&[3., 4., 0.]]);
    let expected = [((6f64.exp() + 8f64.exp()) / 2.0).ln(), 0.0];
    close(&row(&clf.logits(&f).unwrap()), &expected, 1e-4);
    // Not the ensemble's 10 * 1.4 / sqrt 2 = 9.90 (the mean embedding's cosine).
    assert!((expected[0] - 14f64 / 2f64.sqrt()).abs() > 1.0);
    let dir = tempfile::tempdir().unwrap();
    medvlm_adapt::method::save_classifier(clf.as_ref(), dir.path()).unwrap();
    let back = load_classifier(dir.path()).unwrap();
    assert_eq!(back.card().method, "zero-shot-mixture");
    close(&row(&back.logits(&f).unwrap()), &expected, 1e-4);
}

#[test]
fn zero_shot_positive_negative_pairs_is_a_softmax_over_each_pair() {
    let texts = ClassTexts {
        class_names: vec!["effusion".into()],
        prompts: vec![t(&[&[1., 0., 0.]])],
        negative_prompts: Some(vec![t(&[&[0., 1., 0.]])]),
    };
    let support = empty_support();
    let mut input = AdaptInput::frozen(&texts, &support);
    input.logit_scale = Some(10.0);
    let clf = method_by_name("zero-shot-pairs", None)
        .unwrap()
        .fit(&input)
        .unwrap();
    // softmax([10 * 0.6, 10 * 0.8])[0] = 1 / (1 + e^2) = sigmoid(-2).
    let f = t(&[&[3., 4., 0.]]);
    close(&row(&clf.logits(&f).unwrap()), &[-2.0], 1e-5);
    close(
        &row(&clf.probabilities(&f).unwrap()),
        &[1.0 / (1.0 + 2f64.exp())],
        1e-6,
    );
    // Saved and loaded, it is still a multi-label classifier with the same output.
    let dir = tempfile::tempdir().unwrap();
    medvlm_adapt::method::save_classifier(clf.as_ref(), dir.path()).unwrap();
    let back = load_classifier(dir.path()).unwrap();
    assert_eq!(
        back.card().task,
        medvlm_adapt::fewshot::TaskKind::MultiLabel
    );
    close(
        &row(&back.probabilities(&f).unwrap()),
        &[1.0 / (1.0 + 2f64.exp())],
        1e-6,
    );
    // Without negative prompts the method says what is missing.
    let no_neg = ClassTexts {
        negative_prompts: None,
        ..texts.clone()
    };
    let err = method_by_name("zero-shot-pairs", None)
        .unwrap()
        .fit(&AdaptInput::frozen(&no_neg, &support))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("negative prompts"), "{err}");
}

#[test]
fn tip_adapter_affinity_and_blend() {
    // Keys e1 (class 0), e2 (class 1); text w0 = e1, w1 = e3; f = (0.6, 0.8, 0).
    let keys = t(&[&[1., 0., 0.], &[0., 1., 0.]]);
    let values = t(&[&[1., 0.], &[0., 1.]]);
    let text = t(&[&[1., 0., 0.], &[0., 0., 1.]]);
    let f = t(&[&[0.6, 0.8, 0.]]);
    // A = exp(-5.5 (1 - cos)) = (exp(-2.2), exp(-1.1)).
    let a = row(&tip_adapter::affinity(&f, &keys, 5.5).unwrap());
    close(&a, &[(-2.2f64).exp(), (-1.1f64).exp()], 1e-6);
    // logits = s f W^T + alpha A L with s = 1, alpha = 2:
    // (0.6 + 2 e^-2.2, 0 + 2 e^-1.1).
    let l = row(&tip_adapter::tip_logits(&f, &keys, &values, &text, 2.0, 5.5, 1.0).unwrap());
    close(
        &l,
        &[0.6 + 2.0 * (-2.2f64).exp(), 2.0 * (-1.1f64).exp()],
        1e-6,
    );

    // The same through the method: support = keys, default alpha = 1, beta = 5.5.
    let texts = ClassTexts {
        class_names: vec!["a".into(), "b".into()],
        prompts: vec![t(&[&[2., 0., 0.]]), t(&[&[0., 0., 1.]])],
        negative_prompts: None,
    };
    let support = SupportSet::multi_class(t(&[&[3., 0., 0.], &[0., 0.5, 0.]]), vec![0, 1]);
    let mut input = AdaptInput::frozen(&texts, &support);
    input.logit_scale = Some(1.0);
    let clf = method_by_name("tip-adapter", None)
        .unwrap()
        .fit(&input)
        .unwrap();
    close(
        &row(&clf.logits(&t(&[&[3., 4., 0.]])).unwrap()),
        &[0.6 + (-2.2f64).exp(), (-1.1f64).exp()],
        1e-5,
    );
    assert_eq!(clf.card().hyperparameters["alpha"], 1.0);
    assert_eq!(clf.card().hyperparameters["beta"], 5.5);
}

#[test]
fn taskres_adds_the_scaled_residual_then_renormalises() {
    // W0 = e1 + 0.5 e2 -> cos with (0.6, 0.8, 0) = (0.6 + 0.4)/sqrt(1.25); W1 = e2 -> 0.8.
    let base = t(&[&[1., 0., 0.], &[0., 1., 0.]]);
    let residual = t(&[&[0., 1., 0.], &[0., 0., 0.]]);
    let f = t(&[&[0.6, 0.8, 0.]]);
    let l = row(&taskres::taskres_logits(&f, &base, &residual, 0.5, 100.0).unwrap());
    close(&l, &[100.0 / 1.25f64.sqrt(), 80.0], 1e-3);
}

#[test]
fn lp_plus_plus_initialisation_is_data_driven_from_text_and_visual_prototypes() {
    // Support e1 (class 0), e2 (class 1); text t0 = e1, t1 = e2.
    let f = t(&[&[1., 0., 0.], &[0., 1., 0.]]);
    let text = t(&[&[1., 0., 0.], &[0., 1., 0.]]);
    // Own-class mean text logits (1, 1), mean 1 -> alpha0 = 250 (the C x C mean, 0.5,
    // would give 125).
    // F^T F = diag(1, 1, 0): lambda_max = 1 -> lr_w = 4 N / 1 = 8.
    // max_j sum_i (f_i . t_j)^2 = 1 -> lr_alpha = N / 4 = 0.5.
    let (alpha0, lr_w, lr_alpha) =
        lp_plus_plus::data_driven_constants(&f, &[0, 1], &text, 250.0).unwrap();
    assert!(
        (alpha0 - 250.0).abs() < 1e-4 && (lr_w - 8.0).abs() < 1e-3 && (lr_alpha - 0.5).abs() < 1e-6
    );

    // With zero steps the classifier is its initialisation: W = class sums of
    // the support features, b = 0, alpha = 250:
    // f = (0.6, 0.8, 0): (0.6 + 250 * 0.6, 0.8 + 250 * 0.8) = (150.6, 200.8).
    let texts = ClassTexts {
        class_names: vec!["a".into(), "b".into()],
        prompts: vec![t(&[&[1., 0., 0.]]), t(&[&[0., 1., 0.]])],
        negative_prompts: None,
    };
    let support = SupportSet::multi_class(f, vec![0, 1]);
    let over = serde_json::json!({ "steps": 0 });
    let clf = method_by_name("lp++", Some(&over))
        .unwrap()
        .fit(&AdaptInput::frozen(&texts, &support))
        .unwrap();
    close(
        &row(&clf.logits(&t(&[&[3., 4., 0.]])).unwrap()),
        &[150.6, 200.8],
        1e-3,
    );
}

#[test]
fn clap_multipliers_and_penalty() {
    // Zero-shot probabilities of 3 support images; labels 0, 0, 1.
    let probs = vec![vec![0.9f32, 0.1], vec![0.5, 0.5], vec![0.3, 0.7]];
    // lambda_0 = mean(0.9, 0.5) = 0.7, lambda_1 = 0.7; a class with no image -> 1.
    let lambda = clap::class_adaptive_multipliers(&probs, &[0, 0, 1], 3);
    close(&lambda, &[0.7, 0.7, 1.0], 1e-6);
    // mean_c lambda_c ||w_c - t_c||^2 with distances 1 and 4: (0.5 * 1 + 1 * 4) / 2.
    let w = t(&[&[1., 0.], &[0., 2.]]);
    let zero = t(&[&[0., 0.], &[0., 0.]]);
    let pen = clap::constraint_penalty(
        &w,
        &zero,
        &Tensor::new(&[0.5f32, 1.0], &Device::Cpu).unwrap(),
    )
    .unwrap();
    assert!((pen.to_scalar::<f32>().unwrap() - 2.25).abs() < 1e-6);
}

#[test]
fn clap_and_taskres_start_at_zero_shot() {
    // With zero training steps both are exactly the ensemble zero-shot classifier.
    let texts = texts();
    let support = SupportSet::multi_class(t(&[&[1., 0.2, 0.], &[0., 0.1, 1.]]), vec![0, 1]);
    let input = AdaptInput::frozen(&texts, &support);
    let zs = method_by_name("zero-shot-ensemble", None)
        .unwrap()
        .fit(&input)
        .unwrap();
    let f = t(&[&[3., 4., 1.], &[-1., 0.5, 2.]]);
    let want = zs.logits(&f).unwrap().to_vec2::<f32>().unwrap();
    for name in ["clap", "taskres"] {
        let m = method_by_name(name, Some(&serde_json::json!({ "steps": 0 }))).unwrap();
        let got = m
            .fit(&input)
            .unwrap()
            .logits(&f)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (g, w) in got.iter().zip(&want) {
            close(
                g,
                &w.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(),
                1e-4,
            );
        }
    }
}

#[test]
fn clip_adapter_forward_with_chosen_weights() {
    // Build a saved CLIP-Adapter by hand (D = 2, reduction 1) and load it.
    // W1 = [[1, 0], [0, -1]], W2 = [[0, 1], [1, 0]], ratio 0.5, scale 1, text e1, e2.
    // f = (0.6, 0.8): hidden = relu(0.6, -0.8) = (0.6, 0); adapted = relu(0, 0.6);
    // blended = 0.5 (0, 0.6) + 0.5 (0.6, 0.8) = (0.3, 0.7) -> /sqrt(0.58).
    let dir = tempfile::tempdir().unwrap();
    let card = ClassifierCard {
        format: CARD_FORMAT.into(),
        method: "clip-adapter".into(),
        task: medvlm_adapt::fewshot::TaskKind::MultiClass,
        class_names: vec!["a".into(), "b".into()],
        feature_dim: 2,
        logit_scale: 1.0,
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
    let tensors: std::collections::HashMap<String, Tensor> = [
        ("adapter.w1".to_string(), t(&[&[1., 0.], &[0., -1.]])),
        ("adapter.w2".to_string(), t(&[&[0., 1.], &[1., 0.]])),
        ("text_weights".to_string(), t(&[&[1., 0.], &[0., 1.]])),
    ]
    .into_iter()
    .collect();
    candle_core::safetensors::save(&tensors, dir.path().join("classifier.safetensors")).unwrap();
    let clf = load_classifier(dir.path()).unwrap();
    let n = 0.58f64.sqrt();
    close(
        &row(&clf.logits(&t(&[&[0.6, 0.8]])).unwrap()),
        &[0.3 / n, 0.7 / n],
        1e-5,
    );
}

#[test]
fn linear_probe_objective_and_gradient_by_hand() {
    // X = e1 (class 0), e2 (class 1); theta = 0: P = 0.5 everywhere.
    // loss = ln 2; dW0 = ((0.5 - 1) e1 + 0.5 e2) / 2 = (-0.25, 0.25, 0); dW1 = -dW0; db = 0.
    let x = vec![vec![1.0, 0.0, 0.0], vec![0.0, 1.0, 0.0]];
    let theta = vec![0.0; 2 * 3 + 2];
    let (v, g) = linear_probe::multiclass_objective(&x, &[0, 1], 2, 1.0, &theta);
    assert!((v - 2f64.ln()).abs() < 1e-12);
    let want = [-0.25, 0.25, 0.0, 0.25, -0.25, 0.0, 0.0, 0.0];
    for (a, b) in g.iter().zip(want) {
        assert!((a - b).abs() < 1e-12, "{g:?}");
    }
    // The L2 term ||W||^2 / (2 C N): W0 = (1, 0, 0), rest 0, C = 0.5, N = 2 -> +0.5,
    // and its gradient W / (C N) = 1 on W0[0].
    let mut theta2 = theta.clone();
    theta2[0] = 1.0;
    let (v2, g2) = linear_probe::multiclass_objective(&x, &[0, 1], 2, 0.5, &theta2);
    // Data term: sample 0 logits (1, 0) -> ln(1 + e^-1); sample 1 logits (0, 0) -> ln 2.
    let data = ((1.0 + (-1f64).exp()).ln() + 2f64.ln()) / 2.0;
    assert!((v2 - (data + 0.5)).abs() < 1e-12);
    let p0 = 1.0 / (1.0 + (-1f64).exp());
    assert!((g2[0] - ((p0 - 1.0) / 2.0 + 1.0)).abs() < 1e-12);
}

#[test]
fn linear_probe_regularisation_shrinks_weights() {
    let texts = texts();
    let support = SupportSet::multi_class(
        t(&[
            &[1., 0.1, 0.],
            &[0.9, 0., 0.2],
            &[0., 0.1, 1.],
            &[0.2, 0., 0.9],
        ]),
        vec![0, 0, 1, 1],
    );
    let input = AdaptInput::frozen(&texts, &support);
    let norm_for = |c: f64| {
        let clf = method_by_name("linear-probe", Some(&serde_json::json!({ "c": c })))
            .unwrap()
            .fit(&input)
            .unwrap();
        let w = clf
            .tensors()
            .into_iter()
            .find(|(n, _)| n == "probe.weight")
            .unwrap()
            .1;
        let pred: Vec<u32> = clf
            .logits(&support.features)
            .unwrap()
            .argmax(1)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(pred, vec![0, 0, 1, 1], "C = {c}");
        w.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let (weak, strong) = (norm_for(100.0), norm_for(0.1));
    assert!(
        strong < weak,
        "||W||^2 with C=0.1: {strong}, with C=100: {weak}"
    );
}

#[test]
fn descriptions_file_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let classes = vec!["pneumonia".to_string(), "normal".to_string()];
    let path = dir.path().join("desc.json");
    std::fs::write(&path, r#"{"pneumonia": ["patchy opacities"], "normal": ["clear lungs"], "covid": ["ground glass"]}"#)
        .unwrap();
    let err =
        medvlm_adapt::methods::zero_shot::load_class_descriptions(&path, &classes).unwrap_err();
    assert!(matches!(err, MethodError::Descriptions { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("covid") && msg.contains("desc.json") && msg.contains("pneumonia"),
        "{msg}"
    );

    std::fs::write(&path, r#"{"pneumonia": ["patchy opacities"]}"#).unwrap();
    let msg = medvlm_adapt::methods::zero_shot::load_class_descriptions(&path, &classes)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("'normal' has no descriptions"), "{msg}");

    std::fs::write(&path, r#"{"pneumonia": ["a", "b"], "normal": ["c"]}"#).unwrap();
    let ok = medvlm_adapt::methods::zero_shot::load_class_descriptions(&path, &classes).unwrap();
    assert_eq!(
        ok,
        vec![
            vec!["a".to_string(), "b".to_string()],
            vec!["c".to_string()]
        ]
    );
}

#[test]
fn lp_plus_plus_constants_match_the_official_formulas() {
    // tools/make_lpp_reference.py: the official code's one-hot centroid of the text
    // logits (own-class logit per image), lr_alpha and lr_w (eigh) on 11 random support
    // features of 4 classes with 1, 2, 3 and 5 images.
    let json: serde_json::Value = serde_json::from_str(include_str!("fixtures/lpp_reference.json"))
        .expect("lpp_reference.json");
    let matrix = |k: &str| -> Tensor {
        let rows: Vec<Vec<f32>> = json[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect()
            })
            .collect();
        let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
        t(&refs)
    };
    let labels: Vec<usize> = json["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let num = |k: &str| json[k].as_f64().unwrap();
    let (alpha0, lr_w, lr_alpha) =
        lp_plus_plus::data_driven_constants(&matrix("features"), &labels, &matrix("text"), 250.0)
            .unwrap();
    // f32 features: relative 1e-5; lambda_max by power iteration: 1e-4.
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
    assert!(
        rel(alpha0, num("alpha_init")) < 1e-5,
        "{alpha0} vs {}",
        num("alpha_init")
    );
    assert!(
        rel(lr_alpha, num("lr_alpha")) < 1e-5,
        "{lr_alpha} vs {}",
        num("lr_alpha")
    );
    assert!(rel(lr_w, num("lr_w")) < 1e-4, "{lr_w} vs {}", num("lr_w"));
    // The reference separates the two readings: the all-pairs mean is far off.
    assert!(rel(num("alpha_all_pairs_mean"), num("alpha_init")) > 0.5);
}
