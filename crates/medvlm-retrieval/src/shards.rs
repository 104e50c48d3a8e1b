//! Sharded embedding of an archive and the merge of the shards into one index.
//!
//! `medvlm embed --shard I/N` embeds item `k` of the image list (a directory's files in
//! sorted path order, or a manifest's rows in file order) when `k mod N == I`
//! ([`select`]): the shards are disjoint, cover the list, and each can run as an
//! independent job (a Kubernetes Indexed Job or a Slurm job array). Each shard writes the
//! usual `medvlm embed` output (`image_embeds` f32 `[n, D]` in a safetensors file and a
//! JSON sidecar beside it) with the shard and the model fingerprint in the sidecar.
//! [`merge`] checks the shards belong together and returns the rows ordered by id, the
//! same order a one-go build uses ([`sort_by_id`]), so both give the same index.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{read_f32_tensor, read_json, Entry, Result, RetrievalError};

/// Shard `index` of `count` (written `I/N`, `0 <= I < N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSpec {
    pub index: usize,
    pub count: usize,
}

impl std::str::FromStr for ShardSpec {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: a shard is written I/N, e.g. 0/4"))?;
        let index: usize = i
            .trim()
            .parse()
            .map_err(|e| format!("{s:?}: shard index {i:?}: {e}"))?;
        let count: usize = n
            .trim()
            .parse()
            .map_err(|e| format!("{s:?}: shard count {n:?}: {e}"))?;
        if count == 0 || index >= count {
            return Err(format!("{s:?}: needs N >= 1 and 0 <= I < N"));
        }
        Ok(ShardSpec { index, count })
    }
}

impl std::fmt::Display for ShardSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// The items of shard `spec`: item `k` of `items` when `k mod count == index`, in order.
pub fn select<T: Clone>(items: &[T], spec: ShardSpec) -> Vec<T> {
    items
        .iter()
        .skip(spec.index)
        .step_by(spec.count)
        .cloned()
        .collect()
}

/// The fields of a `medvlm embed` JSON sidecar that the merge reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbeddingsSidecar {
    pub model: String,
    #[serde(default)]
    pub model_fingerprint: Option<String>,
    pub embed_dim: usize,
    pub images: Vec<String>,
    #[serde(default)]
    pub shard: Option<ShardSpec>,
}

/// A `medvlm embed` output read back: the safetensors file, its sidecar and the rows.
#[derive(Debug, Clone)]
pub struct EmbeddingsFile {
    pub path: PathBuf,
    pub sidecar: EmbeddingsSidecar,
    /// `[images.len(), embed_dim]` row-major, as written (not normalised).
    pub values: Vec<f32>,
}

/// The sidecar of an embeddings file: `X.safetensors` -> `X.json`.
pub fn sidecar_path(path: &Path) -> PathBuf {
    path.with_extension("json")
}

/// Reads `path` (`image_embeds`) and its sidecar, checking they agree.
pub fn read_embeddings(path: &Path) -> Result<EmbeddingsFile> {
    let sc_path = sidecar_path(path);
    let sidecar: EmbeddingsSidecar = read_json(&sc_path)?;
    let (_, values) = read_f32_tensor(
        path,
        "image_embeds",
        Some((sidecar.images.len(), sidecar.embed_dim)),
    )?;
    Ok(EmbeddingsFile {
        path: path.to_path_buf(),
        sidecar,
        values,
    })
}

/// The embeddings files (`*.safetensors` with a JSON sidecar) in `dir`, sorted.
pub fn list_embeddings(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| crate::file_err(dir, e))?;
    let mut v: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors") && sidecar_path(p).is_file())
        .collect();
    v.sort();
    if v.is_empty() {
        return Err(crate::file_err(
            dir,
            "no embeddings files (*.safetensors with a .json sidecar from medvlm embed)",
        ));
    }
    Ok(v)
}

/// Embeddings ready for [`crate::EmbeddingIndex::build`].
#[derive(Debug, Clone)]
pub struct Merged {
    pub model: String,
    pub model_fingerprint: String,
    pub dim: usize,
    pub entries: Vec<Entry>,
    pub values: Vec<f32>,
}

/// Reorders `entries` and their rows by id (byte order), the canonical index order.
pub fn sort_by_id(entries: Vec<Entry>, values: Vec<f32>, dim: usize) -> (Vec<Entry>, Vec<f32>) {
    let mut order: Vec<usize> = (0..entries.len()).collect();
    order.sort_by(|&a, &b| entries[a].id.cmp(&entries[b].id));
    let mut out_values = Vec::with_capacity(values.len());
    for &i in &order {
        out_values.extend_from_slice(&values[i * dim..(i + 1) * dim]);
    }
    let mut slots: Vec<Option<Entry>> = entries.into_iter().map(Some).collect();
    let out_entries = order.iter().filter_map(|&i| slots[i].take()).collect();
    (out_entries, out_values)
}

/// Merges shard outputs into one set of rows ordered by id. Checks: the same model
/// fingerprint (or, when a file has none, the same model spec) and dimension in every
/// file; when files carry a shard, the same shard count, every shard `0..N-1` present
/// exactly once (the missing ones are named); no image in two files.
pub fn merge(files: &[EmbeddingsFile]) -> Result<Merged> {
    let first = files
        .first()
        .ok_or_else(|| RetrievalError::Invalid("no embeddings files to merge".into()))?;
    let key = |f: &EmbeddingsFile| {
        f.sidecar
            .model_fingerprint
            .clone()
            .unwrap_or_else(|| f.sidecar.model.clone())
    };
    let fp = key(first);
    for f in &files[1..] {
        if key(f) != fp {
            return Err(crate::file_err(
                &f.path,
                format!(
                    "made with model {} (fingerprint {}), but {} with model {} (fingerprint {}); \
                     shards must come from the same model",
                    f.sidecar.model,
                    key(f),
                    first.path.display(),
                    first.sidecar.model,
                    fp
                ),
            ));
        }
        if f.sidecar.embed_dim != first.sidecar.embed_dim {
            return Err(crate::file_err(
                &f.path,
                format!(
                    "embeddings of dimension {}, but {} has dimension {}",
                    f.sidecar.embed_dim,
                    first.path.display(),
                    first.sidecar.embed_dim
                ),
            ));
        }
    }
    let sharded: Vec<&EmbeddingsFile> =
        files.iter().filter(|f| f.sidecar.shard.is_some()).collect();
    if !sharded.is_empty() {
        if sharded.len() != files.len() {
            let plain = files
                .iter()
                .find(|f| f.sidecar.shard.is_none())
                .map(|f| &f.path);
            return Err(RetrievalError::Invalid(format!(
                "{} is not a shard but other files are; merge either shards or whole embeddings",
                plain.map(|p| p.display().to_string()).unwrap_or_default()
            )));
        }
        let n = sharded[0].sidecar.shard.map(|s| s.count).unwrap_or(1);
        let mut seen: HashMap<usize, &Path> = HashMap::new();
        for f in &sharded {
            let s = f.sidecar.shard.expect("filtered on shard");
            if s.count != n {
                return Err(crate::file_err(
                    &f.path,
                    format!(
                        "is shard {s}, but {} is one of {n} shards",
                        sharded[0].path.display()
                    ),
                ));
            }
            if let Some(other) = seen.insert(s.index, &f.path) {
                return Err(crate::file_err(
                    &f.path,
                    format!("is shard {s}, and so is {}", other.display()),
                ));
            }
        }
        let missing: BTreeSet<usize> = (0..n).filter(|i| !seen.contains_key(i)).collect();
        if !missing.is_empty() {
            let names: Vec<String> = missing.iter().map(|i| format!("{i}/{n}")).collect();
            return Err(RetrievalError::Invalid(format!(
                "shard(s) {} missing (have {} of {n}: {})",
                names.join(", "),
                seen.len(),
                files
                    .iter()
                    .map(|f| f.path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let dim = first.sidecar.embed_dim;
    let mut owner: HashMap<&str, &Path> = HashMap::new();
    let mut entries = Vec::new();
    let mut values = Vec::new();
    for f in files {
        for img in &f.sidecar.images {
            if let Some(other) = owner.insert(img.as_str(), &f.path) {
                return Err(crate::file_err(
                    &f.path,
                    format!("image {img} is also in {}", other.display()),
                ));
            }
            entries.push(Entry::from_path(img.clone()));
        }
        values.extend_from_slice(&f.values);
    }
    let (entries, values) = sort_by_id(entries, values, dim);
    Ok(Merged {
        model: first.sidecar.model.clone(),
        model_fingerprint: fp,
        dim,
        entries,
        values,
    })
}
