//! `medvlm bench io`: decode + preprocess throughput (images/s) with rayon.
//!
//! Each image is read with `load_any` (DICOM/NIfTI/raster decode, Modality LUT),
//! windowed, replicated to RGB and resized to the model input size, the same work
//! `to_model_input` does for training and inference. Without `--input`, a
//! synthetic set of 512x512 16-bit CT-like Secondary Capture DICOMs is written to a
//! temporary folder first (not timed).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use medvlm_io::preprocess::{to_model_input, InputOptions};
use rayon::prelude::*;

/// Arguments of `medvlm bench io`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Folder of images to read (every file medvlm recognises); default: synthetic DICOMs.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Number of synthetic images when --input is not given.
    #[arg(long, default_value_t = 64)]
    pub count: usize,
    /// Side of the synthetic images.
    #[arg(long, default_value_t = 512)]
    pub side: usize,
    /// Rayon worker threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Model input size.
    #[arg(long, default_value_t = 224)]
    pub size: usize,
    /// Window used in preprocessing.
    #[arg(long, default_value = "auto", allow_hyphen_values = true)]
    pub window: String,
    /// Passes over the file set (the first is a warm-up and not timed).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Start even when the synthetic files or the decoded images are estimated to exceed
    /// the free disk or the available memory.
    #[arg(long)]
    pub force: bool,
}

fn synthetic(dir: &std::path::Path, count: usize, side: usize) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::with_capacity(count);
    for k in 0..count {
        // a disc of soft tissue with a denser core in air, plus a ramp: CT-like HU + 1024
        let c = side as f32 / 2.0;
        let pixels: Vec<u16> = (0..side * side)
            .map(|i| {
                let (y, x) = ((i / side) as f32 - c, (i % side) as f32 - c);
                let r = (x * x + y * y).sqrt() / c;
                let base = if r < 0.8 { 1064.0 } else { 24.0 };
                let core = if r < 0.2 { 300.0 } else { 0.0 };
                (base + core + ((i + k * 7) % 97) as f32) as u16
            })
            .collect();
        let p = dir.join(format!("synthetic_{k:04}.dcm"));
        medvlm_io::dicom::write_secondary_capture(
            &p,
            &pixels,
            side,
            side,
            &medvlm_io::dicom::ScMetadata {
                modality: Some("CT".into()),
                rescale: Some((1.0, -1024.0)),
                ..Default::default()
            },
        )?;
        files.push(p);
    }
    Ok(files)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.threads == 0 || args.repeat == 0 {
        bail!("--threads and --repeat must be at least 1");
    }
    // Each worker holds one decoded image (u16 pixels, f32 values after the Modality LUT and
    // windowing: about 16 bytes a pixel) and its model input (f32 RGB, twice while resizing).
    let side = args.side as f64;
    let size = args.size as f64;
    medvlm_io::resources::ensure_memory(
        &format!(
            "bench io with {}-pixel images, model input {} and {} thread(s)",
            args.side, args.size, args.threads
        ),
        args.threads as f64 * (16.0 * side * side + 24.0 * size * size),
        args.force,
        "pass --force",
    )?;
    let tmp;
    let files: Vec<PathBuf> = match &args.input {
        Some(dir) => {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("listing {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && medvlm_io::detect_format(p).is_ok())
                .collect();
            v.sort();
            v
        }
        None => {
            tmp = std::env::temp_dir().join(format!("medvlm-bench-io-{}", std::process::id()));
            medvlm_io::resources::ensure_disk(
                &format!("{} synthetic {}-pixel DICOM files", args.count, args.side),
                args.count as f64 * (2.0 * side * side + 2048.0),
                &tmp,
                args.force,
                "pass --force",
            )?;
            std::fs::create_dir_all(&tmp)?;
            synthetic(&tmp, args.count, args.side)?
        }
    };
    if files.is_empty() {
        bail!("no readable image files found");
    }
    let opts = InputOptions {
        size: args.size,
        window: args.window.parse()?,
        ..Default::default()
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build()
        .context("building the rayon pool")?;
    // Every file read of the warm-up and the timed passes, so a long run in a log says how far
    // it is (one atomic add per file: nothing next to a decode).
    let timed = args.repeat.saturating_sub(1).max(1);
    let pb = crate::commands::progress::Progress::new(
        "bench io",
        (files.len() * (1 + 2 * timed)) as u64,
        "file reads",
    );
    // Files that fail are counted and reported, never silently dropped.
    let pass = |preprocess: bool| -> (usize, Vec<String>) {
        pool.install(|| {
            let results: Vec<Result<(), String>> = files
                .par_iter()
                .map(|p| {
                    let result =
                        medvlm_io::load_any(p)
                            .map_err(|e| e.to_string())
                            .and_then(|img| {
                                if preprocess {
                                    to_model_input(&img, &opts)
                                        .map_err(|e| format!("{}: {e}", p.display()))?;
                                }
                                Ok(())
                            });
                    pb.inc(1);
                    result
                })
                .collect();
            let errs: Vec<String> = results.into_iter().filter_map(|r| r.err()).collect();
            (files.len() - errs.len(), errs)
        })
    };
    let (_, errs) = pass(true); // warm-up
    for e in &errs {
        eprintln!("skipped: {e}");
    }
    let measure = |preprocess: bool| {
        let t = Instant::now();
        let mut n = 0;
        for _ in 0..timed {
            n += pass(preprocess).0;
        }
        (n, t.elapsed().as_secs_f64())
    };
    let (n_dec, t_dec) = measure(false);
    let (n_all, t_all) = measure(true);
    pb.finish();
    println!(
        "bench io: {} file(s){} x {timed} pass(es), {} rayon thread(s), input {}x{}, window {}",
        files.len(),
        if args.input.is_none() {
            format!(" (synthetic {0}x{0} 16-bit CT DICOM)", args.side)
        } else {
            String::new()
        },
        args.threads,
        args.size,
        args.size,
        args.window
    );
    println!(
        "  decode only:          {:>9.1} images/s ({n_dec} images in {t_dec:.3} s)",
        n_dec as f64 / t_dec
    );
    println!(
        "  decode + preprocess:  {:>9.1} images/s ({n_all} images in {t_all:.3} s)",
        n_all as f64 / t_all
    );
    if !errs.is_empty() {
        println!(
            "  {} file(s) failed and were skipped (listed on stderr)",
            errs.len()
        );
    }
    if args.input.is_none() {
        let _ = std::fs::remove_dir_all(files[0].parent().unwrap_or(std::path::Path::new(".")));
    }
    Ok(())
}
