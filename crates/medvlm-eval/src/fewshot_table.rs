//! Few-shot result tables: mean ± sample standard deviation over seeds, per method and
//! number of shots K, formatted as Markdown (for READMEs) or plain text.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// Mean and spread of one (method, K) cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeanStd {
    /// Arithmetic mean.
    pub mean: f64,
    /// Sample standard deviation (Bessel-corrected, `n - 1`); 0 when `n == 1`.
    pub std: f64,
    /// Number of runs (seeds).
    pub n: usize,
}

impl MeanStd {
    /// Summarises a set of runs; `None` for an empty slice.
    pub fn from_values(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let n = values.len();
        let mean = values.iter().sum::<f64>() / n as f64;
        let std = if n < 2 {
            0.0
        } else {
            (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        };
        Some(Self { mean, std, n })
    }
}

/// One row of raw results: a metric value per seed for a (method, K) pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FewShotResult {
    /// Method name (e.g. "linear-probe", "coop").
    pub method: String,
    /// Shots per class.
    pub shots: usize,
    /// Metric value for each seed.
    pub values: Vec<f64>,
}

/// A methods x shots table of [`MeanStd`] cells.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FewShotTable {
    /// Metric name shown in the header (e.g. "accuracy").
    pub metric: String,
    /// Methods in first-seen order.
    pub methods: Vec<String>,
    /// Shot counts, ascending.
    pub shots: Vec<usize>,
    /// `cells[m][k]` for `methods[m]` and `shots[k]`; `None` where no run exists.
    pub cells: Vec<Vec<Option<MeanStd>>>,
}

impl FewShotTable {
    /// Groups results by method and K. Several entries for the same pair are pooled.
    pub fn new(metric: &str, results: &[FewShotResult]) -> Self {
        let mut methods: Vec<String> = Vec::new();
        for r in results {
            if !methods.contains(&r.method) {
                methods.push(r.method.clone());
            }
        }
        let shots: Vec<usize> = results
            .iter()
            .map(|r| r.shots)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let cells = methods
            .iter()
            .map(|m| {
                shots
                    .iter()
                    .map(|&k| {
                        let values: Vec<f64> = results
                            .iter()
                            .filter(|r| &r.method == m && r.shots == k)
                            .flat_map(|r| r.values.iter().copied())
                            .collect();
                        MeanStd::from_values(&values)
                    })
                    .collect()
            })
            .collect();
        Self {
            metric: metric.to_string(),
            methods,
            shots,
            cells,
        }
    }

    /// Markdown table; values multiplied by `scale` (100 for percentages) with `decimals`
    /// digits, as `mean ± std`; missing cells are `–`.
    pub fn to_markdown(&self, scale: f64, decimals: usize) -> String {
        let mut out = format!("| method ({}) |", self.metric);
        for k in &self.shots {
            out.push_str(&format!(" K={k} |"));
        }
        out.push_str("\n|---|");
        for _ in &self.shots {
            out.push_str("---|");
        }
        out.push('\n');
        for (m, row) in self.methods.iter().zip(&self.cells) {
            out.push_str(&format!("| {m} |"));
            for cell in row {
                match cell {
                    Some(c) => out.push_str(&format!(
                        " {:.*} ± {:.*} |",
                        decimals,
                        c.mean * scale,
                        decimals,
                        c.std * scale
                    )),
                    None => out.push_str(" – |"),
                }
            }
            out.push('\n');
        }
        out
    }
}
