//! `medvlm multitask train|eval|compare|predict`: one shared trunk on a frozen VLM image tower
//! with findings-classification, VQA and report heads trained jointly with per-task loss
//! weights (`medvlm_tasks::multitask_pipeline`, docs/multitask.md).
//!
//! * `train --model M --manifest train.jsonl --out DIR [--config mt.toml]`: trains and writes
//!   the model folder.
//! * `eval --multitask DIR --manifest test.jsonl [--json OUT]`: the scores of each trained head.
//! * `compare --model M --train train.jsonl --eval test.jsonl --eval heldout.jsonl`: trains the
//!   multi-task model and one single-task model per head with the same settings, and prints
//!   the table of both on each evaluated manifest.
//! * `predict --multitask DIR [--question Q]... IMAGES...`: findings, a report and answers.

use std::path::PathBuf;

use anyhow::Context;
use medvlm_tasks::multitask::{Head, MultiTaskConfig};
use medvlm_tasks::multitask_pipeline::{
    compare, evaluate_manifest, predict_files, train_and_save, MultiTaskOptions,
};

use super::common::write_file;
use super::embed::DeviceArgs;
use super::task_args::warn;

/// Arguments of `medvlm multitask`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: MultitaskCommand,
}

/// The subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum MultitaskCommand {
    /// Train the shared trunk and its heads jointly on a manifest.
    Train(TrainArgs),
    /// Score a trained multi-task model on a manifest.
    Eval(EvalArgs),
    /// Train the multi-task model and single-task models with the same settings and compare
    /// them on test manifests.
    Compare(CompareArgs),
    /// Findings, a report and answers for image files.
    Predict(PredictArgs),
}

/// Settings shared by `train` and `compare`: a config file, then flags over it.
#[derive(clap::Args, Debug)]
pub struct SettingsArgs {
    /// Image model: a directory, hf:ORG/NAME or a preset.
    #[arg(long)]
    pub model: String,
    /// Settings file (TOML or JSON; see docs/multitask.md); flags below override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Loss weight of a head, e.g. `--weight report=0.5` (heads: classification, vqa,
    /// report; 0 switches a head off). Repeatable.
    #[arg(long = "weight", value_name = "HEAD=W")]
    pub weights: Vec<String>,
    /// Passes over the training images (default 20).
    #[arg(long, value_parser = crate::commands::at_least_one)]
    pub epochs: Option<usize>,
    /// Images per update (default 32).
    #[arg(long, value_parser = crate::commands::at_least_one)]
    pub batch: Option<usize>,
    /// Peak learning rate (default 1e-3).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Width of the shared trunk (default 256).
    #[arg(long, value_parser = crate::commands::at_least_one)]
    pub trunk_width: Option<usize>,
    /// Report decoder width (default 128).
    #[arg(long, value_parser = crate::commands::at_least_one)]
    pub report_width: Option<usize>,
    /// Report decoder blocks (default 2).
    #[arg(long, value_parser = crate::commands::at_least_one)]
    pub report_layers: Option<usize>,
    /// Report prefix length (default 10).
    #[arg(long, value_parser = crate::commands::at_least_one)]
    pub report_prefix: Option<usize>,
    /// Seed of initialisation and batch order (default 0).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Only the records of this split of the training manifest.
    #[arg(long)]
    pub split: Option<String>,
}

impl SettingsArgs {
    fn options(&self) -> anyhow::Result<MultiTaskOptions> {
        let mut c = match &self.config {
            Some(p) => MultiTaskConfig::load(p)?,
            None => MultiTaskConfig::default(),
        };
        for w in &self.weights {
            let (name, value) = w
                .split_once('=')
                .with_context(|| format!("--weight {w:?}: expected HEAD=W"))?;
            let value: f64 = value
                .trim()
                .parse()
                .with_context(|| format!("--weight {w:?}: {value:?} is not a number"))?;
            let head = Head::ALL
                .into_iter()
                .find(|h| h.name() == name.trim())
                .with_context(|| {
                    format!("--weight {w:?}: unknown head (classification, vqa or report)")
                })?;
            match head {
                Head::Classification => c.weights.classification = value,
                Head::Vqa => c.weights.vqa = value,
                Head::Report => c.weights.report = value,
            }
        }
        c.epochs = self.epochs.unwrap_or(c.epochs);
        c.batch = self.batch.unwrap_or(c.batch);
        c.lr = self.lr.unwrap_or(c.lr);
        c.trunk_width = self.trunk_width.unwrap_or(c.trunk_width);
        c.report_width = self.report_width.unwrap_or(c.report_width);
        c.report_layers = self.report_layers.unwrap_or(c.report_layers);
        c.report_prefix = self.report_prefix.unwrap_or(c.report_prefix);
        c.seed = self.seed.unwrap_or(c.seed);
        c.validate()?;
        Ok(MultiTaskOptions {
            model_spec: self.model.clone(),
            config: c,
            split: self.split.clone(),
        })
    }
}

/// `medvlm multitask train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Training manifest (.jsonl / .csv) with `labels`, `qa` and/or `text` per image.
    #[arg(long)]
    pub manifest: PathBuf,
    /// Output folder of the model.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub settings: SettingsArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `medvlm multitask eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Model folder written by `medvlm multitask train`.
    #[arg(long)]
    pub multitask: PathBuf,
    /// Test manifest.
    #[arg(long)]
    pub manifest: PathBuf,
    /// Only the records of this split of the manifest.
    #[arg(long)]
    pub split: Option<String>,
    /// Also write the scores as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `medvlm multitask compare`.
#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// Training manifest.
    #[arg(long)]
    pub train: PathBuf,
    /// Manifests to score on (repeatable), e.g. the test split and the held-out site.
    #[arg(long = "eval", required = true)]
    pub evals: Vec<PathBuf>,
    /// Also write the multi-task model folder here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write the comparison as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub settings: SettingsArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `medvlm multitask predict`.
#[derive(clap::Args, Debug)]
pub struct PredictArgs {
    /// Model folder written by `medvlm multitask train`.
    #[arg(long)]
    pub multitask: PathBuf,
    /// A question to answer about every image (repeatable).
    #[arg(long = "question")]
    pub questions: Vec<String>,
    /// Findings listed per image (most likely first; default 3).
    #[arg(long, default_value_t = 3)]
    pub top: usize,
    /// Image files.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Runs `medvlm multitask`.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        MultitaskCommand::Train(a) => train(a),
        MultitaskCommand::Eval(a) => eval(a),
        MultitaskCommand::Compare(a) => compare_cmd(a),
        MultitaskCommand::Predict(a) => predict(a),
    }
}

fn opt(l: Option<f32>) -> String {
    l.map_or("-".into(), |v| format!("{v:.4}"))
}

fn train(a: TrainArgs) -> anyhow::Result<()> {
    let device = a.device.device()?;
    let opts = a.settings.options()?;
    let card = train_and_save(&a.manifest, &opts, &a.out, &device, &mut |e, l| {
        eprintln!(
            "epoch {} loss {:.4} (classification {}, vqa {}, report {})",
            e + 1,
            l.total,
            opt(l.classification),
            opt(l.vqa),
            opt(l.report)
        )
    })?;
    println!(
        "trained a multi-task model on {} images ({} findings, {} answers, {} report words; heads: {}) in {:.1} s",
        card.n_train,
        card.findings.len(),
        card.answers.len(),
        card.dims.vocab,
        card.config
            .weights
            .active()
            .iter()
            .map(|h| h.name())
            .collect::<Vec<_>>()
            .join(", "),
        card.train_seconds
    );
    println!("model written to {}", a.out.display());
    Ok(())
}

fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let device = a.device.device()?;
    let (scores, warning) =
        evaluate_manifest(&a.multitask, &a.manifest, a.split.as_deref(), &device)?;
    warn(warning);
    print!("{}", scores.render());
    if let Some(path) = &a.json {
        write_file(path, &serde_json::to_vec_pretty(&scores)?)?;
        println!("scores written to {}", path.display());
    }
    Ok(())
}

fn compare_cmd(a: CompareArgs) -> anyhow::Result<()> {
    let device = a.device.device()?;
    let opts = a.settings.options()?;
    let cmp = compare(
        &a.train,
        &a.evals,
        &opts,
        a.out.as_deref(),
        &device,
        &mut |line| eprintln!("{line}"),
    )?;
    print!("{}", cmp.render_table());
    if let Some(path) = &a.json {
        write_file(path, &serde_json::to_vec_pretty(&cmp)?)?;
        println!("comparison written to {}", path.display());
    }
    if let Some(out) = &a.out {
        println!("multi-task model written to {}", out.display());
    }
    Ok(())
}

fn predict(a: PredictArgs) -> anyhow::Result<()> {
    let device = a.device.device()?;
    let (preds, warning) = predict_files(&a.multitask, &a.images, &a.questions, &device)?;
    warn(warning);
    for p in preds {
        println!("{}", p.image);
        if !p.findings.is_empty() {
            let top: Vec<String> = p
                .findings
                .iter()
                .take(a.top.max(1))
                .map(|(f, pr)| format!("{f} {pr:.2}"))
                .collect();
            println!("  findings: {}", top.join(", "));
        }
        if let Some(r) = &p.report {
            println!("  report: {r}");
        }
        for (q, ans, pr) in &p.answers {
            println!("  Q: {q}  A: {ans} ({pr:.2})");
        }
    }
    Ok(())
}
