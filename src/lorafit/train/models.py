"""Loading the base model and tokenizer for training, from a ``ModelSource``.

Which model a name means (built-in names, local directories, hub names) is decided
in ``lorafit.base_models``, shared with ``lorafit serve``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lorafit.base_models import ModelSource, resolve_model  # noqa: F401 - train's callers import both from here


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("training needs transformers: pip install 'lorafit[train]'") from None
    transformers.logging.set_verbosity_error()  # "newly initialized weights" notes: the head is new by design
    transformers.logging.disable_progress_bar()  # per-shard loading bars; lorafit shows its own progress
    return transformers


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """Every tqdm bar on or off for the block: the libraries' own too (transformers' GGUF conversion,
    datasets' map), which take no switch from their callers."""
    if enabled:
        yield
        return
    from tqdm import std

    original = std.tqdm.__init__

    def silent(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    std.tqdm.__init__ = silent
    try:
        yield
    finally:
        std.tqdm.__init__ = original


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
    """The model for ``task``: a sequence classifier (new head; one output, the score, for a reward model), a
    causal LM or a seq2seq LM."""
    transformers = _transformers()
    kwargs = dict(source.kwargs, dtype=resolve_dtype(dtype))
    try:
        if task == "classification":
            assert labels is not None
            id2label = {i: str(v) for i, v in enumerate(labels)}
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                source.path, num_labels=len(labels), id2label=id2label,
                label2id={v: i for i, v in id2label.items()}, **kwargs)
        elif task == "reward":
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                source.path, num_labels=1, id2label={0: "reward"}, label2id={"reward": 0}, **kwargs)
        elif task in ("causal_lm", "preference", "kto", "grpo"):
            model = transformers.AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
        else:
            model = transformers.AutoModelForSeq2SeqLM.from_pretrained(source.path, **kwargs)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            kind = {"classification": "sequence classification", "causal_lm": "a causal LM",
                    "reward": "a reward model (sequence classification, one output)",
                    "preference": "a causal LM", "kto": "a causal LM", "grpo": "a causal LM",
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


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks (what FSDP shards and train.compile compiles one by one): the modules of
    the classes ``model._no_split_modules`` names, as Hugging Face models declare them; for a model that names
    none (BERT), the longest ``nn.ModuleList`` of modules of one class (its layers)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules()
             if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(child) for child in m}) == 1]
    return list(max(lists, key=len)) if lists else []
