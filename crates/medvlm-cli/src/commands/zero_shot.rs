//! `medvlm zero-shot`: classify images by comparing their embeddings with
//! the embeddings of class prompts (Radford et al. 2021). With several prompts
//! per class, `--ensemble mean` (the default, as CLIP) averages the normalised
//! text embeddings; `--ensemble mixture` scores every prompt and averages the
//! probabilities, for prompt sets that differ in content (a lesion's size and
//! location) rather than wording, whose mean embedding is a blurred centre
//! (docs/quickstart.md, "Prompts"). Probabilities: softmax over classes for
//! CLIP-style models; an independent sigmoid per class for SigLIP (its logits
//! include the learned bias).

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{DType, Tensor};
use medvlm_models::vlm::l2_normalize;
use medvlm_models::Family;

use super::embed::{embed_images, embed_texts, list_images, load, report_skipped, DeviceArgs};

/// Arguments of `medvlm zero-shot`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model: a directory, hf:ORG/NAME[@REV], or a preset name (see `medvlm models`).
    #[arg(long)]
    model: String,
    /// Images: a directory (searched recursively) or a manifest (.jsonl / .csv).
    #[arg(long)]
    images: PathBuf,
    /// Class names separated by `;`, each turned into a prompt with --template.
    #[arg(long, conflicts_with = "prompts", required_unless_present = "prompts")]
    classes: Option<String>,
    /// Prompt template for --classes; `{}` is replaced by the class name.
    #[arg(long, default_value = "a photo of {}.")]
    template: String,
    /// JSON prompts: {"class": ["prompt", ...], ...} (classes in name order) or
    /// [{"class": "...", "prompts": ["..."]}, ...] (order kept).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// How the prompts of a class are combined: `mean` averages their normalised embeddings
    /// (CLIP); `mixture` averages their probabilities (softmax models: log of the mean of
    /// exp(logit) over the class's prompts; SigLIP: mean of the prompts' sigmoids).
    #[arg(long, value_enum, default_value_t = Ensemble::Mean)]
    ensemble: Ensemble,
    /// Also write the probabilities to this CSV file.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Images per inference batch.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Skip unreadable images (counted and listed at the end) instead of stopping.
    #[arg(long)]
    skip_bad: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

/// How the prompts of a class are combined.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Ensemble {
    Mean,
    Mixture,
}

#[derive(serde::Deserialize)]
struct ClassPrompts {
    class: String,
    prompts: Vec<String>,
}

fn read_prompts(path: &std::path::Path) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let out: Vec<(String, Vec<String>)> = match v {
        serde_json::Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| {
                let prompts: Vec<String> = match v {
                    serde_json::Value::String(s) => vec![s],
                    other => serde_json::from_value(other).with_context(|| {
                        format!(
                            "{}: prompts of class {k:?} must be a list of strings",
                            path.display()
                        )
                    })?,
                };
                Ok((k, prompts))
            })
            .collect::<anyhow::Result<_>>()?,
        serde_json::Value::Array(_) => {
            let list: Vec<ClassPrompts> = serde_json::from_value(v).with_context(|| {
                format!(
                    "{}: expected [{{\"class\": ..., \"prompts\": [...]}}]",
                    path.display()
                )
            })?;
            list.into_iter().map(|c| (c.class, c.prompts)).collect()
        }
        _ => bail!("{}: expected a JSON object or list", path.display()),
    };
    if out.len() < 2 {
        bail!("{}: need at least two classes", path.display());
    }
    if let Some((c, _)) = out.iter().find(|(_, p)| p.is_empty()) {
        bail!("{}: class {c:?} has no prompts", path.display());
    }
    Ok(out)
}

fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = row.iter().map(|&z| (z - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.iter().map(|e| e / sum).collect()
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = args.device.device()?;
    let classes: Vec<(String, Vec<String>)> = match (&args.classes, &args.prompts) {
        (Some(c), _) => {
            let names = medvlm_adapt::task::parse_class_list(c)?;
            if names.len() < 2 {
                bail!("--classes needs at least two names separated by ';'");
            }
            names
                .into_iter()
                .map(|n| {
                    let p = args.template.replace("{}", &n);
                    (n, vec![p])
                })
                .collect()
        }
        (None, Some(p)) => read_prompts(p)?,
        (None, None) => bail!("give --classes or --prompts"),
    };
    let paths = list_images(&args.images)?;
    let m = load(&args.model, &device)?;

    // Each class's normalised prompt embeddings.
    let mut prompt_embeds = Vec::with_capacity(classes.len());
    for (_, prompts) in &classes {
        let e = l2_normalize(&embed_texts(&m, prompts, args.batch, &device)?)?;
        prompt_embeds.push(
            e.to_device(&candle_core::Device::Cpu)?
                .to_dtype(DType::F32)?,
        );
    }

    let imgs = embed_images(&m, &paths, args.batch, args.skip_bad, &device)?;
    let Some(image_embeds) = imgs.embeds else {
        report_skipped(&imgs.skipped);
        bail!("none of the {} images could be read", paths.len());
    };
    let img = l2_normalize(&image_embeds)?
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(DType::F32)?;
    let first = |t: Tensor| -> anyhow::Result<f32> {
        t.to_device(&candle_core::Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .first()
            .copied()
            .with_context(|| format!("{}: the logit scale or bias is empty", args.model))
    };
    let scale = first(m.model.logit_scale().exp()?)?;
    let bias = m.model.logit_bias().map(first).transpose()?;
    let sigmoid = |z: f32| 1.0 / (1.0 + (-z).exp());
    let probs: Vec<Vec<f32>> = match args.ensemble {
        Ensemble::Mean => {
            // CLIP's ensembling, as the zero-shot-ensemble method does it.
            let txt = medvlm_adapt::method::ClassTexts {
                class_names: classes.iter().map(|(c, _)| c.clone()).collect(),
                prompts: prompt_embeds,
                negative_prompts: None,
            }
            .ensemble_weights()?;
            let logits = (img.matmul(&txt.t()?)? * scale as f64)?;
            let logits = (logits + bias.unwrap_or(0.0) as f64)?;
            logits
                .to_vec2::<f32>()?
                .iter()
                .map(|row| match m.family {
                    Family::Siglip => row.iter().map(|&z| sigmoid(z)).collect(),
                    _ => softmax(row),
                })
                .collect()
        }
        Ensemble::Mixture if m.family == Family::Siglip => {
            // Mean over the class's prompts of each prompt's sigmoid.
            let mut cols = Vec::with_capacity(prompt_embeds.len());
            for pe in &prompt_embeds {
                let z = ((img.matmul(&pe.t()?)? * scale as f64)? + bias.unwrap_or(0.0) as f64)?;
                let p = (z.neg()?.exp()? + 1.0)?.recip()?;
                cols.push(p.mean_keepdim(1)?);
            }
            Tensor::cat(&cols, 1)?.to_vec2::<f32>()?
        }
        Ensemble::Mixture => {
            let scores =
                medvlm_train::pretrain::prompt_mixture_scores(&img, &prompt_embeds, scale as f64)?;
            let scores = match bias {
                Some(b) => (scores + b as f64)?,
                None => scores,
            };
            scores
                .to_vec2::<f32>()?
                .iter()
                .map(|r| softmax(r))
                .collect()
        }
    };

    let mut table = String::new();
    table.push_str("image");
    for (c, _) in &classes {
        table.push(',');
        table.push_str(&csv_field(c));
    }
    table.push_str(",prediction\n");
    for (p, row) in imgs.paths.iter().zip(&probs) {
        table.push_str(&csv_field(&p.display().to_string()));
        let mut best = 0;
        for (i, v) in row.iter().enumerate() {
            table.push_str(&format!(",{v:.6}"));
            if *v > row[best] {
                best = i;
            }
        }
        table.push(',');
        table.push_str(&csv_field(&classes[best].0));
        table.push('\n');
    }
    print!("{table}");
    if let Some(csv) = &args.csv {
        if let Some(dir) = csv.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        medvlm_io::atomic::write_atomic(csv, table.as_bytes())
            .with_context(|| format!("writing {}", csv.display()))?;
    }
    report_skipped(&imgs.skipped);
    Ok(())
}
