//! `medvlm bench fewshot`: not implemented yet (issue #6).

/// Arguments of `medvlm bench fewshot`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`medvlm bench fewshot` is not available yet (issue #6)")
}
