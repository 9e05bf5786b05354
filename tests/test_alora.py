"""aLoRA (alora_invocation_tokens): the adapter applies from the last invocation in each row on, as in PEFT, in
forward, backward and generation, and a base model's cache of the prefix serves it."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lorafit
from tests.models import rows_alone, tiny_llama
from lorafit.alora import last_start

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

INVOCATION = [5, 6]
# the invocation once, twice (the last one counts), at the very end, and not at all
IDS = torch.tensor([[1, 2, 3, 5, 6, 7, 8, 9], [5, 6, 1, 5, 6, 2, 3, 4], [9, 8, 7, 4, 3, 1, 5, 6],
                    [1, 2, 3, 4, 7, 8, 9, 10]])
TARGETS = ["q_proj", "v_proj", "down_proj"]


def llama():
    return tiny_llama()


def peft_alora(tmp_path):
    """A PEFT aLoRA adapter with random factors, saved; and the PEFT model."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, alora_invocation_tokens=INVOCATION,
                             init_lora_weights=False, task_type="CAUSAL_LM")
    model = peft.get_peft_model(llama(), config).eval()
    model.save_pretrained(tmp_path / "peft")
    return model, tmp_path / "peft"


def test_last_start_finds_the_last_occurrence_or_none():
    assert last_start(IDS, torch.tensor(INVOCATION)).tolist() == [3, 3, 6, -1]
    assert last_start(IDS[:, :1], torch.tensor(INVOCATION)).tolist() == [-1] * 4  # shorter than the sequence


def test_same_logits_gradients_and_generation_as_peft(tmp_path):
    theirs, directory = peft_alora(tmp_path)
    ours = lorafit.load_adapter(llama(), directory, trainable=True)
    base = llama()
    with torch.no_grad():
        want, got, plain = theirs(input_ids=IDS).logits, ours(input_ids=IDS).logits, base(input_ids=IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert all(d > 0.01 for d in (got - plain).abs().amax((1, 2)).tolist()[:3])  # the adapter acts where invoked...
    assert torch.equal(got[0, :3], plain[0, :3]) and torch.equal(got[1, :3], plain[1, :3])  # ... from there on
    assert torch.equal(got[2, :6], plain[2, :6]) and torch.equal(got[3], plain[3])  # no invocation: the base

    # gradients, in training mode
    theirs.train()
    ours.train()
    theirs(input_ids=IDS, labels=IDS).loss.backward()
    ours(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n.replace("base_model.model.", "").replace(".default.weight", ""): p.grad
             for n, p in theirs.named_parameters() if p.requires_grad}
    ours_grads = {n.replace(".default", ""): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert grads.keys() == ours_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-5, atol=1e-7)

    # greedy generation with a cache: the new tokens stay on the adapter
    theirs.eval()
    ours.eval()
    rows = IDS[:3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers: no attention mask for an unpadded batch
        want = theirs.generate(input_ids=rows, max_new_tokens=6, do_sample=False)
        got = ours.generate(input_ids=rows, max_new_tokens=6, do_sample=False)
        uncached = ours.generate(input_ids=rows, max_new_tokens=6, do_sample=False, use_cache=False)
        plain = base.generate(input_ids=rows, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want) and torch.equal(uncached, got)
    assert not torch.equal(got, plain)


def test_lorafit_files_load_in_peft_with_the_same_logits(tmp_path):
    model = llama()
    # PEFT finds the invocation in its causal-LM model only, which it picks by task_type
    lorafit.attach(model, lorafit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM",
                                             alora_invocation_tokens=INVOCATION, init_lora_weights=False))
    lorafit.save_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(llama(), tmp_path / "ours").eval()
    assert theirs.peft_config["default"].alora_invocation_tokens == INVOCATION
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, theirs(input_ids=IDS).logits, rtol=0, atol=1e-6)


def test_a_base_model_cache_of_the_prefix_serves_the_adapter():
    """The point of aLoRA: the base model's keys and values for everything before the invocation are the
    adapter's too, so a conversation the base model read is continued on the adapter without reading it again."""
    model = llama()
    lorafit.attach(model, lorafit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                             alora_invocation_tokens=INVOCATION, init_lora_weights=False))
    ids = IDS[:1]
    with torch.no_grad():
        whole = model(input_ids=ids).logits
        with lorafit.disabled(model):
            prefix = model(input_ids=ids[:, :3], use_cache=True)
        rest = model(input_ids=ids[:, 3:], past_key_values=prefix.past_key_values, use_cache=True).logits
    torch.testing.assert_close(rest, whole[:, 3:], rtol=0, atol=1e-5)


def test_without_input_ids_the_adapter_is_off_with_a_warning():
    model = llama()
    reference = copy.deepcopy(model)
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=TARGETS, alora_invocation_tokens=INVOCATION,
                                             init_lora_weights=False))
    embeds = reference.model.embed_tokens(IDS).detach()
    with pytest.warns(UserWarning, match="find their invocation in input_ids, and this forward got none"):
        with torch.no_grad():
            got = model(inputs_embeds=embeds).logits
    with torch.no_grad():
        torch.testing.assert_close(got, reference(inputs_embeds=embeds).logits, rtol=0, atol=0)


@pytest.mark.parametrize("rows", [["a", "b", None, "a"], ["a"] * 4, ["c", "a", "a", "c"]])
def test_adapter_per_row_applies_each_alora_row_from_its_invocation(rows):
    """aLoRA rows (two adapters with other invocations) beside a plain adapter and the base model in one batch:
    each row as alone, the aLoRA ones from their own invocation on."""
    model = llama()
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=TARGETS, alora_invocation_tokens=INVOCATION,
                                             init_lora_weights=False), name="a")
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False), name="b")
    lorafit.attach(model, lorafit.LoraConfig(r=2, target_modules=["q_proj"], alora_invocation_tokens=[3, 4],
                                             init_lora_weights=False), name="c")
    with torch.no_grad():
        with lorafit.adapter_per_row(model, rows):
            mixed = model(input_ids=IDS).logits
        alone = rows_alone(model, rows, lambda k: model(input_ids=IDS[k:k + 1]).logits)
        torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)
        with lorafit.disabled(model):
            plain = model(input_ids=IDS).logits
    for k, name in enumerate(rows):  # before its invocation (row 0: at 3, row 3: none) an aLoRA row is the base
        if name == "a":
            until = {0: 3, 1: 3, 2: 6, 3: 8}[k]
            torch.testing.assert_close(mixed[k, :until], plain[k, :until], rtol=1e-5, atol=1e-5)


def test_refusals_and_detach():
    model = llama()
    weights = {n: p.clone() for n, p in model.named_parameters()}
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=TARGETS, alora_invocation_tokens=INVOCATION,
                                             init_lora_weights=False), name="a")
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=TARGETS), name="b")
    lorafit.set_active(model, ["a", "b"])
    for merge in (lorafit.merge, lorafit.merge_and_unload):
        with pytest.raises(ValueError, match="'a' is an aLoRA adapter.*merged it would apply everywhere; nothing "
                                             "was merged"):
            merge(model)
    assert not lorafit.merged_adapters(model)
    with pytest.raises(ValueError, match=r"adapters \['a'\] are aLoRA adapters.*combine_adapters does not"):
        lorafit.combine_adapters(model, {"a": 1.0, "b": 1.0}, "c")
    with pytest.raises(ValueError, match="model.embed_tokens: alora_invocation_tokens \\(aLoRA\\) is supported for "
                                         "Linear layers, not Embedding"):
        lorafit.attach(model, lorafit.LoraConfig(target_modules=["q_proj", "embed_tokens"],
                                                 alora_invocation_tokens=INVOCATION), name="d")
    for bad, message in (({"alora_invocation_tokens": []}, "alora_invocation_tokens must be a non-empty list"),
                         ({"alora_invocation_tokens": [1, -2]}, "alora_invocation_tokens must be a non-empty list"),
                         ({"alora_invocation_tokens": [1], "use_dora": True}, "not supported with use_dora")):
        with pytest.raises(ValueError, match=message):
            lorafit.LoraConfig(**bad)
    unloaded = lorafit.unload(copy.deepcopy(model))
    assert lorafit.alora.activation(unloaded) is None and not unloaded._forward_pre_hooks
    lorafit.detach(model, "a")
    assert lorafit.alora.activation(model) is None and not model._forward_pre_hooks  # the hook went with it
    lorafit.detach(model, "b")
    assert all(torch.equal(weights[n], p) for n, p in model.named_parameters())


def test_lorafit_train_trains_an_alora_adapter(tmp_path):
    from lorafit.train import evaluate, train
    from tests.test_train_support import instruction_setup

    config = instruction_setup(tmp_path, 32, 8, train="epochs = 2\nbatch_size = 8\nlr = 1e-2\nnum_threads = 1")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "tiny-llama")
    invocation = tokenizer("repeat", add_special_tokens=False)["input_ids"]  # in every row's prompt
    tokens = f"lora.alora_invocation_tokens={invocation}"
    summary = train(config, [tokens, "task.generate_rows=0"], progress=False)
    saved = lorafit.LoraConfig.load(tmp_path / "run" / "adapter" / "adapter_config.json")
    assert saved.alora_invocation_tokens == invocation and saved.task_type == "CAUSAL_LM"
    _, tensors = lorafit.read_adapter(tmp_path / "run" / "adapter")
    assert all(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k)  # it was invoked, so B trained
    assert evaluate(tmp_path / "run", "validation")["eval_loss"] == pytest.approx(
        summary["validation"]["eval_loss"], abs=1e-5)
    with pytest.raises(ValueError, match="task.packing puts several rows into one sequence, and an aLoRA adapter"):
        train(config, [tokens, "task.packing=true"], progress=False)
    with pytest.raises(ValueError, match=r"lora.alora_invocation_tokens = \[49, 48\] appears in none of the first "
                                         r"32 training rows, so the aLoRA adapter would train nothing"):
        train(config, ["lora.alora_invocation_tokens=[49, 48]", "task.generate_rows=0"], progress=False,
              overwrite=True)
    assert lorafit.LoraConfig.load(tmp_path / "run" / "adapter" / "adapter_config.json") == saved  # kept
