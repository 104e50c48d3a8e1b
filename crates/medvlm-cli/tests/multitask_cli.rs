//! `medvlm multitask train`, `eval`, `compare` and `predict` on a tiny phantom set (32 px,
//! chest X-ray and brain MRI) with the tiny CLIP fixture model (random weights): the model
//! folder is written, eval prints every head's scores, compare prints multi-task against
//! single-task rows, predict prints findings, a report and answers, and bad input fails with
//! the file named.

use std::path::PathBuf;

mod common;
use common::{arg, fails, model, ok, phantoms32, run};

const SMALL: [&str; 10] = [
    "--epochs",
    "2",
    "--trunk-width",
    "16",
    "--report-width",
    "16",
    "--report-layers",
    "1",
    "--report-prefix",
    "2",
];

#[test]
fn multitask_train_eval_compare_predict() {
    let tmp = tempfile::tempdir().unwrap();
    let ph = phantoms32(tmp.path(), 16, "chest_xray,brain_mri");
    let clip = model();
    let manifest = ph.join("manifest.jsonl");
    let mt = tmp.path().join("mt");
    let mut args = vec![
        "multitask",
        "train",
        "--model",
        arg(&clip),
        "--manifest",
        arg(&manifest),
        "--out",
        arg(&mt),
    ];
    args.extend(SMALL);
    let out = ok(&run(&args));
    assert!(
        out.contains("trained a multi-task model on 16 images")
            && out.contains("heads: classification, vqa, report"),
        "{out}"
    );
    for f in ["multitask.json", "multitask.safetensors", "tokenizer.json"] {
        assert!(mt.join(f).is_file(), "{f}");
    }
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(mt.join("multitask.json")).unwrap()).unwrap();
    assert_eq!(card["epoch_losses"].as_array().unwrap().len(), 2);
    assert!(card["findings"].as_array().unwrap().len() >= 2);

    let json = tmp.path().join("eval.json");
    let printed = ok(&run(&[
        "multitask",
        "eval",
        "--multitask",
        arg(&mt),
        "--manifest",
        arg(&manifest),
        "--json",
        arg(&json),
    ]));
    for m in [
        "findings macro AUROC",
        "VQA overall accuracy",
        "report CE macro F1",
    ] {
        assert!(printed.contains(m), "{printed}");
    }
    let ev: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(ev["classification"]["n"], 16);
    let acc = ev["vqa"]["overall"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));

    // compare: the report head is switched off, so one multi-task and two single-task runs.
    let cjson = tmp.path().join("cmp.json");
    let mut args = vec![
        "multitask",
        "compare",
        "--model",
        arg(&clip),
        "--train",
        arg(&manifest),
        "--eval",
        arg(&manifest),
        "--weight",
        "report=0",
        "--json",
        arg(&cjson),
    ];
    args.extend(SMALL);
    let table = ok(&run(&args));
    assert!(
        table.contains("multi-task") && table.contains("VQA closed accuracy"),
        "{table}"
    );
    assert!(!table.contains("report CE"), "{table}");
    let cmp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cjson).unwrap()).unwrap();
    let names: Vec<&str> = cmp["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "multi-task",
            "single-task classification",
            "single-task vqa"
        ]
    );

    let images: Vec<PathBuf> = std::fs::read_dir(ph.join("images"))
        .unwrap()
        .take(2)
        .map(|e| e.unwrap().path())
        .collect();
    let mut args = vec![
        "multitask",
        "predict",
        "--multitask",
        arg(&mt),
        "--question",
        "Is this study normal?",
    ];
    args.extend(images.iter().map(|p| arg(p)));
    let printed = ok(&run(&args));
    assert_eq!(printed.matches("  findings: ").count(), 2, "{printed}");
    assert_eq!(printed.matches("  report: ").count(), 2, "{printed}");
    assert_eq!(
        printed.matches("  Q: Is this study normal?  A: ").count(),
        2,
        "{printed}"
    );

    // Bad input is named: a missing image, a bad weight in a config file, an empty manifest.
    let err = fails(&run(&[
        "multitask",
        "predict",
        "--multitask",
        arg(&mt),
        "nowhere.png",
    ]));
    assert!(err.contains("nowhere.png"), "{err}");
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(&cfg, "[weights]\nvqa = -1\n").unwrap();
    let err = fails(&run(&[
        "multitask",
        "train",
        "--model",
        arg(&clip),
        "--manifest",
        arg(&manifest),
        "--out",
        arg(&tmp.path().join("m2")),
        "--config",
        arg(&cfg),
    ]));
    assert!(
        err.contains("bad.toml") && err.contains("vqa loss weight"),
        "{err}"
    );
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let err = fails(&run(&[
        "multitask",
        "train",
        "--model",
        arg(&clip),
        "--manifest",
        arg(&empty),
        "--out",
        arg(&tmp.path().join("m3")),
    ]));
    assert!(err.contains("empty.jsonl"), "{err}");
}
