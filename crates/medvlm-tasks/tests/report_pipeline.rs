//! The report-generation pipeline on files: manifest errors name the record, the saved
//! generator writes exactly the reports of the trained one, the nearest-neighbour baseline
//! on its own training images returns their reports (and scores perfectly), and a broken
//! artefact is refused with the file named. On the tiny CLIP parity fixture (random weights,
//! 32 px) and phantoms at 32 px.

use std::path::{Path, PathBuf};

use candle_core::Device;
use medvlm_phantoms::{DatasetConfig, Modality, StudyOptions};
use medvlm_tasks::report_findings::FindingsConfig;
use medvlm_tasks::report_generation::ReportGenConfig;
use medvlm_tasks::report_pipeline::{
    detokenize, evaluate, image_embeddings, stated_findings, train, Decoding, ReportModel,
    ReportTask, ReportTrainOptions,
};

mod common;
use common::{fixture, max_abs_diff};

fn phantoms(dir: &Path, n: u64) {
    medvlm_phantoms::write_dataset(&DatasetConfig {
        out: dir.to_path_buf(),
        n,
        seed: 5,
        modalities: vec![Modality::Dermoscopy, Modality::Histology],
        options: StudyOptions {
            size: 32,
            max_findings: 1,
            registration: false,
            ..Default::default()
        },
        force: false,
    })
    .unwrap();
}

#[test]
fn manifest_errors_name_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.jsonl");
    std::fs::write(
        &m,
        "{\"image\": \"a.png\", \"text\": \"Normal.\"}\n{\"image\": \"b.png\", \"text\": \"  \"}\n",
    )
    .unwrap();
    let err = ReportTask::from_manifest(&m, None).unwrap_err().to_string();
    assert!(
        err.contains("m.jsonl") && err.contains("record 2") && err.contains("b.png"),
        "{err}"
    );
    let err = ReportTask::from_manifest(&m, Some("test"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no record of split \"test\""), "{err}");
}

#[test]
fn detokenize_rejoins_punctuation_and_hyphens() {
    let words: Vec<String> = "axial t1 - weighted mri of the brain . findings : h & e , normal ."
        .split(' ')
        .map(str::to_string)
        .collect();
    assert_eq!(
        detokenize(&words),
        "axial t1-weighted mri of the brain. findings: h&e, normal."
    );
}

#[test]
fn saved_generator_reproduces_reports_and_the_baseline_finds_itself() {
    let dir = tempfile::tempdir().unwrap();
    let bench = dir.path().join("bench");
    phantoms(&bench, 60);
    let manifest = bench.join("manifest.jsonl");
    let task = ReportTask::from_manifest(&manifest, None).unwrap();
    let dev = Device::Cpu;
    let m = medvlm_models::load_model(&fixture(), &Default::default()).unwrap();
    let opts = ReportTrainOptions {
        model_spec: fixture(),
        config: ReportGenConfig {
            width: 32,
            layers: 1,
            heads: 2,
            prefix_len: 2,
            epochs: 3,
            batch: 16,
            ..Default::default()
        },
        split: None,
        diagnosis_prompt: None,
        lexicon: None,
    };
    let mut epochs = 0;
    let model = train(&task, &m, &opts, &dev, &mut |_, _| epochs += 1).unwrap();
    assert_eq!(epochs, 3);
    assert_eq!(model.card.n_train, task.items.len());
    let out = dir.path().join("gen");
    model.save(&out).unwrap();
    let (loaded, m2, warning) = ReportModel::load(&out, &dev).unwrap();
    assert!(warning.is_none(), "{warning:?}");

    let files: Vec<PathBuf> = task.items.iter().take(6).map(|i| i.image.clone()).collect();
    let e = loaded.image_inputs(&m2, &files, &dev).unwrap();
    assert!(e.findings.is_none(), "trained without a prompt");
    for d in [Decoding::Greedy, Decoding::Beam(2)] {
        let a = model.generate_for(&e, d).unwrap();
        let b = loaded.generate_for(&e, d).unwrap();
        assert_eq!(a, b, "{d:?}");
        assert!(
            a.iter().all(|r| !r.contains("<|") && !r.contains("<unk>")),
            "{a:?}"
        );
    }
    // Faithful decoding holds a report to its diagnosis prompt: without one, refused.
    let err = loaded
        .generate_for(&e, Decoding::GreedyFaithful { guidance: 0.0 })
        .unwrap_err()
        .to_string();
    assert!(err.contains("--no-diagnosis-prompt"), "{err}");

    // On its own training images the baseline's nearest neighbour is the image itself.
    let ev = evaluate(&loaded, &m2, &task, Decoding::Greedy, None, &dev).unwrap();
    assert_eq!(ev.n, task.items.len());
    for ex in &ev.examples {
        assert_eq!(ex.nearest_neighbour, ex.reference);
    }
    assert!((ev.nearest_neighbour.language.bleu[3] - 1.0).abs() < 1e-9);
    assert!((ev.nearest_neighbour.clinical.micro.f1 - 1.0).abs() < 1e-9);
    assert!(ev.diagnosis_prompt.is_none(), "trained without a prompt");
    assert_eq!(ev.nearest_neighbour.per_modality.len(), 2);
    // Three epochs on 60 reports do not make a generator as good as copying the answer.
    assert!(ev.generated.language.bleu[3] < 0.99);
    let table = ev.render_table();
    assert!(
        table.contains("nearest neighbour") && table.contains("dermoscopy"),
        "{table}"
    );

    // A card whose vocabulary does not match the tokenizer is refused, naming the file.
    let card_path = out.join("report_model.json");
    let text = std::fs::read_to_string(&card_path).unwrap();
    let mut card: serde_json::Value = serde_json::from_str(&text).unwrap();
    card["vocab_size"] = serde_json::json!(7);
    std::fs::write(&card_path, card.to_string()).unwrap();
    let err = ReportModel::load(&out, &dev).err().unwrap().to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("trained for 7"),
        "{err}"
    );
}

/// The phantom lexicon holds every modality's findings, labelled `modality/finding`; terms
/// shared across modalities (the brain tumour's "mass" and "tumour") are read only in their
/// own modality's reports.
#[test]
fn phantom_lexicon_reads_each_report_in_its_modality() {
    let lex = medvlm_tasks::report_pipeline::phantom_lexicon();
    let labels: Vec<&str> = lex.findings.iter().map(|f| f.label.as_str()).collect();
    let mut unique = labels.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), labels.len(), "{labels:?}");
    let present = |text: &str, m: &str| -> Vec<&str> {
        stated_findings(text, &lex, Some(m))
            .iter()
            .zip(&labels)
            .filter(|(v, _)| **v > 0.0)
            .map(|(_, l)| *l)
            .collect()
    };
    let text = "A mass in the right upper lobe. Tumour cells.";
    assert_eq!(present(text, "chest_xray"), vec!["chest_xray/mass"]);
    assert_eq!(present(text, "brain_mri"), vec!["brain_mri/tumour"]);
    assert_eq!(present(text, "histology"), vec!["histology/tumour"]);
    assert!(stated_findings(text, &lex, None).iter().all(|&v| v == 0.0));
}

/// A generator with a diagnosis prompt: the card records the lexicon and the classifier's
/// thresholds, the saved folder writes the same reports, and a folder without the
/// classifier's weights is refused, naming the file.
#[test]
fn diagnosis_prompted_generator_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let bench = dir.path().join("bench");
    phantoms(&bench, 40);
    let task = ReportTask::from_manifest(&bench.join("manifest.jsonl"), None).unwrap();
    let dev = Device::Cpu;
    let m = medvlm_models::load_model(&fixture(), &Default::default()).unwrap();
    let opts = ReportTrainOptions {
        model_spec: fixture(),
        config: ReportGenConfig {
            width: 16,
            layers: 1,
            heads: 2,
            prefix_len: 2,
            epochs: 2,
            batch: 16,
            ..Default::default()
        },
        split: None,
        diagnosis_prompt: Some(FindingsConfig {
            hidden: 8,
            steps: 20,
            ..Default::default()
        }),
        lexicon: None,
    };
    let model = train(&task, &m, &opts, &dev, &mut |_, _| {}).unwrap();
    let lexicon = medvlm_tasks::report_pipeline::phantom_lexicon();
    let f = lexicon.findings.len();
    assert_eq!(model.card.config.findings, f);
    let fc = model.card.findings.as_ref().unwrap();
    assert_eq!(fc.labels.len(), f);
    assert_eq!(fc.thresholds.len(), f);
    assert_eq!(model.card.lexicon.as_ref(), Some(&lexicon));
    // The targets are what the labeller reads in the reports: every training report of a
    // finding-free phantom states nothing; the counts add up to the stated findings.
    let stated: usize = task
        .items
        .iter()
        .map(|i| {
            stated_findings(&i.report, &lexicon, i.modality.as_deref())
                .iter()
                .sum::<f32>() as usize
        })
        .sum();
    assert!(stated > 0);
    assert_eq!(fc.train_positives.iter().sum::<usize>(), stated);

    // The phantom lexicon reads each report in its own modality, so a manifest without
    // modalities is refused (naming it) rather than trained on empty targets.
    let mut bare = task.clone();
    for it in &mut bare.items {
        it.modality = None;
    }
    let err = train(&bare, &m, &opts, &dev, &mut |_, _| {})
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("has no modality") && err.contains("manifest.jsonl"),
        "{err}"
    );

    let out = dir.path().join("gen");
    model.save(&out).unwrap();
    assert!(out.join("findings.safetensors").is_file());
    let (loaded, m2, _) = ReportModel::load(&out, &dev).unwrap();
    assert_eq!(loaded.card, model.card);
    let files: Vec<PathBuf> = task.items.iter().take(6).map(|i| i.image.clone()).collect();
    let inputs = loaded.image_inputs(&m2, &files, &dev).unwrap();
    // The classifier reads the embedding and a 2 x 2 grid of the fixture's 32-wide tokens.
    let e = inputs.embeds.dim(1).unwrap();
    assert_eq!(
        inputs.findings.as_ref().unwrap().dim(1).unwrap(),
        e + 4 * 32
    );
    for d in [Decoding::Greedy, Decoding::Beam(2)] {
        assert_eq!(
            model.generate_for(&inputs, d).unwrap(),
            loaded.generate_for(&inputs, d).unwrap()
        );
    }
    // The embeddings are the first columns of the classifier's inputs (one tower pass),
    // and equal those of the tower's own embedding path.
    let direct = image_embeddings(&m2, &files, &dev).unwrap();
    let diff = max_abs_diff(&inputs.embeds, &direct);
    assert!(diff < 1e-5, "{diff}");
    let no_features = medvlm_tasks::report_pipeline::ImageInputs {
        embeds: inputs.embeds.clone(),
        findings: None,
    };
    let err = loaded
        .generate_for(&no_features, Decoding::Greedy)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("needs the findings classifier's inputs"),
        "{err}"
    );

    // The evaluation scores the prompt's own decisions and the reports' faithfulness to it.
    let ev = evaluate(&loaded, &m2, &task, Decoding::Greedy, None, &dev).unwrap();
    let p = ev.diagnosis_prompt.as_ref().unwrap();
    assert_eq!(p.classifier.n, task.items.len());
    assert_eq!(p.classifier.per_finding.len(), f);
    let called: usize = p
        .classifier
        .per_finding
        .iter()
        .map(|c| c.true_positives + c.false_positives)
        .sum();
    assert_eq!(called, p.prompted_present);
    let truth: usize = p
        .classifier
        .per_finding
        .iter()
        .map(|c| c.true_positives + c.false_negatives)
        .sum();
    assert_eq!(
        truth, stated,
        "the reference findings are the training targets here"
    );
    assert!(p.stated_when_prompted <= p.prompted_present);
    assert!((0.0..=1.0).contains(&p.agreement));
    assert!(ev.render_table().contains("diagnosis prompt:"));

    // Faithful decoding: a report that already states every finding its prompt calls is
    // written as greedy decoding writes it; the others are held open, so the reports state
    // at least as many of the prompted findings.
    let states = loaded.prompt_states(&inputs).unwrap().unwrap();
    let states = states.to_vec2::<u32>().unwrap();
    let greedy = loaded.generate_for(&inputs, Decoding::Greedy).unwrap();
    let faithful = loaded
        .generate_for(&inputs, Decoding::GreedyFaithful { guidance: 0.0 })
        .unwrap();
    for (i, (g, fa)) in greedy.iter().zip(&faithful).enumerate() {
        let modality = task.items[i].modality.as_deref();
        let said = stated_findings(g, &lexicon, modality);
        let complete = states[i]
            .iter()
            .zip(&said)
            .all(|(&s, &w)| s == 0 || w == 1.0);
        if complete {
            assert_eq!(fa, g, "report {i}");
        } else {
            assert!(fa.starts_with(g.as_str()), "report {i}: {g:?} -> {fa:?}");
        }
    }
    let evf = evaluate(
        &loaded,
        &m2,
        &task,
        Decoding::GreedyFaithful { guidance: 0.0 },
        None,
        &dev,
    )
    .unwrap();
    let pf = evf.diagnosis_prompt.as_ref().unwrap();
    assert_eq!(pf.prompted_present, p.prompted_present);
    assert!(pf.stated_when_prompted >= p.stated_when_prompted);
    assert!(evf.render_table().contains("held to the diagnosis prompt"));
    for bad in [-1.0, f64::NAN, f64::INFINITY] {
        let err = loaded
            .generate_for(&inputs, Decoding::GreedyFaithful { guidance: bad })
            .unwrap_err()
            .to_string();
        assert!(err.contains("guidance scale"), "{err}");
    }

    // A card whose classifier names its findings in another order than the lexicon would
    // prompt one finding under another's name: refused, naming the card.
    let card_path = out.join("report_model.json");
    let original = std::fs::read_to_string(&card_path).unwrap();
    let mut card: serde_json::Value = serde_json::from_str(&original).unwrap();
    card["findings"]["labels"]
        .as_array_mut()
        .unwrap()
        .swap(0, 1);
    std::fs::write(&card_path, serde_json::to_string(&card).unwrap()).unwrap();
    let err = ReportModel::load(&out, &dev).err().unwrap().to_string();
    assert!(
        err.contains("report_model.json") && err.contains("not the prompt lexicon's"),
        "{err}"
    );
    std::fs::write(&card_path, original).unwrap();
    assert!(ReportModel::load(&out, &dev).is_ok());

    std::fs::remove_file(out.join("findings.safetensors")).unwrap();
    let err = ReportModel::load(&out, &dev).err().unwrap().to_string();
    assert!(err.contains("findings.safetensors"), "{err}");
}
