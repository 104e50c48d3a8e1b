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

use anyhow::Context;
use medvlm_train::pretrain::{build_model, config_toml, load_pretrain_config, ContrastiveModel};
use medvlm_train::pretrain_run::{
    classes_from_labels, load_pretrain_data, train_and_save, EpochValidation,
};
use medvlm_train::train_config::Command;
use medvlm_train::trainer::{Callbacks, StepRecord};

use crate::commands::progress::Progress;

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

/// Progress bar, throttle and per-epoch validation.
pub struct PretrainCallbacks<'a> {
    /// Progress (a bar on a terminal, plain lines otherwise).
    pub bar: Progress,
    /// Validation samples and classes, and how often they are evaluated.
    pub val: Option<EpochValidation<'a>>,
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
        show_update(&self.bar, r);
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
        let Some(val) = &self.val else {
            return Ok(None);
        };
        let v = val.at_epoch_end(epoch, model)?;
        if let Some(v) = &v {
            self.bar
                .println(format!("epoch {} validation: {v}", epoch + 1));
        }
        Ok(v)
    }
    fn on_checkpoint(&mut self, step: u64, dir: &Path) {
        if self.verbose {
            self.bar
                .println(format!("checkpoint step {step}: {}", dir.display()));
        }
    }
}

/// Progress of the training updates on stderr.
/// The bar's message and position after update `r`: epoch, loss, learning rate, temperature.
pub fn show_update(bar: &Progress, r: &StepRecord) {
    let t = r.scalars.get("temperature").copied().unwrap_or(f64::NAN);
    bar.set_message(format!(
        "epoch {} loss {:.4} lr {:.2e} T {:.4}",
        r.epoch + 1,
        r.loss,
        r.lr,
        t
    ));
    bar.set_position(r.step);
}

pub fn progress_bar() -> Progress {
    Progress::new("training", 0, "updates")
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
    let data = load_pretrain_data(&cfg, args.skip_bad)?;
    if data.text_section_fallbacks > 0 {
        eprintln!(
            "data.text_section = {:?}: {} of {} training reports have no `Impression:` header; their last sentence is used",
            cfg.data.text_section.name(),
            data.text_section_fallbacks,
            data.train.len()
        );
    }
    if !data.bad_images.is_empty() {
        eprintln!(
            "skipped {} of {} records with unreadable images:",
            data.bad_images.len(),
            data.records
        );
        for (p, why) in &data.bad_images {
            eprintln!("  {}: {why}", p.display());
        }
    }
    let (train, val) = (data.train, data.val);
    let texts: Vec<&str> = train.iter().map(|s| s.text.as_str()).collect();
    let mut model = build_model(&cfg, &texts)?;
    std::fs::create_dir_all(&cfg.output_dir)
        .with_context(|| format!("cannot create {}", cfg.output_dir.display()))?;
    medvlm_train::checkpoint::write_atomic(
        &cfg.output_dir.join("config.resolved.toml"),
        config_toml(&cfg)?.as_bytes(),
    )?;
    let mut cb = PretrainCallbacks {
        bar: progress_bar(),
        val: val.as_deref().map(|v| EpochValidation {
            samples: v,
            classes: classes_from_labels(v),
            every_epochs: if cfg.eval.zero_shot || cfg.eval.retrieval {
                cfg.eval.every_epochs
            } else {
                0
            },
        }),
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
