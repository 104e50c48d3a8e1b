//! Image features of a task: every image embedded once, through the [`FeatureCache`].
//!
//! The cache key holds the model (its spec, family, and the names, sizes and modification
//! times of the files of its folder), the manifest (SHA-256 of its bytes and of the image
//! paths), the preprocessing, and a fingerprint of every image's contents
//! ([`fingerprint_files`]), so rewritten weights, a changed manifest or images overwritten in
//! place all recompute. The cached "labels" are the manifest row numbers of the embedded
//! images, so the rows skipped as unreadable stay identifiable on a cache hit.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use medvlm_models::embed::{embed_image_files, Skipped};
use medvlm_models::LoadedModel;

use crate::feature_cache::{
    fingerprint_files, hash_paths, CacheStatus, CachedFeatures, CachedLabels, FeatureCache,
    FeatureCacheError, FeatureCacheKey,
};
use crate::task::{Task, TaskError};

/// How to compute a task's features.
#[derive(Debug, Clone)]
pub struct FeatureOptions {
    /// The model as the user named it (part of the cache key).
    pub model_spec: String,
    /// The cache folder (default: [`default_cache_dir`] of the manifest).
    pub cache_dir: Option<PathBuf>,
    /// Images per inference batch (at least 1).
    pub batch: usize,
    /// Skip unreadable images (listed in [`TaskFeatures::skipped`]) instead of failing.
    pub skip_bad: bool,
}

/// Why the features could not be had.
#[derive(Debug, thiserror::Error)]
pub enum FeaturesError {
    /// Computing, loading or storing failed (the cause says which file).
    #[error("image features of {manifest}")]
    Cache {
        /// The task's manifest.
        manifest: PathBuf,
        /// The cause.
        #[source]
        source: FeatureCacheError,
    },
    /// The cache file does not fit the task (it was written by another program).
    #[error("feature cache {path}: {reason}; delete it")]
    Foreign {
        /// The cache file.
        path: PathBuf,
        /// What does not fit.
        reason: String,
    },
    /// Tensor error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A task row without features was asked for.
    #[error("image {0} has no features")]
    Missing(PathBuf),
    /// Reading labels of the rows failed.
    #[error(transparent)]
    Task(#[from] TaskError),
}

/// Image features of every task row that could be read.
#[derive(Debug)]
pub struct TaskFeatures {
    /// `[N, D]` f32, one row per entry of `rows`.
    pub features: Tensor,
    /// Indices into `Task::rows` of the feature rows.
    pub rows: Vec<usize>,
    /// The cache file.
    pub cache_path: PathBuf,
    /// Whether the features were loaded, computed, or recomputed over an invalid file.
    pub cache_status: CacheStatus,
    /// Images skipped as unreadable while computing (empty on a cache hit: the rows without
    /// features say which they were).
    pub skipped: Vec<Skipped>,
}

/// Default cache folder: `.medvlm-cache` beside the manifest.
pub fn default_cache_dir(manifest: &Path) -> PathBuf {
    manifest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join(".medvlm-cache")
}

/// A cache identity of the model: its spec, family and the names, sizes and modification
/// times of the files of its folder (cheap, and changes whenever the weights are rewritten).
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

/// Embeds every task row once, through the feature cache. `on_progress(n)` is called as
/// `n` more images are embedded (not at all on a cache hit).
pub fn task_features(
    task: &Task,
    m: &LoadedModel,
    opts: &FeatureOptions,
    device: &Device,
    on_progress: &dyn Fn(u64),
) -> Result<TaskFeatures, FeaturesError> {
    let paths: Vec<String> = task
        .rows
        .iter()
        .map(|r| r.path.display().to_string())
        .collect();
    let key = FeatureCacheKey {
        model_id: format!(
            "{}#{}",
            opts.model_spec,
            model_fingerprint(&opts.model_spec, m)
        ),
        dataset_hash: format!("{}+{}", task.manifest_sha256, hash_paths(&paths)),
        preprocessing: format!("{:?}", m.preprocess),
        images_sha256: fingerprint_files(&task.rows.iter().map(|r| &r.path).collect::<Vec<_>>()),
    };
    let cache = FeatureCache::new(
        opts.cache_dir
            .clone()
            .unwrap_or_else(|| default_cache_dir(&task.manifest_path)),
    );
    let cache_path = cache.path_for(&key);
    let mut skipped: Vec<Skipped> = Vec::new();
    type ComputeError = Box<dyn std::error::Error + Send + Sync>;
    let (cached, cache_status) = cache
        .load_or_compute(&key, || -> Result<CachedFeatures, ComputeError> {
            let all: Vec<PathBuf> = task.rows.iter().map(|r| r.path.clone()).collect();
            let imgs = embed_image_files(m, &all, opts.batch, opts.skip_bad, device, on_progress)?;
            skipped = imgs.skipped;
            let Some(features) = imgs.embeds else {
                return Err(format!("none of the {} images could be read", all.len()).into());
            };
            // Rows kept, in order: the paths not skipped.
            let skipped_set: BTreeSet<&str> = skipped.iter().map(|s| s.path.as_str()).collect();
            let kept: Vec<usize> = (0..task.rows.len())
                .filter(|&i| !skipped_set.contains(paths[i].as_str()))
                .collect();
            Ok(CachedFeatures {
                features,
                labels: CachedLabels::MultiClass(
                    kept.iter().map(|&i| task.rows[i].record).collect(),
                ),
                paths_sha256: hash_paths(&kept.iter().map(|&i| &paths[i]).collect::<Vec<_>>()),
            })
        })
        .map_err(|source| FeaturesError::Cache {
            manifest: task.manifest_path.clone(),
            source,
        })?;
    let CachedLabels::MultiClass(records) = cached.labels else {
        return Err(FeaturesError::Foreign {
            path: cache_path,
            reason: "it holds multi-hot labels, not manifest rows".into(),
        });
    };
    let by_record: HashMap<usize, usize> = task
        .rows
        .iter()
        .enumerate()
        .map(|(i, r)| (r.record, i))
        .collect();
    let rows = records
        .iter()
        .map(|rec| {
            by_record
                .get(rec)
                .copied()
                .ok_or_else(|| FeaturesError::Foreign {
                    path: cache_path.clone(),
                    reason: format!("it names manifest row {rec}, not in this task"),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TaskFeatures {
        features: cached.features.to_dtype(DType::F32)?,
        rows,
        cache_path,
        cache_status,
        skipped,
    })
}

impl TaskFeatures {
    /// The feature rows of the given task rows (which must have features), with their class
    /// labels (multi-class tasks).
    pub fn select(
        &self,
        task: &Task,
        task_rows: &[usize],
    ) -> Result<(Tensor, Vec<usize>), FeaturesError> {
        Ok((self.features_of(task, task_rows)?, task.classes(task_rows)?))
    }

    /// The feature rows `[len, D]` of the given task rows (which must have features).
    pub fn features_of(&self, task: &Task, task_rows: &[usize]) -> Result<Tensor, FeaturesError> {
        let pos: HashMap<usize, u32> = self
            .rows
            .iter()
            .enumerate()
            .map(|(i, &r)| (r, i as u32))
            .collect();
        let idx = task_rows
            .iter()
            .map(|r| {
                pos.get(r)
                    .copied()
                    .ok_or_else(|| FeaturesError::Missing(task.rows[*r].path.clone()))
            })
            .collect::<Result<Vec<u32>, _>>()?;
        let t = Tensor::new(idx.as_slice(), &Device::Cpu)?;
        Ok(self.features.index_select(&t, 0)?)
    }

    /// The conformal calibration images: the `calib_split` rows with features, else the
    /// `split` pool rows outside the support set; with a description of which it is.
    pub fn calibration_rows(
        &self,
        task: &Task,
        calib_split: &str,
        split: &str,
        pool_rows: &[usize],
        support_rows: &[usize],
    ) -> (Vec<usize>, String) {
        let calib = self.available(&task.split_rows(calib_split));
        if !calib.is_empty() {
            return (calib, format!("split '{calib_split}'"));
        }
        let support: BTreeSet<usize> = support_rows.iter().copied().collect();
        let rest = pool_rows
            .iter()
            .copied()
            .filter(|r| !support.contains(r))
            .collect();
        (
            rest,
            format!("'{split}' images outside the support set (no '{calib_split}' split)"),
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
