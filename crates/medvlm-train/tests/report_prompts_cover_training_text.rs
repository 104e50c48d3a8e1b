//! The quickstart's zero-shot prompts (`medvlm_phantoms::report_prompts`) cover what the text
//! tower reads in training: the `exam_impression` section of every single-lesion or normal
//! phantom report is one of its class's prompts, and of no other class's.

use std::collections::{BTreeMap, BTreeSet};

use medvlm_phantoms::{generate_study, report_prompts, Modality, StudyOptions};
use medvlm_train::text_section::TextSection;

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
            let text = TextSection::ExamImpression.select(&s.report).text;
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
