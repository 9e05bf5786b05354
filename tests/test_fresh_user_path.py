"""A new user's path, end to end on a tiny model: their own CSV with named classes -> `lorafit train` ->
`lorafit eval` -> predictions by class name from `lorafit serve` and from PEFT's
AutoPeftModelForSequenceClassification, all agreeing with lorafit's own logits."""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

import lorafit  # noqa: E402
from lorafit.cli import main  # noqa: E402
from lorafit.serve.app import Limits, create_app  # noqa: E402
from lorafit.serve.server import build_service  # noqa: E402
from tests.test_train_support import tiny_bert_dir  # noqa: E402

CLASSES = {  # named classes, as a user's own data has them; sorted order is billing, shipping, technical
    "shipping": "parcel delivery courier tracking late box address",
    "billing": "invoice charge refund payment card price receipt",
    "technical": "crash error login password screen bug update",
}
FILLER = ["the", "my", "a", "is", "was", "please", "help", "today", "again", "still"]
NAMES = sorted(CLASSES)


def ticket_rows(n: int, seed: int) -> list[dict]:
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        label = NAMES[i % 3]
        words = rnd.sample(CLASSES[label].split(), 3) + rnd.sample(FILLER, 2)
        rnd.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """What the user has after `lorafit train`: their files, the model, the run directory."""
    root = tmp_path_factory.mktemp("fresh-user")
    torch.manual_seed(0)  # the tiny model's random weights (training seeds itself: train.seed)
    splits = {"train": ticket_rows(240, 0), "dev": ticket_rows(30, 1), "test": ticket_rows(30, 2)}
    model_dir = tiny_bert_dir(root, [r for rows in splits.values() for r in rows])  # BertModel: no head yet
    for name, rows in splits.items():
        write_csv(root / f"{name}.csv", rows)
    config = root / "tickets.toml"
    config.write_text(f"""
output_dir = "{root / 'runs' / 'tickets'}"
[model]
name = "{model_dir}"
[data]
train = "{root / 'train.csv'}"
validation = "{root / 'dev.csv'}"
test = "{root / 'test.csv'}"
[task]
type = "classification"
max_length = 32
[lora]
r = 4
lora_alpha = 8
target_modules = ["query", "key", "value", "dense"]
[train]
epochs = 6
batch_size = 8
lr = 1e-2
num_threads = 1
log_every = 5
""")
    assert main(["train", str(config), "--no-progress"]) == 0
    return root, model_dir, root / "runs" / "tickets"


def lorafit_logits(model_dir: Path, adapter_dir: Path, texts: list[str]) -> torch.Tensor:
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir)  # a random 2-class head
    lorafit.load_adapter(model, adapter_dir)  # brings its own 3-class head
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        return model.eval()(**tok(texts, padding=True, return_tensors="pt")).logits


def test_csv_to_predictions_by_class_name(trained, tmp_path, capsys):
    _, model_dir, run = trained
    adapter = run / "adapter"
    # the adapter directory carries its class names, in the head's output order
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                          "labels.json"]
    assert json.loads((adapter / "labels.json").read_text()) == NAMES == lorafit.read_labels(adapter)

    # lorafit eval: the test metrics, and each class by its name
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "test", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["accuracy"] >= 0.9, metrics
    assert list(metrics["per_class"]) == NAMES
    assert sum(c["support"] for c in metrics["per_class"].values()) == 30
    assert metrics["macro_f1"] == pytest.approx(sum(c["f1"] for c in metrics["per_class"].values()) / 3)
    assert main(["eval", str(run), "--split", "test"]) == 0
    table = capsys.readouterr().out
    assert all(any(line.startswith(name + " ") for line in table.splitlines()) for name in NAMES), table

    probes = ticket_rows(6, 4)  # new tickets
    texts = [r["text"] for r in probes]
    ours = lorafit_logits(model_dir, adapter, texts)
    expected = [NAMES[i] for i in ours.argmax(-1).tolist()]
    # it learned, and the names are in the head's order (a permutation of them would get most rows wrong)
    assert sum(e == r["label"] for e, r in zip(expected, probes)) >= 5, (expected, probes)

    # lorafit serve: the adapter directory copied under an adapters folder, as a user deploys it
    adapters = tmp_path / "adapters"
    shutil.copytree(adapter, adapters / "tickets")
    service = build_service(str(model_dir), adapters, limits=Limits(max_wait_ms=5))
    with TestClient(create_app(service)) as client:
        response = client.post("/v1/classify", json={"texts": texts, "adapter": "tickets"})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["label"] for r in results] == expected
    probs = torch.tensor([[r["probabilities"][name] for name in NAMES] for r in results])
    torch.testing.assert_close(probs, ours.softmax(-1), atol=1e-5, rtol=0)

    # PEFT: its one-line load, with the class names from labels.json (PEFT reads no head size from the
    # adapter directory and builds the base's head, so id2label tells it the size and the names)
    from peft import AutoPeftModelForSequenceClassification

    labels = lorafit.read_labels(adapter)
    peft_model = AutoPeftModelForSequenceClassification.from_pretrained(
        adapter, id2label=dict(enumerate(labels))).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        theirs = peft_model(**tok(texts, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert [peft_model.config.id2label[i] for i in theirs.argmax(-1).tolist()] == expected
    # transformers' own loading of an adapter directory takes the same argument
    native = transformers.AutoModelForSequenceClassification.from_pretrained(
        adapter, id2label=dict(enumerate(labels))).eval()
    with torch.no_grad():
        torch.testing.assert_close(native(**tok(texts, padding=True, return_tensors="pt")).logits, ours,
                                   atol=1e-5, rtol=0)

    # lorafit merge: a plain transformers model whose config names the classes
    assert main(["merge", str(run), str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.id2label == dict(enumerate(NAMES))
    with torch.no_grad():
        logits = merged(**tok(texts, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(logits, ours, atol=1e-5, rtol=0)


def test_adapters_saved_without_class_names_still_evaluate(trained, tmp_path, capsys):
    _, _, run = trained
    old = tmp_path / "old-run"
    shutil.copytree(run, old)
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "test", "--json"]) == 0
    with_names = json.loads(capsys.readouterr().out)
    (old / "adapter" / "labels.json").unlink()  # an adapter written before labels.json existed
    assert main(["eval", str(old), "--split", "test", "--json"]) == 0
    from_data_json = json.loads(capsys.readouterr().out)
    assert from_data_json == with_names
    (old / "data.json").unlink()  # nothing saved at all: the training file's labels, as before
    assert main(["eval", str(old), "--split", "test", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == with_names


def test_eval_keeps_the_trained_label_order_when_the_data_changes(trained, tmp_path, capsys):
    """A class added to the training file after training sorts first: read from the data again, every
    output would be misnamed; the saved class names make eval refuse instead."""
    _, _, run = trained
    grown = write_csv(tmp_path / "train.csv", ticket_rows(30, 3) + [{"text": "my account is locked",
                                                                       "label": "account"}])
    for labels_file in (True, False):
        if not labels_file:
            (run / "adapter" / "labels.json").rename(tmp_path / "labels.json")
        try:
            assert main(["eval", str(run), "--set", f"data.train={json.dumps(str(grown))}"]) == 2
        finally:
            if not labels_file:
                (tmp_path / "labels.json").rename(run / "adapter" / "labels.json")
        err = capsys.readouterr().err
        assert "'account'" in err and "not in the label set" in err, err


# -- the Python save_adapter path ------------------------------------------------------


def _classifier(model_dir: Path, id2label: dict | None, task_type: str = "SEQ_CLS"):
    kwargs = {"id2label": id2label} if id2label else {"num_labels": 3}
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, **kwargs)
    lorafit.attach(model, lorafit.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"],
                                             task_type=task_type))
    return model


def test_save_adapter_writes_the_class_names_it_knows(trained, tmp_path):
    _, model_dir, _ = trained
    named = _classifier(model_dir, {0: "cat", 1: "dog", 2: "emu"})
    lorafit.save_adapter(named, tmp_path / "a")
    assert lorafit.read_labels(tmp_path / "a") == ["cat", "dog", "emu"]
    lorafit.save_adapter(named, tmp_path / "b", labels=["x", "y", "z"])  # explicit names win
    assert lorafit.read_labels(tmp_path / "b") == ["x", "y", "z"]
    with pytest.raises(ValueError, match="labels names 2 classes but the classifier head .* has 3 outputs"):
        lorafit.save_adapter(named, tmp_path / "c", labels=["x", "y"])
    with pytest.raises(ValueError, match="labels names a class twice"):
        lorafit.save_adapter(named, tmp_path / "c", labels=["x", "y", "x"])
    assert not (tmp_path / "c").exists()  # refused before anything was written
    # transformers' placeholder names are no class names: nothing to save, and stale names are removed
    lorafit.save_adapter(_classifier(model_dir, None), tmp_path / "a")
    assert lorafit.read_labels(tmp_path / "a") is None and (tmp_path / "a" / "adapter_config.json").is_file()
    # not a sequence classifier: no labels.json even though the config names classes
    lorafit.save_adapter(_classifier(model_dir, {0: "cat", 1: "dog", 2: "emu"}, "FEATURE_EXTRACTION"),
                         tmp_path / "d")
    assert not (tmp_path / "d" / "labels.json").exists()


def test_full_fine_tuning_of_a_model_of_ones_own_saves_the_class_names(trained, tmp_path):
    from lorafit.train import train

    root, model_dir, _ = trained
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3)
    assert model.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    train(root / "tickets.toml", {"output_dir": str(tmp_path / "full"), "train.method": "full", "train.max_steps": 2},
          model=model, tokenizer=transformers.AutoTokenizer.from_pretrained(model_dir), progress=False)
    saved = transformers.AutoConfig.from_pretrained(tmp_path / "full" / "model")
    assert saved.id2label == dict(enumerate(NAMES)) and saved.label2id == {n: i for i, n in enumerate(NAMES)}
