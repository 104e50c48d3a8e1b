//! `medvlm search`: the studies of an index (`medvlm index build`) nearest to a text
//! (text tower) or an image (image tower), by cosine similarity; HNSW by default,
//! `--exact` for brute force.

use std::path::PathBuf;

use anyhow::{bail, Context};
use medvlm_retrieval::EmbeddingIndex;

use crate::commands::embed::{self, DeviceArgs};

/// Arguments of `medvlm search`.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("query").required(true).args(["text", "image"])))]
pub struct Args {
    /// Index directory from `medvlm index build`.
    #[arg(long)]
    pub index: PathBuf,
    /// Text query (embedded with the model's text tower).
    #[arg(long)]
    pub text: Option<String>,
    /// Image query (embedded with the model's image tower).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Number of studies to return.
    #[arg(long, default_value_t = 10, value_parser = crate::commands::at_least_one)]
    pub k: usize,
    /// Exact (brute-force) search instead of HNSW.
    #[arg(long)]
    pub exact: bool,
    /// Model for the query (default: the one named in the index card); it must be the
    /// model the index was built with.
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let index = EmbeddingIndex::load(&args.index)
        .with_context(|| format!("loading the index {}", args.index.display()))?;
    let spec = args
        .model
        .clone()
        .unwrap_or_else(|| index.card.model.clone());
    let device = args.device.device()?;
    let m = embed::load(&spec, &device)?;
    let fp = medvlm_adapt::features::model_fingerprint(&spec, &m);
    index.check_model(&args.index, &spec, &fp)?;
    let query = if let Some(text) = &args.text {
        embed::embed_texts(&m, std::slice::from_ref(text), 1, &device)?
    } else {
        let path = args.image.clone().context("--text or --image")?;
        let imgs = embed::embed_images(&m, std::slice::from_ref(&path), 1, false, &device)?;
        match imgs.embeds {
            Some(t) => t,
            None => bail!("{}: the image could not be read", path.display()),
        }
    };
    let q = query.flatten_all()?.to_vec1::<f32>()?;
    if !args.exact && args.k > index.card.ann.ef_search {
        eprintln!(
            "note: HNSW returns at most ef_search = {} hits; use --exact for --k {}",
            index.card.ann.ef_search, args.k
        );
    }
    let hits = if args.exact {
        index.search_exact(&q, args.k)?
    } else {
        index.search_ann(&q, args.k)?
    };
    println!("rank\tscore\tid\tpath");
    for (rank, h) in hits.iter().enumerate() {
        let e = &index.entries[h.row];
        println!("{}\t{:.6}\t{}\t{}", rank + 1, h.score, e.id, e.path);
    }
    Ok(())
}
