//! The adapted-model artefact: a folder with the classifier the method saved
//! ([`crate::method::save_classifier`]), the card `adapt.json` ([`AdaptCard`]: method,
//! hyperparameters, model and its fingerprint, data hash, protocol, classes, prompts, support
//! images, metrics), and whatever else the writer adds (test predictions, plots).
//!
//! A folder is written whole or not at all: [`write_artefact_dir`] fills a sibling
//! temporary folder and moves it into place; [`check_out_dir`] refuses, before any work, a
//! destination that is a file, a folder that is not an artefact, or an artefact without
//! `force`.

use std::path::{Path, PathBuf};

use medvlm_eval::evaluation::{Metrics, MultiLabelMetrics};
use serde::{Deserialize, Serialize};

use crate::fewshot::{FewShotProtocol, TaskKind};

/// File name of the card inside an artefact folder.
pub const ADAPT_CARD: &str = "adapt.json";
/// Version tag of the card.
pub const ADAPT_FORMAT: &str = "medvlm-adapt/1";

/// Why an artefact could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ArtefactError {
    /// A file or folder operation failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done ("reading", "creating", ...).
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The card is not a medvlm adapt card.
    #[error("{path}: {reason}")]
    NotACard {
        /// The card file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The destination cannot or should not be replaced (the message says what to do).
    #[error("{0}")]
    Refused(String),
    /// Writing the contents failed.
    #[error("writing the artefact")]
    Write(#[source] Box<dyn std::error::Error + Send + Sync>),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ArtefactError {
    let path = path.to_path_buf();
    move |source| ArtefactError::Io { what, path, source }
}

/// The card written to `adapt.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdaptCard {
    /// [`ADAPT_FORMAT`].
    pub format: String,
    /// Method registry name.
    pub method: String,
    /// Hyperparameters as used.
    pub hyperparameters: serde_json::Value,
    /// Model spec as given by the user.
    pub model: String,
    /// Model family.
    pub model_family: String,
    /// Fingerprint of the model files (spec, family, file sizes and times).
    pub model_fingerprint: String,
    /// Manifests read.
    pub data: Vec<PathBuf>,
    /// SHA-256 of the manifest bytes.
    pub data_sha256: String,
    /// Manifest column used as label.
    pub label_field: String,
    /// `--where` filters.
    pub filters: Vec<String>,
    /// Multi-class (softmax) or multi-label (one sigmoid per label).
    #[serde(default = "multi_class")]
    pub task: TaskKind,
    /// The few-shot protocol.
    pub protocol: FewShotProtocol,
    /// One-line description of the protocol.
    pub protocol_description: String,
    /// Class names in index order.
    pub class_names: Vec<String>,
    /// The prompts of each class.
    pub prompts: Vec<(String, Vec<String>)>,
    /// Multi-label prompt-pair methods (`zero-shot-pairs`, `tip-adapter(-f)`,
    /// `clip-adapter`): the negative prompts of each label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompts: Option<Vec<(String, Vec<String>)>>,
    /// The support images (paths) and their classes (multi-label: their findings joined with
    /// `;`, or `normal`).
    pub support: Vec<(String, String)>,
    /// Split the support set was drawn from.
    pub train_split: String,
    /// Split evaluated, if any.
    pub test_split: Option<String>,
    /// Test metrics of a multi-class task (absent when there was no test split).
    pub metrics: Option<Metrics>,
    /// Test metrics of a multi-label task (absent when there was no test split).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multilabel_metrics: Option<MultiLabelMetrics>,
    /// What was and was not computed, and why (e.g. which conformal method a multi-label
    /// task gets).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// medvlm version that wrote the card.
    pub medvlm_version: String,
}

fn multi_class() -> TaskKind {
    TaskKind::MultiClass
}

impl AdaptCard {
    /// Reads `adapt.json` from an artefact folder.
    pub fn read(dir: &Path) -> Result<Self, ArtefactError> {
        let path = dir.join(ADAPT_CARD);
        let text = std::fs::read_to_string(&path).map_err(|source| ArtefactError::Io {
            what: "reading the card (is the folder a `medvlm adapt --out` artefact?)",
            path: path.clone(),
            source,
        })?;
        let card: Self = serde_json::from_str(&text).map_err(|e| ArtefactError::NotACard {
            path: path.clone(),
            reason: format!("not a medvlm adapt card: {e}"),
        })?;
        if card.format != ADAPT_FORMAT {
            return Err(ArtefactError::NotACard {
                path,
                reason: format!("format {:?} is not {ADAPT_FORMAT:?}", card.format),
            });
        }
        Ok(card)
    }
}

/// Refuses, before any work, a destination the finished artefact could not or should not
/// replace: a file, or a non-empty folder without `force` (with it, only an earlier artefact
/// is replaced, never another folder).
pub fn check_out_dir(out: &Path, force: bool) -> Result<(), ArtefactError> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        return Err(ArtefactError::Refused(format!(
            "--out {} exists and is not a folder",
            out.display()
        )));
    }
    let empty = std::fs::read_dir(out)
        .map_err(io("listing", out))?
        .next()
        .is_none();
    if empty {
        return Ok(());
    }
    if !out.join(ADAPT_CARD).exists() {
        return Err(ArtefactError::Refused(format!(
            "--out {} exists and is not a medvlm adapt artefact; choose another directory",
            out.display()
        )));
    }
    if !force {
        return Err(ArtefactError::Refused(format!(
            "--out {} already holds an adapted model; pass --force to replace it, or choose \
             another directory",
            out.display()
        )));
    }
    Ok(())
}

/// Writes an artefact folder: `write` fills a sibling temporary folder, which then replaces
/// `out` (an earlier artefact or an empty folder, checked again at the end: the folder may
/// have changed during the run); on error the temporary folder is removed.
pub fn write_artefact_dir<T, E>(
    out: &Path,
    write: impl FnOnce(&Path) -> Result<T, E>,
) -> Result<T, ArtefactError>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "adapted".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io("removing", &tmp))?;
    }
    let written = match write(&tmp) {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(ArtefactError::Write(e.into()));
        }
    };
    if out.exists() {
        check_out_dir(out, true)?;
        std::fs::remove_dir_all(out).map_err(io("replacing", out))?;
    }
    std::fs::rename(&tmp, out).map_err(io("moving the finished artefact to", out))?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_dir_rules_and_atomic_replacement() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("adapted");
        check_out_dir(&out, false).unwrap();
        let v: u32 = write_artefact_dir(&out, |tmp| -> Result<u32, std::io::Error> {
            std::fs::create_dir_all(tmp)?;
            std::fs::write(tmp.join(ADAPT_CARD), b"{}")?;
            Ok(7)
        })
        .unwrap();
        assert_eq!(v, 7);
        assert!(out.join(ADAPT_CARD).is_file());
        let e = check_out_dir(&out, false).unwrap_err().to_string();
        assert!(e.contains("--force"), "{e}");
        check_out_dir(&out, true).unwrap();

        // A failed write leaves the earlier artefact and no temporary folder.
        let err = write_artefact_dir(&out, |tmp| -> Result<(), std::io::Error> {
            std::fs::create_dir_all(tmp)?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(matches!(err, ArtefactError::Write(_)));
        assert!(out.join(ADAPT_CARD).is_file());
        let leftovers: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty());

        // Another folder, or a file, is never replaced.
        let other = d.path().join("photos");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("a.jpg"), b"x").unwrap();
        let e = check_out_dir(&other, true).unwrap_err().to_string();
        assert!(e.contains("not a medvlm adapt artefact"), "{e}");
        let file = d.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(check_out_dir(&file, true).is_err());

        // A card of another format is refused by name.
        std::fs::write(out.join(ADAPT_CARD), b"{}").unwrap();
        let e = AdaptCard::read(&out).unwrap_err().to_string();
        assert!(
            e.contains("adapt.json") && e.contains("not a medvlm adapt card"),
            "{e}"
        );
    }
}
