//! Windowing (vs pydicom's VOI LUT), rasters and MedMNIST (vs NumPy/Pillow
//! fixtures), .npy, transforms and model input.

use std::path::PathBuf;

use medvlm_io::medimage::{min_max, Plane, PlaneSelect};
use medvlm_io::preprocess::{to_model_input, windowed_plane, InputOptions};
use medvlm_io::transforms::{self, EvalTransform, Fit, TrainTransform};
use medvlm_io::{load_any, Photometric, Window};
use serde_json::Value;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn reference() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/io_reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap()
}

fn check_samples(name: &str, values: &[f32], r: &Value, tol: f64) {
    let shape: Vec<usize> = r["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(values.len(), shape.iter().product::<usize>(), "{name}");
    let mean: f64 = values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64;
    assert!(
        (mean - f(&r["mean"])).abs() <= tol.max(1e-6),
        "{name}: mean {mean} vs {}",
        r["mean"]
    );
    for s in r["samples"].as_array().unwrap() {
        let i = s[0].as_u64().unwrap() as usize;
        assert!(
            (values[i] as f64 - f(&s[1])).abs() <= tol.max(1e-6),
            "{name}[{i}]: {} vs {}",
            values[i],
            s[1]
        );
    }
}

#[test]
fn ct_lung_preset_matches_pydicom_linear_voi() {
    let refs = reference();
    let r = &refs["voi"]["CT_small.dcm lung"];
    let img = load_any(&data("CT_small.dcm")).unwrap();
    let w: Window = "lung".parse().unwrap();
    assert_eq!(
        w,
        Window::CenterWidth {
            center: -600.0,
            width: 1500.0
        }
    );
    let p = windowed_plane(&img, &PlaneSelect::default(), &w).unwrap();
    check_samples("CT lung", &p.data, r, 1e-5);
    // same through the C/W syntax
    let p2 = windowed_plane(&img, &PlaneSelect::default(), &"-600/1500".parse().unwrap()).unwrap();
    assert_eq!(p, p2);
}

#[test]
fn mr_file_window_matches_pydicom() {
    let refs = reference();
    let r = &refs["voi"]["MR_small.dcm file"];
    let img = load_any(&data("MR_small.dcm")).unwrap();
    for w in [Window::File(0), Window::Auto] {
        let p = windowed_plane(&img, &PlaneSelect::default(), &w).unwrap();
        check_samples("MR file window", &p.data, r, 1e-5);
    }
    assert!(windowed_plane(&img, &PlaneSelect::default(), &Window::File(1)).is_err());
}

#[test]
fn window_parsing_and_errors() {
    for (s, c, w) in [
        ("brain", 40.0, 80.0),
        ("Bone", 400.0, 1800.0),
        ("soft_tissue", 40.0, 400.0),
        ("mediastinum", 50.0, 350.0),
        ("abdomen", 50.0, 400.0),
        ("40/400", 40.0, 400.0),
    ] {
        assert_eq!(
            s.parse::<Window>().unwrap(),
            Window::CenterWidth {
                center: c,
                width: w
            },
            "{s}"
        );
    }
    assert_eq!(
        "p1-99".parse::<Window>().unwrap(),
        Window::Percentile {
            low: 1.0,
            high: 99.0
        }
    );
    assert_eq!("none".parse::<Window>().unwrap(), Window::None);
    for bad in [
        "liver?",
        "40/0",
        "p99-1",
        "p5",
        "file:x",
        "inf/400",
        "nan/400",
        "40/inf",
        "40/NaN",
        "-inf/1e400",
        "pnan-99",
        "p1-inf",
    ] {
        let e = bad.parse::<Window>().unwrap_err().to_string();
        assert!(e.contains(bad), "{bad}: {e}");
    }
}

#[test]
fn percentile_and_minmax_windows_and_monochrome1_inversion() {
    let p = Plane::new(1, 5, 1, vec![0.0, 10.0, 20.0, 30.0, 40.0]).unwrap();
    let none =
        medvlm_io::window::apply_window(&p, &Window::None, &[], Photometric::Monochrome2, None)
            .unwrap();
    assert_eq!(none.data, vec![0.0, 0.25, 0.5, 0.75, 1.0]);
    // numpy.percentile([0,10,20,30,40], [25, 75]) = 10, 30
    let pc = medvlm_io::window::apply_window(
        &p,
        &Window::Percentile {
            low: 25.0,
            high: 75.0,
        },
        &[],
        Photometric::Monochrome2,
        None,
    )
    .unwrap();
    assert_eq!(pc.data, vec![0.0, 0.0, 0.5, 1.0, 1.0]);
    let inv =
        medvlm_io::window::apply_window(&p, &Window::None, &[], Photometric::Monochrome1, None)
            .unwrap();
    assert_eq!(inv.data, vec![1.0, 0.75, 0.5, 0.25, 0.0]);
}

#[test]
fn rasters_match_pillow() {
    let refs = reference();
    for name in [
        "raster_grey8.png",
        "raster_grey16.png",
        "raster_rgb8.png",
        "raster_grey8.tif",
        "raster_grey16.tif",
        "raster_rgb8.tif",
        "raster_rgb8.jpg",
    ] {
        let r = &refs["files"][name];
        let img = load_any(&data(name)).unwrap_or_else(|e| panic!("{e}"));
        let shape: Vec<usize> = r["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(img.shape, shape, "{name}");
        // JPEG: different IDCTs may differ by a few levels
        let tol = if name.ends_with(".jpg") { 6.0 } else { 0.0 };
        check_samples(name, &img.data, r, tol);
        let bits = if name.contains("16") { 16 } else { 8 };
        assert_eq!(img.bits_stored, Some(bits), "{name}");
    }
}

#[test]
fn medmnist_npz_matches_numpy() {
    let refs = reference();
    let r = &refs["files"]["medmnist_tiny.npz"];
    let m = medvlm_io::medmnist::read_medmnist(&data("medmnist_tiny.npz")).unwrap();
    assert_eq!(
        m.splits.keys().cloned().collect::<Vec<_>>(),
        vec!["test", "train", "val"]
    );
    for split in ["train", "val", "test"] {
        let s = &m.splits[split];
        let want: Vec<i64> = r[split]["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(s.labels, want, "{split}");
        assert_eq!(s.label_width, 1);
        let vals: Vec<f32> = s.images.iter().map(|&v| v as f32).collect();
        check_samples(split, &vals, &r[split], 0.0);
        let img = s.image(1).unwrap();
        assert_eq!(img.shape, vec![8, 8]);
        assert_eq!(img.data[..], vals[64..128]);
    }
    assert!(m.splits["val"].image(2).is_err());
}

#[test]
fn medmnist_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.npz");
    std::fs::write(&p, b"PK not really").unwrap();
    let e = medvlm_io::medmnist::read_medmnist(&p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("x.npz") && e.contains("zip"), "{e}");
}

#[test]
fn npy_round_trip_and_load_any() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.npy");
    let vals: Vec<f32> = (0..24).map(|i| i as f32 * 0.25 - 1.0).collect();
    medvlm_io::npy::write_npy_f32(&p, &[2, 4, 3], &vals).unwrap();
    let a = medvlm_io::npy::read_npy(&p).unwrap();
    assert_eq!(a.shape, vec![2, 4, 3]);
    assert_eq!(a.descr, "<f4");
    assert_eq!(a.data, vals.iter().map(|&v| v as f64).collect::<Vec<_>>());
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!((bytes.len() - 24 * 4) % 64, 0, "header padded to 64 bytes");
    let img = load_any(&p).unwrap();
    assert_eq!(img.shape, vec![2, 4, 3]);
    assert_eq!(img.frames(), 1); // [H, W, 3] is one RGB image
}

fn ramp_plane(rows: usize, cols: usize) -> Plane {
    Plane::new(
        rows,
        cols,
        1,
        (0..rows * cols)
            .map(|i| i as f32 / (rows * cols) as f32)
            .collect(),
    )
    .unwrap()
}

#[test]
fn aspect_preserving_resize_pads_or_crops() {
    let p = Plane::new(2, 4, 1, vec![1.0; 8]).unwrap();
    let pad = transforms::resize_square(&p, 8, Fit::Pad).unwrap();
    assert_eq!((pad.rows, pad.cols), (8, 8));
    // 2x4 -> 4x8 content centred: rows 0,1 and 6,7 are padding
    assert_eq!(pad.at(0, 3, 0), 0.0);
    assert_eq!(pad.at(7, 3, 0), 0.0);
    assert!((pad.at(3, 0, 0) - 1.0).abs() < 1e-6);
    let crop = transforms::resize_square(&p, 8, Fit::Crop).unwrap();
    assert!(
        crop.data.iter().all(|&v| (v - 1.0).abs() < 1e-6),
        "crop keeps only content"
    );
}

#[test]
fn flips_and_rotation() {
    let p = ramp_plane(3, 4);
    let h = transforms::hflip(&p);
    assert_eq!(h.at(1, 0, 0), p.at(1, 3, 0));
    assert_eq!(transforms::hflip(&h), p);
    let v = transforms::vflip(&p);
    assert_eq!(v.at(0, 2, 0), p.at(2, 2, 0));
    assert_eq!(transforms::rotate(&p, 0.0), p);
    // 90 degrees on a square: exact permutation (counter-clockwise)
    let sq = ramp_plane(3, 3);
    let r = transforms::rotate(&sq, 90.0);
    assert!(
        (r.at(0, 0, 0) - sq.at(0, 2, 0)).abs() < 1e-5,
        "{} vs {}",
        r.at(0, 0, 0),
        sq.at(0, 2, 0)
    );
    assert!((r.at(1, 1, 0) - sq.at(1, 1, 0)).abs() < 1e-5);
}

#[test]
fn train_transform_is_seeded_and_eval_is_deterministic() {
    let p = ramp_plane(40, 30);
    let t = TrainTransform {
        size: 16,
        ..Default::default()
    };
    let a = t.apply_seeded(&p, 42, 3).unwrap();
    let b = t.apply_seeded(&p, 42, 3).unwrap();
    let c = t.apply_seeded(&p, 42, 4).unwrap();
    let d = t.apply_seeded(&p, 43, 3).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_ne!(a, d);
    assert_eq!((a.rows, a.cols), (16, 16));
    let (lo, hi) = min_max(&a.data);
    assert!(lo >= 0.0 && hi <= 1.0);
    let e = EvalTransform {
        size: 16,
        fit: Fit::Pad,
    };
    assert_eq!(e.apply(&p).unwrap(), e.apply(&p).unwrap());
}

#[test]
fn model_input_is_three_channel_chw() {
    let img = load_any(&data("CT_small.dcm")).unwrap();
    let opts = InputOptions {
        size: 32,
        window: "lung".parse().unwrap(),
        ..Default::default()
    };
    let m = to_model_input(&img, &opts).unwrap();
    assert_eq!((m.height, m.width, m.data.len()), (32, 32, 3 * 32 * 32));
    let n = 32 * 32;
    assert_eq!(m.data[..n], m.data[n..2 * n], "grey replicated to R and G");
    assert_eq!(m.data[..n], m.data[2 * n..], "grey replicated to B");
    let rgb = load_any(&data("SC_rgb_rle.dcm")).unwrap();
    let m = to_model_input(
        &rgb,
        &InputOptions {
            size: 20,
            ..Default::default()
        },
    )
    .unwrap();
    assert_ne!(m.data[..400], m.data[400..800], "colour channels differ");
    let vol = load_any(&data("anatomical.nii")).unwrap();
    let m = to_model_input(
        &vol,
        &InputOptions {
            size: 24,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(m.data.len(), 3 * 24 * 24);
}

#[test]
fn train_input_is_seeded_per_sample() {
    let img = load_any(&data("MR_small.dcm")).unwrap();
    let opts = InputOptions::default();
    let t = TrainTransform {
        size: 32,
        ..Default::default()
    };
    let a = medvlm_io::to_train_input(&img, &opts, &t, 1, 0).unwrap();
    let b = medvlm_io::to_train_input(&img, &opts, &t, 1, 0).unwrap();
    let c = medvlm_io::to_train_input(&img, &opts, &t, 1, 1).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!(a.data.len(), 3 * 32 * 32);
}

#[test]
fn fortran_ordered_npy_is_reordered_to_c() {
    // np.asfortranarray(np.arange(6, dtype='<i2').reshape(2, 3)) stores 0 3 1 4 2 5
    let mut header = "{'descr': '<i2', 'fortran_order': True, 'shape': (2, 3), }".to_string();
    let pad = (64 - (10 + header.len() + 1) % 64) % 64;
    header.push_str(&" ".repeat(pad));
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in [0i16, 3, 1, 4, 2, 5] {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    let a = medvlm_io::npy::decode_npy(&bytes).unwrap();
    assert_eq!(a.shape, vec![2, 3]);
    assert_eq!(a.data, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    let e = medvlm_io::npy::decode_npy(&bytes[..bytes.len() - 2]).unwrap_err();
    assert!(e.contains("truncated"), "{e}");
}

/// The blur against its definition: a constant plane stays constant, an impulse far from
/// the edges spreads into the normalised, symmetric Gaussian (values by hand), sigma 0 is
/// the identity, and a TrainTransform with a blur range smooths what one without it does not.
#[test]
fn gaussian_blur_matches_its_definition() {
    let flat = Plane::new(9, 7, 3, vec![0.4; 9 * 7 * 3]).unwrap();
    let b = transforms::gaussian_blur(&flat, 1.3);
    assert!(b.data.iter().all(|v| (v - 0.4).abs() < 1e-6));

    let mut data = vec![0.0f32; 15 * 15];
    data[7 * 15 + 7] = 1.0;
    let impulse = Plane::new(15, 15, 1, data).unwrap();
    let sigma = 1.0f32;
    let b = transforms::gaussian_blur(&impulse, sigma);
    let w = |d: i32| (-(d * d) as f32 / (2.0 * sigma * sigma)).exp();
    let norm: f32 = (-3..=3).map(w).sum();
    for (dr, dc) in [(0, 0), (1, 0), (0, 2), (3, 3), (-2, 1)] {
        let want = w(dr) * w(dc) / (norm * norm);
        let got = b.at((7 + dr) as usize, (7 + dc) as usize, 0);
        assert!((got - want).abs() < 1e-6, "({dr}, {dc}): {got} vs {want}");
    }
    assert_eq!(b.at(7, 11, 0), 0.0, "beyond the kernel's radius of 3");
    assert!((b.data.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    assert_eq!(transforms::gaussian_blur(&impulse, 0.0), impulse);

    let p = ramp_plane(16, 16);
    let mut checker = p.clone();
    for (i, v) in checker.data.iter_mut().enumerate() {
        *v = ((i / 16 + i % 16) % 2) as f32;
    }
    let plain = TrainTransform {
        size: 16,
        crop_scale: (1.0, 1.0),
        hflip_p: 0.0,
        max_rotation_deg: 0.0,
        brightness: 0.0,
        contrast: 0.0,
        gamma: (1.0, 1.0),
        noise_std: 0.0,
        ..Default::default()
    };
    let blurred = TrainTransform {
        blur_sigma: (1.0, 1.5),
        ..plain.clone()
    };
    let a = plain.apply_seeded(&checker, 1, 0).unwrap();
    let b = blurred.apply_seeded(&checker, 1, 0).unwrap();
    let spread = |q: &Plane| {
        let m = q.data.iter().sum::<f32>() / q.data.len() as f32;
        q.data.iter().map(|v| (v - m).abs()).sum::<f32>() / q.data.len() as f32
    };
    assert!(spread(&a) > 0.45, "{}", spread(&a));
    assert!(spread(&b) < 0.1, "{}", spread(&b));
}
