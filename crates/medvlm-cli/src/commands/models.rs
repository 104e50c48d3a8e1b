//! `medvlm models`: the presets of known medical VLMs, with hub id, family,
//! input size and licence. A preset name works wherever `--model` is asked
//! for; its files are read from the local hub cache (no download).

use medvlm_models::presets::PRESETS;

/// Arguments of `medvlm models`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.json {
        println!("{}", serde_json::to_string_pretty(PRESETS)?);
        return Ok(());
    }
    let w_name = PRESETS
        .iter()
        .map(|p| p.name.len())
        .max()
        .unwrap_or(4)
        .max(6);
    let w_hub = PRESETS
        .iter()
        .map(|p| p.hub_id.len())
        .max()
        .unwrap_or(6)
        .max(6);
    println!(
        "{:<w_name$}  {:<w_hub$}  {:<10}  {:>5}  licence",
        "preset", "hub id", "family", "input"
    );
    for p in PRESETS {
        println!(
            "{:<w_name$}  {:<w_hub$}  {:<10}  {:>5}  {}",
            p.name,
            p.hub_id,
            p.family.name(),
            p.input_size,
            p.licence
        );
    }
    println!(
        "\nUse a preset as `--model NAME` or `--model hf:HUB_ID`: files are read offline from \
         the hub cache ($HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub); a local \
         directory works too."
    );
    Ok(())
}
