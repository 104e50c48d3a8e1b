//! `medvlm serve`: the model (and adapted artefacts) as an HTTP service; parses the
//! arguments and calls [`medvlm_serve::serve`] (docs/serve.md).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;

use super::embed::DeviceArgs;

/// Arguments of `medvlm serve`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model: a directory, hf:ORG/NAME[@REV], or a preset name (see `medvlm models`).
    #[arg(long)]
    pub model: String,
    /// An artefact folder written by `medvlm adapt`, served under its folder name
    /// (repeatable).
    #[arg(long)]
    pub adapted: Vec<PathBuf>,
    /// A segmenter folder written by `medvlm segment train`, served by /v1/segment under its
    /// folder name (repeatable).
    #[arg(long = "segmenter")]
    pub segmenters: Vec<PathBuf>,
    /// An anomaly detector folder written by `medvlm anomaly fit`, served by /v1/anomaly
    /// under its folder name (repeatable).
    #[arg(long = "detector")]
    pub detectors: Vec<PathBuf>,
    /// A report generator folder written by `medvlm report train`, served by /v1/report under
    /// its folder name (repeatable).
    #[arg(long = "reporter")]
    pub reporters: Vec<PathBuf>,
    /// A box detector folder written by `medvlm detect train`, served by /v1/detect under
    /// its folder name (repeatable).
    #[arg(long = "box-detector")]
    pub box_detectors: Vec<PathBuf>,
    /// An upscaler folder written by `medvlm upscale train`, served by /v1/upscale under its
    /// folder name (repeatable).
    #[arg(long = "upscaler")]
    pub upscalers: Vec<PathBuf>,
    /// A registrar folder written by `medvlm register train`, served by /v1/register under
    /// its folder name (repeatable).
    #[arg(long = "registrar")]
    pub registrars: Vec<PathBuf>,
    /// A VQA answerer folder written by `medvlm vqa train`, served by /v1/answer under its
    /// folder name (repeatable).
    #[arg(long = "answerer")]
    pub answerers: Vec<PathBuf>,
    /// Address to listen on (port 0: any free port; the address is printed on stderr).
    /// A non-loopback address without --api-key-file prints a warning.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// File whose first line is the API key; /v1/* then needs `Authorization: Bearer KEY`.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Most images per forward pass.
    #[arg(long, default_value_t = 16, value_parser = crate::commands::at_least_one)]
    pub max_batch: usize,
    /// Longest wait (ms) for more images after the first of a batch.
    #[arg(long, default_value_t = 10)]
    pub max_wait_ms: u64,
    /// Images that may wait for the model; more are refused with 429.
    #[arg(long, default_value_t = 64, value_parser = crate::commands::at_least_one)]
    pub queue: usize,
    /// Task-head requests (segment, anomaly, detect, report, upscale, register) that may
    /// compute at once (default: the number of CPU threads).
    #[arg(long, value_parser = crate::commands::at_least_one)]
    pub head_workers: Option<usize>,
    /// Task-head requests that may wait for a worker; more are refused with 429.
    #[arg(long, default_value_t = 16)]
    pub head_queue: usize,
    /// Request timeout in seconds (then 504).
    #[arg(long, default_value_t = 30.0)]
    pub timeout_s: f64,
    /// Largest request body in MiB (then 413).
    #[arg(long, default_value_t = 32.0)]
    pub max_body_mb: f64,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = medvlm_serve::ServeConfig {
        model: args.model,
        adapted: args.adapted,
        segmenters: args.segmenters,
        detectors: args.detectors,
        reporters: args.reporters,
        box_detectors: args.box_detectors,
        upscalers: args.upscalers,
        registrars: args.registrars,
        answerers: args.answerers,
        addr: args.addr,
        api_key_file: args.api_key_file,
        max_batch: args.max_batch,
        max_wait_ms: args.max_wait_ms,
        queue: args.queue,
        timeout_s: args.timeout_s,
        max_body_mb: args.max_body_mb,
        head_workers: args
            .head_workers
            .unwrap_or(medvlm_serve::ServeConfig::default().head_workers),
        head_queue: args.head_queue,
        device: args.device.device()?,
    };
    medvlm_serve::serve(config).context("medvlm serve")
}
