//! `medvlm bench io`: not implemented yet (issue #3).

/// Arguments of `medvlm bench io`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`medvlm bench io` is not available yet (issue #3)")
}
