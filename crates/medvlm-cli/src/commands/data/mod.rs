//! `medvlm data ...`: dataset tools.

pub mod check;

/// Dataset tools.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: DataCommand,
}

#[derive(clap::Subcommand, Debug)]
enum DataCommand {
    /// Validate a manifest: counts per split and class, missing/unreadable files, suspicious labels.
    Check(check::Args),
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        DataCommand::Check(a) => check::run(a),
    }
}
