//! BLEU-1..4, ROUGE-L and CIDEr-D against pycocoevalcap's scorers on the same tokens
//! (`tools/make_report_metrics_reference.py` wrote the fixture), and the tokenizer against the
//! tokens the script gave the scorers.

use medvlm_eval::report_metrics::{
    bleu, cider_d_per_report, rouge_l_per_report, score_reports, tokenize,
};

fn fixture() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/report_metrics_reference.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn close(a: f64, b: f64, what: &str) {
    assert!(
        (a - b).abs() <= 1e-9 * b.abs().max(1.0),
        "{what}: {a} vs {b}"
    );
}

#[test]
fn scores_match_pycocoevalcap_on_the_reference_corpus() {
    let f = fixture();
    let corpus = f["corpus"].as_array().unwrap();
    let candidates: Vec<String> = corpus
        .iter()
        .map(|c| c["candidate"].as_str().unwrap().to_string())
        .collect();
    let references: Vec<Vec<String>> = corpus.iter().map(|c| strings(&c["references"])).collect();

    // Tokens as the script gave them to the scorers.
    for (i, t) in f["tokens"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            tokenize(&candidates[i]),
            strings(&t["candidate"]),
            "candidate {i}"
        );
        for (j, r) in t["references"].as_array().unwrap().iter().enumerate() {
            assert_eq!(tokenize(&references[i][j]), strings(r), "reference {i}.{j}");
        }
    }

    let scores = score_reports(&candidates, &references).unwrap();
    assert_eq!(scores.n, corpus.len());
    for k in 0..4 {
        close(
            scores.bleu[k],
            f["bleu"][k].as_f64().unwrap(),
            &format!("BLEU-{}", k + 1),
        );
    }
    close(scores.rouge_l, f["rouge_l"].as_f64().unwrap(), "ROUGE-L");
    close(scores.cider_d, f["cider_d"].as_f64().unwrap(), "CIDEr-D");

    let cand: Vec<Vec<String>> = candidates.iter().map(|c| tokenize(c)).collect();
    let refs: Vec<Vec<Vec<String>>> = references
        .iter()
        .map(|rs| rs.iter().map(|r| tokenize(r)).collect())
        .collect();
    let rouge = rouge_l_per_report(&cand, &refs).unwrap();
    let cider = cider_d_per_report(&cand, &refs).unwrap();
    for i in 0..cand.len() {
        close(
            rouge[i],
            f["rouge_l_each"][i].as_f64().unwrap(),
            &format!("ROUGE-L {i}"),
        );
        close(
            cider[i],
            f["cider_d_each"][i].as_f64().unwrap(),
            &format!("CIDEr-D {i}"),
        );
    }
    // The corpus BLEU is not the mean of per-report BLEU: one report alone scores differently.
    let alone = bleu(&cand[3..4], &refs[3..4]).unwrap();
    assert!((alone[0] - scores.bleu[0]).abs() > 0.05);
}
