//! `medvlm data check`: not implemented yet (issue #3).

/// Arguments of `medvlm data check`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`medvlm data check` is not available yet (issue #3)")
}
