//! Cross-modal retrieval recall@K from an image-text similarity matrix.
//!
//! Recall@K (as reported for CLIP, Radford et al. 2021, and ROCO/MIMIC retrieval benchmarks)
//! is the fraction of queries for which at least one correct item is among the K most similar
//! items. Several correct matches per query are allowed (e.g. several reports per image).
//! Ties are resolved pessimistically: the rank of the best correct item is
//! `1 + #(incorrect items with similarity >= its similarity)`, so a constant similarity
//! matrix does not score perfectly. Queries without any correct item cannot be scored; they
//! are counted in `skipped_queries`, never silently dropped.

use serde::{Deserialize, Serialize};

use crate::error::{check_finite, check_len, EvalError, Result};

/// Recall@K values for one direction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecallAtK {
    /// `(K, recall)` pairs in the order the Ks were requested.
    pub recall: Vec<(usize, f64)>,
    /// Mean (1-based) rank of the best correct item.
    pub mean_rank: f64,
    /// Number of scored queries.
    pub queries: usize,
    /// Number of queries without a correct item (not scored).
    pub skipped_queries: usize,
}

impl RecallAtK {
    /// Recall at `k`, if it was requested.
    pub fn at(&self, k: usize) -> Option<f64> {
        self.recall.iter().find(|(kk, _)| *kk == k).map(|(_, r)| *r)
    }
}

/// Image-to-text and text-to-image recall.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrievalReport {
    /// Queries are images, items are texts (rows of the similarity matrix).
    pub image_to_text: RecallAtK,
    /// Queries are texts, items are images (columns).
    pub text_to_image: RecallAtK,
}

/// The Ks reported by default.
pub const DEFAULT_KS: [usize; 3] = [1, 5, 10];

fn recall_one_direction(
    n_queries: usize,
    n_items: usize,
    sim: impl Fn(usize, usize) -> f32,
    relevant: &[Vec<usize>],
    ks: &[usize],
) -> RecallAtK {
    let mut hits = vec![0usize; ks.len()];
    let mut rank_sum = 0.0;
    let mut scored = 0usize;
    let mut is_rel = vec![false; n_items];
    for (q, rel) in relevant.iter().enumerate().take(n_queries) {
        if rel.is_empty() {
            continue;
        }
        for &i in rel {
            is_rel[i] = true;
        }
        let best = rel
            .iter()
            .map(|&i| sim(q, i))
            .fold(f32::NEG_INFINITY, f32::max);
        let rank = 1
            + (0..n_items)
                .filter(|&i| !is_rel[i] && sim(q, i) >= best)
                .count();
        for &i in rel {
            is_rel[i] = false;
        }
        scored += 1;
        rank_sum += rank as f64;
        for (h, &k) in hits.iter_mut().zip(ks) {
            if rank <= k {
                *h += 1;
            }
        }
    }
    let denom = scored.max(1) as f64;
    RecallAtK {
        recall: ks
            .iter()
            .zip(&hits)
            .map(|(&k, &h)| (k, h as f64 / denom))
            .collect(),
        mean_rank: rank_sum / denom,
        queries: scored,
        skipped_queries: n_queries - scored,
    }
}

/// Recall@K in both directions. `similarity` is row-major `n_images x n_texts`;
/// `positives` lists the correct `(image, text)` pairs.
pub fn retrieval_recall(
    similarity: &[f32],
    n_images: usize,
    n_texts: usize,
    positives: &[(usize, usize)],
    ks: &[usize],
) -> Result<RetrievalReport> {
    check_len("similarity", similarity.len(), n_images * n_texts)?;
    check_finite("similarity", similarity)?;
    if n_images == 0 || n_texts == 0 {
        return Err(EvalError::Empty("similarity matrix has no rows or columns"));
    }
    if ks.contains(&0) {
        return Err(EvalError::InvalidParameter {
            name: "ks",
            reason: "K must be at least 1".into(),
        });
    }
    let mut texts_of_image = vec![Vec::new(); n_images];
    let mut images_of_text = vec![Vec::new(); n_texts];
    for &(i, t) in positives {
        if i >= n_images {
            return Err(EvalError::IndexOutOfRange {
                what: "positive image",
                index: i,
                num_classes: n_images,
            });
        }
        if t >= n_texts {
            return Err(EvalError::IndexOutOfRange {
                what: "positive text",
                index: t,
                num_classes: n_texts,
            });
        }
        if !texts_of_image[i].contains(&t) {
            texts_of_image[i].push(t);
            images_of_text[t].push(i);
        }
    }
    let image_to_text = recall_one_direction(
        n_images,
        n_texts,
        |q, i| similarity[q * n_texts + i],
        &texts_of_image,
        ks,
    );
    let text_to_image = recall_one_direction(
        n_texts,
        n_images,
        |q, i| similarity[i * n_texts + q],
        &images_of_text,
        ks,
    );
    Ok(RetrievalReport {
        image_to_text,
        text_to_image,
    })
}

/// The usual paired case: image `i` matches text `i` only (square matrix).
pub fn retrieval_recall_paired(
    similarity: &[f32],
    n: usize,
    ks: &[usize],
) -> Result<RetrievalReport> {
    let positives: Vec<(usize, usize)> = (0..n).map(|i| (i, i)).collect();
    retrieval_recall(similarity, n, n, &positives, ks)
}

/// Recall@K of a random ranking when a query's correct items are the items with the same
/// text as it (the chance level of text-to-image recall@K, as the quickstart reports it): the
/// mean over queries of `1 - prod_{j < K} (n - m - j) / (n - j)`, `m` the items sharing the
/// query's text, `n` all items.
pub fn random_recall_at_k(texts: &[&str], k: usize) -> f64 {
    let n = texts.len();
    if n == 0 {
        return 0.0;
    }
    let mut counts: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for t in texts {
        *counts.entry(t).or_default() += 1;
    }
    texts
        .iter()
        .map(|t| {
            let m = counts[t];
            let mut p_miss = 1.0;
            for j in 0..k.min(n) {
                p_miss *= (n - m).saturating_sub(j) as f64 / (n - j) as f64;
            }
            1.0 - p_miss
        })
        .sum::<f64>()
        / n as f64
}
