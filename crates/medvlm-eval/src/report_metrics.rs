//! Language metrics of generated reports, computed as the COCO caption evaluation
//! (`pycocoevalcap`, the scripts R2Gen, PromptMRG and most report-generation papers report
//! with) computes them on tokenised text:
//!
//! * **BLEU-1..4** (Papineni et al., ACL 2002), corpus level: clipped n-gram counts and
//!   candidate lengths summed over the corpus, the reference length of each candidate the one
//!   closest to its length (ties: the shorter), the brevity penalty on the corpus totals, and
//!   the n-gram precisions smoothed by `(correct + 1e-15) / (guess + 1e-9)` as pycocoevalcap
//!   does (BLEU-n is the geometric mean of the precisions 1..n);
//! * **ROUGE-L** (Lin, 2004): per report, the longest common subsequence with each reference;
//!   the best precision and the best recall over the references (each maximised on its own),
//!   combined as `F = (1 + b^2) P R / (R + b^2 P)` with `b = 1.2`; the mean over reports;
//! * **CIDEr-D** (Vedantam et al., CVPR 2015), what pycocoevalcap calls CIDEr: tf-idf vectors
//!   of 1..4-grams with document frequencies over each report's reference set and
//!   `idf = log(N reports) - log(max(1, df))`, the candidate's weights clipped by the
//!   reference's, a Gaussian length penalty `exp(-(l_c - l_r)^2 / (2 * 6^2))`, the mean over
//!   n and over references, times 10; the mean over reports. As in pycocoevalcap the length
//!   in the penalty counts bigrams (one less than the words of a report of two or more words).
//!
//! METEOR is left out: its reference implementation is a Java program.
//!
//! Tokenisation ([`tokenize`]): lower case; the punctuation pycocoevalcap's PTB tokenizer
//! removes (`. , ; : ! ? ' " ( ) [ ] { }` and runs of dashes) split off and dropped;
//! hyphens and apostrophes inside a word kept. It differs from the PTB tokenizer on
//! possessives and contractions (PTB splits `patient's` into `patient 's`), which the phantom
//! reports do not use. `tools/make_report_metrics_reference.py` feeds the same tokens to
//! pycocoevalcap's scorers and the tests compare the values.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};

/// Lower-cased word tokens of a text, punctuation removed (see the module documentation).
pub fn tokenize(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    let mut out = Vec::new();
    for raw in lower.split_whitespace() {
        // Split at punctuation, keeping hyphens and apostrophes between letters or digits.
        let chars: Vec<char> = raw.chars().collect();
        let mut word = String::new();
        for (i, &c) in chars.iter().enumerate() {
            let inner = |c: char| c.is_alphanumeric();
            let keep = c.is_alphanumeric()
                || ((c == '-' || c == '\'')
                    && i > 0
                    && i + 1 < chars.len()
                    && inner(chars[i - 1])
                    && inner(chars[i + 1]))
                || !(c.is_ascii_punctuation() || c.is_whitespace());
            if keep {
                word.push(c);
            } else if !word.is_empty() {
                out.push(std::mem::take(&mut word));
            }
        }
        if !word.is_empty() {
            out.push(word);
        }
    }
    out
}

/// The language metrics of a corpus of generated reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportScores {
    /// BLEU-1, BLEU-2, BLEU-3, BLEU-4 (corpus level).
    pub bleu: [f64; 4],
    /// ROUGE-L F (beta 1.2), mean over reports.
    pub rouge_l: f64,
    /// CIDEr-D, mean over reports.
    pub cider_d: f64,
    /// Number of reports scored.
    pub n: usize,
}

type Ngrams = HashMap<Vec<String>, usize>;

/// Counts of every n-gram of length 1..=4.
fn ngram_counts(tokens: &[String]) -> Ngrams {
    let mut counts = Ngrams::new();
    for n in 1..=4 {
        for w in tokens.windows(n) {
            *counts.entry(w.to_vec()).or_default() += 1;
        }
    }
    counts
}

fn check(candidates: &[Vec<String>], references: &[Vec<Vec<String>>]) -> Result<()> {
    if candidates.len() != references.len() {
        return Err(EvalError::LengthMismatch {
            what: "references",
            got: references.len(),
            expected: candidates.len(),
        });
    }
    if candidates.is_empty() {
        return Err(EvalError::Empty("reports to score"));
    }
    if let Some(i) = references.iter().position(|r| r.is_empty()) {
        return Err(EvalError::InvalidParameter {
            name: "references",
            reason: format!("report {i} has no reference"),
        });
    }
    Ok(())
}

/// Corpus BLEU-1..4 of tokenised candidates against their references.
pub fn bleu(candidates: &[Vec<String>], references: &[Vec<Vec<String>>]) -> Result<[f64; 4]> {
    check(candidates, references)?;
    let (tiny, small) = (1e-15, 1e-9);
    let mut guess = [0usize; 4];
    let mut correct = [0usize; 4];
    let (mut test_len, mut ref_len) = (0usize, 0usize);
    for (cand, refs) in candidates.iter().zip(references) {
        let mut max_ref: Ngrams = Ngrams::new();
        for r in refs {
            for (g, c) in ngram_counts(r) {
                let e = max_ref.entry(g).or_default();
                *e = (*e).max(c);
            }
        }
        let len = cand.len();
        // The reference length closest to the candidate's; on a tie the shorter.
        let closest = refs
            .iter()
            .map(|r| r.len())
            .min_by_key(|&l| (l.abs_diff(len), l))
            .unwrap_or(0);
        test_len += len;
        ref_len += closest;
        for (k, g) in guess.iter_mut().enumerate() {
            *g += (len + 1).saturating_sub(k + 1);
        }
        for (g, c) in ngram_counts(cand) {
            correct[g.len() - 1] += c.min(max_ref.get(&g).copied().unwrap_or(0));
        }
    }
    let mut out = [0.0; 4];
    let mut product = 1.0;
    for k in 0..4 {
        product *= (correct[k] as f64 + tiny) / (guess[k] as f64 + small);
        out[k] = product.powf(1.0 / (k + 1) as f64);
    }
    let ratio = (test_len as f64 + tiny) / (ref_len as f64 + small);
    if ratio < 1.0 {
        for v in &mut out {
            *v *= (1.0 - 1.0 / ratio).exp();
        }
    }
    Ok(out)
}

fn lcs(a: &[String], b: &[String]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// ROUGE-L F (beta 1.2) of each candidate against its references.
pub fn rouge_l_per_report(
    candidates: &[Vec<String>],
    references: &[Vec<Vec<String>>],
) -> Result<Vec<f64>> {
    check(candidates, references)?;
    let beta2 = 1.2f64 * 1.2;
    Ok(candidates
        .iter()
        .zip(references)
        .map(|(cand, refs)| {
            let (mut p, mut r) = (0.0f64, 0.0f64);
            for rf in refs {
                let l = lcs(rf, cand) as f64;
                // pycocoevalcap splits an empty text into one empty token.
                p = p.max(l / cand.len().max(1) as f64);
                r = r.max(l / rf.len().max(1) as f64);
            }
            if p > 0.0 && r > 0.0 {
                (1.0 + beta2) * p * r / (r + beta2 * p)
            } else {
                0.0
            }
        })
        .collect())
}

/// CIDEr-D of each candidate against its references, with document frequencies over this
/// corpus's reference sets.
pub fn cider_d_per_report(
    candidates: &[Vec<String>],
    references: &[Vec<Vec<String>>],
) -> Result<Vec<f64>> {
    check(candidates, references)?;
    let sigma = 6.0f64;
    let mut df: HashMap<Vec<String>, f64> = HashMap::new();
    for refs in references {
        let grams: HashSet<Vec<String>> = refs
            .iter()
            .flat_map(|r| ngram_counts(r).into_keys())
            .collect();
        for g in grams {
            *df.entry(g).or_default() += 1.0;
        }
    }
    let log_n = (references.len() as f64).ln();
    // tf-idf weights per n, their norms, and the length (bigram count, as pycocoevalcap).
    let vectorise = |tokens: &[String]| {
        let mut vec: [HashMap<Vec<String>, f64>; 4] = Default::default();
        let mut norm = [0.0f64; 4];
        let mut length = 0usize;
        for (g, tf) in ngram_counts(tokens) {
            let n = g.len() - 1;
            let idf = log_n - df.get(&g).copied().unwrap_or(0.0).max(1.0).ln();
            let w = tf as f64 * idf;
            norm[n] += w * w;
            if n == 1 {
                length += tf;
            }
            vec[n].insert(g, w);
        }
        (vec, norm.map(f64::sqrt), length)
    };
    Ok(candidates
        .iter()
        .zip(references)
        .map(|(cand, refs)| {
            let (vc, nc, lc) = vectorise(cand);
            let mut total = [0.0f64; 4];
            for rf in refs {
                let (vr, nr, lr) = vectorise(rf);
                let delta = lc as f64 - lr as f64;
                let penalty = (-(delta * delta) / (2.0 * sigma * sigma)).exp();
                for n in 0..4 {
                    let mut val: f64 = vc[n]
                        .iter()
                        .map(|(g, &w)| {
                            let wr = vr[n].get(g).copied().unwrap_or(0.0);
                            w.min(wr) * wr
                        })
                        .sum();
                    if nc[n] != 0.0 && nr[n] != 0.0 {
                        val /= nc[n] * nr[n];
                    }
                    total[n] += val * penalty;
                }
            }
            total.iter().sum::<f64>() / 4.0 / refs.len() as f64 * 10.0
        })
        .collect())
}

/// BLEU-1..4, ROUGE-L and CIDEr-D of generated reports against their reference reports
/// (each report may have several references), on [`tokenize`]d text.
pub fn score_reports(candidates: &[String], references: &[Vec<String>]) -> Result<ReportScores> {
    let cand: Vec<Vec<String>> = candidates.iter().map(|c| tokenize(c)).collect();
    let refs: Vec<Vec<Vec<String>>> = references
        .iter()
        .map(|rs| rs.iter().map(|r| tokenize(r)).collect())
        .collect();
    let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
    Ok(ReportScores {
        bleu: bleu(&cand, &refs)?,
        rouge_l: mean(rouge_l_per_report(&cand, &refs)?),
        cider_d: mean(cider_d_per_report(&cand, &refs)?),
        n: cand.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<String> {
        tokenize(s)
    }

    #[test]
    fn tokenizer_drops_punctuation_and_keeps_inner_hyphens() {
        assert_eq!(
            toks("No pleural effusion. Well-defined, 3-cm mass; patient's (left) lung!"),
            [
                "no",
                "pleural",
                "effusion",
                "well-defined",
                "3-cm",
                "mass",
                "patient's",
                "left",
                "lung"
            ]
        );
        assert_eq!(toks(" -- ... "), Vec::<String>::new());
    }

    #[test]
    fn identical_reports_score_one_and_disjoint_ones_zero() {
        let r = vec![toks("the heart is enlarged with a small effusion")];
        let same = bleu(&r, std::slice::from_ref(&r)).unwrap();
        for v in same {
            assert!((v - 1.0).abs() < 1e-9, "{v}");
        }
        assert!((rouge_l_per_report(&r, std::slice::from_ref(&r)).unwrap()[0] - 1.0).abs() < 1e-12);
        let other = vec![toks("lungs clear")];
        assert!(bleu(&other, std::slice::from_ref(&r)).unwrap()[0] < 1e-6);
        assert_eq!(
            rouge_l_per_report(&other, std::slice::from_ref(&r)).unwrap()[0],
            0.0
        );
    }

    #[test]
    fn rouge_l_by_hand() {
        // LCS("a b c d", "a c e") = 2: P = 2/3, R = 2/4.
        let f = rouge_l_per_report(&[toks("a c e")], &[vec![toks("a b c d")]]).unwrap()[0];
        let (p, r, b2) = (2.0 / 3.0, 0.5, 1.44);
        assert!((f - (1.0 + b2) * p * r / (r + b2 * p)).abs() < 1e-12);
    }

    #[test]
    fn mismatched_inputs_are_errors() {
        assert!(bleu(&[toks("a")], &[]).is_err());
        assert!(cider_d_per_report(&[toks("a")], &[vec![]]).is_err());
        assert!(score_reports(&[], &[]).is_err());
    }
}
