//! `medvlm adapt`: not implemented yet (issue #6).

/// Arguments of `medvlm adapt`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`medvlm adapt` is not available yet (issue #6)")
}
