"""train.neftune_noise_alpha: NEFTune's uniform noise on the input embeddings, in training forwards only."""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lorafit  # noqa: E402
from lorafit.train import evaluate, train  # noqa: E402
from lorafit.train.neftune import add_embedding_noise  # noqa: E402
from tests.test_train_loop import Crash, adapter_tensors, assert_same_tensors, crash_at  # noqa: E402
from tests.test_train_support import classification_setup, instruction_setup  # noqa: E402

NOISY = ["train.neftune_noise_alpha=1", "train.epochs=6", "train.batch_size=4", "train.lr=3e-2", "train.log_every=2",
         "train.save_every=3", "lora.lora_dropout=0"]


def tiny_llama(embed_lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=64)
    model = transformers.LlamaForCausalLM(config)
    if embed_lora:
        lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    return model


@pytest.mark.parametrize("embed_lora", [False, True])
def test_training_forwards_add_uniform_noise_of_alpha_over_sqrt_length_times_width(embed_lora):
    model = tiny_llama(embed_lora)
    embeddings = model.get_input_embeddings()
    ids = torch.randint(0, 64, (8, 50))
    with torch.no_grad():
        clean = embeddings(ids)
        remove = add_embedding_noise(model, alpha=5.0)
        bound = 5.0 / math.sqrt(50 * 32)
        noise = embeddings.train()(ids) - clean
        assert noise.abs().max() <= bound * (1 + 1e-5) and noise.abs().max() > 0.95 * bound
        assert noise.mean().abs() < 0.02 * bound and noise.abs().mean() == pytest.approx(bound / 2, rel=0.02)
        assert torch.equal(embeddings.eval()(ids), clean)  # evaluation and generation: no noise
        remove()
        assert torch.equal(embeddings.train()(ids), clean)


def test_a_neftune_run_learns_evaluates_without_noise_and_resumes_where_it_would_have_ended(tmp_path, capsys):
    config = instruction_setup(tmp_path, 24, 8)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "tiny-llama")
    out_a = f"output_dir={json.dumps(str(tmp_path / 'a'))}"
    summary = train(config, NOISY + [out_a], model=model, tokenizer=tokenizer, progress=False)
    assert "NEFTune: uniform noise of size 1 / sqrt(length x width)" in capsys.readouterr().out
    assert not model.get_input_embeddings()._forward_hooks  # the given model's embeddings as they came
    base = evaluate(tmp_path / "a", base=True)
    assert summary["validation"]["eval_loss"] < base["eval_loss"] - 0.2, (summary["validation"], base)
    # the saved adapter evaluates to the run's numbers: the final evaluation drew no noise
    assert evaluate(tmp_path / "a") == pytest.approx(summary["validation"], rel=1e-5)

    plain = train(config, NOISY + ["train.neftune_noise_alpha=0", f"output_dir={json.dumps(str(tmp_path / 'c'))}"],
                  progress=False)
    assert plain["validation"]["eval_loss"] != pytest.approx(summary["validation"]["eval_loss"], rel=1e-4)

    args = NOISY + [f"output_dir={json.dumps(str(tmp_path / 'b'))}"]
    with pytest.raises(Crash):
        train(config, args, callbacks=(crash_at(7),), progress=False)  # last checkpoint: step 6
    train(config, args, resume=True, progress=False)
    assert_same_tensors(adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b"))


def test_neftune_is_refused_where_it_does_not_apply_naming_the_setting(tmp_path):
    with pytest.raises(ValueError, match=r"train.neftune_noise_alpha is for instruction tuning \(causal_lm, "
                                         r"seq2seq\); task.type is 'classification'"):
        train(classification_setup(tmp_path), ["train.neftune_noise_alpha=5"], progress=False)
    with pytest.raises(ValueError, match="train.neftune_noise_alpha must be a finite number >= 0, got -1.0"):
        train(instruction_setup(tmp_path, 8), ["train.neftune_noise_alpha=-1"], progress=False)
