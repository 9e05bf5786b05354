"""Fine-tuning with LoRA (or fully) from a TOML run config: ``lorafit train`` and its Python API.

    from lorafit.train import train, evaluate, merge
    result = train("examples/sst2_minilm.toml", {"train.epochs": 1})   # or a dict config, or a RunConfig
    result["validation"], result.model                                 # the summary, the trained model
    evaluate("runs/sst2", split="test")
    merge("runs/sst2", "runs/sst2-merged")

Needs the ``train`` extra (transformers, tqdm, matplotlib, rouge-score):
``pip install 'lorafit[train]'``. The core of lorafit does not import this package.
"""

from lorafit.train.config import RunConfig, load_config
from lorafit.train.run import TrainResult, evaluate, merge, read_summary, train

__all__ = ["RunConfig", "TrainResult", "evaluate", "load_config", "merge", "read_summary", "train"]
