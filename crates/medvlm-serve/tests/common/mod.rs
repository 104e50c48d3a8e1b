//! Helpers shared by the service tests.

use axum::body::Body;
use axum::http::{header, Request};

/// A `multipart/form-data` POST to `uri` with `(name, file name, bytes)` parts (a part with a
/// file name is a file).
#[allow(dead_code)] // each test binary uses its own subset
pub fn multipart(uri: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Request<Body> {
    let boundary = "medvlm-test-boundary-7f3a";
    let mut body = Vec::new();
    for (name, file, data) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match file {
            Some(f) => body.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    Request::post(uri)
        .header(
            header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Body::from(body))
        .unwrap()
}
