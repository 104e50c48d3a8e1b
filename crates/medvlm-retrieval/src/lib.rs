//! Study retrieval at archive scale: an index of L2-normalised embeddings (one row per
//! study image) with its ids and paths, searched by cosine similarity either exactly
//! (brute force: one dot product per row, rows split over rayon threads) or approximately
//! with HNSW, the hierarchical navigable small-world graph of Malkov & Yashunin,
//! "Efficient and robust approximate nearest neighbor search using Hierarchical
//! Navigable Small World graphs", IEEE TPAMI 42(4), 2018.
//!
//! # ANN implementation and parameters
//!
//! HNSW comes from the `instant-distance` crate (0.6.1, pure Rust, MIT/Apache-2.0): it
//! needs no C/C++ toolchain, has few dependencies (rayon, parking_lot, ordered-float,
//! rand, num_cpus; serde with `with-serde`), builds the graph in parallel with rayon and
//! derives serde for the graph, so the graph is saved and loaded rather than rebuilt.
//! `hnsw_rs` was the other candidate named in the issue and was not evaluated.
//! Parameters ([`HnswParams`], recorded in the index card):
//!
//! - `M` = 32 neighbours per node on the upper layers and `2M` = 64 on layer 0 (fixed by
//!   instant-distance), level multiplier `1/ln(M)`;
//! - `ef_construction` = 100 (default), `ef_search` = 100 (default; fixed when the graph
//!   is built, so an ANN query returns at most `ef_search` hits);
//! - `seed` = 0 (default) for the level assignment. Construction inserts points in
//!   parallel, so two builds of the same vectors may give slightly different graphs;
//!   a saved graph loads back identical. The graph file is trusted as written by
//!   [`EmbeddingIndex::save`]: its point ids are checked on load, but neighbour lists
//!   are not (instant-distance keeps those fields private).
//!
//! Distance is `1 - cos`: every stored vector and every query is L2-normalised, so the
//! score reported is the dot product. Scores of ANN hits are recomputed with the same dot
//! product as exact search, so the two agree on every hit they share.
//!
//! # Index directory
//!
//! [`EmbeddingIndex::save`] writes a directory atomically (a temporary sibling directory,
//! then a rename): `card.json` ([`IndexCard`]: model spec and fingerprint, dimension,
//! count, parameters), `entries.json` (ids, paths, metadata in row order),
//! `embeddings.safetensors` (`embeddings`, f32 `[N, D]`, normalised) and `hnsw.json`
//! (the graph; each point is stored as its row number and re-attached to the embeddings
//! on load).

pub mod shards;
pub mod synthetic;

use std::cell::RefCell;
use std::collections::HashSet;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use instant_distance::{Builder, Hnsw, Point, Search};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// What can go wrong building, saving, loading or searching an index. Every variant
/// that concerns a file names it.
#[derive(Debug, thiserror::Error)]
pub enum RetrievalError {
    /// A file or directory could not be read or written, or its content is wrong.
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    /// The input (vectors, ids, parameters, query) is not valid.
    #[error("{0}")]
    Invalid(String),
    /// The index was built with another model than the one given for the queries.
    #[error(
        "index {} was built with model {index_model} (fingerprint {index_fingerprint}), \
         but the queries use model {query_model} (fingerprint {query_fingerprint}); \
         embeddings of different models are not comparable",
        index.display()
    )]
    ModelMismatch {
        index: PathBuf,
        index_model: String,
        index_fingerprint: String,
        query_model: String,
        query_fingerprint: String,
    },
}

pub type Result<T> = std::result::Result<T, RetrievalError>;

fn file_err(path: &Path, reason: impl std::fmt::Display) -> RetrievalError {
    RetrievalError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Index-file format name and version written in the card.
pub const FORMAT: &str = "medvlm-retrieval-index";
pub const FORMAT_VERSION: u32 = 1;
/// HNSW `M` of instant-distance (neighbours per node on the upper layers; 2M on layer 0).
pub const HNSW_M: usize = 32;

/// HNSW build and search parameters (defaults: `ef_construction` 100, `ef_search` 100,
/// `seed` 0; `M` is [`HNSW_M`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HnswParams {
    /// Candidate-list size while inserting (larger: better graph, slower build).
    pub ef_construction: usize,
    /// Candidate-list size while searching (larger: better recall, slower queries);
    /// also the most hits one ANN query returns.
    pub ef_search: usize,
    /// Seed of the random level assignment.
    pub seed: u64,
}

impl Default for HnswParams {
    fn default() -> Self {
        HnswParams {
            ef_construction: 100,
            ef_search: 100,
            seed: 0,
        }
    }
}

/// The ANN section of the card: the algorithm, its implementation and parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnnCard {
    pub algorithm: String,
    pub implementation: String,
    pub m: usize,
    pub m_layer0: usize,
    pub ef_construction: usize,
    pub ef_search: usize,
    pub seed: u64,
}

/// `card.json` of an index directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexCard {
    pub format: String,
    pub format_version: u32,
    /// The model spec the embeddings were made with (as given to `--model`).
    pub model: String,
    /// Its fingerprint (`medvlm_adapt::features::model_fingerprint`).
    pub model_fingerprint: String,
    pub embed_dim: usize,
    pub count: usize,
    /// Always "cosine": dot product of L2-normalised vectors.
    pub metric: String,
    pub ann: AnnCard,
}

/// One indexed study image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Unique id (medvlm uses the image path).
    pub id: String,
    /// The image file.
    pub path: String,
    /// Free-form metadata (study, modality, ...), kept as given.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

impl Entry {
    /// An entry whose id is its path.
    pub fn from_path(path: impl Into<String>) -> Self {
        let path = path.into();
        Entry {
            id: path.clone(),
            path,
            metadata: Default::default(),
        }
    }
}

/// Row-major `[count, dim]` f32 matrix of normalised embeddings, shared by the index and
/// the points of its graph.
#[derive(Debug)]
pub struct Rows {
    pub dim: usize,
    pub data: Vec<f32>,
}

impl Rows {
    pub fn count(&self) -> usize {
        self.data.len().checked_div(self.dim).unwrap_or(0)
    }
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
}

/// Dot product of two equal-length vectors: AVX2 + FMA where the CPU has them (checked at
/// run time: the build targets baseline x86-64, whose 4-wide SSE without FMA spent most of an
/// HNSW build's time here), else eight independent accumulators the compiler vectorises.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { dot_avx2_fma(a, b) };
        }
    }
    dot_portable(a, b)
}

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// [`dot`] with two 8-wide fused multiply-add accumulators.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2_fma(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::{
        _mm256_add_ps, _mm256_fmadd_ps, _mm256_loadu_ps, _mm256_setzero_ps, _mm256_storeu_ps,
    };
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    // SAFETY: every load reads 8 floats at i or i + 8 with i + 16 <= n, inside both slices.
    unsafe {
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                acc1,
            );
            i += 16;
        }
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(acc0, acc1)) };
    lanes.iter().sum::<f32>()
        + a[i..n]
            .iter()
            .zip(&b[i..n])
            .map(|(x, y)| x * y)
            .sum::<f32>()
}

/// L2-normalises `v` in place; `what` names the vector in the error (zero or non-finite).
pub fn normalise(v: &mut [f32], what: &str) -> Result<()> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if !n.is_finite() || n == 0.0 {
        return Err(RetrievalError::Invalid(format!(
            "{what}: the embedding has norm {n}, it cannot be normalised"
        )));
    }
    v.iter_mut().for_each(|x| *x /= n);
    Ok(())
}

thread_local! {
    /// The rows a graph being deserialised on this thread points into.
    static LOADING_ROWS: RefCell<Option<Arc<Rows>>> = const { RefCell::new(None) };
}

/// A point of the HNSW graph: a row of the shared embedding matrix. Serialised as the
/// row number only.
#[derive(Clone, Debug)]
pub struct RowPoint {
    rows: Arc<Rows>,
    row: u32,
}

impl RowPoint {
    fn vector(&self) -> &[f32] {
        self.rows.row(self.row as usize)
    }
}

impl Point for RowPoint {
    fn distance(&self, other: &Self) -> f32 {
        1.0 - dot(self.vector(), other.vector())
    }
}

impl Serialize for RowPoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_u32(self.row)
    }
}

impl<'de> Deserialize<'de> for RowPoint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let row = u32::deserialize(d)?;
        LOADING_ROWS.with(|r| {
            let rows = r.borrow().clone().ok_or_else(|| {
                serde::de::Error::custom("graph points read without their embeddings")
            })?;
            if row as usize >= rows.count() {
                return Err(serde::de::Error::custom(format!(
                    "graph point {row} is past the {} embeddings",
                    rows.count()
                )));
            }
            Ok(RowPoint { rows, row })
        })
    }
}

/// One search result: the row, its entry and its cosine similarity to the query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub row: usize,
    pub score: f32,
}

/// Orders hits by decreasing score, ties by increasing row (so results are deterministic).
fn hit_order(a: &Hit, b: &Hit) -> std::cmp::Ordering {
    b.score.total_cmp(&a.score).then(a.row.cmp(&b.row))
}

/// The `k` best hits of `scores` (row = position), in [`hit_order`]. The result holds `k`
/// hits, not `scores.len()`: a batch of exact searches keeps one result per query, so a
/// result that kept the capacity of all rows would cost `queries x rows x 16` bytes (16 GB for
/// 1000 queries of a million rows).
fn top_k(scores: Vec<f32>, k: usize) -> Vec<Hit> {
    let k = k.min(scores.len());
    if k == 0 {
        return Vec::new();
    }
    if k > SMALL_K {
        let mut hits: Vec<Hit> = scores
            .into_iter()
            .enumerate()
            .map(|(row, score)| Hit { row, score })
            .collect();
        if k < hits.len() {
            hits.select_nth_unstable_by(k - 1, hit_order);
            hits.truncate(k);
        }
        hits.sort_by(hit_order);
        hits.shrink_to_fit();
        return hits;
    }
    // Few hits wanted: keep the best k sorted as we go; most rows only meet the worst kept.
    let mut best: Vec<Hit> = Vec::with_capacity(k + 1);
    for (row, score) in scores.into_iter().enumerate() {
        let hit = Hit { row, score };
        if best.len() == k {
            if hit_order(&hit, &best[k - 1]) != std::cmp::Ordering::Less {
                continue;
            }
            best.pop();
        }
        let at = best.partition_point(|h| hit_order(h, &hit) == std::cmp::Ordering::Less);
        best.insert(at, hit);
    }
    best.shrink_to_fit();
    best
}

/// Up to this many hits, [`top_k`] keeps a sorted list (O(rows x log k), no copy of the
/// rows); above it, a selection over all rows.
const SMALL_K: usize = 256;

thread_local! {
    /// The HNSW search state of this thread ([`EmbeddingIndex::search_ann`]).
    static SEARCH_STATE: RefCell<Search> = RefCell::new(Search::default());
}

/// An index of L2-normalised embeddings with exact and HNSW search.
pub struct EmbeddingIndex {
    pub card: IndexCard,
    pub entries: Vec<Entry>,
    rows: Arc<Rows>,
    graph: Hnsw<RowPoint>,
}

impl std::fmt::Debug for EmbeddingIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddingIndex")
            .field("card", &self.card)
            .field("entries", &self.entries.len())
            .finish()
    }
}

impl EmbeddingIndex {
    /// Builds an index from `entries` and their embeddings (`[entries.len(), dim]`
    /// row-major, normalised here). Errors: empty input, a shape mismatch, duplicate ids,
    /// a zero or non-finite embedding, `ef_search` or `ef_construction` of 0.
    pub fn build(
        model: &str,
        model_fingerprint: &str,
        entries: Vec<Entry>,
        embeddings: Vec<f32>,
        dim: usize,
        params: HnswParams,
    ) -> Result<Self> {
        Self::build_with_progress(
            model,
            model_fingerprint,
            entries,
            embeddings,
            dim,
            params,
            &|_, _| {},
        )
    }

    /// [`Self::build`] that reports the graph build: `progress(inserted, total)` about once
    /// a second while the graph grows (instant-distance counts insertions in steps of 1000),
    /// and `(total, total)` when it is done.
    pub fn build_with_progress(
        model: &str,
        model_fingerprint: &str,
        entries: Vec<Entry>,
        mut embeddings: Vec<f32>,
        dim: usize,
        params: HnswParams,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<Self> {
        if entries.is_empty() || dim == 0 {
            return Err(RetrievalError::Invalid(
                "an index needs at least one embedding of dimension >= 1".into(),
            ));
        }
        if embeddings.len() != entries.len() * dim {
            return Err(RetrievalError::Invalid(format!(
                "{} embedding values for {} entries of dimension {dim} (expected {})",
                embeddings.len(),
                entries.len(),
                entries.len() * dim
            )));
        }
        if entries.len() > u32::MAX as usize {
            return Err(RetrievalError::Invalid(format!(
                "{} entries: at most {} fit one index",
                entries.len(),
                u32::MAX
            )));
        }
        if params.ef_construction == 0 || params.ef_search == 0 {
            return Err(RetrievalError::Invalid(
                "ef_construction and ef_search must be at least 1".into(),
            ));
        }
        let mut seen = HashSet::with_capacity(entries.len());
        for e in &entries {
            if !seen.insert(e.id.as_str()) {
                return Err(RetrievalError::Invalid(format!(
                    "duplicate id {} in the index entries",
                    e.id
                )));
            }
        }
        embeddings
            .par_chunks_mut(dim)
            .zip(entries.par_iter())
            .try_for_each(|(v, e)| normalise(v, &e.id))?;
        let rows = Arc::new(Rows {
            dim,
            data: embeddings,
        });
        let points: Vec<RowPoint> = (0..entries.len() as u32)
            .map(|row| RowPoint {
                rows: rows.clone(),
                row,
            })
            .collect();
        let total = points.len() as u64;
        let bar = indicatif_017::ProgressBar::hidden();
        let builder = Builder::default()
            .ef_construction(params.ef_construction)
            .ef_search(params.ef_search)
            .seed(params.seed)
            .progress(bar.clone());
        let done = std::sync::atomic::AtomicBool::new(false);
        let (graph, _ids) = std::thread::scope(|scope| {
            let poller = scope.spawn(|| {
                let mut last = None;
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    let pos = bar.position().min(total);
                    if last != Some(pos) {
                        progress(pos, total);
                        last = Some(pos);
                    }
                    std::thread::park_timeout(std::time::Duration::from_secs(1));
                }
            });
            let built = builder.build_hnsw(points);
            done.store(true, std::sync::atomic::Ordering::Release);
            // Wake the poller so a small build does not wait out its second.
            poller.thread().unpark();
            built
        });
        progress(total, total);
        let card = IndexCard {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            model: model.into(),
            model_fingerprint: model_fingerprint.into(),
            embed_dim: dim,
            count: entries.len(),
            metric: "cosine".into(),
            ann: AnnCard {
                algorithm: "HNSW (Malkov & Yashunin, TPAMI 2018)".into(),
                implementation: "instant-distance 0.6.1".into(),
                m: HNSW_M,
                m_layer0: 2 * HNSW_M,
                ef_construction: params.ef_construction,
                ef_search: params.ef_search,
                seed: params.seed,
            },
        };
        Ok(EmbeddingIndex {
            card,
            entries,
            rows,
            graph,
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn dim(&self) -> usize {
        self.rows.dim
    }
    /// The normalised embedding of row `i`.
    pub fn embedding(&self, i: usize) -> &[f32] {
        self.rows.row(i)
    }
    /// Bytes of the embedding matrix (the graph comes on top: about
    /// `count * (2M * 4 + 16)` bytes for layer 0).
    pub fn embedding_bytes(&self) -> usize {
        self.rows.data.len() * 4
    }

    fn query_vector(&self, query: &[f32]) -> Result<Vec<f32>> {
        if query.len() != self.dim() {
            return Err(RetrievalError::Invalid(format!(
                "the query has dimension {}, the index {}",
                query.len(),
                self.dim()
            )));
        }
        let mut q = query.to_vec();
        normalise(&mut q, "query")?;
        Ok(q)
    }

    /// Exact search: the `k` rows of highest cosine similarity, ties by row.
    pub fn search_exact(&self, query: &[f32], k: usize) -> Result<Vec<Hit>> {
        let q = self.query_vector(query)?;
        let scores: Vec<f32> = self
            .rows
            .data
            .par_chunks(self.dim())
            .with_min_len(1024)
            .map(|r| dot(&q, r))
            .collect();
        Ok(top_k(scores, k))
    }

    /// Exact search of many queries (`[n, dim]` row-major), one rayon task per query.
    pub fn search_exact_batch(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<Hit>>> {
        queries
            .par_chunks(self.dim().max(1))
            .map(|q| {
                let q = self.query_vector(q)?;
                let scores = self.rows.data.chunks(self.dim()).map(|r| dot(&q, r));
                Ok(top_k(scores.collect(), k))
            })
            .collect()
    }

    /// Approximate search with the HNSW graph: at most `min(k, ef_search)` hits, scores
    /// recomputed exactly, in the same order as exact search.
    pub fn search_ann(&self, query: &[f32], k: usize) -> Result<Vec<Hit>> {
        let q = self.query_vector(query)?;
        let qp = RowPoint {
            rows: Arc::new(Rows {
                dim: q.len(),
                data: q,
            }),
            row: 0,
        };
        // One search state per thread, reused: its visited set is a byte per indexed row,
        // which a fresh state would allocate and zero for every query (1 MB at a million).
        let mut hits: Vec<Hit> = SEARCH_STATE.with(|state| {
            let mut search = state.borrow_mut();
            self.graph
                .search(&qp, &mut search)
                .map(|item| {
                    let row = item.point.row as usize;
                    Hit {
                        row,
                        score: dot(qp.vector(), self.rows.row(row)),
                    }
                })
                .collect()
        });
        hits.sort_by(hit_order);
        hits.truncate(k);
        Ok(hits)
    }

    /// ANN search of many queries in parallel.
    pub fn search_ann_batch(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<Hit>>> {
        queries
            .par_chunks(self.dim().max(1))
            .map(|q| self.search_ann(q, k))
            .collect()
    }

    /// Errors unless `fingerprint` is the fingerprint the index was built with;
    /// `index_dir` and `model` are named in the error.
    pub fn check_model(&self, index_dir: &Path, model: &str, fingerprint: &str) -> Result<()> {
        if self.card.model_fingerprint != fingerprint {
            return Err(RetrievalError::ModelMismatch {
                index: index_dir.to_path_buf(),
                index_model: self.card.model.clone(),
                index_fingerprint: self.card.model_fingerprint.clone(),
                query_model: model.into(),
                query_fingerprint: fingerprint.into(),
            });
        }
        Ok(())
    }

    /// Writes the index directory `dir` atomically: everything goes to a temporary
    /// sibling directory, which is then renamed over `dir` (an existing index there is
    /// replaced only once the new one is complete).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let name = dir
            .file_name()
            .ok_or_else(|| file_err(dir, "an index directory needs a name"))?
            .to_string_lossy()
            .into_owned();
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if dir.exists() && !dir.join("card.json").is_file() {
            return Err(file_err(
                dir,
                "exists and is not a medvlm index (no card.json); refusing to replace it",
            ));
        }
        std::fs::create_dir_all(&parent).map_err(|e| file_err(&parent, e))?;
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| file_err(&tmp, e))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| file_err(&tmp, e))?;
        let result = self.write_files(&tmp);
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        if dir.exists() {
            std::fs::rename(dir, &old).map_err(|e| file_err(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| file_err(dir, e))?;
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| file_err(&old, e))?;
        }
        medvlm_io::atomic::sync_dir(&parent).map_err(|e| file_err(&parent, e))?;
        Ok(())
    }

    fn write_files(&self, dir: &Path) -> Result<()> {
        let json = |name: &str, v: &dyn erased_json::Json| -> Result<()> {
            let p = dir.join(name);
            let f = std::fs::File::create(&p).map_err(|e| file_err(&p, e))?;
            let mut w = BufWriter::new(f);
            v.write(&mut w).map_err(|e| file_err(&p, e))?;
            w.flush().map_err(|e| file_err(&p, e))?;
            w.get_ref().sync_all().map_err(|e| file_err(&p, e))
        };
        json("card.json", &self.card)?;
        json("entries.json", &self.entries)?;
        json("hnsw.json", &self.graph)?;
        let p = dir.join("embeddings.safetensors");
        let bytes: Vec<u8> = self
            .rows
            .data
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            vec![self.len(), self.dim()],
            &bytes,
        )
        .map_err(|e| file_err(&p, e))?;
        let buf =
            safetensors::serialize([("embeddings", view)], None).map_err(|e| file_err(&p, e))?;
        std::fs::write(&p, buf).map_err(|e| file_err(&p, e))?;
        Ok(())
    }

    /// Reads an index directory written by [`EmbeddingIndex::save`]; every inconsistency
    /// (format, shapes, counts) is an error naming the file.
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(file_err(dir, "no such index directory"));
        }
        let card_path = dir.join("card.json");
        let card: IndexCard = read_json(&card_path)?;
        if card.format != FORMAT || card.format_version != FORMAT_VERSION {
            return Err(file_err(
                &card_path,
                format!(
                    "format {} version {} is not {FORMAT} version {FORMAT_VERSION}",
                    card.format, card.format_version
                ),
            ));
        }
        let entries_path = dir.join("entries.json");
        let entries: Vec<Entry> = read_json(&entries_path)?;
        if entries.len() != card.count {
            return Err(file_err(
                &entries_path,
                format!("{} entries, the card says {}", entries.len(), card.count),
            ));
        }
        let emb_path = dir.join("embeddings.safetensors");
        let data = read_f32_tensor(&emb_path, "embeddings", Some((card.count, card.embed_dim)))?.1;
        let rows = Arc::new(Rows {
            dim: card.embed_dim,
            data,
        });
        let graph_path = dir.join("hnsw.json");
        let f = std::fs::File::open(&graph_path).map_err(|e| file_err(&graph_path, e))?;
        LOADING_ROWS.with(|r| *r.borrow_mut() = Some(rows.clone()));
        let graph: std::result::Result<Hnsw<RowPoint>, _> =
            serde_json::from_reader(BufReader::new(f));
        LOADING_ROWS.with(|r| *r.borrow_mut() = None);
        let graph = graph.map_err(|e| file_err(&graph_path, e))?;
        if graph.iter().count() != card.count {
            return Err(file_err(
                &graph_path,
                format!(
                    "the graph has {} points, the card says {}",
                    graph.iter().count(),
                    card.count
                ),
            ));
        }
        Ok(EmbeddingIndex {
            card,
            entries,
            rows,
            graph,
        })
    }
}

/// Reads a JSON file into `T`, naming the file on error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let f = std::fs::File::open(path).map_err(|e| file_err(path, e))?;
    serde_json::from_reader(BufReader::new(f)).map_err(|e| file_err(path, e))
}

/// Reads tensor `name` of a safetensors file as f32 (f32, f16 are not accepted: medvlm
/// writes f32), checking a 2-D shape when `expect` is given. Returns `(shape, values)`.
pub fn read_f32_tensor(
    path: &Path,
    name: &str,
    expect: Option<(usize, usize)>,
) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| file_err(path, e))?;
    let t = st
        .tensor(name)
        .map_err(|_| file_err(path, format!("no tensor named {name}")))?;
    if t.dtype() != safetensors::Dtype::F32 {
        return Err(file_err(
            path,
            format!("tensor {name} is {:?}, expected F32", t.dtype()),
        ));
    }
    let shape = t.shape().to_vec();
    if shape.len() != 2 {
        return Err(file_err(
            path,
            format!("tensor {name} has shape {shape:?}, expected [count, dim]"),
        ));
    }
    if let Some((n, d)) = expect {
        if shape != [n, d] {
            return Err(file_err(
                path,
                format!("tensor {name} has shape {shape:?}, expected [{n}, {d}]"),
            ));
        }
    }
    let values = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((shape, values))
}

/// Recall@k of approximate results against exact ones: the mean over queries of
/// |ANN top-k ∩ exact top-k| / |exact top-k| (rows compared, not scores).
pub fn recall_at_k(exact: &[Vec<Hit>], approx: &[Vec<Hit>], k: usize) -> f64 {
    if exact.is_empty() {
        return 0.0;
    }
    let mut total = 0.0;
    for (e, a) in exact.iter().zip(approx) {
        let truth: HashSet<usize> = e.iter().take(k).map(|h| h.row).collect();
        if truth.is_empty() {
            continue;
        }
        let found = a.iter().take(k).filter(|h| truth.contains(&h.row)).count();
        total += found as f64 / truth.len() as f64;
    }
    total / exact.len() as f64
}

/// Object-safe JSON writing for the heterogeneous files of an index directory.
mod erased_json {
    pub trait Json {
        fn write(&self, w: &mut dyn std::io::Write) -> serde_json::Result<()>;
    }
    impl<T: serde::Serialize> Json for T {
        fn write(&self, w: &mut dyn std::io::Write) -> serde_json::Result<()> {
            serde_json::to_writer(w, self)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both dot products against an f64 sum, at lengths around the 8- and 16-wide steps.
    #[test]
    fn dot_matches_an_f64_sum_at_every_length() {
        let mut rng = synthetic::SplitMix64::new(9);
        for n in [0, 1, 7, 8, 15, 16, 17, 31, 33, 512, 515] {
            let a: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let tol = 1e-5 * (1.0 + n as f64);
            for (name, got) in [("dot", dot(&a, &b)), ("portable", dot_portable(&a, &b))] {
                assert!(
                    (got as f64 - exact).abs() < tol,
                    "{name} at length {n}: {got} vs {exact}"
                );
            }
        }
    }

    /// Every k, both paths of `top_k`, against a full sort; ties broken by row; the result
    /// holds no more than k hits of memory.
    #[test]
    fn top_k_matches_a_full_sort_and_keeps_only_k_hits() {
        let mut rng = synthetic::SplitMix64::new(3);
        // Coarse scores so ties occur.
        let scores: Vec<f32> = (0..2000)
            .map(|_| (rng.uniform() * 50.0).floor() as f32)
            .collect();
        let mut all: Vec<Hit> = scores
            .iter()
            .enumerate()
            .map(|(row, &score)| Hit { row, score })
            .collect();
        all.sort_by(hit_order);
        for k in [0, 1, 2, 10, SMALL_K, SMALL_K + 1, 1999, 2000, 5000] {
            let got = top_k(scores.clone(), k);
            assert_eq!(got, all[..k.min(2000)].to_vec(), "k = {k}");
            assert!(
                got.capacity() <= k.min(2000) + 1,
                "k = {k}: {}",
                got.capacity()
            );
        }
    }
}
