//! `medvlm phantoms`: the synthetic phantom benchmark (issue #4).
//!
//! `medvlm phantoms generate --out DIR --n N --seed S [--modalities ...] [--size PX]`
//! writes deterministic synthetic studies (images, masks, boxes, reports, QA
//! pairs, low-resolution and deformed copies, a share as DICOM / NIfTI) and
//! medvlm-io manifests with train / val / test / test_heldout_site splits.
//! See `docs/phantoms.md`.
//!
//! `medvlm phantoms prompts --modality M [--style report|descriptive] [--out FILE]` writes the
//! zero-shot prompts of the modality's classes as the JSON that `--prompts` reads
//! (`medvlm zero-shot`, `adapt`, `bench fewshot`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use medvlm_phantoms::{
    write_dataset_with_progress, DatasetConfig, Modality, StudyOptions, MANIFEST_FILE,
};

use crate::commands::progress::Progress;

/// Synthetic phantom benchmark.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: PhantomsCommand,
}

#[derive(clap::Subcommand, Debug)]
enum PhantomsCommand {
    /// Generate a phantom dataset with ground truth for every task.
    Generate(GenerateArgs),
    /// Zero-shot prompts of a modality's classes, as JSON for `--prompts`.
    Prompts(PromptsArgs),
}

/// Arguments of `medvlm phantoms prompts`.
#[derive(clap::Args, Debug)]
pub struct PromptsArgs {
    /// Modality: chest_xray, brain_mri, dermoscopy or histology (short forms chest, brain,
    /// derm, histo).
    #[arg(long)]
    pub modality: String,
    /// `report`: every examination line + impression the reports can carry for the class
    /// (headers x severities x terms x locations), the form of a model trained on
    /// `data.text_section = "exam_impression"` (what `medvlm quickstart` evaluates with);
    /// `descriptive`: one sentence per class ("a brain MRI with an infarct").
    #[arg(long, default_value = "report", value_parser = ["report", "descriptive"])]
    pub style: String,
    /// Write the JSON here (atomically) instead of standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Arguments of `medvlm phantoms generate`.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Output folder (created; must be empty unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of studies, cycled over the modalities.
    #[arg(long, default_value_t = 1000)]
    pub n: u64,
    /// Random seed: the same seed gives byte-identical files.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Modalities, comma-separated: chest_xray, brain_mri, dermoscopy, histology
    /// (short forms chest, brain, derm, histo).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "chest_xray,brain_mri,dermoscopy,histology"
    )]
    pub modalities: Vec<String>,
    /// Image width and height in pixels (a multiple of 4, 32 to 1024).
    #[arg(long, default_value_t = 128)]
    pub size: u32,
    /// Most findings per study (1 gives single-label studies).
    #[arg(long, default_value_t = 3)]
    pub max_findings: usize,
    /// Share of normal studies, 0 to 1.
    #[arg(long, default_value_t = 0.25)]
    pub normal_fraction: f32,
    /// Write into an existing non-empty folder (same-name files are replaced,
    /// nothing else is deleted), and start even when the estimated size exceeds the free
    /// disk space.
    #[arg(long)]
    pub force: bool,
}

/// Parse modality names, naming the bad one.
pub fn parse_modalities(names: &[String]) -> anyhow::Result<Vec<Modality>> {
    let mut out: Vec<Modality> = Vec::new();
    for name in names.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let m: Modality = name
            .parse()
            .with_context(|| format!("in --modalities {}", names.join(",")))?;
        if !out.contains(&m) {
            out.push(m);
        }
    }
    if out.is_empty() {
        anyhow::bail!("--modalities is empty: give at least one of chest_xray, brain_mri, dermoscopy, histology");
    }
    Ok(out)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        PhantomsCommand::Generate(a) => generate(a),
        PhantomsCommand::Prompts(a) => prompts(a),
    }
}

fn prompts(a: PromptsArgs) -> anyhow::Result<()> {
    let modality: Modality = a
        .modality
        .parse()
        .with_context(|| format!("--modality {}", a.modality))?;
    let mut map = serde_json::Map::new();
    for class in modality.classes() {
        let prompts = if a.style == "report" {
            medvlm_phantoms::report_prompts(modality, class)
        } else {
            modality.class_prompt(class).map(|p| vec![p.to_string()])
        }
        .with_context(|| format!("{modality} has no prompts for its class {class}"))?;
        map.insert(class.to_string(), serde_json::json!(prompts));
    }
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(map))? + "\n";
    match &a.out {
        Some(path) => {
            medvlm_io::atomic::write_atomic(path, text.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "wrote the {} prompts of {modality} to {}",
                a.style,
                path.display()
            );
        }
        None => print!("{text}"),
    }
    Ok(())
}

fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let modalities = parse_modalities(&a.modalities)?;
    if !(0.0..=1.0).contains(&a.normal_fraction) {
        anyhow::bail!(
            "--normal-fraction must be between 0 and 1, got {}",
            a.normal_fraction
        );
    }
    if a.max_findings == 0 {
        anyhow::bail!("--max-findings must be at least 1");
    }
    let config = DatasetConfig {
        out: a.out.clone(),
        n: a.n,
        seed: a.seed,
        modalities,
        options: StudyOptions {
            size: a.size,
            max_findings: a.max_findings,
            normal_fraction: a.normal_fraction,
            ..Default::default()
        },
        force: a.force,
    };
    let start = Instant::now();
    let progress = Progress::new("generating", a.n, "studies");
    let summary = write_dataset_with_progress(&config, &|n| progress.inc(n));
    if summary.is_ok() {
        progress.finish();
    } else {
        progress.abandon();
    }
    let summary = summary.with_context(|| {
        format!(
            "generating {} phantom studies into {}",
            a.n,
            a.out.display()
        )
    })?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "wrote {} studies ({} files) to {} in {:.2} s ({:.0} studies/s)",
        summary.studies,
        summary.files,
        a.out.display(),
        secs,
        summary.studies as f64 / secs.max(1e-9)
    );
    let splits: Vec<String> = summary
        .per_split
        .iter()
        .map(|(s, n)| format!("{} {n}", s.name()))
        .collect();
    println!("splits: {}", splits.join(", "));
    let mods: Vec<String> = summary
        .per_modality
        .iter()
        .map(|(m, n)| format!("{} {n}", m.name()))
        .collect();
    println!("modalities: {}", mods.join(", "));
    println!(
        "findings: {} in {} abnormal studies; {} normal studies; {} DICOM and {} NIfTI copies",
        summary.findings,
        summary.studies - summary.normal_studies,
        summary.normal_studies,
        summary.dicom_files,
        summary.nifti_files
    );
    println!("manifest: {}", a.out.join(MANIFEST_FILE).display());
    Ok(())
}
