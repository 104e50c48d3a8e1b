//! `medvlm anomaly fit`, `eval` and `predict` on a tiny phantom set (32 px, brain MRI and
//! dermoscopy, a third of the studies normal) with the tiny CLIP fixture model (random
//! weights): the detector folder is written with a memory and a threshold per modality, the
//! evaluation table holds the method and both baselines for each modality, predictions write
//! maps, overlays and a score CSV, and bad input fails with the reason.

use std::path::{Path, PathBuf};

mod common;
use common::{arg, bin, fails, model, ok, run};

fn phantoms(dir: &Path) -> PathBuf {
    let out = dir.join("ph");
    ok(&bin()
        .args([
            "phantoms",
            "generate",
            "--n",
            "48",
            "--seed",
            "5",
            "--normal-fraction",
            "0.4",
            "--modalities",
            "dermoscopy,brain_mri",
            "--size",
            "32",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap());
    out
}

/// `medvlm anomaly fit` on the phantoms' manifest, 3 shots, FPR 0.2, with `extra` arguments;
/// its standard output.
fn fit(ph: &Path, det: &Path, extra: &[&str]) -> String {
    let model = model();
    let manifest = ph.join("manifest.jsonl");
    let mut args = vec![
        "anomaly",
        "fit",
        "--model",
        arg(&model),
        "--manifest",
        arg(&manifest),
        "--shots",
        "3",
        "--fpr",
        "0.2",
        "--out",
        arg(det),
    ];
    args.extend_from_slice(extra);
    ok(&run(&args))
}

#[test]
fn anomaly_fit_then_eval_and_predict() {
    let tmp = tempfile::tempdir().unwrap();
    let ph = phantoms(tmp.path());
    let det = tmp.path().join("det");
    let fit_out = fit(&ph, &det, &[]);
    assert!(
        fit_out.contains("brain_mri: memory of 3 normal image(s)"),
        "{fit_out}"
    );
    assert!(
        fit_out.contains("dermoscopy: memory of 3 normal image(s)"),
        "{fit_out}"
    );
    let card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(det.join("anomaly.json")).unwrap()).unwrap();
    assert_eq!(card["format"], "medvlm-anomaly/1");
    assert_eq!(card["modalities"].as_array().unwrap().len(), 2);
    assert!(det.join("memory.safetensors").is_file());

    let json = tmp.path().join("eval.json");
    let table = ok(&run(&[
        "anomaly",
        "eval",
        "--detector",
        arg(&det),
        "--manifest",
        arg(&ph.join("manifest.jsonl")),
        "--json",
        arg(&json),
    ]));
    assert!(
        table.contains("| brain_mri |") && table.contains("| dermoscopy |"),
        "{table}"
    );
    let e: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    for m in e["modalities"].as_array().unwrap() {
        let n = m["n_normal"].as_u64().unwrap() + m["n_anomalous"].as_u64().unwrap();
        assert_eq!(n, 24, "{m}");
        assert!(m["n_normal"].as_u64().unwrap() > 3, "{m}");
        for key in ["false_positive_rate", "true_positive_rate"] {
            let v = m[key].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{key} {v}");
        }
        assert!(m["memory"]["image_auroc"].is_number(), "{m}");
        // The CLIP fixture projects its patch tokens: the zero-shot branch is evaluated too.
        assert!(m["zero_shot"]["image_auroc"].is_number(), "{m}");
        // ... and encodes windows: WinCLIP's windows, the window memory and WinCLIP+.
        // The window memory went through save and load (eval reads the saved detector).
        for key in ["zero_shot_windows", "window_memory", "winclip_plus"] {
            for metric in ["image_auroc", "pixel_auroc", "aupro"] {
                let v = m[key][metric].as_f64().unwrap_or(-1.0);
                assert!((0.0..=1.0).contains(&v), "{key}.{metric}: {m}");
            }
        }
    }
    assert!(table.contains("WinCLIP (zero-shot windows"), "{table}");
    assert_eq!(
        card["options"]["windows"]["scales"],
        serde_json::json!([2, 3])
    );

    // Predict on two brain MRI images: maps, overlays, scores.
    let man = std::fs::read_to_string(ph.join("manifest.jsonl")).unwrap();
    let brains: Vec<PathBuf> = man
        .lines()
        .filter(|l| l.contains("\"modality\":\"brain_mri\""))
        .take(2)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            ph.join(v["image"].as_str().unwrap())
        })
        .collect();
    let out = tmp.path().join("pred");
    let csv = ok(&run(&[
        "anomaly",
        "predict",
        "--detector",
        arg(&det),
        "--modality",
        "brain_mri",
        arg(&brains[0]),
        arg(&brains[1]),
        "--out",
        arg(&out),
    ]));
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert!(csv.lines().skip(1).all(|l| l.ends_with(",memory")), "{csv}");
    for b in &brains {
        let stem = b.file_stem().unwrap().to_string_lossy().to_string();
        assert!(out.join(format!("{stem}_anomaly.png")).is_file());
        assert!(out.join(format!("{stem}_overlay.png")).is_file());
    }
    assert!(out.join("scores.csv").is_file());

    // A NIfTI volume of three copies of the first image is scored slice by slice: its score
    // is the one-slice NIfTI's, and the map volume has the input's shape.
    let plane = medvlm_io::load_any(&brains[0])
        .unwrap()
        .plane(&medvlm_io::PlaneSelect::default())
        .unwrap();
    let (h, w) = (plane.rows, plane.cols);
    let grey: Vec<f32> = plane
        .data
        .chunks(plane.channels)
        .map(|px| px.iter().sum::<f32>() / px.len() as f32)
        .collect();
    let affine = medvlm_io::volume::affine_from_spacing([1.0, 1.0, 3.0]);
    let one = tmp.path().join("one.nii.gz");
    medvlm_io::volume::write_nifti1(&one, &grey, &[h, w, 1], &affine).unwrap();
    let mut vol = vec![0f32; h * w * 3];
    for (i, g) in grey.iter().enumerate() {
        for z in 0..3 {
            vol[i * 3 + z] = *g;
        }
    }
    let stack = tmp.path().join("stack.nii.gz");
    medvlm_io::volume::write_nifti1(&stack, &vol, &[h, w, 3], &affine).unwrap();
    let vout = tmp.path().join("vol");
    let csv = ok(&run(&[
        "anomaly",
        "predict",
        "--detector",
        arg(&det),
        "--modality",
        "brain_mri",
        arg(&one),
        arg(&stack),
        "--out",
        arg(&vout),
    ]));
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), 2, "{csv}");
    assert_eq!(rows[0][1], rows[1][1], "slice scores differ: {csv}");
    assert_eq!(rows[1][6], "0", "{csv}");
    let map = medvlm_io::load_any(std::path::Path::new(rows[1][5])).unwrap();
    assert_eq!(map.shape[..3], [h, w, 3], "{csv}");
    assert!(vout.join("stack_anomaly.png").is_file());

    // Two modalities and no --modality: the error says so.
    let err = fails(
        &bin()
            .args(["anomaly", "predict", "--detector"])
            .arg(&det)
            .arg(&brains[0])
            .arg("--out")
            .arg(tmp.path().join("x"))
            .output()
            .unwrap(),
    );
    assert!(err.contains("pass --modality"), "{err}");
    // More shots than normal images: refused, naming the modality.
    let err = fails(
        &bin()
            .args(["anomaly", "fit", "--shots", "500", "--model"])
            .arg(model())
            .arg("--manifest")
            .arg(ph.join("manifest.jsonl"))
            .arg("--out")
            .arg(tmp.path().join("y"))
            .output()
            .unwrap(),
    );
    assert!(err.contains("fewer than the 500 shots"), "{err}");
    // Deciding with the window memory: the fit says so with its threshold, predict writes
    // its maps; an unknown method is refused.
    let detw = tmp.path().join("detw");
    let out = fit(
        &ph,
        &detw,
        &["--decide-with", "window-memory", "--weak-steps", "20"],
    );
    assert!(
        out.contains("brain_mri: decides with the window memory, threshold"),
        "{out}"
    );
    assert!(
        out.contains("brain_mri: weak window scorer trained from image labels on 24 images"),
        "{out}"
    );
    let csv = ok(&run(&[
        "anomaly",
        "predict",
        "--detector",
        arg(&detw),
        "--modality",
        "brain_mri",
        arg(&brains[0]),
        "--out",
        arg(&tmp.path().join("predw")),
    ]));
    assert_eq!(csv.lines().count(), 2, "{csv}");
    assert!(csv.lines().next().unwrap().ends_with(",method"), "{csv}");
    assert!(
        csv.lines().nth(1).unwrap().ends_with(",window-memory"),
        "{csv}"
    );
    // The weak window scorer is evaluated from the saved detector.
    let table = ok(&run(&[
        "anomaly",
        "eval",
        "--detector",
        arg(&detw),
        "--manifest",
        arg(&ph.join("manifest.jsonl")),
    ]));
    assert!(table.contains("Weakly supervised window scorer"), "{table}");
    let err = fails(
        &bin()
            .args(["anomaly", "fit", "--decide-with", "best", "--model"])
            .arg(model())
            .arg("--manifest")
            .arg(ph.join("manifest.jsonl"))
            .arg("--out")
            .arg(tmp.path().join("w"))
            .output()
            .unwrap(),
    );
    assert!(err.contains("memory or window-memory"), "{err}");
    // --no-windows: no WinCLIP branch is kept or evaluated.
    let detn = tmp.path().join("detn");
    fit(&ph, &detn, &["--no-windows"]);
    let card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(detn.join("anomaly.json")).unwrap()).unwrap();
    assert_eq!(card["options"]["windows"]["scales"], serde_json::json!([]));
    let jn = tmp.path().join("evaln.json");
    ok(&run(&[
        "anomaly",
        "eval",
        "--detector",
        arg(&detn),
        "--manifest",
        arg(&ph.join("manifest.jsonl")),
        "--json",
        arg(&jn),
    ]));
    let e: serde_json::Value = serde_json::from_slice(&std::fs::read(&jn).unwrap()).unwrap();
    for m in e["modalities"].as_array().unwrap() {
        assert!(m["memory"]["image_auroc"].is_number(), "{m}");
        assert!(m.get("zero_shot_windows").is_none(), "{m}");
        assert!(m.get("window_memory").is_none(), "{m}");
    }
    // A window larger than the 4 x 4 patch grid: refused before fitting.
    let err = fails(
        &bin()
            .args([
                "anomaly",
                "fit",
                "--shots",
                "3",
                "--window-scales",
                "2,5",
                "--model",
            ])
            .arg(model())
            .arg("--manifest")
            .arg(ph.join("manifest.jsonl"))
            .arg("--out")
            .arg(tmp.path().join("z"))
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("5 x 5 patches does not fit the 4 x 4"),
        "{err}"
    );
    assert!(!tmp.path().join("z").exists());
}

/// `--supervised-steps`: the fit says what the head trained on, the card records it, the
/// evaluation adds the supervised table, and predictions are called at its threshold.
#[test]
fn anomaly_fit_with_a_supervised_head() {
    let tmp = tempfile::tempdir().unwrap();
    let ph = phantoms(tmp.path());
    let det = tmp.path().join("det");
    let fit_out = fit(&ph, &det, &["--supervised-steps", "5"]);
    assert!(
        fit_out.contains("supervised head: 5 steps on 48 training images"),
        "{fit_out}"
    );
    let card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(det.join("anomaly.json")).unwrap()).unwrap();
    assert_eq!(card["supervised"]["head"]["steps"], 5);
    let thr = card["modalities"][0]["supervised_threshold"]["value"]
        .as_f64()
        .unwrap();
    assert!(det.join("supervised.safetensors").is_file());
    let table = ok(&run(&[
        "anomaly",
        "eval",
        "--detector",
        arg(&det),
        "--manifest",
        arg(&ph.join("manifest.jsonl")),
    ]));
    assert!(table.contains("Supervised head"), "{table}");
    let modality = card["modalities"][0]["modality"]
        .as_str()
        .unwrap()
        .to_string();
    let man = std::fs::read_to_string(ph.join("manifest.jsonl")).unwrap();
    let image = man
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["modality"] == modality.as_str())
        .map(|v| ph.join(v["image"].as_str().unwrap()))
        .unwrap();
    let out = tmp.path().join("pred");
    let csv = ok(&run(&[
        "anomaly",
        "predict",
        "--detector",
        arg(&det),
        "--modality",
        &modality,
        arg(&image),
        "--out",
        arg(&out),
    ]));
    let row: Vec<&str> = csv.lines().nth(1).unwrap().split(',').collect();
    let score: f64 = row[1].parse().unwrap();
    assert_eq!(row[2] == "true", score > thr, "{csv} (threshold {thr})");
}
