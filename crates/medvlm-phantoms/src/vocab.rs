//! Modalities, their finding vocabularies, and class prompts.
//!
//! Reports use each finding's `terms` (the first is the canonical one and is
//! the most frequent); a reader can recognise a mention with the finding's
//! `match_terms` (lower-case substrings, which every term contains and no
//! other finding's term of the same modality contains).

use std::fmt;
use std::str::FromStr;

use crate::PhantomError;

/// The label of a study without findings.
pub const NORMAL: &str = "normal";

/// An imaging modality of the phantom benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Modality {
    /// Posteroanterior chest radiograph (grey).
    ChestXray,
    /// Axial T1-weighted post-contrast brain MRI slice (grey).
    BrainMri,
    /// Dermoscopy photograph of a skin region (RGB).
    Dermoscopy,
    /// H&E-stained colorectal histology patch (RGB).
    Histology,
}

/// Words for one finding type.
#[derive(Debug, Clone, Copy)]
pub struct FindingVocab {
    /// Label used in manifests (snake case).
    pub label: &'static str,
    /// Noun phrases used in reports; the first is canonical.
    pub terms: &'static [&'static str],
    /// Lower-case substrings that identify a mention of this finding.
    pub match_terms: &'static [&'static str],
    /// Zero-shot class prompt.
    pub prompt: &'static str,
}

const CHEST: &[FindingVocab] = &[
    FindingVocab {
        label: "nodule",
        terms: &["nodule", "pulmonary nodule", "nodular opacity"],
        match_terms: &["nodul"],
        prompt: "a chest radiograph with a pulmonary nodule",
    },
    FindingVocab {
        label: "mass",
        terms: &["mass", "pulmonary mass", "lung mass"],
        match_terms: &["mass"],
        prompt: "a chest radiograph with a lung mass",
    },
    FindingVocab {
        label: "pleural_effusion",
        terms: &["pleural effusion", "effusion", "pleural fluid collection"],
        match_terms: &["effusion", "pleural fluid"],
        prompt: "a chest radiograph with a pleural effusion",
    },
    FindingVocab {
        label: "pneumothorax",
        terms: &["pneumothorax", "pneumothorax with a visible pleural edge"],
        match_terms: &["pneumothora"],
        prompt: "a chest radiograph with a pneumothorax",
    },
    FindingVocab {
        label: "cardiomegaly",
        terms: &[
            "cardiomegaly",
            "enlarged cardiac silhouette",
            "cardiac enlargement",
        ],
        match_terms: &["cardiomegaly", "enlarged cardiac", "cardiac enlargement"],
        prompt: "a chest radiograph with cardiomegaly",
    },
    FindingVocab {
        label: "consolidation",
        terms: &[
            "consolidation",
            "airspace consolidation",
            "airspace opacity",
        ],
        match_terms: &["consolidation", "airspace"],
        prompt: "a chest radiograph with consolidation",
    },
];

const BRAIN: &[FindingVocab] = &[
    FindingVocab {
        label: "tumour",
        terms: &["tumour", "ring-enhancing mass", "neoplasm", "tumor"],
        match_terms: &["tumour", "tumor", "mass", "neoplas"],
        prompt: "a brain MRI with a ring-enhancing tumour",
    },
    FindingVocab {
        label: "haemorrhage",
        terms: &[
            "haemorrhage",
            "intraparenchymal haemorrhage",
            "haematoma",
            "hemorrhage",
        ],
        match_terms: &["haemorrhag", "hemorrhag", "haematoma", "hematoma"],
        prompt: "a brain MRI with an intraparenchymal haemorrhage",
    },
    FindingVocab {
        label: "infarct",
        terms: &[
            "infarct",
            "territorial infarct",
            "ischaemic infarct",
            "infarction",
        ],
        match_terms: &["infarct"],
        prompt: "a brain MRI with an infarct",
    },
];

const DERM: &[FindingVocab] = &[
    FindingVocab {
        label: "melanoma",
        terms: &[
            "melanoma",
            "lesion suspicious for melanoma",
            "malignant melanoma",
        ],
        match_terms: &["melanoma"],
        prompt: "a dermoscopy image of a melanoma",
    },
    FindingVocab {
        label: "naevus",
        terms: &["naevus", "benign naevus", "melanocytic naevus", "nevus"],
        match_terms: &["naevus", "nevus"],
        prompt: "a dermoscopy image of a benign naevus",
    },
];

const HISTO: &[FindingVocab] = &[
    FindingVocab {
        label: "tumour",
        terms: &["tumour", "adenocarcinoma", "carcinoma", "tumor epithelium"],
        match_terms: &["tumour", "tumor", "carcinoma"],
        prompt: "a histology patch of tumour epithelium",
    },
    FindingVocab {
        label: "stroma",
        terms: &["stroma", "desmoplastic stroma", "fibrous stroma"],
        match_terms: &["stroma"],
        prompt: "a histology patch of fibrous stroma",
    },
    FindingVocab {
        label: "lymphocytes",
        terms: &[
            "lymphocytes",
            "lymphocytic infiltrate",
            "lymphoid aggregate",
        ],
        match_terms: &["lymphocyt", "lymphoid"],
        prompt: "a histology patch rich in lymphocytes",
    },
];

/// The indefinite article a term takes: `""` for mass nouns
/// ("cardiomegaly", "stroma"), else `"a"` or `"an"`.
pub fn article(term: &str) -> &'static str {
    const MASS_NOUNS: &[&str] = &[
        "cardiomegaly",
        "consolidation",
        "stroma",
        "enlargement",
        "epithelium",
    ];
    let last = term.rsplit(' ').next().unwrap_or(term);
    if MASS_NOUNS.contains(&last) {
        return "";
    }
    match term.chars().next().map(|c| c.to_ascii_lowercase()) {
        Some('a' | 'e' | 'i' | 'o' | 'u') => "an",
        _ => "a",
    }
}

/// `term` with its indefinite article, if it takes one.
pub fn with_article(term: &str) -> String {
    match article(term) {
        "" => term.to_string(),
        a => format!("{a} {term}"),
    }
}

impl Modality {
    /// Every modality, in a fixed order.
    pub const ALL: [Modality; 4] = [
        Modality::ChestXray,
        Modality::BrainMri,
        Modality::Dermoscopy,
        Modality::Histology,
    ];

    /// Name used on the command line and in manifests.
    pub fn name(self) -> &'static str {
        match self {
            Modality::ChestXray => "chest_xray",
            Modality::BrainMri => "brain_mri",
            Modality::Dermoscopy => "dermoscopy",
            Modality::Histology => "histology",
        }
    }

    /// Human-readable name, as used in reports and answers.
    pub fn display_name(self) -> &'static str {
        match self {
            Modality::ChestXray => "chest radiograph",
            Modality::BrainMri => "brain MRI",
            Modality::Dermoscopy => "dermoscopy image",
            Modality::Histology => "histology patch",
        }
    }

    /// Colour channels of the image: 1 (grey) or 3 (RGB).
    pub fn channels(self) -> usize {
        match self {
            Modality::ChestXray | Modality::BrainMri => 1,
            Modality::Dermoscopy | Modality::Histology => 3,
        }
    }

    /// Vocabulary of every finding type of the modality.
    pub fn vocab(self) -> &'static [FindingVocab] {
        match self {
            Modality::ChestXray => CHEST,
            Modality::BrainMri => BRAIN,
            Modality::Dermoscopy => DERM,
            Modality::Histology => HISTO,
        }
    }

    /// Finding labels of the modality (without `normal`).
    pub fn findings(self) -> Vec<&'static str> {
        self.vocab().iter().map(|v| v.label).collect()
    }

    /// Class labels for classification: the findings, then `normal`.
    pub fn classes(self) -> Vec<&'static str> {
        let mut c = self.findings();
        c.push(NORMAL);
        c
    }

    /// Vocabulary entry of a finding label.
    pub fn finding_vocab(self, label: &str) -> Option<&'static FindingVocab> {
        self.vocab().iter().find(|v| v.label == label)
    }

    /// A descriptive zero-shot prompt for a class label (a finding or `normal`).
    pub fn class_prompt(self, label: &str) -> Option<&'static str> {
        if label == NORMAL {
            return Some(match self {
                Modality::ChestXray => "a normal chest radiograph",
                Modality::BrainMri => "a normal brain MRI",
                Modality::Dermoscopy => "a dermoscopy image of normal skin",
                Modality::Histology => "a histology patch of normal colonic mucosa",
            });
        }
        self.finding_vocab(label).map(|v| v.prompt)
    }

    /// `(label, prompt)` for every class of [`Modality::classes`].
    pub fn class_prompts(self) -> Vec<(&'static str, &'static str)> {
        self.classes()
            .into_iter()
            .filter_map(|c| self.class_prompt(c).map(|p| (c, p)))
            .collect()
    }
}

impl fmt::Display for Modality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Modality {
    type Err = PhantomError;

    /// Accepts the names of [`Modality::name`] and the short forms `chest`,
    /// `cxr`, `brain`, `mri`, `derm`, `skin`, `histo`, `pathology`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "chest_xray" | "chest" | "cxr" | "xray" => Ok(Modality::ChestXray),
            "brain_mri" | "brain" | "mri" => Ok(Modality::BrainMri),
            "dermoscopy" | "derm" | "skin" => Ok(Modality::Dermoscopy),
            "histology" | "histo" | "pathology" => Ok(Modality::Histology),
            _ => Err(PhantomError::UnknownModality(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_term_matches_its_finding_and_no_other() {
        for m in Modality::ALL {
            for v in m.vocab() {
                for term in v.terms {
                    let t = term.to_lowercase();
                    assert!(v.match_terms.iter().any(|mt| t.contains(mt)), "{m}: {term}");
                    for other in m.vocab().iter().filter(|o| o.label != v.label) {
                        assert!(
                            !other.match_terms.iter().any(|mt| t.contains(mt)),
                            "{m}: term {term} of {} also matches {}",
                            v.label,
                            other.label
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn modality_names_round_trip_and_unknown_is_an_error() {
        for m in Modality::ALL {
            assert_eq!(m.name().parse::<Modality>().unwrap(), m);
            assert_eq!(m.class_prompts().len(), m.findings().len() + 1);
        }
        let err = "ultrasound".parse::<Modality>().unwrap_err();
        assert!(err.to_string().contains("ultrasound"));
    }
}
