//! End-to-end tests of `medvlm pretrain`: kill-and-resume gives bit-identical weights, the
//! output loads in `medvlm zero-shot`, and bad configurations fail before training.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;
use common::{bin, fails, ok};

/// A small phantom data set (64 studies at 32 px) in `dir/ph`.
fn phantoms(dir: &Path) -> PathBuf {
    let ph = dir.join("ph");
    ok(&bin()
        .args([
            "phantoms", "generate", "--n", "64", "--size", "32", "--seed", "5",
        ])
        .args(["--max-findings", "1", "--out"])
        .arg(&ph)
        .output()
        .unwrap());
    ph
}

/// A tiny from-scratch config: 1-layer towers of width 32, 32 px images, batch 8,
/// 3 epochs, a checkpoint every 2 updates.
fn tiny_config(dir: &Path, name: &str, out: &str, extra: &str) -> PathBuf {
    let text = format!(
        r#"seed = 11
output_dir = "{out}"
[model.scratch]
tokenizer = "build:words"
projection_dim = 32
vision_width = 32
vision_layers = 1
text_width = 32
text_layers = 1
context_length = 48
[data]
manifest = "ph/train.jsonl"
val_manifest = "ph/val.jsonl"
image_size = 32
batch_size = 8
[data.augment]
crop_scale = [0.8, 1.0]
brightness = 0.1
[optim]
epochs = 3
warmup_steps = 2
lr = 1e-3
[checkpoint]
every_n_steps = 2
keep = 2
{extra}"#
    );
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Runs `run_a` uninterrupted and `run_b` killed (SIGKILL) after its first checkpoint and then
/// resumed, both from the tiny config with `overrides` (`--set` values); returns the step
/// `run_b` was killed at.
fn uninterrupted_and_killed_then_resumed(dir: &Path, overrides: &[&str]) -> u64 {
    let sets: Vec<&str> = overrides.iter().flat_map(|o| ["--set", *o]).collect();
    let cfg_a = tiny_config(dir, "a.toml", "run_a", "");
    ok(&bin()
        .arg("pretrain")
        .arg("--config")
        .arg(&cfg_a)
        .args(&sets)
        .output()
        .unwrap());
    assert!(dir.join("run_a/model").is_dir());

    // Same run, killed with SIGKILL after its first checkpoint.
    let cfg_b = tiny_config(dir, "b.toml", "run_b", "");
    let mut child = bin()
        .arg("pretrain")
        .arg("--config")
        .arg(&cfg_b)
        .args(&sets)
        .args(["--throttle-ms", "150"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let latest = dir.join("run_b/checkpoints/latest");
    let start = Instant::now();
    while !latest.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its first checkpoint"
        );
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL on Unix
    let status = child.wait().unwrap();
    assert!(!status.success(), "the run was not killed: {status:?}");
    assert!(
        !dir.join("run_b/model").exists(),
        "the run finished before it was killed"
    );
    let checkpoint_step = std::fs::read_to_string(&latest).unwrap();
    assert!(checkpoint_step.starts_with("step-"), "{checkpoint_step}");

    // Resume to the end.
    let out = bin()
        .arg("pretrain")
        .arg("--config")
        .arg(&cfg_b)
        .args(&sets)
        .arg("--resume")
        .output()
        .unwrap();
    let stdout = ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming"));
    // It really continued from the checkpoint rather than starting over.
    let killed_at: u64 = checkpoint_step.trim()["step-".len()..].parse().unwrap();
    assert!(killed_at >= 2);
    assert!(
        stdout.contains(&format!("resumed from step {killed_at}\n")),
        "{stdout}"
    );
    killed_at
}

/// Runs `medvlm zero-shot` with `model` on the test images of `dir/ph`: one probability row
/// per image, each summing to 1 over the three classes.
fn zero_shot_on_test_images(model: &Path, dir: &Path) {
    let stdout = ok(&bin()
        .args(["zero-shot", "--model"])
        .arg(model)
        .arg("--images")
        .arg(dir.join("ph/test.jsonl"))
        .args(["--classes", "nodule;mass;tumour"])
        .output()
        .unwrap());
    let n_test = String::from_utf8(read(&dir.join("ph/test.jsonl")))
        .unwrap()
        .lines()
        .count();
    let rows: Vec<&str> = stdout.lines().skip(1).filter(|l| !l.is_empty()).collect();
    assert_eq!(rows.len(), n_test, "{stdout}");
    for row in rows {
        let p: f32 = row
            .split(',')
            .skip(1)
            .take(3)
            .map(|v| v.parse::<f32>().unwrap())
            .sum();
        assert!((p - 1.0).abs() < 1e-3, "{row}");
    }
}

#[test]
fn killed_and_resumed_run_ends_with_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    phantoms(dir);
    uninterrupted_and_killed_then_resumed(dir, &[]);
    let cfg_b = dir.join("b.toml");
    let model_a = dir.join("run_a/model/model.safetensors");
    let model_b = dir.join("run_b/model/model.safetensors");
    assert!(
        read(&model_a) == read(&model_b),
        "resumed weights differ from the uninterrupted run"
    );
    // The resumed log (losses, learning rates, temperatures, validation metrics) equals
    // the uninterrupted one line for line.
    let log_a = String::from_utf8(read(&dir.join("run_a/train_log.jsonl"))).unwrap();
    let log_b = String::from_utf8(read(&dir.join("run_b/train_log.jsonl"))).unwrap();
    assert_eq!(log_a, log_b);
    let updates = log_a.lines().filter(|l| l.contains("\"loss\"")).count();
    let n_train = String::from_utf8(read(&dir.join("ph/train.jsonl")))
        .unwrap()
        .lines()
        .count();
    assert!(n_train >= 16, "{n_train} training studies");
    assert_eq!(updates, 3 * (n_train / 8), "{log_a}"); // 3 epochs of full batches
    let vals: Vec<serde_json::Value> = log_a
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("val").is_some())
        .collect();
    assert_eq!(vals.len(), 3);
    for v in &vals {
        for key in [
            "zero_shot_accuracy",
            "text_to_image_recall@1",
            "text_to_image_recall@5",
            "text_to_image_recall@10",
        ] {
            assert!(v["val"][key].is_number(), "{key} missing in {v}");
        }
    }

    // A different configuration cannot resume this run.
    let err = fails(
        &bin()
            .arg("pretrain")
            .arg("--config")
            .arg(&cfg_b)
            .args(["--resume", "--set", "optim.lr=2e-3"])
            .output()
            .unwrap(),
    );
    assert!(err.contains("config"), "{err}");

    // The trained model loads anywhere a hub model does.
    zero_shot_on_test_images(&dir.join("run_a/model"), dir);
}

#[test]
fn resnet_image_tower_resumes_exactly_and_saves_an_open_clip_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    phantoms(dir);
    uninterrupted_and_killed_then_resumed(
        dir,
        &[
            "model.scratch.image_tower=\"resnet\"",
            "model.scratch.resnet_width=4",
        ],
    );
    // Bit-identical weights, batch-norm running statistics included (they live in the
    // checkpoint like the weights).
    let model_a = dir.join("run_a/model/open_clip_model.safetensors");
    let model_b = dir.join("run_b/model/open_clip_model.safetensors");
    assert!(
        read(&model_a) == read(&model_b),
        "resumed weights differ from the uninterrupted run"
    );
    let tensors = candle_core::safetensors::load(&model_a, &candle_core::Device::Cpu).unwrap();
    let running_var: Vec<f32> = tensors["visual.bn1.running_var"].to_vec1().unwrap();
    assert!(
        running_var.iter().all(|v| *v > 0.0) && running_var.iter().any(|v| (v - 1.0).abs() > 1e-3),
        "the running statistics were not updated: {running_var:?}"
    );
    assert!(tensors.contains_key("visual.attnpool.positional_embedding"));
    assert!(tensors.contains_key("transformer.resblocks.0.attn.in_proj_weight"));
    let config: serde_json::Value =
        serde_json::from_slice(&read(&dir.join("run_a/model/open_clip_config.json"))).unwrap();
    assert_eq!(
        config["model_cfg"]["vision_cfg"]["layers"],
        serde_json::json!([1, 1, 1, 1]),
        "{config}"
    );
    // The open_clip directory loads anywhere a hub model does.
    zero_shot_on_test_images(&dir.join("run_a/model"), dir);
    // Visual prompts need a ViT: adapt refuses VPT, and bench lists it as skipped, both
    // before reading any image (no feature cache is written).
    let err = fails(
        &bin()
            .args(["adapt", "--method", "vpt", "--shots", "1", "--model"])
            .arg(dir.join("run_a/model"))
            .arg("--train")
            .arg(dir.join("ph/train.jsonl"))
            .arg("--out")
            .arg(dir.join("vpt"))
            .output()
            .unwrap(),
    );
    assert!(err.contains("convolutional"), "{err}");
    let err = fails(
        &bin()
            .args(["bench", "fewshot", "--methods", "vpt,maple", "--model"])
            .arg(dir.join("run_a/model"))
            .arg("--data")
            .arg(dir.join("ph/train.jsonl"))
            .arg("--json")
            .arg(dir.join("b.json"))
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("no method of --methods vpt,maple runs"),
        "{err}"
    );
    assert!(!dir.join("ph/.medvlm-cache").exists());
    // Fine-tuning modes that cannot work on it fail before training, saying why.
    for (finetune, needle) in [
        (
            "mode = \"lora\"\n[finetune.lora]\ntargets = [\"q\", \"v\"]",
            "in_proj_weight",
        ),
        ("mode = \"partial\"\nlast_k = 1", "ResNet"),
    ] {
        let cfg = dir.join("ft.toml");
        std::fs::write(
            &cfg,
            format!(
                "output_dir = \"ft\"\n[model]\nsource = \"run_a/model\"\n[data]\n\
                 manifest = \"ph/train.jsonl\"\nimage_size = 32\n[finetune]\n{finetune}\n"
            ),
        )
        .unwrap();
        let err = fails(
            &bin()
                .args(["finetune", "--config"])
                .arg(&cfg)
                .output()
                .unwrap(),
        );
        assert!(err.contains(needle), "{finetune}: {err}");
        assert!(!dir.join("ft/model").exists());
    }
}

#[test]
fn bad_configs_fail_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    phantoms(dir);
    let run = |cfg: &Path, extra: &[&str]| {
        let err = fails(
            &bin()
                .arg("pretrain")
                .arg("--config")
                .arg(cfg)
                .args(extra)
                .output()
                .unwrap(),
        );
        assert!(
            !dir.join("bad/checkpoints/latest").exists(),
            "training started: {err}"
        );
        err
    };
    let cfg = tiny_config(dir, "bad.toml", "bad", "");

    // Unknown key (in the file and as an override).
    let typo = tiny_config(dir, "typo.toml", "bad", "[eval]\nevery_epoch = 1\n");
    let err = run(&typo, &[]);
    assert!(err.contains("every_epoch"), "{err}");
    let err = run(&cfg, &["--set", "optim.learning_rate=0.1"]);
    assert!(err.contains("learning_rate"), "{err}");

    // Out of range.
    let err = run(&cfg, &["--set", "optim.lr=-1"]);
    assert!(err.contains("optim.lr"), "{err}");
    let err = run(&cfg, &["--set", "model.scratch.vision_heads=5"]);
    assert!(err.contains("vision_heads"), "{err}");

    // A manifest without texts.
    let manifest = read(&dir.join("ph/train.jsonl"));
    let stripped: String = String::from_utf8(manifest)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("text");
            v.to_string() + "\n"
        })
        .collect();
    std::fs::write(dir.join("ph/notext.jsonl"), stripped).unwrap();
    let err = run(&cfg, &["--set", "data.manifest=\"ph/notext.jsonl\""]);
    assert!(err.contains("no text"), "{err}");

    // A model that does not fit: image size not a multiple of the patch size, a pretraining
    // config with a [finetune] table, a missing tokenizer file.
    let err = run(&cfg, &["--set", "data.image_size=36"]);
    assert!(err.contains("patch_size"), "{err}");
    let err = run(&cfg, &["--set", "finetune.mode=\"lora\""]);
    assert!(err.contains("finetune"), "{err}");
    let err = run(&cfg, &["--set", "model.scratch.tokenizer=\"nope.json\""]);
    assert!(err.contains("nope.json"), "{err}");
    // A typo that would take all memory (12 x 1e10 x 2 layers = 2.4e11 vision parameters)
    // is refused with the estimate before any image is read, not killed by the kernel.
    let err = run(&cfg, &["--set", "model.scratch.vision_width=100000"]);
    assert!(
        err.contains("bad.toml")
            && err.contains("parameters")
            && err.contains("of memory")
            && err.contains("--force"),
        "{err}"
    );
    // Resume without a checkpoint.
    let err = run(&cfg, &["--resume"]);
    assert!(err.contains("no checkpoint"), "{err}");

    // The label-aware loss on records without labels; modality-grouped batches on records
    // without a modality.
    let manifest = String::from_utf8(read(&dir.join("ph/train.jsonl"))).unwrap();
    let strip = |keys: &[&str]| -> String {
        manifest
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                for k in keys {
                    v.as_object_mut().unwrap().remove(*k);
                }
                v.to_string() + "\n"
            })
            .collect()
    };
    std::fs::write(dir.join("ph/nolabel.jsonl"), strip(&["label", "labels"])).unwrap();
    let err = run(
        &cfg,
        &[
            "--set",
            "data.manifest=\"ph/nolabel.jsonl\"",
            "--set",
            "loss.kind=\"label_aware\"",
        ],
    );
    assert!(err.contains("label_aware") && err.contains("no"), "{err}");
    std::fs::write(dir.join("ph/nomodality.jsonl"), strip(&["modality"])).unwrap();
    let err = run(
        &cfg,
        &[
            "--set",
            "data.manifest=\"ph/nomodality.jsonl\"",
            "--set",
            "data.batch_grouping=\"group\"",
        ],
    );
    assert!(err.contains("batch_grouping"), "{err}");
    let err = run(&cfg, &["--set", "data.text_section=\"summary\""]);
    assert!(err.contains("summary"), "{err}");
}

/// The label-aware loss (soft targets from the manifest's labels), impression-only texts and
/// modality-grouped batches train end to end.
#[test]
fn label_aware_loss_with_impressions_and_grouped_batches_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    phantoms(dir);
    let cfg = tiny_config(dir, "la.toml", "la", "[loss]\nkind = \"label_aware\"\n");
    let out = bin()
        .arg("pretrain")
        .arg("--config")
        .arg(&cfg)
        .args([
            "--set",
            "data.text_section=\"impression\"",
            "--set",
            "data.batch_grouping=\"group\"",
        ])
        .output()
        .unwrap();
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A third of the phantom reports have no section headers; their count is reported.
    assert!(
        stderr.contains("have no `Impression:` header"),
        "fallbacks not reported: {stderr}"
    );
    let log = String::from_utf8(read(&dir.join("la/train_log.jsonl"))).unwrap();
    let losses: Vec<f64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("loss").and_then(|x| x.as_f64()))
        .collect();
    assert!(!losses.is_empty(), "no updates logged");
    assert!(
        losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );
    assert!(dir.join("la/model/model.safetensors").exists());
    // The tokenizer is built from the impressions only: section headers never reach it.
    let tok = String::from_utf8(read(&dir.join("la/model/tokenizer.json"))).unwrap();
    assert!(
        !tok.contains("\"findings\""),
        "the findings section leaked into the texts"
    );
}

#[test]
fn example_configs_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().and_then(|e| e.to_str()) == Some("toml") {
            medvlm_train::pretrain::load_pretrain_config(
                &p,
                &[],
                medvlm_train::train_config::Command::Pretrain,
            )
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            n += 1;
        }
    }
    assert!(n >= 2, "{n} example configs");
}
