"""`model.quantize`: LoRA training on an NF4 / int8 frozen base (QLoRA) from the run config."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_train_support import classification_setup

pytest.importorskip("transformers")

import lorafit
from lorafit.layers import LoraLayer
from lorafit.quantize import QuantizedLinear
from lorafit.train import evaluate, merge, train
from lorafit.train.config import load_config
from lorafit.train.run import load_run


@pytest.mark.parametrize("bits", [4, 8])
def test_lora_on_a_quantized_base_trains_and_reloads_on_the_same_base(tmp_path, bits):
    config = classification_setup(tmp_path)
    summary = train(config, [f"model.quantize={bits}"], progress=False)
    run = tmp_path / "run"
    assert summary["best"]["value"] >= 0.75  # it learns through the dequantized weights

    prep = load_run(run, None, None)
    base = {n: type(m.base_layer) for n, m in prep.model.named_modules() if isinstance(m, LoraLayer)}
    assert base and all(t is QuantizedLinear for t in base.values()), base  # every adapted layer has an NF4/int8 base
    assert all(q.bits == bits for q in prep.model.modules() if isinstance(q, QuantizedLinear))
    head = prep.model.classifier  # the new head trains in full precision, never quantized
    assert all(type(m) is torch.nn.Linear for m in (head.original_module, *head.modules_to_save.values()))
    # a quantized weight is still a weight of the model: the counts are those of the float model
    float_model = load_run(run, ["model.quantize=0"], None).model
    assert summary["params"]["total"] == lorafit.trainable_parameters(float_model).total
    assert summary["params"]["total"] == lorafit.trainable_parameters(prep.model).total
    # the adapter file holds float factors and the head only; nothing of the quantized base
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["classifier"]

    # `lorafit eval` quantizes the base the same way, so it reproduces the run's numbers ...
    again = evaluate(run, "validation")
    assert again["eval_loss"] == pytest.approx(summary["validation"]["eval_loss"], abs=1e-5)
    assert again["accuracy"] == pytest.approx(summary["validation"]["accuracy"])
    # ... and on the float base the same adapter gives other logits (the quantization was in effect)
    float_base = evaluate(run, "validation", overrides=["model.quantize=0"])
    assert float_base["eval_loss"] != pytest.approx(summary["validation"]["eval_loss"], abs=1e-5)

    # `lorafit merge`: a plain float model (dequantized base + adapter) with the same logits
    transformers = pytest.importorskip("transformers")
    merged_dir = merge(run, tmp_path / "merged")
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    assert not any(isinstance(m, (LoraLayer, QuantizedLinear)) for m in merged.modules())
    batch = {"input_ids": torch.tensor([[2, 5, 6, 7, 3], [2, 8, 9, 3, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])}
    prep.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, prep.model(**batch).logits, atol=1e-5, rtol=0)


def test_quantize_is_checked_before_anything_is_written(tmp_path):
    config = classification_setup(tmp_path)
    with pytest.raises(ValueError, match=r"model.quantize must be 0 \(no quantization\), 4 \(NF4\) or 8"):
        load_config(config, ["model.quantize=3"])
    with pytest.raises(ValueError, match=r"model.quantize = 4 quantizes the frozen base under LoRA; train.method "
                                         r"'full'.*needs model.quantize = 0"):
        load_config(config, ["model.quantize=4", "train.method=full"])
    with pytest.raises(ValueError, match=r"model.quantize must be an integer"):
        load_config(config, ["model.quantize=nf4"])
    with pytest.raises(ValueError, match="model.quantize"):
        train(config, ["model.quantize=4", "train.method=full"], progress=False)
    assert not (tmp_path / "run").exists()
