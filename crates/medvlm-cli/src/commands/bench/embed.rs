//! `medvlm bench embed`: embedding throughput, per-batch latency and peak memory of a
//! full-size image or text tower with random weights (no checkpoint needed).
//!
//! - `--tower image` (default): BiomedCLIP's image tower, a timm ViT (Dosovitskiy et al.
//!   2021) with class-token pooling and a bias-free linear projection to 512 dimensions.
//!   `benchmarks/bench_embed_openclip.py` runs the same architecture in PyTorch (open_clip's
//!   `TimmModel`).
//! - `--tower text`: open_clip ViT-B-16's text transformer at context 77 (`clip-b16`) or
//!   BiomedCLIP's PubMedBERT at context 256 (`pubmedbert`), see
//!   [`medvlm_models::random_towers`]; `benchmarks/bench_text_pytorch.py` is the PyTorch
//!   counterpart. Every text fills the context.
//!
//! Both PyTorch scripts take the same batch and thread count, so the two can be compared on
//! one machine (see docs/benchmarks.md). Batch-1 latency, the service's case, is
//! `--batch 1 --batches 100`: the p50 and p99 printed are over the timed batches
//! (nearest-rank percentiles).
//!
//! `--dtype bf16` on the CPU builds the tower in f32 and runs its linear layers in bf16 with
//! f32 accumulation ([`medvlm_models::bf16_gemm`]), everything else in f32; it needs a CPU
//! with AVX512-BF16 and is refused up front elsewhere. `--dtype int8` (CPU only) builds it in
//! f32 and quantises every linear layer whose input width is a multiple of 32 to Q8_0
//! ([`medvlm_models::LinearLayers::pack_linear_int8`]: int8 weights with one scale per block
//! of 32, inputs quantised in each product, candle's quantised matmul); the rest stays f32.
//!
//! Peak memory is the process's peak resident set size (`VmHWM` in
//! /proc/self/status, Linux only), which includes the binary and its
//! libraries; the RSS before building the model is printed next to it.

use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};

use crate::commands::progress::Progress;
use medvlm_models::compute::ComputePlan;
use medvlm_models::random_towers::RandomTextTower;
use medvlm_models::timm_vit::{RandomVitTower, TimmVitConfig};
use medvlm_models::LinearLayers;

/// Which tower `bench embed` runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tower {
    /// An image tower (architectures vit-*).
    Image,
    /// A text tower (architectures clip-b16, pubmedbert).
    Text,
}

impl Tower {
    fn name(self) -> &'static str {
        match self {
            Tower::Image => "image",
            Tower::Text => "text",
        }
    }
}

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
    /// open_clip ViT-B-16's text tower at context 77 (63.4 M parameters).
    #[value(name = "clip-b16")]
    ClipB16,
    /// BiomedCLIP's PubMedBERT-base text tower at context 256 (109.7 M parameters).
    #[value(name = "pubmedbert")]
    PubMedBert,
}

impl Arch {
    /// The timm name of an image architecture; `None` for a text one.
    fn timm_name(self) -> Option<&'static str> {
        match self {
            Arch::VitB16 => Some("vit_base_patch16_224"),
            Arch::VitB32 => Some("vit_base_patch32_224"),
            Arch::VitS16 => Some("vit_small_patch16_224"),
            Arch::VitL16 => Some("vit_large_patch16_224"),
            Arch::ClipB16 | Arch::PubMedBert => None,
        }
    }

    fn cli_name(self) -> &'static str {
        match self {
            Arch::VitB16 => "vit-b16",
            Arch::VitB32 => "vit-b32",
            Arch::VitS16 => "vit-s16",
            Arch::VitL16 => "vit-l16",
            Arch::ClipB16 => "clip-b16",
            Arch::PubMedBert => "pubmedbert",
        }
    }
}

/// Compute dtype.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchDType {
    /// f32 everywhere.
    F32,
    /// On a GPU: bf16 everywhere. On the CPU (needs AVX512-BF16): linear layers in bf16 with
    /// f32 accumulation, everything else f32 (norms, softmax, GELU, attention, patch
    /// convolution), as PyTorch's CPU autocast.
    Bf16,
    /// f16 everywhere, through candle's kernels.
    F16,
    /// CPU only: linear layers with int8 weights (GGML Q8_0, one f16 scale per 32 weights)
    /// and int8-quantised inputs through candle's quantised matmul, everything else f32.
    Int8,
}

impl From<BenchDType> for DType {
    fn from(d: BenchDType) -> Self {
        match d {
            BenchDType::F32 => DType::F32,
            BenchDType::Bf16 => DType::BF16,
            BenchDType::F16 => DType::F16,
            // Int8 is a treatment of f32 linear layers: the tower is built in f32.
            BenchDType::Int8 => DType::F32,
        }
    }
}

/// Arguments of `medvlm bench embed`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The tower to run (default: the tower of --arch, else image).
    #[arg(long, value_enum)]
    pub tower: Option<Tower>,
    /// Architecture (default: vit-b16 for the image tower, clip-b16 for the text tower).
    #[arg(long, value_enum)]
    pub arch: Option<Arch>,
    /// Images or texts per batch.
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
    /// Compute dtype. bf16 on the CPU means: linear layers in bf16 with f32 accumulation,
    /// everything else f32 (needs AVX512-BF16; refused otherwise). int8 (CPU only): linear
    /// layers with Q8_0 int8 weights and int8-quantised inputs, everything else f32.
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

/// The tower being measured and its fixed input batch.
enum BenchModel {
    Image {
        tower: RandomVitTower,
        pixels: Tensor,
        params: usize,
        label: String,
    },
    Text {
        tower: RandomTextTower,
        tokens: medvlm_models::vlm::TokenBatch,
        params: usize,
        label: String,
    },
}

/// The precision line of an int8 run: how many layers run in int8 and which stayed f32.
fn int8_precision(p: medvlm_models::Int8Packing) -> String {
    let mut out = format!(
        "INT8 (Q8_0) weights in {} linear layers, F32 elsewhere",
        p.int8
    );
    if !p.kept_f32.is_empty() {
        out += &format!(
            " ({} linear layers kept F32: input width not a multiple of {}, e.g. {})",
            p.kept_f32.len(),
            medvlm_models::linear::INT8_BLOCK,
            p.kept_f32[0]
        );
    }
    out
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
    if args.dtype == BenchDType::Int8 && args.device != "cpu" {
        bail!(
            "--dtype int8 is a CPU mode (candle's Q8_0 product), not for --device {}; on a GPU \
             use --dtype bf16 or f16",
            args.device
        );
    }
    let device = parse_device(&args.device)?;
    // Refused before the weights are made, with what to use instead.
    let plan = medvlm_models::compute::compute_plan(args.dtype.into(), &device)
        .map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
    let dtype = plan.storage_dtype();
    let bf16_linear = plan == ComputePlan::CpuBf16Linear;
    let int8 = args.dtype == BenchDType::Int8;
    let mut precision = plan.describe();
    let (tower, arch) = match (args.tower, args.arch) {
        (None | Some(Tower::Image), None) => (Tower::Image, Arch::VitB16),
        (Some(Tower::Text), None) => (Tower::Text, Arch::ClipB16),
        (Some(t), Some(a)) => (t, a),
        (None, Some(a)) if a.timm_name().is_some() => (Tower::Image, a),
        (None, Some(a)) => (Tower::Text, a),
    };
    if (tower == Tower::Image) != arch.timm_name().is_some() {
        bail!(
            "--arch {} is not a{} tower (image: vit-b16, vit-b32, vit-s16, vit-l16; \
             text: clip-b16, pubmedbert)",
            arch.cli_name(),
            if tower == Tower::Image {
                "n image"
            } else {
                " text"
            }
        );
    }
    let rss_before_kib = proc_status_kib("VmRSS");

    let model = match arch.timm_name() {
        Some(timm) => {
            let cfg =
                TimmVitConfig::from_timm_name(timm).context("internal: architecture table")?;
            let mut tower = RandomVitTower::new(&cfg, args.embed_dim, dtype, &device)
                .context("building the random-weight image tower")?;
            if bf16_linear {
                tower.pack_linear_bf16()?;
            }
            if int8 {
                precision = int8_precision(tower.pack_linear_int8()?);
            }
            let s = cfg.image_size;
            let pixels =
                Tensor::randn(0f32, 1.0, (args.batch, 3, s, s), &device)?.to_dtype(dtype)?;
            BenchModel::Image {
                params: tower.num_parameters(),
                tower,
                pixels,
                label: format!("[timm {timm} + linear proj {}]", args.embed_dim),
            }
        }
        None => {
            let (mut tower, params) = match arch {
                Arch::PubMedBert => RandomTextTower::pubmedbert(args.embed_dim, dtype, &device),
                _ => RandomTextTower::clip_b16(args.embed_dim, dtype, &device),
            }
            .context("building the random-weight text tower")?;
            if bf16_linear {
                tower.pack_linear_bf16()?;
            }
            if int8 {
                precision = int8_precision(tower.pack_linear_int8()?);
            }
            let tokens = tower.full_context_batch(args.batch, 0, &device)?;
            BenchModel::Text {
                label: format!(
                    "[context {}, proj {}]",
                    tower.context_length(),
                    args.embed_dim
                ),
                tower,
                tokens,
                params,
            }
        }
    };
    let (params, unit) = match &model {
        BenchModel::Image { params, .. } => (*params, "images"),
        BenchModel::Text { params, .. } => (*params, "texts"),
    };

    let run_batch = || -> anyhow::Result<()> {
        let e = match &model {
            BenchModel::Image { tower, pixels, .. } => tower.embed(pixels)?,
            BenchModel::Text { tower, tokens, .. } => tower.embed(tokens)?,
        };
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
    let items = (args.batch * args.batches) as f64;
    let throughput = items / total;
    let peak_kib = proc_status_kib("VmHWM");
    let p50 = medvlm_eval::latency::nearest_rank_percentile(&per_batch, 50.0);
    let p99 = medvlm_eval::latency::nearest_rank_percentile(&per_batch, 99.0);

    let label = match &model {
        BenchModel::Image { label, .. } | BenchModel::Text { label, .. } => label,
    };
    println!(
        "medvlm (candle) {} tower {} {label}, {:.1} M params, {} on {}, {} threads",
        tower.name(),
        arch.cli_name(),
        params as f64 / 1e6,
        precision,
        args.device,
        threads
    );
    println!(
        "batch {}: {} warm-up + {} timed batches in {:.2} s -> {:.2} {unit}/s \
         (per batch p50 {:.1} ms, p99 {:.1} ms)",
        args.batch,
        args.warmup,
        args.batches,
        total,
        throughput,
        p50 * 1e3,
        p99 * 1e3,
    );
    println!(
        "peak RSS (VmHWM) {}; RSS before building the model {}",
        mib(peak_kib),
        mib(rss_before_kib)
    );
    if args.json {
        let v = serde_json::json!({
            "impl": "medvlm-candle",
            "tower": tower.name(),
            "arch": arch.timm_name().unwrap_or(arch.cli_name()),
            "batch": args.batch,
            "batches": args.batches,
            "warmup": args.warmup,
            "threads": threads,
            "dtype": if int8 { "Int8".to_string() } else { format!("{:?}", DType::from(args.dtype)) },
            "precision": precision,
            "device": args.device,
            "params": params,
            "seconds": total,
            "items_per_s": throughput,
            "p50_ms": p50 * 1e3,
            "p99_ms": p99 * 1e3,
            "peak_rss_mib": peak_kib.map(|k| k as f64 / 1024.0),
            "rss_before_model_mib": rss_before_kib.map(|k| k as f64 / 1024.0),
        });
        println!("{v}");
    }
    Ok(())
}
