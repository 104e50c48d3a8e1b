//! Dataset validation behind `medvlm data check`: counts per split and class,
//! missing and unreadable files, suspicious labels, identifying DICOM attributes,
//! and the `--skip-bad` policy other commands share ([`usable_records`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use rayon::prelude::*;

use crate::manifest::{Manifest, ManifestRecord};
use crate::{detect_format, load_any, FileKind};

/// Result of checking one record's files.
#[derive(Debug, Clone, PartialEq)]
pub struct FileCheck {
    /// Index of the record in the manifest.
    pub index: usize,
    pub path: PathBuf,
    /// `None` when the image decoded (or only existence was checked).
    pub problem: Option<Problem>,
    /// Shape of the decoded image.
    pub shape: Option<Vec<usize>>,
    /// Identifying DICOM attributes with values (names only, never values).
    pub identifying: Vec<&'static str>,
    /// Mask paths that do not exist.
    pub missing_masks: Vec<PathBuf>,
    /// Reader warnings (repairs, dropped alpha channels).
    pub warnings: Vec<String>,
}

/// Why a file is bad.
#[derive(Debug, Clone, PartialEq)]
pub enum Problem {
    Missing,
    Unreadable(String),
}

/// Options of [`check_manifest`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CheckOptions {
    /// Decode every image (slower, finds corrupt files); default true.
    pub decode: bool,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions { decode: true }
    }
}

/// Everything `data check` reports.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CheckReport {
    pub records: usize,
    /// split -> number of records (`"(none)"` when a record has no split).
    pub per_split: BTreeMap<String, usize>,
    /// split -> class -> records (multi-label records count once per label).
    pub per_split_class: BTreeMap<String, BTreeMap<String, usize>>,
    pub files: Vec<FileCheck>,
    /// Human-readable label problems (warnings, not errors).
    pub suspicious: Vec<String>,
    /// Images listed more than once: path -> splits it appears in.
    pub duplicates: BTreeMap<String, Vec<String>>,
}

impl CheckReport {
    /// Records whose image is missing or unreadable.
    pub fn bad(&self) -> impl Iterator<Item = &FileCheck> {
        self.files.iter().filter(|f| f.problem.is_some())
    }

    /// Number of bad files.
    pub fn n_bad(&self) -> usize {
        self.bad().count()
    }

    /// DICOM files carrying identifying attributes.
    pub fn n_identifying(&self) -> usize {
        self.files
            .iter()
            .filter(|f| !f.identifying.is_empty())
            .count()
    }
}

fn split_name(r: &ManifestRecord) -> String {
    r.split.clone().unwrap_or_else(|| "(none)".into())
}

/// Check one image file: exists, decodes, identifying DICOM attributes.
pub fn check_file(index: usize, path: PathBuf, decode: bool) -> FileCheck {
    let mut fc = FileCheck {
        index,
        path: path.clone(),
        problem: None,
        shape: None,
        identifying: Vec::new(),
        missing_masks: Vec::new(),
        warnings: Vec::new(),
    };
    if !path.is_file() {
        fc.problem = Some(Problem::Missing);
        return fc;
    }
    if matches!(detect_format(&path), Ok(FileKind::Dicom)) {
        if let Ok(obj) = crate::dicom::open(&path) {
            fc.identifying = crate::dicom::identifying_attributes_present(&obj);
        }
    }
    if decode {
        match load_any(&path) {
            Ok(img) => {
                fc.shape = Some(img.shape.clone());
                fc.warnings = img.warnings;
            }
            Err(e) => fc.problem = Some(Problem::Unreadable(e.to_string())),
        }
    } else if let Err(e) = detect_format(&path) {
        fc.problem = Some(Problem::Unreadable(e.to_string()));
    }
    fc
}

/// Check every record of a manifest (files in parallel with rayon).
pub fn check_manifest(m: &Manifest, opts: CheckOptions) -> CheckReport {
    let mut rep = CheckReport {
        records: m.records.len(),
        ..Default::default()
    };
    for r in &m.records {
        let split = split_name(r);
        *rep.per_split.entry(split.clone()).or_default() += 1;
        let classes = rep.per_split_class.entry(split).or_default();
        let mut labels: Vec<&str> = r.labels.iter().map(String::as_str).collect();
        if let Some(l) = r.label.as_deref() {
            if !labels.contains(&l) {
                labels.push(l);
            }
        }
        for l in labels {
            *classes.entry(l.to_string()).or_default() += 1;
        }
    }
    rep.files = m
        .records
        .par_iter()
        .enumerate()
        .map(|(i, r)| {
            let mut fc = check_file(i, m.image_path(r), opts.decode);
            fc.missing_masks = r
                .masks
                .iter()
                .map(|mk| m.resolve(&mk.path))
                .filter(|p| !p.is_file())
                .collect();
            fc
        })
        .collect();
    // duplicates (possible leakage between splits)
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &m.records {
        seen.entry(r.image.clone()).or_default().push(split_name(r));
    }
    rep.duplicates = seen.into_iter().filter(|(_, v)| v.len() > 1).collect();
    rep.suspicious = suspicious_labels(m, &rep);
    rep
}

/// Label problems worth a human look.
fn suspicious_labels(m: &Manifest, rep: &CheckReport) -> Vec<String> {
    let mut out = Vec::new();
    let mut totals: BTreeMap<String, usize> = BTreeMap::new();
    for classes in rep.per_split_class.values() {
        for (c, n) in classes {
            *totals.entry(c.clone()).or_default() += n;
        }
    }
    // near-duplicate class names: same after lower-casing and trimming
    let mut norm: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for c in totals.keys() {
        let k = c.trim().to_lowercase().replace(['_', '-'], " ");
        norm.entry(k).or_default().insert(c.clone());
    }
    for names in norm.values().filter(|v| v.len() > 1) {
        out.push(format!(
            "class names that differ only in case/spacing/punctuation: {}",
            names
                .iter()
                .map(|n| format!("{n:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for (c, n) in &totals {
        if *n == 1 {
            out.push(format!("class {c:?} has a single example"));
        }
        if c.trim() != c || c.is_empty() {
            out.push(format!(
                "class {c:?} has leading/trailing spaces or is empty"
            ));
        }
    }
    if totals.len() == 1 {
        out.push(format!(
            "only one class ({:?}): nothing to discriminate",
            totals.keys().next().map(String::as_str).unwrap_or("")
        ));
    }
    let numeric = totals.keys().filter(|c| c.parse::<f64>().is_ok()).count();
    if numeric > 0 && numeric < totals.len() {
        out.push("labels mix numbers and names (e.g. \"0\" and \"nodule\")".into());
    }
    for s in rep.per_split.keys().filter(|s| !is_known_split(s)) {
        out.push(format!(
            "unusual split name {s:?} (expected train, val, test, or an evaluation split \
             named test_* / val_* such as test_heldout_site)"
        ));
    }
    if let Some(train) = rep.per_split_class.get("train") {
        for (split, cls) in rep
            .per_split_class
            .iter()
            .filter(|(s, _)| is_evaluation_split(s))
        {
            for c in cls.keys().filter(|c| !train.contains_key(*c)) {
                out.push(format!("class {c:?} appears in {split} but never in train"));
            }
        }
    }
    let labelled = m
        .records
        .iter()
        .filter(|r| r.label.is_some() || !r.labels.is_empty())
        .count();
    if labelled > 0 && labelled < m.records.len() {
        out.push(format!(
            "{} of {} records have no label",
            m.records.len() - labelled,
            m.records.len()
        ));
    }
    for (img, splits) in &rep.duplicates {
        let distinct: BTreeSet<&String> = splits.iter().collect();
        if distinct.len() > 1 {
            out.push(format!(
                "image {img:?} is listed in several splits ({}): train/test leakage",
                distinct.into_iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    out
}

/// Validation and test splits: `val`, `test`, and further ones named `val_*` / `test_*`
/// (an external test site, e.g. the phantom benchmark's `test_heldout_site`).
fn is_evaluation_split(s: &str) -> bool {
    s == "val" || s == "test" || s.starts_with("val_") || s.starts_with("test_")
}

fn is_known_split(s: &str) -> bool {
    s == "train" || s == "(none)" || is_evaluation_split(s)
}

/// The `--skip-bad` policy: without it any bad file is an error listing them;
/// with it the good records are returned together with the bad ones (to report).
pub fn usable_records<'a>(
    m: &'a Manifest,
    rep: &CheckReport,
    skip_bad: bool,
) -> std::result::Result<(Vec<&'a ManifestRecord>, Vec<FileCheck>), String> {
    let bad: Vec<FileCheck> = rep.bad().cloned().collect();
    if !bad.is_empty() && !skip_bad {
        let list: Vec<String> = bad.iter().take(10).map(describe_bad).collect();
        return Err(format!(
            "{} of {} files are missing or unreadable (use --skip-bad to continue without them): {}{}",
            bad.len(),
            rep.records,
            list.join("; "),
            if bad.len() > 10 { "; ..." } else { "" }
        ));
    }
    let bad_idx: BTreeSet<usize> = bad.iter().map(|b| b.index).collect();
    let good = m
        .records
        .iter()
        .enumerate()
        .filter(|(i, _)| !bad_idx.contains(i))
        .map(|(_, r)| r)
        .collect();
    Ok((good, bad))
}

/// One-line description of a bad file.
pub fn describe_bad(f: &FileCheck) -> String {
    match &f.problem {
        Some(Problem::Missing) => format!("{}: missing", f.path.display()),
        Some(Problem::Unreadable(e)) => e.clone(),
        None => format!("{}: ok", f.path.display()),
    }
}
