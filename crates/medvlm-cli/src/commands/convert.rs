//! `medvlm convert`: not implemented yet (issue #3).

/// Arguments of `medvlm convert`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`medvlm convert` is not available yet (issue #3)")
}
