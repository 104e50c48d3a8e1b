#!/usr/bin/env python3
"""Reference values for medvlm-eval's classification, AUROC and multi-label metrics, from
scikit-learn, on seeded random problems with many tied scores (scores rounded to 1 decimal).

Output: crates/medvlm-eval/tests/fixtures/metrics_reference.json. The Rust tests compare
against it and never run Python.

Needs: pip install numpy scikit-learn   (tested with scikit-learn 1.9.1)

Usage: python tools/make_metrics_reference.py [OUT_JSON]
"""
import json
import sys

import numpy as np
import sklearn
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix,
                             f1_score, roc_auc_score)

rng = np.random.default_rng(0)


def single_label_case(n, c):
    y = rng.integers(0, c, size=n)
    scores = np.round(rng.random((n, c)) + 0.3 * np.eye(c)[y], 1).astype(np.float32)
    pred = scores.argmax(axis=1)  # numpy argmax: first maximum, like medvlm's argmax_rows
    per_class_auc = []
    for k in range(c):
        pos = y == k
        if pos.all() or (~pos).all():
            per_class_auc.append(None)
        else:
            per_class_auc.append(float(roc_auc_score(pos, scores[:, k].astype(np.float64))))
    return {
        "n": n, "num_classes": c,
        "scores": [float(v) for v in scores.reshape(-1)],
        "y_true": [int(v) for v in y],
        "y_pred": [int(v) for v in pred],
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        "confusion": confusion_matrix(y, pred, labels=list(range(c))).tolist(),
        "per_class_auroc": per_class_auc,
    }


def multilabel_case(n, l, threshold):
    t = rng.random((n, l)) < 0.35
    scores = np.round(np.clip(rng.random((n, l)) * 0.8 + 0.3 * t, 0, 1), 1).astype(np.float32)
    pred = scores >= np.float32(threshold)
    return {
        "n": n, "num_labels": l, "threshold": threshold,
        "scores": [float(v) for v in scores.reshape(-1)],
        "targets": [bool(v) for v in t.reshape(-1)],
        "per_label_auroc": [float(roc_auc_score(t[:, k], scores[:, k].astype(np.float64))) for k in range(l)],
        "macro_f1": float(f1_score(t, pred, average="macro", zero_division=0)),
        "micro_f1": float(f1_score(t, pred, average="micro", zero_division=0)),
        "exact_match": float(accuracy_score(t, pred)),
    }


out = {
    "generator": "tools/make_metrics_reference.py (scikit-learn %s)" % sklearn.__version__,
    "single_label": [single_label_case(40, 3), single_label_case(97, 5), single_label_case(25, 4)],
    "multilabel": [multilabel_case(60, 4, 0.5), multilabel_case(33, 6, 0.4)],
}
path = sys.argv[1] if len(sys.argv) > 1 else "crates/medvlm-eval/tests/fixtures/metrics_reference.json"
with open(path, "w") as f:
    json.dump(out, f)
print("wrote", path)
