"""Timing, memory and precision helpers shared by the PyTorch benchmark scripts, so they
measure the way `medvlm bench embed` does: warm-up batches untimed, then each timed batch
ended by a device synchronisation; nearest-rank p50/p99 of the per-batch times; peak memory
as the process's peak RSS (VmHWM) on the CPU, or torch's peak allocated bytes on a GPU."""
import contextlib
import time

import torch


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


def percentile(xs, q):
    """Nearest-rank percentile (the smallest value with at least q % of values at or below)."""
    s = sorted(xs)
    rank = -(-q * len(s) // 100)
    return s[max(1, min(len(s), int(rank))) - 1]


def autocast(kind, device):
    """A bf16/f16 autocast context on `device`, or none for float32."""
    if kind == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if kind == "bf16" else torch.float16
    return torch.autocast(device.split(":")[0], dtype=dtype)


def quantize_int8(model, args):
    """PyTorch's dynamic int8 quantisation of `model`'s nn.Linear layers when `--int8`."""
    if not args.int8:
        return model
    if args.device != "cpu" or args.autocast != "none":
        raise SystemExit("--int8 is a CPU float32 mode (no --device cuda, no --autocast)")
    model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    # open_clip's text transformer asks its first MLP layer for the weight dtype; a quantised
    # layer answers through the attribute open_clip reads for int8 layers.
    for m in model.modules():
        if isinstance(m, torch.ao.nn.quantized.dynamic.Linear):
            m.int8_original_dtype = torch.float32
    return model


def run_label(args):
    """The precision a run used, for its output line and JSON."""
    return "qint8 dynamic (nn.Linear)" if args.int8 else dtype_label(args.autocast)


def dtype_label(kind):
    return {"none": "float32", "bf16": "bfloat16 autocast", "f16": "float16 autocast"}[kind]


def time_batches(run, warmup, batches, device):
    """Runs `run()` warmup + batches times; returns (total seconds, per-batch seconds)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        run()
    sync()
    per_batch = []
    start = time.perf_counter()
    for _ in range(batches):
        t = time.perf_counter()
        run()
        sync()
        per_batch.append(time.perf_counter() - t)
    return time.perf_counter() - start, per_batch


def peak_memory_mib(device):
    """Peak memory in MiB: process peak RSS on the CPU, torch's peak allocation on a GPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    kib = proc_status_kib("VmHWM")
    return None if kib is None else kib / 1024


def add_run_args(ap, batch):
    """The options every PyTorch benchmark here shares with `medvlm bench embed`."""
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--embed-dim", type=int, default=512)
    ap.add_argument("--autocast", choices=["none", "bf16", "f16"], default="none")
    ap.add_argument("--int8", action="store_true",
                    help="CPU: torch.ao.quantization.quantize_dynamic of every nn.Linear to "
                         "qint8 (int8 weights per tensor, inputs quantised per batch), the "
                         "counterpart of medvlm's --dtype int8")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (GPU 0)")
    ap.add_argument("--json", action="store_true")
