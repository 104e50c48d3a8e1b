//! Prompt learning (strategy 2) on the tiny CLIP parity fixture of
//! medvlm-models: formulas checked by hand, training lowers the support loss,
//! the encoders stay untouched, save/load round-trips, clear errors.

mod support;
use std::path::PathBuf;
use support::{class_colour_images, max_abs_diff};

use candle_core::{DType, Device, Tensor};
use medvlm_adapt::method::{
    method_by_name, save_classifier, AdaptInput, AdaptedClassifier, ClassTexts, MethodError,
    SupportSet,
};
use medvlm_adapt::methods::coop::coop_text_embeddings;
use medvlm_adapt::methods::kgcoop::kg_penalty;
use medvlm_adapt::methods::prompt_common::{
    prompt_method_by_name, ClassTokenPosition, PromptClassifier, PromptInput,
};
use medvlm_adapt::methods::vpt::vpt_logits;
use medvlm_models::clip::{ClipConfig, ClipModel};
use medvlm_models::{ImageEncoder, Padding, TextEncoder, TextTokenizer, VisualPrompts, WeightFile};

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("medvlm-models")
        .join("tests")
        .join("fixtures")
        .join("clip")
}

fn load() -> (ClipModel, TextTokenizer) {
    let dir = fixture_dir();
    let cfg = ClipConfig::from_file(&dir.join("config.json")).expect("fixture config");
    let wf = WeightFile::open(dir.join("model.safetensors")).expect("fixture weights");
    let model = ClipModel::load(wf.var_builder(DType::F32, &Device::Cpu), &cfg).expect("model");
    let tok = TextTokenizer::from_file(
        &dir.join("tokenizer.json"),
        cfg.text_config.max_position_embeddings,
        Padding::MaxLength,
    )
    .expect("tokenizer");
    (model, tok)
}

fn classes() -> Vec<String> {
    vec!["cat".into(), "dog".into(), "cow".into()]
}

fn images() -> (Tensor, Vec<usize>) {
    class_colour_images(6, 12345)
}

fn support_loss(logits: &Tensor, labels: &[usize]) -> f32 {
    let t: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
    let t = Tensor::new(t.as_slice(), &Device::Cpu).unwrap();
    candle_nn::loss::cross_entropy(logits, &t)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn coop_context_from_template_words_reproduces_zero_shot_text_embeddings() {
    let (model, tok) = load();
    let names = classes();
    // Context = the token embeddings of "a photo of a" (ids from the tokenizer).
    let ids = tok.encode_ids("a photo of a").unwrap();
    let words = Tensor::new(&ids[1..ids.len() - 1], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let ctx = model.token_embeddings(&words).unwrap().squeeze(0).unwrap();
    assert_eq!(ctx.dims(), &[4, 32]);
    let learned =
        coop_text_embeddings(&model, &tok, &names, ClassTokenPosition::End, &ctx).unwrap();
    let texts: Vec<String> = names.iter().map(|n| format!("a photo of a {n}.")).collect();
    let zero_shot = model
        .encode_text(&tok.encode_batch(&texts, &Device::Cpu).unwrap())
        .unwrap()
        .embeds;
    let d = max_abs_diff(&learned, &zero_shot);
    assert!(d < 1e-6, "CoOp with template context differs by {d}");
    // A different context gives different embeddings (the substitution is
    // live). Not a constant shift: the layer norms would remove it.
    let other = ctx.neg().unwrap();
    let moved =
        coop_text_embeddings(&model, &tok, &names, ClassTokenPosition::End, &other).unwrap();
    let dm = max_abs_diff(&moved, &zero_shot);
    assert!(dm > 1e-3, "moved by {dm}");
}

#[test]
fn kgcoop_penalty_matches_hand_values() {
    // Hand value: rows (1,0) vs (0.6,0.8) -> 0.16 + 0.64 = 0.8; (0,1) vs (0,1) -> 0.
    let a = Tensor::new(&[[1f32, 0.], [0., 1.]], &Device::Cpu).unwrap();
    let b = Tensor::new(&[[0.6f32, 0.8], [0., 1.]], &Device::Cpu).unwrap();
    let p = kg_penalty(&a, &b).unwrap().to_scalar::<f32>().unwrap();
    assert!((p - 0.4).abs() < 1e-6, "penalty {p}");

    // With the model: zero at the "a photo of a" initialisation, and after a
    // known perturbation of the context equal to the mean squared distance
    // computed element by element.
    let (model, tok) = load();
    let names = classes();
    let (images, labels) = images();
    let input = PromptInput {
        model: &model,
        tokenizer: &tok,
        class_names: &names,
        images: &images,
        labels: &labels,
        seed: 0,
        class_prompts: None,
    };
    let kg = medvlm_adapt::methods::kgcoop::KgCoop::default();
    let anchor = kg.handcrafted_weights(&input).unwrap();
    let ids = tok.encode_ids("a photo of a").unwrap();
    let words = Tensor::new(&ids[1..ids.len() - 1], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let ctx = model.token_embeddings(&words).unwrap().squeeze(0).unwrap();
    let norm = |t: Tensor| medvlm_adapt::method::l2_normalize(&t).unwrap();
    let w0 =
        norm(coop_text_embeddings(&model, &tok, &names, ClassTokenPosition::End, &ctx).unwrap());
    let p0 = kg_penalty(&w0, &anchor)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(p0.abs() < 1e-10, "penalty at init {p0}");
    let w1 = norm(
        coop_text_embeddings(
            &model,
            &tok,
            &names,
            ClassTokenPosition::End,
            &(ctx * 1.5).unwrap(),
        )
        .unwrap(),
    );
    let p1 = kg_penalty(&w1, &anchor)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let (w1v, av): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
        (w1.to_vec2().unwrap(), anchor.to_vec2().unwrap());
    let hand: f32 = w1v
        .iter()
        .zip(&av)
        .map(|(r, s)| r.iter().zip(s).map(|(x, y)| (x - y) * (x - y)).sum::<f32>())
        .sum::<f32>()
        / 3.0;
    assert!(hand > 1e-4, "perturbation should move the embeddings");
    assert!((p1 - hand).abs() < 1e-6 * hand.max(1.0), "{p1} vs {hand}");
}

#[test]
fn vpt_without_prompts_is_the_plain_image_encoder() {
    let (model, tok) = load();
    let names = classes();
    let (images, _) = images();
    let texts: Vec<String> = names.iter().map(|n| format!("a photo of a {n}.")).collect();
    let head = model
        .encode_text(&tok.encode_batch(&texts, &Device::Cpu).unwrap())
        .unwrap()
        .embeds;
    let scale = 7.0;
    let got = vpt_logits(&model, &head, None, &images, scale).unwrap();
    let empty = vpt_logits(
        &model,
        &head,
        Some(&VisualPrompts::default()),
        &images,
        scale,
    )
    .unwrap();
    // By hand: cosines of the plain image embeddings and the head rows.
    let img: Vec<Vec<f32>> = model
        .encode_image(&images)
        .unwrap()
        .embeds
        .to_vec2()
        .unwrap();
    let txt: Vec<Vec<f32>> = head.to_vec2().unwrap();
    let nrm = |v: &Vec<f32>| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let want: Vec<f32> = img
        .iter()
        .flat_map(|i| {
            txt.iter()
                .map(|t| {
                    scale as f32 * i.iter().zip(t).map(|(a, b)| a * b).sum::<f32>()
                        / (nrm(i) * nrm(t))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let want = Tensor::from_vec(want, (6, 3), &Device::Cpu).unwrap();
    assert!(max_abs_diff(&got, &want) < 1e-4);
    assert_eq!(max_abs_diff(&got, &empty), 0.0);
    // One prompt token changes the output (prompts reach the encoder).
    let p = VisualPrompts {
        shallow: Some(Tensor::ones((1, 32), DType::F32, &Device::Cpu).unwrap()),
        deep: Vec::new(),
    };
    let prompted = vpt_logits(&model, &head, Some(&p), &images, scale).unwrap();
    assert!(max_abs_diff(&prompted, &got) > 1e-4);
}

/// Small fast settings per method: `epochs` passes in mini-batches of 3 of
/// the 6 support images (AdamW so that a handful of steps moves the prompts
/// on the tiny model).
fn overrides(name: &str, epochs: usize) -> serde_json::Value {
    let opt = serde_json::json!({"kind": "adam-w", "lr": 0.05, "weight_decay": 0.0});
    let mut v = serde_json::json!({"epochs": epochs, "batch_size": 3, "optimizer": opt});
    match name {
        "coop" => v["n_ctx"] = 4.into(),
        "vpt" => v["n_tokens"] = 2.into(),
        _ => {}
    }
    v
}

fn expected_params(name: &str) -> Vec<&'static str> {
    let mut v = match name {
        "coop" | "kgcoop" => vec!["ctx", "class_weights"],
        "cocoop" => vec![
            "ctx",
            "meta_net.linear1.weight",
            "meta_net.linear1.bias",
            "meta_net.linear2.weight",
            "meta_net.linear2.bias",
        ],
        "vpt" => vec!["vpt.shallow", "head_weights", "vpt.deep.1"],
        "maple" => vec!["ctx", "coupling.weight", "coupling.bias"],
        _ => unreachable!(),
    };
    v.sort();
    v
}

#[test]
fn every_method_lowers_the_support_loss_and_leaves_the_encoders_untouched() {
    let (model, tok) = load();
    let names = classes();
    let (images, labels) = images();
    let texts: Vec<String> = names.iter().map(|n| format!("a photo of a {n}.")).collect();
    let tokens = tok.encode_batch(&texts, &Device::Cpu).unwrap();
    let img_before = model.encode_image(&images).unwrap().embeds;
    let txt_before = model.encode_text(&tokens).unwrap().embeds;
    let input = PromptInput {
        model: &model,
        tokenizer: &tok,
        class_names: &names,
        images: &images,
        labels: &labels,
        seed: 3,
        class_prompts: None,
    };
    for name in ["coop", "cocoop", "kgcoop", "vpt", "maple"] {
        let init = prompt_method_by_name(name, Some(&overrides(name, 0)))
            .unwrap()
            .fit_prompts(&input)
            .unwrap();
        let fitted = prompt_method_by_name(name, Some(&overrides(name, 8)))
            .unwrap()
            .fit_prompts(&input)
            .unwrap();
        let before = support_loss(
            &init.logits_for_images(&model, &tok, &images).unwrap(),
            &labels,
        );
        let after = support_loss(
            &fitted.logits_for_images(&model, &tok, &images).unwrap(),
            &labels,
        );
        assert!(
            after < 0.9 * before,
            "{name}: support loss {before} -> {after} did not drop"
        );
        let mut got: Vec<String> = fitted.tensors().into_iter().map(|(n, _)| n).collect();
        got.sort();
        assert_eq!(got, expected_params(name), "{name} parameters");
        // The learned prompt tensors moved away from their initialisation.
        let moved = fitted
            .tensors()
            .iter()
            .filter(|(n, _)| n != "head_weights" && n != "class_weights")
            .any(|(n, t)| max_abs_diff(t, init.param(n).unwrap()) > 0.0);
        assert!(moved, "{name}: no prompt parameter changed");
    }
    // Frozen encoders: bit-identical outputs after all the fits.
    let img_after = model.encode_image(&images).unwrap().embeds;
    let txt_after = model.encode_text(&tokens).unwrap().embeds;
    assert_eq!(max_abs_diff(&img_before, &img_after), 0.0);
    assert_eq!(max_abs_diff(&txt_before, &txt_after), 0.0);
}

#[test]
fn save_load_round_trip_gives_identical_probabilities() {
    let (model, tok) = load();
    let names = classes();
    let (images, labels) = images();
    let input = PromptInput {
        model: &model,
        tokenizer: &tok,
        class_names: &names,
        images: &images,
        labels: &labels,
        seed: 1,
        class_prompts: None,
    };
    let dir = tempfile::tempdir().unwrap();
    for name in ["coop", "cocoop", "kgcoop", "vpt", "maple"] {
        let fitted = prompt_method_by_name(name, Some(&overrides(name, 3)))
            .unwrap()
            .fit_prompts(&input)
            .unwrap();
        let path = dir.path().join(name);
        save_classifier(&fitted, &path).unwrap();
        let loaded = PromptClassifier::load(&path).unwrap();
        let a = fitted
            .probabilities_for_images(&model, &tok, &images)
            .unwrap();
        let b = loaded
            .probabilities_for_images(&model, &tok, &images)
            .unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{name}");
        assert_eq!(loaded.card(), fitted.card());
        // The registry loader rebuilds it too.
        let generic = medvlm_adapt::method::load_classifier(&path).unwrap();
        assert_eq!(generic.card().method, name);
    }
    // CoOp's classifier also scores cached image embeddings, identically.
    let coop = prompt_method_by_name("coop", Some(&overrides("coop", 3)))
        .unwrap()
        .fit_prompts(&input)
        .unwrap();
    let feats = model.encode_image(&images).unwrap().embeds;
    let from_pixels = coop.logits_for_images(&model, &tok, &images).unwrap();
    let from_cache = coop.logits(&feats).unwrap();
    assert!(max_abs_diff(&from_pixels, &from_cache) < 1e-4);
}

#[test]
fn frozen_feature_callers_and_bad_settings_get_clear_errors() {
    let dev = Device::Cpu;
    let texts = ClassTexts {
        class_names: vec!["a".into(), "b".into()],
        prompts: vec![
            Tensor::ones((1, 4), DType::F32, &dev).unwrap(),
            Tensor::ones((1, 4), DType::F32, &dev).unwrap(),
        ],
        negative_prompts: None,
    };
    let support =
        SupportSet::multi_class(Tensor::ones((2, 4), DType::F32, &dev).unwrap(), vec![0, 1]);
    for name in ["coop", "cocoop", "kgcoop", "vpt", "maple"] {
        let m = method_by_name(name, None).unwrap();
        assert!(m.requires_encoder());
        let err = m.fit(&AdaptInput::frozen(&texts, &support)).err().unwrap();
        assert!(
            matches!(err, MethodError::NeedsEncoder { .. }),
            "{name}: {err}"
        );
        assert!(err.to_string().contains("cached features"), "{err}");
    }
    let (model, tok) = load();
    let names = classes();
    let (images, labels) = images();
    let input = PromptInput {
        model: &model,
        tokenizer: &tok,
        class_names: &names,
        images: &images,
        labels: &labels,
        seed: 0,
        class_prompts: None,
    };
    // VPT cannot score cached embeddings: its image side is prompted.
    let vpt = prompt_method_by_name("vpt", Some(&overrides("vpt", 1)))
        .unwrap()
        .fit_prompts(&input)
        .unwrap();
    let feats = model.encode_image(&images).unwrap().embeds;
    let err = vpt.logits(&feats).err().unwrap().to_string();
    assert!(err.contains("logits_for_images"), "{err}");
    // Deep MaPLe is refused with the reason.
    let err = prompt_method_by_name("maple", Some(&serde_json::json!({"prompt_depth": 9})))
        .unwrap()
        .fit_prompts(&input)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("shallow MaPLe"), "{err}");
    // 16 context tokens do not fit the fixture's 24-token context with a name.
    let err = prompt_method_by_name("coop", Some(&serde_json::json!({"n_ctx": 22, "epochs": 0})))
        .unwrap()
        .fit_prompts(&input)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("context length"), "{err}");
    // Labels outside the classes.
    let bad = [0usize, 1, 2, 0, 1, 7];
    let err = prompt_method_by_name("coop", None)
        .unwrap()
        .fit_prompts(&PromptInput {
            labels: &bad,
            ..input
        })
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("label 7"), "{err}");
    // Unknown hyperparameter names are refused.
    assert!(prompt_method_by_name("cocoop", Some(&serde_json::json!({"n_tokens": 3}))).is_err());
}

fn template_context(model: &dyn TextEncoder, tok: &TextTokenizer, words: &str) -> Tensor {
    let content = medvlm_adapt::methods::prompt_common::tokenizer_content_ids(tok, words).unwrap();
    let ids = Tensor::new(content.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model.token_embeddings(&ids).unwrap().squeeze(0).unwrap()
}

fn zero_shot(
    model: &dyn medvlm_models::VisionLanguageModel,
    tok: &TextTokenizer,
    texts: &[String],
) -> Tensor {
    model
        .encode_text(&tok.encode_batch(texts, &Device::Cpu).unwrap())
        .unwrap()
        .embeds
}

#[test]
fn coop_middle_front_and_class_specific_contexts_match_hand_written_prompts() {
    let (model, tok) = load();
    let names = classes();
    let ctx = template_context(&model, &tok, "a photo of a");
    // Middle: "[a photo] cat [of a]." ; front: "cat [a photo of a].".
    let mid = coop_text_embeddings(&model, &tok, &names, ClassTokenPosition::Middle, &ctx).unwrap();
    let mid_txt: Vec<String> = names.iter().map(|n| format!("a photo {n} of a.")).collect();
    assert!(max_abs_diff(&mid, &zero_shot(&model, &tok, &mid_txt)) < 1e-6);
    let front =
        coop_text_embeddings(&model, &tok, &names, ClassTokenPosition::Front, &ctx).unwrap();
    let front_txt: Vec<String> = names.iter().map(|n| format!("{n} a photo of a.")).collect();
    assert!(max_abs_diff(&front, &zero_shot(&model, &tok, &front_txt)) < 1e-6);
    // Class-specific context [C, M, D]: row c of the result is the shared
    // computation with class c's context.
    let other = ctx.neg().unwrap();
    let third = (&ctx * 2.0).unwrap();
    let csc = Tensor::stack(&[&ctx, &other, &third], 0).unwrap();
    for position in [ClassTokenPosition::End, ClassTokenPosition::Middle] {
        let got = coop_text_embeddings(&model, &tok, &names, position, &csc).unwrap();
        for (c, per_class) in [&ctx, &other, &third].into_iter().enumerate() {
            let shared = coop_text_embeddings(&model, &tok, &names, position, per_class).unwrap();
            let d = max_abs_diff(&got.get(c).unwrap(), &shared.get(c).unwrap());
            assert!(d < 1e-6, "{position:?} class {c}: {d}");
        }
    }
}

#[test]
fn coop_reproduces_zero_shot_on_siglip_and_biomedclip_tokenizers() {
    // SigLIP: no start token, last-token pooling; BiomedCLIP: BERT WordPiece,
    // [CLS] pooling, padding to the longest text.
    for family in ["siglip", "biomedclip"] {
        let dir = fixture_dir().join("..").join(family);
        let loaded = medvlm_models::load_model_dir(&dir, &medvlm_models::LoadOptions::default())
            .unwrap_or_else(|e| panic!("{family}: {e}"));
        let (model, tok) = (loaded.model.as_ref(), &loaded.tokenizer);
        let names = vec!["cat".to_string(), "dog".to_string()];
        let ctx = template_context(model, tok, "a photo of a");
        assert_eq!(ctx.dim(0).unwrap(), 4, "{family}");
        for (position, fmt) in [
            (ClassTokenPosition::End, "a photo of a {}."),
            (ClassTokenPosition::Middle, "a photo {} of a."),
        ] {
            let got = coop_text_embeddings(model, tok, &names, position, &ctx).unwrap();
            let texts: Vec<String> = names.iter().map(|n| fmt.replace("{}", n)).collect();
            let d = max_abs_diff(&got, &zero_shot(model, tok, &texts));
            assert!(d < 1e-5, "{family} {position:?}: {d}");
        }
    }
}

#[test]
fn cocoop_meta_net_formula_and_silent_meta_net_is_coop() {
    use medvlm_adapt::methods::cocoop::meta_net_bias;
    let dev = Device::Cpu;
    // By hand: h = relu([1, 0] W1^T + b1) = relu([1.5, -4]) = [1.5, 0];
    // pi = h W2^T + b2 = [3, 0, 1.5] + [0, 0, 1] = [3, 0, 2.5].
    let f = Tensor::new(&[[1f32, 0.]], &dev).unwrap();
    let w1 = Tensor::new(&[[1f32, 2.], [-1., 1.]], &dev).unwrap();
    let b1 = Tensor::new(&[0.5f32, -3.], &dev).unwrap();
    let w2 = Tensor::new(&[[2f32, 0.], [0., 1.], [1., 1.]], &dev).unwrap();
    let b2 = Tensor::new(&[0f32, 0., 1.], &dev).unwrap();
    let pi: Vec<Vec<f32>> = meta_net_bias(&f, &w1, &b1, &w2, &b2)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_eq!(pi, vec![vec![3.0, 0.0, 2.5]]);

    let (model, tok) = load();
    let names = classes();
    let (images, _) = images();
    let ctx = template_context(&model, &tok, "a photo of a");
    let (e, d, h) = (24usize, 32usize, 1usize);
    let scale = 20.0;
    let w1 = Tensor::ones((h, e), DType::F32, &dev).unwrap();
    let b1 = Tensor::ones(h, DType::F32, &dev).unwrap();
    let w2 = Tensor::zeros((d, h), DType::F32, &dev).unwrap();
    let shift = Tensor::arange(0f32, d as f32, &dev)
        .unwrap()
        .affine(0.05, -0.3)
        .unwrap();
    let cocoop = |b2: &Tensor| {
        PromptClassifier::from_parameters(
            "cocoop",
            None,
            &names,
            e,
            scale,
            vec![
                ("ctx".into(), ctx.clone()),
                ("meta_net.linear1.weight".into(), w1.clone()),
                ("meta_net.linear1.bias".into(), b1.clone()),
                ("meta_net.linear2.weight".into(), w2.clone()),
                ("meta_net.linear2.bias".into(), b2.clone()),
            ],
        )
        .unwrap()
        .logits_for_images(&model, &tok, &images)
        .unwrap()
    };
    let coop = |c: Tensor| {
        PromptClassifier::from_parameters(
            "coop",
            Some(&serde_json::json!({"n_ctx": 4})),
            &names,
            e,
            scale,
            vec![("ctx".into(), c)],
        )
        .unwrap()
        .logits_for_images(&model, &tok, &images)
        .unwrap()
    };
    // W2 = 0, b2 = 0: no bias, CoCoOp is CoOp with the same context.
    let zero = Tensor::zeros(d, DType::F32, &dev).unwrap();
    assert!(max_abs_diff(&cocoop(&zero), &coop(ctx.clone())) < 1e-5);
    // W2 = 0, b2 = shift: every image's context is ctx + shift.
    let shifted = coop(ctx.broadcast_add(&shift).unwrap());
    assert!(max_abs_diff(&cocoop(&shift), &shifted) < 1e-5);
    assert!(max_abs_diff(&shifted, &coop(ctx.clone())) > 1e-4);
}

#[test]
fn maple_couples_the_text_context_into_vision_prompts() {
    use medvlm_adapt::methods::maple::couple;
    let dev = Device::Cpu;
    // By hand: [1, 2] W^T + b = [1, 2, 3] + [0, 0, 1] = [1, 2, 4].
    let p = Tensor::new(&[[1f32, 2.]], &dev).unwrap();
    let w = Tensor::new(&[[1f32, 0.], [0., 1.], [1., 1.]], &dev).unwrap();
    let b = Tensor::new(&[0f32, 0., 1.], &dev).unwrap();
    let v: Vec<Vec<f32>> = couple(&p, &w, &b).unwrap().to_vec2().unwrap();
    assert_eq!(v, vec![vec![1.0, 2.0, 4.0]]);

    let (model, tok) = load();
    let names = classes();
    let (images, _) = images();
    // Default MaPLe: the first 2 words of "a photo of a" are learned, "of a"
    // stays; with the context at its initial value the text side is the
    // hand-written prompt, and the image side sees F(ctx) as prompt tokens.
    let ctx = template_context(&model, &tok, "a photo");
    let w = Tensor::arange(0f32, 32. * 32., &dev)
        .unwrap()
        .reshape((32, 32))
        .unwrap()
        .affine(1e-3, -0.5)
        .unwrap();
    let b = Tensor::ones(32, DType::F32, &dev).unwrap();
    let scale = 30.0;
    let got = PromptClassifier::from_parameters(
        "maple",
        None,
        &names,
        24,
        scale,
        vec![
            ("ctx".into(), ctx.clone()),
            ("coupling.weight".into(), w.clone()),
            ("coupling.bias".into(), b.clone()),
        ],
    )
    .unwrap()
    .logits_for_images(&model, &tok, &images)
    .unwrap();
    let texts: Vec<String> = names.iter().map(|n| format!("a photo of a {n}.")).collect();
    let prompts = VisualPrompts {
        shallow: Some(couple(&ctx, &w, &b).unwrap()),
        deep: Vec::new(),
    };
    let want = vpt_logits(
        &model,
        &zero_shot(&model, &tok, &texts),
        Some(&prompts),
        &images,
        scale,
    )
    .unwrap();
    assert!(max_abs_diff(&got, &want) < 1e-4);
}

#[test]
fn vpt_deep_prompts_replace_the_prompt_slots_before_later_layers() {
    let (model, tok) = load();
    let names = classes();
    let (images, _) = images();
    let dev = Device::Cpu;
    let texts: Vec<String> = names.iter().map(|n| format!("a photo of a {n}.")).collect();
    let head = medvlm_adapt::method::l2_normalize(&zero_shot(&model, &tok, &texts)).unwrap();
    let shallow = Tensor::ones((2, 32), DType::F32, &dev).unwrap();
    let deep1 = Tensor::arange(0f32, 64., &dev)
        .unwrap()
        .reshape((2, 32))
        .unwrap()
        .affine(0.1, -3.0)
        .unwrap();
    let classifier = |deep: bool, params: Vec<(String, Tensor)>| {
        PromptClassifier::from_parameters(
            "vpt",
            Some(&serde_json::json!({"n_tokens": 2, "deep": deep})),
            &names,
            24,
            10.0,
            params,
        )
        .unwrap()
        .logits_for_images(&model, &tok, &images)
        .unwrap()
    };
    let shallow_only = classifier(
        false,
        vec![
            ("vpt.shallow".into(), shallow.clone()),
            ("head_weights".into(), head.clone()),
        ],
    );
    let want_shallow = vpt_logits(
        &model,
        &head,
        Some(&VisualPrompts {
            shallow: Some(shallow.clone()),
            deep: Vec::new(),
        }),
        &images,
        10.0,
    )
    .unwrap();
    assert_eq!(max_abs_diff(&shallow_only, &want_shallow), 0.0);
    let deep = classifier(
        true,
        vec![
            ("vpt.shallow".into(), shallow.clone()),
            ("head_weights".into(), head.clone()),
            ("vpt.deep.1".into(), deep1.clone()),
        ],
    );
    let want_deep = vpt_logits(
        &model,
        &head,
        Some(&VisualPrompts {
            shallow: Some(shallow),
            deep: vec![None, Some(deep1)],
        }),
        &images,
        10.0,
    )
    .unwrap();
    assert_eq!(max_abs_diff(&deep, &want_deep), 0.0);
    assert!(max_abs_diff(&deep, &shallow_only) > 1e-4);
    // A deep classifier without its layer-1 prompts is a clear error.
    let err = PromptClassifier::from_parameters(
        "vpt",
        Some(&serde_json::json!({"n_tokens": 2, "deep": true})),
        &names,
        24,
        10.0,
        vec![
            (
                "vpt.shallow".into(),
                Tensor::ones((2, 32), DType::F32, &dev).unwrap(),
            ),
            ("head_weights".into(), head),
        ],
    )
    .unwrap()
    .logits_for_images(&model, &tok, &images)
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("vpt.deep.1"), "{err}");
}

#[test]
fn task_class_prompts_become_vpts_head_and_kgcoops_anchor() {
    let (model, tok) = load();
    let names = classes();
    let (images, labels) = images();
    let prompts: Vec<Vec<String>> = names
        .iter()
        .map(|n| {
            vec![
                format!("an image of a {n}."),
                format!("a {n} seen up close."),
            ]
        })
        .collect();
    // Hand computation: mean of the normalised prompt embeddings, renormalised.
    let norm = |t: &Tensor| {
        let n = t.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
        t.broadcast_div(&n).unwrap()
    };
    let rows: Vec<Tensor> = prompts
        .iter()
        .map(|p| {
            let e = model
                .encode_text(&tok.encode_batch(p, &Device::Cpu).unwrap())
                .unwrap()
                .embeds;
            norm(&norm(&e).mean_keepdim(0).unwrap())
        })
        .collect();
    let expected = Tensor::cat(&rows, 0).unwrap();
    let input = PromptInput {
        model: &model,
        tokenizer: &tok,
        class_names: &names,
        images: &images,
        labels: &labels,
        seed: 2,
        class_prompts: Some(&prompts),
    };
    let vpt = prompt_method_by_name("vpt", Some(&overrides("vpt", 1)))
        .unwrap()
        .fit_prompts(&input)
        .unwrap();
    assert!(max_abs_diff(vpt.param("head_weights").unwrap(), &expected) < 1e-6);
    assert_eq!(vpt.card().fit_info["head"], "class prompts");
    let kg = medvlm_adapt::methods::kgcoop::KgCoop::default();
    assert!(max_abs_diff(&kg.handcrafted_weights(&input).unwrap(), &expected) < 1e-6);
    // Without class prompts the template ("a photo of a {}.") is used: a different head.
    let plain = prompt_method_by_name("vpt", Some(&overrides("vpt", 1)))
        .unwrap()
        .fit_prompts(&PromptInput {
            class_prompts: None,
            ..input
        })
        .unwrap();
    assert_eq!(plain.card().fit_info["head"], "template");
    assert!(max_abs_diff(plain.param("head_weights").unwrap(), &expected) > 1e-3);
}
