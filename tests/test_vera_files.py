"""PEFT's VeRA adapter files load as the LoRA they compute: PEFT's outputs on layers of different widths, on
GPT-2's Conv1D with trained biases and on a classifier; they save as LoRA files that PEFT reads to the same
outputs, merge, hot-swap and serve; what the file cannot say is refused."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

peft = pytest.importorskip("peft")

import lorafit  # noqa: E402
from lorafit import vera  # noqa: E402
from lorafit.io import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402
from tests.test_peft_interop import ATOL, assert_changes_output, build, inputs_for, outputs, peft_load  # noqa: E402

VERA_WARNING = "a VeRA adapter, loaded as the plain LoRA it computes"
CASES = {  # name: (model, PEFT config); the tiny Llama's q_proj is 32 x 32, v_proj 16 x 32, down_proj 32 x 64
    "llama, layers of three shapes": ("llama", lambda: peft.VeraConfig(
        r=8, target_modules=["q_proj", "v_proj", "down_proj"], projection_prng_key=3)),
    "llama, r above some layers' sizes": ("llama", lambda: peft.VeraConfig(
        r=40, target_modules=["v_proj", "up_proj"])),
    "gpt2 Conv1D, with their biases": ("gpt2", lambda: peft.VeraConfig(
        r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, bias="vera_only")),
    "bert, classifier saved whole": ("bert", lambda: peft.VeraConfig(
        r=6, target_modules=["query", "value", "output.dense"], modules_to_save=["classifier"])),
}


def randomized(model, seed: int = 5) -> None:
    """Stand-in for training: every trained tensor random (PEFT starts b at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def vera_file(arch: str, config, directory, seed: int = 5) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(build(arch), config)
        randomized(model, seed)
        model.save_pretrained(directory)


def load_vera(model, directory, name: str = "default"):
    with pytest.warns(UserWarning, match=VERA_WARNING):
        return lorafit.load_adapter(model, directory, name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_peft_vera_file_gives_peft_s_outputs_and_saves_as_a_lora_peft_reads(case, tmp_path):
    arch, config = CASES[case]
    vera_file(arch, config(), tmp_path / "vera")
    inputs = inputs_for(arch)
    want = outputs(peft_load(build(arch), tmp_path / "vera"), inputs)
    assert_changes_output(want, outputs(build(arch), inputs))

    model = load_vera(build(arch), tmp_path / "vera")
    torch.testing.assert_close(outputs(model, inputs), want, atol=ATOL, rtol=0)
    for name, layer in lorafit.model.lora_layers(model):
        weight = layer.base_layer.weight
        d_in = weight.shape[0] if config().fan_in_fan_out else weight.shape[1]
        assert layer.lora_A["default"].shape == (config().r, d_in), name  # cut to the layer's own width

    lorafit.save_adapter(model, tmp_path / "lora")
    saved = json.loads((tmp_path / "lora" / CONFIG_NAME).read_text())
    assert saved["peft_type"] == "LORA" and saved["lora_alpha"] == saved["r"] == config().r
    assert vera.SHARED_A not in load_file(tmp_path / "lora" / WEIGHTS_NAME)
    torch.testing.assert_close(outputs(peft_load(build(arch), tmp_path / "lora"), inputs), want, atol=ATOL, rtol=0)
    torch.testing.assert_close(outputs(lorafit.merge_and_unload(model), inputs), want, atol=ATOL, rtol=0)


def test_the_loaded_factors_are_vera_s_scaled_slices_of_the_shared_projections(tmp_path):
    """B' A' = diag(b) B[:d_out] diag(d) A[:, :d_in], PEFT's own delta weight, module by module."""
    vera_file("llama", CASES["llama, layers of three shapes"][1](), tmp_path / "vera")
    peft_modules = dict(peft_load(build("llama"), tmp_path / "vera").get_base_model().named_modules())
    model = load_vera(build("llama"), tmp_path / "vera")
    for name, layer in lorafit.model.lora_layers(model):
        got = layer.lora_B["default"] @ layer.lora_A["default"]
        torch.testing.assert_close(got, peft_modules[name].get_delta_weight("default"), atol=1e-6, rtol=0)


def test_a_bfloat16_vera_file_loads_as_bfloat16_factors_computed_in_float32(tmp_path):
    vera_file("llama", CASES["llama, layers of three shapes"][1](), tmp_path / "vera")
    tensors = load_file(tmp_path / "vera" / WEIGHTS_NAME)
    save_file({k: t.bfloat16() for k, t in tensors.items()}, tmp_path / "vera" / WEIGHTS_NAME)
    with pytest.warns(UserWarning, match=VERA_WARNING):
        _, lora = lorafit.read_adapter(tmp_path / "vera")
    assert {t.dtype for k, t in lora.items() if k != vera.SHARED_A} == {torch.bfloat16}
    shared = tensors[vera.SHARED_A].bfloat16().float()
    d = tensors["base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_d"].bfloat16().float()
    want = (d[:, None] * shared).bfloat16()  # one rounding, of the float32 product
    assert torch.equal(lora["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"], want)


def test_what_a_vera_file_cannot_say_is_refused_naming_it_and_the_model_is_left_alone(tmp_path):
    arch, config = CASES["llama, layers of three shapes"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(build(arch), peft.VeraConfig(r=8, target_modules=["q_proj"],
                                                                  save_projection=False))
        model.save_pretrained(tmp_path / "unsaved")
    with pytest.raises(ValueError, match=r"unsaved/adapter_config.json: a VeRA adapter saved without its shared "
                                         r"projections .*save_projection=True"):
        lorafit.load_adapter(build(arch), tmp_path / "unsaved")

    vera_file(arch, config(), tmp_path / "narrow")
    tensors = load_file(tmp_path / "narrow" / WEIGHTS_NAME)
    tensors[vera.SHARED_A] = tensors[vera.SHARED_A][:, :40].clone()  # narrower than down_proj's 64 inputs
    save_file(tensors, tmp_path / "narrow" / WEIGHTS_NAME)
    model = build(arch)
    with pytest.warns(UserWarning, match=VERA_WARNING), \
            pytest.raises(ValueError, match=r"tensor 'base_model.model.model.layers.0.mlp.down_proj.lora_A.weight' "
                                            r"has shape \[8, 40\] in the file but the model needs \[8, 64\]"):
        lorafit.load_adapter(model, tmp_path / "narrow")
    assert not lorafit.adapter_configs(model) and type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear

    # without the file's own key asking for the cut, a too-wide A is a LoRA's error as before
    with pytest.warns(UserWarning, match=VERA_WARNING):
        lora_config, lora = lorafit.read_adapter(tmp_path / "narrow")
    del lora[vera.SHARED_A]
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight' has shape \[8, 40\] in the file but the model "
                                         r"needs \[8, 32\]"):
        lorafit.load_adapter_state(build(arch), lora_config, lora)

    tensors = load_file(tmp_path / "narrow" / WEIGHTS_NAME)
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.vera_lambda_d"]
    save_file(tensors, tmp_path / "narrow" / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"module 'model.layers.1.self_attn.v_proj' has no vera_lambda_d tensor"):
        lorafit.read_adapter(tmp_path / "narrow")


def test_lorafit_convert_refuses_a_vera_file_and_inspect_says_what_loading_does(tmp_path, capsys):
    from lorafit.cli import main

    vera_file("llama", CASES["llama, layers of three shapes"][1](), tmp_path / "vera")
    with pytest.warns(UserWarning, match=VERA_WARNING):
        assert main(["convert", str(tmp_path / "vera"), str(tmp_path / "lora")]) != 0
    assert "a VeRA adapter's A factors are its shared projection cut to each layer's input size" in \
        capsys.readouterr().err
    assert not (tmp_path / "lora").exists()
    with pytest.warns(UserWarning, match=VERA_WARNING):
        assert main(["inspect", str(tmp_path / "vera")]) == 0
    out = capsys.readouterr().out
    assert "r: 8  lora_alpha: 8  scale: 1" in out and "loading cuts it to its layer's input size" in out


def test_a_vera_file_hot_swaps_into_a_loaded_one_and_serves_per_row(tmp_path):
    from lorafit.serve.registry import AdapterRegistry

    config = CASES["llama, layers of three shapes"][1]
    vera_file("llama", config(), tmp_path / "adapters" / "one", seed=5)
    vera_file("llama", config(), tmp_path / "adapters" / "two", seed=6)
    inputs = inputs_for("llama")
    want = {name: outputs(peft_load(build("llama"), tmp_path / "adapters" / name), inputs) for name in ("one", "two")}
    assert_changes_output(want["two"], want["one"])

    model = load_vera(build("llama"), tmp_path / "adapters" / "one")
    with pytest.warns(UserWarning, match=VERA_WARNING):
        lorafit.hotswap_adapter(model, tmp_path / "adapters" / "two")
    torch.testing.assert_close(outputs(model, inputs), want["two"], atol=ATOL, rtol=0)

    registry = AdapterRegistry(build("llama"), tmp_path / "adapters")
    assert {r["name"]: r["rank"] for r in registry.describe()} == {"one": 8, "two": 8}
    with pytest.warns(UserWarning, match=VERA_WARNING):
        entries = [registry.acquire("one"), registry.acquire("two")]
    try:
        with registry.model_lock, torch.no_grad(), \
                lorafit.adapter_per_row(registry.model, [entries[0].internal, entries[1].internal]):
            got = registry.model(**inputs).logits
    finally:
        for entry in entries:
            registry.release(entry)
    torch.testing.assert_close(got[0], want["one"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1], want["two"][1], atol=ATOL, rtol=0)
