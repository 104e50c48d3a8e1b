#!/usr/bin/env python3
"""PyTorch + PEFT counterpart of `cargo run --release -p medvlm-train --example lora_step`:
one LoRA fine-tuning step of a ViT-B/16 image tower on CPU.

Needs: pip install torch open_clip_torch timm peft

The tower is open_clip's TimmModel as BiomedCLIP builds it (timm `vit_base_patch16_224`,
class-token pooling, bias-free linear projection to 512), random weights. PEFT adds LoRA
rank 8, alpha 16, dropout 0 on every block's fused `qkv` projection and freezes the rest.
Each step: a batch of 224 px images against fixed unit "text" embeddings, CLIP's
image-to-text cross-entropy at logit scale 100, backward, AdamW (lr 1e-4, PyTorch's
defaults otherwise) on the adapters. Prints each step's seconds after two warm-up steps,
their median and the process's peak RSS (VmHWM), as the medvlm example does.

  python benchmarks/lora_step_pytorch.py --steps 5 --batch 8 --threads 2
"""
import argparse
import time

import torch
import torch.nn.functional as F

from bench_common import proc_status_kib


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from open_clip.timm_model import TimmModel
    from peft import LoraConfig, get_peft_model
    import peft

    tower = TimmModel("vit_base_patch16_224", embed_dim=512, pool="", proj="linear",
                      proj_bias=False, pretrained=False)
    params = sum(p.numel() for p in tower.parameters())
    model = get_peft_model(tower, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["qkv"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_layers = sum(1 for n, _ in model.named_modules() if n.endswith("qkv.lora_A.default"))
    print(f"PyTorch {torch.__version__}, PEFT {peft.__version__}: ViT-B/16 + proj 512, "
          f"{params} parameters, LoRA r=8 alpha=16 on {n_layers} layers "
          f"({sum(p.numel() for p in trainable)} trainable), batch {args.batch}, "
          f"{torch.get_num_threads()} threads")
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)
    pixels = torch.randn(args.batch, 3, 224, 224)
    text = F.normalize(torch.randn(args.batch, 512), dim=-1)
    labels = torch.arange(args.batch)
    model.train()
    times = []
    for step in range(args.steps + 2):
        t = time.perf_counter()
        img = F.normalize(model(pixels), dim=-1)
        loss = F.cross_entropy(img @ text.t() * 100.0, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t
        print(f"step {step}: {dt:.3f} s, loss {loss.item():.4f}"
              f"{' (warm-up)' if step < 2 else ''}")
        if step >= 2:
            times.append(dt)
    times.sort()
    med = times[len(times) // 2]
    peak = proc_status_kib("VmHWM")
    print(f"median {med:.3f} s per step ({args.batch / med:.2f} images/s), peak RSS "
          f"{'n/a' if peak is None else f'{peak / 1024:.0f} MiB'}")


if __name__ == "__main__":
    main()
