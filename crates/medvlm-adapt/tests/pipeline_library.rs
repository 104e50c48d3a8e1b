//! `medvlm adapt` and `medvlm bench fewshot` as library calls ([`medvlm_adapt::pipeline`],
//! [`medvlm_adapt::fewshot_sweep`]) on the tiny CLIP fixture: the artefact written by the
//! pipeline predicts what its evaluation reported, support draws are shared across methods,
//! the sweep's tables are the means of its records, and refusals come before any fit.

use std::path::{Path, PathBuf};

use candle_core::Device;
use medvlm_adapt::features::{task_features, FeatureOptions, TaskFeatures};
use medvlm_adapt::fewshot::{FewShotProtocol, HyperparameterPolicy, SamplingMode, TaskKind};
use medvlm_adapt::fewshot_sweep::{plan_methods, sweep, SweepRequest};
use medvlm_adapt::pipeline::{
    adapt, AdaptContext, AdaptRequest, MethodRefusal, PipelineError, Splits, TaskMetrics, TaskSetup,
};
use medvlm_adapt::predictor::AdaptedModel;
use medvlm_adapt::prompts::{class_prompts, PromptSource};
use medvlm_adapt::task::{Task, TaskSpec};
use medvlm_io::medimage::Plane;
use medvlm_models::LoadedModel;

fn clip_fixture() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../medvlm-models/tests/fixtures/clip")
        .display()
        .to_string()
}

/// Class `a` images are dark with a vertical stripe, class `b` bright with a horizontal one;
/// `i` varies the texture so no two images are equal.
fn write_image(path: &Path, class_b: bool, i: usize) {
    let data = (0..32 * 32 * 3)
        .map(|k| {
            let (y, x) = ((k / 3) / 32, (k / 3) % 32);
            let stripe = if class_b { y % 8 < 3 } else { x % 8 < 3 };
            let base = if class_b { 0.7 } else { 0.2 };
            let noise = ((k * 31 + i * 17) % 13) as f32 / 13.0 * 0.1;
            (base + if stripe { 0.2 } else { 0.0 } + noise).min(1.0)
        })
        .collect();
    let plane = Plane::new(32, 32, 3, data).unwrap();
    medvlm_io::raster::write_png(path, &plane).unwrap();
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    task: Task,
    model: LoadedModel,
    features: TaskFeatures,
}

/// 6 train, 2 val and 4 test images per class.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let mut lines = String::new();
    let mut i = 0;
    for (split, n) in [("train", 6), ("val", 2), ("test", 4)] {
        for class in ["a", "b"] {
            for _ in 0..n {
                write_image(&root.join(format!("{i}.png")), class == "b", i);
                lines.push_str(&format!(
                    "{{\"image\": \"{i}.png\", \"label\": \"{class}\", \"split\": \"{split}\"}}\n"
                ));
                i += 1;
            }
        }
    }
    let manifest = root.join("m.jsonl");
    std::fs::write(&manifest, lines).unwrap();
    let spec = TaskSpec {
        label_field: "label".into(),
        filters: vec![],
        classes: None,
        split: "train".into(),
    };
    let task = Task::from_manifests(std::slice::from_ref(&manifest), &spec).unwrap();
    let model = medvlm_models::load_model(&clip_fixture(), &Default::default()).unwrap();
    let opts = FeatureOptions {
        model_spec: clip_fixture(),
        cache_dir: Some(root.join("cache")),
        batch: 8,
        skip_bad: false,
    };
    let features = task_features(&task, &model, &opts, &Device::Cpu, &|_| {}).unwrap();
    Fixture {
        _dir: dir,
        root,
        task,
        model,
        features,
    }
}

fn context<'a>(f: &'a Fixture, spec: &'a str) -> AdaptContext<'a> {
    let source = PromptSource::Templates(vec!["a photo of {}".into()]);
    AdaptContext::new(TaskSetup {
        task: &f.task,
        features: &f.features,
        model: &f.model,
        model_spec: spec,
        prompts: class_prompts(&f.task.class_names, &source).unwrap(),
        negative_prompts: None,
        label_field: "label".into(),
        filters: vec![],
        splits: Splits::default(),
        conformal: Default::default(),
        batch: 4,
        device: &Device::Cpu,
    })
    .unwrap()
}

#[test]
fn adapted_artefact_predicts_what_its_evaluation_reported() {
    let f = fixture();
    let spec = clip_fixture();
    let ctx = context(&f, &spec);
    let request = AdaptRequest {
        method: "linear-probe".into(),
        overrides: None,
        protocol: FewShotProtocol::balanced(3, 7, TaskKind::MultiClass),
    };
    let adapted = adapt(&ctx, &request).unwrap();

    // Three support images per class, drawn from the train split only.
    let card = &adapted.card;
    assert_eq!(card.support.len(), 6);
    for class in ["a", "b"] {
        assert_eq!(card.support.iter().filter(|(_, c)| c == class).count(), 3);
    }
    for &r in &adapted.support.rows {
        assert_eq!(f.task.rows[r].split.as_deref(), Some("train"));
    }
    assert_eq!(card.test_split.as_deref(), Some("test"));
    let eval = adapted.evaluation.as_ref().expect("a test split");
    assert_eq!(eval.rows.len(), 8);
    let TaskMetrics::MultiClass(mx) = &eval.metrics else {
        panic!("multi-class task")
    };
    assert_eq!(card.metrics.as_ref().unwrap().n, 8);
    // Calibrated on the val split, not on the pool.
    let cf = mx.conformal.as_ref().expect("conformal sets");
    assert_eq!(cf.n_calibration, 4);
    assert!(
        cf.calibration_source.contains("'val'"),
        "{}",
        cf.calibration_source
    );
    // The card keeps the calibrated predictor: its sets on the test images give the coverage
    // the evaluation reported.
    let predictor = cf
        .predictor
        .as_ref()
        .expect("calibrated predictor in the card");
    let sets = predictor.predict_sets(&eval.probabilities).unwrap();
    let covered = sets
        .iter()
        .zip(&eval.rows)
        .filter(|(set, &r)| set.contains(&f.task.classes(&[r]).unwrap()[0]))
        .count();
    assert!((cf.report.coverage - covered as f64 / 8.0).abs() < 1e-12);
    // The reported accuracy is the accuracy of the reported probabilities.
    let correct = eval
        .probabilities
        .chunks(2)
        .zip(&eval.rows)
        .filter(|(p, &r)| {
            let pred = usize::from(p[1] > p[0]);
            f.task.classes(&[r]).unwrap()[0] == pred
        })
        .count();
    assert!((mx.accuracy - correct as f64 / 8.0).abs() < 1e-12);

    // Written, reloaded and applied to the test files: the same probabilities.
    let out = f.root.join("artefact");
    adapted.write(&out).unwrap();
    for file in ["adapt.json", "eval_predictions.csv", "reliability.png"] {
        assert!(out.join(file).is_file(), "{file}");
    }
    let loaded = AdaptedModel::load(&out, None, &Device::Cpu).unwrap();
    let paths: Vec<PathBuf> = eval
        .rows
        .iter()
        .map(|&r| f.task.rows[r].path.clone())
        .collect();
    let pred = loaded
        .predict_files(&paths, 3, false, &Device::Cpu, &|_| {})
        .unwrap();
    assert_eq!(pred.probabilities.len(), eval.probabilities.len());
    for (a, b) in pred.probabilities.iter().zip(&eval.probabilities) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    let csv = std::fs::read_to_string(out.join("eval_predictions.csv")).unwrap();
    assert_eq!(csv.lines().count(), 9);
    assert!(csv.starts_with("image,a,b,prediction\n"), "{csv}");
}

#[test]
fn refusals_and_impossible_draws_are_errors_before_any_fit() {
    let f = fixture();
    let spec = clip_fixture();
    let ctx = context(&f, &spec);
    let pairs = AdaptRequest {
        method: "zero-shot-pairs".into(),
        overrides: None,
        protocol: FewShotProtocol::balanced(1, 0, TaskKind::MultiClass),
    };
    match adapt(&ctx, &pairs) {
        Err(PipelineError::NotApplicable(MethodRefusal::NeedsMultiLabel(m))) => {
            assert_eq!(m, "zero-shot-pairs")
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("zero-shot-pairs fitted a multi-class task"),
    }
    let too_many = AdaptRequest {
        method: "tip-adapter".into(),
        overrides: None,
        protocol: FewShotProtocol::balanced(7, 0, TaskKind::MultiClass),
    };
    match adapt(&ctx, &too_many) {
        Err(PipelineError::Support { shots, split, .. }) => {
            assert_eq!((shots, split.as_str()), (7, "train"))
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("7 shots drawn from 6 images per class"),
    }
    // A multi-label method list on a multi-class task: the refused ones are listed.
    let (run, skipped) =
        plan_methods("zero-shot,zero-shot-pairs", TaskKind::MultiClass, &f.model).unwrap();
    assert_eq!(run, vec!["zero-shot".to_string()]);
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].method, "zero-shot-pairs");
}

#[test]
fn sweep_shares_draws_across_methods_and_tables_are_means_of_records() {
    let f = fixture();
    let spec = clip_fixture();
    let ctx = context(&f, &spec);
    let methods = vec!["zero-shot".to_string(), "linear-probe".to_string()];
    let request = SweepRequest {
        methods: methods.clone(),
        skipped: vec![],
        overrides: Default::default(),
        shots: vec![1, 2],
        seeds: 3,
        mode: SamplingMode::Balanced,
        policy: HyperparameterPolicy::Fixed,
    };
    let out = sweep(&ctx, &request, &|_| {}).unwrap();
    assert_eq!(out.records.len(), 2 * 2 * 3);
    assert_eq!(out.support_sets.len(), 2 * 3);
    for d in &out.support_sets {
        assert_eq!(d.support.len(), 2 * d.shots);
    }
    // Different seeds draw different support sets at K=2 (6 images per class to draw from).
    let k2: Vec<_> = out.support_sets.iter().filter(|d| d.shots == 2).collect();
    assert!(k2.windows(2).any(|w| w[0].support != w[1].support));
    let table = out.accuracy_table.as_ref().unwrap();
    for (mi, method) in table.methods.iter().enumerate() {
        for (ki, &k) in table.shots.iter().enumerate() {
            let values: Vec<f64> = out
                .records
                .iter()
                .filter(|r| &r.method == method && r.protocol.shots == k)
                .map(|r| r.metrics.as_ref().unwrap().accuracy)
                .collect();
            assert_eq!(values.len(), 3);
            let mean = values.iter().sum::<f64>() / 3.0;
            let cell = table.cells[mi][ki].as_ref().unwrap();
            assert!((cell.mean - mean).abs() < 1e-12, "{method} K={k}");
        }
    }
    // Zero-shot does not depend on the draw: its records agree across seeds and K.
    let zs: Vec<f64> = out
        .records
        .iter()
        .filter(|r| r.method == "zero-shot")
        .map(|r| r.metrics.as_ref().unwrap().accuracy)
        .collect();
    assert!(zs.iter().all(|&a| a == zs[0]), "{zs:?}");

    // Overrides of a method not run are refused.
    let mut bad = request.clone();
    bad.overrides
        .insert("tip-adapter".into(), serde_json::json!({"alpha": 1.0}));
    assert!(matches!(
        sweep(&ctx, &bad, &|_| {}),
        Err(PipelineError::Refused(why)) if why.contains("tip-adapter")
    ));
    let json = f.root.join("bench.json");
    out.write_json(&json).unwrap();
    let back: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(back["records"].as_array().unwrap().len(), 12);
}
