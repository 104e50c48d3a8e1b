//! `medvlm bench fewshot`: every requested adaptation method over shots x
//! seeds on one labelled manifest.
//!
//! The images are embedded once (feature cache, see `commands::common`);
//! for each (K, seed) one support set is drawn from the train split with
//! the few-shot sampler and shared by all methods; each fitted classifier is
//! evaluated on the test split with every metric (accuracy, balanced
//! accuracy, macro-F1, per-class and macro AUROC, ECE with its reliability
//! bins, split-conformal APS coverage and set size calibrated on the val
//! split, or without one on the train images outside the support set).
//!
//! Outputs: a table of mean ± standard deviation over seeds per method and
//! K (stdout, Markdown), a PNG plot of accuracy against shots with ±1 std
//! error bars, and a JSON file with one record per (method, K, seed)
//! carrying its metrics and its full few-shot protocol.
//!
//! `--methods` takes method names and groups: `frozen` is `zero-shot` plus
//! every trained frozen-feature method (the zero-shot variants that only
//! differ in their prompts, and the multi-label `zero-shot-pairs`, are left
//! out), `prompt` the prompt learners (CoOp, CoCoOp, KgCoOp, VPT, MaPLe),
//! `finetune` the encoder fine-tuning methods (LoRA, BitFit, partial, full),
//! `all` the three. Prompt learners and fine-tuning methods are fitted and
//! scored through the model (no feature cache), one (K, seed) after the
//! other, on the same support draws as the frozen-feature methods; each
//! fine-tuning fit starts from a fresh copy of the model. `--hparams
//! METHOD=JSON` overrides one method's defaults (e.g. fewer iterations for a
//! small model).
//!
//! Multi-label tasks (`--label-field labels`): the methods that fit them
//! ([`MULTI_LABEL_METHODS`]: `zero-shot-pairs`, `linear-probe`,
//! `tip-adapter`, `tip-adapter-f`, `clip-adapter`) run; every
//! other requested method (with `all`: every frozen-feature method) is
//! listed as skipped with the reason, on stdout and in the JSON. Support
//! sets come from the library's greedy multi-label sampler (at least K
//! positives per finding); the table is macro AUROC (mean ± std over
//! seeds) per method and K; each record carries the multi-label metrics
//! (per-class and macro AUROC, average precision, F1 at 0.5) and conformal
//! risk control of the false-negative rate of the label sets (Angelopoulos
//! et al., ICLR 2024; target `--conformal-alpha`, calibrated like the
//! multi-class sets on the val split or the train images outside the
//! support set), whose test FNR and mean set size get their own tables. No
//! APS/RAPS sets (they assume one class per image).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use medvlm_adapt::fewshot::{FewShotProtocol, HyperparameterPolicy, SamplingMode, TaskKind};
use medvlm_adapt::method::{
    frozen_feature_method_names, method_by_name, AdaptInput, FeatureAccess, SupportSet,
};
use medvlm_eval::conformal_multilabel::FnrControlReport;
use medvlm_eval::fewshot_table::{FewShotResult, FewShotTable, MeanStd};
use medvlm_eval::plots::{LinePlot, Plot, Series, Size};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::commands::common::{
    class_prompts, encode_class_texts, load_task, model_fingerprint, model_logit_scale,
    multi_label_refusal, negative_prompts, probabilities, task_features, write_file, Task,
    TaskArgs, MULTI_LABEL_METHODS,
};
use crate::commands::embed::{load, DeviceArgs};
use medvlm_adapt::encoders::{
    fit_prompt_method, fit_tuning_method, is_tuning_method, prompt_probabilities,
    tuned_probabilities, SupportImages,
};
use medvlm_adapt::methods::encoder_tuning::TUNING_METHOD_NAMES;
use medvlm_adapt::methods::prompt_common::{model_refusal, PROMPT_METHOD_NAMES};
use medvlm_eval::evaluation::{
    evaluate, evaluate_multilabel, Metrics, MultiLabelMetrics, MULTI_LABEL_CONFORMAL_NOTE,
    MULTI_LABEL_NO_CALIBRATION_NOTE,
};

/// Arguments of `medvlm bench fewshot`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model: a directory, hf:ORG/NAME[@REV], or a preset name.
    #[arg(long)]
    pub model: String,
    /// Manifest (.jsonl / .csv) with labelled images and a train / val / test `split`
    /// column; repeat to concatenate several.
    #[arg(long, required = true)]
    pub data: Vec<PathBuf>,
    /// Method names and groups, comma-separated. Groups: `frozen` (zero-shot and the
    /// frozen-feature adapters and probes; the default, seconds on cached features), `prompt`
    /// (prompt learning), `finetune` (encoder fine-tuning), `all` (the three; the last two run
    /// the model for every fit and take minutes to hours on a CPU).
    #[arg(long, default_value = "frozen")]
    pub methods: String,
    /// Hyperparameter overrides of one method, `METHOD=JSON` (repeat for several), e.g.
    /// `--hparams 'lora={"iterations_per_shot": 50}'`.
    #[arg(long = "hparams", value_name = "METHOD=JSON")]
    pub hparams: Vec<String>,
    /// Shots per class, comma-separated.
    #[arg(long, default_value = "1,2,4,8,16")]
    pub shots: String,
    /// Number of seeds (0..N).
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// JSON output: one record per method, K and seed.
    #[arg(long)]
    pub json: PathBuf,
    /// PNG plot of accuracy against shots (default: the JSON path with .png).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Support-set sampling: balanced or realistic.
    #[arg(long, default_value = "balanced", value_parser = ["balanced", "realistic"])]
    pub mode: String,
    /// Choose hyperparameters by F-fold cross-validation on the support set only.
    #[arg(long, value_name = "F")]
    pub support_cv: Option<usize>,
    #[command(flatten)]
    pub task: TaskArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

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
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SkippedMethod {
    /// Method registry name.
    pub method: String,
    /// Why it was not run.
    pub reason: String,
}

/// The support images of each (K, seed) draw (`draws[j]` indexes the pool rows `pool_rows`).
fn support_draws(
    task: &Task,
    jobs: &[(usize, u64)],
    draws: &[Vec<usize>],
    pool_rows: &[usize],
) -> Vec<SupportDraw> {
    jobs.iter()
        .zip(draws)
        .map(|(&(shots, seed), idx)| SupportDraw {
            shots,
            seed,
            support: idx
                .iter()
                .map(|&i| {
                    let r = pool_rows[i];
                    (task.rows[r].path.display().to_string(), task.label_text(r))
                })
                .collect(),
        })
        .collect()
}

fn multi_class() -> TaskKind {
    TaskKind::MultiClass
}

/// Class probabilities `[N * C]` of image files under a fitted encoder method.
type ImageScorer<'a> = dyn Fn(&[PathBuf]) -> anyhow::Result<Vec<f32>> + 'a;

/// Method groups `--methods` accepts besides single names.
const METHOD_GROUPS: &str = "all, frozen, prompt, finetune";

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

/// Resolves `--methods`: method names and group names ([`METHOD_GROUPS`]), comma-separated,
/// in the order given, each method once.
pub fn resolve_methods(spec: &str) -> anyhow::Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let names = match method_group(item) {
            Some(g) => g,
            None => {
                let m = method_by_name(item, None)?;
                if m.requires_encoder() && !is_encoder_method(item) {
                    bail!("--methods: '{item}' has no few-shot fit");
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
        bail!("--methods: give method names or groups ({METHOD_GROUPS}), comma-separated");
    }
    Ok(out)
}

/// Prompt learning or encoder fine-tuning: fitted and scored through the model.
fn is_encoder_method(name: &str) -> bool {
    PROMPT_METHOD_NAMES.contains(&name) || is_tuning_method(name)
}

/// Parses `--hparams METHOD=JSON` entries into per-method overrides.
fn parse_hparams(
    entries: &[String],
    methods: &[String],
) -> anyhow::Result<std::collections::BTreeMap<String, serde_json::Value>> {
    let mut out = std::collections::BTreeMap::new();
    for e in entries {
        let (name, json) = e.split_once('=').with_context(|| {
            format!(
                "--hparams {e:?}: write METHOD=JSON, e.g. 'lora={{\"iterations_per_shot\": 50}}'"
            )
        })?;
        let name = name.trim();
        if !methods.iter().any(|m| m == name) {
            bail!(
                "--hparams {e:?}: '{name}' is not among the --methods run ({})",
                methods.join(", ")
            );
        }
        let v: serde_json::Value = serde_json::from_str(json).with_context(|| {
            format!("--hparams {e:?}: the part after '=' must be a JSON object")
        })?;
        // Built once here so that an unknown or out-of-range field fails before any work.
        method_by_name(name, Some(&v))?;
        out.insert(name.to_string(), v);
    }
    Ok(out)
}

fn parse_shots(s: &str) -> anyhow::Result<Vec<usize>> {
    let mut v = s
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| {
            x.parse::<usize>()
                .ok()
                .filter(|&k| k > 0)
                .with_context(|| format!("--shots: {x:?} is not a positive integer"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    v.sort_unstable();
    v.dedup();
    if v.is_empty() {
        bail!("--shots: give at least one K, e.g. 1,2,4,8,16");
    }
    Ok(v)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = args.device.device()?;
    if args.task.label_field == crate::commands::common::MULTI_LABEL_FIELD {
        return run_multilabel(args, &device);
    }
    let mut methods = resolve_methods(&args.methods)?;
    let hparams = parse_hparams(&args.hparams, &methods)?;
    let shots = parse_shots(&args.shots)?;
    if args.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    let policy = match args.support_cv {
        None => HyperparameterPolicy::Fixed,
        Some(f) if f >= 2 => HyperparameterPolicy::SupportCv { folds: f },
        Some(f) => bail!("--support-cv {f}: needs at least 2 folds"),
    };
    let mode = match args.mode.as_str() {
        "realistic" => SamplingMode::Realistic { min_per_class: 1 },
        _ => SamplingMode::Balanced,
    };
    let task = load_task(&args.data, &args.task)?;
    let prompts = class_prompts(&task.class_names, &args.task)?;
    let m = load(&args.model, &device)?;
    // Methods this model cannot run (visual prompts on a convolutional tower) are listed as
    // skipped, before any image is read.
    let mut skipped = Vec::new();
    methods.retain(|name| match model_refusal(name, m.model.as_ref()) {
        Some(reason) => {
            skipped.push(SkippedMethod {
                method: name.clone(),
                reason,
            });
            false
        }
        None => true,
    });
    if methods.is_empty() {
        bail!(
            "no method of --methods {} runs on {}",
            args.methods,
            args.model
        );
    }
    let feats = task_features(&task, &args.model, &m, &args.task, &device)?;
    let texts = encode_class_texts(&m, &prompts, None, args.task.batch, &device)?;
    let scale = model_logit_scale(&m)?;
    let c = task.class_names.len();

    let pool_rows = feats.available(&task.split_rows(&args.task.split));
    let test_rows = feats.available(&task.split_rows(&args.task.test_split));
    if pool_rows.is_empty() || test_rows.is_empty() {
        bail!(
            "{}: need labelled '{}' images ({} found) and '{}' images ({} found); set --split / --test-split",
            task.manifest_path.display(),
            args.task.split,
            pool_rows.len(),
            args.task.test_split,
            test_rows.len()
        );
    }
    let (pool_f, pool_y) = feats.select(&task, &pool_rows)?;
    let (test_f, test_y) = feats.select(&task, &test_rows)?;
    let val_rows = feats.available(&task.split_rows(&args.task.calib_split));
    let val = if val_rows.is_empty() {
        None
    } else {
        Some(feats.select(&task, &val_rows)?)
    };

    let built = methods
        .iter()
        .filter(|n| !is_encoder_method(n))
        .map(|n| method_by_name(n, hparams.get(n)))
        .collect::<Result<Vec<_>, _>>()?;
    let encoder_methods: Vec<&String> = methods.iter().filter(|n| is_encoder_method(n)).collect();
    let jobs: Vec<(usize, u64)> = shots
        .iter()
        .flat_map(|&k| (0..args.seeds).map(move |s| (k, s)))
        .collect();
    let protocol_of = |k: usize, seed: u64| FewShotProtocol {
        shots: k,
        seed,
        mode: mode.clone(),
        task: TaskKind::MultiClass,
        hyperparameter_policy: policy,
        validation_set: false,
    };
    // Conformal calibration rows of a support draw (pool indices `idx`): the val split, else
    // the pool outside the support set.
    let calibration_rows = |idx: &[usize]| -> (Vec<usize>, String) {
        if !val_rows.is_empty() {
            return (
                val_rows.clone(),
                format!("split '{}'", args.task.calib_split),
            );
        }
        let in_support: std::collections::BTreeSet<usize> = idx.iter().copied().collect();
        let rows = (0..pool_y.len())
            .filter(|i| !in_support.contains(i))
            .map(|i| pool_rows[i])
            .collect();
        (
            rows,
            format!("'{}' images outside the support set", args.task.split),
        )
    };
    let t0 = Instant::now();
    // One support draw per (K, seed), shared by the frozen-feature and the encoder methods.
    let draws: Vec<Vec<usize>> = jobs
        .iter()
        .map(|&(k, seed)| {
            protocol_of(k, seed)
                .sample(&pool_y, &task.class_names)
                .map_err(|e| anyhow::anyhow!("--shots {k}: {e}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let per_job: Vec<anyhow::Result<Vec<BenchRecord>>> = jobs
        .par_iter()
        .zip(&draws)
        .map(|(&(k, seed), idx)| -> anyhow::Result<Vec<BenchRecord>> {
            let protocol = protocol_of(k, seed);
            let support = SupportSet::from_pool(&pool_f, &pool_y, idx)?;
            let input = AdaptInput {
                texts: &texts,
                support: &support,
                access: FeatureAccess::FrozenFeatures,
                logit_scale: Some(scale),
                policy,
                seed,
                protocol: Some(&protocol),
            };
            let (cal_f, cal_y, source) = match &val {
                Some((f, y)) => (
                    f.clone(),
                    y.clone(),
                    format!("split '{}'", args.task.calib_split),
                ),
                None => {
                    let (rows, source) = calibration_rows(idx);
                    let (f, y) = feats.select(&task, &rows)?;
                    (f, y, source)
                }
            };
            let mut out = Vec::with_capacity(built.len());
            for method in &built {
                let t_fit = Instant::now();
                let clf = method
                    .fit(&input)
                    .with_context(|| format!("{} at K={k}, seed {seed}", method.name()))?;
                let fit_seconds = t_fit.elapsed().as_secs_f64();
                let t_pred = Instant::now();
                let probs = probabilities(clf.as_ref(), &test_f)?;
                let predict_seconds = t_pred.elapsed().as_secs_f64();
                let calib = if cal_y.is_empty() {
                    None
                } else {
                    Some((probabilities(clf.as_ref(), &cal_f)?, cal_y.clone()))
                };
                let metrics = evaluate(
                    &probs,
                    &test_y,
                    c,
                    calib
                        .as_ref()
                        .map(|(p, y)| (p.as_slice(), y.as_slice(), source.clone())),
                    args.task.conformal(seed),
                )?;
                out.push(BenchRecord {
                    method: method.name().to_string(),
                    protocol: protocol.clone(),
                    support_size: idx.len(),
                    metrics: Some(metrics),
                    multilabel_metrics: None,
                    fit_seconds,
                    predict_seconds,
                });
            }
            Ok(out)
        })
        .collect();
    let mut records = Vec::new();
    for r in per_job {
        records.extend(r?);
    }

    // Prompt learning and encoder fine-tuning: fitted and scored through the model, one
    // (K, seed) after the other (each fit uses every core), on the same support draws.
    let paths_of = |rows: &[usize]| -> Vec<PathBuf> {
        rows.iter().map(|&r| task.rows[r].path.clone()).collect()
    };
    let test_paths = paths_of(&test_rows);
    let encoder_jobs: &[(usize, u64)] = if encoder_methods.is_empty() {
        &[]
    } else {
        &jobs
    };
    for (&(k, seed), idx) in encoder_jobs.iter().zip(&draws) {
        let protocol = protocol_of(k, seed);
        let support_rows: Vec<usize> = idx.iter().map(|&i| pool_rows[i]).collect();
        let support_paths = paths_of(&support_rows);
        let labels: Vec<usize> = idx.iter().map(|&i| pool_y[i]).collect();
        let (cal_rows, source) = calibration_rows(idx);
        let cal_paths = paths_of(&cal_rows);
        let cal_y = task.classes(&cal_rows)?;
        for name in &encoder_methods {
            let overrides = hparams.get(name.as_str());
            let t_fit = Instant::now();
            let what = || format!("{name} at K={k}, seed {seed}");
            // Each arm returns a scorer of image files.
            let tuned;
            let prompt_clf;
            let job = SupportImages {
                model: &args.model,
                class_names: &task.class_names,
                prompts: &prompts,
                support: &support_paths,
                labels: &labels,
                seed,
            };
            let score: Box<ImageScorer> = if is_tuning_method(name) {
                tuned = fit_tuning_method(name, overrides, &job, &device).with_context(what)?;
                Box::new(|p: &[PathBuf]| {
                    Ok(tuned_probabilities(
                        &tuned.0,
                        &tuned.1,
                        p,
                        args.task.batch,
                        &device,
                    )?)
                })
            } else {
                prompt_clf =
                    fit_prompt_method(name, overrides, &m, &job, &device).with_context(what)?;
                Box::new(|p: &[PathBuf]| {
                    Ok(prompt_probabilities(
                        &prompt_clf,
                        &m,
                        p,
                        args.task.batch,
                        &device,
                    )?)
                })
            };
            let fit_seconds = t_fit.elapsed().as_secs_f64();
            let t_pred = Instant::now();
            let probs = score(&test_paths)?;
            let predict_seconds = t_pred.elapsed().as_secs_f64();
            let calib = if cal_y.is_empty() {
                None
            } else {
                Some(score(&cal_paths)?)
            };
            let metrics = evaluate(
                &probs,
                &test_y,
                c,
                calib
                    .as_ref()
                    .map(|p| (p.as_slice(), cal_y.as_slice(), source.clone())),
                args.task.conformal(seed),
            )?;
            eprintln!(
                "{name} K={k} seed {seed}: accuracy {:.3} (fit {fit_seconds:.1} s)",
                metrics.accuracy
            );
            records.push(BenchRecord {
                method: name.to_string(),
                protocol: protocol.clone(),
                support_size: idx.len(),
                metrics: Some(metrics),
                multilabel_metrics: None,
                fit_seconds,
                predict_seconds,
            });
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();

    let table_of = |metric: &str, get: &dyn Fn(&Metrics) -> f64| {
        let results: Vec<FewShotResult> = records
            .iter()
            .filter_map(|r| {
                Some(FewShotResult {
                    method: r.method.clone(),
                    shots: r.protocol.shots,
                    values: vec![get(r.metrics.as_ref()?)],
                })
            })
            .collect();
        FewShotTable::new(metric, &results)
    };
    let acc = table_of("accuracy, %", &|m| m.accuracy);
    let bal = table_of("balanced accuracy, %", &|m| m.balanced_accuracy);

    let plot_path = write_shots_plot(
        &args,
        &acc,
        format!("few-shot accuracy ({} classes, {} seeds)", c, args.seeds),
        "log2 K (shots per class)",
        "test accuracy",
    )?;

    let output = BenchOutput {
        model: args.model.clone(),
        model_fingerprint: model_fingerprint(&args.model, &m),
        data: task.manifests.clone(),
        data_sha256: task.manifest_sha256.clone(),
        class_names: task.class_names.clone(),
        prompts,
        pool_size: pool_rows.len(),
        test_size: test_rows.len(),
        task: TaskKind::MultiClass,
        records,
        support_sets: support_draws(&task, &jobs, &draws, &pool_rows),
        skipped_methods: skipped.clone(),
        accuracy_table: Some(acc.clone()),
        balanced_accuracy_table: Some(bal.clone()),
        macro_auroc_table: None,
        conformal_fnr_table: None,
        conformal_set_size_table: None,
        notes: Vec::new(),
    };
    write_file(&args.json, &serde_json::to_vec_pretty(&output)?)?;

    println!(
        "{} classes, pool {} ({} split), test {} ({} split), {} method(s) x {} K x {} seed(s) in {:.1} s",
        c,
        pool_rows.len(),
        args.task.split,
        test_rows.len(),
        args.task.test_split,
        methods.len(),
        shots.len(),
        args.seeds,
        elapsed
    );
    println!("{}", acc.to_markdown(100.0, 1));
    println!("{}", bal.to_markdown(100.0, 1));
    if let Some(zi) = acc.methods.iter().position(|m| m == "zero-shot") {
        let last = acc.shots.len() - 1;
        if let Some(z) = &acc.cells[zi][last] {
            let better: Vec<&str> = acc
                .methods
                .iter()
                .zip(&acc.cells)
                .filter(|(name, row)| {
                    *name != "zero-shot" && row[last].as_ref().is_some_and(|c| c.mean > z.mean)
                })
                .map(|(name, _)| name.as_str())
                .collect();
            println!(
                "zero-shot accuracy {:.1}% (chance {:.1}%); above zero-shot at K={}: {}",
                z.mean * 100.0,
                100.0 / c as f64,
                acc.shots[last],
                if better.is_empty() {
                    "none".to_string()
                } else {
                    better.join(", ")
                }
            );
        }
    }
    for s in &skipped {
        println!("skipped {}: {}", s.method, s.reason);
    }
    println!("wrote {} and {}", args.json.display(), plot_path.display());
    Ok(())
}

/// The methods a multi-label benchmark runs, and those it skips with the reason.
/// `all` and `frozen` mean every frozen-feature method here, the multi-label zero-shot
/// variant (`zero-shot-pairs`) included.
fn resolve_multilabel_methods(spec: &str) -> anyhow::Result<(Vec<String>, Vec<SkippedMethod>)> {
    let requested: Vec<String> = if matches!(spec.trim(), "all" | "frozen") {
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
        match multi_label_refusal(&name) {
            None => run.push(name),
            Some(reason) => skipped.push(SkippedMethod {
                method: name,
                reason,
            }),
        }
    }
    if run.is_empty() {
        bail!(
            "--methods {spec:?}: none of these fits a multi-label task (--label-field labels); \
             multi-label methods: {}",
            MULTI_LABEL_METHODS.join(", ")
        );
    }
    Ok((run, skipped))
}

/// `medvlm bench fewshot` on a multi-label task (`--label-field labels`).
fn run_multilabel(args: Args, device: &candle_core::Device) -> anyhow::Result<()> {
    let (methods, skipped) = resolve_multilabel_methods(&args.methods)?;
    let shots = parse_shots(&args.shots)?;
    if args.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    if args.mode == "realistic" {
        bail!(
            "--mode realistic draws classes by their prior and is defined for multi-class tasks; \
             multi-label support sets use the greedy multi-label sampler (at least K positives \
             per finding): drop --mode realistic"
        );
    }
    let policy = match args.support_cv {
        None => HyperparameterPolicy::Fixed,
        Some(f) if f >= 2 => HyperparameterPolicy::SupportCv { folds: f },
        Some(f) => bail!("--support-cv {f}: needs at least 2 folds"),
    };
    let task = load_task(&args.data, &args.task)?;
    let prompts = class_prompts(&task.class_names, &args.task)?;
    let negatives = negative_prompts(&task.class_names, &args.task)?;
    let m = load(&args.model, device)?;
    let feats = task_features(&task, &args.model, &m, &args.task, device)?;
    let texts = encode_class_texts(&m, &prompts, Some(&negatives), args.task.batch, device)?;
    let scale = model_logit_scale(&m)?;
    let c = task.class_names.len();

    let pool_rows = feats.available(&task.split_rows(&args.task.split));
    let test_rows = feats.available(&task.split_rows(&args.task.test_split));
    if pool_rows.is_empty() || test_rows.is_empty() {
        bail!(
            "{}: need labelled '{}' images ({} found) and '{}' images ({} found); set --split / --test-split",
            task.manifest_path.display(),
            args.task.split,
            pool_rows.len(),
            args.task.test_split,
            test_rows.len()
        );
    }
    let pool_targets = task.multi_hot(&pool_rows)?;
    let test_f = feats.features_of(&task, &test_rows)?;
    let test_targets = task.multi_hot(&test_rows)?;
    // Conformal calibration: the calibration split when there is one (shared by
    // every draw), else the pool images outside each draw's support set.
    let val_rows = feats.available(&task.split_rows(&args.task.calib_split));
    let val = if val_rows.is_empty() {
        None
    } else {
        Some((
            feats.features_of(&task, &val_rows)?,
            task.multi_hot(&val_rows)?,
        ))
    };
    let built = methods
        .iter()
        .map(|n| method_by_name(n, None))
        .collect::<Result<Vec<_>, _>>()?;
    let jobs: Vec<(usize, u64)> = shots
        .iter()
        .flat_map(|&k| (0..args.seeds).map(move |s| (k, s)))
        .collect();
    let t0 = Instant::now();
    let draws: Vec<Vec<usize>> = jobs
        .iter()
        .map(|&(k, seed)| {
            medvlm_adapt::fewshot::sample_support_multilabel(
                &pool_targets,
                &task.class_names,
                k,
                seed,
            )
            .map_err(|e| {
                anyhow::anyhow!(
                    "--shots {k}: {e} (multi-label support set from the '{}' split of {})",
                    args.task.split,
                    task.manifest_path.display()
                )
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let per_job: Vec<anyhow::Result<Vec<BenchRecord>>> = jobs
        .par_iter()
        .zip(&draws)
        .map(|(&(k, seed), idx)| -> anyhow::Result<Vec<BenchRecord>> {
            let protocol = FewShotProtocol {
                shots: k,
                seed,
                mode: SamplingMode::Balanced,
                task: TaskKind::MultiLabel,
                hyperparameter_policy: policy,
                validation_set: false,
            };
            let rows: Vec<usize> = idx.iter().map(|&i| pool_rows[i]).collect();
            let support = SupportSet {
                features: feats.features_of(&task, &rows)?,
                labels: task.support_labels(&rows)?,
            };
            let (cal_f, cal_targets, source) = match &val {
                Some((f, t)) => (
                    Some(f.clone()),
                    t.clone(),
                    format!("split '{}'", args.task.calib_split),
                ),
                None => {
                    let in_support: std::collections::BTreeSet<usize> =
                        idx.iter().copied().collect();
                    let outside: Vec<usize> = (0..pool_rows.len())
                        .filter(|i| !in_support.contains(i))
                        .map(|i| pool_rows[i])
                        .collect();
                    let f = if outside.is_empty() {
                        None
                    } else {
                        Some(feats.features_of(&task, &outside)?)
                    };
                    (
                        f,
                        task.multi_hot(&outside)?,
                        format!("'{}' images outside the support set", args.task.split),
                    )
                }
            };
            let input = AdaptInput {
                texts: &texts,
                support: &support,
                access: FeatureAccess::FrozenFeatures,
                logit_scale: Some(scale),
                policy,
                seed,
                protocol: Some(&protocol),
            };
            let mut out = Vec::with_capacity(built.len());
            for method in &built {
                let t_fit = Instant::now();
                let clf = method
                    .fit(&input)
                    .with_context(|| format!("{} at K={k}, seed {seed}", method.name()))?;
                let fit_seconds = t_fit.elapsed().as_secs_f64();
                if clf.card().task != TaskKind::MultiLabel {
                    bail!(
                        "method '{}' returned a multi-class classifier for a multi-label task",
                        method.name()
                    );
                }
                let t_pred = Instant::now();
                let probs = probabilities(clf.as_ref(), &test_f)?;
                let predict_seconds = t_pred.elapsed().as_secs_f64();
                let cal_probs = match &cal_f {
                    Some(f) => Some(probabilities(clf.as_ref(), f)?),
                    None => None,
                };
                let metrics = evaluate_multilabel(
                    &probs,
                    &test_targets,
                    &task.class_names,
                    cal_probs
                        .as_ref()
                        .map(|p| (p.as_slice(), cal_targets.as_slice(), source.clone())),
                    args.task.conformal_alpha,
                )?;
                out.push(BenchRecord {
                    method: method.name().to_string(),
                    protocol: protocol.clone(),
                    support_size: idx.len(),
                    metrics: None,
                    multilabel_metrics: Some(metrics),
                    fit_seconds,
                    predict_seconds,
                });
            }
            Ok(out)
        })
        .collect();
    let mut records = Vec::new();
    for r in per_job {
        records.extend(r?);
    }
    let elapsed = t0.elapsed().as_secs_f64();

    let undefined = records
        .iter()
        .filter(|r| {
            r.multilabel_metrics
                .as_ref()
                .is_none_or(|mx| mx.macro_auroc.is_none())
        })
        .count();
    let results: Vec<FewShotResult> = records
        .iter()
        .filter_map(|r| {
            Some(FewShotResult {
                method: r.method.clone(),
                shots: r.protocol.shots,
                values: vec![r.multilabel_metrics.as_ref()?.macro_auroc?],
            })
        })
        .collect();
    let auroc = FewShotTable::new("macro AUROC, %", &results);
    let conformal_table = |metric: &str, value: &dyn Fn(&FnrControlReport) -> f64| {
        let results: Vec<FewShotResult> = records
            .iter()
            .filter_map(|r| {
                let cf = r
                    .multilabel_metrics
                    .as_ref()?
                    .conformal_fnr_control
                    .as_ref()?;
                Some(FewShotResult {
                    method: r.method.clone(),
                    shots: r.protocol.shots,
                    values: vec![value(&cf.report)],
                })
            })
            .collect();
        (!results.is_empty()).then(|| FewShotTable::new(metric, &results))
    };
    let fnr_table = conformal_table(
        &format!(
            "conformal test FNR at alpha {}, %",
            args.task.conformal_alpha
        ),
        &|r| r.fnr,
    );
    let set_size_table = conformal_table("conformal mean set size", &|r| r.mean_set_size);

    let plot_path = write_shots_plot(
        &args,
        &auroc,
        format!(
            "few-shot multi-label macro AUROC ({c} labels, {} seeds)",
            args.seeds
        ),
        "log2 K (positives per label)",
        "test macro AUROC",
    )?;

    let mut notes = vec![if fnr_table.is_some() {
        MULTI_LABEL_CONFORMAL_NOTE
    } else {
        MULTI_LABEL_NO_CALIBRATION_NOTE
    }
    .to_string()];
    if undefined > 0 {
        notes.push(format!(
            "{undefined} record(s) have no macro AUROC (no finding with both positives and \
             negatives in the test set) and are left out of the table"
        ));
    }
    let output = BenchOutput {
        model: args.model.clone(),
        model_fingerprint: model_fingerprint(&args.model, &m),
        data: task.manifests.clone(),
        data_sha256: task.manifest_sha256.clone(),
        class_names: task.class_names.clone(),
        prompts,
        pool_size: pool_rows.len(),
        test_size: test_rows.len(),
        task: TaskKind::MultiLabel,
        records,
        support_sets: support_draws(&task, &jobs, &draws, &pool_rows),
        skipped_methods: skipped.clone(),
        accuracy_table: None,
        balanced_accuracy_table: None,
        macro_auroc_table: Some(auroc.clone()),
        conformal_fnr_table: fnr_table.clone(),
        conformal_set_size_table: set_size_table.clone(),
        notes: notes.clone(),
    };
    write_file(&args.json, &serde_json::to_vec_pretty(&output)?)?;

    println!(
        "multi-label, {c} labels ({}), pool {} ({} split), test {} ({} split), {} method(s) x {} K \
         x {} seed(s) in {:.1} s",
        task.class_names.join(", "),
        pool_rows.len(),
        args.task.split,
        test_rows.len(),
        args.task.test_split,
        methods.len(),
        shots.len(),
        args.seeds,
        elapsed
    );
    println!("{}", auroc.to_markdown(100.0, 1));
    if let Some(t) = &fnr_table {
        println!("{}", t.to_markdown(100.0, 1));
    }
    if let Some(t) = &set_size_table {
        println!("{}", t.to_markdown(1.0, 2));
    }
    for s in &skipped {
        println!("skipped {}: {}", s.method, s.reason);
    }
    for n in &notes {
        println!("note: {n}");
    }
    println!("wrote {} and {}", args.json.display(), plot_path.display());
    Ok(())
}

/// Draws a table's mean (± std over seeds) against log2 K, one line per method, to `--plot`
/// (default: the JSON path with a `.png` extension) and returns the path.
fn write_shots_plot(
    args: &Args,
    table: &FewShotTable,
    title: String,
    x_label: &str,
    y_label: &str,
) -> anyhow::Result<PathBuf> {
    let mut plot = LinePlot::new(title, x_label, y_label);
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
    let plot_path = args
        .plot
        .clone()
        .unwrap_or_else(|| args.json.with_extension("png"));
    if let Some(dir) = plot_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    plot.write_png(&plot_path, Size::default())
        .with_context(|| format!("drawing {}", plot_path.display()))?;
    Ok(plot_path)
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
