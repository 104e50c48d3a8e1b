//! Expected calibration error (ECE) and reliability-diagram data.
//!
//! Following Guo et al., "On Calibration of Modern Neural Networks" (ICML 2017): the
//! confidence of a prediction is its top-class probability; confidences are put into
//! `num_bins` equal-width bins over [0, 1] (default 15, as in that paper), bin `b` holding
//! confidences in `(b/B, (b+1)/B]` with 0 going to the first bin, and
//! `ECE = sum_b |B_b|/n * |accuracy(B_b) - mean confidence(B_b)|`.
//! The maximum calibration error `MCE = max_b |accuracy - confidence|` over non-empty bins is
//! reported too.

use serde::{Deserialize, Serialize};

use crate::error::{check_finite, check_labels, check_len, check_matrix, EvalError, Result};

/// Default number of bins (Guo et al. 2017).
pub const DEFAULT_NUM_BINS: usize = 15;

/// One bin of a reliability diagram.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityBin {
    /// Lower edge (exclusive, except 0 for the first bin).
    pub lower: f64,
    /// Upper edge (inclusive).
    pub upper: f64,
    /// Number of predictions in the bin.
    pub count: usize,
    /// Mean confidence in the bin (0 if empty).
    pub mean_confidence: f64,
    /// Fraction of correct predictions in the bin (0 if empty).
    pub accuracy: f64,
}

/// Reliability-diagram bins plus the calibration errors computed from them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityDiagram {
    /// The bins, from confidence 0 to 1.
    pub bins: Vec<ReliabilityBin>,
    /// Expected calibration error.
    pub ece: f64,
    /// Maximum calibration error over non-empty bins.
    pub mce: f64,
    /// Number of predictions.
    pub n: usize,
}

/// ECE from per-sample confidences (in [0, 1]) and correctness flags.
pub fn reliability_from_confidences(
    confidences: &[f32],
    correct: &[bool],
    num_bins: usize,
) -> Result<ReliabilityDiagram> {
    check_len("correct", correct.len(), confidences.len())?;
    check_finite("confidences", confidences)?;
    if confidences.is_empty() {
        return Err(EvalError::Empty("no predictions to calibrate"));
    }
    if num_bins == 0 {
        return Err(EvalError::InvalidParameter {
            name: "num_bins",
            reason: "must be at least 1".into(),
        });
    }
    if let Some(position) = confidences.iter().position(|&c| !(0.0..=1.0).contains(&c)) {
        return Err(EvalError::InvalidParameter {
            name: "confidences",
            reason: format!(
                "value {} at position {position} is outside [0, 1]",
                confidences[position]
            ),
        });
    }
    let mut count = vec![0usize; num_bins];
    let mut conf_sum = vec![0.0f64; num_bins];
    let mut correct_sum = vec![0usize; num_bins];
    for (&c, &ok) in confidences.iter().zip(correct) {
        // Bin b holds (b/B, (b+1)/B]: ceil(c*B) - 1, with c = 0 in bin 0.
        let b = ((c as f64 * num_bins as f64).ceil() as usize).clamp(1, num_bins) - 1;
        count[b] += 1;
        conf_sum[b] += c as f64;
        correct_sum[b] += usize::from(ok);
    }
    let n = confidences.len();
    let mut ece = 0.0;
    let mut mce = 0.0f64;
    let bins = (0..num_bins)
        .map(|b| {
            let (mean_confidence, accuracy) = if count[b] == 0 {
                (0.0, 0.0)
            } else {
                (
                    conf_sum[b] / count[b] as f64,
                    correct_sum[b] as f64 / count[b] as f64,
                )
            };
            if count[b] > 0 {
                let gap = (accuracy - mean_confidence).abs();
                ece += count[b] as f64 / n as f64 * gap;
                mce = mce.max(gap);
            }
            ReliabilityBin {
                lower: b as f64 / num_bins as f64,
                upper: (b + 1) as f64 / num_bins as f64,
                count: count[b],
                mean_confidence,
                accuracy,
            }
        })
        .collect();
    Ok(ReliabilityDiagram { bins, ece, mce, n })
}

/// ECE of a row-major `n x num_classes` probability matrix against true classes: the
/// confidence is the row maximum, correctness is argmax == truth (ties to the lowest index).
pub fn reliability_diagram(
    probs: &[f32],
    y_true: &[usize],
    num_classes: usize,
    num_bins: usize,
) -> Result<ReliabilityDiagram> {
    let n = check_matrix("probs", probs, num_classes)?;
    check_len("y_true", y_true.len(), n)?;
    check_labels("y_true", y_true, num_classes)?;
    let mut confidences = Vec::with_capacity(n);
    let mut correct = Vec::with_capacity(n);
    for (row, &t) in probs.chunks_exact(num_classes).zip(y_true) {
        let mut best = 0;
        for (i, &v) in row.iter().enumerate() {
            if v > row[best] {
                best = i;
            }
        }
        confidences.push(row[best]);
        correct.push(best == t);
    }
    reliability_from_confidences(&confidences, &correct, num_bins)
}
