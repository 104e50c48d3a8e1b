//! `medvlm bench embed`, `bench io` and `bench phantoms`: progress lines when stderr is a file,
//! and (embed) bf16 on the CPU either running its linear layers in bf16 or, on a CPU without
//! AVX512-BF16, refused before any work, without a stack trace even under RUST_BACKTRACE=1.

use std::process::Command;

fn bench_embed(extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_medvlm"))
        .args([
            "bench", "embed", "--arch", "vit-s16", "--batch", "1", "--warmup", "1",
        ])
        .args(["--batches", "1", "--threads", "1"])
        .args(extra)
        .env("MEDVLM_PROGRESS_SECS", "0")
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap()
}

#[test]
fn bench_embed_reports_progress_and_refuses_an_unsupported_dtype_up_front() {
    let r = bench_embed(&[]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    assert!(err.contains("bench embed: 2/2 batches"), "{err}");
    assert!(String::from_utf8_lossy(&r.stdout).contains("images/s"));

    // bf16 on the CPU: linear layers in bf16 where the CPU has AVX512-BF16, else refused.
    let supported = medvlm_models::bf16_gemm::cpu_has_bf16_dot();
    let r = bench_embed(&["--dtype", "bf16"]);
    let err = String::from_utf8_lossy(&r.stderr);
    if supported {
        assert!(r.status.success(), "{err}");
        let out = String::from_utf8_lossy(&r.stdout);
        assert!(
            out.contains("BF16 linear layers (f32 accumulation), F32 elsewhere"),
            "{out}"
        );
    } else {
        assert!(!r.status.success());
        assert!(
            err.contains("--dtype") && err.contains("AVX512-BF16") && err.contains("use f32"),
            "{err}"
        );
        assert!(
            !err.contains("   0:") && !err.contains("bench embed:"),
            "refused before work: {err}"
        );
    }

    // f16 on the CPU: candle's kernels decide, as before (its convolution has no f16 path).
    let f16 = medvlm_models::compute::check_compute_dtype(
        candle_core::DType::F16,
        &candle_core::Device::Cpu,
    )
    .is_ok();
    let r = bench_embed(&["--dtype", "f16"]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.success(), f16, "{err}");
    if !f16 {
        assert!(err.contains("--dtype") && err.contains("use f32"), "{err}");
        assert!(
            !err.contains("   0:") && !err.contains("bench embed:"),
            "refused before work: {err}"
        );
    }
}

/// int8 on the CPU: every linear layer of ViT-S/16 (widths 384 and 1536, multiples of 32)
/// runs with Q8_0 weights, said in the output and the JSON; on a GPU device it is refused
/// before any work.
#[test]
fn bench_embed_int8_quantises_the_linear_layers_and_is_a_cpu_mode() {
    let r = bench_embed(&["--dtype", "int8", "--json"]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    let out = String::from_utf8_lossy(&r.stdout);
    // 12 blocks x (qkv, proj, fc1, fc2) + the projection head.
    assert!(
        out.contains("INT8 (Q8_0) weights in 49 linear layers, F32 elsewhere"),
        "{out}"
    );
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(v["dtype"], "Int8");
    assert!(v["items_per_s"].as_f64().unwrap() > 0.0);
    let r = bench_embed(&["--dtype", "int8", "--device", "cuda:0"]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success());
    assert!(
        err.contains("int8") && !err.contains("bench embed:") && !err.contains("   0:"),
        "{err}"
    );
}

/// `bench io` and `bench phantoms` say how far they are when stderr is a file, and keep their
/// tables on stdout.
#[test]
fn bench_io_and_phantoms_report_progress_in_a_log() {
    let run = |args: &[&str]| {
        let r = Command::new(env!("CARGO_BIN_EXE_medvlm"))
            .args(args)
            .env("MEDVLM_PROGRESS_SECS", "0")
            .output()
            .unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        (
            String::from_utf8_lossy(&r.stdout).to_string(),
            String::from_utf8_lossy(&r.stderr).to_string(),
        )
    };
    // 6 files: a warm-up and 2 x 1 timed passes = 18 reads.
    let (out, err) = run(&[
        "bench", "io", "--count", "6", "--side", "32", "--repeat", "2",
    ]);
    assert!(out.contains("decode + preprocess:"), "{out}");
    assert!(err.contains("bench io: 18/18 file reads (100 %)"), "{err}");
    assert!(
        !out.contains("file reads"),
        "progress belongs on stderr: {out}"
    );
    let (out, err) = run(&[
        "bench",
        "phantoms",
        "--n",
        "4",
        "--sizes",
        "32",
        "--no-write",
    ]);
    assert!(
        out.lines().any(|l| l.trim_start().starts_with("32 ")),
        "{out}"
    );
    assert!(err.contains("bench phantoms: 2/2 steps (100 %)"), "{err}");
    assert!(err.contains("32 px: 4 studies in memory"), "{err}");
}

/// The text towers are the published sizes: their parameter counts equal what PyTorch builds
/// for the same architectures (open_clip ViT-B-16's text tower: 63,428,096; BiomedCLIP's
/// PubMedBERT without pooler + mlp projection: 109,710,848, as printed by
/// `benchmarks/bench_text_pytorch.py --json`), and the JSON line carries latency percentiles.
#[test]
fn bench_embed_text_towers_have_the_published_sizes() {
    for (arch, params, context) in [
        ("clip-b16", 63_428_096u64, 77),
        ("pubmedbert", 109_710_848, 256),
    ] {
        let r = Command::new(env!("CARGO_BIN_EXE_medvlm"))
            .args([
                "bench", "embed", "--arch", arch, "--batch", "1", "--warmup", "0",
            ])
            .args(["--batches", "1", "--threads", "1", "--json"])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&r.stdout);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        assert!(
            out.contains(&format!("text tower {arch} [context {context}")),
            "{out}"
        );
        let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        assert_eq!(v["tower"], "text");
        assert_eq!(v["params"].as_u64(), Some(params), "{arch}");
        let (p50, p99) = (v["p50_ms"].as_f64().unwrap(), v["p99_ms"].as_f64().unwrap());
        assert!(
            p50 > 0.0 && p50 == p99,
            "one timed batch: p50 = p99 = its time ({p50}, {p99})"
        );
    }
}
