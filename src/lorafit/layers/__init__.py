"""One LoRA wrapper per adaptable layer kind."""

from lorafit.layers.attention import MultiheadAttentionLora
from lorafit.layers.base import LoraLayer
from lorafit.layers.conv import Conv
from lorafit.layers.embedding import Embedding
from lorafit.layers.linear import Linear, is_gpt2_conv1d
from lorafit.layers.modules_to_save import ModulesToSave
from lorafit.layers.parameter import ParameterLora
from lorafit.layers.tied_head import TiedLoraHead
from lorafit.layers.trainable_tokens import TiedTokens, TrainableTokens

__all__ = ["LoraLayer", "Linear", "Embedding", "Conv", "ModulesToSave", "ParameterLora", "MultiheadAttentionLora",
           "TrainableTokens", "TiedTokens", "TiedLoraHead", "is_gpt2_conv1d"]
