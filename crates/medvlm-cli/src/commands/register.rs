//! `medvlm register train|apply|eval`: learned deformable registration of 2-D image pairs (a
//! VoxelMorph-style network with a diffeomorphic velocity field;
//! `medvlm_tasks::registration_pipeline`, docs/registration.md). Fields are pull-backs in
//! pixels, `[2, H, W]` = `dx, dy`: `warped(x) = moving(x + field(x))`.
//!
//! * `train --manifest M [--split train] --out DIR`: trains on the manifest's pairs (records
//!   with `moved`: moving = `moved`, fixed = `image`) and writes the registrar folder
//!   (`registration.safetensors` + `registrar.json`); with `--val`, prints its evaluation.
//! * `apply --registrar DIR --moving A --fixed B --out DIR [--moving-mask MASK]`: writes
//!   `warped.png`, `field.npy` (and `warped_mask.png`).
//! * `eval --registrar DIR --manifest M [--split test] [--json OUT] [--grid PNG]`: EPE against
//!   the known fields, folding and Dice of warped masks, for the network, the identity and
//!   the oracle, overall and per modality.

use std::path::PathBuf;

use medvlm_tasks::registration::{RegConfig, Similarity};
use medvlm_tasks::registration_pipeline::{
    apply_files, comparison_grid, evaluate_manifest, figure_pairs, load_pairs, Registrar,
};

use super::common::write_file;
use super::embed::DeviceArgs;
use super::task_args::EvalJsonArg;

/// Arguments of `medvlm register`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: RegisterCommand,
}

/// The subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum RegisterCommand {
    /// Train a registration network on a manifest of (moved, image) pairs.
    Train(TrainArgs),
    /// Register a moving image onto a fixed image.
    Apply(ApplyArgs),
    /// Evaluate a registrar against the known fields of a manifest.
    Eval(EvalArgs),
}

/// `medvlm register train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Manifest (.jsonl / .csv) whose records have `moved` (and optionally `deformation`).
    #[arg(long)]
    pub manifest: PathBuf,
    /// Only the records of this split.
    #[arg(long)]
    pub split: Option<String>,
    /// At most this many pairs.
    #[arg(long, value_parser = crate::commands::at_least_one)]
    pub limit: Option<usize>,
    /// Validation manifest, evaluated after training.
    #[arg(long)]
    pub val: Option<PathBuf>,
    /// Split of the validation manifest.
    #[arg(long)]
    pub val_split: Option<String>,
    /// Output folder of the registrar.
    #[arg(long)]
    pub out: PathBuf,
    /// Optimiser steps (default 3000).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Pairs per step (default 16).
    #[arg(long, value_parser = crate::commands::at_least_one)]
    pub batch: Option<usize>,
    /// First-level width (default 16).
    #[arg(long, value_parser = crate::commands::at_least_one)]
    pub width: Option<usize>,
    /// AdamW learning rate (default 2e-3).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Similarity: mse (default) or ncc (local NCC, 9x9 window).
    #[arg(long, value_parser = ["mse", "ncc"])]
    pub similarity: Option<String>,
    /// Smoothness weight λ (default 0.1, chosen on the phantom validation split over 0.01).
    #[arg(long)]
    pub smoothness: Option<f64>,
    /// Velocity grid downsizing factor, a power of two (default 4).
    #[arg(long)]
    pub field_downsize: Option<usize>,
    /// Scaling-and-squaring steps (default 7).
    #[arg(long)]
    pub integration_steps: Option<usize>,
    /// Weight of the soft Dice of warped masks (default 0: images only).
    #[arg(long)]
    pub mask_dice: Option<f64>,
    /// Seed of the initialisation and pair order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Condition the network on each pair's prompt (its modality and findings, e.g.
    /// "brain mri with tumour") through this model's text tower (FiLM of the bottleneck).
    #[arg(long)]
    pub text_model: Option<String>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `medvlm register apply`.
#[derive(clap::Args, Debug)]
pub struct ApplyArgs {
    /// Registrar folder written by `medvlm register train`.
    #[arg(long)]
    pub registrar: PathBuf,
    /// Moving image.
    #[arg(long)]
    pub moving: PathBuf,
    /// Fixed image (same size).
    #[arg(long)]
    pub fixed: PathBuf,
    /// A mask of the moving image to carry along.
    #[arg(long)]
    pub moving_mask: Option<PathBuf>,
    /// The prompt of a text-conditioned registrar: modality and findings, e.g.
    /// "brain mri with tumour" (refused by an unconditioned one).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `medvlm register eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Registrar folder written by `medvlm register train`.
    #[arg(long)]
    pub registrar: PathBuf,
    /// Manifest with `moved` and `deformation` per record.
    #[arg(long)]
    pub manifest: PathBuf,
    /// Only the records of this split.
    #[arg(long)]
    pub split: Option<String>,
    /// At most this many pairs.
    #[arg(long, value_parser = crate::commands::at_least_one)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub json: EvalJsonArg,
    /// Also write an image grid here (PNG): one pair per modality first.
    #[arg(long)]
    pub grid: Option<PathBuf>,
    /// Pairs in the grid.
    #[arg(long, default_value_t = 4, value_parser = crate::commands::at_least_one)]
    pub grid_rows: usize,
    /// Upscaling of each grid tile (nearest).
    #[arg(long, default_value_t = 2, value_parser = crate::commands::at_least_one)]
    pub grid_zoom: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Runs `medvlm register`.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        RegisterCommand::Train(a) => train(a),
        RegisterCommand::Apply(a) => apply(a),
        RegisterCommand::Eval(a) => eval(a),
    }
}

fn train(a: TrainArgs) -> anyhow::Result<()> {
    let device = a.device.device()?;
    let d = RegConfig::default();
    let cfg = RegConfig {
        width: a.width.unwrap_or(d.width),
        steps: a.steps.unwrap_or(d.steps),
        batch: a.batch.unwrap_or(d.batch),
        lr: a.lr.unwrap_or(d.lr),
        similarity: match a.similarity.as_deref() {
            Some("ncc") => Similarity::Ncc,
            _ => Similarity::Mse,
        },
        smoothness: a.smoothness.unwrap_or(d.smoothness),
        integration_steps: a.integration_steps.unwrap_or(d.integration_steps),
        field_downsize: a.field_downsize.unwrap_or(d.field_downsize),
        mask_dice_weight: a.mask_dice.unwrap_or(d.mask_dice_weight),
        seed: a.seed,
        ..d
    };
    let reg = Registrar::train(
        &a.manifest,
        a.split.as_deref(),
        a.limit,
        &cfg,
        a.text_model.as_deref(),
        &device,
        |step, t| {
            eprintln!(
                "step {step}: loss {:.5} (similarity {:.5}, smoothness {:.5})",
                t.total, t.similarity, t.smoothness
            )
        },
    )?;
    reg.save(&a.out)?;
    println!(
        "trained a registration network on {} pairs of {}x{} in {:.1} s ({} steps)",
        reg.card.n_train_pairs,
        reg.card.image_size.0,
        reg.card.image_size.1,
        reg.card.train_seconds,
        cfg.steps
    );
    println!("registrar written to {}", a.out.display());
    if let Some(val) = &a.val {
        let pairs = load_pairs(val, a.val_split.as_deref(), None)?;
        print!("{}", reg.evaluate(&pairs)?.render_table());
    }
    Ok(())
}

fn apply(a: ApplyArgs) -> anyhow::Result<()> {
    let device = a.device.device()?;
    let r = apply_files(
        &a.registrar,
        &a.moving,
        &a.fixed,
        a.moving_mask.as_deref(),
        a.prompt.as_deref(),
        &a.out,
        &device,
    )?;
    println!(
        "{} -> {}: MSE {:.5} -> {:.5}, folded pixels {:.3} %",
        a.moving.display(),
        a.fixed.display(),
        r.mse.0,
        r.mse.1,
        100.0 * r.folding
    );
    println!(
        "warped image {}, field {}",
        r.warped.display(),
        r.field.display()
    );
    if let Some(m) = r.warped_mask {
        println!("warped mask {}", m.display());
    }
    Ok(())
}

fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let device = a.device.device()?;
    let (evaluation, pairs, fields) = evaluate_manifest(
        &a.registrar,
        &a.manifest,
        a.split.as_deref(),
        a.limit,
        &device,
    )?;
    a.json.print(&evaluation.render_table(), &evaluation)?;
    if let Some(path) = &a.grid {
        let chosen = figure_pairs(&pairs, a.grid_rows);
        let p: Vec<_> = chosen.iter().map(|&i| pairs[i].clone()).collect();
        let f: Vec<_> = chosen.iter().map(|&i| fields[i].clone()).collect();
        let grid = comparison_grid(&p, &f, a.grid_zoom, 2.0)?;
        write_file(path, &medvlm_io::raster::encode_png(&grid)?)?;
        println!("image grid written to {}", path.display());
    }
    Ok(())
}
