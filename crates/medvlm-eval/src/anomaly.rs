//! Anomaly localisation metrics on per-pixel anomaly maps and ground-truth defect masks.
//!
//! * **Pixel AUROC** ([`pixel_auroc`]): every pixel of every image pooled, defect pixels
//!   positive (exact Mann-Whitney AUROC, ties averaged, as scikit-learn).
//! * **AUPRO** ([`aupro`], Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021),
//!   computed as the MVTec AD evaluation script computes it: the defect regions are the
//!   8-connected components of every ground-truth mask; at each distinct anomaly score taken
//!   as threshold, the per-region overlap (PRO: the share of a region's pixels at or above the
//!   threshold, averaged over every region of every image) is paired with the false-positive
//!   rate over every defect-free pixel; the PRO curve is integrated by the trapezoid rule up
//!   to an FPR limit (default 0.3, the last segment interpolated) and divided by the limit,
//!   so 1 is perfect and a random map scores about `limit / 2`. Pixel AUROC alone is
//!   dominated by the many normal pixels and hides false positives on small defects
//!   (APRIL-GAN's critique); AUPRO weighs every region equally.
//!
//! `tools/make_anomaly_reference.py` checks both against an implementation of the MVTec
//! procedure in numpy/scipy and scikit-learn.

use crate::auroc::auroc_binary;
use crate::error::{EvalError, Result};

/// The FPR limit of AUPRO in the MVTec AD protocol.
pub const DEFAULT_FPR_LIMIT: f64 = 0.3;

/// One image's anomaly map and ground-truth mask, row-major `height x width`.
#[derive(Debug, Clone, Copy)]
pub struct PixelMap<'a> {
    /// Anomaly score of each pixel (higher = more anomalous).
    pub scores: &'a [f32],
    /// True on defect pixels.
    pub defect: &'a [bool],
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

fn check(maps: &[PixelMap]) -> Result<()> {
    if maps.is_empty() {
        return Err(EvalError::Empty("anomaly maps"));
    }
    for m in maps {
        let n = m.height * m.width;
        if m.scores.len() != n {
            return Err(EvalError::LengthMismatch {
                what: "anomaly map",
                got: m.scores.len(),
                expected: n,
            });
        }
        if m.defect.len() != n {
            return Err(EvalError::LengthMismatch {
                what: "defect mask",
                got: m.defect.len(),
                expected: n,
            });
        }
        if let Some(p) = m.scores.iter().position(|v| !v.is_finite()) {
            return Err(EvalError::NonFinite {
                what: "anomaly map",
                position: p,
            });
        }
    }
    Ok(())
}

/// Pixel-level AUROC over every pixel of every map (`None` when no pixel, or every pixel, is a
/// defect).
pub fn pixel_auroc(maps: &[PixelMap]) -> Result<Option<f64>> {
    check(maps)?;
    let scores: Vec<f32> = maps.iter().flat_map(|m| m.scores.iter().copied()).collect();
    let defect: Vec<bool> = maps.iter().flat_map(|m| m.defect.iter().copied()).collect();
    auroc_binary(&scores, &defect)
}

/// 8-connected components of a mask: the component id (1-based) of each pixel (0 outside)
/// and the number of components.
pub fn connected_components(mask: &[bool], height: usize, width: usize) -> (Vec<u32>, usize) {
    let mut label = vec![0u32; mask.len()];
    let mut n = 0u32;
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || label[start] != 0 {
            continue;
        }
        n += 1;
        label[start] = n;
        stack.push(start);
        while let Some(p) = stack.pop() {
            let (y, x) = ((p / width) as isize, (p % width) as isize);
            for dy in -1..=1isize {
                for dx in -1..=1isize {
                    let (ny, nx) = (y + dy, x + dx);
                    if ny < 0 || nx < 0 || ny >= height as isize || nx >= width as isize {
                        continue;
                    }
                    let q = ny as usize * width + nx as usize;
                    if mask[q] && label[q] == 0 {
                        label[q] = n;
                        stack.push(q);
                    }
                }
            }
        }
    }
    (label, n as usize)
}

/// The PRO curve of a set of maps.
#[derive(Debug, Clone, PartialEq)]
pub struct ProCurve {
    /// False-positive rates, from 0, non-decreasing.
    pub fpr: Vec<f64>,
    /// Mean per-region overlap at each point.
    pub pro: Vec<f64>,
    /// Defect regions (8-connected components) over all masks.
    pub regions: usize,
}

/// The PRO curve: `(fpr, pro)` points from `(0, 0)`, one per distinct anomaly score (highest
/// first). `None` when there is no region or no normal pixel.
pub fn pro_curve(maps: &[PixelMap]) -> Result<Option<ProCurve>> {
    check(maps)?;
    let mut regions = 0usize;
    let mut labelled = Vec::with_capacity(maps.len());
    for m in maps {
        let (l, n) = connected_components(m.defect, m.height, m.width);
        labelled.push((l, n));
        regions += n;
    }
    let normal: usize = maps
        .iter()
        .map(|m| m.defect.iter().filter(|&&d| !d).count())
        .sum();
    if regions == 0 || normal == 0 {
        return Ok(None);
    }
    // Per pixel: its score, what it adds to the FPR, and what it adds to the mean PRO.
    let mut pixels: Vec<(f32, f64, f64)> = Vec::new();
    for (m, (l, n)) in maps.iter().zip(&labelled) {
        let mut sizes = vec![0usize; n + 1];
        for &k in l {
            sizes[k as usize] += 1;
        }
        for (i, &s) in m.scores.iter().enumerate() {
            let k = l[i] as usize;
            if k == 0 {
                pixels.push((s, 1.0 / normal as f64, 0.0));
            } else {
                pixels.push((s, 0.0, 1.0 / (regions as f64 * sizes[k] as f64)));
            }
        }
    }
    pixels.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut fpr = vec![0.0];
    let mut pro = vec![0.0];
    let (mut f, mut p) = (0.0f64, 0.0f64);
    for (i, &(s, df, dp)) in pixels.iter().enumerate() {
        f += df;
        p += dp;
        // One point per distinct score: after the last pixel of each score.
        if pixels.get(i + 1).is_none_or(|next| next.0 != s) {
            fpr.push(f.clamp(0.0, 1.0));
            pro.push(p.clamp(0.0, 1.0));
        }
    }
    Ok(Some(ProCurve { fpr, pro, regions }))
}

/// Area under the curve `y(x)` from `x[0]` to `x_max` by the trapezoid rule, the segment that
/// crosses `x_max` interpolated linearly (`x` non-decreasing).
fn trapezoid_up_to(x: &[f64], y: &[f64], x_max: f64) -> f64 {
    let mut area = 0.0;
    for i in 1..x.len() {
        let (x0, x1, y0, y1) = (x[i - 1], x[i], y[i - 1], y[i]);
        if x0 >= x_max {
            break;
        }
        if x1 > x_max {
            let y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0);
            area += (x_max - x0) * (y0 + y_at) / 2.0;
            break;
        }
        area += (x1 - x0) * (y0 + y1) / 2.0;
    }
    area
}

/// AUPRO up to `fpr_limit` (MVTec AD: 0.3), normalised to `[0, 1]`; `None` when the maps have no
/// defect region or no normal pixel.
pub fn aupro(maps: &[PixelMap], fpr_limit: f64) -> Result<Option<f64>> {
    if !(fpr_limit > 0.0 && fpr_limit <= 1.0) {
        return Err(EvalError::InvalidParameter {
            name: "fpr_limit",
            reason: format!("{fpr_limit} is not in (0, 1]"),
        });
    }
    Ok(pro_curve(maps)?.map(|c| trapezoid_up_to(&c.fpr, &c.pro, fpr_limit) / fpr_limit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_are_8_connected() {
        #[rustfmt::skip]
        let m = [
            true, false, false,
            false, true, false,
            false, false, false,
            true, true, false,
        ];
        let (l, n) = connected_components(&m, 4, 3);
        assert_eq!(n, 2);
        assert_eq!(l[0], l[4]);
        assert_ne!(l[0], l[9]);
        assert_eq!(l[9], l[10]);
    }

    #[test]
    fn a_perfect_map_scores_one_and_a_constant_map_half_the_limit() {
        let defect = [false, true, true, false, false, false, false, false, true];
        let perfect: Vec<f32> = defect.iter().map(|&d| if d { 1.0 } else { 0.0 }).collect();
        let m = PixelMap {
            scores: &perfect,
            defect: &defect,
            height: 3,
            width: 3,
        };
        assert!((aupro(&[m], 0.3).unwrap().unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(pixel_auroc(&[m]).unwrap(), Some(1.0));
        // One threshold: FPR and PRO jump together from 0 to 1; the area up to 0.3 is a
        // triangle of height 0.3, 0.045, divided by 0.3.
        let flat = [0.5f32; 9];
        let m = PixelMap { scores: &flat, ..m };
        assert!((aupro(&[m], 0.3).unwrap().unwrap() - 0.15).abs() < 1e-12);
        let none = [false; 9];
        let m = PixelMap { defect: &none, ..m };
        assert_eq!(aupro(&[m], 0.3).unwrap(), None);
        assert!(aupro(&[m], 0.0).is_err());
    }
}
