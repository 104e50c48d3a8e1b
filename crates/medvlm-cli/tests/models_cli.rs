//! End-to-end tests of `medvlm models`, `embed` and `zero-shot` on the tiny
//! CLIP / SigLIP parity fixtures of medvlm-models.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device};
use medvlm_models::preprocess::load_and_preprocess;
use medvlm_models::LoadOptions;

#[path = "../../medvlm-models/tests/support/fake_hub.rs"]
mod fake_hub;

fn fixture(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("medvlm-models")
        .join("tests")
        .join("fixtures")
        .join(family)
}

fn medvlm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_medvlm"))
        .args(args)
        // Tests never reach the network: an uncached hub model is an error, not a download.
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run medvlm")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A folder with the two fixture images (and optionally a broken one).
fn image_dir(family: &str, broken: bool) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(fixture(family).join("rgb.png"), d.path().join("a_rgb.png")).unwrap();
    std::fs::copy(
        fixture(family).join("grey.png"),
        d.path().join("b_grey.png"),
    )
    .unwrap();
    if broken {
        std::fs::write(d.path().join("c_broken.png"), b"\x89PNG\r\n\x1a\ntruncated").unwrap();
    }
    d
}

#[test]
fn models_lists_the_presets() {
    let out = medvlm(&["models"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "openai/clip-vit-base-patch16",
        "flaviagiammarino/pubmed-clip-vit-base-patch32",
        "vinid/plip",
        "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
        "google/siglip-base-patch16-224",
        "google/medsiglip-448",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    assert!(text
        .lines()
        .any(|l| l.contains("medsiglip-448") && l.contains("448")));
}

#[test]
fn embed_writes_raw_embeddings_and_sidecar_in_row_order() {
    let imgs = image_dir("clip", false);
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("emb.safetensors");
    let texts = out_dir.path().join("texts.txt");
    std::fs::write(&texts, "a photo of the x-ray\n\nchest x-ray\n").unwrap();
    let res = medvlm(&[
        "embed",
        "--model",
        s(&fixture("clip")),
        "--images",
        s(imgs.path()),
        "--out",
        s(&out),
        "--text",
        s(&texts),
        "--batch",
        "1",
    ]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    // stderr is a pipe here: progress comes as plain lines, and the last one says it is done.
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        stderr.contains("embedding: 2/2 images (100 %)") && stderr.contains("done in"),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\r') && !stderr.contains("\u{1b}["),
        "{stderr:?}"
    );
    let t = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert_eq!(t["image_embeds"].dims(), &[2, 24]);
    assert_eq!(t["text_embeds"].dims(), &[2, 24]);
    assert_eq!(t["image_embeds"].dtype(), DType::F32);

    // Same numbers as the library path (raw, not normalised).
    let m = medvlm_models::load_model(s(&fixture("clip")), &LoadOptions::default()).unwrap();
    let pre: Vec<Vec<f32>> = ["a_rgb.png", "b_grey.png"]
        .iter()
        .map(|f| load_and_preprocess(&imgs.path().join(f), &m.preprocess).unwrap())
        .collect();
    let want = m
        .model
        .encode_image(&m.preprocess.batch(&pre, &Device::Cpu).unwrap())
        .unwrap()
        .embeds;
    let diff = (&t["image_embeds"] - &want)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "{diff}");
    let norm = t["image_embeds"]
        .get(0)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    assert!(
        (norm.to_scalar::<f32>().unwrap() - 1.0).abs() > 1e-3,
        "embeddings look normalised"
    );

    let side: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.with_extension("json")).unwrap()).unwrap();
    let images: Vec<String> = serde_json::from_value(side["images"].clone()).unwrap();
    assert_eq!(images.len(), 2);
    assert!(images[0].ends_with("a_rgb.png") && images[1].ends_with("b_grey.png"));
    assert_eq!(
        side["texts"],
        serde_json::json!(["a photo of the x-ray", "chest x-ray"])
    );
    assert_eq!(side["family"], "clip");
}

#[test]
fn embed_skip_bad_counts_and_lists_unreadable_images() {
    let imgs = image_dir("siglip", true);
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("e.safetensors");
    let fixture_dir = fixture("siglip");
    let base = vec![
        "embed",
        "--model",
        s(&fixture_dir),
        "--images",
        s(imgs.path()),
        "--out",
        s(&out),
    ];
    let mut with_skip = base.clone();
    with_skip.push("--skip-bad");
    let fail = medvlm(&base);
    assert!(!fail.status.success());
    let err = String::from_utf8_lossy(&fail.stderr);
    assert!(
        err.matches("c_broken.png").count() == 1 && !err.contains("panicked"),
        "{err}"
    );
    assert!(!out.exists(), "no output on failure");

    let ok = medvlm(&with_skip);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let err = String::from_utf8_lossy(&ok.stderr);
    assert!(
        err.contains("skipped 1 unreadable image") && err.contains("c_broken.png"),
        "{err}"
    );
    let t = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert_eq!(t["image_embeds"].dims(), &[2, 32]);
    let side: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.with_extension("json")).unwrap()).unwrap();
    assert_eq!(side["skipped"].as_array().unwrap().len(), 1);
}

#[test]
fn zero_shot_prints_probabilities_and_writes_csv() {
    let imgs = image_dir("clip", false);
    let out_dir = tempfile::tempdir().unwrap();
    let csv = out_dir.path().join("p.csv");
    let res = medvlm(&[
        "zero-shot",
        "--model",
        s(&fixture("clip")),
        "--images",
        s(imgs.path()),
        "--classes",
        "the x-ray;a photo;chest",
        "--csv",
        s(&csv),
    ]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let text = String::from_utf8_lossy(&res.stdout).to_string();
    assert_eq!(std::fs::read_to_string(&csv).unwrap(), text);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "image,the x-ray,a photo,chest,prediction");
    assert_eq!(lines.len(), 3);
    for l in &lines[1..] {
        let f: Vec<&str> = l.split(',').collect();
        let p: Vec<f32> = f[1..4].iter().map(|x| x.parse().unwrap()).collect();
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-4, "{l}");
        let best = (0..3).fold(0, |b, i| if p[i] > p[b] { i } else { b });
        assert_eq!(f[4], ["the x-ray", "a photo", "chest"][best]);
    }

    // Prompt ensembles from JSON; SigLIP gives independent sigmoids.
    let prompts = out_dir.path().join("prompts.json");
    std::fs::write(
        &prompts,
        r#"[{"class": "xray", "prompts": ["a photo of the x-ray", "the x-ray"]},
            {"class": "chest", "prompts": ["chest"]}]"#,
    )
    .unwrap();
    let res = medvlm(&[
        "zero-shot",
        "--model",
        s(&fixture("siglip")),
        "--images",
        s(imgs.path()),
        "--prompts",
        s(&prompts),
    ]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let text = String::from_utf8_lossy(&res.stdout).to_string();
    assert!(text.starts_with("image,xray,chest,prediction\n"), "{text}");
}

/// Probability rows of a `medvlm zero-shot` CSV on stdout.
fn probability_rows(out: &Output) -> Vec<Vec<f64>> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            f[1..f.len() - 1]
                .iter()
                .map(|x| x.parse().unwrap())
                .collect()
        })
        .collect()
}

#[test]
fn zero_shot_mixture_ensemble_averages_the_prompts_probabilities() {
    let imgs = image_dir("clip", false);
    let dir = tempfile::tempdir().unwrap();
    let classes = dir.path().join("classes.json");
    std::fs::write(
        &classes,
        r#"[{"class": "xray", "prompts": ["a photo of the x-ray", "the x-ray"]},
            {"class": "chest", "prompts": ["chest"]}]"#,
    )
    .unwrap();
    // Every prompt as its own class: its probability under the plain model.
    let single = dir.path().join("single.json");
    std::fs::write(
        &single,
        r#"[{"class": "p0", "prompts": ["a photo of the x-ray"]},
            {"class": "p1", "prompts": ["the x-ray"]},
            {"class": "p2", "prompts": ["chest"]}]"#,
    )
    .unwrap();
    for family in ["clip", "siglip"] {
        let run = |prompts: &Path, ensemble: &str| {
            probability_rows(&medvlm(&[
                "zero-shot",
                "--model",
                s(&fixture(family)),
                "--images",
                s(imgs.path()),
                "--prompts",
                s(prompts),
                "--ensemble",
                ensemble,
            ]))
        };
        let mixture = run(&classes, "mixture");
        let mean = run(&classes, "mean");
        let per_prompt = run(&single, "mean");
        assert_eq!(mixture.len(), 2);
        let mut differs = false;
        for ((mix, avg), q) in mixture.iter().zip(&mean).zip(&per_prompt) {
            let expected = if family == "siglip" {
                // Independent sigmoids: the mean of the class's prompts' sigmoids.
                vec![(q[0] + q[1]) / 2.0, q[2]]
            } else {
                // Softmax: each class's mean of exp(logit), normalised over the classes.
                let (a, b) = ((q[0] + q[1]) / 2.0, q[2]);
                vec![a / (a + b), b / (a + b)]
            };
            for (got, want) in mix.iter().zip(&expected) {
                assert!(
                    (got - want).abs() < 2e-5,
                    "{family}: {mix:?} vs {expected:?}"
                );
            }
            differs |= mix.iter().zip(avg).any(|(a, b)| (a - b).abs() > 1e-5);
        }
        assert!(
            differs,
            "{family}: mixture and mean gave the same probabilities"
        );
    }
}

#[test]
fn bad_model_or_inputs_fail_cleanly() {
    let imgs = image_dir("clip", false);
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("e.safetensors");
    let empty_model = tempfile::tempdir().unwrap();
    std::fs::write(
        empty_model.path().join("config.json"),
        r#"{"model_type": "whisper"}"#,
    )
    .unwrap();
    for args in [
        vec![
            "embed",
            "--model",
            s(empty_model.path()),
            "--images",
            s(imgs.path()),
            "--out",
            s(&out),
        ],
        vec![
            "embed",
            "--model",
            "hf:nobody/nothing",
            "--images",
            s(imgs.path()),
            "--out",
            s(&out),
        ],
        vec![
            "embed",
            "--model",
            s(&fixture("clip")),
            "--images",
            "/no/such/dir",
            "--out",
            s(&out),
        ],
        vec![
            "zero-shot",
            "--model",
            s(&fixture("clip")),
            "--images",
            s(imgs.path()),
            "--classes",
            "one",
        ],
    ] {
        let r = medvlm(&args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{args:?} succeeded");
        assert!(
            err.starts_with("error:") && !err.contains("panicked"),
            "{err}"
        );
    }
    // Refused with the option and the reason, before any work.
    for (args, expect) in [
        (
            vec![
                "embed",
                "--model",
                s(&fixture("clip")),
                "--images",
                s(imgs.path()),
                "--out",
                s(&out),
                "--batch",
                "0",
            ],
            "must be at least 1",
        ),
        (
            vec![
                "zero-shot",
                "--model",
                s(&fixture("clip")),
                "--images",
                s(imgs.path()),
                "--classes",
                "lung;heart;lung",
            ],
            "names a class twice",
        ),
    ] {
        let r = medvlm(&args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(
            !r.status.success() && err.contains(expect),
            "{args:?}: {err}"
        );
        assert!(!out.exists());
    }
    let r = medvlm(&[
        "embed",
        "--model",
        s(empty_model.path()),
        "--images",
        s(imgs.path()),
        "--out",
        s(&out),
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("whisper") && err.contains("config.json"),
        "{err}"
    );
    let r = medvlm(&[
        "embed",
        "--model",
        "hf:nobody/nothing",
        "--images",
        s(imgs.path()),
        "--out",
        s(&out),
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("models--nobody--nothing"), "{err}");
}

#[test]
fn embed_reads_dicom_with_and_without_extension() {
    let d = tempfile::tempdir().unwrap();
    let (rows, cols) = (40usize, 36usize);
    let px: Vec<u16> = (0..rows * cols)
        .map(|i| ((i % cols) * 30 + (i / cols) * 7) as u16)
        .collect();
    let meta = medvlm_io::dicom::ScMetadata {
        modality: Some("CT".into()),
        window: Some((500.0, 800.0)),
        ..Default::default()
    };
    medvlm_io::dicom::write_secondary_capture(&d.path().join("a.dcm"), &px, rows, cols, &meta)
        .unwrap();
    std::fs::copy(d.path().join("a.dcm"), d.path().join("b_noext")).unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("e.safetensors");
    let res = medvlm(&[
        "embed",
        "--model",
        s(&fixture("clip")),
        "--images",
        s(d.path()),
        "--out",
        s(&out),
    ]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let t = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let e: Vec<Vec<f32>> = t["image_embeds"].to_vec2().unwrap();
    assert_eq!(e.len(), 2);
    let same = e[0].iter().zip(&e[1]).all(|(a, b)| (a - b).abs() < 1e-5);
    assert!(same, "same DICOM with and without extension");

    // The file's window (centre 500, width 800) is applied before the model,
    // with the DICOM linear VOI function (PS3.3 C.11.2.1.2.1).
    let m = medvlm_models::load_model(s(&fixture("clip")), &LoadOptions::default()).unwrap();
    let (c, w) = (500f64, 800f64);
    let windowed: Vec<f32> = px
        .iter()
        .map(|&v| (((v as f64 - (c - 0.5)) / (w - 1.0) + 0.5).clamp(0.0, 1.0)) as f32)
        .collect();
    let pre = m.preprocess.apply_array(&windowed, rows, cols, 1).unwrap();
    let want = m
        .model
        .encode_image(&m.preprocess.batch(&[pre], &Device::Cpu).unwrap())
        .unwrap()
        .embeds
        .to_vec2::<f32>()
        .unwrap();
    let diff = e[0]
        .iter()
        .zip(&want[0])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "{diff}");
}

#[test]
fn embed_follows_manifest_order() {
    let imgs = image_dir("clip", false);
    let manifest = imgs.path().join("m.jsonl");
    std::fs::write(
        &manifest,
        "{\"image\": \"b_grey.png\", \"label\": \"x\"}\n{\"image\": \"a_rgb.png\", \"label\": \"y\"}\n",
    )
    .unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("sub").join("e.safetensors");
    let res = medvlm(&[
        "embed",
        "--model",
        s(&fixture("clip")),
        "--images",
        s(&manifest),
        "--out",
        s(&out),
    ]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let side: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.with_extension("json")).unwrap()).unwrap();
    let images: Vec<String> = serde_json::from_value(side["images"].clone()).unwrap();
    assert!(images[0].ends_with("b_grey.png") && images[1].ends_with("a_rgb.png"));
    // Rows follow the manifest: row 0 is the grey image of the directory run's row 1.
    let dir_out = out_dir.path().join("d.safetensors");
    let res = medvlm(&[
        "embed",
        "--model",
        s(&fixture("clip")),
        "--images",
        s(imgs.path()),
        "--out",
        s(&dir_out),
    ]);
    assert!(res.status.success());
    let a = candle_core::safetensors::load(&out, &Device::Cpu).unwrap()["image_embeds"]
        .to_vec2::<f32>()
        .unwrap();
    let b = candle_core::safetensors::load(&dir_out, &Device::Cpu).unwrap()["image_embeds"]
        .to_vec2::<f32>()
        .unwrap();
    let close = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-5);
    assert!(close(&a[0], &b[1]) && close(&a[1], &b[0]));
    assert!(!close(&a[0], &b[0]));
}

/// `medvlm models pull` against the loopback hub double, then the model used by name:
/// offline from the cache, and pulled on first use when not cached.
#[test]
fn models_pull_then_offline_use_and_first_use_download() {
    use fake_hub::{FakeHub, FakeRepo};
    let f = fixture("clip");
    let read = |n: &str| std::fs::read(f.join(n)).unwrap();
    let repo = |seed: u8| {
        FakeRepo::new(seed)
            .file("config.json", read("config.json"), false)
            .file(
                "preprocessor_config.json",
                read("preprocessor_config.json"),
                false,
            )
            .file("tokenizer.json", read("tokenizer.json"), false)
            .file("model.safetensors", read("model.safetensors"), true)
            .file("flax_model.msgpack", vec![1u8; 300], true)
    };
    let hub = FakeHub::start(std::collections::BTreeMap::from([
        ("org/tiny".to_string(), repo(0x5a)),
        ("org/second".to_string(), repo(0x6b)),
    ]));
    let cache = tempfile::tempdir().unwrap();
    let online = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_medvlm"))
            .args(args)
            .env("HF_ENDPOINT", hub.endpoint())
            .env("HF_HUB_CACHE", cache.path())
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("HF_TOKEN")
            .output()
            .unwrap()
    };
    let r = online(&["models", "pull", "hf:org/tiny"]);
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(
        out.contains("4 files") && out.contains("sha256") && out.contains("git-sha1"),
        "{out}"
    );
    assert!(
        out.contains("flax_model.msgpack"),
        "the skipped file is listed: {out}"
    );
    assert_eq!(hub.gets("org/tiny/flax_model.msgpack"), 0);

    // Offline (--offline and a dead endpoint): the pulled model embeds from the cache.
    let imgs = image_dir("clip", false);
    let emb = tempfile::tempdir().unwrap();
    let r = Command::new(env!("CARGO_BIN_EXE_medvlm"))
        .args(["--offline", "embed", "--model", "hf:org/tiny", "--images"])
        .arg(imgs.path())
        .arg("--out")
        .arg(emb.path().join("a.safetensors"))
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env("HF_HUB_CACHE", cache.path())
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));

    // Offline and not cached: a clear error naming the cache folder, no download.
    let r = Command::new(env!("CARGO_BIN_EXE_medvlm"))
        .args(["--offline", "embed", "--model", "hf:org/second", "--images"])
        .arg(imgs.path())
        .arg("--out")
        .arg(emb.path().join("b.safetensors"))
        .env("HF_ENDPOINT", hub.endpoint())
        .env("HF_HUB_CACHE", cache.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("models--org--second"),
        "{err}"
    );
    assert_eq!(hub.gets("org/second/model.safetensors"), 0);

    // Online and not cached: pulled on first use, with a line per file on stderr.
    let r = online(&[
        "embed",
        "--model",
        "hf:org/second",
        "--images",
        s(imgs.path()),
        "--out",
        s(&emb.path().join("c.safetensors")),
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    assert!(
        err.contains("downloading hf:org/second") && err.contains("model.safetensors"),
        "{err}"
    );
    assert_eq!(hub.gets("org/second/model.safetensors"), 1);
    let a = std::fs::read(emb.path().join("a.safetensors")).unwrap();
    let c = std::fs::read(emb.path().join("c.safetensors")).unwrap();
    assert_eq!(
        a.len(),
        c.len(),
        "same model, same images, same embedding file size"
    );

    let r = online(&["models", "pull", s(&fixture("clip"))]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && err.contains("local folder"), "{err}");
}
