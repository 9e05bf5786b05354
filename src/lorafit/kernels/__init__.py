"""The device-specific LoRA ops behind the layers: one implementation per device, picked in one place.

- ``linear.py``: the LoRA linear forward and backward (torch custom ops), and the choice between folding
  the adapters into the weight and the low-rank path;
- ``products.py``: the skinny products, with the dropout mask fused in, and ``backend``, which picks
  the C loops (CPU, float32), Triton (CUDA, with a mask) or plain torch ops (cuBLAS, MKL, anything else);
- ``mask.py``: the hashed dropout masks, the same on every device; ``cpu.py`` / ``cpu_kernels.c`` and
  ``triton_kernels.py``: the loops themselves; ``triton_warmup.py``: Triton's first compilation of each
  kernel in a helper process, while the caller runs the torch ops;
- ``dequantize.py``: a QLoRA base weight from its 4- or 8-bit codes (Triton on a GPU, torch ops elsewhere).
"""

from lorafit.kernels.linear import LowRank, lora_linear

__all__ = ["LowRank", "lora_linear"]
