#!/usr/bin/env python3
"""Reference values for LP++'s data-driven constants (medvlm-adapt `lp_plus_plus`).

Computes, as the official LP++ code does (Huang et al., CVPR 2024; `calculate_init_alpha`,
`calculate_lr_alpha`, `calculate_lr_w` of FewShot-CLIP-Strong-Baseline), on random
L2-normalised support features and class text embeddings:

* alpha_init = 250 * mean_c alpha_tilde_c, where alpha_tilde = sum_i onehot_ic * z_ic / n_c
  and z = F T^T (the one-hot product keeps each image's own-class text logit);
* lr_alpha = N / (4 * max_j sum_i z_ij^2);
* lr_w = 4 N / lambda_max(F^T F), with lambda_max from a symmetric eigendecomposition.

The classes have different numbers of support images, so a per-class mean and a pooled mean
differ. Output: crates/medvlm-adapt/tests/fixtures/lpp_reference.json (float64). The Rust
test compares against it and never runs Python.

Needs: pip install numpy
Usage: python tools/make_lpp_reference.py [OUT_JSON]
"""
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    ROOT, "crates/medvlm-adapt/tests/fixtures/lpp_reference.json")

rng = np.random.default_rng(7)
C, D = 4, 24
counts = [1, 2, 3, 5]
text = rng.normal(size=(C, D))
text /= np.linalg.norm(text, axis=1, keepdims=True)
feats, labels = [], []
for c, n in enumerate(counts):
    for _ in range(n):
        # An image near its class text: the own-class logit is the largest, as in CLIP.
        v = 0.6 * text[c] + rng.normal(size=D) * 0.25
        feats.append(v / np.linalg.norm(v))
        labels.append(c)
F = np.array(feats)
N = F.shape[0]
onehot = np.zeros((N, C))
onehot[np.arange(N), labels] = 1.0

z = F @ text.T  # [N, C] zero-shot text logits (no logit scale)
alpha_tilde = (onehot * z / onehot.sum(axis=0, keepdims=True)).sum(axis=0)  # [C]
alpha_init = float(np.mean(250.0 * alpha_tilde))
lr_alpha = float(N / (4.0 * np.max(np.sum(z ** 2, axis=0))))
lr_w = float(4.0 * N / np.max(np.linalg.eigh(F.T @ F)[0]))
# The C x C class-mean table averaged whole: what the own-class product avoids.
class_means = (onehot.T @ z) / onehot.sum(axis=0)[:, None]
alpha_all_pairs = float(250.0 * class_means.mean())

out = {
    "features": F.tolist(),
    "labels": labels,
    "text": text.tolist(),
    "alpha_init": alpha_init,
    "lr_alpha": lr_alpha,
    "lr_w": lr_w,
    "alpha_all_pairs_mean": alpha_all_pairs,
}
os.makedirs(os.path.dirname(OUT), exist_ok=True)
with open(OUT, "w") as fh:
    json.dump(out, fh, indent=1)
print(f"wrote {OUT}: alpha_init {alpha_init:.6f} (all-pairs {alpha_all_pairs:.6f}), "
      f"lr_alpha {lr_alpha:.6f}, lr_w {lr_w:.6f}")
