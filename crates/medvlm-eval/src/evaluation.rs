//! One evaluation of a classifier's test probabilities, as `medvlm adapt`, `predict` and
//! `bench fewshot` report it (and as the service and bindings will): every multi-class
//! metric ([`evaluate`]: accuracy, balanced accuracy, macro-F1, one-vs-rest AUROC, ECE with
//! its reliability diagram, split-conformal APS/RAPS sets) or every multi-label metric
//! ([`evaluate_multilabel`]: per-label AUROC and average precision, F1 at a threshold, exact
//! match, conformal risk control of the false-negative rate), in serialisable structs.

use serde::{Deserialize, Serialize};

use crate::auroc::{auroc_binary, auroc_multilabel, auroc_one_vs_rest, AurocReport};
use crate::calibration::{reliability_diagram, ReliabilityDiagram, DEFAULT_NUM_BINS};
use crate::classification::{argmax_rows, ClassificationReport};
use crate::conformal::{ConformalConfig, ConformalPredictor, ConformalReport};
use crate::conformal_multilabel::{FnrControlReport, FnrController};
use crate::multilabel::{average_precision, multilabel_f1};
use crate::temperature::{apply_temperature, fit_temperature, Temperature};
use crate::Result;

/// Decision threshold on the sigmoid probabilities for the thresholded
/// multi-label metrics (F1, exact match) and the predicted label sets.
pub const MULTI_LABEL_THRESHOLD: f32 = 0.5;

/// Conformal calibration summary with the report on the test set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConformalSummary {
    /// Score function and miscoverage level.
    pub config: ConformalConfig,
    /// Where the calibration examples came from.
    pub calibration_source: String,
    /// Number of calibration examples.
    pub n_calibration: usize,
    /// Target coverage, measured coverage and mean set size on the test set.
    pub report: ConformalReport,
    /// The calibrated predictor (its score threshold `q_hat`), so that sets can be formed for
    /// new images; absent in cards written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predictor: Option<ConformalPredictor>,
}

/// Temperature scaling fitted on the calibration examples and its effect on the test set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemperatureSummary {
    /// The method, for readers of the card.
    pub method: String,
    /// Where the calibration examples came from (the conformal calibration examples).
    pub calibration_source: String,
    /// The fitted temperature and the calibration NLL before and after.
    pub fit: Temperature,
    /// Test ECE (15 bins) of the classifier's own probabilities.
    pub test_ece_before: f64,
    /// Test ECE after temperature scaling.
    pub test_ece_after: f64,
    /// Test mean NLL before.
    pub test_nll_before: f64,
    /// Test mean NLL after.
    pub test_nll_after: f64,
}

/// Mean negative log-likelihood of `labels` (probabilities floored at 1e-30).
fn mean_nll(probs: &[f32], labels: &[usize], c: usize) -> f64 {
    probs
        .chunks_exact(c)
        .zip(labels)
        .map(|(row, &y)| -(row[y] as f64).max(1e-30).ln())
        .sum::<f64>()
        / labels.len().max(1) as f64
}

/// Every metric of one evaluation on a labelled test set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metrics {
    /// Test-set size.
    pub n: usize,
    /// Top-1 accuracy.
    pub accuracy: f64,
    /// Mean per-class recall over the classes present in the test set.
    pub balanced_accuracy: f64,
    /// Macro-averaged F1.
    pub macro_f1: f64,
    /// Macro AUROC (one-vs-rest; classes without positives or negatives are left out).
    pub macro_auroc: Option<f64>,
    /// Per-class one-vs-rest AUROC.
    pub auroc: AurocReport,
    /// Expected calibration error (15 equal-width bins on the top-class confidence).
    pub ece: f64,
    /// The reliability diagram the ECE comes from.
    pub reliability: ReliabilityDiagram,
    /// Split-conformal APS sets, when calibration examples exist.
    pub conformal: Option<ConformalSummary>,
    /// Temperature scaling fitted on the same calibration examples, when they exist (absent
    /// in cards written before it was recorded). Conformal sets use the unscaled
    /// probabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<TemperatureSummary>,
}

/// Computes every metric from test probabilities; `calibration` gives the
/// probabilities and labels of the conformal calibration examples.
pub fn evaluate(
    probs: &[f32],
    labels: &[usize],
    num_classes: usize,
    calibration: Option<(&[f32], &[usize], String)>,
    config: ConformalConfig,
) -> Result<Metrics> {
    let pred = argmax_rows(probs, num_classes)?;
    let report = ClassificationReport::new(labels, &pred, num_classes)?;
    let n = labels.len();
    let accuracy = pred.iter().zip(labels).filter(|(p, y)| p == y).count() as f64 / n.max(1) as f64;
    let auroc = auroc_one_vs_rest(probs, labels, num_classes)?;
    let reliability = reliability_diagram(probs, labels, num_classes, DEFAULT_NUM_BINS)?;
    let temperature = match &calibration {
        Some((cal_probs, cal_labels, source)) if !cal_labels.is_empty() && num_classes >= 2 => {
            let fit = fit_temperature(cal_probs, cal_labels, num_classes)?;
            let scaled = apply_temperature(probs, num_classes, fit.temperature)?;
            let after = reliability_diagram(&scaled, labels, num_classes, DEFAULT_NUM_BINS)?;
            Some(TemperatureSummary {
                method: "temperature scaling (Guo et al., ICML 2017), NLL-optimal T on the \
                         calibration examples"
                    .into(),
                calibration_source: source.clone(),
                test_ece_before: reliability.ece,
                test_ece_after: after.ece,
                test_nll_before: mean_nll(probs, labels, num_classes),
                test_nll_after: mean_nll(&scaled, labels, num_classes),
                fit,
            })
        }
        _ => None,
    };
    let conformal = match calibration {
        Some((cal_probs, cal_labels, source)) if !cal_labels.is_empty() => {
            let predictor =
                ConformalPredictor::calibrate(cal_probs, cal_labels, num_classes, config)?;
            Some(ConformalSummary {
                config,
                calibration_source: source,
                n_calibration: cal_labels.len(),
                report: predictor.evaluate(probs, labels)?,
                predictor: Some(predictor),
            })
        }
        _ => None,
    };
    Ok(Metrics {
        n,
        accuracy,
        balanced_accuracy: report.balanced_accuracy,
        macro_f1: report.macro_f1,
        macro_auroc: auroc.macro_auroc,
        ece: reliability.ece,
        auroc,
        reliability,
        conformal,
        temperature,
    })
}

/// What the multi-label reports say about conformal prediction sets.
pub const MULTI_LABEL_CONFORMAL_NOTE: &str =
    "conformal: label sets {k : p_k >= 1 - lambda_hat} with lambda_hat calibrated by split \
     conformal risk control of the false-negative rate (Angelopoulos et al., ICLR 2024; \
     E[FNR] <= --conformal-alpha on exchangeable data; studies without findings have loss 0); \
     APS/RAPS sets assume one class per image and are not computed for multi-label tasks";

/// What the multi-label reports say when there are no calibration examples.
pub const MULTI_LABEL_NO_CALIBRATION_NOTE: &str =
    "no conformal label sets: no calibration examples (no --calib-split split and no train \
     images outside the support set)";

/// Conformal risk control of the false-negative rate of multi-label sets,
/// calibrated on the calibration split and measured on the test split.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FnrControlSummary {
    /// Where the calibration examples came from.
    pub calibration_source: String,
    /// lambda_hat, threshold, and the test FNR, set sizes and per-label recall
    /// (`per_label_*` in class-index order).
    pub report: FnrControlReport,
    /// `report.per_label_coverage` keyed by class name: recall of each finding's
    /// test positives (`null` without test positives).
    pub per_class_coverage: std::collections::BTreeMap<String, Option<f64>>,
}

/// Probabilities `[n, C]`, multi-hot targets and source (split name) of the
/// multi-label conformal calibration examples.
pub type MultiLabelCalibration<'a> = (&'a [f32], &'a [Vec<bool>], String);

/// Calibrates the false-negative-rate controller on the calibration
/// probabilities and measures it on the test probabilities.
pub fn fnr_control(
    probs: &[f32],
    targets: &[Vec<bool>],
    class_names: &[String],
    calibration: MultiLabelCalibration,
    alpha: f64,
) -> Result<FnrControlSummary> {
    let c = class_names.len();
    let (cal_probs, cal_targets, source) = calibration;
    let cal_flat: Vec<bool> = cal_targets.iter().flatten().copied().collect();
    let controller = FnrController::calibrate(cal_probs, &cal_flat, c, alpha).map_err(|e| {
        crate::EvalError::InvalidParameter {
            name: "calibration",
            reason: format!("calibrating conformal risk control on {source}: {e}"),
        }
    })?;
    let flat: Vec<bool> = targets.iter().flatten().copied().collect();
    let report = controller.evaluate(probs, &flat)?;
    let per_class_coverage = class_names
        .iter()
        .cloned()
        .zip(report.per_label_coverage.iter().copied())
        .collect();
    Ok(FnrControlSummary {
        calibration_source: source,
        report,
        per_class_coverage,
    })
}

/// One-line summary of a false-negative-rate control report.
pub fn describe_fnr_control(s: &FnrControlSummary) -> String {
    let r = &s.report;
    let mut line = format!(
        "conformal risk control of the false-negative rate (calibrated on {} {}, {} without \
         findings): alpha {}, lambda_hat {:.4} (label set = p >= {}); test FNR {:.4}, mean set \
         size {:.3}, empty sets {:.1}%",
        r.n_calibration,
        s.calibration_source,
        r.n_calibration_without_positives,
        r.target_alpha,
        r.lambda_hat,
        r.threshold,
        r.fnr,
        r.mean_set_size,
        r.empty_set_fraction * 100.0
    );
    if r.calibration_too_small {
        line.push_str(&format!(
            "; {} calibration image(s) are too few for alpha {} ((n + 1) alpha < 1): every \
             label is in every set",
            r.n_calibration, r.target_alpha
        ));
    }
    line
}

/// Every metric of one multi-label evaluation; per-class entries are keyed
/// by class name.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MultiLabelMetrics {
    /// Test-set size.
    pub n: usize,
    /// Test images carrying each finding.
    pub positives: std::collections::BTreeMap<String, usize>,
    /// Test images with no finding of the task (`normal`).
    pub n_without_findings: usize,
    /// Mean of the defined per-class AUROCs.
    pub macro_auroc: Option<f64>,
    /// AUROC of each class (`null` where the test set has no positive or no negative).
    pub per_class_auroc: std::collections::BTreeMap<String, Option<f64>>,
    /// Classes whose AUROC (and average precision) is undefined on this test set.
    pub undefined_classes: Vec<String>,
    /// Mean of the defined per-class average precisions (scikit-learn's
    /// `average_precision_score`, no interpolation).
    pub mean_average_precision: Option<f64>,
    /// Average precision of each class (`null` where the test set has no positive).
    pub per_class_average_precision: std::collections::BTreeMap<String, Option<f64>>,
    /// Decision threshold of the thresholded metrics.
    pub threshold: f32,
    /// Macro-F1 at `threshold` (mean over all classes).
    pub macro_f1: f64,
    /// Micro-F1 at `threshold`.
    pub micro_f1: f64,
    /// F1 of each class at `threshold`.
    pub per_class_f1: std::collections::BTreeMap<String, f64>,
    /// Share of test images whose whole predicted label set is right.
    pub exact_match: f64,
    /// What the conformal report is ([`MULTI_LABEL_CONFORMAL_NOTE`]), or why
    /// there is none.
    pub conformal: String,
    /// Conformal risk control of the false-negative rate of the label sets,
    /// when calibration examples exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conformal_fnr_control: Option<FnrControlSummary>,
}

/// Multi-label metrics from row-major sigmoid probabilities `[n, C]` and
/// multi-hot targets; `calibration` gives the probabilities and targets of
/// the conformal calibration examples and `alpha` the target false-negative
/// rate of the conformal label sets.
pub fn evaluate_multilabel(
    probs: &[f32],
    targets: &[Vec<bool>],
    class_names: &[String],
    calibration: Option<MultiLabelCalibration>,
    alpha: f64,
) -> Result<MultiLabelMetrics> {
    let c = class_names.len();
    let flat: Vec<bool> = targets.iter().flatten().copied().collect();
    let auroc = auroc_multilabel(probs, &flat, c)?;
    let f1 = multilabel_f1(probs, &flat, c, MULTI_LABEL_THRESHOLD)?;
    let mut per_class_auroc = std::collections::BTreeMap::new();
    let mut per_class_ap = std::collections::BTreeMap::new();
    let mut per_class_f1 = std::collections::BTreeMap::new();
    let mut positives = std::collections::BTreeMap::new();
    for (j, name) in class_names.iter().enumerate() {
        let column: Vec<f32> = probs.chunks_exact(c).map(|r| r[j]).collect();
        let pos: Vec<bool> = targets.iter().map(|t| t[j]).collect();
        // Same value as `auroc.per_class[j]`; recomputed per column to keep the key by name.
        per_class_auroc.insert(name.clone(), auroc_binary(&column, &pos)?);
        per_class_ap.insert(name.clone(), average_precision(&column, &pos));
        per_class_f1.insert(name.clone(), f1.per_label_f1[j]);
        positives.insert(name.clone(), pos.iter().filter(|&&p| p).count());
    }
    let aps: Vec<f64> = per_class_ap.values().flatten().copied().collect();
    let conformal_fnr_control = match calibration {
        Some(cal) if !cal.1.is_empty() => {
            Some(fnr_control(probs, targets, class_names, cal, alpha)?)
        }
        _ => None,
    };
    Ok(MultiLabelMetrics {
        n: targets.len(),
        positives,
        n_without_findings: targets.iter().filter(|t| !t.iter().any(|&p| p)).count(),
        macro_auroc: auroc.macro_auroc,
        per_class_auroc,
        undefined_classes: auroc
            .undefined_classes
            .iter()
            .map(|&j| class_names[j].clone())
            .collect(),
        mean_average_precision: (!aps.is_empty())
            .then(|| aps.iter().sum::<f64>() / aps.len() as f64),
        per_class_average_precision: per_class_ap,
        threshold: MULTI_LABEL_THRESHOLD,
        macro_f1: f1.macro_f1,
        micro_f1: f1.micro_f1,
        per_class_f1,
        exact_match: f1.exact_match,
        conformal: if conformal_fnr_control.is_some() {
            MULTI_LABEL_CONFORMAL_NOTE
        } else {
            MULTI_LABEL_NO_CALIBRATION_NOTE
        }
        .to_string(),
        conformal_fnr_control,
    })
}

/// One-line summary of multi-label metrics.
pub fn describe_multilabel(mx: &MultiLabelMetrics) -> String {
    let fmt = |v: Option<f64>| v.map_or_else(|| "undefined".to_string(), |v| format!("{v:.4}"));
    let mut s = format!(
        "test ({} images, {} without findings): macro AUROC {}, mAP {}, macro-F1@{} {:.4}, \
         micro-F1 {:.4}, exact match {:.4}",
        mx.n,
        mx.n_without_findings,
        fmt(mx.macro_auroc),
        fmt(mx.mean_average_precision),
        mx.threshold,
        mx.macro_f1,
        mx.micro_f1,
        mx.exact_match
    );
    if !mx.undefined_classes.is_empty() {
        s.push_str(&format!(
            "; AUROC undefined (no positive or no negative in the test set) for: {}",
            mx.undefined_classes.join(", ")
        ));
    }
    s
}
