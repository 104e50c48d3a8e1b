//! FID and KID against numpy/scipy (`tools/make_generative_reference.py`): pytorch-fid's
//! Fréchet distance with `scipy.linalg.sqrtm`, and torch-fidelity's unbiased polynomial-kernel
//! MMD^2 on one subset made of every row.

use medvlm_eval::generative::{frechet_distance, kernel_distance, mmd2_unbiased_poly, KidConfig};

#[test]
fn fid_and_kid_match_the_scipy_reference() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/generative_reference.json"
    );
    let f: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = f["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    let mut kid_cases = 0;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let dim = case["dim"].as_u64().unwrap() as usize;
        let a: Vec<f32> = serde_json::from_value(case["a"].clone()).unwrap();
        let b: Vec<f32> = serde_json::from_value(case["b"].clone()).unwrap();
        let want = case["fid"].as_f64().unwrap();
        let got = frechet_distance(&a, &b, dim).unwrap();
        assert!(
            (got - want).abs() < 1e-5 * want.abs().max(1.0),
            "{name}: FID {got} vs scipy {want}"
        );
        if let Some(want) = case.get("kid_one_subset").and_then(|v| v.as_f64()) {
            kid_cases += 1;
            let got = mmd2_unbiased_poly(&a, &b, dim).unwrap();
            assert!(
                (got - want).abs() < 1e-5 * want.abs().max(1.0),
                "{name}: MMD^2 {got} vs {want}"
            );
            // Subsets of every row draw each set whole: KID is that one value, std 0.
            let n = a.len() / dim;
            let cfg = KidConfig {
                subsets: 3,
                subset_size: n,
                seed: 0,
            };
            let kid = kernel_distance(&a, &b, dim, &cfg).unwrap();
            assert_eq!(kid.subset_size, n);
            assert!(
                (kid.mean - want).abs() < 1e-5 * want.abs().max(1.0),
                "{name}"
            );
            assert!(kid.std < 1e-6 * want.abs().max(1.0), "{name}: {kid:?}");
        }
    }
    assert_eq!(kid_cases, 2);
}
