"""Checkpoints that let an interrupted run (even one killed with SIGKILL) resume to the same result.

A checkpoint is a directory ``checkpoints/step-000120/`` holding exactly what
the rest of the run depends on:

- ``trainable.safetensors``: every trainable parameter, by its name in the model
  (the adapter's factors and modules_to_save copies; all weights with ``method = "full"``); the float32
  master of a 16-bit one where the run keeps masters (``master_weights.py``)
- ``optimizer.safetensors`` + ``optimizer.json``: AdamW's moments and step counts, and its param groups
- ``scheduler.json``: the learning-rate schedule's position
- ``rng.safetensors`` + ``rng.json``: torch (CPU and CUDA), Python and NumPy random states
  (dropout draws from them); ``rng-rank<R>.*`` the same for process R of a distributed run
- ``state.json``: step, epoch, batches done in the epoch, best metric, early-stopping count

In a distributed run every process holds the same trainable weights and optimizer
state (FSDP shards are gathered into full tensors first); process 0 writes the
one checkpoint. Nothing is pickled. The directory is written under a temporary name and renamed
into place, then ``checkpoints/latest.json`` is replaced atomically to point at
it, and only then are older checkpoints deleted: at every instant the pointer
names a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lorafit.io import atomic_write, usual_mode, whole_tensor
from lorafit.train.distributed import SINGLE, Distributed, like_param
from lorafit.train.master_weights import MasterWeights

LATEST = "latest.json"
BEST = "best"


def atomic_write_text(target: Path, text: str) -> None:
    atomic_write(target, lambda p: Path(p).write_text(text, encoding="utf-8"))


def atomic_write_json(target: Path, data: Any) -> None:
    atomic_write_text(target, json.dumps(data, indent=2, sort_keys=True) + "\n")


def publish_dir(build: Callable[[Path], None], target: Path) -> None:
    """Build a directory under a temporary name, then swap it in for ``target`` (old copy removed last)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        usual_mode(tmp, directory=True)
        build(tmp)
        _fsync_tree(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not possible on every platform (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- pieces ------------------------------------------------------------------------


def trainable_tensors(model: torch.nn.Module, masters: MasterWeights | None = None) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole (a collective when FSDP shards them: every process must call); the
    float32 master in place of a 16-bit parameter that has one."""
    instead = masters.named() if masters else {}
    return {n: whole_tensor(instead.get(n, p).detach()).contiguous() for n, p in model.named_parameters()
            if p.requires_grad}


def load_trainable(model: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """The saved values into the model's trainable parameters (rounded to a 16-bit parameter's dtype);
    returns them as saved."""
    tensors = load_file(path)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ValueError(f"{path} does not match this run's trainable parameters (missing {missing[:3]}, "
                         f"unexpected {extra[:3]}); was the config changed?")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(p.shape) != tuple(tensors[name].shape):
                raise ValueError(f"{path}: {name} has shape {list(tensors[name].shape)}, the model {list(p.shape)}")
            p.copy_(like_param(tensors[name], p))
    return tensors


def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict] = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = whole_tensor(value.detach()).contiguous()
            else:
                other.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "state": other}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]  # state ids are positions here
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, _, name = key.partition(".")
        param = params[int(pid)]
        state.setdefault(int(pid), {})[name] = like_param(value, param) if value.shape == param.shape else value
    for pid, values in meta["state"].items():
        state.setdefault(int(pid), {}).update(values)
    groups = meta["param_groups"]
    for group in groups:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _rng_parts() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    meta: dict[str, Any] = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        meta["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return tensors, meta


def _load_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in meta:
        try:
            import numpy as np

            name, keys, pos, has_gauss, cached = meta["numpy"]
            np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        except ImportError:
            pass


# -- whole checkpoints -------------------------------------------------------------


def _rng_name(rank: int) -> str:
    return "rng" if rank == 0 else f"rng-rank{rank}"


def save_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, state: dict[str, Any],
                    dist: Distributed = SINGLE, masters: MasterWeights | None = None) -> Path:
    """Write the checkpoint for ``state["step"]``, point ``latest.json`` at it, drop older ones.

    Distributed: every process calls this (gathering is collective); process 0 writes."""
    root = run_dir / "checkpoints"
    name = f"step-{state['step']:07d}"
    trainable = trainable_tensors(model, masters)
    opt_tensors, opt_meta = _optimizer_parts(optimizer)
    rng_states = dist.gather_objects(_rng_parts())

    def build(tmp: Path) -> None:
        save_file(trainable, tmp / "trainable.safetensors", metadata={"format": "pt"})
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        (tmp / "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        for rank, (rng_tensors, rng_meta) in enumerate(rng_states):
            save_file(rng_tensors, tmp / f"{_rng_name(rank)}.safetensors")
            (tmp / f"{_rng_name(rank)}.json").write_text(json.dumps(rng_meta))
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))

    if dist.is_main:
        publish_dir(build, root / name)
        atomic_write_json(root / LATEST, {"checkpoint": name, "step": state["step"]})
        for old in root.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return root / name


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / json.loads(pointer.read_text())["checkpoint"]
    if not (path / "state.json").is_file():
        raise ValueError(f"{pointer} points at {path}, which is not a complete checkpoint")
    return path


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, dist: Distributed = SINGLE,
                    masters: MasterWeights | None = None) -> dict[str, Any]:
    """Restore weights (and their float32 ``masters``), optimizer, schedule and random states; return the saved
    loop state."""
    saved = load_trainable(model, path / "trainable.safetensors")
    if masters:
        masters.load(saved)
    _load_optimizer(optimizer, load_file(path / "optimizer.safetensors"),
                    json.loads((path / "optimizer.json").read_text()))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    state = json.loads((path / "state.json").read_text())
    rng = path / f"{_rng_name(dist.rank)}.safetensors"
    if rng.is_file():
        _load_rng(load_file(rng), json.loads(rng.with_suffix(".json").read_text()))
    else:  # resumed with more processes than the run had: the new ones start fresh random streams
        print(f"lorafit: {path} holds no random state for process {dist.rank}; it draws a new stream "
              "(dropout masks differ from an uninterrupted run)")
        torch.manual_seed(state["step"] * 1_000_003 + dist.rank)
    return state


def save_best(run_dir: Path, model: torch.nn.Module, info: dict[str, Any], dist: Distributed = SINGLE) -> None:
    trainable = trainable_tensors(model)

    def build(tmp: Path) -> None:
        save_file(trainable, tmp / "trainable.safetensors", metadata={"format": "pt"})
        (tmp / "best.json").write_text(json.dumps(info, indent=2, sort_keys=True))

    if dist.is_main:
        publish_dir(build, run_dir / "checkpoints" / BEST)
    dist.barrier()


def load_best(run_dir: Path, model: torch.nn.Module, step: int) -> None:
    path = run_dir / "checkpoints" / BEST
    info = json.loads((path / "best.json").read_text())
    if info.get("step") != step:
        raise ValueError(f"{path} holds the weights of step {info.get('step')}, but the run's best is step {step}")
    load_trainable(model, path / "trainable.safetensors")
