//! `medvlm report train|generate|eval`: report generation from a frozen VLM image tower
//! (ClipCap-style prefix mapping into a GPT-2-layout decoder; `medvlm_tasks::report_pipeline`,
//! docs/report_generation.md).
//!
//! * `train --model M --manifest train.jsonl --out DIR`: trains the generator on the
//!   manifest's images and `text` reports and writes its folder.
//! * `generate --generator DIR IMAGES...`: prints one report per image.
//! * `eval --generator DIR --manifest test.jsonl [--json OUT]`: BLEU, ROUGE-L, CIDEr-D and
//!   clinical efficacy of the generated reports and of the nearest-neighbour baseline.

use std::path::PathBuf;

use medvlm_tasks::report_findings::FindingsConfig;
use medvlm_tasks::report_generation::ReportGenConfig;
use medvlm_tasks::report_pipeline::{
    evaluate_manifest, generate_files, read_lexicon, train_and_save, Decoding, ReportTrainOptions,
};

use super::embed::DeviceArgs;
use super::task_args::{warn, EvalJsonArg, SplitArg};

/// Arguments of `medvlm report`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: ReportCommand,
}

/// The subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum ReportCommand {
    /// Train a report generator on a manifest of images and reports.
    Train(TrainArgs),
    /// Write a report for each image (PNG/JPEG/TIFF, DICOM, NIfTI).
    Generate(GenerateArgs),
    /// Evaluate a generator and the nearest-neighbour baseline on a manifest.
    Eval(EvalArgs),
}

/// `medvlm report train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Image model: a directory, hf:ORG/NAME or a preset.
    #[arg(long)]
    pub model: String,
    /// Training manifest (.jsonl / .csv) with a `text` report per image.
    #[arg(long)]
    pub manifest: PathBuf,
    #[command(flatten)]
    pub split: SplitArg,
    /// Output folder of the generator.
    #[arg(long)]
    pub out: PathBuf,
    /// Passes over the training reports (default 12).
    #[arg(long, value_parser = crate::commands::at_least_one)]
    pub epochs: Option<usize>,
    /// Reports per update (default 32).
    #[arg(long, value_parser = crate::commands::at_least_one)]
    pub batch: Option<usize>,
    /// Decoder width (default 128).
    #[arg(long, value_parser = crate::commands::at_least_one)]
    pub width: Option<usize>,
    /// Decoder blocks (default 2).
    #[arg(long, value_parser = crate::commands::at_least_one)]
    pub layers: Option<usize>,
    /// Prefix length (default 10).
    #[arg(long, value_parser = crate::commands::at_least_one)]
    pub prefix: Option<usize>,
    /// Longest report in tokens (default 120); longer ones are cut and counted.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Peak learning rate (default 1e-3).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Seed of initialisation and batch order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Train without the diagnosis prompt (PromptMRG's idea, on by default: a findings
    /// classifier with per-finding thresholds decides which findings of the lexicon the
    /// report states, and the decoder writes them).
    #[arg(long, conflicts_with_all = ["lexicon", "findings_grid"])]
    pub no_diagnosis_prompt: bool,
    /// Findings lexicon (JSON, as for `report eval --lexicon`) of the diagnosis prompt;
    /// default: the phantom vocabulary.
    #[arg(long)]
    pub lexicon: Option<PathBuf>,
    /// The findings classifier also reads the patch tokens pooled on an N x N grid (default
    /// 2; 0: the pooled embedding only, for towers without patch tokens).
    #[arg(long)]
    pub findings_grid: Option<usize>,
    /// Probability of zeroing a training report's image embedding for an update, so that the
    /// decoder learns to state the prompt's findings (default 0).
    #[arg(long, conflicts_with = "no_diagnosis_prompt")]
    pub image_dropout: Option<f64>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Decoding flag shared by `generate` and `eval`.
#[derive(clap::Args, Debug)]
pub struct DecodingArgs {
    /// Beam search with this many beams (default: greedy decoding).
    #[arg(long, value_parser = crate::commands::at_least_one, conflicts_with = "faithful")]
    pub beams: Option<usize>,
    /// Greedy decoding that holds each report's end until it states every finding the
    /// diagnosis prompt calls present (generators trained with the prompt only).
    #[arg(long)]
    pub faithful: bool,
    /// With --faithful: classifier-free guidance scale towards the diagnosis prompt
    /// (0: none).
    #[arg(long, default_value_t = 0.0, requires = "faithful", value_parser = crate::commands::non_negative)]
    pub guidance: f64,
}

impl DecodingArgs {
    fn decoding(&self) -> Decoding {
        match self.beams {
            _ if self.faithful => Decoding::GreedyFaithful {
                guidance: self.guidance,
            },
            Some(k) if k > 1 => Decoding::Beam(k),
            _ => Decoding::Greedy,
        }
    }
}

/// `medvlm report generate`.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Generator folder written by `medvlm report train`.
    #[arg(long)]
    pub generator: PathBuf,
    /// Image files.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    #[command(flatten)]
    pub decoding: DecodingArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `medvlm report eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Generator folder written by `medvlm report train`.
    #[arg(long)]
    pub generator: PathBuf,
    /// Test manifest with a `text` report per image.
    #[arg(long)]
    pub manifest: PathBuf,
    #[command(flatten)]
    pub split: SplitArg,
    /// Findings lexicon (JSON: {"findings": [{"label", "match_terms": [...]}]}) for clinical
    /// efficacy (default: the phantom vocabulary).
    #[arg(long)]
    pub lexicon: Option<PathBuf>,
    #[command(flatten)]
    pub json: EvalJsonArg,
    #[command(flatten)]
    pub decoding: DecodingArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Runs `medvlm report`.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        ReportCommand::Train(a) => train(a),
        ReportCommand::Generate(a) => generate(a),
        ReportCommand::Eval(a) => eval(a),
    }
}

fn train(a: TrainArgs) -> anyhow::Result<()> {
    let device = a.device.device()?;
    let d = ReportGenConfig::default();
    let config = ReportGenConfig {
        epochs: a.epochs.unwrap_or(d.epochs),
        batch: a.batch.unwrap_or(d.batch),
        width: a.width.unwrap_or(d.width),
        layers: a.layers.unwrap_or(d.layers),
        prefix_len: a.prefix.unwrap_or(d.prefix_len),
        max_tokens: a.max_tokens.unwrap_or(d.max_tokens),
        lr: a.lr.unwrap_or(d.lr),
        seed: a.seed,
        image_dropout: a.image_dropout.unwrap_or(d.image_dropout),
        ..d
    };
    let opts = ReportTrainOptions {
        model_spec: a.model.clone(),
        config,
        split: a.split.split.clone(),
        diagnosis_prompt: (!a.no_diagnosis_prompt).then(|| {
            let d = FindingsConfig::default();
            FindingsConfig {
                seed: a.seed,
                image_grid: a.findings_grid.unwrap_or(d.image_grid),
                ..d
            }
        }),
        lexicon: a.lexicon.as_deref().map(read_lexicon).transpose()?,
    };
    let t0 = std::time::Instant::now();
    let card = train_and_save(&a.manifest, &opts, &a.out, &device, &mut |e, loss| {
        eprintln!("epoch {} loss {loss:.4}", e + 1)
    })?;
    println!(
        "trained a report generator on {} reports ({} words in the vocabulary, {} cut to {} tokens) in {:.1} s; final loss {:.4}",
        card.n_train,
        card.vocab_size,
        card.n_truncated,
        card.config.max_tokens,
        t0.elapsed().as_secs_f64(),
        card.epoch_losses.last().copied().unwrap_or(f32::NAN)
    );
    println!("generator written to {}", a.out.display());
    Ok(())
}

fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let device = a.device.device()?;
    let (reports, warning) =
        generate_files(&a.generator, &a.images, a.decoding.decoding(), &device)?;
    warn(warning);
    for (img, r) in a.images.iter().zip(reports) {
        println!("{}\t{r}", img.display());
    }
    Ok(())
}

fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let device = a.device.device()?;
    let (evaluation, warning) = evaluate_manifest(
        &a.generator,
        &a.manifest,
        a.split.get(),
        a.decoding.decoding(),
        a.lexicon.as_deref(),
        &device,
    )?;
    warn(warning);
    a.json.print(&evaluation.render_table(), &evaluation)?;
    Ok(())
}
