"""The Python API, ``lorafit.train.train``: dict configs, errors in Python's words, a model of one's own.

Every refusal here must happen before anything is written (the output directory must not exist
afterwards), and a model passed in must be trainable again by a second call in the same session.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.test_train_support import classification_setup, make_tokenizer, sentiment_rows, write_jsonl

transformers = pytest.importorskip("transformers")

import lorafit  # noqa: E402
from lorafit.train import evaluate, load_config, merge, train  # noqa: E402

FAST = {"train.epochs": 1, "train.eval_every": 0}  # one epoch: 12 steps of 8 rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """A tiny BERT, two-class data and run.toml, and a three-class training file."""
    root = tmp_path_factory.mktemp("api")
    classification_setup(root)
    rows = sentiment_rows(48, 2)
    for i, row in enumerate(rows):
        row["label"] = i % 3
    write_jsonl(root / "three.jsonl", rows)
    return root


@pytest.fixture(scope="module")
def finished(setup) -> Path:
    """One finished run (from the TOML file), for the tests that need a run directory."""
    out = setup / "finished"
    train(setup / "run.toml", {"output_dir": str(out), **FAST}, progress=False)
    return out


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    return lorafit.read_adapter(run / "adapter")[1]


def as_dict(setup: Path) -> dict:
    """run.toml as a Python dict, the way a notebook would write it: Path objects, a tuple of targets."""
    data = tomllib.loads((setup / "run.toml").read_text())
    data["data"] = {k: Path(v) if k in ("train", "validation") else v for k, v in data["data"].items()}
    data["lora"]["target_modules"] = tuple(data["lora"]["target_modules"])
    del data["output_dir"]  # supplied by the overrides: checked once they are in
    return data


def bert_classifier(setup: Path, num_labels: int) -> nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_pretrained(setup / "tiny-bert", num_labels=num_labels)


SUMMARY_KEYS = ["method", "lora_r", "model", "task", "params", "steps", "epochs_done", "early_stopped", "train_tokens",
                "train_rows_seen", "train_time_s", "eval_time_s", "train_tokens_per_s", "peak_memory_bytes",
                "peak_memory_method",
                "device", "threads", "processes", "distributed", "gradient_bytes_all_reduced_per_step", "best",
                "final_weights", "validation", "test", "output", "wall_time_s"]


def test_summary_json_keeps_its_keys_and_reads_back_as_a_run_summary(finished):
    """summary.json's keys are what scripts and BENCHMARKS read: RunSummary's fields are exactly these."""
    from lorafit.train.metrics import RunSummary, format_summary

    saved = json.loads((finished / "summary.json").read_text())
    assert sorted(saved) == sorted(SUMMARY_KEYS)
    assert sorted(saved["params"]) == sorted(["trainable", "total", "trainable_percent", "base_model"])
    assert sorted(saved["best"]) == sorted(["metric", "value", "step"])
    summary = RunSummary.from_dict(saved)
    assert summary.to_dict() == saved and summary.best.metric == "accuracy" and summary.params.total > 0
    assert format_summary(summary) == format_summary(saved)
    assert "best accuracy" in format_summary(saved)


def test_a_dict_config_trains_exactly_like_the_toml_file(setup, finished, tmp_path):
    result = train(as_dict(setup), {"output_dir": str(tmp_path / "dict"), **FAST}, progress=False)
    assert result["steps"] == 12
    from_file, from_dict = adapter_tensors(finished), adapter_tensors(tmp_path / "dict")
    assert from_file.keys() == from_dict.keys()
    for key, tensor in from_file.items():
        torch.testing.assert_close(from_dict[key], tensor, rtol=0, atol=0)
    # dotted keys work at the top level too, and the dict is not changed
    flat = {"output_dir": str(tmp_path / "flat"), "model.name": str(setup / "tiny-bert"),
            "data.train": setup / "train.jsonl", "task.max_length": 32, "lora.target_modules": ["query"]}
    before = dict(flat)
    assert load_config(flat).lora == {"target_modules": ["query"]}
    assert flat == before


@pytest.mark.parametrize("config, want", [
    ({"train": {"learning_rate": 1e-3}}, "unknown key 'train.learning_rate'; did you mean 'train.lr'?"),
    ({"training": {"lr": 1e-3}}, ("unknown section [training]; the sections are [model], [data], [task], [lora], "
                                  "[train]; did you mean 'train'?")),
    ({"lora": {"rank": 8}}, "unknown key 'lora.rank'; did you mean 'lora.r'?"),
    ({"train": {"epochs": "three"}}, "train.epochs must be an integer, got 'three'"),
    ({"train": 3}, "[train] must be a table of settings, got 3"),
    ({"model": {"name": ""}}, "model.name is required"),
    ({"model": {"quantize": 4}, "lora": {"kasa_config": {}}},
     "model.quantize is not supported with a KaSA adapter (lora.kasa_config)"),
])
def test_a_dict_config_is_checked_like_a_file(setup, tmp_path, config, want):
    base = as_dict(setup)
    for section, values in config.items():
        base[section] = {**base.get(section, {}), **values} if isinstance(values, dict) else values
    with pytest.raises(ValueError) as info:
        train(base, {"output_dir": str(tmp_path / "out")}, progress=False)
    assert want in str(info.value) and str(info.value).startswith("config (dict)")
    assert not (tmp_path / "out").exists()


def test_wrong_argument_types_say_what_is_expected(setup, tmp_path):
    with pytest.raises(TypeError, match="config must be a RunConfig, the path of a TOML file or a dict .* got int"):
        train(42)
    with pytest.raises(TypeError, match="overrides must be a list of 'key=value' strings or a dict, got the string"):
        train(setup / "run.toml", "train.lr=1e-3")
    with pytest.raises(ValueError, match=r"^overrides expects key=value \(e.g. train.lr=1e-4\), got 'train.lr'"):
        train(setup / "run.toml", ["train.lr"])
    with pytest.raises(ValueError, match="^overrides train.lr: train.lr must be a number, got 'fast'"):
        train(setup / "run.toml", {"train.lr": "fast"})


def test_a_run_config_object_is_not_changed(setup, tmp_path):
    config = load_config(setup / "run.toml")
    before = config.to_dict()
    with pytest.raises(ValueError, match="task.max_length = 1000 is longer"):  # fails after the overrides are in
        train(config, {"output_dir": str(tmp_path / "x"), "task.max_length": 1000}, progress=False)
    assert config.to_dict() == before
    config.train.epochs = 0  # set by hand, unchecked: train() checks it
    with pytest.raises(ValueError, match="^config: train.epochs must be >= 1, got 0"):
        train(config, progress=False)


def test_errors_name_python_arguments_not_cli_flags(setup, finished, tmp_path):
    def message(call) -> str:
        with pytest.raises(ValueError) as info:
            call()
        assert "--" not in str(info.value), str(info.value)
        return str(info.value)

    again = {"output_dir": str(finished), **FAST}
    assert "already holds a run; pass resume=True to continue it or overwrite=True to replace it" in message(
        lambda: train(setup / "run.toml", again, progress=False))
    assert "resume=True continues the run in output_dir and overwrite=True replaces it; pick one" in message(
        lambda: train(setup / "run.toml", again, resume=True, overwrite=True))
    assert "resume=True: the config differs" in message(
        lambda: train(setup / "run.toml", {**again, "train.seed": 5}, resume=True))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "pass overwrite=True to replace its contents" in message(
        lambda: train(setup / "run.toml", {"output_dir": str(other)}))
    assert "evaluate the base model (base=True) or an adapter (adapter=DIR), not both" in message(
        lambda: evaluate(finished, base=True, adapter=finished / "adapter"))
    assert "set it, e.g. overrides=['data.test=FILE']" in message(lambda: evaluate(finished, split="test"))
    assert "choose a new directory or pass overwrite=True" in message(lambda: merge(finished, other))


def test_eval_samples_are_each_example_s_prediction_and_probabilities(setup, finished, tmp_path, capsys):
    """evaluate(samples=FILE) / `lorafit eval --samples FILE`: a line per example, in the split's order, whose
    predictions make the metrics; the file is replaced whole; what cannot be written is refused up front."""
    from lorafit import cli

    out = tmp_path / "predictions.jsonl"
    out.write_text("an older file\n")
    metrics = evaluate(finished, samples=out)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["example"] for r in lines] == list(range(len(lines))) and len(lines) > 8
    for r in lines:
        assert r["split"] == "validation" and set(r["probabilities"]) == {r["label"], *r["probabilities"]}
        assert sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-5) and r["text"]
        assert r["predicted"] == max(r["probabilities"], key=r["probabilities"].get)
    assert metrics["accuracy"] == pytest.approx(sum(r["predicted"] == r["label"] for r in lines) / len(lines))
    assert cli.main(["eval", str(finished), "--samples", str(tmp_path / "cli.jsonl"), "--json"]) == 0
    assert (tmp_path / "cli.jsonl").read_text() == out.read_text()
    assert cli.main(["eval", str(finished), "--samples", str(tmp_path / "missing" / "x.jsonl")]) == 2
    assert "--samples: " in capsys.readouterr().err
    with pytest.raises(ValueError, match="samples: .* must be a file in an existing directory"):
        evaluate(finished, samples=tmp_path)


def test_cli_errors_still_name_the_flags(setup, finished, capsys):
    from lorafit import cli

    assert cli.main(["train", str(setup / "run.toml"), "--output-dir", str(finished), "--no-progress"]) == 2
    assert "pass --resume to continue it or --overwrite to replace it" in capsys.readouterr().err
    assert cli.main(["train", str(setup / "run.toml"), "--set", "train.lr=fast"]) == 2
    assert "--set train.lr: train.lr must be a number" in capsys.readouterr().err
    assert cli.main(["eval", str(finished), "--split", "test"]) == 2
    assert "set it, e.g. --set data.test=FILE" in capsys.readouterr().err


def test_a_head_of_the_wrong_size_is_refused_before_anything_is_written(setup, tmp_path):
    model = bert_classifier(setup, 2)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as info:
        train(setup / "run.toml", {"output_dir": str(out), "data.train": str(setup / "three.jsonl")}, model=model,
              progress=False)
    msg = str(info.value)
    assert "head with 2 outputs (model.classifier)" in msg and "the data has 3 classes (0, 1, 2)" in msg
    assert "num_labels=3" in msg
    assert not out.exists()
    assert not lorafit.adapter_configs(model)  # and the model is as it was


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.classifier = nn.Embedding(64, 8), nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask=None):
        return self.classifier(self.embed(input_ids).mean(1))


def test_a_plain_module_or_a_model_for_another_task_is_refused_up_front(setup, tmp_path):
    out = tmp_path / "out"
    overrides = {"output_dir": str(out)}
    with pytest.raises(ValueError) as info:
        train(setup / "run.toml", overrides, model=Tiny(), progress=False)
    msg = str(info.value)
    assert "model= must be a Hugging Face transformers model (a PreTrainedModel, with a .config)" in msg
    assert "a sequence classifier, e.g. AutoModelForSequenceClassification.from_pretrained" in msg
    assert "got a plain Tiny (torch.nn.Module)" in msg and "lorafit.attach(model" in msg
    bare = transformers.AutoModel.from_pretrained(setup / "tiny-bert")
    with pytest.raises(ValueError, match="model= is a BertModel, a bare model without a task head; task.type = "
                                         "'classification' needs a sequence classifier"):
        train(setup / "run.toml", overrides, model=bare, progress=False)
    lm = transformers.BertLMHeadModel(transformers.BertConfig(
        vocab_size=64, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        is_decoder=True))
    with pytest.raises(ValueError, match="model= is a BertLMHeadModel, a causal LM; task.type = 'classification'"):
        train(setup / "run.toml", overrides, model=lm, progress=False)
    assert not out.exists()


def test_a_tokenizer_larger_than_the_embedding_is_refused(setup, tmp_path):
    tok = transformers.AutoTokenizer.from_pretrained(setup / "tiny-bert")
    rows = bert_classifier(setup, 2).get_input_embeddings().num_embeddings
    tok.add_tokens([f"extra{i}" for i in range(3)])
    with pytest.raises(ValueError) as info:
        train(setup / "run.toml", {"output_dir": str(tmp_path / "out")}, tokenizer=tok, progress=False)
    assert f"the tokenizer has {rows + 3} tokens but the model's input embedding has {rows} rows" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_given_model_is_trained_in_place_and_can_be_trained_again(setup, tmp_path):
    model = bert_classifier(setup, 2)
    tok = transformers.AutoTokenizer.from_pretrained(setup / "tiny-bert")
    first = train(setup / "run.toml", {"output_dir": str(tmp_path / "a"), **FAST}, model=model, tokenizer=tok,
                  progress=False)
    assert first.model is model and first.tokenizer is tok and first.labels == [0, 1]
    assert list(lorafit.adapter_configs(model)) == ["default"] and not model.training
    assert json.loads((tmp_path / "a" / "summary.json").read_text()) == json.loads(json.dumps(first))
    assert first.summary.steps == first["steps"] and first.summary.to_dict() == dict(first)

    # the returned model predicts what the saved adapter on a fresh base predicts
    batch = tok(["a good movie", "the plot was dull and bad"], padding=True, return_tensors="pt")
    fresh = lorafit.load_adapter(bert_classifier(setup, 2), tmp_path / "a" / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(first.model(**batch).logits, fresh(**batch).logits, rtol=1e-5, atol=1e-5)

    # the cell run again: the earlier adapter comes off, and the run is the same run
    second = train(setup / "run.toml", {"output_dir": str(tmp_path / "b"), **FAST}, model=model, tokenizer=tok,
                   progress=False)
    assert second.model is model and list(lorafit.adapter_configs(model)) == ["default"]
    a, b = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
    assert second["validation"] == first["validation"]

    # an adapter someone else attached is not taken off silently
    other = bert_classifier(setup, 2)
    lorafit.attach(other, lorafit.LoraConfig(r=2, target_modules=["query"]), name="mine")
    with pytest.raises(ValueError, match=r"model= carries lorafit adapters \['mine'\] that train\(\) did not attach"):
        train(setup / "run.toml", {"output_dir": str(tmp_path / "c")}, model=other, progress=False)
    assert not (tmp_path / "c").exists() and list(lorafit.adapter_configs(other)) == ["mine"]


def test_a_given_model_and_tokenizer_need_no_hub_for_a_hub_name(setup, tmp_path, monkeypatch):
    """Both given: nothing is loaded, so model.name (a hub name) is only written into the adapter's config."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = transformers.AutoTokenizer.from_pretrained(setup / "tiny-bert")
    result = train(setup / "run.toml", {"output_dir": str(tmp_path / "out"), "model.name": "someone/tiny-bert",
                                        "train.max_steps": 2}, model=bert_classifier(setup, 2), tokenizer=tok,
                   progress=False)
    assert result["steps"] == 2 and result["model"] == "someone/tiny-bert"
    saved = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "someone/tiny-bert"
    # one of them alone still has to come from model.name, which offline cannot reach
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set"):
        train(setup / "run.toml", {"output_dir": str(tmp_path / "out2"), "model.name": "someone/tiny-bert"},
              tokenizer=tok, progress=False)
    assert not (tmp_path / "out2").exists()


def test_a_given_model_gets_its_own_dropout_modules_back_after_hashed_dropout(setup, tmp_path):
    """train.model_dropout = "hashed" swaps the model's nn.Dropout modules for the run only."""
    from lorafit.layers.hashed_dropout import HashedDropout

    model = bert_classifier(setup, 2).train()
    before = {name: m for name, m in model.named_modules() if type(m) is nn.Dropout}
    assert before
    seen = []

    def during(_state: dict) -> None:
        seen.append(sum(isinstance(m, HashedDropout) for m in model.modules()))

    train(setup / "run.toml", {"output_dir": str(tmp_path / "out"), "train.max_steps": 2,
                               "train.model_dropout": "hashed"}, model=model, callbacks=(during,), progress=False)
    assert seen == [len(before)] * 2  # the run trained with the hashed ones
    after = {name: m for name, m in model.named_modules() if isinstance(m, nn.Dropout)}
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert not any(m.training for m in after.values())  # in eval mode, like the rest of the returned model
    # and when the run fails after the swap, too
    other = bert_classifier(setup, 2)
    other.supports_gradient_checkpointing = False
    with pytest.raises(ValueError, match="train.gradient_checkpointing"):
        train(setup / "run.toml", {"output_dir": str(tmp_path / "out2"), "train.model_dropout": "hashed",
                                   "train.gradient_checkpointing": True}, model=other, progress=False)
    assert not any(isinstance(m, HashedDropout) for m in other.modules())


def test_a_tokenizer_without_a_pad_token_gets_one(setup, tmp_path):
    tok = make_tokenizer([r["text"] for r in sentiment_rows(128, 0) + sentiment_rows(32, 1)], bert_style=True)
    tok.pad_token = None
    model = bert_classifier(setup, 2)
    assert len(tok) <= model.get_input_embeddings().num_embeddings
    result = train(setup / "run.toml", {"output_dir": str(tmp_path / "out"), "train.max_steps": 2}, model=model,
                   tokenizer=tok, progress=False)
    assert tok.pad_token == "<eos>" and result["steps"] == 2


def test_a_quantized_or_fully_tuned_model_says_what_a_second_run_starts_from(setup, tmp_path):
    model = bert_classifier(setup, 2)
    short = {"train.max_steps": 2, "model.quantize": 4}
    train(setup / "run.toml", {"output_dir": str(tmp_path / "q1"), **short}, model=model, progress=False)
    train(setup / "run.toml", {"output_dir": str(tmp_path / "q2"), **short}, model=model, progress=False)
    a, b = adapter_tensors(tmp_path / "q1"), adapter_tensors(tmp_path / "q2")
    for key in a:  # the base stays in NF4 and is not quantized twice: the same run again
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"model= was quantized by an earlier train\(\) \(model.quantize = 4\).*"
                                         "keep model.quantize = 4 or load the model again"):
        train(setup / "run.toml", {"output_dir": str(tmp_path / "q3"), "train.max_steps": 2}, model=model)
    assert not (tmp_path / "q3").exists()

    full = bert_classifier(setup, 2)
    train(setup / "run.toml", {"output_dir": str(tmp_path / "f1"), "train.max_steps": 2, "train.method": "full"},
          model=full, progress=False)
    with pytest.warns(UserWarning, match=r"fine-tuned in full by an earlier train\(\); this run starts from those"):
        train(setup / "run.toml", {"output_dir": str(tmp_path / "f2"), "train.max_steps": 2}, model=full,
              progress=False)


def test_a_kasa_adapter_trains_with_its_regularizers_and_reloads(setup, tmp_path):
    """lora.kasa_config: the run adds KaSA's regularizers to the loss (weights zero or not train other adapters),
    and the saved adapter truncates a fresh base as the run's did: the same predictions."""
    runs = {}
    for name, weights in (("zero", {"beta": 0.0, "gamma": 0.0}), ("kasa", {"beta": 0.5, "gamma": 0.5})):
        runs[name] = train(setup / "run.toml", {"output_dir": str(tmp_path / name), **FAST,
                                                "lora.kasa_config": weights}, progress=False)
    zero, kasa = adapter_tensors(tmp_path / "zero"), adapter_tensors(tmp_path / "kasa")
    assert zero.keys() == kasa.keys() and any(k.endswith(".lora_diag") for k in kasa)
    assert any(not torch.allclose(zero[k], kasa[k]) for k in kasa)
    tok = transformers.AutoTokenizer.from_pretrained(setup / "tiny-bert")
    batch = tok(["a good movie", "the plot was dull and bad"], padding=True, return_tensors="pt")
    fresh = lorafit.load_adapter(bert_classifier(setup, 2), tmp_path / "kasa" / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(runs["kasa"].model(**batch).logits, fresh(**batch).logits, rtol=1e-5, atol=1e-5)


def test_loraplus_trains_b_at_its_own_rate(setup, tmp_path):
    """train.loraplus_lr_ratio: B (which starts at zero) moves about ratio times as far as with one rate; A's
    rate is unchanged, so A moves about as far (B's larger values change A's gradients, not its step size)."""
    ab = {}
    for ratio in (1, 16):
        train(setup / "run.toml", {"output_dir": str(tmp_path / f"r{ratio}"), **FAST,
                                   "train.loraplus_lr_ratio": ratio}, progress=False)
        tensors = adapter_tensors(tmp_path / f"r{ratio}")
        ab[ratio] = [torch.cat([t.flatten() for k, t in tensors.items() if f".{part}." in k]).abs().mean()
                     for part in ("lora_B", "lora_A")]
    (b1, a1), (b16, a16) = ab[1], ab[16]
    assert b16 > 5 * b1
    assert 0.5 < a16 / a1 < 2
    with pytest.raises(ValueError, match=r"train.loraplus_lr_ratio is for LoRA"):
        train(setup / "run.toml", {"output_dir": str(tmp_path / "full"), "train.method": "full",
                                   "train.loraplus_lr_ratio": 16}, progress=False)


def test_tf32_is_turned_on_for_the_process_and_false_leaves_the_flags_alone(setup, tmp_path):
    """train.tf32 = true sets torch's TF32 switches (products and convolutions) before the model is loaded; the
    default leaves whatever the user set."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = matmul.allow_tf32, cudnn.allow_tf32  # process-wide: restored below
    seen = []

    def during(_state: dict) -> None:
        seen.append((matmul.allow_tf32, cudnn.allow_tf32))

    def run(label: str, **overrides) -> None:
        train(setup / "run.toml", {"output_dir": str(tmp_path / label), "train.max_steps": 1, **overrides},
              callbacks=(during,), progress=False)

    try:
        matmul.allow_tf32 = cudnn.allow_tf32 = False
        run("off")
        matmul.allow_tf32 = True  # a user's own setting: the default keeps it
        run("kept")
        matmul.allow_tf32 = False
        run("on", **{"train.tf32": True})
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before
    assert seen == [(False, False), (True, False), (True, True)]
