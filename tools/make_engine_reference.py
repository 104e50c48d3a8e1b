#!/usr/bin/env python3
"""Reference values for medvlm-adapt's training engine (losses and AdamW).

* CLIP and SigLIP losses from open_clip's own loss classes (open_clip.loss.ClipLoss,
  open_clip.loss.SigLipLoss) on L2-normalised random features, with gradients from torch
  autograd w.r.t. the raw (unnormalised) features, the log logit scale and the SigLIP bias.
  The CLIP logit scale is exp(min(s, ln 100)), as medvlm's clip_loss computes it.
* Three torch.optim.AdamW steps on a 2x3 parameter with fixed gradients.

Output: crates/medvlm-train/tests/fixtures/engine_reference.json (float64 throughout). The
Rust tests compare against it and never run Python.

Needs: pip install torch open_clip_torch   (tested with torch 2.15, open_clip_torch 3.3)

Usage: python tools/make_engine_reference.py [OUT_JSON]
"""
import json
import math
import sys

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)


def leaf(t):
    return t.clone().detach().requires_grad_(True)


def flat(t):
    return [float(x) for x in t.detach().reshape(-1).tolist()]


def clip_case(n, d, log_scale):
    img = leaf(torch.randn(n, d))
    txt = leaf(torch.randn(n, d))
    s = leaf(torch.tensor(log_scale))
    scale = torch.clamp(s, max=math.log(100.0)).exp()
    loss = ClipLoss()(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), scale)
    loss.backward()
    return {
        "n": n, "d": d,
        "image": flat(img), "text": flat(txt), "logit_scale": log_scale,
        "loss": float(loss), "grad_image": flat(img.grad), "grad_text": flat(txt.grad),
        "grad_logit_scale": float(s.grad),
    }


def siglip_case(n, d, log_scale, bias):
    img = leaf(torch.randn(n, d))
    txt = leaf(torch.randn(n, d))
    s = leaf(torch.tensor(log_scale))
    b = leaf(torch.tensor(bias))
    loss = SigLipLoss()(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), s.exp(), b)
    loss.backward()
    return {
        "n": n, "d": d,
        "image": flat(img), "text": flat(txt), "logit_scale": log_scale, "logit_bias": bias,
        "loss": float(loss), "grad_image": flat(img.grad), "grad_text": flat(txt.grad),
        "grad_logit_scale": float(s.grad), "grad_logit_bias": float(b.grad),
    }


def adamw_case():
    p = torch.nn.Parameter(torch.randn(2, 3))
    init = flat(p)
    opt = torch.optim.AdamW([p], lr=0.01, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    grads, after = [], []
    for _ in range(3):
        g = torch.randn(2, 3)
        p.grad = g.clone()
        opt.step()
        grads.append(flat(g))
        after.append(flat(p))
    return {
        "shape": [2, 3], "lr": 0.01, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.2,
        "init": init, "grads": grads, "after_each_step": after,
    }


out = {
    "generator": "tools/make_engine_reference.py (torch %s, open_clip ClipLoss/SigLipLoss)" % torch.__version__,
    "clip": [clip_case(4, 5, math.log(1 / 0.07)), clip_case(3, 8, 0.3), clip_case(5, 4, 5.0)],
    "siglip": [siglip_case(4, 5, math.log(10.0), -10.0), siglip_case(3, 6, 1.2, -0.5)],
    "adamw": adamw_case(),
}
path = sys.argv[1] if len(sys.argv) > 1 else "crates/medvlm-train/tests/fixtures/engine_reference.json"
with open(path, "w") as f:
    json.dump(out, f, indent=1)
print("wrote", path)
