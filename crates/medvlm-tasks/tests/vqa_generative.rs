//! The generative VQA answerer on tiny phantoms (32 px, dermoscopy and histology) with the
//! tiny CLIP parity fixture: it learns to write the modality answer, which needs the image;
//! the saved answerer writes exactly what the trained one writes; a tokenizer whose
//! vocabulary does not match the decoder is refused with the file named.

use std::path::Path;

use candle_core::Device;
use medvlm_phantoms::{DatasetConfig, Modality, StudyOptions};
use medvlm_tasks::report_generation::ReportGenConfig;
use medvlm_tasks::vqa_generative::{
    evaluate_generative, is_generative, train_generative, GenTrainOptions, GenVqaModel,
};
use medvlm_tasks::vqa_pipeline::{encode_pairs, VqaTask};

mod common;
use common::fixture;

fn phantoms(dir: &Path, n: u64) {
    medvlm_phantoms::write_dataset(&DatasetConfig {
        out: dir.to_path_buf(),
        n,
        seed: 7,
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
fn generative_answerer_writes_answers_that_need_the_image_and_survives_saving() {
    let dir = tempfile::tempdir().unwrap();
    let bench = dir.path().join("bench");
    phantoms(&bench, 40);
    let task = VqaTask::from_manifest(&bench.join("manifest.jsonl"), None).unwrap();
    let dev = Device::Cpu;
    let m = medvlm_models::load_model(&fixture(), &Default::default()).unwrap();
    let opts = GenTrainOptions {
        model_spec: fixture(),
        config: ReportGenConfig {
            prefix_len: 2,
            width: 32,
            layers: 1,
            heads: 2,
            max_tokens: 24,
            epochs: 40,
            batch: 32,
            lr: 5e-3,
            min_word_count: 1,
            ..Default::default()
        },
        image_grid: 2,
        split: None,
    };
    let mut losses = Vec::new();
    let model = train_generative(&task, &m, &opts, &dev, &mut |_, l| losses.push(l)).unwrap();
    assert_eq!(losses.len(), 40);
    assert!(losses[39] < losses[0] / 4.0, "{losses:?}");
    let ev = evaluate_generative(&model, &m, &task, &dev).unwrap();
    assert!(ev.question_only.is_none());
    // "What imaging modality is shown?" (two answers, about equally frequent) and "Is this a
    // ...?": only the image says which; the majority baseline cannot know.
    let modality = ev.model.per_kind["modality"].accuracy;
    assert!(
        modality >= 0.85 && modality > ev.majority.per_kind["modality"].accuracy + 0.15,
        "generated {modality}, majority {}",
        ev.majority.per_kind["modality"].accuracy
    );
    assert!(ev.render_table().contains("generative decoder"));

    let out = dir.path().join("gen");
    model.save(&out).unwrap();
    assert!(is_generative(&out));
    let loaded = GenVqaModel::read(&out, &dev).unwrap();
    assert_eq!(loaded.card, model.card);
    let enc = encode_pairs(&m, &task.items[..12], 2, &dev).unwrap();
    let a = model
        .answer_features(&enc.images, &enc.question_texts, &enc.index)
        .unwrap();
    let b = loaded
        .answer_features(&enc.images, &enc.question_texts, &enc.index)
        .unwrap();
    assert_eq!(a, b);

    // A tokenizer of another vocabulary than the decoder's is refused.
    let tok = out.join("tokenizer.json");
    let other = medvlm_train::pretrain::build_word_tokenizer(&["only three words"], 1).unwrap();
    other.save(&tok, false).unwrap();
    let err = GenVqaModel::read(&out, &dev).err().unwrap().to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("the decoder was trained for"),
        "{err}"
    );
}
