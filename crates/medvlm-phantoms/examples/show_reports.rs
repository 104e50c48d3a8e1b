//! Print a few studies' labels, reports and QA pairs:
//! `cargo run -p medvlm-phantoms --example show_reports -- [N]`.
use medvlm_phantoms::{generate_study, Modality, StudyOptions};

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let opts = StudyOptions {
        size: 64,
        ..Default::default()
    };
    for m in Modality::ALL {
        for i in 0..n {
            let s = generate_study(m, 1, i, &opts);
            println!(
                "{} {:?} site {} {:?}\n  {}",
                s.id,
                s.labels(),
                s.site,
                s.split,
                s.report
            );
            for f in &s.findings {
                println!(
                    "  - {} | {} | {} | {:.0} mm | {} | hedged {}",
                    f.label,
                    f.location,
                    f.laterality.name(),
                    f.size_mm,
                    f.severity.name(),
                    f.hedged
                );
            }
            for q in &s.qa {
                println!(
                    "  Q[{}{}] {} -> {}",
                    q.kind.name(),
                    if q.closed { ",closed" } else { "" },
                    q.question,
                    q.answer
                );
            }
        }
    }
}
