//! Multi-label metrics at a decision threshold: per-label F1, macro-F1 (mean of per-label
//! F1) and micro-F1 (F1 of the pooled TP/FP/FN counts), as in scikit-learn's
//! `f1_score(average="macro"|"micro")` on binary indicator matrices. Per-label AUROC lives in
//! [`crate::auroc::auroc_multilabel`].

use serde::{Deserialize, Serialize};

use crate::error::{check_len, check_matrix, EvalError, Result};

/// Thresholded multi-label scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MultiLabelReport {
    /// Decision threshold: a label is predicted when `score >= threshold`.
    pub threshold: f32,
    /// Number of samples.
    pub n: usize,
    /// F1 of each label (0 when the label is neither present nor predicted).
    pub per_label_f1: Vec<f64>,
    /// Unweighted mean of `per_label_f1` over all labels (scikit-learn macro convention).
    pub macro_f1: f64,
    /// F1 of the TP/FP/FN counts pooled over all labels.
    pub micro_f1: f64,
    /// Fraction of samples whose whole predicted label set is exactly right.
    pub exact_match: f64,
}

/// Computes [`MultiLabelReport`] from row-major `n x num_labels` scores (probabilities, e.g.
/// sigmoid outputs) and targets.
pub fn multilabel_f1(
    scores: &[f32],
    targets: &[bool],
    num_labels: usize,
    threshold: f32,
) -> Result<MultiLabelReport> {
    let n = check_matrix("scores", scores, num_labels)?;
    check_len("targets", targets.len(), scores.len())?;
    if n == 0 {
        return Err(EvalError::Empty("no samples to score"));
    }
    if !threshold.is_finite() {
        return Err(EvalError::InvalidParameter {
            name: "threshold",
            reason: "must be finite".into(),
        });
    }
    let mut tp = vec![0u64; num_labels];
    let mut fp = vec![0u64; num_labels];
    let mut fn_ = vec![0u64; num_labels];
    let mut exact = 0usize;
    for (row_s, row_t) in scores
        .chunks_exact(num_labels)
        .zip(targets.chunks_exact(num_labels))
    {
        let mut all_right = true;
        for l in 0..num_labels {
            let pred = row_s[l] >= threshold;
            match (pred, row_t[l]) {
                (true, true) => tp[l] += 1,
                (true, false) => fp[l] += 1,
                (false, true) => fn_[l] += 1,
                (false, false) => {}
            }
            all_right &= pred == row_t[l];
        }
        exact += usize::from(all_right);
    }
    let f1 = |tp: u64, fp: u64, fn_: u64| {
        let d = 2 * tp + fp + fn_;
        if d == 0 {
            0.0
        } else {
            2.0 * tp as f64 / d as f64
        }
    };
    let per_label_f1: Vec<f64> = (0..num_labels).map(|l| f1(tp[l], fp[l], fn_[l])).collect();
    let macro_f1 = per_label_f1.iter().sum::<f64>() / num_labels as f64;
    let micro_f1 = f1(tp.iter().sum(), fp.iter().sum(), fn_.iter().sum());
    Ok(MultiLabelReport {
        threshold,
        n,
        per_label_f1,
        macro_f1,
        micro_f1,
        exact_match: exact as f64 / n as f64,
    })
}

/// Average precision of one label (scikit-learn's
/// `average_precision_score`): `sum_n (R_n - R_{n-1}) P_n` over the distinct
/// score thresholds in decreasing order; `None` without positives.
pub fn average_precision(scores: &[f32], positive: &[bool]) -> Option<f64> {
    let n_pos = positive.iter().filter(|&&p| p).count();
    if n_pos == 0 || scores.len() != positive.len() {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (mut tp, mut fp, mut ap, mut last_recall) = (0usize, 0usize, 0.0f64, 0.0f64);
    let mut i = 0;
    while i < order.len() {
        // Tied scores form one threshold.
        let mut j = i;
        while j < order.len() && scores[order[j]] == scores[order[i]] {
            if positive[order[j]] {
                tp += 1;
            } else {
                fp += 1;
            }
            j += 1;
        }
        let recall = tp as f64 / n_pos as f64;
        let precision = tp as f64 / (tp + fp) as f64;
        ap += (recall - last_recall) * precision;
        last_recall = recall;
        i = j;
    }
    Some(ap)
}
