"""``train.neftune_noise_alpha``: NEFTune (Jain et al., 2023, "NEFTune: Noisy Embeddings Improve Instruction
Finetuning"), uniform noise added to the input embeddings while training.

Each training forward adds noise drawn from ``U(-α/√(L d), α/√(L d))`` to every embedding vector, with ``L`` the
batch's sequence length and ``d`` the embedding width, as the paper scales it (so the noise's expected norm per
sequence does not grow with its length). ``L`` is the padded (or packed) length, as transformers' Trainer and TRL
take it. Evaluation and generation (the module in eval mode) see the embeddings unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def add_embedding_noise(model: nn.Module, alpha: float) -> Callable[[], None]:
    """NEFTune's noise on ``model``'s input embeddings (``get_input_embeddings()``: an adapter's wrapper of them
    included) in training mode; returns what takes it off. The noise comes from the torch generator of the
    embeddings' device, which checkpoints save, so a resumed run draws what an uninterrupted one draws."""
    embeddings = model.get_input_embeddings()
    if embeddings is None:
        raise ValueError(f"train.neftune_noise_alpha: {type(model).__name__} has no input embeddings "
                         "(get_input_embeddings() is None)")

    def noisy(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        bound = alpha / math.sqrt(output.shape[-2] * output.shape[-1])
        return output + torch.empty_like(output).uniform_(-bound, bound)

    return embeddings.register_forward_hook(noisy).remove
