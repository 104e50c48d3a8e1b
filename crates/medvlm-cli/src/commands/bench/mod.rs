//! `medvlm bench ...`: benchmarks. Speed and memory are claimed here, never in tests.

pub mod embed;
pub mod fewshot;
pub mod io;
pub mod phantoms;
pub mod retrieval;
pub mod serve;

/// Benchmarks.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: BenchCommand,
}

// Parsed once per run: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(clap::Subcommand, Debug)]
enum BenchCommand {
    /// Image-embedding throughput and peak memory of a full-size architecture (random weights).
    Embed(embed::Args),
    /// Few-shot sweep of adaptation methods over shots and seeds.
    Fewshot(fewshot::Args),
    /// Decode + preprocess throughput of medical files.
    Io(io::Args),
    /// Phantom generation speed.
    Phantoms(phantoms::Args),
    /// Exact vs HNSW search: recall, queries/s, build time, memory (synthetic vectors).
    Retrieval(retrieval::Args),
    /// Loopback load test of `medvlm serve`: requests/s, p50/p99 latency, 429s, peak RSS.
    Serve(serve::Args),
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Embed(a) => embed::run(a),
        BenchCommand::Fewshot(a) => fewshot::run(a),
        BenchCommand::Io(a) => io::run(a),
        BenchCommand::Phantoms(a) => phantoms::run(a),
        BenchCommand::Retrieval(a) => retrieval::run(a),
        BenchCommand::Serve(a) => serve::run(a),
    }
}
