//! `medvlm data check MANIFEST`: validate a dataset before training. Prints counts
//! per split and class, missing and unreadable files, suspicious labels, and warns
//! when DICOM files carry patient-identifying attributes (names only, never values).
//! Exits non-zero when files are missing or unreadable, unless `--skip-bad`.

use std::path::PathBuf;

use anyhow::Context;
use medvlm_io::check::{check_manifest, describe_bad, usable_records, CheckOptions};

/// Arguments of `medvlm data check`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Manifest (.jsonl, .csv, .tsv) or a folder with one sub-folder per class.
    pub manifest: PathBuf,
    /// Report bad (missing/unreadable) files but exit 0 if some good ones remain.
    #[arg(long)]
    pub skip_bad: bool,
    /// Only check that files exist and look like a known format (no decoding).
    #[arg(long)]
    pub no_decode: bool,
    /// Treat suspicious labels and identifying DICOM attributes as errors.
    #[arg(long)]
    pub strict: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let m = medvlm_io::read_manifest(&args.manifest)
        .with_context(|| format!("reading manifest {}", args.manifest.display()))?;
    let rep = check_manifest(
        &m,
        CheckOptions {
            decode: !args.no_decode,
        },
    );
    println!("manifest: {} ({} records)", m.source.display(), rep.records);
    println!("split counts:");
    for (split, n) in &rep.per_split {
        println!("  {split:<8} {n}");
    }
    let any_class = rep.per_split_class.values().any(|c| !c.is_empty());
    if any_class {
        println!("class counts per split:");
        for (split, classes) in &rep.per_split_class {
            for (c, n) in classes {
                println!("  {split:<8} {c:<24} {n}");
            }
        }
    }
    let missing: Vec<_> = rep
        .bad()
        .filter(|f| matches!(f.problem, Some(medvlm_io::check::Problem::Missing)))
        .collect();
    let unreadable: Vec<_> = rep
        .bad()
        .filter(|f| matches!(f.problem, Some(medvlm_io::check::Problem::Unreadable(_))))
        .collect();
    println!("missing files: {}", missing.len());
    for f in &missing {
        println!("  {}", f.path.display());
    }
    println!("unreadable files: {}", unreadable.len());
    for f in &unreadable {
        println!("  {}", describe_bad(f));
    }
    let missing_masks: Vec<_> = rep
        .files
        .iter()
        .flat_map(|f| f.missing_masks.iter())
        .collect();
    if !missing_masks.is_empty() {
        println!("missing mask files: {}", missing_masks.len());
        for p in &missing_masks {
            println!("  {}", p.display());
        }
    }
    for f in &rep.files {
        for w in &f.warnings {
            println!("warning: {w}");
        }
    }
    println!("suspicious labels: {}", rep.suspicious.len());
    for s in &rep.suspicious {
        println!("  {s}");
    }
    if !rep.duplicates.is_empty() {
        println!("images listed more than once: {}", rep.duplicates.len());
    }
    let n_id = rep.n_identifying();
    if n_id > 0 {
        let mut attrs: std::collections::BTreeSet<&str> = Default::default();
        for f in &rep.files {
            attrs.extend(f.identifying.iter().copied());
        }
        println!(
            "PRIVACY WARNING: {n_id} DICOM file(s) carry patient-identifying attributes ({}); \
             de-identify them with `medvlm convert FILE --deidentify --out COPY.dcm` before sharing",
            attrs.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    let n_bad = rep.n_bad() + missing_masks.len();
    match usable_records(&m, &rep, args.skip_bad) {
        Err(e) => anyhow::bail!("{e}"),
        Ok((good, bad)) => {
            if !missing_masks.is_empty() && !args.skip_bad {
                anyhow::bail!(
                    "{} mask file(s) missing (use --skip-bad to continue)",
                    missing_masks.len()
                );
            }
            if !bad.is_empty() {
                println!(
                    "--skip-bad: skipping {} bad file(s), {} usable record(s) remain",
                    bad.len(),
                    good.len()
                );
                for b in &bad {
                    println!("  skipped {}", describe_bad(b));
                }
            }
            if good.is_empty() {
                anyhow::bail!("no usable records in {}", m.source.display());
            }
        }
    }
    if args.strict && (!rep.suspicious.is_empty() || n_id > 0) {
        anyhow::bail!(
            "--strict: {} suspicious label finding(s), {n_id} file(s) with identifying attributes",
            rep.suspicious.len()
        );
    }
    println!(
        "OK: {} record(s), {} bad file(s){}",
        rep.records,
        n_bad,
        if n_bad > 0 { " skipped" } else { "" }
    );
    Ok(())
}
