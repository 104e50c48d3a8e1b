//! medvlm-io: files to tensors. DICOM, NIfTI, PNG/JPEG/TIFF, MedMNIST, windowing,
//! transforms and dataset manifests.

pub mod manifest;

pub use manifest::{BoundingBox, ManifestRecord, QaPair, RegionMask};
