//! Free-text reports: every present finding is stated (plainly or hedged),
//! a random subset of absent findings is negated, and modality-specific
//! descriptive sentences that name no finding fill in, in a shuffled order and
//! with varied templates and synonyms. The canonical term is used most often
//! so the vocabulary stays consistent for contrastive pretraining.
//!
//! Negations only use the cue words `no`, `not`, `negative` and `without`;
//! statements of present findings never contain them, which is what a
//! NegEx-style reader (Chapman et al., J. Biomed. Inform. 2001) relies on.

use rand::seq::SliceRandom;
use rand::Rng;

use crate::vocab::{with_article, FindingVocab, Modality};
use crate::{Finding, Severity};

fn pick<'a, R: Rng>(rng: &mut R, items: &[&'a str]) -> &'a str {
    items[rng.random_range(0..items.len())]
}

/// A term of the finding: the canonical one 60% of the time.
pub(crate) fn term<R: Rng>(rng: &mut R, v: &FindingVocab) -> &'static str {
    if v.terms.len() == 1 || rng.random::<f32>() < 0.6 {
        v.terms[0]
    } else {
        v.terms[rng.random_range(1..v.terms.len())]
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// Size or severity adjective of a finding of `label` ("" when the modality
/// does not grade it in words).
fn adjective(modality: Modality, label: &str, severity: Severity) -> &'static str {
    match (modality, label) {
        (Modality::ChestXray, "cardiomegaly") => match severity {
            Severity::Mild => "mild",
            Severity::Moderate => "moderate",
            Severity::Severe => "marked",
        },
        (Modality::Dermoscopy, _) => match severity {
            Severity::Mild => "small",
            Severity::Moderate => "",
            Severity::Severe => "large",
        },
        (Modality::Histology, _) => match severity {
            Severity::Mild => "focal",
            Severity::Moderate => "",
            Severity::Severe => "extensive",
        },
        _ => match severity {
            Severity::Mild => "small",
            Severity::Moderate => "moderate",
            Severity::Severe => "large",
        },
    }
}

fn noun_phrase(adj: &str, term: &str) -> String {
    if adj.is_empty() {
        term.to_string()
    } else {
        format!("{adj} {term}")
    }
}

fn positive_sentence<R: Rng>(
    rng: &mut R,
    modality: Modality,
    f: &Finding,
    v: &FindingVocab,
) -> String {
    let t = term(rng, v);
    let adj = adjective(modality, f.label, f.severity);
    let np = noun_phrase(adj, t);
    let a_np = with_article(&np);
    let a_t = with_article(t);
    let loc = if f.location.is_empty() {
        String::new()
    } else {
        format!(" in the {}", f.location)
    };
    let mm = f.size_mm.round() as i64;
    if f.hedged {
        return match rng.random_range(0..6) {
            0 => format!("Possible {np}{loc}."),
            1 => format!("There may be {a_np}{loc}."),
            2 => format!("Suspected {np}{loc}."),
            3 => format!("Probable {np}{loc}."),
            4 => format!("Appearances could represent {a_np}{loc}."),
            _ => capitalise(&format!("{a_np}{loc} cannot be excluded.")),
        };
    }
    let measured = matches!(
        modality,
        Modality::ChestXray | Modality::BrainMri | Modality::Dermoscopy
    ) && f.label != "cardiomegaly";
    match rng.random_range(0..6) {
        0 => format!("There is {a_np}{loc}."),
        1 => capitalise(&format!("{a_np} is seen{loc}.")),
        2 => capitalise(&format!("{a_np} is present{loc}.")),
        3 if !loc.is_empty() => format!("{}: {np}.", capitalise(&f.location)),
        4 if measured => capitalise(&format!("{a_t} measuring {mm} mm{loc}.")),
        _ => format!("Findings are consistent with {a_np}{loc}."),
    }
}

fn negative_sentence<R: Rng>(rng: &mut R, terms: &[&str]) -> String {
    let list = match terms {
        [one] => one.to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
        [] => String::new(),
    };
    match rng.random_range(0..6) {
        0 => format!("No {list}."),
        1 => format!("There is no {list}."),
        2 => format!("No evidence of {list}."),
        3 if terms.len() == 1 => capitalise(&format!("{list} is not seen.")),
        4 => format!("Negative for {list}."),
        _ => format!("No {list} is identified."),
    }
}

fn has(findings: &[Finding], labels: &[&str]) -> bool {
    findings.iter().any(|f| labels.contains(&f.label))
}

/// Descriptive sentences that name no finding (they are consistent with the
/// findings present, e.g. "the lungs are clear" only without lung disease).
fn context_sentences<R: Rng>(rng: &mut R, modality: Modality, findings: &[Finding]) -> Vec<String> {
    let mut out: Vec<&str> = Vec::new();
    match modality {
        Modality::ChestXray => {
            if !has(
                findings,
                &[
                    "nodule",
                    "mass",
                    "consolidation",
                    "pneumothorax",
                    "pleural_effusion",
                ],
            ) {
                out.push(pick(
                    rng,
                    &[
                        "The lungs are clear.",
                        "Both lungs are clear.",
                        "Clear lungs.",
                    ],
                ));
            }
            if !has(findings, &["cardiomegaly"]) {
                out.push(pick(
                    rng,
                    &[
                        "Heart size is normal.",
                        "The cardiomediastinal silhouette is within normal limits.",
                        "Normal heart size.",
                    ],
                ));
            }
            if !has(findings, &["pleural_effusion"]) && rng.random::<f32>() < 0.5 {
                out.push("The costophrenic angles are sharp.");
            }
            out.push(pick(
                rng,
                &[
                    "The bony thorax is intact.",
                    "No acute bony abnormality.",
                    "Visualised osseous structures are unremarkable.",
                ],
            ));
        }
        Modality::BrainMri => {
            if !has(findings, &["tumour", "haemorrhage"]) {
                out.push(pick(
                    rng,
                    &[
                        "The ventricles are normal in size and symmetric.",
                        "Midline structures are central.",
                    ],
                ));
            }
            if !has(findings, &["infarct"]) {
                out.push(pick(
                    rng,
                    &[
                        "Grey-white matter differentiation is preserved.",
                        "Normal grey and white matter signal.",
                    ],
                ));
            }
            if has(findings, &["tumour"]) {
                out.push(pick(
                    rng,
                    &[
                        "The lesion has a thick enhancing rim and a dark necrotic centre, with surrounding oedema.",
                        "Peripheral enhancement with central necrosis and perilesional oedema.",
                    ],
                ));
            }
            out.push(pick(
                rng,
                &[
                    "The calvarium is intact.",
                    "The scalp and skull are unremarkable.",
                ],
            ));
        }
        Modality::Dermoscopy => {
            if has(findings, &["melanoma"]) {
                out.push(pick(
                    rng,
                    &[
                        "The lesion is asymmetric with an irregular, notched border.",
                        "Asymmetric pigmentation and an irregular border.",
                    ],
                ));
                out.push(pick(
                    rng,
                    &[
                        "Multiple colours are present, including black and blue-grey areas.",
                        "Several colours with a blue-white veil.",
                    ],
                ));
            } else if has(findings, &["naevus"]) {
                out.push(pick(
                    rng,
                    &[
                        "The lesion is symmetric with a regular, smooth border.",
                        "Symmetric lesion with a sharp regular outline.",
                    ],
                ));
                out.push(pick(
                    rng,
                    &[
                        "Uniform brown pigmentation with a regular network.",
                        "A single brown colour throughout.",
                    ],
                ));
            } else {
                out.push(pick(
                    rng,
                    &[
                        "Normal skin with a regular surface pattern.",
                        "No pigmented lesion is present in the field.",
                    ],
                ));
            }
        }
        Modality::Histology => {
            if has(findings, &["tumour"]) {
                out.push("Crowded pleomorphic nuclei form irregular glands.");
            }
            if has(findings, &["stroma"]) {
                out.push("Pink collagen fibres with sparse spindle cells.");
            }
            if has(findings, &["lymphocytes"]) {
                out.push("Sheets of small round dark nuclei.");
            }
            out.push(if findings.is_empty() {
                pick(
                    rng,
                    &[
                        "Normal colonic mucosa with regular crypts.",
                        "Regular crypts lined by goblet cells.",
                    ],
                )
            } else {
                "The background mucosa shows regular crypts."
            });
        }
    }
    out.into_iter().map(str::to_string).collect()
}

/// Examination lines a report of the modality opens with.
fn headers(modality: Modality) -> &'static [&'static str] {
    match modality {
        Modality::ChestXray => &[
            "PA chest radiograph.",
            "Frontal view of the chest.",
            "Single PA view of the chest.",
        ],
        Modality::BrainMri => &[
            "Axial T1-weighted post-contrast MRI of the brain.",
            "MRI brain, axial T1 after gadolinium.",
        ],
        Modality::Dermoscopy => &[
            "Dermoscopic image of a skin region.",
            "Dermoscopy of the skin.",
        ],
        Modality::Histology => &[
            "H&E-stained section of colorectal tissue.",
            "Colorectal biopsy, H&E stain.",
        ],
    }
}

/// Impressions of a study without findings.
fn normal_impressions(modality: Modality) -> &'static [&'static str] {
    match modality {
        Modality::ChestXray => &[
            "Normal chest radiograph.",
            "No acute cardiopulmonary abnormality.",
        ],
        Modality::BrainMri => &[
            "Normal MRI of the brain.",
            "No acute intracranial abnormality.",
        ],
        Modality::Dermoscopy => &["Normal skin.", "Unremarkable skin."],
        Modality::Histology => &["Normal colonic mucosa.", "Benign colonic mucosa."],
    }
}

/// The impression's phrase for one finding: "possible small nodule in the
/// right upper zone" (not capitalised, no full stop). Histology impressions
/// name no position in the patch.
fn impression_phrase(
    modality: Modality,
    term: &str,
    adjective: &str,
    location: &str,
    hedged: bool,
) -> String {
    let np = noun_phrase(adjective, term);
    let np = if location.is_empty() || modality == Modality::Histology {
        np
    } else {
        format!("{np} in the {location}")
    };
    if hedged {
        format!("possible {np}")
    } else {
        np
    }
}

/// Whether a finding of this severity may be reported hedged ("possible ...");
/// [`write_report`] hedges half of them.
fn may_hedge(severity: Severity) -> bool {
    severity == Severity::Mild
}

/// Every examination line plus impression that [`write_report`] can write
/// for a study whose only finding is one lesion of `label`, or that has no
/// finding when `label` is [`crate::NORMAL`]: all headers x severities
/// (with the hedged form of mild findings) x terms x locations. These are
/// zero-shot prompts in the form a model pretrained on the reports'
/// `exam_impression` section read during training (the "Impression:" heading
/// is not part of that section), an ensemble composed from finding, severity
/// and location in the manner of MedCLIP's prompt generator (Wang et al.,
/// EMNLP 2022). `None` for a label the modality does not have.
pub fn report_prompts(modality: Modality, label: &str) -> Option<Vec<String>> {
    let impressions: Vec<String> = if label == crate::NORMAL {
        normal_impressions(modality)
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        let v = modality.finding_vocab(label)?;
        let mut locations = crate::impression_locations(modality, label);
        if locations.is_empty() {
            locations.push(String::new());
        }
        let mut out = Vec::new();
        for severity in [Severity::Mild, Severity::Moderate, Severity::Severe] {
            let adj = adjective(modality, label, severity);
            let hedges: &[bool] = if may_hedge(severity) {
                &[false, true]
            } else {
                &[false]
            };
            for &hedged in hedges {
                for term in v.terms {
                    for loc in &locations {
                        let phrase = impression_phrase(modality, term, adj, loc, hedged);
                        out.push(capitalise(&format!("{phrase}.")));
                    }
                }
            }
        }
        out
    };
    let mut prompts = Vec::new();
    for h in headers(modality) {
        for imp in &impressions {
            prompts.push(format!("{h} {imp}"));
        }
    }
    Some(prompts)
}

/// Write the report of a study; decides (and records in `findings`) which
/// findings are hedged: mild ones, half of the time.
pub(crate) fn write_report<R: Rng>(
    rng: &mut R,
    modality: Modality,
    findings: &mut [Finding],
) -> String {
    for f in findings.iter_mut() {
        f.hedged = may_hedge(f.severity) && rng.random::<f32>() < 0.5;
    }
    let mut body: Vec<String> = Vec::new();
    for f in findings.iter() {
        if let Some(v) = modality.finding_vocab(f.label) {
            body.push(positive_sentence(rng, modality, f, v));
        }
    }
    // Negate a random subset of the absent findings, in one or two sentences.
    let mut absent: Vec<&FindingVocab> = modality
        .vocab()
        .iter()
        .filter(|v| !findings.iter().any(|f| f.label == v.label))
        // A melanoma report does not argue against a naevus.
        .filter(|v| !(modality == Modality::Dermoscopy && v.label == "naevus"))
        .collect();
    absent.shuffle(rng);
    let keep = if absent.is_empty() {
        0
    } else {
        rng.random_range(0..=absent.len())
    };
    absent.truncate(keep);
    if !absent.is_empty() {
        let cut = if absent.len() > 1 && rng.random::<f32>() < 0.5 {
            rng.random_range(1..absent.len())
        } else {
            absent.len()
        };
        let (a, b) = absent.split_at(cut);
        for group in [a, b] {
            if !group.is_empty() {
                let terms: Vec<&str> = group.iter().map(|v| v.terms[0]).collect();
                body.push(negative_sentence(rng, &terms));
            }
        }
    }
    body.extend(context_sentences(rng, modality, findings));
    body.shuffle(rng);

    let impression = if findings.is_empty() {
        pick(rng, normal_impressions(modality)).to_string()
    } else {
        let mut parts: Vec<String> = Vec::new();
        for f in findings.iter() {
            if let Some(v) = modality.finding_vocab(f.label) {
                let t = term(rng, v);
                let adj = adjective(modality, f.label, f.severity);
                parts.push(impression_phrase(modality, t, adj, &f.location, f.hedged));
            }
        }
        let joined = match parts.as_slice() {
            [one] => one.clone(),
            [init @ .., last] => format!("{} and {last}", init.join(", ")),
            [] => String::new(),
        };
        capitalise(&format!("{joined}."))
    };
    let (findings_head, impression_head) = match rng.random_range(0..3) {
        0 => ("FINDINGS: ", "IMPRESSION: "),
        1 => ("Findings: ", "Impression: "),
        _ => ("", ""),
    };
    format!(
        "{} {findings_head}{} {impression_head}{impression}",
        pick(rng, headers(modality)),
        body.join(" ")
    )
}
