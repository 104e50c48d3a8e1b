#!/usr/bin/env python3
# docs/anomaly.md example panels:
#   python3 tools/anomaly_panel.py IMAGE.png GT_MASK.png MAP.png [MAP.png ...] OUT.png
# (standard library only; PNGs of one size as `medvlm anomaly predict` writes them).
# Composes image | ground truth (green) | each anomaly map (blue = low, red = high; the
# map PNG's 128, the detector's threshold, is the middle of the scale), upscaled x4.
import sys

from seg_panel import read_png, rgb_at, write_png

def colour(v):
    # blue -> white at the threshold (128) -> red
    t = v / 255.0
    if t < 0.5:
        s = t / 0.5
        return (int(255 * s), int(255 * s), 255)
    s = (t - 0.5) / 0.5
    return (255, int(255 * (1 - s)), int(255 * (1 - s)))

def main():
    if len(sys.argv) < 5:
        sys.exit(__doc__ or "usage: anomaly_panel.py IMAGE GT MAP... OUT")
    image, gt, maps, out = sys.argv[1], sys.argv[2], sys.argv[3:-1], sys.argv[-1]
    img, m = read_png(image), read_png(gt)
    ms = [read_png(p) for p in maps]
    w, h = img[0], img[1]
    k, gap = 4, 4
    panels = 2 + len(ms)
    W = panels * w * k + (panels - 1) * gap
    H = h * k
    pix = [(255, 255, 255)] * (W * H)
    def put(p, fn):
        for y in range(H):
            for x in range(w * k):
                pix[y * W + p * (w * k + gap) + x] = fn(x // k, y // k)
    put(0, lambda x, y: rgb_at(img, x, y))
    def gt_px(x, y):
        r, g, b = rgb_at(img, x, y)
        return (r // 2, min(255, g // 2 + 128), b // 2) if rgb_at(m, x, y)[0] > 0 else (r, g, b)
    put(1, gt_px)
    for i, mp in enumerate(ms):
        put(2 + i, lambda x, y, mp=mp: colour(rgb_at(mp, x, y)[0]))
    write_png(out, W, H, pix)

if __name__ == "__main__":
    main()
