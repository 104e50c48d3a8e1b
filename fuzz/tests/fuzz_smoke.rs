//! Keeps the fuzz harness honest in CI: (a) every input that once crashed a
//! reader (`fuzz/regressions/<target>/`) must now run without a panic, and
//! (b) a short fixed-seed run of every target must find no panic.
//!
//! No allocation cap is set here (unlike the `medvlm-fuzz` binary, where a
//! single allocation above 1 GiB aborts and is recorded as a crash): the known
//! over-allocations from header length fields (see `fuzz/README.md`) get lazily
//! zeroed pages and then an error, as in production.

use std::path::Path;

use medvlm_fuzz::{default_root, fuzz_in_process, replay, Outcome, Target, ALL};

/// Inputs per target in the smoke run (plus the seeds themselves).
const ITERATIONS: u64 = 300;
/// DICOM inputs are slower: dicom-object allocates (and zeroes) up to 4 GiB for a
/// mutated 32-bit value length before it finds the file too short.
const DICOM_ITERATIONS: u64 = 60;

#[test]
fn regressions_do_not_panic() {
    let root = default_root().join("fuzz/regressions");
    let mut failures = Vec::new();
    let mut n = 0;
    for dir in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        let name = dir.file_name().to_string_lossy().into_owned();
        let Some(target) = Target::from_name(&name) else {
            continue;
        };
        for f in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let p = f.path();
            if p.extension().is_some_and(|e| e == "txt" || e == "md") {
                continue;
            }
            n += 1;
            if let Outcome::Panic {
                location, message, ..
            } = replay(target, &std::fs::read(&p).unwrap())
            {
                failures.push(format!("{}: panic at {location}: {message}", p.display()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{n} regression inputs, panics:\n{}",
        failures.join("\n")
    );
}

fn smoke(target: Target) {
    let n = if target == Target::Dicom {
        DICOM_ITERATIONS
    } else {
        ITERATIONS
    };
    let stats = fuzz_in_process(target, &default_root(), n, 0x5eed);
    assert!(
        stats.execs >= n,
        "{}: ran {} inputs",
        target.name(),
        stats.execs
    );
    assert!(
        stats.signatures.is_empty(),
        "{}: panics in a {n}-input fixed-seed run: {:#?}",
        target.name(),
        stats.signatures
    );
}

#[test]
fn every_target_has_seeds() {
    for &t in ALL {
        assert!(
            !t.seeds(&default_root(), None).is_empty(),
            "{} has no seeds",
            t.name()
        );
    }
    assert!(Path::new(&default_root().join("fuzz/seeds")).is_dir());
}

#[test]
fn smoke_dicom() {
    smoke(Target::Dicom);
}
#[test]
fn smoke_nifti() {
    smoke(Target::Nifti);
}
#[test]
fn smoke_npy() {
    smoke(Target::Npy);
}
#[test]
fn smoke_manifest_jsonl() {
    smoke(Target::ManifestJsonl);
}
#[test]
fn smoke_manifest_csv() {
    smoke(Target::ManifestCsv);
}
#[test]
fn smoke_train_config() {
    smoke(Target::TrainConfig);
}
#[test]
fn smoke_pickle() {
    smoke(Target::Pickle);
}
