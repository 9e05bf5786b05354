"""PEFT's LoHa and LoKr adapter files load as the LoRA they compute: PEFT's outputs, on linear layers and on
convolutions (flat and CP factors), and they save as LoRA files that PEFT reads to the same outputs."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

peft = pytest.importorskip("peft")

import lorafit  # noqa: E402
from lorafit.io import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402
from tests.test_peft_interop import ATOL, assert_changes_output, build, inputs_for, outputs, peft_load  # noqa: E402

LLM = ["q_proj", "v_proj", "down_proj"]
CASES = {  # name: (model, PEFT config)
    "loha, rank and alpha patterns": ("llama", lambda: peft.LoHaConfig(
        r=3, alpha=6, target_modules=LLM, rank_pattern={"down_proj": 2},
        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 1})),
    "loha, classifier saved whole": ("bert", lambda: peft.LoHaConfig(
        r=2, alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"])),
    "lokr": ("llama", lambda: peft.LoKrConfig(r=2, alpha=4, target_modules=LLM)),
    "lokr, both decomposed": ("llama", lambda: peft.LoKrConfig(
        r=1, alpha=3, target_modules=LLM, decompose_both=True, decompose_factor=4)),
}


class Convs(torch.nn.Module):
    def __init__(self, groups: int = 1):
        super().__init__()
        self.c2 = torch.nn.Conv2d(4, 6, 3, padding=1, groups=groups)
        self.c1 = torch.nn.Conv1d(4, 6, 3, stride=2)
        self.lin = torch.nn.Linear(24, 36)

    def forward(self, img, seq, x):
        return torch.cat([self.c2(img).flatten(1), self.c1(seq).flatten(1), self.lin(x).flatten(1)], dim=1)


CONV_CASES = {
    "loha, flat kernels": peft.LoHaConfig(r=2, alpha=4, target_modules=["c2", "c1", "lin"]),
    "loha, CP kernels": peft.LoHaConfig(r=2, alpha=4, target_modules=["c2", "c1", "lin"], use_effective_conv2d=True),
    "lokr, whole factors": peft.LoKrConfig(r=4, alpha=8, target_modules=["c2", "c1", "lin"]),
    # not on the Conv1d: PEFT's own CP LoKr fails there (torch.kron of its 4-d kernel)
    "lokr, CP kernels": peft.LoKrConfig(r=1, alpha=2, target_modules=["c2", "lin"], decompose_both=True,
                                        use_effective_conv2d=True),
}


def randomized(model) -> None:
    """Stand-in for training: every factor random (PEFT initialises one of each pair to zero)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def peft_file(base, config, directory) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, config)
        randomized(model)
        model.save_pretrained(directory)


def conv_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 4, 9, generator=g), torch.randn(2, 24, generator=g)


def build_convs(groups: int = 1) -> Convs:
    torch.manual_seed(0)
    return Convs(groups).eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_peft_lycoris_file_gives_peft_s_outputs_and_saves_as_a_lora_peft_reads(case, tmp_path):
    arch, config = CASES[case]
    peft_file(build(arch), config(), tmp_path / "lycoris")
    inputs = inputs_for(arch)
    want = outputs(peft_load(build(arch), tmp_path / "lycoris"), inputs)
    assert_changes_output(want, outputs(build(arch), inputs))

    model = build(arch)
    kind = "LoHa" if "loha" in case else "LoKr"
    with pytest.warns(UserWarning, match=f"a {kind} adapter, loaded as the plain LoRA it computes"):
        lorafit.load_adapter(model, tmp_path / "lycoris")
    torch.testing.assert_close(outputs(model, inputs), want, atol=ATOL, rtol=0)
    for name, layer in lorafit.model.lora_layers(model):
        a = layer.lora_A["default"]
        assert a.shape[0] < min(layer.base_layer.weight.shape), (name, a.shape)  # a low-rank form, not a copy

    lorafit.save_adapter(model, tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / CONFIG_NAME).read_text())["peft_type"] == "LORA"
    torch.testing.assert_close(outputs(peft_load(build(arch), tmp_path / "lora"), inputs), want, atol=ATOL, rtol=0)
    torch.testing.assert_close(outputs(lorafit.merge_and_unload(model), inputs), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_lycoris_convolutions_load_to_peft_s_outputs_and_save_in_lora_s_kernel_layout(case, tmp_path):
    """Conv2d and Conv1d with flat and CP kernels, whole and low-rank LoKr factors (and PEFT's Conv1d LoKr, whose
    change is not a Kronecker product of matrices); where the low-rank form would exceed the layer, B A is the
    change beside an identity."""
    peft_file(build_convs(), CONV_CASES[case], tmp_path / "lycoris")
    x = conv_inputs()
    with torch.no_grad():
        want = peft_load(build_convs(), tmp_path / "lycoris")(*x)
        assert_changes_output(want, build_convs()(*x))
    model = build_convs()
    with pytest.warns(UserWarning, match="loaded as the plain LoRA it computes"):
        lorafit.load_adapter(model, tmp_path / "lycoris")
    assert model.c2.lora_A["default"].dim() == 4 and model.c2.lora_B["default"].dim() == 4
    with torch.no_grad():
        torch.testing.assert_close(model(*x), want, atol=ATOL, rtol=0)
    lorafit.save_adapter(model, tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(peft_load(build_convs(), tmp_path / "lora")(*x), want, atol=ATOL, rtol=0)
        lorafit.merge(model)
        torch.testing.assert_close(model(*x), want, atol=ATOL, rtol=0)


def test_a_lycoris_file_on_a_grouped_convolution_is_refused_and_leaves_the_model_alone(tmp_path):
    peft_file(build_convs(groups=2), peft.LoHaConfig(r=2, target_modules=["c2"]), tmp_path / "loha")
    model = build_convs(groups=2)
    with pytest.warns(UserWarning, match="LoHa adapter"), \
            pytest.raises(ValueError, match=r"'base_model.model.c2.lora_A.weight' of shape \[4, 18\] is a flat factor "
                                            r"of a grouped convolution's kernel \(the model needs \[4, 4, 3, 3\]\)"):
        lorafit.load_adapter(model, tmp_path / "loha")
    assert not lorafit.adapter_configs(model) and type(model.c2) is torch.nn.Conv2d


def test_a_lycoris_file_missing_a_factor_or_with_mismatched_ones_names_the_module(tmp_path):
    peft_file(build("llama"), CASES["loha, rank and alpha patterns"][1](), tmp_path / "loha")
    tensors = load_file(tmp_path / "loha" / WEIGHTS_NAME)
    gone = "base_model.model.model.layers.0.self_attn.v_proj.hada_w2_b"
    save_file({k: t for k, t in tensors.items() if k != gone}, tmp_path / "loha" / WEIGHTS_NAME)
    model = build("llama")
    with pytest.raises(ValueError, match=r"module 'model.layers.0.self_attn.v_proj' has no hada_w2_b tensor"):
        lorafit.load_adapter(model, tmp_path / "loha")
    assert not lorafit.adapter_configs(model)

    tensors[gone] = tensors[gone][:, :5].clone()
    save_file(tensors, tmp_path / "loha" / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"v_proj': its two LoHa products have different shapes \(16 x 32 and "
                                         r"16 x 5\)"):
        lorafit.read_adapter(tmp_path / "loha")


def test_a_bfloat16_lycoris_file_loads_as_bfloat16_factors_computed_in_float32(tmp_path):
    peft_file(build("llama"), CASES["lokr"][1](), tmp_path / "lokr")
    tensors = load_file(tmp_path / "lokr" / WEIGHTS_NAME)
    save_file({k: t.bfloat16() for k, t in tensors.items()}, tmp_path / "lokr" / WEIGHTS_NAME)
    with pytest.warns(UserWarning, match="LoKr adapter"):
        _, lora = lorafit.read_adapter(tmp_path / "lokr")
    assert {t.dtype for t in lora.values()} == {torch.bfloat16}
    # PEFT's change from the same bf16 values, in a float32 model
    layers = dict(peft_load(build("llama"), tmp_path / "lokr").get_base_model().named_modules())
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        want = layers[name].get_delta_weight("default")
        key = f"base_model.model.{name}"
        got = lora[f"{key}.lora_B.weight"].float() @ lora[f"{key}.lora_A.weight"].float()
        torch.testing.assert_close(got, want, atol=0.02 * want.abs().max().item(), rtol=0)


def test_lorafit_convert_and_the_serving_registry_take_a_lycoris_directory(tmp_path, capsys):
    """`lorafit convert` writes the LoRA a LoKr file computes (PEFT reads it to the LoKr file's logits) without
    a model; `lorafit serve`'s registry lists it (its rank as a LoRA unknown until loaded) and serves it."""
    from lorafit.cli import main
    from lorafit.serve.registry import AdapterRegistry

    peft_file(build("llama"), CASES["lokr"][1](), tmp_path / "adapters" / "lokr")
    inputs = inputs_for("llama")
    want = outputs(peft_load(build("llama"), tmp_path / "adapters" / "lokr"), inputs)
    with pytest.warns(UserWarning, match="LoKr adapter"):
        assert main(["convert", str(tmp_path / "adapters" / "lokr"), str(tmp_path / "lora")]) == 0
    assert "a LoRA adapter" in capsys.readouterr().out
    torch.testing.assert_close(outputs(peft_load(build("llama"), tmp_path / "lora"), inputs), want, atol=ATOL,
                               rtol=0)

    registry = AdapterRegistry(build("llama"), tmp_path / "adapters")
    row = {r["name"]: r for r in registry.describe()}["lokr"]
    assert row["rank"] is None and row["size_bytes"] > 0 and not row["loaded"]
    with pytest.warns(UserWarning, match="LoKr adapter"):
        entry = registry.acquire("lokr")
    try:
        with registry.model_lock, torch.no_grad(), lorafit.adapter_per_row(registry.model, [entry.internal] * 2):
            got = registry.model(**inputs).logits
    finally:
        registry.release(entry)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert {r["name"]: r for r in registry.describe()}["lokr"]["rank"] > 0


def test_a_loaded_lokr_adapter_truncates_to_a_smaller_rank_with_combine_adapters(tmp_path):
    """The README's way to a smaller file: the best rank-k approximation of the exact (larger) LoRA."""
    peft_file(build("llama"), CASES["lokr"][1](), tmp_path / "lokr")
    model = build("llama")
    with pytest.warns(UserWarning, match="LoKr adapter"):
        lorafit.load_adapter(model, tmp_path / "lokr", "lokr")
    full = max(layer.lora_A["lokr"].shape[0] for _, layer in lorafit.model.lora_layers(model))
    errors = lorafit.combine_adapters(model, {"lokr": 1.0}, "small", method="svd", rank=2)
    assert full > 2 and all(layer.lora_A["small"].shape[0] == 2 for _, layer in lorafit.model.lora_layers(model))
    assert errors and all(0 < e < 1 for e in errors.values())
