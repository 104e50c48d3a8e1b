//! medvlm-io: files to tensors. DICOM, NIfTI, PNG/JPEG/TIFF, MedMNIST, windowing,
//! transforms and dataset manifests.
//!
//! # Stable entry points
//!
//! Readers (all return a [`MedImage`]: `f32` after the Modality LUT, before windowing):
//! - [`load_any`]`(path)`: dispatch on extension and magic bytes.
//! - [`dicom::read_dicom`], [`volume::read_nifti`].
//!
//! Writers (atomic: temp file + rename):
//! - [`dicom::write_secondary_capture`]`(path, &[u8 | u16 | i16], rows, cols, &ScMetadata)`:
//!   explicit VR little endian MONOCHROME2 Secondary Capture with optional
//!   modality, descriptions, rescale slope/intercept, window, pixel spacing.
//! - [`volume::write_nifti1`]`(path, &[f32], dims, &affine)`: `.nii` or `.nii.gz`,
//!   `data` C-ordered over `dims` (`[x, y, z]`), affine stored as the sform.
//!
//! Manifests ([`manifest`]):
//! - [`read_manifest`]`(path) -> Manifest` (JSONL, CSV/TSV, or folder-per-class),
//! - [`write_manifest_jsonl`]`(path, &records)`, [`write_manifest_csv`]`(path, &records)`.
//!
//! Model input ([`preprocess`]): [`to_model_input`]`(&img, &InputOptions)` (eval:
//! plane, window, aspect-preserving resize, grey to RGB, CHW in `[0, 1]`) and
//! [`preprocess::to_train_input`] (same with seeded random augmentation).
//!
//! Modules: [`dicom`] (read, Secondary Capture writer, identifying attributes),
//! [`volume`] (NIfTI-1/2), [`raster`] (PNG/JPEG/TIFF), [`npy`], [`medmnist`],
//! [`window`] (VOI, presets), [`transforms`], [`deidentify`] (PS3.15 Annex E),
//! [`check`] (dataset validation, `--skip-bad` policy), [`atomic`] (atomic writes),
//! [`resources`] (memory and disk checks before long work).
//! All errors are [`IoError`] and name the file and the reason. See `docs/io.md`.
//!
//! ```
//! # fn main() -> medvlm_io::Result<()> {
//! // A 4 x 3 x 2 volume written and read back: values after scaling, nibabel's shape.
//! let dir = std::env::temp_dir().join(format!("medvlm-io-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("ct.nii.gz");
//! let data: Vec<f32> = (0..24).map(|v| v as f32 * 10.0).collect();
//! let eye = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]];
//! medvlm_io::volume::write_nifti1(&path, &data, &[4, 3, 2], &eye)?;
//! let img = medvlm_io::load_any(&path)?;
//! assert_eq!(img.shape, [4, 3, 2]);
//! let plane = medvlm_io::preprocess::windowed_plane(
//!     &img,
//!     &medvlm_io::PlaneSelect::default(),
//!     &"p1-99".parse()?,
//! )?;
//! assert!(plane.data.iter().all(|v| (0.0..=1.0).contains(v)));
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok(())
//! # }
//! ```

pub mod atomic;
pub mod check;
pub mod deidentify;
pub mod dicom;
mod dicom_lengths;
pub mod error;
pub mod guard;
mod jpeg12;
mod jpegls;
pub mod manifest;
pub mod medimage;
pub mod medmnist;
pub mod npy;
pub mod preprocess;
pub mod raster;
pub mod resources;
mod rle;
pub mod transforms;
pub mod volume;
pub mod window;

pub use error::{IoError, Result};
pub use manifest::{
    read_class_folders, read_manifest, write_manifest_csv, write_manifest_jsonl, BoundingBox,
    Manifest, ManifestRecord, QaPair, RegionMask,
};
pub use medimage::{Layout, MedImage, Photometric, Plane, PlaneSelect, SourceFormat};
pub use preprocess::{to_model_input, to_train_input, InputOptions, ModelInput};
pub use window::Window;

/// Kinds of file medvlm reads, detected by [`detect_format`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Dicom,
    Nifti,
    Raster,
    Npy,
    Npz,
}

/// Detect a file's kind from its name, falling back to its first bytes
/// (`DICM` at 128 or 0, NIfTI header size, PNG/JPEG/TIFF magic, NumPy magic).
pub fn detect_format(path: &std::path::Path) -> Result<FileKind> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if name.ends_with(".nii") || name.ends_with(".nii.gz") {
        return Ok(FileKind::Nifti);
    }
    if name.ends_with(".dcm") || name.ends_with(".dicom") {
        return Ok(FileKind::Dicom);
    }
    for ext in [".png", ".jpg", ".jpeg", ".tif", ".tiff"] {
        if name.ends_with(ext) {
            return Ok(FileKind::Raster);
        }
    }
    if name.ends_with(".npy") {
        return Ok(FileKind::Npy);
    }
    if name.ends_with(".npz") {
        return Ok(FileKind::Npz);
    }
    let head = {
        use std::io::Read;
        let f = std::fs::File::open(path).map_err(|e| IoError::os(path, e))?;
        let mut b = Vec::new();
        f.take(132)
            .read_to_end(&mut b)
            .map_err(|e| IoError::os(path, e))?;
        b
    };
    if (head.len() >= 132 && &head[128..132] == b"DICM") || head.starts_with(b"DICM") {
        return Ok(FileKind::Dicom);
    }
    if head.len() >= 4 {
        let le = i32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let be = i32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        if [348, 540].contains(&le) || [348, 540].contains(&be) {
            return Ok(FileKind::Nifti);
        }
    }
    if head.starts_with(&[0x89, b'P', b'N', b'G'])
        || head.starts_with(&[0xFF, 0xD8])
        || head.starts_with(b"II*\0")
        || head.starts_with(b"MM\0*")
    {
        return Ok(FileKind::Raster);
    }
    if head.starts_with(b"\x93NUMPY") {
        return Ok(FileKind::Npy);
    }
    Err(IoError::UnsupportedFormat {
        path: path.to_path_buf(),
        reason:
            "not recognised as DICOM, NIfTI, PNG/JPEG/TIFF or NumPy from its name or first bytes"
                .into(),
    })
}

/// Read any supported single image or volume file into a [`MedImage`].
pub fn load_any(path: &std::path::Path) -> Result<MedImage> {
    match detect_format(path)? {
        FileKind::Dicom => dicom::read_dicom(path),
        FileKind::Nifti => volume::read_nifti(path),
        FileKind::Raster => raster::read_raster(path),
        FileKind::Npy => npy_image(path),
        FileKind::Npz => Err(IoError::UnsupportedFormat {
            path: path.to_path_buf(),
            reason: "a .npz holds a dataset, not one image: use medmnist::read_medmnist".into(),
        }),
    }
}

/// A `.npy` array as an image: 2-D = grey, 3-D with last axis 3 = RGB, other 3-D =
/// frames of grey planes.
fn npy_image(path: &std::path::Path) -> Result<MedImage> {
    let a = npy::read_npy(path)?;
    let bad = |why: String| IoError::Npy {
        path: path.to_path_buf(),
        reason: why,
    };
    let (frames, rows, cols, channels) = match a.shape[..] {
        [r, c] => (1, r, c, 1),
        [r, c, 3] => (1, r, c, 3),
        [f, r, c] => (f, r, c, 1),
        [f, r, c, 3] => (f, r, c, 3),
        _ => {
            return Err(bad(format!(
                "shape {:?} is not an image ([H,W], [H,W,3], [N,H,W], [N,H,W,3])",
                a.shape
            )))
        }
    };
    Ok(MedImage {
        data: a.data.iter().map(|&v| v as f32).collect(),
        shape: a.shape.clone(),
        layout: Layout::Planar {
            frames,
            rows,
            cols,
            channels,
        },
        photometric: if channels == 3 {
            Photometric::Rgb
        } else {
            Photometric::Monochrome2
        },
        format: SourceFormat::Npy,
        file_windows: Vec::new(),
        modality: None,
        transfer_syntax: None,
        affine: None,
        spacing: Vec::new(),
        bits_stored: if a.descr.ends_with("u1") {
            Some(8)
        } else {
            None
        },
        warnings: Vec::new(),
    })
}
