//! Training configuration: the documented examples parse and validate, unknown keys and
//! out-of-range values are errors that name the key.

use std::path::Path;

use medvlm_train::train_config::{Command, FinetuneMode, FreezeMode, LossKind, TrainConfig};

const DOC: &str = include_str!("../../../docs/training.md");

/// The ```toml blocks of docs/training.md with the command named on their first line.
fn doc_examples() -> Vec<(Command, String)> {
    let mut out = Vec::new();
    let mut rest = DOC;
    while let Some(start) = rest.find("```toml\n") {
        let body = &rest[start + 8..];
        let end = body.find("```").expect("closed code block");
        let block = &body[..end];
        let command = if block.starts_with("# medvlm pretrain") {
            Command::Pretrain
        } else if block.starts_with("# medvlm finetune") {
            Command::Finetune
        } else {
            panic!("example must start with '# medvlm pretrain|finetune': {block}");
        };
        out.push((command, block.to_string()));
        rest = &body[end + 3..];
    }
    out
}

fn parse(text: &str) -> TrainConfig {
    TrainConfig::from_toml_str(text, Path::new("test.toml")).unwrap()
}

#[test]
fn documented_examples_parse_and_validate() {
    let examples = doc_examples();
    assert_eq!(examples.len(), 2);
    for (command, text) in &examples {
        let cfg = parse(text);
        cfg.validate(*command)
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
    }
    let pre = parse(&examples[0].1);
    assert_eq!(pre.optim.grad_accum, 2);
    assert_eq!(pre.data.augment.crop_scale, [0.8, 1.0]);
    assert_eq!(pre.model.scratch.as_ref().unwrap().vision_layers, 2);
    assert!((pre.loss.logit_scale_init() - (1.0f64 / 0.07).ln()).abs() < 1e-12);
    let ft = parse(&examples[1].1);
    assert_eq!(ft.loss.kind, LossKind::LabelAware);
    assert_eq!(ft.freeze.mode, FreezeMode::Text);
    assert_eq!(
        ft.freeze.frozen_prefixes(),
        vec!["text_model.", "text_projection.", "text."]
    );
    assert_eq!(ft.finetune.as_ref().unwrap().mode, FinetuneMode::Lora);
    let lora = ft.lora().unwrap();
    assert_eq!((lora.rank, lora.alpha, lora.dropout), (8, 16.0, 0.05));
    // Defaults filled in.
    assert_eq!(ft.optim.betas, [0.9, 0.98]);
    assert_eq!(ft.checkpoint.keep, 3);
    assert_eq!(ft.optim.max_steps, Some(2000));
}

const MINIMAL: &str = r#"
output_dir = "out"
[model]
source = "weights/clip"
[data]
manifest = "train.jsonl"
"#;

#[test]
fn unknown_keys_are_errors_naming_the_key() {
    let err = TrainConfig::from_toml_str(
        &format!("{MINIMAL}\n[optim]\nlearning_rate = 0.1\n"),
        Path::new("cfg.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("learning_rate") && err.contains("cfg.toml"),
        "{err}"
    );
    let err = TrainConfig::from_toml_str(&format!("{MINIMAL}\nsede = 3\n"), Path::new("x"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("sede"), "{err}");
    let err = TrainConfig::from_toml_str(
        &format!("{MINIMAL}\n[data.augment]\nvertical_flip = true\n"),
        Path::new("x"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("vertical_flip"), "{err}");
    let err = TrainConfig::from_toml_str(
        &format!("{MINIMAL}\n[loss]\nkind = \"infonce\"\n"),
        Path::new("x"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("infonce"), "{err}");
}

fn invalid_key(extra: &str, command: Command) -> String {
    let cfg = parse(&format!("{MINIMAL}\n{extra}"));
    match cfg.validate(command) {
        Ok(()) => panic!("accepted: {extra}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn out_of_range_values_name_the_key() {
    let cases = [
        ("[optim]\nlr = 0.0", "optim.lr"),
        ("[data.augment]\ngamma = 1.5", "data.augment.gamma"),
        ("[data.augment]\nnoise_std = -0.1", "data.augment.noise_std"),
        (
            "[data.augment]\nblur_sigma = 9.0",
            "data.augment.blur_sigma",
        ),
        ("[optim]\nlr = -1e-3", "optim.lr"),
        ("[optim]\nbetas = [0.9, 1.0]", "optim.betas"),
        ("[optim]\neps = 0.0", "optim.eps"),
        ("[optim]\ngrad_accum = 0", "optim.grad_accum"),
        ("[optim]\nclip_norm = -1.0", "optim.clip_norm"),
        ("[optim]\nweight_decay = -0.1", "optim.weight_decay"),
        (
            "[optim]\nmax_steps = 10\nwarmup_steps = 10",
            "optim.warmup_steps",
        ),
        ("[optim]\nlr = 1e-3\nmin_lr = 1e-2", "optim.min_lr"),
        ("[loss]\ntemperature_init = 0.001", "loss.temperature_init"),
        ("[loss]\ntemperature_init = 0.0", "loss.temperature_init"),
        (
            "[data.augment]\ncrop_scale = [0.9, 0.5]",
            "data.augment.crop_scale",
        ),
        (
            "[data.augment]\nrotation_degrees = 270.0",
            "data.augment.rotation_degrees",
        ),
        ("[freeze]\nmode = \"partial\"", "freeze.last_k"),
        ("[freeze]\nmode = \"image\"\nlast_k = 2", "freeze.last_k"),
        ("[checkpoint]\nkeep = 0", "checkpoint.keep"),
        (
            "[checkpoint]\nevery_n_steps = 0",
            "checkpoint.every_n_steps",
        ),
    ];
    for (extra, key) in cases {
        let err = invalid_key(extra, Command::Pretrain);
        assert!(
            err.contains(key),
            "{extra:?}: error {err:?} does not name {key}"
        );
    }
    // batch_size lives in [data], which MINIMAL already opened: write a full config.
    let cfg = parse(
        "output_dir = \"o\"\n[model]\nsource = \"m\"\n[data]\nmanifest = \"t\"\nbatch_size = 0\n",
    );
    assert!(cfg
        .validate(Command::Pretrain)
        .unwrap_err()
        .to_string()
        .contains("data.batch_size"));
}

#[test]
fn resnet_image_tower_settings_are_checked_before_training() {
    let scratch = |extra: &str, size: usize| {
        parse(&format!(
            "output_dir = \"o\"\n[model.scratch]\ntokenizer = \"t.json\"\n{extra}\n\
             [data]\nmanifest = \"t\"\nimage_size = {size}\n"
        ))
        .validate(Command::Pretrain)
    };
    scratch("image_tower = \"resnet\"", 64).unwrap();
    // A ViT's patch size does not constrain a ResNet, the 32x downsampling does.
    scratch("image_tower = \"resnet\"\npatch_size = 7", 64).unwrap();
    for (extra, size, needle) in [
        ("image_tower = \"resnet\"", 48, "multiple of 32"),
        (
            "image_tower = \"convnext\"",
            64,
            "model.scratch.image_tower",
        ),
        (
            "image_tower = \"resnet\"\nresnet_layers = [1, 1]",
            64,
            "four stages",
        ),
        ("image_tower = \"resnet\"\nresnet_width = 3", 64, "even"),
        (
            "image_tower = \"resnet\"\nfamily = \"siglip\"",
            64,
            "family",
        ),
    ] {
        let err = scratch(extra, size).unwrap_err().to_string();
        assert!(err.contains(needle), "{extra:?}: {err}");
    }
}

#[test]
fn command_specific_rules() {
    // finetune without [finetune]
    let err = invalid_key("", Command::Finetune);
    assert!(err.contains("finetune"), "{err}");
    // pretrain with [finetune]
    let err = invalid_key("[finetune]\nmode = \"full\"", Command::Pretrain);
    assert!(err.contains("finetune"), "{err}");
    // LoRA ranges
    let err = invalid_key(
        "[finetune]\nmode = \"lora\"\n[finetune.lora]\nrank = 0",
        Command::Finetune,
    );
    assert!(err.contains("finetune.lora.rank"), "{err}");
    let err = invalid_key(
        "[finetune]\nmode = \"lora\"\n[finetune.lora]\ndropout = 1.0",
        Command::Finetune,
    );
    assert!(err.contains("finetune.lora.dropout"), "{err}");
    let err = invalid_key(
        "[finetune]\nmode = \"full\"\n[finetune.lora]\nrank = 4",
        Command::Finetune,
    );
    assert!(err.contains("finetune.lora"), "{err}");
    // LoRA defaults when the table is absent.
    let cfg = parse(&format!("{MINIMAL}\n[finetune]\nmode = \"lora\""));
    cfg.validate(Command::Finetune).unwrap();
    assert_eq!(cfg.lora().unwrap().targets, vec!["q_proj", "v_proj"]);
    // Both or neither model source.
    let cfg = parse("output_dir = \"o\"\n[model]\n[data]\nmanifest = \"t\"\n");
    assert!(cfg
        .validate(Command::Pretrain)
        .unwrap_err()
        .to_string()
        .contains("model"));
    // Scratch model shape rules.
    let cfg = parse(
        "output_dir = \"o\"\n[model.scratch]\ntokenizer = \"t.json\"\nvision_width = 30\nvision_heads = 4\n[data]\nmanifest = \"t\"\nimage_size = 64\n",
    );
    assert!(cfg
        .validate(Command::Pretrain)
        .unwrap_err()
        .to_string()
        .contains("model.scratch.vision_heads"));
    let cfg = parse(
        "output_dir = \"o\"\n[model.scratch]\ntokenizer = \"t.json\"\npatch_size = 7\n[data]\nmanifest = \"t\"\nimage_size = 64\n",
    );
    assert!(cfg
        .validate(Command::Pretrain)
        .unwrap_err()
        .to_string()
        .contains("model.scratch.patch_size"));
}

#[test]
fn trajectory_hash_ignores_bookkeeping_only() {
    let base = parse(MINIMAL);
    let mut moved = base.clone();
    moved.output_dir = "elsewhere".into();
    moved.data.workers = 16;
    moved.checkpoint.keep = 10;
    assert_eq!(base.trajectory_hash(), moved.trajectory_hash());
    let mut changed = base.clone();
    changed.optim.lr *= 2.0;
    assert_ne!(base.trajectory_hash(), changed.trajectory_hash());
    let mut reseeded = base.clone();
    reseeded.seed = 1;
    assert_ne!(base.trajectory_hash(), reseeded.trajectory_hash());
}

/// The site-style augmentation keys reach the image transform: gamma log-symmetric around
/// 1, noise and the blur's upper sigma as given; any of them makes the augmentation active.
#[test]
fn acquisition_augmentation_reaches_the_transform() {
    use medvlm_train::data::{augment_is_identity, train_transform};
    let cfg = parse(&format!(
        "{MINIMAL}\n[data.augment]\ngamma = 0.5\nnoise_std = 0.03\nblur_sigma = 1.0\n"
    ));
    cfg.validate(Command::Pretrain).unwrap();
    let a = &cfg.data.augment;
    let t = train_transform(a, 32);
    assert!((t.gamma.0 - 1.0 / 1.5).abs() < 1e-6 && (t.gamma.1 - 1.5).abs() < 1e-6);
    assert!((t.noise_std - 0.03).abs() < 1e-7);
    assert_eq!(t.blur_sigma, (0.0, 1.0));
    assert!(!augment_is_identity(a));
    for one in ["gamma = 0.1", "noise_std = 0.01", "blur_sigma = 0.5"] {
        let c = parse(&format!("{MINIMAL}\n[data.augment]\n{one}\n"));
        assert!(!augment_is_identity(&c.data.augment), "{one}");
    }
    let plain = parse(MINIMAL);
    assert!(augment_is_identity(&plain.data.augment));
    let t = train_transform(&plain.data.augment, 32);
    assert_eq!(
        (t.gamma, t.noise_std, t.blur_sigma),
        ((1.0, 1.0), 0.0, (0.0, 0.0))
    );
}
