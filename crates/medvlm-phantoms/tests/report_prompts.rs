//! `report_prompts` enumerates what the report writer writes: the examination
//! line plus impression of every single-lesion or normal study is one of the
//! prompts of its class, and no prompt belongs to two classes.

use std::collections::{BTreeMap, BTreeSet};

use medvlm_phantoms::{generate_study, report_prompts, Modality, StudyOptions, NORMAL};

/// The examination line (first sentence) and the impression of a report, as
/// `data.text_section = "exam_impression"` reads them: the text after the last
/// "Impression:" heading (any case), else the last sentence.
fn exam_impression(report: &str) -> String {
    let sentences: Vec<&str> = report.split_inclusive(". ").map(str::trim).collect();
    let exam = sentences[0];
    let lower = report.to_lowercase();
    let impression = match lower.rfind("impression:") {
        Some(at) => report[at + "impression:".len()..].trim(),
        None => sentences[sentences.len() - 1],
    };
    format!("{exam} {impression}")
}

#[test]
fn every_single_lesion_impression_is_a_prompt_of_its_class() {
    let opts = StudyOptions {
        size: 64,
        max_findings: 1,
        ..Default::default()
    };
    let mut checked: BTreeMap<(Modality, &str), usize> = BTreeMap::new();
    let mut multi_lesion = 0;
    for m in Modality::ALL {
        let prompts: BTreeMap<&str, BTreeSet<String>> = m
            .classes()
            .into_iter()
            .map(|c| (c, report_prompts(m, c).unwrap().into_iter().collect()))
            .collect();
        for i in 0..400 {
            let s = generate_study(m, 11, i, &opts);
            // Two nodules of one study are joined in one impression ("... and ...").
            if s.findings.len() > 1 {
                multi_lesion += 1;
                continue;
            }
            let label = s.primary_label();
            let text = exam_impression(&s.report);
            assert!(
                prompts[label].contains(&text),
                "{m} {label}: {text:?} is not among its {} prompts (report {:?})",
                prompts[label].len(),
                s.report
            );
            for (other, set) in &prompts {
                if other != &label {
                    assert!(!set.contains(&text), "{text:?} is also a prompt of {other}");
                }
            }
            *checked.entry((m, label)).or_default() += 1;
        }
    }
    // Every class of every modality was met, normal included.
    for m in Modality::ALL {
        for c in m.classes() {
            assert!(
                checked.get(&(m, c)).copied().unwrap_or(0) >= 10,
                "{m} {c}: {checked:?}"
            );
        }
    }
    assert!(multi_lesion < 100, "{multi_lesion} multi-lesion studies");
}

#[test]
fn prompts_are_the_product_of_headers_severities_terms_and_locations() {
    // Brain MRI: 2 examination lines x (3 severities + the hedged mild form) x
    // 4 terms x 10 locations (left / right x 5 regions).
    let tumour = report_prompts(Modality::BrainMri, "tumour").unwrap();
    assert_eq!(tumour.len(), 2 * 4 * 4 * 10);
    assert!(tumour.contains(
        &"MRI brain, axial T1 after gadolinium. Possible small neoplasm in the right basal ganglia."
            .to_string()
    ));
    // Cardiomegaly has one location and its own grades; histology names no location.
    let heart = report_prompts(Modality::ChestXray, "cardiomegaly").unwrap();
    assert_eq!(heart.len(), 3 * 4 * 3);
    assert!(heart.contains(
        &"PA chest radiograph. Marked cardiac enlargement in the cardiac silhouette.".to_string()
    ));
    let stroma = report_prompts(Modality::Histology, "stroma").unwrap();
    assert_eq!(stroma.len(), 2 * 4 * 3);
    assert!(stroma.contains(
        &"Colorectal biopsy, H&E stain. Possible focal desmoplastic stroma.".to_string()
    ));
    let normal = report_prompts(Modality::Dermoscopy, NORMAL).unwrap();
    assert_eq!(normal.len(), 2 * 2);
    for prompts in [&tumour, &heart, &stroma, &normal] {
        let unique: BTreeSet<&String> = prompts.iter().collect();
        assert_eq!(unique.len(), prompts.len(), "duplicated prompts");
    }
    assert!(report_prompts(Modality::Dermoscopy, "stroma").is_none());
}
