//! Distribution metrics of generated images, computed on feature vectors: the Fréchet
//! distance (FID, Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a
//! Local Nash Equilibrium", NeurIPS 2017) and the kernel distance (KID, Bińkowski et al.,
//! "Demystifying MMD GANs", ICLR 2018).
//!
//! Both are defined on whatever features they are given. The published numbers use the
//! 2048-wide pool features of an ImageNet Inception-v3; medvlm computes them in the image
//! embedding space of the medical VLM instead (see `medvlm_tasks::synthesis_pipeline`), so
//! its values are **not comparable** with published FID/KID figures and are named
//! "FID (VLM features)" / "KID (VLM features)" wherever they are reported.
//!
//! * [`frechet_distance`]: pytorch-fid's formula `|mu1 - mu2|^2 + tr(S1) + tr(S2) -
//!   2 tr((S1 S2)^(1/2))`, covariances with denominator `n - 1` (`np.cov`). The trace of the
//!   matrix square root is computed as `sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))` (the same
//!   eigenvalues as `S1 S2`, but a symmetric matrix), each square root from a cyclic Jacobi
//!   eigendecomposition ([`symmetric_eigen`]) in f64, negative round-off eigenvalues clipped
//!   to zero, instead of scipy's general `sqrtm`.
//! * [`kernel_distance`]: torch-fidelity's KID: the cubic polynomial kernel
//!   `k(x, y) = (x . y / d + 1)^3`, the unbiased MMD^2 estimator ([`mmd2_unbiased_poly`])
//!   on `subsets` random subsets of `subset_size` rows of each set drawn without
//!   replacement, mean and standard deviation (denominator `subsets`) over subsets.
//!   torch-fidelity's defaults are 100 subsets of 1000; the subset size is capped at the
//!   smaller set, and the subsets are drawn with our own seeded generator (ChaCha8), so only
//!   the single-subset value is bit-comparable with torch-fidelity.
//!
//! `tools/make_generative_reference.py` computes both with numpy/scipy on small random
//! sets; `tests/generative_reference.rs` checks this module against them.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{EvalError, Result};

fn check_set(what: &'static str, data: &[f32], dim: usize, min_rows: usize) -> Result<usize> {
    if dim == 0 {
        return Err(EvalError::InvalidParameter {
            name: "dim",
            reason: "the feature dimension must be at least 1".into(),
        });
    }
    if !data.len().is_multiple_of(dim) {
        return Err(EvalError::LengthMismatch {
            what,
            got: data.len(),
            expected: data.len() / dim * dim,
        });
    }
    if let Some(position) = data.iter().position(|v| !v.is_finite()) {
        return Err(EvalError::NonFinite { what, position });
    }
    let rows = data.len() / dim;
    if rows < min_rows {
        return Err(EvalError::InvalidParameter {
            name: what,
            reason: format!("{rows} feature vectors; at least {min_rows} are needed"),
        });
    }
    Ok(rows)
}

/// Eigenvalues and eigenvectors of a symmetric `n x n` matrix (row-major; only symmetry is
/// assumed, not definiteness) by the cyclic Jacobi method: rotations annihilate each
/// off-diagonal entry in turn until the off-diagonal mass is below `1e-24` of the total
/// (at most 100 sweeps). Returns `(values, vectors)` with eigenvector `k` in column `k` of
/// the row-major `vectors`, so `A = V diag(values) V^T`. Values are not sorted.
pub fn symmetric_eigen(a: &[f64], n: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    if a.len() != n * n {
        return Err(EvalError::LengthMismatch {
            what: "symmetric matrix",
            got: a.len(),
            expected: n * n,
        });
    }
    if let Some(position) = a.iter().position(|v| !v.is_finite()) {
        return Err(EvalError::NonFinite {
            what: "symmetric matrix",
            position,
        });
    }
    let mut m = a.to_vec();
    // Symmetrise (round-off in the caller's products) so the rotations see one matrix.
    for p in 0..n {
        for q in p + 1..n {
            let s = 0.5 * (m[p * n + q] + m[q * n + p]);
            m[p * n + q] = s;
            m[q * n + p] = s;
        }
    }
    let mut v = vec![0.0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let total: f64 = m.iter().map(|x| x * x).sum();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|p| (p + 1..n).map(move |q| (p, q)))
            .map(|(p, q)| 2.0 * m[p * n + q] * m[p * n + q])
            .sum();
        if off <= 1e-24 * total || off == 0.0 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = m[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (m[q * n + q] - m[p * n + p]) / (2.0 * apq);
                let sign = if theta >= 0.0 { 1.0 } else { -1.0 };
                let t = sign / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                // A <- J^T A J with J = [[c, s], [-s, c]] in the (p, q) plane.
                for k in 0..n {
                    let (akp, akq) = (m[k * n + p], m[k * n + q]);
                    m[k * n + p] = c * akp - s * akq;
                    m[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (m[p * n + k], m[q * n + k]);
                    m[p * n + k] = c * apk - s * aqk;
                    m[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    Ok(((0..n).map(|i| m[i * n + i]).collect(), v))
}

/// Mean and covariance (denominator `n - 1`, as `np.cov`) of row-major features, in f64.
pub fn mean_and_covariance(data: &[f32], dim: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let rows = check_set("features", data, dim, 2)?;
    let mut mean = vec![0.0f64; dim];
    for r in data.chunks_exact(dim) {
        for (m, &x) in mean.iter_mut().zip(r) {
            *m += f64::from(x);
        }
    }
    mean.iter_mut().for_each(|m| *m /= rows as f64);
    let mut cov = vec![0.0f64; dim * dim];
    let mut centred = vec![0.0f64; dim];
    for r in data.chunks_exact(dim) {
        for ((c, &x), m) in centred.iter_mut().zip(r).zip(&mean) {
            *c = f64::from(x) - m;
        }
        for i in 0..dim {
            let ci = centred[i];
            for j in i..dim {
                cov[i * dim + j] += ci * centred[j];
            }
        }
    }
    for i in 0..dim {
        for j in i..dim {
            let v = cov[i * dim + j] / (rows - 1) as f64;
            cov[i * dim + j] = v;
            cov[j * dim + i] = v;
        }
    }
    Ok((mean, cov))
}

fn matmul(a: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut out = vec![0.0f64; n * n];
    for i in 0..n {
        for k in 0..n {
            let aik = a[i * n + k];
            if aik == 0.0 {
                continue;
            }
            for j in 0..n {
                out[i * n + j] += aik * b[k * n + j];
            }
        }
    }
    out
}

/// The symmetric square root `V diag(sqrt(max(l, 0))) V^T` of a symmetric positive
/// semi-definite matrix.
pub fn psd_sqrt(a: &[f64], n: usize) -> Result<Vec<f64>> {
    let (vals, vecs) = symmetric_eigen(a, n)?;
    let mut out = vec![0.0f64; n * n];
    for (k, &l) in vals.iter().enumerate() {
        let r = l.max(0.0).sqrt();
        if r == 0.0 {
            continue;
        }
        for i in 0..n {
            let vik = vecs[i * n + k] * r;
            for j in 0..n {
                out[i * n + j] += vik * vecs[j * n + k];
            }
        }
    }
    Ok(out)
}

/// The Fréchet distance between the Gaussians fitted to two feature sets (row-major,
/// `dim` columns, at least 2 rows each): FID's formula (see the module doc).
pub fn frechet_distance(a: &[f32], b: &[f32], dim: usize) -> Result<f64> {
    check_set("first feature set", a, dim, 2)?;
    check_set("second feature set", b, dim, 2)?;
    let (mu1, s1) = mean_and_covariance(a, dim)?;
    let (mu2, s2) = mean_and_covariance(b, dim)?;
    let diff: f64 = mu1.iter().zip(&mu2).map(|(x, y)| (x - y) * (x - y)).sum();
    let trace = |m: &[f64]| (0..dim).map(|i| m[i * dim + i]).sum::<f64>();
    let r1 = psd_sqrt(&s1, dim)?;
    let inner = matmul(&matmul(&r1, &s2, dim), &r1, dim);
    let (vals, _) = symmetric_eigen(&inner, dim)?;
    let tr_covmean: f64 = vals.iter().map(|l| l.max(0.0).sqrt()).sum();
    Ok(diff + trace(&s1) + trace(&s2) - 2.0 * tr_covmean)
}

fn poly_kernel(x: &[f32], y: &[f32], dim: usize) -> f64 {
    let dot: f64 = x
        .iter()
        .zip(y)
        .map(|(a, b)| f64::from(*a) * f64::from(*b))
        .sum();
    (dot / dim as f64 + 1.0).powi(3)
}

/// The unbiased estimate of MMD^2 between two sets of the same number `m >= 2` of rows with
/// the cubic polynomial kernel `(x . y / d + 1)^3` (Bińkowski et al. 2018, eq. 3;
/// torch-fidelity's `mmd2`): the within-set kernel sums leave out the diagonal and are
/// divided by `m (m - 1)`, the cross sum by `m^2`.
pub fn mmd2_unbiased_poly(a: &[f32], b: &[f32], dim: usize) -> Result<f64> {
    let m = check_set("first feature set", a, dim, 2)?;
    let mb = check_set("second feature set", b, dim, 2)?;
    if m != mb {
        return Err(EvalError::LengthMismatch {
            what: "second feature set (rows)",
            got: mb,
            expected: m,
        });
    }
    let ra: Vec<&[f32]> = a.chunks_exact(dim).collect();
    let rb: Vec<&[f32]> = b.chunks_exact(dim).collect();
    let within = |r: &[&[f32]]| -> f64 {
        let mut s = 0.0;
        for i in 0..m {
            for j in i + 1..m {
                s += 2.0 * poly_kernel(r[i], r[j], dim);
            }
        }
        s
    };
    let mut cross = 0.0;
    for x in &ra {
        for y in &rb {
            cross += poly_kernel(x, y, dim);
        }
    }
    let mf = m as f64;
    Ok((within(&ra) + within(&rb)) / (mf * (mf - 1.0)) - 2.0 * cross / (mf * mf))
}

/// Settings of [`kernel_distance`]; defaults are torch-fidelity's (100 subsets of 1000) and
/// seed 0.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KidConfig {
    /// Random subsets averaged over.
    pub subsets: usize,
    /// Rows drawn from each set per subset (capped at the smaller set).
    pub subset_size: usize,
    /// Seed of the subset draws.
    pub seed: u64,
}

impl Default for KidConfig {
    fn default() -> Self {
        Self {
            subsets: 100,
            subset_size: 1000,
            seed: 0,
        }
    }
}

/// KID: mean and standard deviation of the unbiased polynomial-kernel MMD^2 over subsets.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct KidScore {
    /// Mean over subsets.
    pub mean: f64,
    /// Standard deviation over subsets (denominator `subsets`, as `np.std`).
    pub std: f64,
    /// Subsets used.
    pub subsets: usize,
    /// Rows per set in each subset (after the cap).
    pub subset_size: usize,
}

fn draw_rows(data: &[f32], dim: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let n = data.len() / dim;
    let mut idx: Vec<usize> = (0..n).collect();
    // Partial Fisher-Yates: the first k entries are a uniform draw without replacement.
    for i in 0..k {
        let j = rng.random_range(i..n);
        idx.swap(i, j);
    }
    idx[..k]
        .iter()
        .flat_map(|&i| data[i * dim..(i + 1) * dim].iter().copied())
        .collect()
}

/// KID between two feature sets (see the module doc): `cfg.subsets` subsets of
/// `min(cfg.subset_size, rows of a, rows of b)` rows of each set.
pub fn kernel_distance(a: &[f32], b: &[f32], dim: usize, cfg: &KidConfig) -> Result<KidScore> {
    let na = check_set("first feature set", a, dim, 2)?;
    let nb = check_set("second feature set", b, dim, 2)?;
    if cfg.subsets == 0 {
        return Err(EvalError::InvalidParameter {
            name: "subsets",
            reason: "at least one subset is needed".into(),
        });
    }
    let k = cfg.subset_size.min(na).min(nb);
    if k < 2 {
        return Err(EvalError::InvalidParameter {
            name: "subset_size",
            reason: format!("{k} rows per subset; at least 2 are needed"),
        });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut values = Vec::with_capacity(cfg.subsets);
    for _ in 0..cfg.subsets {
        let sa = draw_rows(a, dim, k, &mut rng);
        let sb = draw_rows(b, dim, k, &mut rng);
        values.push(mmd2_unbiased_poly(&sa, &sb, dim)?);
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / values.len() as f64;
    Ok(KidScore {
        mean,
        std: var.sqrt(),
        subsets: cfg.subsets,
        subset_size: k,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_reconstructs_a_symmetric_matrix_with_orthonormal_vectors() {
        let n = 5;
        let mut a = vec![0.0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = ((i * 7 + j * 7 + i * j) % 11) as f64 - 5.0;
            }
        }
        let (vals, v) = symmetric_eigen(&a, n).unwrap();
        for i in 0..n {
            for j in 0..n {
                let rec: f64 = (0..n).map(|k| v[i * n + k] * vals[k] * v[j * n + k]).sum();
                assert!((rec - a[i * n + j]).abs() < 1e-9, "({i},{j}) {rec}");
                let dot: f64 = (0..n).map(|k| v[k * n + i] * v[k * n + j]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-9);
            }
        }
        // Known answer: [[2, 1], [1, 2]] has eigenvalues 1 and 3.
        let (mut vals, _) = symmetric_eigen(&[2.0, 1.0, 1.0, 2.0], 2).unwrap();
        vals.sort_by(f64::total_cmp);
        assert!((vals[0] - 1.0).abs() < 1e-12 && (vals[1] - 3.0).abs() < 1e-12);
    }

    #[test]
    fn psd_sqrt_squares_back() {
        let a = [4.0, 2.0, 0.0, 2.0, 3.0, 1.0, 0.0, 1.0, 2.0];
        let r = psd_sqrt(&a, 3).unwrap();
        let sq = matmul(&r, &r, 3);
        for (x, y) in sq.iter().zip(&a) {
            assert!((x - y).abs() < 1e-9);
        }
    }

    #[test]
    fn fid_of_gaussians_with_known_parameters() {
        // Two sets with diagonal covariances: FID = |dmu|^2 + sum (sqrt(s1) - sqrt(s2))^2.
        // Rows (+-1, +-2) around 0 and (+-3, +-1) around (1, 1): cov with n - 1 = 3.
        let a = [1.0, 2.0, -1.0, -2.0, 1.0, -2.0, -1.0, 2.0];
        let b = [4.0, 2.0, -2.0, 0.0, 4.0, 0.0, -2.0, 2.0];
        let (s1, s2) = ([4.0 / 3.0, 16.0 / 3.0], [36.0 / 3.0, 4.0 / 3.0]);
        let want = 2.0
            + s1.iter()
                .zip(&s2)
                .map(|(x, y): (&f64, &f64)| (x.sqrt() - y.sqrt()).powi(2))
                .sum::<f64>();
        let got = frechet_distance(&a, &b, 2).unwrap();
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        assert!(frechet_distance(&a, &a, 2).unwrap().abs() < 1e-9);
    }

    #[test]
    fn kid_is_near_zero_for_one_distribution_and_positive_for_two() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut draw = |shift: f32| -> Vec<f32> {
            (0..200 * 4)
                .map(|_| rng.random_range(-1.0f32..1.0) + shift)
                .collect()
        };
        let (a, b, c) = (draw(0.0), draw(0.0), draw(0.5));
        let cfg = KidConfig {
            subsets: 20,
            subset_size: 100,
            seed: 3,
        };
        let same = kernel_distance(&a, &b, 4, &cfg).unwrap();
        let diff = kernel_distance(&a, &c, 4, &cfg).unwrap();
        assert_eq!(same.subset_size, 100);
        assert!(same.mean.abs() < 3.0 * same.std.max(1e-3), "{same:?}");
        assert!(diff.mean > 10.0 * same.mean.abs(), "{diff:?} vs {same:?}");
        // Same seed, same value.
        assert_eq!(kernel_distance(&a, &c, 4, &cfg).unwrap(), diff);
    }

    #[test]
    fn bad_inputs_are_refused() {
        assert!(frechet_distance(&[1.0, 2.0, 3.0], &[1.0, 2.0], 2).is_err());
        assert!(frechet_distance(&[1.0, 2.0], &[1.0, 2.0, 3.0, 4.0], 2).is_err());
        assert!(frechet_distance(&[1.0, f32::NAN, 0.0, 0.0], &[0.0; 4], 2).is_err());
        assert!(mmd2_unbiased_poly(&[0.0; 4], &[0.0; 6], 2).is_err());
        let cfg = KidConfig {
            subsets: 0,
            ..KidConfig::default()
        };
        assert!(kernel_distance(&[0.0; 4], &[0.0; 4], 2, &cfg).is_err());
        assert!(frechet_distance(&[], &[], 0).is_err());
    }
}
