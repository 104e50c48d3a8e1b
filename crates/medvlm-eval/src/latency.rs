//! Latency summaries of benchmark and load-test timings.

/// The nearest-rank `q`-th percentile of `values` (`q` in percent, 0-100): the smallest
/// value such that at least `q` % of the values are at or below it, as load-testing tools
/// report p50/p99 (no interpolation, so the figure is a time that was really measured).
/// `NaN` for an empty slice.
pub fn nearest_rank_percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_takes_a_measured_value() {
        // 1..=100 ms: p50 is the 50th value, p99 the 99th, p100 the largest.
        let v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(nearest_rank_percentile(&v, 50.0), 50.0);
        assert_eq!(nearest_rank_percentile(&v, 99.0), 99.0);
        assert_eq!(nearest_rank_percentile(&v, 100.0), 100.0);
        assert_eq!(nearest_rank_percentile(&v, 0.0), 1.0);
        // 3 values: p50 is rank ceil(1.5) = 2, p99 rank 3 (no interpolation).
        assert_eq!(nearest_rank_percentile(&[0.3, 0.1, 0.2], 50.0), 0.2);
        assert_eq!(nearest_rank_percentile(&[0.3, 0.1, 0.2], 99.0), 0.3);
        assert!(nearest_rank_percentile(&[], 50.0).is_nan());
    }
}
