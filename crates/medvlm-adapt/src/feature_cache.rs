//! Cache of frozen image embeddings, computed once per (model, dataset,
//! preprocessing) and reused across methods and seeds.
//!
//! One safetensors file per key, named
//! `features-<model slug>-<first 16 hex of the key digest>.safetensors`,
//! holding `features` `[N, D]` (f32), `labels` (u32 `[N]` for multi-class, or
//! u8 `[N, C]` multi-hot) and, in the safetensors metadata: the key fields,
//! the SHA-256 of the key, the SHA-256 of the image paths (`paths_sha256`)
//! and the SHA-256 of the tensor bytes (`content_sha256`). Files are written
//! to a temporary name and renamed, so a crash never leaves a half file.
//!
//! [`FeatureCache::load_or_compute`] returns the cached features when the
//! file exists and its key and content hashes match; otherwise (missing,
//! stale key, corrupted bytes) it recomputes, overwrites, and says which in
//! [`CacheStatus`], so nothing is invalidated silently.
//!
//! The key covers what the images *are*, not only where they are:
//! [`FeatureCacheKey::images_sha256`] is [`fingerprint_files`] of the image
//! paths (each file's size, modification time and the SHA-256 of its bytes).
//! The file name depends on the model, manifest and preprocessing only, so
//! images overwritten at the same paths find the old file, see that its
//! image fingerprint differs, and recompute with
//! [`CacheStatus::Invalidated`] saying why.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Cache format version, part of every key digest.
pub const CACHE_FORMAT: &str = "medvlm-feature-cache/2";

/// Errors of the feature cache.
#[derive(Debug, thiserror::Error)]
pub enum FeatureCacheError {
    /// I/O on a cache file.
    #[error("feature cache {path}: {source}")]
    Io {
        /// File or directory.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Tensor or safetensors failure.
    #[error("feature cache {path}: {reason}")]
    Format {
        /// File.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The computed features are malformed.
    #[error("features to cache are invalid: {0}")]
    Invalid(String),
    /// The compute closure failed (its error, with its causes, is the source).
    #[error("computing features failed")]
    Compute(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, FeatureCacheError>;

/// What identifies a set of cached features.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureCacheKey {
    /// Model identifier (family, checkpoint, and its weights hash if known).
    pub model_id: String,
    /// Content hash of the dataset manifest (e.g. SHA-256 of its file).
    pub dataset_hash: String,
    /// Preprocessing description (resize, crop, normalisation, windowing).
    pub preprocessing: String,
    /// Content fingerprint of the image files ([`fingerprint_files`]).
    pub images_sha256: String,
}

impl FeatureCacheKey {
    /// SHA-256 (hex) of the format version and all four key fields: what a
    /// cache file must have been written for to be used.
    pub fn digest(&self) -> String {
        digest_parts(&[
            CACHE_FORMAT,
            &self.model_id,
            &self.dataset_hash,
            &self.preprocessing,
            &self.images_sha256,
        ])
    }

    /// SHA-256 (hex) of the key without the image fingerprint: names the
    /// file, so new image contents at the same paths replace the old file
    /// (and are reported as an invalidation) instead of piling up beside it.
    fn slot_digest(&self) -> String {
        digest_parts(&[
            CACHE_FORMAT,
            &self.model_id,
            &self.dataset_hash,
            &self.preprocessing,
        ])
    }

    /// File name of this key's cache file.
    pub fn file_name(&self) -> String {
        let slug: String = self
            .model_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(48)
            .collect();
        format!("features-{slug}-{}.safetensors", &self.slot_digest()[..16])
    }
}

fn digest_parts(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    hex(&h.finalize())
}

/// Labels stored with the features.
#[derive(Debug, Clone, PartialEq)]
pub enum CachedLabels {
    /// One class index per image.
    MultiClass(Vec<usize>),
    /// One multi-hot row per image.
    MultiLabel(Vec<Vec<bool>>),
}

impl CachedLabels {
    fn len(&self) -> usize {
        match self {
            Self::MultiClass(v) => v.len(),
            Self::MultiLabel(v) => v.len(),
        }
    }
}

/// Features of a dataset under one key.
#[derive(Debug, Clone)]
pub struct CachedFeatures {
    /// `[N, D]` f32 image embeddings, in manifest order.
    pub features: Tensor,
    /// N labels.
    pub labels: CachedLabels,
    /// SHA-256 of the image paths in order ([`hash_paths`]).
    pub paths_sha256: String,
}

/// Whether [`FeatureCache::load_or_compute`] reused or recomputed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheStatus {
    /// Loaded from the cache file.
    Hit,
    /// No cache file: computed and stored.
    Miss,
    /// A file existed but was invalid (reason): recomputed and overwritten.
    Invalidated(String),
}

/// SHA-256 (hex) of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// SHA-256 (hex) of a list of image paths, order-sensitive.
pub fn hash_paths<S: AsRef<str>>(paths: &[S]) -> String {
    let mut h = Sha256::new();
    for p in paths {
        let p = p.as_ref();
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    hex(&h.finalize())
}

/// SHA-256 (hex) of a file's bytes, e.g. a dataset manifest.
pub fn hash_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|source| FeatureCacheError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(sha256_hex(&bytes))
}

/// Content fingerprint (SHA-256 hex) of image files, order-sensitive: for
/// each file its path, size, modification time (ns) and the SHA-256 of its
/// bytes. A file that cannot be read contributes its error kind instead, so
/// a file that appears, disappears or becomes readable changes the
/// fingerprint too (inputs skipped with `--skip-bad` are still covered).
///
/// Size and time alone miss a rewrite within the file system's time
/// resolution or a copy that preserves times (`cp -p`, `rsync -t`); the
/// bytes' hash catches those, at the cost of reading every file once.
pub fn fingerprint_files<P: AsRef<Path> + Sync>(paths: &[P]) -> String {
    use rayon::prelude::*;
    let per_file: Vec<String> = paths
        .par_iter()
        .map(|p| {
            let p = p.as_ref();
            let meta = match std::fs::metadata(p) {
                Ok(m) => m,
                Err(e) => return format!("{}\0unreadable:{:?}", p.display(), e.kind()),
            };
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            let content = match file_sha256(p) {
                Ok(h) => h,
                Err(e) => format!("unreadable:{:?}", e.kind()),
            };
            format!("{}\0{}\0{mtime}\0{content}", p.display(), meta.len())
        })
        .collect();
    hash_paths(&per_file)
}

/// SHA-256 (hex) of a file's bytes, read in blocks (images can be large).
fn file_sha256(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A directory of feature cache files.
#[derive(Debug, Clone)]
pub struct FeatureCache {
    dir: PathBuf,
}

/// Raw little-endian bytes of the tensors, in a fixed order, for hashing.
fn content_hash(features: &Tensor, labels: &Tensor) -> Result<String> {
    let mut h = Sha256::new();
    let f: Vec<f32> = features
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .map_err(|e| FeatureCacheError::Invalid(e.to_string()))?;
    for v in f {
        h.update(v.to_le_bytes());
    }
    match labels.dtype() {
        DType::U32 => {
            let l: Vec<u32> = labels
                .to_vec1()
                .map_err(|e| FeatureCacheError::Invalid(e.to_string()))?;
            for v in l {
                h.update(v.to_le_bytes());
            }
        }
        _ => {
            let l: Vec<u8> = labels
                .flatten_all()
                .and_then(|t| t.to_vec1())
                .map_err(|e| FeatureCacheError::Invalid(e.to_string()))?;
            h.update(&l);
        }
    }
    Ok(hex(&h.finalize()))
}

fn labels_tensor(labels: &CachedLabels) -> Result<Tensor> {
    let err = |e: candle_core::Error| FeatureCacheError::Invalid(e.to_string());
    match labels {
        CachedLabels::MultiClass(l) => {
            let v: Vec<u32> = l.iter().map(|&c| c as u32).collect();
            Tensor::new(v.as_slice(), &Device::Cpu).map_err(err)
        }
        CachedLabels::MultiLabel(rows) => {
            let c = rows.first().map_or(0, Vec::len);
            if rows.iter().any(|r| r.len() != c) {
                return Err(FeatureCacheError::Invalid(
                    "multi-hot label rows have different lengths".into(),
                ));
            }
            let v: Vec<u8> = rows.iter().flatten().map(|&b| u8::from(b)).collect();
            Tensor::from_vec(v, (rows.len(), c), &Device::Cpu).map_err(err)
        }
    }
}

impl FeatureCache {
    /// A cache rooted at `dir` (created on first store).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Path of the cache file of `key`.
    pub fn path_for(&self, key: &FeatureCacheKey) -> PathBuf {
        self.dir.join(key.file_name())
    }

    /// Writes `features` under `key` atomically; returns the file path.
    pub fn store(&self, key: &FeatureCacheKey, features: &CachedFeatures) -> Result<PathBuf> {
        let (n, _) = features.features.dims2().map_err(|_| {
            FeatureCacheError::Invalid(format!(
                "features must be [N, D], got {:?}",
                features.features.dims()
            ))
        })?;
        if n != features.labels.len() {
            return Err(FeatureCacheError::Invalid(format!(
                "{n} feature rows but {} labels",
                features.labels.len()
            )));
        }
        std::fs::create_dir_all(&self.dir).map_err(|source| FeatureCacheError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let f32s = features
            .features
            .to_dtype(DType::F32)
            .map_err(|e| FeatureCacheError::Invalid(e.to_string()))?;
        let labels = labels_tensor(&features.labels)?;
        let path = self.path_for(key);
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), CACHE_FORMAT.to_string());
        meta.insert("model_id".to_string(), key.model_id.clone());
        meta.insert("dataset_hash".to_string(), key.dataset_hash.clone());
        meta.insert("preprocessing".to_string(), key.preprocessing.clone());
        meta.insert("images_sha256".to_string(), key.images_sha256.clone());
        meta.insert("key_sha256".to_string(), key.digest());
        meta.insert("paths_sha256".to_string(), features.paths_sha256.clone());
        meta.insert("content_sha256".to_string(), content_hash(&f32s, &labels)?);
        let task = if matches!(features.labels, CachedLabels::MultiClass(_)) {
            "multi-class"
        } else {
            "multi-label"
        };
        meta.insert("task".to_string(), task.to_string());
        let err = |e: String| FeatureCacheError::Format {
            path: path.clone(),
            reason: e,
        };
        let feat_bytes: Vec<u8> = f32s
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| err(e.to_string()))?
            .into_iter()
            .flat_map(f32::to_le_bytes)
            .collect();
        let (label_dtype, label_bytes): (safetensors::Dtype, Vec<u8>) = match labels.dtype() {
            DType::U32 => (
                safetensors::Dtype::U32,
                labels
                    .to_vec1::<u32>()
                    .map_err(|e| err(e.to_string()))?
                    .into_iter()
                    .flat_map(u32::to_le_bytes)
                    .collect(),
            ),
            _ => (
                safetensors::Dtype::U8,
                labels
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<u8>())
                    .map_err(|e| err(e.to_string()))?,
            ),
        };
        let features_view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            f32s.dims().to_vec(),
            &feat_bytes,
        )
        .map_err(|e| err(e.to_string()))?;
        let labels_view =
            safetensors::tensor::TensorView::new(label_dtype, labels.dims().to_vec(), &label_bytes)
                .map_err(|e| err(e.to_string()))?;
        let data = [("features", features_view), ("labels", labels_view)];
        let bytes = safetensors::serialize(data, Some(meta)).map_err(|e| err(e.to_string()))?;
        medvlm_io::atomic::write_atomic(&path, &bytes).map_err(|e| FeatureCacheError::Io {
            path: path.clone(),
            source: e.into_io(),
        })?;
        Ok(path)
    }

    /// Loads the features of `key`. `Ok(None)` when there is no file;
    /// `Err` when the file exists but is unreadable, was written for another
    /// key, or its content hash does not match its bytes.
    pub fn load(&self, key: &FeatureCacheKey) -> Result<Option<CachedFeatures>> {
        let path = self.path_for(key);
        if !path.exists() {
            return Ok(None);
        }
        let bad = |reason: String| FeatureCacheError::Format {
            path: path.clone(),
            reason,
        };
        let bytes = std::fs::read(&path).map_err(|source| FeatureCacheError::Io {
            path: path.clone(),
            source,
        })?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let meta = meta
            .metadata()
            .clone()
            .ok_or_else(|| bad("no metadata".into()))?;
        let field = |k: &str| {
            meta.get(k)
                .cloned()
                .ok_or_else(|| bad(format!("metadata field '{k}' missing")))
        };
        if field("format")? != CACHE_FORMAT {
            return Err(bad(format!("format is not {CACHE_FORMAT}")));
        }
        if field("key_sha256")? != key.digest() {
            if field("images_sha256")? != key.images_sha256 {
                return Err(bad(
                    "the image files changed since their features were cached \
                     (size, modification time or content differs)"
                        .into(),
                ));
            }
            return Err(bad(
                "written for a different model/dataset/preprocessing (key hash differs)".into(),
            ));
        }
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| bad(e.to_string()))?;
        let features = tensors
            .get("features")
            .cloned()
            .ok_or_else(|| bad("tensor 'features' missing".into()))?;
        let labels_t = tensors
            .get("labels")
            .cloned()
            .ok_or_else(|| bad("tensor 'labels' missing".into()))?;
        if content_hash(&features, &labels_t)? != field("content_sha256")? {
            return Err(bad("content hash mismatch: the file is corrupted".into()));
        }
        let labels = match field("task")?.as_str() {
            "multi-class" => CachedLabels::MultiClass(
                labels_t
                    .to_vec1::<u32>()
                    .map_err(|e| bad(e.to_string()))?
                    .into_iter()
                    .map(|c| c as usize)
                    .collect(),
            ),
            "multi-label" => CachedLabels::MultiLabel(
                labels_t
                    .to_vec2::<u8>()
                    .map_err(|e| bad(e.to_string()))?
                    .into_iter()
                    .map(|r| r.into_iter().map(|b| b != 0).collect())
                    .collect(),
            ),
            other => return Err(bad(format!("unknown task '{other}'"))),
        };
        Ok(Some(CachedFeatures {
            features,
            labels,
            paths_sha256: field("paths_sha256")?,
        }))
    }

    /// Returns the cached features of `key`, or computes them with `compute`,
    /// stores them and returns them. A file that fails validation (other key,
    /// corruption) is recomputed and overwritten; the status says so.
    pub fn load_or_compute<E: Into<Box<dyn std::error::Error + Send + Sync>>>(
        &self,
        key: &FeatureCacheKey,
        compute: impl FnOnce() -> std::result::Result<CachedFeatures, E>,
    ) -> Result<(CachedFeatures, CacheStatus)> {
        let status = match self.load(key) {
            Ok(Some(hit)) => return Ok((hit, CacheStatus::Hit)),
            Ok(None) => CacheStatus::Miss,
            // Reported through the status (the caller says it once), not logged here too.
            Err(e) => CacheStatus::Invalidated(e.to_string()),
        };
        let computed = compute().map_err(|e| FeatureCacheError::Compute(e.into()))?;
        self.store(key, &computed)?;
        Ok((computed, status))
    }
}
