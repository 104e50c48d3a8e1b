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
//! ([`medvlm_adapt::pipeline::MULTI_LABEL_METHODS`]: `zero-shot-pairs`, `linear-probe`,
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

//!
//! The sweep is one library call, [`medvlm_adapt::fewshot_sweep::sweep`]; this module turns the
//! flags into its inputs and prints the tables.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use medvlm_adapt::fewshot::{SamplingMode, TaskKind};
use medvlm_adapt::fewshot_sweep::{plan_methods, resolve_methods, sweep, SweepRequest};
use medvlm_adapt::method::method_by_name;
use medvlm_adapt::pipeline::{AdaptContext, PipelineError};

use crate::commands::common::{
    hyperparameter_policy, load_task, task_features, task_prompts, TaskArgs,
};
use crate::commands::embed::{load, DeviceArgs};

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

/// Parses `--hparams METHOD=JSON` entries into per-method overrides.
fn parse_hparams(
    entries: &[String],
    methods: &[&str],
) -> anyhow::Result<BTreeMap<String, serde_json::Value>> {
    let mut out = BTreeMap::new();
    for e in entries {
        let (name, json) = e.split_once('=').with_context(|| {
            format!(
                "--hparams {e:?}: write METHOD=JSON, e.g. 'lora={{\"iterations_per_shot\": 50}}'"
            )
        })?;
        let name = name.trim();
        if !methods.contains(&name) {
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
    // Names checked before any work.
    resolve_methods(&args.methods).context("--methods")?;
    let shots = parse_shots(&args.shots)?;
    if args.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    let policy = hyperparameter_policy(args.support_cv)?;
    let task = load_task(&args.data, &args.task)?;
    let multi_label = task.kind == TaskKind::MultiLabel;
    let prompts = task_prompts(&task, &args.task, &args.mode)?;
    let m = load(&args.model, &device)?;
    // Methods this task or model cannot run (multi-class methods on a multi-label task,
    // visual prompts on a convolutional tower) are listed as skipped, before any image is read.
    let (methods, skipped) = plan_methods(&args.methods, task.kind, &m).map_err(|e| match e {
        PipelineError::Refused(why) => anyhow::anyhow!(
            "no method of --methods {} runs on {}: {why}",
            args.methods,
            args.model
        ),
        e => e.into(),
    })?;
    let mut known: Vec<&str> = methods.iter().map(String::as_str).collect();
    known.extend(skipped.iter().map(|s| s.method.as_str()));
    let mut overrides = parse_hparams(&args.hparams, &known)?;
    overrides.retain(|name, _| methods.contains(name));

    let feats = task_features(&task, &args.model, &m, &args.task, &device)?;
    let ctx =
        AdaptContext::new(
            args.task
                .setup(&task, &feats, &m, &args.model, prompts, 0, &device),
        )?;
    if ctx.test_rows().is_empty() {
        bail!(
            "{}: need labelled '{}' images ({} found) and '{}' images (0 found); set --split / --test-split",
            task.manifest_path.display(),
            args.task.split,
            ctx.pool_rows().len(),
            args.task.test_split,
        );
    }
    let request = SweepRequest {
        methods: methods.clone(),
        skipped: skipped.clone(),
        overrides,
        shots: shots.clone(),
        seeds: args.seeds,
        mode: match args.mode.as_str() {
            "realistic" => SamplingMode::Realistic { min_per_class: 1 },
            _ => SamplingMode::Balanced,
        },
        policy,
    };
    let output = sweep(&ctx, &request, &|line| eprintln!("{line}")).map_err(|e| match e {
        e @ PipelineError::Support { .. } => anyhow::Error::new(e).context("--shots"),
        e => e.into(),
    })?;
    output.write_json(&args.json)?;
    let plot_path = args
        .plot
        .clone()
        .unwrap_or_else(|| args.json.with_extension("png"));
    output.write_plot(&plot_path, args.seeds)?;

    let c = task.class_names.len();
    if multi_label {
        println!(
            "multi-label, {c} labels ({}), pool {} ({} split), test {} ({} split), {} method(s) x \
             {} K x {} seed(s) in {:.1} s",
            task.class_names.join(", "),
            output.pool_size,
            args.task.split,
            output.test_size,
            args.task.test_split,
            methods.len(),
            shots.len(),
            args.seeds,
            output.seconds
        );
    } else {
        println!(
            "{c} classes, pool {} ({} split), test {} ({} split), {} method(s) x {} K x {} seed(s) in {:.1} s",
            output.pool_size,
            args.task.split,
            output.test_size,
            args.task.test_split,
            methods.len(),
            shots.len(),
            args.seeds,
            output.seconds
        );
    }
    for t in [
        &output.accuracy_table,
        &output.balanced_accuracy_table,
        &output.macro_auroc_table,
        &output.conformal_fnr_table,
    ]
    .into_iter()
    .flatten()
    {
        println!("{}", t.to_markdown(100.0, 1));
    }
    if let Some(t) = &output.conformal_set_size_table {
        println!("{}", t.to_markdown(1.0, 2));
    }
    if let Some((z, k, better)) = output.above_zero_shot() {
        println!(
            "zero-shot accuracy {:.1}% (chance {:.1}%); above zero-shot at K={k}: {}",
            z * 100.0,
            100.0 / c as f64,
            if better.is_empty() {
                "none".to_string()
            } else {
                better.join(", ")
            }
        );
    }
    for s in &output.skipped_methods {
        println!("skipped {}: {}", s.method, s.reason);
    }
    for n in &output.notes {
        println!("note: {n}");
    }
    println!("wrote {} and {}", args.json.display(), plot_path.display());
    Ok(())
}
