//! A classification task read from dataset manifests: which records take part (filters), their
//! classes (multi-class from one column, or multi-label from the `labels` lists), their splits,
//! and the manifests' content hash. What `medvlm adapt`, `predict` and `bench fewshot` adapt to,
//! as a library call ([`Task::from_manifests`] with a [`TaskSpec`]).
//!
//! Multi-label: `normal` is not a class but a negative for every finding; records with an empty
//! list or labelled both `normal` and a finding are not used; labels outside the classes are
//! ignored (each case is counted in [`Task::notes`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::feature_cache::{hash_paths, sha256_hex};
use crate::fewshot::TaskKind;
use crate::method::SupportLabels;

/// Why a task could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// A manifest could not be read.
    #[error(transparent)]
    Io(#[from] medvlm_io::IoError),
    /// The manifests and the specification do not make a task (the message says why).
    #[error("{0}")]
    Invalid(String),
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, TaskError>;

/// What defines the task (the CLI fills it from `--label-field`, `--where`, `--classes`,
/// `--split`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSpec {
    /// Manifest column holding the class (`label`, or any string column); [`MULTI_LABEL_FIELD`]
    /// makes a multi-label task.
    pub label_field: String,
    /// `FIELD=VALUE` filters: only records whose field equals the value take part.
    pub filters: Vec<String>,
    /// Classes in index order, separated by `;` (default: the sorted labels of `split`).
    pub classes: Option<String>,
    /// The split whose labels define the classes by default (the support-set pool).
    pub split: String,
}

/// The manifest column that makes a task multi-label.
pub const MULTI_LABEL_FIELD: &str = "labels";

/// The label of a study without findings. In a multi-label task it is not a
/// class: a study labelled only `normal` is a negative for every finding.
pub const NORMAL_LABEL: &str = "normal";

/// The target of one task row.
#[derive(Debug, Clone, PartialEq)]
pub enum RowTarget {
    /// Multi-class: the class index.
    Class(usize),
    /// Multi-label: one entry per class, true where the finding is present.
    MultiHot(Vec<bool>),
}

/// One labelled record of the task.
#[derive(Debug, Clone)]
pub struct TaskRow {
    /// Row index in the manifest.
    pub record: usize,
    /// Image path.
    pub path: PathBuf,
    /// Split name, if any.
    pub split: Option<String>,
    /// Class index or multi-hot row.
    pub target: RowTarget,
}

/// A multi-class or multi-label task read from a manifest.
#[derive(Debug, Clone)]
pub struct Task {
    /// Multi-class (`--label-field` a single-valued column) or multi-label (`labels`).
    pub kind: TaskKind,
    /// The first manifest file (the default cache lives beside it).
    pub manifest_path: PathBuf,
    /// Every manifest file, in order.
    pub manifests: Vec<PathBuf>,
    /// SHA-256 of the manifest bytes (several manifests: of their digests, in order).
    pub manifest_sha256: String,
    /// Class names in index order.
    pub class_names: Vec<String>,
    /// Labelled rows (all splits) in manifest order.
    pub rows: Vec<TaskRow>,
    /// What was left out and why (records without a label, labels outside the classes), for
    /// the caller to report.
    pub notes: Vec<String>,
}

fn field_value(rec: &medvlm_io::ManifestRecord, field: &str) -> Option<String> {
    match field {
        "label" => rec.label.clone(),
        "split" => rec.split.clone(),
        "image" => Some(rec.image.clone()),
        other => match rec.extra.get(other) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            Some(serde_json::Value::Bool(b)) => Some(b.to_string()),
            _ => None,
        },
    }
}

/// Findings of a multi-hot row joined with `;`, or `normal` when it has none.
pub fn multi_hot_text(row: &[bool], class_names: &[String]) -> String {
    let on: Vec<&str> = row
        .iter()
        .zip(class_names)
        .filter(|(p, _)| **p)
        .map(|(_, c)| c.as_str())
        .collect();
    if on.is_empty() {
        NORMAL_LABEL.to_string()
    } else {
        on.join(";")
    }
}

/// Class names from `a;b;c` (blank names dropped, spaces trimmed); a name given twice is an
/// error.
pub fn parse_class_list(text: &str) -> Result<Vec<String>> {
    let names: Vec<String> = text
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let distinct: BTreeSet<&String> = names.iter().collect();
    if distinct.len() != names.len() {
        return Err(TaskError::Invalid(format!(
            "--classes {text:?} names a class twice"
        )));
    }
    Ok(names)
}

/// The classes and rows of a multi-label task (see the module docs for how
/// `normal`, empty label lists and unknown labels are treated).
fn multi_label_rows(
    path: &Path,
    selected: &[(usize, &PathBuf, &medvlm_io::ManifestRecord)],
    spec: &TaskSpec,
) -> Result<(Vec<String>, Vec<TaskRow>, Vec<String>)> {
    let mut notes = Vec::new();
    let class_names: Vec<String> = match &spec.classes {
        Some(c) => {
            let names = parse_class_list(c)?;
            if names.iter().any(|n| n == NORMAL_LABEL) {
                return Err(TaskError::Invalid(format!(
                    "--classes {c:?}: '{NORMAL_LABEL}' cannot be a class of a multi-label task; \
                     it means 'no finding', i.e. a negative for every class; remove it"
                )));
            }
            names
        }
        None => selected
            .iter()
            .filter(|(_, _, r)| r.split.as_deref() == Some(spec.split.as_str()))
            .flat_map(|(_, _, r)| r.labels.iter().cloned())
            .filter(|l| l != NORMAL_LABEL)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
    };
    if class_names.is_empty() {
        return Err(TaskError::Invalid(format!(
            "manifest {}: the '{}' split has no finding in its '{MULTI_LABEL_FIELD}' lists \
             (other than '{NORMAL_LABEL}'); a multi-label task needs at least one (check --split \
             and --where)",
            path.display(),
            spec.split
        )));
    }
    let mut rows = Vec::new();
    let mut unlabelled = 0usize;
    let mut contradictory = 0usize;
    let mut with_unknown = 0usize;
    let mut unknown: BTreeSet<String> = BTreeSet::new();
    for &(i, image, r) in selected {
        if r.labels.is_empty() {
            unlabelled += 1;
            continue;
        }
        let normal = r.labels.iter().any(|l| l == NORMAL_LABEL);
        if normal && r.labels.iter().any(|l| l != NORMAL_LABEL) {
            contradictory += 1;
            continue;
        }
        let mut hot = vec![false; class_names.len()];
        let mut outside = false;
        for l in r.labels.iter().filter(|l| *l != NORMAL_LABEL) {
            match class_names.iter().position(|c| c == l) {
                Some(j) => hot[j] = true,
                None => {
                    outside = true;
                    unknown.insert(l.clone());
                }
            }
        }
        with_unknown += usize::from(outside);
        rows.push(TaskRow {
            record: i,
            path: image.clone(),
            split: r.split.clone(),
            target: RowTarget::MultiHot(hot),
        });
    }
    if unlabelled + contradictory > 0 {
        notes.push(format!(
            "{unlabelled} record(s) with an empty '{MULTI_LABEL_FIELD}' list and \
             {contradictory} labelled both '{NORMAL_LABEL}' and a finding are not used"
        ));
    }
    if with_unknown > 0 {
        notes.push(format!(
            "{with_unknown} record(s) carry label(s) outside the {} classes ({}); those \
             labels are ignored and the records used with their other labels",
            class_names.len(),
            unknown.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    Ok((class_names, rows, notes))
}

/// The classes and rows of a multi-class task: one class per record from the label column;
/// records without a value or with a label outside the classes are left out (counted in the
/// notes).
fn multi_class_rows(
    path: &Path,
    selected: &[(usize, &PathBuf, &medvlm_io::ManifestRecord)],
    spec: &TaskSpec,
) -> Result<(Vec<String>, Vec<TaskRow>, Vec<String>)> {
    let class_names: Vec<String> = match &spec.classes {
        Some(c) => parse_class_list(c)?,
        None => selected
            .iter()
            .filter(|(_, _, r)| r.split.as_deref() == Some(spec.split.as_str()))
            .filter_map(|(_, _, r)| field_value(r, &spec.label_field))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect(),
    };
    if class_names.len() < 2 {
        return Err(TaskError::Invalid(format!(
            "manifest {}: the '{}' split has {} distinct '{}' value(s) ({:?}); a classification \
             task needs at least two classes (check --split, --label-field and --where)",
            path.display(),
            spec.split,
            class_names.len(),
            spec.label_field,
            class_names
        )));
    }
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut unlabelled = 0usize;
    let mut other_class = 0usize;
    for &(i, image, r) in selected {
        let Some(label) = field_value(r, &spec.label_field) else {
            unlabelled += 1;
            continue;
        };
        let Some(class) = class_names.iter().position(|c| *c == label) else {
            other_class += 1;
            continue;
        };
        rows.push(TaskRow {
            record: i,
            path: image.clone(),
            split: r.split.clone(),
            target: RowTarget::Class(class),
        });
    }
    if unlabelled + other_class > 0 {
        notes.push(format!(
            "{} record(s) without a '{}' value and {} with a label outside the {} \
             classes are not used",
            unlabelled,
            spec.label_field,
            other_class,
            class_names.len()
        ));
    }
    Ok((class_names, rows, notes))
}

impl Task {
    /// Reads the manifests (records concatenated in order) and selects the
    /// labelled records of the task.
    pub fn from_manifests(paths: &[PathBuf], spec: &TaskSpec) -> Result<Self> {
        let Some(first) = paths.first() else {
            return Err(TaskError::Invalid("give at least one manifest".into()));
        };
        let mut digests = Vec::new();
        let mut records: Vec<(PathBuf, medvlm_io::ManifestRecord)> = Vec::new();
        for path in paths {
            let bytes = std::fs::read(path).map_err(|e| medvlm_io::IoError::os(path, e))?;
            digests.push(sha256_hex(&bytes));
            let m = medvlm_io::read_manifest(path)?;
            for r in m.records.iter() {
                records.push((m.image_path(r), r.clone()));
            }
        }
        let manifest_sha256 = if digests.len() == 1 {
            digests.remove(0)
        } else {
            hash_paths(&digests)
        };
        let shown = paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let path = Path::new(&shown);
        let mut filters = Vec::new();
        for f in &spec.filters {
            let Some((k, v)) = f.split_once('=') else {
                return Err(TaskError::Invalid(format!(
                    "--where {f:?}: expected FIELD=VALUE, e.g. modality=chest_xray"
                )));
            };
            filters.push((k.trim().to_string(), v.trim().to_string()));
        }
        let selected: Vec<(usize, &PathBuf, &medvlm_io::ManifestRecord)> = records
            .iter()
            .enumerate()
            .map(|(i, (p, r))| (i, p, r))
            .filter(|(_, _, r)| {
                filters
                    .iter()
                    .all(|(k, v)| field_value(r, k).as_deref() == Some(v.as_str()))
            })
            .collect();
        if selected.is_empty() {
            return Err(TaskError::Invalid(format!(
                "manifest {} has no records{}",
                path.display(),
                if filters.is_empty() {
                    String::new()
                } else {
                    format!(" matching --where {:?}", spec.filters)
                }
            )));
        }
        let (kind, (class_names, rows, notes)) = if spec.label_field == MULTI_LABEL_FIELD {
            (
                TaskKind::MultiLabel,
                multi_label_rows(path, &selected, spec)?,
            )
        } else {
            (
                TaskKind::MultiClass,
                multi_class_rows(path, &selected, spec)?,
            )
        };
        Ok(Self {
            kind,
            manifest_path: first.clone(),
            manifests: paths.to_vec(),
            manifest_sha256,
            class_names,
            rows,
            notes,
        })
    }

    /// The class indices of task rows (multi-class tasks only).
    pub fn classes(&self, task_rows: &[usize]) -> Result<Vec<usize>> {
        task_rows
            .iter()
            .map(|&r| match &self.rows[r].target {
                RowTarget::Class(c) => Ok(*c),
                RowTarget::MultiHot(_) => Err(TaskError::Invalid(format!(
                    "{}: class index requested in a multi-label task",
                    self.rows[r].path.display()
                ))),
            })
            .collect()
    }

    /// The multi-hot rows of task rows (multi-label tasks only).
    pub fn multi_hot(&self, task_rows: &[usize]) -> Result<Vec<Vec<bool>>> {
        task_rows
            .iter()
            .map(|&r| match &self.rows[r].target {
                RowTarget::MultiHot(h) => Ok(h.clone()),
                RowTarget::Class(_) => Err(TaskError::Invalid(format!(
                    "{}: multi-hot labels requested in a multi-class task",
                    self.rows[r].path.display()
                ))),
            })
            .collect()
    }

    /// The support-set labels of task rows, in the task's kind.
    pub fn support_labels(&self, task_rows: &[usize]) -> Result<SupportLabels> {
        Ok(match self.kind {
            TaskKind::MultiClass => SupportLabels::MultiClass(self.classes(task_rows)?),
            TaskKind::MultiLabel => SupportLabels::MultiLabel(self.multi_hot(task_rows)?),
        })
    }

    /// The label of a row as text: its class, or its findings joined with
    /// `;` (`normal` when it has none).
    pub fn label_text(&self, row: usize) -> String {
        match &self.rows[row].target {
            RowTarget::Class(c) => self.class_names[*c].clone(),
            RowTarget::MultiHot(h) => multi_hot_text(h, &self.class_names),
        }
    }

    /// Indices into `rows` of a split.
    pub fn split_rows(&self, split: &str) -> Vec<usize> {
        self.rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r.split.as_deref() == Some(split))
            .map(|(i, _)| i)
            .collect()
    }
}
