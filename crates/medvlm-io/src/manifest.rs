//! Dataset manifests: one record per image, shared by every medvlm task.
//!
//! A manifest is a JSONL file (one JSON object per line) or a CSV file. Paths
//! inside a manifest are relative to the manifest's own folder. The columns:
//!
//! | column   | JSONL type                         | CSV form                               | used by |
//! |----------|------------------------------------|----------------------------------------|---------|
//! | `image`  | string (required)                  | path                                   | all |
//! | `split`  | string: train / val / test / ...   | string                                 | all |
//! | `label`  | string                             | string                                 | multi-class classification |
//! | `labels` | list of strings                    | `a;b;c`                                | multi-label classification |
//! | `text`   | string (report or caption)         | string                                 | pretraining, retrieval, reports |
//! | `masks`  | list of `{label, path}`            | `mask` column: one path                | segmentation |
//! | `boxes`  | list of `{label, x0, y0, x1, y1}`  | `boxes` column: JSON list              | detection, grounding |
//! | `qa`     | list of `{question, answer, kind}` | `question` + `answer` columns          | VQA |
//!
//! Any other key is kept in `extra` (for example `site`, `modality`,
//! `lowres`, `moved`, `deformation`), so tools can add fields without
//! breaking readers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A segmentation mask for one finding (PNG, non-zero = inside).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegionMask {
    pub label: String,
    pub path: String,
}

/// An axis-aligned box in pixel coordinates of the image, `x0 <= x < x1`, `y0 <= y < y1`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoundingBox {
    pub label: String,
    pub x0: f32,
    pub y0: f32,
    pub x1: f32,
    pub y1: f32,
}

/// One visual question with its answer; `kind` names the question type
/// (presence, location, laterality, count, size, modality, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QaPair {
    pub question: String,
    pub answer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// One row of a manifest.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ManifestRecord {
    /// Image path, relative to the manifest's folder.
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    /// Class name. JSONL integers (`"label": 3`, as MedMNIST-style exports write them) are
    /// read as the class named "3".
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "label_or_integer"
    )]
    pub label: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "labels_or_integers"
    )]
    pub labels: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub masks: Vec<RegionMask>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub boxes: Vec<BoundingBox>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub qa: Vec<QaPair>,
    /// Every other key of the row, kept as is.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

use std::path::{Path, PathBuf};

use crate::error::{IoError, Result};

/// A manifest loaded from disk: its records plus the folder their paths are relative to.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Manifest {
    /// The manifest file (or the root folder of a folder-per-class layout).
    pub source: PathBuf,
    /// Folder that record paths are relative to.
    pub root: PathBuf,
    pub records: Vec<ManifestRecord>,
}

impl Manifest {
    /// Absolute (or root-joined) path of a record's image.
    pub fn image_path(&self, rec: &ManifestRecord) -> PathBuf {
        self.root.join(&rec.image)
    }

    /// Root-joined path of any path stored in a record (mask, ...).
    pub fn resolve(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Records of one split (`"train"`, `"val"`, `"test"`, ...).
    pub fn split<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a ManifestRecord> + 'a {
        self.records
            .iter()
            .filter(move |r| r.split.as_deref() == Some(name))
    }
}

fn merr(path: &Path, line: usize, reason: impl Into<String>) -> IoError {
    IoError::Manifest {
        path: path.to_path_buf(),
        line,
        reason: reason.into(),
    }
}

/// Read a manifest: `.jsonl`/`.json` (one object per line; blank lines and lines
/// starting with `#` are skipped), `.csv` (header row; see the table in the module
/// docs), or a folder laid out one sub-folder per class (see [`read_class_folders`]).
pub fn read_manifest(path: &Path) -> Result<Manifest> {
    if path.is_dir() {
        return read_class_folders(path);
    }
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let records = match ext.as_str() {
        "jsonl" | "json" | "ndjson" => read_jsonl_records(path)?,
        "csv" | "tsv" => read_csv_records(path, if ext == "tsv" { b'\t' } else { b',' })?,
        _ => {
            return Err(merr(
                path,
                0,
                "unknown manifest type: use .jsonl, .csv, .tsv or a folder with one sub-folder per class",
            ))
        }
    };
    Ok(Manifest {
        source: path.to_path_buf(),
        root: manifest_root(path),
        records,
    })
}

fn manifest_root(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A class name in JSONL: a string, or an integer class index written as a number.
#[derive(Deserialize)]
#[serde(untagged)]
enum ClassName {
    Name(String),
    Index(i64),
}

impl From<ClassName> for String {
    fn from(c: ClassName) -> String {
        match c {
            ClassName::Name(s) => s,
            ClassName::Index(i) => i.to_string(),
        }
    }
}

fn label_or_integer<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<String>, D::Error> {
    Ok(Option::<ClassName>::deserialize(d)
        .map_err(|_| {
            serde::de::Error::custom("\"label\" must be a class name (string) or an integer")
        })?
        .map(String::from))
}

fn labels_or_integers<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<String>, D::Error> {
    Ok(Vec::<ClassName>::deserialize(d)
        .map_err(|_| {
            serde::de::Error::custom(
                "\"labels\" must be a list of class names (strings) or integers",
            )
        })?
        .into_iter()
        .map(String::from)
        .collect())
}

fn read_jsonl_records(path: &Path) -> Result<Vec<ManifestRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| IoError::os(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let rec: ManifestRecord =
            serde_json::from_str(t).map_err(|e| merr(path, i + 1, e.to_string()))?;
        if rec.image.trim().is_empty() {
            return Err(merr(path, i + 1, "empty \"image\" path"));
        }
        out.push(rec);
    }
    Ok(out)
}

const IMAGE_COLUMNS: &[&str] = &["image", "path", "image_path", "file", "filename"];
const TEXT_COLUMNS: &[&str] = &["text", "report", "caption"];

fn read_csv_records(path: &Path, delimiter: u8) -> Result<Vec<ManifestRecord>> {
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(false)
        .from_path(path)
        .map_err(|e| merr(path, 0, e.to_string()))?;
    let headers: Vec<String> = rdr
        .headers()
        .map_err(|e| merr(path, 1, e.to_string()))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    let find = |names: &[&str]| {
        headers
            .iter()
            .position(|h| names.iter().any(|n| h.eq_ignore_ascii_case(n)))
    };
    let image_col = find(IMAGE_COLUMNS).ok_or_else(|| {
        merr(
            path,
            1,
            format!("no image column: expected one of {IMAGE_COLUMNS:?}, found {headers:?}"),
        )
    })?;
    let text_col = find(TEXT_COLUMNS);
    let known = |h: &str| {
        IMAGE_COLUMNS.contains(&h)
            || TEXT_COLUMNS.contains(&h)
            || [
                "split", "label", "labels", "mask", "boxes", "question", "answer", "qa_kind",
            ]
            .contains(&h)
    };
    let mut out = Vec::new();
    for (i, row) in rdr.records().enumerate() {
        let line = i + 2;
        let row = row.map_err(|e| merr(path, line, e.to_string()))?;
        let get = |name: &str| {
            headers
                .iter()
                .position(|h| h.eq_ignore_ascii_case(name))
                .and_then(|k| row.get(k))
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
        };
        let image = row.get(image_col).unwrap_or("").trim().to_string();
        if image.is_empty() {
            return Err(merr(path, line, "empty image path"));
        }
        let mut rec = ManifestRecord {
            image,
            split: get("split").map(str::to_string),
            label: get("label").map(str::to_string),
            labels: get("labels")
                .map(|s| {
                    s.split(';')
                        .map(|x| x.trim().to_string())
                        .filter(|x| !x.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            text: text_col
                .and_then(|k| row.get(k))
                .map(|s| s.to_string())
                .filter(|s| !s.trim().is_empty()),
            ..Default::default()
        };
        if let Some(m) = get("mask") {
            rec.masks.push(RegionMask {
                label: rec.label.clone().unwrap_or_else(|| "mask".into()),
                path: m.to_string(),
            });
        }
        if let Some(b) = get("boxes") {
            rec.boxes = serde_json::from_str(b).map_err(|e| {
                merr(
                    path,
                    line,
                    format!("boxes column is not a JSON list of {{label,x0,y0,x1,y1}}: {e}"),
                )
            })?;
        }
        match (get("question"), get("answer")) {
            (Some(q), Some(a)) => rec.qa.push(QaPair {
                question: q.to_string(),
                answer: a.to_string(),
                kind: get("qa_kind").map(str::to_string),
            }),
            (None, None) => {}
            _ => {
                return Err(merr(
                    path,
                    line,
                    "question without answer (or answer without question)",
                ))
            }
        }
        for (k, h) in headers.iter().enumerate() {
            if !known(&h.to_ascii_lowercase()) {
                if let Some(v) = row.get(k).filter(|v| !v.trim().is_empty()) {
                    rec.extra
                        .insert(h.clone(), serde_json::Value::String(v.to_string()));
                }
            }
        }
        out.push(rec);
    }
    Ok(out)
}

/// File extensions treated as images when scanning folders.
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "png", "jpg", "jpeg", "tif", "tiff", "dcm", "dicom", "nii", "gz", "npy",
];

fn is_image_file(p: &Path) -> bool {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if name.starts_with('.') {
        return false;
    }
    if name.ends_with(".gz") {
        return name.ends_with(".nii.gz");
    }
    p.extension()
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_string_lossy().to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| IoError::os(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    Ok(v)
}

/// Read a folder-per-class layout: `ROOT/<class>/<image>` or, when `ROOT` holds
/// `train`/`val`/`test` folders, `ROOT/<split>/<class>/<image>`. Records are sorted
/// by path so the order is the same on every machine.
pub fn read_class_folders(root: &Path) -> Result<Manifest> {
    let splits = ["train", "val", "valid", "validation", "test"];
    let entries = sorted_entries(root)?;
    let split_dirs: Vec<&PathBuf> = entries
        .iter()
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .map(|n| splits.contains(&n.to_string_lossy().to_ascii_lowercase().as_str()))
                    .unwrap_or(false)
        })
        .collect();
    let mut records = Vec::new();
    let mut scan = |split: Option<String>, dir: &Path| -> Result<()> {
        for class_dir in sorted_entries(dir)?.into_iter().filter(|p| p.is_dir()) {
            let class = class_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            for f in sorted_entries(&class_dir)?
                .into_iter()
                .filter(|p| p.is_file() && is_image_file(p))
            {
                let rel = f
                    .strip_prefix(root)
                    .unwrap_or(&f)
                    .to_string_lossy()
                    .replace('\\', "/");
                records.push(ManifestRecord {
                    image: rel,
                    split: split.clone(),
                    label: Some(class.clone()),
                    ..Default::default()
                });
            }
        }
        Ok(())
    };
    if split_dirs.is_empty() {
        scan(None, root)?;
    } else {
        for d in split_dirs {
            let name = d
                .file_name()
                .map(|n| n.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default();
            let split = match name.as_str() {
                "valid" | "validation" => "val".to_string(),
                other => other.to_string(),
            };
            scan(Some(split), d)?;
        }
    }
    if records.is_empty() {
        return Err(merr(
            root,
            0,
            "no images found in class sub-folders (expected ROOT/<class>/<image> or ROOT/<split>/<class>/<image>)",
        ));
    }
    Ok(Manifest {
        source: root.to_path_buf(),
        root: root.to_path_buf(),
        records,
    })
}

/// Write records as JSONL (one object per line), atomically.
pub fn write_manifest_jsonl(path: &Path, records: &[ManifestRecord]) -> Result<()> {
    let mut out = String::new();
    for r in records {
        let line = serde_json::to_string(r)
            .map_err(|e| IoError::InvalidArgument(format!("{}: {e}", path.display())))?;
        out.push_str(&line);
        out.push('\n');
    }
    crate::atomic::write_atomic(path, out.as_bytes())
}

/// Write records as CSV, atomically. Columns: `image, split, label, labels (a;b), text,
/// mask (first mask), boxes (JSON), question, answer, qa_kind (first QA pair)`, then
/// every `extra` key (JSON-encoded unless it is a string). Records with more than one
/// mask or QA pair lose the rest: use JSONL for those (an error is returned instead
/// of dropping them silently).
pub fn write_manifest_csv(path: &Path, records: &[ManifestRecord]) -> Result<()> {
    let mut extra_keys: Vec<String> = records
        .iter()
        .flat_map(|r| r.extra.keys().cloned())
        .collect();
    extra_keys.sort();
    extra_keys.dedup();
    if let Some(r) = records.iter().find(|r| r.masks.len() > 1 || r.qa.len() > 1) {
        return Err(IoError::InvalidArgument(format!(
            "{}: record {} has several masks or QA pairs, which CSV cannot hold; write JSONL",
            path.display(),
            r.image
        )));
    }
    let ioerr = |e: csv::Error| IoError::InvalidArgument(format!("{}: {e}", path.display()));
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut header: Vec<String> = [
        "image", "split", "label", "labels", "text", "mask", "boxes", "question", "answer",
        "qa_kind",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    header.extend(extra_keys.iter().cloned());
    w.write_record(&header).map_err(ioerr)?;
    for r in records {
        let boxes = if r.boxes.is_empty() {
            String::new()
        } else {
            serde_json::to_string(&r.boxes).unwrap_or_default()
        };
        let qa = r.qa.first();
        let mut row = vec![
            r.image.clone(),
            r.split.clone().unwrap_or_default(),
            r.label.clone().unwrap_or_default(),
            r.labels.join(";"),
            r.text.clone().unwrap_or_default(),
            r.masks.first().map(|m| m.path.clone()).unwrap_or_default(),
            boxes,
            qa.map(|q| q.question.clone()).unwrap_or_default(),
            qa.map(|q| q.answer.clone()).unwrap_or_default(),
            qa.and_then(|q| q.kind.clone()).unwrap_or_default(),
        ];
        for k in &extra_keys {
            row.push(match r.extra.get(k) {
                None => String::new(),
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
            });
        }
        w.write_record(&row).map_err(ioerr)?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| IoError::InvalidArgument(format!("{}: {e}", path.display())))?;
    crate::atomic::write_atomic(path, &bytes)
}
