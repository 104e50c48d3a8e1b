//! The frozen-feature benchmark: every requested method over shots x seeds
//! on cached features, evaluated on a fixed test set. `medvlm bench fewshot`
//! calls [`sweep_frozen`]; each [`SweepRecord`] carries its full
//! [`FewShotProtocol`].

use std::time::Instant;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::fewshot::{FewShotProtocol, HyperparameterPolicy, SamplingMode, TaskKind};
use crate::method::{
    method_by_name, AdaptInput, ClassTexts, FeatureAccess, MethodError, Result, SupportSet,
};

/// Labelled features: a pool to draw support sets from, or a test set.
#[derive(Debug, Clone, Copy)]
pub struct LabelledFeatures<'a> {
    /// `[N, D]` raw image embeddings.
    pub features: &'a Tensor,
    /// N class indices.
    pub labels: &'a [usize],
}

/// What to sweep.
#[derive(Debug, Clone)]
pub struct SweepPlan {
    /// Registry names of the methods.
    pub methods: Vec<String>,
    /// Shot counts (usually [`crate::fewshot::STANDARD_SHOTS`]).
    pub shots: Vec<usize>,
    /// Seeds.
    pub seeds: Vec<u64>,
    /// Balanced or realistic sampling.
    pub mode: SamplingMode,
    /// Fixed hyperparameters or support-set CV.
    pub policy: HyperparameterPolicy,
    /// The model's logit scale, if known.
    pub logit_scale: Option<f64>,
}

/// One (method, K, seed) result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepRecord {
    /// Method registry name.
    pub method: String,
    /// The protocol of this run.
    pub protocol: FewShotProtocol,
    /// Support-set size.
    pub support_size: usize,
    /// Test-set size.
    pub test_size: usize,
    /// Top-1 accuracy on the test set.
    pub accuracy: f64,
    /// Mean per-class recall on the test set (classes present in the test set).
    pub balanced_accuracy: f64,
    /// Seconds to fit the method.
    pub fit_seconds: f64,
    /// Seconds to score the test set.
    pub predict_seconds: f64,
}

/// Accuracy and balanced accuracy of the argmax of `logits` `[M, C]`.
pub fn accuracy_and_balanced(logits: &Tensor, labels: &[usize]) -> Result<(f64, f64)> {
    let pred: Vec<u32> = logits.argmax(1)?.to_vec1()?;
    if pred.len() != labels.len() {
        return Err(MethodError::InvalidInput(format!(
            "{} predictions for {} labels",
            pred.len(),
            labels.len()
        )));
    }
    let c = logits.dim(1)?;
    let mut hit = vec![0usize; c];
    let mut tot = vec![0usize; c];
    for (&p, &y) in pred.iter().zip(labels) {
        if y >= c {
            return Err(MethodError::InvalidInput(format!(
                "label {y} outside {c} classes"
            )));
        }
        tot[y] += 1;
        hit[y] += usize::from(p as usize == y);
    }
    let n = labels.len().max(1) as f64;
    let acc = hit.iter().sum::<usize>() as f64 / n;
    let present: Vec<usize> = (0..c).filter(|&k| tot[k] > 0).collect();
    let bal = present
        .iter()
        .map(|&k| hit[k] as f64 / tot[k] as f64)
        .sum::<f64>()
        / present.len().max(1) as f64;
    Ok((acc, bal))
}

/// Runs every method over every (K, seed) on a multi-class task. The
/// support set of (K, seed) is drawn once and shared by all methods.
pub fn sweep_frozen(
    pool: LabelledFeatures,
    test: LabelledFeatures,
    texts: &ClassTexts,
    plan: &SweepPlan,
) -> Result<Vec<SweepRecord>> {
    let methods = plan
        .methods
        .iter()
        .map(|m| method_by_name(m, None))
        .collect::<Result<Vec<_>>>()?;
    let mut records = Vec::with_capacity(methods.len() * plan.shots.len() * plan.seeds.len());
    for &k in &plan.shots {
        for &seed in &plan.seeds {
            let protocol = FewShotProtocol {
                shots: k,
                seed,
                mode: plan.mode.clone(),
                task: TaskKind::MultiClass,
                hyperparameter_policy: plan.policy,
                validation_set: false,
            };
            let idx = protocol
                .sample(pool.labels, &texts.class_names)
                .map_err(|e| MethodError::InvalidInput(e.to_string()))?;
            let support = SupportSet::from_pool(pool.features, pool.labels, &idx)?;
            let input = AdaptInput {
                texts,
                support: &support,
                access: FeatureAccess::FrozenFeatures,
                logit_scale: plan.logit_scale,
                policy: plan.policy,
                seed,
            };
            for m in &methods {
                let t0 = Instant::now();
                let clf = m.fit(&input)?;
                let fit_seconds = t0.elapsed().as_secs_f64();
                let t1 = Instant::now();
                let logits = clf.logits(test.features)?;
                let (accuracy, balanced_accuracy) = accuracy_and_balanced(&logits, test.labels)?;
                records.push(SweepRecord {
                    method: m.name().to_string(),
                    protocol: protocol.clone(),
                    support_size: idx.len(),
                    test_size: test.labels.len(),
                    accuracy,
                    balanced_accuracy,
                    fit_seconds,
                    predict_seconds: t1.elapsed().as_secs_f64(),
                });
            }
        }
    }
    Ok(records)
}
