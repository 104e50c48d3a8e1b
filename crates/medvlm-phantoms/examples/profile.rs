//! Per-modality generation cost, single thread, CPU time (for profiling the
//! generator; the user-facing benchmark is `medvlm bench phantoms`):
//! `cargo run --release -p medvlm-phantoms --example profile -- [N] [SIZE]`.
use medvlm_phantoms::{generate_study, Modality, StudyOptions};

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|r| r.1).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // utime, stime are fields 12 and 13 after the state letter (which does not parse).
    (f.get(10).copied().unwrap_or(0.0) + f.get(11).copied().unwrap_or(0.0)) / 100.0
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let size: u32 = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(128);
    for registration in [true, false] {
        let opts = StudyOptions {
            size,
            registration,
            ..Default::default()
        };
        println!("registration copy: {registration}");
        for m in Modality::ALL {
            let c0 = cpu_seconds();
            let t0 = std::time::Instant::now();
            let mut bytes = 0;
            for i in 0..n {
                bytes += generate_study(m, 0, i, &opts).image.len();
            }
            let cpu = cpu_seconds() - c0;
            println!(
                "{:<11} {size} px: {:.2} ms cpu/study, {:.2} ms wall/study ({bytes} bytes)",
                m.name(),
                cpu * 1e3 / n as f64,
                t0.elapsed().as_secs_f64() * 1e3 / n as f64
            );
        }
    }
}
