//! `medvlm adapt`, `medvlm predict` and `medvlm bench fewshot` end to end on
//! a small phantom set (classes = the four modalities) with the tiny CLIP
//! fixture model (random weights): artefact + card with the protocol,
//! predict reproducing adapt's evaluation, the benchmark's table / JSON /
//! PNG, and clear errors on bad input.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{bin, fails, model, ok};

/// A phantom set of `n` studies; returns its manifest.
fn phantoms(dir: &Path, n: u32) -> PathBuf {
    let out = dir.join("ph");
    ok(&bin()
        .args([
            "phantoms",
            "generate",
            "--n",
            &n.to_string(),
            "--seed",
            "5",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap());
    out.join("manifest.jsonl")
}

/// Image path -> modality, from the manifest.
fn modalities(manifest: &Path) -> HashMap<String, String> {
    let root = manifest.parent().unwrap();
    std::fs::read_to_string(manifest)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                root.join(v["image"].as_str().unwrap())
                    .display()
                    .to_string(),
                v["modality"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// One CSV row: image, probabilities, predicted class.
type CsvRow = (String, Vec<f64>, String);

/// Parses `image,<class>...,prediction` CSV into (header classes, rows).
fn parse_csv(text: &str) -> (Vec<String>, Vec<CsvRow>) {
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    let classes = header[1..header.len() - 1].to_vec();
    let rows = lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let probs = f[1..f.len() - 1]
                .iter()
                .map(|x| x.parse().unwrap())
                .collect();
            (f[0].to_string(), probs, f[f.len() - 1].to_string())
        })
        .collect();
    (classes, rows)
}

/// Runs `medvlm predict` on the first image of an artefact's `eval_predictions.csv` and
/// checks it gives the evaluation's probabilities (within 2e-6); returns them.
fn predict_reproduces_first_evaluated_image(out: &Path) -> Vec<f64> {
    let (_, rows) = parse_csv(&std::fs::read_to_string(out.join("eval_predictions.csv")).unwrap());
    let (img, expect, _) = &rows[0];
    let stdout = ok(&bin()
        .arg("predict")
        .arg("--adapted")
        .arg(out)
        .arg(img)
        .output()
        .unwrap());
    let (_, got) = parse_csv(&stdout);
    assert_eq!(&got[0].0, img);
    for (a, b) in got[0].1.iter().zip(expect) {
        assert!((a - b).abs() <= 2e-6, "{a} vs {b}");
    }
    expect.clone()
}

fn adapt(manifest: &Path, method: &str, shots: &str, out: &Path, extra: &[&str]) -> Output {
    bin()
        .args(["adapt", "--method", method, "--shots", shots, "--seed", "3"])
        .arg("--model")
        .arg(model())
        .arg("--train")
        .arg(manifest)
        .arg("--out")
        .arg(out)
        .args(["--label-field", "modality"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn adapt_writes_artefact_and_predict_reproduces_its_evaluation() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = phantoms(tmp.path(), 120);
    let truth = modalities(&manifest);
    for method in ["tip-adapter", "linear-probe"] {
        let out = tmp.path().join(method);
        let stdout = ok(&adapt(&manifest, method, "4", &out, &[]));
        assert!(stdout.contains("test ("), "{stdout}");
        for f in [
            "adapt.json",
            "classifier.json",
            "classifier.safetensors",
            "eval_predictions.csv",
            "reliability.png",
        ] {
            assert!(out.join(f).is_file(), "{method}: missing {f}");
        }
        let card: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("adapt.json")).unwrap())
                .unwrap();
        assert_eq!(card["method"], method);
        assert_eq!(card["protocol"]["shots"], 4);
        assert_eq!(card["protocol"]["seed"], 3);
        assert_eq!(card["protocol"]["mode"]["kind"], "balanced");
        assert_eq!(card["protocol"]["validation_set"], false);
        assert_eq!(card["data_sha256"].as_str().unwrap().len(), 64);
        let classes: Vec<String> = serde_json::from_value(card["class_names"].clone()).unwrap();
        assert_eq!(
            classes,
            ["brain_mri", "chest_xray", "dermoscopy", "histology"]
        );
        // Balanced: exactly 4 support images of each class, with their true class.
        let support: Vec<(String, String)> =
            serde_json::from_value(card["support"].clone()).unwrap();
        assert_eq!(support.len(), 16);
        for c in &classes {
            assert_eq!(support.iter().filter(|(_, l)| l == c).count(), 4);
        }
        for (p, l) in &support {
            assert_eq!(&truth[p], l, "support label of {p}");
        }
        // The method's own card carries the protocol too.
        let clf: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("classifier.json")).unwrap())
                .unwrap();
        assert_eq!(clf["protocol"]["shots"], 4);

        // The card's accuracy is the argmax accuracy of the written predictions.
        let (csv_classes, rows) =
            parse_csv(&std::fs::read_to_string(out.join("eval_predictions.csv")).unwrap());
        assert_eq!(csv_classes, classes);
        let metrics = &card["metrics"];
        assert_eq!(metrics["n"].as_u64().unwrap() as usize, rows.len());
        let correct = rows.iter().filter(|(p, _, pred)| &truth[p] == pred).count();
        let acc = metrics["accuracy"].as_f64().unwrap();
        assert!((acc - correct as f64 / rows.len() as f64).abs() < 1e-9);
        for key in ["balanced_accuracy", "macro_f1", "macro_auroc", "ece"] {
            let v = metrics[key].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{key} = {v}");
        }
        let conf = &metrics["conformal"]["report"];
        assert!((conf["target_coverage"].as_f64().unwrap() - 0.9).abs() < 1e-12);
        let size = conf["mean_set_size"].as_f64().unwrap();
        assert!((1.0..=4.0).contains(&size), "mean set size {size}");

        // predict reloads the artefact and gives the same probabilities.
        let images: Vec<&str> = rows.iter().take(5).map(|(p, _, _)| p.as_str()).collect();
        let pred_csv = tmp.path().join(format!("{method}.csv"));
        let stdout = ok(&bin()
            .arg("predict")
            .arg("--adapted")
            .arg(&out)
            .args(&images)
            .arg("--csv")
            .arg(&pred_csv)
            .output()
            .unwrap());
        assert_eq!(std::fs::read_to_string(&pred_csv).unwrap(), stdout);
        let (_, predicted) = parse_csv(&stdout);
        assert_eq!(predicted.len(), 5);
        for ((p, probs, label), (q, expect, label_expect)) in predicted.iter().zip(&rows) {
            assert_eq!(p, q);
            assert_eq!(label, label_expect);
            for (a, b) in probs.iter().zip(expect) {
                assert!((a - b).abs() <= 2e-6, "{method} {p}: {a} vs {b}");
            }
        }
    }

    // A second run into a filled --out is refused before any work unless --force, which
    // replaces the earlier artefact (and only an artefact).
    let out = tmp.path().join("linear-probe");
    let before = std::fs::read(out.join("adapt.json")).unwrap();
    let err = fails(&adapt(&manifest, "tip-adapter", "2", &out, &[]));
    assert!(
        err.contains("already holds an adapted model") && err.contains("--force"),
        "{err}"
    );
    assert!(
        !err.contains("features:"),
        "refused after computing features: {err}"
    );
    assert_eq!(std::fs::read(out.join("adapt.json")).unwrap(), before);
    ok(&adapt(&manifest, "tip-adapter", "2", &out, &["--force"]));
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapt.json")).unwrap()).unwrap();
    assert_eq!(card["method"], "tip-adapter");
    let other = tmp.path().join("notes");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("mine.txt"), "keep").unwrap();
    let err = fails(&adapt(&manifest, "tip-adapter", "2", &other, &["--force"]));
    assert!(err.contains("not a medvlm adapt artefact"), "{err}");
    assert_eq!(
        std::fs::read_to_string(other.join("mine.txt")).unwrap(),
        "keep"
    );
}

#[test]
fn adapt_realistic_mode_is_recorded_and_predict_skips_bad_files() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = phantoms(tmp.path(), 80);
    let out = tmp.path().join("lp");
    ok(&adapt(
        &manifest,
        "linear-probe",
        "2",
        &out,
        &["--mode", "realistic"],
    ));
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapt.json")).unwrap()).unwrap();
    assert_eq!(card["protocol"]["mode"]["kind"], "realistic");
    assert_eq!(card["protocol"]["validation_set"], false);
    // Realistic: a total budget of K x C = 8 images.
    assert_eq!(card["support"].as_array().unwrap().len(), 8);

    let bad = tmp.path().join("broken.png");
    std::fs::write(&bad, b"not a png").unwrap();
    let good = manifest.parent().unwrap().join("images");
    let good_img = std::fs::read_dir(&good)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "png"))
        .unwrap();
    let err = fails(
        &bin()
            .arg("predict")
            .arg("--adapted")
            .arg(&out)
            .arg(&good_img)
            .arg(&bad)
            .output()
            .unwrap(),
    );
    assert!(err.contains("--skip-bad"), "{err}");
    // The unreadable file is named, once.
    let name = bad.file_name().unwrap().to_str().unwrap();
    assert_eq!(err.matches(name).count(), 1, "{err}");
    let res = bin()
        .arg("predict")
        .arg("--adapted")
        .arg(&out)
        .arg(&good_img)
        .arg(&bad)
        .arg("--skip-bad")
        .output()
        .unwrap();
    let stdout = ok(&res);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    assert!(stderr.contains("skipped 1 unreadable"), "{stderr}");
    assert!(stderr.contains("broken.png"), "{stderr}");
}

#[test]
fn bench_fewshot_writes_table_json_and_plot() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = phantoms(tmp.path(), 100);
    let json = tmp.path().join("bench/fewshot.json");
    let res = bin()
        .args(["bench", "fewshot", "--model"])
        .arg(model())
        .arg("--data")
        .arg(&manifest)
        .args([
            "--label-field",
            "modality",
            "--methods",
            "zero-shot,tip-adapter,linear-probe",
            "--shots",
            "1,2",
            "--seeds",
            "2",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = ok(&res);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(stderr.contains("features: computed"), "{stderr}");
    assert!(
        stdout.contains("| method (accuracy, %) | K=1 | K=2 |"),
        "{stdout}"
    );
    for m in ["zero-shot", "tip-adapter", "linear-probe"] {
        assert!(stdout.contains(&format!("| {m} |")), "{stdout}");
    }
    let png = std::fs::read(json.with_extension("png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let records = v["records"].as_array().unwrap();
    assert_eq!(records.len(), 3 * 2 * 2);
    let mut seen = std::collections::BTreeSet::new();
    for r in records {
        let k = r["protocol"]["shots"].as_u64().unwrap();
        let s = r["protocol"]["seed"].as_u64().unwrap();
        seen.insert((r["method"].as_str().unwrap().to_string(), k, s));
        assert_eq!(r["support_size"].as_u64().unwrap(), 4 * k);
        assert_eq!(r["protocol"]["mode"]["kind"], "balanced");
        let m = &r["metrics"];
        for key in ["accuracy", "balanced_accuracy", "macro_f1", "ece"] {
            let x = m[key].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&x), "{key} = {x}");
        }
        assert!(m["auroc"]["per_class"].as_array().unwrap().len() == 4);
        assert!(m["conformal"]["report"]["coverage"].as_f64().is_some());
    }
    assert_eq!(seen.len(), 12, "one record per method, K and seed");
    // Zero-shot ignores the support set: identical accuracy in every run.
    let zs: Vec<f64> = records
        .iter()
        .filter(|r| r["method"] == "zero-shot")
        .map(|r| r["metrics"]["accuracy"].as_f64().unwrap())
        .collect();
    assert_eq!(zs.len(), 4);
    assert!(zs.iter().all(|a| (a - zs[0]).abs() < 1e-12), "{zs:?}");
    // The table's cell is the mean over seeds of the records.
    let lp_k2: Vec<f64> = records
        .iter()
        .filter(|r| r["method"] == "linear-probe" && r["protocol"]["shots"] == 2)
        .map(|r| r["metrics"]["accuracy"].as_f64().unwrap())
        .collect();
    let table = &v["accuracy_table"];
    let mi = table["methods"]
        .as_array()
        .unwrap()
        .iter()
        .position(|m| m == "linear-probe")
        .unwrap();
    let cell = table["cells"][mi][1]["mean"].as_f64().unwrap();
    assert!((cell - (lp_k2[0] + lp_k2[1]) / 2.0).abs() < 1e-12);

    // A second run reuses the cached features and reproduces the records.
    let json2 = tmp.path().join("bench/again.json");
    let res = bin()
        .args(["bench", "fewshot", "--model"])
        .arg(model())
        .arg("--data")
        .arg(&manifest)
        .args(["--label-field", "modality", "--methods", "linear-probe"])
        .args(["--shots", "2", "--seeds", "2", "--json"])
        .arg(&json2)
        .output()
        .unwrap();
    ok(&res);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(stderr.contains("features: loaded from"), "{stderr}");
    let v2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json2).unwrap()).unwrap();
    let again: Vec<f64> = v2["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["metrics"]["accuracy"].as_f64().unwrap())
        .collect();
    assert_eq!(again, lp_k2);

    // Each (K, seed) names its support set: K images per class, with their manifest classes,
    // and `medvlm adapt` with that K and seed draws the same images.
    let truth = modalities(&manifest);
    let draws = v["support_sets"].as_array().unwrap();
    assert_eq!(draws.len(), 2 * 2);
    for d in draws {
        let k = d["shots"].as_u64().unwrap() as usize;
        let support = d["support"].as_array().unwrap();
        assert_eq!(support.len(), 4 * k);
        for pair in support {
            let (path, class) = (pair[0].as_str().unwrap(), pair[1].as_str().unwrap());
            assert_eq!(truth[path], class, "{path}");
        }
    }
    let draw = draws
        .iter()
        .find(|d| d["shots"] == 2 && d["seed"] == 1)
        .unwrap();
    let out = tmp.path().join("adapt-k2-seed1");
    ok(&bin()
        .args([
            "adapt",
            "--method",
            "linear-probe",
            "--shots",
            "2",
            "--seed",
            "1",
        ])
        .arg("--model")
        .arg(model())
        .arg("--train")
        .arg(&manifest)
        .arg("--out")
        .arg(&out)
        .args(["--label-field", "modality", "--test-split", "none"])
        .output()
        .unwrap());
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapt.json")).unwrap()).unwrap();
    assert_eq!(card["support"], draw["support"]);

    // Images overwritten at the same paths (each gets another image's bytes): the cache sees
    // it, recomputes, and the figures follow the new images.
    let paths: Vec<&String> = {
        let mut p: Vec<&String> = truth.keys().collect();
        p.sort();
        p
    };
    let bytes: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
    for (i, p) in paths.iter().enumerate() {
        std::fs::write(p, &bytes[(i + paths.len() / 2) % paths.len()]).unwrap();
    }
    let json3 = tmp.path().join("bench/overwritten.json");
    let res = bin()
        .args(["bench", "fewshot", "--model"])
        .arg(model())
        .arg("--data")
        .arg(&manifest)
        .args(["--label-field", "modality", "--methods", "linear-probe"])
        .args(["--shots", "2", "--seeds", "2", "--json"])
        .arg(&json3)
        .output()
        .unwrap();
    ok(&res);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        stderr.contains("image files changed") && stderr.contains("recomputed"),
        "{stderr}"
    );
    // Said once, and without terminal colour codes (stderr is a pipe here).
    assert_eq!(stderr.matches("image files changed").count(), 1, "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "{stderr:?}");
    let v3: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json3).unwrap()).unwrap();
    let after: Vec<f64> = v3["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["metrics"]["accuracy"].as_f64().unwrap())
        .collect();
    assert_ne!(after, lp_k2, "figures must follow the new image contents");
}

#[test]
fn bad_input_gives_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = phantoms(tmp.path(), 60);
    let out = tmp.path().join("a");

    // More shots than images of a class.
    let err = fails(&adapt(&manifest, "tip-adapter", "500", &out, &[]));
    assert!(err.contains("--shots 500"), "{err}");
    assert!(err.contains("lower the number of shots"), "{err}");
    assert!(!out.exists(), "no artefact after a failure");

    // A prompts file naming a class the task does not have.
    let prompts = tmp.path().join("prompts.json");
    std::fs::write(
        &prompts,
        r#"{"brain_mri": ["an MRI"], "chest_xray": ["an x-ray"], "dermoscopy": ["skin"],
            "histology": ["tissue"], "ultrasound": ["an ultrasound"]}"#,
    )
    .unwrap();
    let p = prompts.display().to_string();
    let err = fails(&adapt(
        &manifest,
        "tip-adapter",
        "1",
        &out,
        &["--prompts", &p],
    ));
    assert!(err.contains("\"ultrasound\""), "{err}");
    assert!(err.contains("not one of the task's classes"), "{err}");

    // A conformal level outside (0, 1).
    let err = fails(&adapt(
        &manifest,
        "tip-adapter",
        "1",
        &out,
        &["--conformal-alpha", "1.5"],
    ));
    assert!(err.contains("--conformal-alpha 1.5"), "{err}");

    // Encoder fine-tuning with an out-of-range hyperparameter: refused before loading.
    let err = fails(&adapt(
        &manifest,
        "lora",
        "1",
        &out,
        &["--hparams", r#"{"rank": 0}"#],
    ));
    assert!(err.contains("rank must be at least 1"), "{err}");

    // A bench override for a method that is not run, and an unknown group.
    let err = fails(
        &bin()
            .args(["bench", "fewshot", "--model"])
            .arg(model())
            .arg("--data")
            .arg(&manifest)
            .args([
                "--methods",
                "linear-probe",
                "--hparams",
                "lora={}",
                "--json",
            ])
            .arg(tmp.path().join("b.json"))
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("'lora' is not among the --methods run"),
        "{err}"
    );
    let err = fails(
        &bin()
            .args(["bench", "fewshot", "--model"])
            .arg(model())
            .arg("--data")
            .arg(&manifest)
            .args(["--methods", "frozn", "--json"])
            .arg(tmp.path().join("b.json"))
            .output()
            .unwrap(),
    );
    assert!(err.contains("unknown adaptation method 'frozn'"), "{err}");

    // An unknown method name lists the known ones.
    let err = fails(&adapt(&manifest, "tip-adaptr", "1", &out, &[]));
    assert!(err.contains("known methods"), "{err}");

    // predict on a directory that is not an artefact.
    let err = fails(
        &bin()
            .arg("predict")
            .arg("--adapted")
            .arg(tmp.path())
            .arg(&manifest)
            .output()
            .unwrap(),
    );
    assert!(err.contains("adapt.json"), "{err}");
}

#[test]
fn adapt_fits_a_prompt_learning_method_through_the_encoders() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = phantoms(tmp.path(), 80);
    let out = tmp.path().join("coop");
    ok(&adapt(
        &manifest,
        "coop",
        "2",
        &out,
        &["--hparams", r#"{"epochs": 2, "n_ctx": 4}"#],
    ));
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapt.json")).unwrap()).unwrap();
    assert_eq!(card["method"], "coop");
    assert_eq!(card["hyperparameters"]["n_ctx"], 4);
    assert_eq!(card["protocol"]["shots"], 2);
    // predict runs the learned prompts through the model: same probabilities.
    predict_reproduces_first_evaluated_image(&out);
}

#[test]
fn adapt_fine_tunes_the_encoders_with_lora_and_predict_reapplies_it() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = phantoms(tmp.path(), 80);
    let out = tmp.path().join("lora");
    let stdout = ok(&adapt(
        &manifest,
        "lora",
        "2",
        &out,
        &["--hparams", r#"{"iterations_per_shot": 5, "lr": 0.001}"#],
    ));
    assert!(stdout.contains("adapted lora"), "{stdout}");
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapt.json")).unwrap()).unwrap();
    assert_eq!(card["method"], "lora");
    // The paper's adapter settings, with the overrides.
    assert_eq!(card["hyperparameters"]["rank"], 2);
    assert_eq!(card["hyperparameters"]["iterations_per_shot"], 5);
    // The artefact holds the adapters (PEFT names) and the tuned class weights, not the model.
    let saved = candle_core::safetensors::load(
        out.join("classifier.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(saved.contains_key("class_weights"));
    assert!(saved.keys().any(|k| k.ends_with("q_proj.lora_A.weight")));
    assert!(saved
        .keys()
        .all(|k| k == "class_weights" || k.contains(".lora_A.") || k.contains(".lora_B.")));
    // predict puts the adapters onto the base model: same probabilities as the evaluation.
    let expect = predict_reproduces_first_evaluated_image(&out);
    // The adapters changed the model: the probabilities differ from zero-shot's.
    let zs = tmp.path().join("zs");
    ok(&adapt(&manifest, "zero-shot", "2", &zs, &[]));
    let (_, zrows) = parse_csv(&std::fs::read_to_string(zs.join("eval_predictions.csv")).unwrap());
    let diff = zrows[0]
        .1
        .iter()
        .zip(&expect)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f64, f64::max);
    assert!(diff > 1e-4, "LoRA left the probabilities unchanged");
}

#[test]
fn bench_fewshot_runs_prompt_learning_and_fine_tuning_like_adapt() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = phantoms(tmp.path(), 80);
    let json = tmp.path().join("enc.json");
    let stdout = ok(&bin()
        .args(["bench", "fewshot", "--model"])
        .arg(model())
        .arg("--data")
        .arg(&manifest)
        .args([
            "--label-field",
            "modality",
            "--methods",
            "zero-shot,coop,lora",
        ])
        .args(["--shots", "1", "--seeds", "4", "--json"])
        .arg(&json)
        .args(["--hparams", r#"coop={"epochs": 2, "n_ctx": 4}"#])
        .args([
            "--hparams",
            r#"lora={"iterations_per_shot": 5, "lr": 0.001}"#,
        ])
        .output()
        .unwrap());
    for m in ["zero-shot", "coop", "lora"] {
        assert!(stdout.contains(&format!("| {m} |")), "{stdout}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let records = v["records"].as_array().unwrap();
    assert_eq!(records.len(), 3 * 4);
    for r in records {
        assert_eq!(r["support_size"], 4);
        assert!(r["metrics"]["conformal"]["report"]["coverage"]
            .as_f64()
            .is_some());
    }
    // The bench's LoRA fit at seed 3 is the same fit as `medvlm adapt --seed 3`: same
    // support draw, same training, same test metrics.
    let bench = records
        .iter()
        .find(|r| r["method"] == "lora" && r["protocol"]["seed"] == 3)
        .unwrap();
    let out = tmp.path().join("lora");
    ok(&adapt(
        &manifest,
        "lora",
        "1",
        &out,
        &["--hparams", r#"{"iterations_per_shot": 5, "lr": 0.001}"#],
    ));
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapt.json")).unwrap()).unwrap();
    for key in ["accuracy", "balanced_accuracy", "macro_f1", "ece"] {
        let (a, b) = (
            card["metrics"][key].as_f64().unwrap(),
            bench["metrics"][key].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 1e-9, "{key}: adapt {a} vs bench {b}");
    }
}
