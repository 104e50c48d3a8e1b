//! The task-head routes (`/v1/segment`, `/v1/anomaly`, `/v1/report`, `/v1/detect`,
//! `/v1/upscale`, `/v1/register`): heads made with the library on a tiny phantom set and the
//! tiny CLIP fixture answer what the library answers for the same files, and the requests
//! that cannot work get JSON errors.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use base64::Engine as _;
use candle_core::Device;
use http_body_util::BodyExt;
use medvlm_phantoms::{write_dataset, DatasetConfig, Modality, StudyOptions};
use medvlm_serve::{Service, ServiceOptions, TaskHeads};
use medvlm_tasks::anomaly_pipeline::{fit, AnomalyDetector, AnomalyOptions, AnomalyTask};
use medvlm_tasks::segmentation_pipeline::{read_plane, train_and_save, Segmenter, TrainOptions};
use serde_json::{json, Value};
use tower::ServiceExt;

fn clip_fixture() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../medvlm-models/tests/fixtures/clip")
        .display()
        .to_string()
}

fn load_model() -> medvlm_models::LoadedModel {
    medvlm_models::load_model(&clip_fixture(), &Default::default()).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn call(router: &axum::Router, uri: &str, body: &Value) -> (StatusCode, Value) {
    let req = Request::builder()
        .method("POST")
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let s = resp.status();
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    (s, serde_json::from_slice(&b).unwrap())
}

/// A service on the tiny CLIP fixture serving `heads`, with default options.
fn router_with(heads: TaskHeads) -> axum::Router {
    Service::with_heads(
        "tiny-clip",
        load_model(),
        vec![],
        heads,
        ServiceOptions::default(),
    )
    .unwrap()
    .router()
}

/// An image file of the phantom set.
fn first_image(ph: &Path) -> PathBuf {
    std::fs::read_dir(ph.join("images"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
}

fn phantoms(dir: &Path) -> PathBuf {
    let out = dir.join("ph");
    write_dataset(&DatasetConfig {
        out: out.clone(),
        n: 24,
        seed: 4,
        modalities: vec![Modality::Dermoscopy],
        options: StudyOptions {
            size: 32,
            max_findings: 1,
            normal_fraction: 0.5,
            ..Default::default()
        },
        force: false,
    })
    .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_and_anomaly_answer_as_the_library() {
    let tmp = tempfile::tempdir().unwrap();
    let ph = phantoms(tmp.path());
    let manifest = ph.join("manifest.jsonl");
    let dev = Device::Cpu;
    let seg_dir = tmp.path().join("skin-seg");
    train_and_save(
        &manifest,
        None,
        &TrainOptions {
            model_spec: clip_fixture(),
            steps: Some(5),
            batch: Some(4),
            width: Some(8),
            lr: None,
            tower_lr: None,
            seed: 0,
            split: None,
            layers: Vec::new(),
            pixel_width: None,
            grey_standardise: None,
            lora: None,
            adapter: None,
        },
        &seg_dir,
        &dev,
    )
    .unwrap();
    let det_dir = tmp.path().join("skin-anomaly");
    let task = AnomalyTask::from_manifest(&manifest, None).unwrap();
    fit(
        load_model(),
        &clip_fixture(),
        &task,
        None,
        &AnomalyOptions {
            shots: 3,
            fpr: 0.2,
            ..Default::default()
        },
        &dev,
    )
    .unwrap()
    .save(&det_dir)
    .unwrap();

    let (seg, _) = Segmenter::load(&seg_dir, None, &dev).unwrap();
    let det = AnomalyDetector::load(&det_dir, None, &dev).unwrap();
    let heads = TaskHeads {
        segmenters: vec![(
            "skin-seg".into(),
            Arc::new(Segmenter::load(&seg_dir, None, &dev).unwrap().0),
        )],
        detectors: vec![(
            "skin-anomaly".into(),
            Arc::new(AnomalyDetector::load(&det_dir, None, &dev).unwrap()),
        )],
        ..Default::default()
    };
    let opts = ServiceOptions {
        timeout: std::time::Duration::from_secs(60),
        ..ServiceOptions::default()
    };
    let router = Service::with_heads("tiny-clip", load_model(), vec![], heads, opts)
        .unwrap()
        .router();

    let image = task
        .items
        .iter()
        .find(|i| !i.normal)
        .unwrap()
        .item
        .image
        .clone();
    let bytes = std::fs::read(&image).unwrap();

    // Segmentation: the same mask as the library on the same file.
    let (s, v) = call(
        &router,
        "/v1/segment",
        &json!({"prompt": "melanoma", "image": b64(&bytes)}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let plane = read_plane(&image).unwrap();
    let (text, _) = seg.prompt_embedding("melanoma", &dev).unwrap();
    let want = seg
        .segment_planes(std::slice::from_ref(&plane), &text, &dev)
        .unwrap()
        .remove(0);
    assert_eq!(
        v["area"].as_u64().unwrap() as usize,
        want.iter().map(|&m| m as usize).sum::<usize>()
    );
    assert_eq!(
        (v["width"].as_u64(), v["height"].as_u64()),
        (Some(plane.cols as u64), Some(plane.rows as u64))
    );
    let png = base64::engine::general_purpose::STANDARD
        .decode(v["mask_png"].as_str().unwrap())
        .unwrap();
    assert_eq!(&png[..4], b"\x89PNG");

    // Anomaly: the library's score and decision for the same file.
    let (s, v) = call(&router, "/v1/anomaly", &json!({"image": b64(&bytes)})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (_, scored, called) = det
        .predict_files(std::slice::from_ref(&image), Some("dermoscopy"), &dev)
        .unwrap()
        .remove(0);
    assert!(
        (v["score"].as_f64().unwrap() - scored.score as f64).abs() < 1e-6,
        "{v}"
    );
    assert_eq!(v["anomalous"].as_bool(), Some(called));
    assert_eq!(v["method"], "memory");
    assert_eq!(v["modality"], "dermoscopy");

    // Errors: no prompt, an unknown segmenter, an unknown modality.
    let (s, v) = call(&router, "/v1/segment", &json!({"image": b64(&bytes)})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (s, v) = call(
        &router,
        "/v1/segment",
        &json!({"segmenter": "x", "prompt": "a", "image": b64(&bytes)}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("skin-seg"));
    let (s, v) = call(
        &router,
        "/v1/anomaly",
        &json!({"modality": "chest_xray", "image": b64(&bytes)}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_answers_as_the_library() {
    use medvlm_tasks::report_findings::FindingsConfig;
    use medvlm_tasks::report_generation::ReportGenConfig;
    use medvlm_tasks::report_pipeline::{self, Decoding, ReportTrainOptions, Reporter};
    let tmp = tempfile::tempdir().unwrap();
    let ph = phantoms(tmp.path());
    let dev = Device::Cpu;
    // One reporter with the diagnosis prompt, one without (guidance is refused there).
    let train = |name: &str, prompt: Option<FindingsConfig>| {
        let dir = tmp.path().join(name);
        report_pipeline::train_and_save(
            &ph.join("manifest.jsonl"),
            &ReportTrainOptions {
                model_spec: clip_fixture(),
                config: ReportGenConfig {
                    width: 16,
                    layers: 1,
                    heads: 2,
                    prefix_len: 2,
                    epochs: 2,
                    batch: 8,
                    ..Default::default()
                },
                split: None,
                diagnosis_prompt: prompt,
                lexicon: None,
            },
            &dir,
            &dev,
            &mut |_, _| {},
        )
        .unwrap();
        dir
    };
    let dir = train(
        "skin-reports",
        Some(FindingsConfig {
            hidden: 8,
            steps: 20,
            ..Default::default()
        }),
    );
    let plain = train("plain-reports", None);
    let (lib, _) = Reporter::load(&dir, &dev).unwrap();
    let heads = TaskHeads {
        reporters: vec![
            (
                "skin-reports".into(),
                Arc::new(Reporter::load(&dir, &dev).unwrap().0),
            ),
            (
                "plain".into(),
                Arc::new(Reporter::load(&plain, &dev).unwrap().0),
            ),
        ],
        ..Default::default()
    };
    let router = router_with(heads);
    let image = first_image(&ph);
    let bytes = std::fs::read(&image).unwrap();
    for (beams, guidance, decoding) in [
        (json!(1), json!(null), Decoding::Greedy),
        (json!(2), json!(null), Decoding::Beam(2)),
        (
            json!(1),
            json!(2.5),
            Decoding::GreedyFaithful { guidance: 2.5 },
        ),
    ] {
        let mut body = json!({"image": b64(&bytes), "beams": beams, "reporter": "skin-reports"});
        if !guidance.is_null() {
            body["guidance"] = guidance.clone();
        }
        let (s, v) = call(&router, "/v1/report", &body).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        let want = lib
            .report_files(std::slice::from_ref(&image), decoding, &dev)
            .unwrap();
        assert_eq!(v["report"].as_str().unwrap(), want[0]);
        assert_eq!(v["reporter"], "skin-reports");
    }
    for (body, says) in [
        (json!({"beams": 0}), "beams"),
        (json!({"guidance": "lots"}), "guidance"),
        (json!({"guidance": 11}), "guidance"),
        (json!({"guidance": 1, "beams": 2}), "greedy"),
        (
            json!({"guidance": 1, "reporter": "plain"}),
            "without a diagnosis prompt",
        ),
    ] {
        let mut body = body;
        body["image"] = json!(b64(&bytes));
        if body.get("reporter").is_none() {
            body["reporter"] = json!("skin-reports");
        }
        let (s, v) = call(&router, "/v1/report", &body).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
        assert!(v.to_string().contains(says), "{v}");
    }
    let (s, v) = call(
        &router,
        "/v1/report",
        &json!({"image": b64(&bytes), "reporter": "x"}),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detect_answers_as_the_library() {
    use medvlm_tasks::detection_pipeline::{self, Detector};
    let tmp = tempfile::tempdir().unwrap();
    let ph = phantoms(tmp.path());
    let dev = Device::Cpu;
    let dir = tmp.path().join("skin-boxes");
    detection_pipeline::train_and_save(
        &ph.join("manifest.jsonl"),
        None,
        &detection_pipeline::TrainOptions {
            model_spec: clip_fixture(),
            steps: Some(5),
            batch: Some(4),
            width: Some(8),
            lr: None,
            seed: 0,
            split: None,
        },
        &dir,
        &dev,
    )
    .unwrap();
    let (lib, _) = Detector::load(&dir, None, &dev).unwrap();
    let class = lib.card.classes[0].name.clone();
    let heads = TaskHeads {
        box_detectors: vec![(
            "skin-boxes".into(),
            Arc::new(Detector::load(&dir, None, &dev).unwrap().0),
        )],
        ..Default::default()
    };
    let router = router_with(heads);
    let image = first_image(&ph);
    let bytes = std::fs::read(&image).unwrap();
    let (s, v) = call(
        &router,
        "/v1/detect",
        &json!({"image": b64(&bytes), "prompt": class, "min_score": 0.0}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (text, _) = lib.prompt_embedding(&class, false, &dev).unwrap();
    let want = lib
        .boxes_in_plane(&read_plane(&image).unwrap(), &text, 0.0, &dev)
        .unwrap();
    assert_eq!(
        v["grounding"],
        serde_json::to_value(&want.grounding).unwrap()
    );
    assert_eq!(
        v["detections"],
        serde_json::to_value(&want.detections).unwrap()
    );
    assert!(!want.detections.is_empty());
    assert_eq!(v["class"], json!(class));
    // An unknown class without free_text, and a bad min_score, are the request's fault.
    let (s, v) = call(
        &router,
        "/v1/detect",
        &json!({"image": b64(&bytes), "prompt": "a spaceship"}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    let (s, v) = call(
        &router,
        "/v1/detect",
        &json!({"image": b64(&bytes), "prompt": "a spaceship", "free_text": true}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["class"], Value::Null);
    let (s, v) = call(
        &router,
        "/v1/detect",
        &json!({"image": b64(&bytes), "prompt": class, "min_score": 2}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upscale_answers_as_the_library() {
    use medvlm_tasks::super_resolution::SrConfig;
    use medvlm_tasks::super_resolution_pipeline::{
        read_grey, train_upscaler, TrainOptions, Upscaler,
    };
    let tmp = tempfile::tempdir().unwrap();
    let ph = phantoms(tmp.path());
    let dev = Device::Cpu;
    let up = train_upscaler(
        &ph.join("manifest.jsonl"),
        &TrainOptions {
            config: SrConfig {
                scale: 2,
                features: 8,
                blocks: 1,
                patch: 16,
                steps: 3,
                batch: 2,
                ..Default::default()
            },
            split: None,
            max_images: Some(4),
            ..Default::default()
        },
        &dev,
        &mut |_, _| {},
    )
    .unwrap();
    let dir = tmp.path().join("sr2");
    up.save(&dir).unwrap();
    let lib = Upscaler::load(&dir, &dev).unwrap();
    let heads = TaskHeads {
        upscalers: vec![("sr2".into(), Arc::new(Upscaler::load(&dir, &dev).unwrap()))],
        ..Default::default()
    };
    let router = router_with(heads);
    let image = first_image(&ph);
    let bytes = std::fs::read(&image).unwrap();
    let (s, v) = call(&router, "/v1/upscale", &json!({"image": b64(&bytes)})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["scale"], 2);
    assert_eq!(v["output_size"], json!([64, 64]));
    // The PNG holds the library's output rounded to 8 bits.
    let png = base64::engine::general_purpose::STANDARD
        .decode(v["image_png"].as_str().unwrap())
        .unwrap();
    let out = tmp.path().join("out.png");
    std::fs::write(&out, png).unwrap();
    let got = read_grey(&out).unwrap();
    let want = lib.upscale(&read_grey(&image).unwrap()).unwrap();
    assert_eq!((got.rows, got.cols), (64, 64));
    assert_eq!(got.data.len(), want.len());
    for (g, w) in got.data.iter().zip(&want) {
        assert!((g - w).abs() <= 1.0 / 255.0 + 1e-6, "{g} vs {w}");
    }
    // An image too small to upscale is the request's fault.
    let small = tmp.path().join("small.png");
    medvlm_io::raster::write_png(
        &small,
        &medvlm_io::Plane::new(4, 4, 1, vec![0.5; 16]).unwrap(),
    )
    .unwrap();
    let (s, v) = call(
        &router,
        "/v1/upscale",
        &json!({"image": b64(&std::fs::read(&small).unwrap())}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("too small"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_answers_as_the_library() {
    use medvlm_tasks::registration::RegConfig;
    use medvlm_tasks::registration_pipeline::{load_pairs, read_grey, Registrar};
    let tmp = tempfile::tempdir().unwrap();
    let ph = phantoms(tmp.path());
    let dev = Device::Cpu;
    let pairs = load_pairs(&ph.join("manifest.jsonl"), None, Some(4)).unwrap();
    let cfg = RegConfig {
        width: 4,
        levels: 2,
        integration_steps: 3,
        steps: 3,
        batch: 2,
        ..RegConfig::default()
    };
    let reg = Registrar::train_on(&pairs, "tiny", &cfg, None, &dev, |_, _| {}).unwrap();
    let dir = tmp.path().join("reg");
    reg.save(&dir).unwrap();
    let heads = TaskHeads {
        registrars: vec![("reg".into(), Arc::new(Registrar::load(&dir, &dev).unwrap()))],
        ..Default::default()
    };
    let router = router_with(heads);
    // /v1/models lists the head with the route and the field that names it.
    let resp = router
        .clone()
        .oneshot(
            Request::builder()
                .uri("/v1/models")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    let models: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        models["heads"],
        json!([{"kind": "registrar", "name": "reg", "route": "/v1/register",
                "field": "registrar", "text_field": null}])
    );
    let pair = &pairs[0];
    let moving = std::fs::read(&pair.moving_path).unwrap();
    let fixed = std::fs::read(&pair.fixed_path).unwrap();
    let (s, v) = call(
        &router,
        "/v1/register",
        &json!({"moving": b64(&moving), "fixed": b64(&fixed)}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["size"], json!([32, 32]));
    let want = reg.apply_pair(pair).unwrap();
    assert_eq!(v["folding"].as_f64().unwrap(), want.folding);
    assert!((v["mse_after"].as_f64().unwrap() - want.mse.1).abs() < 1e-12);
    // The field comes back exactly; the warped image rounded to 8 bits.
    let npy = tmp.path().join("field.npy");
    let dec = |k: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(v[k].as_str().unwrap())
            .unwrap()
    };
    std::fs::write(&npy, dec("field_npy")).unwrap();
    let field = medvlm_io::npy::read_npy(&npy).unwrap();
    assert_eq!(field.shape, vec![2, 32, 32]);
    assert!(field
        .data
        .iter()
        .zip(&want.field)
        .all(|(a, b)| *a as f32 == *b));
    let png = tmp.path().join("warped.png");
    std::fs::write(&png, dec("warped_png")).unwrap();
    let (warped, shape) = read_grey(&png).unwrap();
    assert_eq!(shape, (32, 32));
    for (g, w) in warped.iter().zip(&want.warped) {
        assert!((g - w).abs() <= 1.0 / 255.0 + 1e-6, "{g} vs {w}");
    }

    // A multipart form with files named moving and fixed answers the same.
    let form = common::multipart(
        "/v1/register",
        &[
            ("moving", Some("m.png"), &moving),
            ("fixed", Some("f.png"), &fixed),
            ("registrar", None, b"reg"),
        ],
    );
    let resp = router.clone().oneshot(form).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    let f: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(f["field_npy"], v["field_npy"]);

    // Requests that cannot be registered are refused with the reason.
    let png_of = |n: usize| {
        let p = tmp.path().join(format!("grey{n}.png"));
        medvlm_io::raster::write_png(
            &p,
            &medvlm_io::Plane::new(n, n, 1, vec![0.5; n * n]).unwrap(),
        )
        .unwrap();
        std::fs::read(&p).unwrap()
    };
    for (body, needle) in [
        (json!({"moving": b64(&moving)}), "no image \"fixed\""),
        (
            json!({"moving": b64(&png_of(16)), "fixed": b64(&fixed)}),
            "16x16 but the fixed image is 32x32",
        ),
        (
            json!({"moving": b64(&png_of(30)), "fixed": b64(&png_of(30))}),
            "divisible by 2^levels",
        ),
        (
            json!({"moving": b64(&moving), "fixed": b64(&fixed), "registrar": "other"}),
            "no registrar named",
        ),
    ] {
        let (s, e) = call(&router, "/v1/register", &body).await;
        assert!(s.is_client_error(), "{e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(needle),
            "{needle}: {e}"
        );
    }
    let (s, e) = call(
        &router,
        "/v1/register",
        &json!({"moving": b64(b"not an image"), "fixed": b64(&fixed)}),
    )
    .await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{e}");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("moving image:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answer_answers_as_the_library() {
    use medvlm_tasks::vqa::VqaConfig;
    use medvlm_tasks::vqa_pipeline::{train_and_save, Answerer, VqaTrainOptions};
    let tmp = tempfile::tempdir().unwrap();
    let ph = phantoms(tmp.path());
    let dev = Device::Cpu;
    let dir = tmp.path().join("vqa");
    train_and_save(
        &ph.join("manifest.jsonl"),
        &VqaTrainOptions {
            model_spec: clip_fixture(),
            config: VqaConfig {
                hidden: 16,
                epochs: 2,
                ..Default::default()
            },
            split: None,
        },
        &dir,
        &dev,
        &mut |_, _, _| {},
    )
    .unwrap();
    let (lib, _) = Answerer::load(&dir, &dev).unwrap();
    let (served, _) = Answerer::load(&dir, &dev).unwrap();
    let router = router_with(TaskHeads {
        answerers: vec![("vqa".into(), Arc::new(served))],
        ..Default::default()
    });
    let image = first_image(&ph);
    let bytes = std::fs::read(&image).unwrap();
    let question = "Is this study normal?";
    let (s, v) = call(
        &router,
        "/v1/answer",
        &json!({"image": b64(&bytes), "question": question}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let want = lib
        .answer_files(std::slice::from_ref(&image), question, &dev)
        .unwrap()
        .remove(0);
    assert_eq!(v["answer"], want.answer.as_str());
    assert!((v["confidence"].as_f64().unwrap() as f32 - want.confidence).abs() < 1e-6);
    assert_eq!(v["answerer"], "vqa");
    // A question is required; an unknown answerer is named.
    for (body, needle) in [
        (
            json!({"image": b64(&bytes)}),
            "field \"question\" is required",
        ),
        (
            json!({"image": b64(&bytes), "question": "  "}),
            "is required",
        ),
        (
            json!({"image": b64(&bytes), "question": question, "answerer": "x"}),
            "no answerer named",
        ),
    ] {
        let (s, e) = call(&router, "/v1/answer", &body).await;
        assert!(s.is_client_error(), "{e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(needle),
            "{needle}: {e}"
        );
    }
}
