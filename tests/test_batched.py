"""A batch where every row picks its own adapter equals running each row alone with that adapter."""

import pytest
import torch
from torch import nn

import lorafit
from lorafit.batched import adapter_per_row, clear_stacks
from tests.models import ALL_KINDS, Mixed, mixed_inputs, randomize_adapters, rows_alone

TOL = dict(atol=1e-5, rtol=1e-5)


def _randomize_copies(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modules_to_save." in name:
                p.add_(torch.randn_like(p) * 0.3)


@pytest.fixture
def mixed_model():
    torch.manual_seed(0)
    model = Mixed().eval()
    for name, r in (("a", 2), ("b", 8), ("c", 4)):
        lorafit.attach(model, lorafit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=ALL_KINDS,
                                                 modules_to_save=["classifier"]), name)
    # "d" adapts only two layers and has no classifier copy: elsewhere its rows see the base model
    lorafit.attach(model, lorafit.LoraConfig(r=3, lora_alpha=5, target_modules=["mlp.0", "conv2"],
                                             use_rslora=True), "d")
    randomize_adapters(model, 0.3)
    _randomize_copies(model)
    return model


@pytest.mark.parametrize("rows", [
    ["a", "b", None, "c", "a", "d", None, "b"],
    ["b"] * 8,                       # one adapter for all rows: the single-adapter path
    [None] * 8,                      # all on the base model
    ["a", None] * 4,
])
def test_mixed_batch_equals_rowsrows_alone(mixed_model, rows):
    ids, image = mixed_inputs(batch=len(rows))
    with torch.no_grad():
        with adapter_per_row(mixed_model, rows):
            mixed = mixed_model(ids, image)
        alone = rows_alone(mixed_model, rows, lambda k: mixed_model(ids[k:k + 1], image[k:k + 1]))
    torch.testing.assert_close(mixed, alone, **TOL)
    assert mixed_model.embed.row_plan is None  # the block cleans up


def test_every_layer_kind_changes_the_output(mixed_model):
    """Guard against a trivially passing test: each adapted layer kind contributes in the mixed path."""
    ids, image = mixed_inputs(batch=2)
    for layer in ("embed", "conv1", "proj", "mlp.0", "conv2"):
        with torch.no_grad():
            with adapter_per_row(mixed_model, ["b", None]):
                before = mixed_model(ids, image)
            factors = mixed_model.get_submodule(layer).factors_b["b"]
            saved = factors.detach().clone()
            factors.zero_()
            with adapter_per_row(mixed_model, ["b", None]):
                after = mixed_model(ids, image)  # the stack is rebuilt: the factor changed in place
            factors.copy_(saved)
        assert not torch.allclose(before[0], after[0], atol=1e-6), layer
        torch.testing.assert_close(before[1], after[1], atol=0, rtol=0)


def test_stacks_follow_added_removed_and_reloaded_adapters(mixed_model, tmp_path):
    ids, image = mixed_inputs(batch=3)
    rows = ["a", "c", None]
    with torch.no_grad(), adapter_per_row(mixed_model, rows):
        first = mixed_model(ids, image)
    lorafit.save_adapter(mixed_model, tmp_path / "c", "c")
    lorafit.detach(mixed_model, "c")
    with pytest.raises(KeyError, match="'c'"):
        with adapter_per_row(mixed_model, rows):
            pass
    lorafit.load_adapter(mixed_model, tmp_path / "c", "c")
    with torch.no_grad(), adapter_per_row(mixed_model, rows):
        again = mixed_model(ids, image)
    torch.testing.assert_close(first, again, **TOL)
    clear_stacks(mixed_model)
    with torch.no_grad(), adapter_per_row(mixed_model, rows):
        torch.testing.assert_close(mixed_model(ids, image), first, **TOL)


def test_stacks_through_churn_equal_rowsrows_alone():
    """Adapters attached, detached and changed one at a time (slots freed and reused, a reused slot
    taking a lower rank, the stack growing): after each change the mixed batch equals rows alone, and
    an adapter added within the stack's capacity is written into the stack in place, not rebuilt."""
    torch.manual_seed(1)
    model = Mixed().eval()
    rnd = torch.Generator().manual_seed(2)
    ids, image = mixed_inputs(batch=6)

    def attach(name, r):
        lorafit.attach(model, lorafit.LoraConfig(r=r, lora_alpha=r + 1, target_modules=ALL_KINDS), name,
                       activate=False)
        with torch.no_grad():
            for key, p in model.named_parameters():
                if f".{name}." in key or key.endswith(f".{name}"):
                    p.copy_(torch.randn(p.shape, generator=rnd) * 0.3)

    for i in range(4):
        attach(f"n{i}", 4)
    in_place = 0
    for step in range(16):
        names = lorafit.adapter_configs(model)
        stack = model.proj.__dict__.get("_lorafit_row_stacks")
        if step % 3 == 2 and len(names) > 2:
            lorafit.detach(model, list(names)[step % len(names)])
        elif step % 4 == 3:  # new values in place, as an optimizer step or a copy_ would write them
            with torch.no_grad():
                model.proj.factors_b[next(iter(names))].mul_(-2)
        else:
            attach(f"m{step}", (1, 2, 4)[step % 3])  # never above rank 4: the layout stays
        rows = list(lorafit.adapter_configs(model))[:5] + [None]
        with torch.no_grad():
            with adapter_per_row(model, rows):
                mixed = model(ids, image)
            alone = rows_alone(model, rows, lambda k: model(ids[k:k + 1], image[k:k + 1]))
        torch.testing.assert_close(mixed, alone, **TOL)
        after = model.proj.__dict__["_lorafit_row_stacks"]
        in_place += stack is not None and after.stack is stack.stack
    assert in_place >= 6
    attach("big", 9)  # a higher rank than the stack holds: a new layout, still right
    rows = ["big", None, *list(lorafit.adapter_configs(model))[:4]]
    with torch.no_grad():
        with adapter_per_row(model, rows):
            mixed = model(ids, image)
        alone = rows_alone(model, rows, lambda k: model(ids[k:k + 1], image[k:k + 1]))
    torch.testing.assert_close(mixed, alone, **TOL)


def test_refusals(mixed_model):
    ids, image = mixed_inputs(batch=4)
    with pytest.raises(ValueError, match="4 rows|batch of"):
        with torch.no_grad(), adapter_per_row(mixed_model, ["a", "b"]):
            mixed_model(ids, image)
    with pytest.raises(RuntimeError, match="already active"):
        with adapter_per_row(mixed_model, ["a"]), adapter_per_row(mixed_model, ["b"]):
            pass
    lorafit.set_active(mixed_model, "a")
    lorafit.merge(mixed_model)
    with pytest.raises(ValueError, match="merged"):
        with adapter_per_row(mixed_model, ["a", "b"]):
            pass


@pytest.mark.parametrize("rows", [["p", "x", None, "y", "x", "p", None, "y"], ["x"] * 4])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_dora_rows_equal_rowsrows_alone(rows, device):
    """DoRA adapters (a magnitude per feature of every layer kind) beside a plain one with its own biases: each row
    scales its layer's output by its adapter's factor; rows on other adapters or the base model are unscaled."""
    torch.manual_seed(0)
    model = Mixed().eval()
    for name in ("x", "y"):
        lorafit.attach(model, lorafit.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_KINDS, use_dora=True), name)
    lorafit.attach(model, lorafit.LoraConfig(r=2, target_modules=["mlp.0", "conv2", "classifier"], lora_bias=True),
                   "p")
    randomize_adapters(model, 0.3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" in name or "lora_B_bias" in name:
                p.mul_(1 + 0.5 * torch.rand_like(p))
    model.to(device)
    ids, image = mixed_inputs(batch=len(rows), device=device)
    # cuDNN's convolutions use TF32 by default, which would round the rows alone and together differently
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        with adapter_per_row(model, rows):
            mixed = model(ids, image)
        alone = rows_alone(model, rows, lambda k: model(ids[k:k + 1], image[k:k + 1]))
        lorafit.set_active(model, "x")
        adapted = model(ids, image)
        with lorafit.disabled(model):
            assert not torch.allclose(adapted, model(ids, image), atol=1e-3)  # the adapter matters
    torch.testing.assert_close(mixed, alone, **TOL)


class Saved(nn.Module):
    """modules_to_save on an embedding (stacked tables) and on a Sequential (run per copy on its rows)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, ids):
        return self.head(torch.relu(self.body(self.embed(ids))).mean(1))


def test_modules_to_save_kinds():
    model = Saved().eval()
    for name, r in (("x", 2), ("y", 6)):
        lorafit.attach(model, lorafit.LoraConfig(r=r, target_modules=["body"], modules_to_save=["embed", "head"]),
                       name)
    randomize_adapters(model, 0.3)
    _randomize_copies(model)
    ids = torch.randint(0, 30, (5, 7))
    rows = ["x", None, "y", "y", "x"]
    with torch.no_grad():
        with adapter_per_row(model, rows):
            mixed = model(ids)
        alone = rows_alone(model, rows, lambda k: model(ids[k:k + 1]))
    torch.testing.assert_close(mixed, alone, **TOL)


def _tiny_llama(hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def test_generate_keeps_each_rows_adapter():
    pytest.importorskip("transformers")
    model = _tiny_llama()
    targets = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
    for name, r in (("p", 4), ("q", 8)):
        lorafit.attach(model, lorafit.LoraConfig(r=r, lora_alpha=r, target_modules=targets), name)
    randomize_adapters(model, 0.5)
    prompts = torch.randint(3, 64, (4, 6), generator=torch.Generator().manual_seed(3))
    rows = ["p", None, "q", "p"]
    kwargs = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        with adapter_per_row(model, rows):
            mixed = model.generate(prompts, attention_mask=torch.ones_like(prompts), **kwargs)
        singles = []
        for k, name in enumerate(rows):
            ctx = lorafit.disabled(model) if name is None else adapter_per_row(model, [name])
            with ctx:
                singles.append(model.generate(prompts[k:k + 1], attention_mask=torch.ones_like(prompts[k:k + 1]),
                                              **kwargs))
    for k in range(len(rows)):
        torch.testing.assert_close(mixed.sequences[k], singles[k].sequences[0], atol=0, rtol=0)
        torch.testing.assert_close(torch.stack([s[k] for s in mixed.scores]),
                                   torch.stack([s[0] for s in singles[k].scores]), **TOL)
    # the adapters matter: row 0's scores differ from the base model's on the same prompt
    with torch.no_grad(), lorafit.disabled(model):
        base0 = model.generate(prompts[:1], attention_mask=torch.ones_like(prompts[:1]), **kwargs)
    assert not torch.allclose(mixed.scores[0][0], base0.scores[0][0], atol=1e-3)


def test_heads_of_different_sizes_cannot_share_a_batch():
    # e.g. a 2-class SST-2 head and a 4-class AG News head: one output tensor cannot hold both
    model = Saved().eval()
    for name in ("x", "y"):
        lorafit.attach(model, lorafit.LoraConfig(r=2, target_modules=["body"], modules_to_save=["head"]), name)
    model.head.modules_to_save["y"] = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 5))
    ids = torch.randint(0, 30, (3, 7))
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"adapters \['x', 'y'\] have modules_to_save copies of different "
                                             r"shapes.*separate batches"):
            with adapter_per_row(model, ["x", "y", None]):
                pass
        rows = ["x", None, "x"]  # rows of same-sized heads still share a batch
        with adapter_per_row(model, rows):
            mixed = model(ids)
        alone = rows_alone(model, rows, lambda k: model(ids[k:k + 1]))
        with adapter_per_row(model, ["y", "y"]):
            assert model(ids[:2]).shape == (2, 5)
    torch.testing.assert_close(mixed, alone, **TOL)


LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# bf16 keeps 8 bits of mantissa: the batched path and a row alone round at different places
DTYPE_TOL = {torch.float32: TOL, torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}


def _eight_adapter_llama(dtype=torch.float32, device="cpu"):
    """A tiny Llama with 8 adapters of ranks 1..8 on every linear, and 8 prompts."""
    pytest.importorskip("transformers")
    model = _tiny_llama(hidden=64)
    names = [f"t{i}" for i in range(8)]
    for i, name in enumerate(names):
        lorafit.attach(model, lorafit.LoraConfig(r=i + 1, lora_alpha=8, target_modules=LLAMA_LINEARS), name)
    randomize_adapters(model, 0.1)
    ids = torch.randint(3, 64, (len(names), 12), generator=torch.Generator().manual_seed(5))
    return model.to(device=device, dtype=dtype), names, ids.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_eight_adapters_on_llama_equal_rowsrows_alone(device, dtype):
    model, names, ids = _eight_adapter_llama(dtype, device)
    with torch.no_grad():
        with adapter_per_row(model, names):
            mixed = model(ids).logits
        alone = []
        for k, name in enumerate(names):
            lorafit.set_active(model, [name])
            alone.append(model(ids[k:k + 1]).logits)
        with lorafit.disabled(model):
            base = model(ids).logits
    assert mixed.device.type == device and mixed.dtype == dtype
    torch.testing.assert_close(mixed, torch.cat(alone), **DTYPE_TOL[dtype])
    assert not torch.allclose(mixed, base, **DTYPE_TOL[dtype])  # the adapters matter


def test_forward_never_reads_a_tensor_back():
    """On a GPU each read-back (item, tolist, bool) waits for the device: no forward inside the
    block may use one, the first included (it gathers each layer's factors for the block)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the forward read a tensor back to the host")

    mixed = Mixed().eval()
    for name, r in (("a", 2), ("b", 5)):
        lorafit.attach(mixed, lorafit.LoraConfig(r=r, target_modules=ALL_KINDS, modules_to_save=["classifier"]), name)
    model, names, ids = _eight_adapter_llama()
    mixed_ids, image = mixed_inputs(batch=4)
    blocks = [(model, names, lambda: model(ids)), (mixed, ["a", None, "b", "a"], lambda: mixed(mixed_ids, image))]
    variants = _tiny_llama()  # token rows, DoRA and aLoRA
    lorafit.attach(variants, lorafit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[3, 7]), "t")
    lorafit.attach(variants, lorafit.LoraConfig(target_modules=["v_proj"], use_dora=True), "d")
    lorafit.attach(variants, lorafit.LoraConfig(target_modules=["q_proj"], alora_invocation_tokens=[5]), "al")
    blocks.append((variants, ["t", "d", "al", "t"], lambda: variants(input_ids=ids[:4])))
    for net, rows, run in blocks:
        with torch.no_grad(), adapter_per_row(net, rows), pytest.MonkeyPatch.context() as patch:
            for method in ("tolist", "item", "__bool__"):
                patch.setattr(torch.Tensor, method, refuse)
            run()
