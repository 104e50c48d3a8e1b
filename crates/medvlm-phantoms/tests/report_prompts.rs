//! `report_prompts` is the product of headers, severities, terms and locations, with no
//! duplicate; that every generated impression is among them is checked against the
//! training text selection itself in medvlm-adapt's `tests/report_prompts_cover_training_text.rs`.

use std::collections::BTreeSet;

use medvlm_phantoms::{report_prompts, Modality, NORMAL};

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
