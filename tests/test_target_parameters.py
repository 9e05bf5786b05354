"""target_parameters: LoRA on parameters of a module, such as a mixture of experts' stacked expert weights."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from torch import nn

import lorafit
from lorafit.layers import ParameterLora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def mixtral(seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, vocab_size=64, max_position_embeddings=64)
    return transformers.MixtralForCausalLM(config).to(dtype).eval()


def mixtral_for(tok, **extra):
    """A tiny random Mixtral with ``tok``'s vocabulary and special tokens, for lorafit train."""
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None, **extra))


IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def randomize(model, seed: int = 2):
    """Factors with B != 0, so that every adapter changes the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(std=0.2)


def expert_deltas(layer: ParameterLora, name: str = "default") -> torch.Tensor:
    """s B_e A_e per expert, written out index by index from the documented layout, in the parameter's layout."""
    a, b, e, s = layer.factors_a[name], layer.factors_b[name], layer.experts, layer.scaling[name]
    r = a.shape[0] // e
    out = []
    for i in range(e):
        a_i = a[i * r:(i + 1) * r]  # expert i's rows
        b_i = b[:, [k * e + i for k in range(r)]]  # expert i's rank-k columns
        d = s * b_i @ a_i  # (out, in)
        out.append(d.T if layer.transposed else d)
    return torch.stack(out)


def test_each_expert_gets_its_own_low_rank_change():
    model = mixtral()
    lorafit.attach(model, lorafit.LoraConfig(r=2, lora_alpha=4, target_parameters=EXPERTS))
    randomize(model)
    reference = mixtral()  # the same base, its expert weights replaced by W + s B_e A_e
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            down, gate_up = layer.mlp.experts, layer.mlp.experts.base_layer
            assert isinstance(down, ParameterLora) and down.parameter_name == "down_proj"
            assert isinstance(gate_up, ParameterLora) and gate_up.parameter_name == "gate_up_proj"
            experts = reference.model.layers[i].mlp.experts
            experts.gate_up_proj += expert_deltas(gate_up)
            experts.down_proj += expert_deltas(down)
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)
    # only the adapters train; without target_modules nothing else is adapted (not the model type's default)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all(".lora_" in n for n in trainable)
    assert not any(isinstance(m, lorafit.layers.Linear) for m in model.modules())


def _peft_config(**extra):
    return dict(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=EXPERTS, **extra)


def test_peft_and_lorafit_read_each_others_files_and_agree_on_outputs_and_gradients(tmp_path):
    ours = lorafit.attach(mixtral(), lorafit.LoraConfig(**_peft_config()))
    randomize(ours)
    lorafit.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(mixtral(), tmp_path / "ours", is_trainable=True).eval()
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=1e-5, atol=1e-5)
    assert logits(ours).sub(logits(mixtral())).abs().max() > 1e-2

    lorafit_grads, peft_grads = {}, {}
    for model, grads in ((ours, lorafit_grads), (theirs, peft_grads)):
        model(IDS).logits.square().mean().backward()
        for n, p in model.named_parameters():
            if ".lora_" in n:
                key = n.removeprefix("base_model.model.").replace(".default.weight", "")
                grads[key.replace(".default", "")] = p.grad
    assert lorafit_grads.keys() == peft_grads.keys() and len(lorafit_grads) == 12
    for key, grad in lorafit_grads.items():
        assert grad is not None and grad.abs().max() > 0, key
        torch.testing.assert_close(grad, peft_grads[key], rtol=1e-4, atol=1e-6)

    peft_model = peft.get_peft_model(mixtral(), peft.LoraConfig(**_peft_config(init_lora_weights=False)))
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = lorafit.load_adapter(mixtral(), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded), logits(peft_model.eval()), rtol=1e-5, atol=1e-5)
    assert set(lorafit.read_adapter(tmp_path / "peft")[0].target_parameters) == set(EXPERTS)


def test_under_bf16_autocast_the_module_sees_its_parameters_dtype(tmp_path):
    ours = lorafit.attach(mixtral(), lorafit.LoraConfig(**_peft_config()))
    randomize(ours)
    lorafit.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(mixtral(), tmp_path).eval()
    seen = []
    experts = ours.model.layers[0].mlp.experts.owner
    hook = experts.register_forward_pre_hook(lambda m, args: seen.append(m.gate_up_proj.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the same to bf16 rounding (q_proj rounds in its own order)
        torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-2, atol=1e-2)
    hook.remove()
    assert seen == [torch.float32]


def _saved_storages(loss: torch.Tensor) -> set[int]:
    """The storages of every tensor the autograd graph of ``loss`` keeps for backward (as backward gets them)."""
    seen, stack, pointers = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for attr in dir(node):
            if attr.startswith("_saved_"):
                value = getattr(node, attr)
                for t in value if isinstance(value, (tuple, list)) else [value]:
                    if isinstance(t, torch.Tensor):
                        pointers.add(t.untyped_storage().data_ptr())
        stack.extend(n for n, _ in node.next_functions)
    return pointers


def test_backward_forms_w_plus_s_b_a_again_instead_of_keeping_it(monkeypatch):
    made = []
    adapted_weight = ParameterLora.adapted_weight

    def recording(self, names):
        made.append(adapted_weight(self, names))  # held here: no later tensor can reuse its memory
        return made[-1]

    monkeypatch.setattr(ParameterLora, "adapted_weight", recording)
    model = lorafit.attach(mixtral(), lorafit.LoraConfig(r=2, target_parameters=EXPERTS))
    randomize(model)
    grads = []
    for keep in (False, True):
        made.clear()
        # someone else's saved-tensor hooks (activation checkpointing, offloading) decide what is kept: lorafit
        # then leaves the sums to them
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t) if keep else contextlib.nullcontext():
            loss = model(IDS).logits.square().mean()
        sums = {w.untyped_storage().data_ptr() for w in made}
        assert len(made) == 4  # 2 layers x 2 parameters
        kept = sums & _saved_storages(loss)
        assert bool(kept) == keep
        loss.backward()
        # formed again once each, however many expert slices use it; but layer 0's gate_up_proj, whose input needs
        # no gradient (nothing before it trains), keeps only its input and needs no sum in backward
        assert len(made) == (4 if keep else 7)
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        model.zero_grad()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    """transformers' checkpointing (non-reentrant: saved-tensor hooks of its own) recomputes the layers, sums
    included; lorafit then leaves what is kept to it."""
    grads = []
    for checkpointing in (False, True):
        model = lorafit.attach(mixtral(), lorafit.LoraConfig(r=2, target_parameters=EXPERTS)).train()
        randomize(model)
        if checkpointing:
            model.gradient_checkpointing_enable()
        x = model.get_input_embeddings()(IDS).detach().requires_grad_()
        model(inputs_embeds=x).logits.square().mean().backward()
        grads.append([x.grad] + [p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_compiled_blocks_give_the_eager_outputs_and_gradients():
    """train.compile's way (each decoder block under torch.compile; aot_eager traces the graphs and runs eager
    kernels): W + s B A inside the traced block, kept for backward as compiled code keeps it."""
    import copy

    from lorafit.train.models import transformer_blocks

    eager = lorafit.attach(mixtral(), lorafit.LoraConfig(r=2, target_modules=["q_proj"], target_parameters=EXPERTS))
    randomize(eager)
    compiled = copy.deepcopy(eager)
    for block in transformer_blocks(compiled):
        block.compile(backend="aot_eager")
    outs, grads = [], []
    for model in (eager, compiled):
        out = model.train()(IDS).logits
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 12
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_changing_the_factors_between_forward_and_backward_is_refused():
    model = lorafit.attach(mixtral(), lorafit.LoraConfig(r=2, target_parameters=EXPERTS))
    loss = model(IDS).logits.square().mean()
    with torch.no_grad():
        model.model.layers[0].mlp.experts.lora_A["default"].add_(1.0)
    with pytest.raises(RuntimeError, match="'down_proj' were changed in place between forward and backward"):
        loss.backward()


def test_a_saved_adapter_reloads_to_the_same_logits_and_detach_restores_the_model(tmp_path):
    model = lorafit.attach(mixtral(), lorafit.LoraConfig(r=3, target_parameters=EXPERTS,
                                                          rank_pattern={"down_proj": 1}))
    randomize(model)
    assert model.model.layers[0].mlp.experts.rank["default"] == 1
    assert model.model.layers[0].mlp.experts.base_layer.rank["default"] == 3
    lorafit.save_adapter(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert set(config["target_parameters"]) == set(EXPERTS) and config["lora_dropout"] == 0
    fresh = lorafit.load_adapter(mixtral(), tmp_path / "a")
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)
    lorafit.detach(fresh, "default")
    assert type(fresh.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    torch.testing.assert_close(logits(fresh), logits(mixtral()), rtol=0, atol=0)


def test_bf16_merge_unmerge_is_exact_and_disabled_runs_the_base():
    base = mixtral(dtype=torch.bfloat16)
    before = {n: p.clone() for n, p in base.named_parameters()}
    model = lorafit.attach(mixtral(dtype=torch.bfloat16), lorafit.LoraConfig(r=2, target_parameters=EXPERTS))
    randomize(model)
    unmerged = logits(model).float()
    lorafit.merge(model)
    merged = logits(model).float()
    # the merged weight is W + s B A rounded once; unmerged, the module runs on W + s B A rounded once too
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=0)
    with lorafit.disabled(model):
        torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=0)
    lorafit.unmerge(model)
    lorafit.unload(model)
    after = dict(model.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)

    again = lorafit.attach(mixtral(dtype=torch.bfloat16), lorafit.LoraConfig(r=2, target_parameters=EXPERTS))
    randomize(again)
    plain = lorafit.merge_and_unload(again)
    assert not any(isinstance(m, ParameterLora) for m in plain.modules())
    torch.testing.assert_close(logits(plain).float(), unmerged, rtol=0, atol=0)


class Transposed(nn.Module):
    """Experts stored (experts, in, out) for x @ W, as transformers' is_transposed experts keep them, plus a plain
    2-D (out, in) parameter."""

    is_transposed = True

    def __init__(self):
        super().__init__()
        self.experts = nn.Parameter(torch.randn(3, 6, 5))
        self.proj = nn.Parameter(torch.randn(4, 5))

    def forward(self, x):  # x: (3, n, 6), one row block per expert
        return torch.bmm(x, self.experts) @ self.proj.T


def test_transposed_experts_and_2d_parameters_and_peft_agree():
    torch.manual_seed(0)
    base = nn.Sequential(Transposed())
    x = torch.randn(3, 7, 6)
    ours = lorafit.attach(_copy(base), lorafit.LoraConfig(r=2, target_parameters=["experts", "proj"]))
    randomize(ours)
    outer, inner = ours[0], ours[0].base_layer
    assert (outer.parameter_name, inner.parameter_name) == ("proj", "experts")
    assert inner.transposed and inner.factors_a["default"].shape == (6, 6)  # (experts * r, in)
    assert inner.factors_b["default"].shape == (5, 6) and outer.factors_a["default"].shape == (2, 5)
    with torch.no_grad():
        want = torch.bmm(x, base[0].experts + expert_deltas(inner)) @ (base[0].proj + expert_deltas(outer)[0]).T
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)

    theirs = peft.get_peft_model(_copy(base), peft.LoraConfig(r=2, target_parameters=["experts", "proj"]))
    state = lorafit.adapter_state_dict(ours)
    peft.set_peft_model_state_dict(theirs, state)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)


def _copy(module):
    import copy

    return copy.deepcopy(module)


def test_lorafit_train_adapts_expert_weights(tmp_path):
    from tests.test_train_support import instruction_setup

    config = instruction_setup(
        tmp_path, 32, lora=f'r = 4\nlora_alpha = 8\nlora_dropout = 0.0\ntarget_modules = ["q_proj"]\n'
                           f'target_parameters = {json.dumps(EXPERTS)}',
        train="epochs = 3\nbatch_size = 8\nlr = 5e-3\nlog_every = 1")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tiny-llama")
    model = mixtral_for(tok)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    from lorafit.train import train

    result = train(config, {"train.num_threads": 1}, model=model, tokenizer=tok, progress=False)
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if r["type"] == "train"]
    assert losses[-1] < losses[0]
    fresh = transformers.MixtralForCausalLM(model.config)
    fresh.load_state_dict(base)
    fresh = lorafit.load_adapter(fresh.eval(), tmp_path / "run" / "adapter")
    ids = torch.randint(0, len(tok), (2, 9))
    torch.testing.assert_close(logits(fresh, ids), logits(result.model.eval(), ids), rtol=1e-5, atol=1e-5)
    assert logits(fresh, ids).sub(logits(transformers.MixtralForCausalLM(model.config).eval(), ids)).abs().max() > 0


@pytest.mark.parametrize("extra, message", [
    ({"lora_dropout": 0.1}, "lora_dropout must be 0 with target_parameters"),
    ({"use_dora": True}, "use_dora is not supported with target_parameters"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' is not supported with target_parameters"),
    ({"target_parameters": []}, "target_parameters must be a non-empty list"),
])
def test_bad_configs_name_the_field(extra, message):
    with pytest.raises(ValueError, match=message):
        lorafit.LoraConfig(**{"target_parameters": EXPERTS, **extra})


def test_refusals_name_what_is_wrong_and_leave_the_model_as_it_was():
    model = mixtral()
    with pytest.raises(ValueError, match=r"matched no parameter; this model's 3-D parameters include "
                                         r"model.layers.0.mlp.experts.gate_up_proj"):
        lorafit.attach(model, lorafit.LoraConfig(target_parameters=["mlp.experts.nope"]))
    with pytest.raises(ValueError, match="matched by target_modules and by target_parameters or trainable_token"):
        lorafit.attach(model, lorafit.LoraConfig(target_modules=["q_proj"], target_parameters=["q_proj.weight"]))
    lorafit.attach(model, lorafit.LoraConfig(target_parameters=EXPERTS), name="a")
    with pytest.raises(ValueError, match="must all adapt the same parameters"):
        lorafit.attach(model, lorafit.LoraConfig(target_parameters=["mlp.experts.down_proj"]), name="b")
    assert list(lorafit.adapter_configs(model)) == ["a"]
    lorafit.attach(model, lorafit.LoraConfig(target_parameters=EXPERTS), name="b")
    with pytest.raises(ValueError, match=r"adapters \['a'\] use target_parameters"):
        lorafit.combine_adapters(model, {"a": 1.0}, "c")
    with pytest.raises(ValueError, match="a batch with an adapter per row does not support"):
        with lorafit.adapter_per_row(model, ["a", "b"]):
            pass
    lorafit.detach(model, "a")
    lorafit.detach(model, "b")
    torch.testing.assert_close(logits(model), logits(mixtral()), rtol=0, atol=0)
