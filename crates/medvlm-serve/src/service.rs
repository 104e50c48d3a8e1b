//! The service state ([`Service`]) and its router ([`Service::router`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use candle_core::Device;
use medvlm_adapt::predictor::AdaptedModel;
use medvlm_models::LoadedModel;
use medvlm_tasks::anomaly_pipeline::AnomalyDetector;
use medvlm_tasks::detection_pipeline::Detector;
use medvlm_tasks::registration_pipeline::Registrar;
use medvlm_tasks::report_pipeline::Reporter;
use medvlm_tasks::segmentation_pipeline::Segmenter;
use medvlm_tasks::super_resolution_pipeline::Upscaler;
use medvlm_tasks::vqa_pipeline::Answerer;

use crate::batcher::{BatchConfig, Batcher, Engine};
use crate::error::ApiError;
use crate::head_gate::HeadGate;
use crate::metrics::Metrics;
use crate::{handlers, openapi};

/// Limits and options of a running service.
#[derive(Debug, Clone)]
pub struct ServiceOptions {
    /// `Authorization: Bearer <key>` required on `/v1/*` when set.
    pub api_key: Option<String>,
    /// Batching queue.
    pub batch: BatchConfig,
    /// Longest time a `/v1/*` request may take once its body is read (then 504).
    pub timeout: Duration,
    /// Largest request body in bytes (then 413).
    pub max_body_bytes: usize,
    /// Compute device.
    pub device: Device,
    /// Texts per text-tower batch.
    pub text_batch: usize,
    /// Task-head requests that may compute at once.
    pub head_workers: usize,
    /// Task-head requests that may wait for a worker before 429.
    pub head_queue: usize,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        Self {
            api_key: None,
            batch: BatchConfig {
                max_batch: 16,
                max_wait: Duration::from_millis(10),
                queue: 64,
            },
            timeout: Duration::from_secs(30),
            max_body_bytes: 32 * 1024 * 1024,
            device: Device::Cpu,
            text_batch: 32,
            head_workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            head_queue: 16,
        }
    }
}

/// An adapted artefact served under a name.
pub struct Artefact {
    /// The name clients use (the folder name).
    pub name: String,
    /// The folder it was loaded from.
    pub dir: PathBuf,
    /// The loaded artefact.
    pub model: Arc<AdaptedModel>,
}

/// Task heads served beside the classifier artefacts, each under its folder name.
#[derive(Default)]
pub struct TaskHeads {
    /// Text-guided segmenters (`medvlm segment train`), for `/v1/segment`.
    pub segmenters: Vec<(String, Arc<Segmenter>)>,
    /// Anomaly detectors (`medvlm anomaly fit`), for `/v1/anomaly`.
    pub detectors: Vec<(String, Arc<AnomalyDetector>)>,
    /// Report generators (`medvlm report train`), for `/v1/report`.
    pub reporters: Vec<(String, Arc<Reporter>)>,
    /// Box detectors (`medvlm detect train`), for `/v1/detect`.
    pub box_detectors: Vec<(String, Arc<Detector>)>,
    /// Super-resolution networks (`medvlm upscale train`), for `/v1/upscale`.
    pub upscalers: Vec<(String, Arc<Upscaler>)>,
    /// Registration networks (`medvlm register train`), for `/v1/register`.
    pub registrars: Vec<(String, Arc<Registrar>)>,
    /// VQA answerers (`medvlm vqa train`), for `/v1/answer`.
    pub answerers: Vec<(String, Arc<Answerer>)>,
}

pub(crate) struct Inner {
    pub model_name: String,
    pub heads: TaskHeads,
    pub model: Arc<LoadedModel>,
    pub artefacts: Vec<Artefact>,
    pub batcher: Batcher,
    pub metrics: Arc<Metrics>,
    pub head_gate: HeadGate,
    pub opts: ServiceOptions,
    next_id: AtomicU64,
}

/// The running service: models, queue, metrics. Cheap to clone.
#[derive(Clone)]
pub struct Service {
    pub(crate) inner: Arc<Inner>,
}

impl Service {
    /// A service over a loaded model (served as `model_name`) and adapted artefacts; starts
    /// the batching worker thread.
    pub fn new(
        model_name: impl Into<String>,
        model: LoadedModel,
        artefacts: Vec<(String, PathBuf, AdaptedModel)>,
        opts: ServiceOptions,
    ) -> std::io::Result<Self> {
        Self::with_heads(model_name, model, artefacts, TaskHeads::default(), opts)
    }

    /// [`Self::new`] with task heads (segmenters, anomaly detectors, ...). Their requests run
    /// on a blocking thread each, outside the batching queue (one image per request), bounded
    /// by a [`HeadGate`] of `opts.head_workers` and `opts.head_queue`.
    pub fn with_heads(
        model_name: impl Into<String>,
        model: LoadedModel,
        artefacts: Vec<(String, PathBuf, AdaptedModel)>,
        heads: TaskHeads,
        opts: ServiceOptions,
    ) -> std::io::Result<Self> {
        let model = Arc::new(model);
        let artefacts: Vec<Artefact> = artefacts
            .into_iter()
            .map(|(name, dir, m)| Artefact {
                name,
                dir,
                model: Arc::new(m),
            })
            .collect();
        let metrics = Arc::new(Metrics::default());
        let engine = Arc::new(Engine {
            model: model.clone(),
            adapted: artefacts.iter().map(|a| a.model.clone()).collect(),
            device: opts.device.clone(),
        });
        let batcher = Batcher::start(engine, opts.batch, metrics.clone())?;
        Ok(Self {
            inner: Arc::new(Inner {
                model_name: model_name.into(),
                heads,
                model,
                artefacts,
                batcher,
                metrics,
                head_gate: HeadGate::new(opts.head_workers, opts.head_queue),
                opts,
                next_id: AtomicU64::new(1),
            }),
        })
    }

    /// The batching queue.
    pub fn batcher(&self) -> &Batcher {
        &self.inner.batcher
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The name the base model is served under.
    pub fn model_name(&self) -> &str {
        &self.inner.model_name
    }

    /// The served artefacts.
    pub fn artefacts(&self) -> &[Artefact] {
        &self.inner.artefacts
    }

    /// The HTTP router: every route of [`routes`], the API key check on `/v1/*`, the access
    /// log and metrics on all.
    pub fn router(&self) -> Router {
        let mut v1 = Router::new();
        let mut open = Router::new();
        for r in routes() {
            if r.path.starts_with("/v1/") {
                v1 = v1.route(r.path, r.handler);
            } else {
                open = open.route(r.path, r.handler);
            }
        }
        let v1 = v1.route_layer(axum::middleware::from_fn_with_state(self.clone(), auth));
        v1.merge(open)
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(DefaultBodyLimit::max(self.inner.opts.max_body_bytes))
            .layer(axum::middleware::from_fn_with_state(self.clone(), observe))
            .with_state(self.clone())
    }
}

/// One route of the API.
pub struct RouteSpec {
    /// The path.
    pub path: &'static str,
    /// The method.
    pub method: Method,
    /// The handler.
    pub handler: MethodRouter<Service>,
}

/// Every route the router serves; the router is built from this list only, and the
/// OpenAPI document is checked against it.
pub fn routes() -> Vec<RouteSpec> {
    let r = |path, method, handler| RouteSpec {
        path,
        method,
        handler,
    };
    vec![
        r("/", Method::GET, get(handlers::index)),
        r("/models", Method::GET, get(handlers::models_page)),
        r("/papers", Method::GET, get(handlers::papers_page)),
        r("/healthz", Method::GET, get(handlers::healthz)),
        r("/readyz", Method::GET, get(handlers::readyz)),
        r("/metrics", Method::GET, get(handlers::metrics)),
        r("/openapi.json", Method::GET, get(openapi::openapi_json)),
        r("/v1/models", Method::GET, get(handlers::models)),
        r("/v1/embeddings", Method::POST, post(handlers::embeddings)),
        r("/v1/zero-shot", Method::POST, post(handlers::zero_shot)),
        r("/v1/predict", Method::POST, post(handlers::predict)),
        r("/v1/preview", Method::POST, post(handlers::preview)),
        r("/v1/segment", Method::POST, post(handlers::segment)),
        r("/v1/anomaly", Method::POST, post(handlers::anomaly)),
        r("/v1/report", Method::POST, post(handlers::report)),
        r("/v1/detect", Method::POST, post(handlers::detect)),
        r("/v1/upscale", Method::POST, post(handlers::upscale)),
        r("/v1/register", Method::POST, post(handlers::register)),
        r("/v1/answer", Method::POST, post(handlers::answer_question)),
        r("/v1/papers", Method::GET, get(handlers::papers)),
    ]
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; see /openapi.json")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method; see /openapi.json",
    )
}

/// Equal-time comparison of two byte strings (the key's length is not secret).
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(svc): State<Service>, req: Request, next: Next) -> Response {
    let Some(key) = &svc.inner.opts.api_key else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            // The scheme is case-insensitive (RFC 9110, 11.1).
            let (scheme, rest) = v.split_at_checked(7)?;
            scheme.eq_ignore_ascii_case("bearer ").then_some(rest)
        })
        .map(str::trim);
    match given {
        Some(g) if same_bytes(g.as_bytes(), key.as_bytes()) => next.run(req).await,
        Some(_) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the API key is not valid",
        )
        .into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this route needs the header `Authorization: Bearer <API key>`",
        )
        .into_response(),
    }
}

/// Access log and metrics: request id, method, route (the pattern, never the query), status,
/// latency and sizes. Nothing from the body or the headers is logged.
async fn observe(State(svc): State<Service>, req: Request, next: Next) -> Response {
    let id = svc.inner.next_id.fetch_add(1, Ordering::Relaxed);
    let start = Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let request_bytes = content_length(req.headers());
    let mut resp = next.run(req).await;
    let status = resp.status().as_u16();
    let seconds = start.elapsed().as_secs_f64();
    svc.inner.metrics.record_request(&route, status, seconds);
    let response_bytes = axum::body::HttpBody::size_hint(resp.body())
        .exact()
        .unwrap_or(0);
    let error_code = resp
        .extensions()
        .get::<crate::error::ErrorCode>()
        .map(|c| c.0)
        .unwrap_or("-");
    tracing::info!(
        target: "medvlm_serve::access",
        request_id = id,
        method = %method,
        route = %route,
        status,
        error_code,
        latency_ms = (seconds * 1000.0 * 1000.0).round() / 1000.0,
        request_bytes,
        response_bytes,
        "request"
    );
    if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

fn content_length(h: &axum::http::HeaderMap) -> u64 {
    h.get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
