//! Class prompts: the texts each class (or label) is described by, and their embeddings.
//!
//! A task's prompts come from one [`PromptSource`]: templates filled with the class name
//! (`"a medical image of {}"`, several ensembled), a JSON file of prompts or descriptions
//! per class (`{"class": ["text", ...]}`, every class present and no other name), or a
//! fixed table of one prompt per class (the phantom benchmark's report-style prompts).
//! [`encode_class_texts`] embeds them with a model's text tower into the [`ClassTexts`]
//! every method's `fit` takes.

use std::path::PathBuf;

use candle_core::{DType, Device};
use medvlm_models::LoadedModel;

use crate::method::ClassTexts;

/// Where the prompts of each class come from.
#[derive(Debug, Clone)]
pub enum PromptSource {
    /// Templates in which `{}` is replaced by the class name with `_` turned into spaces.
    Templates(Vec<String>),
    /// A JSON file `{"class": ["prompt", ...] | "prompt", ...}`.
    File(PathBuf),
    /// One prompt per class name, e.g. the phantom benchmark's for one modality; `name`
    /// says what the table is in errors.
    Table {
        /// What the table is ("the chest_xray phantom prompts").
        name: String,
        /// (class, prompt) pairs.
        entries: Vec<(String, String)>,
    },
}

/// Why the prompts could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// No template was given.
    #[error("give at least one template, e.g. \"a medical image of {{}}\" (or a prompts file)")]
    NoTemplate,
    /// The prompts file is unreadable or malformed (the reason names the fix).
    #[error("prompts file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A fixed table has no prompt for a class.
    #[error("{table}: class {class:?} has no prompt (known: {known:?}); use templates or a prompts file")]
    NotInTable {
        /// The table's name.
        table: String,
        /// The class.
        class: String,
        /// The classes the table has.
        known: Vec<String>,
    },
    /// Encoding the prompts failed.
    #[error("text encoder: {0}")]
    Encode(#[from] medvlm_models::ModelError),
}

/// `templates` filled with each class name (`_` -> space), in class order.
pub fn fill_templates(class_names: &[String], templates: &[String]) -> Vec<(String, Vec<String>)> {
    class_names
        .iter()
        .map(|c| {
            let name = c.replace('_', " ");
            let prompts = templates.iter().map(|t| t.replace("{}", &name)).collect();
            (c.clone(), prompts)
        })
        .collect()
}

/// The prompts of each class, in class order.
pub fn class_prompts(
    class_names: &[String],
    source: &PromptSource,
) -> Result<Vec<(String, Vec<String>)>, PromptError> {
    match source {
        PromptSource::Templates(t) if t.is_empty() => Err(PromptError::NoTemplate),
        PromptSource::Templates(t) => Ok(fill_templates(class_names, t)),
        PromptSource::File(path) => prompts_file(class_names, path),
        PromptSource::Table { name, entries } => class_names
            .iter()
            .map(|c| match entries.iter().find(|(k, _)| k == c) {
                Some((_, p)) => Ok((c.clone(), vec![p.clone()])),
                None => Err(PromptError::NotInTable {
                    table: name.clone(),
                    class: c.clone(),
                    known: entries.iter().map(|(k, _)| k.clone()).collect(),
                }),
            })
            .collect(),
    }
}

fn prompts_file(
    class_names: &[String],
    path: &PathBuf,
) -> Result<Vec<(String, Vec<String>)>, PromptError> {
    let err = |reason: String| PromptError::File {
        path: path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))?;
    let serde_json::Value::Object(map) = v else {
        return Err(err(
            "expected a JSON object {\"class\": [\"prompt\", ...], ...}".into(),
        ));
    };
    for k in map.keys() {
        if !class_names.contains(k) {
            return Err(err(format!(
                "names class {k:?}, which is not one of the task's classes {class_names:?}; \
                 rename or remove it (or change --classes / --label-field)"
            )));
        }
    }
    let mut out = Vec::with_capacity(class_names.len());
    for c in class_names {
        let Some(v) = map.get(c) else {
            return Err(err(format!(
                "has no prompts for class {c:?}; add an entry \"{c}\": [\"...\"]"
            )));
        };
        let prompts: Vec<String> = match v {
            serde_json::Value::String(s) => vec![s.clone()],
            other => serde_json::from_value(other.clone()).map_err(|_| {
                err(format!(
                    "prompts of class {c:?} must be a string or a list of strings"
                ))
            })?,
        };
        if prompts.is_empty() {
            return Err(err(format!("class {c:?} has no prompts")));
        }
        out.push((c.clone(), prompts));
    }
    Ok(out)
}

/// Embeds the class prompts (and, for multi-label tasks, the negative prompts of each
/// label) with the model's text tower.
pub fn encode_class_texts(
    m: &LoadedModel,
    prompts: &[(String, Vec<String>)],
    negatives: Option<&[(String, Vec<String>)]>,
    batch: usize,
    device: &Device,
) -> Result<ClassTexts, PromptError> {
    let embed = |p: &[String]| medvlm_models::embed::embed_texts(m, p, batch, device);
    let per_class = prompts
        .iter()
        .map(|(_, p)| embed(p))
        .collect::<Result<Vec<_>, _>>()?;
    let negative_prompts = negatives
        .map(|neg| {
            neg.iter()
                .map(|(_, p)| embed(p))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    Ok(ClassTexts {
        class_names: prompts.iter().map(|(c, _)| c.clone()).collect(),
        prompts: per_class,
        negative_prompts,
    })
}

/// The model's logit scale `exp(log_scale)`, as the methods expect it.
pub fn model_logit_scale(m: &LoadedModel) -> Result<f64, medvlm_models::ModelError> {
    let s = m
        .model
        .logit_scale()
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    s.first().map(|l| l.exp()).ok_or_else(|| {
        medvlm_models::ModelError::Invalid("the model has an empty logit scale".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn templates_fill_each_class_and_keep_class_order() {
        let p = class_prompts(
            &names(&["pleural_effusion", "normal"]),
            &PromptSource::Templates(names(&["a scan of {}", "{} seen"])),
        )
        .unwrap();
        assert_eq!(p[0].0, "pleural_effusion");
        assert_eq!(
            p[0].1,
            ["a scan of pleural effusion", "pleural effusion seen"]
        );
        assert_eq!(p[1].1, ["a scan of normal", "normal seen"]);
        assert!(matches!(
            class_prompts(&names(&["a"]), &PromptSource::Templates(vec![])),
            Err(PromptError::NoTemplate)
        ));
    }

    #[test]
    fn prompts_file_must_cover_exactly_the_classes() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("p.json");
        let classes = names(&["a", "b"]);
        let src = PromptSource::File(f.clone());
        std::fs::write(&f, r#"{"a": ["x", "y"], "b": "z"}"#).unwrap();
        let p = class_prompts(&classes, &src).unwrap();
        assert_eq!(p[0].1, ["x", "y"]);
        assert_eq!(p[1].1, ["z"]);
        for (text, needle) in [
            (r#"{"a": ["x"]}"#, "no prompts for class \"b\""),
            (
                r#"{"a": ["x"], "b": ["z"], "c": ["w"]}"#,
                "names class \"c\"",
            ),
            (r#"{"a": [], "b": ["z"]}"#, "class \"a\" has no prompts"),
            (r#"{"a": [1], "b": ["z"]}"#, "string or a list of strings"),
            (r#"["a"]"#, "expected a JSON object"),
            ("{", "not valid JSON"),
        ] {
            std::fs::write(&f, text).unwrap();
            let e = class_prompts(&classes, &src).unwrap_err().to_string();
            assert!(e.contains(needle) && e.contains("p.json"), "{text}: {e}");
        }
    }

    #[test]
    fn a_table_names_the_missing_class() {
        let src = PromptSource::Table {
            name: "the brain_mri phantom prompts".into(),
            entries: vec![("tumour".into(), "an MRI with a tumour".into())],
        };
        let p = class_prompts(&names(&["tumour"]), &src).unwrap();
        assert_eq!(p[0].1, ["an MRI with a tumour"]);
        let e = class_prompts(&names(&["tumour", "cyst"]), &src)
            .unwrap_err()
            .to_string();
        assert!(e.contains("brain_mri") && e.contains("cyst"), "{e}");
    }
}
