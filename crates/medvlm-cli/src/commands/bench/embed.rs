//! `medvlm bench embed`: not implemented yet (issue #2).

/// Arguments of `medvlm bench embed`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`medvlm bench embed` is not available yet (issue #2)")
}
