//! `medvlm quickstart`: not implemented yet (issue #5).

/// Arguments of `medvlm quickstart`.
#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`medvlm quickstart` is not available yet (issue #5)")
}
