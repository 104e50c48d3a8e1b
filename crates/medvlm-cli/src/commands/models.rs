//! `medvlm models`: not implemented yet (issue #2).

/// Arguments of `medvlm models`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`medvlm models` is not available yet (issue #2)")
}
