#!/usr/bin/env python3
"""Reference values of FID and KID for medvlm-eval's generative metrics
(`crates/medvlm-eval/src/generative.rs`), on small random feature sets.

* FID as pytorch-fid's `calculate_frechet_distance` computes it: means, covariances with
  `np.cov(rowvar=False)` (denominator n - 1), and
  `|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))` with `scipy.linalg.sqrtm`
  (the real part kept; pytorch-fid adds 1e-6 I to both covariances only when the product's
  square root is not finite, which does not happen on these sets).
* KID as torch-fidelity's `kid_features_to_metric` computes one subset: the polynomial kernel
  `k(x, y) = (x . y / d + 1)^3` and the unbiased MMD^2 estimator (diagonals of K_XX and K_YY
  left out). torch-fidelity draws its subsets with numpy's RNG; the reference uses one
  "subset" made of every row of each set (equal sizes), so it needs no RNG.

    python3 -m venv /tmp/synthenv && /tmp/synthenv/bin/pip install numpy scipy
    /tmp/synthenv/bin/python tools/make_generative_reference.py \
        > crates/medvlm-eval/tests/fixtures/generative_reference.json
"""
import json

import numpy as np
from scipy import linalg


def fid(a, b):
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1.dot(s2))
    assert np.isfinite(covmean).all()
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def mmd2_poly(a, b):
    d = a.shape[1]
    m = a.shape[0]
    assert b.shape[0] == m
    kxx = (a @ a.T / d + 1) ** 3
    kyy = (b @ b.T / d + 1) ** 3
    kxy = (a @ b.T / d + 1) ** 3
    kt_xx = kxx.sum() - np.diagonal(kxx).sum()
    kt_yy = kyy.sum() - np.diagonal(kyy).sum()
    return float((kt_xx + kt_yy) / (m * (m - 1)) - 2 * kxy.sum() / (m * m))


def main():
    rng = np.random.RandomState(7)
    cases = []
    # (rows of a, rows of b, dimension, shift of b's mean, scale of b)
    for name, n1, n2, d, shift, scale in [
        ("same_distribution", 50, 50, 6, 0.0, 1.0),
        ("shifted_scaled", 60, 60, 8, 0.7, 1.5),
        ("correlated_unequal_rows", 40, 70, 5, -0.3, 0.8),
    ]:
        mix = rng.randn(d, d)
        a = rng.randn(n1, d) @ mix
        b = (rng.randn(n2, d) @ (mix + 0.3 * rng.randn(d, d))) * scale + shift
        a = np.round(a, 6)
        b = np.round(b, 6)
        case = {
            "name": name,
            "dim": d,
            "a": a.ravel().tolist(),
            "b": b.ravel().tolist(),
            "fid": fid(a, b),
        }
        if n1 == n2:
            case["kid_one_subset"] = mmd2_poly(a, b)
        cases.append(case)
    print(json.dumps({"cases": cases}, indent=1))


if __name__ == "__main__":
    main()
