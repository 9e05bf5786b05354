"""LoRA on a model transformers loaded in 4 or 8 bits with bitsandbytes (QLoRA as most users run it): PEFT's
logits and gradients, files both ways, DoRA, per-row batches, and merge_and_unload to a plain float model."""

from __future__ import annotations

import warnings

import pytest
import torch

import lorafit
from lorafit.quantized_base import dense_dtype, dense_weight, is_bitsandbytes_linear
from tests.models import rows_alone

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.tensor([[1, 5, 9, 13, 2, 40, 7, 3], [4, 4, 8, 30, 21, 11, 6, 49]])


def save_float_llama(directory) -> None:
    """A random Llama whose linear layers split into bitsandbytes' blocks of 64."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("float")
    save_float_llama(directory)
    return directory


def quantized(directory, bits: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    config = (transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype,
                                              bnb_4bit_quant_type="nf4")
              if bits == 4 else transformers.BitsAndBytesConfig(load_in_8bit=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, quantization_config=config,
                                                                  device_map=device, dtype=dtype)
    # train mode: on a CPU bitsandbytes' 4-bit inference path computes in bfloat16 (and repacks the codes), its
    # training path in the compute dtype
    return model.train()


def logits_and_grads(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = model(input_ids=IDS.to(model.device)).logits
    out.float().pow(2).mean().backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:  # PEFT's names: base_model.model.<module>.lora_A.<adapter>.weight
            key = name.removeprefix("base_model.model.").replace(".default.weight", "").replace(".default", "")
            grads[key] = p.grad.clone()
    return out.detach(), grads


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_logits_gradients_and_files_both_ways(float_dir, tmp_path, bits, use_dora):
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, use_dora=use_dora)
    theirs = peft.get_peft_model(quantized(float_dir, bits), peft.LoraConfig(**config))
    expected, expected_grads = logits_and_grads(theirs)
    theirs.save_pretrained(tmp_path / "peft")

    ours = lorafit.load_adapter(quantized(float_dir, bits), tmp_path / "peft", trainable=True)
    layer = ours.model.layers[0].self_attn.q_proj
    assert is_bitsandbytes_linear(layer.base_layer)
    assert layer.lora_A["default"].dtype == torch.float32  # the adapter trains in float32 beside the codes
    got, grads = logits_and_grads(ours)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert grads.keys() == expected_grads.keys() and len(grads) == 2 * 2 * len(TARGETS) * (1 + use_dora / 2)
    for key, grad in grads.items():
        torch.testing.assert_close(grad.view(expected_grads[key].shape), expected_grads[key], rtol=1e-4, atol=1e-6)

    lorafit.save_adapter(ours, tmp_path / "lorafit")
    again = peft.PeftModel.from_pretrained(quantized(float_dir, bits), tmp_path / "lorafit").train()
    torch.testing.assert_close(again(input_ids=IDS).logits.detach(), got, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_is_refused_and_merge_and_unload_gives_the_dequantized_float_model(float_dir, tmp_path, bits):
    model = quantized(float_dir, bits)
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    with torch.no_grad():
        unmerged = model(input_ids=IDS).logits
    with pytest.raises(ValueError, match="quantized base layer.*merge_and_unload"):
        lorafit.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, unmerged)  # nothing half-merged

    # what merging means: each quantized weight dequantized, as a float model, the adapter merged into it
    reference = transformers.AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).train()
    dense = {name.removesuffix(".base_layer"): dense_weight(m) for name, m in model.named_modules()
             if is_bitsandbytes_linear(m)}
    with torch.no_grad():
        for name, weight in dense.items():
            reference.get_submodule(name).weight.copy_(weight)
    lorafit.save_adapter(model, tmp_path / "adapter")
    reference = lorafit.merge_and_unload(lorafit.load_adapter(reference, tmp_path / "adapter"))

    merged = lorafit.merge_and_unload(model)
    assert not any(is_bitsandbytes_linear(m) for m in merged.modules())
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert merged.model.layers[0].mlp.up_proj.weight.dtype == torch.float32  # unadapted layers dequantized too
    assert getattr(merged.config, "quantization_config", None) is None and not merged.is_quantized
    with torch.no_grad():
        logits = merged(input_ids=IDS).logits
        torch.testing.assert_close(logits, reference(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
        if bits == 4:  # bitsandbytes' 4-bit training path multiplies by the dequantized weight as well
            torch.testing.assert_close(logits, unmerged, rtol=1e-4, atol=1e-4)
    merged.save_pretrained(tmp_path / "merged")  # a float model, which loads as one
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.train()(input_ids=IDS).logits, logits)


def test_unload_gives_back_the_quantized_layers_and_counts_count_whole_weights(float_dir):
    model = quantized(float_dir, 4)
    with torch.no_grad():
        base = model(input_ids=IDS).logits
    originals = {n: m for n, m in model.named_modules() if is_bitsandbytes_linear(m)}
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=TARGETS))
    report = lorafit.trainable_parameters(model)
    reference = transformers.AutoModelForCausalLM.from_pretrained(float_dir)
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.total == sum(p.numel() for p in reference.parameters()) + adapters
    assert report.trainable == report.adapter == adapters
    model = lorafit.unload(model)
    assert {n: m for n, m in model.named_modules() if is_bitsandbytes_linear(m)} == originals
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, base, rtol=0, atol=0)


def test_rows_of_a_batch_on_different_adapters_equal_each_row_alone(float_dir):
    model = quantized(float_dir, 4)
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False), "a")
    lorafit.attach(model, lorafit.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False,
                                             use_dora=True), "b")
    rows = ["a", None, "b", "a"]
    ids = IDS.repeat(2, 1)
    with torch.no_grad():
        with lorafit.adapter_per_row(model, rows):
            mixed = model(input_ids=ids).logits
        alone = rows_alone(model, rows, lambda k: model(input_ids=ids[k:k + 1]).logits)
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)


def test_weight_read_after_cpu_inference_repacked_the_codes(float_dir):
    """bitsandbytes' CPU inference path rearranges a 4-bit layer's codes for its AVX-512 kernel on the first
    eval forward (keeping the block scales in bfloat16): DoRA's norms and merge_and_unload still read the weight,
    to that rounding, and the layer computes as before."""
    model = quantized(float_dir, 4)
    layer = model.model.layers[0].self_attn.q_proj
    before = dense_weight(layer).clone()
    model.eval()
    with torch.no_grad():
        first = model(input_ids=IDS).logits
        torch.testing.assert_close(dense_weight(layer), before, rtol=0, atol=before.abs().max().item() / 128)
        torch.testing.assert_close(model(input_ids=IDS).logits, first, rtol=1e-3, atol=1e-3)


def test_initialisations_that_rewrite_the_weight_are_refused_by_name(float_dir):
    model = quantized(float_dir, 4)
    for init in ("pissa", "olora"):
        with pytest.raises(ValueError, match=f"init_lora_weights='{init}' rewrites the base weight.*quantized"):
            lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=init))
    assert not any(isinstance(m, lorafit.layers.LoraLayer) for m in model.modules())


def test_a_quantized_module_to_save_is_refused_by_name(float_dir):
    model = quantized(float_dir, 4)
    with pytest.raises(ValueError, match=r"modules_to_save: 'model.layers.0.self_attn.o_proj' holds a quantized "
                                         r"layer \(Linear4bit\)"):
        lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["o_proj"]))
    assert not any(isinstance(m, lorafit.layers.LoraLayer) for m in model.modules())


def test_initialisations_from_the_weight_or_the_inputs_read_the_dequantized_layer(float_dir):
    """MiCA takes B from the dequantized weight's smallest singular directions (the codes' shape is not the
    weight's); EVA takes A from the layers' inputs."""
    model = quantized(float_dir, 4)
    with torch.no_grad():
        base = model(input_ids=IDS).logits
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="mica"))
    layer = model.model.layers[0].self_attn.q_proj
    u = torch.linalg.svd(dense_weight(layer.base_layer).float(), full_matrices=False)[0]
    torch.testing.assert_close(layer.lora_B["default"].abs(), u[:, -4:].abs(), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, base)  # A = 0 at the start

    model = quantized(float_dir, 8)
    lorafit.attach_eva(model, lorafit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="eva"),
                       [{"input_ids": IDS}] * 4)
    a = model.model.layers[0].self_attn.v_proj.lora_A["default"].detach()
    torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), rtol=1e-4, atol=1e-4)  # principal directions


@pytest.mark.parametrize("bits", [4, 8])
def test_dense_dtype_is_the_dequantized_weights_without_dequantizing(float_dir, bits):
    model = quantized(float_dir, bits, dtype=torch.bfloat16)
    layers = [m for m in model.modules() if is_bitsandbytes_linear(m)]
    assert layers and all(dense_dtype(m) == dense_weight(m).dtype for m in layers)
