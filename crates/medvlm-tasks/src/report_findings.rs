//! The findings classifier of the report generator's diagnosis prompt (PromptMRG's
//! diagnosis-driven prompts, Jin et al., AAAI 2024; see
//! [`crate::report_generation::ReportGenerator`]): a multi-label MLP on the frozen tower's
//! image embedding that decides, finding by finding, whether the report should state it.
//!
//! Targets: the findings a rule labeller ([`medvlm_eval::report_labeller`]) reads as present
//! (or uncertain) in each training report, so the classifier learns exactly what clinical
//! efficacy will score. Inputs are standardised with their training mean and deviation; the
//! MLP is `E -> hidden -> GELU -> F`, trained full-batch with binary cross-entropy and AdamW.
//!
//! **Per-finding thresholds** (why: findings are rare and unequally so, and one threshold of
//! 0.5 on a sigmoid trained on them under-calls the rare ones; PromptMRG adjusts logits per
//! class for the same imbalance): a seeded fifth of the training images is held back, a first
//! classifier is trained on the rest, and each finding's threshold is the one of 45 values
//! (0.02 to 0.90) with the best F1 on the held-back fifth (0.5 for a finding without a
//! positive there). The classifier kept is then retrained on every training image with the
//! same settings, and uses those thresholds.
//!
//! Inputs: the pooled embedding and, why: small findings live in a few patches that the pooled
//! embedding averages away, the patch tokens mean-pooled on a 2 x 2 grid.
//!
//! Defaults ([`FindingsConfig::default`]): hidden width 256, 300 full-batch AdamW steps at
//! lr 2e-3, weight decay 0.01, seed 0, a 2 x 2 grid of patch tokens.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder, VarMap};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::report_generation::{ReportError, Result};
use medvlm_train::init::{self, Init};
use medvlm_train::minibatch::adamw;
use medvlm_train::optim::Gradients;

/// Settings of the findings classifier; see the module documentation for the defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FindingsConfig {
    /// Hidden width of the MLP.
    pub hidden: usize,
    /// Full-batch optimiser steps.
    pub steps: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// AdamW weight decay (matrices).
    pub weight_decay: f64,
    /// Seed of the initialisation and of the held-back fifth.
    pub seed: u64,
    /// The classifier also reads the image tower's patch tokens mean-pooled on a
    /// `image_grid x image_grid` grid after the pooled embedding (as the VQA answerer,
    /// [`crate::vqa_pipeline::image_features`]); 0: the pooled embedding only. Missing from
    /// a saved card: 0, as classifiers were before the grid existed.
    #[serde(default)]
    pub image_grid: usize,
}

impl Default for FindingsConfig {
    fn default() -> Self {
        Self {
            hidden: 256,
            steps: 300,
            lr: 2e-3,
            weight_decay: 0.01,
            seed: 0,
            image_grid: 2,
        }
    }
}

/// What the card records of a trained classifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FindingsCard {
    /// Settings.
    pub config: FindingsConfig,
    /// The findings, in prompt order (the lexicon's labels).
    pub labels: Vec<String>,
    /// Training reports stating each finding.
    pub train_positives: Vec<usize>,
    /// Sigmoid threshold of each finding.
    pub thresholds: Vec<f32>,
    /// F1 of each finding on the held-back fifth at its threshold (`None`: no positive there).
    pub calibration_f1: Vec<Option<f64>>,
}

/// The MLP with its input standardiser.
pub struct FindingsClassifier {
    mean: Tensor,
    std: Tensor,
    l1: Linear,
    l2: Linear,
    thresholds: Tensor,
}

impl FindingsClassifier {
    fn new(
        vb: VarBuilder,
        input: usize,
        hidden: usize,
        findings: usize,
        mean: Tensor,
        std: Tensor,
        thresholds: &[f32],
    ) -> Result<Self> {
        let device = mean.device().clone();
        Ok(Self {
            l1: candle_nn::linear(input, hidden, vb.pp("l1"))?,
            l2: candle_nn::linear(hidden, findings, vb.pp("l2"))?,
            thresholds: Tensor::from_slice(thresholds, (1, findings), &device)?,
            mean,
            std,
        })
    }

    /// Loads a classifier from a checkpoint's `vb` (`l1`, `l2`, `mean`, `std`) with the card's
    /// thresholds.
    pub fn load(vb: VarBuilder, input: usize, card: &FindingsCard) -> Result<Self> {
        let f = card.labels.len();
        if card.thresholds.len() != f {
            return Err(ReportError::Invalid(format!(
                "{} thresholds for {f} findings",
                card.thresholds.len()
            )));
        }
        let mean = vb.get((1, input), "mean")?;
        let std = vb.get((1, input), "std")?;
        Self::new(
            vb,
            input,
            card.config.hidden,
            f,
            mean,
            std,
            &card.thresholds,
        )
    }

    /// Logits `[N, F]` of image embeddings `[N, E]`.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let z = x.broadcast_sub(&self.mean)?.broadcast_div(&self.std)?;
        Ok(self.l2.forward(&self.l1.forward(&z)?.gelu()?)?)
    }

    /// Finding states `[N, F]` (u32: 1 where the probability reaches the finding's threshold).
    pub fn states(&self, x: &Tensor) -> Result<Tensor> {
        let p = candle_nn::ops::sigmoid(&self.logits(x)?)?;
        Ok(p.broadcast_ge(&self.thresholds)?.to_dtype(DType::U32)?)
    }
}

/// A trained classifier, its card and its tensors by name (`l1.*`, `l2.*`, `mean`, `std`).
pub struct TrainedFindings {
    /// The classifier.
    pub classifier: FindingsClassifier,
    /// The card.
    pub card: FindingsCard,
    /// Its tensors, for saving.
    pub tensors: HashMap<String, Tensor>,
}

fn fit(
    cfg: &FindingsConfig,
    x: &Tensor,
    y: &Tensor,
    thresholds: &[f32],
) -> Result<(FindingsClassifier, HashMap<String, Tensor>)> {
    let (_, e) = x.dims2()?;
    let f = y.dim(1)?;
    let mean = x.mean_keepdim(0)?;
    // A constant dimension keeps a unit scale instead of dividing by zero.
    let std = x
        .broadcast_sub(&mean)?
        .sqr()?
        .mean_keepdim(0)?
        .sqrt()?
        .clamp(1e-6f32, f32::MAX)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, x.device());
    let clf = FindingsClassifier::new(vb, e, cfg.hidden, f, mean.clone(), std.clone(), thresholds)?;
    let params = medvlm_train::optim::varmap_params(&varmap);
    init::seeded_init(&params, cfg.seed, 0xf1d1_9e55, |name, dims| {
        if name.ends_with("bias") {
            Init::Zeros
        } else {
            Init::Normal {
                std: (1.0 / dims.get(1).copied().unwrap_or(1).max(1) as f32).sqrt(),
            }
        }
    })?;
    let mut opt = adamw(params.clone(), cfg.weight_decay)?;
    for step in 0..cfg.steps {
        let loss = medvlm_train::losses::bce_with_logits(&clf.logits(x)?, y)
            .map_err(|e| ReportError::Invalid(e.to_string()))?;
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(ReportError::Invalid(format!(
                "the findings classifier's loss is not finite ({value}) at step {step}"
            )));
        }
        opt.step(
            &Gradients::from_grad_store(&loss.backward()?, &params),
            cfg.lr,
        )?;
    }
    let mut tensors = medvlm_models::model_dir::varmap_tensors(&varmap)?;
    tensors.insert("mean".into(), mean);
    tensors.insert("std".into(), std);
    Ok((clf, tensors))
}

/// F1 of decisions `pred` against `truth`; `None` when `truth` has no positive (F1 undefined,
/// so the threshold search skips it).
fn f1(pred: &[bool], truth: &[bool]) -> Option<f64> {
    let tp = pred.iter().zip(truth).filter(|(p, t)| **p && **t).count();
    let pos = truth.iter().filter(|t| **t).count();
    if pos == 0 {
        return None;
    }
    let fp = pred.iter().zip(truth).filter(|(p, t)| **p && !**t).count();
    Some(medvlm_eval::report_labeller::Prf::from_counts(tp, fp, pos - tp).f1)
}

/// Trains the classifier on image embeddings `[N, E]` and targets `[N, F]` (0/1 f32, the
/// findings each training report states), `labels` naming the `F` findings; see the module
/// documentation for the held-back fifth and the thresholds.
pub fn train_findings(
    cfg: &FindingsConfig,
    x: &Tensor,
    y: &Tensor,
    labels: &[String],
) -> Result<TrainedFindings> {
    let (n, _) = x.dims2()?;
    let (ny, f) = y.dims2()?;
    if ny != n || f != labels.len() || f == 0 {
        return Err(ReportError::Invalid(format!(
            "findings targets {:?} for {n} images and {} findings",
            y.dims(),
            labels.len()
        )));
    }
    if n < 5 {
        return Err(ReportError::Invalid(format!(
            "{n} training images are too few to hold a fifth back for the findings' thresholds"
        )));
    }
    let dev = x.device().clone();
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x0ca1_1b8a));
    let n_cal = n / 5;
    let cal = Tensor::from_slice(&order[..n_cal], n_cal, &dev)?;
    let fit_idx = Tensor::from_slice(&order[n_cal..], n - n_cal, &dev)?;
    let (first, _) = fit(
        cfg,
        &x.index_select(&fit_idx, 0)?,
        &y.index_select(&fit_idx, 0)?,
        &vec![0.5; f],
    )?;
    let probs: Vec<Vec<f32>> = candle_nn::ops::sigmoid(&first.logits(&x.index_select(&cal, 0)?)?)?
        .t()?
        .to_vec2()?;
    let truth: Vec<Vec<f32>> = y.index_select(&cal, 0)?.t()?.to_vec2()?;
    let grid: Vec<f32> = (0..45).map(|i| 0.02 + 0.02 * i as f32).collect();
    let mut thresholds = Vec::with_capacity(f);
    let mut calibration_f1 = Vec::with_capacity(f);
    for (p, t) in probs.iter().zip(&truth) {
        let t: Vec<bool> = t.iter().map(|&v| v > 0.5).collect();
        let mut best: Option<(f32, f64)> = None;
        for &th in &grid {
            let pred: Vec<bool> = p.iter().map(|&v| v >= th).collect();
            if let Some(score) = f1(&pred, &t) {
                // Strictly better only: ties keep the lower threshold (the recall side).
                if best.is_none_or(|(_, b)| score > b) {
                    best = Some((th, score));
                }
            }
        }
        thresholds.push(best.map_or(0.5, |(th, _)| th));
        calibration_f1.push(best.map(|(_, s)| s));
    }
    let (classifier, tensors) = fit(cfg, x, y, &thresholds)?;
    let train_positives = y
        .sum(0)?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| v.round() as usize)
        .collect();
    Ok(TrainedFindings {
        classifier,
        card: FindingsCard {
            config: cfg.clone(),
            labels: labels.to_vec(),
            train_positives,
            thresholds,
            calibration_f1,
        },
        tensors,
    })
}

/// Loads a classifier's tensors from `tensors` (what [`TrainedFindings::tensors`] held); its
/// input width is that of the saved standardiser.
pub fn load_findings(
    tensors: HashMap<String, Tensor>,
    card: &FindingsCard,
    device: &Device,
) -> Result<FindingsClassifier> {
    let input = match tensors.get("mean").map(|t| t.dims2()) {
        Some(Ok((1, d))) => d,
        _ => {
            return Err(ReportError::Invalid(
                "no `mean` tensor of shape [1, D] for the findings classifier's inputs".into(),
            ))
        }
    };
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    FindingsClassifier::load(vb, input, card)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// Two findings read off two directions of the embedding, one common and one rare: the
    /// classifier calls both on unseen embeddings, and the rare one's threshold comes out
    /// below 0.5.
    /// A card written before the patch-token grid existed has no `image_grid`: its classifier
    /// read the pooled embedding only, so it loads as grid 0 (not today's default of 2, which
    /// would feed it features of the wrong width).
    #[test]
    fn cards_without_a_grid_load_as_grid_0() {
        let old = r#"{"hidden": 256, "steps": 300, "lr": 0.002, "weight_decay": 0.01, "seed": 0}"#;
        let c: FindingsConfig = serde_json::from_str(old).unwrap();
        assert_eq!((c.image_grid, c.hidden), (0, 256));
        let now = serde_json::to_string(&FindingsConfig::default()).unwrap();
        let back: FindingsConfig = serde_json::from_str(&now).unwrap();
        assert_eq!(back.image_grid, 2);
    }

    #[test]
    fn learns_each_finding_and_calibrates_the_rare_one() {
        let dev = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut make = |n: usize| {
            let mut x = Vec::new();
            let mut y = Vec::new();
            for _ in 0..n {
                let a = rng.random_bool(0.5);
                let b = rng.random_bool(0.08);
                let noise = |rng: &mut ChaCha8Rng| rng.random_range(-0.6f32..0.6);
                x.extend([
                    a as u8 as f32 + noise(&mut rng),
                    b as u8 as f32 * 0.6 + noise(&mut rng),
                    noise(&mut rng),
                    noise(&mut rng),
                ]);
                y.extend([a as u8 as f32, b as u8 as f32]);
            }
            (
                Tensor::from_vec(x, (n, 4), &dev).unwrap(),
                Tensor::from_vec(y, (n, 2), &dev).unwrap(),
            )
        };
        let (x, y) = make(1000);
        let labels = vec!["common".to_string(), "rare".to_string()];
        let cfg = FindingsConfig {
            hidden: 16,
            ..Default::default()
        };
        let t = train_findings(&cfg, &x, &y, &labels).unwrap();
        assert_eq!(t.card.labels, labels);
        assert!(t.card.thresholds[1] < 0.5, "{:?}", t.card.thresholds);
        let (xt, yt) = make(2000);
        let s: Vec<Vec<u32>> = t
            .classifier
            .states(&xt)
            .unwrap()
            .t()
            .unwrap()
            .to_vec2()
            .unwrap();
        let probs: Vec<Vec<f32>> = candle_nn::ops::sigmoid(&t.classifier.logits(&xt).unwrap())
            .unwrap()
            .t()
            .unwrap()
            .to_vec2()
            .unwrap();
        let truth: Vec<Vec<f32>> = yt.t().unwrap().to_vec2().unwrap();
        let mut scores = Vec::new();
        for k in 0..2 {
            let tr: Vec<bool> = truth[k].iter().map(|&v| v > 0.5).collect();
            let calibrated: Vec<bool> = s[k].iter().map(|&v| v == 1).collect();
            let at_half: Vec<bool> = probs[k].iter().map(|&p| p >= 0.5).collect();
            scores.push((f1(&calibrated, &tr).unwrap(), f1(&at_half, &tr).unwrap()));
        }
        eprintln!("F1 (calibrated, at 0.5): {scores:?}");
        assert!(scores[0].0 > 0.85, "common finding: {scores:?}");
        // The rare finding: the calibrated threshold calls it better than 0.5 does.
        assert!(scores[1].0 > scores[1].1 + 0.05, "rare finding: {scores:?}");
        // Saved tensors give the same states.
        let back = load_findings(t.tensors.clone(), &t.card, &dev).unwrap();
        assert_eq!(
            back.states(&xt).unwrap().to_vec2::<u32>().unwrap(),
            t.classifier.states(&xt).unwrap().to_vec2::<u32>().unwrap()
        );
    }

    #[test]
    fn mismatched_targets_are_refused() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((10, 3), DType::F32, &dev).unwrap();
        let y = Tensor::zeros((10, 2), DType::F32, &dev).unwrap();
        let err = train_findings(&FindingsConfig::default(), &x, &y, &["a".into()])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("1 findings"), "{err}");
    }
}
