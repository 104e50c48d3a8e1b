//! `medvlm zero-shot`: not implemented yet (issue #2).

/// Arguments of `medvlm zero-shot`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`medvlm zero-shot` is not available yet (issue #2)")
}
