"""Two task adapters combined into one: what each task keeps, measured on its own data.

    python examples/combine_tasks.py runs/sst2-minilm-lora runs/agnews-minilm-lora --out runs/combine_tasks.md

Reads two finished classification runs of the same base model (e.g. examples/sst2_minilm.toml and
examples/agnews_minilm.toml), loads both adapters into one model (each with its own head, of its own
number of labels) and, for each task, evaluates that task's validation and test data with

- its own head only (no low-rank change: what the head alone gets from the frozen base),
- its own adapter alone,
- the two adapters combined with ``lorafit.combine_adapters`` (weights 1.0 / 1.0) and the task's own
  head: ``exact`` (ranks concatenated, the sum of both deltas), ``linear`` (same rank, cross terms)
  and ``svd`` truncated to ``--svd-rank``; the mean relative Frobenius error of each is reported;
  ``ties_svd``, ``dare_ties_svd``, ``dare_linear_svd`` and ``magnitude_prune_svd`` keep ``--density`` of
  each task's change (TIES's sign election for the ``ties`` ones) before the same truncation (their error
  is the truncation's).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import time
from pathlib import Path

import torch

import lorafit
from lorafit.train.config import load_config
from lorafit.arithmetic import METHODS, SPARSE
from lorafit.train.run import CONFIG_FILE, encode_split, prepare, quantize_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs=2, help="two finished lorafit classification run directories")
    parser.add_argument("--names", nargs=2, help="task names (default: from the run directory names)")
    parser.add_argument("--methods", nargs="+", default=["exact", "linear", "svd"], choices=METHODS)
    parser.add_argument("--svd-rank", type=int, default=8, help="rank of the svd combinations (default 8)")
    parser.add_argument("--density", type=float, default=0.2,
                        help="fraction of each change the ties / dare / magnitude_prune methods keep (default 0.2)")
    parser.add_argument("--splits", nargs="+", default=["validation", "test"], choices=["validation", "test"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", help="also write the table (Markdown) to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    runs = [Path(r) for r in args.runs]
    names = args.names or [re.sub(r"[^A-Za-z0-9_-]", "-", r.resolve().name) for r in runs]
    configs = [load_config(r / CONFIG_FILE) for r in runs]
    for key in ("model.name", "model.dtype", "model.quantize", "train.method", "task.type"):
        if configs[0].get(key) != configs[1].get(key):
            raise SystemExit(f"the runs differ in {key} ({configs[0].get(key)!r} vs {configs[1].get(key)!r}); "
                             "their adapters cannot share one base model")
    if configs[0].train.method != "lora" or configs[0].task.type != "classification":
        raise SystemExit("both runs must be LoRA classification runs")

    # One base model (built with the first task's head size) and one task per run for data and metrics.
    first = prepare(configs[0])
    quantize_for(first)  # the base the adapters were trained on (model.quantize)
    preps = {names[0]: first,
             names[1]: prepare(configs[1], model=first.model, tokenizer=first.tokenizer)}
    model = first.model
    for name, run in zip(names, runs):
        lorafit.load_adapter(model, run / "adapter", name)  # each brings its own head, of its own size
    model.to(first.device)

    rows = []
    for task, other in (names, names[::-1]):
        prep = preps[task]
        features = {split: encode_split(prep, split) for split in args.splits}
        variants: list[tuple[str, str, str]] = []  # (label, adapter name, note)
        lorafit.combine_adapters(model, {task: 0.0}, f"{task}-head", heads=task)  # weight 0: the head alone
        variants.append(("no adapter (own head only)", f"{task}-head", ""))
        variants.append(("own adapter", task, ""))
        for method in args.methods:
            name = f"{task}-{method}"
            truncated, sparse = method == "svd" or method in SPARSE, method in SPARSE
            torch.manual_seed(0)  # DARE's draws
            errors = lorafit.combine_adapters(model, {task: 1.0, other: 1.0}, name, method=method,
                                              rank=args.svd_rank if truncated else None, heads=task,
                                              density=args.density if sparse else None)
            label = f"combined, {method}" + (f" (rank {args.svd_rank}" if truncated else "") + (
                f", density {args.density}" if sparse else "") + (")" if truncated else "")
            rank = max(layer.rank[name] for _, layer in lorafit.model.lora_layers(model)
                       if name in layer.adapter_names)
            variants.append((label, name, f"r={rank}, rel. error {sum(errors.values()) / len(errors):.3f}"))
        for label, name, note in variants:
            lorafit.set_active(model, name)
            start = time.perf_counter()
            metrics = {split: prep.task.evaluate(model, feats, prep.device, prep.config.train.eval_batch_size,
                                                 contextlib.nullcontext)
                       for split, feats in features.items()}
            seconds = time.perf_counter() - start
            rows.append((task, label, note, {s: m["accuracy"] for s, m in metrics.items()}))
            print(f"{task:>10} | {label:<28} | " + " | ".join(f"{s} {m['accuracy']:.2%}" for s, m in metrics.items())
                  + f" | {note} ({seconds:.0f} s)", flush=True)

    header = "| task | adapter | " + " | ".join(f"{s} accuracy" for s in args.splits) + " | notes |"
    lines = [header, "|" + "---|" * (3 + len(args.splits))]
    lines += [f"| {task} | {label} | " + " | ".join(f"{acc[s]:.2%}" for s in args.splits) + f" | {note} |"
              for task, label, note, acc in rows]
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
