//! Adapt a model to a labelled manifest with Tip-Adapter-F on 4 images per class and print
//! the test balanced accuracy, with medvlm's public library API only.
//!
//! cargo run --release -p medvlm-adapt --example adapt_manifest -- MODEL MANIFEST
//! (MANIFEST: JSONL/CSV with `image`, `label` and `split` = train / test, e.g. the output of
//! `medvlm phantoms generate`, whose labels are its findings.)

use candle_core::Device;
use medvlm_adapt::features::{task_features, FeatureOptions};
use medvlm_adapt::fewshot::{FewShotProtocol, TaskKind};
use medvlm_adapt::method::{method_by_name, AdaptInput, SupportSet};
use medvlm_adapt::prompts::{class_prompts, encode_class_texts, PromptSource};
use medvlm_adapt::task::{Task, TaskSpec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (dev, m) = (
        Device::Cpu,
        medvlm_models::load_model(&args[1], &Default::default())?,
    );
    let spec = TaskSpec {
        label_field: "label".into(),
        filters: vec![],
        classes: None,
        split: "train".into(),
    };
    let task = Task::from_manifests(&[args[2].clone().into()], &spec)?;
    // Every image through the frozen image tower once (cached beside the manifest).
    let opts = FeatureOptions {
        model_spec: args[1].clone(),
        cache_dir: None,
        batch: 32,
        skip_bad: false,
    };
    let feats = task_features(&task, &m, &opts, &dev, &|_| {})?;
    let (pool, pool_y) = feats.select(&task, &task.split_rows("train"))?;
    let (test, test_y) = feats.select(&task, &task.split_rows("test"))?;
    let source = PromptSource::Templates(vec!["a medical image of {}".into()]);
    let prompts = class_prompts(&task.class_names, &source)?;
    let texts = encode_class_texts(&m, &prompts, None, 32, &dev)?;
    let idx =
        FewShotProtocol::balanced(4, 0, TaskKind::MultiClass).sample(&pool_y, &task.class_names)?;
    let support = SupportSet::from_pool(&pool, &pool_y, &idx)?;
    let classifier =
        method_by_name("tip-adapter-f", None)?.fit(&AdaptInput::frozen(&texts, &support))?;
    let probs: Vec<f32> = classifier.probabilities(&test)?.flatten_all()?.to_vec1()?;
    let n_classes = task.class_names.len();
    let metrics =
        medvlm_eval::evaluation::evaluate(&probs, &test_y, n_classes, None, Default::default())?;
    println!(
        "tip-adapter-f, 4 shots: test balanced accuracy {:.3} ({} images)",
        metrics.balanced_accuracy, metrics.n
    );
    Ok(())
}
