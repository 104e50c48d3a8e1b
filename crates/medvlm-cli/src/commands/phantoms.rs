//! `medvlm phantoms generate`: not implemented yet (issue #4).

/// Arguments of `medvlm phantoms generate`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`medvlm phantoms generate` is not available yet (issue #4)")
}
