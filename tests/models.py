"""Small models with every layer kind lorafit adapts, for fast tests."""

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorafit


class Mixed(nn.Module):
    """Embedding -> Conv1d -> GPT-2 Conv1D -> Linear, plus a Conv2d image branch and a head."""

    def __init__(self, vocab: int = 20, dim: int = 12, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.conv1 = nn.Conv1d(dim, dim, kernel_size=3, padding=1)
        self.proj = Conv1D(dim, dim)  # GPT-2 layout: weight (d_in, d_out)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.conv2 = nn.Conv2d(2, dim, kernel_size=3, stride=2, padding=1)
        self.classifier = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)  # (N, T, D)
        h = self.conv1(h.transpose(1, 2)).transpose(1, 2).contiguous()
        h = self.mlp(self.proj(h)).mean(1)
        h = h + self.conv2(image).mean((2, 3))
        return self.classifier(h)


def mixed_inputs(batch: int = 4, seq: int = 7, vocab: int = 20, device=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    image = torch.randn(batch, 2, 8, 8, generator=g)
    return ids.to(device), image.to(device=device, dtype=dtype)


ALL_KINDS = ["embed", "conv1", "proj", "mlp.0", "mlp.2", "conv2"]


def tiny_llama(layers: int = 2, **config) -> nn.Module:
    """A randomly initialised Llama (vocabulary 50, hidden 32, 4 heads of which 2 key/value), the same weights
    on every call, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, **config)).eval()


def randomize_adapters(model: nn.Module, scale: float = 0.1) -> None:
    """Give every LoRA factor non-zero values so that adapters change the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn_like(p) * scale)


def assert_plain_lora_reloads(model: nn.Module, original: nn.Module, ids: torch.Tensor, directory) -> None:
    """An adapter whose initialisation left a residual base (CorDA, LoRA-GA), changed as training would, saved with
    as_plain_lora and loaded onto the ``original`` model: the same logits."""
    with torch.no_grad():
        for p in lorafit.adapter_parameters(model, "default").values():
            p.add_(torch.randn_like(p) * 0.05)
        lorafit.save_adapter(model, directory, as_plain_lora=True)
        loaded = lorafit.load_adapter(original, directory)
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-4)


def rows_alone(model: nn.Module, rows: list, run) -> torch.Tensor:
    """``run(k)`` for each row k by itself, with its adapter active (adapters disabled for None), concatenated:
    what an ``adapter_per_row`` batch must equal."""
    outs = []
    for k, name in enumerate(rows):
        if name is None:
            with lorafit.disabled(model):
                outs.append(run(k))
        else:
            lorafit.set_active(model, name)
            outs.append(run(k))
    return torch.cat(outs)
