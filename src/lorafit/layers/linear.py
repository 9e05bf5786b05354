"""LoRA for ``nn.Linear`` and for transformers' GPT-2 ``Conv1D``.

``y = base(x) + s * B (A dropout(x))`` with ``A: (r, d_in)``, ``B: (d_out, r)``.
GPT-2's ``Conv1D`` stores its weight transposed, ``(d_in, d_out)``
(``fan_in_fan_out``); the factors keep the Linear layout either way, as PEFT
does, and only the merged delta is transposed.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.config import LOFTQ_DEFAULTS, LoftQ, modifies_base_weight, pissa_iterations
from lorafit.kernels import LowRank, lora_linear
from lorafit.layers.base import LoraLayer
from lorafit.layers.init import kasa_truncate_, loftq_init, mica_init, olora_init, pissa_init
from lorafit.quantize import BLOCK_SIZE, LOFTQ_GRID
from lorafit.quantized_base import dense_dtype, dense_shape, dense_source, dense_weight, is_quantized


def is_gpt2_conv1d(module: nn.Module) -> bool:
    # Recognised by shape of the API rather than imported, so the core needs no transformers.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


_PLAIN_WEIGHTS = (nn.Parameter, torch.Tensor)


def _fusable(base: nn.Module) -> bool:
    """The fused paths replace the base layer's forward, so only for the plain layer types, without hooks, and
    with a plain weight: a tensor subclass (torchao's quantized weights) computes through its own kernels.
    (A type test rather than is_torchao_linear's module-name test, which torch.compile cannot trace.)"""
    plain = type(base).forward is nn.Linear.forward or is_gpt2_conv1d(base)
    return (plain and type(base.weight) in _PLAIN_WEIGHTS and not base._forward_hooks
            and not base._forward_pre_hooks)


def rewrite_problem(base: nn.Module, init: bool | str | LoftQ, r: int) -> str | None:
    """Why an initialisation that rewrites the base weight (PiSSA, OLoRA, LoftQ) cannot start from this layer, or
    None: a quantized weight is computed from codes on each read (a residual would be written into a copy), LoftQ
    needs a full-precision ``nn.Linear`` weight of whole quantization blocks, and r is at most min(d_in, d_out)."""
    if isinstance(init, LoftQ):
        if is_quantized(base):
            return ("init_lora_weights='loftq' needs the full-precision weight, and this layer is quantized "
                    "already: attach (or load) the LoftQ adapter before quantize_base, which then keeps LoftQ's "
                    "quantized weight")
        if type(base) is not nn.Linear:
            return f"init_lora_weights='loftq' is supported for nn.Linear layers, not {type(base).__name__}"
        if base.weight.numel() % BLOCK_SIZE:
            return (f"init_lora_weights='loftq': a weight of shape {list(base.weight.shape)} does not split into "
                    f"quantization blocks of {BLOCK_SIZE}; exclude this layer")
    elif is_quantized(base):
        return (f"init_lora_weights={init!r} rewrites the base weight, and this layer is quantized: attach the "
                "adapter before quantizing the model (quantize_base quantizes the new weight)")
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and r > min(weight.shape):
        return f"init_lora_weights={init!r} needs r <= min(d_in, d_out) = {min(weight.shape)}, got r={r}"
    return None


class Linear(LoraLayer):
    """LoRA around an ``nn.Linear`` (or a GPT-2 ``Conv1D`` with ``fan_in_fan_out``)."""

    bias_capable = True
    dora_capable = True

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out or is_gpt2_conv1d(base_layer)
        d0, d1 = dense_shape(base_layer)
        self.in_features, self.out_features = (d0, d1) if self.fan_in_fan_out else (d1, d0)
        # PiSSA/OLoRA factors at initialisation: what it takes to express the trained
        # adapter as a plain LoRA of the original weight (see io.save_adapter).
        self.initial_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def factor_shapes(self, r: int):
        return (r, self.in_features), (self.out_features, r)

    def init_factors(self, name: str, init: bool | str | LoftQ | None) -> None:
        if isinstance(init, str) and init == "loftq":  # called without a config: PEFT's LoftQConfig defaults
            init = LoftQ(*LOFTQ_DEFAULTS.values())
        if modifies_base_weight(init):
            problem = rewrite_problem(self.base_layer, init, self.rank[name])
            if problem:
                raise ValueError(problem)
            args = (self.target_weight(), self.factors_a[name], self.factors_b[name], self.scaling[name],
                    self.fan_in_fan_out)
            if isinstance(init, LoftQ):
                loftq_init(*args[:4], init.bits, init.iterations, BLOCK_SIZE)
                setattr(self.base_layer, LOFTQ_GRID, (init.bits, BLOCK_SIZE))
                return
            if init == "olora":
                olora_init(*args)
            else:
                pissa_init(*args, iterations=pissa_iterations(init))
            self.initial_factors[name] = (self.factors_a[name].detach().clone(),
                                          self.factors_b[name].detach().clone())
        elif init == "mica":
            mica_init(self.target_weight(), self.factors_a[name], self.factors_b[name], self.fan_in_fan_out)
        else:
            super().init_factors(name, init)

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        self.initial_factors.pop(name, None)

    def add_kasa(self, name: str) -> None:
        """KaSA: the base weight loses its r smallest singular components (model.attach checked every layer can),
        and the adapter gets a diagonal between A and B, random as PEFT's: B = 0 keeps the start at the truncated
        base."""
        a = self.factors_a[name]
        kasa_truncate_(self.base_layer.weight, self.rank[name])
        self.lora_diag[name] = nn.Parameter(torch.randn(self.rank[name], dtype=a.dtype, device=a.device))

    def factor_a(self, name: str) -> torch.Tensor:
        """A as the low-rank product uses it: diag(d) A for a KaSA adapter (a differentiable product, so d and A
        both get their gradients), else A itself."""
        a = self._modules[self.a_name]._parameters[name]
        diag = self._modules["lora_diag"]._parameters
        return a * diag[name].to(a.dtype)[:, None] if name in diag else a

    def target_weight(self) -> torch.Tensor:
        # a quantized base (bitsandbytes too) holds codes: what merging and DoRA's norms read is the dense weight
        return dense_weight(self.base_layer)

    def target_source(self) -> torch.Tensor:
        return dense_source(self.base_layer)

    def target_dtype(self) -> torch.dtype:
        # not dense_weight's: on a quantized base that dequantizes the whole weight, for every adapter added
        return dense_dtype(self.base_layer)

    def dora_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.fan_in_fan_out else weight

    def magnitude_shape(self) -> tuple[int, ...]:
        return (self.out_features,)  # without reading (on a quantized base: dequantizing) the weight

    def feature_view(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return v[None, :] if self.fan_in_fan_out else v[:, None]

    def frozen_output(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dora_rows(weight).to(x.dtype))

    def low_rank(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.factor_a(name), self.factors_b[name]
        return x.to(a.dtype) @ a.T @ b.T * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.factor_a(name), self.factors_b[name]
        # The dtype alone: reading a quantized base's weight would dequantize all of it.
        dt = torch.promote_types(dense_dtype(self.base_layer), torch.float32)
        delta = (b.to(dt) @ a.to(dt)) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_plan is not None:
            return self.row_plan(x, *args, **kwargs)
        names = self.unmerged_active()
        # Submodules and parameters straight from their dicts: a step runs this for every adapted layer, and
        # nn.Module's attribute lookup (after a failed normal one) costs host time a small GPU layer shows.
        modules = self._modules
        base, dora = modules["base_layer"], modules["lora_magnitude_vector"]
        if not names or args or kwargs or not _fusable(base) or (len(dora) and any(n in dora for n in names)) or (
                self.activation and any(n in self.activation for n in names)):
            return super().forward(x, *args, **kwargs)
        b = modules[self.b_name]._parameters
        adapters = [LowRank(self.factor_a(n), b[n], self.scaling[n], self.dropout[n]) for n in names]
        bias = self._bias_with_adapters(names) if len(modules["lora_B_bias"]) else base.bias
        if torch.is_autocast_enabled(x.device.type):
            return self._fused_under_autocast(x, bias, adapters)
        return lora_linear(x, base.weight, bias, self.fan_in_fan_out, adapters, self.training)

    def _bias_with_adapters(self, names: list[str]) -> torch.Tensor | None:
        """The base bias plus ``s b`` of the adapters with a bias of their own (lora_bias): one bias vector, which
        the fused function adds where it adds the base's."""
        base = self._modules["base_layer"]
        bias, own = base.bias, self._modules["lora_B_bias"]._parameters
        for name in names:
            if name in own:
                term = own[name] * self.scaling[name]
                bias = term.to(base.weight.dtype) if bias is None else bias + term.to(bias.dtype)
        return bias

    def _fused_under_autocast(self, x: torch.Tensor, bias: torch.Tensor | None,
                              adapters: list[LowRank]) -> torch.Tensor:
        """Autocast casts op by op, which it cannot do inside the fused function. So the inputs get here the cast
        autocast gives F.linear's (x, weight, bias and factors to the autocast dtype, float64 left alone), as
        differentiable casts, so each gradient comes back in its parameter's dtype, and the function runs with
        autocast off. Each forward casts the frozen weight again, as autocast itself does for tensors that need
        no gradient."""
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type)
        base = self.base_layer

        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t

        with torch.autocast(device_type, enabled=False):
            return lora_linear(cast(x), cast(base.weight), cast(bias), self.fan_in_fan_out,
                               [ad._replace(a=cast(ad.a), b=cast(ad.b)) for ad in adapters], self.training)

    def _fusable(self) -> bool:
        return _fusable(self._modules["base_layer"])

    def add_lora(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.factor_a(name), self.factors_b[name]
        h = nn.functional.linear(self.lora_input(x, name), a)
        own_bias = self.lora_B_bias.get(name)
        if h.dtype == result.dtype and own_bias is None:
            # result + s * h B^T in one fused call: no separate scaled temporary.
            flat = torch.addmm(result.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]), b.T,
                               alpha=self.scaling[name])
            return flat.view(result.shape)
        return result + (nn.functional.linear(h, b, own_bias) * self.scaling[name]).to(result.dtype)
