//! `medvlm pretrain`: not implemented yet (issue #5).

/// Arguments of `medvlm pretrain`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`medvlm pretrain` is not available yet (issue #5)")
}
