//! `medvlm papers`: the field's literature (the list accompanying the 2025 review "Taming
//! Vision-Language Models for Medical Image Analysis", plus the papers of the methods medvlm
//! implements), filtered by task, strategy, modality and words, with the medvlm command and
//! doc page that runs each method or task ([`medvlm_papers`]).

use medvlm_papers::{catalogue, filter, parse_task, render_table, Filter, Strategy};

/// Arguments of `medvlm papers`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Task: models, method, classification, segmentation, detection, anomaly, registration,
    /// super-resolution, synthesis, report, vqa, retrieval, multi-task, other.
    #[arg(long)]
    task: Option<String>,
    /// Adaptation strategy: zero-shot, prompt-learning, adapters, fine-tuning, pretraining,
    /// architecture.
    #[arg(long)]
    strategy: Option<String>,
    /// Imaging modality, e.g. chest-xray (cxr), ct, mri, pathology (histology), fundus.
    #[arg(long)]
    modality: Option<String>,
    /// Words that must all appear in the title or model name (case-insensitive).
    #[arg(long, num_args = 1..)]
    search: Vec<String>,
    /// Only papers medvlm implements or runs, each with its command and doc page.
    #[arg(long)]
    implemented: bool,
    /// Print JSON (every field, the commands and doc pages included).
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let papers = catalogue()?;
    let task = match &args.task {
        Some(t) => Some(parse_task(t).map_err(|e| anyhow::anyhow!("--task: {e}"))?),
        None => None,
    };
    let strategy = match &args.strategy {
        Some(s) => Some(Strategy::parse(s).map_err(|e| anyhow::anyhow!("--strategy: {e}"))?),
        None => None,
    };
    let query = Filter {
        task,
        strategy,
        modality: args.modality.clone(),
        search: args
            .search
            .iter()
            .flat_map(|w| w.split_whitespace().map(str::to_string))
            .collect(),
    };
    let mut hits = filter(&papers, &query);
    if args.implemented {
        hits.retain(|p| !p.implemented_by.is_empty());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&hits)?);
        return Ok(());
    }
    if hits.is_empty() {
        println!("no paper matches (of {} in the catalogue)", papers.len());
        return Ok(());
    }
    print!("{}", render_table(&hits));
    let runnable: Vec<_> = hits
        .iter()
        .filter(|p| !p.implemented_by.is_empty())
        .collect();
    if !runnable.is_empty() {
        println!("\nIn medvlm:");
        for p in runnable {
            for i in &p.implemented_by {
                println!(
                    "  {:<48} {} ({}, {})",
                    truncate(p.display_title(), 48),
                    i.command,
                    i.relation.as_str(),
                    i.doc
                );
            }
        }
    }
    println!(
        "\n{} of {} papers; sources and annotation rules: data/literature/README.md",
        hits.len(),
        papers.len()
    );
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 3).collect();
        t.push_str("...");
        t
    }
}
