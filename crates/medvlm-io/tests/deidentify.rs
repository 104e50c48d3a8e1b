//! De-identification (PS3.15 E.1 basic profile subset): the identifying values of
//! the real test files are gone from the copies, pixels are unchanged.
//! Assertion messages name attributes, never their values.

use std::path::PathBuf;

use dicom_core::header::Header;
use dicom_dictionary_std::tags;
use medvlm_io::deidentify::{deidentify_file, Action, BASIC_PROFILE};
use medvlm_io::dicom::{identifying_attributes_present, open};
use medvlm_io::load_any;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

#[test]
fn identifying_values_are_gone_and_pixels_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut checked_values = 0;
    for name in [
        "CT_small.dcm",
        "MR_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
        "SC_rgb_rle.dcm",
        "MR_small_jp2klossless.dcm",
    ] {
        let src = data(name);
        let orig = open(&src).unwrap();
        let out = dir.path().join(name);
        let present = deidentify_file(&src, &out, "test-salt").unwrap();
        assert_eq!(present, identifying_attributes_present(&orig), "{name}");
        let bytes = std::fs::read(&out).unwrap();
        for (tag, action, attr) in BASIC_PROFILE {
            if *action == Action::U {
                continue;
            }
            let Some(e) = orig.element_opt(*tag).ok().flatten() else {
                continue;
            };
            let Ok(v) = e.to_str() else { continue };
            let v = v.trim_matches(['\0', ' ']).to_string();
            // Text identifiers must not appear anywhere in the copy's bytes (short
            // numbers such as a weight could occur by chance in pixel data).
            if v.len() >= 4 && v.chars().any(|c| c.is_ascii_alphabetic()) {
                checked_values += 1;
                // The same text may legitimately sit in a retained, non-identifying
                // attribute (e.g. a manufacturer named like the institution).
                let retained = orig
                    .iter()
                    .filter(|e| BASIC_PROFILE.iter().all(|(t, _, _)| *t != e.tag()))
                    .filter(|e| e.to_str().map(|s| s.contains(v.as_str())).unwrap_or(false))
                    .count();
                let found = bytes
                    .windows(v.len())
                    .filter(|w| *w == v.as_bytes())
                    .count();
                assert!(
                    found <= retained,
                    "{name}: value of {attr} still in the copy"
                );
            }
        }
        let cleaned = open(&out).unwrap();
        for (tag, action, attr) in BASIC_PROFILE {
            let e = cleaned.element_opt(*tag).unwrap();
            match action {
                Action::X => assert!(e.is_none(), "{name}: {attr} not removed"),
                Action::Z => assert!(
                    e.map(|e| e.to_str().unwrap().trim_matches(['\0', ' ']).is_empty())
                        .unwrap_or(true),
                    "{name}: {attr} not emptied"
                ),
                Action::U => {}
            }
        }
        assert!(
            identifying_attributes_present(&cleaned).is_empty(),
            "{name}"
        );
        assert_eq!(
            cleaned
                .element(tags::PATIENT_IDENTITY_REMOVED)
                .unwrap()
                .to_str()
                .unwrap()
                .trim(),
            "YES"
        );
        for tag in [tags::STUDY_INSTANCE_UID, tags::SOP_INSTANCE_UID] {
            if let Ok(old) = orig.element(tag) {
                let new = cleaned.element(tag).unwrap();
                assert_ne!(
                    old.to_str().unwrap(),
                    new.to_str().unwrap(),
                    "{name}: UID {tag} not replaced"
                );
                assert!(new.to_str().unwrap().starts_with("2.25."));
            }
        }
        assert_eq!(
            cleaned.meta().media_storage_sop_instance_uid(),
            cleaned
                .element(tags::SOP_INSTANCE_UID)
                .unwrap()
                .to_str()
                .unwrap()
                .trim_end_matches('\0')
        );
        assert!(
            cleaned.iter().all(|e| e.tag().group() % 2 == 0),
            "{name}: private tags remain"
        );
        let a = load_any(&src).unwrap();
        let b = load_any(&out).unwrap();
        assert_eq!(a.data, b.data, "{name}: pixels changed");
        assert_eq!(a.shape, b.shape);
    }
    assert!(
        checked_values >= 5,
        "too few identifying values in the test files to be meaningful: {checked_values}"
    );
}

#[test]
fn uid_replacement_is_consistent_across_files_of_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.dcm");
    let b = dir.path().join("b.dcm");
    deidentify_file(&data("MR_small.dcm"), &a, "run-1").unwrap();
    deidentify_file(&data("MR_small_implicit.dcm"), &b, "run-1").unwrap();
    let (oa, ob) = (
        open(&data("MR_small.dcm")).unwrap(),
        open(&data("MR_small_implicit.dcm")).unwrap(),
    );
    let (na, nb) = (open(&a).unwrap(), open(&b).unwrap());
    let same_before = oa
        .element(tags::STUDY_INSTANCE_UID)
        .unwrap()
        .to_str()
        .unwrap()
        == ob
            .element(tags::STUDY_INSTANCE_UID)
            .unwrap()
            .to_str()
            .unwrap();
    let same_after = na
        .element(tags::STUDY_INSTANCE_UID)
        .unwrap()
        .to_str()
        .unwrap()
        == nb
            .element(tags::STUDY_INSTANCE_UID)
            .unwrap()
            .to_str()
            .unwrap();
    assert_eq!(same_before, same_after);
    // another salt gives other UIDs
    let c = dir.path().join("c.dcm");
    deidentify_file(&data("MR_small.dcm"), &c, "run-2").unwrap();
    let nc = open(&c).unwrap();
    assert_ne!(
        na.element(tags::STUDY_INSTANCE_UID)
            .unwrap()
            .to_str()
            .unwrap(),
        nc.element(tags::STUDY_INSTANCE_UID)
            .unwrap()
            .to_str()
            .unwrap()
    );
}

#[test]
fn nested_sequences_and_private_tags_are_cleaned() {
    use dicom_core::value::{DataSetSequence, Value};
    use dicom_core::{DataElement, Length, PrimitiveValue, Tag, VR};
    use dicom_object::InMemDicomObject;
    let mut item = InMemDicomObject::new_empty();
    item.put(DataElement::new(
        tags::PATIENT_NAME,
        VR::PN,
        PrimitiveValue::from("Secret^Nested"),
    ));
    item.put(DataElement::new(
        tags::CODE_VALUE,
        VR::SH,
        PrimitiveValue::from("KEEP1"),
    ));
    let mut obj = InMemDicomObject::new_empty();
    obj.put(DataElement::new(
        tags::PATIENT_NAME,
        VR::PN,
        PrimitiveValue::from("Secret^Top"),
    ));
    obj.put(DataElement::new(
        Tag(0x0009, 0x0010),
        VR::LO,
        PrimitiveValue::from("PRIVATE CREATOR"),
    ));
    obj.put(DataElement::new(
        Tag(0x0009, 0x1001),
        VR::LO,
        PrimitiveValue::from("Secret private"),
    ));
    obj.put(DataElement::new(
        tags::ANATOMIC_REGION_SEQUENCE,
        VR::SQ,
        Value::Sequence(DataSetSequence::new(vec![item], Length::UNDEFINED)),
    ));
    let clean = medvlm_io::deidentify::deidentify_dataset(&obj, "s");
    assert!(clean.element_opt(Tag(0x0009, 0x1001)).unwrap().is_none());
    assert_eq!(
        clean.element(tags::PATIENT_NAME).unwrap().to_str().unwrap(),
        ""
    );
    let seq = clean.element(tags::ANATOMIC_REGION_SEQUENCE).unwrap();
    let inner = &seq.items().unwrap()[0];
    assert_eq!(
        inner.element(tags::PATIENT_NAME).unwrap().to_str().unwrap(),
        ""
    );
    assert_eq!(
        inner.element(tags::CODE_VALUE).unwrap().to_str().unwrap(),
        "KEEP1"
    );
}
