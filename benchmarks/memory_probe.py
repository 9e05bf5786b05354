"""Peak resident memory of training steps, measured in a fresh process per variant.

Run by the suite as ``python -m benchmarks.memory_probe MODEL VARIANT BATCH SEQ [--quick]
[--model-dropout hashed] [--malloc-defaults]``; prints
JSON. After the model, optimizer and one warm-up step exist, the kernel's
peak-RSS counter is reset (``/proc/self/clear_refs``), so the reported peak is
that of the training steps themselves, not of loading the model.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from benchmarks import models, train_step
from lorafit.train import allocator


def _status_kb(field: str, pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=["bert", "llama"])
    ap.add_argument("variant")
    ap.add_argument("batch", type=int)
    ap.add_argument("seq", type=int)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--quantize", type=int, choices=[4, 8], default=None, help="NF4/int8 frozen base (QLoRA)")
    ap.add_argument("--model-dropout", choices=["torch", "hashed"], default="torch",
                    help="the model's own dropout: torch's, or swapped for lorafit's HashedDropout")
    ap.add_argument("--malloc-defaults", action="store_true", help="do not keep freed memory for reuse")
    args = ap.parse_args()
    if not args.malloc_defaults:
        allocator.keep_freed_memory()
    torch.manual_seed(0)
    base = (models.bert_classifier if args.model == "bert" else models.smollm2)(args.quick)
    if args.quantize:
        from lorafit.quantize import quantize_base

        quantize_base(base, bits=args.quantize, skip=("lm_head", "classifier"))
    model = train_step.make_variant(base, args.variant, dropout=args.dropout, model_dropout=args.model_dropout)
    del base
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    batch = train_step.make_batch(model, args.batch, args.seq)
    step = train_step.stepper(model, batch)
    step()  # optimizer state now exists
    before = _status_kb("VmRSS")
    exact = reset_peak()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - start) / args.steps
    peak = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rss_before_mb": before / 1024, "peak_mb": peak / 1024, "peak_reset": exact,
                      "weights_mb": weight_bytes / 2**20, "step_s": seconds}))


if __name__ == "__main__":
    main()
