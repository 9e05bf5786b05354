"""What every LoRA-wrapped layer shares: named adapters, activation, merging.

A wrapper holds the untouched frozen ``base_layer`` and, per adapter name, the
two low-rank factors. Subclasses say how the factors are shaped, how the
low-rank path is added to the base output, and what ``B A`` means as a change
of the base weight.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorafit.layers import dora
from lorafit.quantized_base import is_quantized


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """At least float32 for products that are merged into a weight, so bf16/fp16 lose nothing extra."""
    return torch.promote_types(weight.dtype, torch.float32)


def low_precision(dtype: torch.dtype) -> bool:
    """bf16, fp16 and narrower floats, where rounding a merge loses bits that subtracting the delta cannot restore."""
    return dtype.is_floating_point and torch.finfo(dtype).bits < 32


def orthogonal_pair_(a: torch.Tensor, b: torch.Tensor) -> None:
    """A and B both random and B A = 0: each is a random matrix times one half of the rows of a random orthogonal
    r x r matrix, A the even rows, B the odd ones, which are orthogonal to each other. Both factors get
    gradients from the first step (with B = 0, A gets none)."""
    r = a.shape[0]
    if r % 2:
        raise ValueError(f"init_lora_weights='orthogonal' needs an even rank, got r={r}")
    q, _ = torch.linalg.qr(torch.randn(r, r, device=a.device))
    fan_in, fan_out = a[0].numel(), b.shape[0]
    a_flat = torch.randn(fan_in, r // 2, device=a.device) @ q[0::2] / 10.0
    b_flat = torch.randn(fan_out, r // 2, device=a.device) @ q[1::2] / 10.0
    a.copy_(a_flat.T.reshape(a.shape))
    b.copy_(b_flat.reshape(b.shape))


def grouped_pointwise(b: torch.Tensor, groups: int) -> torch.Tensor:
    """B as the dense (features, r) matrix it applies. A grouped B (a grouped convolution's 1x1 B, (C_out, r/G,
    1, ...)) is block-diagonal: output channel o of group j = o // (C_out / G) reads columns j r/G to
    (j + 1) r/G, the rest are zero."""
    if groups == 1:
        return b.flatten(1)
    out, per_group = b.shape[0], b.shape[1]
    rows = b.flatten(1).view(groups, out // groups, per_group)
    dense = rows.new_zeros(groups, out // groups, groups, per_group)
    index = torch.arange(groups, device=b.device)
    dense[index, :, index] = rows
    return dense.view(out, groups * per_group)


class InPlaceOf(nn.Module):
    """A module that stands in for another (``stand_in_for``): anything not found on it (in_features, weight,
    padding_idx, ...) is the other's, so code that inspects the model keeps working. ``OWN`` names the
    attributes that are never looked up there."""

    OWN: tuple[str, ...] = ("base_layer",)

    def stand_in_for(self) -> nn.Module:
        return self.base_layer

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in self.OWN:
                raise
            return getattr(self.stand_in_for(), name)


class SharesWeight(InPlaceOf):
    """A module that shares its weight with an adapted layer (tied embeddings) and applies that layer's adapters:
    it holds nothing of its own, the other layer's wrapper (``source``) holds the adapters and which are active."""

    row_plan = None  # set by lorafit.batched.adapter_per_row

    def __init__(self, base_layer: nn.Module, source: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.__dict__["source"] = source  # not a submodule: its tensors are saved once, under the source
        self.disabled = False

    @property
    def adapter_names(self) -> list[str]:
        return self.source.adapter_names

    def set_active(self, names: list[str]) -> None:
        """Nothing to set: the source's wrapper holds the active adapters."""


class LoraLayer(InPlaceOf):
    """Base class of the LoRA wrappers; not used directly."""

    # Attribute names of the factor dicts; PEFT names them differently for embeddings.
    a_name = "lora_A"
    b_name = "lora_B"
    # Whether B may have a bias (lora_bias=True): where the base layer's output has one bias per output.
    bias_capable = False
    # Whether DoRA adapters are supported (the layer gives the views lorafit.layers.dora uses), and whether the
    # low-rank path takes dropout (an embedding's input is token ids)
    dora_capable = False
    drops_input = True
    # Set by lorafit.batched.adapter_per_row: a forward in which each batch row has its own adapter.
    row_plan = None
    # B's groups: a grouped convolution's B maps each group's r / b_groups rows of A to that group's outputs
    b_groups = 1

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        setattr(self, self.a_name, nn.ParameterDict())
        setattr(self, self.b_name, nn.ParameterDict())
        self.scaling: dict[str, float] = {}
        self.rank: dict[str, int] = {}
        self.dropout: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        # B's bias, for adapters with lora_bias=True (PEFT's lora_B.bias)
        self.lora_B_bias = nn.ParameterDict()
        # A low-precision base weight (and bias) as it was before the first merge, for an exact unmerge, by
        # "weight" / "bias". Plain attributes, not buffers: saved files and state_dict stay the same.
        self._premerge: dict[str, torch.Tensor] = {}
        # aLoRA adapters: the model's lorafit.alora.Activation, which says at which positions each one applies
        self.activation: dict[str, object] = {}
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only; PEFT's name
        self.lora_diag = nn.ParameterDict()  # KaSA adapters only: the trained diagonal between A and B; PEFT's name
        self._dora_factors: dict[str, torch.Tensor] = {}  # per-feature factor of a merged DoRA adapter

    # -- adapters ----------------------------------------------------------------
    # Read from _modules directly: nn.Module finds them only after a failed normal lookup, and every forward
    # reads them (a few microseconds of host time per adapted layer, which a GPU step pays per layer).
    @property
    def factors_a(self) -> nn.ParameterDict:
        return self._modules[self.a_name]

    @property
    def factors_b(self) -> nn.ParameterDict:
        return self._modules[self.b_name]

    @property
    def adapter_names(self) -> list[str]:
        return list(self.factors_a.keys())

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def b_matrix(self, name: str) -> torch.Tensor:
        """B as the dense (features, r) matrix it applies (see ``grouped_pointwise``)."""
        return grouped_pointwise(self.factors_b[name], self.b_groups)

    def target_weight(self) -> torch.Tensor:
        """The frozen weight that ``B A`` changes: what merging folds into."""
        return self.base_layer.weight

    def target_source(self) -> torch.Tensor:
        """The tensor ``target_weight()`` is read from, for caches keyed on it: the weight itself, or the codes of a
        quantized one (whose every read is a new tensor)."""
        return self.target_weight()

    def target_dtype(self) -> torch.dtype:
        """``target_weight()``'s dtype, without reading a weight that is computed on each read."""
        return self.target_weight().dtype

    def add_adapter(
        self,
        name: str,
        r: int,
        scale: float,
        dropout: float = 0.0,
        init: bool | str = True,
        dtype: torch.dtype | None = None,
        use_dora: bool = False,
        bias: bool = False,
        kasa: bool = False,
    ) -> None:
        if bias and not self.bias_capable:
            raise ValueError(f"lora_bias=True is supported for Linear and convolution layers, not "
                             f"{type(self.base_layer).__name__}; exclude this module or turn lora_bias off")
        if use_dora and not self.dora_capable:
            raise ValueError(
                f"DoRA (use_dora=True) is supported for Linear, Embedding and convolution layers, not "
                f"{type(self.base_layer).__name__}; exclude this module or turn DoRA off"
            )
        if name in self.factors_a:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        dtype, device = dtype or self.target_dtype(), self.target_source().device
        shape_a, shape_b = self.factor_shapes(r)
        a = nn.Parameter(torch.empty(shape_a, dtype=dtype, device=device))
        b = nn.Parameter(torch.empty(shape_b, dtype=dtype, device=device))
        self.factors_a[name] = a
        self.factors_b[name] = b
        if bias:
            self.lora_B_bias[name] = nn.Parameter(torch.empty(shape_b[0], dtype=dtype, device=device))
        self.rank[name] = r
        self.scaling[name] = scale
        self.dropout[name] = dropout
        self.init_factors(name, init)
        if use_dora:
            self.lora_magnitude_vector[name] = dora.init_magnitude(self, name)
        if kasa:
            self.add_kasa(name)

    def add_kasa(self, name: str) -> None:
        raise ValueError(f"KaSA (kasa_config) is supported for nn.Linear layers, not {type(self.base_layer).__name__}; "
                         "exclude this module")

    def init_factors(self, name: str, init: bool | str | None) -> None:
        """Default initialisation: ``B A = 0`` so the model's output is unchanged.

        ``None`` leaves the factors as allocated, for weights about to be loaded."""
        a, b = self.factors_a[name], self.factors_b[name]
        with torch.no_grad():
            if init is None:
                pass
            elif init is True:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.zeros_(b)
            elif init == "gaussian":
                nn.init.normal_(a, std=1.0 / self.rank[name])
                nn.init.zeros_(b)
            elif init is False:
                # Not an identity: both factors random, as PEFT does for debugging.
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            elif init == "orthogonal":
                orthogonal_pair_(a, b)
            elif init == "nora":
                # NoRA (PEFT 0.22): each input feature's column of A (per expert) a unit vector, B = 0
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                columns = a.view(-1, self.rank[name], a.shape[-1])
                columns.div_(columns.norm(dim=1, keepdim=True).clamp_min(1e-6))
                nn.init.zeros_(b)
            elif init == "eva":
                raise ValueError("init_lora_weights='eva' takes A from the layers' inputs on data: attach it with "
                                 "lorafit.attach_eva(model, config, batches)")
            elif init == "corda":
                raise ValueError("init_lora_weights='corda' computes the factors from the layers' inputs on data: "
                                 "attach it with lorafit.attach_corda(model, config, batches)")
            elif init == "lora_ga":
                raise ValueError("init_lora_weights='lora_ga' computes the factors from the weights' gradients on "
                                 "data: attach it with lorafit.attach_lora_ga(model, config, batches)")
            else:
                raise ValueError(f"init_lora_weights={init!r} is not supported for {type(self.base_layer).__name__}")
            if name in self.lora_B_bias and init is not None:
                bias = self.lora_B_bias[name]
                if init is False:  # random, as B is: the initialisation of B's own layer (fan-in: B's columns)
                    bound = 1 / math.sqrt(b[0].numel())
                    nn.init.uniform_(bias, -bound, bound)
                else:
                    nn.init.zeros_(bias)

    def remove_adapter(self, name: str) -> None:
        if name in self.merged:
            self.unmerge([name])
        del self.factors_a[name]
        del self.factors_b[name]
        if name in self.lora_B_bias:
            del self.lora_B_bias[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        if name in self.lora_diag:
            del self.lora_diag[name]
        self.activation.pop(name, None)
        for table in (self.scaling, self.rank, self.dropout):
            del table[name]
        if name in self.active:
            self.active.remove(name)

    def set_active(self, names: list[str]) -> None:
        self.active = [n for n in names if n in self.factors_a]

    # -- merging -----------------------------------------------------------------
    def merge_refusal(self, name: str) -> str | None:
        """Why adapter ``name`` can never be merged into this layer's weight, or None."""
        return None

    def delta_weight(self, name: str) -> torch.Tensor:
        """The change ``s * B A`` in the base weight's layout and device, in ``compute_dtype``: merging rounds
        the sum into the weight's dtype once, not the delta first."""
        raise NotImplementedError

    def fold_(self, weight: torch.Tensor, name: str) -> None:
        """Merge adapter ``name`` into ``weight`` (the base weight or a float32 copy of it) in place."""
        if name in self.lora_magnitude_vector:
            self._dora_factors[name] = dora.merge_into(self, name, weight)
        else:
            weight.add_(self.delta_weight(name))

    def unfold_(self, weight: torch.Tensor, name: str) -> None:
        """Undo ``fold_`` in place."""
        if name in self.lora_magnitude_vector:
            dora.unmerge_from(self, name, weight, self._dora_factors[name])
        else:
            weight.sub_(self.delta_weight(name))

    # -- DoRA's views of this layer (see lorafit.layers.dora) ------------------------------------------
    def dora_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight in storage layout as (features, rest)."""
        raise NotImplementedError

    def feature_view(self, v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """A per-feature vector shaped to broadcast against a weight in storage layout."""
        raise NotImplementedError

    def output_view(self, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """A per-feature vector shaped to broadcast against the layer's output (features last)."""
        return v

    def magnitude_shape(self) -> tuple[int, ...]:
        """The shape of a DoRA magnitude in PEFT's files."""
        return (self.dora_rows(self.target_weight()).shape[0],)

    def frozen_output(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's output without its bias, from its ``target_weight()`` (which the caller has read)."""
        raise NotImplementedError

    def low_rank(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``s`` times the low-rank path of an already dropped-out ``x``, without lora_bias."""
        raise NotImplementedError

    def _fold_bias(self, bias: torch.Tensor, name: str) -> None:
        bias.add_(self.lora_B_bias[name].to(bias.dtype), alpha=self.scaling[name])

    def _unfold_bias(self, bias: torch.Tensor, name: str) -> None:
        bias.sub_(self.lora_B_bias[name].to(bias.dtype), alpha=self.scaling[name])

    def _merge_parts(self):
        """(key, base tensor, fold, unfold, whether an adapter changes it): the weight, and the base bias where
        adapters have biases of their own."""
        yield "weight", self.target_weight(), self.fold_, self.unfold_, lambda name: True
        if len(self.lora_B_bias) and getattr(self.base_layer, "bias", None) is not None:
            yield "bias", self.base_layer.bias, self._fold_bias, self._unfold_bias, self.lora_B_bias.__contains__

    def merge(self, names: list[str] | None = None, safe: bool = False, keep_original: bool = True) -> None:
        """Fold adapters ``names`` (default: the active ones) into the base weight (and an adapter's own bias,
        ``lora_bias``, into the base bias).

        A bf16/fp16 weight gets each merge computed in float32 and rounded once, and a copy of the weight
        from before the first merge is kept, so that ``unmerge`` restores it bit-exactly: this costs one
        copy of the weight per merged layer until its last adapter is unmerged. ``keep_original=False``
        keeps no copy (``merge_and_unload`` drops the wrapper anyway); unmerging then subtracts, as it
        always does for float32/float64 weights, which are merged in place without a copy.
        With ``safe=True`` an adapter that would put NaN or inf into the weight raises ``ValueError``
        and is not merged.
        """
        names = [n for n in (names if names is not None else list(self.active)) if n not in self.merged]
        if names and is_quantized(self.base_layer):
            raise ValueError(
                "cannot merge into a quantized base layer: the adapter would be rounded away by re-quantizing; "
                "use merge_and_unload, which dequantizes the base first"
            )
        # DoRA adapters after the plain ones, as lorafit has always merged them: a DoRA merge rescales
        # whatever the weight holds, so the order changes the merged weight.
        names.sort(key=lambda n: n in self.lora_magnitude_vector)
        activated = [n for n in names if n in self.activation]
        if activated:
            raise ValueError(f"adapter {activated[0]!r} is an aLoRA adapter (alora_invocation_tokens): it applies only "
                             "from its invocation on, and merged it would apply everywhere; nothing was merged")
        biased = [n for n in names if n in self.lora_B_bias]
        if biased and getattr(self.base_layer, "bias", None) is None:
            raise ValueError(f"adapter {biased[0]!r} has a bias of its own (lora_bias=True), but this "
                             f"{type(self.base_layer).__name__} has no bias to merge it into; nothing was merged")
        with torch.no_grad():
            for name in names:
                # every part formed (and checked) before any is written: a refused adapter changes nothing
                writes = []
                for key, target, fold, _, changes in self._merge_parts():
                    if not changes(name):
                        continue
                    low = low_precision(target.dtype)
                    if not (low or safe):
                        writes.append((key, target, fold, None, False))
                        continue
                    merged = target.to(compute_dtype(target), copy=True)
                    fold(merged, name)
                    merged = merged.to(target.dtype)
                    if safe and not torch.isfinite(merged).all():
                        raise ValueError(
                            f"merging adapter {name!r} would put NaN or inf into the {key} of a "
                            f"{type(self.base_layer).__name__}; nothing was merged into this layer"
                        )
                    writes.append((key, target, fold, merged, low))
                for key, target, fold, merged, low in writes:
                    if merged is None:
                        fold(target, name)
                        continue
                    if low and keep_original and key not in self._premerge:
                        self._premerge[key] = target.detach().clone()
                    target.copy_(merged)
                self.merged.append(name)
            if not keep_original:
                self._premerge.clear()

    def unmerge(self, names: list[str] | None = None) -> None:
        """Take merged adapters (default: all) out of the base weight (and bias), the last merged first.

        With a copy kept by ``merge`` the weight is restored bit-exactly: the copy itself once nothing
        stays merged, else the copy with the remaining adapters merged in float32 and rounded once.
        """
        undo = [n for n in reversed(self.merged) if names is None or n in names]
        if not undo:
            return
        remaining = [n for n in self.merged if n not in undo]
        with torch.no_grad():
            for key, target, fold, unfold, changes in self._merge_parts():
                kept = self._premerge.pop(key, None)
                if kept is None:
                    for name in undo:
                        if changes(name):
                            unfold(target, name)
                    continue
                rebuilt = kept.to(target.device, compute_dtype(target), copy=True)
                for name in remaining:
                    if changes(name):
                        fold(rebuilt, name)
                target.copy_(rebuilt)
                if remaining:
                    self._premerge[key] = kept
        self.merged = remaining
        # An exact restore never reads the factors, so drop those of adapters no longer merged here.
        self._dora_factors = {n: f for n, f in self._dora_factors.items() if n in self.merged}

    # -- forward -----------------------------------------------------------------
    def unmerged_active(self) -> list[str]:
        if self.disabled:
            return []
        return [n for n in self.active if n not in self.merged]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_plan is not None:
            return self.row_plan(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self.unmerged_active():
            if name in self.activation:
                result = self._add_activated(result, x, name)
            elif name in self.lora_magnitude_vector:
                result = dora.add_dora(self, result, x, name)
            else:
                result = self.add_lora(result, x, name)
        return result

    def _add_activated(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """An aLoRA adapter's low-rank output at the positions from its invocation on, nothing elsewhere: its input
        zeroed elsewhere, as the low-rank path has no bias (aLoRA refuses lora_bias) and so maps zero to zero."""
        mask = self.activation[name].mask(name, x.shape)
        if mask is None:
            return result
        return self.add_lora(result, x * mask.unsqueeze(-1).to(x.dtype), name)

    def add_lora(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        raise NotImplementedError

    def lora_input(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The LoRA path's input: cast to the adapter dtype, dropout in training only."""
        x = x.to(self.factors_a[name].dtype)
        p = self.dropout[name]
        if p > 0 and self.training:
            x = nn.functional.dropout(x, p=p, training=True)
        return x

    def extra_repr(self) -> str:
        parts = [f"{n}: r={self.rank[n]}, scale={self.scaling[n]:g}" for n in self.adapter_names]
        return "; ".join(parts)
