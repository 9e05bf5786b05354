"""One training run from config to output directory, and ``evaluate`` / ``merge`` of a finished run.

Everything that can be wrong with the input (config, files, fields, labels,
model, lengths, an occupied output directory) is checked before the first byte
is written, so a run that fails on bad input leaves the disk as it was.

Output directory::

    config.toml          the config used (rerun it with `lorafit train OUT/config.toml`)
    adapter/             the adapter, PEFT format (method = "lora")
    model/               the fine-tuned model + tokenizer, save_pretrained format (method = "full")
    data.json            where each split came from, the class names, rows per split (a stream's: null)
    metrics.jsonl        one line per log / evaluation
    completions.jsonl    grpo with task.log_completions: one line per sampled completion (training, evaluation)
    curves.png           loss and validation metric against the step
    summary.json         trainable parameters, peak memory, wall time, best and final metrics
    checkpoints/         the latest resumable state, and the best weights

Under torchrun (see ``distributed.py``) every process runs this same function;
process 0 alone writes the output directory.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import itertools
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lorafit
from lorafit.config import modifies_base_weight
from lorafit.io import LABELS_NAME, WEIGHTS_NAME
from lorafit.kernels import triton_warmup
from lorafit.lorafa import LoraFAProjection
from lorafit.targeting import SEQ_CLS_HEADS
from lorafit.train import allocator, distributed
from lorafit.train import checkpoint as ckpt
from lorafit.train.config import CONFIG_FILE, TASKS, RunConfig, TrainSection, load_config
from lorafit.train.data import HELD_OUT, Splits, StreamedFeatures, label_set, load_splits, streamed, train_batches
from lorafit.train.distributed import SINGLE, Distributed
from lorafit.train.loop import LoopState, fit, keeps_masters, on_device, total_steps
from lorafit.train.master_weights import SIXTEEN_BIT
from lorafit.train.metrics import (
    COMPLETIONS_FILE,
    BestEval,
    MetricsLog,
    ParamCounts,
    RunSummary,
    format_summary,
    peak_memory,
    plot_curves,
    read_metrics,
)
from lorafit.train.models import (
    ModelSource,
    check_max_length,
    load_model,
    load_tokenizer,
    progress_bars,
    resolve_model,
    transformer_blocks,
)
from lorafit.train.neftune import add_embedding_noise
from lorafit.train.reference import with_reference
from lorafit.train.tasks import Task, build_task, encode_dataset, task_class

RUN_MARKERS = (CONFIG_FILE, "checkpoints", "summary.json", "metrics.jsonl")


@dataclass
class Prepared:
    config: RunConfig
    source: ModelSource
    model: nn.Module
    tokenizer: Any
    task: Task
    splits: Splits
    labels: list | None
    device: torch.device
    float16_autocast: bool = False  # set by _train_in_float32: float16 weights train under train.fp16's autocast

    def train_settings(self) -> TrainSection:
        """config.train as the loop runs it: with train.fp16 on where float16 weights need it (the saved config
        keeps what was asked for, so a resumed run compares equal)."""
        t = self.config.train
        return dataclasses.replace(t, fp16=True) if self.float16_autocast else t


@dataclass(frozen=True)
class ArgNames:
    """What error messages call the caller's arguments: Python's keyword arguments, or the CLI's flags."""

    resume: str = "resume=True"
    overwrite: str = "overwrite=True"
    overrides: str = "overrides"
    set_one: str = "overrides=[{!r}]"  # how to pass one override, e.g. data.test=FILE
    base: str = "base=True"
    adapter: str = "adapter=DIR"
    samples: str = "samples"


PYTHON_ARGS = ArgNames()
CLI_ARGS = ArgNames(resume="--resume", overwrite="--overwrite", overrides="--set", set_one="--set {}", base="--base",
                    adapter="--adapter", samples="--samples")


def _as_config(config: RunConfig | str | os.PathLike | dict, overrides, names: ArgNames = PYTHON_ARGS) -> RunConfig:
    """A RunConfig (copied: the caller's object is left as it was), a TOML path or a dict, with overrides."""
    if isinstance(config, RunConfig):
        config = copy.deepcopy(config)
        if overrides:
            config.apply_overrides(overrides, source=names.overrides)
        else:
            config.validate("config")  # its fields may have been set one by one, unchecked
        return config
    if not isinstance(config, (str, os.PathLike, dict)):
        raise TypeError(f"config must be a RunConfig, the path of a TOML file or a dict of its sections, got "
                        f"{type(config).__name__}")
    return load_config(config, overrides, overrides_source=names.overrides)


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except Exception as exc:  # RuntimeError or AssertionError, depending on the backend
        raise ValueError(f"model.device {name!r} is not usable: {' '.join(str(exc).split())}") from None
    return device


def prepare(config: RunConfig, model: nn.Module | None = None, tokenizer: Any = None,
            device: torch.device | None = None) -> Prepared:
    """Data, labels, tokenizer and model, all checked. Writes nothing."""
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    if config.train.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if config.train.keep_freed_memory:
        allocator.keep_freed_memory()
    device = device or select_device(config.model.device)
    lora_dropout = config.lora.get("lora_dropout", 0) if config.train.method == "lora" else 0
    if device.type == "cuda" and ((isinstance(lora_dropout, (int, float)) and lora_dropout > 0)
                                  or config.train.model_dropout == "hashed"):
        triton_warmup.start(device)  # its start-up (seconds) overlaps loading data and model, not the first steps
    splits = load_splits(config)
    labels = label_set(config, splits) if config.task.type == "classification" else None
    if model is not None and tokenizer is not None:
        # Nothing to load: the name only labels the base in the adapter's config, so a hub name must not
        # need the hub (offline, HF_HUB_OFFLINE=1).
        source = ModelSource(config.model.name)
    else:
        source = resolve_model(config.model.name)
    if tokenizer is None:
        tokenizer = load_tokenizer(source)
    if model is None:
        torch.manual_seed(config.train.seed)  # a new classification head is initialised here
        model = load_model(source, config.task.type, config.model.dtype, labels)
    check_max_length(model, config.task.max_length)
    if config.task.type in ("classification", "reward") and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers pool at the last non-pad token
    task = build_task(config, tokenizer, labels)
    return Prepared(config, source, model, tokenizer, task, splits, labels, device)


def encode_split(prep: Prepared, split: str) -> Sequence[dict]:
    """The split's examples in tokens: an Arrow-backed FeatureTable (tokenized once, cached between runs), a
    StreamedFeatures for a streamed training split, or [] when the split has no data."""
    rows = getattr(prep.splits, split)
    if streamed(rows):
        t = prep.config.train
        return StreamedFeatures(rows, lambda chunk: prep.task.encode(chunk, split).features,
                                t.max_steps * t.batch_size * t.grad_accum, prep.config.data.shuffle_buffer)
    if not len(rows):
        return []
    features, skipped = encode_dataset(prep.task, rows, split)
    if skipped:
        print(f"lorafit: {skipped} of {len(rows)} {split} rows skipped: {prep.task.skipped_because} "
              f"task.max_length = {prep.config.task.max_length}")
    if not len(features):
        raise ValueError(f"{prep.splits.sources[split]}: no usable {split} rows (empty data set after encoding; "
                         f"task.max_length = {prep.config.task.max_length})")
    return features


def quantize_for(prep: Prepared) -> None:
    """model.quantize: the frozen base's linear layers in NF4 / int8, heads and modules_to_save kept as they are."""
    bits = prep.config.model.quantize
    if not bits:
        return
    from lorafit.quantize import QuantizedLinear, quantize_base

    if {m.bits for m in prep.model.modules() if isinstance(m, QuantizedLinear)} == {bits}:
        return  # already quantized so (by an earlier train() on this model object)
    keep = ("lm_head",) + SEQ_CLS_HEADS + tuple(prep.config.lora_config().modules_to_save or ())
    try:
        quantize_base(prep.model, bits=bits, skip=keep, device=prep.device)  # where the model will run
    except ValueError as exc:
        raise ValueError(f"model.quantize = {bits}: {exc}") from None


def _train_in_float32(prep: Prepared) -> None:
    """Every trained parameter (factors, modules_to_save copies, trained biases) in float32, as PEFT keeps
    adapters, for a 16-bit base under mixed precision; autocast gives them and the base one compute dtype.

    A float16 base always: AdamW's moments underflow in float16 (squared gradients below 6e-8 become 0, and so
    does its eps: NaN within the first steps), so its steps run under autocast, in float16 with loss scaling
    (train.fp16) unless train.bf16 is set. A bfloat16 base under train.bf16: bfloat16 has the range but not the
    precision (an update below half its ulp, 6e-5 at a weight of 0.02, is lost), and autocast is on anyway."""
    for p in prep.model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    t = prep.config.train
    if not (t.bf16 or t.fp16):
        if t.distributed == "fsdp":
            raise ValueError("model.dtype: float16 weights train under float16 autocast with loss scaling, which "
                             "train.distributed = 'fsdp' does not support: set train.bf16 = true, or use "
                             "model.dtype = 'bfloat16'")
        prep.float16_autocast = True


# EVA (init_lora_weights = "eva") reads at most this many training batches, fewer once its components settle
EVA_BATCHES = 64
# LoRA-GA (init_lora_weights = "lora_ga") averages the gradients of this many training batches
LORA_GA_BATCHES = 8
# CorDA (init_lora_weights = "corda") takes its input covariances from this many (forward passes only)
CORDA_BATCHES = 32
# initialisations whose adapter fits only the residual base they leave, which takes their data to make again: the
# run saves the adapter as a plain LoRA of the original weights (as_plain_lora)
RESIDUAL_FROM_DATA = ("lora_ga", "corda")


# an aLoRA run looks for its invocation in at most this many training rows before it trains
INVOCATION_ROWS = 2000


def _task_loss(prep: Prepared) -> Callable[[nn.Module, dict], torch.Tensor]:
    """A batch's mean loss as a training step computes it (the task's loss, under the run's autocast)."""
    autocast = _autocast(prep)

    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        units = max(prep.task.num_units(batch), 1)
        with autocast():
            return prep.task.loss_sum(model, on_device(batch, prep.device)) / units
    return loss


def check_invocation(tokens: list[int], rows: Sequence[dict]) -> None:
    """An aLoRA adapter trains only on tokens from its invocation on: a row without the invocation trains nothing,
    and a run in which no row has it would train nothing at all. Tokenized alone, an invocation string can come
    out other than inside a row (tokens merge across its edges), which is the usual way to get there."""
    if streamed(rows) or not len(rows):
        return  # a streamed split is read once, in training
    checked = min(len(rows), INVOCATION_ROWS)
    n = len(tokens)
    missing = sum(not any(list(ids[i:i + n]) == tokens for i in range(len(ids) - n + 1))
                  for ids in (rows[j]["input_ids"] for j in range(checked)))
    advice = ("take the ids from a tokenized training row (or start the invocation with a special token, which "
              "does not merge)")
    if missing == checked:
        raise ValueError(f"lora.alora_invocation_tokens = {tokens} appears in none of the first {checked} training "
                         f"rows, so the aLoRA adapter would train nothing; {advice}")
    if missing:
        warnings.warn(f"lora.alora_invocation_tokens = {tokens} is missing from {missing} of the first {checked} "
                      f"training rows, which then train nothing; {advice}", stacklevel=2)


def apply_method(prep: Prepared, train_rows: Sequence[dict] = ()) -> Callable[[], None]:
    """The model made ready to train by train.method (and model.quantize, train.model_dropout,
    train.neftune_noise_alpha, train.gradient_checkpointing, train.compile), on its device. Returns what puts the
    model's own dropout modules, embedding forward and uncompiled blocks back: a caller's model= leaves the run as
    it came, adapter aside.
    ``train_rows``: the encoded training rows, which an EVA initialisation runs the model on."""
    model = prep.model
    dtypes = {p.dtype for p in model.parameters()}
    float16 = torch.float16 in dtypes
    if prep.config.train.method == "lora":
        lora = prep.config.lora_config(base_model=prep.source.path)
        if lora.alora_invocation_tokens is not None:
            check_invocation(lora.alora_invocation_tokens, train_rows)
        # PiSSA, OLoRA and LoftQ start from the full-precision weights and rewrite them; what they leave is
        # quantized after (QLoRA's order otherwise: the adapter starts on the quantized base)
        rewrites_base = modifies_base_weight(lora.init_lora_weights)
        if not rewrites_base:
            quantize_for(prep)
        torch.manual_seed(prep.config.train.seed + 1)  # the A factors' random init (LoRA-GA's: its SVD's draws)
        if lora.init_lora_weights in ("eva", "lora_ga", "corda"):
            model.to(prep.device)  # computed where the model runs
            # batches as the data module reads them (a streamed split too), in the run's seeded order
            rows = train_batches(train_rows, prep.config.train.batch_size, prep.config.train.seed, 0,
                                 group_by_length=False)

            def batches(n: int):
                return (prep.task.collate(r) for r in itertools.islice(rows, n))

            if lora.init_lora_weights == "eva":
                lorafit.attach_eva(model, lora, batches(EVA_BATCHES))
            elif lora.init_lora_weights == "lora_ga":
                lorafit.attach_lora_ga(model, lora, batches(LORA_GA_BATCHES), loss=_task_loss(prep))
            else:  # the layers' inputs as the task's training forward gives them
                lorafit.attach_corda(model, lora, batches(CORDA_BATCHES), forward=_task_loss(prep))
        else:
            lorafit.attach(model, lora)
        if rewrites_base:
            quantize_for(prep)
        if float16 or (prep.config.train.bf16 and torch.bfloat16 in dtypes):
            _train_in_float32(prep)
        if prep.config.train.lorafa:
            LoraFAProjection(model, lorafit.active_adapters(model)).freeze_a()  # before DDP/FSDP see what trains
    elif float16:
        raise ValueError("model.dtype: full fine-tuning would update float16 weights in place, and AdamW's moments "
                         "underflow in float16 (NaN within the first steps); use 'bfloat16', or 'float32' with "
                         "train.fp16 = true")
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    put_backs = []  # what gives the model its own modules and forwards back, undone last first
    if prep.config.train.model_dropout == "hashed":
        put_backs.append(_use_hashed_dropout(model))
    if prep.config.train.neftune_noise_alpha:
        put_backs.append(add_embedding_noise(model, prep.config.train.neftune_noise_alpha))

    def put_back() -> None:
        for undo in reversed(put_backs):
            undo()

    try:
        model.to(prep.device)
        if prep.config.train.gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise ValueError(f"train.gradient_checkpointing: {type(model).__name__} does not support it")
            if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.25 renamed it, warning on the old
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model.config, "use_cache"):
                model.config.use_cache = False
        if prep.config.train.compile:
            put_backs.append(_compile_blocks(model, prep.config.train.compile_backend))
    except BaseException:
        put_back()
        raise
    return put_back


def _compile_blocks(model: nn.Module, backend: str) -> Callable[[], None]:
    """train.compile: each transformer block compiled in place with torch.compile, before any sharding (what
    FSDP2 expects). Blocks, not the whole model: a block's graph is the same in every layer, and the loss and
    the model's masking code, which read shapes back to the host, stay outside the graphs. Returns what takes
    the compiled forwards off again. The config has checked the backend's name."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"train.compile: found no transformer blocks in {type(model).__name__} (no "
                         "_no_split_modules, no list of layers of one class); set train.compile = false")
    for block in blocks:
        block.compile(backend=backend)

    def put_back() -> None:
        for block in blocks:
            block._compiled_call_impl = None  # what nn.Module.compile set

    return put_back


def _use_hashed_dropout(model: nn.Module) -> Callable[[], None]:
    """lorafit's hashed dropout in place of the model's ``nn.Dropout`` modules; returns what puts them back."""
    originals = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
                 if type(child) is nn.Dropout]
    lorafit.use_hashed_dropout(model)

    def put_back() -> None:
        for parent, name, original in originals:
            original.train(getattr(parent, name).training)
            setattr(parent, name, original)

    return put_back


def run_kind(out: Path) -> str:
    """'none' (free to use), 'run' (a lorafit run) or 'other' (a non-empty directory of something else)."""
    if not out.exists():
        return "none"
    if not out.is_dir():
        raise ValueError(f"output_dir {str(out)!r} exists and is a file")
    entries = list(out.iterdir())
    if not entries:
        return "none"
    return "run" if any((out / m).exists() for m in RUN_MARKERS) else "other"


def _check_output(config: RunConfig, resume: bool, overwrite: bool,
                  names: ArgNames = PYTHON_ARGS) -> tuple[Path, Path | None]:
    """The output directory and the checkpoint to resume from; refuses to clobber a run."""
    if resume and overwrite:
        raise ValueError(f"{names.resume} continues the run in output_dir and {names.overwrite} replaces it; "
                         "pick one")
    out = Path(config.output_dir).expanduser()
    kind = run_kind(out)
    if kind == "other" and not overwrite:
        raise ValueError(f"output_dir {str(out)!r} is not empty and holds no lorafit run; choose a new directory "
                         f"(or pass {names.overwrite} to replace its contents)")
    if kind == "run" and not (resume or overwrite):
        raise ValueError(f"output_dir {str(out)!r} already holds a run; pass {names.resume} to continue it or "
                         f"{names.overwrite} to replace it (or choose another output_dir)")
    if not (resume and kind == "run"):
        return out, None
    saved = out / CONFIG_FILE
    if saved.is_file():
        before = load_config(saved).to_dict()
        now = config.to_dict()
        changed = _diff(before, now)
        if changed:
            raise ValueError(f"{names.resume}: the config differs from the one {str(out)!r} was started with "
                             f"({'; '.join(changed[:5])}); resume with the same config and {names.overrides} "
                             "values")
    if (out / "summary.json").is_file() and not (out / "checkpoints").exists():
        raise ValueError(f"{str(out)!r} holds a finished run without checkpoints; nothing to resume")
    return out, ckpt.latest_checkpoint(out)


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}: {x!r} -> {y!r}")
    return out


class TrainResult(dict):
    """What ``train`` returns: the run's summary as the dict also written to ``summary.json`` (``result.summary``
    holds it as a ``RunSummary``: the fields with their types and meaning), and as attributes the trained
    ``model`` (adapter attached; in eval mode), its ``tokenizer`` and, for classification, the class names
    ``labels`` in the order of the model's outputs.

    The attributes hold the model, not a copy: keep ``dict(result)`` where only the numbers are needed
    (a sweep that keeps every result would otherwise keep every model in memory)."""

    def __init__(self, summary: RunSummary | dict[str, Any], model: nn.Module | None = None, tokenizer: Any = None,
                 labels: list | None = None) -> None:
        # processes other than 0 under torchrun return their final metrics only, a plain dict
        super().__init__(summary.to_dict() if isinstance(summary, RunSummary) else summary)
        self.summary = summary if isinstance(summary, RunSummary) else None
        self.model, self.tokenizer, self.labels = model, tokenizer, labels


def train(
    config: RunConfig | str | os.PathLike | dict[str, Any],
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    callbacks: tuple[Callable[[dict], None], ...] = (),
    progress: bool = True,
    arg_names: ArgNames = PYTHON_ARGS,
) -> TrainResult:
    """Run a training job; returns its summary (also in ``OUTPUT_DIR/summary.json``) with the trained model.

    ``config`` is a ``RunConfig`` (not changed), the path of a TOML file, or a dict with the file's shape
    (``{"output_dir": ..., "model": {"name": ...}, "data": {...}, "train": {...}}``), checked like a file;
    ``overrides`` are ``"key=value"`` strings or a ``{"train.lr": 1e-4}`` dict. ``resume`` continues the run
    in ``output_dir`` from its latest checkpoint; ``overwrite`` replaces a previous run there (only once the
    new run's inputs have passed every check). Each of ``callbacks`` is called with the loop state after
    every optimizer step, its ``loss`` included (which makes each step wait for the device to read it).
    ``arg_names`` only changes how errors name these arguments (the ``lorafit``
    command passes ``CLI_ARGS``).

    ``model`` / ``tokenizer`` replace loading ``model.name`` (which still names the base in the adapter's
    config). The model must be a Hugging Face ``PreTrainedModel`` for the task (a sequence classifier with
    one output per class, a causal LM or a seq2seq LM); a plain ``nn.Module`` is refused before anything is
    written (train those with ``lorafit.attach`` and a loop of your own). The model is trained in place, not
    copied: afterwards it carries the trained adapter ``"default"`` (the weights saved in ``adapter/``) and is
    in eval mode, ready to predict; with ``model.quantize`` its base is quantized, with ``train.method =
    "full"`` its own weights are trained; ``train.model_dropout = "hashed"`` swaps its dropout modules for the
    run only (its own are back afterwards). Calling ``train`` again with the same model starts from the base
    again: the adapter an earlier ``train`` attached is taken off first (a quantized base stays quantized,
    so ``model.quantize`` must stay the same; after a full fine-tuning the next run starts from the tuned
    weights, with a warning). Adapters attached by other code are refused, as is a head whose size differs
    from the number of classes. A tokenizer without a pad token gets its eos (or unk) token as one.
    """
    wall_start = time.perf_counter()
    config = _as_config(config, overrides, arg_names)
    dist, device = distributed.setup(config.model.device, config.train.distributed)
    finished = False
    try:
        with progress_bars(progress):
            result = _train(config, dist, device, wall_start, resume=resume, overwrite=overwrite, model=model,
                            tokenizer=tokenizer, callbacks=callbacks, progress=progress, arg_names=arg_names)
        finished = True
        return result
    finally:
        dist.close(finished)


# -- a model and tokenizer passed in (train(model=, tokenizer=)) --------------------------

TRAINED_BY = "_lorafit_train"  # in model.__dict__: what an earlier train() did to this model
_TASK_MODELS = {"classification": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "a sequence classifier",
                                   "AutoModelForSequenceClassification"),
                "causal_lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "a causal LM", "AutoModelForCausalLM"),
                "preference": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "a causal LM", "AutoModelForCausalLM"),
                "kto": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "a causal LM", "AutoModelForCausalLM"),
                "grpo": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "a causal LM", "AutoModelForCausalLM"),
                "reward": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "a sequence classifier with one output "
                           "(num_labels=1)", "AutoModelForSequenceClassification"),
                "seq2seq": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "an encoder-decoder (seq2seq) LM",
                            "AutoModelForSeq2SeqLM")}


def _model_kinds() -> dict[str, set[str]]:
    """The model classes transformers registers per kind: our three tasks, plus "bare" (no task head)."""
    from transformers.models.auto import modeling_auto

    def names(mapping: str) -> set[str]:
        values = getattr(modeling_auto, mapping, {}).values()
        return {n for v in values for n in ((v,) if isinstance(v, str) else v)}

    kinds = {task: names(mapping) for task, (mapping, _, _) in _TASK_MODELS.items()}
    kinds["bare"] = names("MODEL_MAPPING_NAMES")
    return kinds


def check_given_model(config: RunConfig, model: Any, tokenizer: Any) -> None:
    """Whether ``train(model=..., tokenizer=...)`` can train these for ``task.type``; before anything is loaded
    or written. A tokenizer without a pad token gets one, as lorafit's own do."""
    if model is not None:
        _check_model_kind(config, model)
    if tokenizer is not None and getattr(tokenizer, "pad_token", "") is None:
        # As for lorafit's own tokenizers: padded positions are masked out of attention and loss.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if tokenizer.pad_token is None:
            raise ValueError("tokenizer= has no pad, eos or unk token to pad batches with; set tokenizer.pad_token")


def _check_model_kind(config: RunConfig, model: Any) -> None:
    task = config.task.type
    _, kind, auto = _TASK_MODELS[task]
    if not isinstance(model, nn.Module) or not hasattr(model, "config") or not callable(
            getattr(model, "get_input_embeddings", None)):
        what = f"a plain {type(model).__name__} (torch.nn.Module)" if isinstance(model, nn.Module) \
            else f"a {type(model).__name__}"
        raise ValueError(f"model= must be a Hugging Face transformers model (a PreTrainedModel, with a .config) for "
                         f"task.type = {task!r}: {kind}, e.g. {auto}.from_pretrained(...); got {what}. "
                         "For any other nn.Module use the library directly: lorafit.attach(model, "
                         "lorafit.LoraConfig(...)), your own training loop, lorafit.save_adapter(model, DIR)")
    # Refused: the mix-ups people make (a causal LM to classify, a bare encoder without a head); a class
    # transformers does not register (a model of one's own) gets the benefit of the doubt.
    cls, kinds = type(model).__name__, _model_kinds()
    if cls not in kinds[task]:
        other = next((k for k in ("classification", "causal_lm", "seq2seq", "bare") if cls in kinds[k]), None)
        if other is not None:
            was = "a bare model without a task head" if other == "bare" else _TASK_MODELS[other][1]
            raise ValueError(f"model= is a {cls}, {was}; task.type = {task!r} needs {kind}, e.g. "
                             f"{auto}.from_pretrained(...)")
    earlier = model.__dict__.get(TRAINED_BY)
    attached = list(lorafit.adapter_configs(model))
    foreign = [n for n in attached if not earlier or n != earlier.get("adapter")]
    if foreign:
        raise ValueError(f"model= carries lorafit adapters {foreign} that train() did not attach; train() attaches "
                         "and trains its own. Pass the base model (lorafit.unload(model) takes adapters off)")
    if earlier and earlier["quantize"] not in (0, config.model.quantize) and config.train.method == "lora":
        raise ValueError(f"model= was quantized by an earlier train() (model.quantize = {earlier['quantize']}); its "
                         f"base cannot be quantized otherwise now (model.quantize = {config.model.quantize}): keep "
                         f"model.quantize = {earlier['quantize']} or load the model again")
    if earlier and earlier["quantize"] and config.train.method == "full":
        raise ValueError("model= was quantized by an earlier train() (model.quantize = "
                         f"{earlier['quantize']}); train.method = 'full' needs unquantized weights: load it again")


def _head_size(model: nn.Module) -> tuple[int, str] | None:
    """The number of outputs of a classifier's head and where it was found."""
    for name in SEQ_CLS_HEADS:
        head = getattr(model, name, None)
        head = getattr(head, "original_module", head)  # an earlier train()'s ModulesToSave wrapper
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if isinstance(head, nn.Module) else []
        if linears:
            return linears[-1].out_features, f"model.{name}"
    num_labels = getattr(model.config, "num_labels", None)
    return (num_labels, "model.config.num_labels") if isinstance(num_labels, int) else None


def check_given_fits(prep: Prepared, model_given: bool, tokenizer_given: bool) -> None:
    """A given model's head against the data's classes, a given tokenizer against the model's vocabulary."""
    if model_given and prep.config.task.type == "classification":
        n, head = len(prep.labels), _head_size(prep.model)
        if head is not None and head[0] != n:
            shown = ", ".join(map(str, prep.labels[:6])) + (", ..." if n > 6 else "")
            raise ValueError(f"model= has a classification head with {head[0]} outputs ({head[1]}) but the data has "
                             f"{n} classes ({shown}); load the model with num_labels={n}, e.g. "
                             f"AutoModelForSequenceClassification.from_pretrained(..., num_labels={n}), or leave "
                             "model= out and lorafit builds a head of the right size from model.name")
    if model_given and prep.config.task.type == "reward":
        head = _head_size(prep.model)
        if head is not None and head[0] != 1:
            raise ValueError(f"model= has a classification head with {head[0]} outputs ({head[1]}); a reward model "
                             "scores with one: load it with AutoModelForSequenceClassification.from_pretrained(..., "
                             "num_labels=1), or leave model= out and lorafit builds one from model.name")
    if model_given or tokenizer_given:
        embeddings = prep.model.get_input_embeddings()
        rows = getattr(embeddings, "num_embeddings", None)
        if isinstance(rows, int) and len(prep.tokenizer) > rows:
            raise ValueError(f"the tokenizer has {len(prep.tokenizer)} tokens but the model's input embedding has "
                             f"{rows} rows, so token ids from {rows} on would fail inside the model: pass the "
                             "tokenizer the model was trained with (or resize the model's embeddings first, "
                             "model.resize_token_embeddings(len(tokenizer)))")


def _take_off_earlier_run(model: nn.Module) -> None:
    """A model trained by an earlier train(): its adapter comes off, so this run starts from the base."""
    earlier = model.__dict__.pop(TRAINED_BY, None)
    if earlier is None:
        return
    if earlier["method"] == "full":
        warnings.warn("model= was fine-tuned in full by an earlier train(); this run starts from those weights, "
                      "not the pretrained ones (load the model again for a fresh start)", stacklevel=4)
    elif lorafit.adapter_configs(model):
        lorafit.unload(model)


# -- the run, step by step ---------------------------------------------------------------


@dataclass
class Encoded:
    """The run's splits in tokens (see ``encode_split``): validation and test are [] when the run has none."""

    train: Sequence[dict]
    validation: Sequence[dict]
    test: Sequence[dict]

    def held_out(self) -> dict[str, Sequence[dict]]:
        """The evaluated splits that have data, validation first."""
        return {split: getattr(self, split) for split in HELD_OUT if getattr(self, split)}


def _train(config: RunConfig, dist: Distributed, device: torch.device | None, wall_start: float, *, resume: bool,
           overwrite: bool, model: nn.Module | None, tokenizer: Any, callbacks, progress: bool,
           arg_names: ArgNames = PYTHON_ARGS) -> TrainResult:
    out, resume_from = _check_inputs(config, dist, resume, overwrite, model, tokenizer, arg_names)
    prep = prepare(config, model, tokenizer, device)
    check_given_fits(prep, model is not None, tokenizer is not None)
    data = _encode_splits(prep)
    metric = _check_metric(prep, data)
    put_back_model = _ready_model(prep, data)
    try:
        report = lorafit.trainable_parameters(prep.model)
        data, reference_seconds = _precompute_reference(prep, data, dist)
        dist.barrier()  # every process has checked its inputs (and seen the output directory as it was)
        if not dist.is_main:
            return TrainResult(_train_worker(prep, dist, out, resume_from, data, metric, callbacks),
                               prep.model.eval(), prep.tokenizer, prep.labels)
        # Every input is fine: only now is anything written.
        _write_run_start(prep, out, resume_from, overwrite, data)
        # read now: the checkpoint directory is replaced by newer ones as the run goes
        earlier_seconds = json.loads((resume_from / "state.json").read_text())["train_seconds"] if resume_from \
            else 0.0
        steps = total_steps(len(data.train), config.train, prep.task.passes_per_window())
        print(f"lorafit train: {config.model.name} ({prep.source.path}), {config.task.type}, method "
              f"{config.train.method}, {_rows_text(prep, data)}, {steps} steps, "
              f"{'resuming from ' + str(resume_from) if resume_from else 'fresh start'}\n  {report}\n"
              f"  {_processes(dist)}")
        if reference_seconds is not None:
            print(f"  the reference model's log-probabilities of every example computed in {reference_seconds:.1f} s "
                  "(task.precompute_reference)")
        if prep.float16_autocast:
            print("  float16 weights: the adapters train in float32 under float16 autocast with loss scaling "
                  "(as with train.fp16 = true)")
        settings = prep.train_settings()
        sixteen_bit = {str(p.dtype).removeprefix("torch.") for p in prep.model.parameters()
                       if p.requires_grad and p.dtype in SIXTEEN_BIT}
        if config.train.neftune_noise_alpha:
            print(f"  NEFTune: uniform noise of size {config.train.neftune_noise_alpha:g} / sqrt(length x width) on "
                  "the input embeddings in training steps (train.neftune_noise_alpha)")
        if settings.lorafa:
            print("  LoRA-FA: the A factors stay as initialised, B's gradients are projected before each step "
                  "(train.lorafa)")
        if sixteen_bit and keeps_masters(settings):
            print(f"  {'/'.join(sorted(sixteen_bit))} trained weights: AdamW steps on float32 masters of them "
                  "(train.master_weights)")
        log = MetricsLog(out / "metrics.jsonl", out / "tensorboard" if config.train.tensorboard else None)
        try:
            state = fit(prep.model, prep.task, data.train, data.validation, settings, prep.device, out,
                        log, metric, resume_from=resume_from, callbacks=callbacks, progress=progress, dist=dist)
        finally:
            log.close()
        summary = _finish(prep, dist, out, state, data, metric, report, wall_start - earlier_seconds)
        return TrainResult(summary, prep.model.eval(), prep.tokenizer, prep.labels)
    finally:
        put_back_model()


def _check_inputs(config: RunConfig, dist: Distributed, resume: bool, overwrite: bool, model: nn.Module | None,
                  tokenizer: Any, arg_names: ArgNames) -> tuple[Path, Path | None]:
    """What is checked before anything is loaded: the processes, the output directory (and the checkpoint to
    resume from), a given model and tokenizer, tensorboard."""
    if dist.enabled and config.train.batch_size < dist.world_size:
        raise ValueError(f"train.batch_size = {config.train.batch_size} is the global batch and must be at least "
                         f"the number of processes ({dist.world_size})")
    out, resume_from = _check_output(config, resume, overwrite, arg_names)
    check_given_model(config, model, tokenizer)
    if config.train.tensorboard:
        try:  # fail before the work starts, not after
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ImportError("train.tensorboard = true needs the tensorboard package: pip install tensorboard") \
                from None
    return out, resume_from


def _encode_splits(prep: Prepared) -> Encoded:
    """Every split in tokens; with task.packing the training examples packed into sequences."""
    train = encode_split(prep, "train")
    if prep.config.task.packing:
        n_rows, train = len(train), prep.task.pack(train)
        print(f"lorafit: {n_rows} train rows packed into {len(train)} sequences of up to "
              f"{prep.config.task.max_length} tokens")
    return Encoded(train, *(encode_split(prep, split) for split in HELD_OUT))


def _precompute_reference(prep: Prepared, data: Encoded, dist: Distributed) -> tuple[Encoded, float | None]:
    """With task.precompute_reference, every split's examples with the reference log-probabilities of the model
    as the run starts (before a resumed run's checkpoint is loaded, so the same again), and the seconds taken."""
    if not prep.config.task.precompute_reference:
        return data, None
    start = time.perf_counter()

    def precomputed(features: Sequence[dict]) -> Sequence[dict]:
        return with_reference(prep.task, prep.model, features, prep.device, prep.config.train.eval_batch_size,
                              _autocast(prep), dist) if len(features) else features

    data = Encoded(*map(precomputed, (data.train, data.validation, data.test)))
    return data, time.perf_counter() - start


def _check_metric(prep: Prepared, data: Encoded) -> str:
    """The validation metric that picks the best weights; one the task computes."""
    config = prep.config
    metric = config.train.metric or prep.task.metric
    if data.validation:
        probe = {"classification": ("eval_loss", "accuracy", "macro_f1"),
                 "preference": ("eval_loss", "reward_accuracy", "reward_margin"),
                 "reward": ("eval_loss", "accuracy", "reward_margin"),
                 "kto": ("eval_loss", "reward_accuracy", "reward_margin", "kl"),
                 "grpo": ("reward", "completion_length")}.get(
            config.task.type, ("eval_loss", "perplexity") + (("rouge1", "rouge2", "rougeL")
                                                             if config.task.generate_rows else ()))
        if metric not in probe:
            raise ValueError(f"train.metric {metric!r} is not computed for this task; choose one of {', '.join(probe)}")
    elif config.train.early_stopping_patience:
        raise ValueError("train.early_stopping_patience needs validation data (data.validation or "
                         "data.validation_fraction)")
    return metric


def _ready_model(prep: Prepared, data: Encoded) -> Callable[[], None]:
    """The model as the run trains it: an earlier train()'s adapter off, the method applied, the packing checked.
    Returns what apply_method returns: what puts the model's own modules and forwards back once the run ends."""
    _take_off_earlier_run(prep.model)
    put_back_model = apply_method(prep, data.train)
    prep.model.__dict__[TRAINED_BY] = {"method": prep.config.train.method, "quantize": prep.config.model.quantize,
                                       "adapter": "default"}
    try:
        if prep.config.task.packing:
            prep.task.check_packing(prep.model, data.train, prep.device)
    except BaseException:
        put_back_model()
        raise
    return put_back_model


def _write_run_start(prep: Prepared, out: Path, resume_from: Path | None, overwrite: bool, data: Encoded) -> None:
    """The output directory as a run starts it: the config (a fresh start), and data.json."""
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if resume_from is None:
        ckpt.atomic_write_text(out / CONFIG_FILE, prep.config.to_toml())
        (out / "metrics.jsonl").unlink(missing_ok=True)
        (out / COMPLETIONS_FILE).unlink(missing_ok=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # a run that died before its first checkpoint
    ckpt.atomic_write_json(out / "data.json", {
        "sources": prep.splits.sources, "labels": prep.labels,
        # a streamed training split's length is not known before the stream ends (summary.json: train_rows_seen)
        "rows": {"train": None if isinstance(data.train, StreamedFeatures) else len(data.train),
                 **{split: len(getattr(data, split)) for split in HELD_OUT}},
        "streaming": prep.config.data.streaming,
        "chat_template": getattr(prep.task, "uses_model_template", None)})


def _rows_text(prep: Prepared, data: Encoded) -> str:
    train = "streamed train rows" if isinstance(data.train, StreamedFeatures) else f"{len(data.train)} train"
    return f"{train} / {len(data.validation)} validation rows"


def _finish(prep: Prepared, dist: Distributed, out: Path, state: LoopState, data: Encoded, metric: str,
            report: lorafit.ParameterReport, clock_start: float) -> RunSummary:
    """After the loop: the final weights evaluated and saved, summary.json, curves.png and the table printed.
    ``clock_start``: this session's start, moved back by the training time of the sessions before a resume."""
    config = prep.config
    use_best, results = _final_weights_and_metrics(prep, dist, out, state, data)
    if "test" in results:
        MetricsLog(out / "metrics.jsonl").write({"type": "eval", "split": "test",
                                                 "step": state.best_step if use_best else state.step,
                                                 **results["test"]})
    save_result(prep, out, dist)
    peak, peak_method = peak_memory(prep.device)
    if dist.enabled:
        peak = int(dist.all_reduce_max(float(peak or 0), prep.device)) or None
        peak_method += f", the largest of {dist.world_size} processes"
    summary = RunSummary(
        method=config.train.method,
        lora_r=config.lora_config().r if config.train.method == "lora" else None,
        model=config.model.name,
        task=config.task.type,
        params=ParamCounts(trainable=report.trainable, total=report.total,
                           trainable_percent=report.trainable_percent, base_model=report.base),
        steps=state.step,
        epochs_done=_epochs_done(state, data.train, config.train.batch_size),
        early_stopped=state.stopped_early,
        train_tokens=state.train_tokens,
        train_rows_seen=state.train_rows,
        train_time_s=state.train_seconds,
        eval_time_s=state.eval_seconds,
        train_tokens_per_s=state.train_tokens / max(state.train_seconds - state.eval_seconds, 1e-9),
        peak_memory_bytes=peak,
        peak_memory_method=peak_method,
        device=str(prep.device),
        threads=torch.get_num_threads(),
        processes=dist.world_size,
        distributed=dist.mode if dist.enabled else None,
        gradient_bytes_all_reduced_per_step=dist.bytes_reduced / max(state.step, 1) if dist.enabled
        and not dist.fsdp else None,
        best=BestEval(metric=metric, value=state.best_value, step=state.best_step) if state.best_step is not None
        else None,
        final_weights=f"best (step {state.best_step})" if use_best else f"last (step {state.step})",
        validation=results.get("validation"),
        test=results.get("test"),
        output=str(out / ("adapter" if config.train.method == "lora" else "model")),
        wall_time_s=time.perf_counter() - clock_start,
    )
    ckpt.atomic_write_json(out / "summary.json", summary.to_dict())
    plot_curves(read_metrics(out / "metrics.jsonl"), metric, out / "curves.png",
                title=f"{config.model.name} {config.task.type} ({config.train.method})")
    print(format_summary(summary))
    return summary


def _epochs_done(state: LoopState, train: Sequence[dict], batch_size: int) -> float | None:
    """Whole epochs plus the consumed fraction of the current one; None for a streamed split, whose length
    (and so the fraction) is not known."""
    if isinstance(train, StreamedFeatures):
        return None
    return state.epoch + state.batch_in_epoch / max(1, -(-len(train) // batch_size))


def _processes(dist: Distributed) -> str:
    if not dist.enabled:
        return "1 process (for several processes or machines, see `lorafit train --help`)"
    return (f"{dist.world_size} processes ({dist.mode}, {torch.distributed.get_backend()}); train.batch_size is the "
            f"global batch, split across them")


def _final_weights_and_metrics(prep: Prepared, dist: Distributed, out: Path, state: LoopState,
                               data: Encoded) -> tuple[bool, dict[str, dict[str, float]]]:
    """Load the best evaluated weights (or keep the last) and evaluate them on validation and test."""
    config = prep.config
    use_best = config.train.keep_best and state.best_step is not None
    if use_best:
        ckpt.load_best(out, prep.model, state.best_step)
    autocast = _autocast(prep)
    results = {split: prep.task.evaluate(prep.model, features, prep.device, config.train.eval_batch_size, autocast,
                                         dist)
               for split, features in data.held_out().items()}
    return use_best, results


def _train_worker(prep: Prepared, dist: Distributed, out: Path, resume_from: Path | None, data: Encoded,
                  metric: str, callbacks) -> dict[str, Any]:
    """Processes other than 0: the same collective work, nothing written. Returns the final metrics."""
    state = fit(prep.model, prep.task, data.train, data.validation, prep.train_settings(), prep.device, out, None,
                metric, resume_from=resume_from, callbacks=callbacks, progress=False, dist=dist)
    _, results = _final_weights_and_metrics(prep, dist, out, state, data)
    save_result(prep, out, dist)
    peak, _ = peak_memory(prep.device)
    dist.all_reduce_max(float(peak or 0), prep.device)
    return {"rank": dist.rank, "steps": state.step, **results}


def _autocast(prep: Prepared):
    from lorafit.train.loop import autocast_for

    return autocast_for(prep.device, prep.train_settings())


def save_result(prep: Prepared, out: Path, dist: Distributed = SINGLE) -> None:
    """The adapter (PEFT format) or, for full fine-tuning, the whole model and its tokenizer.

    Every process calls this (FSDP shards are gathered collectively); process 0 writes."""
    if prep.config.train.method == "lora":
        residual = lorafit.adapter_configs(prep.model)["default"].init_lora_weights in RESIDUAL_FROM_DATA
        config, tensors = lorafit.adapter_files(prep.model, as_plain_lora=residual)
        # labels.json: serve, eval and PEFT users learn the head's class names from the adapter alone
        labels = [str(v) for v in prep.labels] if prep.labels is not None else None
        if dist.is_main:
            ckpt.publish_dir(lambda tmp: lorafit.write_adapter(tmp, config, tensors, labels=labels), out / "adapter")
    else:
        state_dict = None
        if dist.fsdp:  # gathered shard by shard into process 0's CPU memory
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state_dict = get_model_state_dict(prep.model, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))

        if prep.labels is not None:  # a model= of the caller's may name its outputs LABEL_0, ...
            names = {i: str(v) for i, v in enumerate(prep.labels)}
            prep.model.config.id2label, prep.model.config.label2id = names, {v: i for i, v in names.items()}

        def build(tmp: Path) -> None:
            prep.model.save_pretrained(tmp, state_dict=state_dict)
            prep.tokenizer.save_pretrained(tmp)

        if dist.is_main:
            ckpt.publish_dir(build, out / "model")
    dist.barrier()


# -- evaluate and merge a finished run ---------------------------------------------


def load_run(run_dir: str | os.PathLike, overrides, adapter: str | os.PathLike | None,
             base: bool = False, names: ArgNames = PYTHON_ARGS) -> Prepared:
    """A finished run's model: the base with its adapter (or ``adapter``), its fine-tuned model (method =
    "full"), or with ``base`` the model it started from, quantized as training saw it."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a lorafit run directory (no {CONFIG_FILE})")
    config = load_config(config_path, overrides, overrides_source=names.overrides)
    if config.task.type == "classification":
        _use_saved_labels(config, run_dir, Path(adapter) if adapter is not None else run_dir / "adapter")
    fine_tuned = config.train.method == "full" and adapter is None and not base
    if fine_tuned:
        model_dir = run_dir / "model"
        if not model_dir.is_dir():
            raise FileNotFoundError(f"{model_dir} is missing; did the run finish?")
        config.model.name = str(model_dir)  # the fine-tuned model is the base now
    prep = prepare(config)
    if not fine_tuned:
        # the base the adapter was trained on: quantized as in training, after an adapter whose initialisation
        # rewrote the full-precision weights (it runs again when loaded)
        adapter_dir = Path(adapter) if adapter is not None else run_dir / "adapter"
        saved = None if base else lorafit.read_adapter(adapter_dir)  # (config, tensors), read once
        rewrites_base = saved is not None and modifies_base_weight(saved[0].init_lora_weights)
        if not rewrites_base:
            quantize_for(prep)
        if saved is not None:
            lorafit.load_adapter_state(prep.model, *saved, source=str(adapter_dir / WEIGHTS_NAME))
        if rewrites_base:
            quantize_for(prep)
    prep.model.to(prep.device)
    return prep


def _use_saved_labels(config: RunConfig, run_dir: Path, adapter_dir: Path) -> None:
    """Class names in the order the trained head has them: the adapter's ``labels.json``, else (adapters
    saved without one) the run's ``data.json``. Labels read from the data again could come out in
    another order (the training file changed) and silently misname every output."""
    saved, source = lorafit.read_labels(adapter_dir), adapter_dir / LABELS_NAME
    if saved is None and (run_dir / "data.json").is_file():
        saved, source = json.loads((run_dir / "data.json").read_text()).get("labels"), run_dir / "data.json"
    if saved is None:
        return  # nothing saved: the labels of the training file, as training saw them
    if config.data.labels is not None and [str(v) for v in config.data.labels] != [str(v) for v in saved]:
        raise ValueError(f"data.labels = {config.data.labels} differs from the class names the adapter was trained "
                         f"with ({source}: {saved}); drop the data.labels setting")
    config.data.labels = list(saved)


def evaluate(run_dir: str | os.PathLike, split: str = "validation", overrides=None,
             adapter: str | os.PathLike | None = None, base: bool = False,
             per_class: bool = False, arg_names: ArgNames = PYTHON_ARGS,
             samples: str | os.PathLike | None = None) -> dict[str, Any]:
    """Metrics of a finished run's adapter (or fine-tuned model) on ``split``; with ``base``, of the model the
    run started from, without the adapter (what the run gained is the difference). For classification,
    ``per_class`` adds ``"per_class": {class name: {"precision", "recall", "f1", "support"}}``.

    ``samples``: a JSON Lines file (replaced) that gets a line per example the evaluation produced an output
    for, with ``example``, its index among the split's encoded examples: a classification run's text, label,
    predicted class and class probabilities; a causal_lm or seq2seq run's prompt, generation and references
    (the task.generate_rows examples it generates for); a reward run's chosen and rejected conversations and
    their scores; a grpo run's prompt, sampled completion, reward and each reward's score."""
    if split not in ("train", "validation", "test"):
        raise ValueError(f"split must be 'train', 'validation' or 'test', got {split!r}")
    if base and adapter is not None:
        raise ValueError(f"evaluate the base model ({arg_names.base}) or an adapter ({arg_names.adapter}), not both")
    config_path = Path(run_dir) / CONFIG_FILE
    config = load_config(config_path, overrides, overrides_source=arg_names.overrides) if config_path.is_file() \
        else None  # load_run says what is missing
    if samples is not None and config is not None:
        _check_samples(config, Path(samples), arg_names)
    features = None
    if config is not None and config.task.precompute_reference and config.train.method == "full" \
            and adapter is None and not base:
        # the fine-tuned model is compared with the model the run started from, as in training: its
        # log-probabilities first, so that the two models are never in memory together
        start = load_run(run_dir, overrides, None, base=True, names=arg_names)
        _check_split(start, split, arg_names)
        features = encode_split(start, split)
        features = with_reference(start.task, start.model, features, start.device, start.config.train.eval_batch_size,
                                  _autocast(start))
        del start
        gc.collect()
    prep = load_run(run_dir, overrides, adapter, base, arg_names)
    _check_split(prep, split, arg_names)
    if features is None:
        features = encode_split(prep, split)
    extra = {"per_class": True} if per_class and prep.config.task.type == "classification" else {}
    summary = Path(run_dir) / "summary.json"
    if summary.is_file() and not base:  # grpo's reward functions see the finished run's trainer_state
        done = json.loads(summary.read_text())
        prep.task.training_progress(done["steps"], done["steps"], done.get("epochs_done") or 0.0, True)
    prep.task.keep_samples = samples is not None
    metrics = prep.task.evaluate(prep.model, features, prep.device, prep.config.train.eval_batch_size,
                                 _autocast(prep), **extra)
    if samples is not None:
        records = sorted(prep.task.take_samples(), key=lambda r: r["example"])
        ckpt.atomic_write_text(Path(samples), "".join(
            json.dumps({"split": split, **r}, ensure_ascii=False, default=str) + "\n" for r in records))
    return metrics


def _check_samples(config: RunConfig, path: Path, arg_names: ArgNames) -> None:
    """Before anything loads: the run's evaluation has per-example outputs to write, and ``path`` can be written."""
    kind = config.task.type
    if not task_class(kind).writes_samples:
        writers = [k for k in TASKS if task_class(k).writes_samples]
        raise ValueError(f"{arg_names.samples}: a {kind!r} run's evaluation has no output per example to write; "
                         f"it is for {', '.join(writers)} runs")
    if kind in ("causal_lm", "seq2seq") and not config.task.generate_rows:
        raise ValueError(f"{arg_names.samples}: this run's evaluation generates nothing (task.generate_rows = 0); "
                         f"ask for generations with {arg_names.set_one.format('task.generate_rows=N')}")
    if path.is_dir() or not path.parent.is_dir():
        raise ValueError(f"{arg_names.samples}: {str(path)!r} must be a file in an existing directory")


def _check_split(prep: Prepared, split: str, arg_names: ArgNames) -> None:
    if not getattr(prep.splits, split):
        raise ValueError(f"the run's config has no {split} data; set it, e.g. "
                         f"{arg_names.set_one.format(f'data.{split}=FILE')}")


def merge(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, adapter: str | os.PathLike | None = None,
          overwrite: bool = False, arg_names: ArgNames = PYTHON_ARGS) -> Path:
    """Write the base model with the run's adapter merged in (save_pretrained format, plus the tokenizer)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{str(out)!r} is not empty; choose a new directory or pass {arg_names.overwrite}")
    prep = load_run(run_dir, None, adapter, names=arg_names)
    if prep.config.train.method == "full":
        raise ValueError("this run fine-tuned the whole model; its model/ directory is already a full model")
    merged = lorafit.merge_and_unload(prep.model, safe=True)

    def build(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        prep.tokenizer.save_pretrained(tmp)

    ckpt.publish_dir(build, out)
    return out


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "summary.json").read_text())
