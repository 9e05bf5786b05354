"""Rank study: the same LoRA run at several ranks; accuracy and trainable parameters as a table and a plot.

    python examples/rank_study.py examples/sst2_minilm.toml --out runs/rank-study
    python examples/rank_study.py examples/sst2_minilm.toml --out runs/rank-study --ranks 1 4 16 \
        --set data.max_train_rows=2000 --set train.epochs=1

Each rank trains into OUT/r<R> with lora_alpha = 2 r (the scale alpha / r stays 2,
so only the rank changes). Finished ranks are skipped when the script runs again,
and an interrupted rank resumes from its checkpoint. Writes OUT/rank_study.json,
OUT/rank_study.md and OUT/rank_study.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorafit.train import train
from lorafit.train.config import load_config
from lorafit.train.run import read_summary, run_kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--out", required=True, help="directory for the runs and the results")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    for r in args.ranks:
        run_dir = out / f"r{r}"
        overrides = args.set + [f"lora.r={r}", f"lora.lora_alpha={2 * r}", f"output_dir={json.dumps(str(run_dir))}"]
        if not (run_dir / "summary.json").is_file():
            train(args.config, overrides, resume=run_kind(run_dir) == "run", progress=False)
        s = read_summary(run_dir)
        metric = s["best"]["metric"] if s["best"] else "accuracy"
        rows.append({"r": r, "trainable": s["params"]["trainable"],
                     "trainable_percent": s["params"]["trainable_percent"],
                     "metric": metric, "validation": (s["validation"] or {}).get(metric),
                     "test": (s["test"] or {}).get(metric), "wall_time_s": s["wall_time_s"]})
    (out / "rank_study.json").write_text(json.dumps(rows, indent=2) + "\n")

    config = load_config(args.config, args.set)
    metric = rows[0]["metric"]
    lines = [f"Rank study: {config.model.name}, {Path(config.data.train).parent.name}, lora_alpha = 2 r", "",
             f"| r | trainable params | % of model | validation {metric} | test {metric} | wall time |",
             "|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        test = "-" if row["test"] is None else f"{row['test']:.4f}"
        lines.append(f"| {row['r']} | {row['trainable']:,} | {row['trainable_percent']:.2f}% | "
                     f"{row['validation']:.4f} | {test} | {row['wall_time_s'] / 60:.1f} min |")
    (out / "rank_study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot([r["r"] for r in rows], [r["validation"] for r in rows], "o-", label=f"validation {metric}")
    if all(r["test"] is not None for r in rows):
        ax.plot([r["r"] for r in rows], [r["test"] for r in rows], "s--", label=f"test {metric}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot([r["r"] for r in rows], [r["trainable"] for r in rows], "^:", color="C3", label="trainable params")
    twin.set_ylabel("trainable parameters")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "rank_study.png", dpi=110)
    print(f"wrote {out / 'rank_study.md'} and {out / 'rank_study.png'}")


if __name__ == "__main__":
    main()
