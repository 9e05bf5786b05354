"""Arrow routing (lorafit.arrow_routing): PEFT's create_arrow_model logits, with and without GenKnowSub; experts of
different ranks against the per-token formula; the adapters left as they were; the refusals."""

from __future__ import annotations

import pytest
import torch

import lorafit
from tests.models import randomize_adapters, tiny_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def llama():
    return tiny_llama()


def ids():
    return torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(3))


def logits(model):
    with torch.no_grad():
        return model(input_ids=ids()).logits


def experts(tmp_path, names, r=4, alphas=None):
    """Random adapters saved to tmp_path/<name>; returns their directories."""
    dirs = []
    for i, name in enumerate(names):
        model = lorafit.attach(llama(), lorafit.LoraConfig(r=r, lora_alpha=(alphas or {}).get(name, 8),
                                                           target_modules=TARGETS))
        torch.manual_seed(100 + i)
        randomize_adapters(model, 0.3)
        dirs.append(lorafit.save_adapter(model, tmp_path / name))
    return dirs


def loaded(dirs, names):
    model = llama()
    for name, path in zip(names, dirs):
        lorafit.load_adapter(model, path, name)
    return model


@pytest.fixture
def converged_peft_prototypes(monkeypatch):
    """PEFT takes each prototype from 15 power iterations from a random start; run them to convergence so its
    prototypes are the exact singular vectors lorafit computes."""
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    original = ArrowLoraLinearLayer.top_right_singular_vec_from_BA
    monkeypatch.setattr(ArrowLoraLinearLayer, "top_right_singular_vec_from_BA",
                        lambda self, A, B, iters=15, eps=1e-8: original(self, A, B, iters=3000, eps=eps))


@pytest.mark.parametrize("top_k,temperature", [(2, 1.0), (1, 1.0), (3, 0.3)])
def test_same_logits_as_peft(tmp_path, converged_peft_prototypes, top_k, temperature):
    from peft.tuners.lora import ArrowConfig, create_arrow_model

    names = ["e0", "e1", "e2"]
    dirs = experts(tmp_path, names, alphas={"e1": 16})
    theirs = create_arrow_model(llama(), [str(d) for d in dirs],
                                ArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=0))
    model = loaded(dirs, names)
    lorafit.set_active(model, ["e0"])
    plain = logits(model)
    with lorafit.arrow_routing(model, names, top_k=top_k, temperature=temperature):
        ours = logits(model)
    torch.testing.assert_close(ours, logits(theirs), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-3)
    torch.testing.assert_close(logits(model), plain)  # the block's end puts the layers back


def test_genknowsub_same_logits_as_peft_and_adapters_untouched(tmp_path, converged_peft_prototypes):
    from peft.tuners.lora import ArrowConfig, create_arrow_model

    names, general = ["e0", "e1", "e2"], ["g0", "g1"]
    dirs = experts(tmp_path, names + general)
    theirs = create_arrow_model(llama(), [str(d) for d in dirs[:3]], ArrowConfig(top_k=2, use_gks=True, rng_seed=0),
                                general_adapter_paths=[str(d) for d in dirs[3:]])
    model = loaded(dirs, names + general)
    before = {n: p.clone() for n, p in model.named_parameters() if ".lora_" in n}
    with lorafit.arrow_routing(model, names, top_k=2, general=general):
        ours = logits(model)
    torch.testing.assert_close(ours, logits(theirs), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if ".lora_" in n)


def test_experts_of_different_ranks_follow_the_formula(tmp_path):
    dirs = experts(tmp_path, ["small"], r=2) + experts(tmp_path, ["large"], r=6)
    model = loaded(dirs, ["small", "large"])
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(5, 32)
    with torch.no_grad(), lorafit.arrow_routing(model, ["small", "large"], top_k=1):
        got = layer(x)
    with torch.no_grad():
        want = layer.base_layer(x)
        for t in range(5):  # each token takes the expert whose top input direction it is most along
            best, term = None, None
            for n in ("small", "large"):
                delta = layer.scaling[n] * layer.lora_B[n] @ layer.lora_A[n]
                v = torch.linalg.svd(delta)[2][0]
                if best is None or abs(v @ x[t]) > best:
                    best, term = abs(v @ x[t]), delta @ x[t]
            want[t] += term
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_refusals(tmp_path):
    dirs = experts(tmp_path, ["e0", "e1"])
    model = loaded(dirs, ["e0", "e1"])
    with pytest.raises(ValueError, match="top_k must be an integer from 1 to the number of experts \\(2\\), got 3"):
        with lorafit.arrow_routing(model, ["e0", "e1"], top_k=3):
            pass
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        with lorafit.arrow_routing(model, ["e0", "nope"]):
            pass
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        with lorafit.arrow_routing(model, ["e0", "e1"], temperature=0):
            pass
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["q_proj"]), "only_q")
    with pytest.raises(ValueError, match="v_proj: adapters \\['e0', 'e1'\\] adapt it and \\['only_q'\\] do not"):
        with lorafit.arrow_routing(model, ["e0", "e1", "only_q"], top_k=1):
            pass
    with pytest.raises(ValueError, match="GenKnowSub subtracts .* same rank here \\(got ranks \\[2, 4\\]\\)"):
        other = experts(tmp_path / "r2", ["g"], r=2)
        lorafit.load_adapter(model, other[0], "g")
        with lorafit.arrow_routing(model, ["e0", "e1"], top_k=1, general=["g"]):
            pass
    lorafit.set_active(model, ["e0"])
    lorafit.merge(model)
    with pytest.raises(ValueError, match="adapters \\['e0'\\] are merged into its weight"):
        with lorafit.arrow_routing(model, ["e0", "e1"], top_k=1):
            pass


def test_stacks_are_kept_until_a_factor_changes(tmp_path):
    dirs = experts(tmp_path, ["e0", "e1"])
    model = loaded(dirs, ["e0", "e1"])
    layer = model.model.layers[1].mlp.down_proj
    with lorafit.arrow_routing(model, ["e0", "e1"], top_k=1):
        first = logits(model)
    stacks = layer.__dict__["_lorafit_arrow_stacks"][1]
    with lorafit.arrow_routing(model, ["e0", "e1"], top_k=1):
        torch.testing.assert_close(logits(model), first, rtol=0, atol=0)
    assert layer.__dict__["_lorafit_arrow_stacks"][1] is stacks
    with torch.no_grad():
        layer.lora_B["e1"].mul_(2)  # an in-place change: the next block stacks again
    with lorafit.arrow_routing(model, ["e0", "e1"], top_k=1):
        changed = logits(model)
    assert layer.__dict__["_lorafit_arrow_stacks"][1] is not stacks
    assert not torch.allclose(changed, first)
