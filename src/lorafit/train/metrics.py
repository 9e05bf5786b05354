"""Recording a run: metrics.jsonl, the PNG curve, peak memory, the run's summary (summary.json) and its table."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafit.io import atomic_write


COMPLETIONS_FILE = "completions.jsonl"  # grpo's sampled completions (task.log_completions), beside metrics.jsonl


class MetricsLog:
    """Append-only ``metrics.jsonl`` (or ``completions.jsonl``): one JSON object per line, flushed at once.

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
        self._to_tensorboard(record)

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        """Many lines at once (grpo's completions); values JSON cannot hold are written as their str."""
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(record, default=str) + "\n" for record in records))

    def _to_tensorboard(self, record: dict[str, Any]) -> None:
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
    """Training loss and evaluation loss (left; grpo's policy entropy beside them), the selection metric (right;
    grpo's training samples' reward beside it), against the step."""
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
    if evals and "eval_loss" in evals[0]:  # grpo evaluates rewards, no loss
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    drawn = [r for r in train if "entropy" in r]  # grpo: its policy's entropy, which collapse drives to 0
    if drawn:
        twin = ax.twinx()
        twin.plot([r["step"] for r in drawn], [r["entropy"] for r in drawn], color="C3", lw=1, label="entropy")
        twin.set_ylabel("entropy (nats)")
        twin.legend(loc="upper right")
    ax = axes[1]
    shown = metric if evals and metric in evals[0] else None
    if shown:
        ax.plot([r["step"] for r in evals], [r[shown] for r in evals], "o-", color="C2", label=f"validation {shown}")
        sampled = [r for r in train if shown in r]  # grpo: the training samples' reward too
        if sampled:
            ax.plot([r["step"] for r in sampled], [r[shown] for r in sampled], color="C1", lw=1,
                    label=f"training samples' {shown}")
            ax.legend()
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


@dataclass(kw_only=True)
class ParamCounts:
    trainable: int
    """Parameters the run trained: the adapter's (with its modules_to_save), or every one (method = "full")."""
    total: int
    """Every parameter of the model as trained, the adapter's included."""
    trainable_percent: float
    """100 * trainable / total."""
    base_model: int
    """Parameters of the model without the adapter: what full fine-tuning would train."""


@dataclass(kw_only=True)
class BestEval:
    metric: str
    """The validation metric that ranks evaluations: train.metric, or the task's default."""
    value: float
    """Its best value over the run's evaluations."""
    step: int
    """The optimizer step whose weights reached it (saved in checkpoints/best)."""


@dataclass(kw_only=True)
class RunSummary:
    """What a finished run reports: written as ``summary.json`` (``to_dict``; the keys are the field names, in
    this order), returned by ``train`` as the dict ``TrainResult``, read back with ``from_dict``."""

    method: str
    """train.method: "lora" or "full"."""
    lora_r: int | None
    """The adapter's rank ([lora] r); None for method = "full"."""
    model: str
    """model.name as configured."""
    task: str
    """task.type: "classification", "causal_lm", "seq2seq", "preference", "reward", "kto" or "grpo"."""
    params: ParamCounts
    """Trainable and total parameter counts."""
    steps: int
    """Optimizer steps done, over every session of a resumed run."""
    epochs_done: float | None
    """Passes over the training rows: whole epochs plus the consumed fraction of the current one; None for a
    streamed training split (data.streaming), whose length is not known (see train_rows_seen)."""
    early_stopped: bool
    """Whether train.early_stopping_patience ended the run before its last step."""
    train_tokens: int
    """Non-padding tokens the optimizer steps trained on (all processes)."""
    train_rows_seen: int | None = None
    """Training rows the optimizer steps consumed, each time it was read (packed sequences with task.packing);
    None in summaries written before lorafit recorded it."""
    train_time_s: float
    """Seconds in the training loop, evaluations included, summed over resumed sessions."""
    eval_time_s: float
    """The part of train_time_s spent evaluating on the validation split."""
    train_tokens_per_s: float
    """train_tokens / (train_time_s - eval_time_s)."""
    peak_memory_bytes: int | None
    """Peak memory of the run (see peak_memory_method); None where the platform cannot measure it."""
    peak_memory_method: str
    """What peak_memory_bytes measures: CUDA's max allocated, or the process's peak RSS."""
    device: str
    """The torch device the run trained on."""
    threads: int
    """torch's intra-op CPU threads."""
    processes: int
    """Training processes (torchrun's world size; 1 without it)."""
    distributed: str | None
    """"ddp" or "fsdp" across processes; None for one process."""
    gradient_bytes_all_reduced_per_step: float | None
    """Gradient bytes each DDP step all-reduced (the adapter's, not the model's); None without DDP."""
    best: BestEval | None
    """The best validation evaluation; None without validation data."""
    final_weights: str
    """Which weights the run saved: "best (step N)" (train.keep_best) or "last (step N)"."""
    validation: dict[str, float] | None
    """The saved weights' metrics on the validation split; None without one."""
    test: dict[str, float] | None
    """The saved weights' metrics on the test split; None without one."""
    output: str
    """Where the result is: OUTPUT_DIR/adapter, or OUTPUT_DIR/model for method = "full"."""
    wall_time_s: float
    """Wall seconds of this session, plus the training seconds of the sessions before a resume."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSummary:
        """A summary.json's content; keys this version does not know are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["params"] = ParamCounts(**values["params"])
        values["best"] = BestEval(**values["best"]) if values.get("best") else None
        return cls(**values)


def format_summary(summary: RunSummary | dict[str, Any]) -> str:
    """The summary as the table ``lorafit train`` prints at the end."""
    s = RunSummary.from_dict(summary) if isinstance(summary, dict) else summary
    p = s.params
    rows = [
        ("method", s.method + (f" (r={s.lora_r})" if s.lora_r else "")),
        ("model", s.model),
        ("trainable params", f"{p.trainable:,} of {p.total:,} ({p.trainable_percent:.3f}%)"),
        ("steps", f"{s.steps} ({_progress(s)}{', early stop' if s.early_stopped else ''})"),
        ("wall time", f"{s.wall_time_s:.1f} s ({s.train_tokens_per_s:.0f} train tokens/s)"),
        ("peak memory", f"{human_bytes(s.peak_memory_bytes)} ({s.peak_memory_method})"),
    ]
    if s.best:
        rows.append((f"best {s.best.metric}", f"{s.best.value:.4f} at step {s.best.step}"))
    for split, metrics in (("validation", s.validation), ("test", s.test)):
        if metrics:
            rows.append((split, "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())))
    rows.append(("output", s.output))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([line] + [f"{k.ljust(width)}  {v}" for k, v in rows] + [line])


def _progress(s: RunSummary) -> str:
    if s.epochs_done is not None:
        return f"{s.epochs_done:.2f} epochs"
    return f"{s.train_rows_seen:,} streamed rows" if s.train_rows_seen is not None else "streamed rows"
