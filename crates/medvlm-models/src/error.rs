//! Errors of medvlm-models. Every variant that concerns a file names it, so a
//! CLI user learns which file to fix and why.

use std::path::PathBuf;

/// A tensor name with its shape, as listed in weight mismatch reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedShape {
    pub name: String,
    pub shape: Vec<usize>,
}

impl std::fmt::Display for NamedShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?}", self.name, self.shape)
    }
}

/// A tensor present in both lists but with different shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeMismatch {
    pub name: String,
    pub expected: Vec<usize>,
    pub found: Vec<usize>,
}

/// Errors raised while resolving, loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read (missing, permissions, ...).
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A config file (config.json, preprocessor_config.json, open_clip_config.json) is invalid.
    #[error("invalid config {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    /// The model directory lacks a file the family needs.
    #[error("missing file {path}: {reason}")]
    MissingFile { path: PathBuf, reason: String },
    /// The config names a family medvlm does not implement.
    #[error("unknown model family {family:?} in {path} (supported: {supported})")]
    UnknownFamily {
        family: String,
        path: PathBuf,
        supported: String,
    },
    /// A weight file could not be parsed (corrupt safetensors or pickle, unsupported dtype, ...).
    #[error("cannot load weights from {path}: {reason}")]
    Weights { path: PathBuf, reason: String },
    /// The weight file does not hold the tensors the model expects.
    #[error("{}", format_mismatch(path, missing, unexpected, wrong_shape))]
    WeightsMismatch {
        path: PathBuf,
        missing: Vec<NamedShape>,
        unexpected: Vec<NamedShape>,
        wrong_shape: Vec<ShapeMismatch>,
    },
    /// A tokenizer.json could not be loaded or used.
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    /// An image could not be decoded or preprocessed.
    #[error("image {path}: {reason}")]
    Image { path: PathBuf, reason: String },
    /// A model source (`DIR` or `hf:ORG/NAME`) could not be resolved.
    #[error("model source {source_spec}: {reason}")]
    Source { source_spec: String, reason: String },
    /// Invalid arguments to a model call (wrong input shape, unknown layer path, ...).
    #[error("{0}")]
    Invalid(String),
    /// A medical image file could not be read (the medvlm-io error names the file). Boxed:
    /// the I/O error is large, and every model call returns this type.
    #[error(transparent)]
    Input(Box<medvlm_io::IoError>),
    /// An image of a batch could not be read or preprocessed; the cause says why.
    #[error("unreadable image {path}")]
    UnreadableImage {
        path: PathBuf,
        #[source]
        source: Box<ModelError>,
    },
    /// An error from candle while computing.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn format_mismatch(
    path: &std::path::Path,
    missing: &[NamedShape],
    unexpected: &[NamedShape],
    wrong_shape: &[ShapeMismatch],
) -> String {
    use std::fmt::Write;
    let mut s = format!(
        "weights in {} do not match the model: {} missing, {} unexpected, {} with wrong shape",
        path.display(),
        missing.len(),
        unexpected.len(),
        wrong_shape.len()
    );
    for m in missing {
        let _ = write!(s, "\n  missing:    {m}");
    }
    for u in unexpected {
        let _ = write!(s, "\n  unexpected: {u}");
    }
    for w in wrong_shape {
        let _ = write!(
            s,
            "\n  wrong shape: {} expected {:?}, found {:?}",
            w.name, w.expected, w.found
        );
    }
    s
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
    /// An invalid config `path` with a reason.
    pub fn config(path: impl Into<PathBuf>, reason: impl std::fmt::Display) -> Self {
        ModelError::Config {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
    /// An invalid call.
    pub fn invalid(reason: impl std::fmt::Display) -> Self {
        ModelError::Invalid(reason.to_string())
    }
}

impl From<medvlm_io::IoError> for ModelError {
    fn from(e: medvlm_io::IoError) -> Self {
        ModelError::Input(Box::new(e))
    }
}
