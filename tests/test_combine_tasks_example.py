"""examples/combine_tasks.py on two tiny runs: a 2-label and a 4-label task on one base model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_train_support import classification_setup, write_jsonl

pytest.importorskip("transformers")

from lorafit.train import train

REPO = Path(__file__).resolve().parents[1]


def test_combine_tasks_reads_two_runs_with_heads_of_other_sizes(tmp_path):
    config = classification_setup(tmp_path)
    for split in ("train", "dev"):  # a second task on the same texts, with 4 labels
        rows = [json.loads(line) for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()]
        write_jsonl(tmp_path / f"{split}4.jsonl", [{**r, "label": "wxyz"[(len(r["text"]) + 2 * int(r["label"])) % 4]}
                                                   for r in rows])
    first = train(config, ["train.epochs=2"], progress=False)
    train(config, ["train.epochs=2", f"data.train={tmp_path / 'train4.jsonl'}",
                   f"data.validation={tmp_path / 'dev4.jsonl'}", f"output_dir={tmp_path / 'run4'}"], progress=False)
    out = tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "combine_tasks.py"), str(tmp_path / "run"), str(tmp_path / "run4"),
         "--names", "two", "four", "--splits", "validation", "--threads", "1", "--out", str(out),
         "--methods", "exact", "linear", "svd", "ties_svd", "dare_ties_svd", "--svd-rank", "4", "--density", "0.5"],
        check=False, capture_output=True, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()[2:]
    assert len(lines) == 14  # per task: head only, own adapter, exact, linear, svd, ties_svd, dare_ties_svd
    own = next(line for line in lines if line.startswith("| two | own adapter |"))
    assert f"{100 * first['validation']['accuracy']:.2f}%" in own  # the adapter loads as it was trained
    assert any(line.startswith("| four | combined, exact |") and "r=8, rel. error 0.000" in line for line in lines)
    assert any(line.startswith("| two | combined, ties_svd (rank 4, density 0.5) |") and "r=4" in line
               for line in lines)
