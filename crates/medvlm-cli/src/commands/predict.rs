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

use anyhow::{bail, Context};
use medvlm_adapt::fewshot::TaskKind;
use medvlm_adapt::method::load_classifier;
use medvlm_adapt::methods::prompt_common::{PromptClassifier, PROMPT_METHOD_NAMES};

use super::common::{probabilities, probability_csv, probability_csv_multilabel, write_file};
use super::embed::{
    embed_images, list_images, load, preprocess_file, report_skipped, DeviceArgs, Skipped,
};
use medvlm_adapt::artefact::AdaptCard;
use medvlm_adapt::encoders::{
    is_tuning_method, load_applied, prompt_probabilities, tuned_probabilities,
};
use medvlm_eval::evaluation::MULTI_LABEL_THRESHOLD;

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
    let card = AdaptCard::read(&args.adapted)?;
    let paths = expand(&args.images)?;
    let spec = args.model.clone().unwrap_or_else(|| card.model.clone());
    let model_context = || {
        format!(
            "the model of {} (use --model if it moved)",
            args.adapted.display()
        )
    };
    let method = card.method.as_str();
    let through_model = PROMPT_METHOD_NAMES.contains(&method) || is_tuning_method(method);
    // Fine-tuned weights go onto a trainable copy of the base model.
    let (m, tuned) = if is_tuning_method(method) {
        let (clf, m) = load_applied(&args.adapted, &spec, &device).with_context(model_context)?;
        (m, Some(clf))
    } else {
        (load(&spec, &device).with_context(model_context)?, None)
    };
    let mut task = TaskKind::MultiClass;
    let (kept, skipped, probs): (Vec<PathBuf>, Vec<Skipped>, Vec<f32>) = if through_model {
        let mut kept = Vec::new();
        let mut skipped = Vec::new();
        for p in &paths {
            match preprocess_file(p, &m.preprocess) {
                Ok(_) => kept.push(p.clone()),
                Err(e) if args.skip_bad => skipped.push(Skipped {
                    path: p.display().to_string(),
                    error: format!("{e:#}"),
                }),
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "unreadable image {} (use --skip-bad to skip such files)",
                        p.display()
                    )))
                }
            }
        }
        let probs = match &tuned {
            Some(clf) => tuned_probabilities(clf, &m, &kept, args.batch, &device)?,
            None => {
                let clf = PromptClassifier::load(&args.adapted)?;
                prompt_probabilities(&clf, &m, &kept, args.batch, &device)?
            }
        };
        (kept, skipped, probs)
    } else {
        let clf = load_classifier(&args.adapted)?;
        task = clf.card().task;
        if task != card.task {
            bail!(
                "{}: adapt.json says {:?} but the saved classifier is {:?}; \
                     re-run medvlm adapt",
                args.adapted.display(),
                card.task,
                task
            );
        }
        let imgs = embed_images(&m, &paths, args.batch, args.skip_bad, &device)?;
        let Some(feats) = imgs.embeds else {
            report_skipped(&imgs.skipped);
            bail!("none of the {} images could be read", paths.len());
        };
        let probs = probabilities(clf.as_ref(), &feats)?;
        (imgs.paths, imgs.skipped, probs)
    };
    if kept.is_empty() {
        report_skipped(&skipped);
        bail!("none of the {} images could be read", paths.len());
    }
    let names: Vec<String> = kept.iter().map(|p| p.display().to_string()).collect();
    let table = match task {
        TaskKind::MultiClass => probability_csv(&names, &probs, &card.class_names),
        TaskKind::MultiLabel => {
            eprintln!(
                "multi-label: one independent sigmoid probability per label (rows need not sum \
                 to 1); predicted_labels lists those >= {MULTI_LABEL_THRESHOLD}"
            );
            probability_csv_multilabel(&names, &probs, &card.class_names)
        }
    };
    print!("{table}");
    if let Some(csv) = &args.csv {
        write_file(csv, table.as_bytes())?;
    }
    if !skipped.is_empty() {
        report_skipped(&skipped);
        eprintln!(
            "predicted {} image(s); skipped {} unreadable",
            kept.len(),
            skipped.len()
        );
    }
    Ok(())
}
