"""lorafit: LoRA adapters for PyTorch models, in PEFT's file format.

    import lorafit
    lorafit.attach(model, lorafit.LoraConfig(r=8, target_modules=["query", "value"]))
    ...train...
    lorafit.save_adapter(model, "out/adapter")
"""

from lorafit.arithmetic import combine_adapters
from lorafit.arrow import arrow_routing
from lorafit.batched import adapter_per_row
from lorafit.config import LoraConfig
from lorafit.corda import attach_corda
from lorafit.eva import attach_eva
from lorafit.io import (
    adapter_files,
    adapter_state_dict,
    load_adapter,
    load_adapter_state,
    parse_adapter,
    read_adapter,
    read_adapter_files,
    read_labels,
    save_adapter,
    write_adapter,
)
from lorafit.hotswap import hotswap_adapter, hotswap_adapter_state
from lorafit.kasa import kasa_loss
from lorafit.layers.hashed_dropout import HashedDropout, use_hashed_dropout
from lorafit.lora_ga import attach_lora_ga
from lorafit.lorafa import lorafa_optimizer
from lorafit.optimizer_groups import optimizer_groups
from lorafit.model import (
    ParameterReport,
    active_adapters,
    adapter_configs,
    adapter_parameters,
    attach,
    detach,
    disabled,
    merge,
    merge_and_unload,
    merged_adapters,
    set_active,
    trainable_parameters,
    unload,
    unmerge,
)

__version__ = "0.1.0"

__all__ = [
    "HashedDropout",
    "LoraConfig",
    "ParameterReport",
    "active_adapters",
    "adapter_configs",
    "adapter_files",
    "adapter_parameters",
    "adapter_per_row",
    "arrow_routing",
    "adapter_state_dict",
    "attach",
    "attach_corda",
    "attach_eva",
    "attach_lora_ga",
    "combine_adapters",
    "detach",
    "disabled",
    "hotswap_adapter",
    "hotswap_adapter_state",
    "kasa_loss",
    "load_adapter",
    "load_adapter_state",
    "lorafa_optimizer",
    "merge",
    "merge_and_unload",
    "merged_adapters",
    "optimizer_groups",
    "parse_adapter",
    "read_adapter",
    "read_adapter_files",
    "read_labels",
    "save_adapter",
    "set_active",
    "trainable_parameters",
    "unload",
    "unmerge",
    "use_hashed_dropout",
    "write_adapter",
]
