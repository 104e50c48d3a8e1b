//! `medvlm vqa train`, `eval` and `answer` on a tiny phantom set (32 px, dermoscopy and
//! brain MRI) with the tiny CLIP fixture model (random weights): the answerer folder is
//! written, the evaluation table and JSON hold closed/open/overall accuracy of the classifier
//! and both baselines, `answer` prints one answer per image, and bad input fails with the
//! file or the reason named.

use std::path::{Path, PathBuf};

mod common;
use common::{arg, fails, model, ok, phantoms32, run};

fn phantoms(dir: &Path) -> PathBuf {
    phantoms32(dir, 24, "dermoscopy,brain_mri")
}

#[test]
fn vqa_train_then_eval_and_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let ph = phantoms(tmp.path());
    let answerer = tmp.path().join("answerer");
    let manifest = ph.join("manifest.jsonl");
    let out = ok(&run(&[
        "vqa",
        "train",
        "--model",
        arg(&model()),
        "--manifest",
        arg(&manifest),
        "--out",
        arg(&answerer),
        "--epochs",
        "30",
        "--hidden",
        "32",
        "--batch",
        "16",
    ]));
    assert!(out.contains("trained a VQA answerer on"), "{out}");
    assert!(out.contains("24 images"), "{out}");
    for f in ["vqa_model.json", "classifier.safetensors"] {
        assert!(answerer.join(f).is_file(), "{f}");
    }
    let json = tmp.path().join("eval.json");
    let table = ok(&run(&[
        "vqa",
        "eval",
        "--answerer",
        arg(&answerer),
        "--manifest",
        arg(&manifest),
        "--json",
        arg(&json),
    ]));
    assert!(
        table.contains("question only")
            && table.contains("kind modality")
            && table.contains("answer rule: exact match"),
        "{table}"
    );
    let ev: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let n = ev["n_pairs"].as_u64().unwrap();
    assert_eq!(
        ev["model"]["closed"]["n"].as_u64().unwrap() + ev["model"]["open"]["n"].as_u64().unwrap(),
        n
    );
    // On its training images every reference answer is in the vocabulary, and the
    // classifier that sees the image tells the two modalities apart.
    assert_eq!(ev["n_unseen_answers"], 0);
    assert_eq!(ev["model"]["per_kind"]["modality"]["accuracy"], 1.0);

    let images: Vec<PathBuf> = std::fs::read_dir(ph.join("images"))
        .unwrap()
        .take(2)
        .map(|e| e.unwrap().path())
        .collect();
    let mut args = vec![
        "vqa",
        "answer",
        "--answerer",
        arg(&answerer),
        "--question",
        "What imaging modality is shown?",
    ];
    args.extend(images.iter().map(|p| arg(p)));
    let printed = ok(&run(&args));
    assert_eq!(printed.lines().count(), 2, "{printed}");
    assert!(printed.starts_with(arg(&images[0])), "{printed}");
    let first = printed.lines().next().unwrap();
    let answer = first.split('\t').nth(1).unwrap();
    assert!(
        answer == "dermoscopy image" || answer == "brain mri",
        "{printed}"
    );

    // A missing image, an empty question, an unknown answerer folder and a manifest without
    // answers are named.
    let err = fails(&run(&[
        "vqa",
        "answer",
        "--answerer",
        arg(&answerer),
        "--question",
        "Is this normal?",
        "nowhere.png",
    ]));
    assert!(err.contains("nowhere.png"), "{err}");
    let err = fails(&run(&[
        "vqa",
        "answer",
        "--answerer",
        arg(&answerer),
        "--question",
        " ",
        arg(&images[0]),
    ]));
    assert!(err.contains("question is empty"), "{err}");
    let err = fails(&run(&[
        "vqa",
        "eval",
        "--answerer",
        arg(&tmp.path().join("no-such-answerer")),
        "--manifest",
        arg(&manifest),
    ]));
    assert!(err.contains("no-such-answerer"), "{err}");
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"image\": \"x.png\", \"qa\": [{\"question\": \"Where is it?\", \"answer\": \"\"}]}\n",
    )
    .unwrap();
    let err = fails(&run(&[
        "vqa",
        "train",
        "--model",
        arg(&model()),
        "--manifest",
        arg(&bad),
        "--out",
        arg(&tmp.path().join("a2")),
    ]));
    assert!(
        err.contains("bad.jsonl") && err.contains("has no answer"),
        "{err}"
    );
}

#[test]
fn vqa_generative_train_eval_and_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let ph = phantoms(tmp.path());
    let gen = tmp.path().join("gen");
    let manifest = ph.join("manifest.jsonl");
    let out = ok(&run(&[
        "vqa",
        "train",
        "--generative",
        "--model",
        arg(&model()),
        "--manifest",
        arg(&manifest),
        "--out",
        arg(&gen),
        "--epochs",
        "2",
    ]));
    assert!(out.contains("trained a generative VQA answerer"), "{out}");
    for f in [
        "vqa_generator.json",
        "generator.safetensors",
        "tokenizer.json",
        "image_norm.safetensors",
    ] {
        assert!(gen.join(f).is_file(), "{f}");
    }
    let table = ok(&run(&[
        "vqa",
        "eval",
        "--answerer",
        arg(&gen),
        "--manifest",
        arg(&manifest),
    ]));
    assert!(
        table.contains("generative decoder") && table.contains("kind modality"),
        "{table}"
    );
    let image = std::fs::read_dir(ph.join("images"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let printed = ok(&run(&[
        "vqa",
        "answer",
        "--answerer",
        arg(&gen),
        "--question",
        "Is this study normal?",
        arg(&image),
    ]));
    assert_eq!(printed.lines().count(), 1, "{printed}");
    assert!(printed.starts_with(arg(&image)), "{printed}");
    // A tokenizer that does not match the decoder's vocabulary is named.
    std::fs::write(
        gen.join("tokenizer.json"),
        std::fs::read_to_string(model().join("tokenizer.json")).unwrap(),
    )
    .unwrap();
    let err = fails(&run(&[
        "vqa",
        "answer",
        "--answerer",
        arg(&gen),
        "--question",
        "Is this study normal?",
        arg(&image),
    ]));
    assert!(err.contains("tokenizer.json"), "{err}");
}
