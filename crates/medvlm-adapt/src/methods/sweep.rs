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
    /// Worker threads over (K, seed) jobs (1 = sequential). The small
    /// matrix products of these methods do not gain from candle's own
    /// threads, so on a 2-core machine `threads = 2` with
    /// `RAYON_NUM_THREADS=1` is the fastest setting.
    pub threads: usize,
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
    let jobs: Vec<(usize, u64)> = plan
        .shots
        .iter()
        .flat_map(|&k| plan.seeds.iter().map(move |&s| (k, s)))
        .collect();
    let run_job = |&(k, seed): &(usize, u64)| -> Result<Vec<SweepRecord>> {
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
            protocol: Some(&protocol),
        };
        let mut out = Vec::with_capacity(methods.len());
        for m in &methods {
            let t0 = Instant::now();
            let clf = m.fit(&input)?;
            let fit_seconds = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            let logits = clf.logits(test.features)?;
            let (accuracy, balanced_accuracy) = accuracy_and_balanced(&logits, test.labels)?;
            out.push(SweepRecord {
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
        Ok(out)
    };
    let threads = plan.threads.clamp(1, jobs.len().max(1));
    let mut results: Vec<Option<Result<Vec<SweepRecord>>>> =
        (0..jobs.len()).map(|_| None).collect();
    if threads == 1 {
        for (slot, job) in results.iter_mut().zip(&jobs) {
            *slot = Some(run_job(job));
        }
    } else {
        // Jobs are handed out through a shared counter; each result goes to
        // its job's slot, so the output order does not depend on timing.
        let next = std::sync::atomic::AtomicUsize::new(0);
        let done = std::sync::Mutex::new(&mut results);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let r = run_job(job);
                    if let Ok(mut guard) = done.lock() {
                        guard[i] = Some(r);
                    }
                });
            }
        });
    }
    let mut records = Vec::with_capacity(methods.len() * jobs.len());
    for r in results {
        let r =
            r.ok_or_else(|| MethodError::InvalidInput("a sweep worker stopped early".into()))?;
        records.extend(r?);
    }
    Ok(records)
}

/// A synthetic few-shot task for tests and benchmarks: Gaussian class
/// clusters around random unit means plus an offset shared by all images,
/// and text embeddings near, but offset from, the class means plus another
/// shared offset (the image/text "modality gap" of CLIP-like models, which
/// makes image-text cosines small and image-image cosines large, as in
/// CLIP). Zero-shot is above chance yet imperfect.
#[derive(Debug, Clone)]
pub struct SyntheticTask {
    /// Class names `class_0`, ...
    pub class_names: Vec<String>,
    /// One prompt embedding per class, `[1, D]` each.
    pub texts: ClassTexts,
    /// Pool to draw support sets from, `[C * pool_per_class, D]`.
    pub pool_features: Tensor,
    /// Pool labels.
    pub pool_labels: Vec<usize>,
    /// Test features, `[C * test_per_class, D]`.
    pub test_features: Tensor,
    /// Test labels.
    pub test_labels: Vec<usize>,
}

/// Parameters of [`synthetic_task`].
#[derive(Debug, Clone, Copy)]
pub struct SyntheticSpec {
    /// Number of classes.
    pub classes: usize,
    /// Embedding dimension.
    pub dim: usize,
    /// The class means and text offsets live in the first `signal_dim`
    /// coordinates (real embeddings have a low intrinsic dimension); the
    /// noise and the modality gaps span all `dim`. `signal_dim >= dim` means
    /// everywhere.
    pub signal_dim: usize,
    /// Pool images per class.
    pub pool_per_class: usize,
    /// Test images per class.
    pub test_per_class: usize,
    /// Per-coordinate standard deviation of the image noise.
    pub image_noise: f64,
    /// Norm of the random offset between each text embedding and its class mean.
    pub text_offset: f64,
    /// Norm of the offset shared by all image embeddings.
    pub modality_gap: f64,
    /// Norm of the (different) offset shared by all text embeddings.
    pub text_gap: f64,
    /// Seed.
    pub seed: u64,
}

/// Draws a [`SyntheticTask`].
pub fn synthetic_task(spec: SyntheticSpec) -> Result<SyntheticTask> {
    use rand::Rng;
    let mut rng = super::rng_for(spec.seed);
    // Box-Muller standard normal.
    let mut normal = move || -> f64 {
        let u1: f64 = rng.random_range(f64::EPSILON..1.0);
        let u2: f64 = rng.random_range(0.0..1.0);
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    };
    let unit = |v: Vec<f64>| {
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        v.into_iter().map(|x| x / n).collect::<Vec<f64>>()
    };
    let d = spec.dim;
    let r = spec.signal_dim.clamp(1, d);
    let in_signal = |normal: &mut dyn FnMut() -> f64| {
        unit((0..d).map(|i| if i < r { normal() } else { 0.0 }).collect())
    };
    let means: Vec<Vec<f64>> = (0..spec.classes).map(|_| in_signal(&mut normal)).collect();
    let gap: Vec<f64> = unit((0..d).map(|_| normal()).collect())
        .into_iter()
        .map(|x| x * spec.modality_gap)
        .collect();
    let text_gap: Vec<f64> = unit((0..d).map(|_| normal()).collect())
        .into_iter()
        .map(|x| x * spec.text_gap)
        .collect();
    let dev = candle_core::Device::Cpu;
    let mut prompts = Vec::with_capacity(spec.classes);
    for m in &means {
        let off = in_signal(&mut normal);
        let t: Vec<f32> = m
            .iter()
            .zip(&off)
            .zip(&text_gap)
            .map(|((a, o), g)| (a + g + spec.text_offset * o) as f32)
            .collect();
        prompts.push(Tensor::from_vec(t, (1, d), &dev)?);
    }
    let mut draw = |per_class: usize| -> Result<(Tensor, Vec<usize>)> {
        let mut data = Vec::with_capacity(spec.classes * per_class * d);
        let mut labels = Vec::with_capacity(spec.classes * per_class);
        for (c, m) in means.iter().enumerate() {
            for _ in 0..per_class {
                data.extend(
                    m.iter()
                        .zip(&gap)
                        .map(|(a, g)| (a + g + spec.image_noise * normal()) as f32),
                );
                labels.push(c);
            }
        }
        Ok((Tensor::from_vec(data, (labels.len(), d), &dev)?, labels))
    };
    let (pool_features, pool_labels) = draw(spec.pool_per_class)?;
    let (test_features, test_labels) = draw(spec.test_per_class)?;
    let class_names: Vec<String> = (0..spec.classes).map(|c| format!("class_{c}")).collect();
    Ok(SyntheticTask {
        texts: ClassTexts {
            class_names: class_names.clone(),
            prompts,
            negative_prompts: None,
        },
        class_names,
        pool_features,
        pool_labels,
        test_features,
        test_labels,
    })
}
