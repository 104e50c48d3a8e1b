//! The feature cache: compute once, reuse, invalidate on mismatch.

use std::cell::Cell;

use candle_core::{Device, Tensor};
use medvlm_adapt::feature_cache::{
    fingerprint_files, hash_paths, CacheStatus, CachedFeatures, CachedLabels, FeatureCache,
    FeatureCacheError, FeatureCacheKey,
};

fn key(model: &str) -> FeatureCacheKey {
    FeatureCacheKey {
        model_id: model.into(),
        dataset_hash: "0f".repeat(32),
        preprocessing: "resize 224 bicubic, centre crop, CLIP mean/std".into(),
        images_sha256: "1e".repeat(32),
    }
}

fn features(scale: f32) -> CachedFeatures {
    let v: Vec<f32> = (0..12).map(|i| i as f32 * scale - 3.0).collect();
    CachedFeatures {
        features: Tensor::from_vec(v, (4, 3), &Device::Cpu).unwrap(),
        labels: CachedLabels::MultiClass(vec![0, 1, 1, 2]),
        paths_sha256: hash_paths(&["a.png", "b.png", "c.png", "d.png"]),
    }
}

#[test]
fn computes_once_then_hits() {
    let dir = tempfile::tempdir().unwrap();
    let cache = FeatureCache::new(dir.path());
    let calls = Cell::new(0);
    let compute = || {
        calls.set(calls.get() + 1);
        Ok::<_, String>(features(0.5))
    };
    let (first, s1) = cache
        .load_or_compute(&key("clip-vit-b16"), compute)
        .unwrap();
    let (second, s2) = cache
        .load_or_compute(&key("clip-vit-b16"), compute)
        .unwrap();
    assert_eq!((s1, s2), (CacheStatus::Miss, CacheStatus::Hit));
    assert_eq!(calls.get(), 1);
    assert_eq!(
        first.features.to_vec2::<f32>().unwrap(),
        second.features.to_vec2::<f32>().unwrap()
    );
    assert_eq!(second.labels, CachedLabels::MultiClass(vec![0, 1, 1, 2]));
    assert_eq!(second.paths_sha256, first.paths_sha256);

    // Another model is another file and another computation.
    let (_, s3) = cache.load_or_compute(&key("biomedclip"), compute).unwrap();
    assert_eq!(s3, CacheStatus::Miss);
    assert_eq!(calls.get(), 2);
    assert_ne!(
        cache.path_for(&key("clip-vit-b16")),
        cache.path_for(&key("biomedclip"))
    );
    // Names carry the model and the key hash; no temporary files remain.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names
            .iter()
            .all(|n| n.starts_with("features-") && n.ends_with(".safetensors")),
        "{names:?}"
    );
}

#[test]
fn corrupted_or_foreign_files_are_invalidated_and_recomputed() {
    let dir = tempfile::tempdir().unwrap();
    let cache = FeatureCache::new(dir.path());
    let k = key("clip-vit-b16");
    let path = cache.store(&k, &features(0.5)).unwrap();

    // Flip one byte of the tensor data (the last byte of the file).
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let err = cache.load(&k).unwrap_err();
    assert!(matches!(err, FeatureCacheError::Format { .. }));
    assert!(err.to_string().contains("content hash mismatch"), "{err}");
    let (fresh, status) = cache
        .load_or_compute(&k, || Ok::<_, String>(features(2.0)))
        .unwrap();
    assert!(
        matches!(status, CacheStatus::Invalidated(ref r) if r.contains("content hash")),
        "{status:?}"
    );
    assert_eq!(fresh.features.to_vec2::<f32>().unwrap()[0][1], -1.0);
    assert_eq!(
        cache
            .load_or_compute(&k, || Err::<CachedFeatures, _>("must not recompute"))
            .unwrap()
            .1,
        CacheStatus::Hit
    );

    // A file written for another key under this key's name is refused.
    let other = key("other-model");
    std::fs::copy(cache.store(&other, &features(1.0)).unwrap(), &path).unwrap();
    let err = cache.load(&k).unwrap_err().to_string();
    assert!(err.contains("key hash differs"), "{err}");
}

#[test]
fn multilabel_labels_round_trip_and_bad_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cache = FeatureCache::new(dir.path());
    let ml = CachedFeatures {
        labels: CachedLabels::MultiLabel(vec![
            vec![true, false],
            vec![false, false],
            vec![true, true],
            vec![false, true],
        ]),
        ..features(1.0)
    };
    cache.store(&key("m"), &ml).unwrap();
    assert_eq!(cache.load(&key("m")).unwrap().unwrap().labels, ml.labels);

    let short = CachedFeatures {
        labels: CachedLabels::MultiClass(vec![0, 1]),
        ..features(1.0)
    };
    let err = cache.store(&key("m"), &short).unwrap_err().to_string();
    assert!(err.contains("4 feature rows but 2 labels"), "{err}");
    // A failing computation is reported, not cached.
    let err = cache
        .load_or_compute(&key("n"), || Err::<CachedFeatures, _>("encoder crashed"))
        .unwrap_err();
    // The cause is kept as the error's source, so a reporter shows the whole chain.
    assert_eq!(err.to_string(), "computing features failed");
    let cause = std::error::Error::source(&err).expect("source").to_string();
    assert!(cause.contains("encoder crashed"), "{cause}");
    assert!(cache.load(&key("n")).unwrap().is_none());
}

#[test]
fn image_fingerprint_sees_content_size_time_and_presence() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.png");
    let b = dir.path().join("b.png");
    std::fs::write(&a, b"first image bytes").unwrap();
    std::fs::write(&b, b"second").unwrap();
    let t = std::fs::metadata(&a).unwrap().modified().unwrap();
    let fp0 = fingerprint_files(&[&a, &b]);
    assert_eq!(fp0, fingerprint_files(&[&a, &b]), "deterministic");
    assert_ne!(fp0, fingerprint_files(&[&b, &a]), "order-sensitive");

    // Same size and the same modification time, other bytes (as `cp -p` leaves it).
    std::fs::write(&a, b"first IMAGE bytes").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&a)
        .unwrap()
        .set_modified(t)
        .unwrap();
    assert_eq!(std::fs::metadata(&a).unwrap().modified().unwrap(), t);
    let fp1 = fingerprint_files(&[&a, &b]);
    assert_ne!(fp0, fp1, "content change with size and time kept");

    // Only the modification time changes.
    std::fs::File::options()
        .write(true)
        .open(&a)
        .unwrap()
        .set_modified(t + std::time::Duration::from_secs(7))
        .unwrap();
    assert_ne!(fp1, fingerprint_files(&[&a, &b]), "time change");

    // A missing file is part of the fingerprint, and its appearance changes it.
    let c = dir.path().join("c.png");
    let missing = fingerprint_files(&[&a, &c]);
    std::fs::write(&c, b"").unwrap();
    assert_ne!(missing, fingerprint_files(&[&a, &c]));
}

#[test]
fn changed_images_at_the_same_paths_invalidate_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let cache = FeatureCache::new(dir.path());
    let old = key("clip-vit-b16");
    let new = FeatureCacheKey {
        images_sha256: "2f".repeat(32),
        ..old.clone()
    };
    // Same model, manifest and preprocessing: one file, whatever the image contents.
    assert_eq!(cache.path_for(&old), cache.path_for(&new));
    cache.store(&old, &features(0.5)).unwrap();
    let err = cache.load(&new).unwrap_err().to_string();
    assert!(err.contains("image files changed"), "{err}");
    let (fresh, status) = cache
        .load_or_compute(&new, || Ok::<_, String>(features(2.0)))
        .unwrap();
    assert!(
        matches!(status, CacheStatus::Invalidated(ref r) if r.contains("image files changed")),
        "{status:?}"
    );
    assert_eq!(fresh.features.to_vec2::<f32>().unwrap()[0][1], -1.0);
    // The new file replaced the old one: the old key is now the stale one.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    assert!(cache.load(&old).is_err());
    assert_eq!(
        cache
            .load_or_compute(&new, || Err::<CachedFeatures, _>("must not recompute"))
            .unwrap()
            .1,
        CacheStatus::Hit
    );
}
