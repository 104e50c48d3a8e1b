//! Behaviour under load and at the edges, deterministically: the worker is held
//! ([`medvlm_serve::Batcher::hold`]) while the queue fills, so a full queue answers 429 and
//! concurrent images are run as one batch; the API key; the metrics; the request timeout;
//! graceful shutdown; and the OpenAPI document against the router's routes.

use std::path::PathBuf;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use base64::Engine as _;
use http_body_util::BodyExt;
use medvlm_io::medimage::Plane;
use medvlm_serve::{BatchConfig, Service, ServiceOptions};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt as _;

fn clip_fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../medvlm-models/tests/fixtures/clip")
}

fn service(o: ServiceOptions) -> Service {
    let m =
        medvlm_models::load_model(clip_fixture().to_str().unwrap(), &Default::default()).unwrap();
    Service::new("tiny-clip", m, vec![], o).unwrap()
}

fn opts(max_batch: usize, max_wait: Duration, queue: usize) -> ServiceOptions {
    ServiceOptions {
        batch: BatchConfig {
            max_batch,
            max_wait,
            queue,
        },
        ..ServiceOptions::default()
    }
}

fn png_b64(level: f32) -> String {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("x.png");
    let data = (0..32 * 32 * 3)
        .map(|i| (level + 0.3 * ((i % 5) as f32 / 5.0)).min(1.0))
        .collect();
    medvlm_io::raster::write_png(&p, &Plane::new(32, 32, 3, data).unwrap()).unwrap();
    base64::engine::general_purpose::STANDARD.encode(std::fs::read(&p).unwrap())
}

fn embed_request(img: &str) -> Request<Body> {
    Request::post("/v1/embeddings")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            serde_json::to_vec(&json!({"input": [{"image": img}]})).unwrap(),
        ))
        .unwrap()
}

async fn send(router: Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
    let resp = router.oneshot(req).await.unwrap();
    let s = resp.status();
    let h = resp.headers().clone();
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&b).unwrap_or(Value::String(String::from_utf8_lossy(&b).into()));
    (s, h, v)
}

/// Polls a counter of the code under test (no timing assertion: only the harness bounds it).
async fn wait_until(mut cond: impl FnMut() -> bool) {
    while !cond() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_answers_429_with_retry_after() {
    let svc = service(opts(1, Duration::ZERO, 1));
    let router = svc.router();
    let img = png_b64(0.4);
    let hold = svc.batcher().hold();
    // A: taken by the worker, which is held before the model.
    let a = tokio::spawn(send(router.clone(), embed_request(&img)));
    let b = svc.batcher().clone();
    wait_until(|| b.waiting() == 1 && b.queued() == 0).await;
    // B: fills the one queue slot.
    let bq = tokio::spawn(send(router.clone(), embed_request(&img)));
    wait_until(|| b.queued() == 1).await;
    // C: refused.
    let (s, h, v) = send(router.clone(), embed_request(&img)).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(h.get(header::RETRY_AFTER).unwrap(), "1");
    assert_eq!(v["error"]["code"], "queue_full");
    drop(hold);
    let (sa, _, va) = a.await.unwrap();
    let (sb, _, vb) = bq.await.unwrap();
    assert_eq!((sa, sb), (StatusCode::OK, StatusCode::OK), "{va} {vb}");
    let (_, _, m) = send(
        router,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    let m = m.as_str().unwrap().to_string();
    assert!(m.contains("medvlm_queue_rejected_total 1\n"), "{m}");
    assert!(
        m.contains("medvlm_requests_total{route=\"/v1/embeddings\",status=\"429\"} 1\n"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_images_run_as_one_batch_and_the_metrics_count_them() {
    let n = 5;
    // max_wait far longer than the test: the batch closes because it is full.
    let svc = service(opts(n, Duration::from_secs(600), 16));
    let router = svc.router();
    let hold = svc.batcher().hold();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            tokio::spawn(send(
                router.clone(),
                embed_request(&png_b64(0.1 * i as f32)),
            ))
        })
        .collect();
    let b = svc.batcher().clone();
    wait_until(|| b.waiting() == n).await;
    assert_eq!(svc.metrics().forward_passes(), 0);
    drop(hold);
    for t in tasks {
        let (s, _, v) = t.await.unwrap();
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    assert_eq!(
        svc.metrics().forward_passes(),
        1,
        "{n} images in one forward pass"
    );
    let h = svc.metrics().batch_sizes();
    assert_eq!((h.count(), h.sum()), (1, n as f64));

    let (s, h, m) = send(
        router.clone(),
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(h[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let m = m.as_str().unwrap().to_string();
    for line in [
        "medvlm_requests_total{route=\"/v1/embeddings\",status=\"200\"} 5\n",
        "medvlm_request_duration_seconds_count{route=\"/v1/embeddings\"} 5\n",
        "medvlm_batch_size_bucket{le=\"4\"} 0\n",
        "medvlm_batch_size_bucket{le=\"8\"} 1\n",
        "medvlm_batch_size_count 1\n",
        "medvlm_forward_passes_total 1\n",
        "medvlm_queue_depth 0\n",
        "# TYPE medvlm_request_duration_seconds histogram\n",
        "medvlm_head_running 0\n",
        "medvlm_head_waiting 0\n",
        "# TYPE medvlm_head_rejected_total counter\nmedvlm_head_rejected_total 0\n",
    ] {
        assert!(m.contains(line), "missing {line:?} in\n{m}");
    }
    // /metrics counts itself from the next scrape on.
    let (_, _, m) = send(
        router,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert!(m
        .as_str()
        .unwrap()
        .contains("medvlm_requests_total{route=\"/metrics\",status=\"200\"} 1\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_guards_v1_routes_only_and_is_never_echoed() {
    let key = "s3cret-key-0123";
    let svc = service(ServiceOptions {
        api_key: Some(key.into()),
        ..opts(4, Duration::from_millis(1), 8)
    });
    let router = svc.router();
    let get = |auth: Option<&str>| {
        let mut r = Request::get("/v1/models");
        if let Some(a) = auth {
            r = r.header(header::AUTHORIZATION, a);
        }
        r.body(Body::empty()).unwrap()
    };
    for bad in [
        None,
        Some("Bearer wrong"),
        Some(key),
        Some("Basic czNjcmV0"),
    ] {
        let (s, h, v) = send(router.clone(), get(bad)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{bad:?}");
        assert_eq!(h[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(v["error"]["code"], "unauthorized");
        assert!(!v.to_string().contains(key));
    }
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let (s, _, _) = send(router.clone(), get(Some(&format!("{scheme} {key}")))).await;
        assert_eq!(s, StatusCode::OK, "{scheme}");
    }
    let mut req = embed_request(&png_b64(0.2));
    req.headers_mut().insert(
        header::AUTHORIZATION,
        format!("Bearer {key}").parse().unwrap(),
    );
    let (s, _, v) = send(router.clone(), req).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _, _) = send(router.clone(), embed_request(&png_b64(0.2))).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    for open in ["/healthz", "/readyz", "/metrics", "/openapi.json", "/"] {
        let (s, _, _) = send(
            router.clone(),
            Request::get(open).body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{open}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_an_answer_in_time_is_a_504() {
    let svc = service(ServiceOptions {
        timeout: Duration::from_millis(200),
        ..opts(1, Duration::ZERO, 4)
    });
    let hold = svc.batcher().hold();
    let (s, _, v) = send(svc.router(), embed_request(&png_b64(0.3))).await;
    assert_eq!(s, StatusCode::GATEWAY_TIMEOUT, "{v}");
    assert_eq!(v["error"]["code"], "timeout");
    drop(hold);
    let (s, _, v) = send(
        svc.router(),
        Request::get("/readyz").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["status"], "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_finishes_the_request_in_flight() {
    let svc = service(opts(1, Duration::ZERO, 4));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(medvlm_serve::run(listener, svc.clone(), async {
        let _ = stop_rx.await;
    }));
    let hold = svc.batcher().hold();
    let body = serde_json::to_vec(&json!({"input": [{"image": png_b64(0.7)}]})).unwrap();
    let client = tokio::spawn(async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&body).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).to_string()
    });
    let b = svc.batcher().clone();
    wait_until(|| b.waiting() == 1).await;
    stop_tx.send(()).unwrap();
    // The server has been told to stop while the request waits for the model.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !server.is_finished(),
        "the server must wait for the request in flight"
    );
    drop(hold);
    let resp = client.await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"embedding\""));
    server.await.unwrap().unwrap();
    // No new connection is accepted after shutdown.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[test]
fn the_openapi_document_describes_every_route_of_the_router() {
    let doc: Value = serde_json::from_str(medvlm_serve::openapi::OPENAPI_JSON).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    let routes = medvlm_serve::routes();
    for r in &routes {
        let m = r.method.as_str().to_ascii_lowercase();
        assert!(
            paths.get(r.path).and_then(|p| p.get(&m)).is_some(),
            "{} {} is not in assets/openapi.json",
            r.method,
            r.path
        );
    }
    for (p, ops) in paths {
        for m in ops.as_object().unwrap().keys() {
            assert!(
                routes
                    .iter()
                    .any(|r| r.path == p && r.method.as_str().eq_ignore_ascii_case(m)),
                "openapi.json documents {m} {p}, which the router does not serve"
            );
        }
    }
}

#[test]
fn the_load_test_counts_every_answer_of_a_level() {
    use medvlm_serve::load_test::{run_levels, LoadSpec};
    let svc = service(opts(8, Duration::from_millis(2), 64));
    let body = serde_json::json!({"input": ["a chest x-ray", "a brain mri"]}).to_string();
    let levels: Vec<LoadSpec> = [1, 4]
        .into_iter()
        .map(|clients| LoadSpec {
            route: "/v1/embeddings".into(),
            body: body.clone().into_bytes(),
            clients,
            requests: 12,
            api_key: None,
        })
        .collect();
    // A route that does not exist: every answer is counted as failed, none as ok.
    let missing = LoadSpec {
        route: "/v1/nothing".into(),
        ..levels[0].clone()
    };
    let mut all = levels.clone();
    all.push(missing);
    let r = run_levels(svc, &all).unwrap();
    for (res, spec) in r.iter().zip(&all) {
        assert_eq!(res.requests, 12, "{res:?}");
        assert_eq!(res.clients, spec.clients);
    }
    for res in &r[..2] {
        assert_eq!((res.ok, res.rejected, res.failed), (12, 0, 0), "{res:?}");
        assert!(
            res.p50_ms <= res.p99_ms && res.p99_ms <= res.max_ms,
            "{res:?}"
        );
        assert!(res.ok_per_second > 0.0);
    }
    assert_eq!((r[2].ok, r[2].failed), (0, 12), "{:?}", r[2]);
}
