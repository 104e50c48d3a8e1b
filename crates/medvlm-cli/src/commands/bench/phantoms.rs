//! `medvlm bench phantoms`: phantom generation speed (issue #4).
//!
//! For each image size, measures studies per second on a rayon pool of
//! `--threads` threads: (1) generation in memory (image, masks, report, QA,
//! low-resolution copy, deformed copy and field), and (2) generation plus
//! writing every file and the manifests into a scratch folder (removed
//! afterwards). Target: >= 500 studies/s at 128 px on 2 cores.
//!
//! On a shared machine wall-clock rates understate the speed, so the bench
//! also reports the process CPU time per study (Linux `/proc/self/stat`,
//! all threads) and the rate `threads / cpu_seconds_per_study` that the same
//! work would reach on that many idle cores (assuming no other load and
//! perfect scaling: an estimate, labelled as such).

use std::time::Instant;

use anyhow::Context;
use medvlm_phantoms::{generate_studies, write_dataset, DatasetConfig, StudyOptions};

use crate::commands::phantoms::parse_modalities;

/// Arguments of `medvlm bench phantoms`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Studies per measurement.
    #[arg(long, default_value_t = 2000)]
    pub n: u64,
    /// Image sizes in pixels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "128,224")]
    pub sizes: Vec<u32>,
    /// Worker threads (the target is stated for 2).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Modalities, comma-separated (default: all four, cycled).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "chest_xray,brain_mri,dermoscopy,histology"
    )]
    pub modalities: Vec<String>,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Skip the write measurement.
    #[arg(long)]
    pub no_write: bool,
    /// Print the results as JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Start even when the studies held in memory (or written) are estimated to exceed the
    /// available memory (or free disk).
    #[arg(long)]
    pub force: bool,
}

/// CPU seconds (user + system, all threads) used by this process so far, on
/// Linux; `None` elsewhere.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields overall, in clock ticks (USER_HZ = 100 on Linux).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let modalities = parse_modalities(&args.modalities)?;
    if args.n == 0 {
        anyhow::bail!("--n must be at least 1");
    }
    if args.threads == 0 {
        anyhow::bail!("--threads must be at least 1");
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build()
        .context("building the thread pool")?;
    if !args.json {
        println!(
            "phantom generation, {} studies, {} thread(s), modalities {}",
            args.n,
            args.threads,
            modalities
                .iter()
                .map(|m| m.name())
                .collect::<Vec<_>>()
                .join(",")
        );
        println!(
            "{:>6} {:>14} {:>17} {:>22} {:>20}",
            "size",
            "in memory /s",
            "cpu ms per study",
            "idle-cores estimate /s",
            "with disk writes /s"
        );
    }
    // Three steps per size (warm-up, in memory, with writes); a line each in a log.
    let steps = if args.no_write { 2 } else { 3 };
    let pb = crate::commands::progress::Progress::new(
        "bench phantoms",
        (args.sizes.len() * steps) as u64,
        "steps",
    );
    for &size in &args.sizes {
        let opts = StudyOptions {
            size,
            ..Default::default()
        };
        opts.validate().with_context(|| format!("--sizes {size}"))?;
        let config = DatasetConfig {
            out: std::env::temp_dir().join(format!(
                "medvlm-bench-phantoms-{}-{size}",
                std::process::id()
            )),
            n: args.n,
            seed: args.seed,
            modalities: modalities.clone(),
            options: opts.clone(),
            force: args.force,
        };
        // Every study of a measurement is held in memory at once; its images, copies and
        // fields are about what the written dataset takes on disk uncompressed.
        medvlm_io::resources::ensure_memory(
            &format!("bench phantoms --n {} at {size} px", args.n),
            config.estimated_disk_bytes(),
            args.force,
            "pass --force",
        )?;
        // Warm-up (page faults, allocator) on a few studies.
        pb.set_message(format!("{size} px: warm-up"));
        pool.install(|| generate_studies(&modalities, args.seed, 8.min(args.n), &opts))?;
        pb.inc(1);
        pb.set_message(format!("{size} px: {} studies in memory", args.n));
        let t = Instant::now();
        let cpu0 = process_cpu_seconds();
        let studies = pool.install(|| generate_studies(&modalities, args.seed, args.n, &opts))?;
        let mem_rate = studies.len() as f64 / t.elapsed().as_secs_f64();
        let cpu_per_study = match (cpu0, process_cpu_seconds()) {
            (Some(a), Some(b)) if b > a => Some((b - a) / args.n as f64),
            _ => None,
        };
        let idle_estimate = cpu_per_study.map(|c| args.threads as f64 / c);
        drop(studies);
        pb.inc(1);
        let write_rate = if args.no_write {
            None
        } else {
            let dir = config.out.clone();
            pb.set_message(format!("{size} px: {} studies written", args.n));
            let t = Instant::now();
            let result = pool.install(|| write_dataset(&config));
            let secs = t.elapsed().as_secs_f64();
            let _ = std::fs::remove_dir_all(&dir);
            result.with_context(|| format!("writing to the scratch folder {}", dir.display()))?;
            pb.inc(1);
            Some(args.n as f64 / secs)
        };
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "bench": "phantoms",
                    "size": size,
                    "n": args.n,
                    "threads": args.threads,
                    "in_memory_studies_per_s": mem_rate,
                    "cpu_seconds_per_study": cpu_per_study,
                    "idle_cores_estimate_studies_per_s": idle_estimate,
                    "with_writes_studies_per_s": write_rate,
                })
            );
        } else {
            let w = write_rate
                .map(|r| format!("{r:.0}"))
                .unwrap_or_else(|| "-".into());
            let c = cpu_per_study
                .map(|c| format!("{:.2}", c * 1e3))
                .unwrap_or_else(|| "-".into());
            let e = idle_estimate
                .map(|r| format!("{r:.0}"))
                .unwrap_or_else(|| "-".into());
            println!("{size:>6} {mem_rate:>14.0} {c:>17} {e:>22} {w:>20}");
        }
    }
    pb.finish();
    Ok(())
}
