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

use super::embed::{embed_images, list_images, load, report_skipped, DeviceArgs};

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

    let prompt_embeds =
        medvlm_adapt::zero_shot::class_prompt_embeddings(&m, &classes, args.batch, &device)
            .context("text encoder")?;

    let imgs = embed_images(&m, &paths, args.batch, args.skip_bad, &device)?;
    let Some(image_embeds) = imgs.embeds else {
        report_skipped(&imgs.skipped);
        bail!("none of the {} images could be read", paths.len());
    };
    let class_names: Vec<String> = classes.iter().map(|(c, _)| c.clone()).collect();
    let ensemble = match args.ensemble {
        Ensemble::Mean => medvlm_adapt::zero_shot::Ensemble::Mean,
        Ensemble::Mixture => medvlm_adapt::zero_shot::Ensemble::Mixture,
    };
    let probs = medvlm_adapt::zero_shot::zero_shot_probabilities(
        &m,
        &image_embeds,
        &class_names,
        &prompt_embeds,
        ensemble,
    )
    .with_context(|| format!("scoring with {}", args.model))?;

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
