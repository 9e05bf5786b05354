"""HashedDropout: the model's own dropout with lorafit's hashed masks (an opt-in)."""

import shutil

import pytest
import torch
from torch import nn

import lorafit
from lorafit.kernels import cpu as cpu_kernels
from lorafit.kernels import mask as dropout_mask
from lorafit.layers.hashed_dropout import HashedDropout


def _expected(x: torch.Tensor, p: float, seed: int, g: torch.Tensor | None = None) -> torch.Tensor:
    """What HashedDropout(p) called under ``seed`` gives for x (or, for g, as x's gradient): keep_mask over x's
    row-major positions, rows of its last dimension, and the threshold's rescale; computed in float64."""
    torch.manual_seed(seed)
    key = dropout_mask.new_key(x.device)
    t, scale = dropout_mask.threshold(p)
    keep = dropout_mask.keep_mask(x.numel() // x.shape[-1], x.shape[-1], key, t).view(x.shape)
    v = x if g is None else g
    return torch.where(keep, v.double() * scale, 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(32, 5, 384), (3, 2, 7, 13), (11,)])
def test_forward_and_gradient_are_the_documented_mask_and_rescale(dtype, shape):
    """Forward and backward against the formula, for the C kernel (float32 on a CPU) and the torch ops
    (other dtypes), at odd sizes for the vector loop's tail and with 1-D and 4-D inputs."""
    if dtype == torch.float32 and (shutil.which("cc") or shutil.which("gcc")):
        assert cpu_kernels.library() is not None  # the C path is what runs here
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    g = torch.randn(shape, dtype=dtype)
    m = HashedDropout(0.3)
    torch.manual_seed(7)
    y = m(x)
    y.backward(g)
    tol = {torch.bfloat16: 1e-2, torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
    want_y, want_g = _expected(x.detach(), 0.3, 7), _expected(x.detach(), 0.3, 7, g)
    assert y.dtype == x.grad.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), want_y, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad.double(), want_g, rtol=tol, atol=tol)
    assert torch.equal(y == 0, want_y == 0) and torch.equal(x.grad == 0, want_g == 0)  # the same elements dropped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_torch_ops_mask_a_block_of_rows_at_a_time(monkeypatch, dtype):
    """The eager torch path (no C library, no Triton) masks a block of rows at a time, blocks of any size
    (one row, rows that do not divide evenly, a row longer than a block): the whole tensor's mask."""
    monkeypatch.setattr(cpu_kernels, "serves", lambda x: False)
    x = torch.randn(37, 29).to(dtype)
    key = torch.tensor(-98765, dtype=torch.int32)
    t, scale = dropout_mask.threshold(0.3)
    whole = torch.where(dropout_mask.keep_mask(37, 29, key, t), x, 0).mul_(scale)
    for block in (1, 29, 100, 29 * 37):
        monkeypatch.setattr(dropout_mask, "_BLOCK", block)
        assert torch.equal(dropout_mask.dropped(x, key, t, scale), whole)


def test_strided_inputs_follow_their_row_major_positions():
    torch.manual_seed(0)
    x = torch.randn(64, 40).T  # a transposed view: positions are those of x, not of its storage
    torch.manual_seed(3)
    y = HashedDropout(0.5)(x.requires_grad_())
    torch.testing.assert_close(y.double(), _expected(x.detach(), 0.5, 3))


def test_drop_rate_rescale_and_fresh_masks_per_call():
    torch.manual_seed(0)
    x = torch.ones(1000, 1000)
    m = HashedDropout(0.1)
    y1, y2 = m(x), m(x)
    kept = (y1 != 0).float().mean().item()
    assert abs(kept - 0.9) < 2e-3  # ~7 standard deviations at 1e6 draws
    assert abs(y1.mean().item() - 1) < 3e-3  # E[mask * rescale] = 1
    assert (y1 != y2).float().mean() > 0.1  # each call draws a new key


def test_eval_p0_p1_and_torch_generator_repeatability():
    x = torch.randn(8, 16, requires_grad=True)
    m = HashedDropout(0.2)
    assert m.eval()(x) is x
    assert HashedDropout(0.0).train()(x) is x
    y1 = HashedDropout(1.0)(x)
    assert torch.equal(y1, torch.zeros_like(x)) and y1.requires_grad
    m.train()
    torch.manual_seed(5)
    a = m(x)
    torch.manual_seed(5)
    assert torch.equal(a, m(x))


def test_use_hashed_dropout_swaps_only_plain_dropout_modules_of_a_transformer():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=16, num_labels=2)
    model = BertForSequenceClassification(cfg)
    model.extra = nn.Dropout2d(0.5)  # a subclass of _DropoutNd, not nn.Dropout: it keeps torch's
    plain = [n for n, m in model.named_modules() if type(m) is nn.Dropout]
    ids = torch.randint(1, 50, (3, 9))
    want = model.eval()(input_ids=ids).logits
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    model.train()

    assert lorafit.use_hashed_dropout(model) == len(plain) > 0
    swapped = dict(model.named_modules())
    assert all(type(swapped[n]) is HashedDropout and isinstance(swapped[n], nn.Dropout) for n in plain)
    assert type(model.extra) is nn.Dropout2d
    assert swapped[plain[0]].p == cfg.hidden_dropout_prob and swapped[plain[0]].training
    # eval: no dropout either way, so the output is the model's own
    torch.testing.assert_close(model.eval()(input_ids=ids).logits, want)
    # training: the adapters get gradients, and a seed repeats the step
    model.train()
    losses = []
    for _ in range(2):
        torch.manual_seed(1)
        out = model(input_ids=ids, labels=torch.tensor([0, 1, 1]))
        out.loss.backward()
        losses.append(out.loss.item())
    assert losses[0] == losses[1]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    torch.manual_seed(2)
    assert not torch.allclose(model(input_ids=ids).logits, want)  # in training, the swapped modules drop
