"""Save and load adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are PEFT's: ``base_model.model.<module path>.lora_A.weight`` (and
``lora_B``, and ``lora_B.bias`` with ``lora_bias``), ``...lora_embedding_A`` /
``...lora_embedding_B`` for embeddings, a modules_to_save copy under the module's own parameter names, and trained
biases under their names in the wrapped model. The adapter name is not part of
the key. Only safetensors are read: nothing in an adapter file can run code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as tensors_from_bytes
from safetensors.torch import save_file
from torch import nn

from lorafit import adalora, lycoris, vera
from lorafit.config import LoraConfig, modifies_base_weight
from lorafit.model import (adapter_configs, adapter_parameters, attach, detach, drop_saved_copy, lora_layers,
                           saved_modules, tied_lora_heads)
from lorafit.targeting import bypassed_out_projs, model_embedding, name_matches, saved_name_matches, saved_names

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# The class names of a classifier adapter's head, index i naming output i: a JSON list of strings.
# PEFT and transformers read nothing from the adapter directory that sets a head's size or names, so
# they live in a file of their own (a config.json here would make transformers take the directory
# for a whole model and look for base weights in it).
LABELS_NAME = "labels.json"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PREFIX = "base_model.model."


def peft_key(param_name: str, adapter: str) -> str:
    """Map a parameter's name in the wrapped model to its key in a PEFT adapter file."""
    for factor, key in (("lora_A", "lora_A.weight"), ("lora_B", "lora_B.weight"), ("lora_B_bias", "lora_B.bias")):
        suffix = f".{factor}.{adapter}"
        if param_name.endswith(suffix):
            return PREFIX + param_name[: -len(suffix)] + f".{key}"
    for factor in ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_diag",
                   "trainable_tokens_delta"):
        suffix = f".{factor}.{adapter}"
        if param_name.endswith(suffix):
            return PREFIX + param_name[: -len(suffix)] + f".{factor}"
    return PREFIX + param_name.replace(f".modules_to_save.{adapter}.", ".")


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The tensors of adapter ``name`` under PEFT's keys (detached, on their own device).

    A parameter sharded by FSDP is gathered whole (a collective: every process must call this)."""
    out = {peft_key(k, name): whole_tensor(p.detach()) for k, p in adapter_parameters(model, name).items()}
    for key, source in _tied_head_keys(model, name).items():
        out[key] = out[source].T.contiguous()
    return out


def _tied_head_keys(model: nn.Module, name: str) -> dict[str, str]:
    """A tied head's factors (ensure_weight_tying) as PEFT's files list them, by key: the key of the embedding
    factor each one is the transpose of (the head's A is the embedding's B, its B the embedding's A)."""
    heads = [(path, head) for path, head in tied_lora_heads(model) if name in head.adapter_names]
    if not heads:
        return {}
    paths = {id(layer): path for path, layer in lora_layers(model)}
    keys: dict[str, str] = {}
    for path, head in heads:
        embedding = PREFIX + paths[id(head.embedding)]
        keys[f"{PREFIX}{path}.lora_A.weight"] = f"{embedding}.lora_embedding_B"
        keys[f"{PREFIX}{path}.lora_B.weight"] = f"{embedding}.lora_embedding_A"
    return keys


def whole_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP-sharded (DTensor) parameter or optimizer state, a collective; others as they are.
    Duck-typed, so core needs nothing beyond torch."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, name: str = "default", *, as_plain_lora: bool = False,
    labels: list[str] | None = None,
) -> Path:
    """Write adapter ``name`` of ``model`` to ``directory`` (created if needed).

    Each file is written to a temporary name and renamed into place, weights
    first, so an interrupted save leaves the previous adapter files intact.

    A sequence-classification adapter (``task_type="SEQ_CLS"``) also gets ``labels.json``,
    its class names in output order: ``labels`` if given, else the model's
    ``config.id2label`` when that names every output of the adapter's head with
    names of its own (not transformers' ``LABEL_0``, ...).

    ``as_plain_lora=True`` writes a PiSSA/OLoRA adapter as an ordinary LoRA of
    the *original* base weight (which those inits changed into a residual):
    ``s (B A - B0 A0) = s [B, -B0] [A; A0]``, so the rank doubles.
    """
    config, tensors = adapter_files(model, name, as_plain_lora=as_plain_lora)
    outputs = _head_outputs(model, name)
    if labels is not None:
        labels = check_labels(labels, "labels")
        if outputs is not None and len(labels) != outputs:
            raise ValueError(f"labels names {len(labels)} classes but the classifier head of adapter {name!r} "
                             f"has {outputs} outputs")
    elif config.task_type == "SEQ_CLS":
        labels = _config_labels(model, outputs)
    return write_adapter(directory, config, tensors, labels=labels)


def _head_outputs(model: nn.Module, name: str) -> int | None:
    """Outputs of the adapter's own linear head (a modules_to_save copy), else of the model's ``num_labels``."""
    for _, wrapper in saved_modules(model):
        if name in wrapper.adapter_names and type(wrapper.modules_to_save[name]) is nn.Linear:
            return wrapper.modules_to_save[name].out_features
    return getattr(getattr(model, "config", None), "num_labels", None)


def _config_labels(model: nn.Module, outputs: int | None) -> list[str] | None:
    """The class names a transformers model's config gives its ``outputs`` head outputs, if it names them."""
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if not isinstance(id2label, dict) or outputs is None or len(id2label) != outputs:
        return None
    try:
        names = [str(id2label[i]) for i in range(outputs)]
    except KeyError:
        return None
    return None if names == [f"LABEL_{i}" for i in range(outputs)] else names


def adapter_files(model: nn.Module, name: str = "default", *, as_plain_lora: bool = False
                  ) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """What ``save_adapter`` writes: the config and the tensors under PEFT's keys. Separate from the
    writing so that in a distributed run every process gathers and one process writes."""
    configs = adapter_configs(model)
    if name not in configs:
        raise KeyError(f"no adapter named {name!r} to save; attached adapters: {list(configs) or 'none'}")
    config = configs[name]
    if config.base_model_name_or_path is None:
        base_name = getattr(getattr(model, "config", None), "name_or_path", None) or None
        config = dataclasses.replace(config, base_model_name_or_path=base_name)
    tensors = adapter_state_dict(model, name)
    if as_plain_lora:
        config, tensors = _as_plain_lora(model, name, config, tensors)
    return config, tensors


def write_adapter(directory: str | os.PathLike, config: LoraConfig, tensors: dict[str, torch.Tensor], *,
                  labels: list[str] | None = None) -> Path:
    """Write an adapter directory (PEFT format) from a config and PEFT-keyed tensors, atomically per file;
    with ``labels`` (a classifier's class names, in output order) also ``labels.json``."""
    directory = Path(directory)
    if labels is not None:
        labels = check_labels(labels, "labels")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    # safetensors refuses two keys on one storage: a tied head's modules_to_save copy holds the embedding's table
    seen: set[int] = set()
    for key, t in tensors.items():
        if t.data_ptr() in seen:
            tensors[key] = t.clone()
        seen.add(t.data_ptr())
    atomic_write(directory / WEIGHTS_NAME, lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
    atomic_write(directory / CONFIG_NAME, lambda path: Path(path).write_text(text))
    if labels is not None:
        names = json.dumps(labels, ensure_ascii=False, indent=2) + "\n"
        atomic_write(directory / LABELS_NAME, lambda path: Path(path).write_text(names, encoding="utf-8"))
    else:  # names left from an earlier adapter saved here would name this one's outputs wrongly
        (directory / LABELS_NAME).unlink(missing_ok=True)
    return directory


def check_labels(labels, source: str) -> list[str]:
    """Class names as ``labels.json`` holds them: a non-empty list of distinct strings."""
    if not isinstance(labels, (list, tuple)) or not labels or not all(isinstance(x, str) for x in labels):
        raise ValueError(f"{source} must be a non-empty list of class names (strings), got {labels!r}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"{source} names a class twice: {list(labels)!r}")
    return list(labels)


def parse_labels(data: bytes, source: str = LABELS_NAME) -> list[str]:
    """The class names in the bytes of a ``labels.json``."""
    try:
        labels = json.loads(data)
    except ValueError as exc:  # also bytes that are not UTF-8
        raise ValueError(f"{source} is not valid JSON: {exc}") from None
    return check_labels(labels, source)


def read_labels(directory: str | os.PathLike) -> list[str] | None:
    """The class names saved beside an adapter (``labels.json``), or None for an adapter without them."""
    path = Path(directory) / LABELS_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return parse_labels(data, str(path))


def _as_plain_lora(model, name, config, tensors):
    if not (modifies_base_weight(config.init_lora_weights) or config.init_lora_weights in ("corda", "lora_ga")):
        raise ValueError(
            f"as_plain_lora is for PiSSA/OLoRA/CorDA/LoRA-GA adapters; {name!r} has init_lora_weights="
            f"{config.init_lora_weights!r} and already is a plain LoRA of the base weights"
        )
    if config.init_lora_weights == "loftq":
        raise ValueError(f"as_plain_lora: {name!r} is a LoftQ adapter, trained on the quantized weights; the "
                         "quantization error is not low-rank, so no plain LoRA of the original weights equals it "
                         "(merge_and_unload gives the trained model)")
    ranks, alphas = {}, {}
    default_scale = config.scale_for("")
    for path, layer in lora_layers(model):
        if name not in layer.adapter_names:
            continue
        if name not in getattr(layer, "initial_factors", {}):
            raise ValueError(
                f"the initial factors of {name!r} on {path!r} are not known (the adapter was loaded, not "
                "initialised, in this process); as_plain_lora needs the model it was initialised in"
            )
        a0, b0 = layer.initial_factors[name]
        key_a = peft_key(f"{path}.{layer.a_name}.{name}", name)
        key_b = peft_key(f"{path}.{layer.b_name}.{name}", name)
        tensors[key_a] = torch.cat([tensors[key_a], a0.to(tensors[key_a])], dim=0)
        tensors[key_b] = torch.cat([tensors[key_b], -b0.to(tensors[key_b])], dim=1)
        rank, scale = 2 * layer.rank[name], layer.scaling[name]
        if rank != 2 * config.r or scale != default_scale:
            ranks[re.escape(path)] = rank
            alphas[re.escape(path)] = scale * rank
    plain = dataclasses.replace(
        config, init_lora_weights=True, r=2 * config.r, lora_alpha=default_scale * 2 * config.r,
        use_rslora=False, rank_pattern=ranks, alpha_pattern=alphas, corda_config=None, lora_ga_config=None,
    )
    return plain, tensors


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once, at import: setting the umask to read it is not thread-safe.
_UMASK = _current_umask()


def usual_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a file or directory made by ``tempfile`` (0600 / 0700) the mode ``open`` or ``mkdir`` would have
    given it (0666 / 0777 less the umask), so that what lorafit writes is as readable as any other output."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_UMASK)


def atomic_write(target: Path, write: Callable[[str], None]) -> None:
    """Write through ``write(tmp_path)`` to a temporary file beside ``target``, fsync, rename: a reader
    sees the old file or the new one, never a partial one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        usual_mode(tmp)  # after writing: a writer may replace the file rather than write into it
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_adapter_files(directory: str | os.PathLike) -> tuple[bytes, bytes]:
    """The bytes of an adapter directory's config and weights files, for ``parse_adapter``.

    Read once into memory, never memory-mapped: a mapped file that another process
    rewrites in place can kill this one (SIGBUS), and a hash of these bytes describes
    exactly the weights parsed from them.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {str(directory)!r} does not exist")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing; an adapter directory holds {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME}")
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        pickles = [n for n in PICKLE_NAMES if (directory / n).exists()]
        if pickles:
            raise ValueError(
                f"{directory} holds {pickles[0]}, a pickle file, which can run arbitrary code when loaded; "
                f"lorafit reads only {WEIGHTS_NAME}. Convert it once in a trusted environment "
                "(e.g. load it with PEFT and save_pretrained(..., safe_serialization=True))"
            )
        raise FileNotFoundError(f"{weights_path} is missing")
    return config_path.read_bytes(), weights_path.read_bytes()


def parse_adapter(config_json: bytes, weights: bytes, source: str = "adapter"
                  ) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config and tensors of an adapter from its files' bytes; ``source`` (its directory) names it in errors."""
    data = _config_data(config_json, f"{source}/{CONFIG_NAME}")
    if not _is_adalora(data) and not lycoris.is_lycoris(data) and not vera.is_vera(data):
        config = LoraConfig.from_dict(data, source=f"{source}/{CONFIG_NAME}")
    try:
        tensors = tensors_from_bytes(weights)
    except (SafetensorError, ValueError) as exc:
        raise ValueError(f"{source}/{WEIGHTS_NAME} is not a readable safetensors file: {exc}") from None
    if _is_adalora(data):
        return adalora.as_lora(data, tensors, PREFIX, f"{source}/{CONFIG_NAME}")
    if lycoris.is_lycoris(data):
        return lycoris.as_lora(data, tensors, PREFIX, f"{source}/{CONFIG_NAME}")
    if vera.is_vera(data):
        return vera.as_lora(data, tensors, PREFIX, f"{source}/{CONFIG_NAME}")
    if isinstance(data, dict) and data.get("use_bdlora"):
        tensors = _expand_block_diagonal(tensors, data["use_bdlora"], f"{source}/{CONFIG_NAME}")
    return config, _with_out_proj_applied_once(data, tensors, f"{source}/{CONFIG_NAME}")


# An nn.MultiheadAttention adapter's out-projection factors: only that wrapper adapts a module inside the
# base layer of another adapted module.
_OUT_PROJ_B = ".base_layer.out_proj.lora_B.weight"
_VERSION = re.compile(r"([0-9]+)\.([0-9]+)\.([0-9]+)")


def _with_out_proj_applied_once(data: dict[str, Any], tensors: dict[str, torch.Tensor], source: str
                                ) -> dict[str, torch.Tensor]:
    """PEFT before 0.22 added the out-projection change of an nn.MultiheadAttention adapter twice (W + 2 s B A,
    huggingface/peft#3774). Its files keep computing what they computed there: as PEFT 0.22 does, their
    out_proj ``lora_B`` is doubled on reading (and saved doubled, with a version that says so)."""
    keys = [key for key in tensors if key.endswith(_OUT_PROJ_B)]
    if not keys:
        return tensors
    version = data.get("peft_version")
    if version is None:
        # PEFT writes its version from 0.18 on, the release that added ensure_weight_tying; lorafit wrote that key,
        # and no version, before it followed PEFT 0.22
        twice = "ensure_weight_tying" not in data
    else:
        number = str(version).partition("@")[0]  # a development version names its commit after "@"
        match = _VERSION.match(number)
        if match is None:
            raise ValueError(f"{source}: peft_version {version!r} is not a version number like '0.22.0'")
        release = tuple(int(part) for part in match.groups())
        # PEFT's own rule: its development versions after 0.21.0 carry the fix already
        twice = release < (0, 21, 1) or (release < (0, 22, 0) and "dev" not in number)
    if not twice:
        return tensors
    warnings.warn(f"{source}: written by PEFT {version or 'before 0.18'}, which applied nn.MultiheadAttention's "
                  f"out_proj change twice; its lora_B is doubled so that the adapter computes what it did there "
                  f"({_few(keys)})", stacklevel=3)
    return {**tensors, **{key: 2 * tensors[key] for key in keys}}


def _config_data(config_json: bytes, source: str) -> Any:
    try:
        return json.loads(config_json)
    except ValueError as exc:  # also bytes that are not UTF-8
        raise ValueError(f"{source}: not valid JSON ({exc})") from None


def _is_adalora(data: Any) -> bool:
    return isinstance(data, dict) and data.get("peft_type") == "ADALORA"


def adapter_rank(config_json: bytes, source: str = CONFIG_NAME) -> int | None:
    """The r an adapter loads with, from its config file's bytes alone (AdaLoRA's: its initial rank); None for a
    LoHa or LoKr adapter, whose rank as a LoRA follows from its tensors' shapes."""
    data = _config_data(config_json, source)
    if lycoris.is_lycoris(data):
        return None
    if vera.is_vera(data):
        return vera.rank(data, source)
    return adalora.initial_rank(data, source) if _is_adalora(data) else LoraConfig.from_dict(data, source=source).r


def _expand_block_diagonal(tensors: dict[str, torch.Tensor], bd: Any, source: str) -> dict[str, torch.Tensor]:
    """A BD-LoRA adapter (PEFT's ``use_bdlora``) as the plain LoRA it computes: its block-diagonal factors are
    stored as their blocks side by side (A: r x d_in/n, B: d_out x r/n), and become the full matrices with
    those blocks on the diagonal. Exact (the zeros are zeros), so it loads, merges and serves like any adapter,
    and saves as a plain LoRA."""
    if not isinstance(bd, dict) or not isinstance(bd.get("nblocks", 1), int) or bd.get("nblocks", 1) < 1:
        raise ValueError(f"{source}: use_bdlora must be a mapping with an integer nblocks >= 1, got {bd!r}")
    n = bd.get("nblocks", 1)
    patterns = {"lora_A": bd.get("target_modules_bd_a") or [], "lora_B": bd.get("target_modules_bd_b") or []}
    out = dict(tensors)
    for key, t in tensors.items():
        module, _, factor = key.removeprefix(PREFIX).rpartition(".")[0].rpartition(".")
        if factor not in patterns or not any(p in module for p in patterns[factor]):
            continue
        if t.dim() != 2 or t.shape[0] % n:
            raise ValueError(f"{source}: {key} of shape {list(t.shape)} does not split into use_bdlora's "
                             f"{n} blocks")
        out[key] = torch.block_diag(*t.chunk(n, dim=0))
    return out


def read_adapter(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read and check an adapter directory without touching any model."""
    return parse_adapter(*read_adapter_files(directory), source=str(directory))


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    name: str = "default",
    *,
    trainable: bool = False,
    activate: bool = True,
    allow_non_finite: bool = False,
) -> nn.Module:
    """Attach the adapter stored in ``directory`` to ``model`` as ``name`` and load its weights.

    ``model`` may be a plain base model or one that already has other adapters.
    Every tensor in the file must belong to a module the config targets, with
    the right shape, and every such module must have its tensors; otherwise a
    ``ValueError`` names the tensors and the model is left as it was. A linear
    ``modules_to_save`` head may have another number of outputs than the model's
    (a classifier for another label set): the adapter gets a head of the saved size.
    Tensors holding NaN or infinity are refused unless ``allow_non_finite=True``.
    """
    config, tensors = read_adapter(directory)
    return load_adapter_state(model, config, tensors, name, trainable=trainable, activate=activate,
                              allow_non_finite=allow_non_finite, source=str(Path(directory) / WEIGHTS_NAME))


def load_adapter_state(
    model: nn.Module,
    config: LoraConfig,
    tensors: dict[str, torch.Tensor],
    name: str = "default",
    *,
    trainable: bool = False,
    activate: bool = True,
    allow_non_finite: bool = False,
    source: str = "adapter",
) -> nn.Module:
    """``load_adapter`` for an adapter already in memory (``parse_adapter``): the same checks, and
    the model is left as it was on error. ``source`` names the adapter in errors."""
    if config.init_lora_weights in ("corda", "lora_ga"):
        method = {"corda": "CorDA", "lora_ga": "LoRA-GA"}[config.init_lora_weights]
        raise ValueError(f"{source}: a {method} adapter (init_lora_weights={config.init_lora_weights!r}) fits the "
                         "residual weights its initialisation left, which takes the data it ran on to make again; "
                         "save it with as_plain_lora=True (a LoRA of the original weights), or merge it")
    config = _without_absent_heads(model, config)
    config, tensors = _with_saved_embedding_layers(source, model, config, tensors)
    bypassed = bypassed_out_projs(model, config)
    if bypassed:
        config, tensors = _without_bypassed(source, config, tensors, bypassed)
    attach(model, config, name, activate=activate, trainable=trainable, initialize=False, task_heads=False)
    try:
        _without_unsaved_copies(source, model, name, config, tensors)
        _fit_head_sizes(model, name, tensors, trainable)
        expected = {peft_key(k, name): p for k, p in adapter_parameters(model, name).items()}
        tensors = vera.sliced_to_layers(expected, tensors)
        tensors = _without_base_copies(source, model, expected, tensors)
        tensors = _without_tied_copies(source, _tied_head_keys(model, name), expected, tensors)
        tensors = _with_conv_kernels(source, expected, tensors)
        _check_tensors(source, expected, tensors)
        non_finite = [key for key, t in tensors.items() if not torch.isfinite(t).all()]
        if non_finite and not allow_non_finite:
            raise ValueError(f"{source}: tensors {_few(sorted(non_finite))} hold NaN or infinite values "
                             "(a diverged training run?); allow_non_finite=True loads them anyway")
        with torch.no_grad():
            for key, param in expected.items():
                param.copy_(tensors[key])
    except BaseException:
        detach(model, name)
        raise
    return model


def _without_absent_heads(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """The config without the modules_to_save entries that match no module of ``model``: PEFT writes its task's
    head names (classifier and score for SEQ_CLS) whether or not the model has them, and runs without them.
    (A file's tensors for a module the model lacks are still refused, by _check_tensors.)"""
    listed = config.modules_to_save
    if not listed:
        return config
    kept = [entry for entry in listed if saved_names(model, [entry])]
    return config if kept == listed else dataclasses.replace(config, modules_to_save=kept or None)


def _with_saved_embedding_layers(source: str, model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor]
                                 ) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """PEFT's ``save_embedding_layers`` (on by itself when training resized the vocabulary) writes the whole weight
    of the input embedding and of the output head under the module's own name (``<module>.weight``), as a
    modules_to_save copy is written, without listing them in modules_to_save. Such a weight that equals the
    model's is a copy, and dropped; one that differs (the new tokens' rows) becomes this adapter's own copy of
    the module (modules_to_save), so the adapter computes what it computed in PEFT and the base model keeps its
    weights (PEFT overwrites them)."""
    embeddings = [model_embedding(model, "input"), model_embedding(model, "output")]
    paths = {id(m): path for path, m in model.named_modules() if path}
    listed = config.modules_to_save or []
    own, kept = [], dict(tensors)
    for module in embeddings:
        path = paths.get(id(module))
        key = f"{PREFIX}{path}.weight"
        # a module the adapter targets, or one already wrapped, has no weight of its own under this key
        weight = module._parameters.get("weight") if path is not None else None
        if weight is None or key not in tensors or saved_name_matches(listed, path):
            continue
        tensor = tensors[key]
        if tuple(weight.shape) != tuple(tensor.shape):
            raise ValueError(f"{source}: tensor {key!r} holds the whole weight of {path!r} with shape "
                             f"{list(tensor.shape)} (PEFT's save_embedding_layers: the vocabulary was resized in "
                             f"training), and the model's is {list(weight.shape)}: resize the model's token "
                             f"embeddings to the adapter's first (model.resize_token_embeddings({tensor.shape[0]}))")
        if _equal_copy(weight.detach(), tensor):
            del kept[key]
        elif path not in own:
            own.append(path)
    if not own:
        return config, kept
    warnings.warn(f"{source}: the file holds whole weights of {own} that differ from this model's (PEFT's "
                  "save_embedding_layers, after new tokens were added in training): loaded as this adapter's own "
                  "copies of those modules (modules_to_save); the base model keeps its weights", stacklevel=4)
    return dataclasses.replace(config, modules_to_save=[*listed, *own]), kept


def _equal_copy(weight: torch.Tensor, tensor: torch.Tensor) -> bool:
    """Whether a file's ``tensor`` is a copy of ``weight``: a bf16 file may copy float32 weights, and the model may be
    on a GPU with the file's tensors on the CPU."""
    return (torch.equal(weight.to("cpu", tensor.dtype), tensor.cpu())
            or torch.equal(weight, tensor.to(weight.device, weight.dtype)))


def _without_unsaved_copies(source: str, model: nn.Module, name: str, config: LoraConfig,
                            tensors: dict[str, torch.Tensor]) -> None:
    """Drop the modules_to_save copies that only PEFT's plain-text rule matches ("classifier" in "pre_classifier")
    and that the file holds no tensor of: an adapter lorafit saved before it followed that rule, when the module
    trained as the base has it, and stays so."""
    entries = config.modules_to_save or []
    unsaved = [path for path, wrapper in saved_modules(model)
               if name in wrapper.adapter_names and not name_matches(entries, path)
               and not any(key.startswith(f"{PREFIX}{path}.") for key in tensors)]
    if not unsaved:
        return
    warnings.warn(f"{source}: modules_to_save {entries} matches {_few(unsaved)} as text, as PEFT matches it, but "
                  "the file holds no copy of them (lorafit matched by whole name segments before 2026-12-06): they "
                  "stay as the base model has them", stacklevel=3)
    for path in unsaved:
        drop_saved_copy(model, path, name)


def _without_bypassed(source: str, config: LoraConfig, tensors: dict[str, torch.Tensor], bypassed: list[str]
                      ) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config with ``bypassed`` (targeting.bypassed_out_projs) excluded, and the tensors without theirs: the
    adapter as PEFT ran it, where those layers' factors never applied."""
    warnings.warn(f"{source}: the adapter adapts {_few(bypassed)} as linear layers (PEFT's all-linear does), but "
                  "nn.MultiheadAttention reads out_proj's weight without calling it, so those factors never applied "
                  "in PEFT; they are left out here too", stacklevel=3)
    exclude = config.exclude_modules
    if isinstance(exclude, str):
        exclude = "|".join([f"(?:{exclude})", *map(re.escape, bypassed)])
    else:
        exclude = [*(exclude or []), *bypassed]
    prefixes = tuple(f"{PREFIX}{name}." for name in bypassed)
    return (dataclasses.replace(config, exclude_modules=exclude),
            {key: t for key, t in tensors.items() if not key.startswith(prefixes)})


def _fit_head_sizes(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], trainable: bool) -> None:
    """Give a linear modules_to_save copy the number of outputs its saved weight has.

    A classifier head per task: an adapter trained for 4 labels loads beside one for 2
    into the same base model, each with its own head. Only the output size may differ;
    the input size must still be the base model's (otherwise _check_tensors refuses it).
    """
    for path, wrapper in saved_modules(model):
        copy = wrapper.modules_to_save[name] if name in wrapper.adapter_names else None
        if type(copy) is not nn.Linear:
            continue
        weight = tensors.get(peft_key(f"{path}.modules_to_save.{name}.weight", name))
        if weight is None or weight.ndim != 2 or weight.shape[1] != copy.in_features \
                or weight.shape[0] == copy.out_features:
            continue
        head = nn.Linear(copy.in_features, weight.shape[0], bias=copy.bias is not None,
                         device=copy.weight.device, dtype=copy.weight.dtype)
        head.train(copy.training)
        head.requires_grad_(trainable)
        wrapper.modules_to_save[name] = head


def _without_base_copies(
    source: str, model: nn.Module, expected: dict[str, nn.Parameter], found: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``found`` without the copies of existing weights that PEFT saves beside an adapter.

    PEFT writes the whole matrix of a targeted embedding (``<module>.base_layer.weight``)
    and, with ``bias="all"``, the biases inside a modules_to_save wrapper
    (``<module>.original_module.bias``, and ``<module>.modules_to_save.bias``, an alias
    of ``<module>.bias``). lorafit never overwrites base weights, so such a copy is
    accepted only if it equals what the model (or, for the alias, the file) holds.
    """
    if all(key in expected for key in found):
        return found  # the usual case: nothing but the adapter's own tensors
    params = dict(model.named_parameters(remove_duplicate=False))
    kept: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, tensor in found.items():
        name = key.removeprefix(PREFIX)
        alias = PREFIX + name.replace(".modules_to_save.", ".", 1)
        copied, reference = name, None
        if key in expected or not key.startswith(PREFIX):
            pass
        elif ".base_layer." in name or ".original_module." in name:
            reference = params.get(name)
        elif ".modules_to_save." in name and alias in expected:
            copied, reference = alias, found[alias]
        if reference is None:
            kept[key] = tensor  # not a copy: _check_tensors judges it
        elif reference.shape != tensor.shape:
            problems.append(f"tensor {key!r}, a copy of {copied!r}, has shape {list(tensor.shape)} in the file "
                            f"but the model needs {list(reference.shape)}")
        elif not _equal_copy(reference, tensor):
            rows = ""
            if tensor.dim() == 2:  # an embedding whose new tokens' rows training set, typically
                differ = (reference.detach().cpu().to(tensor.dtype) != tensor.cpu()).any(1)
                rows = f" (in {int(differ.sum())} of its {tensor.shape[0]} rows)"
            problems.append(f"tensor {key!r}, a copy of {copied!r}, holds other values than the model{rows}; "
                            "lorafit does not overwrite base weights, so load the base model the adapter was "
                            "trained on")
    if problems:
        raise ValueError(f"{source} does not fit this model (is it for another base model?): " + "; ".join(problems))
    return kept


def _without_tied_copies(source: str, head_keys: dict[str, str], expected: dict[str, nn.Parameter],
                         found: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``found`` without what a tied adapter (ensure_weight_tying) stores twice: a tied head's factors, the
    embedding's transposed, and the two keys of one modules_to_save table. The copies must be equal: a file in
    which they differ was not trained tied, and loading it tied would compute something else."""
    problems: list[str] = []
    kept = dict(found)
    for key, source_key in head_keys.items():
        copy = kept.pop(key, None)  # a file without them still says everything
        if copy is not None and source_key in found and not torch.equal(copy, found[source_key].T):
            problems.append(f"tensor {key!r} is not the transpose of {source_key!r}")
    by_parameter: dict[int, str] = {}
    for key, param in expected.items():  # both keys are then loaded into the one parameter
        first = by_parameter.setdefault(id(param), key)
        if first != key and key in kept and first in kept and kept[key].shape == kept[first].shape \
                and not torch.equal(kept[key], kept[first]):
            problems.append(f"tensors {first!r} and {key!r} (one table) differ")
    if problems:
        raise ValueError(f"{source}: the adapter ties the output head to the input embedding "
                         "(ensure_weight_tying), but " + "; ".join(problems))
    return kept


def _with_conv_kernels(source: str, expected: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor]
                       ) -> dict[str, torch.Tensor]:
    """A convolution's LoRA factors stored flat (``A``: r x in*k*k, ``B``: out x r), as PEFT's AdaLoRA, LoHa and
    LoKr files give them (which do not say which modules are convolutions), in the layer's shapes: ``A``'s rows
    are kernels flattened in PyTorch's order and ``B`` is pointwise, so ``B A`` is the change those adapters
    reshape to the kernel."""
    out = dict(tensors)
    for key, t in tensors.items():
        want = expected.get(key)
        if want is None or t.dim() != 2 or want.dim() < 3 or t.shape[0] != want.shape[0]:
            continue
        size = want[0].numel()
        if key.endswith(".lora_A.weight") and t.shape[1] == size:
            out[key] = t.reshape(want.shape)
        elif key.endswith(".lora_A.weight") and size % t.shape[1] == 0:
            raise ValueError(f"{source}: {key!r} of shape {list(t.shape)} is a flat factor of a grouped "
                             f"convolution's kernel (the model needs {list(want.shape)}): such a change is grouped "
                             "(PEFT's AdaLoRA, LoHa and LoKr make one there), which a LoRA's A, over every input "
                             "channel, does not hold")
        elif key.endswith(".lora_B.weight") and size == t.shape[1] == want.shape[1]:
            out[key] = t.reshape(want.shape)
    return out


def _check_tensors(source: str, expected: dict[str, nn.Parameter], found: dict[str, torch.Tensor]) -> None:
    problems: list[str] = []
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing tensors {_few(missing)}")
    if extra:
        problems.append(f"tensors that match no adapted module of this model {_few(extra)}")
    for key in sorted(set(expected) & set(found)):
        want, got = tuple(expected[key].shape), tuple(found[key].shape)
        if want != got:
            problems.append(f"tensor {key!r} has shape {list(got)} in the file but the model needs {list(want)}")
        elif not found[key].is_floating_point():
            problems.append(f"tensor {key!r} has dtype {found[key].dtype}; expected a floating-point tensor")
    if problems:
        raise ValueError(f"{source} does not fit this model (is it for another base model?): " + "; ".join(problems))


def _few(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return f"[{shown}{f', ... ({len(keys)} in all)' if len(keys) > limit else ''}]"
