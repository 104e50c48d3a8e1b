//! Detection and grounding metrics on axis-aligned boxes `[x0, y0, x1, y1]` (pixels).
//!
//! **COCO-style average precision** ([`coco_average_precision`]), as pycocotools' `COCOeval`
//! computes it for boxes with every object size (`areaRng` all) and at most 100 detections
//! per image and class:
//! for each class and IoU threshold `t` in 0.50, 0.55, ..., 0.95, every image's detections
//! (highest score first) are matched greedily to the not-yet-matched ground-truth box of
//! highest IoU >= `t` (on equal IoU the later box); the class's detections over all images,
//! ranked by score, give a precision-recall curve; precision is made non-increasing from the
//! right and read at the 101 recall points 0, 0.01, ..., 1 (0 beyond the last recall reached);
//! AP is the mean over those points. **mAP@[.5:.95]** is the mean over thresholds and over
//! the classes that have ground truth (COCO's average is *macro* over classes); **mAP@.5** and
//! **mAP@.75** use one threshold. **Micro** AP ranks the detections of every class together
//! (each still matched within its class) against all ground-truth boxes, so frequent classes
//! weigh more. **AR@100** is the recall at the end of each curve, averaged as AP. IoU is
//! `intersection / union` of areas `w * h` (no `+1`, as pycocotools).
//! `tools/make_detection_reference.py` checks the values against pycocotools.
//!
//! **Grounding** a phrase to one box ([`grounding_accuracy`], the MedRPG / RefCOCO protocol):
//! Acc@0.5 is the share of phrases whose predicted box has IoU >= 0.5 with the true box;
//! mIoU the mean IoU.

use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};

/// A box `[x0, y0, x1, y1]`.
pub type Bbox = [f64; 4];

/// A ground-truth box.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroundTruthBox {
    /// Image index.
    pub image: usize,
    /// Class index.
    pub class: usize,
    /// The box.
    pub bbox: Bbox,
}

/// A detection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectedBox {
    /// Image index.
    pub image: usize,
    /// Class index.
    pub class: usize,
    /// The box.
    pub bbox: Bbox,
    /// Confidence.
    pub score: f64,
}

/// Intersection over union of two boxes (0 when either is empty).
pub fn box_iou(a: &Bbox, b: &Bbox) -> f64 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let area = |x: &Bbox| (x[2] - x[0]).max(0.0) * (x[3] - x[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union <= 0.0 {
        0.0
    } else {
        inter / union
    }
}

/// COCO-style detection metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectionSummary {
    /// mAP@[.5:.95], macro over classes with ground truth (COCO's AP).
    pub map_50_95: f64,
    /// mAP@.5 (macro).
    pub map_50: f64,
    /// mAP@.75 (macro).
    pub map_75: f64,
    /// AP@[.5:.95] of each class (`None`: no ground truth of that class).
    pub per_class_ap_50_95: Vec<Option<f64>>,
    /// AP@.5 of each class.
    pub per_class_ap_50: Vec<Option<f64>>,
    /// AP@[.5:.95] of all classes' detections ranked together (micro).
    pub micro_ap_50_95: f64,
    /// AP@.5, micro.
    pub micro_ap_50: f64,
    /// AR@100: recall at the end of each curve, mean over thresholds and classes.
    pub mean_recall: f64,
    /// Ground-truth boxes.
    pub n_ground_truth: usize,
    /// Detections scored (after the per-image, per-class limit).
    pub n_detections: usize,
}

/// IoU thresholds 0.50:0.05:0.95.
fn iou_thresholds() -> Vec<f64> {
    (0..10).map(|i| 0.5 + 0.05 * i as f64).collect()
}

/// One detection's outcome at every threshold: whether it matched.
struct Ranked {
    score: f64,
    /// Order of the detection in the input (ties in score keep it, as a stable sort).
    order: usize,
    matched: Vec<bool>,
}

/// AP at 101 recall points and the final recall, of ranked outcomes at threshold `t`.
fn curve(ranked: &[&Ranked], n_gt: usize, t: usize) -> (f64, f64) {
    let mut precision = Vec::with_capacity(ranked.len());
    let mut recall = Vec::with_capacity(ranked.len());
    let (mut tp, mut fp) = (0f64, 0f64);
    for r in ranked {
        if r.matched[t] {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        recall.push(tp / n_gt as f64);
        precision.push(tp / (tp + fp + f64::EPSILON));
    }
    for i in (1..precision.len()).rev() {
        if precision[i] > precision[i - 1] {
            precision[i - 1] = precision[i];
        }
    }
    let mut sum = 0.0;
    for k in 0..=100 {
        let r = k as f64 / 100.0;
        // First index with recall >= r (numpy searchsorted, side left).
        let i = recall.partition_point(|&x| x < r);
        if i < precision.len() {
            sum += precision[i];
        }
    }
    (sum / 101.0, recall.last().copied().unwrap_or(0.0))
}

/// COCO-style AP of `detections` against `ground_truth` over `num_classes` classes, at most
/// `max_detections` (COCO: 100) per image and class.
pub fn coco_average_precision(
    ground_truth: &[GroundTruthBox],
    detections: &[DetectedBox],
    num_classes: usize,
    max_detections: usize,
) -> Result<DetectionSummary> {
    if num_classes == 0 {
        return Err(EvalError::Empty("classes"));
    }
    for (what, class, bbox) in ground_truth
        .iter()
        .map(|g| ("ground truth", g.class, &g.bbox))
        .chain(detections.iter().map(|d| ("detections", d.class, &d.bbox)))
    {
        if class >= num_classes {
            return Err(EvalError::IndexOutOfRange {
                what: if what == "ground truth" {
                    "ground-truth class"
                } else {
                    "detection class"
                },
                index: class,
                num_classes,
            });
        }
        if bbox.iter().any(|v| !v.is_finite()) || bbox[2] < bbox[0] || bbox[3] < bbox[1] {
            return Err(EvalError::InvalidParameter {
                name: "bbox",
                reason: format!(
                    "{what}: {bbox:?} is not a box [x0, y0, x1, y1] with x0 <= x1, y0 <= y1"
                ),
            });
        }
    }
    if let Some(p) = detections.iter().position(|d| !d.score.is_finite()) {
        return Err(EvalError::NonFinite {
            what: "detection scores",
            position: p,
        });
    }
    let thresholds = iou_thresholds();
    let n_t = thresholds.len();
    let n_images = ground_truth
        .iter()
        .map(|g| g.image + 1)
        .chain(detections.iter().map(|d| d.image + 1))
        .max()
        .unwrap_or(0);
    // Outcomes per class, gathered image by image.
    let mut per_class: Vec<Vec<Ranked>> = (0..num_classes).map(|_| Vec::new()).collect();
    let mut n_gt = vec![0usize; num_classes];
    let mut by_image_class: std::collections::HashMap<(usize, usize), (Vec<usize>, Vec<usize>)> =
        std::collections::HashMap::new();
    for (i, g) in ground_truth.iter().enumerate() {
        by_image_class
            .entry((g.image, g.class))
            .or_default()
            .0
            .push(i);
        n_gt[g.class] += 1;
    }
    for (i, d) in detections.iter().enumerate() {
        by_image_class
            .entry((d.image, d.class))
            .or_default()
            .1
            .push(i);
    }
    let mut n_detections = 0;
    for image in 0..n_images {
        for (class, class_outcomes) in per_class.iter_mut().enumerate() {
            let Some((gts, dts)) = by_image_class.get(&(image, class)) else {
                continue;
            };
            let mut dts = dts.clone();
            // Highest score first; equal scores keep their input order (a stable sort).
            dts.sort_by(|&a, &b| detections[b].score.total_cmp(&detections[a].score));
            dts.truncate(max_detections);
            n_detections += dts.len();
            let mut gt_taken = vec![vec![false; gts.len()]; n_t];
            for &d in &dts {
                let ious: Vec<f64> = gts
                    .iter()
                    .map(|&g| box_iou(&detections[d].bbox, &ground_truth[g].bbox))
                    .collect();
                let mut matched = vec![false; n_t];
                for (t, &thr) in thresholds.iter().enumerate() {
                    let mut best = thr.min(1.0 - 1e-10);
                    let mut m = None;
                    for (gi, &iou) in ious.iter().enumerate() {
                        if gt_taken[t][gi] || iou < best {
                            continue;
                        }
                        best = iou;
                        m = Some(gi);
                    }
                    if let Some(gi) = m {
                        gt_taken[t][gi] = true;
                        matched[t] = true;
                    }
                }
                class_outcomes.push(Ranked {
                    score: detections[d].score,
                    order: class_outcomes.len(),
                    matched,
                });
            }
        }
    }
    fn rank(mut items: Vec<&Ranked>) -> Vec<&Ranked> {
        items.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.order.cmp(&b.order)));
        items
    }
    let mut per_class_ap = vec![None; num_classes];
    let mut per_class_ap_50 = vec![None; num_classes];
    let mut per_class_ap_75 = vec![None; num_classes];
    let mut recalls = Vec::new();
    for c in 0..num_classes {
        if n_gt[c] == 0 {
            continue;
        }
        let ranked = rank(per_class[c].iter().collect());
        let mut aps = Vec::with_capacity(n_t);
        for t in 0..n_t {
            let (ap, rec) = curve(&ranked, n_gt[c], t);
            aps.push(ap);
            recalls.push(rec);
        }
        per_class_ap[c] = Some(aps.iter().sum::<f64>() / n_t as f64);
        per_class_ap_50[c] = Some(aps[0]);
        per_class_ap_75[c] = Some(aps[5]);
    }
    let mean = |v: &[Option<f64>]| {
        let xs: Vec<f64> = v.iter().flatten().copied().collect();
        if xs.is_empty() {
            0.0
        } else {
            xs.iter().sum::<f64>() / xs.len() as f64
        }
    };
    // Micro: every class's outcomes in one ranking (order: class, then within class).
    let total_gt: usize = n_gt.iter().sum();
    let mut pooled: Vec<&Ranked> = Vec::new();
    let mut offset = 0;
    let mut orders = Vec::new();
    for outcomes in &per_class {
        for r in outcomes {
            orders.push(offset + r.order);
            pooled.push(r);
        }
        offset += outcomes.len();
    }
    let mut idx: Vec<usize> = (0..pooled.len()).collect();
    idx.sort_by(|&a, &b| {
        pooled[b]
            .score
            .total_cmp(&pooled[a].score)
            .then(orders[a].cmp(&orders[b]))
    });
    let pooled: Vec<&Ranked> = idx.iter().map(|&i| pooled[i]).collect();
    let (micro_50_95, micro_50) = if total_gt == 0 {
        (0.0, 0.0)
    } else {
        let aps: Vec<f64> = (0..n_t).map(|t| curve(&pooled, total_gt, t).0).collect();
        (aps.iter().sum::<f64>() / n_t as f64, aps[0])
    };
    Ok(DetectionSummary {
        map_50_95: mean(&per_class_ap),
        map_50: mean(&per_class_ap_50),
        map_75: mean(&per_class_ap_75),
        per_class_ap_50_95: per_class_ap,
        per_class_ap_50,
        micro_ap_50_95: micro_50_95,
        micro_ap_50: micro_50,
        mean_recall: if recalls.is_empty() {
            0.0
        } else {
            recalls.iter().sum::<f64>() / recalls.len() as f64
        },
        n_ground_truth: ground_truth.len(),
        n_detections,
    })
}

/// Phrase grounding: one predicted box per phrase against its true box.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroundingSummary {
    /// Share of phrases with IoU >= 0.5.
    pub accuracy_at_50: f64,
    /// Mean IoU.
    pub mean_iou: f64,
    /// Phrases.
    pub n: usize,
}

/// Acc@0.5 and mIoU of predicted boxes against true boxes (one each per phrase).
pub fn grounding_accuracy(predicted: &[Bbox], truth: &[Bbox]) -> Result<GroundingSummary> {
    if predicted.len() != truth.len() {
        return Err(EvalError::LengthMismatch {
            what: "true boxes",
            got: truth.len(),
            expected: predicted.len(),
        });
    }
    if predicted.is_empty() {
        return Err(EvalError::Empty("phrases to ground"));
    }
    let ious: Vec<f64> = predicted
        .iter()
        .zip(truth)
        .map(|(p, t)| box_iou(p, t))
        .collect();
    let n = ious.len();
    Ok(GroundingSummary {
        accuracy_at_50: ious.iter().filter(|&&v| v >= 0.5).count() as f64 / n as f64,
        mean_iou: ious.iter().sum::<f64>() / n as f64,
        n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gt(image: usize, class: usize, bbox: Bbox) -> GroundTruthBox {
        GroundTruthBox { image, class, bbox }
    }

    fn det(image: usize, class: usize, bbox: Bbox, score: f64) -> DetectedBox {
        DetectedBox {
            image,
            class,
            bbox,
            score,
        }
    }

    #[test]
    fn iou_by_hand() {
        assert_eq!(
            box_iou(&[0.0, 0.0, 2.0, 2.0], &[1.0, 1.0, 3.0, 3.0]),
            1.0 / 7.0
        );
        assert_eq!(box_iou(&[0.0, 0.0, 1.0, 1.0], &[2.0, 2.0, 3.0, 3.0]), 0.0);
        assert_eq!(box_iou(&[0.0, 0.0, 0.0, 0.0], &[0.0, 0.0, 0.0, 0.0]), 0.0);
    }

    #[test]
    fn perfect_detections_score_one_and_a_false_positive_first_costs_precision() {
        let g = vec![
            gt(0, 0, [0.0, 0.0, 10.0, 10.0]),
            gt(1, 0, [5.0, 5.0, 9.0, 9.0]),
        ];
        let d = vec![
            det(0, 0, [0.0, 0.0, 10.0, 10.0], 0.9),
            det(1, 0, [5.0, 5.0, 9.0, 9.0], 0.8),
        ];
        let s = coco_average_precision(&g, &d, 1, 100).unwrap();
        assert!((s.map_50_95 - 1.0).abs() < 1e-12 && (s.mean_recall - 1.0).abs() < 1e-12);
        // A higher-scored false positive: precision 1/2 at recall 1/2, 2/3 at recall 1; the
        // non-increasing envelope is 2/3 at every recall point.
        let mut d2 = d.clone();
        d2.push(det(0, 0, [50.0, 50.0, 60.0, 60.0], 0.95));
        let s = coco_average_precision(&g, &d2, 1, 100).unwrap();
        assert!((s.map_50 - 2.0 / 3.0).abs() < 1e-9, "{}", s.map_50);
        // A class with no ground truth is left out of the mean, not counted as 0.
        let s = coco_average_precision(&g, &d, 2, 100).unwrap();
        assert_eq!(s.per_class_ap_50_95[1], None);
        assert!((s.map_50_95 - 1.0).abs() < 1e-12);
    }

    #[test]
    fn grounding_by_hand_and_errors() {
        let p = [[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]];
        let t = [[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 1.0, 1.0]];
        let g = grounding_accuracy(&p, &t).unwrap();
        assert_eq!(g.accuracy_at_50, 0.5);
        assert!((g.mean_iou - (1.0 / 7.0 + 1.0) / 2.0).abs() < 1e-12);
        assert!(grounding_accuracy(&p, &t[..1]).is_err());
        assert!(coco_average_precision(&[gt(0, 3, [0.0; 4])], &[], 2, 100).is_err());
        assert!(coco_average_precision(&[gt(0, 0, [2.0, 0.0, 1.0, 1.0])], &[], 1, 100).is_err());
    }
}
