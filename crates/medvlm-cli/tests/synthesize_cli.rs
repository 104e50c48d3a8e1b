//! `medvlm synthesize train`, `sample` and `eval` on tiny phantoms (32 px, dermoscopy and
//! chest X-ray) with the tiny CLIP fixture: the synthesizer folder is written, `sample`
//! writes the PNGs and the grid at the trained size for a class and for free text, `eval`
//! reports FID/KID in the VLM's feature space, alignment and the classifier accuracies with
//! one row per class, and bad input (a prompt longer than the text context, a missing
//! synthesizer, a manifest without modalities) fails naming the reason.

mod common;
use common::{arg, fails, model, ok, phantoms32, run};

#[test]
fn synthesize_train_sample_eval_and_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let ph = phantoms32(tmp.path(), 8, "dermoscopy,chest_xray");
    let manifest = ph.join("manifest.jsonl");
    let synth = tmp.path().join("synth");
    let fixture = model();
    let out = ok(&run(&[
        "synthesize",
        "train",
        "--model",
        arg(&fixture),
        "--manifest",
        arg(&manifest),
        "--out",
        arg(&synth),
        "--size",
        "32",
        "--base",
        "8",
        "--steps",
        "3",
        "--batch",
        "2",
    ]));
    assert!(out.contains("2 classes"), "{out}");
    assert!(out.contains("chest_xray = \"chest X-ray\""), "{out}");
    assert!(
        synth.join("synthesizer.json").is_file() && synth.join("weights.safetensors").is_file()
    );

    // A class by name, then free text: PNGs of the trained size, and the grid.
    let samples = tmp.path().join("samples");
    let out = ok(&run(&[
        "synthesize",
        "sample",
        "--synthesizer",
        arg(&synth),
        "--prompt",
        "chest_xray",
        "--n",
        "3",
        "--ddim-steps",
        "2",
        "--out",
        arg(&samples),
    ]));
    assert!(out.contains("class `chest_xray`"), "{out}");
    for i in 0..3 {
        let p = samples.join(format!("sample_{i:03}.png"));
        let img = medvlm_io::load_any(&p).unwrap();
        let plane = img.plane(&medvlm_io::PlaneSelect::default()).unwrap();
        assert_eq!((plane.rows, plane.cols, plane.channels), (32, 32, 3));
    }
    assert!(samples.join("grid.png").is_file());
    // The saved model and the seed fix the images; another seed changes them.
    let again = tmp.path().join("again");
    let other = tmp.path().join("other");
    for (dir, seed) in [(&again, "0"), (&other, "1")] {
        ok(&run(&[
            "synthesize",
            "sample",
            "--synthesizer",
            arg(&synth),
            "--prompt",
            "chest_xray",
            "--n",
            "3",
            "--ddim-steps",
            "2",
            "--seed",
            seed,
            "--out",
            arg(dir),
        ]));
    }
    let png = |d: &std::path::Path| std::fs::read(d.join("sample_001.png")).unwrap();
    assert_eq!(png(&samples), png(&again));
    assert_ne!(png(&samples), png(&other));
    let free = tmp.path().join("free");
    let out = ok(&run(&[
        "synthesize",
        "sample",
        "--synthesizer",
        arg(&synth),
        "--prompt",
        "skin lesion",
        "--n",
        "1",
        "--ddim-steps",
        "2",
        "--out",
        arg(&free),
    ]));
    assert!(out.contains("free text"), "{out}");

    let json = tmp.path().join("eval.json");
    let grid = tmp.path().join("grid.png");
    let out = ok(&run(&[
        "synthesize",
        "eval",
        "--synthesizer",
        arg(&synth),
        "--manifest",
        arg(&manifest),
        "--train-manifest",
        arg(&manifest),
        "--n-per-class",
        "3",
        "--ddim-steps",
        "2",
        "--json",
        arg(&json),
        "--grid",
        arg(&grid),
    ]));
    for word in [
        "FID (VLM features)",
        "KID (VLM features)",
        "alignment",
        "dermoscopy",
        "chest_xray",
    ] {
        assert!(out.contains(word), "{word}: {out}");
    }
    let e: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(e["n_generated"], 6);
    assert_eq!(e["n_real_test"], 8);
    assert_eq!(e["per_class"].as_array().unwrap().len(), 2);
    assert!(e["fid_vlm"].as_f64().unwrap().is_finite());
    assert!(grid.is_file());

    // A prompt longer than the fixture's 24-token context.
    let long = "chest X-ray with a large effusion ".repeat(10);
    let err = fails(&run(&[
        "synthesize",
        "sample",
        "--synthesizer",
        arg(&synth),
        "--prompt",
        &long,
        "--out",
        arg(&tmp.path().join("long")),
    ]));
    assert!(err.contains("context of 24 tokens"), "{err}");
    assert!(
        !tmp.path().join("long").exists(),
        "nothing written for a bad prompt"
    );
    // A missing synthesizer.
    let err = fails(&run(&[
        "synthesize",
        "sample",
        "--synthesizer",
        arg(&tmp.path().join("nope")),
        "--prompt",
        "chest_xray",
        "--out",
        arg(&tmp.path().join("x")),
    ]));
    assert!(
        err.contains("nope") && err.contains("not a synthesizer folder"),
        "{err}"
    );
    // A manifest without modalities.
    let bare = tmp.path().join("bare.jsonl");
    let first = std::fs::read_to_string(&manifest).unwrap();
    let rec: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    let image = ph.join(rec["image"].as_str().unwrap());
    std::fs::write(
        &bare,
        format!("{{\"image\":{}}}\n", serde_json::json!(image)),
    )
    .unwrap();
    let err = fails(&run(&[
        "synthesize",
        "train",
        "--model",
        arg(&fixture),
        "--manifest",
        arg(&bare),
        "--out",
        arg(&tmp.path().join("s2")),
        "--size",
        "32",
        "--steps",
        "1",
    ]));
    assert!(err.contains("no `modality`"), "{err}");
}
