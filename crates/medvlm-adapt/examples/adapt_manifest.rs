//! Adapt a model to a labelled manifest with Tip-Adapter-F on 4 images per class and print
//! the test balanced accuracy, with medvlm's public library API only.
//!
//! cargo run --release -p medvlm-adapt --example adapt_manifest -- MODEL MANIFEST
//! (MANIFEST: JSONL/CSV with `image`, `label` and `split` = train / test, e.g. the output of
//! `medvlm phantoms generate`, whose labels are its findings.)

use candle_core::{Device, Tensor};
use medvlm_adapt::fewshot::{FewShotProtocol, TaskKind};
use medvlm_adapt::method::{method_by_name, AdaptInput, ClassTexts, SupportSet};
use medvlm_eval::conformal::ConformalConfig;
use medvlm_models::embed::{embed_image_files, embed_texts};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (model, manifest) = (&args[1], medvlm_io::read_manifest(args[2].as_ref())?);
    let m = medvlm_models::load_model(model, &Default::default())?;
    let mut classes: Vec<String> = manifest
        .records
        .iter()
        .filter_map(|r| r.label.clone())
        .collect();
    classes.sort();
    classes.dedup();
    // Images and labels of one split, embedded by the frozen image tower.
    let split = |name: &str| -> Result<(Tensor, Vec<usize>), Box<dyn std::error::Error>> {
        let recs: Vec<_> = manifest
            .records
            .iter()
            .filter(|r| r.split.as_deref() == Some(name) && r.label.is_some())
            .collect();
        let paths: Vec<_> = recs.iter().map(|r| manifest.image_path(r)).collect();
        let labels = recs
            .iter()
            .map(|r| {
                classes
                    .iter()
                    .position(|c| Some(c) == r.label.as_ref())
                    .unwrap()
            })
            .collect();
        let e = embed_image_files(&m, &paths, 32, false, &Device::Cpu, &|_| {})?;
        Ok((e.embeds.ok_or("no readable image")?, labels))
    };
    let ((pool, pool_y), (test, test_y)) = (split("train")?, split("test")?);
    let prompts = classes
        .iter()
        .map(|c| embed_texts(&m, &[format!("a medical image of {c}")], 1, &Device::Cpu))
        .collect::<Result<_, _>>()?;
    let texts = ClassTexts {
        class_names: classes.clone(),
        prompts,
        negative_prompts: None,
    };
    let idx = FewShotProtocol::balanced(4, 0, TaskKind::MultiClass).sample(&pool_y, &classes)?;
    let support = SupportSet::from_pool(&pool, &pool_y, &idx)?;
    let classifier =
        method_by_name("tip-adapter-f", None)?.fit(&AdaptInput::frozen(&texts, &support))?;
    let probs: Vec<f32> = classifier.probabilities(&test)?.flatten_all()?.to_vec1()?;
    let metrics = medvlm_eval::evaluation::evaluate(
        &probs,
        &test_y,
        classes.len(),
        None,
        ConformalConfig::default(),
    )?;
    println!(
        "tip-adapter-f, 4 shots: test balanced accuracy {:.3} ({} images)",
        metrics.balanced_accuracy, metrics.n
    );
    Ok(())
}
