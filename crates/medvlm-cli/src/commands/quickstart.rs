//! `medvlm quickstart [--out DIR]`: the offline first run. It parses the flags and calls
//! [`medvlm_train::quickstart::run`] (generate a phantom benchmark, pretrain a small CLIP,
//! evaluate it zero-shot and on retrieval, write `report.html`, `metrics.json` and `model/`),
//! showing its stages and a progress bar, then prints the summary. What it measures and how:
//! the library module's documentation and docs/quickstart.md.

use std::path::PathBuf;

use medvlm_train::quickstart::{QuickstartOptions, QuickstartProgress};
use medvlm_train::trainer::StepRecord;

use super::pretrain::{progress_bar, show_update};
use super::progress::Progress;

/// Arguments of `medvlm quickstart`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output directory (created; existing files of the same name are replaced).
    #[arg(long, default_value = "medvlm-quickstart")]
    pub out: PathBuf,
    /// Phantom studies to generate (all splits; modalities in turn).
    #[arg(long, default_value_t = 4000)]
    pub n: u64,
    /// Training epochs.
    #[arg(long, default_value_t = 16)]
    pub epochs: u64,
    /// Seed of the benchmark and of training.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Transformer width of the text tower, and of the ViT image tower (default 64; 32 with
    /// --tiny).
    #[arg(long)]
    pub width: Option<usize>,
    /// Transformer blocks per tower (default 3; 2 with --tiny).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Samples per update (default 64; 32 with --tiny).
    #[arg(long, value_parser = crate::commands::at_least_one)]
    pub batch: Option<usize>,
    /// Peak learning rate (default 2e-3).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Part of each phantom report used as text (training, validation and retrieval):
    /// report, impression or exam_impression (see docs/training.md, `data.text_section`).
    #[arg(long, value_parser = ["report", "impression", "exam_impression"])]
    pub text_section: Option<String>,
    /// Input size in pixels (default 64; 32 with --tiny); the phantoms are generated at it.
    #[arg(long)]
    pub image_size: Option<usize>,
    /// ViT patch size in pixels (default 8).
    #[arg(long)]
    pub patch: Option<usize>,
    /// Draw each batch from one modality (`data.batch_grouping = "group"`).
    #[arg(long)]
    pub group_batches: bool,
    /// Contrastive loss: clip, siglip or label_aware (default clip).
    #[arg(long)]
    pub loss: Option<String>,
    /// Image tower: resnet (CLIP's ModifiedResNet, the default) or vit.
    #[arg(long, value_parser = ["resnet", "vit"])]
    pub image_tower: Option<String>,
    /// ResNet stem width (default 32); the features have 32x as many channels.
    #[arg(long)]
    pub resnet_width: Option<usize>,
    /// A much smaller, faster variant (600 studies at 32 px, ViT and text towers of 2 layers,
    /// width 32) for tests and smoke runs; it learns less.
    #[arg(long)]
    pub tiny: bool,
}

/// Stage lines on stderr and the training bar.
struct CliProgress {
    bar: Option<Progress>,
}

impl QuickstartProgress for CliProgress {
    fn stage(&mut self, line: &str) {
        eprintln!("{line}");
    }
    fn training_start(&mut self, start: u64, total: u64) {
        let bar = self.bar.get_or_insert_with(progress_bar);
        bar.set_length(total);
        bar.start_at(start);
    }
    fn training_update(&mut self, record: &StepRecord) {
        if let Some(bar) = &self.bar {
            show_update(bar, record);
        }
    }
    fn validation(&mut self, epoch: u64, metrics: &serde_json::Value) {
        let line = format!("epoch {} validation: {metrics}", epoch + 1);
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }
    fn training_end(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let opts = QuickstartOptions {
        n: args.n,
        epochs: args.epochs,
        seed: args.seed,
        width: args.width,
        layers: args.layers,
        batch: args.batch,
        lr: args.lr,
        text_section: args.text_section,
        image_size: args.image_size,
        patch: args.patch,
        group_batches: args.group_batches,
        loss: args.loss,
        image_tower: args.image_tower,
        resnet_width: args.resnet_width,
        tiny: args.tiny,
    };
    let outcome = medvlm_train::quickstart::run(&opts, &args.out, &mut CliProgress { bar: None })?;
    println!("{}", outcome.summary());
    Ok(())
}
