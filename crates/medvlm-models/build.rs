//! Turns on the AVX512-BF16 kernel of `src/bf16_gemm.rs` where the compiler has it: the
//! `avx512bf16` target feature and its intrinsics are stable since Rust 1.89, above the
//! workspace's rust-version (1.85). An older compiler builds without that kernel, and bf16 on
//! the CPU is then refused up front, as on a CPU without the instruction.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(medvlm_avx512bf16)");
    let ac = autocfg::new();
    if ac.probe_rustc_version(1, 89) {
        println!("cargo::rustc-cfg=medvlm_avx512bf16");
    }
    autocfg::rerun_path("build.rs");
}
