//! `medvlm adapt`: few-shot adaptation of a vision-language model to a
//! labelled manifest, written as a reusable artefact.
//!
//! Steps: select the task (classes from the train split), draw the K-shot
//! support set with the few-shot sampler (balanced or realistic), embed the
//! images once through the feature cache, fit the method, evaluate on the
//! test split (accuracy, balanced accuracy, macro-F1, per-class and macro
//! AUROC, ECE with a reliability diagram, split-conformal APS sets calibrated
//! on the val split or, without one, on the train images outside the support
//! set), and write the artefact directory atomically:
//!
//! * `classifier.safetensors` + `classifier.json`: the method's own save
//!   (`medvlm_adapt::method::save_classifier`);
//! * `adapt.json`: the card (method, hyperparameters, model, data hash,
//!   protocol, classes, prompts, support images, metrics);
//! * `eval_predictions.csv`: test-image probabilities;
//! * `reliability.png`: the reliability diagram of the test set.
//!
//! Prompt-learning methods (CoOp, CoCoOp, KgCoOp, VPT, MaPLe) are fitted on
//! the support images through the frozen model; the encoder fine-tuning
//! methods (`lora` in the CLIP-LoRA setting, `bitfit`, `partial-finetune`,
//! `full-finetune`) on a trainable copy of the model loaded for the fit (see
//! `medvlm_adapt::encoders`); both score the test images through the model.
//! Contrastive fine-tuning on image-text pairs (no labels) is `medvlm
//! finetune`.
//!
//! The steps are one library call, [`medvlm_adapt::pipeline::adapt`]; this module turns the
//! flags into its inputs and prints what it did.
//!
//! Multi-label tasks (`--label-field labels`, see `commands::common`): only
//! the methods of [`medvlm_adapt::pipeline::MULTI_LABEL_METHODS`] run (`zero-shot-pairs`,
//! `linear-probe`, and `tip-adapter`, `tip-adapter-f`, `clip-adapter` on top
//! of the prompt pairs); the support set is drawn with the library's greedy
//! multi-label sampler (at least K positives per finding); the metrics are
//! per-class and macro AUROC, per-class and mean average precision, macro-
//! and micro-F1 and exact match at probability 0.5, and the conformal label
//! sets `{k : p_k >= 1 - lambda_hat}` whose expected false-negative rate is
//! at most `--conformal-alpha` (conformal risk control, Angelopoulos et al.,
//! ICLR 2024; `lambda_hat` calibrated on the same calibration images as the
//! multi-class sets): test FNR, mean set size, empty sets and per-finding
//! recall. There are no APS/RAPS sets and no reliability diagram (both
//! assume one class per image), which the card and the output say.

use std::path::PathBuf;

use anyhow::{bail, Context};
use medvlm_adapt::artefact::check_out_dir;
use medvlm_adapt::fewshot::{FewShotProtocol, SamplingMode, TaskKind};
use medvlm_adapt::method::method_by_name;
use medvlm_adapt::pipeline::{
    adapt, method_refusal, AdaptContext, AdaptRequest, MethodRefusal, PipelineError,
};
use medvlm_eval::evaluation::{describe_fnr_control, describe_multilabel};

use super::common::{hyperparameter_policy, load_task, task_features, task_prompts, TaskArgs};
use super::embed::{load, DeviceArgs};

/// Arguments of `medvlm adapt`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Adaptation method (see docs/methods.md), e.g. tip-adapter, linear-probe, coop, lora,
    /// bitfit, partial-finetune, full-finetune.
    #[arg(long)]
    pub method: String,
    /// K: shots per class (balanced) or per-class budget (realistic).
    #[arg(long)]
    pub shots: usize,
    /// Seed of the support-set draw and of the method's initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Model: a directory, hf:ORG/NAME[@REV], or a preset name.
    #[arg(long)]
    pub model: String,
    /// Manifest (.jsonl / .csv) with the labelled images and their `split` column;
    /// repeat to concatenate several (e.g. train.jsonl, val.jsonl, test.jsonl).
    #[arg(long, required = true)]
    pub train: Vec<PathBuf>,
    /// Output artefact directory (created; must be empty unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Write into an existing non-empty --out folder, replacing same-name files.
    #[arg(long)]
    pub force: bool,
    /// Support-set sampling: balanced (K per class) or realistic (K x C images with the
    /// dataset's class proportions, no validation set).
    #[arg(long, default_value = "balanced", value_parser = ["balanced", "realistic"])]
    pub mode: String,
    /// Choose hyperparameters by F-fold cross-validation on the support set only
    /// (default: each method's fixed, documented defaults).
    #[arg(long, value_name = "F")]
    pub support_cv: Option<usize>,
    /// Hyperparameter overrides as a JSON object, e.g. '{"epochs": 50}'.
    #[arg(long)]
    pub hparams: Option<String>,
    #[command(flatten)]
    pub task: TaskArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    check_out_dir(&args.out, args.force)?;
    let device = args.device.device()?;
    let overrides: Option<serde_json::Value> = args
        .hparams
        .as_deref()
        .map(serde_json::from_str)
        .transpose()
        .context("--hparams must be a JSON object, e.g. '{\"epochs\": 50}'")?;
    // Built once here so that an unknown name or a bad override fails before any work.
    method_by_name(&args.method, overrides.as_ref())?;
    if args.shots == 0 {
        bail!("--shots must be at least 1");
    }
    let task = load_task(&args.train, &args.task)?;
    let policy = hyperparameter_policy(args.support_cv)?;
    let multi_label = task.kind == TaskKind::MultiLabel;
    let prompts = task_prompts(&task, &args.task, &args.mode)?;
    let m = load(&args.model, &device)?;
    // Refused before any image is read.
    match method_refusal(&args.method, task.kind, &m) {
        None => {}
        Some(MethodRefusal::NotMultiLabel(why)) => {
            bail!("--label-field labels makes a multi-label task: method {why}")
        }
        Some(MethodRefusal::NeedsMultiLabel(_)) => bail!(
            "method 'zero-shot-pairs' scores each label with a positive/negative prompt pair \
             and needs a multi-label task (--label-field labels); for the multi-class \
             '{}' task use zero-shot or zero-shot-ensemble",
            args.task.label_field
        ),
        Some(MethodRefusal::Model(why)) => {
            bail!("method '{}' on {}: {why}", args.method, args.model)
        }
    }
    let feats = task_features(&task, &args.model, &m, &args.task, &device)?;
    let ctx = AdaptContext::new(args.task.setup(
        &task,
        &feats,
        &m,
        &args.model,
        prompts,
        args.seed,
        &device,
    ))
    .map_err(|e| match e {
        PipelineError::Refused(why) => anyhow::anyhow!("{why} (set --split)"),
        e => e.into(),
    })?;
    let request = AdaptRequest {
        method: args.method.clone(),
        overrides,
        protocol: FewShotProtocol {
            shots: args.shots,
            seed: args.seed,
            mode: match args.mode.as_str() {
                "realistic" => SamplingMode::Realistic { min_per_class: 1 },
                _ => SamplingMode::Balanced,
            },
            task: task.kind,
            hyperparameter_policy: policy,
            validation_set: false,
        },
    };
    let adapted = adapt(&ctx, &request).map_err(|e| match e {
        e @ PipelineError::Support { .. } => {
            anyhow::Error::new(e).context(format!("--shots {}", args.shots))
        }
        e => e.into(),
    })?;
    adapted.write(&args.out)?;

    let card = &adapted.card;
    if adapted.evaluation.is_none() {
        eprintln!(
            "note: no '{}' split in {}: the artefact carries no test metrics",
            args.task.test_split,
            task.manifest_path.display()
        );
    }
    if multi_label {
        println!(
            "adapted {} ({}) on {} support image(s), {} labels ({}); hyperparameters {}",
            args.method,
            card.protocol_description,
            card.support.len(),
            task.class_names.len(),
            task.class_names.join(", "),
            card.hyperparameters
        );
    } else {
        println!(
            "adapted {} ({}) on {} support image(s), {} classes; hyperparameters {}",
            args.method,
            card.protocol_description,
            card.support.len(),
            task.class_names.len(),
            card.hyperparameters
        );
    }
    if let Some(mx) = &card.metrics {
        println!(
            "test ({} images): accuracy {:.4}, balanced accuracy {:.4}, macro-F1 {:.4}, macro AUROC {}, ECE {:.4}",
            mx.n,
            mx.accuracy,
            mx.balanced_accuracy,
            mx.macro_f1,
            mx.macro_auroc
                .map(|v| format!("{v:.4}"))
                .unwrap_or_else(|| "undefined".into()),
            mx.ece
        );
        if let Some(cf) = &mx.conformal {
            println!(
                "conformal {}{} (calibrated on {} {}): target coverage {:.2}, coverage {:.4}, mean set size {:.3}",
                match cf.config.score {
                    medvlm_eval::conformal::ConformalScore::Aps => "APS",
                    medvlm_eval::conformal::ConformalScore::Raps { .. } => "RAPS",
                },
                if cf.config.randomized { ", randomised" } else { "" },
                cf.n_calibration,
                cf.calibration_source,
                cf.report.target_coverage,
                cf.report.coverage,
                cf.report.mean_set_size
            );
        }
        if let Some(t) = &mx.temperature {
            println!(
                "temperature scaling (fitted on {} {}): T = {:.3}{}; test ECE {:.4} -> {:.4}, NLL {:.4} -> {:.4} (served as calibrated probabilities)",
                t.fit.n,
                t.calibration_source,
                t.fit.temperature,
                if t.fit.at_bound { " (at the search bound)" } else { "" },
                t.test_ece_before,
                t.test_ece_after,
                t.test_nll_before,
                t.test_nll_after
            );
        }
    }
    if let Some(mx) = &card.multilabel_metrics {
        println!("{}", describe_multilabel(mx));
        let per_class: Vec<String> = mx
            .per_class_auroc
            .iter()
            .map(|(c, v)| match v {
                Some(v) => format!("{c} {v:.4}"),
                None => format!("{c} undefined"),
            })
            .collect();
        println!("per-class AUROC: {}", per_class.join(", "));
        if let Some(cf) = &mx.conformal_fnr_control {
            println!("{}", describe_fnr_control(cf));
        }
    }
    for n in &card.notes {
        println!("note: {n}");
    }
    println!("wrote {}", args.out.display());
    Ok(())
}
