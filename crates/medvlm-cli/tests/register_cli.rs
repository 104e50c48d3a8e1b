//! `medvlm register train`, `eval` and `apply` on a tiny phantom set (32 px, brain MRI and
//! chest X-ray): the registrar folder is written, the evaluation holds the network, the
//! identity and the oracle with per-modality rows, `apply` writes the warped image and the
//! field, and bad input fails with the file named.

use std::path::{Path, PathBuf};

mod common;
use common::{arg, bin, fails, ok, run};

fn phantoms(dir: &Path) -> PathBuf {
    let out = dir.join("ph");
    ok(&bin()
        .args([
            "phantoms",
            "generate",
            "--n",
            "12",
            "--seed",
            "5",
            "--modalities",
            "brain_mri,chest_xray",
            "--size",
            "32",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap());
    out
}

#[test]
fn register_train_eval_apply_and_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let ph = phantoms(tmp.path());
    let manifest = ph.join("manifest.jsonl");
    let reg = tmp.path().join("reg");
    let out = ok(&run(&[
        "register",
        "train",
        "--manifest",
        arg(&manifest),
        "--out",
        arg(&reg),
        "--steps",
        "6",
        "--batch",
        "4",
        "--width",
        "4",
    ]));
    assert!(
        out.contains("trained a registration network on 12 pairs of 32x32"),
        "{out}"
    );
    assert!(reg.join("registrar.json").is_file() && reg.join("registration.safetensors").is_file());

    let json = tmp.path().join("eval.json");
    let grid = tmp.path().join("grid.png");
    let out = ok(&run(&[
        "register",
        "eval",
        "--registrar",
        arg(&reg),
        "--manifest",
        arg(&manifest),
        "--json",
        arg(&json),
        "--grid",
        arg(&grid),
    ]));
    for word in ["identity", "network", "oracle", "brain_mri", "chest_xray"] {
        assert!(out.contains(word), "{word}: {out}");
    }
    let e: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(e["network"]["all"]["pairs"], 12);
    assert_eq!(e["oracle"]["all"]["epe"], 0.0);
    assert!(e["identity"]["all"]["epe"].as_f64().unwrap() > 0.0);
    assert!(grid.is_file());

    let id = std::fs::read_to_string(&manifest)
        .unwrap()
        .lines()
        .next()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .unwrap();
    let fixed = ph.join(id["image"].as_str().unwrap());
    let moving = ph.join(id["moved"].as_str().unwrap());
    let applied = tmp.path().join("applied");
    let out = ok(&run(&[
        "register",
        "apply",
        "--registrar",
        arg(&reg),
        "--moving",
        arg(&moving),
        "--fixed",
        arg(&fixed),
        "--out",
        arg(&applied),
    ]));
    assert!(
        out.contains("MSE") && out.contains("folded pixels"),
        "{out}"
    );
    assert!(applied.join("warped.png").is_file() && applied.join("field.npy").is_file());

    // Different sizes, a missing file, a missing registrar.
    let lowres = ph.join(id["image"].as_str().unwrap().replace("images/", "lowres/"));
    let err = fails(&run(&[
        "register",
        "apply",
        "--registrar",
        arg(&reg),
        "--moving",
        arg(&lowres),
        "--fixed",
        arg(&fixed),
        "--out",
        arg(&applied),
    ]));
    assert!(err.contains("lowres") && err.contains("[32, 32]"), "{err}");
    let err = fails(&run(&[
        "register",
        "apply",
        "--registrar",
        arg(&reg),
        "--moving",
        arg(&tmp.path().join("absent.png")),
        "--fixed",
        arg(&fixed),
        "--out",
        arg(&applied),
    ]));
    assert!(err.contains("absent.png"), "{err}");
    let err = fails(&run(&[
        "register",
        "eval",
        "--registrar",
        arg(&tmp.path().join("nothing")),
        "--manifest",
        arg(&manifest),
    ]));
    assert!(err.contains("registrar.json"), "{err}");
}
