#!/usr/bin/env python3
"""Reference run of the quickstart's pretraining in PyTorch (open_clip CLIP or transformers CLIPModel).

Trains the same architecture (read from a quickstart's `model/open_clip_config.json`, the
default ModifiedResNet image tower, built with open_clip's `CLIP`; or `model/config.json`,
the `--image-tower vit` variant, built with transformers' `CLIPModel`; and
`model/tokenizer.json`) on the same benchmark (`benchmark/train.jsonl`) with the same loop
settings as `medvlm quickstart` (AdamW betas 0.9/0.98, weight decay 0.1, 30 warm-up updates
then cosine decay, gradient clipping at 1, logit scale clamped at ln 100, texts =
`exam_impression` section), without augmentation, then prints the within-modality zero-shot
balanced accuracy on `benchmark/test.jsonl` with the report-style prompt of each class.

It answers two questions about a medvlm run: does the reference implementation learn the
same things from the same data and budget, and how long does it take per epoch on this
machine. Results are recorded in docs/quickstart.md.

    python3 tools/reference_pretrain.py medvlm-quickstart --epochs 16 [--lr 2e-3] [--batch 64]

Needs: torch, transformers, open_clip_torch, tokenizers, pillow, numpy (see
tools/make_parity_fixtures.py).
"""
import argparse
import json
import math
import os
import re
import time

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import CLIPConfig, CLIPModel

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
CLASSES = {
    "chest_xray": ["normal", "nodule", "mass", "pleural_effusion", "pneumothorax", "cardiomegaly", "consolidation"],
    "brain_mri": ["normal", "infarct", "haemorrhage", "tumour"],
    "dermoscopy": ["normal", "naevus", "melanoma"],
    "histology": ["normal", "lymphocytes", "tumour", "stroma"],
}
DISPLAY = {"chest_xray": "chest radiograph", "brain_mri": "brain MRI", "dermoscopy": "dermoscopy", "histology": "histology"}


def exam_impression(text):
    """data.text_section = "exam_impression" (crates/medvlm-train/src/text_section.rs)."""
    text = text.strip()
    sentences = re.split(r"(?<=[.!?])\s+", text)
    at = text.lower().rfind("impression:")
    imp = text[at + len("impression:"):].strip() if at >= 0 else sentences[-1]
    return imp if sentences[0] == imp else f"{sentences[0]} {imp}"


def load(root, split):
    records = [json.loads(line) for line in open(f"{root}/benchmark/{split}.jsonl")]
    px = np.stack([
        np.asarray(Image.open(f"{root}/benchmark/{r['image']}").convert("RGB"), dtype=np.float32) / 255
        for r in records
    ])
    return records, torch.tensor(((px - CLIP_MEAN) / CLIP_STD).transpose(0, 3, 1, 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("quickstart_dir")
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phase-times", action="store_true",
                    help="print the median forward / backward / optimiser milliseconds per update "
                         "(the phases medvlm's `update timing` debug log reports)")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    root = a.quickstart_dir
    tok = Tokenizer.from_file(f"{root}/model/tokenizer.json")
    open_clip_cfg = f"{root}/model/open_clip_config.json"
    if os.path.exists(open_clip_cfg):
        from open_clip.model import CLIP

        model_cfg = json.load(open(open_clip_cfg))["model_cfg"]
        model = CLIP(**model_cfg)
        ctx = model_cfg["text_cfg"]["context_length"]

        def encode_image(px):
            return model.encode_image(px)

        def encode_text(ids, mask):
            return model.encode_text(ids)

        logit_scale = model.logit_scale
        pad_full = True
    else:
        model = CLIPModel(CLIPConfig.from_pretrained(f"{root}/model"))
        ctx = model.config.text_config.max_position_embeddings

        def encode_image(px):
            return model.get_image_features(pixel_values=px).pooler_output

        def encode_text(ids, mask):
            return model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output

        logit_scale = model.logit_scale
        pad_full = False

    def encode(texts):
        ids = [tok.encode(t).ids[:ctx] for t in texts]
        # open_clip adds the full position-embedding table: pad to the context length.
        width = ctx if pad_full else max(len(i) for i in ids)
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for k, i in enumerate(ids):
            input_ids[k, : len(i)] = torch.tensor(i)
            mask[k, : len(i)] = 1
        return input_ids, mask

    train, x_train = load(root, "train")
    test, x_test = load(root, "test")
    texts = [exam_impression(r["text"]) for r in train]
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1, betas=(0.9, 0.98))
    per_epoch = len(train) // a.batch
    total, warmup = per_epoch * a.epochs, 30
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))),
    )
    gen = torch.Generator().manual_seed(a.seed)
    phases = {"forward": [], "backward": [], "optimiser": []}
    t0 = time.time()
    for epoch in range(a.epochs):
        order = torch.randperm(len(train), generator=gen)
        for s in range(per_epoch):
            idx = order[s * a.batch:(s + 1) * a.batch]
            ids, mask = encode([texts[i] for i in idx])
            t_fwd = time.perf_counter()
            img = torch.nn.functional.normalize(encode_image(x_train[idx]), dim=-1)
            txt = torch.nn.functional.normalize(encode_text(ids, mask), dim=-1)
            logits = logit_scale.exp() * img @ txt.T
            target = torch.arange(len(idx))
            loss = (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)) / 2
            opt.zero_grad()
            t_bwd = time.perf_counter()
            loss.backward()
            t_opt = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                logit_scale.clamp_(0, math.log(100))
            t_end = time.perf_counter()
            phases["forward"].append(t_bwd - t_fwd)
            phases["backward"].append(t_opt - t_bwd)
            phases["optimiser"].append(t_end - t_opt)
        print(f"epoch {epoch} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    print(f"training: {time.time() - t0:.1f} s for {a.epochs} epochs ({total} updates, {a.threads} threads)")
    if a.phase_times:
        med = {k: 1e3 * float(np.median(v)) for k, v in phases.items()}
        print("median per update: " + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items())
              + f", step {sum(med.values()):.1f} ms")
    model.eval()
    with torch.no_grad():
        img = torch.nn.functional.normalize(encode_image(x_test), dim=-1)
        for mod, classes in CLASSES.items():
            ids, mask = encode([f"{DISPLAY[mod]}. Impression: {c.replace('_', ' ')}." for c in classes])
            txt = torch.nn.functional.normalize(encode_text(ids, mask), dim=-1)
            rows = [i for i, r in enumerate(test) if r["modality"] == mod]
            pred = (img[rows] @ txt.T).argmax(1).numpy()
            y = np.array([classes.index(test[i]["label"]) for i in rows])
            bal = np.mean([np.mean(pred[y == k] == k) for k in range(len(classes)) if (y == k).any()])
            print(f"{mod:<11} within-modality balanced accuracy {bal:.3f} (chance {1 / len(classes):.3f})")


if __name__ == "__main__":
    main()
