//! `medvlm bench embed`: image-embedding throughput and peak memory of a
//! full-size image tower with random weights (no checkpoint needed).
//!
//! The tower is BiomedCLIP's: a timm ViT (Dosovitskiy et al. 2021) with
//! class-token pooling and a bias-free linear projection to 512 dimensions.
//! `benchmarks/bench_embed_openclip.py` runs the same architecture in PyTorch
//! (open_clip's `TimmModel`) with the same batch and thread count, so the two
//! can be compared on one machine (see docs/benchmarks.md).
//!
//! Peak memory is the process's peak resident set size (`VmHWM` in
//! /proc/self/status, Linux only), which includes the binary and its
//! libraries; the RSS before building the model is printed next to it.

use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};

use crate::commands::progress::Progress;
use medvlm_models::timm_vit::{RandomVitTower, TimmVitConfig};

/// Architectures `bench embed` can build.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// ViT-B/16 at 224 px (timm `vit_base_patch16_224`, 86 M parameters).
    #[value(name = "vit-b16")]
    VitB16,
    /// ViT-B/32 at 224 px (timm `vit_base_patch32_224`).
    #[value(name = "vit-b32")]
    VitB32,
    /// ViT-S/16 at 224 px (timm `vit_small_patch16_224`).
    #[value(name = "vit-s16")]
    VitS16,
    /// ViT-L/16 at 224 px (timm `vit_large_patch16_224`).
    #[value(name = "vit-l16")]
    VitL16,
}

impl Arch {
    fn timm_name(self) -> &'static str {
        match self {
            Arch::VitB16 => "vit_base_patch16_224",
            Arch::VitB32 => "vit_base_patch32_224",
            Arch::VitS16 => "vit_small_patch16_224",
            Arch::VitL16 => "vit_large_patch16_224",
        }
    }
}

/// Compute dtype.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchDType {
    F32,
    Bf16,
    F16,
}

impl From<BenchDType> for DType {
    fn from(d: BenchDType) -> Self {
        match d {
            BenchDType::F32 => DType::F32,
            BenchDType::Bf16 => DType::BF16,
            BenchDType::F16 => DType::F16,
        }
    }
}

/// Arguments of `medvlm bench embed`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image tower architecture.
    #[arg(long, value_enum, default_value = "vit-b16")]
    pub arch: Arch,
    /// Images per batch.
    #[arg(long, default_value_t = 32, value_parser = crate::commands::at_least_one)]
    pub batch: usize,
    /// Timed batches (after the warm-up).
    #[arg(long, default_value_t = 3, value_parser = crate::commands::at_least_one)]
    pub batches: usize,
    /// Untimed warm-up batches.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// CPU threads (default: candle's default, the physical cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Compute dtype.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: BenchDType,
    /// Device: `cpu` or `cuda:N` (needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Projection dimension of the embeddings.
    #[arg(long, default_value_t = 512)]
    pub embed_dim: usize,
    /// Also print the result as one JSON line.
    #[arg(long)]
    pub json: bool,
}

/// A field of /proc/self/status in kiB (`VmHWM`, `VmRSS`), if available.
pub(crate) fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

fn parse_device(spec: &str) -> anyhow::Result<Device> {
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    if let Some(n) = spec.strip_prefix("cuda") {
        let ordinal = match n.strip_prefix(':') {
            Some(i) => i
                .parse::<usize>()
                .with_context(|| format!("bad CUDA ordinal in --device {spec:?}"))?,
            None if n.is_empty() => 0,
            None => bail!("unknown --device {spec:?} (expected cpu or cuda:N)"),
        };
        return Device::new_cuda(ordinal).with_context(|| {
            format!("cannot open CUDA device {ordinal} (was medvlm built with --features cuda?)")
        });
    }
    bail!("unknown --device {spec:?} (expected cpu or cuda:N)")
}

fn mib(kib: Option<u64>) -> String {
    kib.map(|k| format!("{:.0} MiB", k as f64 / 1024.0))
        .unwrap_or_else(|| "n/a".into())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.batch == 0 || args.batches == 0 {
        bail!("--batch and --batches must be at least 1");
    }
    if let Some(t) = args.threads {
        if t == 0 {
            bail!("--threads must be at least 1");
        }
        // candle sizes its CPU thread pool from these variables when it first
        // runs a kernel, which has not happened yet in this process.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", t.to_string());
    }
    let threads = candle_core::utils::get_num_threads();
    let device = parse_device(&args.device)?;
    let dtype: DType = args.dtype.into();
    // Refused before the weights are made, with what to use instead.
    medvlm_models::compute::check_compute_dtype(dtype, &device)
        .map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
    let cfg = TimmVitConfig::from_timm_name(args.arch.timm_name())
        .context("internal: architecture table")?;
    let rss_before_kib = proc_status_kib("VmRSS");

    let tower = RandomVitTower::new(&cfg, args.embed_dim, dtype, &device)
        .context("building the random-weight image tower")?;
    let params = tower.num_parameters();
    let s = cfg.image_size;
    let pixels = Tensor::randn(0f32, 1.0, (args.batch, 3, s, s), &device)?.to_dtype(dtype)?;

    let run_batch = || -> anyhow::Result<()> {
        let e = tower.embed(&pixels)?;
        // Force the computation to finish (asynchronous on CUDA).
        let _ = e.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        Ok(())
    };
    // Progress on stderr (a bar on a terminal, a line every MEDVLM_PROGRESS_SECS otherwise);
    // at most one line per interval, so it does not disturb the timing.
    let progress = Progress::new(
        "bench embed",
        (args.warmup + args.batches) as u64,
        "batches",
    );
    for _ in 0..args.warmup {
        run_batch()?;
        progress.inc(1);
    }
    let mut per_batch = Vec::with_capacity(args.batches);
    let start = Instant::now();
    for _ in 0..args.batches {
        let t = Instant::now();
        run_batch()?;
        per_batch.push(t.elapsed().as_secs_f64());
        progress.inc(1);
    }
    progress.finish();
    let total = start.elapsed().as_secs_f64();
    let images = (args.batch * args.batches) as f64;
    let throughput = images / total;
    let peak_kib = proc_status_kib("VmHWM");

    println!(
        "medvlm (candle) {} [timm {} + linear proj {}], {:.1} M params, {:?} on {}, {} threads",
        match args.arch {
            Arch::VitB16 => "vit-b16",
            Arch::VitB32 => "vit-b32",
            Arch::VitS16 => "vit-s16",
            Arch::VitL16 => "vit-l16",
        },
        args.arch.timm_name(),
        args.embed_dim,
        params as f64 / 1e6,
        dtype,
        args.device,
        threads
    );
    println!(
        "batch {}: {} warm-up + {} timed batches in {:.2} s -> {:.2} images/s (per batch: {})",
        args.batch,
        args.warmup,
        args.batches,
        total,
        throughput,
        per_batch
            .iter()
            .map(|t| format!("{t:.2} s"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "peak RSS (VmHWM) {}; RSS before building the model {}",
        mib(peak_kib),
        mib(rss_before_kib)
    );
    if args.json {
        let v = serde_json::json!({
            "impl": "medvlm-candle",
            "arch": args.arch.timm_name(),
            "batch": args.batch,
            "batches": args.batches,
            "warmup": args.warmup,
            "threads": threads,
            "dtype": format!("{dtype:?}"),
            "device": args.device,
            "params": params,
            "seconds": total,
            "images_per_s": throughput,
            "peak_rss_mib": peak_kib.map(|k| k as f64 / 1024.0),
            "rss_before_model_mib": rss_before_kib.map(|k| k as f64 / 1024.0),
        });
        println!("{v}");
    }
    Ok(())
}
