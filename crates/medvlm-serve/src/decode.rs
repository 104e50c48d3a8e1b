//! Uploaded image bytes to the model's input pixels, through the same library calls as the
//! CLI (`medvlm embed`, `zero-shot`, `predict`): medvlm-io and medvlm-models read files, so
//! the upload is written to a private temporary file named by its detected format, read
//! with [`medvlm_models::embed::preprocess_file`] (PNG/JPEG/TIFF/BMP through the model's
//! image preprocessing; DICOM, NIfTI, npy through medvlm-io's plane selection and automatic
//! window) and deleted. With an explicit window (`lung`, `-600/1500`, `p1-99`, ... as
//! `medvlm convert --window` takes them), DICOM and NIfTI planes are windowed with it instead.
//!
//! Error messages never contain the temporary path or anything read from the file's header.

use std::io::Write as _;
use std::path::Path;

use medvlm_io::{PlaneSelect, Window};
use medvlm_models::PreprocessConfig;

/// Formats recognised from an upload's first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadKind {
    /// DICOM Part 10 (`DICM` at byte 128, or at 0 without preamble).
    Dicom,
    /// NIfTI-1/2 (header size 348 or 540).
    Nifti,
    /// gzip, read as `.nii.gz`.
    NiftiGz,
    /// PNG.
    Png,
    /// JPEG.
    Jpeg,
    /// TIFF.
    Tiff,
    /// BMP.
    Bmp,
    /// NumPy `.npy`.
    Npy,
}

impl UploadKind {
    /// Detects the format from the first bytes.
    pub fn sniff(bytes: &[u8]) -> Option<Self> {
        if (bytes.len() >= 132 && &bytes[128..132] == b"DICM") || bytes.starts_with(b"DICM") {
            return Some(Self::Dicom);
        }
        if bytes.starts_with(&[0x89, b'P', b'N', b'G']) {
            return Some(Self::Png);
        }
        if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            return Some(Self::Jpeg);
        }
        if bytes.starts_with(b"II*\0") || bytes.starts_with(b"MM\0*") {
            return Some(Self::Tiff);
        }
        if bytes.starts_with(b"BM") && bytes.len() > 14 {
            return Some(Self::Bmp);
        }
        if bytes.starts_with(b"\x93NUMPY") {
            return Some(Self::Npy);
        }
        if bytes.starts_with(&[0x1f, 0x8b]) {
            return Some(Self::NiftiGz);
        }
        if bytes.len() >= 348 {
            let h = [bytes[0], bytes[1], bytes[2], bytes[3]];
            let (le, be) = (i32::from_le_bytes(h), i32::from_be_bytes(h));
            if [348, 540].contains(&le) || [348, 540].contains(&be) {
                return Some(Self::Nifti);
            }
        }
        None
    }

    /// The file name suffix the readers dispatch on.
    pub fn suffix(self) -> &'static str {
        match self {
            Self::Dicom => ".dcm",
            Self::Nifti => ".nii",
            Self::NiftiGz => ".nii.gz",
            Self::Png => ".png",
            Self::Jpeg => ".jpg",
            Self::Tiff => ".tif",
            Self::Bmp => ".bmp",
            Self::Npy => ".npy",
        }
    }

    /// Whether the window option applies (volumes and DICOM).
    fn windowed(self) -> bool {
        matches!(self, Self::Dicom | Self::Nifti | Self::NiftiGz | Self::Npy)
    }
}

/// Why an upload could not be turned into pixels.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are no format medvlm reads (answer 415).
    #[error("not recognised as DICOM, NIfTI (.nii / .nii.gz), PNG, JPEG, TIFF, BMP or .npy from its first bytes")]
    Unrecognised,
    /// The format was recognised but the file could not be decoded (answer 415).
    #[error("the {kind:?} upload could not be decoded: {reason}")]
    Undecodable {
        /// The detected format.
        kind: UploadKind,
        /// The reader's reason, with the temporary path removed.
        reason: String,
    },
    /// The upload is empty (answer 422).
    #[error("the image is empty")]
    Empty,
    /// The temporary file could not be written (answer 500).
    #[error("writing the upload to a temporary file: {0}")]
    Temp(#[source] std::io::Error),
}

pub(crate) fn scrub(msg: &str, path: &Path) -> String {
    msg.replace(&path.display().to_string(), "<upload>")
}

/// Writes an upload to a private temporary file (medvlm-io reads from paths) and runs `f` on
/// it; reader messages have the temporary path replaced by `<upload>`.
pub(crate) fn with_upload<T>(
    bytes: &[u8],
    f: impl FnOnce(&Path, UploadKind) -> Result<T, String>,
) -> Result<T, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let kind = UploadKind::sniff(bytes).ok_or(DecodeError::Unrecognised)?;
    let mut tmp = tempfile::Builder::new()
        .prefix("medvlm-upload-")
        .suffix(kind.suffix())
        .tempfile()
        .map_err(DecodeError::Temp)?;
    tmp.write_all(bytes).map_err(DecodeError::Temp)?;
    tmp.flush().map_err(DecodeError::Temp)?;
    let path = tmp.path();
    f(path, kind).map_err(|reason| DecodeError::Undecodable {
        kind,
        reason: scrub(&reason, path),
    })
}

/// Decodes and preprocesses one uploaded image to the model's `3 * H * W` input values.
pub fn decode_upload(
    bytes: &[u8],
    cfg: &PreprocessConfig,
    window: Option<&Window>,
) -> Result<Vec<f32>, DecodeError> {
    with_upload(bytes, |path, kind| match window {
        Some(w) if kind.windowed() => {
            let img = medvlm_io::load_any(path).map_err(|e| medvlm_io::guard::error_chain(&e))?;
            let plane = medvlm_io::preprocess::windowed_plane(&img, &PlaneSelect::default(), w)
                .map_err(|e| medvlm_io::guard::error_chain(&e))?;
            cfg.apply_array(&plane.data, plane.rows, plane.cols, plane.channels)
                .map_err(|e| e.to_string())
        }
        _ => medvlm_models::embed::preprocess_file(path, cfg)
            .map_err(|e| medvlm_io::guard::error_chain(&e)),
    })
}

/// The uploaded image as an 8-bit PNG at its own size, windowed as the model input is for
/// DICOM/NIfTI: the window given, or the default `auto` (the file's first window, else the
/// 0.5-99.5 percentiles); raster images are min-max scaled. Returns the PNG and the window
/// used.
pub fn preview_png(
    bytes: &[u8],
    window: Option<&Window>,
) -> Result<(Vec<u8>, String), DecodeError> {
    with_upload(bytes, |path, kind| {
        let w = if kind.windowed() {
            window.cloned().unwrap_or(Window::Auto)
        } else {
            Window::None
        };
        let chain = |e: medvlm_io::IoError| medvlm_io::guard::error_chain(&e);
        let img = medvlm_io::load_any(path).map_err(chain)?;
        let plane = medvlm_io::preprocess::windowed_plane(&img, &PlaneSelect::default(), &w)
            .map_err(chain)?;
        let png = medvlm_io::raster::encode_png(&plane).map_err(chain)?;
        Ok((png, format!("{w:?}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_sniffed_from_their_magic_bytes() {
        let mut dicom = vec![0u8; 132];
        dicom[128..132].copy_from_slice(b"DICM");
        assert_eq!(UploadKind::sniff(&dicom), Some(UploadKind::Dicom));
        assert_eq!(
            UploadKind::sniff(b"\x89PNG\r\n\x1a\n"),
            Some(UploadKind::Png)
        );
        assert_eq!(
            UploadKind::sniff(&[0xFF, 0xD8, 0xFF, 0xE0]),
            Some(UploadKind::Jpeg)
        );
        assert_eq!(UploadKind::sniff(b"II*\0rest"), Some(UploadKind::Tiff));
        let mut nii = vec![0u8; 352];
        nii[..4].copy_from_slice(&348i32.to_le_bytes());
        assert_eq!(UploadKind::sniff(&nii), Some(UploadKind::Nifti));
        assert_eq!(UploadKind::sniff(b"GIF89a......"), None);
        assert_eq!(UploadKind::sniff(b"hello"), None);
    }
}
