//! `medvlm models`: the presets of known medical VLMs, with hub id, family, input size and
//! licence; `medvlm models pull` downloads one into the Hugging Face hub cache
//! ([`medvlm_models::hub::pull`]). A preset name works wherever `--model` is asked for.

use std::sync::{Arc, Mutex};

use medvlm_models::hub::{self, HubOptions, PullProgress};
use medvlm_models::presets::PRESETS;
use medvlm_models::source::ModelSource;

use super::progress::Progress;

/// Arguments of `medvlm models`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: Option<ModelsCommand>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Subcommand, Debug)]
enum ModelsCommand {
    /// Download a model (a preset name or hf:ORG/NAME[@REVISION]) into the hub cache, verify
    /// every file against the hub's hashes, and make what medvlm needs that the repo lacks
    /// (a tokenizer.json, BiomedCLIP's text-tower files). Gated models (MedSigLIP) need
    /// HF_TOKEN; HF_ENDPOINT and HF_HUB_CACHE are honoured.
    Pull(PullArgs),
}

#[derive(clap::Args, Debug)]
struct PullArgs {
    /// Preset name (see `medvlm models`) or hf:ORG/NAME[@REVISION].
    model: String,
    /// Print the report (files, sizes, verified digests) as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Some(ModelsCommand::Pull(p)) => pull(p),
        None => list(args.json),
    }
}

/// Bytes as MiB on the progress bar: a byte count would be unreadable.
const MIB: f64 = 1048576.0;

/// Draws [`Progress`] from a pull's events.
struct PullBar {
    bar: Mutex<Option<Progress>>,
}

impl PullProgress for PullBar {
    fn start(&self, repo: &str, files: usize, bytes: u64) {
        let p = Progress::new(
            &format!("pull {repo} ({files} files)"),
            (bytes as f64 / MIB).ceil() as u64,
            "MiB",
        );
        *self.bar.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
    }
    fn bytes(&self, done: u64, _total: u64) {
        if let Some(p) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            p.set_position((done as f64 / MIB).floor() as u64);
        }
    }
    fn file_done(&self, name: &str, size: u64) {
        if let Some(p) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            p.set_message(format!("{name} ({:.1} MiB) verified", size as f64 / MIB));
        }
    }
}

fn pull(args: PullArgs) -> anyhow::Result<()> {
    let (repo, revision) = match ModelSource::parse(&args.model)? {
        ModelSource::Hub { repo, revision } => (repo, revision),
        ModelSource::Local(p) => anyhow::bail!(
            "{} is a local folder; pull takes a preset name or hf:ORG/NAME[@REVISION]",
            p.display()
        ),
    };
    let bar = Arc::new(PullBar {
        bar: Mutex::new(None),
    });
    let report = hub::pull(
        &repo,
        revision.as_deref(),
        &HubOptions::from_env(),
        bar.clone(),
    )?;
    if let Some(p) = bar.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
        p.finish();
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let bytes: u64 = report.files.iter().map(|f| f.size).sum();
    println!(
        "hf:{}@{} (commit {}): {} files, {:.1} MiB, each verified against the hub's hash",
        report.repo,
        report.revision,
        report.commit,
        report.files.len(),
        bytes as f64 / MIB
    );
    for f in &report.files {
        println!(
            "  {:<32} {:>12} bytes  {} {}",
            f.name, f.size, f.check, f.digest
        );
    }
    if !report.made.is_empty() {
        println!("made for medvlm: {}", report.made.join(", "));
    }
    if !report.skipped.is_empty() {
        println!(
            "not fetched ({} files medvlm does not read): {}",
            report.skipped.len(),
            report.skipped.join(", ")
        );
    }
    println!(
        "in {}\nuse it as --model hf:{} (or --model {})",
        report.snapshot.display(),
        report.repo,
        report.snapshot.display()
    );
    Ok(())
}

fn list(json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(PRESETS)?);
        return Ok(());
    }
    let w_name = PRESETS
        .iter()
        .map(|p| p.name.len())
        .max()
        .unwrap_or(4)
        .max(6);
    let w_hub = PRESETS
        .iter()
        .map(|p| p.hub_id.len())
        .max()
        .unwrap_or(6)
        .max(6);
    println!(
        "{:<w_name$}  {:<w_hub$}  {:<10}  {:>5}  licence",
        "preset", "hub id", "family", "input"
    );
    for p in PRESETS {
        println!(
            "{:<w_name$}  {:<w_hub$}  {:<10}  {:>5}  {}",
            p.name,
            p.hub_id,
            p.family.name(),
            p.input_size,
            p.licence
        );
    }
    println!(
        "\nUse a preset as `--model NAME` or `--model hf:HUB_ID`. `medvlm models pull NAME` \
         downloads it into the hub cache ($HF_HUB_CACHE, $HF_HOME/hub or \
         ~/.cache/huggingface/hub); so does the first use of a model that is not cached, \
         unless offline (--offline or HF_HUB_OFFLINE=1). A local directory works too."
    );
    Ok(())
}
