"""PEFT's AdaLoRA files load in lorafit as the LoRA they compute: the logits PEFT gives for the same file,
and saved again as a LoRA file, the same logits in PEFT."""

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

CASES = {  # name: (model, AdaLoRA options)
    "llama": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    # Conv1D, weights stored (in, out)
    "gpt2": ("gpt2", dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "bert": ("bert", dict(target_modules=["query", "value"], task_type="SEQ_CLS")),  # the classifier saved whole
    # the adapted modules' biases saved too, the pruned module's included (under PEFT's wrapper's name)
    "bert, bias lora_only": ("bert", dict(target_modules=["query", "value"], bias="lora_only")),
}


def trained_adalora_file(case: str, directory, init_r: int = 6) -> None:
    """An AdaLoRA adapter as PEFT saves one after its rank allocation: random factors and singular values,
    each module keeping some of its init_r rows (one module none, one all of them)."""
    arch, options = CASES[case]
    base = build(arch)
    config = peft.AdaLoraConfig(init_r=init_r, target_r=2, total_step=10, lora_alpha=12, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    layers = [name for name, m in model.base_model.model.named_modules() if hasattr(m, "lora_E")]
    kept = [[bool(torch.rand(1, generator=g) < 0.6) for _ in range(init_r)] for _ in layers]
    kept[0], kept[-1] = [False] * init_r, [True] * init_r
    model.peft_config["default"].rank_pattern = {f"{n}.lora_E.default": k for n, k in zip(layers, kept)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the zero-sized tensors of the module that kept no rows
        model.save_pretrained(directory)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adalora_file_gives_peft_s_outputs_and_saves_as_a_lora_peft_reads(case, tmp_path):
    arch, options = CASES[case]
    trained_adalora_file(case, tmp_path / "adalora")
    ranks = {k: t.shape[0] for k, t in load_file(tmp_path / "adalora" / WEIGHTS_NAME).items()
             if k.endswith(".lora_A")}
    assert 0 in ranks.values() and 6 in ranks.values() and len(set(ranks.values())) > 2, ranks
    inputs = inputs_for(arch)
    base_out = outputs(build(arch), inputs)
    want = outputs(peft_load(build(arch), tmp_path / "adalora"), inputs)
    assert_changes_output(want, base_out)

    model = build(arch)
    with pytest.warns(UserWarning, match="AdaLoRA adapter, loaded as the plain LoRA"):
        lorafit.load_adapter(model, tmp_path / "adalora")
    torch.testing.assert_close(outputs(model, inputs), want, atol=ATOL, rtol=0)
    config = lorafit.adapter_configs(model)["default"]
    pruned_ones_kept = "bias" in options  # with their biases, as rank-1 zeros
    assert len(config.target_modules) == sum(1 for r in ranks.values() if r > 0 or pruned_ones_kept)

    lorafit.save_adapter(model, tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / CONFIG_NAME).read_text())["peft_type"] == "LORA"
    torch.testing.assert_close(outputs(peft_load(build(arch), tmp_path / "lora"), inputs), want, atol=ATOL, rtol=0)
    merged = lorafit.merge_and_unload(model)
    torch.testing.assert_close(outputs(merged, inputs), want, atol=ATOL, rtol=0)


def test_an_adalora_file_missing_a_factor_names_it_and_leaves_the_model_alone(tmp_path):
    directory = tmp_path / "adalora"
    trained_adalora_file("llama", directory)
    tensors = load_file(directory / WEIGHTS_NAME)
    gone = next(k for k, t in tensors.items() if k.endswith(".lora_E") and t.shape[0])
    del tensors[gone]
    save_file(tensors, directory / WEIGHTS_NAME)
    model = build("llama")
    with pytest.raises(ValueError, match=f"has no {gone.replace('.', '[.]')} tensor"):
        lorafit.load_adapter(model, directory)
    assert not lorafit.adapter_configs(model)


def test_an_adalora_file_pruned_to_nothing_is_refused(tmp_path):
    directory = tmp_path / "adalora"
    trained_adalora_file("llama", directory)
    tensors = {k: t[:0] if k.endswith((".lora_A", ".lora_E")) else t[:, :0] for k, t in
               load_file(directory / WEIGHTS_NAME).items()}
    save_file(tensors, directory / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="pruned every module to rank 0"):
        lorafit.read_adapter(directory)


def test_an_adalora_file_for_a_conv2d_layer_loads_its_flat_factors_in_the_kernel_s_shape(tmp_path):
    """AdaLoRA keeps a Conv2d layer's A as (r, in * kh * kw), where a LoRA file holds (r, in, kh, kw); PEFT
    reshapes B A to the kernel, so the factors load reshaped, to PEFT's outputs."""
    def build_conv():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Flatten(),
                                   torch.nn.Linear(8 * 6 * 6, 4)).eval()

    model = peft.get_peft_model(build_conv(), peft.AdaLoraConfig(init_r=4, total_step=10, target_modules=["0"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "adalora")
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        want = peft_load(build_conv(), tmp_path / "adalora")(x)
        base_out = build_conv()(x)
    ours = build_conv()
    with pytest.warns(UserWarning, match="AdaLoRA adapter"):
        lorafit.load_adapter(ours, tmp_path / "adalora")
    assert_changes_output(want, base_out)
    assert ours[0].lora_A["default"].shape == (4, 4, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), want, atol=ATOL, rtol=0)


def test_lorafit_convert_writes_the_lora_an_adalora_file_computes(tmp_path, capsys):
    """`lorafit convert` (no base model needed): a LoRA file PEFT reads to PEFT's logits for the AdaLoRA file;
    --dtype casts the tensors; an adapter already in OUT stays unless --overwrite."""
    from lorafit.cli import main

    trained_adalora_file("bert", tmp_path / "adalora")
    inputs = inputs_for("bert")
    want = outputs(peft_load(build("bert"), tmp_path / "adalora"), inputs)
    with pytest.warns(UserWarning, match="AdaLoRA adapter"):
        assert main(["convert", str(tmp_path / "adalora"), str(tmp_path / "lora")]) == 0
    assert "a LoRA adapter (r=6)" in capsys.readouterr().out
    assert json.loads((tmp_path / "lora" / CONFIG_NAME).read_text())["peft_type"] == "LORA"
    torch.testing.assert_close(outputs(peft_load(build("bert"), tmp_path / "lora"), inputs), want, atol=ATOL, rtol=0)

    before = (tmp_path / "lora" / WEIGHTS_NAME).read_bytes()
    with pytest.warns(UserWarning, match="AdaLoRA adapter"):
        assert main(["convert", str(tmp_path / "adalora"), str(tmp_path / "lora"), "--dtype", "bfloat16"]) == 2
    assert "already holds an adapter; --overwrite replaces it" in capsys.readouterr().err
    assert (tmp_path / "lora" / WEIGHTS_NAME).read_bytes() == before
    assert main(["convert", str(tmp_path / "lora"), str(tmp_path / "lora"), "--dtype", "bfloat16"]) == 0
    assert {t.dtype for t in load_file(tmp_path / "lora" / WEIGHTS_NAME).values()} == {torch.bfloat16}
    torch.testing.assert_close(outputs(peft_load(build("bert"), tmp_path / "lora"), inputs), want, atol=0.05,
                               rtol=0.05)


def test_the_serving_registry_lists_and_serves_an_adalora_adapter(tmp_path):
    """`lorafit serve`'s registry: an AdaLoRA directory listed with the rank it loads with (init_r) before it is
    loaded, then served with PEFT's logits."""
    from lorafit.serve.registry import AdapterRegistry

    trained_adalora_file("llama", tmp_path / "adapters" / "ada")
    ids = inputs_for("llama")["input_ids"]
    with torch.no_grad():
        want = peft_load(build("llama"), tmp_path / "adapters" / "ada")(input_ids=ids).logits
    registry = AdapterRegistry(build("llama"), tmp_path / "adapters")
    row = {r["name"]: r for r in registry.describe()}["ada"]
    assert row["rank"] == 6 and row["size_bytes"] > 0 and not row["loaded"]
    with pytest.warns(UserWarning, match="AdaLoRA adapter"):
        entry = registry.acquire("ada")
    try:
        with registry.model_lock, torch.no_grad(), lorafit.adapter_per_row(registry.model, [entry.internal] * 2):
            got = registry.model(input_ids=ids).logits
    finally:
        registry.release(entry)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
