//! A few-shot benchmark sweep: every requested method over shots x seeds on one task, as
//! `medvlm bench fewshot` runs it ([`sweep`]), with the file it writes ([`BenchOutput`]).
//!
//! For each (K, seed) one support set is drawn ([`AdaptContext::draw`]) and shared by every
//! method, so methods differ only by what they do with the same images; the draws are recorded
//! in the output so another implementation can be run on them. Frozen-feature methods fit on
//! the cached image features, the (K, seed) draws in parallel; prompt learners and encoder
//! fine-tuning fit through the model one draw after the other (each fit uses every core; each
//! fine-tuning fit starts from a fresh copy of the model). Each fit is evaluated on the test
//! split with every metric ([`AdaptContext::evaluate`]); the tables give the mean ± standard
//! deviation over seeds per method and K.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use medvlm_eval::conformal_multilabel::FnrControlReport;
use medvlm_eval::evaluation::{
    Metrics, MultiLabelMetrics, MULTI_LABEL_CONFORMAL_NOTE, MULTI_LABEL_NO_CALIBRATION_NOTE,
};
use medvlm_eval::fewshot_table::{FewShotResult, FewShotTable, MeanStd};
use medvlm_eval::plots::{LinePlot, Plot, Series, Size};
use medvlm_models::LoadedModel;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::features::model_fingerprint;
use crate::fewshot::{FewShotProtocol, HyperparameterPolicy, SamplingMode, TaskKind};
use crate::method::{frozen_feature_method_names, method_by_name};
use crate::methods::encoder_tuning::TUNING_METHOD_NAMES;
use crate::methods::prompt_common::PROMPT_METHOD_NAMES;
use crate::pipeline::{
    is_encoder_method, method_refusal, write_atomic, AdaptContext, MethodRefusal, PipelineError,
    Result, Support, TaskMetrics, MULTI_LABEL_METHODS,
};

/// One (method, K, seed) result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchRecord {
    /// Method registry name.
    pub method: String,
    /// The protocol of this run.
    pub protocol: FewShotProtocol,
    /// Support-set size.
    pub support_size: usize,
    /// Every test metric (multi-class tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// Every test metric (multi-label tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multilabel_metrics: Option<MultiLabelMetrics>,
    /// Seconds to fit.
    pub fit_seconds: f64,
    /// Seconds to score the test set.
    pub predict_seconds: f64,
}

/// The JSON file written by the benchmark.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchOutput {
    /// Model spec.
    pub model: String,
    /// Model fingerprint.
    pub model_fingerprint: String,
    /// Manifests.
    pub data: Vec<PathBuf>,
    /// SHA-256 of the manifest.
    pub data_sha256: String,
    /// Classes.
    pub class_names: Vec<String>,
    /// Prompts per class.
    pub prompts: Vec<(String, Vec<String>)>,
    /// Pool (train) and test sizes.
    pub pool_size: usize,
    /// Test-set size.
    pub test_size: usize,
    /// Multi-class or multi-label.
    #[serde(default = "multi_class")]
    pub task: TaskKind,
    /// One record per method, K and seed.
    pub records: Vec<BenchRecord>,
    /// The support set of each (K, seed), so that another implementation can be run on the
    /// same draws.
    #[serde(default)]
    pub support_sets: Vec<SupportDraw>,
    /// Requested methods that were not run, with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped_methods: Vec<SkippedMethod>,
    /// Accuracy table (mean ± std over seeds; multi-class tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_table: Option<FewShotTable>,
    /// Balanced-accuracy table (multi-class tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balanced_accuracy_table: Option<FewShotTable>,
    /// Macro-AUROC table (mean ± std over seeds; multi-label tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macro_auroc_table: Option<FewShotTable>,
    /// Test false-negative rate of the conformal label sets (multi-label tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conformal_fnr_table: Option<FewShotTable>,
    /// Mean size of the conformal label sets (multi-label tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conformal_set_size_table: Option<FewShotTable>,
    /// What was not computed, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Seconds the sweep took (every draw, fit and evaluation).
    #[serde(default)]
    pub seconds: f64,
}

/// The support set drawn for one (K, seed): every method of that K and seed was fitted on it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SupportDraw {
    /// Shots per class.
    pub shots: usize,
    /// Seed of the draw.
    pub seed: u64,
    /// The support images (paths, as in the manifest after resolution) and their classes
    /// (multi-label: their findings joined with `;`, or `normal`), as in `adapt.json`.
    pub support: Vec<(String, String)>,
}

/// A requested method the benchmark did not run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkippedMethod {
    /// Method registry name.
    pub method: String,
    /// Why it was not run.
    pub reason: String,
}

fn multi_class() -> TaskKind {
    TaskKind::MultiClass
}

/// Method groups [`resolve_methods`] accepts besides single names.
pub const METHOD_GROUPS: &str = "all, frozen, prompt, finetune";

/// The methods of a group name, if `name` is one: `frozen` = zero-shot and every trained
/// frozen-feature method (the zero-shot variants that differ only in their prompts, and the
/// multi-label `zero-shot-pairs`, left out); `prompt` = prompt learning; `finetune` = encoder
/// fine-tuning; `all` = the three.
fn method_group(name: &str) -> Option<Vec<String>> {
    let frozen = || {
        let mut v = vec!["zero-shot".to_string()];
        v.extend(
            frozen_feature_method_names()
                .into_iter()
                .filter(|n| !n.starts_with("zero-shot"))
                .map(str::to_string),
        );
        v
    };
    let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    Some(match name {
        "frozen" => frozen(),
        "prompt" => names(PROMPT_METHOD_NAMES),
        "finetune" => names(TUNING_METHOD_NAMES),
        "all" => {
            let mut v = frozen();
            v.extend(names(PROMPT_METHOD_NAMES));
            v.extend(names(TUNING_METHOD_NAMES));
            v
        }
        _ => return None,
    })
}

/// Resolves a method list: method names and group names ([`METHOD_GROUPS`]), comma-separated,
/// in the order given, each method once.
pub fn resolve_methods(spec: &str) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let names = match method_group(item) {
            Some(g) => g,
            None => {
                let m = method_by_name(item, None)?;
                if m.requires_encoder() && !is_encoder_method(item) {
                    return Err(PipelineError::Refused(format!(
                        "'{item}' has no few-shot fit"
                    )));
                }
                vec![item.to_string()]
            }
        };
        for n in names {
            if !out.contains(&n) {
                out.push(n);
            }
        }
    }
    if out.is_empty() {
        return Err(PipelineError::Refused(format!(
            "give method names or groups ({METHOD_GROUPS}), comma-separated"
        )));
    }
    Ok(out)
}

/// The methods of `spec` that run on a task of this kind with this model, and those skipped
/// with the reason (multi-class methods on a multi-label task, visual prompts on a
/// convolutional tower), decided before any image is read. On a multi-label task `all` and
/// `frozen` mean every frozen-feature method, `zero-shot-pairs` included.
pub fn plan_methods(
    spec: &str,
    kind: TaskKind,
    model: &LoadedModel,
) -> Result<(Vec<String>, Vec<SkippedMethod>)> {
    let requested: Vec<String> =
        if kind == TaskKind::MultiLabel && matches!(spec.trim(), "all" | "frozen") {
            frozen_feature_method_names()
                .into_iter()
                .map(str::to_string)
                .collect()
        } else {
            resolve_methods(spec)?
        };
    let mut run = Vec::new();
    let mut skipped = Vec::new();
    for name in requested {
        match method_refusal(&name, kind, model) {
            None => run.push(name),
            Some(why) => skipped.push(SkippedMethod {
                reason: match why {
                    MethodRefusal::NotMultiLabel(reason) => reason,
                    other => other.to_string(),
                },
                method: name,
            }),
        }
    }
    if run.is_empty() {
        return Err(PipelineError::Refused(match kind {
            TaskKind::MultiLabel => format!(
                "none of the methods '{spec}' fits a multi-label task; multi-label methods: {}",
                MULTI_LABEL_METHODS.join(", ")
            ),
            TaskKind::MultiClass => format!("no method of '{spec}' runs on this model"),
        }));
    }
    Ok((run, skipped))
}

/// What a sweep runs.
#[derive(Debug, Clone)]
pub struct SweepRequest {
    /// Methods to run (see [`plan_methods`]).
    pub methods: Vec<String>,
    /// Methods left out, with the reason (recorded in the output).
    pub skipped: Vec<SkippedMethod>,
    /// Hyperparameter overrides per method.
    pub overrides: BTreeMap<String, serde_json::Value>,
    /// Shots per class.
    pub shots: Vec<usize>,
    /// Seeds `0..seeds` per K.
    pub seeds: u64,
    /// Balanced or realistic sampling (multi-label tasks: balanced).
    pub mode: SamplingMode,
    /// Fixed hyperparameters or support-set cross-validation.
    pub policy: HyperparameterPolicy,
}

/// Runs every method of `request` on every (K, seed) draw and evaluates it. `progress` is told
/// each encoder fit's result as it finishes (they take minutes each).
pub fn sweep(
    ctx: &AdaptContext,
    request: &SweepRequest,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<BenchOutput> {
    let task = ctx.task();
    let kind = task.kind;
    if request.seeds == 0 || request.shots.is_empty() {
        return Err(PipelineError::Refused(
            "a sweep needs at least one K and one seed".into(),
        ));
    }
    if ctx.test_rows().is_empty() {
        return Err(PipelineError::Refused(format!(
            "{}: no '{}' images with features to evaluate on",
            task.manifest_path.display(),
            ctx.setup().splits.test.as_deref().unwrap_or("test")
        )));
    }
    for name in request.overrides.keys() {
        if !request.methods.contains(name) {
            return Err(PipelineError::Refused(format!(
                "hyperparameters given for '{name}', which is not among the methods run ({})",
                request.methods.join(", ")
            )));
        }
    }
    let t0 = Instant::now();
    let protocols: Vec<FewShotProtocol> = request
        .shots
        .iter()
        .flat_map(|&k| {
            (0..request.seeds).map(move |seed| FewShotProtocol {
                shots: k,
                seed,
                mode: request.mode.clone(),
                task: kind,
                hyperparameter_policy: request.policy,
                validation_set: false,
            })
        })
        .collect();
    let draws: Vec<Support> = protocols
        .iter()
        .map(|p| ctx.draw(p))
        .collect::<Result<_>>()?;
    let (encoder, frozen): (Vec<&String>, Vec<&String>) =
        request.methods.iter().partition(|n| is_encoder_method(n));
    let run = |name: &str, draw: &Support| -> Result<BenchRecord> {
        let p = &draw.protocol;
        let what = format!("{name} at K={}, seed {}", p.shots, p.seed);
        let failed = |e: PipelineError| PipelineError::Fit {
            what: what.clone(),
            source: Box::new(e),
        };
        let t_fit = Instant::now();
        let fitted = ctx
            .fit(name, request.overrides.get(name), draw)
            .map_err(failed)?;
        let fit_seconds = t_fit.elapsed().as_secs_f64();
        let eval = ctx
            .evaluate(&fitted, draw)
            .map_err(failed)?
            .ok_or_else(|| PipelineError::Refused("no test images".into()))?;
        let (metrics, multilabel_metrics) = match eval.metrics {
            TaskMetrics::MultiClass(m) => (Some(m), None),
            TaskMetrics::MultiLabel(m) => (None, Some(m)),
        };
        Ok(BenchRecord {
            method: name.to_string(),
            protocol: p.clone(),
            support_size: draw.rows.len(),
            metrics,
            multilabel_metrics,
            fit_seconds,
            predict_seconds: eval.score_seconds,
        })
    };
    // Frozen-feature fits take milliseconds to seconds: the draws run in parallel.
    let per_draw: Vec<Result<Vec<BenchRecord>>> = draws
        .par_iter()
        .map(|draw| frozen.iter().map(|name| run(name, draw)).collect())
        .collect();
    let mut records = Vec::new();
    for r in per_draw {
        records.extend(r?);
    }
    // Encoder fits use every core each: one after the other.
    for draw in if encoder.is_empty() { &[][..] } else { &draws } {
        for name in &encoder {
            let r = run(name, draw)?;
            if let Some(m) = &r.metrics {
                progress(&format!(
                    "{name} K={} seed {}: accuracy {:.3} (fit {:.1} s)",
                    r.protocol.shots, r.protocol.seed, m.accuracy, r.fit_seconds
                ));
            }
            records.push(r);
        }
    }
    let setup = ctx.setup();
    let mut output = BenchOutput {
        model: setup.model_spec.to_string(),
        model_fingerprint: model_fingerprint(setup.model_spec, setup.model),
        data: task.manifests.clone(),
        data_sha256: task.manifest_sha256.clone(),
        class_names: task.class_names.clone(),
        prompts: setup.prompts.clone(),
        pool_size: ctx.pool_rows().len(),
        test_size: ctx.test_rows().len(),
        task: kind,
        support_sets: draws
            .iter()
            .map(|d| SupportDraw {
                shots: d.protocol.shots,
                seed: d.protocol.seed,
                support: ctx.support_listing(d),
            })
            .collect(),
        records,
        skipped_methods: request.skipped.clone(),
        accuracy_table: None,
        balanced_accuracy_table: None,
        macro_auroc_table: None,
        conformal_fnr_table: None,
        conformal_set_size_table: None,
        notes: Vec::new(),
        seconds: 0.0,
    };
    output.fill_tables(setup.conformal.alpha);
    output.seconds = t0.elapsed().as_secs_f64();
    Ok(output)
}

impl BenchOutput {
    fn table(&self, metric: &str, value: &dyn Fn(&BenchRecord) -> Option<f64>) -> FewShotTable {
        let results: Vec<FewShotResult> = self
            .records
            .iter()
            .filter_map(|r| {
                Some(FewShotResult {
                    method: r.method.clone(),
                    shots: r.protocol.shots,
                    values: vec![value(r)?],
                })
            })
            .collect();
        FewShotTable::new(metric, &results)
    }

    /// The mean ± std tables of the task kind, and the notes on what they leave out.
    fn fill_tables(&mut self, alpha: f64) {
        match self.task {
            TaskKind::MultiClass => {
                self.accuracy_table =
                    Some(self.table("accuracy, %", &|r| Some(r.metrics.as_ref()?.accuracy)));
                self.balanced_accuracy_table = Some(self.table("balanced accuracy, %", &|r| {
                    Some(r.metrics.as_ref()?.balanced_accuracy)
                }));
            }
            TaskKind::MultiLabel => {
                self.macro_auroc_table = Some(self.table("macro AUROC, %", &|r| {
                    r.multilabel_metrics.as_ref()?.macro_auroc
                }));
                let conformal = |r: &BenchRecord| -> Option<FnrControlReport> {
                    Some(
                        r.multilabel_metrics
                            .as_ref()?
                            .conformal_fnr_control
                            .as_ref()?
                            .report
                            .clone(),
                    )
                };
                let calibrated = self.records.iter().any(|r| conformal(r).is_some());
                if calibrated {
                    self.conformal_fnr_table = Some(
                        self.table(&format!("conformal test FNR at alpha {alpha}, %"), &|r| {
                            Some(conformal(r)?.fnr)
                        }),
                    );
                    self.conformal_set_size_table =
                        Some(self.table("conformal mean set size", &|r| {
                            Some(conformal(r)?.mean_set_size)
                        }));
                }
                self.notes.push(
                    if calibrated {
                        MULTI_LABEL_CONFORMAL_NOTE
                    } else {
                        MULTI_LABEL_NO_CALIBRATION_NOTE
                    }
                    .to_string(),
                );
                let undefined = self
                    .records
                    .iter()
                    .filter(|r| {
                        r.multilabel_metrics
                            .as_ref()
                            .is_none_or(|mx| mx.macro_auroc.is_none())
                    })
                    .count();
                if undefined > 0 {
                    self.notes.push(format!(
                        "{undefined} record(s) have no macro AUROC (no finding with both \
                         positives and negatives in the test set) and are left out of the table"
                    ));
                }
            }
        }
    }

    /// The headline table: accuracy (multi-class) or macro AUROC (multi-label).
    pub fn headline_table(&self) -> Option<&FewShotTable> {
        match self.task {
            TaskKind::MultiClass => self.accuracy_table.as_ref(),
            TaskKind::MultiLabel => self.macro_auroc_table.as_ref(),
        }
    }

    /// Writes the JSON file atomically.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| PipelineError::Write {
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
        write_atomic(path, &bytes)
    }

    /// Draws the headline table's mean (± std over seeds) against log2 K, one line per
    /// method, as a PNG.
    pub fn write_plot(&self, path: &Path, seeds: u64) -> Result<()> {
        let c = self.class_names.len();
        let (title, x_label, y_label) = match self.task {
            TaskKind::MultiClass => (
                format!("few-shot accuracy ({c} classes, {seeds} seeds)"),
                "log2 K (shots per class)",
                "test accuracy",
            ),
            TaskKind::MultiLabel => (
                format!("few-shot multi-label macro AUROC ({c} labels, {seeds} seeds)"),
                "log2 K (positives per label)",
                "test macro AUROC",
            ),
        };
        let mut plot = LinePlot::new(title, x_label, y_label);
        if let Some(table) = self.headline_table() {
            for (mi, method) in table.methods.iter().enumerate() {
                let mut points = Vec::new();
                let mut errors = Vec::new();
                for (ki, &k) in table.shots.iter().enumerate() {
                    if let Some(MeanStd { mean, std, .. }) = &table.cells[mi][ki] {
                        points.push(((k as f64).log2(), *mean));
                        errors.push(*std);
                    }
                }
                plot = plot.series(Series::new(method.clone(), points).with_errors(errors));
            }
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| PipelineError::Write {
                path: dir.to_path_buf(),
                source: Box::new(e),
            })?;
        }
        plot.write_png(path, Size::default())?;
        Ok(())
    }

    /// The methods above zero-shot at the largest K (multi-class tasks with zero-shot run):
    /// zero-shot's accuracy, that K, and the methods whose mean accuracy is higher.
    pub fn above_zero_shot(&self) -> Option<(f64, usize, Vec<String>)> {
        let acc = self.accuracy_table.as_ref()?;
        let zi = acc.methods.iter().position(|m| m == "zero-shot")?;
        let last = acc.shots.len().checked_sub(1)?;
        let z = acc.cells[zi][last].as_ref()?;
        let better = acc
            .methods
            .iter()
            .zip(&acc.cells)
            .filter(|(name, row)| {
                *name != "zero-shot" && row[last].as_ref().is_some_and(|c| c.mean > z.mean)
            })
            .map(|(name, _)| name.clone())
            .collect();
        Some((z.mean, acc.shots[last], better))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_groups_expand_in_order_without_repeats() {
        let frozen = resolve_methods("frozen").unwrap();
        assert_eq!(frozen[0], "zero-shot");
        assert!(frozen.contains(&"linear-probe".to_string()));
        assert!(!frozen
            .iter()
            .any(|m| is_encoder_method(m) || m == "zero-shot-pairs"));
        let mixed = resolve_methods("lora, frozen, coop, lora").unwrap();
        assert_eq!(mixed[0], "lora");
        assert_eq!(&mixed[1..1 + frozen.len()], frozen.as_slice());
        assert_eq!(mixed.last().unwrap(), "coop");
        assert_eq!(mixed.len(), frozen.len() + 2);
        let all = resolve_methods("all").unwrap();
        for m in PROMPT_METHOD_NAMES.iter().chain(TUNING_METHOD_NAMES) {
            assert!(all.contains(&m.to_string()), "{m}");
        }
        assert!(resolve_methods(" , ").is_err());
        assert!(resolve_methods("frozn").is_err());
    }
}
