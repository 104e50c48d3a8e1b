//! Dataset validation: counts, bad files, suspicious labels, leakage, --skip-bad policy.

use std::path::PathBuf;

use medvlm_io::check::{check_manifest, usable_records, CheckOptions, Problem};
use medvlm_io::read_manifest;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn setup(rows: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    for n in [
        "CT_small.dcm",
        "MR_small.dcm",
        "MR_truncated.dcm",
        "raster_grey8.png",
    ] {
        std::fs::copy(data(n), dir.path().join(n)).unwrap();
    }
    let m = dir.path().join("m.jsonl");
    std::fs::write(&m, rows).unwrap();
    (dir, m)
}

#[test]
fn counts_bad_files_and_skip_bad() {
    let (_d, m) = setup(concat!(
        "{\"image\":\"CT_small.dcm\",\"split\":\"train\",\"label\":\"ct\"}\n",
        "{\"image\":\"MR_small.dcm\",\"split\":\"train\",\"labels\":[\"mr\",\"brain\"]}\n",
        "{\"image\":\"raster_grey8.png\",\"split\":\"test\",\"label\":\"ct\"}\n",
        "{\"image\":\"MR_truncated.dcm\",\"split\":\"test\",\"label\":\"mr\"}\n",
        "{\"image\":\"nope.png\",\"split\":\"val\",\"label\":\"ct\"}\n",
    ));
    let man = read_manifest(&m).unwrap();
    let rep = check_manifest(&man, CheckOptions::default());
    assert_eq!(rep.records, 5);
    assert_eq!(rep.per_split["train"], 2);
    assert_eq!(rep.per_split["test"], 2);
    assert_eq!(rep.per_split_class["train"]["brain"], 1);
    assert_eq!(rep.per_split_class["test"]["ct"], 1);
    assert_eq!(rep.n_bad(), 2);
    let bad: Vec<_> = rep.bad().map(|b| (b.index, b.problem.clone())).collect();
    assert_eq!(bad[0].0, 3);
    assert!(matches!(&bad[0].1, Some(Problem::Unreadable(e)) if e.contains("MR_truncated.dcm")));
    assert_eq!(bad[1], (4, Some(Problem::Missing)));
    // CT_small and MR_small carry identifying attributes (names only are reported)
    assert_eq!(rep.n_identifying(), 2);
    assert!(rep.files[0].identifying.contains(&"PatientName"));
    let err = usable_records(&man, &rep, false).unwrap_err();
    assert!(
        err.contains("2 of 5 files") && err.contains("nope.png"),
        "{err}"
    );
    let (good, skipped) = usable_records(&man, &rep, true).unwrap();
    assert_eq!(good.len(), 3);
    assert_eq!(skipped.len(), 2);
    assert_eq!(rep.files[0].shape, Some(vec![128, 128]));
}

#[test]
fn suspicious_labels_and_leakage() {
    let (_d, m) = setup(concat!(
        "{\"image\":\"CT_small.dcm\",\"split\":\"train\",\"label\":\"Nodule\"}\n",
        "{\"image\":\"MR_small.dcm\",\"split\":\"train\",\"label\":\"nodule\"}\n",
        "{\"image\":\"MR_small.dcm\",\"split\":\"test\",\"label\":\"nodule\"}\n",
        "{\"image\":\"raster_grey8.png\",\"split\":\"test\",\"label\":\"effusion\"}\n",
        "{\"image\":\"CT_small.dcm\",\"split\":\"holdout\"}\n",
    ));
    let man = read_manifest(&m).unwrap();
    let rep = check_manifest(&man, CheckOptions { decode: false });
    let s = rep.suspicious.join("\n");
    assert!(s.contains("differ only in case"), "{s}");
    assert!(
        s.contains("\"effusion\" appears in test but never in train"),
        "{s}"
    );
    assert!(s.contains("unusual split name \"holdout\""), "{s}");
    assert!(s.contains("1 of 5 records have no label"), "{s}");
    assert!(
        s.contains("\"MR_small.dcm\" is listed in several splits"),
        "{s}"
    );
    assert!(s.contains("class \"Nodule\" has a single example"), "{s}");
    assert_eq!(rep.duplicates.len(), 2);
}

#[test]
fn a_clean_manifest_has_no_findings() {
    let (_d, m) = setup(concat!(
        "{\"image\":\"CT_small.dcm\",\"split\":\"train\",\"label\":\"a\"}\n",
        "{\"image\":\"MR_small.dcm\",\"split\":\"train\",\"label\":\"b\"}\n",
        "{\"image\":\"raster_grey8.png\",\"split\":\"train\",\"label\":\"a\"}\n",
    ));
    let man = read_manifest(&m).unwrap();
    let rep = check_manifest(&man, CheckOptions::default());
    assert_eq!(rep.n_bad(), 0);
    assert_eq!(
        rep.suspicious,
        vec!["class \"b\" has a single example".to_string()]
    );
}
