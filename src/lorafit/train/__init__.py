"""Fine-tuning with LoRA (or fully) from a TOML run config: ``lorafit train`` and its Python API.

    from lorafit.train import train, evaluate, merge
    summary = train("examples/sst2_minilm.toml", ["train.epochs=1"])
    evaluate("runs/sst2", split="test")
    merge("runs/sst2", "runs/sst2-merged")

Needs the ``train`` extra (transformers, tqdm, matplotlib, rouge-score):
``pip install 'lorafit[train]'``. The core of lorafit does not import this package.
"""

from lorafit.train.config import RunConfig, load_config
from lorafit.train.run import evaluate, merge, read_summary, train

__all__ = ["RunConfig", "evaluate", "load_config", "merge", "read_summary", "train"]
