//! Single-label classification metrics: accuracy, balanced accuracy, macro-F1 and the
//! confusion matrix.
//!
//! Conventions follow scikit-learn (`sklearn.metrics`), which the users of medvlm compare
//! against: balanced accuracy is the mean recall over the classes that occur in `y_true`
//! (Brodersen et al., "The balanced accuracy and its posterior distribution", ICPR 2010);
//! macro-F1 averages the per-class F1 = 2TP / (2TP + FP + FN) over the classes that occur in
//! `y_true` or `y_pred`, and a class with no predicted and no true sample is not averaged.

use serde::{Deserialize, Serialize};

use crate::error::{check_labels, check_len, check_matrix, EvalError, Result};

/// Counts of (true class, predicted class) pairs. `counts[t][p]` is the number of samples of
/// true class `t` predicted as `p` (rows are the truth, as in scikit-learn).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfusionMatrix {
    /// Number of classes (rows and columns).
    pub num_classes: usize,
    /// Row-major counts, `counts[true][predicted]`.
    pub counts: Vec<Vec<u64>>,
}

impl ConfusionMatrix {
    /// Builds the matrix from true and predicted class indices.
    pub fn new(y_true: &[usize], y_pred: &[usize], num_classes: usize) -> Result<Self> {
        check_len("y_pred", y_pred.len(), y_true.len())?;
        if num_classes == 0 {
            return Err(EvalError::InvalidParameter {
                name: "num_classes",
                reason: "must be at least 1".into(),
            });
        }
        check_labels("y_true", y_true, num_classes)?;
        check_labels("y_pred", y_pred, num_classes)?;
        let mut counts = vec![vec![0u64; num_classes]; num_classes];
        for (&t, &p) in y_true.iter().zip(y_pred) {
            counts[t][p] += 1;
        }
        Ok(Self {
            num_classes,
            counts,
        })
    }

    /// Total number of samples.
    pub fn total(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }

    /// Number of samples of true class `c` (row sum).
    pub fn support(&self, c: usize) -> u64 {
        self.counts[c].iter().sum()
    }

    /// Number of samples predicted as class `c` (column sum).
    pub fn predicted(&self, c: usize) -> u64 {
        self.counts.iter().map(|row| row[c]).sum()
    }

    /// Each row divided by its sum (recall-normalised); rows without samples stay zero.
    pub fn row_normalised(&self) -> Vec<Vec<f64>> {
        self.counts
            .iter()
            .map(|row| {
                let s: u64 = row.iter().sum();
                row.iter()
                    .map(|&v| if s == 0 { 0.0 } else { v as f64 / s as f64 })
                    .collect()
            })
            .collect()
    }
}

/// Precision, recall and F1 of one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassStats {
    /// TP / (TP + FP); 0 when the class is never predicted (scikit-learn `zero_division=0`).
    pub precision: f64,
    /// TP / (TP + FN); 0 when the class never occurs.
    pub recall: f64,
    /// 2TP / (2TP + FP + FN); 0 when the class neither occurs nor is predicted.
    pub f1: f64,
    /// Number of samples whose true class is this one.
    pub support: u64,
}

/// Every single-label metric of one evaluation, serialisable for reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassificationReport {
    /// Number of samples.
    pub n: usize,
    /// Fraction of correct predictions.
    pub accuracy: f64,
    /// Mean recall over classes present in `y_true`.
    pub balanced_accuracy: f64,
    /// Mean F1 over classes present in `y_true` or `y_pred`.
    pub macro_f1: f64,
    /// Per-class statistics, indexed by class.
    pub per_class: Vec<ClassStats>,
    /// The confusion matrix the figures were computed from.
    pub confusion: ConfusionMatrix,
}

impl ClassificationReport {
    /// Computes every metric from true and predicted class indices.
    pub fn new(y_true: &[usize], y_pred: &[usize], num_classes: usize) -> Result<Self> {
        if y_true.is_empty() {
            return Err(EvalError::Empty("no samples to score"));
        }
        let confusion = ConfusionMatrix::new(y_true, y_pred, num_classes)?;
        Ok(Self::from_confusion(confusion))
    }

    /// Computes every metric from a confusion matrix.
    pub fn from_confusion(confusion: ConfusionMatrix) -> Self {
        let n = confusion.total();
        let correct: u64 = (0..confusion.num_classes)
            .map(|c| confusion.counts[c][c])
            .sum();
        let mut per_class = Vec::with_capacity(confusion.num_classes);
        let (mut recall_sum, mut recall_n, mut f1_sum, mut f1_n) = (0.0, 0usize, 0.0, 0usize);
        for c in 0..confusion.num_classes {
            let tp = confusion.counts[c][c] as f64;
            let support = confusion.support(c);
            let predicted = confusion.predicted(c);
            let fn_ = support as f64 - tp;
            let fp = predicted as f64 - tp;
            let ratio = |a: f64, b: f64| if b == 0.0 { 0.0 } else { a / b };
            let stats = ClassStats {
                precision: ratio(tp, tp + fp),
                recall: ratio(tp, tp + fn_),
                f1: ratio(2.0 * tp, 2.0 * tp + fp + fn_),
                support,
            };
            if support > 0 {
                recall_sum += stats.recall;
                recall_n += 1;
            }
            if support > 0 || predicted > 0 {
                f1_sum += stats.f1;
                f1_n += 1;
            }
            per_class.push(stats);
        }
        let mean = |s: f64, k: usize| if k == 0 { 0.0 } else { s / k as f64 };
        Self {
            n: n as usize,
            accuracy: mean(correct as f64, n as usize),
            balanced_accuracy: mean(recall_sum, recall_n),
            macro_f1: mean(f1_sum, f1_n),
            per_class,
            confusion,
        }
    }
}

/// Fraction of positions where `y_pred == y_true`.
pub fn accuracy(y_true: &[usize], y_pred: &[usize]) -> Result<f64> {
    check_len("y_pred", y_pred.len(), y_true.len())?;
    if y_true.is_empty() {
        return Err(EvalError::Empty("no samples to score"));
    }
    let correct = y_true.iter().zip(y_pred).filter(|(t, p)| t == p).count();
    Ok(correct as f64 / y_true.len() as f64)
}

/// Mean per-class recall over the classes present in `y_true` (scikit-learn convention).
pub fn balanced_accuracy(y_true: &[usize], y_pred: &[usize], num_classes: usize) -> Result<f64> {
    Ok(ClassificationReport::new(y_true, y_pred, num_classes)?.balanced_accuracy)
}

/// Unweighted mean of per-class F1 over classes present in `y_true` or `y_pred`.
pub fn macro_f1(y_true: &[usize], y_pred: &[usize], num_classes: usize) -> Result<f64> {
    Ok(ClassificationReport::new(y_true, y_pred, num_classes)?.macro_f1)
}

/// Row-wise argmax of a row-major `n x num_classes` score matrix. Ties go to the lowest index.
pub fn argmax_rows(scores: &[f32], num_classes: usize) -> Result<Vec<usize>> {
    check_matrix("scores", scores, num_classes)?;
    Ok(scores
        .chunks_exact(num_classes)
        .map(|row| {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            best
        })
        .collect())
}

/// Zero-shot reports of one group (e.g. a modality) of a pooled classifier.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupReports {
    /// The group's samples under the argmax over *all* classes (chance 1 / all classes);
    /// indices are the pooled class indices.
    pub pooled: ClassificationReport,
    /// The group's samples under the argmax over the group's *own* classes only (chance
    /// 1 / the group's classes); indices are positions in `classes`.
    pub within: ClassificationReport,
    /// The group's classes, as pooled class indices.
    pub classes: Vec<usize>,
}

/// Per group, the pooled and the within-group reports of a classifier whose classes belong to
/// groups (the quickstart's protocol: classes are each modality's findings; *pooled* lets
/// every modality's classes compete, *within* only the sample's own modality's).
/// `scores`: row-major `[samples, classes]`; `class_group[c]` and `sample_group[i]` the
/// groups; `truth[i]` a class of sample `i`'s group. Ties go to the lower class index.
pub fn pooled_and_within_groups<G: Ord + Clone>(
    scores: &[f32],
    truth: &[usize],
    class_group: &[G],
    sample_group: &[G],
) -> Result<std::collections::BTreeMap<G, GroupReports>> {
    let k = class_group.len();
    check_len("truth", truth.len(), sample_group.len())?;
    check_len("scores", scores.len(), sample_group.len() * k)?;
    let mut out = std::collections::BTreeMap::new();
    let mut groups: Vec<G> = class_group.to_vec();
    groups.sort();
    groups.dedup();
    for g in groups {
        let idx: Vec<usize> = (0..k).filter(|&c| class_group[c] == g).collect();
        let (mut tp, mut pp, mut tw, mut pw) = (vec![], vec![], vec![], vec![]);
        for (i, sg) in sample_group.iter().enumerate() {
            if *sg != g {
                continue;
            }
            let row = &scores[i * k..(i + 1) * k];
            let t = truth[i];
            let local_t =
                idx.iter()
                    .position(|&c| c == t)
                    .ok_or_else(|| EvalError::InvalidParameter {
                        name: "truth",
                        reason: format!("sample {i}'s class {t} is not a class of its group"),
                    })?;
            let best = |cands: &mut dyn Iterator<Item = usize>| {
                cands
                    .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
                    .unwrap_or(0)
            };
            tp.push(t);
            pp.push(best(&mut (0..k)));
            tw.push(local_t);
            let lp = best(&mut idx.iter().copied());
            pw.push(idx.iter().position(|&c| c == lp).unwrap_or(0));
        }
        if tp.is_empty() {
            continue;
        }
        out.insert(
            g,
            GroupReports {
                pooled: ClassificationReport::new(&tp, &pp, k)?,
                within: ClassificationReport::new(&tw, &pw, idx.len())?,
                classes: idx,
            },
        );
    }
    Ok(out)
}
