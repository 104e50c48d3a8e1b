//! The report labeller reads the phantom reports as the generator wrote them: every finding
//! present is stated (uncertain exactly when the generator hedged it), none absent is stated,
//! and a report scored against itself has clinical-efficacy F1 1.

use medvlm_eval::report_labeller::{
    clinical_efficacy, label_report, FindingLexicon, FindingTerms, Mention,
};
use medvlm_phantoms::{generate_study, Modality, StudyOptions};

fn lexicon(m: Modality) -> FindingLexicon {
    FindingLexicon {
        findings: m
            .vocab()
            .iter()
            .map(|v| FindingTerms {
                label: v.label.to_string(),
                match_terms: v.match_terms.iter().map(|t| t.to_string()).collect(),
                modality: None,
            })
            .collect(),
    }
}

#[test]
fn labels_of_phantom_reports_are_the_generators_findings() {
    let opts = StudyOptions {
        size: 32,
        ..Default::default()
    };
    let (mut hedged, mut denied, mut total) = (0, 0, 0);
    for m in Modality::ALL {
        let lex = lexicon(m);
        let mut reports = Vec::new();
        for i in 0..150 {
            let s = generate_study(m, 11, i, &opts);
            let labels = label_report(&s.report, &lex, None);
            for (f, got) in lex.findings.iter().zip(&labels) {
                let finding = s.findings.iter().find(|x| x.label == f.label);
                let expected_state = match finding {
                    Some(x) if x.hedged => Some(Mention::Uncertain),
                    Some(_) => Some(Mention::Positive),
                    None => None,
                };
                match expected_state {
                    Some(e) => assert_eq!(*got, Some(e), "{}: {} in {:?}", s.id, f.label, s.report),
                    None => assert!(
                        matches!(got, None | Some(Mention::Negative)),
                        "{}: {} absent but read as {got:?} in {:?}",
                        s.id,
                        f.label,
                        s.report
                    ),
                }
                hedged += usize::from(*got == Some(Mention::Uncertain));
                denied += usize::from(*got == Some(Mention::Negative));
                total += 1;
            }
            reports.push(s.report.clone());
        }
        let ce = clinical_efficacy(&reports, &reports, &[], &lex, true).unwrap();
        for f in &ce.per_finding {
            assert_eq!(f.false_positives + f.false_negatives, 0, "{}", f.label);
        }
        assert_eq!(ce.micro.f1, 1.0);
    }
    // The test covers hedges and denials, not only plain statements.
    assert!(
        hedged > 20 && denied > 200,
        "{hedged} hedged, {denied} denied of {total}"
    );
}
