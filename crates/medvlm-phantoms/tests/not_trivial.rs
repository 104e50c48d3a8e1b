//! The phantom findings are not solvable from global intensity statistics:
//! a logistic regression on an intensity histogram does clearly worse than
//! the same classifier on simple spatial features (coarse grid means and
//! local-contrast maxima), which itself is well above chance. So later tasks
//! are measured on something with signal and difficulty.

use medvlm_phantoms::{generate_study, Modality, Study, StudyOptions};

const SIZE: usize = 64;

fn histogram_features(s: &Study) -> Vec<f32> {
    let n = s.image.len() as f32;
    let mut hist = vec![0.0f32; 16];
    for &p in &s.image {
        hist[(p / 16) as usize] += 1.0 / n;
    }
    let mean = s.image.iter().map(|&p| p as f32).sum::<f32>() / n / 255.0;
    let var = s
        .image
        .iter()
        .map(|&p| (p as f32 / 255.0 - mean).powi(2))
        .sum::<f32>()
        / n;
    hist.push(mean);
    hist.push(var.sqrt());
    hist
}

/// Mean of each cell of an 8 x 8 grid, and the largest local contrast
/// (pixel minus its 5 x 5 neighbourhood mean, either sign) in each cell.
fn spatial_features(s: &Study) -> Vec<f32> {
    let img: Vec<f32> = s.image.iter().map(|&p| p as f32 / 255.0).collect();
    let cell = SIZE / 8;
    let mut means = vec![0.0f32; 64];
    let mut bright = vec![f32::MIN; 64];
    let mut dark = vec![f32::MIN; 64];
    for y in 0..SIZE {
        for x in 0..SIZE {
            let mut acc = 0.0;
            let mut cnt = 0.0;
            for dy in -2i32..=2 {
                for dx in -2i32..=2 {
                    let (yy, xx) = (y as i32 + dy, x as i32 + dx);
                    if (0..SIZE as i32).contains(&yy) && (0..SIZE as i32).contains(&xx) {
                        acc += img[yy as usize * SIZE + xx as usize];
                        cnt += 1.0;
                    }
                }
            }
            let local = img[y * SIZE + x] - acc / cnt;
            let c = (y / cell) * 8 + x / cell;
            means[c] += img[y * SIZE + x] / (cell * cell) as f32;
            bright[c] = bright[c].max(local);
            dark[c] = dark[c].max(-local);
        }
    }
    // Global max-pooling of local contrast: where a lesion is does not matter.
    let mut sorted = bright.clone();
    sorted.sort_by(f32::total_cmp);
    let top = [sorted[63], sorted[62], sorted[60]];
    means
        .into_iter()
        .chain(bright)
        .chain(dark)
        .chain(top)
        .collect()
}

fn standardise(train: &mut [Vec<f32>], test: &mut [Vec<f32>]) {
    let d = train[0].len();
    for j in 0..d {
        let n = train.len() as f32;
        let mean = train.iter().map(|r| r[j]).sum::<f32>() / n;
        let sd = (train.iter().map(|r| (r[j] - mean).powi(2)).sum::<f32>() / n)
            .sqrt()
            .max(1e-6);
        for r in train.iter_mut().chain(test.iter_mut()) {
            r[j] = (r[j] - mean) / sd;
        }
    }
}

/// L2-regularised logistic regression with class-balanced weights, trained by
/// full-batch gradient descent.
fn logistic_fit(x: &[Vec<f32>], y: &[bool]) -> Vec<f32> {
    let d = x[0].len();
    let mut w = vec![0.0f32; d + 1];
    let pos = y.iter().filter(|&&b| b).count().max(1) as f32;
    let neg = (y.len() as f32 - pos).max(1.0);
    let (wp, wn) = (0.5 / pos, 0.5 / neg);
    let lambda = 1e-2;
    for _ in 0..400 {
        let mut grad = vec![0.0f32; d + 1];
        for (xi, &yi) in x.iter().zip(y) {
            let z = w[d] + xi.iter().zip(&w).map(|(a, b)| a * b).sum::<f32>();
            let p = 1.0 / (1.0 + (-z).exp());
            let g = (p - if yi { 1.0 } else { 0.0 }) * if yi { wp } else { wn };
            for j in 0..d {
                grad[j] += g * xi[j];
            }
            grad[d] += g;
        }
        for j in 0..d {
            w[j] -= 0.5 * (grad[j] + lambda * w[j]);
        }
        w[d] -= 0.5 * grad[d];
    }
    w
}

fn balanced_accuracy(w: &[f32], x: &[Vec<f32>], y: &[bool]) -> f32 {
    let d = w.len() - 1;
    let (mut tp, mut tn, mut p, mut n) = (0.0, 0.0, 0.0, 0.0);
    for (xi, &yi) in x.iter().zip(y) {
        let z = w[d] + xi.iter().zip(w).map(|(a, b)| a * b).sum::<f32>();
        if yi {
            p += 1.0;
            tp += f32::from(z > 0.0);
        } else {
            n += 1.0;
            tn += f32::from(z <= 0.0);
        }
    }
    0.5 * (tp / f32::max(p, 1.0) + tn / f32::max(n, 1.0))
}

fn compare(modality: Modality, n_train: u64, n_test: u64) -> Vec<(&'static str, f32, f32)> {
    let opts = StudyOptions {
        size: SIZE as u32,
        registration: false,
        ..Default::default()
    };
    let studies: Vec<Study> = (0..n_train + n_test)
        .map(|i| generate_study(modality, 11, i, &opts))
        .collect();
    let (train, test) = studies.split_at(n_train as usize);
    let mut out = Vec::new();
    for label in modality.findings() {
        let ytr: Vec<bool> = train.iter().map(|s| s.labels().contains(&label)).collect();
        let yte: Vec<bool> = test.iter().map(|s| s.labels().contains(&label)).collect();
        let mut scores = [0.0f32; 2];
        for (k, feats) in [
            histogram_features as fn(&Study) -> Vec<f32>,
            spatial_features,
        ]
        .iter()
        .enumerate()
        {
            let mut xtr: Vec<Vec<f32>> = train.iter().map(feats).collect();
            let mut xte: Vec<Vec<f32>> = test.iter().map(feats).collect();
            standardise(&mut xtr, &mut xte);
            let w = logistic_fit(&xtr, &ytr);
            scores[k] = balanced_accuracy(&w, &xte, &yte);
        }
        eprintln!(
            "{modality} {label}: histogram {:.3} spatial {:.3}",
            scores[0], scores[1]
        );
        out.push((label, scores[0], scores[1]));
    }
    out
}

#[test]
fn chest_findings_need_spatial_structure() {
    let results = compare(Modality::ChestXray, 400, 300);
    let mean_hist = results.iter().map(|r| r.1).sum::<f32>() / results.len() as f32;
    let mean_spatial = results.iter().map(|r| r.2).sum::<f32>() / results.len() as f32;
    eprintln!("mean: histogram {mean_hist:.3} spatial {mean_spatial:.3}");
    assert!(
        mean_spatial > 0.75,
        "spatial features should see the findings: {mean_spatial}"
    );
    assert!(
        mean_spatial - mean_hist > 0.1,
        "a global histogram should do clearly worse: {mean_hist} vs {mean_spatial}"
    );
}
