//! Visual question answering pairs, derived from the ground truth only (in the
//! spirit of VQA-RAD, Lau et al., Sci. Data 2018: closed yes/no questions and
//! open short answers about presence, location, laterality, count, size,
//! abnormality and modality).

use rand::Rng;

use crate::vocab::{with_article, Modality};
use crate::{Finding, Laterality, Qa, QaKind};

fn plural(term: &str) -> String {
    if term.ends_with('s') || term.ends_with('x') {
        format!("{term}es")
    } else {
        format!("{term}s")
    }
}

fn qa(
    question: String,
    answer: impl Into<String>,
    kind: QaKind,
    closed: bool,
    finding: Option<&'static str>,
) -> Qa {
    Qa {
        question,
        answer: answer.into(),
        kind,
        closed,
        finding,
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// Labels that can occur more than once in an image and are worth counting.
fn countable(label: &str) -> bool {
    matches!(label, "nodule" | "mass")
}

pub(crate) fn make_qa<R: Rng>(rng: &mut R, modality: Modality, findings: &[Finding]) -> Vec<Qa> {
    let mut out = Vec::new();
    // Modality: open, and closed against a random modality.
    out.push(qa(
        "What imaging modality is shown?".into(),
        modality.display_name(),
        QaKind::Modality,
        false,
        None,
    ));
    let other = Modality::ALL[rng.random_range(0..Modality::ALL.len())];
    out.push(qa(
        format!("Is this a {}?", other.display_name()),
        yes_no(other == modality),
        QaKind::Modality,
        true,
        None,
    ));

    // Abnormality: closed and open.
    out.push(qa(
        "Is this study normal?".into(),
        yes_no(findings.is_empty()),
        QaKind::Abnormality,
        true,
        None,
    ));
    let mut labels: Vec<&str> = findings.iter().map(|f| f.label).collect();
    labels.sort_unstable();
    labels.dedup();
    let open = if labels.is_empty() {
        "none".to_string()
    } else {
        labels
            .iter()
            .map(|l| l.replace('_', " "))
            .collect::<Vec<_>>()
            .join(", ")
    };
    out.push(qa(
        "What abnormality is seen?".into(),
        open,
        QaKind::Abnormality,
        false,
        None,
    ));

    // Presence: one present finding (if any) and one absent finding (if any).
    let vocab = modality.vocab();
    let present: Vec<_> = vocab.iter().filter(|v| labels.contains(&v.label)).collect();
    let absent: Vec<_> = vocab
        .iter()
        .filter(|v| !labels.contains(&v.label))
        .collect();
    for (group, answer) in [(&present, true), (&absent, false)] {
        if !group.is_empty() {
            let v = group[rng.random_range(0..group.len())];
            out.push(qa(
                format!("Is there {}?", with_article(v.terms[0])),
                yes_no(answer),
                QaKind::Presence,
                true,
                Some(v.label),
            ));
        }
    }

    // Count of a countable finding type, present or not.
    let countables: Vec<_> = vocab.iter().filter(|v| countable(v.label)).collect();
    if !countables.is_empty() {
        let v = countables[rng.random_range(0..countables.len())];
        let n = findings.iter().filter(|f| f.label == v.label).count();
        out.push(qa(
            format!("How many {} are there?", plural(v.terms[0])),
            n.to_string(),
            QaKind::Count,
            false,
            Some(v.label),
        ));
    }
    if modality == Modality::Histology || modality == Modality::BrainMri {
        out.push(qa(
            "How many abnormal findings are there?".into(),
            findings.len().to_string(),
            QaKind::Count,
            false,
            None,
        ));
    }

    // Location, laterality and size of findings that occur once.
    for f in findings {
        if findings.iter().filter(|g| g.label == f.label).count() != 1 {
            continue;
        }
        let Some(v) = modality.finding_vocab(f.label) else {
            continue;
        };
        let t = v.terms[0];
        if !f.location.is_empty() {
            out.push(qa(
                format!("Where is the {t}?"),
                f.location.clone(),
                QaKind::Location,
                false,
                Some(f.label),
            ));
        }
        if f.laterality != Laterality::None {
            out.push(qa(
                format!("Which side is the {t} on?"),
                f.laterality.name(),
                QaKind::Laterality,
                false,
                Some(f.label),
            ));
            let ask_left = rng.random::<bool>();
            out.push(qa(
                format!(
                    "Is the {t} on the {} side?",
                    if ask_left { "left" } else { "right" }
                ),
                yes_no((f.laterality == Laterality::Left) == ask_left),
                QaKind::Laterality,
                true,
                Some(f.label),
            ));
        }
        out.push(qa(
            format!("How large is the {t}?"),
            f.severity.size_class(),
            QaKind::Size,
            false,
            Some(f.label),
        ));
    }
    out
}
