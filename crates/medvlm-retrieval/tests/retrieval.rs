//! Exact search against a hand-written brute force, HNSW recall against exact search,
//! save/load round trip, shard merge and its errors.

use medvlm_retrieval::shards::{self, EmbeddingsFile, EmbeddingsSidecar, ShardSpec};
use medvlm_retrieval::synthetic::{clustered, SplitMix64};
use medvlm_retrieval::{recall_at_k, EmbeddingIndex, Entry, HnswParams, RetrievalError};

fn entries(n: usize) -> Vec<Entry> {
    (0..n)
        .map(|i| Entry::from_path(format!("img/{i:05}.png")))
        .collect()
}

fn random(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut r = SplitMix64::new(seed);
    (0..n * dim).map(|_| r.normal() as f32).collect()
}

fn build(values: Vec<f32>, dim: usize) -> EmbeddingIndex {
    let n = values.len() / dim;
    EmbeddingIndex::build("m", "fp", entries(n), values, dim, HnswParams::default()).unwrap()
}

#[test]
fn exact_search_equals_hand_brute_force_with_ties() {
    let dim = 16;
    let mut v = random(300, dim, 1);
    // Rows 10, 20 and 30 are the same vector (a tie); row 40 is it scaled (same cosine).
    let dup: Vec<f32> = v[10 * dim..11 * dim].to_vec();
    for r in [20, 30] {
        v[r * dim..(r + 1) * dim].copy_from_slice(&dup);
    }
    for j in 0..dim {
        v[40 * dim + j] = dup[j] * 3.0;
    }
    let idx = build(v.clone(), dim);
    let queries = random(20, dim, 2);
    let mut qs: Vec<Vec<f32>> = queries.chunks(dim).map(|q| q.to_vec()).collect();
    qs.push(dup.clone());
    for q in &qs {
        // Hand brute force in f64: cosine of every row, sort by score then row.
        let qn = q.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let mut want: Vec<(f64, usize)> = v
            .chunks(dim)
            .enumerate()
            .map(|(i, r)| {
                let rn = r.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                let d: f64 = r.iter().zip(q).map(|(a, b)| *a as f64 * *b as f64).sum();
                (d / rn / qn, i)
            })
            .collect();
        want.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
        let got = idx.search_exact(q, 10).unwrap();
        assert_eq!(got.len(), 10);
        for (g, w) in got.iter().zip(&want) {
            assert!((g.score as f64 - w.0).abs() < 1e-5, "{g:?} vs {w:?}");
        }
        // Rows agree except where f32 rounding could swap near-equal scores.
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            if g.row != w.1 {
                assert!((want[i].0 - w.0).abs() < 1e-5 && (g.score as f64 - w.0).abs() < 1e-5);
            }
        }
    }
    // The duplicated query: the exactly tied rows 10, 20, 30 come in row order, and with
    // row 40 (the same direction, normalised from another length: equal up to rounding)
    // they are the top 4, all with score ~1.
    let got = idx.search_exact(&dup, 4).unwrap();
    let rows: Vec<usize> = got.iter().map(|h| h.row).collect();
    let tied: Vec<usize> = rows.iter().copied().filter(|&r| r != 40).collect();
    assert_eq!(tied, vec![10, 20, 30], "{rows:?}");
    assert!(rows.contains(&40), "{rows:?}");
    assert!(got.iter().all(|h| (h.score - 1.0).abs() < 1e-5), "{got:?}");
    // The batched path gives the same hits.
    let batch = idx.search_exact_batch(&queries, 10).unwrap();
    for (q, b) in queries.chunks(dim).zip(&batch) {
        assert_eq!(&idx.search_exact(q, 10).unwrap(), b);
    }
}

#[test]
fn hnsw_recall_at_10_is_at_least_095_on_5000_clustered_vectors() {
    let dim = 64;
    let base = clustered(5000, dim, 50, 1.0, 7, 0);
    let queries = clustered(200, dim, 50, 1.0, 7, 1);
    let idx = build(base, dim);
    let exact = idx.search_exact_batch(&queries, 10).unwrap();
    let ann = idx.search_ann_batch(&queries, 10).unwrap();
    let r10 = recall_at_k(&exact, &ann, 10);
    let r1 = recall_at_k(&exact, &ann, 1);
    assert!(r10 >= 0.95, "recall@10 {r10}");
    assert!(r1 >= 0.95, "recall@1 {r1}");
    // recall_at_k is not trivially 1: against shifted results it drops.
    let shifted: Vec<_> = exact.iter().map(|h| h[1..].to_vec()).collect();
    assert!(recall_at_k(&exact, &shifted, 1) < 0.01);
}

#[test]
fn save_load_round_trip_gives_identical_results() {
    let dim = 32;
    let base = clustered(2000, dim, 20, 1.0, 3, 0);
    let queries = clustered(50, dim, 20, 1.0, 3, 1);
    let idx = build(base, dim);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("index");
    idx.save(&p).unwrap();
    idx.save(&p).unwrap(); // replacing an existing index works
    let back = EmbeddingIndex::load(&p).unwrap();
    assert_eq!(back.card, idx.card);
    assert_eq!(back.entries, idx.entries);
    for i in 0..idx.len() {
        assert_eq!(back.embedding(i), idx.embedding(i));
    }
    assert_eq!(
        back.search_ann_batch(&queries, 10).unwrap(),
        idx.search_ann_batch(&queries, 10).unwrap()
    );
    assert_eq!(
        back.search_exact_batch(&queries, 10).unwrap(),
        idx.search_exact_batch(&queries, 10).unwrap()
    );
    // Only the index directory is left (no temporary siblings).
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("index")]);
    // A model other than the index's is an error naming both.
    let e = back
        .check_model(&p, "other-model", "fp2")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("other-model") && e.contains("fp2") && e.contains("fingerprint fp"),
        "{e}"
    );
    back.check_model(&p, "m", "fp").unwrap();
    // A directory that is not an index is not replaced.
    let other = dir.path().join("not-an-index");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("keep.txt"), b"x").unwrap();
    let e = idx.save(&other).unwrap_err().to_string();
    assert!(
        e.contains("not-an-index") && e.contains("not a medvlm index"),
        "{e}"
    );
    assert!(other.join("keep.txt").is_file());
    // A truncated embeddings file is an error naming it.
    std::fs::write(p.join("embeddings.safetensors"), b"junk").unwrap();
    let e = EmbeddingIndex::load(&p).unwrap_err().to_string();
    assert!(e.contains("embeddings.safetensors"), "{e}");
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let e = EmbeddingIndex::build("m", "f", entries(2), vec![1.0; 5], 3, HnswParams::default());
    assert!(matches!(e, Err(RetrievalError::Invalid(_))));
    let e = EmbeddingIndex::build("m", "f", entries(2), vec![0.0; 6], 3, HnswParams::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("img/00000.png") && e.contains("norm"), "{e}");
    let mut dup = entries(2);
    dup[1].id = dup[0].id.clone();
    let e =
        EmbeddingIndex::build("m", "f", dup, vec![1.0; 6], 3, HnswParams::default()).unwrap_err();
    assert!(e.to_string().contains("duplicate id"));
    let idx = build(vec![1.0; 6], 3);
    assert!(idx.search_exact(&[1.0, 0.0], 1).is_err());
    assert!(EmbeddingIndex::load(std::path::Path::new("/nonexistent/index")).is_err());
    assert!("3/3".parse::<ShardSpec>().is_err());
    assert!("1/0".parse::<ShardSpec>().is_err());
    assert!("x".parse::<ShardSpec>().is_err());
    assert_eq!(
        "2/4".parse::<ShardSpec>().unwrap(),
        ShardSpec { index: 2, count: 4 }
    );
}

fn shard_file(
    dir: &std::path::Path,
    name: &str,
    paths: &[String],
    values: Vec<f32>,
    dim: usize,
    fp: &str,
    shard: Option<ShardSpec>,
) -> std::path::PathBuf {
    let p = dir.join(format!("{name}.safetensors"));
    let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        vec![paths.len(), dim],
        &bytes,
    )
    .unwrap();
    std::fs::write(
        &p,
        safetensors::serialize([("image_embeds", view)], None).unwrap(),
    )
    .unwrap();
    let sc = EmbeddingsSidecar {
        model: "m".into(),
        model_fingerprint: Some(fp.into()),
        embed_dim: dim,
        images: paths.to_vec(),
        shard,
    };
    std::fs::write(shards::sidecar_path(&p), serde_json::to_vec(&sc).unwrap()).unwrap();
    p
}

#[test]
fn shard_merge_equals_building_at_once_and_names_missing_or_mismatched_files() {
    let dim = 8;
    let n = 23;
    let all_paths: Vec<String> = (0..n).map(|i| format!("img/{i:03}.png")).collect();
    let all = random(n, dim, 5);
    let dir = tempfile::tempdir().unwrap();
    let count = 3;
    let mut files = Vec::new();
    let rows: Vec<usize> = (0..n).collect();
    for i in 0..count {
        let spec = ShardSpec { index: i, count };
        let sel = shards::select(&rows, spec);
        assert!(sel.iter().all(|k| k % count == i));
        let paths: Vec<String> = sel.iter().map(|&k| all_paths[k].clone()).collect();
        let vals: Vec<f32> = sel
            .iter()
            .flat_map(|&k| all[k * dim..(k + 1) * dim].to_vec())
            .collect();
        files.push(shard_file(
            dir.path(),
            &format!("shard-{i}"),
            &paths,
            vals,
            dim,
            "fp",
            Some(spec),
        ));
    }
    let read: Vec<EmbeddingsFile> = shards::list_embeddings(dir.path())
        .unwrap()
        .iter()
        .map(|p| shards::read_embeddings(p).unwrap())
        .collect();
    let merged = shards::merge(&read).unwrap();
    let (e_all, v_all) = shards::sort_by_id(
        all_paths.iter().cloned().map(Entry::from_path).collect(),
        all.clone(),
        dim,
    );
    assert_eq!(merged.entries, e_all);
    assert_eq!(
        merged
            .values
            .iter()
            .map(|x| x.to_bits())
            .collect::<Vec<_>>(),
        v_all.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    let a = EmbeddingIndex::build(
        "m",
        "fp",
        merged.entries,
        merged.values,
        dim,
        HnswParams::default(),
    )
    .unwrap();
    let b = EmbeddingIndex::build("m", "fp", e_all, v_all, dim, HnswParams::default()).unwrap();
    for i in 0..n {
        assert_eq!(a.embedding(i), b.embedding(i));
    }

    // Missing shard 1: named.
    let without: Vec<_> = read
        .iter()
        .filter(|f| f.sidecar.shard.unwrap().index != 1)
        .cloned()
        .collect();
    let e = shards::merge(&without).unwrap_err().to_string();
    assert!(e.contains("1/3") && e.contains("missing"), "{e}");
    // Another model: the file is named.
    let other = shard_file(
        dir.path(),
        "other",
        &["x.png".into()],
        vec![1.0; dim],
        dim,
        "fp-other",
        Some(ShardSpec { index: 1, count: 3 }),
    );
    let mut mixed = without.clone();
    mixed.push(shards::read_embeddings(&other).unwrap());
    let e = shards::merge(&mixed).unwrap_err().to_string();
    assert!(
        e.contains("other.safetensors") && e.contains("fp-other"),
        "{e}"
    );
    // Another dimension: the file is named.
    let wide = shard_file(
        dir.path(),
        "wide",
        &["y.png".into()],
        vec![1.0; dim + 1],
        dim + 1,
        "fp",
        Some(ShardSpec { index: 1, count: 3 }),
    );
    let mut mixed = without.clone();
    mixed.push(shards::read_embeddings(&wide).unwrap());
    let e = shards::merge(&mixed).unwrap_err().to_string();
    assert!(
        e.contains("wide.safetensors") && e.contains("dimension 9"),
        "{e}"
    );
    // The same shard twice.
    let mut twice = read.clone();
    twice.push(read[0].clone());
    assert!(shards::merge(&twice)
        .unwrap_err()
        .to_string()
        .contains("shard 0/3"));
    // A sidecar whose image count disagrees with the tensor: named.
    let bad = dir.path().join("bad.safetensors");
    std::fs::copy(&files[0], &bad).unwrap();
    std::fs::write(
        shards::sidecar_path(&bad),
        br#"{"model":"m","embed_dim":8,"images":["a"]}"#,
    )
    .unwrap();
    let e = shards::read_embeddings(&bad).unwrap_err().to_string();
    assert!(e.contains("bad.safetensors") && e.contains("shape"), "{e}");
}

/// The graph build reports its progress: positions never go back, stay within the total,
/// and end at (total, total); the index equals one built without a reporter.
#[test]
fn graph_build_reports_progress_up_to_the_total() {
    let (n, dim) = (4000, 16);
    let values = clustered(n, dim, 10, 1.0, 3, 0);
    let seen = std::sync::Mutex::new(Vec::new());
    let index = EmbeddingIndex::build_with_progress(
        "m",
        "fp",
        entries(n),
        values.clone(),
        dim,
        HnswParams::default(),
        &|pos, total| seen.lock().unwrap().push((pos, total)),
    )
    .unwrap();
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.last(), Some(&(n as u64, n as u64)), "{seen:?}");
    assert!(
        seen.iter().all(|&(p, t)| t == n as u64 && p <= t),
        "{seen:?}"
    );
    assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "{seen:?}");
    let plain = build(values, dim);
    let queries = clustered(20, dim, 10, 1.0, 3, 1);
    assert_eq!(
        index.search_ann_batch(&queries, 5).unwrap(),
        plain.search_ann_batch(&queries, 5).unwrap()
    );
}
