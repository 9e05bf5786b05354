"""Gradient bytes all-reduced per step by DDP: LoRA vs full fine-tuning, through the real launcher.

Runs ``torchrun --standalone --nproc-per-node 2 -m lorafit train`` (gloo on CPU)
on the first rows of SST-2 for a few steps, once with LoRA and once with full
fine-tuning, and reads what the run's DDP communication hook counted
(``summary.json``: ``gradient_bytes_all_reduced_per_step``). The frozen base
never enters an all-reduce, so LoRA should move exactly its trainable
parameters' bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import models
from benchmarks.timing import table

CONFIG = """\
output_dir = "{out}"
[model]
name = "{model}"
[data]
train = "{data}"
[task]
type = "classification"
max_length = 64
[lora]
r = 8
lora_alpha = 16
target_modules = ["query", "key", "value", "dense"]
modules_to_save = ["classifier"]
[train]
max_steps = {steps}
batch_size = 32
lr = 1e-4
log_every = 1
"""


def run(args, rows: list[dict], print_fn) -> dict:
    steps = 2 if args.quick else 6
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows[: 32 * steps]))
        model = models.minilm_dir() if not args.quick else models.tiny_bert_dir(root)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        for method in ("lora", "full"):
            out = root / method
            config = root / f"{method}.toml"
            config.write_text(CONFIG.format(out=out, model=model, data=data, steps=steps))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                   "lorafit", "train", str(config), "--method", method, "--no-progress",
                   "--set", f"train.keep_freed_memory={'false' if args.malloc_defaults else 'true'}"]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                raise SystemExit(f"torchrun {method} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
            s = json.loads((out / "summary.json").read_text())
            results[method] = {"trainable": s["params"]["trainable"], "total": s["params"]["total"],
                               "bytes_per_step": s["gradient_bytes_all_reduced_per_step"],
                               "step_s": s["train_time_s"] / s["steps"]}
    full = results["full"]["bytes_per_step"]
    body = table([[m, f"{r['trainable']:,}", f"{4 * r['trainable']:,}", f"{r['bytes_per_step']:,.0f}",
                   f"{r['bytes_per_step'] / full:.4f}", f"{1000 * r['step_s']:.0f}"] for m, r in results.items()],
                 ["method", "trainable params", "trainable bytes (fp32)", "bytes all-reduced per step",
                  "x full", "ms per step (2 processes)"])
    print_fn(f"DDP gradient traffic, {'tiny BERT' if args.quick else 'all-MiniLM-L6-v2'}, 2 processes (gloo), "
             f"global batch 32 x 64 tokens, {steps} steps", body)
    return results
