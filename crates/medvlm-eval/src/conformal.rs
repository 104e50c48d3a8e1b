//! Split-conformal prediction sets for classification: APS and RAPS.
//!
//! * APS, adaptive prediction sets: Romano, Sesia & Candès, "Classification with Valid and
//!   Adaptive Coverage", NeurIPS 2020.
//! * RAPS, regularised APS: Angelopoulos, Bates, Malik & Jordan, "Uncertainty Sets for Image
//!   Classifiers using Conformal Prediction", ICLR 2021.
//!
//! Let `pi` be the classes sorted by decreasing probability (ties by lower class index) and
//! `o(x, y)` the 1-based rank of class `y`. The conformity score of a labelled example is
//!
//! `E(x, y, u) = sum_{j < o(x,y)} p_pi(j) + u * p_y + lambda * max(0, o(x,y) - k_reg)`
//!
//! with `lambda = 0` for APS. Non-randomised scoring uses `u = 1`; randomised scoring draws
//! `u ~ Uniform(0, 1)` from a seeded ChaCha8 generator (reproducible). On `n` calibration
//! examples the threshold `q_hat` is the `ceil((n + 1)(1 - alpha))`-th smallest score
//! (`+inf` if that exceeds `n`), which gives marginal coverage `>= 1 - alpha` on exchangeable
//! test data.
//!
//! Prediction sets:
//! * randomised: `C(x) = { y : E(x, y, u) <= q_hat }` with one `u` per test example (exactly
//!   the rule whose coverage the papers prove; the set can be empty);
//! * non-randomised: the smallest prefix of `pi` whose cumulative score (`u = 1`) exceeds
//!   `q_hat`, i.e. every class with `E(x, y, 1) <= q_hat` plus the next one (as in the RAPS
//!   reference implementation with `randomize=False`): never empty, conservative.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{check_labels, check_len, check_matrix, EvalError, Result};

/// Which conformity score to use.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ConformalScore {
    /// Adaptive prediction sets (Romano et al. 2020).
    Aps,
    /// Regularised APS (Angelopoulos et al. 2021): adds `lambda * max(0, rank - k_reg)`.
    Raps {
        /// Penalty per rank beyond `k_reg` (the paper's defaults are around 0.01-0.1).
        lambda: f64,
        /// Number of ranks that are not penalised.
        k_reg: usize,
    },
}

impl ConformalScore {
    fn penalty(&self, rank: usize) -> f64 {
        match *self {
            Self::Aps => 0.0,
            Self::Raps { lambda, k_reg } => lambda * rank.saturating_sub(k_reg) as f64,
        }
    }
}

/// Options of a split-conformal calibration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ConformalConfig {
    /// Score function.
    pub score: ConformalScore,
    /// Miscoverage level; target coverage is `1 - alpha` (default 0.1).
    pub alpha: f64,
    /// Randomised scores and sets (`u ~ U(0,1)`), giving coverage closer to exactly `1 - alpha`.
    pub randomized: bool,
    /// Seed of the generator that draws `u` (calibration uses `seed`, prediction `seed + 1`).
    pub seed: u64,
}

impl Default for ConformalConfig {
    fn default() -> Self {
        Self {
            score: ConformalScore::Aps,
            alpha: 0.1,
            randomized: false,
            seed: 0,
        }
    }
}

/// A calibrated split-conformal predictor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConformalPredictor {
    /// The options it was calibrated with.
    pub config: ConformalConfig,
    /// Number of classes.
    pub num_classes: usize,
    /// Number of calibration examples.
    pub n_calibration: usize,
    /// Score threshold; `None` when the calibration set is too small for the requested alpha
    /// (`ceil((n + 1)(1 - alpha)) > n`), in which case every set holds all classes.
    pub q_hat: Option<f64>,
}

/// Coverage and efficiency of conformal sets on a labelled test set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConformalReport {
    /// `1 - alpha`.
    pub target_coverage: f64,
    /// Fraction of test examples whose true class is in its set.
    pub coverage: f64,
    /// Mean number of classes per set.
    pub mean_set_size: f64,
    /// Number of empty sets (possible only with randomised sets).
    pub empty_sets: usize,
    /// Number of test examples.
    pub n: usize,
}

/// Classes of one probability row in decreasing probability order (ties: lower index first).
fn ranking(row: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
    order
}

/// Score `E(x, y, u)` of class `y` for one probability row.
pub fn conformity_score(row: &[f32], y: usize, u: f64, score: ConformalScore) -> f64 {
    let order = ranking(row);
    let mut before = 0.0f64;
    for (i, &c) in order.iter().enumerate() {
        if c == y {
            return before + u * row[c] as f64 + score.penalty(i + 1);
        }
        before += row[c] as f64;
    }
    f64::INFINITY
}

fn validate(config: &ConformalConfig) -> Result<()> {
    if !(config.alpha > 0.0 && config.alpha < 1.0) {
        return Err(EvalError::InvalidParameter {
            name: "alpha",
            reason: format!("must be in (0, 1), got {}", config.alpha),
        });
    }
    if let ConformalScore::Raps { lambda, .. } = config.score {
        if !(lambda >= 0.0 && lambda.is_finite()) {
            return Err(EvalError::InvalidParameter {
                name: "lambda",
                reason: format!("must be finite and >= 0, got {lambda}"),
            });
        }
    }
    Ok(())
}

impl ConformalPredictor {
    /// Calibrates on a row-major `n x num_classes` probability matrix (softmax outputs) and
    /// the true classes.
    pub fn calibrate(
        probs: &[f32],
        y_true: &[usize],
        num_classes: usize,
        config: ConformalConfig,
    ) -> Result<Self> {
        validate(&config)?;
        let n = check_matrix("probs", probs, num_classes)?;
        check_len("y_true", y_true.len(), n)?;
        if n == 0 {
            return Err(EvalError::Empty("no calibration examples"));
        }
        check_labels("y_true", y_true, num_classes)?;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let mut scores: Vec<f64> = probs
            .chunks_exact(num_classes)
            .zip(y_true)
            .map(|(row, &y)| {
                let u = if config.randomized {
                    rng.random::<f64>()
                } else {
                    1.0
                };
                conformity_score(row, y, u, config.score)
            })
            .collect();
        scores.sort_by(f64::total_cmp);
        let k = ((n as f64 + 1.0) * (1.0 - config.alpha)).ceil() as usize;
        let q_hat = if k > n {
            None
        } else {
            Some(scores[k.max(1) - 1])
        };
        Ok(Self {
            config,
            num_classes,
            n_calibration: n,
            q_hat,
        })
    }

    /// Prediction set (class indices, most probable first) of each row of `probs`.
    pub fn predict_sets(&self, probs: &[f32]) -> Result<Vec<Vec<usize>>> {
        check_matrix("probs", probs, self.num_classes)?;
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed.wrapping_add(1));
        Ok(probs
            .chunks_exact(self.num_classes)
            .map(|row| {
                let u = if self.config.randomized {
                    rng.random::<f64>()
                } else {
                    1.0
                };
                self.set_for_row(row, u)
            })
            .collect())
    }

    fn set_for_row(&self, row: &[f32], u: f64) -> Vec<usize> {
        let q_hat = self.q_hat.unwrap_or(f64::INFINITY);
        let order = ranking(row);
        let mut set = Vec::new();
        let mut before = 0.0f64;
        for (i, &c) in order.iter().enumerate() {
            let rank = i + 1;
            let p = row[c] as f64;
            if self.config.randomized {
                if before + u * p + self.config.score.penalty(rank) <= q_hat {
                    set.push(c);
                }
            } else {
                set.push(c);
                if before + p + self.config.score.penalty(rank) > q_hat {
                    break;
                }
            }
            before += p;
        }
        set
    }

    /// Predicts sets for a labelled test set and measures coverage and mean set size.
    pub fn evaluate(&self, probs: &[f32], y_true: &[usize]) -> Result<ConformalReport> {
        let n = check_matrix("probs", probs, self.num_classes)?;
        check_len("y_true", y_true.len(), n)?;
        if n == 0 {
            return Err(EvalError::Empty("no test examples"));
        }
        check_labels("y_true", y_true, self.num_classes)?;
        let sets = self.predict_sets(probs)?;
        let covered = sets
            .iter()
            .zip(y_true)
            .filter(|(s, y)| s.contains(y))
            .count();
        let total_size: usize = sets.iter().map(Vec::len).sum();
        Ok(ConformalReport {
            target_coverage: 1.0 - self.config.alpha,
            coverage: covered as f64 / n as f64,
            mean_set_size: total_size as f64 / n as f64,
            empty_sets: sets.iter().filter(|s| s.is_empty()).count(),
            n,
        })
    }
}
