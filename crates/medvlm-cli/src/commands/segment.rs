//! `medvlm segment train|predict|eval`: text-guided segmentation on a frozen VLM image tower
//! (a CLIPSeg-style head; `medvlm_tasks::segmentation_pipeline`, docs/segmentation.md).
//!
//! * `train --model M --manifest train.jsonl [--val val.jsonl] --out DIR`: trains the head
//!   on the manifest's images and per-finding masks and writes the segmenter folder
//!   (`head.safetensors` + `segmenter.json`, and `lora/` with `--lora-rank` or
//!   `adapter/` with `--adapter-bottleneck`); with `--val`,
//!   prints its evaluation there.
//! * `predict --segmenter DIR --prompt TEXT IMAGES... --out DIR`: writes `<stem>_mask.png`
//!   and `<stem>_overlay.png` per image, and `<stem>_mask.nii.gz` (the input's affine and
//!   shape) for NIfTI input, 3-D volumes segmented slice by slice across `--axis`.
//! * `eval --segmenter DIR --manifest test.jsonl [--json OUT]`: Dice, IoU and HD95 per
//!   finding and per modality of the head and of the training-free similarity baseline.

use std::path::PathBuf;

use medvlm_tasks::segmentation_pipeline::{
    evaluate_manifest, predict_files, train_and_save, SegAdapter, SegLora, TrainOptions,
};

use super::embed::DeviceArgs;
use super::task_args::{warn, EvalJsonArg, SplitArg};

/// Arguments of `medvlm segment`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: SegmentCommand,
}

/// The subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum SegmentCommand {
    /// Train a segmentation head on a manifest of images and per-finding masks.
    Train(Box<TrainArgs>),
    /// Segment images (PNG/JPEG/TIFF, DICOM, NIfTI) for a prompt.
    Predict(PredictArgs),
    /// Evaluate a segmenter and the similarity baseline on a manifest.
    Eval(EvalArgs),
}

/// `medvlm segment train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Model: a directory, hf:ORG/NAME or a preset (its image tower must give patch tokens).
    #[arg(long)]
    pub model: String,
    /// Training manifest (.jsonl / .csv) with `masks` [{label, path}] per image.
    #[arg(long)]
    pub manifest: PathBuf,
    #[command(flatten)]
    pub split: SplitArg,
    /// Validation manifest: evaluated after training, table printed.
    #[arg(long)]
    pub val: Option<PathBuf>,
    /// Output folder of the segmenter.
    #[arg(long)]
    pub out: PathBuf,
    /// Optimiser steps (default 300).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Samples per step (default 16).
    #[arg(long, value_parser = crate::commands::at_least_one)]
    pub batch: Option<usize>,
    /// Head width (default 64).
    #[arg(long, value_parser = crate::commands::at_least_one)]
    pub width: Option<usize>,
    /// AdamW learning rate (default 1e-3).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning rate of the tower's LoRA or bottleneck adapters (default: 3e-4 for the
    /// adapters, --lr for LoRA). Needs --lora-rank or --adapter-bottleneck.
    #[arg(long)]
    pub tower_lr: Option<f64>,
    /// Seed of the head's initialisation, sample order and absent pairs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image-tower layers the head reads, CLIPSeg-style (e.g. `3,6,9` of a 12-layer ViT):
    /// transformer blocks counted from 1 (HF's `hidden_states[k]`), increasing; the last is
    /// the tower's depth. Default: the final patch tokens only.
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<usize>,
    /// Width of the pixel encoder: a small convolutional path on the image whose features
    /// join the decoder at each resolution (U-Net skips), for findings smaller than a patch
    /// (default 16; 0 turns it off).
    #[arg(long)]
    pub pixel_width: Option<usize>,
    /// Standardise each image's grey input by its own mean and spread before the pixel
    /// encoder (a site's brightness and contrast drop out): `true` or `false`.
    #[arg(long)]
    pub grey_standardise: Option<bool>,
    /// Train LoRA adapters of this rank in the image tower with the head (VLSM-Adapter's
    /// setting; saved in the segmenter's `lora/` in PEFT's layout). Default: a frozen tower.
    #[arg(long, value_parser = crate::commands::at_least_one)]
    pub lora_rank: Option<usize>,
    /// LoRA scaling numerator (update `alpha / rank`; default twice the rank).
    #[arg(long, requires = "lora_rank")]
    pub lora_alpha: Option<f64>,
    /// Image-tower layers given LoRA (`q`, `k`, `v`, `out`, `fc1`, `fc2` or module names;
    /// default `q,v`).
    #[arg(long, value_delimiter = ',', requires = "lora_rank")]
    pub lora_targets: Vec<String>,
    /// Train bottleneck adapters of this width in the image tower with the head (Houlsby's
    /// adapters, VLSM-Adapter's adapter variant; saved in the segmenter's `adapter/`).
    /// Not with `--lora-rank`.
    #[arg(long, value_parser = crate::commands::at_least_one, conflicts_with = "lora_rank")]
    pub adapter_bottleneck: Option<usize>,
    /// Image-tower layers given an adapter on their output (`out`, `fc2`, ... or module
    /// names; default `out,fc2`: after the attention block and the MLP of every block).
    #[arg(long, value_delimiter = ',', requires = "adapter_bottleneck")]
    pub adapter_targets: Vec<String>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `medvlm segment predict`.
#[derive(clap::Args, Debug)]
pub struct PredictArgs {
    /// Segmenter folder written by `medvlm segment train`.
    #[arg(long)]
    pub segmenter: PathBuf,
    /// What to segment: a class of the segmenter (`modality/label`, or a label only one
    /// class has) uses its trained prompt embedding; other text is embedded as given.
    #[arg(long)]
    pub prompt: String,
    /// Image files.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Axis across which 3-D NIfTI volumes are cut into slices (0 = x, 1 = y, 2 = z).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub axis: u8,
    /// Model to use instead of the one named in the segmenter (same weights, moved).
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `medvlm segment eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Segmenter folder written by `medvlm segment train`.
    #[arg(long)]
    pub segmenter: PathBuf,
    /// Test manifest with masks.
    #[arg(long)]
    pub manifest: PathBuf,
    #[command(flatten)]
    pub split: SplitArg,
    #[command(flatten)]
    pub json: EvalJsonArg,
    /// Model to use instead of the one named in the segmenter (same weights, moved).
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Runs `medvlm segment`.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        SegmentCommand::Train(a) => train(*a),
        SegmentCommand::Predict(a) => predict(a),
        SegmentCommand::Eval(a) => eval(a),
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
        tower_lr: a.tower_lr,
        seed: a.seed,
        split: a.split.split.clone(),
        layers: a.layers.clone(),
        pixel_width: a.pixel_width,
        grey_standardise: a.grey_standardise,
        lora: a.lora_rank.map(|r| {
            let mut l = SegLora::new(r);
            if let Some(alpha) = a.lora_alpha {
                l.alpha = alpha;
            }
            if !a.lora_targets.is_empty() {
                l.targets = a.lora_targets.clone();
            }
            l
        }),
        adapter: a.adapter_bottleneck.map(|m| {
            let mut ad = SegAdapter::new(m);
            if !a.adapter_targets.is_empty() {
                ad.targets = a.adapter_targets.clone();
            }
            ad
        }),
    };
    let t0 = std::time::Instant::now();
    let (card, val) = train_and_save(&a.manifest, a.val.as_deref(), &opts, &a.out, &device)?;
    println!(
        "trained a segmentation head on {} images ({} samples, {} classes) in {:.1} s: {} steps, final loss {:.4}",
        card.n_train_images,
        card.n_train_samples,
        card.classes.len(),
        t0.elapsed().as_secs_f64(),
        card.head.steps,
        card.final_loss
    );
    if !card.head.layers.is_empty() {
        println!("image-tower layers read: {:?}", card.head.layers);
    }
    if let Some(l) = &card.lora {
        println!(
            "image-tower LoRA trained with the head: rank {}, alpha {}, on {}",
            l.rank,
            l.alpha,
            l.targets.join(",")
        );
    }
    if let Some(ad) = &card.adapter {
        println!(
            "image-tower bottleneck adapters trained with the head: width {}, on {}",
            ad.bottleneck,
            ad.targets.join(",")
        );
    }
    println!("segmenter written to {}", a.out.display());
    if let Some(e) = val {
        print!("{}", e.render_table());
    }
    Ok(())
}

fn predict(a: PredictArgs) -> anyhow::Result<()> {
    let device = a.device.device()?;
    let (files, class, warning) = predict_files(
        &a.segmenter,
        a.model.as_deref(),
        &a.prompt,
        &a.images,
        usize::from(a.axis),
        &a.out,
        &device,
    )?;
    warn(warning);
    match class {
        Some(c) => println!("prompt `{}`: the segmenter's class `{c}`", a.prompt),
        None => println!(
            "prompt `{}`: not a class of the segmenter, embedded as free text (best effort)",
            a.prompt
        ),
    }
    for f in files {
        println!(
            "{}: {} px in {} slice(s) -> {}{}",
            f.input.display(),
            f.area,
            f.slices,
            f.mask_png.display(),
            f.mask_nifti
                .map(|p| format!(", {}", p.display()))
                .unwrap_or_default()
        );
    }
    Ok(())
}

fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let device = a.device.device()?;
    let (evaluation, warning) = evaluate_manifest(
        &a.segmenter,
        a.model.as_deref(),
        &a.manifest,
        a.split.get(),
        &device,
    )?;
    warn(warning);
    a.json.print(&evaluation.render_table(), &evaluation)?;
    Ok(())
}
