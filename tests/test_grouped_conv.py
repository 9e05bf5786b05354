"""LoRA on grouped convolutions (depthwise convolutions, ConvNeXt, MobileNet, Mamba's conv1d), as PEFT has it: A over
every input channel, B a grouped 1x1 convolution. PEFT's outputs, gradients and files both ways; what cannot be
done (merging, DoRA, a rank that is not a multiple of groups) is refused without changing anything; mixed-adapter
batches, adapter arithmetic and hotswapping take them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorafit
from tests.models import randomize_adapters

peft = pytest.importorskip("peft")


class Blocks(nn.Module):
    """A depthwise Conv1d (groups = channels), a Conv2d of 2 groups with a bias and a Conv3d of 4 groups."""

    def __init__(self) -> None:
        super().__init__()
        self.depthwise = nn.Conv1d(8, 8, kernel_size=3, padding=1, groups=8, bias=False)
        self.grouped = nn.Conv2d(8, 12, kernel_size=3, stride=2, padding=1, groups=2)
        self.video = nn.Conv3d(4, 8, kernel_size=3, padding=1, groups=4)
        self.head = nn.Linear(8 + 12 + 8, 3)

    def forward(self, seq: torch.Tensor, image: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        parts = [self.depthwise(seq).mean(-1), self.grouped(image).mean((2, 3)), self.video(clip).mean((2, 3, 4))]
        return self.head(torch.relu(torch.cat(parts, -1)))


def blocks() -> Blocks:
    torch.manual_seed(0)
    return Blocks().eval()


_GEN = torch.Generator().manual_seed(1)
INPUTS = (torch.randn(4, 8, 10, generator=_GEN), torch.randn(4, 8, 9, 9, generator=_GEN),
          torch.randn(4, 4, 3, 6, 6, generator=_GEN))
TARGETS = ["depthwise", "grouped", "video"]


def _peft_model(lora_bias: bool = False):
    return peft.get_peft_model(blocks(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                         init_lora_weights=False, lora_bias=lora_bias))


@pytest.mark.parametrize("lora_bias", [False, True])
def test_peft_files_load_to_peft_outputs_and_gradients_and_save_back(lora_bias, tmp_path):
    theirs = _peft_model(lora_bias)
    with torch.no_grad():
        expected = theirs(*INPUTS)
        assert (expected - blocks()(*INPUTS)).abs().max() > 1e-3
    theirs.save_pretrained(tmp_path / "peft")
    ours = lorafit.load_adapter(blocks(), tmp_path / "peft", trainable=True)
    assert tuple(ours.depthwise.lora_B["default"].shape) == (8, 1, 1)  # r / groups columns per output
    with torch.no_grad():
        torch.testing.assert_close(ours(*INPUTS), expected, rtol=1e-5, atol=1e-5)

    # training: the same gradients for every factor (and B's bias)
    ours.train()
    theirs.train()
    ours(*INPUTS).square().sum().backward()
    theirs(*INPUTS).square().sum().backward()

    def ours_name(peft_name: str) -> str:
        name = peft_name.replace("base_model.model.", "").replace(".default", "").replace(".weight", "")
        return name.replace("lora_B.bias", "lora_B_bias")

    theirs_grads = {ours_name(n): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    ours_grads = {n.replace(".default", ""): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(ours_grads) == set(theirs_grads) and len(ours_grads) == 6 + 3 * lora_bias
    for n, g in ours_grads.items():
        torch.testing.assert_close(g, theirs_grads[n], rtol=1e-4, atol=1e-5, msg=n)

    lorafit.save_adapter(ours.eval(), tmp_path / "lorafit")
    with torch.no_grad():
        back = peft.PeftModel.from_pretrained(blocks(), tmp_path / "lorafit")
        torch.testing.assert_close(back(*INPUTS), expected, rtol=1e-5, atol=1e-5)


def test_merging_is_refused_by_name_and_changes_nothing():
    model = lorafit.attach(blocks(), lorafit.LoraConfig(r=8, target_modules=TARGETS, init_lora_weights=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(*INPUTS)
    for merge in (lorafit.merge, lorafit.merge_and_unload):
        with pytest.raises(ValueError, match=r"'depthwise'.*grouped convolution \(groups=8\).*cannot be merged"):
            merge(model)
    with pytest.raises(ValueError, match=r"grouped convolution \(groups=2\).*cannot be merged"):
        model.grouped.merge()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert lorafit.merged_adapters(model) == []
    with torch.no_grad():
        torch.testing.assert_close(model(*INPUTS), expected, rtol=0, atol=0)


@pytest.mark.parametrize("config, message", [
    (dict(r=6), r"grouped convolution \(groups=8\) needs a rank that is a multiple of groups.*got r=6"),
    (dict(r=8, use_dora=True), r"DoRA \(use_dora=True\) on a grouped convolution \(groups=8\) is not supported"),
    (dict(r=8, init_lora_weights="orthogonal"), r"'orthogonal' on a grouped convolution"),
])
def test_what_a_grouped_convolution_cannot_take_is_refused_before_anything_is_attached(config, message):
    model = blocks()
    before = str(model)
    with pytest.raises(ValueError, match=message):
        lorafit.attach(model, lorafit.LoraConfig(target_modules=TARGETS, **config))
    assert str(model) == before
    # a rank_pattern gives the depthwise layer a rank it can take
    lorafit.attach(model, lorafit.LoraConfig(r=6, target_modules=["depthwise"], rank_pattern={"depthwise": 16}))
    assert model.depthwise.rank["default"] == 16


def test_a_batch_with_an_adapter_per_row():
    model = lorafit.attach(blocks(), lorafit.LoraConfig(r=8, target_modules=TARGETS, init_lora_weights=False))
    lorafit.attach(model, lorafit.LoraConfig(r=16, target_modules=TARGETS, lora_bias=True), "other")
    randomize_adapters(model, 0.2)
    rows = ["default", None, "other", "default"]
    with torch.no_grad():
        with lorafit.adapter_per_row(model, rows):
            mixed = model(*INPUTS)
        for k, name in enumerate(rows):
            one = tuple(t[k:k + 1] for t in INPUTS)
            if name is None:
                with lorafit.disabled(model):
                    torch.testing.assert_close(mixed[k:k + 1], model(*one), rtol=1e-5, atol=1e-5)
                continue
            lorafit.set_active(model, name)
            torch.testing.assert_close(mixed[k:k + 1], model(*one), rtol=1e-5, atol=1e-5)


def _delta(model, name: str) -> torch.Tensor:
    """What adapter ``name`` adds to each grouped layer's output, concatenated (each layer is linear in x)."""
    lorafit.set_active(model, name)
    with torch.no_grad():
        adapted = [model.depthwise(INPUTS[0]), model.grouped(INPUTS[1]), model.video(INPUTS[2])]
        with lorafit.disabled(model):
            base = [model.depthwise(INPUTS[0]), model.grouped(INPUTS[1]), model.video(INPUTS[2])]
    return torch.cat([(y - b).flatten() for y, b in zip(adapted, base)])


def test_adapter_arithmetic_keeps_each_group_to_its_own_rows():
    model = lorafit.attach(blocks(), lorafit.LoraConfig(r=8, target_modules=TARGETS, init_lora_weights=False))
    lorafit.attach(model, lorafit.LoraConfig(r=16, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False),
                   "b")
    expected = 0.7 * _delta(model, "default") - 0.4 * _delta(model, "b")

    errors = lorafit.combine_adapters(model, {"default": 0.7, "b": -0.4}, "exact")
    assert max(errors.values()) < 1e-5
    torch.testing.assert_close(_delta(model, "exact"), expected, rtol=1e-4, atol=1e-5)

    # a full-rank truncation is exact too; a lower one keeps, per group, that group's best approximation
    full = lorafit.combine_adapters(model, {"default": 0.7, "b": -0.4}, "svd_full", method="svd", rank=24)
    torch.testing.assert_close(_delta(model, "svd_full"), expected, rtol=1e-3, atol=1e-4)
    assert max(full.values()) < 1e-4
    low = lorafit.combine_adapters(model, {"default": 0.7, "b": -0.4}, "svd_low", method="svd", rank=9)
    assert model.depthwise.rank["svd_low"] == 16 and model.grouped.rank["svd_low"] == 10  # multiples of groups
    assert all(0 < e < 1 for e in low.values())
    # the returned error is the one the new adapter makes on each layer's change of weight
    for path in TARGETS:
        layer = getattr(model, path)

        def change(name: str) -> torch.Tensor:
            return layer.scaling[name] * layer.b_matrix(name) @ layer.factors_a[name].flatten(1)

        target = 0.7 * change("default") - 0.4 * change("b")
        relative = ((change("svd_low") - target).norm() / target.norm()).item()
        assert relative == pytest.approx(low[path], rel=1e-3)


def test_hotswap_takes_an_adapter_of_the_slot_rank(tmp_path):
    source = lorafit.attach(blocks(), lorafit.LoraConfig(r=8, target_modules=TARGETS, init_lora_weights=False))
    lorafit.save_adapter(source, tmp_path / "new")
    with torch.no_grad():
        expected = source(*INPUTS)
    model = lorafit.attach(blocks(), lorafit.LoraConfig(r=8, target_modules=TARGETS))
    lorafit.hotswap_adapter(model, tmp_path / "new")
    with torch.no_grad():
        torch.testing.assert_close(model(*INPUTS), expected, rtol=1e-5, atol=1e-5)
    wider = lorafit.attach(blocks(), lorafit.LoraConfig(r=16, target_modules=TARGETS))
    before = copy.deepcopy(wider.state_dict())
    with pytest.raises(ValueError, match=r"grouped convolution takes only its slot's rank \(16\), got 8"):
        lorafit.hotswap_adapter(wider, tmp_path / "new")
    assert all(torch.equal(v, before[k]) for k, v in wider.state_dict().items())


def test_lorafa_refuses_a_grouped_b():
    """LoRA-FA projects B's gradient through A's rows, which a grouped B splits among its groups."""
    model = lorafit.attach(blocks(), lorafit.LoraConfig(r=8, target_modules=TARGETS))
    with pytest.raises(ValueError, match="grouped convolution"):
        lorafit.lorafa_optimizer(model, lr=1e-3)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)


@pytest.mark.parametrize("groups", [1, 2])
def test_a_reflect_padded_convolution_pads_a_as_the_layer_does(groups):
    """The A convolution pads its input with the layer's padding_mode (PEFT's pads with zeros), so an ungrouped
    layer merges to what it computes unmerged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", groups=groups))
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    layer, x = model[0], torch.randn(2, 4, 7, 7)
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    with torch.no_grad():
        h = nn.functional.conv2d(nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"), a)
        expected = layer.base_layer(x) + nn.functional.conv2d(h, b, groups=groups) * layer.scaling["default"]
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        if groups == 1:
            torch.testing.assert_close(lorafit.merge_and_unload(model)(x), expected, rtol=1e-5, atol=1e-5)
