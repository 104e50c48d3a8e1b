//! `medvlm_models::hub::pull` against a loopback double of the Hugging Face hub
//! (tests/support/fake_hub.rs): the files land in the standard cache layout, are verified
//! against their etags, gated repos need the token, offline mode never connects, and what a
//! repo lacks (a tokenizer.json, a BiomedCLIP text tower's files) is made once.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::Device;
use medvlm_models::hub::{pull, HubOptions, NoProgress, PullProgress};
use medvlm_models::source::resolve_in_cache;
use medvlm_models::{load_model_dir, LoadOptions};
use support::fake_hub::{FakeHub, FakeRepo};
use support::{fixture, max_abs_diff};

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The CLIP parity fixture as a hub repo, with files medvlm must not fetch beside it.
fn clip_repo() -> FakeRepo {
    let f = fixture("clip");
    FakeRepo::new(0xab)
        .file("config.json", read(&f.join("config.json")), false)
        .file(
            "preprocessor_config.json",
            read(&f.join("preprocessor_config.json")),
            false,
        )
        .file("tokenizer.json", read(&f.join("tokenizer.json")), false)
        .file(
            "tokenizer_config.json",
            read(&f.join("tokenizer_config.json")),
            false,
        )
        .file(
            "model.safetensors",
            read(&f.join("model.safetensors")),
            true,
        )
        .file(
            "pytorch_model.bin",
            read(&f.join("pytorch_model.bin")),
            true,
        )
        .file("tf_model.h5", vec![7u8; 1000], true)
        .file("README.md", b"# tiny\n".to_vec(), false)
}

fn options(hub: &FakeHub, cache: &Path) -> HubOptions {
    HubOptions {
        cache_dir: cache.to_path_buf(),
        endpoint: Some(hub.endpoint()),
        offline: false,
        token: None,
    }
}

fn embed_texts_of(dir: &Path) -> candle_core::Tensor {
    let m = load_model_dir(dir, &LoadOptions::default()).unwrap();
    let texts = vec!["a chest x-ray".to_string(), "photo of a lung".to_string()];
    let tokens = m.tokenizer.encode_batch(&texts, &Device::Cpu).unwrap();
    m.model.encode_text(&tokens).unwrap().embeds
}

#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<String>>,
}

impl PullProgress for Recorder {
    fn start(&self, repo: &str, files: usize, bytes: u64) {
        self.events
            .lock()
            .unwrap()
            .push(format!("start {repo} {files} {bytes}"));
    }
    fn bytes(&self, done: u64, total: u64) {
        assert!(done <= total, "{done} > {total}");
    }
    fn file_done(&self, name: &str, size: u64) {
        self.events
            .lock()
            .unwrap()
            .push(format!("done {name} {size}"));
    }
}

#[test]
fn pull_fetches_what_medvlm_reads_verifies_it_and_loads() {
    let repo = clip_repo();
    let weights_len = repo.files["model.safetensors"].len();
    let hub = FakeHub::start(BTreeMap::from([(
        "org/tiny-clip".to_string(),
        repo.clone(),
    )]));
    let cache = tempfile::tempdir().unwrap();
    let rec = Arc::new(Recorder::default());
    let report = pull(
        "org/tiny-clip",
        None,
        &options(&hub, cache.path()),
        rec.clone(),
    )
    .unwrap();

    assert_eq!(report.commit, repo.commit);
    let names: Vec<&str> = report.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "config.json",
            "preprocessor_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "model.safetensors"
        ]
    );
    assert_eq!(
        report.skipped,
        ["README.md", "pytorch_model.bin", "tf_model.h5"]
    );
    let weights = report
        .files
        .iter()
        .find(|f| f.name == "model.safetensors")
        .unwrap();
    assert_eq!(
        (weights.check, weights.size as usize),
        ("sha256", weights_len)
    );
    assert!(report
        .files
        .iter()
        .filter(|f| f.name.ends_with(".json"))
        .all(|f| f.check == "git-sha1"));
    assert_eq!(hub.gets("org/tiny-clip/tf_model.h5"), 0);
    assert_eq!(hub.gets("org/tiny-clip/pytorch_model.bin"), 0);
    let events = rec.events.lock().unwrap().clone();
    assert!(
        events[0].starts_with("start org/tiny-clip 5 "),
        "{events:?}"
    );
    assert_eq!(events.len(), 6, "{events:?}");

    // The standard layout: refs/main names the commit, the snapshot resolves offline, and the
    // model loads from it with the same text embeddings as from the fixture folder.
    let snap = resolve_in_cache(cache.path(), "org/tiny-clip", None).unwrap();
    assert_eq!(snap, report.snapshot);
    let d = max_abs_diff(&embed_texts_of(&snap), &embed_texts_of(&fixture("clip")));
    assert_eq!(d, 0.0);

    // A second pull re-verifies the cached files without downloading them again.
    let again = pull(
        "org/tiny-clip",
        None,
        &options(&hub, cache.path()),
        Arc::new(NoProgress),
    )
    .unwrap();
    assert_eq!(again.files.len(), 5);
    assert_eq!(hub.gets("org/tiny-clip/model.safetensors"), 1);

    // Offline: the cached model resolves with no hub at all (a closed port).
    let offline = HubOptions {
        cache_dir: cache.path().to_path_buf(),
        endpoint: Some("http://127.0.0.1:9".into()),
        offline: true,
        token: None,
    };
    let r = pull("org/tiny-clip", None, &offline, Arc::new(NoProgress)).unwrap();
    assert_eq!(r.snapshot, snap);
}

#[test]
fn corrupt_download_gated_repo_offline_miss_and_missing_repo_are_clear_errors() {
    let mut bad = clip_repo();
    bad.corrupt.insert("model.safetensors".into());
    let mut gated = clip_repo();
    gated.token = Some("hf_secret".into());
    let hub = FakeHub::start(BTreeMap::from([
        ("org/bad".to_string(), bad),
        ("google/gated".to_string(), gated),
    ]));
    let cache = tempfile::tempdir().unwrap();
    let opts = options(&hub, cache.path());

    let err = pull("org/bad", None, &opts, Arc::new(NoProgress))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("sha256") && err.contains("differs"),
        "{err}"
    );

    let err = pull("google/gated", None, &opts, Arc::new(NoProgress))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HF_TOKEN") && err.contains("google/gated"),
        "{err}"
    );
    let with_token = HubOptions {
        token: Some("hf_secret".into()),
        ..opts.clone()
    };
    let ok = pull("google/gated", None, &with_token, Arc::new(NoProgress)).unwrap();
    assert_eq!(ok.files.len(), 5);

    let err = pull("org/none", None, &opts, Arc::new(NoProgress))
        .unwrap_err()
        .to_string();
    assert!(err.contains("hf:org/none@main"), "{err}");

    let offline = HubOptions {
        offline: true,
        ..opts.clone()
    };
    let before = hub.requests.load(std::sync::atomic::Ordering::SeqCst);
    let err = pull("org/elsewhere", None, &offline, Arc::new(NoProgress))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("offline") && err.contains("models--org--elsewhere"),
        "{err}"
    );
    assert_eq!(
        hub.requests.load(std::sync::atomic::Ordering::SeqCst),
        before
    );

    let unreachable = HubOptions {
        endpoint: Some("http://127.0.0.1:9".into()),
        ..opts
    };
    let err = pull("org/tiny", None, &unreachable, Arc::new(NoProgress))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("HF_HUB_OFFLINE") && err.contains("127.0.0.1:9"),
        "{err}"
    );
}

/// BERT WordPiece vocabulary lines of the BiomedCLIP fixture's tokenizer, in id order.
fn vocab_txt(tokenizer_json: &Path) -> Vec<u8> {
    let t: serde_json::Value = serde_json::from_slice(&read(tokenizer_json)).unwrap();
    let vocab = t["model"]["vocab"].as_object().unwrap();
    let mut pairs: Vec<(u64, &str)> = vocab
        .iter()
        .map(|(k, v)| (v.as_u64().unwrap(), k.as_str()))
        .collect();
    pairs.sort();
    for (i, (id, _)) in pairs.iter().enumerate() {
        assert_eq!(*id as usize, i, "the fixture vocabulary has a gap");
    }
    pairs
        .iter()
        .map(|(_, t)| format!("{t}\n"))
        .collect::<String>()
        .into_bytes()
}

#[test]
fn open_clip_repo_gets_its_text_tower_files_and_a_converted_tokenizer() {
    let f = fixture("biomedclip");
    let text_repo = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract";
    // The open_clip config without the medvlm_arch block a hub repo does not have; the
    // BERT config comes from the text tower's repo, as open_clip reads it.
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&read(&f.join("open_clip_config.json"))).unwrap();
    let arch = cfg.as_object_mut().unwrap().remove("medvlm_arch").unwrap();
    let mut bert = arch["text"].clone();
    bert["model_type"] = "bert".into();
    bert["architectures"] = serde_json::json!(["BertForMaskedLM"]);
    // The vision tower's shape must come from somewhere: open_clip takes it from the timm
    // name; the fixture's is not a real timm size, so this test keeps it in the config.
    cfg["medvlm_arch"] = serde_json::json!({"vision": arch["vision"]});
    let model = FakeRepo::new(0x11)
        .file(
            "open_clip_config.json",
            serde_json::to_vec(&cfg).unwrap(),
            false,
        )
        .file(
            "open_clip_pytorch_model.bin",
            read(&f.join("open_clip_pytorch_model.bin")),
            true,
        );
    let text = FakeRepo::new(0x22)
        .file("config.json", serde_json::to_vec(&bert).unwrap(), false)
        .file("vocab.txt", vocab_txt(&f.join("tokenizer.json")), false)
        .file(
            "tokenizer_config.json",
            br#"{"do_lower_case": true}"#.to_vec(),
            false,
        );
    let hub = FakeHub::start(BTreeMap::from([
        ("org/tiny-biomedclip".to_string(), model),
        (text_repo.to_string(), text),
    ]));
    let cache = tempfile::tempdir().unwrap();
    let report = pull(
        "org/tiny-biomedclip",
        None,
        &options(&hub, cache.path()),
        Arc::new(NoProgress),
    )
    .unwrap();
    assert!(
        report.made.contains(&format!("{text_repo}/config.json")),
        "{:?}",
        report.made
    );
    assert!(
        report.made.contains(&format!("{text_repo}/tokenizer.json")),
        "{:?}",
        report.made
    );

    // The pulled folder loads and embeds text exactly as the fixture folder does.
    let d = max_abs_diff(&embed_texts_of(&report.snapshot), &embed_texts_of(&f));
    assert!(d < 1e-6, "{d}");
}
