#!/usr/bin/env python3
"""Make a tiny random-weight open_clip ModifiedResNet CLIP parity fixture for medvlm-models.

Needs: pip install torch open_clip_torch safetensors numpy
(made with torch 2.15, open_clip_torch 3.3).

The model is open_clip's `CLIP` with a `ModifiedResNet` image tower (the architecture of
OpenAI's RN50 / RN101 / RN50x4 and of PubMedCLIP-RN50: three-convolution stem, anti-aliased
bottleneck blocks, attention pooling) and open_clip's text transformer, with every parameter
and batch-norm statistic drawn at random so that no term of the computation can be zero
by construction. It writes, under crates/medvlm-models/tests/fixtures/openclip_resnet/:

  open_clip_config.json      model_cfg (layers [1, 2, 1, 1], width 4, image 64 px, QuickGELU)
  open_clip_model.safetensors the state dict (f32)
  inputs.safetensors         pixel_values [2, 3, 64, 64], input_ids [3, 16] (i64)
  expected.safetensors       image_embeds, text_embeds (argmax pooling), text_embeds_eos
                             (pool_type "eos", eos_id 5), layer4 [2, 128, 2, 2] (NCHW),
                             stem [2, 4, 16, 16], logit_scale, and the train-mode forward:
                             image_embeds_train (batch statistics) with the running
                             statistics it leaves in visual.bn1 and visual.layer2.0.downsample.1
                             (bn1_running_mean_after, bn1_running_var_after, ds_running_mean_after,
                             ds_running_var_after)
Run from the repository root: python tools/make_openclip_resnet_fixture.py
"""
import json
import os

import numpy as np
import torch
from open_clip.model import CLIP
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "crates", "medvlm-models", "tests", "fixtures", "openclip_resnet")

MODEL_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": [1, 2, 1, 1], "width": 4, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 4, "layers": 2},
}


def main():
    torch.manual_seed(0)
    os.makedirs(OUT, exist_ok=True)
    model = CLIP(**MODEL_CFG)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(2.5)
            elif ".bn" in name or "downsample.1" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=gen) / max(fan_in, 1) ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    model.eval()

    pixels = torch.randn(2, 3, 64, 64, generator=gen)
    ids = torch.zeros(3, 16, dtype=torch.long)
    rows = [[1, 7, 9, 5, 11, 63], [1, 20, 5, 33, 41, 50, 12, 63], [1, 5] + list(range(10, 23)) + [63]]
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)

    expected = {}
    with torch.no_grad():
        v = model.visual
        stem = v.stem(pixels)
        x = v.layer4(v.layer3(v.layer2(v.layer1(stem))))
        expected["stem"] = stem
        expected["layer4"] = x
        expected["image_embeds"] = model.encode_image(pixels)
        expected["text_embeds"] = model.encode_text(ids)
        model.text_pool_type, model.text_eos_id = "eos", 5
        expected["text_embeds_eos"] = model.encode_text(ids)
        expected["logit_scale"] = model.logit_scale.detach().reshape(1)

    # Save the eval-mode weights before the train-mode forward updates the statistics.
    state = {k: t.detach().contiguous().clone() for k, t in model.state_dict().items()}
    save_file(state, os.path.join(OUT, "open_clip_model.safetensors"))

    model.train()
    with torch.no_grad():
        expected["image_embeds_train"] = model.encode_image(pixels)
    expected["bn1_running_mean_after"] = model.visual.bn1.running_mean
    expected["bn1_running_var_after"] = model.visual.bn1.running_var
    ds = model.visual.layer2[0].downsample._modules["1"]
    expected["ds_running_mean_after"] = ds.running_mean
    expected["ds_running_var_after"] = ds.running_var

    save_file({k: t.detach().float().contiguous() for k, t in expected.items()}, os.path.join(OUT, "expected.safetensors"))
    save_file({"pixel_values": pixels.contiguous(), "input_ids": ids}, os.path.join(OUT, "inputs.safetensors"))
    with open(os.path.join(OUT, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": MODEL_CFG, "preprocess_cfg": {
            "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}, f, indent=2)
    print("wrote", OUT, {k: list(t.shape) for k, t in expected.items()})


if __name__ == "__main__":
    main()
