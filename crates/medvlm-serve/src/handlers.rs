//! The route handlers. Every `/v1/*` handler reads the body itself (so that an oversized body
//! is a JSON 413 and a wrong content type a JSON 415), answers within the request timeout
//! (504 otherwise), and sends images to the model only through the batching queue.

use std::future::Future;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use candle_core::Tensor;
use http_body_util::BodyExt;
use medvlm_adapt::fewshot::TaskKind;
use medvlm_adapt::zero_shot::Ensemble;
use medvlm_io::Window;
use medvlm_models::{Family, PreprocessConfig};
use serde_json::{json, Map, Value};

use crate::batcher::{SubmitError, Target};
use crate::decode::{decode_upload, preview_png, DecodeError};
use crate::error::ApiError;
use crate::service::Service;

// ---------------------------------------------------------------- request bodies

/// A part of a multipart form.
struct FormPart {
    name: String,
    file_name: Option<String>,
    data: Bytes,
}

impl FormPart {
    fn text(&self) -> Result<String, ApiError> {
        String::from_utf8(self.data.to_vec()).map_err(|_| {
            ApiError::bad_request(
                "bad_multipart",
                format!("form field {:?} is not UTF-8 text", self.name),
            )
        })
    }
}

/// A request body: JSON or a multipart form.
enum Payload {
    Json(Value),
    Form(Vec<FormPart>),
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("the request body is larger than the limit of {limit} bytes (--max-body-mb)"),
    )
}

async fn read_payload(svc: &Service, req: Request) -> Result<Payload, ApiError> {
    let limit = svc.inner.opts.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let essence = ct.split(';').next().unwrap_or("").trim().to_string();
    let is_json = essence == "application/json" || essence.ends_with("+json");
    let is_form = essence == "multipart/form-data";
    if !is_json && !is_form {
        return Err(ApiError::unsupported(format!(
            "send application/json or multipart/form-data (Content-Type was {:?})",
            if essence.is_empty() {
                "absent"
            } else {
                &essence
            }
        )));
    }
    let (parts, body) = req.into_parts();
    let bytes = http_body_util::Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                too_large(limit)
            } else {
                ApiError::bad_request("bad_body", "the request body could not be read")
            }
        })?
        .to_bytes();
    if is_json {
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::bad_request("bad_json", format!("the body is not valid JSON: {e}"))
        })?;
        return Ok(Payload::Json(v));
    }
    let req = Request::from_parts(parts, Body::from(bytes));
    let mut form = Multipart::from_request(req, &()).await.map_err(|e| {
        ApiError::bad_request("bad_multipart", format!("malformed multipart form: {e}"))
    })?;
    let mut out = Vec::new();
    loop {
        let field = form.next_field().await.map_err(|e| {
            ApiError::bad_request("bad_multipart", format!("malformed multipart form: {e}"))
        })?;
        let Some(field) = field else { break };
        let name = field.name().unwrap_or("").to_string();
        let file_name = field.file_name().map(str::to_string);
        let data = field.bytes().await.map_err(|e| {
            ApiError::bad_request("bad_multipart", format!("malformed multipart form: {e}"))
        })?;
        out.push(FormPart {
            name,
            file_name,
            data,
        });
    }
    Ok(Payload::Form(out))
}

fn object(v: Value) -> Result<Map<String, Value>, ApiError> {
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::unprocessable("the body must be a JSON object")),
    }
}

fn reject_unknown(m: &Map<String, Value>, allowed: &[&str]) -> Result<(), ApiError> {
    match m.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::unprocessable(format!(
            "unknown field {k:?} (this route takes {allowed:?})"
        ))),
        None => Ok(()),
    }
}

fn opt_str(m: &Map<String, Value>, key: &str) -> Result<Option<String>, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::unprocessable(format!(
            "field {key:?} must be a string"
        ))),
    }
}

/// Base64 (standard alphabet, padding optional, whitespace ignored, an optional `data:...,`
/// prefix) to bytes.
fn base64_image(s: &str, what: &str) -> Result<Bytes, ApiError> {
    let s = match s.strip_prefix("data:") {
        Some(rest) => rest.split_once(',').map(|(_, d)| d).unwrap_or(""),
        None => s,
    };
    let clean: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let eng = base64::engine::general_purpose::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    eng.decode(clean.as_bytes()).map(Bytes::from).map_err(|e| {
        ApiError::bad_request("bad_base64", format!("{what} is not valid base64: {e}"))
    })
}

fn parse_window(s: Option<String>) -> Result<Option<Window>, ApiError> {
    s.map(|w| {
        w.parse::<Window>()
            .map_err(|e| ApiError::unprocessable(format!("field \"window\": {e}")))
    })
    .transpose()
}

fn parse_ensemble(s: Option<String>) -> Result<Ensemble, ApiError> {
    match s.as_deref() {
        None | Some("mean") => Ok(Ensemble::Mean),
        Some("mixture") => Ok(Ensemble::Mixture),
        Some(other) => Err(ApiError::unprocessable(format!(
            "field \"ensemble\" must be \"mean\" or \"mixture\", not {other:?}"
        ))),
    }
}

fn is_file_part(p: &FormPart) -> bool {
    p.file_name.is_some() || matches!(p.name.as_str(), "image" | "file")
}

// ---------------------------------------------------------------- model calls

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| ApiError::internal("a worker task failed"))?
}

async fn preprocess(
    cfg: PreprocessConfig,
    bytes: Bytes,
    window: Option<Window>,
) -> Result<Vec<f32>, ApiError> {
    blocking(move || decode_upload(&bytes, &cfg, window.as_ref()).map_err(decode_error)).await
}

type Pending = tokio::sync::oneshot::Receiver<crate::batcher::JobResult>;

fn submit(svc: &Service, target: Target, pixels: Vec<f32>) -> Result<Pending, ApiError> {
    svc.batcher().submit(target, pixels).map_err(|e| match e {
        SubmitError::Full => {
            svc.inner.metrics.record_rejected();
            ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "queue_full",
                    format!(
                        "the model queue is full ({} images waiting); retry later",
                        svc.batcher().capacity()
                    ),
                )
            }
        }
        SubmitError::Closed => ApiError {
            retry_after: Some(5),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "worker_stopped",
                "the model worker has stopped",
            )
        },
    })
}

async fn answer(p: Pending) -> Result<Vec<f32>, ApiError> {
    p.await
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "worker_stopped",
                "the model worker stopped before answering",
            )
        })?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "model_error", e))
}

fn normalise(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

async fn text_embeddings(svc: &Service, texts: Vec<String>) -> Result<Vec<Vec<f32>>, ApiError> {
    let s = svc.clone();
    blocking(move || {
        let o = &s.inner.opts;
        let t = medvlm_models::embed::embed_texts(&s.inner.model, &texts, o.text_batch, &o.device)
            .and_then(|t| Ok(t.to_vec2::<f32>()?))
            .map_err(|e| ApiError::internal(format!("text encoder: {e}")))?;
        Ok(t)
    })
    .await
}

async fn with_timeout<T: IntoResponse>(
    svc: &Service,
    fut: impl Future<Output = Result<T, ApiError>>,
) -> Response {
    let t = svc.inner.opts.timeout;
    match tokio::time::timeout(t, fut).await {
        Ok(Ok(r)) => r.into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(_) => ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!(
                    "no answer within the request timeout of {:.3} s (--timeout-s)",
                    t.as_secs_f64()
                ),
            )
        }
        .into_response(),
    }
}

fn ranked(names: &[String], probs: &[f32]) -> Vec<Value> {
    let mut order: Vec<usize> = (0..probs.len().min(names.len())).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    order
        .into_iter()
        .map(|i| json!({"class": names[i], "probability": probs[i]}))
        .collect()
}

// ---------------------------------------------------------------- /v1/embeddings

enum EmbedInput {
    Text(String),
    Image(Bytes),
}

fn embedding_inputs(
    payload: Payload,
    svc: &Service,
) -> Result<(Vec<EmbedInput>, Option<Window>), ApiError> {
    let mut inputs = Vec::new();
    let window;
    match payload {
        Payload::Json(v) => {
            let m = object(v)?;
            reject_unknown(&m, &["model", "input", "encoding_format", "window", "user"])?;
            check_model(svc, opt_str(&m, "model")?)?;
            if let Some(f) = opt_str(&m, "encoding_format")? {
                if f != "float" {
                    return Err(ApiError::unprocessable(format!(
                        "encoding_format {f:?} is not supported (only \"float\")"
                    )));
                }
            }
            window = parse_window(opt_str(&m, "window")?)?;
            let items = match m.get("input") {
                None | Some(Value::Null) => {
                    return Err(ApiError::unprocessable(
                        "field \"input\" is required: a string, or a list of strings and {\"image\": \"<base64>\"} objects",
                    ))
                }
                Some(Value::Array(a)) => a.clone(),
                Some(other) => vec![other.clone()],
            };
            for (i, item) in items.into_iter().enumerate() {
                match item {
                    Value::String(s) => inputs.push(EmbedInput::Text(s)),
                    Value::Object(o) => match (o.get("image"), o.len()) {
                        (Some(Value::String(b)), 1) => inputs.push(EmbedInput::Image(
                            base64_image(b, &format!("input[{i}].image"))?,
                        )),
                        _ => {
                            return Err(ApiError::unprocessable(format!(
                                "input[{i}] must be a string or {{\"image\": \"<base64>\"}}"
                            )))
                        }
                    },
                    _ => {
                        return Err(ApiError::unprocessable(format!(
                            "input[{i}] must be a string or {{\"image\": \"<base64>\"}}"
                        )))
                    }
                }
            }
        }
        Payload::Form(parts) => {
            let mut w = None;
            for p in parts {
                if is_file_part(&p) {
                    inputs.push(EmbedInput::Image(p.data));
                } else {
                    match p.name.as_str() {
                        "input" | "text" => inputs.push(EmbedInput::Text(p.text()?)),
                        "window" => w = Some(p.text()?),
                        "model" => check_model(svc, Some(p.text()?))?,
                        other => {
                            return Err(ApiError::unprocessable(format!(
                                "unknown form field {other:?} (image files, \"text\", \"window\", \"model\")"
                            )))
                        }
                    }
                }
            }
            window = parse_window(w)?;
        }
    }
    if inputs.is_empty() {
        return Err(ApiError::unprocessable("no input to embed"));
    }
    Ok((inputs, window))
}

fn check_model(svc: &Service, model: Option<String>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != svc.inner.model_name => Err(ApiError::not_found(format!(
            "model {m:?} is not served; this service serves {:?}",
            svc.inner.model_name
        ))),
        _ => Ok(()),
    }
}

/// `POST /v1/embeddings`.
pub async fn embeddings(State(svc): State<Service>, req: Request) -> Response {
    let fut = async {
        let payload = read_payload(&svc, req).await?;
        let (inputs, window) = embedding_inputs(payload, &svc)?;
        let cfg = svc.inner.model.preprocess.clone();
        let images = inputs
            .iter()
            .filter(|i| matches!(i, EmbedInput::Image(_)))
            .count();
        let capacity = svc.batcher().capacity();
        if images > capacity {
            return Err(ApiError::unprocessable(format!(
                "{images} images in one request, more than the queue holds ({capacity}, --queue); \
                 split the request"
            )));
        }
        // Decode every image first (415 before anything is queued), then queue them all.
        let mut texts = Vec::new();
        let mut slots = Vec::with_capacity(inputs.len());
        let mut pixels = Vec::new();
        for inp in inputs {
            match inp {
                EmbedInput::Text(t) => {
                    slots.push((true, texts.len()));
                    texts.push(t);
                }
                EmbedInput::Image(b) => {
                    slots.push((false, pixels.len()));
                    pixels.push(preprocess(cfg.clone(), b, window.clone()).await?);
                }
            }
        }
        let pending = pixels
            .into_iter()
            .map(|px| submit(&svc, Target::Embed, px))
            .collect::<Result<Vec<_>, _>>()?;
        let text_rows = if texts.is_empty() {
            Vec::new()
        } else {
            text_embeddings(&svc, texts).await?
        };
        let mut image_rows = Vec::with_capacity(pending.len());
        for p in pending {
            image_rows.push(answer(p).await?);
        }
        let data: Vec<Value> = slots
            .into_iter()
            .enumerate()
            .map(|(i, (is_text, j))| {
                let mut e = if is_text {
                    text_rows[j].clone()
                } else {
                    image_rows[j].clone()
                };
                normalise(&mut e);
                json!({"object": "embedding", "index": i, "embedding": e})
            })
            .collect();
        Ok(Json(json!({
            "object": "list",
            "data": data,
            "model": svc.inner.model_name,
        })))
    };
    with_timeout(&svc, fut).await
}

// ---------------------------------------------------------------- /v1/zero-shot

struct ZeroShotRequest {
    image: Bytes,
    classes: Vec<(String, Vec<String>)>,
    ensemble: Ensemble,
    window: Option<Window>,
}

fn labels_from(v: &Value) -> Result<Vec<String>, ApiError> {
    let names: Vec<String> = match v {
        Value::String(s) => s
            .split(';')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        Value::Array(a) => a
            .iter()
            .map(|x| match x {
                Value::String(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
                _ => Err(ApiError::unprocessable(
                    "field \"labels\" must hold non-empty strings",
                )),
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(ApiError::unprocessable(
                "field \"labels\" must be a list of strings or a ';'-separated string",
            ))
        }
    };
    Ok(names)
}

fn prompts_from(v: &Value) -> Result<Vec<(String, Vec<String>)>, ApiError> {
    let list = |class: &str, v: &Value| -> Result<Vec<String>, ApiError> {
        match v {
            Value::String(s) => Ok(vec![s.clone()]),
            Value::Array(a) => a
                .iter()
                .map(|x| match x {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(ApiError::unprocessable(format!(
                        "prompts of class {class:?} must be strings"
                    ))),
                })
                .collect(),
            _ => Err(ApiError::unprocessable(format!(
                "prompts of class {class:?} must be a string or a list of strings"
            ))),
        }
    };
    match v {
        Value::Object(m) => m.iter().map(|(k, v)| Ok((k.clone(), list(k, v)?))).collect(),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                let class = x.get("class").and_then(Value::as_str);
                match (class, x.get("prompts")) {
                    (Some(c), Some(p)) => Ok((c.to_string(), list(c, p)?)),
                    _ => Err(ApiError::unprocessable(
                        "field \"prompts\" as a list must hold {\"class\": ..., \"prompts\": [...]}",
                    )),
                }
            })
            .collect(),
        _ => Err(ApiError::unprocessable(
            "field \"prompts\" must be {\"class\": [\"prompt\", ...]} or [{\"class\": ..., \"prompts\": [...]}]",
        )),
    }
}

fn build_classes(
    labels: Option<Vec<String>>,
    template: Option<String>,
    prompts: Option<Vec<(String, Vec<String>)>>,
) -> Result<Vec<(String, Vec<String>)>, ApiError> {
    let classes = match (labels, prompts) {
        (Some(_), Some(_)) => {
            return Err(ApiError::unprocessable(
                "give \"labels\" (with an optional \"template\") or \"prompts\", not both",
            ))
        }
        (None, None) => {
            return Err(ApiError::unprocessable(
                "give \"labels\" (with an optional \"template\") or \"prompts\"",
            ))
        }
        (Some(names), None) => {
            let t = template.unwrap_or_else(|| "a photo of {}.".to_string());
            if !t.contains("{}") {
                return Err(ApiError::unprocessable(format!(
                    "template {t:?} has no {{}} for the label"
                )));
            }
            names
                .into_iter()
                .map(|n| {
                    let p = t.replace("{}", &n);
                    (n, vec![p])
                })
                .collect()
        }
        (None, Some(p)) => {
            if template.is_some() {
                return Err(ApiError::unprocessable(
                    "\"template\" applies to \"labels\", not to \"prompts\"",
                ));
            }
            p
        }
    };
    if classes.len() < 2 {
        return Err(ApiError::unprocessable("give at least two classes"));
    }
    for (i, (c, p)) in classes.iter().enumerate() {
        if p.is_empty() || p.iter().any(|s| s.trim().is_empty()) {
            return Err(ApiError::unprocessable(format!(
                "class {c:?} has no prompt or an empty one"
            )));
        }
        if classes[..i].iter().any(|(d, _)| d == c) {
            return Err(ApiError::unprocessable(format!(
                "class {c:?} is given twice"
            )));
        }
    }
    Ok(classes)
}

fn zero_shot_request(svc: &Service, payload: Payload) -> Result<ZeroShotRequest, ApiError> {
    match payload {
        Payload::Json(v) => {
            let m = object(v)?;
            check_model(svc, opt_str(&m, "model")?)?;
            reject_unknown(
                &m,
                &[
                    "model", "image", "labels", "template", "prompts", "ensemble", "window",
                ],
            )?;
            let image = match opt_str(&m, "image")? {
                Some(b) => base64_image(&b, "image")?,
                None => {
                    return Err(ApiError::unprocessable(
                        "field \"image\" (base64 of the file) is required",
                    ))
                }
            };
            let labels = m.get("labels").map(labels_from).transpose()?;
            let prompts = m.get("prompts").map(prompts_from).transpose()?;
            Ok(ZeroShotRequest {
                image,
                classes: build_classes(labels, opt_str(&m, "template")?, prompts)?,
                ensemble: parse_ensemble(opt_str(&m, "ensemble")?)?,
                window: parse_window(opt_str(&m, "window")?)?,
            })
        }
        Payload::Form(parts) => {
            let (mut image, mut labels, mut template, mut prompts, mut ensemble, mut window) =
                (None, None, None, None, None, None);
            for p in parts {
                if is_file_part(&p) {
                    if image.is_some() {
                        return Err(ApiError::unprocessable("send one image per request"));
                    }
                    image = Some(p.data);
                    continue;
                }
                let text = p.text()?;
                match p.name.as_str() {
                    "labels" => {
                        let v = serde_json::from_str::<Value>(&text)
                            .ok()
                            .filter(Value::is_array)
                            .unwrap_or(Value::String(text));
                        labels = Some(labels_from(&v)?);
                    }
                    "template" => template = Some(text),
                    "prompts" => {
                        let v: Value = serde_json::from_str(&text).map_err(|e| {
                            ApiError::bad_request(
                                "bad_json",
                                format!("form field \"prompts\" is not valid JSON: {e}"),
                            )
                        })?;
                        prompts = Some(prompts_from(&v)?);
                    }
                    "ensemble" => ensemble = Some(text),
                    "window" => window = Some(text),
                    "model" => check_model(svc, Some(text))?,
                    other => {
                        return Err(ApiError::unprocessable(format!(
                            "unknown form field {other:?}"
                        )))
                    }
                }
            }
            Ok(ZeroShotRequest {
                image: image.ok_or_else(|| {
                    ApiError::unprocessable("the form has no image file (field \"image\")")
                })?,
                classes: build_classes(labels, template, prompts)?,
                ensemble: parse_ensemble(ensemble)?,
                window: parse_window(window)?,
            })
        }
    }
}

/// `POST /v1/zero-shot`.
pub async fn zero_shot(State(svc): State<Service>, req: Request) -> Response {
    let fut = async {
        let payload = read_payload(&svc, req).await?;
        let r = zero_shot_request(&svc, payload)?;
        let px = preprocess(svc.inner.model.preprocess.clone(), r.image, r.window).await?;
        let pending = submit(&svc, Target::Embed, px)?;
        let s = svc.clone();
        let classes = r.classes.clone();
        let prompt_embeds = blocking(move || {
            let o = &s.inner.opts;
            medvlm_adapt::zero_shot::class_prompt_embeddings(
                &s.inner.model,
                &classes,
                o.text_batch,
                &o.device,
            )
            .map_err(|e| ApiError::internal(format!("text encoder: {e}")))
        })
        .await?;
        let row = answer(pending).await?;
        let s = svc.clone();
        let names: Vec<String> = r.classes.iter().map(|(c, _)| c.clone()).collect();
        let ensemble = r.ensemble;
        let names2 = names.clone();
        let probs = blocking(move || {
            let d = row.len();
            let img = Tensor::from_vec(row, (1, d), &candle_core::Device::Cpu)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            medvlm_adapt::zero_shot::zero_shot_probabilities(
                &s.inner.model,
                &img,
                &names2,
                &prompt_embeds,
                ensemble,
            )
            .map_err(|e| ApiError::internal(format!("zero-shot scoring: {e}")))
        })
        .await?;
        let probs = probs.into_iter().next().unwrap_or_default();
        let ranked = ranked(&names, &probs);
        Ok(Json(json!({
            "object": "zero-shot",
            "model": svc.inner.model_name,
            "activation": if svc.inner.model.family == Family::Siglip { "sigmoid" } else { "softmax" },
            "ensemble": match ensemble { Ensemble::Mean => "mean", Ensemble::Mixture => "mixture" },
            "top": ranked.first().cloned().unwrap_or(Value::Null),
            "probabilities": ranked,
        })))
    };
    with_timeout(&svc, fut).await
}

// ---------------------------------------------------------------- /v1/predict

fn predict_request(payload: Payload) -> Result<(Option<String>, Bytes, Option<Window>), ApiError> {
    match payload {
        Payload::Json(v) => {
            let m = object(v)?;
            reject_unknown(&m, &["artefact", "image", "window"])?;
            let image = match opt_str(&m, "image")? {
                Some(b) => base64_image(&b, "image")?,
                None => {
                    return Err(ApiError::unprocessable(
                        "field \"image\" (base64 of the file) is required",
                    ))
                }
            };
            Ok((
                opt_str(&m, "artefact")?,
                image,
                parse_window(opt_str(&m, "window")?)?,
            ))
        }
        Payload::Form(parts) => {
            let (mut artefact, mut image, mut window) = (None, None, None);
            for p in parts {
                if is_file_part(&p) {
                    if image.is_some() {
                        return Err(ApiError::unprocessable("send one image per request"));
                    }
                    image = Some(p.data);
                    continue;
                }
                match p.name.as_str() {
                    "artefact" => artefact = Some(p.text()?),
                    "window" => window = Some(p.text()?),
                    other => {
                        return Err(ApiError::unprocessable(format!(
                            "unknown form field {other:?} (an image file, \"artefact\", \"window\")"
                        )))
                    }
                }
            }
            let image = image.ok_or_else(|| {
                ApiError::unprocessable("the form has no image file (field \"image\")")
            })?;
            Ok((artefact, image, parse_window(window)?))
        }
    }
}

/// What the card says about conformal sets and calibration, for one probability row.
fn conformal_fields(
    card: &medvlm_adapt::artefact::AdaptCard,
    names: &[String],
    probs: &[f32],
) -> Map<String, Value> {
    let mut out = Map::new();
    match card.task {
        TaskKind::MultiLabel => {
            match card
                .multilabel_metrics
                .as_ref()
                .and_then(|m| m.conformal_fnr_control.as_ref())
            {
                Some(s) => {
                    let r = &s.report;
                    let set: Vec<&String> = names
                        .iter()
                        .zip(probs)
                        .filter(|(_, &p)| r.calibration_too_small || p >= r.threshold)
                        .map(|(n, _)| n)
                        .collect();
                    out.insert(
                        "conformal".into(),
                        json!({
                            "method": "conformal risk control of the false-negative rate (Angelopoulos et al., ICLR 2024)",
                            "target_fnr": r.target_alpha,
                            "lambda_hat": r.lambda_hat,
                            "threshold": r.threshold,
                            "calibration_source": s.calibration_source,
                            "n_calibration": r.n_calibration,
                            "calibration_too_small": r.calibration_too_small,
                            "set": set,
                        }),
                    );
                }
                None => {
                    out.insert("conformal".into(), Value::Null);
                    out.insert(
                        "conformal_reason".into(),
                        json!("adapt.json has no conformal calibration (the artefact was adapted without calibration examples)"),
                    );
                }
            }
        }
        TaskKind::MultiClass => {
            let summary = card.metrics.as_ref().and_then(|m| m.conformal.as_ref());
            let sets = summary
                .and_then(|c| c.predictor.as_ref())
                .map(|p| p.predict_sets(probs));
            match (summary, sets) {
                (Some(c), Some(Ok(sets))) => {
                    let set: Vec<&String> = sets
                        .first()
                        .map(|s| s.iter().filter_map(|&k| names.get(k)).collect())
                        .unwrap_or_default();
                    let p = c.predictor.as_ref();
                    out.insert(
                        "conformal".into(),
                        json!({
                            "method": match c.config.score {
                                medvlm_eval::conformal::ConformalScore::Aps => "split-conformal APS (Romano et al., NeurIPS 2020)",
                                medvlm_eval::conformal::ConformalScore::Raps { .. } => "split-conformal RAPS (Angelopoulos et al., ICLR 2021)",
                            },
                            "alpha": c.config.alpha,
                            "target_coverage": 1.0 - c.config.alpha,
                            "randomized": c.config.randomized,
                            "q_hat": p.and_then(|p| p.q_hat),
                            "calibration_source": c.calibration_source,
                            "n_calibration": c.n_calibration,
                            "test_coverage": c.report.coverage,
                            "set": set,
                        }),
                    );
                }
                (Some(c), sets) => {
                    out.insert("conformal".into(), Value::Null);
                    let reason = match sets {
                        Some(Err(e)) => format!("the recorded conformal predictor cannot score this row: {e}"),
                        _ => format!(
                            "adapt.json records how the split-conformal sets did on the test split \
                             (alpha {}, coverage {:.4}, mean set size {:.3}, calibrated on {}) but not \
                             the calibrated score threshold q_hat (written by an older medvlm); \
                             re-run medvlm adapt to get sets for new images",
                            c.config.alpha, c.report.coverage, c.report.mean_set_size, c.calibration_source
                        ),
                    };
                    out.insert("conformal_reason".into(), json!(reason));
                }
                (None, _) => {
                    out.insert("conformal".into(), Value::Null);
                    out.insert(
                        "conformal_reason".into(),
                        json!("adapt.json has no conformal calibration (no calibration or test split when it was adapted)"),
                    );
                }
            }
        }
    }
    let temperature = match card.task {
        TaskKind::MultiClass => card.metrics.as_ref().and_then(|m| m.temperature.as_ref()),
        TaskKind::MultiLabel => None,
    };
    let calibrated = temperature.map(|t| {
        medvlm_eval::temperature::apply_temperature(probs, names.len(), t.fit.temperature)
            .map(|c| (t, c))
    });
    match calibrated {
        // A recorded temperature that cannot be applied is said, not passed off as absent.
        Some(Err(e)) => {
            out.insert("calibrated_probabilities".into(), Value::Null);
            out.insert(
                "calibration_reason".into(),
                json!(format!("the recorded temperature cannot be applied: {e}")),
            );
        }
        Some(Ok((t, c))) => {
            out.insert("calibrated_probabilities".into(), json!(ranked(names, &c)));
            out.insert(
                "calibration".into(),
                json!({
                    "method": t.method,
                    "temperature": t.fit.temperature,
                    "calibration_source": t.calibration_source,
                    "n_calibration": t.fit.n,
                    "test_ece_before": t.test_ece_before,
                    "test_ece_after": t.test_ece_after,
                }),
            );
        }
        None => {
            out.insert("calibrated_probabilities".into(), Value::Null);
            let reason = match card.task {
                TaskKind::MultiLabel => "temperature scaling is fitted for multi-class artefacts only; the probabilities are the classifier's own sigmoids",
                TaskKind::MultiClass => "adapt.json has no temperature (no calibration examples when it was adapted, or written by a medvlm older than temperature scaling); the probabilities are the classifier's own",
            };
            out.insert("calibration_reason".into(), json!(reason));
        }
    }
    out
}

/// `POST /v1/predict`.
pub async fn predict(State(svc): State<Service>, req: Request) -> Response {
    let fut = async {
        let payload = read_payload(&svc, req).await?;
        let (name, image, window) = predict_request(payload)?;
        let arts = &svc.inner.artefacts;
        let known = || arts.iter().map(|a| a.name.as_str()).collect::<Vec<_>>();
        let idx = match name {
            Some(n) => arts.iter().position(|a| a.name == n).ok_or_else(|| {
                ApiError::not_found(format!("no adapted artefact {n:?}; served: {:?}", known()))
            })?,
            None if arts.len() == 1 => 0,
            None if arts.is_empty() => {
                return Err(ApiError::not_found(
                    "no adapted artefact is served (start with --adapted DIR)",
                ))
            }
            None => {
                return Err(ApiError::unprocessable(format!(
                    "field \"artefact\" is required: one of {:?}",
                    known()
                )))
            }
        };
        let a = &arts[idx];
        let px = preprocess(a.model.model.preprocess.clone(), image, window).await?;
        let probs = answer(submit(&svc, Target::Adapted(idx), px)?).await?;
        let card = &a.model.card;
        let names = a.model.class_names();
        let ranked = ranked(names, &probs);
        let predicted: Vec<Value> = match card.task {
            TaskKind::MultiClass => ranked.first().cloned().into_iter().collect(),
            TaskKind::MultiLabel => ranked
                .iter()
                .filter(|v| {
                    v["probability"].as_f64().unwrap_or(0.0)
                        >= medvlm_eval::evaluation::MULTI_LABEL_THRESHOLD as f64
                })
                .cloned()
                .collect(),
        };
        let mut body = Map::new();
        body.insert("object".into(), json!("prediction"));
        body.insert("artefact".into(), json!(a.name));
        body.insert("method".into(), json!(card.method));
        body.insert("task".into(), json!(card.task));
        body.insert("top".into(), ranked.first().cloned().unwrap_or(Value::Null));
        body.insert("predicted".into(), json!(predicted));
        body.insert("probabilities".into(), json!(ranked));
        body.extend(conformal_fields(card, names, &probs));
        Ok(Json(Value::Object(body)))
    };
    with_timeout(&svc, fut).await
}

// ---------------------------------------------------------------- the rest

/// `GET /v1/models`.
pub async fn models(State(svc): State<Service>) -> Json<Value> {
    let m = &svc.inner.model;
    let artefacts: Vec<Value> = svc
        .inner
        .artefacts
        .iter()
        .map(|a| {
            let c = &a.model.card;
            let conformal = match c.task {
                TaskKind::MultiLabel => c
                    .multilabel_metrics
                    .as_ref()
                    .is_some_and(|m| m.conformal_fnr_control.is_some()),
                TaskKind::MultiClass => c
                    .metrics
                    .as_ref()
                    .and_then(|m| m.conformal.as_ref())
                    .is_some_and(|s| s.predictor.is_some()),
            };
            json!({
                "name": a.name,
                "method": c.method,
                "task": c.task,
                "classes": c.class_names,
                "base_model": c.model,
                "conformal_sets": conformal,
            })
        })
        .collect();
    Json(json!({
        "object": "list",
        "model": {
            "id": svc.inner.model_name,
            "family": m.family.to_string(),
            "embed_dim": m.model.embed_dim(),
            "image_size": m.preprocess.output_size().map(|(h, w)| vec![h, w]),
        },
        "artefacts": artefacts,
        "heads": head_list(&svc.inner.heads),
    }))
}

/// The served task heads: kind, name, route, the form field that names one, and the text
/// field a request needs (`prompt`, `question`, or none).
fn head_list(h: &crate::service::TaskHeads) -> Vec<Value> {
    fn names<T>(heads: &[(String, std::sync::Arc<T>)]) -> Vec<&str> {
        heads.iter().map(|(n, _)| n.as_str()).collect()
    }
    // (kind, served names, route, the field naming the head, the text field it needs)
    let kinds = [
        (
            "segmenter",
            names(&h.segmenters),
            "/v1/segment",
            "segmenter",
            Some("prompt"),
        ),
        (
            "anomaly detector",
            names(&h.detectors),
            "/v1/anomaly",
            "detector",
            None,
        ),
        (
            "box detector",
            names(&h.box_detectors),
            "/v1/detect",
            "box_detector",
            Some("prompt"),
        ),
        (
            "report generator",
            names(&h.reporters),
            "/v1/report",
            "reporter",
            None,
        ),
        (
            "upscaler",
            names(&h.upscalers),
            "/v1/upscale",
            "upscaler",
            None,
        ),
        (
            "registrar",
            names(&h.registrars),
            "/v1/register",
            "registrar",
            None,
        ),
        (
            "answerer",
            names(&h.answerers),
            "/v1/answer",
            "answerer",
            Some("question"),
        ),
    ];
    let mut out = Vec::new();
    for (kind, served, route, field, text) in kinds {
        for name in served {
            let mut text_field = text;
            let mut e = json!({"kind": kind, "name": name, "route": route, "field": field});
            if let Some((_, d)) = h.detectors.iter().find(|(n, _)| n == name) {
                if kind == "anomaly detector" {
                    // The modalities it has a memory for: a request names one when there are
                    // several.
                    e["modalities"] = json!(d
                        .modalities
                        .iter()
                        .filter_map(|m| m.modality.clone())
                        .collect::<Vec<_>>());
                }
            }
            if let Some((_, r)) = h.registrars.iter().find(|(n, _)| n == name) {
                if kind == "registrar" && r.card.text_model.is_some() {
                    text_field = Some("prompt");
                }
            }
            e["text_field"] = json!(text_field);
            out.push(e);
        }
    }
    out
}

/// `GET /healthz`: the process answers.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: the model is loaded and its worker thread runs.
pub async fn readyz(State(svc): State<Service>) -> Response {
    if svc.batcher().is_alive() {
        Json(json!({"status": "ready", "model": svc.inner.model_name})).into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the model worker is not running",
        )
        .into_response()
    }
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(svc): State<Service>) -> Response {
    let b = svc.batcher();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        {
            let mut text = svc.inner.metrics.render(b.waiting(), b.capacity());
            svc.inner.head_gate.load().render(&mut text);
            text
        },
    )
        .into_response()
}

/// `GET /`: the web page.
pub async fn index() -> Html<&'static str> {
    Html(include_str!("../assets/index.html"))
}

/// `GET /models`: the page listing the model and the adapted artefacts.
pub async fn models_page() -> Html<&'static str> {
    Html(include_str!("../assets/models.html"))
}

/// `GET /papers`: the page of the literature catalogue.
pub async fn papers_page() -> Html<&'static str> {
    Html(include_str!("../assets/papers.html"))
}

fn decode_error(e: DecodeError) -> ApiError {
    match e {
        DecodeError::Unrecognised | DecodeError::Undecodable { .. } => {
            ApiError::unsupported(e.to_string())
        }
        DecodeError::Empty => ApiError::unprocessable(e.to_string()),
        DecodeError::Temp(_) => ApiError::internal(e.to_string()),
    }
}

/// Runs a head's `task` on an upload (written to a temporary file; the task reads it once).
/// When the task fails, the upload is read again, on that path only, to say whose fault it
/// is: an upload that does not decode as an image is the upload's (415; 422 when empty); a
/// task failing on an image that decodes is the request's (422, the task's message kept),
/// never reported as an undecodable image. Messages have the temporary path replaced by
/// `<upload>`.
fn on_upload<T>(
    bytes: &[u8],
    task: impl FnOnce(&std::path::Path) -> Result<T, String>,
) -> Result<T, ApiError> {
    crate::decode::with_upload(bytes, |path, _| match task(path) {
        Ok(v) => Ok(Ok(v)),
        Err(message) => {
            read_upload_plane(path)?;
            Ok(Err(crate::decode::scrub(&message, path)))
        }
    })
    .map_err(decode_error)?
    .map_err(ApiError::unprocessable)
}

/// Reads an upload as a plane (and tells [`on_upload`] whether an upload decodes).
fn read_upload_plane(path: &std::path::Path) -> Result<medvlm_io::Plane, String> {
    medvlm_tasks::segmentation_pipeline::read_plane(path).map_err(|e| e.to_string())
}

/// `POST /v1/preview`: the uploaded image as a PNG, windowed as the model sees it (an image
/// and an optional `window`, as `/v1/predict` takes them).
pub async fn preview(State(svc): State<Service>, req: Request) -> Response {
    with_timeout(&svc, async {
        let payload = read_payload(&svc, req).await?;
        let (artefact, image, window) = predict_request(payload)?;
        if artefact.is_some() {
            return Err(ApiError::unprocessable(
                "/v1/preview takes an image and an optional window, not an artefact",
            ));
        }
        let (png, used) =
            blocking(move || preview_png(&image, window.as_ref()).map_err(decode_error)).await?;
        Ok((
            [
                (header::CONTENT_TYPE, "image/png".to_string()),
                (header::HeaderName::from_static("x-medvlm-window"), used),
            ],
            png,
        )
            .into_response())
    })
    .await
}

/// `GET /v1/papers?task=&strategy=&modality=&q=`: the literature catalogue, filtered as
/// `medvlm papers` filters it.
pub async fn papers(
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    let result = (|| -> Result<Value, ApiError> {
        let all = medvlm_papers::catalogue()
            .map_err(|e| ApiError::internal(format!("the embedded catalogue: {e}")))?;
        let mut f = medvlm_papers::Filter::default();
        for (k, v) in &q {
            let v = v.trim();
            if v.is_empty() {
                continue;
            }
            match k.as_str() {
                "task" => {
                    f.task = Some(
                        medvlm_papers::parse_task(v)
                            .map_err(|e| ApiError::unprocessable(e.to_string()))?,
                    )
                }
                "strategy" => {
                    f.strategy = Some(
                        medvlm_papers::Strategy::parse(v)
                            .map_err(|e| ApiError::unprocessable(e.to_string()))?,
                    )
                }
                "modality" => f.modality = Some(v.to_string()),
                "q" => f.search = vec![v.to_string()],
                other => {
                    return Err(ApiError::unprocessable(format!(
                        "unknown query parameter {other:?} (task, strategy, modality, q)"
                    )))
                }
            }
        }
        let hits = medvlm_papers::filter(&all, &f);
        Ok(json!({"object": "list", "total": all.len(), "count": hits.len(), "data": hits}))
    })();
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

// ---------------------------------------------------------------- task heads

/// Text fields and the one image of a request: JSON `{field: "...", "image": base64}` or a
/// multipart form with text fields and one file.
fn fields_and_image(
    payload: Payload,
    allowed: &[&str],
) -> Result<(std::collections::HashMap<String, String>, Bytes), ApiError> {
    let mut fields = std::collections::HashMap::new();
    let mut image = None;
    match payload {
        Payload::Json(v) => {
            let m = object(v)?;
            let mut keys: Vec<&str> = allowed.to_vec();
            keys.push("image");
            reject_unknown(&m, &keys)?;
            for k in allowed {
                // Numeric and boolean settings (`beams`, `free_text`) may come as JSON numbers
                // and booleans, as form fields are text.
                if let Some(Value::Number(n)) = m.get(*k) {
                    fields.insert(k.to_string(), n.to_string());
                } else if let Some(Value::Bool(x)) = m.get(*k) {
                    fields.insert(k.to_string(), x.to_string());
                } else if let Some(v) = opt_str(&m, k)? {
                    fields.insert(k.to_string(), v);
                }
            }
            if let Some(b) = opt_str(&m, "image")? {
                image = Some(base64_image(&b, "image")?);
            }
        }
        Payload::Form(parts) => {
            for p in parts {
                if is_file_part(&p) {
                    if image.is_some() {
                        return Err(ApiError::unprocessable("send one image per request"));
                    }
                    image = Some(p.data);
                } else if allowed.contains(&p.name.as_str()) {
                    fields.insert(p.name.clone(), p.text()?);
                } else {
                    return Err(ApiError::unprocessable(format!(
                        "unknown form field {:?} (an image file and {})",
                        p.name,
                        allowed.join(", ")
                    )));
                }
            }
        }
    }
    let image = image
        .ok_or_else(|| ApiError::unprocessable("the request has no image (field \"image\")"))?;
    Ok((fields, image))
}

/// The head named `name`, or the only one when no name is given.
fn pick<'a, T>(
    heads: &'a [(String, std::sync::Arc<T>)],
    name: Option<&String>,
    what: &str,
) -> Result<(&'a String, std::sync::Arc<T>), ApiError> {
    match name {
        Some(n) => heads
            .iter()
            .find(|(h, _)| h == n)
            .map(|(h, t)| (h, t.clone()))
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "no {what} named {n:?}; served: {}",
                    heads
                        .iter()
                        .map(|(h, _)| h.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }),
        None => match heads {
            [(h, t)] => Ok((h, t.clone())),
            [] => Err(ApiError::not_found(format!(
                "no {what} is served (start medvlm serve with --{what} DIR)"
            ))),
            _ => Err(ApiError::unprocessable(format!(
                "several {what}s are served; name one in the field \"{what}\""
            ))),
        },
    }
}

fn png_base64(plane: &medvlm_io::Plane) -> Result<String, String> {
    let png = medvlm_io::raster::encode_png(plane).map_err(|e| e.to_string())?;
    Ok(base64::engine::general_purpose::STANDARD.encode(png))
}

/// `POST /v1/segment`: the mask of what `prompt` names in the image, from a segmenter
/// (`--segmenter DIR`), as base64 PNGs (mask and overlay) at the image's size.
pub async fn segment(State(svc): State<Service>, req: Request) -> Response {
    with_timeout(&svc, async {
        let payload = read_payload(&svc, req).await?;
        let (fields, image) = fields_and_image(payload, &["segmenter", "prompt"])?;
        let prompt = fields
            .get("prompt")
            .cloned()
            .ok_or_else(|| ApiError::unprocessable("field \"prompt\" is required"))?;
        let (name, seg) = pick(
            &svc.inner.heads.segmenters,
            fields.get("segmenter"),
            "segmenter",
        )?;
        let name = name.clone();
        let device = svc.inner.opts.device.clone();
        let v = svc
            .inner
            .head_gate
            .run(move || {
                on_upload(&image, |path| {
                    let plane = read_upload_plane(path)?;
                    let (text, class) = seg
                        .prompt_embedding(&prompt, &device)
                        .map_err(|e| e.to_string())?;
                    let mask = seg
                        .segment_planes(std::slice::from_ref(&plane), &text, &device)
                        .map_err(|e| e.to_string())?
                        .remove(0);
                    let mask_plane = medvlm_io::Plane::new(
                        plane.rows,
                        plane.cols,
                        1,
                        mask.iter().map(|&m| f32::from(m)).collect(),
                    )
                    .map_err(|e| e.to_string())?;
                    let overlay = medvlm_tasks::segmentation_pipeline::overlay(&plane, &mask);
                    Ok(json!({
                        "object": "segmentation",
                        "segmenter": name,
                        "prompt": prompt,
                        "class": class,
                        "width": plane.cols,
                        "height": plane.rows,
                        "area": mask.iter().map(|&m| m as usize).sum::<usize>(),
                        "mask_png": png_base64(&mask_plane)?,
                        "overlay_png": png_base64(&overlay)?,
                    }))
                })
            })
            .await?;
        Ok(Json(v))
    })
    .await
}

/// `POST /v1/anomaly`: the anomaly score, decision and map of the image from a detector
/// (`--detector DIR`), the map as a base64 PNG at the model's input size (128 = the
/// threshold).
pub async fn anomaly(State(svc): State<Service>, req: Request) -> Response {
    with_timeout(&svc, async {
        let payload = read_payload(&svc, req).await?;
        let (fields, image) = fields_and_image(payload, &["detector", "modality"])?;
        let (name, det) = pick(
            &svc.inner.heads.detectors,
            fields.get("detector"),
            "detector",
        )?;
        let name = name.clone();
        let modality = match (fields.get("modality"), det.modalities.as_slice()) {
            (Some(m), _) => Some(m.clone()),
            (None, [only]) => only.modality.clone(),
            (None, many) => {
                return Err(ApiError::unprocessable(format!(
                    "detector {name:?} knows {} modalities ({}); give the field \"modality\"",
                    many.len(),
                    many.iter()
                        .map(|d| d.modality.as_deref().unwrap_or("(none)"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        };
        if let Some(m) = &modality {
            if !det
                .modalities
                .iter()
                .any(|d| d.modality.as_deref() == Some(m))
            {
                return Err(ApiError::unprocessable(format!(
                    "detector {name:?} has no memory for modality {m:?}"
                )));
            }
        }
        let device = svc.inner.opts.device.clone();
        let v = svc
            .inner
            .head_gate
            .run(move || {
                on_upload(&image, |path| {
                    let (_, scored, anomalous) = det
                        .predict_files(&[path.to_path_buf()], modality.as_deref(), &device)
                        .map_err(|e| e.to_string())?
                        .remove(0);
                    let d = det
                        .modalities
                        .iter()
                        .find(|d| d.modality == modality)
                        .ok_or("no detector for the modality")?;
                    let size = det.card.image_size;
                    let map = scored.map_plane(size, d.decision_threshold().value)?;
                    Ok(json!({
                        "object": "anomaly",
                        "detector": name,
                        "modality": modality,
                        "score": scored.score,
                        "method": d.decision_method(),
                        "threshold": d.decision_threshold().value,
                        "target_false_positive_rate": d.decision_threshold().target_false_positive_rate,
                        "anomalous": anomalous,
                        "map_size": size,
                        "map_png": png_base64(&map)?,
                    }))
                })
            })
            .await?;
        Ok(Json(v))
    })
    .await
}

/// `POST /v1/report`: a report for the image from a report generator (`--reporter DIR`),
/// greedy or with `beams` (a JSON number or string, 1 to 8), or, with `guidance` (0 to 10),
/// greedy decoding held to the diagnosis prompt with that guidance scale
/// ([`medvlm_tasks::report_pipeline::Decoding::GreedyFaithful`]).
pub async fn report(State(svc): State<Service>, req: Request) -> Response {
    with_timeout(&svc, async {
        let payload = read_payload(&svc, req).await?;
        let (fields, image) = fields_and_image(payload, &["reporter", "beams", "guidance"])?;
        let (name, rep) = pick(
            &svc.inner.heads.reporters,
            fields.get("reporter"),
            "reporter",
        )?;
        let name = name.clone();
        let beams = match fields.get("beams") {
            None => 1,
            Some(b) => match b.trim().parse::<usize>() {
                Ok(k) if (1..=8).contains(&k) => k,
                _ => {
                    return Err(ApiError::unprocessable(format!(
                        "field \"beams\" = {b:?}: expected a whole number from 1 to 8"
                    )))
                }
            },
        };
        let guidance = match fields.get("guidance") {
            None => None,
            Some(g) => match g.trim().parse::<f64>() {
                Ok(x) if (0.0..=10.0).contains(&x) => Some(x),
                _ => {
                    return Err(ApiError::unprocessable(format!(
                        "field \"guidance\" = {g:?}: expected a number from 0 to 10"
                    )))
                }
            },
        };
        use medvlm_tasks::report_pipeline::Decoding;
        let decoding = match (beams, guidance) {
            (1, Some(guidance)) => Decoding::GreedyFaithful { guidance },
            (_, Some(_)) => {
                return Err(ApiError::unprocessable(
                    "fields \"beams\" and \"guidance\": guidance applies to greedy decoding \
                     (beams 1)",
                ))
            }
            (1, None) => Decoding::Greedy,
            (k, None) => Decoding::Beam(k),
        };
        if guidance.is_some() && rep.model.card.findings.is_none() {
            return Err(ApiError::unprocessable(format!(
                "field \"guidance\": reporter {name:?} was trained without a diagnosis prompt, \
                 so there is nothing to guide its reports towards"
            )));
        }
        let device = svc.inner.opts.device.clone();
        let v = svc
            .inner
            .head_gate
            .run(move || {
                on_upload(&image, |path| {
                    let report = rep
                        .report_files(&[path.to_path_buf()], decoding, &device)
                        .map_err(|e| e.to_string())?
                        .remove(0);
                    Ok(json!({
                        "object": "report",
                        "reporter": name,
                        "beams": beams,
                        "guidance": guidance,
                        "report": report,
                    }))
                })
            })
            .await?;
        Ok(Json(v))
    })
    .await
}

/// `POST /v1/detect`: the grounded box and the detections of what `prompt` names in the image,
/// from a box detector (`--box-detector DIR`), in the image's pixels, with an overlay PNG.
pub async fn detect(State(svc): State<Service>, req: Request) -> Response {
    with_timeout(&svc, async {
        let payload = read_payload(&svc, req).await?;
        let (fields, image) = fields_and_image(
            payload,
            &["box_detector", "prompt", "min_score", "free_text"],
        )?;
        let prompt = fields
            .get("prompt")
            .cloned()
            .ok_or_else(|| ApiError::unprocessable("field \"prompt\" is required"))?;
        let min_score = match fields.get("min_score") {
            None => 0.3,
            Some(v) => match v.trim().parse::<f64>() {
                Ok(x) if (0.0..=1.0).contains(&x) => x,
                _ => {
                    return Err(ApiError::unprocessable(format!(
                        "field \"min_score\" = {v:?}: expected a number from 0 to 1"
                    )))
                }
            },
        };
        let free_text = match fields.get("free_text").map(|v| v.trim()) {
            None | Some("false") | Some("0") => false,
            Some("true") | Some("1") => true,
            Some(v) => {
                return Err(ApiError::unprocessable(format!(
                    "field \"free_text\" = {v:?}: expected true or false"
                )))
            }
        };
        let (name, det) = pick(
            &svc.inner.heads.box_detectors,
            fields.get("box_detector"),
            "box_detector",
        )?;
        let name = name.clone();
        let device = svc.inner.opts.device.clone();
        // An unknown class is the request's fault (422), not a decoding failure.
        let (text, class) = det
            .prompt_embedding(&prompt, free_text, &device)
            .map_err(|e| ApiError::unprocessable(e.to_string()))?;
        let v = svc
            .inner
            .head_gate
            .run(move || {
                on_upload(&image, |path| {
                    let plane = read_upload_plane(path)?;
                    let found = det
                        .boxes_in_plane(&plane, &text, min_score, &device)
                        .map_err(|e| e.to_string())?;
                    let overlay = medvlm_tasks::detection_pipeline::boxes_overlay(&plane, &found);
                    Ok(json!({
                        "object": "detection",
                        "box_detector": name,
                        "prompt": prompt,
                        "class": class,
                        "width": plane.cols,
                        "height": plane.rows,
                        "grounding": found.grounding,
                        "detections": found.detections,
                        "min_score": min_score,
                        "overlay_png": png_base64(&overlay)?,
                    }))
                })
            })
            .await?;
        Ok(Json(v))
    })
    .await
}

/// Largest super-resolved image `/v1/upscale` makes, in pixels (4096 x 4096): a bigger upload
/// would need gigabytes for the network's activations.
const MAX_UPSCALED_PIXELS: usize = 4096 * 4096;

/// `POST /v1/upscale`: the image super-resolved by an upscaler (`--upscaler DIR`), as an
/// 8-bit grey PNG `scale` times larger (colour uploads are converted to grey first).
pub async fn upscale(State(svc): State<Service>, req: Request) -> Response {
    with_timeout(&svc, async {
        let payload = read_payload(&svc, req).await?;
        let (fields, image) = fields_and_image(payload, &["upscaler"])?;
        let (name, up) = pick(
            &svc.inner.heads.upscalers,
            fields.get("upscaler"),
            "upscaler",
        )?;
        let name = name.clone();
        let v = svc
            .inner
            .head_gate
            .run(move || {
                use medvlm_tasks::super_resolution_pipeline as sr;
                on_upload(&image, |path| {
                    let g = sr::read_grey(path).map_err(|e| e.to_string())?;
                    // A decodable image of a size the upscaler cannot take is the
                    // request's fault (422), as any failure after decoding.
                    let s = up.scale();
                    let min = medvlm_tasks::super_resolution::MIN_LR_SIDE;
                    if g.rows < min || g.cols < min {
                        return Err(format!(
                            "{}x{} is too small to upscale (at least {min} px per side)",
                            g.rows, g.cols
                        ));
                    }
                    if g.rows * g.cols * s * s > MAX_UPSCALED_PIXELS {
                        return Err(format!(
                            "{}x{} upscaled x{s} exceeds {MAX_UPSCALED_PIXELS} pixels",
                            g.rows, g.cols
                        ));
                    }
                    let hr = up.upscale(&g).map_err(|e| e.to_string())?;
                    let plane = medvlm_io::Plane::new(g.rows * s, g.cols * s, 1, hr)
                        .map_err(|e| e.to_string())?;
                    Ok(json!({
                        "object": "upscale",
                        "upscaler": name,
                        "scale": s,
                        "input_size": [g.rows, g.cols],
                        "output_size": [g.rows * s, g.cols * s],
                        "from_colour": g.from_colour,
                        "image_png": png_base64(&plane)?,
                    }))
                })
            })
            .await?;
        Ok(Json(v))
    })
    .await
}

/// Text fields and the named images of a request: JSON `{field: "...", "<image name>":
/// base64}` or a multipart form whose file parts are named after the images. Every image is
/// required.
fn fields_and_named_images(
    payload: Payload,
    allowed: &[&str],
    images: &[&str],
) -> Result<(std::collections::HashMap<String, String>, Vec<Bytes>), ApiError> {
    let mut fields = std::collections::HashMap::new();
    let mut found: Vec<Option<Bytes>> = vec![None; images.len()];
    match payload {
        Payload::Json(v) => {
            let m = object(v)?;
            let mut keys: Vec<&str> = allowed.to_vec();
            keys.extend_from_slice(images);
            reject_unknown(&m, &keys)?;
            for k in allowed {
                if let Some(v) = opt_str(&m, k)? {
                    fields.insert(k.to_string(), v);
                }
            }
            for (slot, name) in found.iter_mut().zip(images) {
                if let Some(b) = opt_str(&m, name)? {
                    *slot = Some(base64_image(&b, name)?);
                }
            }
        }
        Payload::Form(parts) => {
            for p in parts {
                if let Some(i) = images.iter().position(|n| *n == p.name) {
                    if found[i].is_some() {
                        return Err(ApiError::unprocessable(format!(
                            "the form has two files named {:?}",
                            p.name
                        )));
                    }
                    found[i] = Some(p.data);
                } else if allowed.contains(&p.name.as_str()) && p.file_name.is_none() {
                    fields.insert(p.name.clone(), p.text()?);
                } else {
                    return Err(ApiError::unprocessable(format!(
                        "unknown form field {:?} (files named {} and the fields {})",
                        p.name,
                        images.join(", "),
                        allowed.join(", ")
                    )));
                }
            }
        }
    }
    let mut out = Vec::with_capacity(images.len());
    for (b, name) in found.into_iter().zip(images) {
        out.push(b.ok_or_else(|| {
            ApiError::unprocessable(format!("the request has no image {name:?}"))
        })?);
    }
    Ok((fields, out))
}

/// Largest image pair `/v1/register` takes, in pixels per image (2048 x 2048).
const MAX_REGISTER_PIXELS: usize = 2048 * 2048;

/// `POST /v1/register`: the `moving` image registered onto the `fixed` one by a registrar
/// (`--registrar DIR`): the warped moving image as an 8-bit grey PNG, the pull-back field
/// (moving -> fixed, `[2, H, W]` float32, `dx, dy` in pixels) as a base64 `.npy`, the share
/// of folded pixels and the grey-level MSE before and after. Colour uploads are averaged to
/// grey, as the CLI does.
pub async fn register(State(svc): State<Service>, req: Request) -> Response {
    with_timeout(&svc, async {
        let payload = read_payload(&svc, req).await?;
        let (fields, mut images) =
            fields_and_named_images(payload, &["registrar", "prompt"], &["moving", "fixed"])?;
        let (name, reg) = pick(
            &svc.inner.heads.registrars,
            fields.get("registrar"),
            "registrar",
        )?;
        let name = name.clone();
        let prompt = reg
            .check_prompt(fields.get("prompt").map(String::as_str))
            .map_err(|e| ApiError::unprocessable(e.to_string()))?;
        let fixed_bytes = images.pop().unwrap_or_default();
        let moving_bytes = images.pop().unwrap_or_default();
        let v = svc.inner.head_gate.run(move || {
            use medvlm_tasks::registration_pipeline::{read_grey, RegPair};
            let grey = |bytes: &Bytes, which: &str| {
                crate::decode::with_upload(bytes, |path, _| {
                    read_grey(path).map_err(|e| e.to_string())
                })
                .map_err(|e| {
                    let mut err = decode_error(e);
                    err.message = format!("{which} image: {}", err.message);
                    err
                })
            };
            let (moving, ms) = grey(&moving_bytes, "moving")?;
            let (fixed, fs) = grey(&fixed_bytes, "fixed")?;
            // Decodable images that cannot be registered are the request's fault (422).
            if ms != fs {
                return Err(ApiError::unprocessable(format!(
                    "the moving image is {}x{} but the fixed image is {}x{}; register images of one size",
                    ms.0, ms.1, fs.0, fs.1
                )));
            }
            if fs.0 * fs.1 > MAX_REGISTER_PIXELS {
                return Err(ApiError::unprocessable(format!(
                    "{}x{} is more than the {MAX_REGISTER_PIXELS} pixels /v1/register takes",
                    fs.0, fs.1
                )));
            }
            reg.check_size(fs)
                .map_err(|e| ApiError::unprocessable(e.to_string()))?;
            let pair = RegPair {
                id: "upload".into(),
                modality: String::new(),
                moving_path: "<moving upload>".into(),
                fixed_path: "<fixed upload>".into(),
                moving,
                fixed,
                shape: fs,
                known_field: None,
                fixed_mask: None,
                prompt,
            };
            let done = reg
                .apply_pair(&pair)
                .map_err(|e| ApiError::internal(format!("registration: {e}")))?;
            let warped = medvlm_io::Plane::new(fs.0, fs.1, 1, done.warped)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            let npy = medvlm_io::npy::encode_npy_f32(&[2, fs.0, fs.1], &done.field)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            Ok(json!({
                "object": "registration",
                "registrar": name,
                "size": [fs.0, fs.1],
                "folding": done.folding,
                "mse_before": done.mse.0,
                "mse_after": done.mse.1,
                "warped_png": png_base64(&warped).map_err(ApiError::internal)?,
                "field_npy": base64::engine::general_purpose::STANDARD.encode(npy),
            }))
        })
        .await?;
        Ok(Json(v))
    })
    .await
}

/// `POST /v1/answer`: the answer to `question` about the image from a VQA answerer
/// (`--answerer DIR`), one of its training answers, with the classifier's probability.
pub async fn answer_question(State(svc): State<Service>, req: Request) -> Response {
    with_timeout(&svc, async {
        let payload = read_payload(&svc, req).await?;
        let (fields, image) = fields_and_image(payload, &["answerer", "question"])?;
        let question = fields
            .get("question")
            .map(|q| q.trim().to_string())
            .filter(|q| !q.is_empty())
            .ok_or_else(|| ApiError::unprocessable("field \"question\" is required (non-empty)"))?;
        let (name, ans) = pick(
            &svc.inner.heads.answerers,
            fields.get("answerer"),
            "answerer",
        )?;
        let name = name.clone();
        let device = svc.inner.opts.device.clone();
        let v = svc
            .inner
            .head_gate
            .run(move || {
                on_upload(&image, |path| {
                    let a = ans
                        .answer_files(&[path.to_path_buf()], &question, &device)
                        .map_err(|e| e.to_string())?
                        .remove(0);
                    Ok(json!({
                        "object": "answer",
                        "answerer": name,
                        "question": question,
                        "answer": a.answer,
                        "confidence": a.confidence,
                    }))
                })
            })
            .await?;
        Ok(Json(v))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(rows: usize, cols: usize) -> Vec<u8> {
        let plane = medvlm_io::Plane::new(rows, cols, 1, vec![0.5; rows * cols]).unwrap();
        medvlm_io::raster::encode_png(&plane).unwrap()
    }

    /// The shared path of every image head: only an upload that does not decode is a 415; a
    /// head that fails on an image that decodes answers 422 with its own message, the
    /// upload's temporary path hidden; the task reads the upload itself (once).
    #[test]
    fn head_failures_after_decoding_are_422_not_415() {
        let ok = on_upload(&png(4, 6), |path| {
            let p = read_upload_plane(path)?;
            Ok::<_, String>((p.rows, p.cols))
        })
        .unwrap();
        assert_eq!(ok, (4, 6));

        let e = on_upload(&png(4, 6), |path| {
            Err::<(), _>(format!("the head cannot read {}", path.display()))
        })
        .unwrap_err();
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", e.message);
        assert_eq!(e.message, "the head cannot read <upload>");

        // A task failing on an upload that does not decode: the upload's fault, whatever
        // the task said.
        let e = on_upload(b"\x89PNG\r\n\x1a\nbroken", |path| {
            Err::<(), _>(format!("head error on {}", path.display()))
        })
        .unwrap_err();
        assert_eq!(
            e.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{}",
            e.message
        );
        assert!(!e.message.contains("medvlm-upload-"), "{}", e.message);
        assert!(!e.message.contains("head error"), "{}", e.message);

        let e = on_upload(b"", |_| Ok::<_, String>(())).unwrap_err();
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", e.message);
    }
}
