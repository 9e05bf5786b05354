"""End to end: ``lorafit train`` on SST-2 with LoRA (dropout 0.1 and 0; and dropout 0.1 with the opt-in
``train.model_dropout = "hashed"``) and with full fine-tuning.

Each run is a fresh ``python -m lorafit train examples/sst2_minilm.toml`` process
(all-MiniLM-L6-v2, batch 32, max length 64, dynamic padding with length-grouped
batches), 2 epochs, evaluated on the dev set at each epoch's end. Rounds run
every variant once, the second round in reverse order, so a drift of the
machine's speed hits all variants alike. Reported per variant: the median of
the training time without evaluation (``train_time_s - eval_time_s`` from
``summary.json``), its ratio to full fine-tuning, the process's peak RSS, and
how far below full fine-tuning that peak is compared with the AdamW state
(two float32 tensors per parameter) that LoRA does not keep for the base.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import models
from benchmarks.timing import median, table

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name: overrides of examples/sst2_minilm.toml
    "full fine-tuning": ["--method", "full", "--set", "train.lr=5e-5"],
    "LoRA r=8, dropout 0.1": ["--set", "lora.lora_dropout=0.1"],
    "LoRA r=8, dropout 0": ["--set", "lora.lora_dropout=0.0"],
    # the opt-in: the model's own nn.Dropout modules use lorafit's hashed masks (full fine-tuning keeps torch's)
    "LoRA r=8, dropout 0.1, hashed model dropout": ["--set", "lora.lora_dropout=0.1",
                                                    "--set", "train.model_dropout=hashed"],
}


def _quick_overrides(root: Path, rows: list[dict]) -> list[str]:
    """--quick: a tiny random BERT and 64 rows, enough to prove the harness runs."""
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:64]))
    return ["--set", f"model.name={models.tiny_bert_dir(root)}", "--set", f"data.train={data}",
            "--set", f"data.validation={data}", "--set", "data.test=''"]


def run(args, rows: list[dict], print_fn) -> dict:
    epochs = 1 if args.quick else 2
    rounds = [list(VARIANTS), list(reversed(VARIANTS))][: 1 if args.quick else 2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        extra = _quick_overrides(root, rows) if args.quick else []
        for i, order in enumerate(rounds):
            for name in order:
                out = root / f"run-{i}-{len(results[name])}-{name.split(',')[-1].strip().replace(' ', '')}"
                cmd = [sys.executable, "-m", "lorafit", "train", str(ROOT / "examples" / "sst2_minilm.toml"),
                       "--output-dir", str(out), "--no-progress", *VARIANTS[name], *extra,
                       "--set", f"train.epochs={epochs}", "--set", "train.eval_every=0",
                       "--set", f"train.num_threads={torch.get_num_threads()}",
                       "--set", f"train.keep_freed_memory={'false' if args.malloc_defaults else 'true'}"]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
                if proc.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
                s = json.loads((out / "summary.json").read_text())
                results[name].append({"train_s": s["train_time_s"] - s["eval_time_s"],
                                      "peak_rss": s["peak_memory_bytes"], "trainable": s["params"]["trainable"],
                                      "dev_acc": (s.get("validation") or {}).get("accuracy")})
    full_s = median([r["train_s"] for r in results["full fine-tuning"]])
    full_rss = median([r["peak_rss"] for r in results["full fine-tuning"]])
    adam_state = 2 * 4 * results["full fine-tuning"][0]["trainable"]
    body = []
    for name, runs in results.items():
        t, rss = median([r["train_s"] for r in runs]), median([r["peak_rss"] for r in runs])
        accs = "/".join(f"{100 * r['dev_acc']:.2f}" for r in runs if r["dev_acc"] is not None)
        body.append([name, " / ".join(f"{r['train_s']:.1f}" for r in runs), f"{t:.1f}", f"{t / full_s:.2f}",
                     f"{rss / 2**20:.0f}", f"{(full_rss - rss) / 2**20:+.0f}", accs])
    print_fn(f"End to end: lorafit train on SST-2, {epochs} epoch(s), batch 32, max length 64, "
             f"{len(rounds)} round(s); full fine-tuning's AdamW state = {adam_state / 2**20:.0f} MiB",
             table(body, ["run", "train s (each round)", "median s", "x full", "peak RSS MiB",
                          "MiB below full", "dev acc % (each round)"]))
    return {"results": results, "adam_state_bytes": adam_state}
