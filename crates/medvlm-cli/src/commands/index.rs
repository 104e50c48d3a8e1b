//! `medvlm index build`: an index of study embeddings for `medvlm search`
//! (medvlm_retrieval: exact and HNSW cosine search, docs/retrieval.md), built from
//! `medvlm embed --shard I/N` outputs (`--from-shards DIR`, `--embeddings FILE...`) or
//! by embedding `--images` with `--model` in one go.

use std::path::PathBuf;

use anyhow::{bail, Context};
use medvlm_retrieval::shards;
use medvlm_retrieval::{EmbeddingIndex, Entry, HnswParams};

use crate::commands::embed::{self, DeviceArgs};
use crate::commands::progress::Progress;

/// Arguments of `medvlm index`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: IndexCommand,
}

#[derive(clap::Subcommand, Debug)]
enum IndexCommand {
    /// Build an index directory (embeddings, ids, HNSW graph, card).
    Build(BuildArgs),
}

/// Arguments of `medvlm index build`.
#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    /// Output index directory (written atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Directories holding the shard outputs of `medvlm embed --shard I/N` (every
    /// *.safetensors with a .json sidecar is read; all shards 0..N-1 must be there).
    #[arg(long, num_args = 1.., conflicts_with_all = ["embeddings", "images"])]
    pub from_shards: Vec<PathBuf>,
    /// `medvlm embed` output files to merge.
    #[arg(long, num_args = 1.., conflicts_with = "images")]
    pub embeddings: Vec<PathBuf>,
    /// Embed these images (a directory or a manifest) with --model and index them.
    #[arg(long, requires = "model")]
    pub images: Option<PathBuf>,
    /// Model for --images (a directory, hf:ORG/NAME or a preset).
    #[arg(long)]
    pub model: Option<String>,
    /// HNSW candidate list while building.
    #[arg(long, default_value_t = 100, value_parser = crate::commands::at_least_one)]
    pub ef_construction: usize,
    /// HNSW candidate list while searching (the most hits an ANN query returns).
    #[arg(long, default_value_t = 100, value_parser = crate::commands::at_least_one)]
    pub ef_search: usize,
    /// Seed of the HNSW level assignment.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images per inference batch (--images).
    #[arg(long, default_value_t = 32, value_parser = crate::commands::at_least_one)]
    pub batch: usize,
    /// Skip unreadable images (--images).
    #[arg(long)]
    pub skip_bad: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        IndexCommand::Build(a) => build(a),
    }
}

fn build(args: BuildArgs) -> anyhow::Result<()> {
    let params = HnswParams {
        ef_construction: args.ef_construction,
        ef_search: args.ef_search,
        seed: args.seed,
    };
    let merged = if let Some(images) = &args.images {
        let spec = args.model.as_deref().context("--images needs --model")?;
        let device = args.device.device()?;
        let paths = embed::list_images(images)?;
        let m = embed::load(spec, &device)?;
        let imgs = embed::embed_images(&m, &paths, args.batch, args.skip_bad, &device)?;
        embed::report_skipped(&imgs.skipped);
        let Some(t) = imgs.embeds else {
            bail!("none of the {} images could be read", paths.len());
        };
        let dim = m.model.embed_dim();
        let values = t.flatten_all()?.to_vec1::<f32>()?;
        let entries = imgs
            .paths
            .iter()
            .map(|p| Entry::from_path(p.display().to_string()))
            .collect();
        let (entries, values) = shards::sort_by_id(entries, values, dim);
        shards::Merged {
            model: spec.to_string(),
            model_fingerprint: medvlm_adapt::features::model_fingerprint(spec, &m),
            dim,
            entries,
            values,
        }
    } else {
        let mut files = args.embeddings.clone();
        for dir in &args.from_shards {
            files.extend(shards::list_embeddings(dir)?);
        }
        if files.is_empty() {
            bail!("give --from-shards DIR..., --embeddings FILE... or --images with --model");
        }
        let read = files
            .iter()
            .map(|p| shards::read_embeddings(p))
            .collect::<Result<Vec<_>, _>>()?;
        shards::merge(&read)?
    };
    let count = merged.entries.len();
    let start = std::time::Instant::now();
    let progress = Progress::new("index build: HNSW graph", count as u64, "rows");
    let index = EmbeddingIndex::build_with_progress(
        &merged.model,
        &merged.model_fingerprint,
        merged.entries,
        merged.values,
        merged.dim,
        params,
        &|pos, _| progress.set_position(pos),
    )?;
    progress.finish();
    let build_s = start.elapsed().as_secs_f64();
    index
        .save(&args.out)
        .with_context(|| format!("writing the index {}", args.out.display()))?;
    println!(
        "indexed {count} image(s) of dimension {} (model {}) in {}: HNSW M={} ef_construction={} \
         ef_search={} seed={}, graph built in {build_s:.1} s",
        index.dim(),
        index.card.model,
        args.out.display(),
        index.card.ann.m,
        params.ef_construction,
        params.ef_search,
        params.seed
    );
    Ok(())
}
