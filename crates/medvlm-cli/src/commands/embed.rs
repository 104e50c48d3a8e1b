//! `medvlm embed`: image (and text) embeddings of a model, written as
//! float32 safetensors (`image_embeds` `[N, D]`, `text_embeds` `[T, D]`: the
//! raw projected embeddings, not normalised) with a JSON sidecar listing the
//! image paths (and texts) in row order.
//!
//! Images: PNG/JPEG/TIFF/BMP are decoded and preprocessed exactly like the HF
//! image processors; DICOM, NIfTI and .npy files are read with medvlm-io, the
//! plane windowed (`Window::Auto`: the file's window, else 0.5-99.5
//! percentiles) to `[0, 1]`, grey replicated to RGB, then preprocessed the
//! same way. Preprocessing runs in parallel (rayon), inference in batches.

use std::path::{Path, PathBuf};

use crate::commands::progress::Progress;
use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use medvlm_models::{LoadOptions, LoadedModel};
use serde::Serialize;

/// Arguments of `medvlm embed`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model: a directory, hf:ORG/NAME[@REV] (read offline from the hub cache), or a
    /// preset name (see `medvlm models`).
    #[arg(long)]
    pub model: String,
    /// Images: a directory (searched recursively) or a manifest (.jsonl / .csv).
    #[arg(long)]
    pub images: PathBuf,
    /// Output safetensors file; OUT.json is written beside it.
    #[arg(long)]
    pub out: PathBuf,
    /// Text file with one text per line (blank lines are skipped) to embed as well.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Images per inference batch.
    #[arg(long, default_value_t = 32, value_parser = crate::commands::at_least_one)]
    pub batch: usize,
    /// Skip unreadable images (counted and listed at the end) instead of stopping.
    #[arg(long)]
    pub skip_bad: bool,
    /// Embed only shard I of N (0 <= I < N): item k of the image list (a directory's
    /// files in sorted order, a manifest's rows in order) when k mod N == I. Merge the
    /// shards with `medvlm index build --from-shards DIR`.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<medvlm_retrieval::shards::ShardSpec>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Device selection shared by the model commands.
#[derive(clap::Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Compute device: cpu, or cuda (needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    pub device: String,
}

impl DeviceArgs {
    /// The candle device.
    pub fn device(&self) -> anyhow::Result<Device> {
        match self.device.as_str() {
            "cuda" => Device::new_cuda(0).context(
                "--device cuda: no CUDA device (or medvlm was built without --features cuda)",
            ),
            _ => Ok(Device::Cpu),
        }
    }
}

/// Image file extensions taken from a directory (plus files without an
/// extension, which are often DICOM).
const IMAGE_EXTS: &[&str] = &[
    "png", "jpg", "jpeg", "tif", "tiff", "bmp", "dcm", "dicom", "nii", "gz", "npy",
];

fn ext_of(path: &Path) -> String {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default()
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        let p = e.path();
        let name = e.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        if p.is_dir() {
            walk(&p, out)?;
        } else {
            let ext = ext_of(&p);
            let nii_gz = ext == "gz"
                && name
                    .to_string_lossy()
                    .to_ascii_lowercase()
                    .ends_with(".nii.gz");
            if (ext.is_empty() || IMAGE_EXTS.contains(&ext.as_str())) && (ext != "gz" || nii_gz) {
                out.push(p);
            }
        }
    }
    Ok(())
}

/// The images of a directory (recursive, sorted) or a manifest, in order.
pub fn list_images(images: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if images.is_dir() {
        let mut v = Vec::new();
        walk(images, &mut v)?;
        v.sort();
        if v.is_empty() {
            bail!("no image files in {}", images.display());
        }
        return Ok(v);
    }
    if !images.exists() {
        bail!("--images {}: no such file or directory", images.display());
    }
    let m = medvlm_io::read_manifest(images)
        .with_context(|| format!("reading manifest {}", images.display()))?;
    if m.records.is_empty() {
        bail!("manifest {} has no records", images.display());
    }
    Ok(m.records.iter().map(|r| m.image_path(r)).collect())
}

pub use medvlm_models::embed::{preprocess_file, ImageEmbeddings, Skipped};

/// [`medvlm_models::embed::embed_image_files`] with a progress display and the `--skip-bad`
/// hint.
pub fn embed_images(
    m: &LoadedModel,
    paths: &[PathBuf],
    batch: usize,
    skip_bad: bool,
    device: &Device,
) -> anyhow::Result<ImageEmbeddings> {
    let pb = Progress::new("embedding", paths.len() as u64, "images");
    match medvlm_models::embed::embed_image_files(m, paths, batch, skip_bad, device, &|n| pb.inc(n))
    {
        Ok(v) => {
            pb.finish();
            Ok(v)
        }
        Err(e) => {
            pb.abandon();
            Err(anyhow::Error::new(e)
                .context("reading the images (--skip-bad skips unreadable ones)"))
        }
    }
}

/// Text embeddings `[T, D]` f32 on the CPU.
pub fn embed_texts(
    m: &LoadedModel,
    texts: &[String],
    batch: usize,
    device: &Device,
) -> anyhow::Result<Tensor> {
    medvlm_models::embed::embed_texts(m, texts, batch, device).context("text encoder")
}

/// Report skipped images on stderr.
pub fn report_skipped(skipped: &[Skipped]) {
    if skipped.is_empty() {
        return;
    }
    eprintln!("skipped {} unreadable image(s):", skipped.len());
    for s in skipped {
        eprintln!("  {}: {}", s.path, s.error);
    }
}

/// Load a model, with context for the error message.
pub fn load(spec: &str, device: &Device) -> anyhow::Result<LoadedModel> {
    let opts = LoadOptions {
        device: device.clone(),
        ..LoadOptions::default()
    };
    medvlm_models::load_model(spec, &opts).with_context(|| format!("loading model {spec}"))
}

#[derive(Serialize)]
struct Sidecar<'a> {
    model: &'a str,
    family: String,
    embed_dim: usize,
    /// `medvlm_adapt::features::model_fingerprint`, checked when shards are merged.
    model_fingerprint: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    shard: Option<medvlm_retrieval::shards::ShardSpec>,
    images: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    texts: Option<&'a [String]>,
    skipped: &'a [Skipped],
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = args.device.device()?;
    let texts = match &args.text {
        None => None,
        Some(p) => {
            let t =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let lines: Vec<String> = t
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect();
            if lines.is_empty() {
                bail!("{} has no texts", p.display());
            }
            Some(lines)
        }
    };
    let mut paths = list_images(&args.images)?;
    if let Some(spec) = args.shard {
        let total = paths.len();
        paths = medvlm_retrieval::shards::select(&paths, spec);
        println!("shard {spec}: {} of {total} image(s)", paths.len());
        if paths.is_empty() {
            bail!("shard {spec} of {total} image(s) is empty (fewer images than shards)");
        }
    }
    let m = load(&args.model, &device)?;
    let imgs = embed_images(&m, &paths, args.batch, args.skip_bad, &device)?;
    report_skipped(&imgs.skipped);
    let Some(image_embeds) = imgs.embeds else {
        bail!("none of the {} images could be read", paths.len());
    };
    let mut tensors = std::collections::HashMap::new();
    tensors.insert("image_embeds".to_string(), image_embeds);
    if let Some(t) = &texts {
        tensors.insert(
            "text_embeds".to_string(),
            embed_texts(&m, t, args.batch, &device)?,
        );
    }
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    medvlm_models::weights::save_safetensors_atomic(&args.out, &tensors)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let sidecar = Sidecar {
        model: &args.model,
        family: m.family.to_string(),
        embed_dim: m.model.embed_dim(),
        model_fingerprint: medvlm_adapt::features::model_fingerprint(&args.model, &m),
        shard: args.shard,
        images: imgs.paths.iter().map(|p| p.display().to_string()).collect(),
        texts: texts.as_deref(),
        skipped: &imgs.skipped,
    };
    let json_path = args.out.with_extension("json");
    medvlm_io::atomic::write_atomic(&json_path, &serde_json::to_vec_pretty(&sidecar)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!(
        "wrote {} image embedding(s){} of dimension {} to {} (rows listed in {}){}",
        imgs.paths.len(),
        texts
            .as_ref()
            .map(|t| format!(" and {} text embedding(s)", t.len()))
            .unwrap_or_default(),
        m.model.embed_dim(),
        args.out.display(),
        json_path.display(),
        if imgs.skipped.is_empty() {
            String::new()
        } else {
            format!("; skipped {} unreadable image(s)", imgs.skipped.len())
        }
    );
    Ok(())
}
