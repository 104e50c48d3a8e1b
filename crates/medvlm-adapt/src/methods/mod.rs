//! One file per adaptation method, plus the registry that builds them by
//! name and rebuilds saved classifiers.
//!
//! Strategy 1 (zero-shot prompting): [`zero_shot`].
//! Strategy 3 (adapters and probes on frozen features): [`clip_adapter`],
//! [`tip_adapter`] (training-free and -F), [`taskres`], [`linear_probe`],
//! [`lp_plus_plus`], [`clap`].
//! Strategy 2 (prompt learning, on the model with frozen encoders): [`coop`],
//! [`cocoop`], [`kgcoop`], [`vpt`], [`maple`], sharing [`prompt_common`].
//! Strategy 4 (few-shot encoder fine-tuning, on the trainable model):
//! [`clip_lora`], [`bitfit`], [`partial_finetune`], [`full_finetune`], sharing
//! [`encoder_tuning`]. Both refuse to run on cached features.
//!
//! The frozen-feature benchmark sweep is [`sweep::sweep_frozen`].

pub mod bitfit;
pub mod clap;
pub mod clip_adapter;
pub mod clip_lora;
pub mod cocoop;
pub mod coop;
pub mod encoder_tuning;
pub mod full_finetune;
pub mod kgcoop;
pub mod linear_probe;
pub mod lp_plus_plus;
pub mod maple;
pub mod partial_finetune;
pub mod prompt_common;
pub mod solver;
pub mod sweep;
pub mod taskres;
pub mod tip_adapter;
pub mod vpt;
pub mod zero_shot;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::de::DeserializeOwned;

use crate::method::{
    AdaptationMethod, AdaptedClassifier, ClassifierCard, MethodError, Result, SavedTensors,
    METHOD_NAMES,
};

/// Parses a method's hyperparameters: its defaults, overridden field by
/// field by `overrides` (unknown fields are an error naming the method).
pub(crate) fn with_overrides<T>(
    method: &str,
    defaults: T,
    overrides: Option<&serde_json::Value>,
) -> Result<T>
where
    T: serde::Serialize + DeserializeOwned,
{
    let Some(overrides) = overrides else {
        return Ok(defaults);
    };
    let bad = |reason: String| MethodError::BadHyperparameters {
        method: method.into(),
        reason,
    };
    let mut base = serde_json::to_value(&defaults).map_err(|e| bad(e.to_string()))?;
    let (Some(obj), Some(over)) = (base.as_object_mut(), overrides.as_object()) else {
        return Err(bad(
            "overrides must be a JSON object of field -> value".into()
        ));
    };
    for (k, v) in over {
        if !obj.contains_key(k) {
            let known: Vec<&String> = obj.keys().collect();
            return Err(bad(format!("unknown field '{k}'; known fields: {known:?}")));
        }
        obj.insert(k.clone(), v.clone());
    }
    serde_json::from_value(base).map_err(|e| bad(e.to_string()))
}

/// Builds a method by registry name (see [`METHOD_NAMES`]).
pub fn build_method(
    name: &str,
    overrides: Option<&serde_json::Value>,
) -> Result<Box<dyn AdaptationMethod>> {
    Ok(match name {
        "zero-shot"
        | "zero-shot-ensemble"
        | "zero-shot-descriptions"
        | "zero-shot-mixture"
        | "zero-shot-pairs" => Box::new(zero_shot::ZeroShot::from_name(name, overrides)?),
        "clip-adapter" => Box::new(with_overrides(
            name,
            clip_adapter::ClipAdapter::default(),
            overrides,
        )?),
        "tip-adapter" => Box::new(with_overrides(
            name,
            tip_adapter::TipAdapter::training_free(),
            overrides,
        )?),
        "tip-adapter-f" => Box::new(with_overrides(
            name,
            tip_adapter::TipAdapter::fine_tuned(),
            overrides,
        )?),
        "taskres" => Box::new(with_overrides(
            name,
            taskres::TaskRes::default(),
            overrides,
        )?),
        "linear-probe" => Box::new(with_overrides(
            name,
            linear_probe::LinearProbe::default(),
            overrides,
        )?),
        "lp++" => Box::new(with_overrides(
            name,
            lp_plus_plus::LpPlusPlus::default(),
            overrides,
        )?),
        "clap" => Box::new(with_overrides(name, clap::Clap::default(), overrides)?),
        "coop" | "cocoop" | "kgcoop" | "vpt" | "maple" => {
            prompt_common::prompt_method_by_name(name, overrides)?
        }
        "lora" | "bitfit" | "partial-finetune" | "full-finetune" => {
            encoder_tuning::tuning_method_by_name(name, overrides)?
        }
        other => {
            return Err(MethodError::UnknownMethod {
                name: other.into(),
                known: METHOD_NAMES.join(", "),
            });
        }
    })
}

/// The error of a method that needs the model when [`AdaptationMethod::fit`] gets an
/// [`crate::method::AdaptInput`], which carries cached features and no model: with frozen
/// features it names the methods that would run; with encoder access it names
/// `entry_point`, the call that fits the method on the model.
pub(crate) fn refuse_cached_features(
    name: &str,
    input: &crate::method::AdaptInput,
    entry_point: &str,
) -> MethodError {
    match input.access {
        crate::method::FeatureAccess::FrozenFeatures => MethodError::NeedsEncoder {
            method: name.into(),
            alternatives: crate::method::frozen_feature_method_names().join(", "),
        },
        crate::method::FeatureAccess::EncoderAccess => MethodError::NotImplemented(format!(
            "{name} via AdaptInput (it carries no model; fit with {entry_point})"
        )),
    }
}

/// Rebuilds a saved classifier from its card and tensors.
pub(crate) fn rebuild_classifier(
    card: ClassifierCard,
    saved: &SavedTensors,
) -> Result<Box<dyn AdaptedClassifier>> {
    Ok(match card.method.as_str() {
        "zero-shot"
        | "zero-shot-ensemble"
        | "zero-shot-descriptions"
        | "zero-shot-mixture"
        | "zero-shot-pairs" => Box::new(zero_shot::ZeroShotClassifier::from_saved(card, saved)?),
        "clip-adapter" => Box::new(clip_adapter::ClipAdapterClassifier::from_saved(
            card, saved,
        )?),
        "tip-adapter" | "tip-adapter-f" => {
            Box::new(tip_adapter::TipAdapterClassifier::from_saved(card, saved)?)
        }
        "taskres" => Box::new(taskres::TaskResClassifier::from_saved(card, saved)?),
        "linear-probe" => Box::new(linear_probe::LinearProbeClassifier::from_saved(
            card, saved,
        )?),
        "lp++" => Box::new(lp_plus_plus::LpPlusPlusClassifier::from_saved(card, saved)?),
        "clap" => Box::new(clap::ClapClassifier::from_saved(card, saved)?),
        "coop" | "cocoop" | "kgcoop" | "vpt" | "maple" => {
            Box::new(prompt_common::PromptClassifier::from_saved(card, saved)?)
        }
        "lora" | "bitfit" | "partial-finetune" | "full-finetune" => Box::new(
            encoder_tuning::TunedEncoderClassifier::from_saved(card, saved)?,
        ),
        other => {
            return Err(MethodError::BadCheckpoint {
                path: saved.path().to_path_buf(),
                reason: format!(
                    "card names method '{other}', which has no frozen-feature classifier"
                ),
            })
        }
    })
}

/// A `[rows, cols]` f32 tensor with entries uniform in `[-bound, bound]`,
/// deterministic given `rng` (PyTorch's default `nn.Linear` init uses
/// bound = 1/sqrt(fan_in)).
pub(crate) fn uniform_init(
    rng: &mut ChaCha8Rng,
    rows: usize,
    cols: usize,
    bound: f64,
    device: &Device,
) -> Result<Tensor> {
    let v: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-bound..=bound) as f32)
        .collect();
    Ok(Tensor::from_vec(v, (rows, cols), device)?)
}

/// Cross-validation folds of a support set: `fold_of[i]` for each image and the number of
/// folds `k` (at most `folds`). Multi-class folds are stratified (each class's images dealt
/// round-robin after a seeded shuffle), so `k` is capped by the smallest class; multi-label
/// images are dealt at random. `k < 2` means no cross-validation is possible (a class with a
/// single image): the caller keeps its defaults.
pub(crate) fn support_folds(
    labels: &crate::method::SupportLabels,
    num_classes: usize,
    folds: usize,
    seed: u64,
) -> (Vec<usize>, usize) {
    use crate::method::SupportLabels;
    use rand::seq::SliceRandom;
    let n = labels.len();
    let mut fold_of = vec![0usize; n];
    let mut rng = rng_for(seed ^ 0x5eed_cf01);
    let k = match labels {
        SupportLabels::MultiClass(l) => {
            let mut by_class = vec![Vec::new(); num_classes];
            for (i, &c) in l.iter().enumerate() {
                by_class[c].push(i);
            }
            let min_count = by_class
                .iter()
                .map(Vec::len)
                .filter(|&m| m > 0)
                .min()
                .unwrap_or(0);
            let k = folds.min(min_count);
            for idx in by_class.iter_mut() {
                idx.shuffle(&mut rng);
                for (j, &i) in idx.iter().enumerate() {
                    fold_of[i] = j % k.max(1);
                }
            }
            k
        }
        SupportLabels::MultiLabel(_) => {
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(&mut rng);
            let k = folds.min(n);
            for (j, &i) in order.iter().enumerate() {
                fold_of[i] = j % k.max(1);
            }
            k
        }
    };
    (fold_of, k)
}

/// Seeded RNG for a fit.
pub(crate) fn rng_for(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Optimiser of the small full-batch training loops.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Optimizer {
    /// AdamW (Loshchilov & Hutter) with the given decoupled weight decay (`"adam-w"`, also
    /// read as `"adamw"`).
    #[serde(alias = "adamw")]
    AdamW {
        /// Learning rate.
        lr: f64,
        /// Decoupled weight decay.
        weight_decay: f64,
        /// Denominator epsilon (PyTorch's default 1e-8 when absent).
        #[serde(default = "default_adam_eps")]
        eps: f64,
    },
    /// SGD with heavy-ball momentum.
    Sgd {
        /// Learning rate.
        lr: f64,
        /// Momentum.
        momentum: f64,
    },
}

fn default_adam_eps() -> f64 {
    1e-8
}

/// Full-batch training: `steps` steps of `optimizer` on `vars`, learning
/// rate following a cosine decay to zero (as in Tip-Adapter-F and CoOp).
/// Returns the final loss.
pub(crate) fn train_full_batch(
    vars: &[Var],
    steps: usize,
    optimizer: Optimizer,
    mut loss_fn: impl FnMut() -> Result<Tensor>,
) -> Result<f32> {
    use candle_nn::Optimizer as _;
    let cosine = |step: usize, lr: f64| {
        lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / steps.max(1) as f64).cos())
    };
    let mut last = f32::NAN;
    match optimizer {
        Optimizer::AdamW {
            lr,
            weight_decay,
            eps,
        } => {
            let params = candle_nn::ParamsAdamW {
                lr,
                weight_decay,
                eps,
                ..Default::default()
            };
            let mut opt = candle_nn::AdamW::new(vars.to_vec(), params)?;
            for step in 0..steps {
                opt.set_learning_rate(cosine(step, lr));
                let loss = loss_fn()?;
                last = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
                opt.backward_step(&loss)?;
            }
        }
        Optimizer::Sgd { lr, momentum } => {
            let mut velocity: Vec<Option<Tensor>> = vec![None; vars.len()];
            for step in 0..steps {
                let loss = loss_fn()?;
                last = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
                let grads = loss.backward()?;
                let lr_t = cosine(step, lr);
                for (var, vel) in vars.iter().zip(velocity.iter_mut()) {
                    let Some(g) = grads.get(var.as_tensor()) else {
                        continue;
                    };
                    let v = match vel.take() {
                        Some(v) => ((v * momentum)? + g)?,
                        None => g.clone(),
                    };
                    var.set(&(var.as_tensor() - (&v * lr_t)?)?)?;
                    *vel = Some(v);
                }
            }
        }
    }
    if steps > 0 && !last.is_finite() {
        return Err(MethodError::InvalidInput(format!(
            "training diverged (loss {last}); lower the learning rate or check the features for NaN"
        )));
    }
    Ok(last)
}

/// `[N, C]` f32 matrix to rows of f64 (for the small closed-form solvers).
pub(crate) fn to_rows_f64(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    let rows: Vec<Vec<f32>> = t.to_dtype(DType::F32)?.to_vec2()?;
    Ok(rows
        .into_iter()
        .map(|r| r.into_iter().map(f64::from).collect())
        .collect())
}

/// Mean binary cross-entropy with logits over every entry of `[N, C]` logits
/// and 0/1 targets, in PyTorch's stable form (`BCEWithLogitsLoss`):
/// `max(z, 0) - z t + ln(1 + exp(-|z|))`. candle-nn's
/// `binary_cross_entropy_with_logit` takes the log of a sigmoid, which is
/// `-inf` once a logit saturates (as it does at a logit scale of 100).
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let softplus_neg_abs = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    let loss = ((logits.relu()? - (logits * targets)?)? + softplus_neg_abs)?;
    Ok(loss.mean_all()?)
}

/// The positive and negative text weights `[C, D]` of a multi-label task
/// (CheXzero-style prompt pairs, as in `zero-shot-pairs`): a multi-label
/// method's zero-shot logit of label c is `s f.(p_c - n_c)`.
pub(crate) fn pair_text_weights(
    input: &crate::method::AdaptInput,
    method: &str,
) -> Result<(Tensor, Tensor)> {
    let negative = input.texts.negative_ensemble_weights()?.ok_or_else(|| {
        MethodError::InvalidInput(format!(
            "{method} on a multi-label task needs negative prompts for every label \
             (ClassTexts::negative_prompts): its zero-shot part is the positive/negative pair \
             logit s f.(p_c - n_c), as in zero-shot-pairs"
        ))
    })?;
    Ok((input.texts.ensemble_weights()?, negative))
}
