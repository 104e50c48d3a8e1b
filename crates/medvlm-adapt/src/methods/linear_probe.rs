//! Linear probe: L2-regularised logistic regression on frozen image
//! embeddings (Radford et al., ICML 2021, CLIP, appendix A.3).
//!
//! CLIP fits scikit-learn's `LogisticRegression` (L-BFGS, objective
//! `C * sum_i CE_i + ||W||^2 / 2`, unpenalised intercept) and chooses `C` on a
//! validation split. We minimise the same objective divided by N,
//! `mean_i CE_i + ||W||^2 / (2 C N)`, with our L-BFGS ([`super::solver`]),
//! on L2-normalised embeddings (the convention of every method here).
//! Multi-class tasks use the multinomial (softmax) loss; multi-label tasks
//! an independent logistic loss per label.
//!
//! There is no validation set in the few-shot protocol, so:
//! * [`HyperparameterPolicy::Fixed`]: `C = c` (default 10, fixed a priori);
//! * [`HyperparameterPolicy::SupportCv`]: `C` chosen from `c_grid`
//!   (default {0.1, 1, 10, 100, 1000}) by stratified k-fold cross-validation
//!   on the support set (mean held-out log-loss; folds capped by the smallest
//!   class count; ties go to the smaller C), then refitted on the whole
//!   support set.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::solver::{minimize, LbfgsOptions};
use super::to_rows_f64;
use crate::method::{
    l2_normalize, make_card, normalized_input, AdaptInput, AdaptationMethod, AdaptedClassifier,
    ClassifierCard, HyperparameterPolicy, MethodError, Result, SavedTensors, SupportLabels,
};

/// Linear-probe hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinearProbe {
    /// Inverse regularisation strength C (scikit-learn's convention).
    pub c: f64,
    /// Grid searched under support-set cross-validation.
    pub c_grid: Vec<f64>,
    /// Maximum L-BFGS iterations.
    pub max_iter: usize,
}

impl Default for LinearProbe {
    fn default() -> Self {
        Self {
            c: 10.0,
            c_grid: vec![0.1, 1.0, 10.0, 100.0, 1000.0],
            max_iter: 500,
        }
    }
}

/// Targets of the logistic regression.
enum Targets<'a> {
    Classes(&'a [usize]),
    Multi(&'a [Vec<bool>]),
}

/// Fitted weights `[C][D]` and biases `[C]`.
struct Fit {
    w: Vec<f64>,
    b: Vec<f64>,
    converged: bool,
}

/// Regularised mean loss and its gradient for parameters `theta` = W
/// (row-major `[C, D]`) followed by b `[C]`.
fn objective(
    x: &[Vec<f64>],
    y: &Targets,
    c_classes: usize,
    inv_c: f64,
    theta: &[f64],
    grad: &mut [f64],
) -> f64 {
    let n = x.len();
    let d = x.first().map_or(0, Vec::len);
    let (w, b) = theta.split_at(c_classes * d);
    grad.iter_mut().for_each(|g| *g = 0.0);
    let mut loss = 0.0;
    let mut z = vec![0.0; c_classes];
    let mut r = vec![0.0; c_classes];
    for (i, xi) in x.iter().enumerate() {
        for k in 0..c_classes {
            z[k] = b[k]
                + xi.iter()
                    .zip(&w[k * d..(k + 1) * d])
                    .map(|(a, b)| a * b)
                    .sum::<f64>();
        }
        match y {
            Targets::Classes(labels) => {
                let m = z.iter().fold(f64::NEG_INFINITY, |m, v| m.max(*v));
                let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                loss += lse - z[labels[i]];
                for k in 0..c_classes {
                    r[k] = (z[k] - lse).exp() - f64::from(u8::from(k == labels[i]));
                }
            }
            Targets::Multi(rows) => {
                for k in 0..c_classes {
                    let t = f64::from(u8::from(rows[i][k]));
                    // Stable BCE with logits: max(z,0) - z t + ln(1 + e^-|z|).
                    loss += z[k].max(0.0) - z[k] * t + (-z[k].abs()).exp().ln_1p();
                    r[k] = 1.0 / (1.0 + (-z[k]).exp()) - t;
                }
            }
        }
        for k in 0..c_classes {
            let rk = r[k];
            for (g, xv) in grad[k * d..(k + 1) * d].iter_mut().zip(xi) {
                *g += rk * xv;
            }
            grad[c_classes * d + k] += rk;
        }
    }
    let nf = n as f64;
    grad.iter_mut().for_each(|g| *g /= nf);
    let reg = inv_c / nf;
    let mut pen = 0.0;
    for (g, wv) in grad[..c_classes * d].iter_mut().zip(w) {
        *g += reg * wv;
        pen += wv * wv;
    }
    loss / nf + 0.5 * reg * pen
}

fn fit_lr(x: &[Vec<f64>], y: &Targets, c_classes: usize, c: f64, max_iter: usize) -> Fit {
    let d = x.first().map_or(0, Vec::len);
    let theta0 = vec![0.0; c_classes * (d + 1)];
    let res = minimize(
        theta0,
        |t, g| objective(x, y, c_classes, 1.0 / c, t, g),
        LbfgsOptions {
            max_iter,
            ..Default::default()
        },
    );
    let (w, b) = res.x.split_at(c_classes * d);
    Fit {
        w: w.to_vec(),
        b: b.to_vec(),
        converged: res.converged,
    }
}

/// Mean held-out log-loss of a fit.
fn held_out_loss(fit: &Fit, x: &[Vec<f64>], y: &Targets, c_classes: usize) -> f64 {
    let mut theta = fit.w.clone();
    theta.extend_from_slice(&fit.b);
    let mut g = vec![0.0; theta.len()];
    // inv_c = 0: the pure data term.
    objective(x, y, c_classes, 0.0, &theta, &mut g)
}

impl LinearProbe {
    /// Chooses C by stratified k-fold CV on the support set.
    fn choose_c(
        &self,
        x: &[Vec<f64>],
        labels: &SupportLabels,
        c_classes: usize,
        folds: usize,
        seed: u64,
    ) -> Result<(f64, usize)> {
        let n = x.len();
        let (fold_of, k) = super::support_folds(labels, c_classes, folds, seed);
        if k < 2 {
            // One image in some class: CV impossible, keep the fixed default.
            return Ok((self.c, 0));
        }
        let mut best = (f64::INFINITY, self.c);
        for &c in &self.c_grid {
            if !(c.is_finite() && c > 0.0) {
                return Err(MethodError::BadHyperparameters {
                    method: "linear-probe".into(),
                    reason: format!("C = {c} must be > 0"),
                });
            }
            let mut total = 0.0;
            for f in 0..k {
                let split = |keep: bool| -> Vec<usize> {
                    (0..n).filter(|&i| (fold_of[i] == f) != keep).collect()
                };
                let (tr, te) = (split(true), split(false));
                let pick = |idx: &[usize]| -> Vec<Vec<f64>> {
                    idx.iter().map(|&i| x[i].clone()).collect()
                };
                let (xtr, xte) = (pick(&tr), pick(&te));
                let loss = match labels {
                    SupportLabels::MultiClass(l) => {
                        let ytr: Vec<usize> = tr.iter().map(|&i| l[i]).collect();
                        let yte: Vec<usize> = te.iter().map(|&i| l[i]).collect();
                        let fit =
                            fit_lr(&xtr, &Targets::Classes(&ytr), c_classes, c, self.max_iter);
                        held_out_loss(&fit, &xte, &Targets::Classes(&yte), c_classes)
                    }
                    SupportLabels::MultiLabel(rows) => {
                        let ytr: Vec<Vec<bool>> = tr.iter().map(|&i| rows[i].clone()).collect();
                        let yte: Vec<Vec<bool>> = te.iter().map(|&i| rows[i].clone()).collect();
                        let fit = fit_lr(&xtr, &Targets::Multi(&ytr), c_classes, c, self.max_iter);
                        held_out_loss(&fit, &xte, &Targets::Multi(&yte), c_classes)
                    }
                };
                total += loss;
            }
            if total < best.0 {
                best = (total, c);
            }
        }
        Ok((best.1, k))
    }
}

impl AdaptationMethod for LinearProbe {
    fn name(&self) -> &'static str {
        "linear-probe"
    }

    fn requires_encoder(&self) -> bool {
        false
    }

    fn hyperparameters(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    fn fit(&self, input: &AdaptInput) -> Result<Box<dyn AdaptedClassifier>> {
        let (_, d) = input.validate()?;
        if !(self.c.is_finite() && self.c > 0.0) {
            return Err(MethodError::BadHyperparameters {
                method: self.name().into(),
                reason: format!("C = {} must be > 0", self.c),
            });
        }
        let c_classes = input.texts.num_classes();
        let x = to_rows_f64(&l2_normalize(
            &input.support.features.to_dtype(DType::F32)?,
        )?)?;
        let labels = &input.support.labels;
        let (c, folds) = match input.policy {
            HyperparameterPolicy::Fixed => (self.c, 0),
            HyperparameterPolicy::SupportCv { folds } => {
                self.choose_c(&x, labels, c_classes, folds, input.seed)?
            }
        };
        let fit = match labels {
            SupportLabels::MultiClass(l) => {
                fit_lr(&x, &Targets::Classes(l), c_classes, c, self.max_iter)
            }
            SupportLabels::MultiLabel(rows) => {
                fit_lr(&x, &Targets::Multi(rows), c_classes, c, self.max_iter)
            }
        };
        let device = input.support.features.device();
        let weight = Tensor::from_vec(
            fit.w.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            (c_classes, d),
            device,
        )?;
        let bias = Tensor::from_vec(
            fit.b.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            c_classes,
            device,
        )?;
        let hyper = LinearProbe { c, ..self.clone() };
        let info =
            serde_json::json!({ "chosen_c": c, "cv_folds": folds, "converged": fit.converged });
        let card = make_card(self, input, labels.task(), hyper.hyperparameters(), info)?;
        Ok(Box::new(LinearProbeClassifier { card, weight, bias }))
    }
}

/// A fitted linear probe: `logits = norm(f) W^T + b`.
#[derive(Debug, Clone)]
pub struct LinearProbeClassifier {
    card: ClassifierCard,
    weight: Tensor,
    bias: Tensor,
}

impl LinearProbeClassifier {
    /// Rebuilds from a saved card and tensors.
    pub fn from_saved(card: ClassifierCard, saved: &SavedTensors) -> Result<Self> {
        let c = card.class_names.len();
        Ok(Self {
            weight: saved.get_shaped("probe.weight", &[c, card.feature_dim])?,
            bias: saved.get_shaped("probe.bias", &[c])?,
            card,
        })
    }
}

impl AdaptedClassifier for LinearProbeClassifier {
    fn card(&self) -> &ClassifierCard {
        &self.card
    }

    fn logits(&self, image_features: &Tensor) -> Result<Tensor> {
        let f = normalized_input(&self.card, image_features)?;
        Ok(f.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?)
    }

    fn tensors(&self) -> Vec<(String, Tensor)> {
        vec![
            ("probe.weight".into(), self.weight.clone()),
            ("probe.bias".into(), self.bias.clone()),
        ]
    }
}

/// Exposed for tests: the linear-probe objective's value and gradient for
/// multi-class labels (`theta` = W row-major then b).
pub fn multiclass_objective(
    x: &[Vec<f64>],
    labels: &[usize],
    classes: usize,
    c: f64,
    theta: &[f64],
) -> (f64, Vec<f64>) {
    let mut g = vec![0.0; theta.len()];
    let v = objective(
        x,
        &Targets::Classes(labels),
        classes,
        1.0 / c,
        theta,
        &mut g,
    );
    (v, g)
}
