//! End-to-end tests of `medvlm finetune` on the tiny CLIP parity fixture of medvlm-models
//! with a few synthetic image-text pairs: the exported model loads in `medvlm embed` and
//! `medvlm zero-shot` and differs from the base model; modes that do not fit the model fail
//! before training.

use std::path::{Path, PathBuf};

use candle_core::Device;
use medvlm_io::Plane;

mod common;
use common::{arg, fails, model, ok, run};

/// Six 32x32 PNGs (in `images/`) with distinct patterns and a JSONL manifest pairing them with texts.
fn dataset(dir: &Path) -> PathBuf {
    let texts = [
        "a chest x-ray",
        "a brain mri",
        "a skin lesion",
        "a histology slide",
        "a ct of the abdomen",
        "a fundus photo",
    ];
    let mut lines = String::new();
    for (i, t) in texts.iter().enumerate() {
        let data: Vec<f32> = (0..32 * 32 * 3)
            .map(|k| {
                let (y, x, c) = (k / 96, (k / 3) % 32, k % 3);
                (((x * (i + 1) + y * (c + 1) * (7 - i)) % 32) as f32) / 31.0
            })
            .collect();
        let plane = Plane::new(32, 32, 3, data).unwrap();
        let name = format!("images/img{i}.png");
        std::fs::create_dir_all(dir.join("images")).unwrap();
        medvlm_io::raster::write_png(&dir.join(&name), &plane).unwrap();
        lines.push_str(&format!("{{\"image\": \"{name}\", \"text\": \"{t}\"}}\n"));
    }
    let m = dir.join("pairs.jsonl");
    std::fs::write(&m, lines).unwrap();
    m
}

fn config(dir: &Path, manifest: &Path, out: &Path, finetune: &str) -> PathBuf {
    let text = format!(
        r#"seed = 1
output_dir = "{out}"

[model]
source = "{model}"

[data]
manifest = "{manifest}"
image_size = 32
batch_size = 3
workers = 1

[optim]
lr = 0.01
warmup_steps = 0
epochs = 3

{finetune}
"#,
        out = out.display(),
        model = model().display(),
        manifest = manifest.display(),
    );
    let p = dir.join("ft.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn embeds(model: &Path, images: &Path, out: &Path) -> candle_core::Tensor {
    ok(&run(&[
        "embed",
        "--model",
        arg(model),
        "--images",
        arg(images),
        "--out",
        arg(out),
    ]));
    let t = candle_core::safetensors::load(out, &Device::Cpu).unwrap();
    t["image_embeds"].clone()
}

fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn lora_finetune_exports_a_model_that_embed_and_zero_shot_load() {
    let d = tempfile::tempdir().unwrap();
    let manifest = dataset(d.path());
    let out = d.path().join("run");
    let cfg = config(
        d.path(),
        &manifest,
        &out,
        "[finetune]\nmode = \"lora\"\n[finetune.lora]\nrank = 2\nalpha = 4.0\ntargets = [\"q\", \"v\"]\n",
    );
    // The file says 3 epochs; --set overrides it.
    ok(&run(&[
        "finetune",
        "--config",
        arg(&cfg),
        "--set",
        "optim.epochs=2",
    ]));
    let resolved = std::fs::read_to_string(out.join("config.resolved.toml")).unwrap();
    assert!(resolved.contains("epochs = 2"), "{resolved}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("finetune.json")).unwrap()).unwrap();
    // q_proj and v_proj of 2 blocks in 2 towers, rank 2 (A [2, 32] + B [32, 2] each).
    assert_eq!(report["lora_merged"], 8);
    assert_eq!(report["trainable_scalars"].as_u64().unwrap(), 8 * 128);
    assert_eq!(report["temperature_learnable"], true);
    assert_eq!(report["base_tensors_trained"], 0);
    // 6 pairs in batches of 3: 2 updates per epoch, 2 epochs.
    assert_eq!(report["steps"], 4);
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 4);
    // The export holds plain weights only: no LoRA tensors.
    let w =
        candle_core::safetensors::load(out.join("model/model.safetensors"), &Device::Cpu).unwrap();
    assert!(w.keys().all(|k| !k.contains("lora_")));
    // ... and the adapter alone is kept in PEFT's layout.
    let adapter = candle_core::safetensors::load(
        out.join("lora_adapter/adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(adapter.len(), 16);
    assert!(out.join("lora_adapter/adapter_config.json").is_file());

    let images = d.path().join("images");
    let base = embeds(&model(), &images, &d.path().join("base.safetensors"));
    let tuned = embeds(
        &out.join("model"),
        &images,
        &d.path().join("tuned.safetensors"),
    );
    assert_eq!(base.dims(), tuned.dims());
    assert!(
        max_abs_diff(&base, &tuned) > 1e-4,
        "fine-tuning changed nothing"
    );

    ok(&run(&[
        "zero-shot",
        "--model",
        arg(&out.join("model")),
        "--images",
        arg(&manifest),
        "--classes",
        "a chest x-ray;a brain mri",
    ]));
}

#[test]
fn partial_finetune_runs_and_changes_the_model() {
    let d = tempfile::tempdir().unwrap();
    let manifest = dataset(d.path());
    let out = d.path().join("run");
    let cfg = config(
        d.path(),
        &manifest,
        &out,
        "[finetune]\nmode = \"partial\"\nlast_k = 1\n[freeze]\nmode = \"text\"\n",
    );
    ok(&run(&["finetune", "--config", arg(&cfg)]));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("finetune.json")).unwrap()).unwrap();
    assert_eq!(report["towers"], "vision");
    // Vision block 1 (16 tensors) + post_layernorm (2) + visual_projection.
    assert_eq!(report["trainable_tensors"], 16 + 2 + 1);
    let base =
        candle_core::safetensors::load(model().join("model.safetensors"), &Device::Cpu).unwrap();
    let tuned =
        candle_core::safetensors::load(out.join("model/model.safetensors"), &Device::Cpu).unwrap();
    let same = |k: &str| max_abs_diff(&base[k], &tuned[k]) == 0.0;
    assert!(same("text_model.encoder.layers.1.mlp.fc1.weight"));
    assert!(same("vision_model.encoder.layers.0.mlp.fc1.weight"));
    assert!(!same("vision_model.encoder.layers.1.mlp.fc1.weight"));
    assert!(!same("visual_projection.weight"));
}

#[test]
fn modes_that_do_not_fit_the_model_fail_before_training() {
    let d = tempfile::tempdir().unwrap();
    let manifest = dataset(d.path());
    let out = d.path().join("run");
    for (ft, needle) in [
        (
            "[finetune]\nmode = \"lora\"\n[finetune.lora]\ntargets = [\"query\"]\n",
            "matches no linear layer",
        ),
        (
            "[finetune]\nmode = \"partial\"\nlast_k = 5\n",
            "5 is larger than the 2 blocks",
        ),
        (
            "[finetune]\nmode = \"lora\"\n[finetune.lora]\nrank = 0\n",
            "finetune.lora.rank",
        ),
    ] {
        let cfg = config(d.path(), &manifest, &out, ft);
        let err = fails(&run(&["finetune", "--config", arg(&cfg)]));
        assert!(err.contains(needle), "{needle:?} not in {err}");
        // Nothing trained or written.
        assert!(!out.join("checkpoints").exists(), "{ft}");
        assert!(!out.join("model").exists(), "{ft}");
    }
}
