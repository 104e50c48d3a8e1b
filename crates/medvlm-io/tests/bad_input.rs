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
fn dicom_without_meta_header_is_rejected_clearly() {
    let e = err_of(&data("ExplVR_LitEndNoMeta.dcm")).to_string();
    assert!(e.contains("ExplVR_LitEndNoMeta.dcm"), "{e}");
    assert!(e.contains("'DICM' at byte 128 missing"), "{e}");
}

#[test]
fn twelve_bit_jpeg_extended_is_a_clear_decode_error() {
    let e = err_of(&data("JPEG-lossy.dcm")).to_string();
    assert!(e.contains("JPEG-lossy.dcm"), "{e}");
    assert!(e.contains("1.2.840.10008.1.2.4.51"), "{e}");
    assert!(e.contains("SamplePrecision(12)"), "{e}");
}

#[cfg(not(feature = "jpeg-ls"))]
#[test]
fn jpeg_ls_without_codec_is_unsupported_transfer_syntax() {
    match err_of(&data("MR_small_jpeg_ls_lossless.dcm")) {
        IoError::UnsupportedTransferSyntax {
            path, uid, name, ..
        } => {
            assert!(path.ends_with("MR_small_jpeg_ls_lossless.dcm"));
            assert_eq!(uid, "1.2.840.10008.1.2.4.80");
            assert!(name.contains("JPEG-LS"), "{name}");
        }
        other => panic!("unexpected error {other}"),
    }
}

#[test]
fn every_truncation_of_real_files_errors_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "CT_small.dcm",
        "MR_small_RLE.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "MR_small_jp2klossless.dcm",
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
