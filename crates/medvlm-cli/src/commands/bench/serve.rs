//! `medvlm bench serve`: a loopback load test of `medvlm serve` (`medvlm_serve::load_test`).
//! The service is started in this process on an ephemeral 127.0.0.1 port with the given
//! model (and adapted artefact); for each route and each number of concurrent clients, the
//! same request (one image, as base64 JSON) is sent `--requests` times over keep-alive
//! connections. Printed: requests answered 200 / 429 / otherwise, successful requests per
//! second, p50/p99/max latency, and the process's peak RSS (server and client together).

use std::path::PathBuf;

use base64::Engine as _;
use medvlm_serve::load_test::{render_table, run_levels, LoadSpec};
use serde_json::json;

use crate::commands::bench::embed::proc_status_kib;

/// Arguments of `medvlm bench serve`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model: a directory, hf:ORG/NAME or a preset (as `medvlm serve --model`).
    #[arg(long)]
    pub model: String,
    /// An adapted artefact folder: `/v1/predict` is measured too.
    #[arg(long)]
    pub adapted: Option<PathBuf>,
    /// The image every request sends (PNG/JPEG/TIFF/DICOM/NIfTI).
    #[arg(long)]
    pub image: PathBuf,
    /// Concurrent clients per level, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    pub clients: Vec<usize>,
    /// Requests per level.
    #[arg(long, default_value_t = 200, value_parser = crate::commands::at_least_one)]
    pub requests: usize,
    /// The service's `--max-batch`.
    #[arg(long, default_value_t = 16, value_parser = crate::commands::at_least_one)]
    pub max_batch: usize,
    /// The service's `--max-wait-ms`.
    #[arg(long, default_value_t = 10)]
    pub max_wait_ms: u64,
    /// The service's `--queue` (images waiting before 429).
    #[arg(long, default_value_t = 64, value_parser = crate::commands::at_least_one)]
    pub queue: usize,
    /// The service's `--timeout-s`.
    #[arg(long, default_value_t = 30.0)]
    pub timeout_s: f64,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.clients.contains(&0) {
        anyhow::bail!("--clients: every level needs at least one client");
    }
    let bytes = std::fs::read(&a.image)
        .map_err(|e| anyhow::anyhow!("{}: cannot read the image: {e}", a.image.display()))?;
    let image = base64::engine::general_purpose::STANDARD.encode(bytes);
    let config = medvlm_serve::ServeConfig {
        model: a.model.clone(),
        adapted: a.adapted.iter().cloned().collect(),
        max_batch: a.max_batch,
        max_wait_ms: a.max_wait_ms,
        queue: a.queue,
        timeout_s: a.timeout_s,
        ..Default::default()
    };
    let service = config.load()?;
    let rss_loaded = proc_status_kib("VmRSS");
    let mut routes = vec![(
        "/v1/embeddings",
        json!({"input": [{"image": image}]}).to_string(),
    )];
    if let Some(dir) = &a.adapted {
        let name = dir
            .components()
            .next_back()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .unwrap_or_default();
        routes.push((
            "/v1/predict",
            json!({"artefact": name, "image": image}).to_string(),
        ));
    }
    let levels: Vec<LoadSpec> = routes
        .iter()
        .flat_map(|(route, body)| {
            a.clients.iter().map(|&clients| LoadSpec {
                route: route.to_string(),
                body: body.clone().into_bytes(),
                clients,
                requests: a.requests,
                api_key: None,
            })
        })
        .collect();
    println!(
        "medvlm serve on 127.0.0.1 (in process): model {}, max batch {}, max wait {} ms, queue {}; {} requests per level; {} threads",
        a.model,
        a.max_batch,
        a.max_wait_ms,
        a.queue,
        a.requests,
        rayon::current_num_threads()
    );
    let results = run_levels(service, &levels)?;
    print!("{}", render_table(&results));
    let peak = proc_status_kib("VmHWM");
    let mib = |k: Option<u64>| {
        k.map_or("unknown".to_string(), |k| {
            format!("{:.0} MiB", k as f64 / 1024.0)
        })
    };
    println!(
        "peak RSS (VmHWM, server and client) {}; RSS after loading the model {}",
        mib(peak),
        mib(rss_loaded)
    );
    if let Some(path) = &a.json {
        let v = json!({
            "model": a.model,
            "adapted": a.adapted,
            "max_batch": a.max_batch,
            "max_wait_ms": a.max_wait_ms,
            "queue": a.queue,
            "levels": results,
            "peak_rss_mib": peak.map(|k| k as f64 / 1024.0),
        });
        medvlm_io::atomic::write_atomic(path, serde_json::to_string_pretty(&v)?.as_bytes())
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    Ok(())
}
