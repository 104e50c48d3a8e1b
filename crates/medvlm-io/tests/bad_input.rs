//! Broken, unsupported and non-image files: clear errors naming the file, the
//! reason and (DICOM) the transfer syntax; never a panic.

use std::path::{Path, PathBuf};

use medvlm_io::{load_any, IoError};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn err_of(path: &Path) -> IoError {
    match load_any(path) {
        Ok(img) => panic!(
            "{}: expected an error, decoded {:?}",
            path.display(),
            img.shape
        ),
        Err(e) => e,
    }
}

#[test]
fn truncated_dicom_names_file_syntax_and_reason() {
    let e = err_of(&data("MR_truncated.dcm")).to_string();
    assert!(e.contains("MR_truncated.dcm"), "{e}");
    assert!(
        e.contains("Explicit VR Little Endian (1.2.840.10008.1.2.1)"),
        "{e}"
    );
    assert!(e.contains("(7FE0,0010)") && e.contains("8192"), "{e}");
}

#[test]
fn dicom_without_meta_header_is_read_like_pydicom_force() {
    // pydicom's ExplVR_LitEndNoMeta.dcm is a bare explicit VR little endian data set
    // (an RT dose without pixel data): parsed, then "no Pixel Data".
    let e = err_of(&data("ExplVR_LitEndNoMeta.dcm")).to_string();
    assert!(e.contains("ExplVR_LitEndNoMeta.dcm"), "{e}");
    assert!(
        e.contains("Explicit VR Little Endian (1.2.840.10008.1.2.1)")
            && e.contains("no Pixel Data"),
        "{e}"
    );
}

#[test]
fn twelve_bit_jpeg_with_an_invalid_scan_is_a_clear_decode_error() {
    // JPEG-lossy.dcm's scan header says spectral selection 0..0, invalid for a
    // sequential DCT scan (pydicom's libjpeg refuses it too; JPGExtended.dcm is the
    // corrected file, decoded in reference.rs).
    let e = err_of(&data("JPEG-lossy.dcm")).to_string();
    assert!(e.contains("JPEG-lossy.dcm"), "{e}");
    assert!(e.contains("1.2.840.10008.1.2.4.51"), "{e}");
    assert!(
        e.contains("invalid scan for sequential JPEG: spectral selection 0..0"),
        "{e}"
    );
}

/// Truncated and corrupt 12-bit JPEG frames (medvlm's own decoder): errors naming
/// the file, no panic.
#[test]
fn truncated_or_corrupt_12_bit_jpeg_frames_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let name = "JPGExtended.dcm";
    let edits: Vec<(&str, Edit, &str)> = vec![
        (
            "half",
            Box::new(|f| {
                let n = f[0].len() / 2;
                f[0].truncate(n)
            }),
            "JPEG data truncated",
        ),
        (
            "head",
            Box::new(|f| f[0].truncate(100)),
            "truncated in a marker segment",
        ),
        (
            "nodht",
            Box::new(|f| {
                let p = f[0].windows(2).position(|w| w == [0xFF, 0xC4]).unwrap();
                f[0][p + 4] = 0x13; // table class 1, id 3: the scan's DC table is missing
            }),
            "undefined DC table",
        ),
    ];
    for (tag, edit, want) in edits {
        let p = with_fragments(dir.path(), name, tag, edit);
        let e = err_of(&p).to_string();
        assert!(e.contains(&format!("{tag}_{name}")), "{e}");
        assert!(e.contains("cannot decode pixel data: frame 1: "), "{e}");
        assert!(e.contains(want), "{e}");
    }
    for k in 0..60usize {
        let p = with_fragments(dir.path(), name, "flip", move |f| {
            let n = f[0].len();
            let pos = 200 + (k * 7919) % (n - 200);
            f[0][pos] ^= 0x5A;
        });
        if let Err(e) = load_any(&p) {
            assert!(e.to_string().contains(name), "{e}");
        }
    }
}

#[test]
fn transfer_syntax_without_decoder_is_unsupported_transfer_syntax() {
    // MPEG2 video: neither medvlm nor pydicom decodes it
    match err_of(&data("syn_mpeg2_unsupported.dcm")) {
        IoError::UnsupportedTransferSyntax {
            path, uid, name, ..
        } => {
            assert!(path.ends_with("syn_mpeg2_unsupported.dcm"));
            assert_eq!(uid, "1.2.840.10008.1.2.4.100");
            assert_eq!(name, "MPEG2 Main Profile / Main Level");
        }
        other => panic!("unexpected error {other}"),
    }
    let e = err_of(&data("syn_mpeg2_unsupported.dcm")).to_string();
    assert!(
        e.contains("unsupported DICOM transfer syntax MPEG2 Main Profile / Main Level"),
        "{e}"
    );
}

/// Truncated and corrupt JPEG-LS frames: errors naming the file, no panic.
#[test]
fn truncated_or_corrupt_jpeg_ls_frames_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "MR_small_jpeg_ls_lossless.dcm",
        "SC_rgb_jls_lossy_sample.dcm",
    ] {
        let edits: Vec<(&str, Edit, &str)> = vec![
            (
                "half",
                Box::new(|f| {
                    let n = f[0].len() / 2;
                    f[0].truncate(n)
                }),
                "",
            ),
            (
                "tiny",
                Box::new(|f| f[0].truncate(1)),
                "does not start with an SOI marker",
            ),
            (
                "nosof",
                Box::new(|f| {
                    let p = f[0].windows(2).position(|w| w == [0xFF, 0xF7]).unwrap();
                    f[0][p + 1] = 0xC9
                }),
                "unexpected marker 0xFFC9",
            ),
        ];
        for (tag, edit, want) in edits {
            let p = with_fragments(dir.path(), name, tag, edit);
            let e = err_of(&p).to_string();
            assert!(e.contains(&format!("{tag}_{name}")), "{e}");
            assert!(e.contains("cannot decode pixel data: frame 1: "), "{e}");
            assert!(e.contains(want), "{e}");
        }
        // byte flips in the scan data: an error or other pixels, never a panic
        for k in 0..60usize {
            let p = with_fragments(dir.path(), name, "flip", move |f| {
                let n = f[0].len();
                let pos = n / 3 + (k * 7919) % (n - n / 3);
                f[0][pos] ^= 0x5A;
            });
            if let Err(e) = load_any(&p) {
                assert!(e.to_string().contains(name), "{e}");
            }
        }
    }
}

#[test]
fn every_truncation_of_real_files_errors_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "CT_small.dcm",
        "MR_small_RLE.dcm",
        "SC_rgb_rle.dcm",
        "SC_rgb_rle_2frame.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "JPGExtended.dcm",
        "syn_deflated.dcm",
        "anatomical.nii",
        "example_nifti2.nii.gz",
    ] {
        let bytes = std::fs::read(data(name)).unwrap();
        let target = dir.path().join(name);
        let step = (bytes.len() / 97).max(1);
        let mut cut = 0;
        while cut < bytes.len() {
            std::fs::write(&target, &bytes[..cut]).unwrap();
            // must not panic; an error must name the file
            if let Err(e) = load_any(&target) {
                assert!(e.to_string().contains(name), "{name}[..{cut}]: {e}");
            } else if !name.ends_with(".dcm") {
                panic!("{name} truncated at {cut} decoded");
            }
            cut += step;
        }
    }
}

#[test]
fn corrupted_bytes_in_compressed_pixel_data_do_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "MR_small_RLE.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "MR_small_jp2klossless.dcm",
    ] {
        let orig = std::fs::read(data(name)).unwrap();
        let target = dir.path().join(name);
        // flip bytes in the last third (pixel data) at several positions
        for k in 0..40usize {
            let mut b = orig.clone();
            let start = b.len() * 2 / 3;
            let pos = start + (k * 7919) % (b.len() - start);
            b[pos] ^= 0xA5;
            std::fs::write(&target, &b).unwrap();
            if let Err(e) = load_any(&target) {
                assert!(e.to_string().contains(name), "{e}");
            }
        }
    }
}

#[test]
fn non_medical_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("notes.bin");
    std::fs::write(&p, b"hello world, not an image").unwrap();
    match err_of(&p) {
        IoError::UnsupportedFormat { path, .. } => assert_eq!(path, p),
        other => panic!("{other}"),
    }
    let missing = dir.path().join("missing.dcm");
    let e = err_of(&missing).to_string();
    assert!(e.contains("missing.dcm"), "{e}");
    let fake = dir.path().join("fake.nii");
    std::fs::write(&fake, vec![7u8; 400]).unwrap();
    let e = err_of(&fake).to_string();
    assert!(e.contains("fake.nii") && e.contains("sizeof_hdr"), "{e}");
    let gz = dir.path().join("broken.nii.gz");
    std::fs::write(&gz, [0x1f, 0x8b, 8, 0, 1, 2, 3]).unwrap();
    let e = err_of(&gz).to_string();
    assert!(e.contains("broken.nii.gz") && e.contains("gzip"), "{e}");
}

#[test]
fn dicom_without_pixel_data_says_so() {
    // A valid Part 10 file that is not an image: write one with dicom-object.
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("plan.dcm");
    let mut obj = InMemDicomObject::new_empty();
    obj.put(DataElement::new(
        tags::SOP_CLASS_UID,
        VR::UI,
        PrimitiveValue::from("1.2.840.10008.5.1.4.1.1.481.5"),
    ));
    obj.put(DataElement::new(
        tags::SOP_INSTANCE_UID,
        VR::UI,
        PrimitiveValue::from("2.25.1"),
    ));
    let f = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax("1.2.840.10008.1.2.1")
                .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.481.5")
                .media_storage_sop_instance_uid("2.25.1"),
        )
        .unwrap();
    f.write_to_file(&p).unwrap();
    let e = err_of(&p).to_string();
    assert!(e.contains("plan.dcm") && e.contains("no Pixel Data"), "{e}");
}

#[test]
fn hostile_nifti2_dimensions_are_an_error_not_a_panic() {
    let mut h = vec![0u8; 544];
    h[0..4].copy_from_slice(&540i32.to_le_bytes());
    h[4..12].copy_from_slice(b"n+2\0\r\n\x1a\n");
    h[12..14].copy_from_slice(&16i16.to_le_bytes());
    h[16..24].copy_from_slice(&3i64.to_le_bytes());
    for k in 1..=3 {
        h[16 + 8 * k..24 + 8 * k].copy_from_slice(&(1i64 << 40).to_le_bytes());
    }
    h[168..176].copy_from_slice(&544i64.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("huge.nii");
    std::fs::write(&p, &h).unwrap();
    let e = err_of(&p).to_string();
    assert!(e.contains("huge.nii") && e.contains("overflow"), "{e}");
}

/// Copy `name` to `dir`, replacing its encapsulated pixel data fragments by what
/// `edit` makes of them (the rest of the file stays valid DICOM).
fn with_fragments(dir: &Path, name: &str, tag: &str, edit: impl Fn(&mut Vec<Vec<u8>>)) -> PathBuf {
    use dicom_core::value::{PixelFragmentSequence, Value};
    use dicom_core::{DataElement, VR};
    use dicom_dictionary_std::tags;
    let mut obj = dicom_object::open_file(data(name)).unwrap();
    let mut frags = obj
        .element(tags::PIXEL_DATA)
        .unwrap()
        .value()
        .fragments()
        .unwrap()
        .to_vec();
    edit(&mut frags);
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        Value::PixelSequence(PixelFragmentSequence::new(Vec::<u32>::new(), frags)),
    ));
    let out = dir.join(format!("{tag}_{name}"));
    obj.write_to_file(&out).unwrap();
    out
}

type Edit = Box<dyn Fn(&mut Vec<Vec<u8>>)>;

/// Truncated and corrupted RLE frames (issue #14): validated before decoding,
/// each an error naming the file, the transfer syntax and what is wrong.
#[test]
fn truncated_or_corrupt_rle_frames_are_errors_naming_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, &str, Edit, &str)> = vec![
        (
            "MR_small_RLE.dcm",
            "half",
            Box::new(|f| {
                let n = f[0].len() / 2;
                f[0].truncate(n)
            }),
            "runs past the end of the 1106-byte segment",
        ),
        (
            "SC_rgb_rle.dcm",
            "half",
            Box::new(|f| {
                let n = f[0].len() / 2;
                f[0].truncate(n)
            }),
            "RLE segment 3 starts at offset 464, past the end of the 332-byte fragment",
        ),
        (
            "SC_rgb_rle.dcm",
            "tail",
            Box::new(|f| {
                let n = f[0].len() - 40;
                f[0].truncate(n)
            }),
            "RLE segment 3: segment decodes to",
        ),
        (
            "MR_small_RLE.dcm",
            "tiny",
            Box::new(|f| f[0].truncate(10)),
            "RLE header truncated: the fragment has 10 bytes",
        ),
        (
            "MR_small_RLE.dcm",
            "offset",
            Box::new(|f| f[0][8..12].copy_from_slice(&999_999u32.to_le_bytes())),
            "RLE segment 2 starts at offset 999999, past the end",
        ),
        (
            "SC_rgb_rle.dcm",
            "order",
            Box::new(|f| f[0][8..12].copy_from_slice(&64u32.to_le_bytes())),
            "RLE segment offsets are not increasing",
        ),
        (
            "SC_rgb_rle.dcm",
            "nseg",
            Box::new(|f| f[0][0] = 7),
            "RLE header declares 7 segment(s), 3 expected",
        ),
        (
            "SC_rgb_rle_2frame.dcm",
            "frame2",
            Box::new(|f| f[1].truncate(30)),
            "frame 2: RLE header truncated",
        ),
    ];
    for (name, tag, edit, want) in cases {
        let p = with_fragments(dir.path(), name, tag, edit);
        let e = err_of(&p).to_string();
        assert!(e.contains(&format!("{tag}_{name}")), "{e}");
        assert!(e.contains("RLE Lossless (1.2.840.10008.1.2.5)"), "{e}");
        assert!(e.contains(want), "{name} {tag}: {e}");
    }
}

/// Truncated or garbled JPEG and JPEG 2000 frames, and a garbled deflate stream:
/// an error naming the file and the codec's reason, never a panic. (A garbled
/// stream can also decode to other pixels: these formats carry no checksum.)
#[test]
fn truncated_or_garbled_jpeg_jpeg2000_and_deflate_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut names = vec!["SC_rgb_jpeg_dcmtk.dcm"];
    if cfg!(feature = "jpeg2000") {
        names.push("MR_small_jp2klossless.dcm");
    }
    for name in names {
        let edits: Vec<(&str, Edit)> = vec![
            (
                "half",
                Box::new(|f| {
                    let n = f[0].len() / 2;
                    f[0].truncate(n)
                }),
            ),
            ("tiny", Box::new(|f| f[0].truncate(10))),
            ("nosoi", Box::new(|f| f[0][0] ^= 0xFF)),
        ];
        for (tag, edit) in edits {
            let p = with_fragments(dir.path(), name, tag, edit);
            let e = err_of(&p).to_string();
            assert!(e.contains(&format!("{tag}_{name}")), "{e}");
            assert!(e.contains("cannot decode pixel data"), "{e}");
        }
    }
    // JPEG garbled inside the entropy-coded data: the decoder's own reason
    let p = with_fragments(dir.path(), "SC_rgb_jpeg_dcmtk.dcm", "garble", |f| {
        let n = f[0].len();
        for i in (n / 3..n).step_by(5) {
            f[0][i] ^= 0x5a
        }
    });
    let e = err_of(&p).to_string();
    assert!(e.contains("failed to decode huffman code"), "{e}");

    // Deflated data set: garble and truncate the deflate stream after the meta group.
    let orig = std::fs::read(data("syn_deflated.dcm")).unwrap();
    let meta_end = 132 + 12 + u32::from_le_bytes(orig[140..144].try_into().unwrap()) as usize;
    let p = dir.path().join("syn_deflated.dcm");
    let mut b = orig.clone();
    for x in &mut b[meta_end + 2..meta_end + 12] {
        *x ^= 0xA5;
    }
    std::fs::write(&p, &b).unwrap();
    let e = err_of(&p).to_string();
    assert!(
        e.contains("syn_deflated.dcm") && e.contains("Deflated"),
        "{e}"
    );
    // (the last byte is the even-length padding after the deflate stream, whose own
    // last byte holds only the end-of-block code: without them the data set is
    // still complete)
    for cut in meta_end..orig.len() - 2 {
        std::fs::write(&p, &orig[..cut]).unwrap();
        match load_any(&p) {
            Ok(_) => panic!("syn_deflated.dcm cut at {cut} of {} decoded", orig.len()),
            Err(e) => assert!(e.to_string().contains("syn_deflated.dcm"), "{cut}: {e}"),
        }
    }
}

/// NIfTI headers nibabel would read as an empty array, a negative count or its
/// own header bytes as voxels: refused with an error naming the file and field.
#[test]
fn nifti_zero_negative_and_absurd_header_values_are_refused() {
    let orig = std::fs::read(data("nib_leading_unit.nii")).unwrap();
    assert_eq!(i16::from_le_bytes([orig[40], orig[41]]), 3);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad_header.nii");
    let set_i16 = |b: &mut Vec<u8>, o: usize, v: i16| b[o..o + 2].copy_from_slice(&v.to_le_bytes());
    let set_f32 = |b: &mut Vec<u8>, o: usize, v: f32| b[o..o + 4].copy_from_slice(&v.to_le_bytes());
    type Patch = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(Patch, &str)> = vec![
        (
            Box::new(move |b| set_i16(b, 44, 0)),
            "dim[2] = 0 (dims [1, 0, 5]): the image is empty",
        ),
        (
            Box::new(move |b| set_i16(b, 42, 0)),
            "dim[1] = 0 (dims [0, 6, 5])",
        ),
        (
            Box::new(move |b| set_i16(b, 46, -5)),
            "negative dim[3] = -5",
        ),
        (Box::new(move |b| set_i16(b, 40, 0)), "invalid dim[0] = 0"),
        (Box::new(move |b| set_i16(b, 40, 8)), "invalid dim[0] = 8"),
        (
            Box::new(move |b| set_f32(b, 108, 0.0)),
            "invalid vox_offset 0",
        ),
        (
            Box::new(move |b| set_f32(b, 108, -5.0)),
            "invalid vox_offset -5",
        ),
        (
            Box::new(move |b| set_f32(b, 108, f32::NAN)),
            "invalid vox_offset NaN",
        ),
        (
            Box::new(move |b| set_f32(b, 108, 352.5)),
            "invalid vox_offset 352.5",
        ),
        (Box::new(move |b| set_f32(b, 108, 1.0e9)), "truncated data"),
        (
            Box::new(|b| b[344..348].copy_from_slice(b"abc\0")),
            "magic is",
        ),
    ];
    for (patch, want) in cases {
        let mut b = orig.clone();
        patch(&mut b);
        std::fs::write(&p, &b).unwrap();
        let e = err_of(&p).to_string();
        assert!(e.contains("bad_header.nii: NIfTI: "), "{e}");
        assert!(e.contains(want), "want {want:?}: {e}");
    }
    // zero-sized dimension in a NIfTI-2 header
    let mut h = vec![0u8; 560];
    h[0..4].copy_from_slice(&540i32.to_le_bytes());
    h[4..12].copy_from_slice(b"n+2\0\r\n\x1a\n");
    h[12..14].copy_from_slice(&2i16.to_le_bytes());
    h[16..24].copy_from_slice(&3i64.to_le_bytes());
    for (k, d) in [4i64, 0, 2].iter().enumerate() {
        h[24 + 8 * k..32 + 8 * k].copy_from_slice(&d.to_le_bytes());
    }
    h[168..176].copy_from_slice(&544i64.to_le_bytes());
    let p2 = dir.path().join("empty2.nii");
    std::fs::write(&p2, &h).unwrap();
    let e = err_of(&p2).to_string();
    assert!(e.contains("empty2.nii") && e.contains("dim[2] = 0"), "{e}");
    h[168..176].copy_from_slice(&100i64.to_le_bytes());
    h[32..40].copy_from_slice(&1i64.to_le_bytes());
    std::fs::write(&p2, &h).unwrap();
    let e = err_of(&p2).to_string();
    assert!(e.contains("invalid vox_offset 100"), "{e}");
}

/// An element declaring a length far beyond the file is refused before the parser allocates
/// it (dicom-object allocates a declared length before noticing the file is short), with the
/// element, its offset and the file named.
#[test]
fn dicom_length_past_the_end_is_refused_before_allocating() {
    let bytes = std::fs::read(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/MR_small.dcm"),
    )
    .unwrap();
    // (7FE0,0010) OW in explicit VR little endian: tag, VR, 2 reserved bytes, 4-byte length.
    let at = bytes
        .windows(6)
        .rposition(|w| w == [0xE0, 0x7F, 0x10, 0x00, b'O', b'W'])
        .expect("pixel data element");
    for (variant, declared) in [("pixels", 2_000_000_000u32), ("odd", 0xFFFF_FFF0)] {
        let mut damaged = bytes.clone();
        damaged[at + 8..at + 12].copy_from_slice(&declared.to_le_bytes());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(format!("{variant}.dcm"));
        std::fs::write(&p, &damaged).unwrap();
        let err = medvlm_io::load_any(&p).unwrap_err().to_string();
        assert!(err.contains(&format!("{variant}.dcm")), "{err}");
        assert!(
            err.contains(&format!(
                "(7FE0,0010) at byte {at} declares {declared} bytes"
            )),
            "{err}"
        );
        assert!(err.contains("remain in the file"), "{err}");
    }
}

/// A fuzzed file (`fuzz_unknown_vr_meta.dcm`, from pydicom's MR_small.dcm) whose meta group
/// holds an element with an unknown VR: dicom-rs reads it as UN with a 4-byte length and
/// allocated 3.9 GB for a later element; the length check, which reads unknown VRs the same
/// way, refuses the file first.
#[test]
fn fuzzed_unknown_vr_in_the_meta_group_is_refused_before_allocating() {
    let err = medvlm_io::load_any(&data("fuzz_unknown_vr_meta.dcm"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("fuzz_unknown_vr_meta.dcm"), "{err}");
    assert!(err.contains("declares") && err.contains("remain"), "{err}");
}
