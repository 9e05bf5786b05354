"""``task.precompute_reference``: the reference model's log-probabilities of every example, computed once.

DPO and its reference-based relatives, and KTO, compare the trained model with a reference model: the model
as the run starts (with LoRA, the base with the adapter switched off). Computed before the first step, from the
model as loaded, those numbers are the same at every epoch, so a step runs the model once fewer, and full
fine-tuning trains these losses without a second copy of the weights. They are not saved: a resumed run computes
them again before its checkpoint is loaded, from the same starting model, and ``lorafit eval`` from the base
model the run started from.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from lorafit.train.data import RowTable, eval_batches, lengths_of, rows_at
from lorafit.train.distributed import SINGLE, Distributed

REFERENCE = "reference_logps"  # the feature key (and batch key) of an example's reference log-probabilities


class WithReference(RowTable):
    """``features`` whose rows carry their reference log-probabilities (``REFERENCE``: one number for each row
    the task's batch holds for the example: a pair's chosen and rejected response, a KTO completion and its
    mismatched row)."""

    def __init__(self, features: Sequence[dict], values: torch.Tensor) -> None:
        if len(values) != len(features):
            raise ValueError(f"{len(values)} reference rows for {len(features)} examples")
        self.features, self.values = features, values.tolist()

    def __len__(self) -> int:
        return len(self.features)

    def __iter__(self) -> Iterator[dict]:
        for i, row in enumerate(self.features):
            yield {**row, REFERENCE: self.values[i]}

    def rows(self, indices: Sequence[int]) -> list[dict]:
        return [{**row, REFERENCE: self.values[i]} for i, row in zip(indices, rows_at(self.features, indices))]

    def lengths(self) -> np.ndarray:
        return lengths_of(self.features)


def with_reference_column(batch: dict[str, torch.Tensor], feats: list[dict]) -> dict[str, torch.Tensor]:
    """A collated batch with its rows' reference log-probabilities, where the features carry them: the examples'
    first rows, then their second ones, as the batch holds them."""
    if feats and REFERENCE in feats[0]:
        batch[REFERENCE] = torch.tensor([f[REFERENCE] for f in feats], dtype=torch.float32).T.reshape(-1)
    return batch


@torch.no_grad()
def with_reference(task, model: torch.nn.Module, features: Sequence[dict], device: torch.device, batch_size: int,
                   autocast, dist: Distributed = SINGLE) -> WithReference:
    """``features`` with the reference log-probabilities ``task.reference_logps`` gives them, batched as evaluation
    batches them (``model`` not wrapped for DDP or FSDP: each process computes its share, then all have all)."""
    training = model.training
    model.eval()
    values = torch.zeros(len(features), 2, dtype=torch.float64, device=device)
    mine = dist.shard(list(range(len(features))))
    lengths = lengths_of(features)[mine].tolist()
    try:
        for part in eval_batches(lengths, batch_size, task.config.train.eval_batch_tokens):
            idx = [mine[i] for i in part]
            batch = {k: v.to(device) for k, v in task.collate(rows_at(features, idx)).items()}
            with autocast():
                logps = task.reference_logps(model, batch)
            # the batch holds the examples' first rows, then their second ones
            values[torch.tensor(idx, device=device)] = logps.double().view(2, len(idx)).T
    finally:
        model.train(training)
    if dist.enabled:  # each example was computed by one process, the others hold 0 for it
        import torch.distributed as td

        td.all_reduce(values)
    return WithReference(features, values.cpu())
