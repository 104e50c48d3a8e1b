//! `medvlm upscale train|eval|apply`: single-image super-resolution of grey images with an
//! EDSR-style residual network over bicubic upsampling (`medvlm_tasks::super_resolution*`,
//! docs/super_resolution.md).
//!
//! * `train --manifest M [--split train] --out DIR [--scale 2] [--steps 1500] ...`: pairs made
//!   by bicubic downsampling of the manifest's images; writes `weights.safetensors` +
//!   `upscaler.json`. `--text-model M` conditions each image on its report (`text`, the
//!   `--text-section`, default `exam_impression`) through M's text tower (FiLM).
//! * `eval --upscaler DIR --manifest M [--split test] [--json OUT] [--grid PNG]`: PSNR/SSIM of
//!   the network and of bicubic upsampling, overall and per modality.
//! * `apply --upscaler DIR IMAGES... --out DIR [--prompt TEXT]`: `<stem>_x<scale>.png` per
//!   image; a text-conditioned upscaler needs `--prompt`.

use std::path::PathBuf;

use medvlm_tasks::super_resolution::SrConfig;
use medvlm_tasks::super_resolution_pipeline::{
    apply_files, evaluate_manifest, train_upscaler, write_grid, TrainOptions, Upscaler,
};
use medvlm_train::text_section::TextSection;

use super::embed::DeviceArgs;
use super::task_args::EvalJsonArg;

/// Arguments of `medvlm upscale`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: UpscaleCommand,
}

/// The subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum UpscaleCommand {
    /// Train an upscaler on the images of a manifest.
    Train(TrainArgs),
    /// Evaluate an upscaler against bicubic upsampling (PSNR, SSIM).
    Eval(EvalArgs),
    /// Upscale image files.
    Apply(ApplyArgs),
}

/// `medvlm upscale train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Manifest of high-resolution images (JSONL or CSV).
    #[arg(long)]
    pub manifest: PathBuf,
    /// Only this split of the manifest.
    #[arg(long)]
    pub split: Option<String>,
    /// Upscaling factor: 2 or 4.
    #[arg(long, default_value_t = 2)]
    pub scale: usize,
    /// Optimiser steps.
    #[arg(long, default_value_t = SrConfig::default().steps)]
    pub steps: usize,
    /// Crops per step.
    #[arg(long, default_value_t = SrConfig::default().batch, value_parser = crate::commands::at_least_one)]
    pub batch: usize,
    /// Channels of the residual body.
    #[arg(long, default_value_t = SrConfig::default().features, value_parser = crate::commands::at_least_one)]
    pub features: usize,
    /// Residual blocks.
    #[arg(long, default_value_t = SrConfig::default().blocks)]
    pub blocks: usize,
    /// High-resolution crop side (a multiple of the scale).
    #[arg(long, default_value_t = SrConfig::default().patch)]
    pub patch: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = SrConfig::default().lr)]
    pub lr: f64,
    /// Seed of the initialisation and the crops.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Use at most this many images (the first ones).
    #[arg(long)]
    pub max_images: Option<usize>,
    /// Condition each image on its report (the manifest's `text`) through this model's
    /// text tower (FiLM on the residual body); the upscaler then needs a prompt.
    #[arg(long)]
    pub text_model: Option<String>,
    /// The part of each report embedded with --text-model: report, impression or
    /// exam_impression [default: exam_impression].
    #[arg(long)]
    pub text_section: Option<TextSection>,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `medvlm upscale eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Upscaler folder written by `medvlm upscale train`.
    #[arg(long)]
    pub upscaler: PathBuf,
    /// Manifest of high-resolution test images.
    #[arg(long)]
    pub manifest: PathBuf,
    /// Only this split.
    #[arg(long)]
    pub split: Option<String>,
    #[command(flatten)]
    pub json: EvalJsonArg,
    /// Also write a figure (input, bicubic, output, ground truth, error x4; the first image
    /// of each modality) as a PNG here.
    #[arg(long)]
    pub grid: Option<PathBuf>,
    /// Enlargement of the figure's tiles.
    #[arg(long, default_value_t = 1)]
    pub grid_zoom: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `medvlm upscale apply`.
#[derive(clap::Args, Debug)]
pub struct ApplyArgs {
    /// Upscaler folder written by `medvlm upscale train`.
    #[arg(long)]
    pub upscaler: PathBuf,
    /// Low-resolution image files (PNG/JPEG/TIFF, DICOM, NIfTI middle slice); colour is
    /// converted to grey.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// The text of a text-conditioned upscaler (the report section it was trained on, e.g.
    /// "Single PA view of the chest. Moderate pleural effusion."); refused by an
    /// unconditioned one.
    #[arg(long)]
    pub prompt: Option<String>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Runs `medvlm upscale`.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        UpscaleCommand::Train(a) => train(a),
        UpscaleCommand::Eval(a) => eval(a),
        UpscaleCommand::Apply(a) => apply(a),
    }
}

fn train(a: TrainArgs) -> anyhow::Result<()> {
    let device = a.device.device()?;
    let config = SrConfig {
        scale: a.scale,
        features: a.features,
        blocks: a.blocks,
        patch: a.patch,
        steps: a.steps,
        batch: a.batch,
        lr: a.lr,
        seed: a.seed,
        ..SrConfig::default()
    };
    let opts = TrainOptions {
        config,
        split: a.split.clone(),
        max_images: a.max_images,
        text_model: a.text_model.clone(),
        text_section: a.text_section,
    };
    let every = (a.steps / 20).max(1);
    let mut window = Vec::new();
    let up = train_upscaler(&a.manifest, &opts, &device, &mut |step, loss| {
        window.push(loss);
        if (step + 1) % every == 0 || step + 1 == a.steps {
            let mean = window.iter().sum::<f32>() / window.len() as f32;
            eprintln!("step {:>6}/{}  L1 {mean:.5}", step + 1, a.steps);
            window.clear();
        }
    })?;
    up.save(&a.out)?;
    println!(
        "x{} upscaler trained on {} image(s) ({} converted from colour) in {:.0} s; final L1 {:.5}; written to {}",
        up.scale(),
        up.card.n_train_images,
        up.card.n_colour_converted,
        up.card.train_seconds,
        up.card.final_loss,
        a.out.display()
    );
    if let Some(m) = &up.card.text_model {
        println!(
            "conditioned on each report's {} through the text tower of {m}",
            up.card.text_section.map_or("?", TextSection::name)
        );
    }
    Ok(())
}

fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let device = a.device.device()?;
    let up = Upscaler::load(&a.upscaler, &device)?;
    let (evaluation, examples) = evaluate_manifest(&up, &a.manifest, a.split.as_deref())?;
    a.json.print(&evaluation.report(), &evaluation)?;
    if let Some(path) = &a.grid {
        write_grid(path, &examples, a.grid_zoom)?;
        println!("figure written to {}", path.display());
    }
    Ok(())
}

fn apply(a: ApplyArgs) -> anyhow::Result<()> {
    let device = a.device.device()?;
    let up = Upscaler::load(&a.upscaler, &device)?;
    for f in apply_files(&up, &a.images, a.prompt.as_deref(), &a.out)? {
        println!(
            "{} ({}x{}{}) -> {} ({}x{})",
            f.input.display(),
            f.input_size.0,
            f.input_size.1,
            if f.from_colour {
                ", colour converted to grey"
            } else {
                ""
            },
            f.output.display(),
            f.output_size.0,
            f.output_size.1
        );
    }
    Ok(())
}
