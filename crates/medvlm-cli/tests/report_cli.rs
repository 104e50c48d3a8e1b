//! `medvlm report train`, `eval` and `generate` on a tiny phantom set (32 px, dermoscopy and
//! brain MRI) with the tiny CLIP fixture model (random weights): the generator folder is
//! written, the evaluation table and JSON hold the generator and the baseline per modality,
//! `generate` prints one report per image, and bad input fails with the file named.

use std::path::{Path, PathBuf};

mod common;
use common::{arg, fails, model, ok, phantoms32, run};

fn phantoms(dir: &Path) -> PathBuf {
    phantoms32(dir, 24, "dermoscopy,brain_mri")
}

#[test]
fn report_train_then_eval_and_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let ph = phantoms(tmp.path());
    let gen = tmp.path().join("gen");
    let out = ok(&run(&[
        "report",
        "train",
        "--model",
        arg(&model()),
        "--manifest",
        arg(&ph.join("manifest.jsonl")),
        "--out",
        arg(&gen),
        "--epochs",
        "2",
        "--width",
        "16",
        "--layers",
        "1",
        "--prefix",
        "2",
    ]));
    assert!(
        out.contains("trained a report generator on 24 reports"),
        "{out}"
    );
    for f in [
        "report_model.json",
        "generator.safetensors",
        "tokenizer.json",
        "train_embeddings.safetensors",
        "train_reports.json",
        // The diagnosis prompt's findings classifier, on by default.
        "findings.safetensors",
    ] {
        assert!(gen.join(f).is_file(), "{f}");
    }
    let json = tmp.path().join("eval.json");
    let table = ok(&run(&[
        "report",
        "eval",
        "--generator",
        arg(&gen),
        "--manifest",
        arg(&ph.join("manifest.jsonl")),
        "--json",
        arg(&json),
    ]));
    assert!(
        table.contains("nearest neighbour") && table.contains("brain_mri"),
        "{table}"
    );
    let ev: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(ev["n"], 24);
    // The baseline's nearest training image of a training image is itself.
    assert_eq!(ev["nearest_neighbour"]["clinical"]["micro"]["f1"], 1.0);
    let images: Vec<PathBuf> = std::fs::read_dir(ph.join("images"))
        .unwrap()
        .take(2)
        .map(|e| e.unwrap().path())
        .collect();
    let mut args = vec![
        "report",
        "generate",
        "--generator",
        arg(&gen),
        "--beams",
        "2",
    ];
    args.extend(images.iter().map(|p| arg(p)));
    let printed = ok(&run(&args));
    assert_eq!(printed.lines().count(), 2, "{printed}");
    assert!(printed.starts_with(arg(&images[0])), "{printed}");

    // A missing image and a manifest without reports are named.
    let err = fails(&run(&[
        "report",
        "generate",
        "--generator",
        arg(&gen),
        "nowhere.png",
    ]));
    assert!(err.contains("nowhere.png"), "{err}");
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"image\": \"x.png\"}\n").unwrap();
    let err = fails(&run(&[
        "report",
        "train",
        "--model",
        arg(&model()),
        "--manifest",
        arg(&bad),
        "--out",
        arg(&tmp.path().join("g2")),
    ]));
    assert!(
        err.contains("bad.jsonl") && err.contains("no report text"),
        "{err}"
    );
}

/// The diagnosis prompt: off with `--no-diagnosis-prompt` (no classifier written), and a
/// lexicon whose findings no training report states is refused rather than training a
/// prompt that always says "absent".
#[test]
fn report_train_diagnosis_prompt_options() {
    let tmp = tempfile::tempdir().unwrap();
    let ph = phantoms(tmp.path());
    let base = |out: &Path| -> Vec<String> {
        [
            "report",
            "train",
            "--model",
            arg(&model()),
            "--manifest",
            arg(&ph.join("manifest.jsonl")),
            "--out",
            arg(out),
            "--epochs",
            "1",
            "--width",
            "16",
            "--layers",
            "1",
            "--prefix",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let plain = tmp.path().join("plain");
    let mut args = base(&plain);
    args.push("--no-diagnosis-prompt".into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&run(&refs));
    assert!(plain.join("generator.safetensors").is_file());
    assert!(!plain.join("findings.safetensors").exists());

    let lexicon = tmp.path().join("lexicon.json");
    std::fs::write(
        &lexicon,
        r#"{"findings": [{"label": "fracture", "match_terms": ["fracture"]}]}"#,
    )
    .unwrap();
    let out = tmp.path().join("fracture");
    let mut args = base(&out);
    args.extend(["--lexicon".into(), arg(&lexicon).to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = fails(&run(&refs));
    assert!(
        err.contains("fracture") && err.contains("finds no finding stated"),
        "{err}"
    );
    assert!(!out.exists());

    let mut args = base(&out);
    args.extend([
        "--no-diagnosis-prompt".into(),
        "--lexicon".into(),
        arg(&lexicon).to_string(),
    ]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = fails(&run(&refs));
    assert!(err.contains("cannot be used with"), "{err}");
}
