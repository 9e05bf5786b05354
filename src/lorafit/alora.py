"""Activated LoRA (aLoRA; Greenewald et al., 2025; PEFT's ``alora_invocation_tokens``).

An aLoRA adapter changes a token's computation only from the last occurrence of its invocation sequence in the
row on: everything before it runs as the base model, so a key/value cache the base model built for that prefix
serves the adapter as it is, and several aLoRA adapters can share one. Tokens are what each layer sees per row
and position, so a forward pre-hook on the model finds, for each adapter, where its activation starts in each
row of ``input_ids``, and each adapted layer adds its low-rank output only from there.

- On the device, without a host sync: the starts come from comparing every window of the row with the
  sequence, and the positions are compared with them.
- Generation: a call that continues a cache (``past_key_values`` holding tokens) looks for the sequence in its
  own tokens and otherwise keeps the start found earlier in the same sequence, so the generated tokens stay on
  the adapter. A cache built elsewhere (the base model's prefill) works when the invocation is in the tokens
  this model gets.
- A row without the sequence, or a forward without ``input_ids`` (``inputs_embeds`` alone), runs as the base
  model, as in PEFT.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

_STATE = "_lorafit_alora"


class Activation:
    """One model's aLoRA adapters: their invocation sequences and, for the forward running now, each adapter's
    (batch, tokens) mask of the positions its low-rank output is added at."""

    def __init__(self, model: nn.Module) -> None:
        self.sequences: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor | None] = {}
        self._starts: dict[str, torch.Tensor] = {}  # per row: where the activation starts in the whole sequence
        self._hook = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def remove(self) -> None:
        self._hook.remove()

    def mask(self, name: str, shape: torch.Size) -> torch.Tensor | None:
        """The mask for a layer input of ``shape`` (batch, tokens, features), or None where the adapter is off for
        this forward (no input ids were given)."""
        mask = self.masks.get(name)
        if mask is None:
            return None
        if tuple(shape[:-1]) != tuple(mask.shape):
            raise ValueError(f"aLoRA adapter {name!r}: a layer got an input of shape {list(shape)}, but the model's "
                             f"input ids are {list(mask.shape)} (batch, tokens): aLoRA needs layers that see each "
                             "row's tokens in order (not packed or regrouped ones)")
        return mask

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            ids = args[0]
        if ids is None:
            if self.sequences:
                warnings.warn("aLoRA adapters find their invocation in input_ids, and this forward got none "
                              "(inputs_embeds?): they are off for it", stacklevel=3)
            self.masks = dict.fromkeys(self.sequences)
            return
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        # transformers 5.2x calls the cache "cache", earlier versions "past_key_values"
        past = _cached_tokens(kwargs.get("cache", kwargs.get("past_key_values")))
        positions = past + torch.arange(ids.shape[1], device=ids.device)
        for name, sequence in self.sequences.items():
            if sequence.device != ids.device:  # moved once, not copied to the device on every forward
                sequence = self.sequences[name] = sequence.to(ids.device)
            start = last_start(ids, sequence)
            start = torch.where(start >= 0, start + past, start)
            earlier = self._starts.get(name)
            if past and earlier is not None and earlier.shape == start.shape:
                start = torch.where(start >= 0, start, earlier)  # invoked earlier in this sequence
            self._starts[name] = start
            self.masks[name] = (positions[None, :] >= start[:, None]) & (start[:, None] >= 0)


def last_start(ids: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
    """Per row of ``ids`` (batch, tokens), the index where the last occurrence of ``sequence`` starts, or -1."""
    n = sequence.numel()
    if ids.shape[1] < n:
        return torch.full((ids.shape[0],), -1, dtype=torch.long, device=ids.device)
    found = (ids.unfold(1, n, 1) == sequence).all(dim=-1)  # (batch, tokens - n + 1)
    index = torch.arange(found.shape[1], device=ids.device)
    return torch.where(found, index, -1).amax(dim=1)


def _cached_tokens(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:  # the legacy tuple of (key, value)
        return int(cache[0][0].shape[-2])
    return 0


def activation(model: nn.Module, create: bool = False) -> Activation | None:
    """The model's aLoRA state (made, with its hook, when ``create``)."""
    state = model.__dict__.get(_STATE)
    if state is None and create:
        state = model.__dict__[_STATE] = Activation(model)
    return state


def add(model: nn.Module, name: str, tokens: list[int]) -> Activation:
    state = activation(model, create=True)
    state.sequences[name] = torch.tensor(tokens, dtype=torch.long)
    return state


def remove(model: nn.Module, name: str) -> None:
    state = activation(model)
    if state is None:
        return
    for table in (state.sequences, state.masks, state._starts):
        table.pop(name, None)
    if not state.sequences:
        state.remove()
        del model.__dict__[_STATE]
