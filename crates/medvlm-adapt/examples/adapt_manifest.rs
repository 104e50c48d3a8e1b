//! Adapt a model to a labelled manifest with Tip-Adapter-F on 4 images per class and print
//! the test balanced accuracy, with medvlm's public library API only.
//!
//! cargo run --release -p medvlm-adapt --example adapt_manifest -- MODEL MANIFEST
//! (MANIFEST: JSONL/CSV with `image`, `label` and `split` = train / test, e.g. the output of
//! `medvlm phantoms generate`, whose labels are its findings.)

use candle_core::Device;
use medvlm_adapt::fewshot::{FewShotProtocol, TaskKind};
use medvlm_adapt::method::{method_by_name, AdaptInput, ClassTexts, SupportSet};
use medvlm_adapt::task::{Task, TaskSpec};
use medvlm_models::embed::{embed_image_files, embed_texts};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let m = medvlm_models::load_model(&args[1], &Default::default())?;
    let spec = TaskSpec {
        label_field: "label".into(),
        filters: vec![],
        classes: None,
        split: "train".into(),
    };
    let task = Task::from_manifests(&[args[2].clone().into()], &spec)?;
    // The images of a split through the frozen image tower, with their class indices.
    let split = |name: &str| -> Result<_, Box<dyn std::error::Error>> {
        let rows = task.split_rows(name);
        let paths: Vec<_> = rows.iter().map(|&r| task.rows[r].path.clone()).collect();
        let e = embed_image_files(&m, &paths, 32, false, &Device::Cpu, &|_| {})?;
        Ok((e.embeds.ok_or("no readable image")?, task.classes(&rows)?))
    };
    let ((pool, pool_y), (test, test_y)) = (split("train")?, split("test")?);
    let prompts = task
        .class_names
        .iter()
        .map(|c| embed_texts(&m, &[format!("a medical image of {c}")], 1, &Device::Cpu))
        .collect::<Result<_, _>>()?;
    let texts = ClassTexts {
        class_names: task.class_names.clone(),
        prompts,
        negative_prompts: None,
    };
    let idx =
        FewShotProtocol::balanced(4, 0, TaskKind::MultiClass).sample(&pool_y, &task.class_names)?;
    let support = SupportSet::from_pool(&pool, &pool_y, &idx)?;
    let classifier =
        method_by_name("tip-adapter-f", None)?.fit(&AdaptInput::frozen(&texts, &support))?;
    let probs: Vec<f32> = classifier.probabilities(&test)?.flatten_all()?.to_vec1()?;
    let metrics = medvlm_eval::evaluation::evaluate(
        &probs,
        &test_y,
        task.class_names.len(),
        None,
        Default::default(),
    )?;
    println!(
        "tip-adapter-f, 4 shots: test balanced accuracy {:.3} ({} images)",
        metrics.balanced_accuracy, metrics.n
    );
    Ok(())
}
