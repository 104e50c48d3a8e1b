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
//! Multi-label tasks (`--label-field labels`, see `commands::common`): only
//! the methods of [`MULTI_LABEL_METHODS`] run (`zero-shot-pairs`,
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

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::Device;
use medvlm_adapt::artefact::{
    check_out_dir, write_artefact_dir, AdaptCard, ADAPT_CARD, ADAPT_FORMAT,
};
use medvlm_adapt::encoders::{
    fit_prompt_method, fit_tuning_method, is_prompt_method, is_tuning_method, prompt_probabilities,
    tuned_probabilities, SupportImages,
};
use medvlm_adapt::fewshot::{FewShotProtocol, HyperparameterPolicy, SamplingMode, TaskKind};
use medvlm_adapt::method::{
    method_by_name, save_classifier, AdaptInput, AdaptedClassifier, FeatureAccess, SupportSet,
};
use medvlm_adapt::methods::encoder_tuning::TunedEncoderClassifier;
use medvlm_adapt::methods::prompt_common::{model_refusal, PromptClassifier};
use medvlm_eval::plots::{reliability_plot, Plot, Size};
use medvlm_models::LoadedModel;

use super::common::{
    class_prompts, encode_class_texts, load_task, model_fingerprint, model_logit_scale,
    multi_label_refusal, negative_prompts, probabilities, probability_csv,
    probability_csv_multilabel, task_features, write_file, Task, TaskArgs, MULTI_LABEL_METHODS,
    PROMPT_PAIR_METHODS,
};
use super::embed::{load, DeviceArgs};
use medvlm_eval::evaluation::{
    describe_fnr_control, describe_multilabel, evaluate, evaluate_multilabel,
};

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
    let method = method_by_name(&args.method, overrides.as_ref())?;
    if method.requires_encoder()
        && !is_prompt_method(&args.method)
        && !is_tuning_method(&args.method)
    {
        bail!(
            "method '{}' needs the encoders but has no few-shot fit; pick another method: {}",
            args.method,
            medvlm_adapt::method::METHOD_NAMES.join(", ")
        );
    }
    if args.shots == 0 {
        bail!("--shots must be at least 1");
    }
    let task = load_task(&args.train, &args.task)?;
    let policy = match args.support_cv {
        None => HyperparameterPolicy::Fixed,
        Some(f) if f >= 2 => HyperparameterPolicy::SupportCv { folds: f },
        Some(f) => bail!("--support-cv {f}: needs at least 2 folds"),
    };
    if task.kind == TaskKind::MultiLabel {
        return run_multilabel(&args, method.as_ref(), &task, policy, &device);
    }
    if args.method == "zero-shot-pairs" {
        bail!(
            "method 'zero-shot-pairs' scores each label with a positive/negative prompt pair \
             and needs a multi-label task (--label-field labels); for the multi-class \
             '{}' task use zero-shot or zero-shot-ensemble",
            args.task.label_field
        );
    }
    let prompts = class_prompts(&task.class_names, &args.task)?;
    let protocol = FewShotProtocol {
        shots: args.shots,
        seed: args.seed,
        mode: match args.mode.as_str() {
            "realistic" => SamplingMode::Realistic { min_per_class: 1 },
            _ => SamplingMode::Balanced,
        },
        task: TaskKind::MultiClass,
        hyperparameter_policy: policy,
        validation_set: false,
    };

    let m = load(&args.model, &device)?;
    if let Some(reason) = model_refusal(&args.method, m.model.as_ref()) {
        bail!("method '{}' on {}: {reason}", args.method, args.model);
    }
    let feats = task_features(&task, &args.model, &m, &args.task, &device)?;
    let pool_rows = feats.available(&task.split_rows(&args.task.split));
    if pool_rows.is_empty() {
        bail!(
            "manifest {} has no labelled '{}' images to draw the support set from (set --split)",
            task.manifest_path.display(),
            args.task.split
        );
    }
    let (pool_features, pool_labels) = feats.select(&task, &pool_rows)?;
    let picked = protocol
        .sample(&pool_labels, &task.class_names)
        .map_err(|e| anyhow::anyhow!("--shots {}: {e}", args.shots))
        .with_context(|| {
            format!(
                "drawing the support set from {}",
                task.manifest_path.display()
            )
        })?;
    let support_rows: Vec<usize> = picked.iter().map(|&i| pool_rows[i]).collect();

    let texts = encode_class_texts(&m, &prompts, None, args.task.batch, &device)?;
    let scale = model_logit_scale(&m)?;
    let c = task.class_names.len();

    // Fit; `score` gives probabilities of task rows.
    enum Fitted {
        Frozen(Box<dyn AdaptedClassifier>),
        Prompt(Box<PromptClassifier>),
        Tuned(Box<TunedEncoderClassifier>, Box<LoadedModel>),
    }
    let fitted = if is_tuning_method(&args.method) {
        let paths: Vec<PathBuf> = support_rows
            .iter()
            .map(|&r| task.rows[r].path.clone())
            .collect();
        let labels: Vec<usize> = task.classes(&support_rows)?;
        let job = SupportImages {
            model: &args.model,
            class_names: &task.class_names,
            prompts: &prompts,
            support: &paths,
            labels: &labels,
            seed: args.seed,
        };
        let (clf, tuned) = fit_tuning_method(&args.method, overrides.as_ref(), &job, &device)?;
        Fitted::Tuned(Box::new(clf), Box::new(tuned))
    } else if is_prompt_method(&args.method) {
        let paths: Vec<PathBuf> = support_rows
            .iter()
            .map(|&r| task.rows[r].path.clone())
            .collect();
        let labels: Vec<usize> = task.classes(&support_rows)?;
        let job = SupportImages {
            model: &args.model,
            class_names: &task.class_names,
            prompts: &prompts,
            support: &paths,
            labels: &labels,
            seed: args.seed,
        };
        let clf = fit_prompt_method(&args.method, overrides.as_ref(), &m, &job, &device)?;
        Fitted::Prompt(Box::new(clf))
    } else {
        let support = SupportSet::from_pool(&pool_features, &pool_labels, &picked)?;
        let input = AdaptInput {
            texts: &texts,
            support: &support,
            access: FeatureAccess::FrozenFeatures,
            logit_scale: Some(scale),
            policy,
            seed: args.seed,
            protocol: Some(&protocol),
        };
        Fitted::Frozen(method.fit(&input)?)
    };
    let score = |rows: &[usize]| -> anyhow::Result<Vec<f32>> {
        match &fitted {
            Fitted::Frozen(clf) => {
                let (f, _) = feats.select(&task, rows)?;
                probabilities(clf.as_ref(), &f)
            }
            Fitted::Prompt(clf) => {
                let paths: Vec<PathBuf> = rows.iter().map(|&r| task.rows[r].path.clone()).collect();
                Ok(prompt_probabilities(
                    clf,
                    &m,
                    &paths,
                    args.task.batch,
                    &device,
                )?)
            }
            Fitted::Tuned(clf, tuned) => {
                let paths: Vec<PathBuf> = rows.iter().map(|&r| task.rows[r].path.clone()).collect();
                Ok(tuned_probabilities(
                    clf,
                    tuned,
                    &paths,
                    args.task.batch,
                    &device,
                )?)
            }
        }
    };

    // Evaluation.
    let test_rows = if args.task.test_split == "none" {
        Vec::new()
    } else {
        feats.available(&task.split_rows(&args.task.test_split))
    };
    let mut eval_csv = None;
    let metrics = if test_rows.is_empty() {
        eprintln!(
            "note: no '{}' split in {}: the artefact carries no test metrics",
            args.task.test_split,
            task.manifest_path.display()
        );
        None
    } else {
        let probs = score(&test_rows)?;
        let labels: Vec<usize> = task.classes(&test_rows)?;
        let (calib_rows, source) = feats.calibration_rows(
            &task,
            &args.task.calib_split,
            &args.task.split,
            &pool_rows,
            &support_rows,
        );
        let calib = if calib_rows.is_empty() {
            None
        } else {
            let cp = score(&calib_rows)?;
            let cl: Vec<usize> = task.classes(&calib_rows)?;
            Some((cp, cl, source))
        };
        let metrics = evaluate(
            &probs,
            &labels,
            c,
            calib
                .as_ref()
                .map(|(p, l, s)| (p.as_slice(), l.as_slice(), s.clone())),
            args.task.conformal(args.seed),
        )?;
        let paths: Vec<String> = test_rows
            .iter()
            .map(|&r| task.rows[r].path.display().to_string())
            .collect();
        eval_csv = Some(probability_csv(&paths, &probs, &task.class_names));
        Some(metrics)
    };

    // Write the artefact into a sibling temporary directory, then move it.
    let write_all = |tmp: &Path| -> anyhow::Result<serde_json::Value> {
        let hyperparameters = match &fitted {
            Fitted::Frozen(clf) => {
                save_classifier(clf.as_ref(), tmp)?;
                clf.card().hyperparameters.clone()
            }
            Fitted::Prompt(clf) => {
                save_classifier(clf.as_ref(), tmp)?;
                clf.card().hyperparameters.clone()
            }
            Fitted::Tuned(clf, _) => {
                save_classifier(clf.as_ref(), tmp)?;
                clf.card().hyperparameters.clone()
            }
        };
        let card = AdaptCard {
            format: ADAPT_FORMAT.into(),
            method: args.method.clone(),
            hyperparameters: hyperparameters.clone(),
            model: args.model.clone(),
            model_family: m.family.to_string(),
            model_fingerprint: model_fingerprint(&args.model, &m),
            data: task.manifests.clone(),
            data_sha256: task.manifest_sha256.clone(),
            label_field: args.task.label_field.clone(),
            filters: args.task.filters.clone(),
            task: TaskKind::MultiClass,
            protocol_description: protocol.describe(),
            protocol: protocol.clone(),
            class_names: task.class_names.clone(),
            prompts: prompts.clone(),
            negative_prompts: None,
            support: support_rows
                .iter()
                .map(|&r| (task.rows[r].path.display().to_string(), task.label_text(r)))
                .collect(),
            train_split: args.task.split.clone(),
            test_split: metrics.as_ref().map(|_| args.task.test_split.clone()),
            metrics: metrics.clone(),
            multilabel_metrics: None,
            notes: Vec::new(),
            medvlm_version: env!("CARGO_PKG_VERSION").into(),
        };
        write_file(&tmp.join(ADAPT_CARD), &serde_json::to_vec_pretty(&card)?)?;
        if let Some(csv) = &eval_csv {
            write_file(&tmp.join("eval_predictions.csv"), csv.as_bytes())?;
        }
        if let Some(mx) = &metrics {
            reliability_plot(
                format!(
                    "{} {}-shot: reliability (ECE {:.3})",
                    args.method, args.shots, mx.ece
                ),
                &mx.reliability,
            )
            .write_png(&tmp.join("reliability.png"), Size::default())
            .context("drawing reliability.png")?;
        }
        Ok(hyperparameters)
    };
    let hyperparameters = write_artefact_dir(&args.out, write_all)?;

    println!(
        "adapted {} ({}) on {} support image(s), {} classes; hyperparameters {}",
        args.method,
        protocol.describe(),
        support_rows.len(),
        c,
        hyperparameters
    );
    if let Some(mx) = &metrics {
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
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

/// `medvlm adapt` on a multi-label task (`--label-field labels`).
fn run_multilabel(
    args: &Args,
    method: &dyn medvlm_adapt::method::AdaptationMethod,
    task: &Task,
    policy: HyperparameterPolicy,
    device: &Device,
) -> anyhow::Result<()> {
    if let Some(why) = multi_label_refusal(&args.method) {
        bail!("--label-field labels makes a multi-label task: method {why}");
    }
    if args.mode == "realistic" {
        bail!(
            "--mode realistic draws classes by their prior and is defined for multi-class tasks; \
             multi-label support sets use the greedy multi-label sampler (at least K positives \
             per finding): drop --mode realistic"
        );
    }
    let prompts = class_prompts(&task.class_names, &args.task)?;
    let negatives = if PROMPT_PAIR_METHODS.contains(&args.method.as_str()) {
        Some(negative_prompts(&task.class_names, &args.task)?)
    } else {
        None
    };
    let protocol = FewShotProtocol {
        shots: args.shots,
        seed: args.seed,
        mode: SamplingMode::Balanced,
        task: TaskKind::MultiLabel,
        hyperparameter_policy: policy,
        validation_set: false,
    };
    let protocol_description = format!(
        "{}; greedy multi-label sampler: at least {} positive(s) per finding, studies without \
         findings not drawn",
        protocol.describe(),
        args.shots
    );

    let m = load(&args.model, device)?;
    let feats = task_features(task, &args.model, &m, &args.task, device)?;
    let pool_rows = feats.available(&task.split_rows(&args.task.split));
    if pool_rows.is_empty() {
        bail!(
            "manifest {} has no labelled '{}' images to draw the support set from (set --split)",
            task.manifest_path.display(),
            args.task.split
        );
    }
    let pool_targets = task.multi_hot(&pool_rows)?;
    let picked = medvlm_adapt::fewshot::sample_support_multilabel(
        &pool_targets,
        &task.class_names,
        args.shots,
        args.seed,
    )
    .map_err(|e| anyhow::anyhow!("--shots {}: {e}", args.shots))
    .with_context(|| {
        format!(
            "drawing the multi-label support set from the '{}' split of {}",
            args.task.split,
            task.manifest_path.display()
        )
    })?;
    let support_rows: Vec<usize> = picked.iter().map(|&i| pool_rows[i]).collect();
    let support = SupportSet {
        features: feats.features_of(task, &support_rows)?,
        labels: task.support_labels(&support_rows)?,
    };
    let texts = encode_class_texts(&m, &prompts, negatives.as_deref(), args.task.batch, device)?;
    let input = AdaptInput {
        texts: &texts,
        support: &support,
        access: FeatureAccess::FrozenFeatures,
        logit_scale: Some(model_logit_scale(&m)?),
        policy,
        seed: args.seed,
        protocol: Some(&protocol),
    };
    let clf = method.fit(&input)?;
    if clf.card().task != TaskKind::MultiLabel {
        bail!(
            "method '{}' returned a multi-class classifier for a multi-label task; multi-label \
             methods: {}",
            args.method,
            MULTI_LABEL_METHODS.join(", ")
        );
    }

    let test_rows = if args.task.test_split == "none" {
        Vec::new()
    } else {
        feats.available(&task.split_rows(&args.task.test_split))
    };
    let (metrics, eval_csv) = if test_rows.is_empty() {
        eprintln!(
            "note: no '{}' split in {}: the artefact carries no test metrics",
            args.task.test_split,
            task.manifest_path.display()
        );
        (None, None)
    } else {
        let probs = probabilities(clf.as_ref(), &feats.features_of(task, &test_rows)?)?;
        let targets = task.multi_hot(&test_rows)?;
        let (calib_rows, source) = feats.calibration_rows(
            task,
            &args.task.calib_split,
            &args.task.split,
            &pool_rows,
            &support_rows,
        );
        let calib = if calib_rows.is_empty() {
            None
        } else {
            let cp = probabilities(clf.as_ref(), &feats.features_of(task, &calib_rows)?)?;
            Some((cp, task.multi_hot(&calib_rows)?, source))
        };
        let metrics = evaluate_multilabel(
            &probs,
            &targets,
            &task.class_names,
            calib
                .as_ref()
                .map(|(p, t, s)| (p.as_slice(), t.as_slice(), s.clone())),
            args.task.conformal_alpha,
        )?;
        let paths: Vec<String> = test_rows
            .iter()
            .map(|&r| task.rows[r].path.display().to_string())
            .collect();
        (
            Some(metrics),
            Some(probability_csv_multilabel(
                &paths,
                &probs,
                &task.class_names,
            )),
        )
    };
    let mut notes = Vec::new();
    if let Some(mx) = &metrics {
        notes.push(mx.conformal.clone());
    }
    notes.push(
        "no reliability diagram: the top-class confidence it bins assumes one class per image"
            .to_string(),
    );

    let hyperparameters = write_artefact_dir(
        &args.out,
        |tmp: &Path| -> anyhow::Result<serde_json::Value> {
            save_classifier(clf.as_ref(), tmp)?;
            let hyperparameters = clf.card().hyperparameters.clone();
            let card = AdaptCard {
                format: ADAPT_FORMAT.into(),
                method: args.method.clone(),
                hyperparameters: hyperparameters.clone(),
                model: args.model.clone(),
                model_family: m.family.to_string(),
                model_fingerprint: model_fingerprint(&args.model, &m),
                data: task.manifests.clone(),
                data_sha256: task.manifest_sha256.clone(),
                label_field: args.task.label_field.clone(),
                filters: args.task.filters.clone(),
                task: TaskKind::MultiLabel,
                protocol: protocol.clone(),
                protocol_description: protocol_description.clone(),
                class_names: task.class_names.clone(),
                prompts: prompts.clone(),
                negative_prompts: negatives.clone(),
                support: support_rows
                    .iter()
                    .map(|&r| (task.rows[r].path.display().to_string(), task.label_text(r)))
                    .collect(),
                train_split: args.task.split.clone(),
                test_split: metrics.as_ref().map(|_| args.task.test_split.clone()),
                metrics: None,
                multilabel_metrics: metrics.clone(),
                notes: notes.clone(),
                medvlm_version: env!("CARGO_PKG_VERSION").into(),
            };
            write_file(&tmp.join(ADAPT_CARD), &serde_json::to_vec_pretty(&card)?)?;
            if let Some(csv) = &eval_csv {
                write_file(&tmp.join("eval_predictions.csv"), csv.as_bytes())?;
            }
            Ok(hyperparameters)
        },
    )?;

    println!(
        "adapted {} ({protocol_description}) on {} support image(s), {} labels ({}); \
         hyperparameters {}",
        args.method,
        support_rows.len(),
        task.class_names.len(),
        task.class_names.join(", "),
        hyperparameters
    );
    if let Some(mx) = &metrics {
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
    for n in &notes {
        println!("note: {n}");
    }
    println!("wrote {}", args.out.display());
    Ok(())
}
