"""LoftQ against QLoRA's default start on an NF4 base: the loss the model starts from, what it reaches after a short
instruction-tuning run, and what the initialisation costs.

Each run is a fresh ``python -m lorafit train`` process: SmolLM2-135M-Instruct in float32 with ``model.quantize =
4`` (NF4 blocks of 64), Alpaca (480 rows, 1 epoch of batch 8, max length 256, cosine schedule, lr 2e-4), LoRA r=16
alpha 32 on every linear layer, dropout 0; the loss is on 64 held-out rows. The start is measured by one step at a
learning rate that changes nothing, beside the float32 model without quantization (the loss quantization costs).
``--quick``: a tiny random Llama and 32 rows, to prove the harness runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.adapter_dtype import _alpaca
from benchmarks.inits import run_config
from benchmarks.timing import table

NF4 = ["--set", "model.quantize=4"]
STARTS = {"float32 base, no quantization": [],
          "QLoRA: NF4 base, A random, B = 0": NF4,
          "LoftQ, 1 iteration": [*NF4, "--set", 'lora.init_lora_weights="loftq"',
                                 "--set", "lora.loftq_config={loftq_bits=4, loftq_iter=1}"],
          "LoftQ, 5 iterations": [*NF4, "--set", 'lora.init_lora_weights="loftq"',
                                  "--set", "lora.loftq_config={loftq_bits=4, loftq_iter=5}"]}
TRAINED = ("QLoRA: NF4 base, A random, B = 0", "LoftQ, 1 iteration")
OVERRIDES = ["--set", "model.dtype=float32", "--set", "lora.lora_dropout=0.0", "--set", "train.lr=2e-4",
             "--set", "train.keep_best=false", "--set", "train.log_every=1"]


def run(args, print_fn) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    train = _alpaca()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = run_config(root, train, args.quick)

        def train_run(name: str, *overrides: str) -> dict:
            out = Path(tempfile.mkdtemp(prefix="run-", dir=root))
            out.rmdir()  # lorafit train makes it
            cmd = [sys.executable, "-m", "lorafit", "train", str(config), "--output-dir", str(out), "--no-progress",
                   "--set", f"train.num_threads={torch.get_num_threads()}", *OVERRIDES, *overrides]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
            if proc.returncode != 0:
                raise SystemExit(f"lorafit train ({name}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
            summary = json.loads((out / "summary.json").read_text())
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
            return {"eval_loss": {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r},
                    "final_eval_loss": summary["validation"]["eval_loss"],
                    "setup_s": summary["wall_time_s"] - summary["train_time_s"],
                    "train_s": summary["train_time_s"] - summary["eval_time_s"]}

        # the start: one step of 8 rows at a learning rate that changes nothing (--quick: the 5 iterations left out,
        # and only LoftQ trained: a proof that the harness runs, at a process each)
        starts = {name: train_run(name, "--set", "data.max_train_rows=8", "--set", "train.lr=1e-12", *overrides)
                  for name, overrides in STARTS.items() if not (args.quick and name == "LoftQ, 5 iterations")}
        every = ["--set", f"train.eval_every={2 if args.quick else 30}"]
        trained = {name: train_run(name, *every, *STARTS[name]) for name in (TRAINED[-1:] if args.quick else TRAINED)}
    reference = starts["float32 base, no quantization"]["final_eval_loss"]
    plain = starts["QLoRA: NF4 base, A random, B = 0"]["final_eval_loss"]
    steps = sorted({s for r in trained.values() for s in r["eval_loss"]})
    body = []
    for name, start in starts.items():
        loss = start["final_eval_loss"]
        quantized_start = name not in ("float32 base, no quantization", "QLoRA: NF4 base, A random, B = 0")
        closed = f"{(plain - loss) / (plain - reference):.0%}" if quantized_start and plain > reference else ""
        row = [name, f"{loss:.4f}", closed, f"{start['setup_s']:.1f}"]
        row += [f"{trained[name]['eval_loss'][s]:.4f}" if name in trained else "" for s in steps]
        row.append(f"{trained[name]['train_s']:.1f}" if name in trained else "")
        body.append(row)
    what = "a tiny random Llama, 4 steps" if args.quick else "SmolLM2-135M on Alpaca, 60 steps of batch 8"
    print_fn(f"LoftQ against QLoRA's start on an NF4 base: {what}, r=16 alpha 32 on every linear layer",
             table(body, ["start", "eval loss at the start", "of the quantization loss closed", "set-up s",
                          *[f"eval loss at step {s}" for s in steps], "train s"]))
    return {"starts": starts, "trained": trained}
