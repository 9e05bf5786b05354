"""One optimizer step (forward, loss, backward, AdamW) for each way of training the same model.

Variants, all from the same base weights and batch:
  full     every parameter trains (full fine-tuning)
  floor    base frozen, only the head trains, but the backward pass computes the gradient at every
           target layer's output (input gradients down to the first layer's targets), with no
           low-rank path at all: the cost LoRA cannot go below
  peft     Hugging Face PEFT LoRA
  lorafit  lorafit LoRA
  lorafit-fa  lorafit LoRA-FA (A frozen, B's gradient projected; backward keeps no layer input for A)

``model_dropout="hashed"`` swaps the model's own nn.Dropout modules for lorafit's HashedDropout (the
opt-in ``train.model_dropout = "hashed"``), in any variant.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

import lorafit
from lorafit.lorafa import LoraFAProjection

TARGETS = {"bert": ["query", "key", "value", "dense"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj"]}
HEADS = {"bert": ["classifier"], "llama": []}


def _kind(model: nn.Module) -> str:
    return "llama" if model.config.model_type == "llama" else "bert"


def make_variant(base: nn.Module, variant: str, r: int = 8, dropout: float = 0.1,
                 model_dropout: str = "torch") -> nn.Module:
    model = copy.deepcopy(base).train()
    if model_dropout == "hashed":
        lorafit.use_hashed_dropout(model)
    elif model_dropout != "torch":
        raise ValueError(f"model_dropout: {model_dropout!r} is neither 'torch' nor 'hashed'")
    kind = _kind(model)
    if variant == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif variant == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        for head in HEADS[kind]:
            for p in getattr(model, head).parameters():
                p.requires_grad_(True)
        # autograd must compute what adapters need and no more: the gradient at each target layer's
        # output, hence back through every layer down to the first targets, but not into the embeddings
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS[kind]:
                module.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    elif variant == "peft":
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        cfg = PeftLoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=TARGETS[kind],
                             modules_to_save=HEADS[kind] or None)
        model = get_peft_model(model, cfg)
    elif variant in ("lorafit", "lorafit-fa"):
        lorafit.attach(model, lorafit.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                                 target_modules=TARGETS[kind], modules_to_save=HEADS[kind] or None))
        if variant == "lorafit-fa":  # LoRA-FA: A frozen; stepper projects B's gradients
            model.__dict__["lorafa"] = LoraFAProjection(model, ["default"])
            model.__dict__["lorafa"].freeze_a()
    else:
        raise ValueError(variant)
    return model


def make_batch(model: nn.Module, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, model.config.vocab_size, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if _kind(model) == "llama":
        out["labels"] = ids.clone()
    else:
        out["labels"] = torch.randint(0, 2, (batch,), generator=g)
    return out


def stepper(model: nn.Module, batch: dict[str, torch.Tensor], autocast: bool = False) -> Callable[[], float]:
    """One step; ``autocast``: forward and loss under bfloat16 autocast (mixed precision on float32 weights)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5) if params else None  # the floor of a headless LM trains nothing
    if opt is not None and "lorafa" in model.__dict__:
        model.__dict__["lorafa"].register(opt)
    device = next(model.parameters()).device.type

    def step() -> float:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
