"""Data-parallel training across processes started by ``torchrun`` (DDP or FSDP), and the one-process case.

lorafit has no cluster code of its own: ``torchrun`` starts the processes and
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`setup` reads them and joins the process group (NCCL on
CUDA, gloo on CPU). Without them the run is one process and every collective
here is a no-op, so the training loop has a single code path.

How a step is split: every process computes the same list of global batches
(a pure function of the seed and the epoch) and takes every ``world_size``-th
row of each, starting at its rank. The loss of each process is its *sum* over
its rows divided by the number of units (examples or target tokens) of the
whole global step, and the gradients of the processes are summed, so N
processes compute exactly the gradient of one process with the same batch.

- ``ddp``: ``DistributedDataParallel`` over the model; it all-reduces only
  parameters that require a gradient, so with LoRA the frozen base is never
  communicated; a communication hook counts the bytes.
- ``fsdp``: PyTorch's ``fully_shard`` (FSDP2) on each transformer block and the
  root: the frozen base is sharded across processes and gathered layer by layer
  for forward and backward; only the adapters' gradients are reduce-scattered.
  The adapter and checkpoints are gathered into full tensors when saved.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


class Distributed:
    """Where this process stands (rank, world size, device) and the few collectives training needs."""

    def __init__(self, rank: int = 0, world_size: int = 1, mode: str = "ddp", owns_group: bool = False) -> None:
        self.rank, self.world_size, self.mode = rank, world_size, mode
        self.owns_group = owns_group  # False when the caller had already joined a process group
        self.bytes_reduced = 0  # gradient bytes this process sent into all-reduces (DDP)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return self.enabled and self.mode == "fsdp"

    # -- collectives (no-ops in one process) ------------------------------------------------------
    def all_reduce_sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def all_reduce_max(self, value: float, device: torch.device) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t.item())

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (picklable, small: metrics and predictions), on every process."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def gather_cat(self, values: torch.Tensor) -> torch.Tensor:
        """Every process's 1-D ``values`` (their lengths may differ), joined in rank order, on every process."""
        if not self.enabled:
            return values
        count = torch.tensor([values.numel()], device=values.device)
        counts = [torch.zeros_like(count) for _ in range(self.world_size)]
        torch.distributed.all_gather(counts, count)
        counts = [int(c) for c in counts]
        padded = torch.nn.functional.pad(values, (0, max(counts) - values.numel()))
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def shard(self, items: list) -> list:
        """This process's share of ``items``: every world_size-th one, starting at its rank."""
        return items[self.rank::self.world_size]

    # -- the model --------------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training forward goes through: ``model`` itself, a DDP wrapper, or ``model``
        sharded in place by FSDP. Call after the adapter is attached and the model is on its device."""
        if not self.enabled:
            return model
        if self.mode == "fsdp":
            return shard_with_fsdp(model, self.world_size)
        from torch.nn.parallel import DistributedDataParallel

        self._broadcast_trainable(model)  # the replicas must start equal; the frozen base is equal by loading
        # No buffer broadcast before every forward: the frozen base's buffers (position ids, a quantized
        # base's codes) are equal everywhere by loading, and would otherwise travel every step.
        # (torch 2.13 renamed broadcast_buffers, with a warning in every process for the old name)
        no_buffer_sync = {"forward_sync_buffers" if "forward_sync_buffers" in
                          inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers": False}
        ddp = DistributedDataParallel(model, init_sync=False, **no_buffer_sync,
                                      device_ids=[model_device(model)] if model_device(model).type == "cuda" else None)
        ddp.register_comm_hook(self, _counting_allreduce_hook)
        return ddp

    def _broadcast_trainable(self, model: nn.Module) -> None:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    torch.distributed.broadcast(p.data, src=0)

    @contextlib.contextmanager
    def accumulating(self, wrapped: nn.Module, last: bool) -> Iterator[None]:
        """Skip the gradient sync for all but the last micro-batch of an accumulated step."""
        if not self.enabled or last:
            if self.fsdp:
                wrapped.set_requires_gradient_sync(True)
            yield
        elif self.fsdp:
            wrapped.set_requires_gradient_sync(False)
            yield
        else:
            with wrapped.no_sync():
                yield

    def close(self, finished: bool = True) -> None:
        """Leave the process group we joined. After a finished run every process first waits for the
        others (process 0 still writes the summary), so none tears down its connections while a peer
        is still using them; a rare gloo abort at exit was seen without this wait."""
        if not (self.owns_group and torch.distributed.is_initialized()):
            return
        if finished:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


SINGLE = Distributed()


def setup(device_name: str, mode: str = "ddp") -> tuple[Distributed, torch.device | None]:
    """Join the process group torchrun describes; returns the context and the device this rank must use
    (None: decide as usual). One process when ``WORLD_SIZE`` is unset or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(mode=mode), None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device_name in ("auto", "cuda") and torch.cuda.is_available()) or device_name.startswith("cuda")
    if use_cuda:
        if device_name not in ("auto", "cuda"):
            raise ValueError(f"model.device {device_name!r}: under torchrun each process uses cuda:LOCAL_RANK; "
                             "set model.device to 'auto' or 'cuda'")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device(device_name if device_name != "auto" else "cpu")
        backend = "gloo"
    owns_group = not torch.distributed.is_initialized()
    if owns_group:
        # Long evaluations (generation) run between collectives: a generous timeout.
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    return Distributed(rank, world, mode, owns_group), device


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP wrapper (FSDP shards in place: nothing to unwrap)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def _counting_allreduce_hook(dist: Distributed, bucket):  # no annotation: DDP checks it literally
    # A sum, not DDP's default mean: each process's loss is already divided by the global step's units.
    buffer = bucket.buffer()
    dist.bytes_reduced += buffer.numel() * buffer.element_size()
    fut = torch.distributed.all_reduce(buffer, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def shard_with_fsdp(model: nn.Module, world_size: int) -> nn.Module:
    """FSDP2 on every transformer block (``models.transformer_blocks``) and on the root, so at most one
    block's full weights exist at a time."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lorafit.train.models import transformer_blocks

    device = model_device(model)
    mesh = init_device_mesh(device.type, (world_size,))
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    # The root too is resharded after each forward (not FSDP's default): otherwise its parameters stay
    # gathered after an evaluation, and loading the best weights would write into a temporary copy.
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)  # sum, as for DDP above
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
    return model


# -- sharded tensors <-> full tensors (checkpoints and the saved adapter) -----------------------------


def like_param(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a full tensor that every process read) laid out like ``param``: this process's shard
    when ``param`` is sharded by FSDP."""
    if not hasattr(param, "device_mesh"):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


LAUNCH_HELP = """\
Several processes (data parallel) with PyTorch's launcher; the same config, the global batch kept:
  one machine, N GPUs or CPU processes:
    torchrun --nproc-per-node N -m lorafit train CONFIG.toml
  M machines (run on each, with its --node-rank 0..M-1; output_dir on a file system all can read):
    torchrun --nnodes M --nproc-per-node N --node-rank K --rdzv-backend c10d \\
        --rdzv-endpoint HOST0:29500 --rdzv-id RUN_NAME -m lorafit train CONFIG.toml
  a base model too large for one device: add --set train.distributed=fsdp"""
