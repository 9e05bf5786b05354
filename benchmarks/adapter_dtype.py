"""Adapters on bfloat16 weights: bfloat16 adapters stepping on float32 masters (lorafit train's default),
bfloat16 adapters alone (``train.master_weights = "off"``), and float32 adapters (``train.bf16 = true``:
float32 adapters and AdamW state, steps under bf16 autocast), on the loss they reach and their time.

An AdamW update smaller than half a bfloat16 ulp of the weight it changes is lost (about 1.2e-4 for an A entry
of 0.04), which a low learning rate, or the tail of a decaying schedule, reaches; masters keep those updates
(``lorafit/train/master_weights.py``). Each run is a fresh ``python -m lorafit train`` process:
SmolLM2-135M-Instruct in bfloat16, Alpaca (480 rows, 1 epoch of batch 8, max length 256, cosine schedule),
LoRA r=16 on every linear layer, dropout 0.05, at two learning rates; the loss is on 100 held-out rows.
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

from benchmarks.timing import table

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"bf16 adapters + float32 masters (default)": [],
            "bf16 adapters alone (master_weights off)": ["--set", "train.master_weights=off"],
            "float32 adapters (train.bf16)": ["--set", "train.bf16=true"]}
LEARNING_RATES = (2e-4, 5e-5)
CONFIG = """\
output_dir = "unused"
[model]
name = {model}
dtype = "bfloat16"
[data]
train = {train}
validation_fraction = {held_out}
instruction_field = "instruction"
input_field = "input"
output_field = "output"
max_train_rows = {rows}
[task]
type = "causal_lm"
max_length = 256
generate_rows = 0
[lora]
r = 16
lora_alpha = 32
lora_dropout = 0.05
target_modules = "all-linear"
[train]
epochs = 1
batch_size = 8
scheduler = "cosine"
warmup_ratio = 0.05
eval_every = 0
seed = 0
"""


def _alpaca() -> Path:
    root = Path(os.environ.get("LORAFIT_DATA", ROOT.parent / "shared" / "data"))
    path = root / "alpaca" / "train.jsonl"
    if not path.is_file():
        raise SystemExit(f"Alpaca not found at {path}; set LORAFIT_DATA to the data directory")
    return path


def _tiny_llama(root: Path, rows_path: Path) -> Path:
    from benchmarks import gpu

    rows = [json.loads(line) for line in rows_path.read_text().splitlines()[:64] if line.strip()]
    model_dir, _ = gpu.llama_dir(root / "tiny-llama", gpu.bpe_tokenizer(rows, 300), gpu.E2E_QUICK["95m"],
                                 torch.device("cpu"))
    return model_dir


def run(args, print_fn) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    train = _alpaca()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = _tiny_llama(root, train) if args.quick else "smollm2-135m"
        config = root / "run.toml"
        # 480 training rows and 100 held out (of 999: a fraction of 0.1); --quick: 32 and 8
        config.write_text(CONFIG.format(model=json.dumps(str(model)), train=json.dumps(str(train)),
                                        held_out=0.1, rows=32 if args.quick else 480))

        def train_run(*overrides: str) -> dict:
            out = Path(tempfile.mkdtemp(prefix="run-", dir=root))
            out.rmdir()  # lorafit train makes it
            cmd = [sys.executable, "-m", "lorafit", "train", str(config), "--output-dir", str(out), "--no-progress",
                   "--set", f"train.num_threads={torch.get_num_threads()}", *overrides]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
            if proc.returncode != 0:
                raise SystemExit(f"lorafit train {' '.join(overrides)} failed:\n{proc.stdout[-2000:]}\n"
                                 f"{proc.stderr[-3000:]}")
            s = json.loads((out / "summary.json").read_text())
            return {"eval_loss": s["validation"]["eval_loss"], "train_s": s["train_time_s"] - s["eval_time_s"]}

        # the loss the adapters start from: one step at a learning rate that changes nothing
        untrained = train_run("--set", "data.max_train_rows=8", "--set", "train.lr=1e-12")["eval_loss"]
        for lr in LEARNING_RATES[:1] if args.quick else LEARNING_RATES:
            for name, overrides in VARIANTS.items():
                results[f"{name}, lr {lr:g}"] = {"lr": lr, **train_run("--set", f"train.lr={lr}", *overrides)}
    body = []
    for key, r in results.items():
        ref = results[f"{next(iter(VARIANTS))}, lr {r['lr']:g}"]
        gain = untrained - results[f"{list(VARIANTS)[-1]}, lr {r['lr']:g}"]["eval_loss"]  # float32 adapters'
        kept = f"{(untrained - r['eval_loss']) / gain:.0%}" if gain > 0 else "-"
        body.append([key, f"{r['eval_loss']:.4f}", kept, f"{r['train_s']:.1f}", f"{r['train_s'] / ref['train_s']:.2f}"])
    what = "a tiny random Llama, 4 steps" if args.quick else "SmolLM2-135M on Alpaca, 60 steps"
    print_fn(f"Adapters on bfloat16 weights: bf16 with float32 masters (default), bf16 alone, float32 "
             f"(train.bf16); {what} of batch 8",
             table(body, ["run", "eval loss", "of float32's gain", "train s", "x default"])
             + f"\n\nuntrained adapters (one step at lr 1e-12): eval loss {untrained:.4f}")
    return {"untrained_eval_loss": untrained, "runs": results}
