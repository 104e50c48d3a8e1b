//! De-identification with the Basic Application Level Confidentiality Profile of
//! DICOM PS3.15 Annex E (table E.1-1), applied to the attributes listed in
//! [`BASIC_PROFILE`] (the common direct and indirect identifiers), recursively
//! inside sequences:
//!
//! - `X`: remove the attribute;
//! - `Z`: keep it with an empty value (type 2 attributes a reader expects);
//! - `U`: replace a UID by a new `2.25.` UID derived from the old one and a
//!   per-run secret salt, so references between files of one run stay consistent;
//! - all private attributes (odd groups) are removed (E.3.10 not retained).
//!
//! It then sets PatientIdentityRemoved (0012,0062) = `YES` and
//! DeidentificationMethod (0012,0063). Pixel data are not altered: burned-in
//! annotations (E.3.1 "Clean Pixel Data") are outside this profile subset.

use std::path::Path;

use dicom_core::header::Header;
use dicom_core::value::{DataSetSequence, Value};
use dicom_core::{DataElement, Length, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use crate::dicom::{derived_uid, open, write_file_object};
use crate::error::Result;

/// What to do with an attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Remove.
    X,
    /// Replace by an empty value.
    Z,
    /// Replace a UID consistently.
    U,
}

/// The attributes handled, with their PS3.15 E.1-1 basic-profile action (where the
/// table allows several, the strictest that keeps the file valid is used).
pub const BASIC_PROFILE: &[(Tag, Action, &str)] = &[
    (tags::PATIENT_NAME, Action::Z, "PatientName"),
    (tags::PATIENT_ID, Action::Z, "PatientID"),
    (tags::PATIENT_BIRTH_DATE, Action::Z, "PatientBirthDate"),
    (tags::PATIENT_SEX, Action::Z, "PatientSex"),
    (tags::PATIENT_BIRTH_TIME, Action::X, "PatientBirthTime"),
    (tags::PATIENT_AGE, Action::X, "PatientAge"),
    (tags::PATIENT_SIZE, Action::X, "PatientSize"),
    (tags::PATIENT_WEIGHT, Action::X, "PatientWeight"),
    (tags::PATIENT_ADDRESS, Action::X, "PatientAddress"),
    (
        tags::PATIENT_TELEPHONE_NUMBERS,
        Action::X,
        "PatientTelephoneNumbers",
    ),
    (
        tags::PATIENT_MOTHER_BIRTH_NAME,
        Action::X,
        "PatientMotherBirthName",
    ),
    (tags::PATIENT_BIRTH_NAME, Action::X, "PatientBirthName"),
    (Tag(0x0010, 0x1000), Action::X, "OtherPatientIDs"),
    (
        tags::OTHER_PATIENT_I_DS_SEQUENCE,
        Action::X,
        "OtherPatientIDsSequence",
    ),
    (tags::OTHER_PATIENT_NAMES, Action::X, "OtherPatientNames"),
    (tags::ISSUER_OF_PATIENT_ID, Action::X, "IssuerOfPatientID"),
    (Tag(0x0010, 0x1090), Action::X, "MedicalRecordLocator"),
    (Tag(0x0010, 0x2160), Action::X, "EthnicGroup"),
    (tags::OCCUPATION, Action::X, "Occupation"),
    (
        tags::ADDITIONAL_PATIENT_HISTORY,
        Action::X,
        "AdditionalPatientHistory",
    ),
    (tags::PATIENT_COMMENTS, Action::X, "PatientComments"),
    (tags::MILITARY_RANK, Action::X, "MilitaryRank"),
    (tags::BRANCH_OF_SERVICE, Action::X, "BranchOfService"),
    (tags::COUNTRY_OF_RESIDENCE, Action::X, "CountryOfResidence"),
    (tags::REGION_OF_RESIDENCE, Action::X, "RegionOfResidence"),
    (
        tags::PATIENT_RELIGIOUS_PREFERENCE,
        Action::X,
        "PatientReligiousPreference",
    ),
    (
        tags::REFERRING_PHYSICIAN_NAME,
        Action::Z,
        "ReferringPhysicianName",
    ),
    (
        tags::REFERRING_PHYSICIAN_ADDRESS,
        Action::X,
        "ReferringPhysicianAddress",
    ),
    (
        tags::REFERRING_PHYSICIAN_TELEPHONE_NUMBERS,
        Action::X,
        "ReferringPhysicianTelephoneNumbers",
    ),
    (tags::PHYSICIANS_OF_RECORD, Action::X, "PhysiciansOfRecord"),
    (
        tags::PERFORMING_PHYSICIAN_NAME,
        Action::X,
        "PerformingPhysicianName",
    ),
    (
        tags::NAME_OF_PHYSICIANS_READING_STUDY,
        Action::X,
        "NameOfPhysiciansReadingStudy",
    ),
    (tags::REQUESTING_PHYSICIAN, Action::X, "RequestingPhysician"),
    (tags::OPERATORS_NAME, Action::X, "OperatorsName"),
    (tags::INSTITUTION_NAME, Action::X, "InstitutionName"),
    (tags::INSTITUTION_ADDRESS, Action::X, "InstitutionAddress"),
    (
        tags::INSTITUTIONAL_DEPARTMENT_NAME,
        Action::X,
        "InstitutionalDepartmentName",
    ),
    (tags::STATION_NAME, Action::X, "StationName"),
    (tags::DEVICE_SERIAL_NUMBER, Action::X, "DeviceSerialNumber"),
    (tags::ACCESSION_NUMBER, Action::Z, "AccessionNumber"),
    (tags::STUDY_ID, Action::Z, "StudyID"),
    (tags::STUDY_DATE, Action::Z, "StudyDate"),
    (tags::STUDY_TIME, Action::Z, "StudyTime"),
    (tags::SERIES_DATE, Action::X, "SeriesDate"),
    (tags::SERIES_TIME, Action::X, "SeriesTime"),
    (tags::ACQUISITION_DATE, Action::X, "AcquisitionDate"),
    (tags::ACQUISITION_TIME, Action::X, "AcquisitionTime"),
    (
        tags::ACQUISITION_DATE_TIME,
        Action::X,
        "AcquisitionDateTime",
    ),
    (tags::CONTENT_DATE, Action::Z, "ContentDate"),
    (tags::CONTENT_TIME, Action::Z, "ContentTime"),
    (
        tags::INSTANCE_CREATION_DATE,
        Action::X,
        "InstanceCreationDate",
    ),
    (
        tags::INSTANCE_CREATION_TIME,
        Action::X,
        "InstanceCreationTime",
    ),
    (tags::STUDY_DESCRIPTION, Action::X, "StudyDescription"),
    (tags::SERIES_DESCRIPTION, Action::X, "SeriesDescription"),
    (
        tags::ADMITTING_DIAGNOSES_DESCRIPTION,
        Action::X,
        "AdmittingDiagnosesDescription",
    ),
    (
        tags::DERIVATION_DESCRIPTION,
        Action::X,
        "DerivationDescription",
    ),
    (tags::IMAGE_COMMENTS, Action::X, "ImageComments"),
    (tags::PROTOCOL_NAME, Action::X, "ProtocolName"),
    (
        tags::REQUEST_ATTRIBUTES_SEQUENCE,
        Action::X,
        "RequestAttributesSequence",
    ),
    (
        tags::PERFORMED_PROCEDURE_STEP_ID,
        Action::X,
        "PerformedProcedureStepID",
    ),
    (tags::CONTENT_CREATOR_NAME, Action::Z, "ContentCreatorName"),
    (tags::STUDY_INSTANCE_UID, Action::U, "StudyInstanceUID"),
    (tags::SERIES_INSTANCE_UID, Action::U, "SeriesInstanceUID"),
    (tags::SOP_INSTANCE_UID, Action::U, "SOPInstanceUID"),
    (
        tags::FRAME_OF_REFERENCE_UID,
        Action::U,
        "FrameOfReferenceUID",
    ),
    (
        tags::REFERENCED_SOP_INSTANCE_UID,
        Action::U,
        "ReferencedSOPInstanceUID",
    ),
];

fn action_of(tag: Tag) -> Option<Action> {
    BASIC_PROFILE
        .iter()
        .find(|(t, _, _)| *t == tag)
        .map(|(_, a, _)| *a)
}

fn new_uid(old: &str, salt: &str) -> String {
    derived_uid(old.trim_end_matches(['\0', ' ']).as_bytes(), salt)
}

/// Apply the profile to a data set (recursively), returning a new one.
pub fn deidentify_dataset(obj: &InMemDicomObject, salt: &str) -> InMemDicomObject {
    let mut out = InMemDicomObject::new_empty();
    for elem in obj.iter() {
        let tag = elem.tag();
        if tag.group() % 2 == 1 {
            continue; // private attribute
        }
        match action_of(tag) {
            Some(Action::X) => continue,
            Some(Action::Z) => {
                out.put(DataElement::new(tag, elem.vr(), PrimitiveValue::Empty));
            }
            Some(Action::U) => {
                let old = elem.to_str().map(|s| s.into_owned()).unwrap_or_default();
                out.put(DataElement::new(
                    tag,
                    VR::UI,
                    PrimitiveValue::from(new_uid(&old, salt)),
                ));
            }
            None => match elem.value() {
                Value::Sequence(seq) => {
                    let items: Vec<InMemDicomObject> = seq
                        .items()
                        .iter()
                        .map(|i| deidentify_dataset(i, salt))
                        .collect();
                    out.put(DataElement::new(
                        tag,
                        VR::SQ,
                        Value::Sequence(DataSetSequence::new(items, Length::UNDEFINED)),
                    ));
                }
                _ => {
                    out.put(elem.clone());
                }
            },
        }
    }
    out
}

/// De-identify a DICOM file into `output` (atomic write). `salt` keys the UID
/// replacement; use one secret salt per dataset so cross-file references survive.
/// Returns the names of the identifying attributes that had values in the input.
pub fn deidentify_file(input: &Path, output: &Path, salt: &str) -> Result<Vec<&'static str>> {
    let file = open(input)?;
    let present = crate::dicom::identifying_attributes_present(&file);
    let mut meta = file.meta().clone();
    let mut cleaned = deidentify_dataset(&file, salt);
    cleaned.put(DataElement::new(
        tags::PATIENT_IDENTITY_REMOVED,
        VR::CS,
        PrimitiveValue::from("YES"),
    ));
    cleaned.put(DataElement::new(
        tags::DEIDENTIFICATION_METHOD,
        VR::LO,
        PrimitiveValue::from("medvlm: DICOM PS3.15 E.1 basic profile (subset)"),
    ));
    let new_sop = new_uid(meta.media_storage_sop_instance_uid(), salt);
    meta.media_storage_sop_instance_uid = new_sop;
    meta.update_information_group_length();
    let out = cleaned.with_exact_meta(meta);
    write_file_object(output, &out)?;
    Ok(present)
}
