//! `medvlm segment train`, `eval` and `predict` on a tiny phantom set (32 px, dermoscopy and
//! brain MRI) with the tiny CLIP fixture model (random weights): the segmenter folder is
//! written, the evaluation table and JSON hold the head and the baseline for every class
//! and modality, predictions write masks and overlays, and bad input fails with the file
//! named.

use std::path::{Path, PathBuf};

mod common;
use common::{arg, fails, model, ok, phantoms32, run};

fn phantoms(dir: &Path) -> PathBuf {
    phantoms32(dir, 24, "dermoscopy,brain_mri")
}

#[test]
fn segment_train_then_eval_and_predict() {
    let tmp = tempfile::tempdir().unwrap();
    let ph = phantoms(tmp.path());
    let seg = tmp.path().join("seg");
    let train_out = ok(&run(&[
        "segment",
        "train",
        "--model",
        arg(&model()),
        "--manifest",
        arg(&ph.join("manifest.jsonl")),
        "--out",
        arg(&seg),
        "--steps",
        "15",
        "--width",
        "16",
    ]));
    assert!(
        train_out.contains("trained a segmentation head on 24 images"),
        "{train_out}"
    );
    assert!(seg.join("segmenter.json").is_file() && seg.join("head.safetensors").is_file());
    let card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(seg.join("segmenter.json")).unwrap()).unwrap();
    assert_eq!(card["format"], "medvlm-segmenter/1");
    assert_eq!(card["head"]["steps"], 15);
    let classes: Vec<String> = card["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert!(
        classes.iter().any(|c| c.starts_with("dermoscopy/")),
        "{classes:?}"
    );
    assert!(
        classes.iter().any(|c| c.starts_with("brain_mri/")),
        "{classes:?}"
    );

    let json = tmp.path().join("eval.json");
    let table = ok(&run(&[
        "segment",
        "eval",
        "--segmenter",
        arg(&seg),
        "--manifest",
        arg(&ph.join("manifest.jsonl")),
        "--json",
        arg(&json),
    ]));
    assert!(
        table.contains("similarity baseline") && table.contains("[brain_mri] macro"),
        "{table}"
    );
    let e: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(e["n_images"], 24);
    let per_label = e["head"]["findings"]["per_label"].as_object().unwrap();
    // Every class of the card is evaluated; the case counts add up to the present findings.
    assert_eq!(per_label.len(), classes.len());
    let n: u64 = per_label.values().map(|v| v["n"].as_u64().unwrap()).sum();
    assert_eq!(n, e["n_present"].as_u64().unwrap());
    assert!(e["baseline"]["findings"]["mean_dice"].is_number());
    assert!(e["head"]["per_modality"]["dermoscopy"].is_object());

    // Predict on a phantom image: a mask and an overlay of the image's size.
    let image = ph.join("images").join(
        std::fs::read_dir(ph.join("images"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .file_name(),
    );
    let out = tmp.path().join("pred");
    let said = ok(&run(&[
        "segment",
        "predict",
        "--segmenter",
        arg(&seg),
        "--prompt",
        &classes[0],
        "--out",
        arg(&out),
        arg(&image),
    ]));
    assert!(said.contains("the segmenter's class"), "{said}");
    let stem = image.file_stem().unwrap().to_string_lossy().to_string();
    for suffix in ["_mask.png", "_overlay.png"] {
        let p = out.join(format!("{stem}{suffix}"));
        let img = medvlm_io::load_any(&p).unwrap();
        assert_eq!(&img.shape[..2], &[32, 32], "{}", p.display());
    }

    // A manifest naming a missing mask fails with the file named.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        format!(
            "{{\"image\": \"{}\", \"masks\": [{{\"label\": \"naevus\", \"path\": \"nowhere_mask.png\"}}]}}\n",
            image.display()
        ),
    )
    .unwrap();
    let err = fails(&run(&[
        "segment",
        "eval",
        "--segmenter",
        arg(&seg),
        "--manifest",
        arg(&bad),
    ]));
    assert!(err.contains("nowhere_mask.png"), "{err}");
}

#[test]
fn segment_train_reads_the_layers_it_is_given() {
    let tmp = tempfile::tempdir().unwrap();
    let ph = phantoms(tmp.path());
    let seg = tmp.path().join("seg-layers");
    let train = |layers: &str, out: &Path| {
        run(&[
            "segment",
            "train",
            "--model",
            arg(&model()),
            "--manifest",
            arg(&ph.join("manifest.jsonl")),
            "--out",
            arg(out),
            "--steps",
            "5",
            "--width",
            "16",
            "--layers",
            layers,
        ])
    };
    let out = ok(&train("1,2", &seg));
    assert!(out.contains("image-tower layers read: [1, 2]"), "{out}");
    let card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(seg.join("segmenter.json")).unwrap()).unwrap();
    assert_eq!(card["head"]["layers"], serde_json::json!([1, 2]));
    let table = ok(&run(&[
        "segment",
        "eval",
        "--segmenter",
        arg(&seg),
        "--manifest",
        arg(&ph.join("manifest.jsonl")),
    ]));
    assert!(table.contains("dermoscopy"), "{table}");
    // The fixture's vision tower has 2 layers.
    let err = fails(&train("1,4", &tmp.path().join("bad")));
    assert!(
        err.contains("layer 4 does not exist: the tower has 2 layers"),
        "{err}"
    );
    assert!(!tmp.path().join("bad").join("segmenter.json").exists());
}

/// `--adapter-bottleneck`: the tower's adapters train with the head, are saved in `adapter/`
/// and the card says so; with `--lora-rank` too, or `--adapter-targets` alone, it is refused.
#[test]
fn segment_train_with_bottleneck_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let ph = phantoms(tmp.path());
    let train = |extra: &[&str], out: &Path| {
        let model = model();
        let manifest = ph.join("manifest.jsonl");
        let mut args = vec![
            "segment",
            "train",
            "--model",
            arg(&model),
            "--manifest",
            arg(&manifest),
            "--out",
            arg(out),
            "--steps",
            "5",
            "--width",
            "16",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let seg = tmp.path().join("seg-adapter");
    let out = ok(&train(
        &["--adapter-bottleneck", "4", "--adapter-targets", "fc2"],
        &seg,
    ));
    assert!(
        out.contains("image-tower bottleneck adapters trained with the head: width 4, on fc2"),
        "{out}"
    );
    let card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(seg.join("segmenter.json")).unwrap()).unwrap();
    assert_eq!(card["adapter"]["bottleneck"], serde_json::json!(4));
    assert!(seg.join("adapter/adapter_model.safetensors").is_file());
    let table = ok(&run(&[
        "segment",
        "eval",
        "--segmenter",
        arg(&seg),
        "--manifest",
        arg(&ph.join("manifest.jsonl")),
    ]));
    assert!(table.contains("dermoscopy"), "{table}");
    let err = fails(&train(
        &["--adapter-bottleneck", "4", "--lora-rank", "2"],
        &tmp.path().join("both"),
    ));
    assert!(err.contains("cannot be used with"), "{err}");
    let err = fails(&train(&["--adapter-targets", "fc2"], &tmp.path().join("t")));
    assert!(err.contains("--adapter-bottleneck"), "{err}");
    let err = fails(&train(
        &["--adapter-bottleneck", "0"],
        &tmp.path().join("z"),
    ));
    assert!(err.contains("at least 1"), "{err}");
}
