//! Errors of medvlm-io. Every variant names the file it is about and the reason,
//! so a user with a folder of hospital data can find and fix the bad file.

use std::path::{Path, PathBuf};

/// Result alias of this crate.
pub type Result<T, E = IoError> = std::result::Result<T, E>;

/// Everything that can go wrong while reading, converting or writing medical files.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The operating system refused a read or write.
    #[error("{path}: {source}")]
    Os {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A DICOM file could not be read or decoded.
    #[error("{path}: DICOM ({transfer_syntax}): {reason}")]
    Dicom {
        path: PathBuf,
        /// Transfer syntax name and UID, or "unknown" when the meta header is unreadable.
        transfer_syntax: String,
        reason: String,
    },
    /// A DICOM file is encoded in a transfer syntax this build cannot decode.
    #[error("{path}: unsupported DICOM transfer syntax {name} ({uid}) in this build: {reason}")]
    UnsupportedTransferSyntax {
        path: PathBuf,
        name: String,
        uid: String,
        reason: String,
    },
    /// A NIfTI file could not be read.
    #[error("{path}: NIfTI: {reason}")]
    Nifti { path: PathBuf, reason: String },
    /// A PNG/JPEG/TIFF file could not be read or written.
    #[error("{path}: image: {reason}")]
    Raster { path: PathBuf, reason: String },
    /// A NumPy .npy/.npz file could not be read or written.
    #[error("{path}: NumPy: {reason}")]
    Npy { path: PathBuf, reason: String },
    /// A manifest line or row is malformed.
    #[error("{path}{}: manifest: {reason}", line_suffix(*.line))]
    Manifest {
        path: PathBuf,
        /// 1-based line (JSONL) or record (CSV) number; 0 for the whole file.
        line: usize,
        reason: String,
    },
    /// The file's format is not recognised from its extension or first bytes.
    #[error("{path}: unsupported file format: {reason}")]
    UnsupportedFormat { path: PathBuf, reason: String },
    /// A request that does not fit the data (frame out of range, unknown window preset, ...).
    #[error("{0}")]
    InvalidArgument(String),
}

/// `:LINE` for a line or record, nothing for the whole file (line 0).
fn line_suffix(line: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!(":{line}")
    }
}

impl IoError {
    /// The underlying OS error of an [`IoError::Os`] (the caller names the path itself);
    /// other variants become `io::Error::other` with their message.
    pub fn into_io(self) -> std::io::Error {
        match self {
            IoError::Os { source, .. } => source,
            other => std::io::Error::other(other.to_string()),
        }
    }

    /// Wrap an OS error with the path it happened on.
    pub fn os(path: &Path, source: std::io::Error) -> Self {
        IoError::Os {
            path: path.to_path_buf(),
            source,
        }
    }
}
