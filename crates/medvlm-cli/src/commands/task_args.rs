//! Flags and output shared by the task commands (`segment`, `detect`, `vqa`, `report`,
//! `anomaly`, `register`, `upscale`, `synthesize`): the manifest's `--split`, the `eval`
//! subcommands' `--json`, and how an evaluation and a library warning are printed.

use std::path::PathBuf;

use super::common::write_file;

/// `--split` of the commands that read a manifest's records.
#[derive(clap::Args, Debug, Clone)]
pub struct SplitArg {
    /// Only the records of this split of the manifest.
    #[arg(long)]
    pub split: Option<String>,
}

impl SplitArg {
    /// The split, if one was given.
    pub fn get(&self) -> Option<&str> {
        self.split.as_deref()
    }
}

/// `--json` of the `eval` subcommands.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalJsonArg {
    /// Also write the evaluation as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl EvalJsonArg {
    /// Prints the evaluation's table and, with `--json PATH`, writes it there as JSON
    /// (atomically) and says so.
    pub fn print<E: serde::Serialize>(&self, table: &str, evaluation: &E) -> anyhow::Result<()> {
        print!("{table}");
        if let Some(path) = &self.json {
            write_file(path, &serde_json::to_vec_pretty(evaluation)?)?;
            println!("evaluation written to {}", path.display());
        }
        Ok(())
    }
}

/// Prints a library's warning (e.g. a model whose files changed since training) on stderr.
pub fn warn(warning: Option<String>) {
    if let Some(w) = warning {
        eprintln!("warning: {w}");
    }
}
