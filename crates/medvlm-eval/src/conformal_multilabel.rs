//! Split conformal risk control of the false-negative rate of multi-label prediction sets.
//!
//! Angelopoulos, Bates, Fisch, Lei & Schuster, "Conformal Risk Control", ICLR 2024
//! (section 3, "Multilabel classification": controlling the false-negative rate).
//!
//! Given per-label probabilities `p_k(x)` (independent sigmoids, one per label), the label
//! set at level `lambda` in `[0, 1]` is
//!
//! `C_lambda(x) = { k : p_k(x) >= 1 - lambda }`
//!
//! and the loss of an example with true label set `Y_i` is its false-negative rate
//!
//! `L_i(lambda) = 1 - |C_lambda(x_i) ∩ Y_i| / |Y_i|`,
//!
//! with `L_i = 0` for examples without any positive label (they cannot have a false
//! negative; they are kept in `n` and counted in the report). `L_i` is non-increasing in
//! `lambda`, bounded by `B = 1`, and `L_i(1) = 0` (every label is in `C_1`). On `n`
//! calibration examples with empirical risk `Rhat_n(lambda) = (1/n) sum_i L_i(lambda)`,
//!
//! `lambda_hat = inf { lambda : n/(n+1) * Rhat_n(lambda) + B/(n+1) <= alpha }`
//!
//! gives `E[L_{n+1}(lambda_hat)] <= alpha` on exchangeable calibration and test data
//! (Theorem 1 of the paper): the expected false-negative rate of the test label sets is at
//! most `alpha`. `Rhat_n` only changes where `1 - lambda` crosses the probability of a
//! calibration positive, so the infimum is attained on the finite candidate set
//! `{ lambda = 1 - p_ik : y_ik = 1 } ∪ { 0 }`; it is found exactly by one sorted pass, and the
//! set rule is applied as `p_k(x) >= threshold` with `threshold = 1 - lambda_hat` kept equal to
//! the calibration probability it came from (no `1 - (1 - p)` rounding).
//!
//! When `(n + 1) * alpha < 1` no `lambda` satisfies the condition; then `lambda_hat = 1`
//! (`lambda_max` in the paper: every label in every set, loss 0) and the report says the
//! calibration set is too small.

use serde::{Deserialize, Serialize};

use crate::error::{check_len, check_matrix, EvalError, Result};

/// Bound of the false-negative-rate loss (`B` of the paper).
pub const FNR_LOSS_BOUND: f64 = 1.0;

/// A calibrated false-negative-rate controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FnrController {
    /// Target expected false-negative rate.
    pub alpha: f64,
    /// Number of labels.
    pub num_labels: usize,
    /// Number of calibration examples `n` (those without positives included).
    pub n_calibration: usize,
    /// Calibration examples without any positive label (loss 0 at every `lambda`).
    pub n_calibration_without_positives: usize,
    /// `lambda_hat` in `[0, 1]`.
    pub lambda_hat: f64,
    /// Probability threshold `1 - lambda_hat`: label `k` is in the set when `p_k >= threshold`.
    pub threshold: f32,
    /// `Rhat_n(lambda_hat)`: mean false-negative rate of the calibration sets.
    pub calibration_fnr: f64,
    /// `(n * Rhat_n(lambda_hat) + B) / (n + 1)`, at most `alpha` unless `too_small`.
    pub calibration_bound: f64,
    /// `(n + 1) * alpha < B`: no `lambda` meets the condition, so every set holds every label.
    pub too_small: bool,
}

/// False-negative-rate control on a labelled test set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FnrControlReport {
    /// Target expected false-negative rate `alpha`.
    pub target_alpha: f64,
    /// Calibrated `lambda_hat`.
    pub lambda_hat: f64,
    /// Probability threshold `1 - lambda_hat` of the sets.
    pub threshold: f32,
    /// Number of calibration examples.
    pub n_calibration: usize,
    /// Calibration examples without any positive label (loss 0, counted in `n_calibration`).
    pub n_calibration_without_positives: usize,
    /// Mean false-negative rate of the calibration sets at `lambda_hat`.
    pub calibration_fnr: f64,
    /// The calibration set was too small for `alpha` (`(n + 1) * alpha < 1`): every label is
    /// in every set.
    pub calibration_too_small: bool,
    /// Number of test examples.
    pub n: usize,
    /// Test examples without any positive label (loss 0, counted in `n` and in `fnr`).
    pub n_without_positives: usize,
    /// Mean false-negative rate of the test sets over all `n` examples (the quantity whose
    /// expectation is at most `alpha`).
    pub fnr: f64,
    /// Mean false-negative rate over the test examples with at least one positive label
    /// (`None` when there are none).
    pub fnr_with_positives: Option<f64>,
    /// Mean number of labels per set.
    pub mean_set_size: f64,
    /// Fraction of test examples whose set is empty.
    pub empty_set_fraction: f64,
    /// Test positives of each label.
    pub per_label_positives: Vec<usize>,
    /// Recall of each label: the share of its test positives whose set contains it (`None`
    /// when the label has no test positive).
    pub per_label_coverage: Vec<Option<f64>>,
}

/// `L(x, Y)` at `threshold`: `1 - |C ∩ Y| / |Y|`, `None` when `Y` is empty.
pub fn false_negative_rate(probs: &[f32], targets: &[bool], threshold: f32) -> Option<f64> {
    let positives = targets.iter().filter(|&&t| t).count();
    if positives == 0 {
        return None;
    }
    let found = probs
        .iter()
        .zip(targets)
        .filter(|&(&p, &t)| t && p >= threshold)
        .count();
    Some(1.0 - found as f64 / positives as f64)
}

fn check_alpha(alpha: f64) -> Result<()> {
    if !(alpha > 0.0 && alpha < 1.0) {
        return Err(EvalError::InvalidParameter {
            name: "alpha",
            reason: format!("must be in (0, 1), got {alpha}"),
        });
    }
    Ok(())
}

/// Checks an `n x num_labels` probability matrix (values in `[0, 1]`) with its targets and
/// returns `n`.
fn check_inputs(probs: &[f32], targets: &[bool], num_labels: usize) -> Result<usize> {
    let n = check_matrix("probs", probs, num_labels)?;
    check_len("targets", targets.len(), probs.len())?;
    if let Some(position) = probs.iter().position(|p| !(0.0..=1.0).contains(p)) {
        return Err(EvalError::InvalidParameter {
            name: "probs",
            reason: format!(
                "value {} at position {position} is not a probability in [0, 1]",
                probs[position]
            ),
        });
    }
    Ok(n)
}

impl FnrController {
    /// Calibrates `lambda_hat` on row-major `n x num_labels` per-label probabilities and
    /// multi-hot targets of the same shape.
    pub fn calibrate(
        probs: &[f32],
        targets: &[bool],
        num_labels: usize,
        alpha: f64,
    ) -> Result<Self> {
        check_alpha(alpha)?;
        let n = check_inputs(probs, targets, num_labels)?;
        if n == 0 {
            return Err(EvalError::Empty("no calibration examples"));
        }
        // Every calibration positive as (probability, its weight 1/|Y_i| in the summed loss).
        let mut positives: Vec<(f32, f64)> = Vec::new();
        let mut without = 0usize;
        for (row_p, row_t) in probs
            .chunks_exact(num_labels)
            .zip(targets.chunks_exact(num_labels))
        {
            let m = row_t.iter().filter(|&&t| t).count();
            if m == 0 {
                without += 1;
                continue;
            }
            let w = 1.0 / m as f64;
            positives.extend(
                row_p
                    .iter()
                    .zip(row_t)
                    .filter(|(_, &t)| t)
                    .map(|(&p, _)| (p, w)),
            );
        }
        positives.sort_by(|a, b| a.0.total_cmp(&b.0));
        // n * Rhat_n at threshold t is the summed weight of positives with p < t, which grows
        // with t; the condition (n Rhat + B) / (n + 1) <= alpha holds for t up to some
        // candidate. Walk the distinct probabilities upwards and keep the last that holds;
        // then try t = 1 (lambda = 0).
        let holds = |sum: f64| (sum + FNR_LOSS_BOUND) / (n as f64 + 1.0) <= alpha;
        let mut best: Option<(f32, f64)> = None;
        let mut below = 0.0f64;
        let mut i = 0;
        while i < positives.len() {
            let t = positives[i].0;
            if !holds(below) {
                break;
            }
            best = Some((t, below));
            while i < positives.len() && positives[i].0 == t {
                below += positives[i].1;
                i += 1;
            }
        }
        if i == positives.len() {
            // Every positive is below or at the last candidate; t = 1 adds those below 1.
            let below_one: f64 = positives
                .iter()
                .filter(|(p, _)| *p < 1.0)
                .map(|(_, w)| w)
                .sum();
            if holds(below_one) {
                best = Some((1.0, below_one));
            }
        }
        let (threshold, sum, too_small) = match best {
            Some((t, sum)) => (t, sum, false),
            // Not even the lowest candidate (loss 0) meets the condition: lambda_max = 1.
            None => (0.0, 0.0, true),
        };
        Ok(Self {
            alpha,
            num_labels,
            n_calibration: n,
            n_calibration_without_positives: without,
            lambda_hat: 1.0 - threshold as f64,
            threshold,
            calibration_fnr: sum / n as f64,
            calibration_bound: (sum + FNR_LOSS_BOUND) / (n as f64 + 1.0),
            too_small,
        })
    }

    /// Label set (label indices, ascending) of each row of `probs`.
    pub fn predict_sets(&self, probs: &[f32]) -> Result<Vec<Vec<usize>>> {
        check_matrix("probs", probs, self.num_labels)?;
        Ok(probs
            .chunks_exact(self.num_labels)
            .map(|row| {
                (0..self.num_labels)
                    .filter(|&k| row[k] >= self.threshold)
                    .collect()
            })
            .collect())
    }

    /// Measures the false-negative rate, set sizes and per-label recall of the sets on a
    /// labelled test set.
    pub fn evaluate(&self, probs: &[f32], targets: &[bool]) -> Result<FnrControlReport> {
        let c = self.num_labels;
        let n = check_inputs(probs, targets, c)?;
        if n == 0 {
            return Err(EvalError::Empty("no test examples"));
        }
        let mut loss_sum = 0.0f64;
        let mut without = 0usize;
        let mut set_sizes = 0usize;
        let mut empty = 0usize;
        let mut positives = vec![0usize; c];
        let mut covered = vec![0usize; c];
        for (row_p, row_t) in probs.chunks_exact(c).zip(targets.chunks_exact(c)) {
            match false_negative_rate(row_p, row_t, self.threshold) {
                Some(l) => loss_sum += l,
                None => without += 1,
            }
            let size = row_p.iter().filter(|&&p| p >= self.threshold).count();
            set_sizes += size;
            empty += usize::from(size == 0);
            for k in 0..c {
                if row_t[k] {
                    positives[k] += 1;
                    covered[k] += usize::from(row_p[k] >= self.threshold);
                }
            }
        }
        let with = n - without;
        Ok(FnrControlReport {
            target_alpha: self.alpha,
            lambda_hat: self.lambda_hat,
            threshold: self.threshold,
            n_calibration: self.n_calibration,
            n_calibration_without_positives: self.n_calibration_without_positives,
            calibration_fnr: self.calibration_fnr,
            calibration_too_small: self.too_small,
            n,
            n_without_positives: without,
            fnr: loss_sum / n as f64,
            fnr_with_positives: (with > 0).then(|| loss_sum / with as f64),
            mean_set_size: set_sizes as f64 / n as f64,
            empty_set_fraction: empty as f64 / n as f64,
            per_label_coverage: positives
                .iter()
                .zip(&covered)
                .map(|(&p, &c)| (p > 0).then(|| c as f64 / p as f64))
                .collect(),
            per_label_positives: positives,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn loss_is_the_share_of_missed_positives() {
        let p = [0.9, 0.4, 0.7];
        assert_eq!(
            false_negative_rate(&p, &[true, true, false], 0.5),
            Some(0.5)
        );
        assert_eq!(false_negative_rate(&p, &[true, true, true], 0.4), Some(0.0));
        assert_eq!(
            false_negative_rate(&p, &[false, true, true], 0.95),
            Some(1.0)
        );
        assert_eq!(false_negative_rate(&p, &[false; 3], 0.5), None);
    }

    /// Four calibration examples, two labels, alpha = 0.4, so (n + 1) alpha = 2 and the
    /// condition is `S + 1 <= 2`, `S` the summed loss `n * Rhat`.
    ///
    /// Positives (probability, weight 1/|Y_i|):
    /// * x1 = (0.9, 0.2), Y = {0}: (0.9, 1)
    /// * x2 = (0.3, 0.8), Y = {0, 1}: (0.3, 1/2), (0.8, 1/2)
    /// * x3 = (0.6, 0.1), Y = {} : loss 0
    /// * x4 = (0.5, 0.7), Y = {1}: (0.7, 1)
    ///
    /// S(t) = weight of positives with p < t: S(1) = 3, S(0.9) = 2, S(0.8) = 1.5,
    /// S(0.7) = 0.5, S(0.3) = 0. The largest candidate with S <= 1 is t = 0.7, so
    /// lambda_hat = 0.3, Rhat = 0.5/4 = 0.125, bound = (0.5 + 1)/5 = 0.3.
    #[test]
    fn lambda_hat_by_hand_on_four_examples() {
        let probs = [0.9, 0.2, 0.3, 0.8, 0.6, 0.1, 0.5, 0.7];
        let targets = [true, false, true, true, false, false, false, true];
        let ctl = FnrController::calibrate(&probs, &targets, 2, 0.4).unwrap();
        assert_eq!(ctl.threshold, 0.7);
        assert!((ctl.lambda_hat - 0.3).abs() < 1e-6, "{}", ctl.lambda_hat);
        assert_eq!(ctl.n_calibration, 4);
        assert_eq!(ctl.n_calibration_without_positives, 1);
        assert!((ctl.calibration_fnr - 0.125).abs() < 1e-12);
        assert!((ctl.calibration_bound - 0.3).abs() < 1e-12);
        assert!(!ctl.too_small);
        // A looser target admits t = 0.8 (S = 1.5: (1.5 + 1)/5 = 0.5 <= 0.5), a tighter
        // one only t = 0.3 (S = 0: 1/5 = 0.2 <= 0.2, while S(0.7) gives 0.3).
        let loose = FnrController::calibrate(&probs, &targets, 2, 0.5).unwrap();
        assert_eq!(loose.threshold, 0.8);
        assert!((loose.calibration_fnr - 0.375).abs() < 1e-12);
        let tight = FnrController::calibrate(&probs, &targets, 2, 0.2).unwrap();
        assert_eq!(tight.threshold, 0.3);
        assert_eq!(tight.calibration_fnr, 0.0);
        // (1 + 3)/5 = 0.8 <= alpha = 0.85: lambda = 0 (threshold 1) is enough.
        let zero = FnrController::calibrate(&probs, &targets, 2, 0.85).unwrap();
        assert_eq!(zero.threshold, 1.0);
        assert_eq!(zero.lambda_hat, 0.0);
        assert!((zero.calibration_fnr - 0.75).abs() < 1e-12);
        // (n + 1) alpha = 0.5 < 1: no lambda qualifies, every label is in every set.
        let small = FnrController::calibrate(&probs, &targets, 2, 0.1).unwrap();
        assert!(small.too_small);
        assert_eq!(small.lambda_hat, 1.0);
        assert_eq!(small.predict_sets(&probs).unwrap()[2], vec![0, 1]);
    }

    /// Three examples, one label each, tied probabilities: a tie is one candidate, and the
    /// set rule includes probabilities equal to the threshold.
    #[test]
    fn tied_probabilities_form_one_candidate() {
        // Positives: 0.5 (x1), 0.5 (x2), 0.9 (x3); alpha = 0.5: (S + 1)/4 <= 0.5, S <= 1.
        // S(0.9) = 2 fails, S(0.5) = 0 holds: threshold 0.5.
        let probs = [0.5, 0.5, 0.9];
        let targets = [true, true, true];
        let ctl = FnrController::calibrate(&probs, &targets, 1, 0.5).unwrap();
        assert_eq!(ctl.threshold, 0.5);
        assert_eq!(
            ctl.predict_sets(&[0.5, 0.49]).unwrap(),
            vec![vec![0], vec![]]
        );
    }

    #[test]
    fn test_report_by_hand() {
        let ctl = FnrController {
            alpha: 0.2,
            num_labels: 3,
            n_calibration: 10,
            n_calibration_without_positives: 0,
            lambda_hat: 0.5,
            threshold: 0.5,
            calibration_fnr: 0.1,
            calibration_bound: 0.2,
            too_small: false,
        };
        // Sets: {0, 2}, {}, {1}, {0, 1, 2}.
        let probs = [
            0.9, 0.1, 0.5, //
            0.2, 0.3, 0.4, //
            0.1, 0.6, 0.2, //
            0.7, 0.8, 0.99,
        ];
        let targets = [
            true, true, false, // loss 1/2
            false, false, false, // no positive
            true, true, true, // loss 2/3
            false, false, true, // loss 0
        ];
        let r = ctl.evaluate(&probs, &targets).unwrap();
        assert_eq!(r.n, 4);
        assert_eq!(r.n_without_positives, 1);
        let total = 0.5 + 2.0 / 3.0;
        assert!((r.fnr - total / 4.0).abs() < 1e-12);
        assert!((r.fnr_with_positives.unwrap() - total / 3.0).abs() < 1e-12);
        assert!((r.mean_set_size - 6.0 / 4.0).abs() < 1e-12);
        assert!((r.empty_set_fraction - 0.25).abs() < 1e-12);
        assert_eq!(r.per_label_positives, vec![2, 2, 2]);
        assert_eq!(r.per_label_coverage, vec![Some(0.5), Some(0.5), Some(0.5)]);
        // A label without test positives has no coverage.
        let r = ctl.evaluate(&probs[..3], &[true, false, false]).unwrap();
        assert_eq!(r.per_label_coverage, vec![Some(1.0), None, None]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let p = [0.2, 0.8];
        let t = [true, false];
        assert!(matches!(
            FnrController::calibrate(&p, &t, 2, 0.0),
            Err(EvalError::InvalidParameter { name: "alpha", .. })
        ));
        assert!(matches!(
            FnrController::calibrate(&p, &t, 2, 1.0),
            Err(EvalError::InvalidParameter { name: "alpha", .. })
        ));
        assert!(matches!(
            FnrController::calibrate(&p, &t[..1], 2, 0.1),
            Err(EvalError::LengthMismatch { .. })
        ));
        assert!(matches!(
            FnrController::calibrate(&p, &t, 3, 0.1),
            Err(EvalError::InvalidParameter { name: "probs", .. })
        ));
        assert!(matches!(
            FnrController::calibrate(&[], &[], 2, 0.1),
            Err(EvalError::Empty(_))
        ));
        assert!(matches!(
            FnrController::calibrate(&[0.2, 1.5], &t, 2, 0.1),
            Err(EvalError::InvalidParameter { name: "probs", .. })
        ));
        assert!(matches!(
            FnrController::calibrate(&[0.2, f32::NAN], &t, 2, 0.1),
            Err(EvalError::NonFinite { .. })
        ));
        let ctl = FnrController::calibrate(&[0.2; 20], &[true; 20], 2, 0.1).unwrap();
        assert!(matches!(
            ctl.evaluate(&p, &t[..1]),
            Err(EvalError::LengthMismatch { .. })
        ));
        assert!(matches!(ctl.evaluate(&[], &[]), Err(EvalError::Empty(_))));
        assert!(ctl.predict_sets(&[0.1, 0.2, 0.3]).is_err());
    }

    /// Five labels with prevalence 0.3; the probability of a label is a noisy sigmoid of its
    /// presence, so the classifier is informative but imperfect. Some examples have no
    /// positive label.
    fn synthetic(rng: &mut ChaCha8Rng, n: usize, c: usize) -> (Vec<f32>, Vec<bool>) {
        let mut probs = Vec::with_capacity(n * c);
        let mut targets = Vec::with_capacity(n * c);
        for _ in 0..n * c {
            let y = rng.random::<f64>() < 0.3;
            // Sum of three uniforms: a bell-shaped noise with std 1.
            let noise: f64 = (0..3).map(|_| rng.random::<f64>() - 0.5).sum::<f64>() * 2.0;
            let logit = if y { 1.0 } else { -1.0 } + 1.5 * noise;
            probs.push((1.0 / (1.0 + (-logit).exp())) as f32);
            targets.push(y);
        }
        (probs, targets)
    }

    /// Over 30 seeded draws (1000 calibration, 2000 test examples) the mean test FNR is at
    /// most alpha (up to the Monte-Carlo error of the mean) and close to it: conformal risk
    /// control is tight, not merely conservative.
    #[test]
    fn test_fnr_is_controlled_on_synthetic_data() {
        let c = 5;
        for alpha in [0.1, 0.2] {
            let mut fnrs = Vec::new();
            for seed in 0..30u64 {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let (cp, ct) = synthetic(&mut rng, 1000, c);
                let (tp, tt) = synthetic(&mut rng, 2000, c);
                let ctl = FnrController::calibrate(&cp, &ct, c, alpha).unwrap();
                assert!(ctl.calibration_bound <= alpha);
                assert!(ctl.n_calibration_without_positives > 0);
                let r = ctl.evaluate(&tp, &tt).unwrap();
                assert!(r.n_without_positives > 0);
                // Sets are not all labels: the threshold is informative.
                assert!(r.mean_set_size < c as f64, "{}", r.mean_set_size);
                fnrs.push(r.fnr);
            }
            let mean = fnrs.iter().sum::<f64>() / fnrs.len() as f64;
            assert!(mean <= alpha + 0.005, "alpha {alpha}: mean FNR {mean}");
            assert!(mean >= alpha - 0.02, "alpha {alpha}: mean FNR {mean}");
        }
    }
}
