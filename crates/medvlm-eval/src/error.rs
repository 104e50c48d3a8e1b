//! Error type shared by every metric, plot and report function of `medvlm-eval`.

use std::path::PathBuf;

/// Why a metric, plot or report could not be computed or written.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Two inputs that must describe the same samples have different lengths.
    #[error("length mismatch: {what} has {got} entries but {expected} were expected")]
    LengthMismatch {
        /// Which input was wrong.
        what: &'static str,
        /// Its length.
        got: usize,
        /// The length implied by the other inputs.
        expected: usize,
    },
    /// A metric was asked for on zero samples.
    #[error("empty input: {0}")]
    Empty(&'static str),
    /// A class or label index is not below the number of classes.
    #[error("{what} index {index} is out of range for {num_classes} classes")]
    IndexOutOfRange {
        /// Which input holds the bad index.
        what: &'static str,
        /// The bad index.
        index: usize,
        /// The number of classes.
        num_classes: usize,
    },
    /// A score or probability is NaN or infinite.
    #[error("{what} contains a non-finite value at position {position}")]
    NonFinite {
        /// Which input.
        what: &'static str,
        /// Flat position of the first bad value.
        position: usize,
    },
    /// A parameter (alpha, number of bins, threshold, ...) is outside its valid range.
    #[error("invalid parameter {name}: {reason}")]
    InvalidParameter {
        /// Parameter name.
        name: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Drawing a plot failed.
    #[error("plot error: {0}")]
    Plot(String),
    /// Writing an output file failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file that could not be written.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, EvalError>;

pub(crate) fn check_len(what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(EvalError::LengthMismatch {
            what,
            got,
            expected,
        });
    }
    Ok(())
}

pub(crate) fn check_finite(what: &'static str, values: &[f32]) -> Result<()> {
    if let Some(position) = values.iter().position(|v| !v.is_finite()) {
        return Err(EvalError::NonFinite { what, position });
    }
    Ok(())
}

pub(crate) fn check_labels(what: &'static str, labels: &[usize], num_classes: usize) -> Result<()> {
    if let Some(&index) = labels.iter().find(|&&l| l >= num_classes) {
        return Err(EvalError::IndexOutOfRange {
            what,
            index,
            num_classes,
        });
    }
    Ok(())
}

/// Checks a row-major `n x num_classes` score matrix and returns `n`.
pub(crate) fn check_matrix(
    what: &'static str,
    values: &[f32],
    num_classes: usize,
) -> Result<usize> {
    if num_classes == 0 {
        return Err(EvalError::InvalidParameter {
            name: "num_classes",
            reason: "must be at least 1".into(),
        });
    }
    if !values.len().is_multiple_of(num_classes) {
        return Err(EvalError::InvalidParameter {
            name: what,
            reason: format!(
                "length {} is not a multiple of the number of classes {}",
                values.len(),
                num_classes
            ),
        });
    }
    check_finite(what, values)?;
    Ok(values.len() / num_classes)
}
