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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
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
