//! `medvlm predict`: not implemented yet (issue #6).

/// Arguments of `medvlm predict`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`medvlm predict` is not available yet (issue #6)")
}
