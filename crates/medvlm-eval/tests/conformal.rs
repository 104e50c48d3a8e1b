//! Conformal prediction: hand-computed APS/RAPS thresholds and sets, and the coverage
//! guarantee on a synthetic, perfectly calibrated problem.

use medvlm_eval::conformal::{
    conformity_score, ConformalConfig, ConformalPredictor, ConformalScore,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const ROW: [f32; 4] = [0.5, 0.25, 0.125, 0.125];

/// 9 identical calibration rows whose true classes give non-randomised APS scores
/// 0.5 (x4), 0.75 (x3), 0.875, 1.0.
fn calibration_set() -> (Vec<f32>, Vec<usize>) {
    let labels = vec![0, 0, 0, 0, 1, 1, 1, 2, 3];
    let probs = labels.iter().flat_map(|_| ROW).collect();
    (probs, labels)
}

#[test]
fn aps_scores_and_sets_by_hand() {
    // Ties (classes 2 and 3) are ranked by lower index first.
    assert_eq!(conformity_score(&ROW, 0, 1.0, ConformalScore::Aps), 0.5);
    assert_eq!(conformity_score(&ROW, 2, 1.0, ConformalScore::Aps), 0.875);
    assert_eq!(conformity_score(&ROW, 3, 1.0, ConformalScore::Aps), 1.0);
    assert_eq!(conformity_score(&ROW, 1, 0.5, ConformalScore::Aps), 0.625);

    let (probs, labels) = calibration_set();
    // alpha 0.35: ceil(10 * 0.65) = 7 -> 7th smallest score = 0.75
    let cfg = ConformalConfig {
        alpha: 0.35,
        ..Default::default()
    };
    let p = ConformalPredictor::calibrate(&probs, &labels, 4, cfg).unwrap();
    assert_eq!(p.q_hat, Some(0.75));
    // Non-randomised: cumulative 0.5, 0.75 (<= q), 0.875 (> q: included, stop) -> {0,1,2}
    assert_eq!(p.predict_sets(&ROW).unwrap(), vec![vec![0, 1, 2]]);
    // Flat row: 0.25, 0.5, 0.75, 1.0 -> all four.
    assert_eq!(p.predict_sets(&[0.25; 4]).unwrap()[0].len(), 4);

    // alpha 0.25: ceil(7.5) = 8 -> 0.875
    let cfg = ConformalConfig {
        alpha: 0.25,
        ..Default::default()
    };
    let p = ConformalPredictor::calibrate(&probs, &labels, 4, cfg).unwrap();
    assert_eq!(p.q_hat, Some(0.875));

    // alpha too small for n = 9: ceil(10 * 0.95) = 10 > 9 -> every class.
    let cfg = ConformalConfig {
        alpha: 0.05,
        ..Default::default()
    };
    let p = ConformalPredictor::calibrate(&probs, &labels, 4, cfg).unwrap();
    assert_eq!(p.q_hat, None);
    assert_eq!(p.predict_sets(&ROW).unwrap()[0].len(), 4);
}

#[test]
fn randomised_aps_set_by_hand() {
    // With q = 0.75 and any u in (0,1): E(0)=0.5u <= q, E(1)=0.5+0.25u <= q,
    // E(2)=0.75+0.125u > q -> {0, 1}.
    let p = ConformalPredictor {
        config: ConformalConfig {
            alpha: 0.1,
            randomized: true,
            seed: 3,
            ..Default::default()
        },
        num_classes: 4,
        n_calibration: 9,
        q_hat: Some(0.75),
    };
    let sets = p.predict_sets(&[ROW, ROW, ROW].concat()).unwrap();
    assert!(sets.iter().all(|s| s == &vec![0, 1]), "{sets:?}");
    // q below 0.5u for a confident row can give an empty set; it is counted.
    let p = ConformalPredictor {
        q_hat: Some(0.0),
        ..p
    };
    let r = p.evaluate(&ROW, &[0]).unwrap();
    assert_eq!(r.empty_sets, 1);
    assert_eq!(r.coverage, 0.0);
}

#[test]
fn raps_by_hand() {
    let raps = ConformalScore::Raps {
        lambda: 0.1,
        k_reg: 1,
    };
    // rank 1: 0.5 ; rank 2: 0.75 + 0.1 ; rank 3: 0.875 + 0.2 ; rank 4: 1.0 + 0.3
    assert_eq!(conformity_score(&ROW, 0, 1.0, raps), 0.5);
    assert!((conformity_score(&ROW, 1, 1.0, raps) - 0.85).abs() < 1e-12);
    assert!((conformity_score(&ROW, 2, 1.0, raps) - 1.075).abs() < 1e-12);
    assert!((conformity_score(&ROW, 3, 1.0, raps) - 1.3).abs() < 1e-12);
    let (probs, labels) = calibration_set();
    let cfg = ConformalConfig {
        alpha: 0.35,
        score: raps,
        ..Default::default()
    };
    let p = ConformalPredictor::calibrate(&probs, &labels, 4, cfg).unwrap();
    // 7th smallest of [.5,.5,.5,.5,.85,.85,.85,1.075,1.3] = 0.85
    assert!((p.q_hat.unwrap() - 0.85).abs() < 1e-12);
    // Flat row under RAPS: 0.25, 0.6, 0.95 (> 0.85: included, stop) -> 3 classes,
    // where APS would give all 4 (see aps_scores_and_sets_by_hand).
    assert_eq!(p.predict_sets(&[0.25; 4]).unwrap(), vec![vec![0, 1, 2]]);
}

#[test]
fn bad_parameters_are_rejected() {
    let (probs, labels) = calibration_set();
    for alpha in [0.0, 1.0, -0.1, f64::NAN] {
        let cfg = ConformalConfig {
            alpha,
            ..Default::default()
        };
        assert!(ConformalPredictor::calibrate(&probs, &labels, 4, cfg).is_err());
    }
    let cfg = ConformalConfig {
        score: ConformalScore::Raps {
            lambda: -1.0,
            k_reg: 0,
        },
        ..Default::default()
    };
    assert!(ConformalPredictor::calibrate(&probs, &labels, 4, cfg).is_err());
    assert!(
        ConformalPredictor::calibrate(&probs, &labels[..3], 4, ConformalConfig::default()).is_err()
    );
}

/// Random probability rows and labels drawn from them: the model is calibrated by
/// construction, so split-conformal coverage must hold.
fn synthetic(rng: &mut ChaCha8Rng, n: usize, c: usize) -> (Vec<f32>, Vec<usize>) {
    let mut probs = Vec::with_capacity(n * c);
    let mut labels = Vec::with_capacity(n);
    for _ in 0..n {
        // Peaked rows: exp(3 * gaussian-ish) normalised.
        let raw: Vec<f64> = (0..c)
            .map(|_| (3.0 * (rng.random::<f64>() - 0.5) * 2.0).exp())
            .collect();
        let s: f64 = raw.iter().sum();
        let row: Vec<f32> = raw.iter().map(|v| (v / s) as f32).collect();
        let u: f32 = rng.random();
        let mut acc = 0.0;
        let mut label = c - 1;
        for (i, &p) in row.iter().enumerate() {
            acc += p;
            if u < acc {
                label = i;
                break;
            }
        }
        probs.extend(row);
        labels.push(label);
    }
    (probs, labels)
}

#[test]
fn coverage_holds_on_calibrated_synthetic_data() {
    let c = 6;
    for seed in 0..4u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (cal_p, cal_y) = synthetic(&mut rng, 1000, c);
        let (test_p, test_y) = synthetic(&mut rng, 3000, c);
        for score in [
            ConformalScore::Aps,
            ConformalScore::Raps {
                lambda: 0.05,
                k_reg: 2,
            },
        ] {
            for randomized in [false, true] {
                let alpha = 0.1;
                let cfg = ConformalConfig {
                    score,
                    alpha,
                    randomized,
                    seed,
                };
                let p = ConformalPredictor::calibrate(&cal_p, &cal_y, c, cfg).unwrap();
                let r = p.evaluate(&test_p, &test_y).unwrap();
                assert_eq!(r.target_coverage, 0.9);
                // Finite-sample slack: sd of coverage over 3000 test points ~0.0055,
                // plus calibration randomness ~0.01.
                assert!(
                    r.coverage >= 1.0 - alpha - 0.03,
                    "seed {seed} {score:?} randomized={randomized}: coverage {}",
                    r.coverage
                );
                if randomized {
                    // Randomised sets are close to exact: not grossly over-covering.
                    assert!(r.coverage <= 1.0 - alpha + 0.04, "coverage {}", r.coverage);
                }
                assert!(r.mean_set_size < c as f64, "sets are informative");
            }
        }
    }
}
