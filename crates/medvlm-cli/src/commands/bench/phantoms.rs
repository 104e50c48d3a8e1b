//! `medvlm bench phantoms`: not implemented yet (issue #4).

/// Arguments of `medvlm bench phantoms`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`medvlm bench phantoms` is not available yet (issue #4)")
}
