"""Initialisations against the default one, on the loss a short instruction-tuning run reaches and what the
initialisation costs: EVA, LoRA-GA and MiCA.

Each run is a fresh ``python -m lorafit train`` process: SmolLM2-135M-Instruct, Alpaca (480 rows, 1 epoch of
batch 8, max length 256, cosine schedule, lr 2e-4), LoRA r=16 on every linear layer, dropout 0; the loss is
on 64 held-out rows after 30 and 60 steps. ``"eva"`` computes A on the first training batches (``eva_config``
defaults: rho 2, tau 0.99); ``"lora_ga"`` takes A and B from the task loss's mean gradient on the first 8
(``lora_ga_config`` defaults: ArB2r, stable scale, gamma 16); ``"mica"`` fixes B on each weight's least used
output directions and trains A. Two seeds (data order, and the random A of the default init), the variants in
turn, reversed for the second seed. ``--inits default,lora_ga`` runs a subset. ``--quick``: a tiny random Llama
and 32 rows, to prove the harness runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.adapter_dtype import CONFIG, _alpaca, _tiny_llama
from benchmarks.timing import median, table

VARIANTS = {"default": ("default (A random, B = 0)", []),
            "eva": ("EVA", ["--set", 'lora.init_lora_weights="eva"']),
            "lora_ga": ("LoRA-GA", ["--set", 'lora.init_lora_weights="lora_ga"']),
            "mica": ("MiCA (A trained, B fixed)", ["--set", 'lora.init_lora_weights="mica"'])}
# adapter_dtype's run (SmolLM2, Alpaca, r=16 on every linear layer, 1 epoch of batch 8), in float32, without
# dropout, evaluated every 30 steps
OVERRIDES = ["--set", "model.dtype=float32", "--set", "lora.lora_dropout=0.0", "--set", "train.lr=2e-4",
             "--set", "train.keep_best=false", "--set", "train.log_every=1"]


def run(args, print_fn) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    train = _alpaca()
    seeds = (0,) if args.quick else (0, 1)
    chosen = [k.strip() for k in (getattr(args, "inits", None) or ",".join(VARIANTS)).split(",")]
    unknown = [k for k in chosen if k not in VARIANTS]
    if unknown:
        raise SystemExit(f"--inits: unknown {unknown}; choose from {list(VARIANTS)}")
    results: dict[str, list[dict]] = {VARIANTS[k][0]: [] for k in chosen}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = run_config(root, train, args.quick)
        every = ["--set", f"train.eval_every={2 if args.quick else 30}"]
        for seed in seeds:
            for key in chosen if seed % 2 == 0 else list(reversed(chosen)):
                name, settings = VARIANTS[key]
                out = root / f"run-{seed}-{key}"
                cmd = [sys.executable, "-m", "lorafit", "train", str(config), "--output-dir", str(out),
                       "--no-progress", "--set", f"train.seed={seed}",
                       "--set", f"train.num_threads={torch.get_num_threads()}", *OVERRIDES, *every, *settings]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
                if proc.returncode != 0:
                    raise SystemExit(f"lorafit train ({name}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
                results[name].append(_read(out))
    steps = sorted({s for runs in results.values() for r in runs for s in r["eval_loss"]})
    body = []
    for name, runs in results.items():
        row = [name]
        for step in steps:
            row.append(" / ".join(f"{r['eval_loss'][step]:.4f}" for r in runs))
        row.append(" / ".join(f"{r['first_train_loss']:.3f}" for r in runs))
        row.append(f"{median([r['setup_s'] for r in runs]):.1f}")
        row.append(f"{median([r['train_s'] for r in runs]):.1f}")
        row.append(runs[0]["ranks"])
        body.append(row)
    what = "a tiny random Llama, 4 steps" if args.quick else "SmolLM2-135M on Alpaca, 60 steps of batch 8"
    print_fn(f"Initialisations against the default: {what}, r=16 on every linear layer, seeds {seeds}",
             table(body, ["init", *[f"eval loss at step {s} (each seed)" for s in steps],
                          "train loss, first 10 steps", "set-up s (median)", "train s (median)", "saved rank"]))
    return {"runs": results}


def run_config(root: Path, train: Path, quick: bool) -> Path:
    """adapter_dtype's run config on SmolLM2 with 480 training rows and 64 held out (of 999); quick: a tiny
    random Llama, 32 and 8."""
    model = _tiny_llama(root, train) if quick else "smollm2-135m"
    config = root / "run.toml"
    config.write_text(CONFIG.format(model=json.dumps(str(model)), train=json.dumps(str(train)),
                                    held_out=0.1 if quick else 0.065, rows=32 if quick else 480))
    return config


def _read(out: Path) -> dict:
    """A run's eval losses by step, its mean training loss over the first 10 steps, its set-up time (the run's
    wall time outside training: loading, encoding, and the initialisation's passes) and training time, and the
    saved adapter's ranks (LoRA-GA's is saved as a plain LoRA of twice the rank)."""
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    losses = [r["loss"] for r in records if r.get("type") == "train"][:10]
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    if isinstance(adapter["target_modules"], list) and adapter.get("rank_pattern"):
        ranks = [adapter["rank_pattern"].get(t, adapter["r"]) for t in adapter["target_modules"]]
        kept = f"{min(ranks)}-{max(ranks)} on {len(ranks)} layers"
    else:
        kept = f"{adapter['r']} on every layer"
    return {"eval_loss": evals, "first_train_loss": sum(losses) / max(len(losses), 1),
            "setup_s": summary["wall_time_s"] - summary["train_time_s"],
            "train_s": summary["train_time_s"] - summary["eval_time_s"], "ranks": kept}
