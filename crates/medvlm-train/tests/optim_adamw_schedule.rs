//! AdamW, weight-decay exclusions, clipping, accumulation, schedule and freezing helpers.

use candle_core::{DType, Device, Tensor, Var};
use medvlm_train::optim::{
    block_index, last_k_blocks, split_by_prefix, AdamW, AdamWConfig, GradAccumulator, Gradients,
    NamedVar, WeightDecayRule,
};
use medvlm_train::schedule::WarmupCosine;

fn grads(entries: &[(&str, Tensor)]) -> Gradients {
    Gradients(
        entries
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect(),
    )
}

fn t(v: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

fn flat(v: &Var) -> Vec<f64> {
    v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn adamw_two_steps_by_hand() {
    let w = Var::from_tensor(&t(&[1.0, -2.0], &[1, 2])).unwrap();
    let b = Var::from_tensor(&t(&[0.5], &[1])).unwrap();
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.5,
    };
    let params: Vec<NamedVar> = vec![
        ("fc.weight".into(), w.clone()),
        ("fc.bias".into(), b.clone()),
    ];
    let mut opt = AdamW::new(params, cfg, &WeightDecayRule::default()).unwrap();
    assert_eq!(opt.decayed_names(), vec!["fc.weight"]);
    let lr = 0.1;
    // Step 1: m = 0.1 g, v = 0.001 g^2, m_hat = g, v_hat = g^2 -> update lr * g / (|g| + eps).
    opt.step(
        &grads(&[
            ("fc.weight", t(&[0.1, -0.3], &[1, 2])),
            ("fc.bias", t(&[0.2], &[1])),
        ]),
        lr,
    )
    .unwrap();
    let w1 = [
        1.0 * (1.0 - lr * 0.5) - lr * 0.1 / (0.1 + 1e-8),
        -2.0 * (1.0 - lr * 0.5) - lr * -0.3 / (0.3 + 1e-8),
    ];
    let b1 = 0.5 - lr * 0.2 / (0.2 + 1e-8); // no decay on the bias
    let got = flat(&w);
    assert!(
        (got[0] - w1[0]).abs() < 1e-12 && (got[1] - w1[1]).abs() < 1e-12,
        "{got:?} vs {w1:?}"
    );
    assert!((flat(&b)[0] - b1).abs() < 1e-12);
    // Step 2 on weight element 0 with g = 0.2:
    // m = 0.9*0.01 + 0.1*0.2 = 0.029; v = 0.999*1e-5 + 0.001*0.04 = 4.999e-5
    // m_hat = 0.029 / 0.19; v_hat = 4.999e-5 / (1 - 0.999^2)
    opt.step(&grads(&[("fc.weight", t(&[0.2, 0.0], &[1, 2]))]), lr)
        .unwrap();
    let m = 0.029;
    let v = 0.999 * 1e-5 + 0.001 * 0.04;
    let m_hat = m / (1.0 - 0.9f64 * 0.9);
    let v_hat = v / (1.0 - 0.999f64 * 0.999);
    let w2 = w1[0] * (1.0 - lr * 0.5) - lr * m_hat / (v_hat.sqrt() + 1e-8);
    assert!((flat(&w)[0] - w2).abs() < 1e-12, "{} vs {w2}", flat(&w)[0]);
    // The bias had no gradient: untouched, its step counter stays at 1.
    assert!((flat(&b)[0] - b1).abs() < 1e-15);
    assert_eq!(opt.meta().steps["fc.bias"], 1);
    assert_eq!(opt.meta().steps["fc.weight"], 2);
}

#[test]
fn excluded_parameters_really_get_no_decay() {
    let rule = WeightDecayRule::default();
    assert!(rule.decays("vision_model.encoder.layers.0.mlp.fc1.weight", 2));
    assert!(!rule.decays("vision_model.encoder.layers.0.mlp.fc1.bias", 1));
    assert!(!rule.decays("vision_model.post_layernorm.weight", 1));
    assert!(!rule.decays("text_model.embeddings.word_embeddings.weight", 2));
    assert!(!rule.decays("visual.trunk.blocks.0.norm1.weight", 1));
    assert!(!rule.decays("logit_scale", 0));
    assert!(
        !rule.decays("some.weird.gain", 1),
        "rank-1 tensors are excluded"
    );

    // Zero gradients: Adam's update is 0, so only decay can move a parameter.
    let dense = Var::from_tensor(&t(&[2.0; 4], &[2, 2])).unwrap();
    let emb = Var::from_tensor(&t(&[2.0; 4], &[2, 2])).unwrap();
    let scale = Var::from_tensor(&Tensor::new(2.0f64, &Device::Cpu).unwrap()).unwrap();
    let params: Vec<NamedVar> = vec![
        ("proj.weight".into(), dense.clone()),
        ("token_embedding.weight".into(), emb.clone()),
        ("logit_scale".into(), scale.clone()),
    ];
    let cfg = AdamWConfig {
        weight_decay: 0.1,
        ..Default::default()
    };
    let mut opt = AdamW::new(params, cfg, &rule).unwrap();
    let zeros = Tensor::zeros((2, 2), DType::F64, &Device::Cpu).unwrap();
    let g = grads(&[
        ("proj.weight", zeros.clone()),
        ("token_embedding.weight", zeros),
        ("logit_scale", Tensor::new(0.0f64, &Device::Cpu).unwrap()),
    ]);
    opt.step(&g, 0.5).unwrap();
    assert_eq!(flat(&dense), vec![2.0 * (1.0 - 0.5 * 0.1); 4]);
    assert_eq!(flat(&emb), vec![2.0; 4]);
    assert_eq!(flat(&scale), vec![2.0]);
}

#[test]
fn clipping_scales_to_the_max_norm() {
    let mut g = grads(&[("a", t(&[3.0], &[1])), ("b", t(&[0.0, 4.0], &[2]))]);
    assert!((g.global_norm().unwrap() - 5.0).abs() < 1e-12);
    let before = g.clip_global_norm(1.0).unwrap();
    assert!((before - 5.0).abs() < 1e-12);
    let after = g.global_norm().unwrap();
    assert!((after - 5.0 / (5.0 + 1e-6)).abs() < 1e-12, "{after}");
    let a: Vec<f64> = g.0["a"].to_vec1().unwrap();
    assert!((a[0] - 3.0 / (5.0 + 1e-6)).abs() < 1e-12);
    // Below the limit nothing changes.
    let mut g = grads(&[("a", t(&[0.3], &[1]))]);
    g.clip_global_norm(1.0).unwrap();
    assert_eq!(g.0["a"].to_vec1::<f64>().unwrap(), vec![0.3]);
}

/// Mean squared error of a linear map on a batch.
fn mse(w: &Var, x: &Tensor, y: &Tensor) -> Tensor {
    (x.matmul(w.as_tensor()).unwrap() - y)
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
}

#[test]
fn accumulating_two_micro_batches_equals_one_batch() {
    let dev = Device::Cpu;
    let x = Tensor::from_vec(
        (0..12).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>(),
        (4, 3),
        &dev,
    )
    .unwrap();
    let y = Tensor::from_vec(
        (0..8).map(|i| (i as f32 * 0.91).cos()).collect::<Vec<_>>(),
        (4, 2),
        &dev,
    )
    .unwrap();
    let w = Var::from_tensor(
        &Tensor::from_vec(vec![0.1f32, -0.2, 0.3, 0.05, -0.4, 0.25], (3, 2), &dev).unwrap(),
    )
    .unwrap();
    let params: Vec<NamedVar> = vec![("w".into(), w.clone())];

    let full = Gradients::from_grad_store(&mse(&w, &x, &y).backward().unwrap(), &params);
    let mut acc = GradAccumulator::new();
    for half in 0..2 {
        let xs = x.narrow(0, half * 2, 2).unwrap();
        let ys = y.narrow(0, half * 2, 2).unwrap();
        acc.add(&mse(&w, &xs, &ys).backward().unwrap(), &params)
            .unwrap();
    }
    assert_eq!(acc.micro_batches(), 2);
    let accumulated = acc.finish().unwrap();
    let a: Vec<f32> = full.0["w"].flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = accumulated.0["w"].flatten_all().unwrap().to_vec1().unwrap();
    for (p, q) in a.iter().zip(&b) {
        assert!((p - q).abs() <= 1e-6, "{a:?} vs {b:?}");
    }
    assert_eq!(acc.micro_batches(), 0, "finish resets");
}

#[test]
fn state_export_restores_exactly_and_rejects_mismatches() {
    let make = || Var::from_tensor(&t(&[0.3, -0.7, 1.1, 0.2], &[2, 2])).unwrap();
    let (w_a, w_b) = (make(), make());
    let cfg = AdamWConfig::default();
    let rule = WeightDecayRule::default();
    let mut a = AdamW::new(vec![("w".into(), w_a.clone())], cfg, &rule).unwrap();
    let g1 = grads(&[("w", t(&[0.1, 0.2, -0.3, 0.4], &[2, 2]))]);
    let g2 = grads(&[("w", t(&[-0.5, 0.1, 0.3, 0.0], &[2, 2]))]);
    a.step(&g1, 0.01).unwrap();
    // Copy weights and state into a fresh optimiser, then take the same step on both.
    w_b.set(w_a.as_tensor()).unwrap();
    let mut b = AdamW::new(vec![("w".into(), w_b.clone())], cfg, &rule).unwrap();
    b.load_state(&a.state_tensors().unwrap(), &a.meta())
        .unwrap();
    a.step(&g2, 0.01).unwrap();
    b.step(&g2, 0.01).unwrap();
    assert_eq!(flat(&w_a), flat(&w_b));

    let other = Var::from_tensor(&t(&[0.0; 3], &[3])).unwrap();
    let mut c = AdamW::new(vec![("w".into(), other)], cfg, &rule).unwrap();
    let err = c
        .load_state(&a.state_tensors().unwrap(), &a.meta())
        .unwrap_err();
    assert!(err.to_string().contains("shape"), "{err}");
    assert!(AdamW::new(vec![("w".into(), make()), ("w".into(), make())], cfg, &rule).is_err());
}

#[test]
fn warmup_cosine_schedule_values() {
    let s = WarmupCosine {
        base_lr: 1.0,
        warmup_steps: 2,
        total_steps: 6,
        min_lr: 0.0,
    };
    let expected = [
        0.5,
        1.0,
        1.0,
        0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos()),
        0.5,
        0.5 * (1.0 + (3.0 * std::f64::consts::PI / 4.0).cos()),
        0.0,
        0.0,
    ];
    for (step, e) in expected.iter().enumerate() {
        assert!(
            (s.lr(step as u64) - e).abs() < 1e-12,
            "step {step}: {} vs {e}",
            s.lr(step as u64)
        );
    }
    let floor = WarmupCosine { min_lr: 0.1, ..s };
    assert!((floor.lr(4) - (0.1 + 0.5 * 0.9)).abs() < 1e-12);
    assert_eq!(floor.lr(100), 0.1);
}

#[test]
fn freezing_by_prefix_and_last_k_blocks() {
    let v = || Var::new(0.0f32, &Device::Cpu).unwrap();
    let names = [
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.encoder.layers.0.mlp.fc1.weight",
        "vision_model.encoder.layers.1.mlp.fc1.weight",
        "vision_model.encoder.layers.10.mlp.fc1.weight",
        "vision_model.encoder.layers.11.mlp.fc1.weight",
        "vision_model.encoder.layers.11.self_attn.q_proj.weight",
        "text_model.encoder.layers.0.mlp.fc1.weight",
        "logit_scale",
    ];
    let params: Vec<NamedVar> = names.iter().map(|n| (n.to_string(), v())).collect();
    let (trainable, frozen) = split_by_prefix(params, &["vision_model.".to_string()]);
    let trainable: Vec<&str> = trainable.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        trainable,
        vec!["text_model.encoder.layers.0.mlp.fc1.weight", "logit_scale"]
    );
    assert_eq!(frozen.len(), 6);

    assert_eq!(
        block_index(names[3], "vision_model.encoder.layers."),
        Some(10)
    );
    assert_eq!(block_index(names[0], "vision_model.encoder.layers."), None);
    let last2 = last_k_blocks(names.iter().copied(), "vision_model.encoder.layers.", 2);
    let last2: Vec<&str> = last2.iter().map(String::as_str).collect();
    assert_eq!(
        last2,
        vec![
            "vision_model.encoder.layers.10.mlp.fc1.weight",
            "vision_model.encoder.layers.11.mlp.fc1.weight",
            "vision_model.encoder.layers.11.self_attn.q_proj.weight",
        ]
    );
    assert!(last_k_blocks(names.iter().copied(), "vision_model.encoder.layers.", 0).is_empty());
    assert!(last_k_blocks(names.iter().copied(), "nope.", 3).is_empty());
}

/// A miniature HF-CLIP parameter list: 3 vision blocks, 2 text blocks.
const HF_CLIP_NAMES: [&str; 16] = [
    "vision_model.embeddings.patch_embedding.weight",
    "vision_model.embeddings.position_embedding.weight",
    "vision_model.pre_layrnorm.weight",
    "vision_model.encoder.layers.0.mlp.fc1.weight",
    "vision_model.encoder.layers.1.mlp.fc1.weight",
    "vision_model.encoder.layers.2.mlp.fc1.weight",
    "vision_model.encoder.layers.2.mlp.fc1.bias",
    "vision_model.post_layernorm.weight",
    "visual_projection.weight",
    "text_model.embeddings.token_embedding.weight",
    "text_model.encoder.layers.0.self_attn.q_proj.weight",
    "text_model.encoder.layers.1.self_attn.q_proj.weight",
    "text_model.encoder.layers.1.self_attn.q_proj.bias",
    "text_model.final_layer_norm.weight",
    "text_projection.weight",
    "logit_scale",
];

#[test]
fn trainable_selections() {
    use medvlm_train::optim::{select_trainable, TrainableSelection, DEFAULT_BLOCK_PREFIXES};
    let names = HF_CLIP_NAMES;
    let last1 = TrainableSelection::LastKBlocks {
        k: 1,
        block_prefixes: DEFAULT_BLOCK_PREFIXES
            .iter()
            .map(|s| s.to_string())
            .collect(),
    };
    let got = select_trainable(names.iter().copied(), &last1).unwrap();
    let expected: std::collections::BTreeSet<String> = [
        "vision_model.encoder.layers.2.mlp.fc1.weight",
        "vision_model.encoder.layers.2.mlp.fc1.bias",
        "vision_model.post_layernorm.weight",
        "visual_projection.weight",
        "text_model.encoder.layers.1.self_attn.q_proj.weight",
        "text_model.encoder.layers.1.self_attn.q_proj.bias",
        "text_model.final_layer_norm.weight",
        "text_projection.weight",
        "logit_scale",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(got, expected);

    let bitfit = select_trainable(names.iter().copied(), &TrainableSelection::BiasesOnly).unwrap();
    assert_eq!(
        bitfit.into_iter().collect::<Vec<_>>(),
        vec![
            "logit_scale",
            "text_model.encoder.layers.1.self_attn.q_proj.bias",
            "vision_model.encoder.layers.2.mlp.fc1.bias",
        ]
    );
    // No block list in the model -> a clear error instead of training nothing.
    let err = select_trainable(["a.weight", "b.weight"], &last1).unwrap_err();
    assert!(
        err.to_string().contains("no transformer block list"),
        "{err}"
    );
    assert!(select_trainable(["a.weight"], &TrainableSelection::BiasesOnly).is_err());
    assert!(
        select_trainable(names.iter().copied(), &TrainableSelection::Nothing)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn config_freeze_and_finetune_combine() {
    use medvlm_train::train_config::TrainConfig;
    let parse = |extra: &str| {
        TrainConfig::from_toml_str(
            &format!(
                "output_dir = \"o\"\n[model]\nsource = \"m\"\n[data]\nmanifest = \"t\"\n{extra}"
            ),
            std::path::Path::new("t.toml"),
        )
        .unwrap()
    };
    let names = HF_CLIP_NAMES;
    // Locked image tower, full fine-tuning: the text side and logit_scale.
    let cfg = parse("[freeze]\nmode = \"image\"\n[finetune]\nmode = \"full\"");
    let t = cfg.trainable_names(&names).unwrap();
    assert_eq!(t.len(), 7);
    assert!(t
        .iter()
        .all(|n| !n.starts_with("vision_model.") && !n.starts_with("visual_")));
    // Locked text + BitFit: only the vision bias and logit_scale.
    let cfg = parse("[freeze]\nmode = \"text\"\n[finetune]\nmode = \"bitfit\"");
    let t: Vec<String> = cfg.trainable_names(&names).unwrap().into_iter().collect();
    assert_eq!(
        t,
        vec!["logit_scale", "vision_model.encoder.layers.2.mlp.fc1.bias"]
    );
    // LoRA: no base parameter.
    let cfg = parse("[finetune]\nmode = \"lora\"");
    assert!(cfg.trainable_names(&names).unwrap().is_empty());
    // Pretraining without freezing trains everything.
    let cfg = parse("");
    assert_eq!(cfg.trainable_names(&names).unwrap().len(), names.len());
}
