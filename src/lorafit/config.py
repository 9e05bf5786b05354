"""LoraConfig: what to adapt and how.

Field names and meanings follow PEFT's ``LoraConfig`` so that an
``adapter_config.json`` written by either tool is read by the other.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Union

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")
INIT_SCHEMES = (True, False, "gaussian", "orthogonal", "nora", "pissa", "olora", "eva", "loftq", "corda", "lora_ga",
                "mica")
# PiSSA from a randomized SVD with this many subspace iterations (PEFT's name)
_PISSA_NITER = re.compile(r"pissa_niter_([0-9]+)")
# PEFT's LoftQConfig fields and defaults
LOFTQ_DEFAULTS = {"loftq_bits": 4, "loftq_iter": 1}
# PEFT's KasaConfig: the weights of KaSA's two regularizers (lorafit.kasa_loss)
KASA_DEFAULTS = {"beta": 1e-4, "gamma": 1e-3}
# The PEFT release whose reading of the files lorafit writes matches lorafit's: from 0.22 on, PEFT adds an
# nn.MultiheadAttention adapter's out-projection change once, as lorafit does (lorafit.io reads older files).
PEFT_FORMAT_VERSION = "0.22.0"


class LoftQ(NamedTuple):
    """``init_lora_weights="loftq"`` as a layer receives it: with the quantizer's bits and the number of
    alternating quantize / SVD steps from ``loftq_config``."""

    bits: int
    iterations: int

    def __repr__(self) -> str:  # error messages name the init as the config spells it
        return "'loftq'"


def modifies_base_weight(init: bool | str | LoftQ) -> bool:
    """Whether an initialisation takes the adapter's start from the base weight and changes the base weight
    (PiSSA, OLoRA: the residual stays in it; LoftQ: its quantized form replaces it): such adapters only fit
    the base they were initialised on, so loading one runs it again."""
    return init in ("pissa", "olora", "loftq") or isinstance(init, LoftQ) or (
        isinstance(init, str) and _PISSA_NITER.fullmatch(init) is not None)


def freezes_b(init: bool | str | LoftQ) -> bool:
    """Whether the adapter trains A only, B staying as initialised (MiCA)."""
    return init == "mica"


def pissa_iterations(init: bool | str) -> int | None:
    """The subspace iterations of ``"pissa_niter_N"``; None for an exact SVD."""
    match = _PISSA_NITER.fullmatch(init) if isinstance(init, str) else None
    return int(match.group(1)) if match else None


# Keys PEFT writes that describe features lorafit does not implement. They are
# accepted when reading a file only while they hold their "off" value.
_PEFT_OFF_VALUES: dict[str, Any] = {
    "use_qalora": False,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "runtime_config": None,
    "arrow_config": None,
    "monteclora_config": None,
    # ASTRA (PEFT 0.22) trains against a base whose weights its initialization rewrote
    "astra_config": None,
}
# Keys PEFT writes that carry no meaning for lorafit (bookkeeping only).
_PEFT_IGNORED = {"peft_type", "auto_mapping", "revision", "peft_version", "qalora_group_size", "modules_to_tie",
                 "bdlora_config",
                 # VeLoRA only changes what backward keeps in memory; the adapter computes the same function.
                 "velora_config",
                 # BD-LoRA's factors are block-diagonal; lorafit.io expands them into the plain LoRA they compute.
                 "use_bdlora"}

TargetSpec = Union[str, list[str], None]


@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter.

    A frozen weight ``W`` (d_out x d_in) gets ``A`` (r x d_in) and ``B``
    (d_out x r); the layer computes ``W x + s * B (A dropout(x))`` with
    ``s = lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with ``use_rslora``).

    ``target_modules``: a list matches a module whose full name equals an entry
    or ends with ``"." + entry``; a string is a regular expression that must
    match the whole module name; ``"all-linear"`` means every linear layer
    except the output head, and every ``nn.MultiheadAttention`` as a whole.
    ``exclude_modules`` uses the same rules. ``modules_to_save``, as in PEFT,
    matches every module whose name ends with an entry as plain text.
    ``rank_pattern`` / ``alpha_pattern`` map a module-name pattern (regex,
    matched against the end of the name) to a per-module rank / alpha.

    ``target_parameters`` adapts weights that are parameters of a module rather
    than of a linear layer, such as the stacked expert weights of a mixture of
    experts (``"mlp.experts.gate_up_proj"``): an entry matches
    ``<module>.<parameter>`` in full or at its end. A 3-D parameter
    (experts, out, in) gets one rank-``r`` pair per expert. The module then runs
    with ``W + s B A`` in place of ``W``, so the adapter sees no dropout:
    ``lora_dropout`` must be 0.

    ``init_lora_weights``: ``True`` (A random, B = 0), ``"gaussian"`` (A normal
    with std 1/r), ``"orthogonal"`` (A and B both random from orthogonal halves
    of one matrix, so B A = 0; r even), ``"nora"`` (NoRA: A random with each
    column a unit vector, B = 0; not on convolutions or embeddings), ``"pissa"`` / ``"pissa_niter_N"``
    (exact / randomized SVD of W) and ``"olora"`` (QR of W), which move W's
    principal part into the factors, or ``False`` (both random, not a no-op).
    ``"eva"`` (A from the principal directions of the layers' inputs on data,
    ranks moved to where they explain most; ``eva_config`` holds PEFT's
    ``EvaConfig`` options) needs data: ``lorafit.attach_eva``; so does ``"corda"``
    (``W``'s components as its inputs weight them go into the factors, the
    rest stays in ``W``; ``corda_config`` holds PEFT's ``CordaConfig``
    options): ``lorafit.attach_corda``; and so does ``"lora_ga"`` (Wang et
    al., 2024: A and B from the SVD of the weight's gradient on data, the base
    keeping ``W - s B A``, so the first steps move like full fine-tuning's;
    ``lora_ga_config`` holds PEFT's ``LoraGAConfig`` options):
    ``lorafit.attach_lora_ga``. ``"mica"`` (Minor Component Adaptation) sets B
    to the left singular vectors of W's r smallest singular values and A to
    zero, and trains A only (B stays frozen). ``"loftq"``
    (Li et al., 2023) replaces W by its NF4 / int8 form Q (lorafit.quantize's,
    ``loftq_config = {"loftq_bits": 4, "loftq_iter": 1}``) and starts ``s B A``
    as the top-r SVD of ``W - Q``, alternating the two ``loftq_iter`` times, so a
    quantized base starts nearer the original model; ``quantize_base`` then
    stores exactly that Q.

    ``layer_replication`` (PEFT's): ``[[0, 4], [2, 5]]`` makes the model's layers
    0, 1, 2, 3, 2, 3, 4 before the adapter is attached; repeats share the base
    weights of the layer they copy and get adapters of their own.

    ``lora_bias`` gives ``B`` a bias (scaled like ``B``): ``W x + s (B A x + b)``,
    which merging adds to the base layer's bias. It exists for adapters taken
    from fully fine-tuned weights, whose biases changed too; Linear and
    convolution layers only.

    ``alora_invocation_tokens`` (aLoRA, PEFT's): the adapter changes a token only
    from the last occurrence of these token ids in its row on, so the base
    model's cache of everything before serves it (``lorafit.alora``); Linear
    layers only, and never merged.

    ``trainable_token_indices`` trains new values for some rows of an embedding
    (e.g. added special tokens): a list of token ids for the model's input
    embedding, or a mapping of module name to token ids, which may also name an
    untied output head.

    ``ensure_weight_tying`` (PEFT's), for a model whose output head shares the
    input embedding's weight (tied embeddings): a LoRA adapter on the embedding
    (or on the head, which then means the embedding) also changes the head,
    transposed, so the two stay one weight, merged or not; and a
    ``modules_to_save`` copy of either is one copy that both use. Without it
    the head keeps scoring with the base weight, as in PEFT.

    ``kasa_config`` (KaSA, Wang et al., 2024; PEFT's, ``{"beta": 1e-4,
    "gamma": 1e-3}``): attaching the adapter truncates each adapted weight to
    its top ``min(d_in, d_out) - r`` singular components, for good (disabling
    or removing the adapter does not undo it), and the layer computes
    ``W' x + s * B diag(d) A x`` with a trained vector ``d`` (``lora_diag``).
    ``lorafit.kasa_loss`` gives its regularizers, weighted by beta and gamma;
    ``lorafit train`` adds them to the loss. nn.Linear layers only.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    modules_to_save: list[str] | None = None
    bias: str = "none"
    fan_in_fan_out: bool = False
    init_lora_weights: bool | str = True
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    base_model_name_or_path: str | None = None
    task_type: str | None = None
    inference_mode: bool = False
    target_parameters: list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    lora_bias: bool = False
    eva_config: dict[str, Any] | None = None
    corda_config: dict[str, Any] | None = None
    lora_ga_config: dict[str, Any] | None = None
    loftq_config: dict[str, int] = field(default_factory=dict)
    alora_invocation_tokens: list[int] | None = None
    layer_replication: list[list[int]] | None = None
    ensure_weight_tying: bool = False
    kasa_config: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.target_parameters, (set, tuple)):
            self.target_parameters = sorted(self.target_parameters)
        if isinstance(self.layer_replication, tuple):
            self.layer_replication = [list(p) for p in self.layer_replication]
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        self.validate()

    # -- validation ---------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the allowed values."""
        _check_rank("r", self.r)
        _check_alpha("lora_alpha", self.lora_alpha)
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)) or not (
            0.0 <= self.lora_dropout < 1.0
        ):
            raise ValueError(f"lora_dropout must be a number with 0 <= lora_dropout < 1, got {self.lora_dropout!r}")
        _check_targets("target_modules", self.target_modules)
        _check_targets("exclude_modules", self.exclude_modules)
        if self.modules_to_save is not None and (
            not isinstance(self.modules_to_save, list)
            or not all(isinstance(m, str) and m for m in self.modules_to_save)
        ):
            raise ValueError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {', '.join(map(repr, BIAS_MODES))}, got {self.bias!r}")
        if not isinstance(self.fan_in_fan_out, bool):
            raise ValueError(f"fan_in_fan_out must be true or false, got {self.fan_in_fan_out!r}")
        init = self.init_lora_weights
        if not any(init is s or (isinstance(s, str) and init == s) for s in INIT_SCHEMES) and (
                pissa_iterations(init) is None):
            allowed = ", ".join(repr(s) for s in INIT_SCHEMES)
            raise ValueError(f"init_lora_weights must be one of {allowed} or 'pissa_niter_N', got {init!r}")
        self._validate_loftq()
        self._validate_alora()
        if self.corda_config is not None and not isinstance(self.corda_config, dict):
            raise ValueError(f"corda_config must be a mapping (PEFT's CordaConfig fields) or null, got "
                             f"{self.corda_config!r}")
        if self.lora_ga_config is not None and not isinstance(self.lora_ga_config, dict):
            raise ValueError(f"lora_ga_config must be a mapping (PEFT's LoraGAConfig fields) or null, got "
                             f"{self.lora_ga_config!r}")
        if init == "mica" and self.use_dora:
            raise ValueError("init_lora_weights='mica' is not supported with use_dora=True")
        if self.eva_config is not None and not isinstance(self.eva_config, dict):
            raise ValueError(f"eva_config must be a mapping (PEFT's EvaConfig fields) or null, got {self.eva_config!r}")
        if not isinstance(self.ensure_weight_tying, bool):
            raise ValueError(f"ensure_weight_tying must be true or false, got {self.ensure_weight_tying!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora must be true or false, got {self.use_rslora!r}")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"use_dora must be true or false, got {self.use_dora!r}")
        if not isinstance(self.rank_pattern, dict):
            raise ValueError(f"rank_pattern must be a mapping of module pattern to rank, got {self.rank_pattern!r}")
        for key, rank in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", rank)
            _check_regex(f"rank_pattern key {key!r}", key)
        if not isinstance(self.alpha_pattern, dict):
            raise ValueError(f"alpha_pattern must be a mapping of module pattern to alpha, got {self.alpha_pattern!r}")
        for key, alpha in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{key!r}]", alpha)
            _check_regex(f"alpha_pattern key {key!r}", key)
        layers = self.layers_to_transform
        if layers is not None:
            items = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
            if not isinstance(items, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                      for i in items):
                raise ValueError(f"layers_to_transform must be a layer index >= 0 or a list of them, got {layers!r}")
            if isinstance(self.target_modules, str):
                raise ValueError(
                    "layers_to_transform cannot be combined with a regex string in target_modules; "
                    "put the layer indices into the regex instead"
                )
        if self.layers_pattern is not None:
            if layers is None:
                raise ValueError("layers_pattern is only meaningful together with layers_to_transform")
            pats = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern
            if not isinstance(pats, list) or not all(isinstance(p, str) for p in pats):
                raise ValueError(f"layers_pattern must be a string or a list of strings, got {self.layers_pattern!r}")
        self._validate_lora_bias()
        self._validate_kasa()
        _check_layer_replication(self.layer_replication)
        self._validate_target_parameters()
        _check_token_indices(self.trainable_token_indices)
        if self.task_type is not None and not isinstance(self.task_type, str):
            raise ValueError(f"task_type must be a string such as 'SEQ_CLS' or 'CAUSAL_LM', got {self.task_type!r}")

    def _validate_lora_bias(self) -> None:
        if not isinstance(self.lora_bias, bool):
            raise ValueError(f"lora_bias must be true or false, got {self.lora_bias!r}")
        if not self.lora_bias:
            return
        # as in PEFT, whose files must read back there: a DoRA update rescales the weight, and the other
        # initialisations say nothing about a bias
        if self.use_dora:
            raise ValueError("lora_bias=True is not supported with use_dora=True")
        if self.init_lora_weights not in (True, False):
            raise ValueError("lora_bias=True needs init_lora_weights true or false, got "
                             f"{self.init_lora_weights!r}")
        if self.target_parameters is not None:
            raise ValueError("lora_bias=True is not supported with target_parameters")

    def _validate_kasa(self) -> None:
        value = self.kasa_config
        if value is None:
            return
        if not isinstance(value, dict):
            raise ValueError(f"kasa_config must be a mapping with beta and gamma (KaSA's regularizer weights) or "
                             f"null, got {value!r}")
        unknown = sorted(set(value) - set(KASA_DEFAULTS))
        if unknown:
            raise ValueError(f"kasa_config: unknown keys {unknown}; it takes {sorted(KASA_DEFAULTS)}")
        self.kasa_config = value = {**KASA_DEFAULTS, **value}
        for key, weight in value.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise ValueError(f"kasa_config.{key} must be a number >= 0, got {weight!r}")
        # KaSA truncates the base weight and adds a learnt diagonal between A and B: a plain LoRA of a Linear
        # weight, which the other variants and initialisations would change or start from otherwise
        for name, bad in (("use_dora", self.use_dora), ("lora_bias", self.lora_bias),
                          ("target_parameters", self.target_parameters),
                          ("fan_in_fan_out", self.fan_in_fan_out),
                          ("alora_invocation_tokens (aLoRA)", self.alora_invocation_tokens),
                          (f"init_lora_weights={self.init_lora_weights!r}",
                           self.init_lora_weights not in (True, False, "gaussian"))):
            if bad:
                raise ValueError(f"kasa_config (KaSA) is not supported with {name}")

    def _validate_target_parameters(self) -> None:
        value = self.target_parameters
        if value is None:
            return
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"target_parameters must be a non-empty list of parameter names such as "
                             f"'mlp.experts.gate_up_proj', got {value!r}")
        # W + s B A replaces W before the module runs: no input of the adapter for dropout to act on
        if self.lora_dropout:
            raise ValueError(f"lora_dropout must be 0 with target_parameters (got {self.lora_dropout!r}): the "
                             "adapter changes the parameter itself, so there is no adapter input to drop")
        for name, bad in (("use_dora", self.use_dora), ("fan_in_fan_out", self.fan_in_fan_out)):
            if bad:
                raise ValueError(f"{name} is not supported with target_parameters")
        if modifies_base_weight(self.init_lora_weights) or self.init_lora_weights in ("orthogonal", "mica"):
            raise ValueError(f"init_lora_weights={self.init_lora_weights!r} is not supported with target_parameters")

    def _validate_loftq(self) -> None:
        value = self.loftq_config
        if value is None:  # PEFT's "off" written as null
            value = self.loftq_config = {}
        if not isinstance(value, dict):
            raise ValueError(f"loftq_config must be a mapping with loftq_bits and loftq_iter, got {value!r}")
        if self.init_lora_weights != "loftq":
            if value:
                raise ValueError(f"loftq_config is used only with init_lora_weights='loftq' (got "
                                 f"{self.init_lora_weights!r}); drop it or set init_lora_weights='loftq'")
            return
        unknown = sorted(set(value) - set(LOFTQ_DEFAULTS))
        if unknown:
            raise ValueError(f"loftq_config: unknown keys {unknown}; it takes {sorted(LOFTQ_DEFAULTS)}")
        # written out in full: PEFT refuses an empty loftq_config with init_lora_weights='loftq'
        self.loftq_config = value = {**LOFTQ_DEFAULTS, **value}
        if value["loftq_bits"] not in (4, 8) or isinstance(value["loftq_bits"], bool):
            raise ValueError(f"loftq_config.loftq_bits must be 4 (NF4) or 8 (int8), got {value['loftq_bits']!r}")
        if isinstance(value["loftq_iter"], bool) or not isinstance(value["loftq_iter"], int) or \
                value["loftq_iter"] < 1:
            raise ValueError(f"loftq_config.loftq_iter must be an integer >= 1, got {value['loftq_iter']!r}")

    def _validate_alora(self) -> None:
        tokens = self.alora_invocation_tokens
        if tokens is None:
            return
        if not isinstance(tokens, list) or not tokens or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
            raise ValueError("alora_invocation_tokens must be a non-empty list of token ids >= 0 (the tokenized "
                             f"invocation string), got {tokens!r}")
        for name, bad in (("use_dora", self.use_dora), ("lora_bias", self.lora_bias),
                          ("target_parameters", self.target_parameters),
                          ("init_lora_weights='mica'", self.init_lora_weights == "mica")):
            if bad:
                raise ValueError(f"alora_invocation_tokens (aLoRA) is not supported with {name}")

    def layer_init(self) -> bool | str | LoftQ:
        """``init_lora_weights`` as the layers take it: LoftQ with its settings, else the value itself."""
        if self.init_lora_weights == "loftq":
            return LoftQ(self.loftq_config["loftq_bits"], self.loftq_config["loftq_iter"])
        return self.init_lora_weights

    # -- per-module values --------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        key = pattern_key(self.rank_pattern, module_name)
        return self.r if key is None else int(self.rank_pattern[key])

    def alpha_for(self, module_name: str) -> float:
        key = pattern_key(self.alpha_pattern, module_name)
        return self.lora_alpha if key is None else float(self.alpha_pattern[key])

    def scale_for(self, module_name: str) -> float:
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # -- serialisation ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The flat JSON object PEFT writes as ``adapter_config.json``."""
        out: dict[str, Any] = {"peft_type": "LORA", "peft_version": PEFT_FORMAT_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, (list, tuple)) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config") -> "LoraConfig":
        """Build a config from a PEFT-style dict; unknown keys are warned about and ignored."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"{source}: peft_type is {peft_type!r}; lorafit reads LoRA adapters ('LORA'), and "
                             "AdaLoRA, LoHa, LoKr and VeRA adapter directories ('ADALORA', 'LOHA', 'LOKR', "
                             "'VERA') through load_adapter / read_adapter")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown: list[str] = []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in _PEFT_OFF_VALUES:
                if value not in (_PEFT_OFF_VALUES[key], None, False, {}, []):
                    raise ValueError(f"{source}: {key}={value!r} uses a PEFT feature lorafit does not implement")
            elif key not in _PEFT_IGNORED:
                unknown.append(key)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown keys {sorted(unknown)}", stacklevel=2)
        try:
            return cls(**kwargs)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "LoraConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source=str(path))


def _check_layer_replication(value: Any) -> None:
    if value is None:
        return
    pairs = value if isinstance(value, list) and value else None
    if pairs is None or not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(
            isinstance(i, int) and not isinstance(i, bool) for i in p) and 0 <= p[0] < p[1] for p in pairs):
        raise ValueError("layer_replication must be a non-empty list of [start, end] layer ranges with "
                         f"0 <= start < end (end excluded), got {value!r}")


def _check_token_indices(value: Any) -> None:
    if value is None:
        return
    groups = value.items() if isinstance(value, dict) else [(None, value)]
    for module, ids in groups:
        field_name = "trainable_token_indices" + ("" if module is None else f"[{module!r}]")
        if module is not None and (not isinstance(module, str) or not module):
            raise ValueError("trainable_token_indices keys must be module names (embeddings, output heads), "
                             f"got {module!r}")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                           for i in ids):
            raise ValueError(f"{field_name} must be a non-empty list of token ids >= 0, got {ids!r}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{field_name} names a token twice: {ids!r}")


def _check_rank(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_alpha(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_regex(name: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{name} is not a valid regular expression: {exc}") from None


def _check_targets(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, str):
        if value != ALL_LINEAR:
            _check_regex(name, value)
        return
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(
            f"{name} must be a non-empty list of module names, a regex string or {ALL_LINEAR!r}, got {value!r}"
        )


def pattern_key(patterns: dict[str, Any], module_name: str) -> str | None:
    # Same rule as PEFT: the first pattern that matches the end of the name at a dot boundary.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None
