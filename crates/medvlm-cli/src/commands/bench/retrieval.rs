//! `medvlm bench retrieval`: exact vs HNSW search of medvlm_retrieval on synthetic
//! clustered unit vectors (`medvlm_retrieval::synthetic::clustered`, default dimension
//! 512, 100 clusters, spread 1.0). For each size: graph build time, recall@1 and
//! recall@10 of HNSW against exact search, queries per second of both (queries run in
//! parallel on the rayon pool), embedding bytes, and the process's peak RSS so far
//! (`VmHWM` of /proc/self/status; it only grows, so later sizes include earlier ones).

use std::time::Instant;

use medvlm_retrieval::synthetic::clustered;
use medvlm_retrieval::{recall_at_k, EmbeddingIndex, Entry, HnswParams};

use crate::commands::bench::embed::proc_status_kib;
use crate::commands::progress::Progress;

/// Arguments of `medvlm bench retrieval`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Index sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    pub sizes: Vec<usize>,
    /// Vector dimension.
    #[arg(long, default_value_t = 512)]
    pub dim: usize,
    /// Clusters of the synthetic vectors.
    #[arg(long, default_value_t = 100)]
    pub clusters: usize,
    /// Noise of a vector around its cluster centre (norm of the noise, before normalising).
    #[arg(long, default_value_t = 1.0)]
    pub spread: f32,
    /// Queries per size (drawn from the same clusters, not in the index).
    #[arg(long, default_value_t = 1000)]
    pub queries: usize,
    /// HNSW ef_construction.
    #[arg(long, default_value_t = 100)]
    pub ef_construction: usize,
    /// HNSW ef_search.
    #[arg(long, default_value_t = 100)]
    pub ef_search: usize,
    /// Seed of the vectors and of the graph.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    println!(
        "dim {} clusters {} spread {} queries {} HNSW M=32 ef_construction={} ef_search={} threads {}",
        args.dim,
        args.clusters,
        args.spread,
        args.queries,
        args.ef_construction,
        args.ef_search,
        rayon::current_num_threads()
    );
    println!("| vectors | build s | recall@1 | recall@10 | exact q/s | HNSW q/s | embeddings MiB | peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|");
    for &n in &args.sizes {
        let base = clustered(n, args.dim, args.clusters, args.spread, args.seed, 0);
        let queries = clustered(
            args.queries,
            args.dim,
            args.clusters,
            args.spread,
            args.seed,
            1,
        );
        let entries = (0..n).map(|i| Entry::from_path(format!("v{i}"))).collect();
        let t = Instant::now();
        let progress = Progress::new(
            &format!("bench retrieval: HNSW graph of {n}"),
            n as u64,
            "rows",
        );
        let index = EmbeddingIndex::build_with_progress(
            "synthetic",
            "synthetic",
            entries,
            base,
            args.dim,
            HnswParams {
                ef_construction: args.ef_construction,
                ef_search: args.ef_search,
                seed: args.seed,
            },
            &|pos, _| progress.set_position(pos),
        )?;
        progress.finish();
        let build_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let exact = index.search_exact_batch(&queries, 10)?;
        let exact_qps = args.queries as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        let ann = index.search_ann_batch(&queries, 10)?;
        let ann_qps = args.queries as f64 / t.elapsed().as_secs_f64();
        let peak = proc_status_kib("VmHWM")
            .map(|k| format!("{:.0}", k as f64 / 1024.0))
            .unwrap_or_else(|| "n/a".into());
        println!(
            "| {n} | {build_s:.1} | {:.3} | {:.3} | {exact_qps:.0} | {ann_qps:.0} | {:.0} | {peak} |",
            recall_at_k(&exact, &ann, 1),
            recall_at_k(&exact, &ann, 10),
            index.embedding_bytes() as f64 / (1 << 20) as f64,
        );
    }
    Ok(())
}
