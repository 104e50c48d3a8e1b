//! Round trips of the writers other crates use (phantoms): Secondary Capture DICOM,
//! NIfTI-1, and JSONL/CSV manifests.

use medvlm_io::dicom::{read_dicom, write_secondary_capture, ScMetadata};
use medvlm_io::volume::{affine_from_spacing, read_nifti, write_nifti1};
use medvlm_io::{
    read_manifest, write_manifest_csv, write_manifest_jsonl, BoundingBox, Layout, ManifestRecord,
    Photometric, QaPair, RegionMask,
};

#[test]
fn secondary_capture_u16_round_trip_with_rescale() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ct.dcm");
    let (rows, cols) = (5usize, 7usize);
    let pixels: Vec<u16> = (0..rows * cols).map(|i| (i * 97 % 4096) as u16).collect();
    let meta = ScMetadata {
        modality: Some("CT".into()),
        study_description: Some("phantom chest".into()),
        rescale: Some((1.0, -1024.0)),
        window: Some((-600.0, 1500.0)),
        pixel_spacing: Some((0.7, 0.8)),
        ..Default::default()
    };
    write_secondary_capture(&path, &pixels, rows, cols, &meta).unwrap();
    let img = read_dicom(&path).unwrap();
    assert_eq!(img.shape, vec![rows, cols]);
    assert_eq!(img.modality.as_deref(), Some("CT"));
    assert_eq!(img.photometric, Photometric::Monochrome2);
    assert_eq!(img.file_windows, vec![(-600.0, 1500.0)]);
    assert_eq!(img.spacing, vec![0.7, 0.8]);
    let want: Vec<f32> = pixels.iter().map(|&p| p as f32 - 1024.0).collect();
    assert_eq!(img.data, want);
    assert!(img.transfer_syntax.unwrap().contains("1.2.840.10008.1.2.1"));
}

#[test]
fn secondary_capture_u8_and_i16_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p8 = dir.path().join("a.dcm");
    let px: Vec<u8> = (0..3 * 3).map(|i| (i * 31) as u8).collect();
    write_secondary_capture(&p8, &px, 3, 3, &ScMetadata::default()).unwrap();
    let img = read_dicom(&p8).unwrap();
    assert_eq!(img.data, px.iter().map(|&v| v as f32).collect::<Vec<_>>());
    assert_eq!(img.modality.as_deref(), Some("OT"));

    let p16 = dir.path().join("b.dcm");
    let px: Vec<i16> = vec![-1000, -1, 0, 1, 3000, i16::MIN];
    write_secondary_capture(&p16, &px, 2, 3, &ScMetadata::default()).unwrap();
    let img = read_dicom(&p16).unwrap();
    assert_eq!(img.data, px.iter().map(|&v| v as f32).collect::<Vec<_>>());
}

#[test]
fn secondary_capture_rejects_wrong_pixel_count() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.dcm");
    let err = write_secondary_capture(&path, &[0u8; 5], 2, 3, &ScMetadata::default()).unwrap_err();
    assert!(
        err.to_string().contains("5 pixels given for a 2x3 image"),
        "{err}"
    );
    assert!(!path.exists());
}

#[test]
fn secondary_capture_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let px: Vec<u8> = (0..16).collect();
    let a = dir.path().join("a.dcm");
    let b = dir.path().join("b.dcm");
    write_secondary_capture(&a, &px, 4, 4, &ScMetadata::default()).unwrap();
    write_secondary_capture(&b, &px, 4, 4, &ScMetadata::default()).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

fn ramp(dims: &[usize]) -> Vec<f32> {
    let n: usize = dims.iter().product();
    (0..n).map(|i| (i as f32) * 0.5 - 3.0).collect()
}

#[test]
fn nifti1_round_trip_plain_and_gz() {
    let dir = tempfile::tempdir().unwrap();
    let dims = [4usize, 3, 2];
    let data = ramp(&dims);
    let mut affine = affine_from_spacing([0.5, 0.75, 2.0]);
    affine[0][3] = -10.0;
    affine[2][3] = 4.0;
    for name in ["v.nii", "v.nii.gz"] {
        let path = dir.path().join(name);
        write_nifti1(&path, &data, &dims, &affine).unwrap();
        let img = read_nifti(&path).unwrap();
        assert_eq!(img.shape, dims.to_vec(), "{name}");
        assert_eq!(img.data, data, "{name}");
        assert_eq!(img.affine.unwrap(), affine, "{name}");
        assert_eq!(img.spacing[..3], [0.5, 0.75, 2.0]);
        assert_eq!(
            img.layout,
            Layout::Volume {
                dims: dims.to_vec()
            }
        );
    }
    // gz really is gzip
    let gz = std::fs::read(dir.path().join("v.nii.gz")).unwrap();
    assert_eq!(&gz[..2], &[0x1f, 0x8b]);
}

#[test]
fn nifti1_written_file_is_read_by_the_nifti_crate_in_fortran_order() {
    // Cross-check with an independent reader: voxel (x=1, y=2, z=1) of a [4,3,2] volume.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.nii");
    let dims = [4usize, 3, 2];
    let data = ramp(&dims);
    write_nifti1(&path, &data, &dims, &affine_from_spacing([1.0, 1.0, 1.0])).unwrap();
    let obj = nifti::ReaderOptions::new().read_file(&path).unwrap();
    use nifti::NiftiObject;
    let hdr = obj.header().clone();
    assert_eq!(&hdr.dim[..4], &[3, 4, 3, 2]);
    let raw: Vec<f32> = obj.into_volume().into_nifti_typed_data().unwrap();
    // Fortran index of (1,2,1) = 1 + 4*(2 + 3*1); C index = (1*3 + 2)*2 + 1
    assert_eq!(raw[1 + 4 * (2 + 3)], data[(3 + 2) * 2 + 1]);
}

#[test]
fn nifti1_rejects_mismatched_dims() {
    let dir = tempfile::tempdir().unwrap();
    let err = write_nifti1(
        &dir.path().join("x.nii"),
        &[0.0; 5],
        &[2, 3],
        &affine_from_spacing([1.0; 3]),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("5 values given for dims [2, 3]"),
        "{err}"
    );
}

fn sample_records() -> Vec<ManifestRecord> {
    let mut extra = std::collections::BTreeMap::new();
    extra.insert("site".to_string(), serde_json::json!("A"));
    vec![
        ManifestRecord {
            image: "img/0001.dcm".into(),
            split: Some("train".into()),
            label: Some("nodule".into()),
            labels: vec!["nodule".into(), "effusion".into()],
            text: Some("Small nodule, right lower lobe.".into()),
            masks: vec![RegionMask {
                label: "nodule".into(),
                path: "mask/0001.png".into(),
            }],
            boxes: vec![BoundingBox {
                label: "nodule".into(),
                x0: 1.0,
                y0: 2.5,
                x1: 10.0,
                y1: 12.0,
            }],
            qa: vec![QaPair {
                question: "Is there a nodule?".into(),
                answer: "yes".into(),
                kind: Some("presence".into()),
            }],
            extra,
        },
        ManifestRecord {
            image: "img/0002.png".into(),
            split: Some("test".into()),
            label: Some("normal".into()),
            ..Default::default()
        },
    ]
}

#[test]
fn manifest_jsonl_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.jsonl");
    let recs = sample_records();
    write_manifest_jsonl(&path, &recs).unwrap();
    let m = read_manifest(&path).unwrap();
    assert_eq!(m.records, recs);
    assert_eq!(m.root, dir.path());
    assert_eq!(m.image_path(&m.records[0]), dir.path().join("img/0001.dcm"));
    assert_eq!(m.split("test").count(), 1);
}

#[test]
fn jsonl_integer_labels_are_class_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.jsonl");
    std::fs::write(
        &path,
        "{\"image\": \"a.png\", \"label\": 3}\n\
         {\"image\": \"b.png\", \"label\": \"3\"}\n\
         {\"image\": \"c.png\", \"labels\": [0, \"effusion\"]}\n\
         {\"image\": \"d.png\", \"label\": null}\n",
    )
    .unwrap();
    let m = read_manifest(&path).unwrap();
    assert_eq!(m.records[0].label.as_deref(), Some("3"));
    assert_eq!(m.records[1].label, m.records[0].label);
    assert_eq!(m.records[2].labels, ["0", "effusion"]);
    assert_eq!(m.records[3].label, None);
    // Anything else is refused with the file, the line and the field.
    std::fs::write(&path, "{\"image\": \"a.png\", \"label\": 1.5}\n").unwrap();
    let err = read_manifest(&path).unwrap_err().to_string();
    assert!(
        err.contains("m.jsonl:1:") && err.contains("\"label\""),
        "{err}"
    );
}

#[test]
fn manifest_csv_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.csv");
    let recs = sample_records();
    write_manifest_csv(&path, &recs).unwrap();
    let m = read_manifest(&path).unwrap();
    assert_eq!(m.records, recs);
}

#[test]
fn manifest_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.jsonl");
    std::fs::write(&path, "{\"image\": \"a.png\"}\n{\"image\": 3}\n").unwrap();
    let err = read_manifest(&path).unwrap_err().to_string();
    assert!(err.contains("bad.jsonl:2:"), "{err}");
    let path = dir.path().join("bad.csv");
    std::fs::write(&path, "split,label\ntrain,a\n").unwrap();
    let err = read_manifest(&path).unwrap_err().to_string();
    assert!(err.contains("no image column"), "{err}");
}

#[test]
fn class_folder_layout_with_splits() {
    let dir = tempfile::tempdir().unwrap();
    for (split, class, name) in [
        ("train", "cat", "a.png"),
        ("train", "dog", "b.png"),
        ("valid", "dog", "c.dcm"),
        ("train", "dog", "notes.txt"),
    ] {
        let d = dir.path().join(split).join(class);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), b"x").unwrap();
    }
    let m = read_manifest(dir.path()).unwrap();
    let got: Vec<(String, String, String)> = m
        .records
        .iter()
        .map(|r| {
            (
                r.image.clone(),
                r.split.clone().unwrap(),
                r.label.clone().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("train/cat/a.png".into(), "train".into(), "cat".into()),
            ("train/dog/b.png".into(), "train".into(), "dog".into()),
            ("valid/dog/c.dcm".into(), "val".into(), "dog".into()),
        ]
    );
}
