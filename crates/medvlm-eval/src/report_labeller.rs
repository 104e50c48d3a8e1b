//! Clinical efficacy of generated reports: a rule labeller that reads which findings a report
//! states, denies or hedges (the CheXpert labeller's idea, Irvin et al., AAAI 2019, with
//! NegEx-style negation cues, Chapman et al., J. Biomed. Inform. 2001), and finding-level
//! precision, recall and F1 of the generated reports' labels against the reference reports'
//! labels ([`clinical_efficacy`]), micro (pooled counts) and macro (mean over findings).
//!
//! Labelling ([`label_report`]), sentence by sentence (split at `.`, `;`, `!`, `?` and line
//! breaks): a finding is mentioned when one of its lexicon's match strings occurs in the
//! lower-cased sentence. The mention is
//!
//! * **negative** when a negation cue (`no`, `not`, `without`, `negative`, `absent`, `free of`)
//!   stands in the same sentence before it with no scope breaker (`but`, `however`,
//!   `although`, `though`, `except`) in between, or `not` / `absent` follows it in the sentence
//!   (`effusion is not seen`);
//! * **uncertain** when a hedge cue stands in the sentence (`possible`, `possibly`, `probable`,
//!   `probably`, `suspected`, `suspicious`, `may`, `might`, `could`, `likely`, `questionable`,
//!   `cannot be excluded`, `concerning for`, `suggestive of`);
//! * **positive** otherwise.
//!
//! Over a report, as CheXpert aggregates: positive if any mention is positive, else uncertain
//! if any is uncertain, else negative if it is mentioned, else not mentioned. For clinical
//! efficacy a finding is predicted present when it is positive, and, with
//! `uncertain_as_positive` (the "U-Ones" policy), also when it is uncertain; negative and
//! unmentioned are absent. Precision of a finding never predicted is 0, as scikit-learn's
//! `zero_division=0`; macro averages run over every finding of the lexicon.
//!
//! One lexicon can cover several modalities whose terms overlap (a brain tumour and a
//! histology tumour; a chest mass and a brain "mass"): a finding with a `modality` is read
//! only in reports of that modality, so a chest report's mass is not also a brain tumour.
//! Scoring with such a lexicon needs every report's modality ([`clinical_efficacy`] refuses a
//! report without one rather than count its scoped findings as absent).

use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};

/// The findings a labeller looks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FindingLexicon {
    /// One entry per finding, in output order.
    pub findings: Vec<FindingTerms>,
}

/// A finding and the strings that identify a mention of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FindingTerms {
    /// The finding's label (e.g. `pleural_effusion`).
    pub label: String,
    /// Lower-case substrings, any of which marks a mention (e.g. `effusion`, `pleural fluid`).
    pub match_terms: Vec<String>,
    /// Only reports of this modality (the manifest's `modality`) can state the finding;
    /// `None`: any report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modality: Option<String>,
}

impl FindingLexicon {
    /// Checks that `modalities` (one per report, or empty: none known) lets every finding be
    /// read: with a scoped lexicon every report needs its modality.
    pub fn check_modalities(&self, modalities: &[Option<String>], n_reports: usize) -> Result<()> {
        let Some(scoped) = self.findings.iter().find(|f| f.modality.is_some()) else {
            return Ok(());
        };
        let missing = if modalities.is_empty() {
            (n_reports > 0).then_some(0)
        } else {
            crate::error::check_len("report modalities", modalities.len(), n_reports)?;
            modalities.iter().position(Option::is_none)
        };
        match missing {
            Some(i) => Err(EvalError::InvalidParameter {
                name: "modality",
                reason: format!(
                    "the lexicon reads finding {:?} only in {} reports, but report {} has no \
                     modality (give each record a `modality`, or a lexicon without modality \
                     scopes)",
                    scoped.label,
                    scoped.modality.as_deref().unwrap_or_default(),
                    i + 1
                ),
            }),
            None => Ok(()),
        }
    }
}

/// What a report says about a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mention {
    /// Stated as present.
    Positive,
    /// Stated with a hedge.
    Uncertain,
    /// Denied.
    Negative,
}

const NEGATION: &[&str] = &["no", "not", "without", "negative", "absent"];
const NEGATION_PAIRS: &[(&str, &str)] = &[("free", "of")];
const SCOPE_BREAKERS: &[&str] = &["but", "however", "although", "though", "except"];
const HEDGES: &[&str] = &[
    "possible",
    "possibly",
    "probable",
    "probably",
    "suspected",
    "suspicious",
    "may",
    "might",
    "could",
    "likely",
    "questionable",
];
const HEDGE_PHRASES: &[&str] = &[
    "cannot be excluded",
    "can not be excluded",
    "cannot exclude",
    "concerning for",
    "suggestive of",
];

/// Words of a sentence with the byte offset where each starts.
fn words(sentence: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in sentence.char_indices() {
        let inside = c.is_alphanumeric() || c == '-' || c == '\'';
        match (inside, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push((s, &sentence[s..i]));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push((s, &sentence[s..]));
    }
    out
}

fn sentence_mention(sentence: &str, at: usize) -> Mention {
    let w = words(sentence);
    // Index of the first word at or after the mention.
    let pos = w.iter().position(|&(o, _)| o >= at).unwrap_or(w.len());
    let before = &w[..pos];
    let mut negated = false;
    for (i, &(_, word)) in before.iter().enumerate() {
        let cue = NEGATION.contains(&word)
            || NEGATION_PAIRS
                .iter()
                .any(|&(a, b)| word == a && before.get(i + 1).is_some_and(|&(_, n)| n == b));
        if cue {
            negated = true;
        } else if SCOPE_BREAKERS.contains(&word) {
            negated = false;
        }
    }
    // "effusion is not seen", "pneumothorax absent".
    let after = &w[pos.min(w.len())..];
    let mut broken = false;
    for &(_, word) in after {
        if SCOPE_BREAKERS.contains(&word) {
            broken = true;
        }
        if !broken && (word == "not" || word == "absent") {
            negated = true;
        }
    }
    if negated {
        return Mention::Negative;
    }
    let hedged = w.iter().any(|&(_, word)| HEDGES.contains(&word))
        || HEDGE_PHRASES.iter().any(|p| sentence.contains(p));
    if hedged {
        Mention::Uncertain
    } else {
        Mention::Positive
    }
}

/// What `text`, a report of `modality` (`None`: unknown), says about each finding of the
/// lexicon, in lexicon order (`None`: not mentioned). A finding scoped to another modality,
/// or to any modality when the report's is unknown, is not mentioned.
pub fn label_report(
    text: &str,
    lexicon: &FindingLexicon,
    modality: Option<&str>,
) -> Vec<Option<Mention>> {
    let lower = text.to_lowercase();
    let mut out = vec![None; lexicon.findings.len()];
    for sentence in lower.split(['.', ';', '!', '?', '\n']) {
        for (k, f) in lexicon.findings.iter().enumerate() {
            if f.modality.is_some() && f.modality.as_deref() != modality {
                continue;
            }
            for term in &f.match_terms {
                for (at, _) in sentence.match_indices(term.as_str()) {
                    let m = sentence_mention(sentence, at);
                    out[k] = Some(match (out[k], m) {
                        (Some(Mention::Positive), _) | (_, Mention::Positive) => Mention::Positive,
                        (Some(Mention::Uncertain), _) | (_, Mention::Uncertain) => {
                            Mention::Uncertain
                        }
                        _ => Mention::Negative,
                    });
                }
            }
        }
    }
    out
}

/// Precision, recall and F1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prf {
    /// Precision (0 without predicted positives).
    pub precision: f64,
    /// Recall (0 without reference positives).
    pub recall: f64,
    /// F1 (0 when precision + recall is 0).
    pub f1: f64,
}

impl Prf {
    /// From true-positive, false-positive and false-negative counts (0 where undefined).
    pub fn from_counts(tp: usize, fp: usize, fn_: usize) -> Self {
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let precision = ratio(tp, tp + fp);
        let recall = ratio(tp, tp + fn_);
        let f1 = if precision + recall == 0.0 {
            0.0
        } else {
            2.0 * precision * recall / (precision + recall)
        };
        Self {
            precision,
            recall,
            f1,
        }
    }
}

/// Clinical efficacy of one finding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FindingEfficacy {
    /// The finding.
    pub label: String,
    /// Reports where both the generated and the reference report state it.
    pub true_positives: usize,
    /// Reports where only the generated report states it.
    pub false_positives: usize,
    /// Reports where only the reference report states it.
    pub false_negatives: usize,
    /// Precision, recall, F1.
    pub scores: Prf,
}

/// Finding-level clinical efficacy of generated reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClinicalEfficacy {
    /// Per finding, in lexicon order.
    pub per_finding: Vec<FindingEfficacy>,
    /// From the counts pooled over findings.
    pub micro: Prf,
    /// Mean over findings of their precision, recall and F1.
    pub macro_avg: Prf,
    /// Whether uncertain mentions counted as present.
    pub uncertain_as_positive: bool,
    /// Number of report pairs.
    pub n: usize,
}

/// Whether `text`, a report of `modality`, states each finding of the lexicon as present
/// (stated positive, or uncertain when `uncertain_as_positive`), in lexicon order: what
/// clinical efficacy counts.
pub fn findings_present(
    text: &str,
    lexicon: &FindingLexicon,
    modality: Option<&str>,
    uncertain_as_positive: bool,
) -> Vec<bool> {
    label_report(text, lexicon, modality)
        .into_iter()
        .map(|m| match m {
            Some(Mention::Positive) => true,
            Some(Mention::Uncertain) => uncertain_as_positive,
            _ => false,
        })
        .collect()
}

/// Clinical efficacy of `generated` reports against their `reference` reports, both labelled
/// with [`label_report`]; `modalities` holds each pair's modality, or is empty when none is
/// known (an error with a lexicon that scopes findings to modalities).
pub fn clinical_efficacy(
    generated: &[String],
    reference: &[String],
    modalities: &[Option<String>],
    lexicon: &FindingLexicon,
    uncertain_as_positive: bool,
) -> Result<ClinicalEfficacy> {
    // Lengths and emptiness are checked by `efficacy_from_labels`.
    lexicon.check_modalities(modalities, generated.len())?;
    let modality = |i: usize| modalities.get(i).and_then(|m| m.as_deref());
    let read = |texts: &[String]| -> Vec<Vec<bool>> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| findings_present(t, lexicon, modality(i), uncertain_as_positive))
            .collect()
    };
    let predicted = read(generated);
    let truth = read(reference);
    let labels: Vec<String> = lexicon.findings.iter().map(|f| f.label.clone()).collect();
    efficacy_from_labels(&predicted, &truth, &labels, uncertain_as_positive)
}

/// Clinical efficacy of finding decisions already made: `predicted[i][k]` and
/// `reference[i][k]` say whether finding `labels[k]` is present in case `i` (what
/// [`clinical_efficacy`] computes after labelling reports; also for a findings classifier's
/// own decisions). `uncertain_as_positive` is recorded as given.
pub fn efficacy_from_labels(
    predicted: &[Vec<bool>],
    reference: &[Vec<bool>],
    labels: &[String],
    uncertain_as_positive: bool,
) -> Result<ClinicalEfficacy> {
    if predicted.len() != reference.len() {
        return Err(EvalError::LengthMismatch {
            what: "reference cases",
            got: reference.len(),
            expected: predicted.len(),
        });
    }
    if predicted.is_empty() {
        return Err(EvalError::Empty("cases to score"));
    }
    if labels.is_empty() {
        return Err(EvalError::Empty("findings in the lexicon"));
    }
    let k = labels.len();
    if let Some(row) = predicted.iter().chain(reference).find(|r| r.len() != k) {
        return Err(EvalError::LengthMismatch {
            what: "findings of a case",
            got: row.len(),
            expected: k,
        });
    }
    let mut counts = vec![(0usize, 0usize, 0usize); k];
    for (g, r) in predicted.iter().zip(reference) {
        for f in 0..k {
            match (g[f], r[f]) {
                (true, true) => counts[f].0 += 1,
                (true, false) => counts[f].1 += 1,
                (false, true) => counts[f].2 += 1,
                (false, false) => {}
            }
        }
    }
    let per_finding: Vec<FindingEfficacy> = labels
        .iter()
        .zip(&counts)
        .map(|(label, &(tp, fp, fn_))| FindingEfficacy {
            label: label.clone(),
            true_positives: tp,
            false_positives: fp,
            false_negatives: fn_,
            scores: Prf::from_counts(tp, fp, fn_),
        })
        .collect();
    let (tp, fp, fn_) = counts
        .iter()
        .fold((0, 0, 0), |a, c| (a.0 + c.0, a.1 + c.1, a.2 + c.2));
    let mean =
        |get: fn(&Prf) -> f64| per_finding.iter().map(|f| get(&f.scores)).sum::<f64>() / k as f64;
    Ok(ClinicalEfficacy {
        micro: Prf::from_counts(tp, fp, fn_),
        macro_avg: Prf {
            precision: mean(|p| p.precision),
            recall: mean(|p| p.recall),
            f1: mean(|p| p.f1),
        },
        per_finding,
        uncertain_as_positive,
        n: predicted.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lexicon() -> FindingLexicon {
        let f = |label: &str, terms: &[&str]| FindingTerms {
            label: label.into(),
            match_terms: terms.iter().map(|t| t.to_string()).collect(),
            modality: None,
        };
        FindingLexicon {
            findings: vec![
                f("pleural_effusion", &["effusion", "pleural fluid"]),
                f("pneumothorax", &["pneumothorax"]),
                f("nodule", &["nodul"]),
            ],
        }
    }

    #[test]
    fn efficacy_from_decisions_by_hand() {
        let labels = vec!["a".to_string(), "b".to_string()];
        let pred = vec![vec![true, false], vec![true, true]];
        let truth = vec![vec![true, false], vec![false, true]];
        let ce = efficacy_from_labels(&pred, &truth, &labels, true).unwrap();
        // a: tp 1, fp 1 -> P 0.5, R 1, F1 2/3; b: tp 1 -> F1 1; micro: tp 2, fp 1 -> F1 0.8.
        assert_eq!(ce.per_finding[0].false_positives, 1);
        assert!((ce.per_finding[0].scores.f1 - 2.0 / 3.0).abs() < 1e-12);
        assert!((ce.per_finding[1].scores.f1 - 1.0).abs() < 1e-12);
        assert!((ce.micro.f1 - 0.8).abs() < 1e-12);
        assert!((ce.macro_avg.f1 - (2.0 / 3.0 + 1.0) / 2.0).abs() < 1e-12);
        assert_eq!(ce.n, 2);
        let short = vec![vec![true], vec![true, true]];
        let err = efficacy_from_labels(&short, &truth, &labels, true).unwrap_err();
        assert!(err.to_string().contains("findings of a case"), "{err}");
    }

    #[test]
    fn negation_hedging_and_scope() {
        let lex = lexicon();
        use Mention::*;
        assert_eq!(
            label_report("Small right effusion. No pneumothorax.", &lex, None),
            vec![Some(Positive), Some(Negative), None]
        );
        assert_eq!(
            label_report(
                "No pneumothorax, nodule or effusion is identified.",
                &lex,
                None
            ),
            vec![Some(Negative), Some(Negative), Some(Negative)]
        );
        assert_eq!(
            label_report(
                "Effusion is not seen; a nodule cannot be excluded.",
                &lex,
                None
            ),
            vec![Some(Negative), None, Some(Uncertain)]
        );
        assert_eq!(
            label_report("No pneumothorax but a new nodular opacity.", &lex, None),
            vec![None, Some(Negative), Some(Positive)]
        );
        // Positive wins over a denial elsewhere in the report.
        assert_eq!(
            label_report(
                "No effusion on the left. Right pleural fluid collection.",
                &lex,
                None
            )[0],
            Some(Positive)
        );
    }

    #[test]
    fn modality_scoped_findings_are_read_only_in_their_modality() {
        let f = |label: &str, terms: &[&str], m: &str| FindingTerms {
            label: label.into(),
            match_terms: terms.iter().map(|t| t.to_string()).collect(),
            modality: Some(m.into()),
        };
        let lex = FindingLexicon {
            findings: vec![
                f("chest_xray/mass", &["mass"], "chest_xray"),
                f("brain_mri/tumour", &["tumour", "mass"], "brain_mri"),
                f("histology/tumour", &["tumour"], "histology"),
            ],
        };
        use Mention::*;
        let text = "A mass. Tumour present.";
        assert_eq!(
            label_report(text, &lex, Some("chest_xray")),
            vec![Some(Positive), None, None]
        );
        assert_eq!(
            label_report(text, &lex, Some("brain_mri")),
            vec![None, Some(Positive), None]
        );
        assert_eq!(label_report(text, &lex, None), vec![None, None, None]);
        // A histology tumour written for a brain image is a false positive of neither tumour
        // row's other modality: each report is read in its own modality.
        let generated = vec!["Tumour.".to_string(), "Tumour.".to_string()];
        let reference = vec!["Tumour.".to_string(), "No tumour.".to_string()];
        let mods = vec![Some("histology".to_string()), Some("brain_mri".to_string())];
        let ce = clinical_efficacy(&generated, &reference, &mods, &lex, true).unwrap();
        let c: Vec<_> = ce
            .per_finding
            .iter()
            .map(|f| (f.true_positives, f.false_positives, f.false_negatives))
            .collect();
        assert_eq!(c, vec![(0, 0, 0), (0, 1, 0), (1, 0, 0)]);
        // Without modalities a scoped lexicon cannot be read: an error, not zeros.
        let err = clinical_efficacy(&generated, &reference, &[], &lex, true).unwrap_err();
        assert!(err.to_string().contains("has no modality"), "{err}");
        let err = clinical_efficacy(&generated, &reference, &mods[..1], &lex, true).unwrap_err();
        assert!(err.to_string().contains("report modalities"), "{err}");
    }

    #[test]
    fn efficacy_counts_by_hand() {
        let lex = lexicon();
        let generated = vec![
            "Effusion. Possible nodule.".to_string(),
            "No effusion. Pneumothorax.".to_string(),
        ];
        let reference = vec![
            "Effusion and nodule.".to_string(),
            "Effusion. No pneumothorax.".to_string(),
        ];
        let ce = clinical_efficacy(&generated, &reference, &[], &lex, false).unwrap();
        // effusion: TP 1, FN 1; pneumothorax: FP 1; nodule: FN 1 (uncertain is absent).
        let c: Vec<_> = ce
            .per_finding
            .iter()
            .map(|f| (f.true_positives, f.false_positives, f.false_negatives))
            .collect();
        assert_eq!(c, vec![(1, 0, 1), (0, 1, 0), (0, 0, 1)]);
        // Micro: TP 1, FP 1, FN 2.
        assert!((ce.micro.precision - 0.5).abs() < 1e-12);
        assert!((ce.micro.recall - 1.0 / 3.0).abs() < 1e-12);
        // Macro F1: effusion 2/3, the others 0.
        assert!((ce.macro_avg.f1 - (2.0 / 3.0) / 3.0).abs() < 1e-12);
        let u1 = clinical_efficacy(&generated, &reference, &[], &lex, true).unwrap();
        assert_eq!(u1.per_finding[2].true_positives, 1);
        assert!(clinical_efficacy(&generated, &reference[..1], &[], &lex, false).is_err());
    }
}
