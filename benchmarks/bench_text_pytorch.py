#!/usr/bin/env python3
"""PyTorch counterpart of `medvlm bench embed --tower text`: text-embedding throughput and
peak memory of the same full-size text tower with random weights, on CPU.

Needs: pip install torch open_clip_torch transformers

- clip-b16: open_clip ViT-B-16's text tower, built alone by open_clip's own
  `_build_text_tower` (width 512, 8 heads, 12 layers, context 77, exact GELU) with its
  text projection to 512.
- pubmedbert: BiomedCLIP's text tower as open_clip's HFTextEncoder builds it, but from a
  local transformers BertConfig with PubMedBERT-base's sizes (no hub access): BertModel
  without pooler, [CLS] pooling, `mlp` projection Linear(768, 640) -> GELU -> Linear(640,
  512), both bias-free; context 256.

Every text fills the context (random ids, the end-of-text token last, no padding), as in
medvlm. Inference mode, no autograd; float32, or bf16/f16 autocast with `--autocast`;
`--device cuda` runs on GPU 0. Peak memory is the process's peak RSS (VmHWM), which includes
the interpreter and torch (on a GPU: torch's peak allocation).

Example (same settings as `medvlm bench embed --tower text --arch clip-b16 --batch 128
--threads 2`):
  python benchmarks/bench_text_pytorch.py --arch clip-b16 --batch 128 --threads 2
"""
import argparse
import json

import torch

from bench_common import (add_run_args, autocast, mib, peak_memory_mib, percentile,
                          proc_status_kib, quantize_int8, run_label, time_batches)


class BertTower(torch.nn.Module):
    def __init__(self, embed_dim):
        super().__init__()
        from transformers import BertConfig, BertModel

        cfg = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                         num_attention_heads=12, intermediate_size=3072,
                         max_position_embeddings=512, attn_implementation="eager")
        self.transformer = BertModel(cfg, add_pooling_layer=False)
        hidden = (768 + embed_dim) // 2
        self.proj = torch.nn.Sequential(
            torch.nn.Linear(768, hidden, bias=False), torch.nn.GELU(),
            torch.nn.Linear(hidden, embed_dim, bias=False))
        self.context = 256
        self.vocab = 30522

    def forward(self, ids):
        mask = (ids != 0).long()
        h = self.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
        return self.proj(h[:, 0, :])


def build(arch, embed_dim):
    if arch == "clip-b16":
        from open_clip.model import CLIPTextCfg, _build_text_tower

        cfg = CLIPTextCfg(context_length=77, vocab_size=49408, width=512, heads=8, layers=12)
        tower = _build_text_tower(embed_dim, cfg, quick_gelu=False)
        tower.context, tower.vocab = 77, 49408
        return tower
    return BertTower(embed_dim)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=["clip-b16", "pubmedbert"], default="clip-b16")
    add_run_args(ap, batch=128)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    rss_before = proc_status_kib("VmRSS")

    model = build(args.arch, args.embed_dim).eval().to(args.device)
    params = sum(p.numel() for p in model.parameters())
    model = quantize_int8(model, args)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, model.vocab - 1, (args.batch, model.context), generator=g)
    ids[:, -1] = model.vocab - 1
    ids = ids.to(args.device)

    with torch.inference_mode(), autocast(args.autocast, args.device):
        assert model(ids).shape == (args.batch, args.embed_dim)
        total, per_batch = time_batches(lambda: model(ids), args.warmup, args.batches,
                                        args.device)
    throughput = args.batch * args.batches / total
    peak = peak_memory_mib(args.device)
    p50, p99 = percentile(per_batch, 50), percentile(per_batch, 99)
    memory = "peak allocated (torch.cuda)" if args.device.startswith("cuda") else "peak RSS (VmHWM)"

    print(f"PyTorch {torch.__version__} text {args.arch} (context {model.context}), "
          f"{params / 1e6:.1f} M params, {run_label(args)} on {args.device}, "
          f"{threads} threads")
    print(f"batch {args.batch}: {args.warmup} warm-up + {args.batches} timed batches in "
          f"{total:.2f} s -> {throughput:.2f} texts/s (per batch p50 {p50 * 1e3:.1f} ms, "
          f"p99 {p99 * 1e3:.1f} ms)")
    print(f"{memory} {mib(None if peak is None else peak * 1024)}; "
          f"RSS before building the model {mib(rss_before)}")
    if args.json:
        print(json.dumps({
            "impl": f"pytorch-{torch.__version__}", "tower": "text", "arch": args.arch,
            "batch": args.batch, "batches": args.batches, "warmup": args.warmup,
            "threads": threads, "dtype": run_label(args), "device": args.device,
            "params": params, "seconds": total, "items_per_s": throughput,
            "p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3, "peak_mib": peak,
            "peak_kind": ("torch.cuda peak allocated" if args.device.startswith("cuda")
                          else "VmHWM"),
            "rss_before_model_mib": None if rss_before is None else rss_before / 1024,
        }))

if __name__ == "__main__":
    main()
