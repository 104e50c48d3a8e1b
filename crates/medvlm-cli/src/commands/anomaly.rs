//! `medvlm anomaly fit|eval|predict`: few-shot anomaly detection and localisation with a
//! memory of normal patch features (`medvlm_tasks::anomaly_pipeline`, docs/anomaly.md).
//!
//! * `fit --model M --manifest train.jsonl [--calib val.jsonl] --out DIR [--shots 16]
//!   [--fpr 0.05]`: per modality, the memory of `--shots` normal images and the threshold at
//!   `--fpr` on other normal images; writes `memory.safetensors` + `anomaly.json`.
//! * `eval --detector DIR --manifest test.jsonl [--json OUT]`: image AUROC, pixel AUROC, AUPRO
//!   and the decision's FPR/TPR per modality, beside two baselines.
//! * `predict --detector DIR [--modality M] IMAGES... --out DIR`: `<stem>_anomaly.png`,
//!   `<stem>_overlay.png` and a CSV of scores and decisions.

use std::path::PathBuf;

use medvlm_tasks::anomaly::MemoryConfig;
use medvlm_tasks::anomaly_pipeline::{fit, AnomalyDetector, AnomalyOptions, AnomalyTask};

use medvlm_adapt::pipeline::csv_field;

use super::common::write_file;
use super::embed::{load, DeviceArgs};
use super::task_args::EvalJsonArg;

/// Arguments of `medvlm anomaly`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: AnomalyCommand,
}

/// The subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum AnomalyCommand {
    /// Fit the memory of normal images and the decision threshold.
    Fit(FitArgs),
    /// Evaluate a detector on a labelled manifest (with masks where it has them).
    Eval(EvalArgs),
    /// Score images: anomaly maps, overlays, scores and decisions.
    Predict(PredictArgs),
}

/// `medvlm anomaly fit`.
#[derive(clap::Args, Debug)]
pub struct FitArgs {
    /// Model: a directory, hf:ORG/NAME or a preset (a ViT image tower: patch tokens).
    #[arg(long)]
    pub model: String,
    /// Training manifest; its `normal` studies form the memory.
    #[arg(long)]
    pub manifest: PathBuf,
    /// Only this split of the training manifest.
    #[arg(long)]
    pub split: Option<String>,
    /// Manifest whose normal studies set the threshold (default: the training normals
    /// outside the memory).
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Normal images per modality in the memory.
    #[arg(long, default_value_t = 16, value_parser = crate::commands::at_least_one)]
    pub shots: usize,
    /// Target false-positive rate of the threshold on the calibration normals.
    #[arg(long, default_value_t = 0.05)]
    pub fpr: f64,
    /// Seed of the normal draw.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Gaussian smoothing of the maps in pixels.
    #[arg(long, default_value_t = 4.0)]
    pub sigma: f64,
    /// Also train a supervised head for this many steps on the manifest's finding masks
    /// (normal images: empty masks); the detector then decides with it. 0: normal images only.
    #[arg(long, default_value_t = 0)]
    pub supervised_steps: usize,
    /// Most training images of the supervised head (a seeded draw beyond it).
    #[arg(long, default_value_t = 800, value_parser = crate::commands::at_least_one)]
    pub supervised_images: usize,
    /// Window sides in patches of the WinCLIP zero-shot branch (one map per side,
    /// averaged), e.g. 2,3 (the default); each must fit the tower's patch grid.
    #[arg(long, value_delimiter = ',', default_value = "2,3", value_parser = crate::commands::at_least_one)]
    pub window_scales: Vec<usize>,
    /// No WinCLIP windows (no zero-shot windows, window memory or weak scorer): `eval` then
    /// costs what the memory costs (windows multiply a ViT-B/16's tokens by about 12).
    #[arg(long, conflicts_with_all = ["decide_with", "weak_steps"])]
    pub no_windows: bool,
    /// What the detector decides with when it has no supervised head: `memory` (patch
    /// tokens, the default) or `window-memory` (WinCLIP+'s window memory; needs a ViT with a
    /// class token).
    #[arg(long, default_value = "memory")]
    pub decide_with: medvlm_tasks::anomaly_pipeline::DecisionMethod,
    /// Also train a window scorer for this many steps from the manifest's image labels only
    /// (normal / abnormal; weak supervision by multiple-instance learning over the WinCLIP
    /// windows; `--supervised-images` caps its images per modality). 0: none.
    #[arg(long, default_value_t = 0)]
    pub weak_steps: usize,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `medvlm anomaly eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Detector folder written by `medvlm anomaly fit`.
    #[arg(long)]
    pub detector: PathBuf,
    /// Test manifest.
    #[arg(long)]
    pub manifest: PathBuf,
    /// Only this split.
    #[arg(long)]
    pub split: Option<String>,
    #[command(flatten)]
    pub json: EvalJsonArg,
    /// Model to use instead of the one named in the detector (same weights, moved).
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `medvlm anomaly predict`.
#[derive(clap::Args, Debug)]
pub struct PredictArgs {
    /// Detector folder written by `medvlm anomaly fit`.
    #[arg(long)]
    pub detector: PathBuf,
    /// The images' modality (a modality the detector was fitted on; needed when it has
    /// several).
    #[arg(long)]
    pub modality: Option<String>,
    /// Image files (PNG/JPEG/TIFF, DICOM, NIfTI; a NIfTI volume is scored slice by slice).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Model to use instead of the one named in the detector (same weights, moved).
    #[arg(long)]
    pub model: Option<String>,
    /// Axis across which NIfTI volumes are cut into slices (0 = x, 1 = y, 2 = z).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub axis: u8,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Runs `medvlm anomaly`.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        AnomalyCommand::Fit(a) => fit_cmd(a),
        AnomalyCommand::Eval(a) => eval(a),
        AnomalyCommand::Predict(a) => predict(a),
    }
}

fn fit_cmd(a: FitArgs) -> anyhow::Result<()> {
    let device = a.device.device()?;
    let train = AnomalyTask::from_manifest(&a.manifest, a.split.as_deref())?;
    let calib = a
        .calib
        .as_deref()
        .map(|p| AnomalyTask::from_manifest(p, None))
        .transpose()?;
    let m = load(&a.model, &device)?;
    let options = AnomalyOptions {
        shots: a.shots,
        seed: a.seed,
        fpr: a.fpr,
        memory: MemoryConfig {
            seed: a.seed,
            sigma: a.sigma,
            ..Default::default()
        },
        supervised_steps: a.supervised_steps,
        supervised_images: a.supervised_images,
        windows: medvlm_tasks::winclip::WindowConfig {
            scales: if a.no_windows {
                Vec::new()
            } else {
                a.window_scales
            },
            stride: 1,
        },
        decide_with: a.decide_with,
        weak_steps: a.weak_steps,
    };
    let det = fit(m, &a.model, &train, calib.as_ref(), &options, &device)?;
    det.save(&a.out)?;
    for d in &det.modalities {
        println!(
            "{}: memory of {} normal image(s) ({} patch features, grid {}x{}); threshold {:.4} \
             (at most {:.0} % of {} calibration normals above it)",
            d.modality.as_deref().unwrap_or("(no modality)"),
            d.memory_images.len(),
            d.memory.features.dim(0)?,
            d.memory.grid.0,
            d.memory.grid.1,
            d.threshold.value,
            100.0 * d.threshold.target_false_positive_rate,
            d.threshold.n_calibration
        );
    }
    if let Some(sc) = &det.card.supervised {
        println!(
            "supervised head: {} steps on {} training images ({} anomalous with masks; {} left \
             out for an unmasked finding), final loss {:.4}; the detector decides with it",
            sc.head.steps,
            sc.n_train_images,
            sc.n_train_anomalous,
            sc.n_skipped_unmasked,
            sc.final_loss
        );
        for d in &det.modalities {
            if let Some(s) = &d.supervised {
                println!(
                    "{}: supervised threshold {:.3e} (at most {:.0} % of {} calibration normals \
                     above it)",
                    d.modality.as_deref().unwrap_or("(no modality)"),
                    s.threshold.value,
                    100.0 * s.threshold.target_false_positive_rate,
                    s.threshold.n_calibration
                );
            }
        }
    }
    for mc in &det.card.modalities {
        if let Some(w) = &mc.weak_training {
            println!(
                "{}: weak window scorer trained from image labels on {} images ({} abnormal), \
                 final loss {:.4}",
                mc.modality.as_deref().unwrap_or("(no modality)"),
                w.n_images,
                w.n_abnormal,
                w.final_loss
            );
        }
    }
    for d in det.modalities.iter().filter(|d| d.decides_with_windows()) {
        let t = d.decision_threshold();
        println!(
            "{}: decides with the window memory, threshold {:.4} (at most {:.0} % of {} \
             calibration normals above it)",
            d.modality.as_deref().unwrap_or("(no modality)"),
            t.value,
            100.0 * t.target_false_positive_rate,
            t.n_calibration
        );
    }
    println!("detector written to {}", a.out.display());
    Ok(())
}

fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let device = a.device.device()?;
    let det = AnomalyDetector::load(&a.detector, a.model.as_deref(), &device)?;
    let task = AnomalyTask::from_manifest(&a.manifest, a.split.as_deref())?;
    let evaluation = det.evaluate(&task, &device)?;
    a.json.print(&evaluation.render_table(), &evaluation)?;
    Ok(())
}

fn predict(a: PredictArgs) -> anyhow::Result<()> {
    let device = a.device.device()?;
    let det = AnomalyDetector::load(&a.detector, a.model.as_deref(), &device)?;
    let modality = match (&a.modality, det.modalities.as_slice()) {
        (Some(m), _) => Some(m.clone()),
        (None, [only]) => only.modality.clone(),
        (None, many) => anyhow::bail!(
            "the detector was fitted on {} modalities ({}): pass --modality",
            many.len(),
            many.iter()
                .map(|d| d.modality.as_deref().unwrap_or("(none)"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let rows = det.predict_and_write(
        &a.images,
        modality.as_deref(),
        usize::from(a.axis),
        &a.out,
        &device,
    )?;
    // The method that decided (the same for every row of one modality).
    let method = det
        .modalities
        .iter()
        .find(|d| d.modality == modality)
        .map_or("memory", |d| d.decision_method());
    let mut csv = String::from("image,score,anomalous,map,overlay,map_nifti,best_slice,method\n");
    for r in &rows {
        csv.push_str(&format!(
            "{},{:.6},{},{},{},{},{},{method}\n",
            csv_field(&r.input.display().to_string()),
            r.score,
            r.anomalous,
            csv_field(&r.map_png.display().to_string()),
            csv_field(&r.overlay_png.display().to_string()),
            r.map_nifti
                .as_ref()
                .map(|p| csv_field(&p.display().to_string()))
                .unwrap_or_default(),
            r.slices
                .as_ref()
                .map(|s| s.best.to_string())
                .unwrap_or_default()
        ));
    }
    print!("{csv}");
    write_file(&a.out.join("scores.csv"), csv.as_bytes())?;
    Ok(())
}
