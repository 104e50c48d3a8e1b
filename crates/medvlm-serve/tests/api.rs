//! The router called in-process (`tower::ServiceExt::oneshot`, no ports) on the tiny
//! random-weight CLIP fixture: answers equal the library's computations, every error path is
//! a JSON error with its status, the queue refuses when full and batches concurrent images,
//! and the server finishes a request in flight when shut down.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use base64::Engine as _;
use candle_core::Device;
use common::multipart;
use http_body_util::BodyExt;
use medvlm_adapt::predictor::AdaptedModel;
use medvlm_io::medimage::Plane;
use medvlm_serve::{BatchConfig, Service, ServiceOptions};
use serde_json::{json, Value};
use tower::ServiceExt as _;

fn clip_fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../medvlm-models/tests/fixtures/clip")
}

fn load_model() -> medvlm_models::LoadedModel {
    medvlm_models::load_model(clip_fixture().to_str().unwrap(), &Default::default()).unwrap()
}

fn write_image(path: &Path, level: f32) {
    let data = (0..32 * 32 * 3)
        .map(|i| (level + 0.3 * ((i % 7) as f32 / 7.0)).min(1.0))
        .collect();
    let plane = Plane::new(32, 32, 3, data).unwrap();
    medvlm_io::raster::write_png(path, &plane).unwrap();
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn opts() -> ServiceOptions {
    ServiceOptions {
        batch: BatchConfig {
            max_batch: 8,
            max_wait: Duration::from_millis(1),
            queue: 16,
        },
        ..ServiceOptions::default()
    }
}

fn service(o: ServiceOptions) -> Service {
    Service::new("tiny-clip", load_model(), vec![], o).unwrap()
}

fn post_json(uri: &str, body: &Value) -> Request<Body> {
    Request::post(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

async fn call(router: &Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, headers, body)
}

async fn call_json(router: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let (s, h, b) = call(router, req).await;
    assert_eq!(
        h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()),
        Some("application/json"),
        "{s}: {}",
        String::from_utf8_lossy(&b)
    );
    (s, serde_json::from_slice(&b).unwrap())
}

fn row(t: &candle_core::Tensor, i: usize) -> Vec<f32> {
    let v = medvlm_models::vlm::l2_normalize(t).unwrap();
    v.to_vec2::<f32>().unwrap()[i].clone()
}

fn as_f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn assert_close(a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= tol, "{x} vs {y}");
    }
}

/// Asserts the body is `{"error": {"code": code, "message": ...}}` and returns the message.
fn error_of(v: &Value, code: &str) -> String {
    assert_eq!(v["error"]["code"], code, "{v}");
    v["error"]["message"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_equal_the_library_embeddings_of_the_same_image_and_text() {
    let d = tempfile::tempdir().unwrap();
    let png = d.path().join("a.png");
    write_image(&png, 0.3);
    let bytes = std::fs::read(&png).unwrap();
    let texts = vec![
        "a chest radiograph".to_string(),
        "an axial CT slice".to_string(),
    ];
    let m = load_model();
    let img = medvlm_models::embed::embed_image_files(
        &m,
        std::slice::from_ref(&png),
        1,
        false,
        &Device::Cpu,
        &|_| {},
    )
    .unwrap()
    .embeds
    .unwrap();
    let txt = medvlm_models::embed::embed_texts(&m, &texts, 8, &Device::Cpu).unwrap();

    let svc = service(opts());
    let router = svc.router();
    let (s, v) = call_json(
        &router,
        post_json(
            "/v1/embeddings",
            &json!({"model": "tiny-clip", "input": [texts[0], {"image": b64(&bytes)}, texts[1]]}),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "tiny-clip");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["index"], i);
        assert_eq!(d["object"], "embedding");
    }
    assert_close(&as_f32s(&data[0]["embedding"]), &row(&txt, 0), 1e-5);
    assert_close(&as_f32s(&data[1]["embedding"]), &row(&img, 0), 1e-5);
    assert_close(&as_f32s(&data[2]["embedding"]), &row(&txt, 1), 1e-5);
    let norm: f32 = as_f32s(&data[1]["embedding"]).iter().map(|x| x * x).sum();
    assert!((norm - 1.0).abs() < 1e-4);

    // The same image as a multipart upload, with a text part.
    let (s, v) = call_json(
        &router,
        multipart(
            "/v1/embeddings",
            &[
                ("image", Some("scan.png"), &bytes),
                ("text", None, texts[1].as_bytes()),
            ],
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_close(&as_f32s(&v["data"][0]["embedding"]), &row(&img, 0), 1e-5);
    assert_close(&as_f32s(&v["data"][1]["embedding"]), &row(&txt, 1), 1e-5);

    // DICOM and NIfTI uploads are read as medvlm embed reads the files.
    let io = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../medvlm-io/tests/data");
    let files = [
        io.join("CT_small.dcm"),
        io.join("anatomical.nii"),
        io.join("example_nifti2.nii.gz"),
    ];
    let lib = medvlm_models::embed::embed_image_files(&m, &files, 3, false, &Device::Cpu, &|_| {})
        .unwrap()
        .embeds
        .unwrap();
    for (i, f) in files.iter().enumerate() {
        let b = std::fs::read(f).unwrap();
        let (s, v) = call_json(
            &router,
            post_json("/v1/embeddings", &json!({"input": [{"image": b64(&b)}]})),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{}: {v}", f.display());
        assert_close(&as_f32s(&v["data"][0]["embedding"]), &row(&lib, i), 1e-5);
    }
    // An explicit window is applied to the DICOM plane (lung differs from the file's window).
    let ct = std::fs::read(&files[0]).unwrap();
    let (s, v) = call_json(
        &router,
        post_json(
            "/v1/embeddings",
            &json!({"input": [{"image": b64(&ct)}], "window": "lung"}),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let lung = as_f32s(&v["data"][0]["embedding"]);
    let auto = row(&lib, 0);
    assert!(lung.iter().zip(&auto).any(|(a, b)| (a - b).abs() > 1e-3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_shot_probabilities_equal_the_library_computation() {
    use medvlm_adapt::zero_shot::{class_prompt_embeddings, zero_shot_probabilities, Ensemble};
    let d = tempfile::tempdir().unwrap();
    let png = d.path().join("a.png");
    write_image(&png, 0.6);
    let bytes = std::fs::read(&png).unwrap();
    let m = load_model();
    let img = medvlm_models::embed::embed_image_files(&m, &[png], 1, false, &Device::Cpu, &|_| {})
        .unwrap()
        .embeds
        .unwrap();
    let router = service(opts()).router();

    let cases = [
        (
            json!({"image": b64(&bytes), "labels": ["effusion", "normal", "nodule"], "template": "a chest x-ray with {}"}),
            vec![
                (
                    "effusion".to_string(),
                    vec!["a chest x-ray with effusion".to_string()],
                ),
                (
                    "normal".to_string(),
                    vec!["a chest x-ray with normal".to_string()],
                ),
                (
                    "nodule".to_string(),
                    vec!["a chest x-ray with nodule".to_string()],
                ),
            ],
            Ensemble::Mean,
        ),
        (
            json!({"image": b64(&bytes), "ensemble": "mixture", "prompts": [
                {"class": "dark", "prompts": ["a dark image", "a black scan"]},
                {"class": "bright", "prompts": ["a bright image"]}]}),
            vec![
                (
                    "dark".to_string(),
                    vec!["a dark image".to_string(), "a black scan".to_string()],
                ),
                ("bright".to_string(), vec!["a bright image".to_string()]),
            ],
            Ensemble::Mixture,
        ),
    ];
    for (body, classes, ensemble) in cases {
        let names: Vec<String> = classes.iter().map(|(c, _)| c.clone()).collect();
        let pe = class_prompt_embeddings(&m, &classes, 8, &Device::Cpu).unwrap();
        let expected = zero_shot_probabilities(&m, &img, &names, &pe, ensemble).unwrap();
        let (s, v) = call_json(&router, post_json("/v1/zero-shot", &body)).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["activation"], "softmax");
        let probs = v["probabilities"].as_array().unwrap();
        assert_eq!(probs.len(), names.len());
        let mut last = f64::INFINITY;
        for p in probs {
            let c = p["class"].as_str().unwrap();
            let got = p["probability"].as_f64().unwrap();
            assert!(got <= last, "sorted by decreasing probability: {v}");
            last = got;
            let i = names.iter().position(|n| n == c).unwrap();
            assert!(
                (got as f32 - expected[0][i]).abs() <= 1e-6,
                "{c}: {got} vs {}",
                expected[0][i]
            );
        }
        assert_eq!(v["top"], probs[0]);
    }

    // Multipart: labels as a ';'-separated field.
    let (s, v) = call_json(
        &router,
        multipart(
            "/v1/zero-shot",
            &[("image", Some("x.png"), &bytes), ("labels", None, b"a;b")],
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["probabilities"].as_array().unwrap().len(), 2);
}

/// A linear-probe artefact written with the library pieces (as `medvlm adapt` does):
/// multi-class, or multi-label with conformal risk control calibrated on its own images.
fn write_artefact(dir: &Path, images: &[PathBuf], multilabel: bool, calibrated: bool) {
    use medvlm_adapt::artefact::{write_artefact_dir, AdaptCard, ADAPT_CARD, ADAPT_FORMAT};
    use medvlm_adapt::fewshot::{FewShotProtocol, TaskKind};
    use medvlm_adapt::method::{method_by_name, save_classifier, AdaptInput, SupportSet};
    use medvlm_adapt::prompts::{class_prompts, encode_class_texts, PromptSource};

    let spec = clip_fixture().to_str().unwrap().to_string();
    let m = load_model();
    let feats =
        medvlm_models::embed::embed_image_files(&m, images, 4, false, &Device::Cpu, &|_| {})
            .unwrap()
            .embeds
            .unwrap();
    let classes = vec!["dark".to_string(), "bright".to_string()];
    let prompts = class_prompts(
        &classes,
        &PromptSource::Templates(vec!["a {} image".into()]),
    )
    .unwrap();
    let texts = encode_class_texts(&m, &prompts, None, 8, &Device::Cpu).unwrap();
    let targets = vec![
        vec![true, false],
        vec![true, true],
        vec![false, true],
        vec![false, false],
    ];
    let support = if multilabel {
        SupportSet {
            features: feats.clone(),
            labels: medvlm_adapt::method::SupportLabels::MultiLabel(targets.clone()),
        }
    } else {
        SupportSet::multi_class(feats.clone(), vec![0, 0, 1, 1])
    };
    let clf = method_by_name("linear-probe", None)
        .unwrap()
        .fit(&AdaptInput::frozen(&texts, &support))
        .unwrap();
    let task = if multilabel {
        TaskKind::MultiLabel
    } else {
        TaskKind::MultiClass
    };
    let multilabel_metrics = multilabel.then(|| {
        let probs: Vec<f32> = clf
            .probabilities(&feats)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        medvlm_eval::evaluation::evaluate_multilabel(
            &probs,
            &targets,
            &classes,
            Some((&probs, &targets, "train".to_string())),
            0.3,
        )
        .unwrap()
    });
    // Multi-class with calibration: split-conformal APS calibrated on the support images.
    let metrics = (calibrated && !multilabel).then(|| {
        let probs: Vec<f32> = clf
            .probabilities(&feats)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let labels = [0, 0, 1, 1];
        let config = medvlm_eval::conformal::ConformalConfig {
            alpha: 0.4,
            ..Default::default()
        };
        medvlm_eval::evaluation::evaluate(
            &probs,
            &labels,
            2,
            Some((&probs, &labels, "train".to_string())),
            config,
        )
        .unwrap()
    });
    let protocol = FewShotProtocol::balanced(2, 0, task);
    write_artefact_dir(
        dir,
        |tmp| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            save_classifier(clf.as_ref(), tmp)?;
            let card = AdaptCard {
                format: ADAPT_FORMAT.into(),
                method: "linear-probe".into(),
                hyperparameters: clf.card().hyperparameters.clone(),
                model: spec.clone(),
                model_family: m.family.to_string(),
                model_fingerprint: String::new(),
                data: vec![],
                data_sha256: String::new(),
                label_field: "label".into(),
                filters: vec![],
                task,
                protocol_description: protocol.describe(),
                protocol,
                class_names: classes.clone(),
                prompts: prompts.clone(),
                negative_prompts: None,
                support: vec![],
                train_split: "train".into(),
                test_split: None,
                metrics: metrics.clone(),
                multilabel_metrics: multilabel_metrics.clone(),
                notes: vec![],
                medvlm_version: "test".into(),
            };
            std::fs::write(tmp.join(ADAPT_CARD), serde_json::to_vec(&card)?)?;
            Ok(())
        },
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predict_equals_predict_files_and_says_why_there_is_no_conformal_set() {
    let d = tempfile::tempdir().unwrap();
    let images: Vec<PathBuf> = (0..4)
        .map(|i| {
            let p = d.path().join(format!("{i}.png"));
            write_image(&p, 0.25 * i as f32);
            p
        })
        .collect();
    let dir = d.path().join("chest-lp");
    write_artefact(&dir, &images, false, false);
    let adapted = AdaptedModel::load(&dir, None, &Device::Cpu).unwrap();
    let expected = adapted
        .predict_files(&images, 4, false, &Device::Cpu, &|_| {})
        .unwrap();
    let svc = Service::new(
        "tiny-clip",
        load_model(),
        vec![(
            "chest-lp".into(),
            dir.clone(),
            AdaptedModel::load(&dir, None, &Device::Cpu).unwrap(),
        )],
        opts(),
    )
    .unwrap();
    let router = svc.router();
    for (i, img) in images.iter().enumerate() {
        let bytes = std::fs::read(img).unwrap();
        let (s, v) = call_json(
            &router,
            post_json(
                "/v1/predict",
                &json!({"artefact": "chest-lp", "image": b64(&bytes)}),
            ),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["method"], "linear-probe");
        assert_eq!(v["task"], "multi-class");
        for p in v["probabilities"].as_array().unwrap() {
            let c = if p["class"] == "dark" { 0 } else { 1 };
            let want = expected.probabilities[i * 2 + c];
            let got = p["probability"].as_f64().unwrap() as f32;
            assert!((got - want).abs() <= 1e-5, "image {i}: {got} vs {want}");
        }
        let want_top = if expected.probabilities[i * 2] >= expected.probabilities[i * 2 + 1] {
            "dark"
        } else {
            "bright"
        };
        assert_eq!(v["top"]["class"], want_top);
        assert!(v["conformal"].is_null());
        assert!(v["conformal_reason"]
            .as_str()
            .unwrap()
            .contains("no conformal calibration"));
        assert!(v["calibrated_probabilities"].is_null());
        assert!(v["calibration_reason"]
            .as_str()
            .unwrap()
            .contains("temperature"));
    }
    // The artefact alone is served, so its name may be left out; as a multipart upload.
    let bytes = std::fs::read(&images[3]).unwrap();
    let (s, v) = call_json(
        &router,
        multipart("/v1/predict", &[("image", Some("s.png"), &bytes)]),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let got = v["probabilities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["class"] == "bright")
        .unwrap()["probability"]
        .as_f64()
        .unwrap() as f32;
    assert!((got - expected.probabilities[7]).abs() <= 1e-5);

    let (s, v) = call_json(
        &router,
        post_json(
            "/v1/predict",
            &json!({"artefact": "nope", "image": b64(&bytes)}),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(error_of(&v, "not_found").contains("chest-lp"));

    let (s, v) = call_json(
        &router,
        Request::get("/v1/models").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["model"]["id"], "tiny-clip");
    assert_eq!(v["model"]["family"], "clip");
    assert_eq!(v["artefacts"][0]["name"], "chest-lp");
    assert_eq!(v["artefacts"][0]["method"], "linear-probe");
    assert_eq!(v["artefacts"][0]["task"], "multi-class");
    assert_eq!(v["artefacts"][0]["classes"], json!(["dark", "bright"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_json_errors_with_their_status() {
    let d = tempfile::tempdir().unwrap();
    let png = d.path().join("a.png");
    write_image(&png, 0.5);
    let bytes = std::fs::read(&png).unwrap();
    let router = service(ServiceOptions {
        max_body_bytes: 16384,
        ..opts()
    })
    .router();

    // 413: a body over the limit, declared or not.
    let big = json!({"input": "x".repeat(20000)});
    let (s, v) = call_json(&router, post_json("/v1/embeddings", &big)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(error_of(&v, "body_too_large").contains("16384"));
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        vec![Ok(vec![b' '; 9000]), Ok(vec![b' '; 9000])];
    let streamed = Request::post("/v1/embeddings")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap();
    let (s, v) = call_json(&router, streamed).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");

    // 415: not JSON or multipart; an image format medvlm does not read; a corrupt PNG.
    let req = Request::post("/v1/embeddings")
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from("hello"))
        .unwrap();
    let (s, v) = call_json(&router, req).await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(error_of(&v, "unsupported_media_type").contains("text/plain"));
    let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;";
    let (s, v) = call_json(
        &router,
        post_json("/v1/embeddings", &json!({"input": [{"image": b64(gif)}]})),
    )
    .await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(error_of(&v, "unsupported_media_type").contains("DICOM"));
    let mut broken = bytes[..40].to_vec();
    broken.extend_from_slice(&[0u8; 20]);
    let (s, v) = call_json(
        &router,
        post_json(
            "/v1/zero-shot",
            &json!({"image": b64(&broken), "labels": ["a", "b"]}),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let msg = error_of(&v, "unsupported_media_type");
    assert!(
        msg.contains("could not be decoded") && !msg.contains("medvlm-upload-"),
        "{msg}"
    );

    // 400: not JSON; not base64; a malformed form.
    let req = Request::post("/v1/embeddings")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{\"input\": "))
        .unwrap();
    let (s, v) = call_json(&router, req).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    error_of(&v, "bad_json");
    let (s, v) = call_json(
        &router,
        post_json(
            "/v1/embeddings",
            &json!({"input": [{"image": "not base64!!"}]}),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(error_of(&v, "bad_base64").contains("input[0].image"));
    let req = Request::post("/v1/zero-shot")
        .header(header::CONTENT_TYPE, "multipart/form-data; boundary=xyz")
        .body(Body::from(
            "--xyz\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc",
        ))
        .unwrap();
    let (s, v) = call_json(&router, req).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    error_of(&v, "bad_multipart");

    // 422: valid JSON, wrong fields.
    for (uri, body, needle) in [
        ("/v1/embeddings", json!({"inputs": ["x"]}), "inputs"),
        ("/v1/embeddings", json!({}), "input"),
        ("/v1/embeddings", json!({"input": [3]}), "input[0]"),
        ("/v1/embeddings", json!([1, 2]), "object"),
        (
            "/v1/embeddings",
            json!({"input": vec![json!({"image": "AAAA"}); 17]}),
            "split the request",
        ),
        (
            "/v1/zero-shot",
            json!({"image": b64(&bytes), "labels": ["only"]}),
            "two classes",
        ),
        ("/v1/zero-shot", json!({"image": b64(&bytes)}), "labels"),
        ("/v1/zero-shot", json!({"labels": ["a", "b"]}), "image"),
        (
            "/v1/zero-shot",
            json!({"image": b64(&bytes), "labels": ["a", "b"], "ensemble": "max"}),
            "ensemble",
        ),
        (
            "/v1/zero-shot",
            json!({"image": b64(&bytes), "labels": ["a", "a"]}),
            "twice",
        ),
        (
            "/v1/zero-shot",
            json!({"image": b64(&bytes), "labels": ["a", "b"], "window": "nonsense"}),
            "window",
        ),
        (
            "/v1/predict",
            json!({"image": b64(&bytes)}),
            "no adapted artefact",
        ),
    ] {
        let (s, v) = call_json(&router, post_json(uri, &body)).await;
        let expected = if needle == "no adapted artefact" {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        assert_eq!(s, expected, "{uri} {needle}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(needle),
            "{uri}: {msg:?} should name {needle:?}"
        );
    }
    // An unknown route and a wrong method are JSON too.
    let (s, v) = call_json(
        &router,
        Request::get("/v2/nothing").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    error_of(&v, "not_found");
    let (s, v) = call_json(
        &router,
        Request::get("/v1/embeddings").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    error_of(&v, "method_not_allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_label_artefact_with_conformal_risk_control_returns_its_label_set() {
    let d = tempfile::tempdir().unwrap();
    let images: Vec<PathBuf> = (0..4)
        .map(|i| {
            let p = d.path().join(format!("{i}.png"));
            write_image(&p, 0.25 * i as f32);
            p
        })
        .collect();
    let dir = d.path().join("findings");
    write_artefact(&dir, &images, true, false);
    let adapted = AdaptedModel::load(&dir, None, &Device::Cpu).unwrap();
    let expected = adapted
        .predict_files(&images, 4, false, &Device::Cpu, &|_| {})
        .unwrap();
    let report = adapted
        .card
        .multilabel_metrics
        .as_ref()
        .unwrap()
        .conformal_fnr_control
        .as_ref()
        .expect("the card was calibrated")
        .report
        .clone();
    let svc = Service::new(
        "tiny-clip",
        load_model(),
        vec![("findings".into(), dir, adapted)],
        opts(),
    )
    .unwrap();
    let router = svc.router();
    let names = ["dark", "bright"];
    for (i, img) in images.iter().enumerate() {
        let bytes = std::fs::read(img).unwrap();
        let (s, v) = call_json(
            &router,
            post_json("/v1/predict", &json!({"image": b64(&bytes)})),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        assert_eq!(v["task"], "multi-label");
        let p = &expected.probabilities[i * 2..i * 2 + 2];
        let want_set: Vec<&str> = names
            .iter()
            .zip(p)
            .filter(|(_, &q)| report.calibration_too_small || q >= report.threshold)
            .map(|(n, _)| *n)
            .collect();
        let c = &v["conformal"];
        assert_eq!(c["set"], json!(want_set), "{v}");
        assert_eq!(c["threshold"].as_f64().unwrap() as f32, report.threshold);
        assert_eq!(c["target_fnr"], 0.3);
        assert_eq!(c["calibration_source"], "train");
        let want_pred: Vec<&str> = names
            .iter()
            .zip(p)
            .filter(|(_, &q)| q >= 0.5)
            .map(|(n, _)| *n)
            .collect();
        let got_pred: Vec<&str> = v["predicted"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["class"].as_str().unwrap())
            .collect();
        let mut got_sorted = got_pred.clone();
        got_sorted.sort_by_key(|n| names.iter().position(|m| m == n));
        assert_eq!(got_sorted, want_pred);
    }
    let (_, v) = call_json(
        &router,
        Request::get("/v1/models").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(v["artefacts"][0]["conformal_sets"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn siglip_zero_shot_is_a_sigmoid_with_bias_equal_to_the_library() {
    use medvlm_adapt::zero_shot::{class_prompt_embeddings, zero_shot_probabilities, Ensemble};
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../medvlm-models/tests/fixtures/siglip");
    let load =
        || medvlm_models::load_model(fixture.to_str().unwrap(), &Default::default()).unwrap();
    let m = load();
    assert!(m.model.logit_bias().is_some());
    let d = tempfile::tempdir().unwrap();
    let png = d.path().join("a.png");
    write_image(&png, 0.45);
    let bytes = std::fs::read(&png).unwrap();
    let img = medvlm_models::embed::embed_image_files(
        &m,
        std::slice::from_ref(&png),
        1,
        false,
        &Device::Cpu,
        &|_| {},
    )
    .unwrap()
    .embeds
    .unwrap();
    let names: Vec<String> = ["fracture", "no fracture", "implant"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let classes: Vec<(String, Vec<String>)> = names
        .iter()
        .map(|n| (n.clone(), vec![format!("an x-ray of {n}")]))
        .collect();
    let pe = class_prompt_embeddings(&m, &classes, 8, &Device::Cpu).unwrap();
    let expected = zero_shot_probabilities(&m, &img, &names, &pe, Ensemble::Mean).unwrap();
    let router = Service::new("tiny-siglip", load(), vec![], opts())
        .unwrap()
        .router();
    let (s, v) = call_json(
        &router,
        post_json(
            "/v1/zero-shot",
            &json!({"image": b64(&bytes), "labels": names, "template": "an x-ray of {}"}),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["activation"], "sigmoid");
    for p in v["probabilities"].as_array().unwrap() {
        let i = names.iter().position(|n| p["class"] == n.as_str()).unwrap();
        let got = p["probability"].as_f64().unwrap() as f32;
        assert!(
            (got - expected[0][i]).abs() <= 1e-6,
            "{got} vs {}",
            expected[0][i]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predict_gives_the_split_conformal_set_the_card_calibrated() {
    let d = tempfile::tempdir().unwrap();
    let images: Vec<PathBuf> = (0..4)
        .map(|i| {
            let p = d.path().join(format!("{i}.png"));
            write_image(&p, 0.25 * i as f32);
            p
        })
        .collect();
    let dir = d.path().join("chest-cal");
    write_artefact(&dir, &images, false, true);
    let adapted = AdaptedModel::load(&dir, None, &Device::Cpu).unwrap();
    let expected = adapted
        .predict_files(&images, 4, false, &Device::Cpu, &|_| {})
        .unwrap();
    let card = medvlm_adapt::artefact::AdaptCard::read(&dir).unwrap();
    let predictor = card
        .metrics
        .as_ref()
        .unwrap()
        .conformal
        .as_ref()
        .unwrap()
        .predictor
        .clone()
        .unwrap();
    let sets = predictor.predict_sets(&expected.probabilities).unwrap();
    let svc = Service::new(
        "tiny-clip",
        load_model(),
        vec![("chest-cal".into(), dir.clone(), adapted)],
        opts(),
    )
    .unwrap();
    let router = svc.router();
    let names = ["dark", "bright"];
    for (i, img) in images.iter().enumerate() {
        let bytes = std::fs::read(img).unwrap();
        let (s, v) = call_json(
            &router,
            post_json(
                "/v1/predict",
                &json!({"artefact": "chest-cal", "image": b64(&bytes)}),
            ),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let c = &v["conformal"];
        assert!(c.is_object(), "{v}");
        let got: Vec<&str> = c["set"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap())
            .collect();
        let want: Vec<&str> = sets[i].iter().map(|&k| names[k]).collect();
        assert_eq!(got, want, "image {i}");
        assert_eq!(c["alpha"].as_f64(), Some(0.4));
        assert_eq!(c["q_hat"].as_f64(), predictor.q_hat);
        assert_eq!(c["n_calibration"], 4);
        // Temperature scaling fitted on the same calibration examples: the served calibrated
        // probabilities are softmax(ln p / T) of the classifier's, in the same order.
        let t = card.metrics.as_ref().unwrap().temperature.as_ref().unwrap();
        assert_eq!(
            v["calibration"]["temperature"].as_f64(),
            Some(t.fit.temperature)
        );
        let row = &expected.probabilities[i * 2..i * 2 + 2];
        let want = medvlm_eval::temperature::apply_temperature(row, 2, t.fit.temperature).unwrap();
        let cal = v["calibrated_probabilities"].as_array().unwrap();
        assert_eq!(cal[0]["class"], v["top"]["class"], "{v}");
        for p in cal {
            let k = names
                .iter()
                .position(|n| *n == p["class"].as_str().unwrap())
                .unwrap();
            let got = p["probability"].as_f64().unwrap() as f32;
            assert!(
                (got - want[k]).abs() <= 1e-5,
                "image {i}: {got} vs {}",
                want[k]
            );
        }
        assert!(v.get("calibration_reason").is_none(), "{v}");
    }
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(b: &[u8]) -> (u32, u32) {
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    (
        u32::from_be_bytes(b[16..20].try_into().unwrap()),
        u32::from_be_bytes(b[20..24].try_into().unwrap()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_is_the_windowed_image_as_png() {
    let router = service(opts()).router();
    let io = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../medvlm-io/tests/data");
    let ct = std::fs::read(io.join("CT_small.dcm")).unwrap();
    let mut pngs = Vec::new();
    for window in [None, Some("lung"), Some("-600/1500")] {
        let mut body = json!({"image": b64(&ct)});
        if let Some(w) = window {
            body["window"] = json!(w);
        }
        let (s, h, b) = call(&router, post_json("/v1/preview", &body)).await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
        assert_eq!(h.get(header::CONTENT_TYPE).unwrap(), "image/png");
        assert_eq!(png_size(&b), (128, 128));
        let used = h
            .get("x-medvlm-window")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        pngs.push((used, b));
    }
    assert!(pngs[0].0.contains("Auto"), "{}", pngs[0].0);
    // The lung preset is centre -600, width 1500: the same pixels as the explicit window,
    // and not those of the file's own window.
    assert_eq!(pngs[1].1, pngs[2].1);
    assert_ne!(pngs[0].1, pngs[1].1);
    // The decoded pixels, windowed by the library, are what the PNG holds.
    let img = medvlm_io::load_any(&io.join("CT_small.dcm")).unwrap();
    let plane = medvlm_io::preprocess::windowed_plane(
        &img,
        &medvlm_io::PlaneSelect::default(),
        &medvlm_io::Window::preset("lung").unwrap(),
    )
    .unwrap();
    assert_eq!(pngs[1].1, medvlm_io::raster::encode_png(&plane).unwrap());

    // Multipart, a raster image; an artefact name is refused; garbage is a 415.
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.png");
    write_image(&p, 0.3);
    let bytes = std::fs::read(&p).unwrap();
    let (s, _, b) = call(
        &router,
        multipart("/v1/preview", &[("image", Some("a.png"), &bytes)]),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(png_size(&b), (32, 32));
    let (s, v) = call_json(
        &router,
        post_json(
            "/v1/preview",
            &json!({"image": b64(&bytes), "artefact": "x"}),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (s, _) = call_json(
        &router,
        post_json(
            "/v1/preview",
            &json!({"image": b64(b"not an image at all")}),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn papers_are_filtered_as_medvlm_papers_filters_them_and_pages_are_served() {
    let router = service(opts()).router();
    let get = |uri: &str| Request::builder().uri(uri).body(Body::empty()).unwrap();
    let (s, all) = call_json(&router, get("/v1/papers")).await;
    assert_eq!(s, StatusCode::OK, "{all}");
    let total = all["total"].as_u64().unwrap() as usize;
    assert_eq!(all["count"].as_u64().unwrap() as usize, total);
    let catalogue = medvlm_papers::catalogue().unwrap();
    assert_eq!(total, catalogue.len());
    let (s, seg) = call_json(&router, get("/v1/papers?task=segmentation&q=")).await;
    assert_eq!(s, StatusCode::OK, "{seg}");
    let want = medvlm_papers::filter(
        &catalogue,
        &medvlm_papers::Filter {
            task: Some(medvlm_papers::parse_task("segmentation").unwrap()),
            ..Default::default()
        },
    );
    assert_eq!(seg["count"].as_u64().unwrap() as usize, want.len());
    assert!(!want.is_empty() && want.len() < total);
    for (p, w) in seg["data"].as_array().unwrap().iter().zip(&want) {
        assert_eq!(p["link"].as_str(), w.link.as_deref());
    }
    let (s, v) = call_json(&router, get("/v1/papers?colour=red")).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (s, v) = call_json(&router, get("/v1/papers?strategy=astrology")).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    for page in ["/", "/models", "/papers"] {
        let (s, h, b) = call(&router, get(page)).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        assert!(h
            .get(header::CONTENT_TYPE)
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        let html = String::from_utf8(b).unwrap();
        assert!(html.contains(r#"href="/papers""#), "{page}: no navigation");
    }
}
