//! Few-shot encoder fine-tuning (strategy 4: LoRA in the CLIP-LoRA setting,
//! BitFit, partial and full fine-tuning) on the tiny CLIP parity fixture of
//! medvlm-models: the class weights follow the prompt-ensemble formula, the
//! support loss falls, exactly the parameters each method names move, a
//! saved classifier re-applied to a fresh base model scores images as the
//! tuned model did, and bad input gives clear errors.

mod support;
use std::collections::BTreeMap;
use std::path::PathBuf;
use support::{class_colour_images, max_abs_diff};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use medvlm_adapt::method::{
    load_classifier, method_by_name, save_classifier, AdaptInput, AdaptedClassifier, ClassTexts,
    MethodError, SupportSet,
};
use medvlm_adapt::methods::encoder_tuning::{
    tuning_method_by_name, TunedEncoderClassifier, TuningInput, CLASS_WEIGHTS,
};
use medvlm_models::{load_model_dir, LoadMode, LoadOptions, LoadedModel};

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

fn snapshot(vm: &VarMap) -> BTreeMap<String, Vec<f32>> {
    let data = vm.data().lock().unwrap();
    data.iter()
        .map(|(k, v)| {
            let flat = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (k.clone(), flat)
        })
        .collect()
}

fn changed(before: &BTreeMap<String, Vec<f32>>, after: &BTreeMap<String, Vec<f32>>) -> Vec<String> {
    before
        .iter()
        .filter(|(k, v)| after[*k] != **v)
        .map(|(k, _)| k.clone())
        .collect()
}

fn classes() -> Vec<String> {
    vec!["cat".into(), "dog".into(), "cow".into()]
}

fn prompts() -> Vec<Vec<String>> {
    classes()
        .iter()
        .map(|c| vec![format!("a photo of a {c}."), format!("a picture of a {c}.")])
        .collect()
}

fn images() -> (Tensor, Vec<usize>) {
    class_colour_images(12, 777)
}

/// Mean cross-entropy of `logits` `[N, C]` against `labels`.
fn cross_entropy(logits: &Tensor, labels: &[usize]) -> f32 {
    let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
    let mut total = 0.0f64;
    for (r, &y) in rows.iter().zip(labels) {
        let m = r.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let lse = m + r.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        total += lse - r[y] as f64;
    }
    (total / labels.len() as f64) as f32
}

/// Base-model logits `[N, C]` with the hand-written formula: `exp(logit_scale) · cos(image,
/// normalised mean of the class's normalised prompt embeddings)`.
fn base_logits(m: &LoadedModel, pixels: &Tensor) -> (Tensor, Tensor) {
    let norm = |t: &Tensor| {
        let n = t.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
        t.broadcast_div(&n).unwrap()
    };
    let mut rows = Vec::new();
    for p in prompts() {
        let tok = m.tokenizer.encode_batch(&p, &Device::Cpu).unwrap();
        let e = norm(&m.model.encode_text(&tok).unwrap().embeds);
        rows.push(norm(&e.mean_keepdim(0).unwrap()));
    }
    let w = Tensor::cat(&rows, 0).unwrap();
    let img = norm(&m.model.encode_image(pixels).unwrap().embeds);
    let scale = m
        .model
        .logit_scale()
        .exp()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    ((img.matmul(&w.t().unwrap()).unwrap() * scale).unwrap(), w)
}

struct Fitted {
    clf: TunedEncoderClassifier,
    changed: Vec<String>,
    loss_before: f32,
    loss_after: f32,
    tuned_logits: Tensor,
}

fn fit(method: &str, hparams: serde_json::Value) -> Fitted {
    let (mut m, vm) = load_trainable();
    let (px, labels) = images();
    let (before_logits, _) = base_logits(&m, &px);
    let before = snapshot(&vm);
    let method = tuning_method_by_name(method, Some(&hparams)).unwrap();
    let names = classes();
    let prompts = prompts();
    let mut input = TuningInput {
        model: m.model.as_mut(),
        base: &vm,
        tokenizer: &m.tokenizer,
        class_names: &names,
        class_prompts: &prompts,
        images: &px,
        labels: &labels,
        seed: 3,
    };
    let clf = method.fit_encoders(&mut input).unwrap();
    let tuned_logits = clf.logits_for_images(m.model.as_ref(), &px).unwrap();
    Fitted {
        changed: changed(&before, &snapshot(&vm)),
        loss_before: cross_entropy(&before_logits, &labels),
        loss_after: cross_entropy(&tuned_logits, &labels),
        tuned_logits,
        clf,
    }
}

fn short(lr: f64) -> serde_json::Value {
    serde_json::json!({"lr": lr, "iterations_per_shot": 10, "batch_size": 6})
}

#[test]
fn class_weights_are_the_normalised_prompt_ensemble_of_the_tuned_text_tower() {
    // LoRA on the image tower only: the text tower is the base one, so the saved class
    // weights must equal the hand-computed ensemble of the base model.
    let mut hp = short(1e-2);
    hp["towers"] = serde_json::json!("vision");
    let f = fit("lora", hp);
    let (m, _) = load_trainable();
    let (_, w) = base_logits(&m, &images().0);
    let saved: BTreeMap<String, Tensor> = f.clf.tensors().into_iter().collect();
    assert!(max_abs_diff(&saved[CLASS_WEIGHTS], &w) < 1e-5);
    assert!(f.loss_after < f.loss_before);
}

#[test]
fn lora_trains_only_its_adapters_and_round_trips_through_a_saved_artefact() {
    let f = fit("lora", short(1e-2));
    assert!(
        f.changed.is_empty(),
        "LoRA changed base weights: {:?}",
        f.changed
    );
    assert!(
        f.loss_after < 0.9 * f.loss_before,
        "support loss {} -> {}",
        f.loss_before,
        f.loss_after
    );
    let names: Vec<&str> = f
        .clf
        .tuned_tensors()
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    // q, k, v of every block of both towers, A and B each.
    assert!(names
        .iter()
        .all(|n| n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight")));
    assert!(names
        .iter()
        .any(|n| n.starts_with("vision_model.") && n.contains("q_proj")));
    assert!(names
        .iter()
        .any(|n| n.starts_with("text_model.") && n.contains("v_proj")));
    let info = &f.clf.card().fit_info;
    assert_eq!(info["base_tensors_trained"], 0);
    assert_eq!(info["iterations"], 40, "10 per shot x 4 shots");

    let dir = tempfile::tempdir().unwrap();
    save_classifier(&f.clf, dir.path()).unwrap();
    let loaded = load_classifier(dir.path()).unwrap();
    assert_eq!(loaded.card().method, "lora");
    let clf = TunedEncoderClassifier::load(dir.path()).unwrap();
    let (mut fresh, vm) = load_trainable();
    clf.apply_to(fresh.model.as_mut(), &vm).unwrap();
    let again = clf
        .logits_for_images(fresh.model.as_ref(), &images().0)
        .unwrap();
    assert!(max_abs_diff(&again, &f.tuned_logits) < 1e-4);
    // The image tower was tuned: cached base features are refused.
    let feats = Tensor::ones((2, clf.card().feature_dim), DType::F32, &Device::Cpu).unwrap();
    let err = loaded.logits(&feats).unwrap_err().to_string();
    assert!(err.contains("fine-tuned the image encoder"), "{err}");
}

#[test]
fn bitfit_moves_biases_only() {
    let f = fit("bitfit", short(1e-2));
    assert!(!f.changed.is_empty());
    assert!(
        f.changed.iter().all(|n| n.ends_with(".bias")),
        "{:?}",
        f.changed
    );
    assert!(f.changed.iter().any(|n| n.starts_with("vision_model.")));
    assert!(f.changed.iter().any(|n| n.starts_with("text_model.")));
    assert!(f.loss_after < f.loss_before);
    assert_eq!(
        f.clf.tuned_tensors().len(),
        f.clf.card().fit_info["base_tensors_trained"]
    );
}

#[test]
fn partial_and_full_finetuning_move_what_they_name_and_reapply_exactly() {
    let p = fit("partial-finetune", short(1e-3));
    assert!(p.loss_after < p.loss_before);
    // The fixture's towers have 2 blocks: the last (index 1) moves, block 0 and the
    // embeddings stay.
    assert!(p.changed.iter().any(|n| n.contains("encoder.layers.1.")));
    assert!(!p.changed.iter().any(|n| n.contains("encoder.layers.0.")));
    assert!(!p.changed.iter().any(|n| n.contains("embeddings")));

    let f = fit("full-finetune", short(1e-3));
    assert!(f.loss_after < f.loss_before);
    assert!(f.changed.iter().any(|n| n.contains("encoder.layers.0.")));
    assert!(f.changed.iter().any(|n| n.contains("embeddings")));
    assert!(!f.changed.iter().any(|n| n == "logit_scale"));

    let dir = tempfile::tempdir().unwrap();
    save_classifier(&f.clf, dir.path()).unwrap();
    let clf = TunedEncoderClassifier::load(dir.path()).unwrap();
    let (mut fresh, vm) = load_trainable();
    clf.apply_to(fresh.model.as_mut(), &vm).unwrap();
    let again = clf
        .logits_for_images(fresh.model.as_ref(), &images().0)
        .unwrap();
    assert!(max_abs_diff(&again, &f.tuned_logits) < 1e-4);
}

#[test]
fn text_only_tuning_scores_cached_base_image_features() {
    let mut hp = short(1e-2);
    hp["towers"] = serde_json::json!("text");
    let f = fit("bitfit", hp);
    assert!(f.changed.iter().all(|n| n.starts_with("text_model.")));
    let (m, _) = load_trainable();
    let img = m.model.encode_image(&images().0).unwrap().embeds;
    let from_cache = f.clf.logits(&img).unwrap();
    assert!(max_abs_diff(&from_cache, &f.tuned_logits) < 1e-4);
}

#[test]
fn bad_input_is_refused_clearly() {
    // Cached features only.
    let texts = ClassTexts {
        class_names: classes(),
        prompts: (0..3)
            .map(|_| Tensor::ones((1, 8), DType::F32, &Device::Cpu).unwrap())
            .collect(),
        negative_prompts: None,
    };
    let support = SupportSet::multi_class(
        Tensor::ones((3, 8), DType::F32, &Device::Cpu).unwrap(),
        vec![0, 1, 2],
    );
    for name in ["lora", "bitfit", "partial-finetune", "full-finetune"] {
        let m = method_by_name(name, None).unwrap();
        assert!(m.requires_encoder());
        let err = m.fit(&AdaptInput::frozen(&texts, &support)).err().unwrap();
        assert!(
            matches!(err, MethodError::NeedsEncoder { .. }),
            "{name}: {err}"
        );
    }
    // Out-of-range hyperparameters fail when the method is built.
    let err = method_by_name("lora", Some(&serde_json::json!({"rank": 0})))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("rank must be at least 1"), "{err}");
    let err = method_by_name("bitfit", Some(&serde_json::json!({"lr": -1.0})))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("lr must be a positive number"), "{err}");
    let err = method_by_name("lora", Some(&serde_json::json!({"learning_rate": 1.0})))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("unknown field 'learning_rate'"), "{err}");

    // A partial fine-tuning deeper than the model, and a label out of range.
    let (mut m, vm) = load_trainable();
    let (px, labels) = images();
    let names = classes();
    let prompts = prompts();
    let deep =
        tuning_method_by_name("partial-finetune", Some(&serde_json::json!({"last_k": 9}))).unwrap();
    let mut input = TuningInput {
        model: m.model.as_mut(),
        base: &vm,
        tokenizer: &m.tokenizer,
        class_names: &names,
        class_prompts: &prompts,
        images: &px,
        labels: &labels,
        seed: 0,
    };
    let err = deep.fit_encoders(&mut input).unwrap_err().to_string();
    assert!(err.contains("larger than the 2 blocks"), "{err}");
    let bad_labels: Vec<usize> = labels.iter().map(|&l| l + 1).collect();
    input.labels = &bad_labels;
    let lora = tuning_method_by_name("lora", None).unwrap();
    let err = lora.fit_encoders(&mut input).unwrap_err().to_string();
    assert!(err.contains("label 3 but there are 3 classes"), "{err}");

    // A classifier applied to a model that lacks its tensors.
    let f = fit("bitfit", short(1e-2));
    let (mut fresh, _) = load_trainable();
    let empty = VarMap::new();
    let err = f
        .clf
        .apply_to(fresh.model.as_mut(), &empty)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not loaded trainable"), "{err}");
}
