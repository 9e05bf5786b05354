"""layer_replication: ranges of layers repeated (sharing their base weights), each repeat with its own adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorafit
from tests.test_lora_bias import randomize

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 3, 5, 7, 9, 9, 2], [7, 0, 3, 4, 8, 9, 6]])
MAP = [[0, 2], [1, 3]]  # layers 0, 1, 2 become 0, 1, 1, 2


def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def config(**extra):
    return lorafit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], layer_replication=MAP, **extra)


def test_the_repeats_share_the_base_weights_and_run_as_the_deeper_model():
    base = llama()
    model = lorafit.attach(llama(), config())
    layers = model.model.layers
    assert len(layers) == 4 and model.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3]
    # repeats 1 and 2 are layer 1: the same base tensors, each with adapters of its own
    assert layers[1].mlp.up_proj.weight is layers[2].mlp.up_proj.weight
    assert layers[1].self_attn.q_proj.base_layer.weight is layers[2].self_attn.q_proj.base_layer.weight
    assert layers[1].self_attn.q_proj.lora_A["default"] is not layers[2].self_attn.q_proj.lora_A["default"]
    # with B = 0 the model is the base model with layer 1 run twice
    reference = llama()
    reference.model.layers = nn.ModuleList([reference.model.layers[i] for i in (0, 1, 1, 2)])
    reference.config.num_hidden_layers = 4
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)
    # only the adapters train: 4 layers x 2 targets x (A, B)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trained) == 16 and all(".lora_" in n for n in trained)
    # generation with the cache: each repeat keeps its own cache entry
    out = model.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 4)
    lorafit.detach(model, "default")
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=0)


def test_peft_and_lorafit_read_each_others_files_with_the_same_logits(tmp_path):
    ours = lorafit.attach(llama(), config())
    randomize(ours)
    lorafit.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(llama(), tmp_path / "ours")
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=1e-5, atol=1e-5)

    made = peft.get_peft_model(llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                        layer_replication=MAP, init_lora_weights=False))
    made.save_pretrained(tmp_path / "peft")
    loaded = lorafit.load_adapter(llama(), tmp_path / "peft")
    assert lorafit.adapter_configs(loaded)["default"].layer_replication == MAP
    torch.testing.assert_close(logits(loaded), logits(made.eval()), rtol=1e-5, atol=1e-5)


def test_merge_and_unload_gives_each_repeat_its_own_weights_and_merge_is_refused():
    model = lorafit.attach(llama(), config())
    randomize(model)
    want = logits(model)
    with pytest.raises(ValueError, match="layers are repeated .* share their base weights"):
        lorafit.merge(model)
    plain = lorafit.merge_and_unload(copy.deepcopy(model))
    assert len(plain.model.layers) == 4 and plain.config.num_hidden_layers == 4
    assert plain.model.layers[1].mlp.up_proj.weight is not plain.model.layers[2].mlp.up_proj.weight
    torch.testing.assert_close(plain.model.layers[1].mlp.up_proj.weight, plain.model.layers[2].mlp.up_proj.weight)
    assert not torch.equal(plain.model.layers[1].self_attn.q_proj.weight, plain.model.layers[2].self_attn.q_proj.weight)
    torch.testing.assert_close(logits(plain), want, rtol=1e-5, atol=1e-5)
    # the merged model is an ordinary 4-layer model: it saves and reloads as one
    assert len({id(p) for p in plain.parameters()}) == len(list(plain.named_parameters()))


def test_adapters_on_repeated_layers_must_agree_and_per_row_batches_work():
    model = lorafit.attach(llama(), config(), name="a")
    lorafit.attach(model, config(), name="b")
    randomize(model)
    with pytest.raises(ValueError, match=r"layers are repeated as \[\[0, 2\], \[1, 3\]\] .* needs the same"):
        lorafit.attach(model, lorafit.LoraConfig(target_modules=["q_proj"]), name="c")
    with pytest.raises(ValueError, match=r"already repeated as \[\[0, 2\], \[1, 3\]\], not \[\[0, 3\]\]"):
        lorafit.attach(model, lorafit.LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 3]]), name="c")
    want = []
    for name in ("a", "b"):
        lorafit.set_active(model, name)
        want.append(logits(model)[:1])
    with lorafit.adapter_per_row(model, ["a", "b"]):
        got = logits(model, IDS[:1].repeat(2, 1))
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-5, atol=1e-5)
    lorafit.detach(model, "a")
    assert len(model.model.layers) == 4  # "b" still needs them
    lorafit.unload(model)
    assert len(model.model.layers) == 3 and all(p.requires_grad for p in model.parameters())
    other = lorafit.attach(llama(), lorafit.LoraConfig(target_modules=["q_proj"]), name="plain")
    with pytest.raises(ValueError, match="adapters without it are attached"):
        lorafit.attach(other, config(), name="late")
    assert len(other.model.layers) == 3


def test_bad_maps_name_the_field():
    with pytest.raises(ValueError, match="layer_replication must be a non-empty list of \\[start, end\\]"):
        lorafit.LoraConfig(layer_replication=[[2, 1]])
    model = llama()
    with pytest.raises(ValueError, match=r"\[0, 9\] goes past the model's 3 layers"):
        lorafit.attach(model, lorafit.LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 9]]))
    # a refusal after repeating puts the layers back
    with pytest.raises(ValueError, match="matched no adaptable module"):
        lorafit.attach(model, lorafit.LoraConfig(target_modules=["nothing"], layer_replication=MAP))
    assert len(model.model.layers) == 3 and not lorafit.adapter_configs(model)


def test_lorafit_train_and_merge_write_the_deeper_model(tmp_path):
    from lorafit.train import merge, train
    from tests.test_train_support import instruction_setup

    config = instruction_setup(tmp_path, 16, lora='r = 4\nlora_alpha = 8\ntarget_modules = ["q_proj", "v_proj"]\n'
                                                  'layer_replication = [[0, 2], [1, 2]]',
                               train="epochs = 1\nbatch_size = 8\nlr = 1e-2")
    result = train(config, {"train.num_threads": 1}, progress=False)
    out = merge(tmp_path / "run", tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.config.num_hidden_layers == 3 and len(merged.model.layers) == 3
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    torch.testing.assert_close(logits(merged, ids), logits(result.model.eval(), ids), rtol=1e-5, atol=1e-5)
