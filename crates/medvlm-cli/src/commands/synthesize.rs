//! `medvlm synthesize train|sample|eval`: text-conditioned image synthesis with a small
//! conditional DDPM conditioned on the frozen VLM's text embedding of a prompt, classifier-free
//! guidance and DDIM sampling (`medvlm_tasks::synthesis*`, docs/synthesis.md).
//!
//! * `train --model M --manifest M [--split train] --out DIR [--condition modality|finding]
//!   [--steps 1500] ...`: writes `weights.safetensors` + `synthesizer.json`.
//! * `sample --synthesizer DIR --prompt TEXT [--n 8] [--guidance 3] [--ddim-steps 50]
//!   [--seed 0] --out DIR`: `sample_NNN.png` per image and `grid.png`.
//! * `eval --synthesizer DIR --manifest M [--split test] --train-manifest M [--train-split
//!   train] [--json OUT] [--grid PNG]`: FID/KID in the VLM's image-feature space, prompt
//!   alignment, and the accuracy of a classifier trained on real images on generated ones.

use std::path::PathBuf;

use medvlm_tasks::synthesis::{BetaSchedule, DdimOptions, SynthConfig};
use medvlm_tasks::synthesis_pipeline::{
    evaluate_manifest, sample_to_files, train_synthesizer, write_examples_grid, Condition,
    EvalOptions, SampleOptions, Synthesizer, TrainOptions,
};

use super::embed::DeviceArgs;
use super::task_args::{warn, EvalJsonArg};

/// Arguments of `medvlm synthesize`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: SynthesizeCommand,
}

/// The subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum SynthesizeCommand {
    /// Train a text-conditioned diffusion model on the images of a manifest.
    Train(TrainArgs),
    /// Generate images for a prompt.
    Sample(SampleArgs),
    /// Evaluate against real test images (FID/KID in VLM features, alignment, classifier).
    Eval(EvalArgs),
}

/// `medvlm synthesize train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// VLM whose text tower embeds the prompts: a directory, hf:ORG/NAME or a preset.
    #[arg(long)]
    pub model: String,
    /// Manifest of training images with `modality` (and `label` for `--condition finding`).
    #[arg(long)]
    pub manifest: PathBuf,
    /// Only this split of the manifest.
    #[arg(long)]
    pub split: Option<String>,
    /// What a prompted class is: `modality` or `finding` (modality/label).
    #[arg(long, default_value = "modality")]
    pub condition: Condition,
    /// Side of the generated images.
    #[arg(long, default_value_t = SynthConfig::default().image_size)]
    pub size: usize,
    /// Width of the U-Net's first level.
    #[arg(long, default_value_t = SynthConfig::default().base, value_parser = crate::commands::at_least_one)]
    pub base: usize,
    /// Optimiser steps.
    #[arg(long, default_value_t = SynthConfig::default().steps)]
    pub steps: usize,
    /// Images per step.
    #[arg(long, default_value_t = SynthConfig::default().batch, value_parser = crate::commands::at_least_one)]
    pub batch: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = SynthConfig::default().lr)]
    pub lr: f64,
    /// Variance schedule: `linear` (DDPM) or `cosine`.
    #[arg(long, default_value = "linear", value_parser = parse_schedule)]
    pub schedule: BetaSchedule,
    /// Probability of dropping the prompt in training (classifier-free guidance).
    #[arg(long, default_value_t = SynthConfig::default().p_uncond)]
    pub p_uncond: f64,
    /// Seed of the initialisation and training draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Use at most this many images (the first ones).
    #[arg(long)]
    pub max_images: Option<usize>,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub device: DeviceArgs,
}

fn parse_schedule(s: &str) -> Result<BetaSchedule, String> {
    match s {
        "linear" => Ok(BetaSchedule::Linear),
        "cosine" => Ok(BetaSchedule::Cosine),
        o => Err(format!("schedule `{o}`: `linear` or `cosine`")),
    }
}

/// Sampling settings shared by `sample` and `eval`.
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Classifier-free guidance scale (1: the conditional model alone).
    #[arg(long, default_value_t = SampleOptions::default().guidance)]
    pub guidance: f64,
    /// DDIM steps.
    #[arg(long, default_value_t = DdimOptions::default().steps, value_parser = crate::commands::at_least_one)]
    pub ddim_steps: usize,
    /// DDIM eta (0: deterministic).
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// Seed of the noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    fn options(&self) -> SampleOptions {
        SampleOptions {
            guidance: self.guidance,
            ddim: DdimOptions {
                steps: self.ddim_steps,
                eta: self.eta,
                clip_x0: true,
            },
            seed: self.seed,
        }
    }
}

/// `medvlm synthesize sample`.
#[derive(clap::Args, Debug)]
pub struct SampleArgs {
    /// Synthesizer folder written by `medvlm synthesize train`.
    #[arg(long)]
    pub synthesizer: PathBuf,
    /// What to generate: a class of the synthesizer (`chest_xray`, `chest_xray/nodule`, or
    /// its prompt) uses its trained embedding; other text is embedded as given.
    #[arg(long)]
    pub prompt: String,
    /// Images to generate.
    #[arg(long, default_value_t = 8, value_parser = crate::commands::at_least_one)]
    pub n: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// VLM to use instead of the one named in the synthesizer.
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `medvlm synthesize eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Synthesizer folder written by `medvlm synthesize train`.
    #[arg(long)]
    pub synthesizer: PathBuf,
    /// Manifest of real test images.
    #[arg(long)]
    pub manifest: PathBuf,
    /// Only this split of it.
    #[arg(long)]
    pub split: Option<String>,
    /// Manifest of real training images for the classifier.
    #[arg(long)]
    pub train_manifest: PathBuf,
    /// Only this split of it.
    #[arg(long)]
    pub train_split: Option<String>,
    /// Images generated per class.
    #[arg(long, default_value_t = EvalOptions::default().n_per_class)]
    pub n_per_class: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub json: EvalJsonArg,
    /// Also write a grid (per class: a row of real test images, a row of generated ones).
    #[arg(long)]
    pub grid: Option<PathBuf>,
    /// Enlargement of the grid's tiles.
    #[arg(long, default_value_t = 1)]
    pub grid_zoom: usize,
    /// VLM to use instead of the one named in the synthesizer.
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Runs `medvlm synthesize`.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        SynthesizeCommand::Train(a) => train(a),
        SynthesizeCommand::Sample(a) => sample(a),
        SynthesizeCommand::Eval(a) => eval(a),
    }
}

fn train(a: TrainArgs) -> anyhow::Result<()> {
    let device = a.device.device()?;
    let config = SynthConfig {
        image_size: a.size,
        base: a.base,
        steps: a.steps,
        batch: a.batch,
        lr: a.lr,
        schedule: a.schedule,
        p_uncond: a.p_uncond,
        seed: a.seed,
        ..SynthConfig::default()
    };
    let opts = TrainOptions {
        model_spec: a.model.clone(),
        config,
        condition: a.condition,
        split: a.split.clone(),
        max_images: a.max_images,
    };
    let every = (a.steps / 20).max(1);
    let mut window = Vec::new();
    let t0 = std::time::Instant::now();
    let synth = train_synthesizer(&a.manifest, &opts, &device, &mut |step, loss| {
        window.push(loss);
        if (step + 1) % every == 0 || step + 1 == a.steps {
            let mean = window.iter().sum::<f32>() / window.len() as f32;
            eprintln!(
                "step {:>6}/{}  MSE {mean:.5}  ({:.0} s)",
                step + 1,
                a.steps,
                t0.elapsed().as_secs_f64()
            );
            window.clear();
        }
    })?;
    synth.save(&a.out)?;
    println!(
        "synthesizer ({} classes: {}) trained on {} image(s) in {:.0} s; final MSE {:.5}; written to {}",
        synth.card.classes.len(),
        synth
            .card
            .classes
            .iter()
            .map(|c| format!("{} = \"{}\"", c.name, c.prompt))
            .collect::<Vec<_>>()
            .join(", "),
        synth.card.n_train_images,
        synth.card.train_seconds,
        synth.card.final_loss,
        a.out.display()
    );
    Ok(())
}

fn sample(a: SampleArgs) -> anyhow::Result<()> {
    let device = a.device.device()?;
    let (synth, warning) = Synthesizer::load(&a.synthesizer, a.model.as_deref(), &device)?;
    warn(warning);
    let files = sample_to_files(&synth, &a.prompt, a.n, &a.sampling.options(), &a.out)?;
    match &files.class {
        Some(c) => println!("prompt `{}`: the synthesizer's class `{c}`", a.prompt),
        None => println!(
            "prompt `{}`: not a class of the synthesizer, embedded as free text (best effort)",
            a.prompt
        ),
    }
    println!(
        "{} image(s) written to {} (grid: {})",
        files.images.len(),
        a.out.display(),
        files.grid.display()
    );
    Ok(())
}

fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let device = a.device.device()?;
    let (synth, warning) = Synthesizer::load(&a.synthesizer, a.model.as_deref(), &device)?;
    warn(warning);
    let opts = EvalOptions {
        n_per_class: a.n_per_class,
        sample: a.sampling.options(),
    };
    let (evaluation, examples) = evaluate_manifest(
        &synth,
        &a.manifest,
        a.split.as_deref(),
        &a.train_manifest,
        a.train_split.as_deref(),
        &opts,
    )?;
    a.json.print(&evaluation.render_table(), &evaluation)?;
    if let Some(path) = &a.grid {
        let cfg = &synth.card.config;
        write_examples_grid(path, &examples, cfg.image_size, cfg.channels, a.grid_zoom)?;
        println!("grid written to {}", path.display());
    }
    Ok(())
}
