//! `medvlm pretrain --config FILE.toml [--set KEY=VALUE ...] [--resume]`: contrastive
//! image-text pretraining (CLIP, Radford et al. 2021; SigLIP, Zhai et al. 2023) of a model
//! built from scratch (`[model.scratch]`) or loaded from an HF CLIP/SigLIP directory
//! (`model.source`). Every hyperparameter is a key of the TOML file (docs/training.md);
//! `--set optim.lr=1e-3` overrides one before validation.
//!
//! Output directory: `checkpoints/step-NNNNNN/` (weights, AdamW moments, loop and RNG state,
//! written atomically), `train_log.jsonl` (per update: loss, learning rate, temperature,
//! gradient norm; per epoch: validation zero-shot accuracy and retrieval recall@1/5/10),
//! `config.resolved.toml`, and `model/`, a model directory that `medvlm embed` and `medvlm
//! zero-shot` load like a hub model. `--resume` continues from the newest checkpoint and ends
//! with the same weights as an uninterrupted run.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use medvlm_train::data::{self, ImageTextSample};
use medvlm_train::pretrain::{
    build_model, config_toml, embed_images, embed_texts, load_pretrain_config, retrieval,
    zero_shot, ContrastiveModel,
};
use medvlm_train::train_config::{Command, TrainConfig};

use crate::commands::progress::Progress;
use medvlm_train::trainer::{self, Callbacks, LoopConfig, RunPaths, StepRecord, TrainSummary};

/// Arguments of `medvlm pretrain`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Training configuration (TOML; every key is documented in docs/training.md).
    #[arg(long)]
    pub config: PathBuf,
    /// Override a key, e.g. `--set optim.lr=1e-3 --set data.batch_size=64` (TOML values).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Continue the run in output_dir from its newest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Start even when the model and its training step are estimated to need more memory
    /// than is available.
    #[arg(long)]
    pub force: bool,
    /// Skip unreadable images (counted and listed) instead of stopping.
    #[arg(long)]
    pub skip_bad: bool,
    /// Testing aid: sleep this many milliseconds after every update (used by the
    /// kill-and-resume test to kill a run between checkpoints).
    #[arg(long, hide = true, default_value_t = 0)]
    pub throttle_ms: u64,
}

/// A class of the zero-shot evaluation: the label the samples carry and its prompts (their
/// normalised embeddings are averaged: prompt ensembling, Radford et al. 2021).
#[derive(Debug, Clone)]
pub struct ZeroShotClass {
    /// Label as found in [`ImageTextSample::labels`] (first label = primary).
    pub label: String,
    /// Prompt text.
    pub prompts: Vec<String>,
}

/// Classes from the primary labels of `samples`, prompt = the label with `_` as spaces.
pub fn classes_from_labels(samples: &[ImageTextSample]) -> Vec<ZeroShotClass> {
    let mut labels: Vec<String> = samples
        .iter()
        .filter_map(|s| s.labels.first().cloned())
        .collect();
    labels.sort();
    labels.dedup();
    labels
        .into_iter()
        .map(|l| ZeroShotClass {
            prompts: vec![l.replace('_', " ")],
            label: l,
        })
        .collect()
}

/// Each class's L2-normalised prompt embeddings `[P_c, E]`, for
/// [`medvlm_train::pretrain::prompt_mixture_scores`] / [`zero_shot`].
pub fn prompt_embeddings(
    model: &ContrastiveModel,
    classes: &[ZeroShotClass],
) -> anyhow::Result<Vec<candle_core::Tensor>> {
    classes
        .iter()
        .map(|c| {
            anyhow::ensure!(!c.prompts.is_empty(), "class {} has no prompt", c.label);
            let prompts: Vec<&str> = c.prompts.iter().map(String::as_str).collect();
            Ok(embed_texts(model, &prompts, 256)?)
        })
        .collect()
}

/// The model's logit scale `1 / temperature`, with which zero-shot prompts are scored.
pub fn logit_scale(model: &ContrastiveModel) -> anyhow::Result<f64> {
    Ok(1.0 / model.temperature()?)
}

/// Validation metrics of `model` on `samples`: zero-shot accuracy / balanced accuracy over
/// `classes` (samples whose primary label is not a class are left out and counted), and
/// retrieval recall@1/5/10 (identical texts count as matches).
pub fn validate(
    model: &ContrastiveModel,
    samples: &[ImageTextSample],
    classes: &[ZeroShotClass],
) -> anyhow::Result<serde_json::Value> {
    let planes: Vec<&medvlm_io::Plane> = samples.iter().map(|s| &s.image).collect();
    let img = embed_images(model, &planes, 64)?;
    let mut out = serde_json::Map::new();
    if classes.len() >= 2 {
        let pred = zero_shot(
            &img,
            &prompt_embeddings(model, classes)?,
            logit_scale(model)?,
        )?;
        let mut y_true = Vec::new();
        let mut y_pred = Vec::new();
        for (s, p) in samples.iter().zip(&pred) {
            if let Some(t) = s
                .labels
                .first()
                .and_then(|l| classes.iter().position(|c| &c.label == l))
            {
                y_true.push(t);
                y_pred.push(*p);
            }
        }
        if !y_true.is_empty() {
            let r = medvlm_eval::classification::ClassificationReport::new(
                &y_true,
                &y_pred,
                classes.len(),
            )?;
            out.insert("zero_shot_accuracy".into(), r.accuracy.into());
            out.insert(
                "zero_shot_balanced_accuracy".into(),
                r.balanced_accuracy.into(),
            );
            out.insert("zero_shot_classes".into(), classes.len().into());
            out.insert(
                "zero_shot_unlabelled".into(),
                (samples.len() - y_true.len()).into(),
            );
        }
    }
    let texts: Vec<&str> = samples.iter().map(|s| s.text.as_str()).collect();
    if texts.iter().all(|t| !t.is_empty()) {
        let te = embed_texts(model, &texts, 64)?;
        let r = retrieval(&img, &te, &texts, &[1, 5, 10])?;
        for (dir, rk) in [
            ("image_to_text", &r.image_to_text),
            ("text_to_image", &r.text_to_image),
        ] {
            for k in [1, 5, 10] {
                if let Some(v) = rk.at(k) {
                    out.insert(format!("{dir}_recall@{k}"), v.into());
                }
            }
        }
    }
    Ok(serde_json::Value::Object(out))
}

/// Progress bar, throttle and per-epoch validation.
pub struct PretrainCallbacks<'a> {
    /// Progress (a bar on a terminal, plain lines otherwise).
    pub bar: Progress,
    /// Validation samples and classes, evaluated every `every_epochs` epochs.
    pub val: Option<(&'a [ImageTextSample], Vec<ZeroShotClass>)>,
    /// Evaluate every N epochs (0: never).
    pub every_epochs: u64,
    /// Sleep after each update (testing aid).
    pub throttle: std::time::Duration,
    /// Print checkpoint lines.
    pub verbose: bool,
}

impl Callbacks<ContrastiveModel> for PretrainCallbacks<'_> {
    fn on_start(&mut self, start_step: u64, total_steps: u64) {
        self.bar.set_length(total_steps);
        self.bar.start_at(start_step);
    }
    fn on_update(&mut self, r: &StepRecord) {
        let t = r.scalars.get("temperature").copied().unwrap_or(f64::NAN);
        self.bar.set_message(format!(
            "epoch {} loss {:.4} lr {:.2e} T {:.4}",
            r.epoch + 1,
            r.loss,
            r.lr,
            t
        ));
        self.bar.set_position(r.step);
        if !self.throttle.is_zero() {
            std::thread::sleep(self.throttle);
        }
    }
    fn on_epoch_end(
        &mut self,
        epoch: u64,
        _step: u64,
        model: &ContrastiveModel,
    ) -> medvlm_train::trainer::Result<Option<serde_json::Value>> {
        let Some((samples, classes)) = &self.val else {
            return Ok(None);
        };
        if self.every_epochs == 0 || !(epoch + 1).is_multiple_of(self.every_epochs) {
            return Ok(None);
        }
        let v = validate(model, samples, classes).map_err(|e| {
            medvlm_train::trainer::TrainError::Invalid(format!("validation: {e:#}"))
        })?;
        self.bar
            .println(format!("epoch {} validation: {v}", epoch + 1));
        Ok(Some(v))
    }
    fn on_checkpoint(&mut self, step: u64, dir: &Path) {
        if self.verbose {
            self.bar
                .println(format!("checkpoint step {step}: {}", dir.display()));
        }
    }
}

/// Progress of the training updates on stderr.
pub fn progress_bar() -> Progress {
    Progress::new("training", 0, "updates")
}

/// The SHA-256 of the resolved configuration (checkpoints of another configuration are
/// refused on resume).
pub fn config_hash(cfg: &TrainConfig) -> anyhow::Result<String> {
    Ok(medvlm_train::checkpoint::sha256_hex(
        serde_json::to_string(cfg)?.as_bytes(),
    ))
}

/// Trains `model` on `train` with the config's loop settings, writing checkpoints and the log
/// under `cfg.output_dir`, then saves `output_dir/model`.
pub fn train_and_save<C: Callbacks<ContrastiveModel>>(
    cfg: &TrainConfig,
    model: &mut ContrastiveModel,
    train: &[ImageTextSample],
    resume: bool,
    callbacks: &mut C,
) -> anyhow::Result<TrainSummary> {
    let loop_cfg = LoopConfig::from_train_config(cfg);
    if loop_cfg.micro_batches_per_epoch(train.len()) == 0 {
        bail!(
            "{} training samples give no full update of data.batch_size {} x optim.grad_accum {}",
            train.len(),
            cfg.data.batch_size,
            cfg.optim.grad_accum
        );
    }
    if cfg.loss.kind == medvlm_train::losses::LossKind::LabelAware {
        if let Some(s) = train.iter().find(|s| s.labels.is_empty()) {
            bail!(
                "loss.kind = \"label_aware\" needs labels (`label` or `labels` in the manifest) for every training sample; {} has none",
                s.id
            );
        }
    }
    let augment = (!data::augment_is_identity(&cfg.data.augment))
        .then(|| data::train_transform(&cfg.data.augment, cfg.data.image_size));
    // The batch source tokenises with its own handle of the tokenizer, since the model is
    // borrowed mutably by the loop.
    let tokenizer = model.tokenizer.clone();
    let mut source =
        data::ContrastiveBatches::new(train, &tokenizer, augment, cfg.seed, cfg.data.workers)?;
    source.normalise = model.normalise;
    source.group_batches =
        cfg.data.batch_grouping == medvlm_train::train_config::BatchGrouping::Group;
    if source.group_batches && train.iter().all(|s| s.group.is_none()) {
        bail!(
            "data.batch_grouping = \"group\" needs a `modality` field in the training manifest's records; none has one"
        );
    }
    std::fs::create_dir_all(&cfg.output_dir)
        .with_context(|| format!("cannot create {}", cfg.output_dir.display()))?;
    let paths = RunPaths {
        checkpoints: cfg.output_dir.join("checkpoints"),
        log: cfg.output_dir.join("train_log.jsonl"),
    };
    // `[freeze]`: a locked tower (LiT) or the last k blocks only.
    let all = model.named_vars();
    let trainable = medvlm_train::optim::select_trainable(
        all.iter().map(|(n, _)| n.as_str()),
        &cfg.freeze_selection(),
    )?;
    let (params, _frozen) = medvlm_train::optim::partition_trainable(all, &trainable);
    let hash = config_hash(cfg)?;
    let summary = trainer::train(
        params, model, &source, &loop_cfg, &paths, resume, &hash, callbacks,
    )?;
    let out = cfg.output_dir.join("model");
    model
        .save(&out)
        .with_context(|| format!("saving the model to {}", out.display()))?;
    Ok(summary)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = load_pretrain_config(&args.config, &args.overrides, Command::Pretrain)?;
    if let Some(s) = &cfg.model.scratch {
        let (size, batch) = (cfg.data.image_size, cfg.data.batch_size);
        medvlm_io::resources::ensure_memory(
            &format!(
                "{}: [model.scratch] (about {:.2e} parameters) trained at data.image_size = \
                 {size}, data.batch_size = {batch},",
                args.config.display(),
                s.estimated_parameters(size)
            ),
            s.estimated_training_bytes(size, batch),
            args.force,
            "pass --force",
        )?;
    }
    let manifest = medvlm_io::read_manifest(&cfg.data.manifest)
        .with_context(|| format!("data.manifest {}", cfg.data.manifest.display()))?;
    let (mut train, report) = data::samples_from_manifest(
        &manifest,
        None,
        cfg.data.image_size,
        true,
        args.skip_bad,
        cfg.data.workers,
    )?;
    let section = cfg.data.text_section;
    let fell_back = data::apply_text_section(&mut train, section);
    if fell_back > 0 {
        eprintln!(
            "data.text_section = {:?}: {fell_back} of {} training reports have no `Impression:` header; their last sentence is used",
            section.name(),
            train.len()
        );
    }
    let val = match &cfg.data.val_manifest {
        Some(p) => {
            let m = medvlm_io::read_manifest(p)
                .with_context(|| format!("data.val_manifest {}", p.display()))?;
            let mut v = data::samples_from_manifest(
                &m,
                None,
                cfg.data.image_size,
                false,
                args.skip_bad,
                cfg.data.workers,
            )?
            .0;
            data::apply_text_section(&mut v, section);
            Some(v)
        }
        None => None,
    };
    if !report.bad_images.is_empty() {
        eprintln!(
            "skipped {} of {} records with unreadable images:",
            report.bad_images.len(),
            report.records
        );
        for (p, why) in &report.bad_images {
            eprintln!("  {}: {why}", p.display());
        }
    }
    let texts: Vec<&str> = train.iter().map(|s| s.text.as_str()).collect();
    let mut model = build_model(&cfg, &texts)?;
    std::fs::create_dir_all(&cfg.output_dir)
        .with_context(|| format!("cannot create {}", cfg.output_dir.display()))?;
    medvlm_train::checkpoint::write_atomic(
        &cfg.output_dir.join("config.resolved.toml"),
        config_toml(&cfg)?.as_bytes(),
    )?;
    let classes = val.as_deref().map(classes_from_labels).unwrap_or_default();
    let mut cb = PretrainCallbacks {
        bar: progress_bar(),
        val: val.as_deref().map(|v| (v, classes)),
        every_epochs: if cfg.eval.zero_shot || cfg.eval.retrieval {
            cfg.eval.every_epochs
        } else {
            0
        },
        throttle: std::time::Duration::from_millis(args.throttle_ms),
        verbose: false,
    };
    eprintln!(
        "pretraining on {} image-text pairs ({} trainable tensors){}",
        train.len(),
        model.named_vars().len(),
        if args.resume { ", resuming" } else { "" }
    );
    let summary = train_and_save(&cfg, &mut model, &train, args.resume, &mut cb)?;
    cb.bar.finish();
    if args.resume {
        println!("resumed from step {}", summary.start_step);
    }
    println!(
        "trained {} updates ({} epochs), final loss {}; model: {}",
        summary.steps,
        summary.epochs,
        summary
            .final_loss
            .map_or("-".to_string(), |l| format!("{l:.4}")),
        cfg.output_dir.join("model").display()
    );
    Ok(())
}
