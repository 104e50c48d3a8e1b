//! Segmentation metrics against numpy/scipy on seeded random masks (fixture from
//! tools/make_segmentation_reference.py, which reproduces MONAI's `get_mask_edges` +
//! `get_surface_distance` + `compute_hausdorff_distance` in float64).

use medvlm_eval::segmentation::{
    average_surface_distance, dice, hausdorff, hausdorff95, hausdorff95_pooled, iou,
    SegmentationCase, SegmentationSummary, SurfaceDistances,
};
use serde_json::Value;

const FIXTURE: &str = include_str!("fixtures/segmentation_reference.json");

struct Case {
    name: String,
    shape: (usize, usize),
    spacing: (f64, f64),
    pred: Vec<bool>,
    gt: Vec<bool>,
    json: Value,
}

fn mask(rows: &Value, shape: (usize, usize)) -> Vec<bool> {
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), shape.0);
    let m: Vec<bool> = rows
        .iter()
        .flat_map(|r| {
            let r = r.as_str().unwrap();
            assert_eq!(r.len(), shape.1);
            r.bytes().map(|b| b == b'1').collect::<Vec<_>>()
        })
        .collect();
    m
}

fn cases() -> Vec<Case> {
    let fixture: Value = serde_json::from_str(FIXTURE).unwrap();
    assert!(fixture["generator"]
        .as_str()
        .unwrap()
        .starts_with("tools/make_segmentation_reference.py"));
    fixture["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let shape = (
                c["rows"].as_u64().unwrap() as usize,
                c["cols"].as_u64().unwrap() as usize,
            );
            let sp = c["spacing"].as_array().unwrap();
            Case {
                name: c["name"].as_str().unwrap().to_string(),
                shape,
                spacing: (sp[0].as_f64().unwrap(), sp[1].as_f64().unwrap()),
                pred: mask(&c["pred"], shape),
                gt: mask(&c["gt"], shape),
                json: c.clone(),
            }
        })
        .collect()
}

/// `got` must be `None` exactly where the reference is null, else within `tol`.
fn check(case: &str, what: &str, got: Option<f64>, want: &Value, tol: f64) {
    match (got, want.as_f64()) {
        (None, None) => {}
        (Some(g), Some(w)) => assert!(
            (g - w).abs() <= tol,
            "{case}: {what} = {g}, reference {w} (diff {:e})",
            (g - w).abs()
        ),
        (g, _) => panic!("{case}: {what} = {g:?}, reference {want}"),
    }
}

#[test]
fn fixture_covers_the_edge_cases() {
    let cs = cases();
    assert!(cs.len() >= 30);
    let null = |c: &Case, k: &str| c.json[k].is_null();
    assert!(cs.iter().any(|c| null(c, "dice")), "a both-empty case");
    assert!(cs.iter().any(|c| !null(c, "dice") && null(c, "hd95")));
    assert!(cs.iter().any(|c| c.spacing.0 != c.spacing.1));
    let touches = |m: &[bool], (r, c): (usize, usize)| {
        (0..r).any(|i| m[i * c] || m[i * c + c - 1]) || (0..c).any(|j| m[j] || m[(r - 1) * c + j])
    };
    assert!(cs.iter().any(|c| touches(&c.gt, c.shape)));
    // MONAI's and medpy's HD95 really differ on some cases.
    assert!(cs.iter().any(|c| {
        let (a, b) = (c.json["hd95"].as_f64(), c.json["hd95_medpy"].as_f64());
        matches!((a, b), (Some(a), Some(b)) if a - b > 0.1)
    }));
}

#[test]
fn overlap_metrics_match_numpy() {
    for c in cases() {
        check(
            &c.name,
            "dice",
            dice(&c.pred, &c.gt, c.shape).unwrap(),
            &c.json["dice"],
            1e-9,
        );
        check(
            &c.name,
            "iou",
            iou(&c.pred, &c.gt, c.shape).unwrap(),
            &c.json["iou"],
            1e-9,
        );
    }
}

#[test]
fn surface_distance_metrics_match_scipy() {
    for c in cases() {
        let sp = Some(c.spacing);
        let (p, g, s) = (&c.pred, &c.gt, c.shape);
        check(
            &c.name,
            "hd95",
            hausdorff95(p, g, s, sp).unwrap(),
            &c.json["hd95"],
            1e-6,
        );
        check(
            &c.name,
            "hd",
            hausdorff(p, g, s, sp).unwrap(),
            &c.json["hd"],
            1e-6,
        );
        check(
            &c.name,
            "assd",
            average_surface_distance(p, g, s, sp).unwrap(),
            &c.json["assd"],
            1e-6,
        );
        check(
            &c.name,
            "hd95_medpy",
            hausdorff95_pooled(p, g, s, sp).unwrap(),
            &c.json["hd95_medpy"],
            1e-6,
        );
        if let Some(d) = SurfaceDistances::compute(p, g, s, sp).unwrap() {
            // Edge counts and each direction separately.
            let n = c.json["n_edges"].as_array().unwrap();
            assert_eq!(
                d.pred_to_gt.len() as u64,
                n[0].as_u64().unwrap(),
                "{}",
                c.name
            );
            assert_eq!(
                d.gt_to_pred.len() as u64,
                n[1].as_u64().unwrap(),
                "{}",
                c.name
            );
            let dir = c.json["hd95_directed"].as_array().unwrap();
            let p95 = |v: &[f64]| medvlm_eval::segmentation::percentile(v, 95.0).unwrap();
            check(
                &c.name,
                "hd95 pred->gt",
                Some(p95(&d.pred_to_gt)),
                &dir[0],
                1e-6,
            );
            check(
                &c.name,
                "hd95 gt->pred",
                Some(p95(&d.gt_to_pred)),
                &dir[1],
                1e-6,
            );
        }
    }
}

#[test]
fn summary_over_the_fixture() {
    let cs = cases();
    let labels = ["a", "b", "c"];
    let sc: Vec<SegmentationCase<'_, bool>> = cs
        .iter()
        .enumerate()
        .map(|(i, c)| SegmentationCase {
            label: labels[i % 3],
            pred: &c.pred,
            gt: &c.gt,
            shape: c.shape,
            spacing: Some(c.spacing),
        })
        .collect();
    let s = SegmentationSummary::from_cases(&sc).unwrap();
    assert_eq!(s.n_cases, cs.len());
    let mut macro_dice = 0.0;
    for (k, label) in labels.iter().enumerate() {
        let mine: Vec<&Case> = cs.iter().skip(k).step_by(3).collect();
        let defined =
            |key: &str| -> Vec<f64> { mine.iter().filter_map(|c| c.json[key].as_f64()).collect() };
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let st = &s.per_label[*label];
        assert_eq!(st.n, mine.len());
        let d = defined("dice");
        let h = defined("hd95");
        assert_eq!(st.n_undefined_dice, mine.len() - d.len());
        assert_eq!(st.n_undefined_hd95, mine.len() - h.len());
        assert!((st.mean_dice.unwrap() - mean(&d)).abs() < 1e-9);
        assert!((st.mean_iou.unwrap() - mean(&defined("iou"))).abs() < 1e-9);
        assert!((st.mean_hd95.unwrap() - mean(&h)).abs() < 1e-6);
        macro_dice += mean(&d) / 3.0;
    }
    assert!((s.mean_dice.unwrap() - macro_dice).abs() < 1e-9);
}
