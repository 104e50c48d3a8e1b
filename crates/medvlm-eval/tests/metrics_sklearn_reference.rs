//! Classification, AUROC and multi-label metrics against scikit-learn on random problems with
//! many ties (fixture from tools/make_metrics_reference.py).

use medvlm_eval::auroc::{auroc_multilabel, auroc_one_vs_rest};
use medvlm_eval::classification::{argmax_rows, ClassificationReport};
use medvlm_eval::multilabel::multilabel_f1;
use serde_json::Value;

const FIXTURE: &str = include_str!("fixtures/metrics_reference.json");

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn close(what: &str, got: f64, want: &Value) {
    let want = want.as_f64().unwrap();
    assert!(
        (got - want).abs() <= 1e-12,
        "{what}: {got} vs scikit-learn {want}"
    );
}

#[test]
fn single_label_metrics_match_sklearn() {
    let fixture: Value = serde_json::from_str(FIXTURE).unwrap();
    for (k, c) in fixture["single_label"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let nc = c["num_classes"].as_u64().unwrap() as usize;
        let scores = f32s(&c["scores"]);
        let y = usizes(&c["y_true"]);
        let pred = argmax_rows(&scores, nc).unwrap();
        assert_eq!(pred, usizes(&c["y_pred"]), "case {k}: argmax");
        let r = ClassificationReport::new(&y, &pred, nc).unwrap();
        close("accuracy", r.accuracy, &c["accuracy"]);
        close(
            "balanced accuracy",
            r.balanced_accuracy,
            &c["balanced_accuracy"],
        );
        close("macro-F1", r.macro_f1, &c["macro_f1"]);
        let cm: Vec<Vec<u64>> = serde_json::from_value(c["confusion"].clone()).unwrap();
        assert_eq!(r.confusion.counts, cm, "case {k}: confusion");
        let auc = auroc_one_vs_rest(&scores, &y, nc).unwrap();
        for (j, want) in c["per_class_auroc"].as_array().unwrap().iter().enumerate() {
            close(
                &format!("case {k} class {j} AUROC"),
                auc.per_class[j].unwrap(),
                want,
            );
        }
    }
}

#[test]
fn multilabel_metrics_match_sklearn() {
    let fixture: Value = serde_json::from_str(FIXTURE).unwrap();
    for c in fixture["multilabel"].as_array().unwrap() {
        let nl = c["num_labels"].as_u64().unwrap() as usize;
        let scores = f32s(&c["scores"]);
        let targets: Vec<bool> = c["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_bool().unwrap())
            .collect();
        let thr = c["threshold"].as_f64().unwrap() as f32;
        let r = multilabel_f1(&scores, &targets, nl, thr).unwrap();
        close("macro-F1", r.macro_f1, &c["macro_f1"]);
        close("micro-F1", r.micro_f1, &c["micro_f1"]);
        close("exact match", r.exact_match, &c["exact_match"]);
        let auc = auroc_multilabel(&scores, &targets, nl).unwrap();
        for (j, want) in c["per_label_auroc"].as_array().unwrap().iter().enumerate() {
            close(&format!("label {j} AUROC"), auc.per_class[j].unwrap(), want);
        }
    }
}
