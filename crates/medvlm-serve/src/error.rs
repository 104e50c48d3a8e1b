//! Errors: [`ServeError`] for starting the service, [`ApiError`] for one request (always
//! answered as JSON `{"error": {"code": ..., "message": ...}}`).

use std::path::PathBuf;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The base model did not load.
    #[error("loading model {spec}")]
    Model {
        /// The model spec.
        spec: String,
        /// The cause.
        #[source]
        source: medvlm_models::ModelError,
    },
    /// An adapted artefact did not load.
    #[error("loading adapted artefact {dir}")]
    Artefact {
        /// The artefact folder.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: Box<medvlm_adapt::predictor::PredictError>,
    },
    /// Two artefacts would be served under the same name.
    #[error("two adapted artefacts are named {name:?} ({first} and {second}); rename a folder")]
    DuplicateName {
        /// The name (folder name).
        name: String,
        /// The first folder.
        first: PathBuf,
        /// The second folder.
        second: PathBuf,
    },
    /// An artefact folder has no usable name.
    #[error(
        "adapted artefact {0}: cannot take a name from this path (use a folder with a UTF-8 name)"
    )]
    NoName(PathBuf),
    /// A segmenter or anomaly detector folder did not load.
    #[error("task head {dir}: {reason}")]
    Head {
        /// The folder.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// The API key file is unreadable or empty.
    #[error("API key file {path}: {reason}")]
    ApiKey {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A limit is out of range.
    #[error("{option}: {reason}")]
    Limit {
        /// The option (`--max-batch`, ...).
        option: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The address could not be bound, or the server failed.
    #[error("{what} {addr}")]
    Net {
        /// What was done.
        what: &'static str,
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The async runtime or the model worker thread could not start.
    #[error("starting the async runtime or the model worker thread")]
    Runtime(#[source] std::io::Error),
}

/// The code of an error response, kept in its extensions for the access log.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

/// An error answered to a client: an HTTP status, a stable machine-readable code and a
/// message naming the reason (never patient data, never the API key).
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code, e.g. `bad_json`, `unsupported_media_type`, `queue_full`.
    pub code: &'static str,
    /// Human-readable reason.
    pub message: String,
    /// `Retry-After` seconds (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
    /// 400: the body is not valid JSON, base64 or multipart.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    /// 422: valid JSON with wrong or missing fields.
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    }
    /// 415: a content type or image format the service does not read.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            message,
        )
    }
    /// 404: an unknown artefact or model name.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    /// 500: the model failed.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut resp = (self.status, axum::Json(body)).into_response();
        // For the access log: the code only, never the message.
        resp.extensions_mut().insert(ErrorCode(self.code));
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
