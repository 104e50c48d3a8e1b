//! `medvlm detect train`, `eval` and `predict` on a tiny phantom set (32 px, dermoscopy and
//! chest) with the tiny CLIP fixture model (random weights): the detector folder is written,
//! the evaluation table and JSON hold the head and both baselines for every class and
//! modality, prediction writes the overlay and the boxes, and bad input (an unknown class,
//! a box outside its image) fails with a clear message.

use std::path::{Path, PathBuf};

mod common;
use common::{arg, fails, model, ok, phantoms32, run};

fn phantoms(dir: &Path) -> PathBuf {
    phantoms32(dir, 24, "dermoscopy,chest_xray")
}

#[test]
fn detect_train_then_eval_and_predict() {
    let tmp = tempfile::tempdir().unwrap();
    let ph = phantoms(tmp.path());
    let det = tmp.path().join("det");
    let train_out = ok(&run(&[
        "detect",
        "train",
        "--model",
        arg(&model()),
        "--manifest",
        arg(&ph.join("manifest.jsonl")),
        "--out",
        arg(&det),
        "--steps",
        "10",
        "--width",
        "16",
    ]));
    assert!(
        train_out.contains("trained a box head on 24 images"),
        "{train_out}"
    );
    let card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(det.join("detector.json")).unwrap()).unwrap();
    assert_eq!(card["format"], "medvlm-detector/1");
    assert_eq!(card["head"]["steps"], 10);
    assert!(det.join("head.safetensors").is_file());
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

    let json = tmp.path().join("eval.json");
    let overlays = tmp.path().join("ov");
    let table = ok(&run(&[
        "detect",
        "eval",
        "--detector",
        arg(&det),
        "--manifest",
        arg(&ph.join("manifest.jsonl")),
        "--json",
        arg(&json),
        "--overlays",
        arg(&overlays),
        "--n-overlays",
        "2",
    ]));
    assert!(
        table.contains("heatmap")
            && table.contains("centre")
            && table.contains("[dermoscopy] macro"),
        "{table}"
    );
    let e: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let n = e["n_phrases"].as_u64().unwrap();
    assert!(n > 0);
    assert_eq!(e["grounding_centre"]["micro"]["n"].as_u64().unwrap(), n);
    assert_eq!(
        e["detection_head"]["all"]["n_ground_truth"]
            .as_u64()
            .unwrap(),
        n
    );
    assert_eq!(std::fs::read_dir(&overlays).unwrap().count(), 2);

    // Predict for a class name: overlay and JSON per image.
    let image = ph.join("images/dermoscopy_000000.png");
    let image = if image.is_file() {
        image
    } else {
        std::fs::read_dir(ph.join("images"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .next()
            .unwrap()
    };
    let out = tmp.path().join("pred");
    let said = ok(&run(&[
        "detect",
        "predict",
        "--detector",
        arg(&det),
        "--prompt",
        &classes[0],
        arg(&image),
        "--out",
        arg(&out),
    ]));
    assert!(
        said.contains("the detector's class") && said.contains("grounded"),
        "{said}"
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 2);

    // A class the detector has no boxes of is refused, naming the classes.
    let err = fails(&run(&[
        "detect",
        "predict",
        "--detector",
        arg(&det),
        "--prompt",
        "brain_mri/tumour",
        arg(&image),
        "--out",
        arg(&out),
    ]));
    assert!(
        err.contains("not a class of the detector") && err.contains(&classes[0]),
        "{err}"
    );

    // A box outside its image fails with the image and the box named.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        format!(
            r#"{{"image": "{}", "boxes": [{{"label": "naevus", "x0": 30, "y0": 2, "x1": 40, "y1": 9}}]}}"#,
            image.display()
        ),
    )
    .unwrap();
    let err = fails(&run(&[
        "detect",
        "train",
        "--model",
        arg(&model()),
        "--manifest",
        arg(&bad),
        "--out",
        arg(&tmp.path().join("bad_det")),
        "--steps",
        "2",
    ]));
    assert!(
        err.contains("outside the image") && err.contains("naevus"),
        "{err}"
    );
}
