//! End-to-end tests of `medvlm convert`, `medvlm data check` and `medvlm bench io`
//! on the real test files of medvlm-io (reference values from
//! tools/make_io_reference.py).

use std::path::{Path, PathBuf};

mod common;
use common::{arg, fails, ok, run};

fn io_data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../medvlm-io/tests/data")
        .join(name)
}

fn reference() -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../medvlm-io/tests/fixtures/io_reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn check_npy_against_reference(npy: &Path, name: &str) {
    let refs = reference();
    let r = &refs["files"][name];
    let a = medvlm_io::npy::read_npy(npy).unwrap();
    assert_eq!(a.descr, "<f4");
    let shape: Vec<usize> = r["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(a.shape, shape, "{name}");
    for sample in r["samples"].as_array().unwrap() {
        let i = sample[0].as_u64().unwrap() as usize;
        let want = sample[1].as_f64().unwrap();
        assert!(
            (a.data[i] - want).abs() <= 1e-4 * want.abs().max(1.0),
            "{name}[{i}]: {} vs {want}",
            a.data[i]
        );
    }
}

#[test]
fn convert_to_npy_without_window_gives_modality_values() {
    let dir = tempfile::tempdir().unwrap();
    for (name, out) in [
        ("CT_small.dcm", "ct.npy"),
        ("SC_rgb_rle_2frame.dcm", "rgb2.npy"),
        ("anatomical.nii", "anat.npy"),
        ("example_nifti2.nii.gz", "n2.npy"),
    ] {
        let o = dir.path().join(out);
        let stdout = ok(&run(&[
            "convert",
            arg(&io_data(name)),
            "--out",
            arg(&o),
            "--window",
            "none",
        ]));
        assert!(stdout.contains("float32"), "{stdout}");
        check_npy_against_reference(&o, name);
    }
}

#[test]
fn convert_nifti_slice_and_dicom_frame() {
    let dir = tempfile::tempdir().unwrap();
    let refs = reference();
    let zs = &refs["files"]["anatomical.nii"]["z_slice"];
    let o = dir.path().join("slice.npy");
    let k = zs["index"].as_u64().unwrap().to_string();
    ok(&run(&[
        "convert",
        arg(&io_data("anatomical.nii")),
        "--out",
        arg(&o),
        "--axis",
        "z",
        "--slice",
        &k,
    ]));
    let a = medvlm_io::npy::read_npy(&o).unwrap();
    assert_eq!(a.shape, vec![33, 41]);
    let mean = a.data.iter().sum::<f64>() / a.data.len() as f64;
    assert!((mean - zs["mean"].as_f64().unwrap()).abs() < 1e-6);
    let o = dir.path().join("frame1.npy");
    ok(&run(&[
        "convert",
        arg(&io_data("SC_rgb_rle_2frame.dcm")),
        "--out",
        arg(&o),
        "--frame",
        "1",
    ]));
    assert_eq!(
        medvlm_io::npy::read_npy(&o).unwrap().shape,
        vec![100, 100, 3]
    );
    let e = fails(&run(&[
        "convert",
        arg(&io_data("SC_rgb_rle_2frame.dcm")),
        "--out",
        arg(&o),
        "--frame",
        "2",
    ]));
    assert!(e.contains("frame 2 out of range"), "{e}");
}

#[test]
fn convert_to_png_with_lung_window_matches_pydicom_voi() {
    let dir = tempfile::tempdir().unwrap();
    let o = dir.path().join("ct.png");
    ok(&run(&[
        "convert",
        arg(&io_data("CT_small.dcm")),
        "--out",
        arg(&o),
        "--window",
        "lung",
    ]));
    let png = medvlm_io::load_any(&o).unwrap();
    assert_eq!(png.shape, vec![128, 128]);
    let refs = reference();
    for sample in refs["voi"]["CT_small.dcm lung"]["samples"]
        .as_array()
        .unwrap()
    {
        let i = sample[0].as_u64().unwrap() as usize;
        let want = (sample[1].as_f64().unwrap() * 255.0 + 0.5).floor();
        assert!(
            (png.data[i] as f64 - want).abs() <= 1.0,
            "pixel {i}: {} vs {want}",
            png.data[i]
        );
    }
    // C/W syntax with a negative centre
    ok(&run(&[
        "convert",
        arg(&io_data("CT_small.dcm")),
        "--out",
        arg(&o),
        "--window",
        "-600/1500",
    ]));
}

#[test]
fn convert_bad_inputs_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let o = dir.path().join("x.npy");
    let e = fails(&run(&[
        "convert",
        arg(&io_data("MR_truncated.dcm")),
        "--out",
        arg(&o),
    ]));
    assert!(
        e.contains("MR_truncated.dcm") && e.contains("1.2.840.10008.1.2.1"),
        "{e}"
    );
    assert!(!o.exists());
    let e = fails(&run(&[
        "convert",
        arg(&io_data("syn_mpeg2_unsupported.dcm")),
        "--out",
        arg(&o),
    ]));
    assert!(
        e.contains("unsupported DICOM transfer syntax MPEG2 Main Profile / Main Level"),
        "{e}"
    );
    let e = fails(&run(&[
        "convert",
        arg(&io_data("CT_small.dcm")),
        "--out",
        arg(&o),
        "--window",
        "liver?",
    ]));
    assert!(e.contains("invalid window"), "{e}");
}

#[test]
fn convert_refuses_contradictory_or_absurd_options() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("x.png");
    let nii = io_data("anatomical.nii");
    let two_frames = io_data("SC_rgb_rle_2frame.dcm");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "convert",
                arg(&nii),
                "--out",
                arg(&png),
                "--mip",
                "--slice",
                "3",
            ],
            "--slice",
        ),
        (
            vec!["convert", arg(&nii), "--out", arg(&png), "--salt", "s3cret"],
            "--deidentify",
        ),
        (
            vec![
                "convert",
                arg(&nii),
                "--out",
                arg(&png),
                "--window",
                "inf/400",
            ],
            "invalid window 'inf/400'",
        ),
        (
            vec![
                "convert",
                arg(&nii),
                "--out",
                arg(&png),
                "--window",
                "40/NaN",
            ],
            "invalid window '40/NaN'",
        ),
        // A multi-frame file to PNG names the frame count instead of writing frame 0.
        (
            vec!["convert", arg(&two_frames), "--out", arg(&png)],
            "has 2 frames: choose one with --frame",
        ),
    ];
    for (args, expect) in cases {
        let e = fails(&run(&args));
        assert!(e.contains(expect), "{args:?}: {e}");
        assert!(!png.exists(), "{args:?} wrote a file");
    }
    // With --frame it is written; windowed .npy needs the frame too, plain .npy keeps all.
    ok(&run(&[
        "convert",
        arg(&two_frames),
        "--out",
        arg(&png),
        "--frame",
        "1",
    ]));
    assert!(png.exists());
    let npy = dir.path().join("x.npy");
    let e = fails(&run(&[
        "convert",
        arg(&two_frames),
        "--out",
        arg(&npy),
        "--window",
        "auto",
    ]));
    assert!(e.contains("has 2 frames"), "{e}");
}

/// Text values of identifying attributes of a file, read here only to assert
/// they never appear in outputs (they are never printed).
fn identifying_values(p: &Path) -> Vec<String> {
    let obj = medvlm_io::dicom::open(p).unwrap();
    medvlm_io::dicom::IDENTIFYING_TAGS
        .iter()
        .filter_map(|(t, _)| obj.element_opt(*t).ok().flatten())
        .filter_map(|e| {
            e.to_str()
                .ok()
                .map(|v| v.trim_matches(['\0', ' ']).to_string())
        })
        .filter(|v| v.len() >= 4)
        .collect()
}

#[test]
fn convert_deidentify_writes_a_clean_copy() {
    let dir = tempfile::tempdir().unwrap();
    let src = io_data("CT_small.dcm");
    let secrets = identifying_values(&src);
    assert!(!secrets.is_empty());
    let o = dir.path().join("anon.dcm");
    let res = run(&[
        "convert",
        arg(&src),
        "--out",
        arg(&o),
        "--deidentify",
        "--salt",
        "t",
    ]);
    let stdout = ok(&res);
    let e = String::from_utf8_lossy(&res.stderr);
    assert!(
        stdout.contains("PatientName"),
        "names of attributes are reported"
    );
    let cleaned = medvlm_io::dicom::open(&o).unwrap();
    assert!(medvlm_io::dicom::identifying_attributes_present(&cleaned).is_empty());
    for v in &secrets {
        assert!(
            !stdout.contains(v.as_str()) && !e.contains(v.as_str()),
            "an identifying value was printed"
        );
    }
    assert_eq!(
        medvlm_io::load_any(&o).unwrap().data,
        medvlm_io::load_any(&src).unwrap().data
    );
}

#[test]
fn data_check_reports_and_skip_bad() {
    let dir = tempfile::tempdir().unwrap();
    for n in [
        "CT_small.dcm",
        "MR_small.dcm",
        "MR_truncated.dcm",
        "anatomical.nii",
    ] {
        std::fs::copy(io_data(n), dir.path().join(n)).unwrap();
    }
    let manifest = dir.path().join("m.csv");
    std::fs::write(
        &manifest,
        "image,split,label\nCT_small.dcm,train,ct\nMR_small.dcm,train,mr\nanatomical.nii,test,mr\nMR_truncated.dcm,test,mr\ngone.dcm,val,Mr\n",
    )
    .unwrap();
    let res = run(&["data", "check", arg(&manifest)]);
    // Bad files must fail without --skip-bad.
    let err = fails(&res);
    let out = String::from_utf8_lossy(&res.stdout);
    assert!(
        out.contains("missing files: 1") && out.contains("gone.dcm"),
        "{out}"
    );
    assert!(
        out.contains("unreadable files: 1") && out.contains("MR_truncated.dcm"),
        "{out}"
    );
    assert!(out.contains("PRIVACY WARNING"), "{out}");
    assert!(out.contains("differ only in case"), "{out}");
    assert!(
        err.contains("2 of 5 files are missing or unreadable"),
        "{err}"
    );
    let res = run(&["data", "check", arg(&manifest), "--skip-bad"]);
    let out = ok(&res);
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(
        out.contains("skipping 2 bad file(s), 3 usable record(s) remain"),
        "{out}"
    );
    assert!(out.contains("skipped") && out.contains("gone.dcm"), "{out}");
    assert!(out.contains("train    ct"), "{out}");
    for n in ["CT_small.dcm", "MR_small.dcm"] {
        for v in identifying_values(&io_data(n)) {
            assert!(
                !out.contains(v.as_str()) && !err.contains(v.as_str()),
                "identifying value printed"
            );
        }
    }
}

#[test]
fn data_check_of_a_clean_folder_layout_passes() {
    let dir = tempfile::tempdir().unwrap();
    for (class, n) in [
        ("a", "raster_grey8.png"),
        ("a", "raster_rgb8.png"),
        ("b", "raster_grey16.png"),
        ("b", "raster_rgb8.tif"),
    ] {
        let d = dir.path().join("train").join(class);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(io_data(n), d.join(n)).unwrap();
    }
    let out = ok(&run(&["data", "check", arg(dir.path())]));
    assert!(out.contains("OK: 4 record(s), 0 bad file(s)"), "{out}");
}

#[test]
fn bench_io_reports_throughput() {
    let out = ok(&run(&[
        "bench", "io", "--count", "4", "--side", "64", "--repeat", "2", "--size", "32",
    ]));
    assert!(
        out.contains("decode + preprocess:") && out.contains("images/s"),
        "{out}"
    );
}
