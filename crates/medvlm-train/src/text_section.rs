//! Which part of a report is paired with the image during contrastive training
//! (`data.text_section`).
//!
//! A full radiology report spends most of its words on negations ("No pneumothorax, mass or
//! consolidation is identified") that name every finding the image does *not* show; a small
//! text tower trained from scratch reads those as bag-of-words evidence for the very findings
//! they deny. Training on the impression section avoids that, as CheXzero did with MIMIC-CXR
//! (Tiu et al., Nature Biomedical Engineering 2022: "we use the impression section").
//!
//! * `report` (default): the whole text.
//! * `impression`: the text after the last `Impression:` header (any case). A report without
//!   one contributes its last sentence, where unheaded reports state their conclusion; such
//!   fallbacks are counted and reported, never hidden.
//! * `exam_impression`: the first sentence (the examination line, e.g. "Single PA view of the
//!   chest.") followed by the impression as above, so the text still names the modality.

use serde::{Deserialize, Serialize};

/// The part of each report used as the training text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextSection {
    /// The whole report.
    #[default]
    Report,
    /// The impression section (last sentence when there is no header).
    Impression,
    /// First sentence + impression section.
    ExamImpression,
}

impl std::str::FromStr for TextSection {
    type Err = String;

    /// Parses a configuration name (`report`, `impression`, `exam_impression`).
    fn from_str(s: &str) -> Result<Self, String> {
        [
            TextSection::Report,
            TextSection::Impression,
            TextSection::ExamImpression,
        ]
        .into_iter()
        .find(|t| t.name() == s)
        .ok_or_else(|| {
            format!("text section {s:?}: expected report, impression or exam_impression")
        })
    }
}

/// The selected text and whether the impression had to fall back to the last sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    pub text: String,
    pub fell_back: bool,
}

impl TextSection {
    /// The name used in configuration files.
    pub fn name(self) -> &'static str {
        match self {
            TextSection::Report => "report",
            TextSection::Impression => "impression",
            TextSection::ExamImpression => "exam_impression",
        }
    }

    /// Selects this section of `report`.
    pub fn select(self, report: &str) -> Selected {
        let report = report.trim();
        match self {
            TextSection::Report => Selected {
                text: report.to_string(),
                fell_back: false,
            },
            TextSection::Impression => {
                let (text, fell_back) = impression(report);
                Selected {
                    text: text.to_string(),
                    fell_back,
                }
            }
            TextSection::ExamImpression => {
                let (imp, fell_back) = impression(report);
                let sentences = sentences(report);
                let exam = sentences.first().copied().unwrap_or("");
                // A one-sentence report, or an impression that is the first sentence itself.
                let text = if exam.is_empty() || exam == imp || report.len() == imp.len() {
                    imp.to_string()
                } else {
                    format!("{exam} {imp}")
                };
                Selected { text, fell_back }
            }
        }
    }
}

/// The impression of `report` and whether it fell back to the last sentence.
fn impression(report: &str) -> (&str, bool) {
    const HEADER: &str = "impression:";
    let lower = report.to_ascii_lowercase();
    // Byte offsets agree between `report` and its ASCII lower-casing.
    if let Some(at) = lower.rfind(HEADER) {
        let rest = report[at + HEADER.len()..].trim();
        if !rest.is_empty() {
            return (rest, false);
        }
    }
    (sentences(report).last().copied().unwrap_or(report), true)
}

/// Splits text into sentences at `.`, `!` or `?` followed by whitespace or the end (so
/// "2.5 mm" stays whole). Each sentence keeps its final punctuation.
fn sentences(text: &str) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if matches!(b, b'.' | b'!' | b'?')
            && bytes.get(i + 1).is_none_or(|c| c.is_ascii_whitespace())
        {
            let s = text[start..=i].trim();
            if !s.is_empty() {
                out.push(s);
            }
            start = i + 1;
        }
    }
    let tail = text[start..].trim();
    if !tail.is_empty() {
        out.push(tail);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADED: &str = "Single PA view of the chest. FINDINGS: Heart size is normal. \
        No pneumothorax, nodule or mass. A 2.5 cm effusion. IMPRESSION: Moderate pleural effusion in the left lung base.";
    const UNHEADED: &str =
        "Frontal view of the chest. No evidence of pneumothorax, consolidation, \
        nodule or mass. Both lungs are clear. Normal chest radiograph.";

    #[test]
    fn names_parse_back() {
        for t in [
            TextSection::Report,
            TextSection::Impression,
            TextSection::ExamImpression,
        ] {
            assert_eq!(t.name().parse::<TextSection>(), Ok(t));
        }
        assert!("findings".parse::<TextSection>().is_err());
    }

    #[test]
    fn impression_is_the_text_after_the_last_header() {
        let s = TextSection::Impression.select(HEADED);
        assert_eq!(s.text, "Moderate pleural effusion in the left lung base.");
        assert!(!s.fell_back);
        let lower =
            TextSection::Impression.select("Exam. Findings: x. Impression: Mild cardiomegaly.");
        assert_eq!(lower.text, "Mild cardiomegaly.");
    }

    #[test]
    fn unheaded_report_falls_back_to_its_last_sentence() {
        let s = TextSection::Impression.select(UNHEADED);
        assert_eq!(s.text, "Normal chest radiograph.");
        assert!(s.fell_back);
    }

    #[test]
    fn exam_impression_keeps_the_first_sentence() {
        let s = TextSection::ExamImpression.select(HEADED);
        assert_eq!(
            s.text,
            "Single PA view of the chest. Moderate pleural effusion in the left lung base."
        );
        let u = TextSection::ExamImpression.select(UNHEADED);
        assert_eq!(
            u.text,
            "Frontal view of the chest. Normal chest radiograph."
        );
        assert!(u.fell_back);
        // A one-sentence caption stays itself.
        let one = TextSection::ExamImpression.select("Benign colonic mucosa.");
        assert_eq!(one.text, "Benign colonic mucosa.");
    }

    #[test]
    fn sentences_do_not_split_decimals() {
        assert_eq!(
            sentences("A 2.5 cm nodule. Is it new? Yes"),
            vec!["A 2.5 cm nodule.", "Is it new?", "Yes"]
        );
    }

    #[test]
    fn report_keeps_everything() {
        assert_eq!(TextSection::Report.select(HEADED).text, HEADED);
    }
}
