//! Area under the ROC curve, computed exactly with the Mann-Whitney U statistic.
//!
//! AUROC = P(score of a random positive > score of a random negative) + 0.5 P(tie)
//! (Hanley & McNeil, "The meaning and use of the area under a ROC curve", Radiology 1982).
//! It is computed from mid-ranks (tied scores share the mean of their ranks), which is exact
//! and equals scikit-learn's `roc_auc_score` (trapezoidal ROC area) including ties.
//! Multi-class AUROC is one-vs-rest per class, macro-averaged over the classes for which it
//! is defined (at least one positive and one negative); undefined classes are listed, never
//! silently dropped.

use serde::{Deserialize, Serialize};

use crate::error::{check_finite, check_labels, check_len, check_matrix, EvalError, Result};

/// Binary AUROC of `scores` (higher means more likely positive) against `positive` labels.
/// Returns `Ok(None)` when there is no positive or no negative sample (AUROC undefined).
pub fn auroc_binary(scores: &[f32], positive: &[bool]) -> Result<Option<f64>> {
    check_len("labels", positive.len(), scores.len())?;
    check_finite("scores", scores)?;
    let n_pos = positive.iter().filter(|&&p| p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return Ok(None);
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum of the (1-based, tie-averaged) ranks of the positives.
    let mut rank_sum_pos = 0.0f64;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        // Positions i..=j (0-based) share the mid-rank ((i+1) + (j+1)) / 2.
        let mid_rank = (i + j) as f64 / 2.0 + 1.0;
        let pos_in_group = order[i..=j].iter().filter(|&&k| positive[k]).count();
        rank_sum_pos += mid_rank * pos_in_group as f64;
        i = j + 1;
    }
    let (p, q) = (n_pos as f64, n_neg as f64);
    let u = rank_sum_pos - p * (p + 1.0) / 2.0;
    Ok(Some(u / (p * q)))
}

/// Per-class and macro AUROC of a score matrix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AurocReport {
    /// AUROC of each class (one-vs-rest) or label; `None` where undefined.
    pub per_class: Vec<Option<f64>>,
    /// Mean over the defined entries of `per_class`; `None` if none is defined.
    pub macro_auroc: Option<f64>,
    /// Classes whose AUROC is undefined (no positive or no negative sample).
    pub undefined_classes: Vec<usize>,
}

impl AurocReport {
    fn from_per_class(per_class: Vec<Option<f64>>) -> Self {
        let defined: Vec<f64> = per_class.iter().flatten().copied().collect();
        let undefined_classes = per_class
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_none())
            .map(|(i, _)| i)
            .collect();
        let macro_auroc = if defined.is_empty() {
            None
        } else {
            Some(defined.iter().sum::<f64>() / defined.len() as f64)
        };
        Self {
            per_class,
            macro_auroc,
            undefined_classes,
        }
    }
}

/// One-vs-rest AUROC for single-label data: `scores` is row-major `n x num_classes`
/// (probabilities or logits; only the order within each column matters).
pub fn auroc_one_vs_rest(
    scores: &[f32],
    y_true: &[usize],
    num_classes: usize,
) -> Result<AurocReport> {
    let n = check_matrix("scores", scores, num_classes)?;
    check_len("y_true", y_true.len(), n)?;
    if n == 0 {
        return Err(EvalError::Empty("no samples to score"));
    }
    check_labels("y_true", y_true, num_classes)?;
    let mut per_class = Vec::with_capacity(num_classes);
    for c in 0..num_classes {
        let column: Vec<f32> = scores.chunks_exact(num_classes).map(|r| r[c]).collect();
        let positive: Vec<bool> = y_true.iter().map(|&t| t == c).collect();
        per_class.push(auroc_binary(&column, &positive)?);
    }
    Ok(AurocReport::from_per_class(per_class))
}

/// Per-label AUROC for multi-label data: `scores` and `targets` are row-major
/// `n x num_labels`.
pub fn auroc_multilabel(
    scores: &[f32],
    targets: &[bool],
    num_labels: usize,
) -> Result<AurocReport> {
    let n = check_matrix("scores", scores, num_labels)?;
    check_len("targets", targets.len(), scores.len())?;
    if n == 0 {
        return Err(EvalError::Empty("no samples to score"));
    }
    let mut per_class = Vec::with_capacity(num_labels);
    for l in 0..num_labels {
        let column: Vec<f32> = scores.chunks_exact(num_labels).map(|r| r[l]).collect();
        let positive: Vec<bool> = targets.chunks_exact(num_labels).map(|r| r[l]).collect();
        per_class.push(auroc_binary(&column, &positive)?);
    }
    Ok(AurocReport::from_per_class(per_class))
}
