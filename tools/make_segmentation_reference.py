#!/usr/bin/env python3
"""Reference values for medvlm-eval's 2-D segmentation metrics (crates/medvlm-eval/src/
segmentation.rs), from numpy and scipy, on seeded random masks.

Cases: ~30 deterministic pairs (pred, gt) of random rectangles, ellipses and blobs, of sizes
16x16 to 64x48, some with an empty prediction and/or an empty ground truth, some touching
the image border, some with anisotropic pixel spacing.

Per case it records:

* dice = 2|P&G| / (|P|+|G|) and iou = |P&G| / |P|G|, null when both masks are empty.
* hd95 / hd / assd: the surface-distance metrics exactly as MONAI (Cardoso et al. 2022,
  ``monai.metrics``) computes them, reproducing
  ``monai.metrics.utils.get_mask_edges`` (edges = mask XOR scipy.ndimage.binary_erosion(mask)
  with scipy's default cross-shaped, 4-connected structuring element and border_value=0;
  MONAI's crop to the bounding box of pred|gt does not change these edges because everything
  outside that box is background) followed by ``get_surface_distance`` with
  ``distance_metric="euclidean"`` (scipy.ndimage.distance_transform_edt(~edges_B,
  sampling=spacing) read at the edge pixels of A). ``compute_hausdorff_distance(percentile=95,
  directed=False)`` is the max over the two directions of np.percentile(d, 95) (numpy's default
  linear interpolation; MONAI uses torch.quantile, the same interpolation); ``hd`` is the same
  with the max instead of the percentile; ``assd`` is
  ``compute_average_surface_distance(symmetric=True)``, the mean of both directions'
  distances concatenated. MONAI itself computes in float32; these references are float64.
  All three are null where MONAI returns nan/inf: when pred or gt is empty.
* hd95_medpy: medpy.metric.binary.hd95's variant, the 95th percentile of the concatenated
  distances of both directions (same edges, same distance transform). medpy raises on empty
  masks; null there.

Masks are stored as lists of row strings of '0'/'1' (row-major, rows x cols); spacing is
[sy, sx] (mm along rows, mm along columns) = scipy's `sampling`.

Output: crates/medvlm-eval/tests/fixtures/segmentation_reference.json. The Rust tests compare
against it and never run Python.

Needs: pip install numpy scipy   (tested with numpy 2.4.6, scipy 1.17.1)

Usage: python tools/make_segmentation_reference.py [OUT_JSON]
"""
import json
import sys

import numpy as np
import scipy
from scipy.ndimage import binary_erosion, distance_transform_edt, gaussian_filter

rng = np.random.default_rng(20240611)


# ---------------------------------------------------------------- shapes

def rectangle(shape, touch_border=False):
    h, w = shape
    rh, rw = rng.integers(2, max(3, h // 2)), rng.integers(2, max(3, w // 2))
    if touch_border:
        y0 = 0 if rng.random() < 0.5 else h - rh
        x0 = rng.integers(0, w - rw + 1)
    else:
        y0, x0 = rng.integers(1, h - rh), rng.integers(1, w - rw)
    m = np.zeros(shape, bool)
    m[y0:y0 + rh, x0:x0 + rw] = True
    return m


def ellipse(shape, touch_border=False):
    h, w = shape
    cy, cx = rng.uniform(0.2 * h, 0.8 * h), rng.uniform(0.2 * w, 0.8 * w)
    ry, rx = rng.uniform(2, h / 3), rng.uniform(2, w / 3)
    if touch_border:
        cx = rng.uniform(-rx / 2, rx / 2) if rng.random() < 0.5 else w - 1 + rng.uniform(-rx / 2, rx / 2)
    th = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    dy, dx = yy - cy, xx - cx
    u = dy * np.cos(th) + dx * np.sin(th)
    v = -dy * np.sin(th) + dx * np.cos(th)
    return (u / ry) ** 2 + (v / rx) ** 2 <= 1.0


def blob(shape):
    # thresholded smoothed noise: irregular, possibly several components and holes
    noise = gaussian_filter(rng.standard_normal(shape), sigma=rng.uniform(1.5, 3.5))
    return noise > np.quantile(noise, rng.uniform(0.55, 0.85))


def random_mask(shape, touch_border=False):
    kind = rng.integers(0, 3)
    if kind == 0:
        return rectangle(shape, touch_border)
    if kind == 1:
        return ellipse(shape, touch_border)
    return blob(shape)


def perturb(gt):
    """A prediction near gt: shifted, eroded/dilated and with a few flipped pixels."""
    h, w = gt.shape
    dy, dx = rng.integers(-3, 4), rng.integers(-3, 4)
    p = np.zeros_like(gt)
    ys, xs = slice(max(0, dy), min(h, h + dy)), slice(max(0, dx), min(w, w + dx))
    ys0, xs0 = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
    p[ys, xs] = gt[ys0, xs0]
    r = rng.random()
    if r < 0.3:
        p = binary_erosion(p)
    elif r < 0.6:
        p = ~binary_erosion(~p, border_value=1)  # dilation
    flips = rng.random(gt.shape) < rng.choice([0.0, 0.002, 0.01])
    return p ^ flips


# ---------------------------------------------------------------- metrics

def edges(m):
    # monai.metrics.utils.get_mask_edges (crop is a no-op for the edges, see docstring)
    return binary_erosion(m) ^ m


def directed(ea, eb, spacing):
    # monai.metrics.utils.get_surface_distance(ea, eb, "euclidean", spacing), both non-empty
    return distance_transform_edt(~eb, sampling=spacing)[ea]


def nullable(x):
    return None if x is None or not np.isfinite(x) else float(x)


def metrics(pred, gt, spacing):
    inter = np.logical_and(pred, gt).sum()
    sp, sg = pred.sum(), gt.sum()
    union = np.logical_or(pred, gt).sum()
    out = {
        "dice": None if sp + sg == 0 else float(2.0 * inter / (sp + sg)),
        "iou": None if union == 0 else float(inter / union),
        "hd95": None, "hd": None, "assd": None, "hd95_medpy": None,
    }
    if sp == 0 or sg == 0:
        return out
    ep, eg = edges(pred), edges(gt)
    d_pg, d_gp = directed(ep, eg, spacing), directed(eg, ep, spacing)
    out["hd95"] = nullable(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))
    out["hd"] = nullable(max(d_pg.max(), d_gp.max()))
    both = np.concatenate([d_pg, d_gp])
    out["assd"] = nullable(both.mean())
    out["hd95_medpy"] = nullable(np.percentile(both, 95))
    out["hd95_directed"] = [float(np.percentile(d_pg, 95)), float(np.percentile(d_gp, 95))]
    out["n_edges"] = [int(ep.sum()), int(eg.sum())]
    return out


def rows(m):
    return ["".join("1" if v else "0" for v in r) for r in m]


SHAPES = [(16, 16), (16, 24), (24, 16), (32, 32), (40, 28), (48, 64), (64, 48), (20, 37)]
SPACINGS = [(1.0, 1.0), (1.0, 1.0), (0.5, 0.5), (1.0, 0.7), (2.5, 0.8), (0.3, 1.9)]

cases = []
for i in range(30):
    shape = SHAPES[i % len(SHAPES)]
    spacing = SPACINGS[int(rng.integers(0, len(SPACINGS)))]
    touch = i % 4 == 1
    gt = random_mask(shape, touch)
    kind = "perturbed"
    if i in (3, 17):
        pred = np.zeros(shape, bool)
        kind = "empty_pred"
    elif i in (7, 21):
        pred, gt = random_mask(shape), np.zeros(shape, bool)
        kind = "empty_gt"
    elif i == 11:
        pred, gt = np.zeros(shape, bool), np.zeros(shape, bool)
        kind = "both_empty"
    elif i in (5, 25):
        pred = random_mask(shape, touch)  # unrelated shape, possibly disjoint
        kind = "independent"
    elif i == 13:
        pred = gt.copy()
        kind = "identical"
    elif i == 27:
        # single pixels (an edge-only mask) and a full-image prediction
        gt = np.zeros(shape, bool)
        gt[rng.integers(0, shape[0]), rng.integers(0, shape[1])] = True
        pred = np.ones(shape, bool)
        kind = "pixel_vs_full"
    else:
        pred = perturb(gt)
    if kind != "both_empty" and kind != "empty_pred" and not pred.any():
        pred[shape[0] // 2, shape[1] // 2] = True
    if kind not in ("both_empty", "empty_gt") and not gt.any():
        gt[shape[0] // 3, shape[1] // 3] = True
    c = {
        "name": "case%02d_%s%s" % (i, kind, "_border" if touch else ""),
        "rows": shape[0], "cols": shape[1], "spacing": list(spacing),
        "pred": rows(pred), "gt": rows(gt),
    }
    c.update(metrics(pred, gt, spacing))
    cases.append(c)

out = {
    "generator": "tools/make_segmentation_reference.py (numpy %s, scipy %s)"
    % (np.__version__, scipy.__version__),
    "cases": cases,
}
path = sys.argv[1] if len(sys.argv) > 1 else "crates/medvlm-eval/tests/fixtures/segmentation_reference.json"
with open(path, "w") as f:
    json.dump(out, f, separators=(",", ":"))
    f.write("\n")
print("wrote", path, len(cases), "cases")
