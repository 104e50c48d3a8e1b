//! Decoded values of the real DICOM / NIfTI test files against reference values
//! computed by pydicom / nibabel (`tools/make_io_reference.py` ->
//! `tests/fixtures/io_reference.json`).

use std::path::PathBuf;

use medvlm_io::{load_any, MedImage, PlaneSelect};
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

/// Compare `values` (C-ordered over `shape`) with a reference summary. `tol` is the
/// allowed absolute difference per sampled value (0 for lossless data); the mean
/// may differ by `tol / 4` (lossy decoders differ by ±1 on a few pixels).
fn check_summary(name: &str, shape: &[usize], values: &[f32], r: &Value, tol: f64) {
    let want_shape: Vec<usize> = r["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(shape, &want_shape[..], "{name}: shape");
    assert_eq!(
        values.len(),
        shape.iter().product::<usize>(),
        "{name}: length"
    );
    let n = values.len() as f64;
    let sum: f64 = values.iter().map(|&v| v as f64).sum();
    let (lo, hi) = medvlm_io::medimage::min_max(values);
    let mean_tol = if tol == 0.0 { 1e-6 } else { tol / 4.0 };
    assert!(
        (sum / n - f(&r["mean"])).abs() <= mean_tol * f(&r["mean"]).abs().max(1.0),
        "{name}: mean {} vs {}",
        sum / n,
        f(&r["mean"])
    );
    assert!(
        (lo as f64 - f(&r["min"])).abs() <= tol + 1e-6 * f(&r["min"]).abs(),
        "{name}: min {lo} vs {}",
        r["min"]
    );
    assert!(
        (hi as f64 - f(&r["max"])).abs() <= tol + 1e-6 * f(&r["max"]).abs(),
        "{name}: max {hi} vs {}",
        r["max"]
    );
    let mut worst = 0.0f64;
    for s in r["samples"].as_array().unwrap() {
        let i = s[0].as_u64().unwrap() as usize;
        let d = (values[i] as f64 - f(&s[1])).abs();
        worst = worst.max(d);
        assert!(
            d <= tol + 1e-5 * f(&s[1]).abs(),
            "{name}: value at flat index {i}: {} vs {}",
            values[i],
            s[1]
        );
    }
    let sums = r["axis0_sums"].as_array().unwrap();
    let per = values.len() / shape[0];
    for (k, want) in sums.iter().enumerate() {
        let got: f64 = values[k * per..(k + 1) * per]
            .iter()
            .map(|&v| v as f64)
            .sum();
        let allowed = if tol == 0.0 {
            1e-6 * f(want).abs().max(1.0)
        } else {
            tol / 4.0 * per as f64
        };
        assert!(
            (got - f(want)).abs() <= allowed,
            "{name}: sum of slab {k}: {got} vs {want}"
        );
    }
    let _ = worst;
}

fn check_dicom(name: &str) -> MedImage {
    let refs = reference();
    let r = &refs["files"][name];
    assert!(
        r.get("shape").is_some(),
        "{name}: no reference values (pydicom could not decode it)"
    );
    let img = load_any(&data(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let tol = if r["lossy"].as_bool().unwrap_or(false) {
        8.0
    } else {
        0.0
    };
    check_summary(name, &img.shape, &img.data, r, tol);
    let ts = img.transfer_syntax.clone().unwrap();
    assert!(
        ts.contains(r["transfer_syntax"].as_str().unwrap()),
        "{name}: {ts}"
    );
    assert_eq!(
        img.modality.as_deref().unwrap_or(""),
        r["modality"].as_str().unwrap()
    );
    if let Some(w) = r.get("windows") {
        let want: Vec<(f64, f64)> = w
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (f(&p[0]), f(&p[1])))
            .collect();
        assert_eq!(img.file_windows, want, "{name}: windows");
    }
    img
}

#[test]
fn ct_small_explicit_le_in_hounsfield_units() {
    let img = check_dicom("CT_small.dcm");
    // rescale intercept -1024 applied: air-ish minimum well below zero
    assert!(img.min_max().0 < -800.0);
}

#[test]
fn mr_small_explicit_le() {
    check_dicom("MR_small.dcm");
}

#[test]
fn mr_small_implicit_vr() {
    check_dicom("MR_small_implicit.dcm");
}

#[test]
fn mr_small_big_endian() {
    check_dicom("MR_small_bigendian.dcm");
}

#[test]
fn mr_small_rle() {
    check_dicom("MR_small_RLE.dcm");
}

#[cfg(feature = "jpeg2000")]
#[test]
fn mr_small_jpeg2000_lossless() {
    check_dicom("MR_small_jp2klossless.dcm");
}

#[test]
fn bad_vr_number_of_frames_is_repaired_and_reported() {
    // NumberOfFrames is "1A" (invalid IS): the frame count is inferred from the
    // pixel data length, the values match pydicom's after the same repair, and the
    // repair is reported in `warnings`.
    let img = check_dicom("badVR.dcm");
    assert_eq!(img.frames(), 15);
    assert!(
        img.warnings.iter().any(|w| w.contains("NumberOfFrames")),
        "{:?}",
        img.warnings
    );
}

#[test]
fn rgb_rle() {
    check_dicom("SC_rgb_rle.dcm");
}

#[test]
fn rgb_rle_two_frames() {
    let img = check_dicom("SC_rgb_rle_2frame.dcm");
    assert_eq!(img.frames(), 2);
    let p1 = img
        .plane(&PlaneSelect {
            frame: Some(1),
            ..Default::default()
        })
        .unwrap();
    assert_eq!((p1.rows, p1.cols, p1.channels), (100, 100, 3));
    assert!(img
        .plane(&PlaneSelect {
            frame: Some(2),
            ..Default::default()
        })
        .is_err());
}

#[test]
fn rgb_native_odd_size() {
    check_dicom("SC_rgb_small_odd.dcm");
}

#[test]
fn rgb_jpeg_baseline_ybr() {
    check_dicom("SC_rgb_jpeg_dcmtk.dcm");
}

fn nifti_check(name: &str, version: u64) {
    let refs = reference();
    let r = &refs["files"][name];
    let img = load_any(&data(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(r["version"].as_u64().unwrap(), version);
    check_summary(name, &img.shape, &img.data, r, 0.0);
    let aff = img.affine.unwrap();
    for i in 0..4 {
        for j in 0..4 {
            let want = f(&r["affine"][i][j]);
            assert!(
                (aff[i][j] - want).abs() < 1e-5,
                "{name}: affine[{i}][{j}] {} vs {want}",
                aff[i][j]
            );
        }
    }
    let codes: String = medvlm_io::volume::axis_codes(&aff).iter().collect();
    assert_eq!(codes, r["axcodes"].as_str().unwrap());
    let zs = &r["z_slice"];
    let p = img
        .plane(&PlaneSelect {
            slice: Some(zs["index"].as_u64().unwrap() as usize),
            ..Default::default()
        })
        .unwrap();
    check_summary(
        &format!("{name} z slice"),
        &[p.rows, p.cols],
        &p.data,
        zs,
        0.0,
    );
    // default slice is the middle one
    assert_eq!(img.plane(&PlaneSelect::default()).unwrap(), p);
    let ys = &r["y_slice"];
    let p = img
        .plane(&PlaneSelect {
            axis: Some(1),
            slice: Some(ys["index"].as_u64().unwrap() as usize),
            ..Default::default()
        })
        .unwrap();
    check_summary(
        &format!("{name} y slice"),
        &[p.rows, p.cols],
        &p.data,
        ys,
        0.0,
    );
    let p = img
        .plane(&PlaneSelect {
            mip: true,
            ..Default::default()
        })
        .unwrap();
    check_summary(
        &format!("{name} z MIP"),
        &[p.rows, p.cols],
        &p.data,
        &r["z_mip"],
        0.0,
    );
}

#[test]
fn nifti1_big_endian_anatomical() {
    nifti_check("anatomical.nii", 1);
}

#[test]
fn nifti2_gz_4d() {
    nifti_check("example_nifti2.nii.gz", 2);
}

// Synthetic files written by pydicom in tools/make_io_reference.py for pixel
// formats the real files lack.

#[test]
fn palette_color_through_the_lookup_tables() {
    let img = check_dicom("syn_palette.dcm");
    assert_eq!(img.photometric, medvlm_io::Photometric::Rgb);
}

#[test]
fn native_ybr_full_converted_to_rgb() {
    check_dicom("syn_ybr_full.dcm");
}

#[test]
fn rgb_planar_configuration_1() {
    check_dicom("syn_rgb_planar1.dcm");
}

#[test]
fn monochrome1_signed_12_bit_with_rescale_and_inversion() {
    let img = check_dicom("syn_mono1_signed12.dcm");
    assert_eq!(img.photometric, medvlm_io::Photometric::Monochrome1);
    // windowing inverts MONOCHROME1: the lowest value becomes the brightest
    let p = medvlm_io::preprocess::windowed_plane(
        &img,
        &PlaneSelect::default(),
        &medvlm_io::Window::File(0),
    )
    .unwrap();
    let (imin, _) = img
        .data
        .iter()
        .enumerate()
        .fold(
            (0, f32::INFINITY),
            |(bi, bv), (i, &v)| if v < bv { (i, v) } else { (bi, bv) },
        );
    let (lo, hi) = medvlm_io::medimage::min_max(&p.data);
    assert_eq!(p.data[imin], hi);
    assert!(lo < hi);
}

#[test]
fn eight_bit_multiframe() {
    let img = check_dicom("syn_multiframe_u8.dcm");
    assert_eq!(img.frames(), 3);
}

#[test]
fn deflated_explicit_vr_little_endian() {
    check_dicom("syn_deflated.dcm");
}

// Pixel formats added for issue #14 (pydicom 3.0.2 test files).

#[test]
fn one_bit_bit_packed_segmentation() {
    let img = check_dicom("liver_1frame.dcm");
    assert_eq!(img.bits_stored, Some(1));
}

#[test]
fn one_bit_multi_frame_with_frames_starting_mid_byte() {
    // 35 bits per frame: frame 2 starts at bit 3 of byte 4 (pydicom-written)
    let img = check_dicom("syn_1bit_3frames.dcm");
    assert_eq!(img.frames(), 3);
    assert!(img.data.iter().all(|&v| v == 0.0 || v == 1.0));
}

#[test]
fn one_bit_bit_packed_big_endian() {
    check_dicom("liver_expb_1frame.dcm");
}

#[test]
fn rle_32_bit_grey_single_and_multi_frame() {
    check_dicom("rtdose_rle_1frame.dcm");
    let img = check_dicom("rtdose_rle.dcm");
    assert_eq!(img.frames(), 15);
}

#[test]
fn rle_16_and_32_bit_rgb() {
    check_dicom("SC_rgb_rle_16bit.dcm");
    check_dicom("SC_rgb_rle_32bit.dcm");
    let img = check_dicom("SC_rgb_rle_32bit_2frame.dcm");
    assert_eq!(img.frames(), 2);
}

#[test]
fn native_ybr_full_422_upsampled_to_rgb() {
    check_dicom("SC_ybr_full_422_uncompressed.dcm");
}

#[test]
fn jpeg_baseline_rgb_without_colour_transform() {
    check_dicom("SC_jpeg_no_color_transform.dcm");
    check_dicom("SC_rgb_jpeg_app14_dcmd.dcm");
}

#[test]
fn jpeg_baseline_ybr_422_subsampled() {
    check_dicom("SC_rgb_dcmtk_+eb+cy+s2.dcm");
}

#[test]
fn jpeg_lossless_process_14_rgb() {
    check_dicom("SC_rgb_jpeg_gdcm.dcm");
}

// DICOM read like pydicom's `dcmread(force=True)`: the same pixels as the normal read.

/// Bytes of a Part 10 file: (everything, offset of the data set after the meta group).
fn part10(name: &str) -> (Vec<u8>, usize) {
    let b = std::fs::read(data(name)).unwrap();
    assert_eq!(&b[128..132], b"DICM");
    // (0002,0000) UL group length: tag 4, VR 2, length 2, value 4
    assert_eq!(&b[132..138], b"\x02\x00\x00\x00UL");
    let len = u32::from_le_bytes(b[140..144].try_into().unwrap()) as usize;
    (b.clone(), 144 + len)
}

fn same_pixels(name: &str, variant: &str, bytes: &[u8], note: &str) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(format!("{variant}.dcm"));
    std::fs::write(&p, bytes).unwrap();
    let want = load_any(&data(name)).unwrap();
    let got = load_any(&p).unwrap_or_else(|e| panic!("{name} {variant}: {e}"));
    assert_eq!(got.shape, want.shape, "{name} {variant}");
    assert_eq!(got.data, want.data, "{name} {variant}");
    assert_eq!(got.modality, want.modality, "{name} {variant}");
    assert!(
        got.warnings.iter().any(|w| w.contains(note)),
        "{name} {variant}: {:?}",
        got.warnings
    );
    assert!(got.warnings[0].contains(&format!("{variant}.dcm")));
}

#[test]
fn dicom_without_preamble_like_pydicom_force() {
    for name in ["MR_small.dcm", "CT_small.dcm", "MR_small_RLE.dcm"] {
        let (b, _) = part10(name);
        same_pixels(name, "no_preamble", &b[128..], "no 128-byte preamble");
        same_pixels(name, "no_preamble_no_dicm", &b[132..], "no 'DICM' prefix");
    }
}

#[test]
fn bare_data_set_without_file_meta_like_pydicom_force() {
    // the transfer syntax is guessed from the first element
    for (name, ts) in [
        ("MR_small_implicit.dcm", "Implicit VR Little Endian"),
        ("MR_small.dcm", "Explicit VR Little Endian"),
        ("CT_small.dcm", "Explicit VR Little Endian"),
        ("MR_small_bigendian.dcm", "Explicit VR Big Endian"),
    ] {
        let (b, start) = part10(name);
        let note = format!(
            "no file meta information (no preamble, no 'DICM'): read as a bare data set in {ts}"
        );
        same_pixels(name, "bare", &b[start..], &note);
    }
}

#[test]
fn bare_data_set_with_compressed_pixel_data_is_an_error_not_garbage() {
    // Without file meta information an RLE data set parses as explicit VR little
    // endian, but its encapsulated pixel data cannot be decoded: error, no pixels.
    let (b, start) = part10("MR_small_RLE.dcm");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bare_rle.dcm");
    std::fs::write(&p, &b[start..]).unwrap();
    let e = load_any(&p).unwrap_err().to_string();
    assert!(
        e.contains("bare_rle.dcm") && e.contains("encapsulated (compressed fragments)"),
        "{e}"
    );
}

/// NIfTI files written by nibabel with unit dimensions: the shape is nibabel's
/// `get_fdata().shape` (`dim[1..=dim[0]]`, nothing squeezed), values and affine equal.
#[test]
fn nifti_unit_dimensions_keep_nibabel_shape() {
    let refs = reference();
    for (name, shape) in [
        ("nib_leading_unit.nii", vec![1, 6, 5]),
        ("nib_trailing_units.nii", vec![6, 5, 1, 1]),
        ("nib_2d.nii", vec![6, 5]),
        ("nib_5d_inner_unit.nii.gz", vec![4, 3, 2, 1, 2]),
    ] {
        let r = &refs["files"][name];
        let img = load_any(&data(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(img.shape, shape, "{name}");
        assert_eq!(
            img.layout,
            medvlm_io::Layout::Volume {
                dims: shape.clone()
            }
        );
        check_summary(name, &img.shape, &img.data, r, 0.0);
        let aff = img.affine.unwrap();
        for i in 0..4 {
            for j in 0..4 {
                assert!(
                    (aff[i][j] - f(&r["affine"][i][j])).abs() < 1e-6,
                    "{name} affine"
                );
            }
        }
        let codes: String = medvlm_io::volume::axis_codes(&aff).iter().collect();
        assert_eq!(codes, r["axcodes"].as_str().unwrap(), "{name}");
        assert_eq!(img.spacing.len(), shape.len(), "{name}");
    }
    // planes of the 5-D file: volume index over the axes after z
    let img = load_any(&data("nib_5d_inner_unit.nii.gz")).unwrap();
    assert_eq!(img.frames(), 2);
    let p = img
        .plane(&PlaneSelect {
            frame: Some(1),
            slice: Some(1),
            ..Default::default()
        })
        .unwrap();
    assert_eq!((p.rows, p.cols), (4, 3));
    // data[x, y, 1, 0, 1] in C order over [4, 3, 2, 1, 2]: (((x*3 + y)*2 + 1)*1 + 0)*2 + 1
    for x in 0..4 {
        for y in 0..3 {
            let c = ((x * 3 + y) * 2 + 1) * 2 + 1;
            assert_eq!(p.data[x * 3 + y], img.data[c]);
        }
    }
}

#[test]
fn jpeg_ls_lossless_and_near_lossless() {
    check_dicom("MR_small_jpeg_ls_lossless.dcm");
    check_dicom("JPEGLSNearLossless_08.dcm");
    check_dicom("JPEGLSNearLossless_16.dcm");
    check_dicom("SC_rgb_jls_lossy_line.dcm");
    check_dicom("SC_rgb_jls_lossy_sample.dcm");
}

#[test]
fn jpeg_extended_12_bit() {
    let img = check_dicom("JPGExtended.dcm");
    assert_eq!(img.bits_stored, Some(12));
}

/// JPEG Lossless (Process 14) 12- and 16-bit grey frames with predictors 1, 4, 6 and 7
/// (`tools/make_jpeg_lossless_fixtures.py`; GDCM decodes each to its source) decode to exactly
/// the pixels of their uncompressed source.
#[test]
fn jpeg_lossless_12_and_16_bit_grey_equal_their_uncompressed_source() {
    for (name, source, uid) in [
        (
            "MR_small_12bit_jpeg_lossless_sv1.dcm",
            "MR_small_12bit.dcm",
            "1.2.840.10008.1.2.4.70",
        ),
        (
            "MR_small_12bit_jpeg_lossless_p14_pred4.dcm",
            "MR_small_12bit.dcm",
            "1.2.840.10008.1.2.4.57",
        ),
        (
            "CT_small_jpeg_lossless_p14_pred6.dcm",
            "CT_small.dcm",
            "1.2.840.10008.1.2.4.57",
        ),
        (
            "MR_small_jpeg_lossless_p14_pred7.dcm",
            "MR_small.dcm",
            "1.2.840.10008.1.2.4.57",
        ),
    ] {
        let got = load_any(&data(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = load_any(&data(source)).unwrap();
        assert_eq!(got.shape, want.shape, "{name}");
        assert_eq!(got.data, want.data, "{name}");
        assert!(
            got.transfer_syntax.as_deref().unwrap_or("").contains(uid),
            "{name}: {:?}",
            got.transfer_syntax
        );
    }
}
