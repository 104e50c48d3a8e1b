//! `medvlm predict`: class probabilities of images under an artefact written
//! by `medvlm adapt`. The model named in the artefact's `adapt.json` is
//! loaded (or `--model`, when it has moved), the images are embedded exactly
//! as `adapt` embedded them, and the saved classifier is applied. Prompt
//! learners run the model with their learned prompts; encoder fine-tuning
//! artefacts put their tuned tensors (LoRA adapters, biases, blocks) onto
//! the base model first. Output: a
//! CSV table `image,<class>...,prediction` on stdout (and `--csv OUT`).
//!
//! A multi-label artefact (`medvlm adapt --label-field labels`) gives one
//! independent sigmoid probability per label (rows do not sum to 1) and the
//! table `image,<label>...,predicted_labels`, the labels with probability
//! >= 0.5 joined with `;` (`normal` when there is none).

use std::path::PathBuf;

use anyhow::bail;
use medvlm_adapt::fewshot::TaskKind;
use medvlm_adapt::predictor::{AdaptedModel, PredictError};
use medvlm_eval::evaluation::MULTI_LABEL_THRESHOLD;
use medvlm_models::ModelError;

use medvlm_adapt::pipeline::{probability_csv, probability_csv_multilabel};

use super::common::write_file;
use super::embed::{list_images, report_skipped, DeviceArgs};
use super::progress::Progress;

/// Arguments of `medvlm predict`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Artefact directory written by `medvlm adapt --out`.
    #[arg(long)]
    pub adapted: PathBuf,
    /// Images: files, directories (searched recursively) or manifests (.jsonl / .csv).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Model to use instead of the one named in the artefact (same weights, moved).
    #[arg(long)]
    pub model: Option<String>,
    /// Also write the probabilities to this CSV file.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Images per inference batch.
    #[arg(long, default_value_t = 32, value_parser = crate::commands::at_least_one)]
    pub batch: usize,
    /// Skip unreadable images (counted and listed at the end) instead of stopping.
    #[arg(long)]
    pub skip_bad: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

fn expand(inputs: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in inputs {
        let ext = p
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        if p.is_dir() || matches!(ext.as_str(), "jsonl" | "csv" | "tsv" | "ndjson") {
            out.extend(list_images(p)?);
        } else if p.exists() {
            out.push(p.clone());
        } else {
            bail!("{}: no such file or directory", p.display());
        }
    }
    Ok(out)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = args.device.device()?;
    let adapted = AdaptedModel::load(&args.adapted, args.model.as_deref(), &device)?;
    let paths = expand(&args.images)?;
    let pb = Progress::new("predicting", paths.len() as u64, "images");
    let result = adapted.predict_files(&paths, args.batch, args.skip_bad, &device, &|n| pb.inc(n));
    let pred = match result {
        Ok(p) => {
            pb.finish();
            p
        }
        Err(e) => {
            pb.abandon();
            let unreadable = matches!(e, PredictError::Compute(ModelError::UnreadableImage { .. }));
            let e = anyhow::Error::new(e);
            return Err(if unreadable {
                e.context("reading the images (--skip-bad skips unreadable ones)")
            } else {
                e
            });
        }
    };
    let names: Vec<String> = pred.paths.iter().map(|p| p.display().to_string()).collect();
    let classes = adapted.class_names();
    let table = match adapted.task() {
        TaskKind::MultiClass => probability_csv(&names, &pred.probabilities, classes),
        TaskKind::MultiLabel => {
            eprintln!(
                "multi-label: one independent sigmoid probability per label (rows need not sum \
                 to 1); predicted_labels lists those >= {MULTI_LABEL_THRESHOLD}"
            );
            probability_csv_multilabel(&names, &pred.probabilities, classes)
        }
    };
    print!("{table}");
    if let Some(csv) = &args.csv {
        write_file(csv, table.as_bytes())?;
    }
    if !pred.skipped.is_empty() {
        report_skipped(&pred.skipped);
        eprintln!(
            "predicted {} image(s); skipped {} unreadable",
            pred.paths.len(),
            pred.skipped.len()
        );
    }
    Ok(())
}
