//! PSNR and SSIM against BasicSR's conventions computed with OpenCV
//! (`tools/make_image_quality_reference.py`): grey and RGB, border crops of 0, 2 and 4.

use medvlm_eval::image_quality::{psnr, ssim, ImageRef};

#[test]
fn psnr_and_ssim_match_the_basicsr_convention() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/image_quality_reference.json"
    );
    let f: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for case in f["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let shape: Vec<usize> = serde_json::from_value(case["shape"].clone()).unwrap();
        let a: Vec<f64> = serde_json::from_value(case["a"].clone()).unwrap();
        let b: Vec<f64> = serde_json::from_value(case["b"].clone()).unwrap();
        let channels = shape.get(2).copied().unwrap_or(1);
        let img = |data| ImageRef {
            data,
            height: shape[0],
            width: shape[1],
            channels,
        };
        let crop = case["crop_border"].as_u64().unwrap() as usize;
        let p = psnr(&img(&a), &img(&b), crop).unwrap();
        let s = ssim(&img(&a), &img(&b), crop).unwrap();
        let (wp, ws) = (
            case["psnr"].as_f64().unwrap(),
            case["ssim"].as_f64().unwrap(),
        );
        assert!((p - wp).abs() < 1e-9, "{name}: PSNR {p} vs {wp}");
        assert!((s - ws).abs() < 1e-9, "{name}: SSIM {s} vs {ws}");
    }
}
