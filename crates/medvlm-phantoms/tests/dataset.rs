//! Writing datasets: determinism (byte-identical files for the same seed,
//! whatever the thread count), manifests in the medvlm-io format with a
//! held-out-site split, DICOM / NIfTI copies readable by the medvlm-io
//! readers, and clear errors on bad input.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use medvlm_phantoms::{
    write_dataset, DatasetConfig, Modality, PhantomError, StudyOptions, MANIFEST_FILE, SITES,
};

fn config(out: &Path, n: u64, seed: u64) -> DatasetConfig {
    DatasetConfig {
        out: out.to_path_buf(),
        n,
        seed,
        modalities: Modality::ALL.to_vec(),
        options: StudyOptions {
            size: 64,
            ..Default::default()
        },
        force: false,
    }
}

fn all_files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

#[test]
fn same_seed_gives_byte_identical_files_whatever_the_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    let summary = write_dataset(&config(&a, 30, 9)).unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    pool.install(|| write_dataset(&config(&b, 30, 9))).unwrap();
    write_dataset(&config(&c, 30, 10)).unwrap();
    let (fa, fb, fc) = (all_files(&a), all_files(&b), all_files(&c));
    assert_eq!(
        summary.files as usize,
        fa.len(),
        "summary counts every file"
    );
    assert!(
        fa.keys().all(|k| !k.to_string_lossy().contains(".tmp")),
        "no temp files left"
    );
    assert_eq!(fa.len(), fb.len());
    for (path, bytes) in &fa {
        assert!(
            fb.get(path) == Some(bytes),
            "{} differs between runs",
            path.display()
        );
    }
    // A different seed gives different studies.
    let differing = fa
        .iter()
        .filter(|(p, _)| p.starts_with("images"))
        .filter(|(p, bytes)| fc.get(*p) != Some(*bytes))
        .count();
    assert!(
        differing >= 28,
        "only {differing} of 30 images changed with the seed"
    );
    assert_ne!(fa[Path::new(MANIFEST_FILE)], fc[Path::new(MANIFEST_FILE)]);
}

#[test]
fn manifests_have_splits_and_a_held_out_site() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ph");
    let summary = write_dataset(&config(&out, 80, 5)).unwrap();
    let manifest = medvlm_io::read_manifest(&out.join(MANIFEST_FILE)).unwrap();
    assert_eq!(manifest.records.len(), 80);
    let held_out = SITES[medvlm_phantoms::HELD_OUT_SITE];
    let mut per_split: BTreeMap<String, usize> = BTreeMap::new();
    for r in &manifest.records {
        let split = r.split.clone().unwrap();
        let site = r.extra["site"].as_str().unwrap();
        assert_eq!(
            site == held_out,
            split == "test_heldout_site",
            "{}: site {site} in {split}",
            r.image
        );
        *per_split.entry(split).or_default() += 1;
        // Every referenced file exists.
        assert!(manifest.image_path(r).is_file(), "{}", r.image);
        for m in &r.masks {
            assert!(out.join(&m.path).is_file(), "{}", m.path);
        }
        for key in ["lowres", "moved", "deformation"] {
            assert!(
                out.join(r.extra[key].as_str().unwrap()).is_file(),
                "{key} of {}",
                r.image
            );
        }
        assert_eq!(r.masks.len(), r.boxes.len());
        assert!(!r.labels.is_empty() && r.text.as_deref().is_some_and(|t| !t.is_empty()));
        assert!(r.qa.iter().all(|q| q.kind.is_some()));
        let findings = r.extra["findings"].as_array().unwrap();
        assert_eq!(findings.len(), r.masks.len());
    }
    for split in ["train", "val", "test", "test_heldout_site"] {
        let n = per_split.get(split).copied().unwrap_or(0);
        assert!(n > 0, "split {split} is empty: {per_split:?}");
        let sub = medvlm_io::read_manifest(&out.join(format!("{split}.jsonl"))).unwrap();
        assert_eq!(sub.records.len(), n);
    }
    assert_eq!(
        summary.per_split.iter().map(|(_, n)| *n).sum::<u64>(),
        80,
        "{:?}",
        summary.per_split
    );
    // The deformation field is a float32 [2, H, W] NumPy array.
    let npy = std::fs::read(out.join(manifest.records[0].extra["deformation"].as_str().unwrap()))
        .unwrap();
    assert!(npy.starts_with(b"\x93NUMPY\x01\x00"));
    let header_len = u16::from_le_bytes([npy[8], npy[9]]) as usize;
    let header = std::str::from_utf8(&npy[10..10 + header_len]).unwrap();
    assert!(
        header.contains("'<f4'") && header.contains("(2, 64, 64)"),
        "{header}"
    );
    assert_eq!(npy.len(), 10 + header_len + 2 * 64 * 64 * 4);
    assert_eq!((10 + header_len) % 64, 0);
}

#[test]
fn dicom_and_nifti_copies_hold_the_png_pixels() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ph");
    let mut cfg = config(&out, 12, 2);
    cfg.modalities = vec![Modality::ChestXray, Modality::BrainMri];
    let summary = write_dataset(&cfg).unwrap();
    assert!(
        summary.dicom_files >= 2 && summary.nifti_files >= 2,
        "{summary:?}"
    );
    let manifest = medvlm_io::read_manifest(&out.join(MANIFEST_FILE)).unwrap();
    let mut checked = 0;
    for r in &manifest.records {
        let Some(dcm) = r.extra.get("dicom").and_then(|v| v.as_str()) else {
            continue;
        };
        let png = image::open(out.join(&r.image)).unwrap().to_luma8();
        let expect: Vec<f32> = png.as_raw().iter().map(|&p| p as f32).collect();
        let d = medvlm_io::dicom::read_dicom(&out.join(dcm)).unwrap();
        assert_eq!(d.data, expect, "{dcm}");
        let nii = r.extra["nifti"].as_str().unwrap();
        let v = medvlm_io::volume::read_nifti(&out.join(nii)).unwrap();
        assert_eq!(v.shape, vec![64, 64, 1]);
        // NIfTI is x-major: data[x * h + y].
        for (y, x) in [(0usize, 0usize), (10, 40), (63, 5)] {
            assert_eq!(
                v.data[x * 64 + y],
                expect[y * 64 + x],
                "{nii} at ({x}, {y})"
            );
        }
        checked += 1;
    }
    assert!(checked >= 2);
}

#[test]
fn bad_input_gives_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x");
    let err = write_dataset(&config(&out, 0, 1)).unwrap_err();
    assert!(matches!(err, PhantomError::ZeroStudies), "{err}");
    assert!(err.to_string().contains("at least 1"));

    let mut cfg = config(&out, 4, 1);
    cfg.modalities.clear();
    assert!(matches!(
        write_dataset(&cfg).unwrap_err(),
        PhantomError::NoModalities
    ));

    let mut cfg = config(&out, 4, 1);
    cfg.options.size = 66;
    let err = write_dataset(&cfg).unwrap_err();
    assert!(err.to_string().contains("66"), "{err}");
    assert!(!out.exists(), "nothing is written on bad input");

    let err = "xray-ct".parse::<Modality>().unwrap_err();
    assert!(
        err.to_string().contains("unknown modality `xray-ct`"),
        "{err}"
    );

    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "keep me").unwrap();
    let err = write_dataset(&config(&out, 4, 1)).unwrap_err();
    assert!(matches!(err, PhantomError::OutputNotEmpty(_)), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    let mut cfg = config(&out, 4, 1);
    cfg.force = true;
    write_dataset(&cfg).unwrap();
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "keep me"
    );
    assert!(out.join(MANIFEST_FILE).is_file());
}
