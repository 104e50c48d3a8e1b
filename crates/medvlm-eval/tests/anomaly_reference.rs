//! Pixel AUROC and AUPRO against the MVTec AD procedure in numpy/scipy and scikit-learn
//! (`tools/make_anomaly_reference.py`): maps with ties, one-pixel regions and defect-free
//! images.

use medvlm_eval::anomaly::{aupro, pixel_auroc, pro_curve, PixelMap, DEFAULT_FPR_LIMIT};

#[test]
fn aupro_and_pixel_auroc_match_the_reference() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/anomaly_reference.json"
    );
    let f: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let maps: Vec<Vec<Vec<f32>>> = serde_json::from_value(f["maps"].clone()).unwrap();
    let masks: Vec<Vec<Vec<u8>>> = serde_json::from_value(f["masks"].clone()).unwrap();
    let flat: Vec<(Vec<f32>, Vec<bool>, usize, usize)> = maps
        .iter()
        .zip(&masks)
        .map(|(m, k)| {
            (
                m.iter().flatten().copied().collect(),
                k.iter().flatten().map(|&v| v != 0).collect(),
                m.len(),
                m[0].len(),
            )
        })
        .collect();
    let pixel_maps: Vec<PixelMap> = flat
        .iter()
        .map(|(s, d, h, w)| PixelMap {
            scores: s,
            defect: d,
            height: *h,
            width: *w,
        })
        .collect();
    let a = aupro(&pixel_maps, DEFAULT_FPR_LIMIT).unwrap().unwrap();
    let want = f["aupro_0_3"].as_f64().unwrap();
    assert!((a - want).abs() < 1e-9, "AUPRO {a} vs {want}");
    let p = pixel_auroc(&pixel_maps).unwrap().unwrap();
    let want = f["pixel_auroc"].as_f64().unwrap();
    assert!((p - want).abs() < 1e-9, "pixel AUROC {p} vs {want}");
    let curve = pro_curve(&pixel_maps).unwrap().unwrap();
    assert_eq!(curve.regions as u64, f["regions"].as_u64().unwrap());
}
