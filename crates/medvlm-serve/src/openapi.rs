//! The OpenAPI 3 document of the service (`/openapi.json`), written by hand in
//! `assets/openapi.json` and embedded in the binary.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// The OpenAPI 3 document, as served.
pub const OPENAPI_JSON: &str = include_str!("../assets/openapi.json");

/// `GET /openapi.json`.
pub async fn openapi_json() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}
