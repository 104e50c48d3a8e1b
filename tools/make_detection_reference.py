#!/usr/bin/env python3
"""Reference values of COCO-style detection AP for medvlm-eval's detection metrics, computed
by pycocotools' COCOeval (bbox) on a synthetic set of boxes with a fixed seed.

    python3 -m venv /tmp/pyref && /tmp/pyref/bin/pip install pycocotools numpy
    /tmp/pyref/bin/python tools/make_detection_reference.py \
        > crates/medvlm-eval/tests/fixtures/detection_reference.json

The set: 40 images, 3 classes, 0-4 ground-truth boxes per image; detections are jittered copies
of most ground-truth boxes (some missed, some duplicated), false positives, and a class swap,
each with a distinct score. Boxes are written as [x0, y0, x1, y1] (COCO's [x, y, w, h]
converted), ground-truth area = w * h.
"""
import contextlib
import io
import json
import sys

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def main():
    rng = np.random.default_rng(7)
    n_images, n_classes = 40, 3
    gts, dets = [], []
    for img in range(n_images):
        for _ in range(rng.integers(0, 5)):
            w, h = rng.uniform(4, 40, 2)
            x, y = rng.uniform(0, 100, 2)
            c = int(rng.integers(0, n_classes))
            gts.append((img, c, [x, y, w, h]))
            r = rng.uniform()
            if r < 0.15:
                continue  # missed
            copies = 2 if r > 0.9 else 1  # a duplicate detection
            for _ in range(copies):
                j = rng.normal(0, 0.12, 4) * np.array([w, h, w, h])
                cls = c if rng.uniform() > 0.05 else (c + 1) % n_classes  # a class swap
                dets.append((img, cls, [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])]))
        for _ in range(rng.integers(0, 3)):  # false positives
            w, h = rng.uniform(4, 30, 2)
            x, y = rng.uniform(0, 100, 2)
            dets.append((img, int(rng.integers(0, n_classes)), [x, y, w, h]))
    scores = rng.permutation(len(dets)) / len(dets) * 0.98 + 0.01  # distinct scores

    coco_gt = {
        "images": [{"id": i + 1, "width": 160, "height": 160} for i in range(n_images)],
        "categories": [{"id": c + 1, "name": f"c{c}"} for c in range(n_classes)],
        "annotations": [
            {"id": k + 1, "image_id": img + 1, "category_id": c + 1, "bbox": b,
             "area": b[2] * b[3], "iscrowd": 0}
            for k, (img, c, b) in enumerate(gts)
        ],
    }
    coco_dt = [
        {"image_id": img + 1, "category_id": c + 1, "bbox": b, "score": float(s)}
        for (img, c, b), s in zip(dets, scores)
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = coco_gt
        gt.createIndex()
        dt = gt.loadRes(coco_dt)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    prec = ev.eval["precision"]  # [T, R, K, A, M]
    per_class = []
    per_class_50 = []
    for k in range(n_classes):
        p = prec[:, :, k, 0, -1]
        per_class.append(float(np.mean(p[p > -1])) if np.any(p > -1) else None)
        p50 = prec[0, :, k, 0, -1]
        per_class_50.append(float(np.mean(p50[p50 > -1])) if np.any(p50 > -1) else None)
    xyxy = lambda b: [b[0], b[1], b[0] + b[2], b[1] + b[3]]
    out = {
        "generator": "tools/make_detection_reference.py (pycocotools COCOeval, bbox, maxDets 100, area all)",
        "num_classes": n_classes,
        "ground_truth": [{"image": i, "class": c, "bbox": xyxy(b)} for i, c, b in gts],
        "detections": [{"image": i, "class": c, "bbox": xyxy(b), "score": float(s)}
                       for (i, c, b), s in zip(dets, scores)],
        "map_50_95": float(ev.stats[0]),
        "map_50": float(ev.stats[1]),
        "map_75": float(ev.stats[2]),
        "per_class_ap_50_95": per_class,
        "per_class_ap_50": per_class_50,
        "mean_recall_100": float(ev.stats[8]),
    }
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
