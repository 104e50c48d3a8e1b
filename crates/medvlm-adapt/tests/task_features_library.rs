//! Task features and class prompts as library calls (what `medvlm adapt` and `bench
//! fewshot` do through them): embedded once, loaded from the cache the second time,
//! recomputed when an image is rewritten in place, and unreadable images skipped and named.

use std::path::{Path, PathBuf};

use candle_core::Device;
use medvlm_adapt::feature_cache::CacheStatus;
use medvlm_adapt::features::{task_features, FeatureOptions, FeaturesError};
use medvlm_adapt::prompts::{class_prompts, encode_class_texts, model_logit_scale, PromptSource};
use medvlm_adapt::task::{Task, TaskSpec};
use medvlm_io::medimage::Plane;

fn clip_fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../medvlm-models/tests/fixtures/clip")
}

fn write_image(path: &Path, level: f32) {
    let data = (0..32 * 32 * 3)
        .map(|i| (level + 0.3 * ((i % 7) as f32 / 7.0)).min(1.0))
        .collect();
    let plane = Plane::new(32, 32, 3, data).unwrap();
    medvlm_io::raster::write_png(path, &plane).unwrap();
}

#[test]
fn features_are_cached_follow_image_contents_and_name_unreadable_files() {
    let d = tempfile::tempdir().unwrap();
    let mut lines = String::new();
    for (i, (label, split)) in [("a", "train"), ("b", "train"), ("a", "test"), ("b", "test")]
        .iter()
        .enumerate()
    {
        write_image(&d.path().join(format!("{i}.png")), 0.2 * i as f32);
        lines.push_str(&format!(
            "{{\"image\": \"{i}.png\", \"label\": \"{label}\", \"split\": \"{split}\"}}\n"
        ));
    }
    let manifest = d.path().join("m.jsonl");
    std::fs::write(&manifest, lines).unwrap();
    let spec = TaskSpec {
        label_field: "label".into(),
        filters: vec![],
        classes: None,
        split: "train".into(),
    };
    let task = Task::from_manifests(std::slice::from_ref(&manifest), &spec).unwrap();
    let m =
        medvlm_models::load_model(clip_fixture().to_str().unwrap(), &Default::default()).unwrap();
    let opts = FeatureOptions {
        model_spec: "tiny-clip".into(),
        cache_dir: Some(d.path().join("cache")),
        batch: 3,
        skip_bad: false,
    };
    let embedded = std::cell::Cell::new(0u64);
    let first = task_features(&task, &m, &opts, &Device::Cpu, &|n| {
        embedded.set(embedded.get() + n)
    })
    .unwrap();
    assert_eq!(first.cache_status, CacheStatus::Miss);
    assert_eq!((first.rows.len(), embedded.get()), (4, 4));
    let (f, y) = first.select(&task, &task.split_rows("test")).unwrap();
    assert_eq!((f.dims(), y), (&[2, 24][..], vec![0, 1]));

    let again = task_features(&task, &m, &opts, &Device::Cpu, &|_| {
        panic!("a cache hit embeds nothing")
    })
    .unwrap();
    assert_eq!(again.cache_status, CacheStatus::Hit);
    assert_eq!(again.cache_path, first.cache_path);

    // An image rewritten in place: the cache file is found stale, the features recomputed
    // (with a different row for that image) and the reason given.
    write_image(&d.path().join("0.png"), 0.9);
    let rewritten = task_features(&task, &m, &opts, &Device::Cpu, &|_| {}).unwrap();
    match &rewritten.cache_status {
        CacheStatus::Invalidated(why) => assert!(why.contains("image files changed"), "{why}"),
        other => panic!("expected a stale cache, got {other:?}"),
    }
    let row0 = |t: &medvlm_adapt::features::TaskFeatures| -> Vec<f32> {
        t.features_of(&task, &[0])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    assert_ne!(row0(&rewritten), row0(&first));

    // A corrupt image: an error naming it, or with skip_bad, a skipped row.
    std::fs::write(d.path().join("3.png"), b"not a png").unwrap();
    let err = task_features(&task, &m, &opts, &Device::Cpu, &|_| {}).unwrap_err();
    assert!(matches!(err, FeaturesError::Cache { .. }), "{err}");
    let chain = medvlm_io::guard::error_chain(&err);
    assert!(chain.contains("3.png"), "{chain}");
    let skipping = FeatureOptions {
        skip_bad: true,
        ..opts
    };
    let partial = task_features(&task, &m, &skipping, &Device::Cpu, &|_| {}).unwrap();
    assert_eq!(partial.rows, [0, 1, 2]);
    assert_eq!(partial.skipped.len(), 1);
    assert!(partial.skipped[0].path.ends_with("3.png"));
    assert!(matches!(
        partial.features_of(&task, &[3]),
        Err(FeaturesError::Missing(p)) if p.ends_with("3.png")
    ));

    // Prompts for the task's classes, embedded by the text tower.
    let prompts = class_prompts(
        &task.class_names,
        &PromptSource::Templates(vec!["a photo of {}".into()]),
    )
    .unwrap();
    let texts = encode_class_texts(&m, &prompts, None, 8, &Device::Cpu).unwrap();
    assert_eq!(texts.prompts.len(), 2);
    assert_eq!(texts.prompts[0].dims(), [1, 24]);
    assert!(model_logit_scale(&m).unwrap() > 1.0);
}

/// An artefact written with the library pieces (`medvlm adapt` does the same), reloaded for
/// prediction: files and in-memory pixels give the probabilities the fitted classifier gives
/// on the same images' features; an unreadable file is named, or skipped and listed.
#[test]
fn an_adapted_model_predicts_files_and_pixels_like_the_fitted_classifier() {
    use medvlm_adapt::artefact::{write_artefact_dir, AdaptCard, ADAPT_CARD, ADAPT_FORMAT};
    use medvlm_adapt::fewshot::{FewShotProtocol, TaskKind};
    use medvlm_adapt::method::{method_by_name, save_classifier, AdaptInput, SupportSet};
    use medvlm_adapt::predictor::{AdaptedModel, PredictError};

    let d = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = (0..4)
        .map(|i| {
            let p = d.path().join(format!("{i}.png"));
            write_image(&p, 0.25 * i as f32);
            p
        })
        .collect();
    let spec = clip_fixture().to_str().unwrap().to_string();
    let m = medvlm_models::load_model(&spec, &Default::default()).unwrap();
    let feats =
        medvlm_models::embed::embed_image_files(&m, &paths, 4, false, &Device::Cpu, &|_| {})
            .unwrap()
            .embeds
            .unwrap();
    let classes = vec!["dark".to_string(), "bright".to_string()];
    let prompts = class_prompts(
        &classes,
        &PromptSource::Templates(vec!["a {} image".into()]),
    )
    .unwrap();
    let texts = encode_class_texts(&m, &prompts, None, 8, &Device::Cpu).unwrap();
    let support = SupportSet::multi_class(feats.clone(), vec![0, 0, 1, 1]);
    let clf = method_by_name("linear-probe", None)
        .unwrap()
        .fit(&AdaptInput::frozen(&texts, &support))
        .unwrap();
    let expected: Vec<f32> = clf
        .probabilities(&feats)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();

    let out = d.path().join("adapted");
    let protocol = FewShotProtocol::balanced(2, 0, TaskKind::MultiClass);
    write_artefact_dir(
        &out,
        |tmp| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            save_classifier(clf.as_ref(), tmp)?;
            let card = AdaptCard {
                format: ADAPT_FORMAT.into(),
                method: "linear-probe".into(),
                hyperparameters: clf.card().hyperparameters.clone(),
                model: spec.clone(),
                model_family: m.family.to_string(),
                model_fingerprint: String::new(),
                data: vec![],
                data_sha256: String::new(),
                label_field: "label".into(),
                filters: vec![],
                task: TaskKind::MultiClass,
                protocol_description: protocol.describe(),
                protocol,
                class_names: classes.clone(),
                prompts: prompts.clone(),
                negative_prompts: None,
                support: vec![],
                train_split: "train".into(),
                test_split: None,
                metrics: None,
                multilabel_metrics: None,
                notes: vec![],
                medvlm_version: "test".into(),
            };
            std::fs::write(tmp.join(ADAPT_CARD), serde_json::to_vec(&card)?)?;
            Ok(())
        },
    )
    .unwrap();

    let adapted = AdaptedModel::load(&out, None, &Device::Cpu).unwrap();
    assert_eq!(adapted.class_names(), classes.as_slice());
    let pred = adapted
        .predict_files(&paths, 3, false, &Device::Cpu, &|_| {})
        .unwrap();
    assert_eq!(pred.paths, paths);
    assert_eq!(pred.probabilities.len(), expected.len());
    for (a, b) in pred.probabilities.iter().zip(&expected) {
        assert!((a - b).abs() <= 2e-6, "{a} vs {b}");
    }
    let px = medvlm_models::embed::preprocess_file(&paths[3], &adapted.model.preprocess).unwrap();
    let px = adapted.model.preprocess.batch(&[px], &Device::Cpu).unwrap();
    let one: Vec<f32> = adapted
        .predict_pixels(&px)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (a, b) in one.iter().zip(&expected[6..8]) {
        assert!((a - b).abs() <= 2e-6, "{a} vs {b}");
    }

    std::fs::write(&paths[1], b"broken").unwrap();
    let err = adapted
        .predict_files(&paths, 3, false, &Device::Cpu, &|_| {})
        .unwrap_err();
    assert!(
        matches!(
            &err,
            PredictError::Compute(medvlm_models::ModelError::UnreadableImage { path, .. })
                if path == &paths[1]
        ),
        "{err}"
    );
    let skipped = adapted
        .predict_files(&paths, 3, true, &Device::Cpu, &|_| {})
        .unwrap();
    assert_eq!(skipped.paths.len(), 3);
    assert_eq!(skipped.skipped.len(), 1);
    assert_eq!(skipped.probabilities.len(), 6);

    // A model that is not there is an error naming the artefact and the spec tried.
    let Err(err) = AdaptedModel::load(&out, Some("/no/such/model"), &Device::Cpu) else {
        panic!("a missing model must not load");
    };
    let msg = medvlm_io::guard::error_chain(&err);
    assert!(
        msg.contains("adapted") && msg.contains("/no/such/model"),
        "{msg}"
    );
}
