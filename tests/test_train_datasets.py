"""Data through `datasets`: every file format into an Arrow table, tokenization cached between runs (and redone
when what decides the tokens changes), features read per batch, streamed training rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.test_train_support import (
    classification_setup,
    instruction_rows,
    sentiment_rows,
    tiny_llama_dir,
    toml_config,
    write_jsonl,
)

pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from lorafit.train import run  # noqa: E402
from lorafit.train.config import load_config  # noqa: E402
from lorafit.train.data import FeatureTable, epoch_batches, lengths_of, load_splits  # noqa: E402
from lorafit.train.metrics import format_summary  # noqa: E402
from lorafit.train.tasks import Classification  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("datasets")
    classification_setup(root)
    return root


def config_for(setup: Path, cache: Path, *overrides: str):
    return load_config(setup / "run.toml", [f"data.cache_dir={json.dumps(str(cache))}", *overrides])


def write_all_formats(root: Path, rows: list[dict]) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = [write_jsonl(root / "rows.jsonl", rows)]
    (root / "rows.json").write_text(json.dumps(rows))
    paths.append(root / "rows.json")
    for suffix, delimiter in (("csv", ","), ("tsv", "\t")):
        with open(root / f"rows.{suffix}", "w", newline="") as fh:
            writer = csv.DictWriter(fh, list(rows[0]), delimiter=delimiter)
            writer.writeheader()
            writer.writerows(rows)
        paths.append(root / f"rows.{suffix}")
    pq.write_table(pa.Table.from_pylist(rows), root / "rows.parquet")
    paths.append(root / "rows.parquet")
    return paths


def test_every_format_loads_into_an_arrow_table(setup, tmp_path):
    rows = [{"text": r["text"], "label": "pos" if r["label"] else "neg"} for r in sentiment_rows(40)]
    for path in write_all_formats(tmp_path, rows):
        config = config_for(setup, tmp_path / "cache", f"data.train={path}", "data.validation_fraction=0.25")
        config.data.validation = None
        splits = load_splits(config)
        assert isinstance(splits.train, datasets.Dataset), path.name
        assert splits.train.cache_files, path.name  # memory-mapped from the cache, not held in memory
        assert len(splits.train) == 30 and len(splits.validation) == 10, path.name
        assert sorted(splits.train.to_list() + splits.validation.to_list(), key=str) == sorted(rows, key=str)
        assert str(tmp_path / "cache") in splits.train.cache_files[0]["filename"]
    assert not any(p.suffix == ".arrow" for p in tmp_path.glob("rows*"))  # nothing beside the user's data


def test_parquet_errors_name_the_file_and_its_fields(setup, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"sentence": "good", "label": 1}] * 4), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"t\.parquet: field 'text' \(data\.text_field\) not found; the file has "
                                         r"fields: sentence, label"):
        load_splits(config_for(setup, tmp_path / "cache", f"data.train={tmp_path / 't.parquet'}"))


def count_encoded(monkeypatch) -> list[int]:
    seen: list[int] = []
    real = Classification.encode_batch

    def counting(self, batch, split):
        seen.append(len(next(iter(batch.values()))))
        return real(self, batch, split)

    monkeypatch.setattr(Classification, "encode_batch", counting)
    return seen


def encoded_train(config) -> FeatureTable:
    return run.encode_split(run.prepare(config), "train")


def test_tokenization_is_cached_between_runs_and_redone_when_its_inputs_change(setup, tmp_path, monkeypatch):
    seen = count_encoded(monkeypatch)
    cache = tmp_path / "cache"
    first = encoded_train(config_for(setup, cache))
    assert isinstance(first, FeatureTable) and sum(seen) > len(first) == 96
    files = {f["filename"] for f in first.dataset.cache_files}
    assert all(str(cache) in f for f in files)

    seen.clear()
    again = encoded_train(config_for(setup, cache))  # a new run, same inputs: the tokens are read back
    assert sum(seen) <= 1  # one row, to learn the columns
    assert {f["filename"] for f in again.dataset.cache_files} == files
    assert again[:] == first[:] and lengths_of(again).tolist() == [len(f["input_ids"]) for f in first]

    def retokenized(*overrides: str, config=None) -> FeatureTable:
        seen.clear()
        features = encoded_train(config or config_for(setup, cache, *overrides))
        assert sum(seen) > 96, overrides
        assert {f["filename"] for f in features.dataset.cache_files}.isdisjoint(files), overrides
        return features

    short = retokenized("task.max_length=6")
    assert max(lengths_of(short)) == 6 < max(lengths_of(first))
    # another field mapping: the same texts under another name
    renamed = tmp_path / "renamed.jsonl"
    write_jsonl(renamed, [{"review": r["text"], "label": r["label"]} for r in sentiment_rows(96, 0)])
    config = config_for(setup, cache, f"data.train={renamed}", "data.text_field=review")
    config.data.validation = None
    assert retokenized(config=config)[:] == first[:]
    # another tokenizer: the same model directory with one more token
    from transformers import AutoTokenizer

    config = config_for(setup, cache)
    tok = AutoTokenizer.from_pretrained(config.model.name)
    tok.add_tokens(["brandnewtoken"])
    seen.clear()
    run.encode_split(run.prepare(config, tokenizer=tok), "train")
    assert sum(seen) > 96
    # a changed file is read again
    rows = sentiment_rows(100, 0)
    changed = write_jsonl(tmp_path / "train.jsonl", rows)
    assert len(encoded_train(config_for(setup, cache, f"data.train={changed}"))) == 100
    write_jsonl(changed, rows[:90])
    assert len(encoded_train(config_for(setup, cache, f"data.train={changed}"))) == 90


def test_batches_read_from_the_table_are_the_listed_examples(setup, tmp_path):
    features = encoded_train(config_for(setup, tmp_path / "cache"))
    as_list = list(features)
    assert len(as_list) == len(features) and all("length" not in f for f in as_list)
    lengths = lengths_of(features).tolist()
    assert lengths == [len(f["input_ids"]) for f in as_list]
    batch = epoch_batches(lengths, 8, seed=1, epoch=0)[0]
    assert features.rows(batch) == [as_list[i] for i in batch]


def test_epoch_batches_are_those_of_the_python_sort(setup):
    """The tensor sort gives exactly the batches a stable Python sort per mega-batch gave (resumed runs of
    earlier versions, and anyone reading the docstring, expect those)."""
    import torch

    lengths = [int(x) for x in torch.randint(1, 30, (2000,), generator=torch.Generator().manual_seed(5))]
    gen = torch.Generator().manual_seed(7 * 1_000_003 + 2)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    want = []
    for start in range(0, len(order), 4 * 50):
        chunk = sorted(order[start:start + 200], key=lambda i: -lengths[i])
        want += [chunk[i:i + 4] for i in range(0, len(chunk), 4)]
    want = [want[i] for i in torch.randperm(len(want), generator=gen).tolist()]
    assert epoch_batches(lengths, 4, seed=7, epoch=2) == want


def streaming_config(setup: Path, tmp_path: Path, out: str, *overrides: str):
    return config_for(setup, tmp_path / "cache", "data.streaming=true", "data.labels=[0, 1]", "train.max_steps=5",
                      "train.eval_every=5", "data.shuffle_buffer=16", f"output_dir={json.dumps(str(tmp_path / out))}",
                      *overrides)


def test_streaming_trains_a_few_steps_and_refuses_what_needs_every_row(setup, tmp_path):
    from lorafit.train import train

    summary = train(streaming_config(setup, tmp_path, "run"), progress=False)
    assert summary["steps"] == 5 and 0 <= summary["validation"]["accuracy"] <= 1
    # one file was converted to a table: the validation file, not the streamed training rows
    assert len(list((tmp_path / "cache").rglob("generator-*.arrow"))) == 1
    bad = [(["train.max_steps=0"], "set train.max_steps"),
           (["data.validation_fraction=0.2"], "validation_fraction cannot hold rows out of a stream"),
           ([], "set data.labels")]
    for extra, message in bad:
        config = streaming_config(setup, tmp_path, "never", *extra)
        if not extra:
            config.data.labels = None
        elif extra[0].startswith("data.validation_fraction"):
            config.data.validation = None
        with pytest.raises(ValueError, match=message):
            train(config, progress=False)
    assert not (tmp_path / "never").exists()


def test_a_streamed_run_records_the_rows_it_read_not_a_nominal_length(setup, tmp_path):
    """The stream's length is not known: data.json says so, and the summary counts the rows the steps read
    (92 rows in batches of 8, in stream order: 12 batches a pass, the last of 4 rows; 15 steps = a pass and
    3 batches)."""
    from lorafit.train import train

    result = train(streaming_config(setup, tmp_path, "run", "data.max_train_rows=92", "train.max_steps=15",
                                    "train.eval_every=0", "train.group_by_length=false"), progress=False)
    assert result["steps"] == 15 and result["train_rows_seen"] == 92 + 3 * 8  # not 15 x 8 = 120
    assert result["epochs_done"] is None and "116 streamed rows" in format_summary(result)
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    assert data["rows"] == {"train": None, "validation": 32, "test": 0} and data["streaming"] is True


def test_a_streamed_label_outside_the_label_set_is_named(setup, tmp_path):
    from lorafit.train import train

    config = streaming_config(setup, tmp_path, "run", "data.labels=[0, 2]")
    config.data.validation = None
    with pytest.raises(ValueError, match=r"label 1 \('label'\) is not in the label set \['0', '2'\]"):
        train(config, progress=False)


def test_causal_lm_features_in_arrow_train_and_evaluate(tmp_path):
    from lorafit.train import train

    rows = instruction_rows(40)
    write_jsonl(tmp_path / "train.jsonl", rows[:32])
    write_jsonl(tmp_path / "dev.jsonl", rows[32:])
    config = toml_config(tmp_path / "lm.toml", f"""
output_dir = "{tmp_path / 'run'}"
[model]
name = "{tiny_llama_dir(tmp_path, rows)}"
[data]
train = "{tmp_path / 'train.jsonl'}"
validation = "{tmp_path / 'dev.jsonl'}"
cache_dir = "{tmp_path / 'cache'}"
instruction_field = "instruction"
input_field = "input"
output_field = "output"
[task]
type = "causal_lm"
max_length = 64
generate_rows = 4
max_new_tokens = 8
[lora]
r = 4
target_modules = "all-linear"
[train]
max_steps = 4
batch_size = 4
num_threads = 1
""")
    prep = run.prepare(load_config(config))
    listed = prep.task.encode(prep.splits.validation.to_list(), "validation").features
    table = run.encode_split(prep, "validation")
    assert list(table) == listed and all("prompt_ids" in f and f["reference"] for f in listed)
    summary = train(config, progress=False)
    assert summary["steps"] == 4 and "rouge1" in summary["validation"]
