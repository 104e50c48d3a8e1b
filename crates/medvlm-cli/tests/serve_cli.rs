//! `medvlm serve` end to end: the real binary on a free loopback port (read from its stderr),
//! called over plain TCP with the API key; a real DICOM upload is embedded as
//! `medvlm_models::embed` embeds the file, and neither the response nor the access log
//! carries the file's patient name; SIGTERM stops it cleanly.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn clip_fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../medvlm-models/tests/fixtures/clip")
}

fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[cfg(unix)]
#[test]
fn the_binary_serves_embeddings_behind_the_key_and_stops_on_sigterm() {
    use base64::Engine as _;
    let d = tempfile::tempdir().unwrap();
    let key_file = d.path().join("key");
    std::fs::write(&key_file, "k-9f2c1e\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_medvlm"))
        .args(["-v", "serve", "--model"])
        .arg(clip_fixture())
        .args(["--addr", "127.0.0.1:0", "--api-key-file"])
        .arg(&key_file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    let addr: SocketAddr = loop {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            panic!("medvlm serve exited before listening:\n{log}");
        }
        log.push_str(&line);
        if let Some(a) = line.trim().split("listening on http://").nth(1) {
            break a.parse().unwrap();
        }
    };
    assert!(addr.ip().is_loopback());

    let (s, body) = http(addr, "GET", "/healthz", None, "");
    assert_eq!((s, body.contains("ok")), (200, true), "{body}");
    let (s, body) = http(addr, "GET", "/v1/models", None, "");
    assert_eq!(s, 401, "{body}");

    let dcm =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../medvlm-io/tests/data/CT_small.dcm");
    let bytes = std::fs::read(&dcm).unwrap();
    assert!(
        bytes.windows(17).any(|w| w == b"CompressedSamples"),
        "the test file carries a patient name"
    );
    let req = serde_json::json!({"input": [{"image": base64::engine::general_purpose::STANDARD.encode(&bytes)}]});
    let (s, body) = http(
        addr,
        "POST",
        "/v1/embeddings",
        Some("k-9f2c1e"),
        &req.to_string(),
    );
    assert_eq!(s, 200, "{body}");
    assert!(!body.contains("CompressedSamples"));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let got: Vec<f32> = v["data"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let m =
        medvlm_models::load_model(clip_fixture().to_str().unwrap(), &Default::default()).unwrap();
    let e = medvlm_models::embed::embed_image_files(
        &m,
        &[dcm],
        1,
        false,
        &candle_core::Device::Cpu,
        &|_| {},
    )
    .unwrap()
    .embeds
    .unwrap();
    let want = medvlm_models::vlm::l2_normalize(&e)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()[0]
        .clone();
    assert_eq!(got.len(), want.len());
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
    }

    // SIGTERM: a clean stop.
    // SAFETY: sends a signal to the child this test started.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    stderr.read_to_string(&mut log).unwrap();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("medvlm serve: stopped"), "{log}");
    // The access log names routes and statuses, never the key or the patient.
    assert!(
        log.contains("route=/v1/embeddings") && log.contains("status=200"),
        "{log}"
    );
    assert!(
        log.contains("status=401 error_code=\"unauthorized\""),
        "{log}"
    );
    assert!(
        !log.contains("k-9f2c1e") && !log.contains("CompressedSamples"),
        "{log}"
    );
}
