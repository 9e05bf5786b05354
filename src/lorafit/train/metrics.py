"""Recording a run: metrics.jsonl, the PNG curve, peak memory, the summary table."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from lorafit.io import atomic_write


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per line, flushed at once.

    On resume, lines from steps after the checkpoint (written before the
    interruption, and about to be written again) are dropped first.
    """

    def __init__(self, path: Path, tensorboard_dir: Path | None = None) -> None:
        self.path = path
        self.writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("train.tensorboard = true needs the tensorboard package: pip install tensorboard") \
                    from None
            self.writer = SummaryWriter(str(tensorboard_dir))

    def truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and _complete(line) and json.loads(line).get("step", 0) <= step]
        atomic_write(self.path, lambda p: Path(p).write_text("".join(line + "\n" for line in kept)))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            prefix = record.get("split", record.get("type", ""))
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.writer.add_scalar(f"{prefix}/{key}", value, record.get("step", 0))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _complete(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:  # a line cut short by a kill
        return False


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip() and _complete(line)]


def plot_curves(records: list[dict[str, Any]], metric: str, path: Path, title: str = "") -> Path | None:
    """Training loss and evaluation loss (left), the selection metric (right), against the step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("lorafit: matplotlib is not installed; no curves.png (pip install 'lorafit[train]')", file=sys.stderr)
        return None
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval" and r.get("split") == "validation"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ax = axes[0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1]
    shown = metric if evals and metric in evals[0] else None
    if shown:
        ax.plot([r["step"] for r in evals], [r[shown] for r in evals], "o-", color="C2")
        ax.set_ylabel(f"validation {shown}")
    else:
        ax.text(0.5, 0.5, "no validation data", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
    return path


def peak_memory(device: torch.device) -> tuple[int | None, str]:
    """Peak memory in bytes and what it measures."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    try:
        import resource
    except ImportError:
        return None, "not available on this platform"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak if sys.platform == "darwin" else peak * 1024), "peak RSS of the process (ru_maxrss)"


def human_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def format_summary(summary: dict[str, Any]) -> str:
    p = summary["params"]
    rows = [
        ("method", summary["method"] + (f" (r={summary['lora_r']})" if summary.get("lora_r") else "")),
        ("model", summary["model"]),
        ("trainable params", f"{p['trainable']:,} of {p['total']:,} ({p['trainable_percent']:.3f}%)"),
        ("steps", f"{summary['steps']} ({summary['epochs_done']:.2f} epochs"
                  f"{', early stop' if summary.get('early_stopped') else ''})"),
        ("wall time", f"{summary['wall_time_s']:.1f} s ({summary['train_tokens_per_s']:.0f} train tokens/s)"),
        ("peak memory", f"{human_bytes(summary['peak_memory_bytes'])} ({summary['peak_memory_method']})"),
    ]
    if summary.get("best"):
        b = summary["best"]
        rows.append((f"best {b['metric']}", f"{b['value']:.4f} at step {b['step']}"))
    for split in ("validation", "test"):
        metrics = summary.get(split)
        if metrics:
            rows.append((split, "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())))
    rows.append(("output", summary["output"]))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([line] + [f"{k.ljust(width)}  {v}" for k, v in rows] + [line])
