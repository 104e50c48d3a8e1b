#!/usr/bin/env python3
"""PyTorch counterpart of `medvlm bench embed`: image-embedding throughput and peak
memory of the same full-size image tower with random weights, on CPU.

Needs: pip install torch open_clip_torch timm

The tower is open_clip's TimmModel as BiomedCLIP builds it: timm `vit_base_patch16_224`
(class-token pooling, timm_pool "") + a bias-free linear projection to 512 dimensions
(timm_proj "linear"). `--tower openclip` instead uses open_clip's own ViT-B-16 image
encoder (CLIP layout, same size). Inference mode, no autograd, float32.

Peak memory is the process's peak RSS (VmHWM in /proc/self/status), which includes the
Python interpreter and the torch libraries; the RSS before building the model is printed
next to it (medvlm prints the same two figures).

Example (same settings as `medvlm bench embed --arch vit-b16 --batch 32 --threads 2`):
  python benchmarks/bench_embed_openclip.py --arch vit-b16 --batch 32 --threads 2
"""
import argparse
import json
import time

import torch

ARCHS = {
    "vit-b16": ("vit_base_patch16_224", "ViT-B-16"),
    "vit-b32": ("vit_base_patch32_224", "ViT-B-32"),
    "vit-s16": ("vit_small_patch16_224", None),
    "vit-l16": ("vit_large_patch16_224", None),
}


def proc_status_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def mib(kib):
    return "n/a" if kib is None else f"{kib / 1024:.0f} MiB"


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
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--embed-dim", type=int, default=512)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    rss_before = proc_status_kib("VmRSS")

    model = build(args.arch, args.tower, args.embed_dim).eval()
    params = sum(p.numel() for p in model.parameters())
    pixels = torch.randn(args.batch, 3, 224, 224)

    with torch.inference_mode():
        for _ in range(args.warmup):
            model(pixels)
        per_batch = []
        start = time.perf_counter()
        for _ in range(args.batches):
            t = time.perf_counter()
            model(pixels)
            per_batch.append(time.perf_counter() - t)
        total = time.perf_counter() - start
    throughput = args.batch * args.batches / total
    peak = proc_status_kib("VmHWM")

    print(f"PyTorch {torch.__version__} ({args.tower}) {args.arch} "
          f"[{ARCHS[args.arch][0]} + linear proj {args.embed_dim}], {params / 1e6:.1f} M params, "
          f"float32 on cpu, {threads} threads")
    print(f"batch {args.batch}: {args.warmup} warm-up + {args.batches} timed batches in "
          f"{total:.2f} s -> {throughput:.2f} images/s (per batch: "
          + ", ".join(f"{t:.2f} s" for t in per_batch) + ")")
    print(f"peak RSS (VmHWM) {mib(peak)}; RSS before building the model {mib(rss_before)}")
    if args.json:
        print(json.dumps({
            "impl": f"pytorch-{torch.__version__}-{args.tower}", "arch": ARCHS[args.arch][0],
            "batch": args.batch, "batches": args.batches, "warmup": args.warmup,
            "threads": threads, "params": params, "seconds": total,
            "images_per_s": throughput,
            "peak_rss_mib": None if peak is None else peak / 1024,
            "rss_before_model_mib": None if rss_before is None else rss_before / 1024,
        }))


if __name__ == "__main__":
    main()
