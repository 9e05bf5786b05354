"""LoRA and DoRA on nn.Conv3d (video models' convolutions): PEFT's outputs and files both ways, merged equals
unmerged, and a batch with an adapter per row."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorafit
from tests.models import randomize_adapters

peft = pytest.importorskip("peft")


class Video(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 8, kernel_size=3, stride=(1, 2, 2), padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean((2, 3, 4)))


def video():
    torch.manual_seed(0)
    return Video().eval()


X = torch.randn(4, 3, 4, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("use_dora", [False, True])
def test_conv3d_matches_peft_merges_and_mixes_rows(use_dora, tmp_path):
    theirs = peft.get_peft_model(video(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["conv"],
                                                          use_dora=use_dora, init_lora_weights=False))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "magnitude" in name:
                p.mul_(1 + 0.3 * torch.rand_like(p))
        expected = theirs(X)
    theirs.save_pretrained(tmp_path / "peft")
    ours = lorafit.load_adapter(video(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(X), expected, rtol=1e-5, atol=1e-5)
        assert (expected - video()(X)).abs().max() > 1e-3
    lorafit.save_adapter(ours, tmp_path / "lorafit")
    with torch.no_grad():
        torch.testing.assert_close(peft.PeftModel.from_pretrained(video(), tmp_path / "lorafit")(X), expected,
                                   rtol=1e-5, atol=1e-5)
    lorafit.attach(ours, lorafit.LoraConfig(r=2, target_modules=["conv"], use_dora=use_dora), "other")
    randomize_adapters(ours, 0.2)
    rows = ["default", None, "other", "default"]
    with torch.no_grad():
        with lorafit.adapter_per_row(ours, rows):
            mixed = ours(X)
        for k, name in enumerate(rows):
            if name is None:
                with lorafit.disabled(ours):
                    torch.testing.assert_close(mixed[k:k + 1], ours(X[k:k + 1]), rtol=1e-5, atol=1e-5)
                continue
            lorafit.set_active(ours, name)
            torch.testing.assert_close(mixed[k:k + 1], ours(X[k:k + 1]), rtol=1e-5, atol=1e-5)
        unmerged = ours(X)
        merged = lorafit.merge_and_unload(copy.deepcopy(ours))
        torch.testing.assert_close(merged(X), unmerged, rtol=1e-4, atol=1e-5)
