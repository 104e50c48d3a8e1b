//! `medvlm finetune`: not implemented yet (issue #5).

/// Arguments of `medvlm finetune`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`medvlm finetune` is not available yet (issue #5)")
}
