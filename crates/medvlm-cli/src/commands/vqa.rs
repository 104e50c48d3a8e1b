//! `medvlm vqa train|answer|eval`: visual question answering on a frozen VLM, as
//! classification over the training answers (PubMedCLIP's recipe;
//! `medvlm_tasks::vqa_pipeline`, docs/vqa.md).
//!
//! * `train --model M --manifest train.jsonl --out DIR`: trains the fused classifier and the
//!   question-only baseline on the manifest's `qa` pairs and writes the answerer folder;
//!   `--generative` trains the report decoder to write answers instead
//!   (`medvlm_tasks::vqa_generative`).
//! * `answer --answerer DIR --question Q IMAGES...`: prints one answer per image.
//! * `eval --answerer DIR --manifest test.jsonl [--json OUT]`: closed, open, overall and
//!   per-kind accuracy of the classifier, the question-only and the majority baselines.

use std::path::PathBuf;

use medvlm_tasks::vqa::VqaConfig;
use medvlm_tasks::vqa_generative::{
    answer_files_generative, evaluate_generative, generative_config, is_generative,
    train_generative_and_save, GenTrainOptions, GenVqaModel,
};
use medvlm_tasks::vqa_pipeline::{
    answer_files, evaluate_manifest, train_and_save, Trained, VqaTask, VqaTrainOptions,
};

use super::embed::DeviceArgs;
use super::task_args::{warn, EvalJsonArg, SplitArg};

/// Arguments of `medvlm vqa`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: VqaCommand,
}

/// The subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum VqaCommand {
    /// Train an answerer on a manifest whose records carry `qa` lists.
    Train(TrainArgs),
    /// Answer one question about each image (PNG/JPEG/TIFF, DICOM, NIfTI).
    Answer(AnswerArgs),
    /// Evaluate an answerer and its baselines on a manifest.
    Eval(EvalArgs),
}

/// `medvlm vqa train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Vision-language model: a directory, hf:ORG/NAME or a preset.
    #[arg(long)]
    pub model: String,
    /// Training manifest (.jsonl / .csv) with `qa` question-answer pairs.
    #[arg(long)]
    pub manifest: PathBuf,
    #[command(flatten)]
    pub split: SplitArg,
    /// Output folder of the answerer.
    #[arg(long)]
    pub out: PathBuf,
    /// Passes over the training pairs (default 30; generative 5).
    #[arg(long, value_parser = crate::commands::at_least_one)]
    pub epochs: Option<usize>,
    /// Pairs per update (default 128; generative 64).
    #[arg(long, value_parser = crate::commands::at_least_one)]
    pub batch: Option<usize>,
    /// Hidden width of the classifier (default 256).
    #[arg(long, value_parser = crate::commands::at_least_one)]
    pub hidden: Option<usize>,
    /// Peak learning rate (default 2e-3).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Seed of initialisation and batch order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Embed the question with the frozen text tower only, without learned word vectors.
    #[arg(long)]
    pub no_question_words: bool,
    /// Also feed the image tower's patch tokens mean-pooled on a G x G grid (default 2;
    /// 0: only the pooled image embedding).
    #[arg(long)]
    pub image_grid: Option<usize>,
    /// Also feed the image's own grey levels averaged on a K x K grid, each image
    /// standardised by its own mean and spread (default 16; 0: none). Not with --generative.
    #[arg(long)]
    pub pixel_grid: Option<usize>,
    /// Train the generative variant: the report decoder writes the answer after the image
    /// prefix and the question (defaults: 5 epochs, batch 64, lr 2e-3).
    #[arg(long)]
    pub generative: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `medvlm vqa answer`.
#[derive(clap::Args, Debug)]
pub struct AnswerArgs {
    /// Answerer folder written by `medvlm vqa train`.
    #[arg(long)]
    pub answerer: PathBuf,
    /// The question.
    #[arg(long, short)]
    pub question: String,
    /// Image files.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `medvlm vqa eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Answerer folder written by `medvlm vqa train`.
    #[arg(long)]
    pub answerer: PathBuf,
    /// Test manifest with `qa` question-answer pairs.
    #[arg(long)]
    pub manifest: PathBuf,
    #[command(flatten)]
    pub split: SplitArg,
    #[command(flatten)]
    pub json: EvalJsonArg,
    /// Let every question get any training answer (default: a question seen in training
    /// only gets answers it had there).
    #[arg(long)]
    pub no_answer_mask: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Runs `medvlm vqa`.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        VqaCommand::Train(a) => train(a),
        VqaCommand::Answer(a) => answer(a),
        VqaCommand::Eval(a) => eval(a),
    }
}

fn train(a: TrainArgs) -> anyhow::Result<()> {
    if a.generative {
        return train_gen(a);
    }
    let device = a.device.device()?;
    let d = VqaConfig::default();
    let config = VqaConfig {
        epochs: a.epochs.unwrap_or(d.epochs),
        batch: a.batch.unwrap_or(d.batch),
        hidden: a.hidden.unwrap_or(d.hidden),
        lr: a.lr.unwrap_or(d.lr),
        seed: a.seed,
        question_words: !a.no_question_words,
        image_grid: a.image_grid.unwrap_or(d.image_grid),
        pixel_grid: a.pixel_grid.unwrap_or(d.pixel_grid),
        ..d
    };
    let opts = VqaTrainOptions {
        model_spec: a.model.clone(),
        config,
        split: a.split.split.clone(),
    };
    let t0 = std::time::Instant::now();
    let card = train_and_save(
        &a.manifest,
        &opts,
        &a.out,
        &device,
        &mut |which, e, loss| {
            let name = match which {
                Trained::Fused => "image+question",
                Trained::QuestionOnly => "question only",
            };
            eprintln!("{name} epoch {} loss {loss:.4}", e + 1)
        },
    )?;
    println!(
        "trained a VQA answerer on {} question-answer pairs ({} images, {} distinct questions, {} question words, {} answers) in {:.1} s; final loss {:.4} (question only {:.4})",
        card.n_train_pairs,
        card.n_train_images,
        card.n_train_questions,
        card.question_words.len(),
        card.answers.len(),
        t0.elapsed().as_secs_f64(),
        card.epoch_losses.last().copied().unwrap_or(f32::NAN),
        card.question_only_epoch_losses
            .last()
            .copied()
            .unwrap_or(f32::NAN)
    );
    println!("answerer written to {}", a.out.display());
    Ok(())
}

fn train_gen(a: TrainArgs) -> anyhow::Result<()> {
    if a.pixel_grid.is_some_and(|k| k > 0) {
        anyhow::bail!(
            "--pixel-grid feeds the classifier; the generative answerer does not take it"
        );
    }
    let device = a.device.device()?;
    let d = generative_config();
    let config = medvlm_tasks::report_generation::ReportGenConfig {
        epochs: a.epochs.unwrap_or(d.epochs),
        batch: a.batch.unwrap_or(d.batch),
        lr: a.lr.unwrap_or(d.lr),
        seed: a.seed,
        ..d
    };
    let opts = GenTrainOptions {
        model_spec: a.model.clone(),
        config,
        image_grid: a.image_grid.unwrap_or(VqaConfig::default().image_grid),
        split: a.split.split.clone(),
    };
    let t0 = std::time::Instant::now();
    let card = train_generative_and_save(&a.manifest, &opts, &a.out, &device, &mut |e, loss| {
        eprintln!("generative epoch {} loss {loss:.4}", e + 1)
    })?;
    println!(
        "trained a generative VQA answerer on {} question-answer pairs ({} words in the vocabulary, {} cut to {} tokens) in {:.1} s; final loss {:.4}",
        card.n_train_pairs,
        card.vocab_size,
        card.n_truncated,
        card.config.max_tokens,
        t0.elapsed().as_secs_f64(),
        card.epoch_losses.last().copied().unwrap_or(f32::NAN)
    );
    println!("answerer written to {}", a.out.display());
    Ok(())
}

fn answer(a: AnswerArgs) -> anyhow::Result<()> {
    let device = a.device.device()?;
    if is_generative(&a.answerer) {
        let (answers, warning) =
            answer_files_generative(&a.answerer, &a.images, &a.question, &device)?;
        warn(warning);
        for (img, ans) in a.images.iter().zip(answers) {
            println!("{}\t{ans}", img.display());
        }
        return Ok(());
    }
    let (answers, warning) = answer_files(&a.answerer, &a.images, &a.question, &device)?;
    warn(warning);
    for (img, ans) in a.images.iter().zip(answers) {
        println!("{}\t{}\t{:.3}", img.display(), ans.answer, ans.confidence);
    }
    Ok(())
}

fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let device = a.device.device()?;
    let (evaluation, warning) = if is_generative(&a.answerer) {
        let task = VqaTask::from_manifest(&a.manifest, a.split.get())?;
        let (model, m, warning) = GenVqaModel::load(&a.answerer, &device)?;
        (evaluate_generative(&model, &m, &task, &device)?, warning)
    } else {
        evaluate_manifest(
            &a.answerer,
            &a.manifest,
            a.split.get(),
            a.no_answer_mask.then_some(false),
            &device,
        )?
    };
    warn(warning);
    a.json.print(&evaluation.render_table(), &evaluation)?;
    Ok(())
}
