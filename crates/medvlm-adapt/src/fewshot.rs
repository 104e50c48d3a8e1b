//! Few-shot protocol: which support images a method may see, and a
//! serialisable description of that protocol written into every result file.
//!
//! Two sampling modes:
//!
//! * **Balanced** (the CoOp / Tip-Adapter protocol): exactly K images per
//!   class, drawn uniformly without replacement with a seeded ChaCha8 RNG.
//! * **Realistic** (following the criticism in Silva-Rodriguez et al., CVPR
//!   2024, "A Closer Look at the Few-Shot Adaptation of Large Vision-Language
//!   Models"): a total budget of K x C images whose class proportions follow
//!   the dataset prior (the label frequencies of the pool being sampled), so
//!   rare classes get fewer shots, with at least `min_per_class` images per
//!   class; there is no validation set, so hyperparameters are either fixed
//!   in advance or chosen by cross-validation on the support set only
//!   ([`HyperparameterPolicy`]).
//!
//! Multi-label tasks use greedy sampling: labels are visited from rarest to
//! most frequent and images carrying the label are added (in seeded random
//! order) until every label has at least K positives in the support set.
//!
//! The standard shot counts are [`STANDARD_SHOTS`] = {1, 2, 4, 8, 16}.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// The shot counts of the few-shot protocol (CoOp, Tip-Adapter, LP++, CLAP).
pub const STANDARD_SHOTS: [usize; 5] = [1, 2, 4, 8, 16];

/// Whether each image has exactly one class or any subset of labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    /// One class per image; probabilities are a softmax over classes.
    MultiClass,
    /// Any subset of labels per image; one independent probability per label.
    MultiLabel,
}

/// How the support set is drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum SamplingMode {
    /// Exactly K images per class.
    Balanced,
    /// K x C images in total, class proportions from the dataset prior, at
    /// least `min_per_class` per class.
    Realistic {
        /// Floor on the number of images of each class (default 1).
        min_per_class: usize,
    },
}

/// How hyperparameters (regularisation strength, blend weights) are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum HyperparameterPolicy {
    /// Each method's documented defaults, fixed before seeing any data.
    Fixed,
    /// A small grid searched by `folds`-fold cross-validation on the support
    /// set only (never on test or validation data).
    SupportCv {
        /// Number of folds (at least 2).
        folds: usize,
    },
}

/// The protocol of one few-shot run, serialised into every result file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FewShotProtocol {
    /// K: shots per class (balanced) or the per-class budget (realistic).
    pub shots: usize,
    /// Seed of the support-set draw (and of any random initialisation).
    pub seed: u64,
    /// Balanced or realistic sampling.
    pub mode: SamplingMode,
    /// Multi-class or multi-label.
    pub task: TaskKind,
    /// Fixed hyperparameters or support-set cross-validation.
    pub hyperparameter_policy: HyperparameterPolicy,
    /// Whether a labelled validation set was used for model selection. Always
    /// false for the realistic mode.
    pub validation_set: bool,
}

impl FewShotProtocol {
    /// The balanced K-shot protocol with fixed hyperparameters.
    pub fn balanced(shots: usize, seed: u64, task: TaskKind) -> Self {
        Self {
            shots,
            seed,
            mode: SamplingMode::Balanced,
            task,
            hyperparameter_policy: HyperparameterPolicy::Fixed,
            validation_set: false,
        }
    }

    /// The realistic protocol: imbalanced support set, no validation set.
    pub fn realistic(
        shots: usize,
        seed: u64,
        task: TaskKind,
        policy: HyperparameterPolicy,
    ) -> Self {
        Self {
            shots,
            seed,
            mode: SamplingMode::Realistic { min_per_class: 1 },
            task,
            hyperparameter_policy: policy,
            validation_set: false,
        }
    }

    /// One-line human-readable description, e.g. for report headers.
    pub fn describe(&self) -> String {
        let mode = match &self.mode {
            SamplingMode::Balanced => "balanced".to_string(),
            SamplingMode::Realistic { min_per_class } => {
                format!("realistic (dataset prior, >= {min_per_class}/class)")
            }
        };
        let policy = match self.hyperparameter_policy {
            HyperparameterPolicy::Fixed => "fixed hyperparameters".to_string(),
            HyperparameterPolicy::SupportCv { folds } => format!("{folds}-fold CV on support set"),
        };
        let task = match self.task {
            TaskKind::MultiClass => "multi-class",
            TaskKind::MultiLabel => "multi-label",
        };
        format!(
            "{}-shot {task}, {mode}, {policy}, seed {}{}",
            self.shots,
            self.seed,
            if self.validation_set {
                ", validation set"
            } else {
                ", no validation set"
            }
        )
    }

    /// Draws the support set for a multi-class pool with this protocol.
    pub fn sample(
        &self,
        labels: &[usize],
        class_names: &[String],
    ) -> Result<Vec<usize>, FewShotError> {
        sample_support(labels, class_names, self.shots, self.seed, &self.mode)
    }
}

/// Errors of the few-shot sampler. Each says what to change.
#[derive(Debug, thiserror::Error)]
pub enum FewShotError {
    /// A class has fewer images than the shots requested.
    #[error(
        "class {class} ('{name}') has only {available} image(s) but {requested} were requested; \
         lower the number of shots to at most {available} or add images of that class"
    )]
    NotEnoughImages {
        /// Class index.
        class: usize,
        /// Class name.
        name: String,
        /// Images of that class in the pool.
        available: usize,
        /// Images needed.
        requested: usize,
    },
    /// A label index is outside the class list.
    #[error("image {index} has label {label} but only {num_classes} classes are defined; fix the labels or the class list")]
    LabelOutOfRange {
        /// Image index in the pool.
        index: usize,
        /// Offending label.
        label: usize,
        /// Number of classes.
        num_classes: usize,
    },
    /// Other invalid settings (zero shots, empty pool, ragged multi-hot rows).
    #[error("invalid few-shot request: {0}")]
    Invalid(String),
}

fn class_name(class_names: &[String], c: usize) -> String {
    class_names
        .get(c)
        .cloned()
        .unwrap_or_else(|| format!("class {c}"))
}

/// Indices of each class in the pool, validating labels.
fn indices_by_class(labels: &[usize], num_classes: usize) -> Result<Vec<Vec<usize>>, FewShotError> {
    let mut by_class = vec![Vec::new(); num_classes];
    for (i, &l) in labels.iter().enumerate() {
        if l >= num_classes {
            return Err(FewShotError::LabelOutOfRange {
                index: i,
                label: l,
                num_classes,
            });
        }
        by_class[l].push(i);
    }
    Ok(by_class)
}

/// Draws a multi-class support set: indices into `labels`, grouped by class
/// (class 0 first), deterministic given `seed`.
///
/// `class_names` gives the number of classes and the names used in errors.
pub fn sample_support(
    labels: &[usize],
    class_names: &[String],
    shots: usize,
    seed: u64,
    mode: &SamplingMode,
) -> Result<Vec<usize>, FewShotError> {
    let num_classes = class_names.len();
    if shots == 0 {
        return Err(FewShotError::Invalid("shots must be at least 1".into()));
    }
    if num_classes == 0 {
        return Err(FewShotError::Invalid("no classes given".into()));
    }
    let mut by_class = indices_by_class(labels, num_classes)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for idx in by_class.iter_mut() {
        idx.shuffle(&mut rng);
    }
    let quotas = match mode {
        SamplingMode::Balanced => {
            for (c, idx) in by_class.iter().enumerate() {
                if idx.len() < shots {
                    return Err(FewShotError::NotEnoughImages {
                        class: c,
                        name: class_name(class_names, c),
                        available: idx.len(),
                        requested: shots,
                    });
                }
            }
            vec![shots; num_classes]
        }
        SamplingMode::Realistic { min_per_class } => {
            let counts: Vec<usize> = by_class.iter().map(Vec::len).collect();
            realistic_quotas(&counts, class_names, shots * num_classes, *min_per_class)?
        }
    };
    let mut out = Vec::with_capacity(quotas.iter().sum());
    for (idx, q) in by_class.iter().zip(&quotas) {
        let mut chosen: Vec<usize> = idx[..*q].to_vec();
        chosen.sort_unstable();
        out.extend(chosen);
    }
    Ok(out)
}

/// Per-class quotas for the realistic mode: `budget` split in proportion to
/// the class counts (largest-remainder rounding), at least `min_per_class`
/// each, never more than a class has; spare budget from capped classes goes
/// to classes with images left, most frequent first.
pub fn realistic_quotas(
    counts: &[usize],
    class_names: &[String],
    budget: usize,
    min_per_class: usize,
) -> Result<Vec<usize>, FewShotError> {
    let total: usize = counts.iter().sum();
    if total < budget {
        return Err(FewShotError::Invalid(format!(
            "the pool has {total} images but the realistic budget K x C is {budget}; lower the number of shots"
        )));
    }
    for (c, &n) in counts.iter().enumerate() {
        if n < min_per_class {
            return Err(FewShotError::NotEnoughImages {
                class: c,
                name: class_name(class_names, c),
                available: n,
                requested: min_per_class,
            });
        }
    }
    if min_per_class * counts.len() > budget {
        return Err(FewShotError::Invalid(format!(
            "min_per_class {min_per_class} x {} classes exceeds the budget {budget}",
            counts.len()
        )));
    }
    let ideal: Vec<f64> = counts
        .iter()
        .map(|&n| budget as f64 * n as f64 / total as f64)
        .collect();
    let mut quotas: Vec<usize> = ideal
        .iter()
        .zip(counts)
        .map(|(&x, &n)| (x.floor() as usize).max(min_per_class).min(n))
        .collect();
    // Largest remainder first, then most frequent class, for the leftover.
    let mut order: Vec<usize> = (0..counts.len()).collect();
    order.sort_by(|&a, &b| {
        let ra = ideal[a] - ideal[a].floor();
        let rb = ideal[b] - ideal[b].floor();
        rb.total_cmp(&ra)
            .then(counts[b].cmp(&counts[a]))
            .then(a.cmp(&b))
    });
    while quotas.iter().sum::<usize>() > budget {
        // The floor of min_per_class can overshoot: take back from the largest.
        let c = (0..counts.len())
            .filter(|&c| quotas[c] > min_per_class)
            .max_by_key(|&c| (quotas[c], std::cmp::Reverse(c)))
            .ok_or_else(|| FewShotError::Invalid("cannot meet the realistic budget".into()))?;
        quotas[c] -= 1;
    }
    // Hand out the rest round-robin in that order; total >= budget, so
    // this ends.
    let mut k = 0usize;
    let mut misses = 0usize;
    while quotas.iter().sum::<usize>() < budget && misses <= counts.len() {
        let c = order[k % order.len()];
        k += 1;
        if quotas[c] < counts[c] {
            quotas[c] += 1;
            misses = 0;
        } else {
            misses += 1;
        }
    }
    Ok(quotas)
}

/// Greedy multi-label sampling: every label ends up with at least `shots`
/// positives. `labels[i][j]` is whether image i carries label j. Returns
/// sorted, distinct indices.
pub fn sample_support_multilabel(
    labels: &[Vec<bool>],
    label_names: &[String],
    shots: usize,
    seed: u64,
) -> Result<Vec<usize>, FewShotError> {
    let num_labels = label_names.len();
    if shots == 0 {
        return Err(FewShotError::Invalid("shots must be at least 1".into()));
    }
    let mut positives = vec![0usize; num_labels];
    for (i, row) in labels.iter().enumerate() {
        if row.len() != num_labels {
            return Err(FewShotError::Invalid(format!(
                "image {i} has {} label entries but {num_labels} labels are defined",
                row.len()
            )));
        }
        for (j, &p) in row.iter().enumerate() {
            positives[j] += usize::from(p);
        }
    }
    for (j, &n) in positives.iter().enumerate() {
        if n < shots {
            return Err(FewShotError::NotEnoughImages {
                class: j,
                name: class_name(label_names, j),
                available: n,
                requested: shots,
            });
        }
    }
    let mut order: Vec<usize> = (0..labels.len()).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    order.shuffle(&mut rng);
    let mut label_order: Vec<usize> = (0..num_labels).collect();
    label_order.sort_by_key(|&j| (positives[j], j));
    let mut chosen = vec![false; labels.len()];
    let mut have = vec![0usize; num_labels];
    for &j in &label_order {
        for &i in &order {
            if have[j] >= shots {
                break;
            }
            if !chosen[i] && labels[i][j] {
                chosen[i] = true;
                for (h, &p) in have.iter_mut().zip(&labels[i]) {
                    *h += usize::from(p);
                }
            }
        }
    }
    Ok((0..labels.len()).filter(|&i| chosen[i]).collect())
}
