//! `medvlm detect train|predict|eval`: detection and phrase grounding on a frozen VLM image
//! tower (an OWL-ViT-style box head; `medvlm_tasks::detection_pipeline`, docs/detection.md).
//!
//! * `train --model M --manifest train.jsonl [--val val.jsonl] --out DIR`: trains the head
//!   on the manifest's images and per-finding `boxes` and writes the detector folder
//!   (`head.safetensors` + `detector.json`); with `--val`, prints its evaluation there.
//! * `predict --detector DIR --prompt CLASS IMAGES... --out DIR`: writes `<stem>_boxes.png`
//!   and `<stem>_boxes.json` per image (the grounded box and the detections).
//! * `eval --detector DIR --manifest test.jsonl [--json OUT] [--overlays DIR]`: grounding
//!   Acc@0.5 and mIoU, detection mAP, per class and modality, of the head and the baselines.

use std::path::PathBuf;

use medvlm_tasks::detection_pipeline::{
    evaluate_manifest, predict_files, train_and_save, TrainOptions,
};

use super::embed::DeviceArgs;
use super::task_args::{warn, EvalJsonArg, SplitArg};

/// Arguments of `medvlm detect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: DetectCommand,
}

/// The subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum DetectCommand {
    /// Train a box head on a manifest of images and per-finding boxes.
    Train(TrainArgs),
    /// Box what a prompt names in images (PNG/JPEG/TIFF, DICOM, NIfTI plane).
    Predict(PredictArgs),
    /// Evaluate a detector and the baselines on a manifest with boxes.
    Eval(EvalArgs),
}

/// `medvlm detect train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Model: a directory, hf:ORG/NAME or a preset (its image tower must give a grid of
    /// patch tokens).
    #[arg(long)]
    pub model: String,
    /// Training manifest (.jsonl / .csv) with `boxes` [{label, x0, y0, x1, y1}] per image.
    #[arg(long)]
    pub manifest: PathBuf,
    #[command(flatten)]
    pub split: SplitArg,
    /// Validation manifest: evaluated after training, table printed.
    #[arg(long)]
    pub val: Option<PathBuf>,
    /// Output folder of the detector.
    #[arg(long)]
    pub out: PathBuf,
    /// Optimiser steps (default 1500).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Samples per step (default 64).
    #[arg(long, value_parser = crate::commands::at_least_one)]
    pub batch: Option<usize>,
    /// Box MLP width (default 64).
    #[arg(long, value_parser = crate::commands::at_least_one)]
    pub width: Option<usize>,
    /// AdamW learning rate (default 1e-2).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Seed of the head's initialisation, sample order and absent pairs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `medvlm detect predict`.
#[derive(clap::Args, Debug)]
pub struct PredictArgs {
    /// Detector folder written by `medvlm detect train`.
    #[arg(long)]
    pub detector: PathBuf,
    /// What to box: a class of the detector (`modality/label`, or a label only one class
    /// has). Other text is refused unless --free-text.
    #[arg(long)]
    pub prompt: String,
    /// Embed a prompt that is not a class as given (best effort: the head was trained on
    /// the classes' embeddings only).
    #[arg(long)]
    pub free_text: bool,
    /// Image files.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Detections scoring below this are not listed or drawn (the grounded box always is).
    #[arg(long, default_value_t = 0.3)]
    pub min_score: f64,
    /// Model to use instead of the one named in the detector (same weights, moved).
    #[arg(long)]
    pub model: Option<String>,
    /// Axis across which NIfTI volumes are cut into slices (0 = x, 1 = y, 2 = z); the
    /// slices' boxes are linked into one grounded 3-D box.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub axis: u8,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `medvlm detect eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Detector folder written by `medvlm detect train`.
    #[arg(long)]
    pub detector: PathBuf,
    /// Test manifest with boxes.
    #[arg(long)]
    pub manifest: PathBuf,
    #[command(flatten)]
    pub split: SplitArg,
    #[command(flatten)]
    pub json: EvalJsonArg,
    /// Write overlays (true box green, head red, heatmap blue) of the first phrases here.
    #[arg(long)]
    pub overlays: Option<PathBuf>,
    /// How many overlays.
    #[arg(long, default_value_t = 8)]
    pub n_overlays: usize,
    /// Model to use instead of the one named in the detector (same weights, moved).
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Runs `medvlm detect`.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        DetectCommand::Train(a) => train(a),
        DetectCommand::Predict(a) => predict(a),
        DetectCommand::Eval(a) => eval(a),
    }
}

fn train(a: TrainArgs) -> anyhow::Result<()> {
    let device = a.device.device()?;
    let opts = TrainOptions {
        model_spec: a.model.clone(),
        steps: a.steps,
        batch: a.batch,
        width: a.width,
        lr: a.lr,
        seed: a.seed,
        split: a.split.split.clone(),
    };
    let t0 = std::time::Instant::now();
    let (card, val) = train_and_save(&a.manifest, a.val.as_deref(), &opts, &a.out, &device)?;
    println!(
        "trained a box head on {} images ({} samples, {} boxes, {} classes) in {:.1} s: {} steps, final loss {:.4}",
        card.n_train_images,
        card.n_train_samples,
        card.n_train_boxes,
        card.classes.len(),
        t0.elapsed().as_secs_f64(),
        card.head.steps,
        card.final_loss
    );
    println!("detector written to {}", a.out.display());
    if let Some(e) = val {
        print!("{}", e.render_table());
    }
    Ok(())
}

fn predict(a: PredictArgs) -> anyhow::Result<()> {
    let device = a.device.device()?;
    let (files, class, warning) = predict_files(
        &a.detector,
        a.model.as_deref(),
        &a.prompt,
        a.free_text,
        &a.images,
        a.min_score,
        usize::from(a.axis),
        &a.out,
        &device,
    )?;
    warn(warning);
    match class {
        Some(c) => println!("prompt `{}`: the detector's class `{c}`", a.prompt),
        None => println!(
            "prompt `{}`: free text, embedded as given (best effort)",
            a.prompt
        ),
    }
    for f in files {
        let b = f.grounding.bbox;
        println!(
            "{}: grounded [{:.1}, {:.1}, {:.1}, {:.1}] score {:.3}; {} detection(s) >= {} -> {}",
            f.input.display(),
            b[0],
            b[1],
            b[2],
            b[3],
            f.grounding.score,
            f.detections.len(),
            a.min_score,
            f.overlay_png.display()
        );
        if let Some(v) = &f.volume {
            let g = &v.grounding;
            println!(
                "  volume: {} slices across axis {}; best slice {}; grounded voxels x {}..={}, y {}..={}, z {}..={}",
                v.per_slice.len(),
                v.axis,
                v.best_slice,
                g.min[0],
                g.max[0],
                g.min[1],
                g.max[1],
                g.min[2],
                g.max[2]
            );
        }
    }
    Ok(())
}

fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let device = a.device.device()?;
    let (evaluation, warning) = evaluate_manifest(
        &a.detector,
        a.model.as_deref(),
        &a.manifest,
        a.split.get(),
        a.overlays.as_deref().map(|d| (d, a.n_overlays)),
        &device,
    )?;
    warn(warning);
    a.json.print(&evaluation.render_table(), &evaluation)?;
    Ok(())
}
