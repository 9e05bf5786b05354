"""train.tensorboard = true writes TensorBoard event files with the same scalars as metrics.jsonl."""

from __future__ import annotations

import json

import pytest

from tests.test_train_support import classification_setup

pytest.importorskip("transformers")
pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from lorafit.train import train  # noqa: E402


def test_tensorboard_event_files_hold_the_logged_scalars(tmp_path):
    config = classification_setup(tmp_path, n_train=32, n_val=16, extra="tensorboard = true")
    train(config, ["train.epochs=2", "train.eval_every=4"], progress=False)
    run = tmp_path / "run"
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in run.iterdir())

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "validation/accuracy", "validation/eval_loss"} <= tags, tags

    # the same values and steps as metrics.jsonl
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["loss"]) for r in records if r["type"] == "train"]
    written = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in written] == [s for s, _ in logged]
    assert [v for _, v in written] == pytest.approx([v for _, v in logged], rel=1e-6)
    evals = [(r["step"], r["accuracy"]) for r in records if r["type"] == "eval" and r.get("split") == "validation"]
    written = [(e.step, e.value) for e in acc.Scalars("validation/accuracy")]
    assert [s for s, _ in written] == [s for s, _ in evals] and len(evals) >= 2
    assert [v for _, v in written] == pytest.approx([v for _, v in evals], rel=1e-6)
