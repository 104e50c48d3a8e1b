//! Temperature scaling of multi-class probabilities (Guo et al., "On Calibration of Modern
//! Neural Networks", ICML 2017): one scalar `T > 0` fitted on held-out calibration examples
//! by minimising the negative log-likelihood of `softmax(z / T)`, applied to new
//! predictions. It changes confidences, never the ranking of classes, so accuracy, AUROC and
//! the argmax are untouched.
//!
//! medvlm's classifiers hand over probabilities, not logits; `z = ln p` are logits of the
//! same softmax up to a per-row constant, which the softmax cancels, so
//! `softmax(ln p / T) = softmax(logits / T)` exactly (probabilities are floored at `1e-30`
//! before the logarithm).
//!
//! The fit minimises `NLL(b) = mean_i [logsumexp(b z_i) - b z_{i, y_i}]` over `b = 1/T`,
//! which is convex in `b`, by golden-section search on `ln T` in
//! [[`MIN_TEMPERATURE`], [`MAX_TEMPERATURE`]] to a relative precision of about `1e-7`. A
//! calibration set the classifier separates perfectly pushes `T` to the lower bound; the
//! result says when a bound was hit.

use serde::{Deserialize, Serialize};

use crate::error::{check_labels, check_len, check_matrix, EvalError, Result};

/// Smallest temperature searched.
pub const MIN_TEMPERATURE: f64 = 0.01;
/// Largest temperature searched.
pub const MAX_TEMPERATURE: f64 = 100.0;

/// Floor of a probability before its logarithm.
const PROB_FLOOR: f64 = 1e-30;

/// A fitted temperature and the calibration NLL before and after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Temperature {
    /// `T`: probabilities become `softmax(ln p / T)`; `T > 1` softens over-confident ones.
    pub temperature: f64,
    /// Mean negative log-likelihood of the calibration labels at `T = 1`.
    pub nll_before: f64,
    /// The same at the fitted `T`.
    pub nll_after: f64,
    /// Calibration examples.
    pub n: usize,
    /// `T` is at [`MIN_TEMPERATURE`] or [`MAX_TEMPERATURE`] (the optimum may lie beyond).
    pub at_bound: bool,
}

fn log_rows(probs: &[f32], c: usize) -> Vec<f64> {
    probs
        .iter()
        .map(|&p| (p as f64).max(PROB_FLOOR).ln())
        .collect::<Vec<_>>()
        .chunks_exact(c)
        .flat_map(|row| {
            // Shift each row to max 0 so that exp never overflows for small T.
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            row.iter().map(move |v| v - m).collect::<Vec<_>>()
        })
        .collect()
}

/// Mean NLL of `labels` under `softmax(b * z)` for shifted log-probabilities `z`.
fn nll(z: &[f64], labels: &[usize], c: usize, b: f64) -> f64 {
    let mut total = 0.0;
    for (row, &y) in z.chunks_exact(c).zip(labels) {
        let m = row.iter().map(|v| b * v).fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|v| (b * v - m).exp()).sum::<f64>().ln();
        total += lse - b * row[y];
    }
    total / labels.len() as f64
}

/// Fits `T` on calibration probabilities (`n x num_classes`, row-major) and their labels.
pub fn fit_temperature(probs: &[f32], labels: &[usize], num_classes: usize) -> Result<Temperature> {
    let n = check_matrix("probs", probs, num_classes)?;
    check_len("labels", labels.len(), n)?;
    check_labels("labels", labels, num_classes)?;
    if n == 0 {
        return Err(EvalError::Empty(
            "no calibration examples to fit a temperature",
        ));
    }
    if num_classes < 2 {
        return Err(EvalError::InvalidParameter {
            name: "num_classes",
            reason: "temperature scaling needs at least 2 classes".into(),
        });
    }
    let z = log_rows(probs, num_classes);
    // Golden-section search on ln T (NLL is convex in 1/T, hence unimodal in ln T).
    let f = |ln_t: f64| nll(&z, labels, num_classes, (-ln_t).exp());
    let (mut lo, mut hi) = (MIN_TEMPERATURE.ln(), MAX_TEMPERATURE.ln());
    let g = (5f64.sqrt() - 1.0) / 2.0;
    let mut x1 = hi - g * (hi - lo);
    let mut x2 = lo + g * (hi - lo);
    let (mut f1, mut f2) = (f(x1), f(x2));
    while hi - lo > 1e-7 {
        if f1 <= f2 {
            hi = x2;
            x2 = x1;
            f2 = f1;
            x1 = hi - g * (hi - lo);
            f1 = f(x1);
        } else {
            lo = x1;
            x1 = x2;
            f1 = f2;
            x2 = lo + g * (hi - lo);
            f2 = f(x2);
        }
    }
    let ln_t = 0.5 * (lo + hi);
    let temperature = ln_t.exp();
    let slack = 1e-5;
    Ok(Temperature {
        temperature,
        nll_before: f(0.0),
        nll_after: f(ln_t),
        n,
        at_bound: ln_t <= MIN_TEMPERATURE.ln() + slack || ln_t >= MAX_TEMPERATURE.ln() - slack,
    })
}

/// `softmax(ln p / T)` of each row of `probs` (`n x num_classes`).
pub fn apply_temperature(probs: &[f32], num_classes: usize, temperature: f64) -> Result<Vec<f32>> {
    check_matrix("probs", probs, num_classes)?;
    if !(temperature > 0.0 && temperature.is_finite()) {
        return Err(EvalError::InvalidParameter {
            name: "temperature",
            reason: format!("{temperature} must be finite and > 0"),
        });
    }
    let z = log_rows(probs, num_classes);
    let b = 1.0 / temperature;
    let mut out = Vec::with_capacity(probs.len());
    for row in z.chunks_exact(num_classes) {
        let e: Vec<f64> = row.iter().map(|v| (b * v).exp()).collect();
        let s: f64 = e.iter().sum();
        out.extend(e.iter().map(|v| (v / s) as f32));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn softmax(z: &[f64]) -> Vec<f64> {
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    /// Labels drawn from softmax(z) and a classifier reporting softmax(3 z): over-confident
    /// by exactly T = 3, which the fit must recover.
    fn overconfident(n: usize, c: usize, sharpen: f64, seed: u64) -> (Vec<f32>, Vec<usize>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut probs = Vec::with_capacity(n * c);
        let mut labels = Vec::with_capacity(n);
        for _ in 0..n {
            let z: Vec<f64> = (0..c).map(|_| rng.random_range(-2.0..2.0)).collect();
            let p = softmax(&z);
            let u: f64 = rng.random();
            let mut acc = 0.0;
            let mut y = c - 1;
            for (k, pk) in p.iter().enumerate() {
                acc += pk;
                if u < acc {
                    y = k;
                    break;
                }
            }
            labels.push(y);
            let sharp: Vec<f64> = z.iter().map(|v| v * sharpen).collect();
            probs.extend(softmax(&sharp).iter().map(|&v| v as f32));
        }
        (probs, labels)
    }

    #[test]
    fn recovers_the_temperature_of_an_overconfident_classifier() {
        let (probs, labels) = overconfident(6000, 4, 3.0, 7);
        let t = fit_temperature(&probs, &labels, 4).unwrap();
        assert!((t.temperature - 3.0).abs() < 0.3, "{t:?}");
        assert!(t.nll_after < t.nll_before, "{t:?}");
        assert!(!t.at_bound);
        // The fit is the minimum: nearby temperatures are no better.
        let z = log_rows(&probs, 4);
        for dt in [0.97, 1.03] {
            let other = nll(&z, &labels, 4, 1.0 / (t.temperature * dt));
            assert!(
                other >= t.nll_after - 1e-12,
                "{dt}: {other} < {}",
                t.nll_after
            );
        }
        // An under-confident one (softmax(z / 2)) gets T < 1.
        let (probs, labels) = overconfident(6000, 4, 0.5, 8);
        let t = fit_temperature(&probs, &labels, 4).unwrap();
        assert!((t.temperature - 0.5).abs() < 0.08, "{t:?}");
    }

    #[test]
    fn applying_it_keeps_the_ranking_and_matches_softmax_of_scaled_logits() {
        let logits = [2.0f64, -1.0, 0.5, 4.0, 0.0, -3.0];
        let probs: Vec<f32> = logits
            .chunks(3)
            .flat_map(softmax)
            .map(|v| v as f32)
            .collect();
        let out = apply_temperature(&probs, 3, 2.0).unwrap();
        let want: Vec<f64> = logits
            .chunks(3)
            .flat_map(|r| softmax(&r.iter().map(|v| v / 2.0).collect::<Vec<_>>()))
            .collect();
        for (o, w) in out.iter().zip(&want) {
            assert!((*o as f64 - w).abs() < 1e-6, "{o} vs {w}");
        }
        assert!(apply_temperature(&probs, 3, 0.0).is_err());
        assert!(apply_temperature(&probs[..4], 3, 1.0).is_err());
    }

    #[test]
    fn a_separable_calibration_set_hits_the_lower_bound_and_says_so() {
        let probs = [0.9f32, 0.1, 0.2, 0.8];
        let t = fit_temperature(&probs, &[0, 1], 2).unwrap();
        assert!(t.at_bound && t.temperature < 0.0101, "{t:?}");
        assert!(fit_temperature(&[], &[], 2).is_err());
        assert!(fit_temperature(&probs, &[0, 2], 2).is_err());
    }
}
