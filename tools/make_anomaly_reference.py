#!/usr/bin/env python3
"""Reference values of pixel AUROC and AUPRO (Bergmann et al., "The MVTec Anomaly Detection
Dataset", IJCV 2021) for medvlm-eval's anomaly metrics, computed the way the MVTec AD evaluation
script computes them: connected components of the ground-truth masks with 8-connectivity
(scipy.ndimage.label with a 3x3 structure), one threshold per distinct anomaly score, the
per-region overlap (PRO) averaged over every region of every image against the false-positive
rate over every normal pixel, integrated by the trapezoid rule up to FPR 0.3 (the last segment
interpolated) and divided by 0.3. Pixel AUROC by scikit-learn's roc_auc_score.

    python3 -m venv /tmp/pyref && /tmp/pyref/bin/pip install numpy scipy scikit-learn
    /tmp/pyref/bin/python tools/make_anomaly_reference.py \
        > crates/medvlm-eval/tests/fixtures/anomaly_reference.json
"""
import json
import sys

import numpy as np
from scipy.ndimage import label
from sklearn.metrics import roc_auc_score


def pro_curve(maps, masks):
    structure = np.ones((3, 3), dtype=int)
    fp_change = []
    pro_change = []
    scores = []
    n_ok = sum(int((m == 0).sum()) for m in masks)
    n_regions = 0
    labelled = []
    for m in masks:
        lab, n = label(m, structure)
        labelled.append((lab, n))
        n_regions += n
    for amap, m, (lab, n) in zip(maps, masks, labelled):
        fp = np.where(m == 0, 1.0 / n_ok, 0.0)
        pro = np.zeros_like(amap, dtype=float)
        for k in range(1, n + 1):
            region = lab == k
            pro[region] = 1.0 / (n_regions * region.sum())
        fp_change.append(fp.ravel())
        pro_change.append(pro.ravel())
        scores.append(amap.ravel())
    fp_change = np.concatenate(fp_change)
    pro_change = np.concatenate(pro_change)
    scores = np.concatenate(scores)
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores_sorted = scores[order]
    fprs = np.cumsum(fp_change[order])
    pros = np.cumsum(pro_change[order])
    keep = np.append(np.diff(scores_sorted) != 0, True)
    fprs = np.clip(np.concatenate([[0.0], fprs[keep]]), 0, 1)
    pros = np.clip(np.concatenate([[0.0], pros[keep]]), 0, 1)
    return fprs, pros


def trapezoid_upto(x, y, x_max):
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    if x_max >= x[-1]:
        return float(np.trapezoid(y, x))
    i = np.searchsorted(x, x_max, side="right")  # x[i-1] <= x_max < x[i]
    y_at = y[i - 1] + (y[i] - y[i - 1]) * (x_max - x[i - 1]) / (x[i] - x[i - 1])
    xs = np.append(x[:i], x_max)
    ys = np.append(y[:i], y_at)
    return float(np.trapezoid(ys, xs))


def main():
    rng = np.random.default_rng(3)
    maps, masks = [], []
    for i in range(6):
        h, w = 24, 20
        m = np.zeros((h, w), dtype=np.uint8)
        if i % 3 != 0:  # two of three images have defects
            for _ in range(rng.integers(1, 3)):
                y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
                m[y:y + rng.integers(2, 6), x:x + rng.integers(2, 6)] = 1
            m[0, 0] = 1  # a one-pixel region in a corner
        noise = rng.normal(0, 0.35, (h, w))
        amap = 0.5 * m + noise
        amap = np.round(amap, 2)  # ties between pixels, as quantised maps have
        maps.append(amap)
        masks.append(m)
    fprs, pros = pro_curve(maps, masks)
    aupro = trapezoid_upto(fprs, pros, 0.3) / 0.3
    pixel_auroc = roc_auc_score(np.concatenate([m.ravel() for m in masks]),
                                np.concatenate([a.ravel() for a in maps]))
    out = {
        "generator": "tools/make_anomaly_reference.py (MVTec AD AUPRO procedure; sklearn AUROC)",
        "maps": [a.tolist() for a in maps],
        "masks": [m.tolist() for m in masks],
        "aupro_0_3": aupro,
        "pixel_auroc": float(pixel_auroc),
        "regions": int(sum(label(m, np.ones((3, 3), dtype=int))[1] for m in masks)),
    }
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
