//! Helpers shared by the CLI integration tests that run the `medvlm` binary on the tiny CLIP
//! fixture (`mod common;` in each test file).
// Each test binary compiles its own copy of this module and uses a subset of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `medvlm` binary under test, as a command to add arguments to.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_medvlm"))
}

/// Runs `medvlm` with `args` and returns its output (status, stdout, stderr).
pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run medvlm")
}

/// A path as a command-line argument (the tests' paths are UTF-8).
pub fn arg(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// The tiny CLIP parity fixture of medvlm-models (random weights).
pub fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../medvlm-models/tests/fixtures/clip")
}

/// Asserts that a run succeeded (showing its stdout and stderr if not) and
/// returns its stdout.
pub fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Asserts that a run failed without a panic and returns its stderr.
pub fn fails(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "expected a failure; stdout:\n{}\nstderr:\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// `medvlm phantoms generate` of `n` studies at 32 px (seed 3, one finding type per study) of
/// `modalities` (comma-separated) into `dir/ph`, which it returns.
pub fn phantoms32(dir: &Path, n: u32, modalities: &str) -> PathBuf {
    let out = dir.join("ph");
    ok(&bin()
        .args([
            "phantoms",
            "generate",
            "--n",
            &n.to_string(),
            "--seed",
            "3",
            "--max-findings",
            "1",
            "--modalities",
            modalities,
            "--size",
            "32",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap());
    out
}
