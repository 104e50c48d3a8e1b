//! The VQA pipeline on files: manifest errors name the file, record and reason; the closed
//! rule and the majority baseline give known answers; on tiny phantoms the fused classifier
//! answers the modality question (which needs the image) better than the question-only
//! baseline; the saved answerer answers exactly as the trained one; a broken artefact is
//! refused with the file named. On the tiny CLIP parity fixture (random weights, 32 px).

use std::path::{Path, PathBuf};

use candle_core::Device;
use medvlm_io::Plane;
use medvlm_phantoms::{DatasetConfig, Modality, StudyOptions};
use medvlm_tasks::vqa::VqaConfig;
use medvlm_tasks::vqa_pipeline::{
    answer_files, answerer_image_features, encode_pairs_with_pixels, evaluate, grid_pool,
    normalise_answer, train, MajorityBaseline, VqaItem, VqaModel, VqaTask, VqaTrainOptions,
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

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn manifest_errors_name_the_file_record_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let empty_q = write(
        dir.path(),
        "q.jsonl",
        "{\"image\": \"a.png\", \"qa\": [{\"question\": \"Is it?\", \"answer\": \"yes\"}]}\n\
         {\"image\": \"b.png\", \"qa\": [{\"question\": \"  \", \"answer\": \"no\"}]}\n",
    );
    let err = VqaTask::from_manifest(&empty_q, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("q.jsonl") && err.contains("record 2 (b.png)") && err.contains("empty"),
        "{err}"
    );
    let empty_a = write(
        dir.path(),
        "a.jsonl",
        "{\"image\": \"a.png\", \"qa\": [{\"question\": \"Where?\", \"answer\": \" \"}]}\n",
    );
    let err = VqaTask::from_manifest(&empty_a, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("a.jsonl") && err.contains("\"Where?\" has no answer"),
        "{err}"
    );
    // A question without an answer field does not parse; the reader names the line.
    let no_a = write(
        dir.path(),
        "n.jsonl",
        "{\"image\": \"a.png\", \"qa\": [{\"question\": \"Where?\"}]}\n",
    );
    let err = VqaTask::from_manifest(&no_a, None).unwrap_err().to_string();
    assert!(err.contains("n.jsonl") && err.contains("answer"), "{err}");
    let flags = write(
        dir.path(),
        "f.jsonl",
        "{\"image\": \"a.png\", \"qa\": [{\"question\": \"Is it?\", \"answer\": \"yes\"}], \"qa_closed\": [true, false]}\n",
    );
    let err = VqaTask::from_manifest(&flags, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("qa_closed") && err.contains("record 1"),
        "{err}"
    );
    let none = write(dir.path(), "e.jsonl", "{\"image\": \"a.png\"}\n");
    let err = VqaTask::from_manifest(&none, None).unwrap_err().to_string();
    assert!(
        err.contains("e.jsonl") && err.contains("no question-answer pair"),
        "{err}"
    );
}

#[test]
fn closed_questions_follow_the_flags_or_the_yes_no_rule() {
    let dir = tempfile::tempdir().unwrap();
    let m = write(
        dir.path(),
        "m.jsonl",
        "{\"image\": \"a.png\", \"qa\": [{\"question\": \"Is it?\", \"answer\": \" Yes \"}, {\"question\": \"Where?\", \"answer\": \"Left  Lung\", \"kind\": \"location\"}]}\n\
         {\"image\": \"b.png\", \"qa\": [{\"question\": \"Is it?\", \"answer\": \"no\"}, {\"question\": \"Which?\", \"answer\": \"a\"}], \"qa_closed\": [false, true]}\n",
    );
    let t = VqaTask::from_manifest(&m, None).unwrap();
    let closed: Vec<bool> = t.items.iter().map(|i| i.closed).collect();
    assert_eq!(closed, [true, false, false, true]);
    assert_eq!(t.items[0].answer, "yes");
    assert_eq!(t.items[1].answer, "left lung");
    assert_eq!(t.items[1].kind.as_deref(), Some("location"));
    assert_eq!(normalise_answer("  Brain \t MRI "), "brain mri");
}

#[test]
fn majority_baseline_answers_per_question_then_kind_then_overall() {
    let item = |q: &str, a: &str, k: Option<&str>| VqaItem {
        image: PathBuf::from("x.png"),
        question: q.into(),
        answer: a.into(),
        kind: k.map(str::to_string),
        modality: None,
        closed: false,
    };
    let items = [
        item("Is it normal?", "no", Some("abnormality")),
        item("Is it normal?", "yes", Some("abnormality")),
        item("Is it normal?", "yes", Some("abnormality")),
        item("Where?", "left", Some("location")),
        item("Where?", "right", Some("location")),
        item("How many?", "2", None),
    ];
    let m = MajorityBaseline::fit(&items);
    assert_eq!(m.answer("is it  NORMAL?", None), "yes");
    // Ties go to the answer seen first.
    assert_eq!(m.answer("Where?", None), "left");
    assert_eq!(m.answer("Where exactly?", Some("location")), "left");
    assert_eq!(m.answer("What?", Some("other")), "yes");
}

#[test]
fn fused_classifier_beats_the_question_only_baseline_and_survives_saving() {
    let dir = tempfile::tempdir().unwrap();
    let bench = dir.path().join("bench");
    phantoms(&bench, 80);
    let manifest = bench.join("manifest.jsonl");
    let train_task = VqaTask::from_manifest(&manifest, Some("train")).unwrap();
    let test_task = VqaTask::from_manifest(&manifest, Some("test")).unwrap();
    let dev = Device::Cpu;
    let m = medvlm_models::load_model(&fixture(), &Default::default()).unwrap();
    let opts = VqaTrainOptions {
        model_spec: fixture(),
        config: VqaConfig {
            hidden: 64,
            epochs: 40,
            batch: 32,
            lr: 3e-3,
            ..Default::default()
        },
        split: Some("train".into()),
    };
    let mut epochs = 0;
    let model = train(&train_task, &m, &opts, &dev, &mut |_, _, _| epochs += 1).unwrap();
    assert_eq!(epochs, 80, "both classifiers report their epochs");
    assert_eq!(model.card.n_train_pairs, train_task.items.len());
    assert!(model.card.answers.contains(&"dermoscopy image".to_string()));

    let ev = evaluate(&model, &m, &test_task, &dev).unwrap();
    assert_eq!(ev.n_pairs, test_task.items.len());
    assert_eq!(
        ev.model.closed.n + ev.model.open.n,
        ev.model.overall.n,
        "every pair is closed or open"
    );
    // "What imaging modality is shown?" has two answers here; only the image tells which.
    let modality = |s: &medvlm_tasks::vqa_pipeline::VqaScores| s.per_kind["modality"].accuracy;
    assert!(
        modality(&ev.model) >= 0.9
            && modality(&ev.model) > modality(ev.question_only.as_ref().unwrap()) + 0.15,
        "fused {} question-only {}",
        modality(&ev.model),
        modality(ev.question_only.as_ref().unwrap())
    );
    assert!(ev.model.overall.accuracy > ev.question_only.as_ref().unwrap().overall.accuracy);
    // With the default answer mask a training question only gets answers it had in
    // training: every closed phantom question is answered yes or no.
    assert!(model.card.config.mask_answers);
    let enc = encode_pairs_with_pixels(
        &m,
        &test_task.items,
        model.card.config.image_grid,
        model.card.config.pixel_grid,
        &dev,
    )
    .unwrap();
    let answers = model
        .answer_embedded(
            &enc.images,
            &enc.questions,
            &enc.question_texts,
            &enc.index,
            true,
        )
        .unwrap();
    for (it, a) in test_task.items.iter().zip(&answers) {
        if let Some(allowed) = model
            .card
            .answers_by_question
            .get(&normalise_answer(&it.question))
        {
            let k = model
                .card
                .answers
                .iter()
                .position(|x| *x == a.answer)
                .unwrap();
            assert!(
                allowed.contains(&(k as u32)),
                "{} -> {}",
                it.question,
                a.answer
            );
        }
        if it.closed {
            assert!(
                a.answer == "yes" || a.answer == "no",
                "{} -> {}",
                it.question,
                a.answer
            );
        }
    }
    let never = ["What colour is the sky?".to_string()];
    let row = model
        .answer_mask(&never, &dev)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    assert!(
        row[0].iter().all(|&x| x == 0.0),
        "an unseen question is not masked"
    );
    assert!(ev.render_table().contains("kind modality"));

    let out = dir.path().join("answerer");
    model.save(&out).unwrap();
    let loaded = VqaModel::read(&out, &dev).unwrap();
    assert_eq!(loaded.card, model.card);
    for use_image in [true, false] {
        assert_eq!(
            model
                .answer_embedded(
                    &enc.images,
                    &enc.questions,
                    &enc.question_texts,
                    &enc.index,
                    use_image
                )
                .unwrap(),
            loaded
                .answer_embedded(
                    &enc.images,
                    &enc.questions,
                    &enc.question_texts,
                    &enc.index,
                    use_image
                )
                .unwrap()
        );
    }
    let image = test_task.items[0].image.clone();
    let (answers, warning) = answer_files(
        &out,
        std::slice::from_ref(&image),
        "What imaging modality is shown?",
        &dev,
    )
    .unwrap();
    assert!(warning.is_none(), "{warning:?}");
    assert_eq!(answers.len(), 1);
    assert!(answers[0].confidence > 0.0 && answers[0].confidence <= 1.0);

    // An empty question, a missing image and a broken artefact are refused with the reason.
    let err = answer_files(&out, std::slice::from_ref(&image), "  ", &dev)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("question is empty"), "{err}");
    let err = answer_files(&out, &[dir.path().join("nowhere.png")], "Is it?", &dev)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nowhere.png"), "{err}");
    std::fs::remove_file(out.join("classifier.safetensors")).unwrap();
    let err = VqaModel::read(&out, &dev).err().unwrap().to_string();
    assert!(err.contains("classifier.safetensors"), "{err}");
    let err = VqaModel::read(&dir.path().join("none"), &dev)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("vqa_model.json"), "{err}");
}

#[test]
fn grid_pool_averages_each_cell_of_the_patch_grid() {
    let dev = Device::Cpu;
    // A 4 x 4 grid of one-channel tokens numbered row by row.
    let t = candle_core::Tensor::arange(0f32, 16.0, &dev)
        .unwrap()
        .reshape((1, 16, 1))
        .unwrap();
    let g2 = grid_pool(&t, 2).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(g2, [[2.5, 4.5, 10.5, 12.5]]);
    // Uneven cells: rows and columns 0, 1, 2..4.
    let g3 = grid_pool(&t, 3).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(g3[0].len(), 9);
    assert_eq!(g3[0][0], 0.0);
    assert_eq!(g3[0][1], 1.0);
    assert_eq!(g3[0][8], 12.5);
    let odd = candle_core::Tensor::zeros((1, 15, 2), candle_core::DType::F32, &dev).unwrap();
    let err = grid_pool(&odd, 2).unwrap_err().to_string();
    assert!(err.contains("15 patch tokens"), "{err}");
    let err = grid_pool(&t, 5).unwrap_err().to_string();
    assert!(err.contains("does not fit 4 x 4"), "{err}");
}

/// The pixel features (`--pixel-grid`): the image's grey levels averaged on a k x k grid and
/// standardised per image. A 32 px image, white on its left half and black on its right,
/// gives cells of +1 on the left and -1 on the right whatever the model's channel
/// normalisation (an affine map of the grey level, which the per-image standardisation
/// removes); the same image darker and with less contrast gives the same features; a grid
/// larger than the input is refused; an answerer card without the field reads 0.
#[test]
fn pixel_features_are_per_image_standardised_cells() {
    let dir = tempfile::tempdir().unwrap();
    let m = medvlm_models::load_model(&fixture(), &Default::default()).unwrap();
    let side = m.model.image_size();
    let half = |hi: f32, lo: f32| -> Vec<f32> {
        (0..side * side)
            .map(|i| if i % side < side / 2 { hi } else { lo })
            .collect()
    };
    let a = dir.path().join("a.png");
    let b = dir.path().join("b.png");
    medvlm_io::raster::write_png(&a, &Plane::new(side, side, 1, half(1.0, 0.0)).unwrap()).unwrap();
    medvlm_io::raster::write_png(&b, &Plane::new(side, side, 1, half(0.6, 0.2)).unwrap()).unwrap();
    // The embedding first, then the 2 x 2 pixel cells, from one read of the files.
    let files = [a, b];
    let all = answerer_image_features(&m, &files, 0, 2, &Device::Cpu).unwrap();
    let emb = answerer_image_features(&m, &files, 0, 0, &Device::Cpu).unwrap();
    let e = emb.dim(1).unwrap();
    assert_eq!(all.dims(), &[2, e + 4]);
    let diff = max_abs_diff(&all.narrow(1, 0, e).unwrap(), &emb);
    assert!(diff < 1e-5, "{diff}");
    let f = all.narrow(1, e, 4).unwrap();
    let v: Vec<Vec<f32>> = f.to_vec2().unwrap();
    for row in &v {
        for (got, want) in row.iter().zip([1.0f32, -1.0, 1.0, -1.0]) {
            assert!((got - want).abs() < 1e-3, "{row:?}");
        }
    }
    let err = answerer_image_features(&m, &[dir.path().join("a.png")], 0, side + 1, &Device::Cpu)
        .expect_err("grid larger than the input");
    assert!(err.to_string().contains("pixel grid"), "{err}");
    let mut card = serde_json::to_value(VqaConfig::default()).unwrap();
    assert_eq!(card["pixel_grid"], 16);
    card.as_object_mut().unwrap().remove("pixel_grid");
    let old: VqaConfig = serde_json::from_value(card).unwrap();
    assert_eq!(old.pixel_grid, 0);
    assert_eq!(old.image_grid, VqaConfig::default().image_grid);
}
