//! Shared pieces of `medvlm adapt`, `medvlm predict` and `medvlm bench fewshot`:
//! selecting a labelled task from a manifest, building the class prompts,
//! extracting (and caching) image features once, and the "fit -> evaluate ->
//! record" step with every metric of medvlm-eval.
//!
//! Task: the records of a manifest, optionally filtered with `--where
//! FIELD=VALUE` (e.g. `modality=chest_xray`), labelled by `--label-field`
//! (`label`, or any string column such as `modality`). Classes are the sorted
//! distinct labels of the training split unless `--classes` gives them (and
//! their order). Records whose label is not a class are not used; their
//! number is printed, never dropped silently.
//!
//! Multi-label tasks (`--label-field labels`): each record carries any subset
//! of findings in its `labels` list. The classes are the sorted distinct
//! labels of the training split except [`NORMAL_LABEL`]: `normal` is not a
//! class but the absence of every finding, so a study labelled only `normal`
//! is a negative for every class (an all-zero multi-hot row). Records with
//! an empty `labels` list, or with `normal` together with a finding, are not
//! used (counted and printed); labels outside the classes are ignored for the
//! record that carries them (also counted and printed).
//!
//! Features: every selected record is embedded once and cached with
//! [`medvlm_adapt::feature_cache`] under a key made of the model (spec,
//! family, and the sizes and modification times of the files of its
//! directory), the manifest (SHA-256 of its bytes and of the selected image
//! paths) and the preprocessing; the cached "labels" are the manifest row
//! indices of the embedded images, so rows skipped with `--skip-bad` stay
//! identifiable on a cache hit.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use medvlm_adapt::feature_cache::{
    fingerprint_files, hash_paths, CacheStatus, CachedFeatures, CachedLabels, FeatureCache,
    FeatureCacheKey,
};
use medvlm_adapt::method::{AdaptedClassifier, ClassTexts};
pub use medvlm_adapt::task::{multi_hot_text, Task, TaskSpec, MULTI_LABEL_FIELD};
use medvlm_eval::conformal::{ConformalConfig, ConformalScore};
use medvlm_eval::evaluation::MULTI_LABEL_THRESHOLD;
use medvlm_models::LoadedModel;

use super::embed::{embed_images, embed_texts, report_skipped, Skipped};

/// Task selection flags shared by `adapt` and `bench fewshot`.
#[derive(clap::Args, Debug, Clone)]
pub struct TaskArgs {
    /// Manifest column holding the class: `label`, or any string column (e.g. `modality`);
    /// `labels` makes a multi-label task (one independent probability per finding;
    /// `normal` is not a class but a negative for every finding).
    #[arg(long, default_value = "label")]
    pub label_field: String,
    /// Only use records whose FIELD equals VALUE (repeatable), e.g. `--where modality=chest_xray`.
    #[arg(long = "where", value_name = "FIELD=VALUE")]
    pub filters: Vec<String>,
    /// Classes in index order, separated by `;` (default: the sorted labels of the train split).
    #[arg(long)]
    pub classes: Option<String>,
    /// Split whose records form the pool the support set is drawn from.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Split used for evaluation (`none` to skip evaluation).
    #[arg(long, default_value = "test")]
    pub test_split: String,
    /// Split used only to calibrate the conformal prediction sets (never for model
    /// selection). When the manifest has none, the train records outside the support
    /// set are used.
    #[arg(long, default_value = "val")]
    pub calib_split: String,
    /// Prompt template(s) for each class (repeatable; several are ensembled); `{}` is
    /// replaced by the class name with `_` turned into spaces.
    #[arg(long, default_value = "a medical image of {}")]
    pub template: Vec<String>,
    /// Multi-label tasks, `zero-shot-pairs` and the adapters built on it (`tip-adapter`,
    /// `tip-adapter-f`, `clip-adapter`): negative prompt template(s) of each label
    /// (repeatable); `{}` is replaced by the label name with `_` turned into spaces.
    #[arg(long, default_value = "a medical image with no {}")]
    pub negative_template: Vec<String>,
    /// JSON file of class prompts or descriptions: {"class": ["text", ...], ...}. Every
    /// class must appear, and no other name; replaces --template.
    #[arg(long, conflicts_with = "phantom_prompts")]
    pub prompts: Option<PathBuf>,
    /// Use the phantom benchmark's class prompts ("a chest radiograph with a pleural
    /// effusion", ...) of the modality selected with `--where modality=NAME`.
    #[arg(long)]
    pub phantom_prompts: bool,
    /// Conformal score of multi-class sets: `aps` (Romano et al. 2020) or `raps`
    /// (Angelopoulos et al. 2021, lambda 0.01, k_reg 1).
    #[arg(long, default_value = "aps", value_parser = ["aps", "raps"])]
    pub conformal_score: String,
    /// Conformal level alpha. Multi-class: miscoverage, target coverage 1 - alpha.
    /// Multi-label: target expected false-negative rate of the label sets (conformal risk
    /// control).
    #[arg(long, default_value_t = 0.1)]
    pub conformal_alpha: f64,
    /// Randomised conformal scores and sets of multi-class tasks (coverage closer to
    /// exactly 1 - alpha; seeded by --seed).
    #[arg(long)]
    pub conformal_randomized: bool,
    /// Feature cache directory (default: `.medvlm-cache` beside the manifest).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Images per inference batch.
    #[arg(long, default_value_t = 32, value_parser = crate::commands::at_least_one)]
    pub batch: usize,
    /// Skip unreadable images (counted and listed) instead of stopping.
    #[arg(long)]
    pub skip_bad: bool,
}

/// The frozen-feature methods that fit multi-label tasks (one sigmoid per
/// label): CheXzero-style positive/negative prompt pairs, the linear probe
/// with an independent logistic loss per label, and Tip-Adapter(-F) and
/// CLIP-Adapter on top of the prompt pairs (signed multi-hot cache values,
/// binary cross-entropy; see their docs in medvlm-adapt). Every other method
/// is multi-class only (a softmax over classes).
pub const MULTI_LABEL_METHODS: &[&str] = &[
    "zero-shot-pairs",
    "linear-probe",
    "tip-adapter",
    "tip-adapter-f",
    "clip-adapter",
];

/// The multi-label methods whose zero-shot part is the positive/negative
/// prompt pairs (they need `--negative-template`).
pub const PROMPT_PAIR_METHODS: &[&str] = &[
    "zero-shot-pairs",
    "tip-adapter",
    "tip-adapter-f",
    "clip-adapter",
];

/// Why a method cannot run on a multi-label task, or `None` if it can.
pub fn multi_label_refusal(method: &str) -> Option<String> {
    if MULTI_LABEL_METHODS.contains(&method) {
        return None;
    }
    let why = if method.starts_with("zero-shot") {
        "scores classes with a softmax over classes (one class per image); for multi-label \
         zero-shot use 'zero-shot-pairs' (positive/negative prompt pairs)"
    } else {
        "is multi-class only (one class per image)"
    };
    Some(format!(
        "'{method}' {why}; multi-label methods: {}",
        MULTI_LABEL_METHODS.join(", ")
    ))
}

/// The prompts of each class, in class order.
pub fn class_prompts(
    class_names: &[String],
    args: &TaskArgs,
) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    if args.phantom_prompts {
        return phantom_prompts(class_names, args);
    }
    let Some(path) = &args.prompts else {
        if args.template.is_empty() {
            bail!("give at least one --template (or --prompts FILE.json)");
        }
        return Ok(class_names
            .iter()
            .map(|c| {
                let name = c.replace('_', " ");
                let prompts = args
                    .template
                    .iter()
                    .map(|t| t.replace("{}", &name))
                    .collect();
                (c.clone(), prompts)
            })
            .collect());
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let serde_json::Value::Object(map) = v else {
        bail!(
            "{}: expected a JSON object {{\"class\": [\"prompt\", ...], ...}}",
            path.display()
        );
    };
    for k in map.keys() {
        if !class_names.contains(k) {
            bail!(
                "prompts file {} names class {k:?}, which is not one of the task's classes {:?}; \
                 rename or remove it (or change --classes / --label-field)",
                path.display(),
                class_names
            );
        }
    }
    let mut out = Vec::with_capacity(class_names.len());
    for c in class_names {
        let Some(v) = map.get(c) else {
            bail!(
                "prompts file {} has no prompts for class {c:?}; add an entry \"{c}\": [\"...\"]",
                path.display()
            );
        };
        let prompts: Vec<String> = match v {
            serde_json::Value::String(s) => vec![s.clone()],
            other => serde_json::from_value(other.clone()).with_context(|| {
                format!(
                    "{}: prompts of class {c:?} must be a string or a list of strings",
                    path.display()
                )
            })?,
        };
        if prompts.is_empty() {
            bail!(
                "prompts file {}: class {c:?} has no prompts",
                path.display()
            );
        }
        out.push((c.clone(), prompts));
    }
    Ok(out)
}

/// The phantom benchmark's prompt of each class of the `--where modality=` modality.
fn phantom_prompts(
    class_names: &[String],
    args: &TaskArgs,
) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let Some(name) = args
        .filters
        .iter()
        .find_map(|f| f.strip_prefix("modality=").map(str::trim))
    else {
        bail!("--phantom-prompts needs the modality: add --where modality=NAME");
    };
    let modality: medvlm_phantoms::Modality = name
        .parse()
        .with_context(|| format!("--where modality={name}"))?;
    let table = modality.class_prompts();
    class_names
        .iter()
        .map(|c| {
            let Some((_, p)) = table.iter().find(|(k, _)| k == c) else {
                bail!(
                    "--phantom-prompts: class {c:?} has no {name} prompt (known: {:?}); \
                     use --template or --prompts",
                    table.iter().map(|(k, _)| *k).collect::<Vec<_>>()
                );
            };
            Ok((c.clone(), vec![p.to_string()]))
        })
        .collect()
}

/// The negative prompts of each label (multi-label [`PROMPT_PAIR_METHODS`]):
/// `--negative-template` filled with the label name.
pub fn negative_prompts(
    class_names: &[String],
    args: &TaskArgs,
) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    if args.negative_template.is_empty() {
        bail!("give at least one --negative-template, e.g. \"a medical image with no {{}}\"");
    }
    Ok(class_names
        .iter()
        .map(|c| {
            let name = c.replace('_', " ");
            let prompts = args
                .negative_template
                .iter()
                .map(|t| t.replace("{}", &name))
                .collect();
            (c.clone(), prompts)
        })
        .collect())
}

/// Encodes the class prompts (and, for multi-label tasks, the negative
/// prompts of each label) with the model's text tower.
pub fn encode_class_texts(
    m: &LoadedModel,
    prompts: &[(String, Vec<String>)],
    negatives: Option<&[(String, Vec<String>)]>,
    batch: usize,
    device: &Device,
) -> anyhow::Result<ClassTexts> {
    let mut per_class = Vec::with_capacity(prompts.len());
    for (_, p) in prompts {
        per_class.push(embed_texts(m, p, batch, device)?);
    }
    let negative_prompts = negatives
        .map(|neg| {
            neg.iter()
                .map(|(_, p)| embed_texts(m, p, batch, device))
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .transpose()?;
    Ok(ClassTexts {
        class_names: prompts.iter().map(|(c, _)| c.clone()).collect(),
        prompts: per_class,
        negative_prompts,
    })
}

/// The model's logit scale `exp(log_scale)`, as the methods expect it.
pub fn model_logit_scale(m: &LoadedModel) -> anyhow::Result<f64> {
    let s = m
        .model
        .logit_scale()
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let Some(&log_scale) = s.first() else {
        bail!("the model has an empty logit scale");
    };
    Ok(log_scale.exp())
}

/// A cache identity of the model: its spec, family and the sizes and
/// modification times of the files of its directory (cheap, and changes
/// whenever the weights are rewritten).
pub fn model_fingerprint(spec: &str, m: &LoadedModel) -> String {
    let mut parts = vec![spec.to_string(), m.family.to_string()];
    if let Ok(entries) = std::fs::read_dir(&m.dir) {
        let mut files: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                let md = e.metadata().ok()?;
                if !md.is_file() {
                    return None;
                }
                let mtime = md
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                Some(format!(
                    "{}:{}:{mtime}",
                    e.file_name().to_string_lossy(),
                    md.len()
                ))
            })
            .collect();
        files.sort();
        parts.extend(files);
    }
    hash_paths(&parts)
}

/// Image features of every task row that could be read.
pub struct TaskFeatures {
    /// `[N, D]` f32, one row per entry of `rows`.
    pub features: Tensor,
    /// Indices into `Task::rows` of the feature rows.
    pub rows: Vec<usize>,
}

impl TaskFeatures {
    /// The feature rows of the given task rows (which must have features),
    /// with their class labels (multi-class tasks).
    pub fn select(&self, task: &Task, task_rows: &[usize]) -> anyhow::Result<(Tensor, Vec<usize>)> {
        Ok((self.features_of(task, task_rows)?, task.classes(task_rows)?))
    }

    /// The feature rows `[len, D]` of the given task rows (which must have features).
    pub fn features_of(&self, task: &Task, task_rows: &[usize]) -> anyhow::Result<Tensor> {
        let mut pos = std::collections::HashMap::new();
        for (i, &r) in self.rows.iter().enumerate() {
            pos.insert(r, i as u32);
        }
        let mut idx = Vec::with_capacity(task_rows.len());
        for r in task_rows {
            let Some(&p) = pos.get(r) else {
                bail!("image {} has no features", task.rows[*r].path.display());
            };
            idx.push(p);
        }
        let t = Tensor::new(idx.as_slice(), &Device::Cpu)?;
        Ok(self.features.index_select(&t, 0)?)
    }

    /// The conformal calibration images: the `--calib-split` rows with features, else the
    /// `--split` pool rows outside the support set; with a description of which it is.
    pub fn calibration_rows(
        &self,
        task: &Task,
        args: &TaskArgs,
        pool_rows: &[usize],
        support_rows: &[usize],
    ) -> (Vec<usize>, String) {
        let calib = self.available(&task.split_rows(&args.calib_split));
        if !calib.is_empty() {
            return (calib, format!("split '{}'", args.calib_split));
        }
        let support: BTreeSet<usize> = support_rows.iter().copied().collect();
        let rest = pool_rows
            .iter()
            .copied()
            .filter(|r| !support.contains(r))
            .collect();
        (
            rest,
            format!(
                "'{}' images outside the support set (no '{}' split)",
                args.split, args.calib_split
            ),
        )
    }

    /// Restricts `task_rows` to those with features.
    pub fn available(&self, task_rows: &[usize]) -> Vec<usize> {
        let have: BTreeSet<usize> = self.rows.iter().copied().collect();
        task_rows
            .iter()
            .copied()
            .filter(|r| have.contains(r))
            .collect()
    }
}

/// Default cache directory: `.medvlm-cache` beside the manifest.
pub fn default_cache_dir(manifest: &Path) -> PathBuf {
    manifest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join(".medvlm-cache")
}

/// Embeds every task row once, through the feature cache.
pub fn task_features(
    task: &Task,
    model_spec: &str,
    m: &LoadedModel,
    args: &TaskArgs,
    device: &Device,
) -> anyhow::Result<TaskFeatures> {
    let paths: Vec<String> = task
        .rows
        .iter()
        .map(|r| r.path.display().to_string())
        .collect();
    let key = FeatureCacheKey {
        model_id: format!("{model_spec}#{}", model_fingerprint(model_spec, m)),
        dataset_hash: format!("{}+{}", task.manifest_sha256, hash_paths(&paths)),
        preprocessing: format!("{:?}", m.preprocess),
        images_sha256: fingerprint_files(&task.rows.iter().map(|r| &r.path).collect::<Vec<_>>()),
    };
    let cache = FeatureCache::new(
        args.cache
            .clone()
            .unwrap_or_else(|| default_cache_dir(&task.manifest_path)),
    );
    let mut skipped: Vec<Skipped> = Vec::new();
    let (cached, status) = cache
        .load_or_compute(&key, || -> anyhow::Result<CachedFeatures> {
            let all: Vec<PathBuf> = task.rows.iter().map(|r| r.path.clone()).collect();
            let imgs = embed_images(m, &all, args.batch, args.skip_bad, device)?;
            skipped = imgs.skipped;
            let Some(features) = imgs.embeds else {
                bail!("none of the {} images could be read", all.len());
            };
            // Rows kept, in order: the paths not skipped.
            let skipped_set: BTreeSet<&str> = skipped.iter().map(|s| s.path.as_str()).collect();
            let kept: Vec<usize> = (0..task.rows.len())
                .filter(|&i| !skipped_set.contains(paths[i].as_str()))
                .map(|i| task.rows[i].record)
                .collect();
            let kept_paths: Vec<&String> = (0..task.rows.len())
                .filter(|&i| !skipped_set.contains(paths[i].as_str()))
                .map(|i| &paths[i])
                .collect();
            Ok(CachedFeatures {
                features,
                labels: CachedLabels::MultiClass(kept),
                paths_sha256: hash_paths(&kept_paths),
            })
        })
        .with_context(|| format!("image features of {}", task.manifest_path.display()))?;
    report_skipped(&skipped);
    match status {
        CacheStatus::Hit => eprintln!("features: loaded from {}", cache.path_for(&key).display()),
        CacheStatus::Miss => eprintln!(
            "features: computed, cached in {}",
            cache.path_for(&key).display()
        ),
        CacheStatus::Invalidated(why) => eprintln!(
            "features: cache file {} was invalid ({why}); recomputed",
            cache.path_for(&key).display()
        ),
    }
    let CachedLabels::MultiClass(records) = cached.labels else {
        bail!(
            "feature cache {} holds multi-hot labels, not manifest rows; delete it",
            cache.path_for(&key).display()
        );
    };
    let by_record: std::collections::HashMap<usize, usize> = task
        .rows
        .iter()
        .enumerate()
        .map(|(i, r)| (r.record, i))
        .collect();
    let rows = records
        .iter()
        .map(|rec| {
            by_record.get(rec).copied().with_context(|| {
                format!(
                    "feature cache {} names manifest row {rec}, not in this task; delete it",
                    cache.path_for(&key).display()
                )
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if rows.len() < task.rows.len() {
        eprintln!(
            "note: {} of {} image(s) were unreadable and have no features",
            task.rows.len() - rows.len(),
            task.rows.len()
        );
    }
    Ok(TaskFeatures {
        features: cached.features.to_dtype(DType::F32)?,
        rows,
    })
}

/// Row-major probabilities `[M, C]` of a classifier on features.
pub fn probabilities(clf: &dyn AdaptedClassifier, features: &Tensor) -> anyhow::Result<Vec<f32>> {
    Ok(clf
        .probabilities(features)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?)
}

/// Reads the task of these arguments from the manifests (the library's
/// [`Task::from_manifests`]) and says on stderr what it left out.
pub fn load_task(paths: &[PathBuf], args: &TaskArgs) -> anyhow::Result<Task> {
    if !(args.conformal_alpha > 0.0 && args.conformal_alpha < 1.0) {
        bail!(
            "--conformal-alpha {}: must be between 0 and 1 (0.1 = 90 % target coverage)",
            args.conformal_alpha
        );
    }
    let task = Task::from_manifests(paths, &args.spec())?;
    for n in &task.notes {
        eprintln!("note: {n}");
    }
    Ok(task)
}

impl TaskArgs {
    /// The task definition of these arguments.
    pub fn spec(&self) -> TaskSpec {
        TaskSpec {
            label_field: self.label_field.clone(),
            filters: self.filters.clone(),
            classes: self.classes.clone(),
            split: self.split.clone(),
        }
    }

    /// The conformal configuration of these flags, seeded by `seed`.
    pub fn conformal(&self, seed: u64) -> ConformalConfig {
        ConformalConfig {
            score: match self.conformal_score.as_str() {
                "raps" => ConformalScore::Raps {
                    lambda: 0.01,
                    k_reg: 1,
                },
                _ => ConformalScore::Aps,
            },
            alpha: self.conformal_alpha,
            randomized: self.conformal_randomized,
            seed,
        }
    }
}

/// A multi-label probability table as CSV: `image,<label>...,predicted_labels`,
/// where `predicted_labels` lists the labels with probability >=
/// [`MULTI_LABEL_THRESHOLD`] joined with `;` (`normal` when none is).
pub fn probability_csv_multilabel(
    paths: &[String],
    probs: &[f32],
    class_names: &[String],
) -> String {
    let c = class_names.len();
    let mut out = String::from("image");
    for name in class_names {
        out.push(',');
        out.push_str(&csv_field(name));
    }
    out.push_str(",predicted_labels\n");
    for (p, row) in paths.iter().zip(probs.chunks_exact(c.max(1))) {
        out.push_str(&csv_field(p));
        for v in row {
            out.push_str(&format!(",{v:.6}"));
        }
        let hot: Vec<bool> = row.iter().map(|&v| v >= MULTI_LABEL_THRESHOLD).collect();
        out.push(',');
        out.push_str(&csv_field(&multi_hot_text(&hot, class_names)));
        out.push('\n');
    }
    out
}

/// CSV field quoting.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// A probability table as CSV: `image,<class>...,prediction`.
pub fn probability_csv(paths: &[String], probs: &[f32], class_names: &[String]) -> String {
    let c = class_names.len();
    let mut out = String::from("image");
    for name in class_names {
        out.push(',');
        out.push_str(&csv_field(name));
    }
    out.push_str(",prediction\n");
    for (p, row) in paths.iter().zip(probs.chunks_exact(c.max(1))) {
        out.push_str(&csv_field(p));
        let mut best = 0;
        for (i, v) in row.iter().enumerate() {
            out.push_str(&format!(",{v:.6}"));
            if *v > row[best] {
                best = i;
            }
        }
        out.push(',');
        out.push_str(&csv_field(&class_names[best]));
        out.push('\n');
    }
    out
}

/// Writes bytes atomically, creating the parent folder.
pub fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    medvlm_io::atomic::write_atomic(path, bytes)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_hot_text_says_normal_without_findings() {
        let names = vec!["a".to_string(), "b".to_string()];
        assert_eq!(multi_hot_text(&[false, false], &names), "normal");
        assert_eq!(multi_hot_text(&[true, true], &names), "a;b");
        for m in MULTI_LABEL_METHODS {
            assert!(multi_label_refusal(m).is_none(), "{m}");
        }
        assert!(multi_label_refusal("taskres")
            .unwrap()
            .contains("zero-shot-pairs, linear-probe, tip-adapter, tip-adapter-f, clip-adapter"));
        assert!(multi_label_refusal("zero-shot")
            .unwrap()
            .contains("use 'zero-shot-pairs'"));
    }
}
