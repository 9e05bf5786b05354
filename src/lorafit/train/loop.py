"""The training loop: AdamW, warm-up + decay, accumulation, clipping, evaluation, checkpoints.

Everything the loop does after a checkpoint is a function of what the
checkpoint holds (weights, optimizer, schedule, random states, data position)
and of the seed, so a resumed run computes the same steps as one that was never
interrupted. The epoch's batch order comes from a generator seeded with
(seed, epoch), not from the global random state.

Under torchrun each process takes its share of every global batch (see
``distributed.py``); the loss is normalised by the units of the whole global
step and gradients are summed, so the processes together take the step one
process would take with the same batch.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafit.io import whole_tensor
from lorafit.kasa import kasa_loss
from lorafit.lorafa import LoraFAProjection
from lorafit.model import active_adapters, adapter_configs
from lorafit.optimizer_groups import optimizer_groups
from lorafit.train import checkpoint as ckpt
from lorafit.train.config import TrainSection
from lorafit.train.data import StreamedFeatures, steps_per_epoch, train_batches
from lorafit.train.distributed import SINGLE, Distributed
from lorafit.train.master_weights import MasterWeights
from lorafit.train.metrics import COMPLETIONS_FILE, MetricsLog
from lorafit.train.tasks import Task


@dataclass
class LoopState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    best_value: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evaluations in a row without improvement
    stopped_early: bool = False
    finished: bool = False
    train_tokens: int = 0
    train_rows: int = 0  # training rows the steps consumed (global micro-batches' rows, repeats counted)
    train_seconds: float = 0.0  # wall time spent in the loop, summed over resumed sessions
    eval_seconds: float = 0.0  # the part of train_seconds spent evaluating on the validation set
    last_eval_step: int = -1
    loss_scale: dict | None = None  # train.fp16: the loss scaler's state (torch.amp.GradScaler.state_dict)


def build_optimizer(model: nn.Module, t: TrainSection, masters: MasterWeights | None = None) -> torch.optim.AdamW:
    """AdamW on the trainable parameters, or on their float32 ``masters`` where there are some."""
    groups = optimizer_groups(model, t.lr, t.weight_decay, t.loraplus_lr_ratio, t.loraplus_lr_embedding)
    if not groups:
        raise ValueError("nothing to train: no parameter requires a gradient")
    if masters:
        groups = [{**g, "params": masters.for_optimizer(g["params"])} for g in groups]
    params = [p for g in groups for p in g["params"]]
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps, **adamw_kernel(params))


def adamw_kernel(params: Sequence[torch.Tensor]) -> dict[str, bool]:
    """fused where every tensor is on a CPU or CUDA device, else foreach.

    PyTorch's default is foreach on GPUs and the per-tensor loop on CPUs. A LoRA is hundreds of small
    tensors: the fused kernel updates each device's and dtype's tensors in one pass, where foreach runs an
    op per group and moment and the loop an op per tensor (``python -m benchmarks --only optimizer``).
    Other devices (MPS, XPU, ...) support fused for some dtypes only.
    """
    devices = _fused_devices()
    fused = bool(params) and all(p.device.type in devices and p.is_floating_point() for p in params)
    return {"fused": True} if fused else {"foreach": True}


def _fused_devices() -> tuple[str, ...]:
    """CPU and CUDA where this torch has fused AdamW kernels for them (the CPU's came after CUDA's)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        return ()
    return tuple(d for d in ("cpu", "cuda") if d in _get_fused_kernels_supported_devices())


def keeps_masters(t: TrainSection) -> bool:
    """Whether train.master_weights asks for float32 masters of this method's 16-bit trained parameters."""
    return t.master_weights == "on" or (t.master_weights == "auto" and t.method == "lora")


def master_weights_for(model: nn.Module, t: TrainSection) -> MasterWeights | None:
    """train.master_weights: the masters of the model's 16-bit trained parameters, or None."""
    return (MasterWeights(model) or None) if keeps_masters(t) else None


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): linear warm-up, then decay to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def build_scheduler(optimizer: torch.optim.Optimizer, total: int, t: TrainSection):
    warmup = t.warmup_steps or round(t.warmup_ratio * total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, t.scheduler))


def total_steps(n_rows: int, t: TrainSection, passes: int = 1) -> int:
    """The run's optimizer steps; ``passes``: steps per window of micro-batches (Task.passes_per_window)."""
    return t.max_steps or t.epochs * steps_per_epoch(n_rows, t.batch_size, t.grad_accum) * passes


def autocast_for(device: torch.device, t: TrainSection) -> Callable[[], contextlib.AbstractContextManager]:
    """train.bf16 / train.fp16: the forward and the loss under autocast in that dtype."""
    dtype = torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else None
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def fit(
    model: nn.Module,
    task: Task,
    train_features: Sequence[dict],
    eval_features: Sequence[dict],
    t: TrainSection,
    device: torch.device,
    run_dir: Path,
    log: MetricsLog,
    metric: str,
    resume_from: Path | None = None,
    callbacks: tuple[Callable[[dict], None], ...] = (),
    progress: bool = True,
    dist: Distributed = SINGLE,
) -> LoopState:
    """Train ``model`` in place; returns the final loop state. The best weights are in checkpoints/best.

    ``log`` is written by process 0 only (other processes may pass None)."""
    wrapped = dist.wrap(model)  # before the optimizer: FSDP replaces the parameters by shards
    masters = master_weights_for(model, t)
    optimizer = build_optimizer(model, t, masters)
    if t.lorafa:  # A was frozen when the adapter was attached
        stepped = (lambda p: masters.for_optimizer([p])[0]) if masters else (lambda p: p)
        LoraFAProjection(model, active_adapters(model), stepped).register(optimizer)
    passes = task.passes_per_window()
    total = total_steps(len(train_features), t, passes)
    scheduler = build_scheduler(optimizer, total, t)
    state = LoopState()
    samples_log = MetricsLog(run_dir / COMPLETIONS_FILE)
    if resume_from is not None:
        state = LoopState(**ckpt.load_checkpoint(resume_from, model, optimizer, scheduler, dist, masters))
        if dist.is_main:
            log.truncate_after(state.step)
            samples_log.truncate_after(state.step)
    if state.finished:
        return state
    run = _Session(model, wrapped, optimizer, scheduler, masters, task, train_features, eval_features, t, device,
                   run_dir, log, samples_log, metric, state, total, callbacks, dist,
                   _progress_bar(total, state.step, progress and dist.is_main))
    wrapped.train()
    while state.step < total and not state.stopped_early:
        batches = _Lookahead(train_batches(train_features, t.batch_size, t.seed, state.epoch, t.group_by_length,
                                           skip=state.batch_in_epoch))
        while batches.more() and state.step < total and not state.stopped_early:
            micro = run.micro_batches(batches.take(t.grad_accum))
            for i in range(passes):  # evaluations and checkpoints fall between windows (the config checks)
                if state.step >= total:
                    break
                loss = run.optimizer_step(micro, last_pass=i == passes - 1)
                run.after_step(loss)
        if state.stopped_early:
            break
        if not batches.more():
            run.end_epoch()
    run.finish()
    return state


class _Session:
    """One session of the loop (until the run ends or is interrupted): what a step, an evaluation and a
    checkpoint need, and the counters that are not saved (speed, the loss of the current log window)."""

    def __init__(self, model, wrapped, optimizer, scheduler, masters: MasterWeights | None, task: Task,
                 train_features: Sequence[dict], eval_features: Sequence[dict], t: TrainSection,
                 device: torch.device, run_dir: Path, log: MetricsLog, samples_log: MetricsLog, metric: str,
                 state: LoopState, total: int, callbacks, dist: Distributed, bar) -> None:
        self.model, self.wrapped, self.optimizer, self.scheduler = model, wrapped, optimizer, scheduler
        self.masters = masters
        self.task, self.eval_features, self.t, self.device = task, eval_features, t, device
        self.run_dir, self.log, self.samples_log = run_dir, log, samples_log
        self.metric, self.state, self.total = metric, state, total
        # a streamed split's length is unknown until it ends: its epoch counts whole
        self.batches_per_epoch = None if isinstance(train_features, StreamedFeatures) else \
            math.ceil(len(train_features) / t.batch_size)
        self.callbacks, self.dist, self.bar = callbacks, dist, bar
        self.autocast = autocast_for(device, t)
        # KaSA adapters train with their regularizers added to the task's loss, once a step
        self.kasa = any(c.kasa_config is not None for c in adapter_configs(model).values())
        # float16 gradients underflow without a scaled loss; the scaler skips steps whose gradients overflowed
        # and reads that back from the device each step (a host sync that bfloat16 and float32 runs do not make)
        self.scaler = torch.amp.GradScaler(device.type, enabled=t.fp16)
        if t.fp16 and state.loss_scale is not None:
            self.scaler.load_state_dict(state.loss_scale)
        self.params = [p for group in optimizer.param_groups for p in group["params"]]  # masters where any
        self.greater = task.greater_is_better(metric)
        self.evaluating = bool(eval_features)
        self.start, self.tokens = time.perf_counter(), 0  # this session's, for its speed
        self.window_loss, self.window_units = 0.0, 0  # since the last train log line
        self.pending = _Pending()  # the loss and tokens of the steps not yet read back from the device
        self.clock = time.perf_counter()  # train_seconds are counted up to here

    def micro_batches(self, window: list[list[dict]]) -> list[_Micro]:
        """``window``'s micro-batches: this process's rows of each, collated and sent to the device, with their
        units and tokens counted on the host; then the task's preparation (grpo samples and scores here)."""
        micro = []
        for rows in window:
            batch, real = _micro_batch(self.task, rows, self.dist)
            micro.append(_Micro(on_device(batch, self.device), real, self.task.num_units(batch) if real else 0,
                                int(batch["attention_mask"].sum()) if real else 0, len(rows)))
        self.tell_progress()
        with self.autocast():
            units = self.task.prepare_window(self.wrapped, [(m.batch, m.real) for m in micro], self.dist)
        for m, u in zip(micro, units or ()):
            m.units = u
        self.write_samples(self.state.step + 1, "train")  # the first step that trains on them
        return micro

    def write_samples(self, step: int, split: str) -> None:
        """What the task produced since the last call, every process's, to completions.jsonl (Task.take_samples:
        grpo's completions with task.log_completions)."""
        samples = self.task.take_samples()
        if samples is not None:
            records = [record for part in self.dist.gather_objects(samples) for record in part]
            if self.dist.is_main:  # an evaluation's in the split's order (its batches go longest first)
                records.sort(key=lambda record: record.get("example", 0))
                self.samples_log.extend({"step": step, "split": split, **record} for record in records)

    def tell_progress(self) -> None:
        """The task's view of where training stands (Task.training_progress)."""
        state = self.state
        epoch = state.epoch + (state.batch_in_epoch / self.batches_per_epoch if self.batches_per_epoch else 0.0)
        self.task.training_progress(state.step, self.total, epoch, self.dist.is_main)

    def optimizer_step(self, micro: list[_Micro], last_pass: bool = True) -> dict[str, Any]:
        """One optimizer step over the micro-batches of a window (gradients accumulated); returns its units, lr
        and gradient norm (a device tensor, or None without clipping). ``last_pass``: the last step on this
        window (Task.passes_per_window), after which the data position moves on.

        Nothing here waits for the device: the step's loss stays a device tensor (``_Pending``), the tokens
        are counted on the CPU batch, and batches reach a GPU from pinned memory without blocking. Reading a
        value back would make the host wait for the queued work each step, and the GPU would then sit idle
        while the host collates the next batch and issues its kernels."""
        t, state, dist = self.t, self.state, self.dist
        units = int(dist.all_reduce_sum([sum(m.units for m in micro)], self.device)[0])
        for j, m in enumerate(micro):
            with dist.accumulating(self.wrapped, last=j == len(micro) - 1):
                with self.autocast():
                    loss = self.task.loss_sum(self.wrapped, m.batch)
                if not m.real:
                    loss = loss * 0.0  # this process has no row here but must join the gradient sync
                scaled = loss / max(units, 1)
                if self.kasa and j == len(micro) - 1:
                    scaled = scaled + kasa_loss(self.model)
                self.scaler.scale(scaled).backward()
            if m.real:
                self.pending.add(loss, self.task.trained_tokens(m.tokens), state.step + 1)
        state.train_rows += sum(m.rows for m in micro)  # the global micro-batches' rows, each step's
        if self.masters:
            self.masters.take_grads()
        grad_norm = None
        if t.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.masters:
            self.masters.put_back()
        self.scheduler.step()
        # the masters' gradients are zeroed, not dropped: take_grads copies into them without allocating
        self.optimizer.zero_grad(set_to_none=not self.masters)
        state.step += 1
        if last_pass:
            state.batch_in_epoch += len(micro)
        self.window_units += units
        return {"units": units, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm}

    def read_back(self) -> float:
        """The loss and tokens of the steps since the last read, summed over the processes, into the log window
        and the counters; returns that loss sum. Every process calls this at the same steps (its sum is a
        collective). A non-finite loss stops the run here, before anything is saved."""
        first, last = self.pending.first_step, self.state.step
        loss, tokens = self.dist.all_reduce_sum(self.pending.take(), self.device)
        self.state.train_tokens += int(tokens)
        self.tokens += int(tokens)
        self.window_loss += loss
        if not math.isfinite(loss):
            steps = f"step {last}" if first in (None, last) else f"one of steps {first} to {last}"
            raise FloatingPointError(f"the loss became {loss} at {steps}; lower train.lr, or check the data "
                                     "(empty targets?)")
        return loss

    def task_log(self) -> dict[str, float]:
        """What the task reports of its training batches since the last log line (grpo: the samples' mean reward
        and length), over every process's batches; a collective."""
        report = getattr(self.task, "train_log", None)
        if report is None:
            return {}
        sums = report()
        names = list(sums)
        if self.dist.enabled:  # names a reward function logged may differ between processes (grpo's log_metric)
            names = list(dict.fromkeys(name for part in self.dist.gather_objects(names) for name in part))
        pairs = [v for name in names for v in sums.get(name, (0.0, 0.0))]
        totals = self.dist.all_reduce_sum(pairs, self.device)
        return {name: totals[2 * i] / max(totals[2 * i + 1], 1) for i, name in enumerate(names)}

    def after_step(self, step: dict[str, Any]) -> None:
        """The progress bar, the train log line, evaluation and checkpoint when due, the callbacks. Values are
        read back from the device only where a log line or a callback needs them."""
        t, state = self.t, self.state
        self.bar.update(1)
        step_loss = None
        if self.callbacks:  # they see every step's loss: read back each step
            step_loss = self.read_back() / max(step["units"], 1)
        if state.step % t.log_every == 0 or state.step == self.total:
            self.read_back()
            speed = self.tokens / max(time.perf_counter() - self.start, 1e-9)
            loss = self.window_loss / max(self.window_units, 1)
            task_log = self.task_log()
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{step['lr']:.2e}", tok_s=f"{speed:.0f}",
                                 **{name: f"{value:.3f}" for name, value in task_log.items()})
            # whole_tensor: under FSDP a collective, so every process reads the norm
            grad_norm = None if step["grad_norm"] is None else float(whole_tensor(step["grad_norm"]))
            if self.dist.is_main:
                record = {"type": "train", "step": state.step, "epoch": state.epoch, "loss": loss, "lr": step["lr"],
                          "tokens_per_s": speed}
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                record.update(task_log)
                self.log.write(record)
            self.window_loss, self.window_units = 0.0, 0
        evaluated = False
        if self.evaluating and t.eval_every and state.step % t.eval_every == 0:
            self.evaluate()
            evaluated = True
        if (t.save_every and state.step % t.save_every == 0) or (evaluated and not t.save_every):
            self.checkpoint()
        for callback in self.callbacks:
            callback({**asdict(state), "loss": step_loss, "lr": step["lr"]})

    def end_epoch(self) -> None:
        """The epoch's last batch is done: the next epoch starts; evaluation / checkpoint per epoch when no
        step interval is set."""
        t, state = self.t, self.state
        state.epoch += 1
        state.batch_in_epoch = 0
        if self.evaluating and not t.eval_every:
            self.evaluate()
        if not t.save_every and not t.eval_every:
            self.checkpoint()

    def finish(self) -> None:
        if self.evaluating and self.state.last_eval_step != self.state.step:
            self.evaluate()  # the final weights are always compared with the best so far
        self.state.finished = True
        self.checkpoint()
        self.bar.close()

    def checkpoint(self) -> None:
        self.read_back()
        self.state.train_seconds += time.perf_counter() - self.clock
        self.clock = time.perf_counter()
        if self.scaler.is_enabled():
            self.state.loss_scale = self.scaler.state_dict()
        ckpt.save_checkpoint(self.run_dir, self.model, self.optimizer, self.scheduler, asdict(self.state), self.dist,
                             self.masters)

    def evaluate(self) -> None:
        """Validation metrics now; the best weights saved when they improved, early stopping counted."""
        t, state, dist = self.t, self.state, self.dist
        self.read_back()
        self.tell_progress()
        started = time.perf_counter()
        metrics = self.task.evaluate(self.model, self.eval_features, self.device, t.eval_batch_size, self.autocast,
                                     dist)
        state.eval_seconds += time.perf_counter() - started
        self.write_samples(state.step, "validation")
        self.wrapped.train()
        state.last_eval_step = state.step
        value = metrics[self.metric]
        improved = state.best_value is None or (value > state.best_value if self.greater else value < state.best_value)
        if improved:
            state.best_value, state.best_step, state.bad_evals = value, state.step, 0
            ckpt.save_best(self.run_dir, self.model, {"step": state.step, "metric": self.metric, "value": value}, dist)
        else:
            state.bad_evals += 1
            if t.early_stopping_patience and state.bad_evals >= t.early_stopping_patience:
                state.stopped_early = True
        if dist.is_main:
            self.log.write({"type": "eval", "split": "validation", "step": state.step, "epoch": state.epoch,
                            **metrics})
            self.bar.write(f"step {state.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                           + ("  (best)" if improved else ""))


class _Pending:
    """The summed loss (a device tensor) and token count of the steps since the last read-back."""

    def __init__(self) -> None:
        self.loss: torch.Tensor | None = None
        self.tokens = 0
        self.first_step: int | None = None  # the first of those steps (1-based, as logged)

    def add(self, loss: torch.Tensor, tokens: int, step: int) -> None:
        loss = loss.detach().float()
        self.loss = loss if self.loss is None else self.loss + loss
        self.tokens += tokens
        if self.first_step is None:
            self.first_step = step

    def take(self) -> list[float]:
        """[loss, tokens] as numbers (the one wait for the device), and a fresh start."""
        out = [0.0 if self.loss is None else float(self.loss), float(self.tokens)]
        self.loss, self.tokens, self.first_step = None, 0, None
        return out


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on ``device``. To a GPU they go from pinned memory with non_blocking: a copy from
    pageable memory would wait for every kernel already queued."""
    if device.type != "cuda":
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    # values that are not tensors (grpo's prompt messages) stay on the host
    return {k: v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


@dataclass
class _Micro:
    """A micro-batch of a step: the batch on the device, whether this process has rows in it, its units and
    tokens (counted on the host) and the global micro-batch's rows."""
    batch: dict
    real: bool
    units: int
    tokens: int
    rows: int


def _micro_batch(task: Task, rows: list[dict], dist: Distributed) -> tuple[dict, bool]:
    """This process's rows of a global micro-batch, collated; (a row of it, False) when it has none."""
    mine = dist.shard(rows)
    if mine:
        return task.collate(mine), True
    return task.collate(rows[:1]), False


class _Lookahead:
    """An epoch's batches, read as needed, knowing whether another one follows (the epoch's end)."""

    def __init__(self, batches: Iterator[list[dict]]) -> None:
        self.batches, self.next = batches, list(itertools.islice(batches, 1))

    def more(self) -> bool:
        return bool(self.next)

    def take(self, n: int) -> list[list[dict]]:
        out = self.next + list(itertools.islice(self.batches, n - len(self.next)))
        self.next = list(itertools.islice(self.batches, 1))
        return out


def _progress_bar(total: int, initial: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, leave=True)


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...

    def write(self, text: str) -> None:
        print(text)
