//! `medvlm phantoms generate`: end-to-end through the binary, with the bad
//! inputs of issue #4 (unknown modality, n = 0, non-empty folder without
//! --force).

use std::process::Command;

fn medvlm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_medvlm"))
}

#[test]
fn generate_writes_a_manifest_and_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, seed: &str| {
        let out = tmp.path().join(name);
        let o = medvlm()
            .args([
                "phantoms", "generate", "--n", "12", "--size", "64", "--seed", seed,
            ])
            .args(["--modalities", "chest,histology", "--out"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let stdout = String::from_utf8_lossy(&o.stdout).to_string();
        (out, stdout)
    };
    let (a, stdout) = run("a", "3");
    assert!(stdout.contains("wrote 12 studies"), "{stdout}");
    assert!(stdout.contains("chest_xray 6, histology 6"), "{stdout}");
    let (b, _) = run("b", "3");
    let (c, _) = run("c", "4");
    let manifest = |d: &std::path::Path| std::fs::read(d.join("manifest.jsonl")).unwrap();
    assert_eq!(manifest(&a), manifest(&b));
    assert_ne!(manifest(&a), manifest(&c));
    let m = medvlm_io::read_manifest(&a.join("manifest.jsonl")).unwrap();
    assert_eq!(m.records.len(), 12);
    assert!(m
        .records
        .iter()
        .all(|r| r.text.is_some() && !r.labels.is_empty()));
}

#[test]
fn bad_inputs_fail_with_a_clear_message() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let fail = |args: &[&str]| {
        let o = medvlm()
            .args(["phantoms", "generate", "--out"])
            .arg(&out)
            .args(args)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let e = fail(&["--modalities", "chest,ultrasound"]);
    assert!(e.contains("unknown modality `ultrasound`"), "{e}");
    let e = fail(&["--n", "0"]);
    assert!(e.contains("at least 1"), "{e}");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let e = fail(&["--n", "2", "--size", "32"]);
    assert!(e.contains("not empty") && e.contains("--force"), "{e}");
    let ok = medvlm()
        .args([
            "phantoms", "generate", "--n", "2", "--size", "32", "--force", "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(out.join("keep.txt").is_file());
}

#[test]
fn prompts_are_written_as_json_that_zero_shot_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("brain.json");
    let o = medvlm()
        .args(["phantoms", "prompts", "--modality", "brain", "--out"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let classes: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(classes, ["haemorrhage", "infarct", "normal", "tumour"]);
    // Report style: 2 examination lines x 4 impression forms x 4 terms x 10 locations.
    assert_eq!(v["tumour"].as_array().unwrap().len(), 320);
    assert_eq!(
        v["normal"][0],
        "Axial T1-weighted post-contrast MRI of the brain. Normal MRI of the brain."
    );

    // Descriptive style, on standard output: one sentence per class.
    let o = medvlm()
        .args([
            "phantoms",
            "prompts",
            "--modality",
            "derm",
            "--style",
            "descriptive",
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    let d: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        d["melanoma"],
        serde_json::json!(["a dermoscopy image of a melanoma"])
    );

    // The file is what `medvlm zero-shot --prompts` reads.
    let data = tmp.path().join("data");
    let o = medvlm()
        .args([
            "phantoms",
            "generate",
            "--n",
            "3",
            "--size",
            "32",
            "--modalities",
            "brain",
            "--out",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../medvlm-models/tests/fixtures/clip");
    let o = medvlm()
        .args(["zero-shot", "--model"])
        .arg(&fixture)
        .arg("--images")
        .arg(data.join("manifest.jsonl"))
        .arg("--prompts")
        .arg(&file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.starts_with("image,haemorrhage,infarct,normal,tumour,prediction"),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 4, "{stdout}");

    let o = medvlm()
        .args(["phantoms", "prompts", "--modality", "ultrasound"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("unknown modality `ultrasound`") && !e.contains("panicked"),
        "{e}"
    );
}

#[cfg(unix)]
#[test]
fn a_closed_output_pipe_ends_the_run_quietly() {
    use std::os::unix::process::ExitStatusExt;
    // `medvlm phantoms prompts | head -0`: the reader is gone before the first write.
    let mut child = medvlm()
        .args(["phantoms", "prompts", "--modality", "chest"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    // Ended by SIGPIPE (13), as `cat` would be, not a panic's exit code 101.
    assert_eq!(o.status.signal(), Some(13), "{:?}", o.status);
}

#[test]
fn the_phantom_benchmark_passes_data_check_strict() {
    // Its splits include the held-out acquisition site (`test_heldout_site`), an evaluation
    // split that --strict must not call unusual.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let o = medvlm()
        .args([
            "phantoms", "generate", "--n", "400", "--size", "32", "--out",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let manifest = std::fs::read_to_string(data.join("manifest.jsonl")).unwrap();
    assert!(manifest.contains("\"test_heldout_site\""), "{manifest}");
    let o = medvlm()
        .args(["data", "check", "--strict"])
        .arg(data.join("manifest.jsonl"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("test_heldout_site"), "{stdout}");
    assert!(!stdout.contains("unusual split"), "{stdout}");
}

#[test]
fn absurd_sizes_are_refused_with_their_estimate() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("huge");
    let o = medvlm()
        .args([
            "phantoms",
            "generate",
            "--n",
            "18446744073709551615",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("(18446744073709551615 studies of 128 px)")
            && stderr.contains("of disk")
            && stderr.contains("--force"),
        "{stderr}"
    );
    assert!(!out.join("images").exists(), "it started writing");

    // Memory: decoded 100000 x 100000 images on 2 threads.
    let o = medvlm()
        .args(["bench", "io", "--side", "100000", "--count", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("bench io") && stderr.contains("of memory") && !stderr.contains("panicked"),
        "{stderr}"
    );
}
