//! `medvlm serve`: a loaded vision-language model (and any adapted artefacts made by
//! `medvlm adapt`) as an HTTP service next to PACS.
//!
//! Routes (documented in `docs/serve.md`, described by the OpenAPI 3 document at
//! `/openapi.json`): `POST /v1/embeddings` (OpenAI-style, texts and images), `POST
//! /v1/zero-shot` (labels with a template, or prompts), `POST /v1/predict` (an adapted
//! artefact, with its conformal set when the card allows one), `GET /v1/models`, `/healthz`,
//! `/readyz`, `/metrics` (Prometheus) and a web page at `/`.
//!
//! Images (DICOM, NIfTI, PNG/JPEG/TIFF, as base64 in JSON or as multipart uploads) are
//! decoded with the CLI's code paths ([`decode`]) and go to the model through one bounded
//! batching queue ([`batcher`]): one worker thread gathers up to `max_batch` images or waits
//! `max_wait`, runs one forward pass and answers each request; a full queue is a 429. Every
//! error is JSON `{"error": {"code": ..., "message": ...}}`; the access log holds the request
//! id, route, status, latency and sizes only, never image contents, DICOM tags or the key.
//!
//! The service is built on the libraries: the router can be made and called in-process.
//!
//! ```
//! use medvlm_serve::{Service, ServiceOptions};
//! use tower::ServiceExt as _;
//!
//! let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../medvlm-models/tests/fixtures/clip");
//! let model = medvlm_models::load_model(fixture, &Default::default()).unwrap();
//! let service = Service::new("tiny-clip", model, vec![], ServiceOptions::default()).unwrap();
//! let rt = tokio::runtime::Runtime::new().unwrap();
//! let resp = rt.block_on(
//!     service.router().oneshot(
//!         axum::http::Request::get("/v1/models").body(axum::body::Body::empty()).unwrap(),
//!     ),
//! ).unwrap();
//! assert_eq!(resp.status(), 200);
//! ```

pub mod batcher;
pub mod decode;
pub mod error;
mod handlers;
pub mod head_gate;
pub mod load_test;
pub mod metrics;
pub mod openapi;
pub mod service;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::Device;
use medvlm_adapt::predictor::AdaptedModel;
use medvlm_models::LoadOptions;

pub use batcher::{BatchConfig, Batcher};
pub use error::{ApiError, ServeError};
pub use service::{routes, Service, ServiceOptions, TaskHeads};

/// Everything `medvlm serve` is started with.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Model spec: a directory, `hf:ORG/NAME`, or a preset.
    pub model: String,
    /// Adapted artefact folders, each served under its folder name.
    pub adapted: Vec<PathBuf>,
    /// Segmenter folders (`medvlm segment train`), served by `/v1/segment` under their names.
    pub segmenters: Vec<PathBuf>,
    /// Anomaly detector folders (`medvlm anomaly fit`), served by `/v1/anomaly`.
    pub detectors: Vec<PathBuf>,
    /// Report generator folders (`medvlm report train`), served by `/v1/report`.
    pub reporters: Vec<PathBuf>,
    /// Box detector folders (`medvlm detect train`), served by `/v1/detect`.
    pub box_detectors: Vec<PathBuf>,
    /// Upscaler folders (`medvlm upscale train`), served by `/v1/upscale`.
    pub upscalers: Vec<PathBuf>,
    /// Registrar folders (`medvlm register train`), served by `/v1/register`.
    pub registrars: Vec<PathBuf>,
    /// VQA answerer folders (`medvlm vqa train`), served by `/v1/answer`.
    pub answerers: Vec<PathBuf>,
    /// Address to bind (port 0: any free port; the bound address is printed on stderr).
    pub addr: SocketAddr,
    /// File holding the API key (first line); `/v1/*` then needs `Authorization: Bearer`.
    pub api_key_file: Option<PathBuf>,
    /// Most images per forward pass.
    pub max_batch: usize,
    /// Longest wait, in milliseconds, for more images after the first of a batch.
    pub max_wait_ms: u64,
    /// Queue slots (images waiting for the model) before 429.
    pub queue: usize,
    /// Request timeout in seconds (then 504).
    pub timeout_s: f64,
    /// Largest request body in MiB (then 413).
    pub max_body_mb: f64,
    /// Task-head requests that may compute at once.
    pub head_workers: usize,
    /// Task-head requests that may wait for a worker before 429.
    pub head_queue: usize,
    /// Compute device.
    pub device: Device,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            model: String::new(),
            adapted: vec![],
            segmenters: vec![],
            detectors: vec![],
            reporters: vec![],
            box_detectors: vec![],
            upscalers: vec![],
            registrars: vec![],
            answerers: vec![],
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_key_file: None,
            max_batch: 16,
            max_wait_ms: 10,
            queue: 64,
            timeout_s: 30.0,
            max_body_mb: 32.0,
            head_workers: ServiceOptions::default().head_workers,
            head_queue: 16,
            device: Device::Cpu,
        }
    }
}

/// Reads an API key file: its first line, trimmed; an empty key is an error.
pub fn read_api_key(path: &Path) -> Result<String, ServeError> {
    let err = |reason: String| ServeError::ApiKey {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let key = text.lines().next().unwrap_or("").trim().to_string();
    if key.is_empty() {
        return Err(err(
            "the file is empty; write the key on its first line".into()
        ));
    }
    Ok(key)
}

impl ServeConfig {
    /// The service options these settings give (reads the API key file).
    pub fn options(&self) -> Result<ServiceOptions, ServeError> {
        let limit = |option, reason: &str| ServeError::Limit {
            option,
            reason: reason.into(),
        };
        if self.max_batch == 0 {
            return Err(limit("--max-batch", "must be at least 1"));
        }
        if self.queue == 0 {
            return Err(limit("--queue", "must be at least 1"));
        }
        if self.head_workers == 0 {
            return Err(limit("--head-workers", "must be at least 1"));
        }
        if !(self.timeout_s.is_finite() && self.timeout_s > 0.0) {
            return Err(limit("--timeout-s", "must be a positive number of seconds"));
        }
        if !(self.max_body_mb.is_finite() && self.max_body_mb > 0.0 && self.max_body_mb <= 4096.0) {
            return Err(limit("--max-body-mb", "must be in (0, 4096]"));
        }
        Ok(ServiceOptions {
            api_key: self.api_key_file.as_deref().map(read_api_key).transpose()?,
            batch: BatchConfig {
                max_batch: self.max_batch,
                max_wait: Duration::from_millis(self.max_wait_ms),
                queue: self.queue,
            },
            timeout: Duration::from_secs_f64(self.timeout_s),
            max_body_bytes: (self.max_body_mb * 1024.0 * 1024.0) as usize,
            device: self.device.clone(),
            text_batch: 32,
            head_workers: self.head_workers,
            head_queue: self.head_queue,
        })
    }

    /// Loads the model and the artefacts and starts the batching worker.
    pub fn load(&self) -> Result<Service, ServeError> {
        let opts = self.options()?;
        let load_opts = LoadOptions {
            device: self.device.clone(),
            ..LoadOptions::default()
        };
        let model = medvlm_models::load_model(&self.model, &load_opts).map_err(|source| {
            ServeError::Model {
                spec: self.model.clone(),
                source,
            }
        })?;
        let mut artefacts: Vec<(String, PathBuf, AdaptedModel)> = Vec::new();
        for dir in &self.adapted {
            let name = dir
                .components()
                .next_back()
                .and_then(|c| c.as_os_str().to_str())
                .filter(|n| !n.is_empty() && *n != "." && *n != "..")
                .ok_or_else(|| ServeError::NoName(dir.clone()))?
                .to_string();
            if let Some((_, first, _)) = artefacts.iter().find(|(n, _, _)| *n == name) {
                return Err(ServeError::DuplicateName {
                    name,
                    first: first.clone(),
                    second: dir.clone(),
                });
            }
            let a =
                AdaptedModel::load(dir, None, &self.device).map_err(|e| ServeError::Artefact {
                    dir: dir.clone(),
                    source: Box::new(e),
                })?;
            artefacts.push((name, dir.clone(), a));
        }
        let mut heads = crate::service::TaskHeads::default();
        for dir in &self.segmenters {
            let name = folder_name(dir)?;
            let (seg, warning) =
                medvlm_tasks::segmentation_pipeline::Segmenter::load(dir, None, &self.device)
                    .map_err(|e| ServeError::Head {
                        dir: dir.clone(),
                        reason: e.to_string(),
                    })?;
            if let Some(w) = warning {
                eprintln!("warning: {w}");
            }
            heads.segmenters.push((name, std::sync::Arc::new(seg)));
        }
        for dir in &self.detectors {
            let name = folder_name(dir)?;
            let det =
                medvlm_tasks::anomaly_pipeline::AnomalyDetector::load(dir, None, &self.device)
                    .map_err(|e| ServeError::Head {
                        dir: dir.clone(),
                        reason: e.to_string(),
                    })?;
            heads.detectors.push((name, std::sync::Arc::new(det)));
        }
        for dir in &self.reporters {
            let name = folder_name(dir)?;
            let (rep, warning) = medvlm_tasks::report_pipeline::Reporter::load(dir, &self.device)
                .map_err(|e| ServeError::Head {
                dir: dir.clone(),
                reason: e.to_string(),
            })?;
            if let Some(w) = warning {
                eprintln!("warning: {w}");
            }
            heads.reporters.push((name, std::sync::Arc::new(rep)));
        }
        for dir in &self.box_detectors {
            let name = folder_name(dir)?;
            let (det, warning) =
                medvlm_tasks::detection_pipeline::Detector::load(dir, None, &self.device).map_err(
                    |e| ServeError::Head {
                        dir: dir.clone(),
                        reason: e.to_string(),
                    },
                )?;
            if let Some(w) = warning {
                eprintln!("warning: {w}");
            }
            heads.box_detectors.push((name, std::sync::Arc::new(det)));
        }
        for dir in &self.upscalers {
            let name = folder_name(dir)?;
            let up = medvlm_tasks::super_resolution_pipeline::Upscaler::load(dir, &self.device)
                .map_err(|e| ServeError::Head {
                    dir: dir.clone(),
                    reason: e.to_string(),
                })?;
            heads.upscalers.push((name, std::sync::Arc::new(up)));
        }
        for dir in &self.registrars {
            let name = folder_name(dir)?;
            let reg = medvlm_tasks::registration_pipeline::Registrar::load(dir, &self.device)
                .map_err(|e| ServeError::Head {
                    dir: dir.clone(),
                    reason: e.to_string(),
                })?;
            heads.registrars.push((name, std::sync::Arc::new(reg)));
        }
        for dir in &self.answerers {
            let name = folder_name(dir)?;
            let (ans, warning) = medvlm_tasks::vqa_pipeline::Answerer::load(dir, &self.device)
                .map_err(|e| ServeError::Head {
                    dir: dir.clone(),
                    reason: e.to_string(),
                })?;
            if let Some(w) = warning {
                eprintln!("warning: {w}");
            }
            heads.answerers.push((name, std::sync::Arc::new(ans)));
        }
        Service::with_heads(self.model.clone(), model, artefacts, heads, opts)
            .map_err(ServeError::Runtime)
    }
}

fn folder_name(dir: &Path) -> Result<String, ServeError> {
    dir.components()
        .next_back()
        .and_then(|c| c.as_os_str().to_str())
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .map(str::to_string)
        .ok_or_else(|| ServeError::NoName(dir.to_path_buf()))
}

/// Serves `service` on `listener` until `shutdown` completes, then stops accepting
/// connections and finishes the requests in flight.
pub async fn run(
    listener: tokio::net::TcpListener,
    service: Service,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    axum::serve(listener, service.router())
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| ServeError::Net {
            what: "serving on",
            addr,
            source,
        })
}

/// Completes on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// The warning printed when the service listens beyond loopback without an API key.
pub fn exposure_warning(addr: SocketAddr, has_api_key: bool) -> Option<String> {
    (!addr.ip().is_loopback() && !has_api_key).then(|| {
        format!(
            "warning: serving on {addr} (not loopback) without an API key: anyone who can \
             reach this address can use the model; pass --api-key-file"
        )
    })
}

/// `medvlm serve`: loads the model and artefacts, binds `config.addr` (printing
/// `listening on http://ADDR` on stderr, and a warning when a non-loopback address has no
/// API key), and serves until SIGINT/SIGTERM, finishing the requests in flight.
pub fn serve(config: ServeConfig) -> Result<(), ServeError> {
    let service = config.load()?;
    if let Some(w) = exposure_warning(config.addr, config.api_key_file.is_some()) {
        eprintln!("{w}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("medvlm-serve-http")
        .build()
        .map_err(ServeError::Runtime)?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .map_err(|source| ServeError::Net {
                what: "binding",
                addr: config.addr.to_string(),
                source,
            })?;
        let local = listener.local_addr().map_err(|source| ServeError::Net {
            what: "binding",
            addr: config.addr.to_string(),
            source,
        })?;
        eprintln!(
            "medvlm serve: {} ({} adapted artefact(s)) listening on http://{local}",
            service.model_name(),
            service.artefacts().len()
        );
        run(listener, service, shutdown_signal()).await?;
        eprintln!("medvlm serve: stopped");
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_non_loopback_address_without_a_key_is_warned_about() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(exposure_warning(a("0.0.0.0:8080"), false)
            .unwrap()
            .contains("without an API key"));
        assert!(exposure_warning(a("10.1.2.3:80"), false).is_some());
        assert!(exposure_warning(a("0.0.0.0:8080"), true).is_none());
        assert!(exposure_warning(a("127.0.0.1:8080"), false).is_none());
        assert!(exposure_warning(a("[::1]:8080"), false).is_none());
    }

    #[test]
    fn limits_out_of_range_and_empty_key_files_are_refused() {
        let bad = |c: ServeConfig| c.options().unwrap_err().to_string();
        assert!(bad(ServeConfig {
            max_batch: 0,
            ..Default::default()
        })
        .contains("--max-batch"));
        assert!(bad(ServeConfig {
            queue: 0,
            ..Default::default()
        })
        .contains("--queue"));
        assert!(bad(ServeConfig {
            timeout_s: 0.0,
            ..Default::default()
        })
        .contains("--timeout-s"));
        assert!(bad(ServeConfig {
            max_body_mb: -1.0,
            ..Default::default()
        })
        .contains("--max-body-mb"));
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("key");
        std::fs::write(&f, "\n").unwrap();
        let e = bad(ServeConfig {
            api_key_file: Some(f.clone()),
            ..Default::default()
        });
        assert!(e.contains("empty") && e.contains("key"), "{e}");
        std::fs::write(&f, "  abc  \nsecond line\n").unwrap();
        assert_eq!(read_api_key(&f).unwrap(), "abc");
    }
}
