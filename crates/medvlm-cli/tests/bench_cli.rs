//! `medvlm bench embed`: progress lines when stderr is a file, and a dtype the device cannot
//! compute in refused before any work, without a stack trace even under RUST_BACKTRACE=1.

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

    let supported = medvlm_models::compute::check_compute_dtype(
        candle_core::DType::BF16,
        &candle_core::Device::Cpu,
    )
    .is_ok();
    let r = bench_embed(&["--dtype", "bf16"]);
    let err = String::from_utf8_lossy(&r.stderr);
    if supported {
        assert!(r.status.success(), "{err}");
    } else {
        assert!(!r.status.success());
        assert!(err.contains("--dtype") && err.contains("use f32"), "{err}");
        assert!(
            !err.contains("   0:") && !err.contains("bench embed:"),
            "refused before work: {err}"
        );
    }
}
