//! A loopback load test of the service (what `medvlm bench serve` runs): `clients`
//! concurrent HTTP/1.1 connections (keep-alive, one request at a time each, as a simple
//! client pool does) send the same JSON request until `requests` have been answered; every
//! answer is timed from the first byte written to the last byte read, and counted by status
//! (200, 429, anything else). The client is written here on tokio's TCP stream so that the
//! numbers include no third-party client's own queueing.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use medvlm_eval::latency::nearest_rank_percentile;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One load level: a route, a JSON body, the number of concurrent clients and of requests.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The route, e.g. `/v1/embeddings`.
    pub route: String,
    /// The JSON body sent with every request.
    pub body: Vec<u8>,
    /// Concurrent connections.
    pub clients: usize,
    /// Requests in all (shared by the clients).
    pub requests: usize,
    /// `Authorization: Bearer` key, when the service needs one.
    pub api_key: Option<String>,
}

/// What one load level measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadResult {
    /// The route.
    pub route: String,
    /// Concurrent connections.
    pub clients: usize,
    /// Requests answered.
    pub requests: usize,
    /// Answers with status 200.
    pub ok: usize,
    /// Answers with status 429 (queue full).
    pub rejected: usize,
    /// Other statuses, connection errors and unreadable answers.
    pub failed: usize,
    /// Wall-clock seconds of the level.
    pub seconds: f64,
    /// Successful requests per second.
    pub ok_per_second: f64,
    /// Median latency of the successful requests (ms).
    pub p50_ms: f64,
    /// 99th-percentile latency of the successful requests (ms; nearest rank).
    pub p99_ms: f64,
    /// Largest latency of the successful requests (ms).
    pub max_ms: f64,
}

/// The status of one HTTP/1.1 exchange on `stream`, reading the whole answer.
async fn exchange(stream: &mut TcpStream, request: &[u8]) -> std::io::Result<u16> {
    stream.write_all(request).await?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    let header_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status line"))?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .ok_or_else(|| std::io::Error::other("no Content-Length"))?;
    let mut have = buf.len() - header_end;
    while have < length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the answer was cut short",
            ));
        }
        have += n;
    }
    Ok(status)
}

fn request_bytes(spec: &LoadSpec, addr: SocketAddr) -> Vec<u8> {
    let mut head = format!(
        "POST {} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        spec.route,
        spec.body.len()
    );
    if let Some(k) = &spec.api_key {
        head.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(&spec.body);
    out
}

/// Runs one load level against the service at `addr`.
pub async fn drive(addr: SocketAddr, spec: &LoadSpec) -> LoadResult {
    let request = Arc::new(request_bytes(spec, addr));
    let next = Arc::new(AtomicUsize::new(0));
    let total = spec.requests;
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(spec.clients.max(1));
    for _ in 0..spec.clients.max(1) {
        let request = request.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut out: Vec<(u16, f64)> = Vec::new();
            let mut stream: Option<TcpStream> = None;
            while next.fetch_add(1, Ordering::Relaxed) < total {
                if stream.is_none() {
                    stream = TcpStream::connect(addr).await.ok();
                }
                let t0 = Instant::now();
                let status = match stream.as_mut() {
                    Some(s) => match exchange(s, &request).await {
                        Ok(code) => code,
                        Err(_) => {
                            // A broken connection is a failed request; reconnect for the next.
                            stream = None;
                            0
                        }
                    },
                    None => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        0
                    }
                };
                out.push((status, t0.elapsed().as_secs_f64() * 1000.0));
            }
            out
        }));
    }
    let mut answers = Vec::with_capacity(total);
    for t in tasks {
        answers.extend(t.await.unwrap_or_default());
    }
    let seconds = start.elapsed().as_secs_f64();
    let mut ok_ms: Vec<f64> = answers
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, ms)| *ms)
        .collect();
    ok_ms.sort_by(f64::total_cmp);
    let ok = ok_ms.len();
    let rejected = answers.iter().filter(|(s, _)| *s == 429).count();
    LoadResult {
        route: spec.route.clone(),
        clients: spec.clients.max(1),
        requests: answers.len(),
        ok,
        rejected,
        failed: answers.len() - ok - rejected,
        seconds,
        ok_per_second: ok as f64 / seconds.max(1e-9),
        p50_ms: nearest_rank_percentile(&ok_ms, 50.0),
        p99_ms: nearest_rank_percentile(&ok_ms, 99.0),
        max_ms: ok_ms.last().copied().unwrap_or(f64::NAN),
    }
}

/// Starts `service` on an ephemeral loopback port, runs every level in turn and stops the
/// service gracefully.
pub fn run_levels(
    service: crate::Service,
    levels: &[LoadSpec],
) -> Result<Vec<LoadResult>, crate::ServeError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("medvlm-bench-serve")
        .build()
        .map_err(crate::ServeError::Runtime)?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(crate::ServeError::Runtime)?;
        let addr = listener.local_addr().map_err(crate::ServeError::Runtime)?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(crate::run(listener, service, async move {
            let _ = stop_rx.await;
        }));
        let mut out = Vec::with_capacity(levels.len());
        for spec in levels {
            out.push(drive(addr, spec).await);
        }
        let _ = stop_tx.send(());
        match server.await {
            Ok(r) => r?,
            Err(_) => {
                return Err(crate::ServeError::Runtime(std::io::Error::other(
                    "the server task failed",
                )))
            }
        }
        Ok(out)
    })
}

/// A Markdown table of the levels.
pub fn render_table(results: &[LoadResult]) -> String {
    let mut s = String::from(
        "| route | clients | requests | 200 | 429 | failed | ok/s | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            r.route,
            r.clients,
            r.requests,
            r.ok,
            r.rejected,
            r.failed,
            r.ok_per_second,
            r.p50_ms,
            r.p99_ms,
            r.max_ms
        ));
    }
    s
}
