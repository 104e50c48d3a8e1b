//! `medvlm`: adapt vision-language foundation models to medical image analysis.
//!
//! Each subcommand lives in its own module under `commands/`, with a clap
//! `Args` struct and a `run` function; this file only wires them together and
//! turns errors into a message and a non-zero exit code (never a panic).

mod commands;

/// mimalloc instead of the system allocator: training allocates and frees megabyte-sized
/// tensors for every op, which glibc's malloc serves with fresh mmap'd pages (page faults and
/// TLB shootdowns on every step); mimalloc reuses them. Measured in docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Index of `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (libmimalloc-sys has no
/// constant for it); `allocator_options_tests` checks it reads mimalloc's documented default.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// Never return freed memory to the OS (mimalloc's `-1`).
const PURGE_DELAY_MS: std::os::raw::c_long = -1;

/// mimalloc returns freed pages to the OS after a delay (1 s, scaled up for arenas), and a
/// ViT-B batch frees and reallocates tens of MB per layer, so pages keep coming back fresh and
/// the kernel zeroes them: a quarter of `medvlm bench embed`'s time in a profile
/// (docs/benchmarks.md). Never purging keeps them for reuse; the process's memory then stays
/// at its high-water mark, which is its peak RSS anyway. An explicit `MIMALLOC_PURGE_DELAY`
/// in the environment wins.
fn allocator_options() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option of the allocator; mimalloc documents this call as
        // valid at any time.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
}

/// Flush subnormal floats to zero (x86-64 MXCSR: FTZ, bit 15, and DAZ, bit 6). Arithmetic on
/// subnormal values (below 1.2e-38 in f32) takes a microcode assist of ~100 cycles per
/// operation on x86, and training produces them as it converges. Set before any thread starts:
/// threads inherit the floating-point environment (POSIX `pthread_create`), so the rayon, gemm
/// and candle pools and the data loaders get it too. Values that small are below anything a
/// result depends on. `MEDVLM_KEEP_SUBNORMALS=1` leaves the default (for comparisons).
fn flush_subnormals() {
    #[cfg(target_arch = "x86_64")]
    if std::env::var_os("MEDVLM_KEEP_SUBNORMALS").is_none() {
        #[allow(deprecated)]
        // SAFETY: reads and writes this thread's MXCSR control register; setting FTZ and DAZ
        // changes only how subnormal values are rounded, and both bits exist on every x86-64
        // CPU (SSE2 is part of the baseline).
        unsafe {
            use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
            _mm_setcsr(_mm_getcsr() | (1 << 15) | (1 << 6));
        }
    }
}

/// End quietly when the reader of standard output goes away (`medvlm phantoms prompts |
/// head -1`), as Unix tools do. The Rust runtime ignores SIGPIPE, so a write to a closed pipe
/// fails with EPIPE and `println!` panics with a backtrace; with the default action restored
/// the kernel ends the process at that write instead. Files are written atomically (temp file +
/// rename), so being ended mid-run leaves no half-written output. The long-running server
/// (`medvlm serve`) must not inherit this (a client closing its socket would end the
/// process): [`ignore_sigpipe`] sets it back to ignored for that command.
fn restore_default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: sets the disposition of one signal before any thread starts; SIG_DFL is always
    // a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// SIGPIPE ignored again (as the Rust runtime sets it), for `medvlm serve`.
fn ignore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: sets the disposition of one signal before any thread starts; SIG_IGN is always
    // a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "medvlm",
    version,
    about = "Adapt vision-language foundation models (CLIP, SigLIP, BiomedCLIP, ...) to medical images",
    long_about = "Adapt vision-language foundation models to medical image analysis: load published \
                  VLMs, read DICOM/NIfTI/PNG data, adapt with zero-shot prompting, prompt learning, \
                  adapters, fine-tuning or continued pretraining, evaluate honestly, and serve.\n\n\
                  Start with `medvlm quickstart`: fully offline, on a built-in phantom benchmark."
)]
struct Cli {
    /// Log more (repeat for debug output); logs go to stderr.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Never use the network: a hub model (hf:ORG/NAME or a preset) must already be in the
    /// hub cache (the same as HF_HUB_OFFLINE=1).
    #[arg(long, global = true)]
    offline: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Offline first run: phantom data, pretrain a small CLIP, evaluate, write a report.
    Quickstart(commands::quickstart::Args),
    /// List presets of known medical VLMs (hub id, family, input size, licence).
    Models(commands::models::Args),
    /// Write image (and text) embeddings of a model to safetensors.
    Embed(commands::embed::Args),
    /// Zero-shot classification of images with class names or prompts.
    ZeroShot(commands::zero_shot::Args),
    /// Convert a DICOM / NIfTI / image file to PNG or NumPy .npy (with windowing).
    Convert(commands::convert::Args),
    /// Dataset tools: validate manifests.
    Data(commands::data::Args),
    /// Synthetic phantom benchmark.
    Phantoms(commands::phantoms::Args),
    /// Contrastive (CLIP / SigLIP) pretraining from a TOML config.
    Pretrain(commands::pretrain::Args),
    /// Encoder fine-tuning (full, partial, BitFit, LoRA) from a TOML config.
    Finetune(commands::finetune::Args),
    /// Adapt a model to a labelled few-shot support set with one method.
    Adapt(commands::adapt::Args),
    /// Predict with an adapted model.
    Predict(commands::predict::Args),
    /// Anomaly detection and localisation: a memory of normal patch features, maps,
    /// a threshold chosen on normal images.
    Anomaly(commands::anomaly::Args),
    /// Text-guided segmentation: train a head on frozen patch tokens, predict masks,
    /// evaluate against the similarity baseline.
    Segment(commands::segment::Args),
    /// Report generation: train a prefix-mapping decoder on image-report pairs, write reports,
    /// evaluate against the nearest-neighbour-report baseline.
    Report(commands::report::Args),
    /// Visual question answering: train a classifier over the training answers (or a
    /// generative decoder) on frozen image and question embeddings, answer questions, evaluate
    /// closed/open accuracy against question-only and majority baselines.
    Vqa(commands::vqa::Args),
    /// Multi-task learning: one shared trunk on a frozen tower with findings, VQA and report
    /// heads trained jointly with per-task loss weights, compared with single-task models.
    Multitask(commands::multitask::Args),
    /// Detection and phrase grounding: train an OWL-ViT-style box head on frozen patch
    /// tokens, box what a prompt names, evaluate against the heatmap and centre baselines.
    Detect(commands::detect::Args),
    /// Super-resolution of grey images (x2, x4): train an EDSR-style network over bicubic
    /// upsampling, evaluate PSNR/SSIM, upscale files.
    Upscale(commands::upscale::Args),
    /// Deformable registration: train a VoxelMorph-style network on image pairs, register
    /// a moving image onto a fixed one, evaluate against known fields.
    Register(commands::register::Args),
    /// Text-conditioned image synthesis: train a small conditional diffusion model on the
    /// VLM's prompt embeddings, sample with classifier-free guidance and DDIM, evaluate
    /// FID/KID in the VLM's feature space and a real-trained classifier on generated images.
    Synthesize(commands::synthesize::Args),
    /// Serve the model, adapted artefacts and task heads over HTTP (embeddings, zero-shot,
    /// predict, segment, anomaly, detect, report, upscale, register, answer).
    Serve(commands::serve::Args),
    /// Benchmarks (throughput, memory, few-shot sweeps).
    Bench(commands::bench::Args),
    /// The field's papers by task, strategy and modality, with the medvlm command that runs
    /// each method or task.
    Papers(commands::papers::Args),
    /// Build a retrieval index of study embeddings (HNSW + exact), also from shards.
    Index(commands::index::Args),
    /// The indexed studies nearest to a text or an image.
    Search(commands::search::Args),
}

fn main() {
    restore_default_sigpipe();
    flush_subnormals();
    allocator_options();
    let cli = Cli::parse();
    if matches!(cli.command, Command::Serve(_)) {
        ignore_sigpipe();
    }
    if cli.offline {
        // Before any thread starts; the model-source code reads it as huggingface_hub does.
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Quickstart(a) => commands::quickstart::run(a),
        Command::Models(a) => commands::models::run(a),
        Command::Embed(a) => commands::embed::run(a),
        Command::ZeroShot(a) => commands::zero_shot::run(a),
        Command::Convert(a) => commands::convert::run(a),
        Command::Data(a) => commands::data::run(a),
        Command::Phantoms(a) => commands::phantoms::run(a),
        Command::Pretrain(a) => commands::pretrain::run(a),
        Command::Finetune(a) => commands::finetune::run(a),
        Command::Adapt(a) => commands::adapt::run(a),
        Command::Predict(a) => commands::predict::run(a),
        Command::Anomaly(a) => commands::anomaly::run(a),
        Command::Segment(a) => commands::segment::run(a),
        Command::Report(a) => commands::report::run(a),
        Command::Vqa(a) => commands::vqa::run(a),
        Command::Multitask(a) => commands::multitask::run(a),
        Command::Detect(a) => commands::detect::run(a),
        Command::Upscale(a) => commands::upscale::run(a),
        Command::Register(a) => commands::register::run(a),
        Command::Synthesize(a) => commands::synthesize::run(a),
        Command::Serve(a) => commands::serve::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Papers(a) => commands::papers::run(a),
        Command::Index(a) => commands::index::run(a),
        Command::Search(a) => commands::search::run(a),
    };
    if let Err(err) = result {
        eprintln!("error: {}", error_report(&err));
        std::process::exit(1);
    }
}

/// The error and its causes on one line, each thing said once
/// ([`medvlm_io::guard::error_chain`]).
fn error_report(err: &anyhow::Error) -> String {
    medvlm_io::guard::error_chain(err.as_ref())
}

#[cfg(test)]
mod error_report_tests {
    use super::error_report;
    use anyhow::Context;

    #[test]
    fn repeated_paths_and_causes_are_said_once() {
        let io = std::io::Error::from(std::io::ErrorKind::IsADirectory);
        let inner = medvlm_io::IoError::os(std::path::Path::new("/tmp"), io);
        let err = Err::<(), _>(inner).context("reading /tmp").unwrap_err();
        assert_eq!(error_report(&err), "reading /tmp: is a directory");

        // Different information is kept, in order.
        let err = Err::<(), _>(anyhow::anyhow!("unreadable image"))
            .context("scan.dcm")
            .context("image features of m.jsonl")
            .unwrap_err();
        assert_eq!(
            error_report(&err),
            "image features of m.jsonl: scan.dcm: unreadable image"
        );
        let err = Err::<(), _>(anyhow::anyhow!("image scans/a.png: bad PNG signature"))
            .context("scans/a.png")
            .context("unreadable image")
            .unwrap_err();
        assert_eq!(
            error_report(&err),
            "unreadable image: scans/a.png: bad PNG signature"
        );
    }
}

fn init_logging(verbose: u8) {
    // hf-hub logs each exhausted retry at ERROR before returning the error that medvlm
    // then reports with its explanation; once is enough unless asked for more (-v).
    let default = match verbose {
        0 => "warn,hf_hub=off",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MEDVLM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour codes only on a terminal: in a log file they are noise (`\x1b[33m WARN`).
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[cfg(test)]
mod allocator_options_tests {
    #[test]
    fn purge_delay_index_names_mimallocs_purge_delay() {
        // mimalloc v3's documented default purge delay is 1000 ms; a wrong index would read
        // another option.
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            panic!("unset MIMALLOC_PURGE_DELAY to run this test");
        }
        let before = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(before, 1000);
        super::allocator_options();
        let after = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(after, super::PURGE_DELAY_MS);
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod subnormal_tests {
    #[test]
    fn subnormal_results_and_inputs_are_flushed_to_zero() {
        if std::env::var_os("MEDVLM_KEEP_SUBNORMALS").is_some() {
            panic!("unset MEDVLM_KEEP_SUBNORMALS to run this test");
        }
        let tiny = std::hint::black_box(1e-39f32); // subnormal: below f32::MIN_POSITIVE
        assert!(tiny > 0.0 && tiny < f32::MIN_POSITIVE);
        // Before: IEEE gradual underflow keeps it.
        assert_eq!(
            std::hint::black_box(tiny) * std::hint::black_box(1.0f32),
            tiny
        );
        std::thread::spawn(|| {
            super::flush_subnormals();
            // DAZ: a subnormal input reads as 0; FTZ: a subnormal result is written as 0.
            let one = std::hint::black_box(1.0f32);
            assert_eq!(std::hint::black_box(1e-39f32) * one, 0.0);
            let small = std::hint::black_box(1e-20f32);
            assert_eq!(small * small, 0.0);
            // A thread started afterwards inherits it.
            std::thread::spawn(|| {
                let small = std::hint::black_box(1e-20f32);
                assert_eq!(small * small, 0.0);
            })
            .join()
            .unwrap();
        })
        .join()
        .unwrap();
    }
}
