//! `medvlm embed --shard`, `medvlm index build` and `medvlm search` end to end on a tiny
//! phantom set with the tiny CLIP fixture (random weights): two shards merged give the
//! same index as a one-go build, an indexed image finds itself first with score ~1, and
//! a missing shard or another model are clear errors.

use std::path::Path;

mod common;
use common::{arg, fails, model, ok, run};

fn phantom_images(dir: &Path) -> std::path::PathBuf {
    let out = dir.join("ph");
    ok(&run(&[
        "phantoms",
        "generate",
        "--n",
        "6",
        "--seed",
        "3",
        "--out",
        arg(&out),
    ]));
    out.join("images")
}

#[test]
fn sharded_embed_merge_and_search() {
    let tmp = tempfile::tempdir().unwrap();
    let images = phantom_images(tmp.path());
    let clip = model();
    let shards = tmp.path().join("shards");
    for i in 0..2 {
        let out = shards.join(format!("shard-{i}.safetensors"));
        let s = ok(&run(&[
            "embed",
            "--model",
            arg(&clip),
            "--images",
            arg(&images),
            "--out",
            arg(&out),
            "--shard",
            &format!("{i}/2"),
        ]));
        assert!(s.contains(&format!("shard {i}/2: 3 of 6")), "{s}");
    }
    let merged = tmp.path().join("idx-merged");
    ok(&run(&[
        "index",
        "build",
        "--from-shards",
        arg(&shards),
        "--out",
        arg(&merged),
    ]));
    let once = tmp.path().join("idx-once");
    ok(&run(&[
        "index",
        "build",
        "--model",
        arg(&clip),
        "--images",
        arg(&images),
        "--out",
        arg(&once),
    ]));
    // Same ids in the same order, same embeddings bit for bit.
    for f in ["entries.json", "embeddings.safetensors"] {
        assert_eq!(
            std::fs::read(merged.join(f)).unwrap(),
            std::fs::read(once.join(f)).unwrap(),
            "{f} differs"
        );
    }
    let card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(merged.join("card.json")).unwrap()).unwrap();
    assert_eq!(card["count"], 6);
    assert_eq!(card["ann"]["ef_search"], 100);

    // Searching by an indexed image returns it first, score ~1 (HNSW and exact).
    let mut pngs: Vec<_> = std::fs::read_dir(&images)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    pngs.sort();
    let query = &pngs[4];
    for exact in [false, true] {
        let mut a = vec![
            "search",
            "--index",
            arg(&merged),
            "--image",
            arg(query),
            "--k",
            "3",
        ];
        if exact {
            a.push("--exact");
        }
        let s = ok(&run(&a));
        let first: Vec<&str> = s.lines().nth(1).unwrap().split('\t').collect();
        assert_eq!(first[0], "1", "{s}");
        assert!((first[1].parse::<f32>().unwrap() - 1.0).abs() < 1e-4, "{s}");
        assert_eq!(first[3], query.display().to_string(), "{s}");
        assert_eq!(s.lines().count(), 4, "{s}");
    }
    // Text query: the text tower runs and returns k studies.
    let s = ok(&run(&[
        "search",
        "--index",
        arg(&merged),
        "--text",
        "a chest x-ray",
        "--k",
        "2",
    ]));
    assert_eq!(s.lines().count(), 3, "{s}");

    // A missing shard is named.
    std::fs::remove_file(shards.join("shard-1.safetensors")).unwrap();
    let e = fails(&run(&[
        "index",
        "build",
        "--from-shards",
        arg(&shards),
        "--out",
        arg(&tmp.path().join("x")),
    ]));
    assert!(e.contains("1/2") && e.contains("missing"), "{e}");
    // Another model than the index's is an error naming both.
    let siglip = clip.parent().unwrap().join("siglip");
    let e = fails(&run(&[
        "search",
        "--index",
        arg(&merged),
        "--text",
        "x",
        "--model",
        arg(&siglip),
    ]));
    assert!(e.contains("siglip") && e.contains("clip"), "{e}");
}
