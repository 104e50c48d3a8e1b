//! `medvlm finetune --config FILE.toml [--set KEY=VALUE ...] [--resume] [--skip-bad]`: contrastive fine-tuning of a
//! pretrained model directory on a manifest's image-text pairs, in one of the modes of
//! `medvlm_train::finetune` (full, partial = last k blocks, BitFit, LoRA). Every
//! hyperparameter is a key of the TOML file (docs/training.md, docs/finetuning.md); `--set`
//! overrides one before validation.
//!
//! Order of work: the configuration is validated, the model loaded (trainable) and the mode
//! applied, so a mode that does not fit the model (LoRA targets that match no layer, `last_k`
//! above the number of blocks, ...) fails before any image is read; then the pairs are loaded
//! with the model's own preprocessing (as `medvlm embed` applies it) and the shared training
//! loop runs (AdamW, warm-up + cosine, checkpoints, exact `--resume`).
//!
//! Output directory: `checkpoints/`, `train_log.jsonl` (one line per update: loss, learning
//! rate, temperature, gradient norm), `config.resolved.toml` (the configuration with overrides
//! and defaults filled in),
//! `finetune.json` (mode, trainable parameters, LoRA layers, steps, skipped images) and
//! `lora_adapter/` (LoRA only: the adapter alone, PEFT layout) and
//! `model/`: a model directory of the same family, LoRA merged into the weights, that
//! `medvlm embed` and `medvlm zero-shot` load like a hub model.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use medvlm_models::{LoadMode, LoadOptions};
use medvlm_train::finetune::{
    export_model_dir, prepare, scalar_value, train_contrastive, FinetuneSpec, Mode, PairData,
    VarMap,
};
use medvlm_train::lora::{merge_lora, save_lora_adapters};
use medvlm_train::losses::{ContrastiveHead, LossKind};
use medvlm_train::pretrain::{config_toml, load_pretrain_config};
use medvlm_train::train_config::{AugmentConfig, Command, TrainConfig};
use medvlm_train::trainer::{Callbacks, LoopConfig, RunPaths, StepRecord};
use rayon::prelude::*;
use serde::Serialize;

use super::embed::{preprocess_file, report_skipped, DeviceArgs, Skipped};

/// Arguments of `medvlm finetune`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Training configuration (TOML with a [finetune] table; every key is documented in
    /// docs/training.md and docs/finetuning.md).
    #[arg(long)]
    pub config: PathBuf,
    /// Override a key, e.g. `--set finetune.lora.rank=4 --set optim.lr=1e-4` (TOML values).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Continue the run in output_dir from its newest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Skip unreadable images (counted and listed) instead of stopping.
    #[arg(long)]
    pub skip_bad: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Prints a line every few updates.
struct Progress {
    total: u64,
}

impl<M> Callbacks<M> for Progress {
    fn on_start(&mut self, start_step: u64, total_steps: u64) {
        self.total = total_steps;
        eprintln!("finetune: updates {start_step}..{total_steps}");
    }
    fn on_update(&mut self, r: &StepRecord) {
        let every = (self.total / 20).max(1);
        if r.step.is_multiple_of(every) || r.step == self.total {
            eprintln!(
                "step {}/{} epoch {} loss {:.4} lr {:.2e} grad-norm {:.3}",
                r.step, self.total, r.epoch, r.loss, r.lr, r.grad_norm
            );
        }
    }
}

#[derive(Serialize)]
struct RunReport<'a> {
    mode: &'a str,
    towers: String,
    source: &'a str,
    family: String,
    /// Model tensors trained (the loss head's temperature is counted separately).
    trainable_tensors: usize,
    trainable_scalars: usize,
    base_tensors_trained: usize,
    lora_layers: &'a [String],
    lora_merged: usize,
    pairs: usize,
    skipped_images: &'a [Skipped],
    steps: u64,
    final_loss: Option<f64>,
    temperature_learnable: bool,
    temperature: f64,
    model_dir: String,
}

/// Settings this command does not apply: refused (or reported) instead of silently ignored.
fn check_unsupported(cfg: &TrainConfig) -> anyhow::Result<()> {
    if cfg.data.augment != AugmentConfig::default() {
        bail!(
            "data.augment: `medvlm finetune` trains on the model's own preprocessing without augmentation; remove [data.augment]"
        );
    }
    if cfg.loss.kind == LossKind::LabelAware {
        bail!("loss.kind = \"label_aware\" is not supported by `medvlm finetune`; use \"clip\" or \"siglip\"");
    }
    if let Some(v) = &cfg.data.val_manifest {
        eprintln!(
            "note: data.val_manifest ({}) is not evaluated during fine-tuning; evaluate {}/model with `medvlm zero-shot`",
            v.display(),
            cfg.output_dir.display()
        );
    }
    Ok(())
}

/// The image-text pairs of the manifest, preprocessed for the model. Uses the `train` split
/// when the manifest has splits.
fn load_pairs(
    manifest_path: &Path,
    preprocess: &medvlm_models::preprocess::PreprocessConfig,
    skip_bad: bool,
) -> anyhow::Result<(PairData, Vec<Skipped>)> {
    let manifest = medvlm_io::read_manifest(manifest_path)
        .with_context(|| format!("data.manifest {}", manifest_path.display()))?;
    let has_splits = manifest.records.iter().any(|r| r.split.is_some());
    let records: Vec<_> = manifest
        .records
        .iter()
        .filter(|r| !has_splits || r.split.as_deref() == Some("train"))
        .collect();
    if records.is_empty() {
        bail!(
            "{}: no training records{}",
            manifest_path.display(),
            if has_splits {
                " in split \"train\""
            } else {
                ""
            }
        );
    }
    if let Some((i, r)) = records
        .iter()
        .enumerate()
        .find(|(_, r)| r.text.as_deref().is_none_or(|t| t.trim().is_empty()))
    {
        bail!(
            "{}: record {} ({}) has no text; fine-tuning needs an image-text pair in every record (the `text` field)",
            manifest_path.display(),
            i + 1,
            r.image
        );
    }
    let loaded: Vec<(PathBuf, anyhow::Result<Vec<f32>>)> = records
        .par_iter()
        .map(|r| {
            let p = manifest.image_path(r);
            let px = preprocess_file(&p, preprocess).map_err(anyhow::Error::from);
            (p, px)
        })
        .collect();
    let mut data = PairData::default();
    let mut skipped = Vec::new();
    for ((path, px), r) in loaded.into_iter().zip(&records) {
        match px {
            Ok(v) => {
                data.images.push(v);
                data.texts.push(r.text.clone().unwrap_or_default());
            }
            Err(e) if skip_bad => skipped.push(Skipped {
                path: path.display().to_string(),
                error: format!("{e:#}"),
            }),
            Err(e) => {
                return Err(e.context(format!(
                    "reading {} (pass --skip-bad to skip unreadable images)",
                    path.display()
                )))
            }
        }
    }
    Ok((data, skipped))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg: TrainConfig = load_pretrain_config(&args.config, &args.overrides, Command::Finetune)?;
    let spec = FinetuneSpec::from_config(&cfg)?;
    check_unsupported(&cfg)?;
    let source = cfg
        .model
        .source
        .clone()
        .context("model.source: fine-tuning needs a pretrained model")?;
    let device = args.device.device()?;

    // Model and mode first: a mode that does not fit the model fails before any data is read.
    let base = VarMap::new();
    let opts = LoadOptions {
        device: device.clone(),
        mode: LoadMode::Trainable(base.clone()),
        ..LoadOptions::default()
    };
    let mut lm = medvlm_models::load_model(&source, &opts)
        .with_context(|| format!("model.source: loading {source}"))?;
    let size = lm.model.image_size();
    if cfg.data.image_size != size {
        bail!(
            "data.image_size = {} but the model {source} takes {size}x{size} images; set data.image_size = {size}",
            cfg.data.image_size
        );
    }
    let adapters = VarMap::new();
    let prepared = prepare(lm.model.as_mut(), &base, &adapters, &spec, cfg.seed)
        .with_context(|| format!("finetune.mode = \"{}\" on {source}", spec.mode.name()))?;
    // LoRA is merged into the exported weights: refuse, before training, layers that have no
    // weight tensor of their own to merge into.
    medvlm_train::lora::check_mergeable(&prepared.lora_layers, &base)
        .with_context(|| format!("finetune.mode = \"lora\" on {source}"))?;
    eprintln!(
        "finetune: {} ({} towers) on {} ({}): {} tensors, {} scalars trainable{}",
        spec.mode.name(),
        spec.towers,
        source,
        lm.family,
        prepared.params.len(),
        prepared.num_scalars(),
        if prepared.lora_layers.is_empty() {
            String::new()
        } else {
            format!(", LoRA on {} layers", prepared.lora_layers.len())
        }
    );

    let (data, skipped) = load_pairs(&cfg.data.manifest, &lm.preprocess, args.skip_bad)?;
    report_skipped(&skipped);
    if data.images.len() < 2 {
        bail!(
            "{}: {} usable image-text pair(s); a contrastive loss needs at least 2",
            cfg.data.manifest.display(),
            data.images.len()
        );
    }

    // The loss head starts from the model's own temperature (and SigLIP bias) unless the
    // config sets one.
    let scale = match cfg.loss.temperature_init {
        Some(_) => cfg.loss.logit_scale_init(),
        None => scalar_value(&lm.model.logit_scale())?,
    };
    let bias = match lm.model.logit_bias() {
        Some(b) => scalar_value(&b)?,
        None => cfg.loss.bias_init,
    };
    let head = ContrastiveHead::new(
        cfg.loss.kind,
        scale,
        bias,
        cfg.loss.learnable_temperature,
        lm.model.dtype(),
        &device,
    )?;

    std::fs::create_dir_all(&cfg.output_dir)
        .with_context(|| format!("creating output_dir {}", cfg.output_dir.display()))?;
    medvlm_io::atomic::write_atomic(
        &cfg.output_dir.join("config.resolved.toml"),
        config_toml(&cfg)?.as_bytes(),
    )?;
    let paths = RunPaths {
        checkpoints: cfg.output_dir.join("checkpoints"),
        log: cfg.output_dir.join("train_log.jsonl"),
    };
    let loop_cfg = LoopConfig::from_train_config(&cfg);
    let summary = train_contrastive(
        lm.model.as_ref(),
        &lm.tokenizer,
        &lm.preprocess,
        &data,
        &prepared.params,
        &head,
        Some(&base),
        &loop_cfg,
        &paths,
        args.resume,
        &cfg.trajectory_hash(),
        &mut Progress { total: 0 },
    )?;

    // LoRA: keep the adapter alone (PEFT layout) as well, then merge it for the export.
    let merged = match &spec.mode {
        Mode::Lora(l) => {
            let dir = cfg.output_dir.join("lora_adapter");
            save_lora_adapters(lm.model.as_ref(), l, &dir)
                .with_context(|| format!("saving {}", dir.display()))?;
            merge_lora(lm.model.as_mut(), Some(&base))?
        }
        _ => Vec::new(),
    };
    let model_dir = cfg.output_dir.join("model");
    export_model_dir(&lm.dir, lm.family, &base, &model_dir)
        .with_context(|| format!("exporting {}", model_dir.display()))?;
    let temperature = (-scalar_value(head.logit_scale().as_tensor())?).exp();
    let report = RunReport {
        mode: spec.mode.name(),
        towers: spec.towers.to_string(),
        source: &source,
        family: lm.family.to_string(),
        trainable_tensors: prepared.params.len(),
        trainable_scalars: prepared.num_scalars(),
        base_tensors_trained: prepared.base_selected,
        lora_layers: &prepared.lora_layers,
        lora_merged: merged.len(),
        pairs: data.images.len(),
        skipped_images: &skipped,
        steps: summary.steps,
        final_loss: summary.final_loss,
        temperature_learnable: cfg.loss.learnable_temperature,
        temperature,
        model_dir: model_dir.display().to_string(),
    };
    medvlm_io::atomic::write_atomic(
        &cfg.output_dir.join("finetune.json"),
        &serde_json::to_vec_pretty(&report)?,
    )?;
    println!(
        "fine-tuned {} ({}) for {} updates (final loss {}); model written to {}",
        source,
        spec.mode.name(),
        summary.steps,
        summary
            .final_loss
            .map_or("n/a".to_string(), |l| format!("{l:.4}")),
        model_dir.display()
    );
    Ok(())
}
