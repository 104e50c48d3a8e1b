//! Binary segmentation metrics on 2-D masks: Dice, IoU, Hausdorff distance (HD, HD95) and
//! average symmetric surface distance, with optional anisotropic pixel spacing.
//!
//! Masks are row-major slices of `rows * cols` values, either `bool` or `u8` (non-zero =
//! inside), with their shape given as `(rows, cols)`. Spacing is `(sy, sx)`: the physical
//! size (e.g. mm) of one pixel along the rows (axis 0) and along the columns (axis 1);
//! `None` means `(1.0, 1.0)`, i.e. distances in pixels.
//!
//! # Conventions (MONAI)
//!
//! The surface-distance metrics follow MONAI's `monai.metrics` (Cardoso et al. 2022, "MONAI:
//! An open-source framework for deep learning in healthcare", arXiv:2211.02701), i.e.
//! `compute_hausdorff_distance(percentile=95, directed=False, distance_metric="euclidean")`
//! built on `get_mask_edges` and `get_surface_distance`:
//!
//! 1. The *edges* of a mask are `mask XOR binary_erosion(mask)`, eroded with scipy's default
//!    structuring element (the 3x3 cross, 4-connected) and the image border treated as
//!    outside (scipy's `border_value=0`); see [`mask_edges`]. A foreground pixel on the image
//!    border is therefore always an edge pixel.
//! 2. The directed distances from A to B are the exact Euclidean distances, in physical
//!    units, from every edge pixel of A to the nearest edge pixel of B (scipy's
//!    `distance_transform_edt(~edges_B, sampling=spacing)` read at the edges of A); see
//!    [`SurfaceDistances`].
//! 3. HD95 is the larger of the two directed 95th percentiles, each with numpy's default
//!    (linear) interpolation ([`percentile`]); HD is the larger of the two directed maxima;
//!    the average symmetric surface distance (MONAI's
//!    `compute_average_surface_distance(symmetric=True)`) is the mean of both directions'
//!    distances together.
//!
//! MONAI computes these in `float32`; this module computes in `f64` and matches
//! numpy/scipy's `float64` results (checked to 1e-6 against
//! `tools/make_segmentation_reference.py`).
//!
//! medpy's `medpy.metric.binary.hd95` uses the same edges and distances but takes one 95th
//! percentile over the *pooled* distances of both directions, which is never larger than
//! MONAI's value and often smaller. It is offered as [`hausdorff95_pooled`], never as the
//! default.
//!
//! # Empty masks
//!
//! * [`dice`] and [`iou`] return `None` when **both** masks are empty (undefined: `0/0`). An
//!   empty ground truth with a non-empty prediction (or the reverse) scores `Some(0.0)`.
//!   (MONAI's `DiceMetric(ignore_empty=True)`, its default, gives NaN whenever the ground
//!   truth is empty; with `ignore_empty=False` it gives 1.0 when both are empty.)
//! * The surface-distance metrics return `None` when **either** mask is empty (MONAI returns
//!   NaN or infinity there).
//!
//! [`SegmentationSummary`] averages per label and counts, never hides, the undefined values.
//!
//! ```
//! use medvlm_eval::segmentation::{dice, hausdorff95, iou};
//! // A 1x4 line against its first pixel, in a 3x5 image.
//! let gt = [
//!     1, 1, 1, 1, 0, //
//!     0, 0, 0, 0, 0, //
//!     0, 0, 0, 0, 0u8,
//! ];
//! let mut pred = [0u8; 15];
//! pred[0] = 1;
//! assert_eq!(dice(&pred, &gt, (3, 5)).unwrap(), Some(2.0 / 5.0));
//! assert_eq!(iou(&pred, &gt, (3, 5)).unwrap(), Some(1.0 / 4.0));
//! // gt -> pred distances 0, 1, 2, 3: 95th percentile 2 + 0.85; pred -> gt: 0.
//! let hd95 = hausdorff95(&pred, &gt, (3, 5), None).unwrap().unwrap();
//! assert!((hd95 - 2.85).abs() < 1e-12);
//! // No surface distance to an empty mask.
//! assert_eq!(hausdorff95(&[0u8; 15], &gt, (3, 5), None).unwrap(), None);
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{check_len, EvalError, Result};

/// A mask pixel: `bool`, or `u8` where any non-zero value is inside.
pub trait MaskValue: Copy {
    /// Whether the pixel belongs to the object.
    fn is_inside(self) -> bool;
}

impl MaskValue for bool {
    fn is_inside(self) -> bool {
        self
    }
}

impl MaskValue for u8 {
    fn is_inside(self) -> bool {
        self != 0
    }
}

/// Pixel spacing `(sy, sx)`: physical size along the rows (axis 0) and the columns (axis 1).
pub type Spacing = (f64, f64);

fn check_mask<T>(what: &'static str, mask: &[T], shape: (usize, usize)) -> Result<()> {
    let (rows, cols) = shape;
    let n = rows
        .checked_mul(cols)
        .ok_or_else(|| EvalError::InvalidParameter {
            name: "shape",
            reason: format!("{rows} x {cols} overflows"),
        })?;
    check_len(what, mask.len(), n)
}

fn check_spacing(spacing: Option<Spacing>) -> Result<Spacing> {
    let (sy, sx) = spacing.unwrap_or((1.0, 1.0));
    if !(sy.is_finite() && sx.is_finite() && sy > 0.0 && sx > 0.0) {
        return Err(EvalError::InvalidParameter {
            name: "spacing",
            reason: format!("({sy}, {sx}) must be finite and positive"),
        });
    }
    Ok((sy, sx))
}

fn to_bools<T: MaskValue>(mask: &[T]) -> Vec<bool> {
    mask.iter().map(|&v| v.is_inside()).collect()
}

/// `(|pred|, |gt|, |pred & gt|)`.
fn overlap<T: MaskValue>(
    pred: &[T],
    gt: &[T],
    shape: (usize, usize),
) -> Result<(usize, usize, usize)> {
    check_mask("pred", pred, shape)?;
    check_mask("gt", gt, shape)?;
    let (mut np, mut ng, mut ni) = (0, 0, 0);
    for (&p, &g) in pred.iter().zip(gt) {
        let (p, g) = (p.is_inside(), g.is_inside());
        np += usize::from(p);
        ng += usize::from(g);
        ni += usize::from(p && g);
    }
    Ok((np, ng, ni))
}

/// Dice coefficient `2 |P ∩ G| / (|P| + |G|)`.
///
/// `None` when both masks are empty (undefined); `Some(0.0)` when exactly one is empty.
/// Errors when a mask's length is not `rows * cols`.
pub fn dice<T: MaskValue>(pred: &[T], gt: &[T], shape: (usize, usize)) -> Result<Option<f64>> {
    let (np, ng, ni) = overlap(pred, gt, shape)?;
    if np + ng == 0 {
        return Ok(None);
    }
    Ok(Some(2.0 * ni as f64 / (np + ng) as f64))
}

/// Intersection over union (Jaccard index) `|P ∩ G| / |P ∪ G|`.
///
/// `None` when both masks are empty (undefined); `Some(0.0)` when exactly one is empty.
/// Errors when a mask's length is not `rows * cols`.
pub fn iou<T: MaskValue>(pred: &[T], gt: &[T], shape: (usize, usize)) -> Result<Option<f64>> {
    let (np, ng, ni) = overlap(pred, gt, shape)?;
    let union = np + ng - ni;
    if union == 0 {
        return Ok(None);
    }
    Ok(Some(ni as f64 / union as f64))
}

/// The edge pixels of a mask: `mask XOR binary_erosion(mask)` with the 4-connected cross as
/// structuring element and everything outside the image counted as background (scipy's
/// defaults, as used by MONAI's `get_mask_edges`). A pixel is an edge pixel when it is inside
/// and at least one of its 4 neighbours is outside the mask or outside the image.
pub fn mask_edges<T: MaskValue>(mask: &[T], shape: (usize, usize)) -> Result<Vec<bool>> {
    check_mask("mask", mask, shape)?;
    Ok(edges_of(&to_bools(mask), shape))
}

fn edges_of(mask: &[bool], (rows, cols): (usize, usize)) -> Vec<bool> {
    let at = |r: usize, c: usize| mask[r * cols + c];
    let mut edges = vec![false; mask.len()];
    for r in 0..rows {
        for c in 0..cols {
            if !at(r, c) {
                continue;
            }
            let interior = r > 0
                && r + 1 < rows
                && c > 0
                && c + 1 < cols
                && at(r - 1, c)
                && at(r + 1, c)
                && at(r, c - 1)
                && at(r, c + 1);
            edges[r * cols + c] = !interior;
        }
    }
    edges
}

/// One pass of the Felzenszwalb-Huttenlocher lower envelope: `out[p] = min_q f[q] + w2 (p-q)^2`
/// over the finite `f[q]`; all infinite when no `f[q]` is finite.
fn edt_1d(f: &[f64], w2: f64, out: &mut [f64], v: &mut Vec<usize>, z: &mut Vec<f64>) {
    v.clear();
    z.clear();
    for (q, &fq) in f.iter().enumerate() {
        if !fq.is_finite() {
            continue;
        }
        let hq = fq + w2 * (q * q) as f64;
        loop {
            match v.last() {
                None => {
                    v.push(q);
                    z.push(f64::NEG_INFINITY);
                    break;
                }
                Some(&p) => {
                    let hp = f[p] + w2 * (p * p) as f64;
                    let s = (hq - hp) / (2.0 * w2 * (q - p) as f64);
                    if s <= *z.last().expect("z and v have the same length") {
                        v.pop();
                        z.pop();
                    } else {
                        v.push(q);
                        z.push(s);
                        break;
                    }
                }
            }
        }
    }
    if v.is_empty() {
        out.fill(f64::INFINITY);
        return;
    }
    let mut j = 0;
    for (p, o) in out.iter_mut().enumerate() {
        while j + 1 < v.len() && z[j + 1] < p as f64 {
            j += 1;
        }
        let d = p.abs_diff(v[j]) as f64;
        *o = f[v[j]] + w2 * d * d;
    }
}

/// Exact Euclidean distance from every pixel to the nearest `true` pixel of `features`, with
/// spacing `(sy, sx)` (`None`: 1, 1); `+inf` everywhere when `features` has no `true` pixel.
///
/// This is scipy's `distance_transform_edt(~features, sampling=spacing)`, computed with the
/// separable algorithm of Felzenszwalb & Huttenlocher (2012, "Distance transforms of sampled
/// functions") in `O(rows * cols)`.
pub fn distance_to_nearest(
    features: &[bool],
    shape: (usize, usize),
    spacing: Option<Spacing>,
) -> Result<Vec<f64>> {
    check_mask("features", features, shape)?;
    let (sy, sx) = check_spacing(spacing)?;
    Ok(edt(features, shape, (sy, sx)))
}

fn edt(features: &[bool], (rows, cols): (usize, usize), (sy, sx): Spacing) -> Vec<f64> {
    let mut sq = vec![0.0f64; rows * cols];
    let (mut v, mut z) = (Vec::new(), Vec::new());
    // Along each column (axis 0, weight sy^2).
    let mut f = vec![0.0; rows];
    let mut out = vec![0.0; rows];
    for c in 0..cols {
        for r in 0..rows {
            f[r] = if features[r * cols + c] {
                0.0
            } else {
                f64::INFINITY
            };
        }
        edt_1d(&f, sy * sy, &mut out, &mut v, &mut z);
        for r in 0..rows {
            sq[r * cols + c] = out[r];
        }
    }
    // Along each row (axis 1, weight sx^2).
    let mut out = vec![0.0; cols];
    for r in 0..rows {
        let row = &mut sq[r * cols..(r + 1) * cols];
        edt_1d(row, sx * sx, &mut out, &mut v, &mut z);
        row.copy_from_slice(&out);
    }
    sq.iter_mut().for_each(|d| *d = d.sqrt());
    sq
}

/// numpy's default `np.percentile(values, q)` ("linear" interpolation between the two
/// nearest order statistics). `q` is in `[0, 100]`; `values` need not be sorted.
/// Errors when `values` is empty, contains NaN, or `q` is outside `[0, 100]`.
pub fn percentile(values: &[f64], q: f64) -> Result<f64> {
    if values.is_empty() {
        return Err(EvalError::Empty("percentile of no values"));
    }
    if !(0.0..=100.0).contains(&q) {
        return Err(EvalError::InvalidParameter {
            name: "percentile",
            reason: format!("{q} is not in [0, 100]"),
        });
    }
    if values.iter().any(|v| v.is_nan()) {
        return Err(EvalError::InvalidParameter {
            name: "values",
            reason: "contains NaN".into(),
        });
    }
    let mut s = values.to_vec();
    s.sort_by(f64::total_cmp);
    Ok(percentile_sorted(&s, q))
}

fn percentile_sorted(s: &[f64], q: f64) -> f64 {
    let n = s.len();
    let idx = q / 100.0 * (n - 1) as f64;
    let lo = (idx.floor() as usize).min(n - 1);
    let hi = (lo + 1).min(n - 1);
    let t = idx - lo as f64;
    let (a, b) = (s[lo], s[hi]);
    if a == b {
        return a;
    }
    // numpy's _lerp: symmetric form, exact at both ends.
    let diff = b - a;
    if t >= 0.5 {
        b - diff * (1.0 - t)
    } else {
        a + diff * t
    }
}

/// The directed surface distances between the edges of two non-empty masks, from which every
/// surface-distance metric of this module is a reduction (compute once, reduce several times).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SurfaceDistances {
    /// For every edge pixel of the prediction (row-major order), the distance to the nearest
    /// edge pixel of the ground truth.
    pub pred_to_gt: Vec<f64>,
    /// For every edge pixel of the ground truth, the distance to the nearest edge pixel of the
    /// prediction.
    pub gt_to_pred: Vec<f64>,
}

impl SurfaceDistances {
    /// Edges by [`mask_edges`], distances by [`distance_to_nearest`]. `None` when either mask
    /// is empty (no surface to measure to). Errors on a length/shape mismatch or a
    /// non-positive or non-finite spacing.
    pub fn compute<T: MaskValue>(
        pred: &[T],
        gt: &[T],
        shape: (usize, usize),
        spacing: Option<Spacing>,
    ) -> Result<Option<Self>> {
        check_mask("pred", pred, shape)?;
        check_mask("gt", gt, shape)?;
        let spacing = check_spacing(spacing)?;
        let (pred, gt) = (to_bools(pred), to_bools(gt));
        if !pred.iter().any(|&p| p) || !gt.iter().any(|&g| g) {
            return Ok(None);
        }
        let (ep, eg) = (edges_of(&pred, shape), edges_of(&gt, shape));
        let (dp, dg) = (edt(&ep, shape, spacing), edt(&eg, shape, spacing));
        let read = |edges: &[bool], dist: &[f64]| -> Vec<f64> {
            edges
                .iter()
                .zip(dist)
                .filter(|(&e, _)| e)
                .map(|(_, &d)| d)
                .collect()
        };
        Ok(Some(Self {
            pred_to_gt: read(&ep, &dg),
            gt_to_pred: read(&eg, &dp),
        }))
    }

    /// MONAI's percentile Hausdorff distance: the larger of the two directed `q`-th
    /// percentiles ([`percentile`]). Errors when `q` is outside `[0, 100]`.
    pub fn hausdorff_percentile(&self, q: f64) -> Result<f64> {
        Ok(percentile(&self.pred_to_gt, q)?.max(percentile(&self.gt_to_pred, q)?))
    }

    /// The Hausdorff distance: the largest distance in either direction.
    pub fn hausdorff(&self) -> f64 {
        self.pred_to_gt
            .iter()
            .chain(&self.gt_to_pred)
            .fold(0.0, |m, &d| m.max(d))
    }

    /// The average symmetric surface distance: the mean of both directions' distances
    /// together (MONAI's `compute_average_surface_distance(symmetric=True)`).
    pub fn average_symmetric(&self) -> f64 {
        let n = self.pred_to_gt.len() + self.gt_to_pred.len();
        let sum: f64 = self.pred_to_gt.iter().chain(&self.gt_to_pred).sum();
        sum / n as f64
    }

    /// medpy's variant: the `q`-th percentile of both directions' distances pooled together.
    /// Errors when `q` is outside `[0, 100]`.
    pub fn pooled_percentile(&self, q: f64) -> Result<f64> {
        let mut all = self.pred_to_gt.clone();
        all.extend_from_slice(&self.gt_to_pred);
        percentile(&all, q)
    }
}

/// HD95 with MONAI's convention (`compute_hausdorff_distance(percentile=95)`): the larger of
/// the two directed 95th percentiles of the edge-to-edge distances, in the units of
/// `spacing` (pixels when `None`). `None` when either mask is empty. See the module docs.
pub fn hausdorff95<T: MaskValue>(
    pred: &[T],
    gt: &[T],
    shape: (usize, usize),
    spacing: Option<Spacing>,
) -> Result<Option<f64>> {
    SurfaceDistances::compute(pred, gt, shape, spacing)?
        .map(|s| s.hausdorff_percentile(95.0))
        .transpose()
}

/// The (maximum) Hausdorff distance between the mask edges, in the units of `spacing`.
/// `None` when either mask is empty.
pub fn hausdorff<T: MaskValue>(
    pred: &[T],
    gt: &[T],
    shape: (usize, usize),
    spacing: Option<Spacing>,
) -> Result<Option<f64>> {
    Ok(SurfaceDistances::compute(pred, gt, shape, spacing)?.map(|s| s.hausdorff()))
}

/// The average symmetric surface distance (MONAI's
/// `compute_average_surface_distance(symmetric=True)`), in the units of `spacing`.
/// `None` when either mask is empty.
pub fn average_surface_distance<T: MaskValue>(
    pred: &[T],
    gt: &[T],
    shape: (usize, usize),
    spacing: Option<Spacing>,
) -> Result<Option<f64>> {
    Ok(SurfaceDistances::compute(pred, gt, shape, spacing)?.map(|s| s.average_symmetric()))
}

/// medpy's HD95 (`medpy.metric.binary.hd95`): the 95th percentile of the pooled distances of
/// both directions. Never larger than [`hausdorff95`] (MONAI's convention, this module's
/// default), and often smaller when one direction has a long tail. `None` when either mask
/// is empty (medpy raises there).
pub fn hausdorff95_pooled<T: MaskValue>(
    pred: &[T],
    gt: &[T],
    shape: (usize, usize),
    spacing: Option<Spacing>,
) -> Result<Option<f64>> {
    SurfaceDistances::compute(pred, gt, shape, spacing)?
        .map(|s| s.pooled_percentile(95.0))
        .transpose()
}

/// One evaluated mask pair of a labelled structure.
#[derive(Debug, Clone, Copy)]
pub struct SegmentationCase<'a, T> {
    /// The structure (class) name, e.g. `"liver"`.
    pub label: &'a str,
    /// Predicted mask, row-major `rows * cols`.
    pub pred: &'a [T],
    /// Ground-truth mask, row-major `rows * cols`.
    pub gt: &'a [T],
    /// `(rows, cols)`.
    pub shape: (usize, usize),
    /// `(sy, sx)`; `None` means `(1, 1)`.
    pub spacing: Option<Spacing>,
}

/// Per-label means over the cases where each metric is defined.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelStats {
    /// Number of cases of this label.
    pub n: usize,
    /// Mean Dice over the cases where it is defined; `None` when it is defined for none.
    pub mean_dice: Option<f64>,
    /// Mean IoU over the cases where it is defined (the same cases as Dice).
    pub mean_iou: Option<f64>,
    /// Mean HD95 (MONAI convention, units of the spacing) over the cases where it is defined.
    pub mean_hd95: Option<f64>,
    /// Cases where Dice and IoU are undefined (both masks empty).
    pub n_undefined_dice: usize,
    /// Cases where HD95 is undefined (either mask empty).
    pub n_undefined_hd95: usize,
}

/// Per-label and macro-averaged segmentation metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentationSummary {
    /// Total number of cases.
    pub n_cases: usize,
    /// Statistics of each label, by label name.
    pub per_label: BTreeMap<String, LabelStats>,
    /// Macro average of the labels' `mean_dice` (labels whose mean is `None` are skipped);
    /// `None` when no label has a defined mean.
    pub mean_dice: Option<f64>,
    /// Macro average of the labels' `mean_iou`, as for `mean_dice`.
    pub mean_iou: Option<f64>,
    /// Macro average of the labels' `mean_hd95`, as for `mean_dice`.
    pub mean_hd95: Option<f64>,
}

fn mean_of(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for v in values.into_iter().flatten() {
        sum += v;
        n += 1;
    }
    (n > 0).then(|| sum / n as f64)
}

impl SegmentationSummary {
    /// Dice, IoU and HD95 of every case, averaged per label and then over labels. Undefined
    /// values (see the module docs) are skipped and counted in [`LabelStats`]. Errors on an
    /// empty list, a length/shape mismatch or an invalid spacing.
    pub fn from_cases<T: MaskValue>(cases: &[SegmentationCase<'_, T>]) -> Result<Self> {
        if cases.is_empty() {
            return Err(EvalError::Empty("segmentation cases"));
        }
        type Values = (Vec<Option<f64>>, Vec<Option<f64>>, Vec<Option<f64>>);
        let mut by_label: BTreeMap<&str, Values> = BTreeMap::new();
        for c in cases {
            let d = dice(c.pred, c.gt, c.shape)?;
            let j = iou(c.pred, c.gt, c.shape)?;
            let h = hausdorff95(c.pred, c.gt, c.shape, c.spacing)?;
            let e = by_label.entry(c.label).or_default();
            e.0.push(d);
            e.1.push(j);
            e.2.push(h);
        }
        let per_label: BTreeMap<String, LabelStats> = by_label
            .into_iter()
            .map(|(label, (d, j, h))| {
                let stats = LabelStats {
                    n: d.len(),
                    mean_dice: mean_of(d.iter().copied()),
                    mean_iou: mean_of(j.iter().copied()),
                    mean_hd95: mean_of(h.iter().copied()),
                    n_undefined_dice: d.iter().filter(|v| v.is_none()).count(),
                    n_undefined_hd95: h.iter().filter(|v| v.is_none()).count(),
                };
                (label.to_string(), stats)
            })
            .collect();
        Ok(Self {
            n_cases: cases.len(),
            mean_dice: mean_of(per_label.values().map(|s| s.mean_dice)),
            mean_iou: mean_of(per_label.values().map(|s| s.mean_iou)),
            mean_hd95: mean_of(per_label.values().map(|s| s.mean_hd95)),
            per_label,
        })
    }

    /// [`Self::from_cases`] for `(label, pred, gt)` triples that share one shape and spacing.
    pub fn from_triples<T: MaskValue>(
        triples: &[(&str, &[T], &[T])],
        shape: (usize, usize),
        spacing: Option<Spacing>,
    ) -> Result<Self> {
        let cases: Vec<SegmentationCase<'_, T>> = triples
            .iter()
            .map(|&(label, pred, gt)| SegmentationCase {
                label,
                pred,
                gt,
                shape,
                spacing,
            })
            .collect();
        Self::from_cases(&cases)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() <= 1e-12, "{a} != {b}");
    }

    /// A `rows x cols` mask with the rectangle `[r0, r1) x [c0, c1)` set.
    fn rect(shape: (usize, usize), r0: usize, r1: usize, c0: usize, c1: usize) -> Vec<bool> {
        let mut m = vec![false; shape.0 * shape.1];
        for r in r0..r1 {
            for c in c0..c1 {
                m[r * shape.1 + c] = true;
            }
        }
        m
    }

    #[test]
    fn square_shifted_by_one_pixel() {
        // 4x4 squares in an 8x8 image, the prediction one column to the right.
        let shape = (8, 8);
        let gt = rect(shape, 2, 6, 2, 6);
        let pred = rect(shape, 2, 6, 3, 7);
        // |P| = |G| = 16, |P & G| = 4 rows x 3 columns = 12, |P | G| = 20.
        close(dice(&pred, &gt, shape).unwrap().unwrap(), 24.0 / 32.0);
        close(iou(&pred, &gt, shape).unwrap().unwrap(), 12.0 / 20.0);
        // Each edge is the 12-pixel ring (the 2x2 interior survives the erosion). Pred ring
        // to gt ring: the 6 pixels of the top and bottom rows at columns 3..=5 lie on the gt
        // ring (0); the other 6 (column 6 and the 2 inner pixels of column 3) are 1 px from
        // it. Same the other way. Sorted: six 0s then six 1s; 95th percentile at index
        // 0.95 * 11 = 10.45 -> 1.
        let s = SurfaceDistances::compute(&pred, &gt, shape, None)
            .unwrap()
            .unwrap();
        let mut d = s.pred_to_gt.clone();
        d.sort_by(f64::total_cmp);
        assert_eq!(d, [0., 0., 0., 0., 0., 0., 1., 1., 1., 1., 1., 1.]);
        close(hausdorff95(&pred, &gt, shape, None).unwrap().unwrap(), 1.0);
        close(hausdorff(&pred, &gt, shape, None).unwrap().unwrap(), 1.0);
        close(s.average_symmetric(), 0.5);
        // Spacing (sy, sx) = (2, 3): the column shift costs 3, the pixels at column 3, rows
        // 3-4 are nearer to the gt top/bottom rows (2 = one row) than to column 2 (3).
        // pred -> gt sorted: 0 x6, 2, 2, 3, 3, 3, 3 -> index 10.45 -> 3.
        let s = SurfaceDistances::compute(&pred, &gt, shape, Some((2.0, 3.0)))
            .unwrap()
            .unwrap();
        let mut d = s.pred_to_gt.clone();
        d.sort_by(f64::total_cmp);
        assert_eq!(d, [0., 0., 0., 0., 0., 0., 2., 2., 3., 3., 3., 3.]);
        close(s.hausdorff_percentile(95.0).unwrap(), 3.0);
        close(s.hausdorff(), 3.0);
        // Anisotropic with a cheap column step: every 1 becomes sx = 0.5.
        close(
            hausdorff95(&pred, &gt, shape, Some((2.0, 0.5)))
                .unwrap()
                .unwrap(),
            0.5,
        );
    }

    #[test]
    fn line_against_its_first_pixel_interpolates_the_percentile() {
        // gt: the 1x4 line at row 1, columns 1..=4 of a 3x6 image (every pixel is an edge);
        // pred: its first pixel.
        let shape = (3, 6);
        let gt = rect(shape, 1, 2, 1, 5);
        let pred = rect(shape, 1, 2, 1, 2);
        close(dice(&pred, &gt, shape).unwrap().unwrap(), 2.0 / 5.0);
        close(iou(&pred, &gt, shape).unwrap().unwrap(), 1.0 / 4.0);
        // gt -> pred: 0, 1, 2, 3; 95th percentile at index 0.95 * 3 = 2.85 -> 2.85.
        // pred -> gt: 0. MONAI HD95 = max(2.85, 0) = 2.85.
        close(hausdorff95(&pred, &gt, shape, None).unwrap().unwrap(), 2.85);
        close(hausdorff(&pred, &gt, shape, None).unwrap().unwrap(), 3.0);
        // ASSD: (0 + 1 + 2 + 3 + 0) / 5.
        close(
            average_surface_distance(&pred, &gt, shape, None)
                .unwrap()
                .unwrap(),
            1.2,
        );
        // medpy pools [0, 0, 1, 2, 3]: index 0.95 * 4 = 3.8 -> 2 + 0.8.
        close(
            hausdorff95_pooled(&pred, &gt, shape, None)
                .unwrap()
                .unwrap(),
            2.8,
        );
        // Spacing scales distances: a 2 mm column pitch doubles everything (rows unused).
        close(
            hausdorff95(&pred, &gt, shape, Some((7.0, 2.0)))
                .unwrap()
                .unwrap(),
            5.7,
        );
        // The same line vertical: only sy matters.
        let gt_t = rect((6, 3), 1, 5, 1, 2);
        let pred_t = rect((6, 3), 1, 2, 1, 2);
        close(
            hausdorff95(&pred_t, &gt_t, (6, 3), Some((0.5, 9.0)))
                .unwrap()
                .unwrap(),
            1.425,
        );
    }

    #[test]
    fn edges_use_the_4_connected_cross_and_an_outside_border() {
        // A plus sign: its centre has all 4 neighbours inside (not an edge with the cross;
        // an 8-connected erosion would make it one). The 3x3 block in the top-left corner
        // of a 5x5 image: its centre (1, 1) is interior, the border pixels are edges.
        let plus: Vec<u8> = vec![
            0, 1, 0, //
            1, 1, 1, //
            0, 1, 0,
        ];
        // In a 3x3 image the arms touch the border; centre stays interior.
        let e = mask_edges(&plus, (3, 3)).unwrap();
        assert_eq!(
            e,
            [false, true, false, true, false, true, false, true, false]
        );
        let block = rect((5, 5), 0, 3, 0, 3);
        let e = mask_edges(&block, (5, 5)).unwrap();
        let expected: Vec<bool> = (0..25)
            .map(|i| block[i] && i != 6) // (1, 1) = index 6
            .collect();
        assert_eq!(e, expected);
        // A full image: only its frame are edges (the border counts as outside).
        let full = vec![true; 12];
        let e = mask_edges(&full, (3, 4)).unwrap();
        assert_eq!(e.iter().filter(|&&v| v).count(), 10);
        assert!(!e[5] && !e[6]);
    }

    #[test]
    fn empty_mask_rules() {
        let shape = (4, 4);
        let empty = vec![false; 16];
        let some = rect(shape, 1, 3, 1, 3);
        assert_eq!(dice(&empty, &empty, shape).unwrap(), None);
        assert_eq!(iou(&empty, &empty, shape).unwrap(), None);
        assert_eq!(dice(&some, &empty, shape).unwrap(), Some(0.0));
        assert_eq!(dice(&empty, &some, shape).unwrap(), Some(0.0));
        assert_eq!(iou(&empty, &some, shape).unwrap(), Some(0.0));
        for (p, g) in [(&empty, &empty), (&some, &empty), (&empty, &some)] {
            assert_eq!(hausdorff95(p, g, shape, None).unwrap(), None);
            assert_eq!(hausdorff(p, g, shape, None).unwrap(), None);
            assert_eq!(average_surface_distance(p, g, shape, None).unwrap(), None);
            assert_eq!(hausdorff95_pooled(p, g, shape, None).unwrap(), None);
        }
        assert_eq!(dice(&some, &some, shape).unwrap(), Some(1.0));
        assert_eq!(hausdorff95(&some, &some, shape, None).unwrap(), Some(0.0));
    }

    #[test]
    fn bad_inputs_are_errors() {
        let m = vec![true; 6];
        assert!(matches!(
            dice(&m, &m[..5], (2, 3)),
            Err(EvalError::LengthMismatch { .. })
        ));
        assert!(matches!(
            hausdorff95(&m, &m, (3, 3), None),
            Err(EvalError::LengthMismatch { .. })
        ));
        for bad in [
            (0.0, 1.0),
            (1.0, -2.0),
            (f64::NAN, 1.0),
            (1.0, f64::INFINITY),
        ] {
            assert!(matches!(
                hausdorff95(&m, &m, (2, 3), Some(bad)),
                Err(EvalError::InvalidParameter { .. })
            ));
        }
        assert!(percentile(&[], 50.0).is_err());
        assert!(percentile(&[1.0], 100.5).is_err());
        assert!(percentile(&[1.0, f64::NAN], 50.0).is_err());
    }

    #[test]
    fn percentile_matches_numpy_linear() {
        // np.percentile([3, 1, 4, 1, 5], q) for q = 0, 25, 50, 95, 100.
        let v = [3.0, 1.0, 4.0, 1.0, 5.0];
        close(percentile(&v, 0.0).unwrap(), 1.0);
        close(percentile(&v, 25.0).unwrap(), 1.0);
        close(percentile(&v, 50.0).unwrap(), 3.0);
        close(percentile(&v, 95.0).unwrap(), 4.8);
        close(percentile(&v, 100.0).unwrap(), 5.0);
        close(percentile(&[2.5], 95.0).unwrap(), 2.5);
    }

    #[test]
    fn u8_and_bool_masks_agree() {
        let shape = (5, 7);
        let a = rect(shape, 0, 3, 1, 6);
        let b = rect(shape, 2, 5, 0, 4);
        let a8: Vec<u8> = a.iter().map(|&v| if v { 255 } else { 0 }).collect();
        let b8: Vec<u8> = b.iter().map(|&v| u8::from(v) * 3).collect();
        assert_eq!(dice(&a, &b, shape).unwrap(), dice(&a8, &b8, shape).unwrap());
        assert_eq!(
            hausdorff95(&a, &b, shape, Some((0.7, 1.3))).unwrap(),
            hausdorff95(&a8, &b8, shape, Some((0.7, 1.3))).unwrap()
        );
    }

    #[test]
    fn distance_transform_equals_brute_force() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for trial in 0..60 {
            let shape = (rng.random_range(1..30), rng.random_range(1..30));
            let density = [0.002, 0.02, 0.1, 0.5][trial % 4];
            let features: Vec<bool> = (0..shape.0 * shape.1)
                .map(|_| rng.random::<f64>() < density)
                .collect();
            let spacing = (rng.random_range(0.2..3.0), rng.random_range(0.2..3.0));
            let got = distance_to_nearest(&features, shape, Some(spacing)).unwrap();
            let pts: Vec<(usize, usize)> = (0..features.len())
                .filter(|&i| features[i])
                .map(|i| (i / shape.1, i % shape.1))
                .collect();
            for (i, &g) in got.iter().enumerate() {
                let (r, c) = (i / shape.1, i % shape.1);
                let want = pts
                    .iter()
                    .map(|&(pr, pc)| {
                        let dy = r.abs_diff(pr) as f64 * spacing.0;
                        let dx = c.abs_diff(pc) as f64 * spacing.1;
                        (dy * dy + dx * dx).sqrt()
                    })
                    .fold(f64::INFINITY, f64::min);
                if want.is_infinite() {
                    assert!(g.is_infinite(), "trial {trial} pixel {i}: {g}");
                } else {
                    assert!(
                        (g - want).abs() <= 1e-9 * want.max(1.0),
                        "trial {trial} pixel {i}: {g} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn summary_averages_per_label_and_counts_undefined() {
        let shape = (8, 8);
        let gt = rect(shape, 2, 6, 2, 6);
        let shifted = rect(shape, 2, 6, 3, 7);
        let empty = [false; 64];
        let s = SegmentationSummary::from_triples(
            &[
                ("liver", &shifted[..], &gt[..]),  // dice 0.75, iou 0.6, hd95 1
                ("liver", &gt[..], &gt[..]),       // dice 1, iou 1, hd95 0
                ("liver", &empty[..], &empty[..]), // all undefined
                ("lesion", &empty[..], &gt[..]),   // dice 0, iou 0, hd95 undefined
            ],
            shape,
            None,
        )
        .unwrap();
        assert_eq!(s.n_cases, 4);
        let liver = &s.per_label["liver"];
        assert_eq!(liver.n, 3);
        close(liver.mean_dice.unwrap(), 0.875);
        close(liver.mean_iou.unwrap(), 0.8);
        close(liver.mean_hd95.unwrap(), 0.5);
        assert_eq!((liver.n_undefined_dice, liver.n_undefined_hd95), (1, 1));
        let lesion = &s.per_label["lesion"];
        assert_eq!(lesion.n, 1);
        assert_eq!(lesion.mean_dice, Some(0.0));
        assert_eq!(lesion.mean_hd95, None);
        assert_eq!((lesion.n_undefined_dice, lesion.n_undefined_hd95), (0, 1));
        // Macro over labels: dice (0.875 + 0) / 2; hd95 only liver has a mean.
        close(s.mean_dice.unwrap(), 0.4375);
        close(s.mean_iou.unwrap(), 0.4);
        close(s.mean_hd95.unwrap(), 0.5);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(
            json["per_label"]["lesion"]["mean_hd95"],
            serde_json::Value::Null
        );
        assert_eq!(json["per_label"]["liver"]["n_undefined_dice"], 1);
        let none: [SegmentationCase<'_, bool>; 0] = [];
        assert!(matches!(
            SegmentationSummary::from_cases(&none),
            Err(EvalError::Empty(_))
        ));
    }
}
