#!/usr/bin/env python3
"""Reference values of PSNR and SSIM for medvlm-eval's image-quality metrics, computed with
the conventions of BasicSR's `calculate_psnr` / `calculate_ssim` (the metrics EDSR/SwinIR-style
super-resolution papers report): 8-bit range [0, 255], `crop_border` pixels removed from every
side, PSNR = 10 log10(255^2 / MSE); SSIM of Wang et al. 2004 with an 11x11 Gaussian window
(sigma 1.5, cv2.getGaussianKernel), the map computed by cv2.filter2D and kept where the window
fits ([5:-5, 5:-5]), C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, averaged over the map and then
over channels. This script follows BasicSR's algorithm with OpenCV and numpy (BasicSR itself
needs PyTorch).

    python3 -m venv /tmp/pyref && /tmp/pyref/bin/pip install numpy opencv-python-headless
    /tmp/pyref/bin/python tools/make_image_quality_reference.py \
        > crates/medvlm-eval/tests/fixtures/image_quality_reference.json
"""
import json
import sys

import cv2
import numpy as np


def ssim_channel(a, b):
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    k = cv2.getGaussianKernel(11, 1.5)
    w = np.outer(k, k.transpose())
    mu1 = cv2.filter2D(a, -1, w)[5:-5, 5:-5]
    mu2 = cv2.filter2D(b, -1, w)[5:-5, 5:-5]
    s1 = cv2.filter2D(a ** 2, -1, w)[5:-5, 5:-5] - mu1 ** 2
    s2 = cv2.filter2D(b ** 2, -1, w)[5:-5, 5:-5] - mu2 ** 2
    s12 = cv2.filter2D(a * b, -1, w)[5:-5, 5:-5] - mu1 * mu2
    m = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s1 + s2 + c2))
    return float(m.mean())


def crop(img, border):
    return img[border:-border, border:-border, ...] if border else img


def psnr(a, b, border):
    a = crop(a, border).astype(np.float64)
    b = crop(b, border).astype(np.float64)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def ssim(a, b, border):
    a, b = crop(a, border), crop(b, border)
    if a.ndim == 2:
        return ssim_channel(a, b)
    return float(np.mean([ssim_channel(a[..., i], b[..., i]) for i in range(a.shape[2])]))


def main():
    rng = np.random.default_rng(5)
    cases = []
    # Grey: a smooth image and a noisy, blurred copy; x2 border crop.
    y, x = np.mgrid[0:48, 0:40]
    grey = (127 + 80 * np.sin(x / 6.0) * np.cos(y / 9.0)).astype(np.float64)
    noisy = np.clip(cv2.GaussianBlur(grey, (5, 5), 1.0) + rng.normal(0, 6, grey.shape), 0, 255)
    cases.append(("grey", np.round(grey), np.round(noisy), 2))
    # RGB, x4 crop.
    rgb = rng.uniform(0, 255, (40, 36, 3))
    rgb = cv2.GaussianBlur(rgb, (7, 7), 2.0)
    rgb2 = np.clip(rgb + rng.normal(0, 10, rgb.shape), 0, 255)
    cases.append(("rgb", np.round(rgb), np.round(rgb2), 4))
    # No crop, nearly identical.
    a = np.round(rng.uniform(0, 255, (24, 24)))
    b = a.copy()
    b[3, 4] += 7
    cases.append(("tiny-difference", a, np.clip(b, 0, 255), 0))
    out = {"generator": "tools/make_image_quality_reference.py (BasicSR conventions, OpenCV)",
           "cases": []}
    for name, a, b, border in cases:
        out["cases"].append({
            "name": name,
            "shape": list(a.shape),
            "a": a.ravel().tolist(),
            "b": b.ravel().tolist(),
            "crop_border": border,
            "psnr": psnr(a, b, border),
            "ssim": ssim(a, b, border),
        })
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
