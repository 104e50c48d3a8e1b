#!/usr/bin/env python3
"""PyTorch counterpart of `medvlm bench embed`: image-embedding throughput and peak
memory of the same full-size image tower with random weights, on CPU.

Needs: pip install torch open_clip_torch timm

The tower is open_clip's TimmModel as BiomedCLIP builds it: timm `vit_base_patch16_224`
(class-token pooling, timm_pool "") + a bias-free linear projection to 512 dimensions
(timm_proj "linear"). `--tower openclip` instead uses open_clip's own ViT-B-16 image
encoder (CLIP layout, same size). Inference mode, no autograd; float32, or bf16/f16
autocast with `--autocast`; `--device cuda` runs on GPU 0 (peak memory is then torch's peak
allocation). Per-batch p50/p99 are nearest-rank; batch-1 latency is `--batch 1 --batches 100`.

Peak memory is the process's peak RSS (VmHWM in /proc/self/status), which includes the
Python interpreter and the torch libraries; the RSS before building the model is printed
next to it (medvlm prints the same two figures).

Example (same settings as `medvlm bench embed --arch vit-b16 --batch 32 --threads 2`):
  python benchmarks/bench_embed_openclip.py --arch vit-b16 --batch 32 --threads 2
"""
import argparse
import json

import torch

from bench_common import (add_run_args, autocast, mib, peak_memory_mib, percentile,
                          proc_status_kib, quantize_int8, run_label, time_batches)

ARCHS = {
    "vit-b16": ("vit_base_patch16_224", "ViT-B-16"),
    "vit-b32": ("vit_base_patch32_224", "ViT-B-32"),
    "vit-s16": ("vit_small_patch16_224", None),
    "vit-l16": ("vit_large_patch16_224", None),
}


def build(arch, tower, embed_dim):
    timm_name, openclip_name = ARCHS[arch]
    if tower == "timm":
        from open_clip.timm_model import TimmModel

        return TimmModel(timm_name, embed_dim=embed_dim, pool="", proj="linear",
                         proj_bias=False, pretrained=False)
    if openclip_name is None:
        raise SystemExit(f"--tower openclip has no {arch}; use --tower timm")
    import open_clip

    return open_clip.create_model(openclip_name, pretrained=None).visual


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), default="vit-b16")
    ap.add_argument("--tower", choices=["timm", "openclip"], default="timm")
    add_run_args(ap, batch=32)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    rss_before = proc_status_kib("VmRSS")

    model = build(args.arch, args.tower, args.embed_dim).eval().to(args.device)
    params = sum(p.numel() for p in model.parameters())
    model = quantize_int8(model, args)
    pixels = torch.randn(args.batch, 3, 224, 224).to(args.device)

    with torch.inference_mode(), autocast(args.autocast, args.device):
        total, per_batch = time_batches(lambda: model(pixels), args.warmup, args.batches,
                                        args.device)
    throughput = args.batch * args.batches / total
    peak = peak_memory_mib(args.device)
    p50, p99 = percentile(per_batch, 50), percentile(per_batch, 99)
    memory = "peak allocated (torch.cuda)" if args.device.startswith("cuda") else "peak RSS (VmHWM)"

    print(f"PyTorch {torch.__version__} ({args.tower}) {args.arch} "
          f"[{ARCHS[args.arch][0]} + linear proj {args.embed_dim}], {params / 1e6:.1f} M params, "
          f"{run_label(args)} on {args.device}, {threads} threads")
    print(f"batch {args.batch}: {args.warmup} warm-up + {args.batches} timed batches in "
          f"{total:.2f} s -> {throughput:.2f} images/s (per batch p50 {p50 * 1e3:.1f} ms, "
          f"p99 {p99 * 1e3:.1f} ms)")
    print(f"{memory} {mib(None if peak is None else peak * 1024)}; "
          f"RSS before building the model {mib(rss_before)}")
    if args.json:
        print(json.dumps({
            "impl": f"pytorch-{torch.__version__}-{args.tower}", "tower": "image",
            "arch": ARCHS[args.arch][0], "batch": args.batch, "batches": args.batches,
            "warmup": args.warmup, "threads": threads, "dtype": run_label(args),
            "device": args.device, "params": params, "seconds": total,
            "items_per_s": throughput, "p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3,
            "peak_mib": peak,
            "peak_kind": ("torch.cuda peak allocated" if args.device.startswith("cuda")
                          else "VmHWM"),
            "rss_before_model_mib": None if rss_before is None else rss_before / 1024,
        }))

if __name__ == "__main__":
    main()
