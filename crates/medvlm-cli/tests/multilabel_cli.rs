//! Multi-label tasks (`--label-field labels`) through `medvlm adapt`,
//! `medvlm predict` and `medvlm bench fewshot`, on a small histology phantom
//! set with up to three findings per study (stroma, tumour, lymphocytes, or
//! `normal`) and the tiny CLIP fixture model (random weights). Every metric
//! checked here is recomputed from the manifest and the written predictions,
//! the conformal false-negative-rate control included (its `lambda_hat` from
//! the calibration images' probabilities that `medvlm predict` writes).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{bin, fails, model, ok};

/// A histology phantom set with up to 3 findings per study; returns its manifest.
fn phantoms(dir: &Path) -> PathBuf {
    let out = dir.join("ph");
    ok(&bin()
        .args([
            "phantoms",
            "generate",
            "--n",
            "80",
            "--seed",
            "7",
            "--max-findings",
            "3",
            "--modalities",
            "histology",
            "--size",
            "64",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap());
    out.join("manifest.jsonl")
}

/// One manifest record: absolute image path, split, labels.
struct Truth {
    split: String,
    labels: BTreeSet<String>,
}

fn truth(manifest: &Path) -> HashMap<String, Truth> {
    let root = manifest.parent().unwrap();
    std::fs::read_to_string(manifest)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let labels = v["labels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_string())
                .collect();
            (
                root.join(v["image"].as_str().unwrap())
                    .display()
                    .to_string(),
                Truth {
                    split: v["split"].as_str().unwrap().to_string(),
                    labels,
                },
            )
        })
        .collect()
}

/// (image, per-label probabilities, predicted label set) rows of
/// `image,<label>...,predicted_labels`, with the header's labels.
type Row = (String, Vec<f64>, String);

fn parse_csv(text: &str) -> (Vec<String>, Vec<Row>) {
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(String::from).collect();
    assert_eq!(header.first().map(String::as_str), Some("image"));
    assert_eq!(header.last().map(String::as_str), Some("predicted_labels"));
    let labels = header[1..header.len() - 1].to_vec();
    let rows = lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f.len(), labels.len() + 2, "{l}");
            let probs = f[1..f.len() - 1]
                .iter()
                .map(|x| x.parse().unwrap())
                .collect();
            (f[0].to_string(), probs, f[f.len() - 1].to_string())
        })
        .collect();
    (labels, rows)
}

/// Mann-Whitney AUROC (ties count one half), written independently of medvlm-eval.
fn auroc(scores: &[f64], positive: &[bool]) -> f64 {
    let (mut wins, mut pairs) = (0.0, 0.0);
    for (i, &si) in scores.iter().enumerate() {
        for (j, &sj) in scores.iter().enumerate() {
            if positive[i] && !positive[j] {
                pairs += 1.0;
                wins += if si > sj {
                    1.0
                } else if si == sj {
                    0.5
                } else {
                    0.0
                };
            }
        }
    }
    wins / pairs
}

fn adapt(manifest: &Path, method: &str, out: &Path, extra: &[&str]) -> Output {
    bin()
        .args(["adapt", "--method", method, "--shots", "2", "--seed", "1"])
        .arg("--model")
        .arg(model())
        .arg("--train")
        .arg(manifest)
        .arg("--out")
        .arg(out)
        .args(["--label-field", "labels"])
        .args(extra)
        .output()
        .unwrap()
}

/// Conformal risk control of the false-negative rate, written independently of
/// medvlm-eval: the largest threshold `t` among the calibration probabilities
/// (and 1) with `(sum_i L_i(t) + 1) / (n + 1) <= alpha`, `L_i` the share of
/// example i's positives with probability below `t` (0 without positives);
/// `None` when no threshold qualifies.
fn fnr_threshold(probs: &[Vec<f64>], targets: &[Vec<bool>], alpha: f64) -> Option<f64> {
    let n = probs.len() as f64;
    let loss_sum = |t: f64| -> f64 {
        probs
            .iter()
            .zip(targets)
            .map(|(p, y)| {
                let pos = y.iter().filter(|&&v| v).count();
                let missed = p.iter().zip(y).filter(|&(&q, &v)| v && q < t).count();
                if pos == 0 {
                    0.0
                } else {
                    missed as f64 / pos as f64
                }
            })
            .sum()
    };
    let mut candidates: Vec<f64> = probs.iter().flatten().copied().collect();
    candidates.push(1.0);
    candidates
        .into_iter()
        .filter(|&t| (loss_sum(t) + 1.0) / (n + 1.0) <= alpha)
        .max_by(f64::total_cmp)
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn multilabel_adapt_card_metrics_and_predict() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = phantoms(tmp.path());
    let truth = truth(&manifest);
    // Expected classes: every finding of the train split, `normal` excluded.
    let expected_classes: Vec<String> = truth
        .values()
        .filter(|t| t.split == "train")
        .flat_map(|t| t.labels.iter().cloned())
        .filter(|l| l != "normal")
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert!(expected_classes.len() >= 2, "{expected_classes:?}");
    let has_normal = truth.values().any(|t| t.labels.contains("normal"));
    assert!(has_normal, "the phantom set should contain normal studies");

    for method in [
        "linear-probe",
        "zero-shot-pairs",
        "tip-adapter",
        "tip-adapter-f",
        "clip-adapter",
    ] {
        let out = tmp.path().join(method);
        let stdout = ok(&adapt(
            &manifest,
            method,
            &out,
            &["--conformal-alpha", "0.2"],
        ));
        assert!(stdout.contains("macro AUROC"), "{stdout}");
        assert!(
            stdout.contains("conformal risk control of the false-negative rate"),
            "{stdout}"
        );
        assert!(out.join("eval_predictions.csv").is_file());
        assert!(
            !out.join("reliability.png").exists(),
            "no reliability diagram for multi-label"
        );

        let card = read_json(&out.join("adapt.json"));
        assert_eq!(card["task"], "multi-label", "{method}");
        assert_eq!(card["protocol"]["task"], "multi-label");
        assert_eq!(card["protocol"]["shots"], 2);
        assert!(card["protocol_description"]
            .as_str()
            .unwrap()
            .contains("greedy multi-label sampler"));
        let classes: Vec<String> = serde_json::from_value(card["class_names"].clone()).unwrap();
        assert_eq!(classes, expected_classes, "{method}");
        assert!(!classes.iter().any(|c| c == "normal"));
        assert!(card["metrics"].is_null(), "no multi-class metrics");
        assert!(card["notes"][0].as_str().unwrap().contains("conformal"));
        let clf = read_json(&out.join("classifier.json"));
        assert_eq!(clf["task"], "multi-label");

        // Support set: at least K = 2 positives of every class, labels true to the manifest.
        let support: Vec<(String, String)> =
            serde_json::from_value(card["support"].clone()).unwrap();
        for c in &classes {
            let n = support
                .iter()
                .filter(|(_, l)| l.split(';').any(|x| x == c))
                .count();
            assert!(n >= 2, "{method}: class {c} has {n} support positives");
        }
        for (p, l) in &support {
            let t = &truth[p];
            assert_eq!(t.split, "train");
            let got: BTreeSet<String> = l.split(';').map(String::from).collect();
            assert_eq!(got, t.labels, "support labels of {p}");
        }

        // Metrics recomputed from the written predictions and the manifest.
        let (csv_classes, rows) =
            parse_csv(&std::fs::read_to_string(out.join("eval_predictions.csv")).unwrap());
        assert_eq!(csv_classes, classes);
        let mx = &card["multilabel_metrics"];
        let test: Vec<&Truth> = truth.values().filter(|t| t.split == "test").collect();
        assert_eq!(mx["n"].as_u64().unwrap() as usize, test.len());
        assert_eq!(rows.len(), test.len());
        assert_eq!(
            mx["n_without_findings"].as_u64().unwrap() as usize,
            test.iter().filter(|t| t.labels.contains("normal")).count()
        );
        let mut sum = 0.0;
        for (j, c) in classes.iter().enumerate() {
            let positive: Vec<bool> = rows
                .iter()
                .map(|(p, _, _)| truth[p].labels.contains(c))
                .collect();
            let n_pos = positive.iter().filter(|&&x| x).count();
            assert_eq!(mx["positives"][c].as_u64().unwrap() as usize, n_pos, "{c}");
            assert!(
                n_pos > 0 && n_pos < rows.len(),
                "test split must have positives and negatives of {c} for this test"
            );
            let v = mx["per_class_auroc"][c]
                .as_f64()
                .unwrap_or_else(|| panic!("{method}: no AUROC for {c}: {mx}"));
            assert!((0.0..=1.0).contains(&v), "{c}: {v}");
            let scores: Vec<f64> = rows.iter().map(|(_, s, _)| s[j]).collect();
            let expect = auroc(&scores, &positive);
            // The CSV rounds to 6 decimals, which can only break exact ties.
            assert!((v - expect).abs() < 0.05, "{method} {c}: {v} vs {expect}");
            let ap = mx["per_class_average_precision"][c].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&ap));
            assert!(mx["per_class_f1"][c].as_f64().is_some());
            sum += v;
        }
        let macro_auroc = mx["macro_auroc"].as_f64().unwrap();
        assert!((macro_auroc - sum / classes.len() as f64).abs() < 1e-9);
        assert_eq!(mx["undefined_classes"].as_array().unwrap().len(), 0);
        assert!(mx["conformal"]
            .as_str()
            .unwrap()
            .contains("conformal risk control of the false-negative rate"));
        // The predicted label sets are the labels at probability >= 0.5.
        for (p, probs, predicted) in &rows {
            let on: Vec<&str> = classes
                .iter()
                .zip(probs)
                .filter(|(_, &q)| q >= 0.5)
                .map(|(c, _)| c.as_str())
                .collect();
            let expect = if on.is_empty() {
                "normal".to_string()
            } else {
                on.join(";")
            };
            assert_eq!(predicted, &expect, "{p}");
        }

        // Conformal FNR control: the report agrees with the written test probabilities.
        let cf = &mx["conformal_fnr_control"];
        assert_eq!(cf["calibration_source"], "split 'val'", "{cf}");
        let r = &cf["report"];
        assert_eq!(r["target_alpha"].as_f64(), Some(0.2));
        let threshold = r["threshold"].as_f64().unwrap();
        let lambda_hat = r["lambda_hat"].as_f64().unwrap();
        assert!((threshold + lambda_hat - 1.0).abs() < 1e-6, "{r}");
        let val: Vec<&String> = truth
            .iter()
            .filter(|(_, t)| t.split == "val")
            .map(|(p, _)| p)
            .collect();
        assert_eq!(r["n_calibration"].as_u64().unwrap() as usize, val.len());
        assert_eq!(
            r["n_calibration_without_positives"].as_u64().unwrap() as usize,
            val.iter()
                .filter(|p| truth[p.as_str()].labels.contains("normal"))
                .count()
        );
        assert_eq!(r["calibration_too_small"], false);
        let (mut fnr_sum, mut size_sum, mut empty, mut near) = (0.0, 0usize, 0usize, 0usize);
        let mut hits = vec![0usize; classes.len()];
        for (p, probs, _) in rows.iter() {
            let y: Vec<bool> = classes
                .iter()
                .map(|c| truth[p].labels.contains(c))
                .collect();
            // The CSV rounds to 6 decimals: a probability that close to the
            // threshold may fall on either side.
            near += probs
                .iter()
                .filter(|&&q| (q - threshold).abs() < 1e-6)
                .count();
            let inside: Vec<bool> = probs.iter().map(|&q| q >= threshold).collect();
            let size = inside.iter().filter(|&&v| v).count();
            size_sum += size;
            empty += usize::from(size == 0);
            let pos = y.iter().filter(|&&v| v).count();
            let found = inside.iter().zip(&y).filter(|&(&i, &v)| i && v).count();
            if pos > 0 {
                fnr_sum += 1.0 - found as f64 / pos as f64;
            }
            for (j, (&i, &v)) in inside.iter().zip(&y).enumerate() {
                hits[j] += usize::from(i && v);
            }
        }
        let n = rows.len() as f64;
        let fnr = r["fnr"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&fnr));
        let slack = near as f64 / n;
        assert!((fnr - fnr_sum / n).abs() <= slack + 1e-9, "{method}: {r}");
        assert!(
            (r["mean_set_size"].as_f64().unwrap() - size_sum as f64 / n).abs() <= slack + 1e-9,
            "{method}: {r}"
        );
        assert!(
            (r["empty_set_fraction"].as_f64().unwrap() - empty as f64 / n).abs() <= slack + 1e-9
        );
        for (j, c) in classes.iter().enumerate() {
            let n_pos = mx["positives"][c].as_u64().unwrap() as f64;
            let got = cf["per_class_coverage"][c].as_f64().unwrap();
            assert!((got - hits[j] as f64 / n_pos).abs() <= near as f64 / n_pos + 1e-9);
            assert_eq!(r["per_label_coverage"][j].as_f64(), Some(got));
        }
        // lambda_hat recomputed from the calibration images' probabilities.
        let res = bin()
            .arg("predict")
            .arg("--adapted")
            .arg(&out)
            .args(&val)
            .output()
            .unwrap();
        let (_, cal_rows) = parse_csv(&ok(&res));
        let cal_probs: Vec<Vec<f64>> = cal_rows.iter().map(|(_, q, _)| q.clone()).collect();
        let cal_targets: Vec<Vec<bool>> = cal_rows
            .iter()
            .map(|(p, _, _)| {
                classes
                    .iter()
                    .map(|c| truth[p].labels.contains(c))
                    .collect()
            })
            .collect();
        let expect = fnr_threshold(&cal_probs, &cal_targets, 0.2).unwrap();
        assert!(
            (threshold - expect).abs() < 1e-5,
            "{method}: threshold {threshold}, recomputed {expect}"
        );

        // predict: one independent probability per label, as in adapt's evaluation.
        let images: Vec<&str> = rows.iter().map(|(p, _, _)| p.as_str()).collect();
        let res = bin()
            .arg("predict")
            .arg("--adapted")
            .arg(&out)
            .args(&images)
            .output()
            .unwrap();
        let stdout = ok(&res);
        assert!(String::from_utf8_lossy(&res.stderr).contains("sigmoid"));
        let (pred_classes, predicted) = parse_csv(&stdout);
        assert_eq!(pred_classes, classes);
        assert_eq!(predicted.len(), rows.len());
        let mut far_from_one = 0;
        for ((p, probs, set), (q, expect, set_expect)) in predicted.iter().zip(&rows) {
            assert_eq!(p, q);
            assert_eq!(set, set_expect);
            assert_eq!(probs.len(), classes.len());
            for (a, b) in probs.iter().zip(expect) {
                assert!((0.0..=1.0).contains(a));
                assert!((a - b).abs() <= 2e-6, "{method} {p}: {a} vs {b}");
            }
            if (probs.iter().sum::<f64>() - 1.0).abs() > 1e-3 {
                far_from_one += 1;
            }
        }
        assert!(
            far_from_one > 0,
            "{method}: every row sums to 1, a softmax rather than per-label sigmoids"
        );
    }
    // zero-shot-pairs records its negative prompts.
    let card = read_json(&tmp.path().join("zero-shot-pairs/adapt.json"));
    assert_eq!(
        card["negative_prompts"][0][1][0],
        format!(
            "a medical image with no {}",
            expected_classes[0].replace('_', " ")
        )
    );
}

#[test]
fn multilabel_errors_and_skipped_records_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = phantoms(tmp.path());
    // Multi-class-only methods are refused, naming the methods that work.
    for method in ["taskres", "zero-shot"] {
        let err = fails(&adapt(&manifest, method, &tmp.path().join("x"), &[]));
        assert!(err.contains(&format!("'{method}'")), "{err}");
        assert!(
            err.contains("zero-shot-pairs, linear-probe, tip-adapter, tip-adapter-f, clip-adapter"),
            "{err}"
        );
        assert!(!tmp.path().join("x").exists());
    }
    // `normal` cannot be a class.
    let err = fails(&adapt(
        &manifest,
        "linear-probe",
        &tmp.path().join("x"),
        &["--classes", "normal;stroma"],
    ));
    assert!(err.contains("'normal' cannot be a class"), "{err}");
    // Realistic sampling is multi-class only.
    let err = fails(&adapt(
        &manifest,
        "linear-probe",
        &tmp.path().join("x"),
        &["--mode", "realistic"],
    ));
    assert!(err.contains("--mode realistic"), "{err}");
    // zero-shot-pairs on a multi-class task is a clear error too.
    let err = fails(
        &bin()
            .args(["adapt", "--method", "zero-shot-pairs", "--shots", "1"])
            .arg("--model")
            .arg(model())
            .arg("--train")
            .arg(&manifest)
            .arg("--out")
            .arg(tmp.path().join("x"))
            .output()
            .unwrap(),
    );
    assert!(err.contains("--label-field labels"), "{err}");

    // Records with no labels, or `normal` plus a finding, are counted, not used.
    let text = std::fs::read_to_string(&manifest).unwrap();
    let mut lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let train: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i]["split"] == "train")
        .collect();
    lines[train[0]]["labels"] = serde_json::json!([]);
    lines[train[1]]["labels"] = serde_json::json!(["normal", "stroma"]);
    lines[train[2]]["labels"] = serde_json::json!(["stroma", "mitosis"]);
    let edited = manifest.with_file_name("edited.jsonl");
    let body: Vec<String> = lines.iter().map(|v| v.to_string()).collect();
    std::fs::write(&edited, body.join("\n") + "\n").unwrap();
    let res = adapt(
        &edited,
        "linear-probe",
        &tmp.path().join("lp"),
        &["--classes", "lymphocytes;stroma;tumour"],
    );
    ok(&res);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        stderr.contains("1 record(s) with an empty 'labels' list and 1 labelled both 'normal'"),
        "{stderr}"
    );
    assert!(
        stderr.contains("1 record(s) carry label(s) outside the 3 classes (mitosis)"),
        "{stderr}"
    );
}

#[test]
fn multilabel_bench_fewshot_runs_capable_methods_and_lists_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = phantoms(tmp.path());
    let json = tmp.path().join("bench.json");
    let res = bin()
        .args(["bench", "fewshot", "--model"])
        .arg(model())
        .arg("--data")
        .arg(&manifest)
        .args([
            "--label-field",
            "labels",
            "--methods",
            "all",
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
    assert!(
        stdout.contains("| method (macro AUROC, %) | K=1 | K=2 |"),
        "{stdout}"
    );
    let capable = [
        "zero-shot-pairs",
        "linear-probe",
        "tip-adapter",
        "tip-adapter-f",
        "clip-adapter",
    ];
    for m in capable {
        assert!(stdout.contains(&format!("| {m} |")), "{stdout}");
    }
    assert!(stdout.contains("skipped taskres: "), "{stdout}");
    assert!(
        stdout.contains("| method (conformal test FNR at alpha 0.1, %) | K=1 | K=2 |"),
        "{stdout}"
    );
    assert!(
        stdout.contains("| method (conformal mean set size) | K=1 | K=2 |"),
        "{stdout}"
    );

    let v = read_json(&json);
    assert_eq!(v["task"], "multi-label");
    assert!(v["accuracy_table"].is_null());
    let skipped: BTreeMap<String, String> = v["skipped_methods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["method"].as_str().unwrap().to_string(),
                s["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for m in ["zero-shot", "taskres", "lp++", "clap"] {
        assert!(
            skipped[m].contains("zero-shot-pairs, linear-probe"),
            "{m}: {skipped:?}"
        );
    }
    for m in capable {
        assert!(!skipped.contains_key(m), "{m}");
    }
    let records = v["records"].as_array().unwrap();
    assert_eq!(records.len(), capable.len() * 2 * 2);
    let mut lp_k1 = Vec::new();
    let mut seen = BTreeSet::new();
    for r in records {
        let method = r["method"].as_str().unwrap().to_string();
        let k = r["protocol"]["shots"].as_u64().unwrap();
        let seed = r["protocol"]["seed"].as_u64().unwrap();
        assert!(seen.insert((method.clone(), k, seed)));
        assert_eq!(r["protocol"]["task"], "multi-label");
        let auc = r["multilabel_metrics"]["macro_auroc"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&auc));
        let cf = &r["multilabel_metrics"]["conformal_fnr_control"]["report"];
        assert_eq!(cf["target_alpha"].as_f64(), Some(0.1), "{r}");
        let fnr = cf["fnr"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&fnr));
        let size = cf["mean_set_size"].as_f64().unwrap();
        assert!((0.0..=v["class_names"].as_array().unwrap().len() as f64).contains(&size));
        if method == "linear-probe" && k == 1 {
            lp_k1.push((auc, fnr));
        }
    }
    // The table's cell is the mean over seeds of the records.
    let table = &v["macro_auroc_table"];
    let mi = table["methods"]
        .as_array()
        .unwrap()
        .iter()
        .position(|m| m == "linear-probe")
        .unwrap();
    let cell = table["cells"][mi][0]["mean"].as_f64().unwrap();
    assert_eq!(lp_k1.len(), 2);
    assert!((cell - lp_k1.iter().map(|x| x.0).sum::<f64>() / 2.0).abs() < 1e-12);
    let fnr_cell = v["conformal_fnr_table"]["cells"][mi][0]["mean"]
        .as_f64()
        .unwrap();
    assert!((fnr_cell - lp_k1.iter().map(|x| x.1).sum::<f64>() / 2.0).abs() < 1e-12);
}
