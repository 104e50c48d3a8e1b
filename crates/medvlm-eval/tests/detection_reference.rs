//! COCO-style detection AP against pycocotools' COCOeval on a synthetic set with misses,
//! duplicates, class swaps and false positives (`tools/make_detection_reference.py`).

use medvlm_eval::detection::{coco_average_precision, DetectedBox, GroundTruthBox};

#[test]
fn average_precision_matches_pycocotools() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/detection_reference.json"
    );
    let f: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let gts: Vec<GroundTruthBox> = serde_json::from_value(f["ground_truth"].clone()).unwrap();
    let dets: Vec<DetectedBox> = serde_json::from_value(f["detections"].clone()).unwrap();
    let k = f["num_classes"].as_u64().unwrap() as usize;
    let s = coco_average_precision(&gts, &dets, k, 100).unwrap();
    let close = |a: f64, key: &str| {
        let b = f[key].as_f64().unwrap();
        assert!((a - b).abs() < 1e-9, "{key}: {a} vs pycocotools {b}");
    };
    close(s.map_50_95, "map_50_95");
    close(s.map_50, "map_50");
    close(s.map_75, "map_75");
    close(s.mean_recall, "mean_recall_100");
    for c in 0..k {
        let want = f["per_class_ap_50_95"][c].as_f64().unwrap();
        assert!(
            (s.per_class_ap_50_95[c].unwrap() - want).abs() < 1e-9,
            "class {c}"
        );
        let want = f["per_class_ap_50"][c].as_f64().unwrap();
        assert!(
            (s.per_class_ap_50[c].unwrap() - want).abs() < 1e-9,
            "class {c} @.5"
        );
    }
    assert_eq!(s.n_ground_truth, gts.len());
    // Micro pools the classes: a different number here (it weighs frequent classes more).
    assert!(s.micro_ap_50 > 0.0 && (s.micro_ap_50 - s.map_50).abs() > 1e-6);
}
