"""Model operations: attach, detach, merge, unmerge, select and disable adapters.

All functions work on the user's own ``nn.Module`` in place: targeted layers are
replaced by LoRA wrappers that keep the original layer as ``base_layer``.
The configs of the attached adapters live on the model as ``_lorafit_configs``
(name -> LoraConfig) so that saving needs nothing but the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lorafit import alora, fused_paths
from lorafit.config import ALL_LINEAR, LoraConfig, freezes_b, modifies_base_weight
from lorafit.layers import (Conv, Embedding, Linear, LoraLayer, ModulesToSave, MultiheadAttentionLora, ParameterLora,
                            TiedLoraHead, TiedTokens, TrainableTokens)
from lorafit.layers.linear import rewrite_problem
from lorafit.quantized_base import (dense_shape, forget_quantization, is_bitsandbytes_linear, is_quantized,
                                    to_linear, uncounted_weight)
from lorafit.replication import replicate, replication
from lorafit.replication import restore as restore_layers
from lorafit.replication import untie as untie_layers
from lorafit.targeting import (TASK_HEADS, exact_spec, layer_kind, model_embedding, resolve_parameter_targets,
                               resolve_targets, resolve_token_targets, saved_name_matches, unwrapped)

Wrapper = LoraLayer | ModulesToSave | TrainableTokens | TiedTokens | TiedLoraHead

_CONFIGS = "_lorafit_configs"
_ORIGINAL_GRAD = "_lorafit_original_requires_grad"
_UNTIED = "_lorafit_untied"
_NAME = re.compile(r"[A-Za-z0-9_-]+")


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The configs of the adapters attached to ``model``, by name."""
    _refuse_wrapper(model)
    return model.__dict__.setdefault(_CONFIGS, {})


def _refuse_wrapper(model: nn.Module) -> None:
    """lorafit's functions take the model itself. torch.compile, DataParallel and DistributedDataParallel return a
    wrapper that holds no adapter configs and names the model's modules under a prefix (``_orig_mod.``,
    ``module.``), which would end up in saved keys: say so, rather than "no adapter attached"."""
    modules = model._modules
    if "_orig_mod" in modules and type(model).__name__ == "OptimizedModule":
        what, inner = "torch.compile's wrapper (OptimizedModule)", "_orig_mod"
    elif "module" in modules and isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        what, inner = f"a {type(model).__name__} wrapper", "module"
    else:
        return
    raise TypeError(f"lorafit takes the model itself, not {what}: pass model.{inner} (the wrapper runs the same "
                    "modules, so adapters attached or merged there apply to it)")


def wrapped_modules(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, Wrapper]]:
    """The adapter wrappers (LoRA, modules_to_save, token rows), by name, in ``named_modules`` order. It does
    not descend into a wrapper (only parameter wrappers nest: one per adapted parameter of a module, and an
    attention's out-projection inside the attention's; it follows those), which makes it much cheaper than
    ``named_modules`` on a wrapped transformer: loading an adapter calls it often."""
    if not prefix:
        _refuse_wrapper(module)
    for name, child in module._modules.items():
        if child is None:
            continue
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, (LoraLayer, ModulesToSave, TrainableTokens, TiedTokens, TiedLoraHead)):
            yield path, child
            if isinstance(child, MultiheadAttentionLora) and isinstance(child.out_proj_lora, ParameterLora):
                yield f"{path}.base_layer.out_proj", child.out_proj_lora
            while isinstance(child, ParameterLora) and isinstance(child.base_layer, ParameterLora):
                child, path = child.base_layer, f"{path}.base_layer"
                yield path, child
        else:
            yield from wrapped_modules(child, path)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    return ((n, m) for n, m in wrapped_modules(model) if isinstance(m, LoraLayer))


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    return ((n, m) for n, m in wrapped_modules(model) if isinstance(m, ModulesToSave))


def token_layers(model: nn.Module) -> Iterator[tuple[str, TrainableTokens | TiedTokens]]:
    """Embeddings with trainable rows, and the tied heads that score those tokens with them."""
    return ((n, m) for n, m in wrapped_modules(model) if isinstance(m, (TrainableTokens, TiedTokens)))


def tied_lora_heads(model: nn.Module) -> Iterator[tuple[str, TiedLoraHead]]:
    """Output heads that apply the tied input embedding's adapters (ensure_weight_tying)."""
    return ((n, m) for n, m in wrapped_modules(model) if isinstance(m, TiedLoraHead))


def _mergeable(model: nn.Module) -> list[LoraLayer | TrainableTokens]:
    return [m for _, m in wrapped_modules(model) if isinstance(m, (LoraLayer, TrainableTokens))]


def _wrappers(model: nn.Module) -> list[Wrapper]:
    return [m for _, m in wrapped_modules(model)]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    new.train(parent._modules[child].training)  # a wrapper starts in the mode of the layer it replaces
    setattr(parent, child, new)


def _wrap(module: nn.Module, config: LoraConfig) -> LoraLayer:
    kind = layer_kind(module)
    if kind == "linear":
        return Linear(module, fan_in_fan_out=config.fan_in_fan_out)
    if kind == "embedding":
        return Embedding(module)
    if kind == "attention":
        return MultiheadAttentionLora(module)
    return Conv(module)


def attach(
    model: nn.Module,
    config: LoraConfig,
    name: str = "default",
    *,
    activate: bool = True,
    trainable: bool = True,
    dtype: torch.dtype | None = None,
    initialize: bool = True,
    task_heads: bool = True,
) -> nn.Module:
    """Add adapter ``name`` to the modules ``config`` targets and freeze everything else.

    Returns ``model`` (changed in place). Afterwards only the new adapter's
    factors, its ``modules_to_save`` copies and the biases ``config.bias``
    names require gradients (all of them frozen too if ``trainable=False``).
    ``dtype`` sets the adapter's dtype (default: each base layer's dtype).
    ``initialize=False`` leaves the factors uninitialised, for weights that are
    loaded right after (data-dependent inits such as PiSSA still run: they
    change the base weights). ``task_heads``: the head a ``task_type`` trains
    (SEQ_CLS and TOKEN_CLS: ``classifier`` or ``score``; QUESTION_ANS:
    ``qa_outputs``) joins ``modules_to_save``, as in PEFT; False keeps
    ``modules_to_save`` as the config has it (a saved adapter's, which names
    what was saved).
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"adapter name must match [A-Za-z0-9_-]+, got {name!r}")
    configs = adapter_configs(model)
    if name in configs:
        raise ValueError(f"an adapter named {name!r} is already attached; detach it first or pick another name")
    if _ORIGINAL_GRAD not in model.__dict__:  # before any layer is repeated: these names are the model's own
        model.__dict__[_ORIGINAL_GRAD] = {n: p.requires_grad for n, p in model.named_parameters()}
    repeated_here = _repeat_layers(model, config)
    try:
        config = _attach_adapter(model, config, name, dtype, initialize, task_heads)
    except BaseException:
        if repeated_here:
            restore_layers(model)
        if not configs:
            _restore_requires_grad(model)
        raise
    configs[name] = config
    fused_paths.turn_off(model, [path for path, _ in wrapped_modules(model)])

    for p in model.parameters():
        p.requires_grad_(False)
    if trainable:
        for p in adapter_parameters(model, name).values():
            p.requires_grad_(True)
        if freezes_b(config.init_lora_weights):
            for _, layer in lora_layers(model):
                if name in layer.factors_b:
                    layer.factors_b[name].requires_grad_(False)
    if activate:
        # Merged adapters stay active (they are in the weights); the new one joins them.
        set_active(model, merged_adapters(model) + [name])
    return model


def _repeat_layers(model: nn.Module, config: LoraConfig) -> bool:
    """The model's layers repeated as ``config.layer_replication`` says (True if this call did it); every adapter
    on a model with repeated layers must ask for the same repeats."""
    done = replication(model)
    if config.layer_replication is None:
        if done is not None:
            raise ValueError(f"the model's layers are repeated as {done.layer_map} (layer_replication) for the "
                             "adapters attached; another adapter on it needs the same layer_replication")
        return False
    if done is None and adapter_configs(model):
        raise ValueError("layer_replication: adapters without it are attached; repeating the layers under them "
                         "would copy their adapters too. Attach the adapter with layer_replication first")
    return replicate(model, config.layer_replication)


def _attach_adapter(model: nn.Module, config: LoraConfig, name: str, dtype: torch.dtype | None,
                    initialize: bool, task_heads: bool) -> LoraConfig:
    """The adapter's layers wrapped and its tensors made; returns its config as attached (a classifier's head
    among modules_to_save)."""
    if task_heads:
        config = _with_task_heads(model, config)
    parameter_targets = resolve_parameter_targets(model, config)
    # As in PEFT: with target_parameters, no target_modules means no module targets (not a model type's default)
    targets = [] if parameter_targets and config.target_modules is None else resolve_targets(model, config)
    if config.target_modules == ALL_LINEAR:
        # As PEFT does, the adapter records the modules "all-linear" found, not the word: PEFT resolves it by rules
        # of its own (an attention's bypassed out_proj, some classifier heads), so its file must name them
        config = dataclasses.replace(config, target_modules=exact_spec(model, targets))
    token_targets = resolve_token_targets(model, config)
    both = sorted((set(targets) & set(parameter_targets)) | (set(targets) & set(token_targets)))
    if both:
        raise ValueError(f"{both[0]!r} is matched by target_modules and by target_parameters or "
                         "trainable_token_indices; adapt it one way only")
    saved_names = _modules_to_save_names(model, config)
    targets, saved_names, lora_tie, saved_tie = _tie_targets(model, config, targets, saved_names)
    init = config.layer_init()
    _check_base_init(model, targets, config, init)
    _check_kasa(model, targets, config)
    try:
        for target in targets:
            module = model.get_submodule(target)
            if not isinstance(module, LoraLayer):
                module = _wrap(module, config)
                _replace(model, target, module)
            module.add_adapter(
                name, r=config.rank_for(target), scale=config.scale_for(target), dropout=config.lora_dropout,
                init=init if initialize or modifies_base_weight(init) else None, dtype=dtype,
                use_dora=config.use_dora, bias=config.lora_bias, kasa=config.kasa_config is not None,
            )
        if lora_tie is not None:
            _tie_lora_head(model, *lora_tie)
        if config.alora_invocation_tokens is not None:
            _activate(model, config, name, targets)
        for target, parameters in parameter_targets.items():
            for layer in _parameter_wrappers(model, target, parameters):
                key = f"{target}.{layer.parameter_name}"
                layer.add_adapter(name, r=config.rank_for(key), scale=config.scale_for(key),
                                  init=config.init_lora_weights if initialize else None, dtype=dtype)
        for target, ids in token_targets.items():
            _token_wrapper(model, target).add_adapter(name, ids, init=config.init_lora_weights is not False,
                                                      dtype=dtype)
        for target in saved_names:
            module = model.get_submodule(target)
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module)
                _replace(model, target, module)
            module.add_adapter(name)
        if saved_tie is not None:
            _tie_saved_head(model, name, *saved_tie)
    except BaseException:
        _remove_everywhere(model, name)  # a layer that refused the adapter leaves no half-attached model
        raise
    return config


def _tied_pair(model: nn.Module) -> tuple[str, str] | None:
    """(input embedding, output head) module names when the head shares the embedding's weight (tied embeddings),
    whatever adapter wrappers they are in."""
    embedding, head = model_embedding(model, "input"), model_embedding(model, "output")
    if embedding is None or head is None or embedding is head:
        return None
    weight = getattr(unwrapped(embedding), "weight", None)
    if not isinstance(weight, torch.Tensor) or getattr(unwrapped(head), "weight", None) is not weight:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    if id(embedding) not in names or id(head) not in names:
        return None
    return names[id(embedding)], names[id(head)]


def _tie_targets(model: nn.Module, config: LoraConfig, targets: list[str], saved: list[str]
                 ) -> tuple[list[str], list[str], tuple[str, str] | None, tuple[str, str] | None]:
    """ensure_weight_tying, as PEFT does it: a tied output head named in target_modules or modules_to_save means
    the input embedding, and the head follows the embedding. Returns the targets and modules_to_save names to
    attach, and (embedding, head) for a head that applies the embedding's LoRA adapter / whose copy shares the
    embedding copy's weight (None where nothing is tied)."""
    pair = _tied_pair(model)
    if pair is not None and not config.ensure_weight_tying and pair[0] in targets \
            and isinstance(model.get_submodule(pair[1]), TiedLoraHead):
        raise ValueError(f"{pair[0]!r} carries adapters attached with ensure_weight_tying, which {pair[1]!r} "
                         "applies too; one without it would change the embedding alone: attach it with "
                         "ensure_weight_tying=True as well")
    if not config.ensure_weight_tying:
        return targets, saved, None, None
    if pair is None:
        warnings.warn("ensure_weight_tying=True, but this model's output head does not share its input embedding's "
                      "weight: there is nothing to tie", stacklevel=5)
        return targets, saved, None, None
    embedding, head = pair
    lora_tie = saved_tie = None
    if embedding in targets or head in targets:
        if embedding in saved or head in saved:
            raise ValueError(f"ensure_weight_tying: {embedding!r} and {head!r} are one weight, and the adapter names "
                             "one of them in target_modules and one in modules_to_save; adapt it one way only")
        module = model.get_submodule(embedding)
        if isinstance(module, LoraLayer) and module.adapter_names \
                and not isinstance(model.get_submodule(head), TiedLoraHead):
            raise ValueError(f"{embedding!r} carries adapters attached without ensure_weight_tying, which leave "
                             f"{head!r} as it is; a tied adapter beside them is not supported: attach every adapter "
                             "of the embedding with the same ensure_weight_tying")
        if config.use_dora:
            raise ValueError(f"ensure_weight_tying with use_dora=True: the head {head!r} would need the embedding's "
                             "magnitudes, which DoRA keeps per embedding dimension; not supported")
        targets = [t for t in targets if t != head] + ([] if embedding in targets else [embedding])
        lora_tie = (embedding, head)
    if embedding in saved or head in saved:
        for path in (embedding, head):
            module = model.get_submodule(path)
            if not isinstance(module, (ModulesToSave, nn.Embedding, nn.Linear)):
                raise ValueError(f"ensure_weight_tying: modules_to_save takes a copy of {path!r}, which is a "
                                 f"{type(module).__name__} (another adapter adapts it); adapt it one way only")
        saved = [s for s in saved if s != head] + ([] if embedding in saved else [embedding])
        saved_tie = (embedding, head)
    return targets, saved, lora_tie, saved_tie


def _tie_lora_head(model: nn.Module, embedding: str, head: str) -> None:
    """The tied head applies the embedding's adapters (made with the embedding's first tied adapter)."""
    module = model.get_submodule(head)
    if isinstance(module, TiedLoraHead):
        return
    if type(module) is not nn.Linear:
        what = "carries LoRA adapters of its own" if isinstance(module, LoraLayer) else f"is a {type(module).__name__}"
        raise ValueError(f"ensure_weight_tying: the output head {head!r} shares its weight with {embedding!r} and "
                         f"{what}, so it cannot apply the embedding's adapter; adapt the head one way only")
    _replace(model, head, TiedLoraHead(module, model.get_submodule(embedding)))


def _tie_saved_head(model: nn.Module, name: str, embedding: str, head: str) -> None:
    """The tied head's modules_to_save copy holds the embedding copy's weight: one trained table for both."""
    table = model.get_submodule(embedding).modules_to_save[name].weight
    module = model.get_submodule(head)
    if not isinstance(module, ModulesToSave):
        module = ModulesToSave(module)
        _replace(model, head, module)
    module.add_adapter(name, shared={id(module.original_module.weight): table})


def _activate(model: nn.Module, config: LoraConfig, name: str, targets: list[str]) -> None:
    """aLoRA: the adapter's layers read where it applies from the model's activation state."""
    others = [t for t in targets if not isinstance(model.get_submodule(t), Linear)]
    if others:
        kind = type(model.get_submodule(others[0]).base_layer).__name__
        raise ValueError(f"{others[0]}: alora_invocation_tokens (aLoRA) is supported for Linear layers, not {kind}; "
                         "exclude it from target_modules")
    state = alora.add(model, name, config.alora_invocation_tokens)
    for target in targets:
        model.get_submodule(target).activation[name] = state


def _check_base_init(model: nn.Module, targets: list[str], config: LoraConfig, init) -> None:
    """An initialisation from the base weight's SVD checked on every target before the first is touched: a
    refusal half way would leave some base weights changed (PiSSA, OLoRA, LoftQ), and the error names the layer."""
    if not (modifies_base_weight(init) or init == "mica"):
        return
    for target in targets:
        module = model.get_submodule(target)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if init == "mica":
            kind, r = layer_kind(base), config.rank_for(target)
            shape = dense_shape(base) if kind == "linear" else tuple(base.weight.shape)  # codes: not the weight's
            if kind not in ("linear", "embedding"):
                raise ValueError(f"{target}: init_lora_weights='mica' is supported for Linear and Embedding layers, "
                                 f"not {type(base).__name__}; exclude it")
            if r > min(shape):
                raise ValueError(f"{target}: init_lora_weights='mica' needs r <= {min(shape)} (the smaller side of "
                                 f"its weight {list(shape)}), got r={r}")
            continue
        problem = rewrite_problem(base, init, config.rank_for(target))
        if problem:
            raise ValueError(f"{target}: {problem}")


def _check_kasa(model: nn.Module, targets: list[str], config: LoraConfig) -> None:
    """KaSA truncates each target's weight for good, so every target is checked before the first is, and a KaSA
    adapter has the model to itself: another adapter, KaSA or not, was trained on other base weights (a second
    KaSA adapter would truncate them once more, as PEFT lets it)."""
    configs = adapter_configs(model)
    kasa = next((n for n, c in configs.items() if c.kasa_config is not None), None)
    if kasa is not None or (config.kasa_config is not None and configs):
        first = kasa if kasa is not None else next(iter(configs))
        raise ValueError(f"adapter {first!r} is attached, and KaSA (kasa_config) truncates the base weights for its "
                         "adapter: a KaSA adapter cannot share a model with another adapter")
    if config.kasa_config is None:
        return
    shared = _shared_weights(model)
    for target in targets:
        module = model.get_submodule(target)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if type(base) is not nn.Linear or is_quantized(base):
            raise ValueError(f"{target}: KaSA (kasa_config) is supported for nn.Linear layers, not "
                             f"{type(base).__name__} (quantized, GPT-2 Conv1D, ...); exclude it")
        r, k = config.rank_for(target), min(base.weight.shape)
        if r >= k:
            raise ValueError(f"{target}: KaSA drops the weight's r smallest singular components and keeps the rest, "
                             f"so it needs r < {k} (the smaller side of the weight), got r={r}")
        if len(shared.get(id(base.weight), [])) > 1:
            raise ValueError(f"{target}: its weight is shared with {[s[0] for s in shared[id(base.weight)]]}, and "
                             "KaSA would truncate it for all of them; exclude it")


def _parameter_wrappers(model: nn.Module, target: str, parameters: list[str]) -> list[ParameterLora]:
    """The wrappers of ``target``'s adapted parameters, innermost first; made on the first adapter. Every
    adapter of a module adapts the same parameters of it: the nesting, and with it the names of the
    tensors in PEFT's files, depends on which parameters are wrapped."""
    module = model.get_submodule(target)
    if not isinstance(module, ParameterLora):
        for parameter in parameters:
            module = ParameterLora(module, parameter)
        _replace(model, target, module)
    chain = [module]
    while isinstance(chain[-1].base_layer, ParameterLora):
        chain.append(chain[-1].base_layer)
    chain.reverse()
    wrapped = [layer.parameter_name for layer in chain]
    if wrapped != parameters:
        raise ValueError(f"target_parameters: the adapters on {target!r} must all adapt the same parameters of it "
                         f"(the first adapted {wrapped}, this one {parameters})")
    return chain


def _token_wrapper(model: nn.Module, target: str) -> TrainableTokens:
    """``target``'s TrainableTokens, made on the first adapter, with TiedTokens on every other module that shares
    its weight: a tied output head, and the encoder's and decoder's embeddings of a shared table (BART, T5)."""
    module = model.get_submodule(target)
    if isinstance(module, TrainableTokens):
        return module
    if isinstance(module, TiedTokens):  # another module of the same table trains its rows
        return module.tokens
    sharers = []
    for path, other in model.named_modules():
        if other is module or other._parameters.get("weight") is not module.weight:
            continue
        outer, _, attr = path.rpartition(".")
        if attr in ("base_layer", "original_module") or not isinstance(other, (nn.Linear, nn.Embedding)):
            wrapped = attr in ("base_layer", "original_module")
            what = {"base_layer": "carries a LoRA adapter", "original_module": "has modules_to_save copies"}.get(
                attr, f"is a {type(other).__name__}")
            raise ValueError(f"trainable_token_indices: {outer if wrapped else path!r} shares its weight with "
                             f"{target!r} (tied embeddings) and {what}, so it cannot use the tokens' new rows; adapt "
                             "it one way only")
        sharers.append(path)
    tokens = TrainableTokens(module)
    _replace(model, target, tokens)
    for path in sharers:
        _replace(model, path, TiedTokens(model.get_submodule(path), tokens))
    return tokens


def _with_task_heads(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """As PEFT does for the tasks whose head is new: the head trains with the adapter (and is saved with it)."""
    candidates = TASK_HEADS.get(config.task_type)
    if candidates is None:
        return config
    listed = config.modules_to_save or []
    heads = [h for h in candidates if isinstance(getattr(model, h, None), nn.Module) and h not in listed]
    return dataclasses.replace(config, modules_to_save=listed + heads) if heads else config


def _modules_to_save_names(model: nn.Module, config: LoraConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    names = [n for n, m in model.named_modules() if n and saved_name_matches(config.modules_to_save, n)
             and not isinstance(m, LoraLayer)]
    # Keep only the outermost match: a ModulesToSave wrapper's own insides also end with the name.
    names = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
    names = [n for n in names if ".modules_to_save." not in n and not n.endswith(".original_module")]
    if not names:
        raise ValueError(
            f"modules_to_save {config.modules_to_save!r} matched no module; top-level modules are: "
            f"{', '.join(n for n, _ in model.named_children())}"
        )
    for n in names:
        quantized = next((m for m in model.get_submodule(n).modules() if is_quantized(m)), None)
        if quantized is not None:
            raise ValueError(
                f"modules_to_save: {n!r} holds a quantized layer ({type(quantized).__name__}), whose codes cannot be "
                "trained: target it with LoRA instead, or keep it in full precision (transformers: "
                "BitsAndBytesConfig(llm_int8_skip_modules=[...]); lorafit: quantize_base(skip=...))")
    return names


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """The parameters that belong to adapter ``name``, by their name in ``model``.

    Its LoRA factors, its ``modules_to_save`` copies, and the biases its config trains.
    """
    config = adapter_configs(model).get(name)
    if config is None:
        raise KeyError(_unknown(model, name))
    out: dict[str, nn.Parameter] = {}
    for path, layer in lora_layers(model):
        if name in layer.adapter_names:
            out[f"{path}.{layer.a_name}.{name}"] = layer.factors_a[name]
            out[f"{path}.{layer.b_name}.{name}"] = layer.factors_b[name]
            if name in layer.lora_B_bias:
                out[f"{path}.lora_B_bias.{name}"] = layer.lora_B_bias[name]
            magnitudes = getattr(layer, "lora_magnitude_vector", {})
            if name in magnitudes:
                out[f"{path}.lora_magnitude_vector.{name}"] = magnitudes[name]
            if name in layer.lora_diag:
                out[f"{path}.lora_diag.{name}"] = layer.lora_diag[name]
            if config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
                out[f"{path}.base_layer.bias"] = layer.base_layer.bias
    for path, wrapper in saved_modules(model):
        if name in wrapper.adapter_names:
            for pname, p in wrapper.modules_to_save[name].named_parameters():
                out[f"{path}.modules_to_save.{name}.{pname}"] = p
    for path, layer in token_layers(model):
        if isinstance(layer, TrainableTokens) and name in layer.adapter_names:
            out[f"{path}.token_adapter.trainable_tokens_delta.{name}"] = layer.rows[name]
    if config.bias == "all":
        for pname, p in model.named_parameters():
            if pname.endswith("bias") and ".lora_" not in pname and ".modules_to_save." not in pname \
                    and ".original_module." not in pname:
                out[pname] = p
    return out


def _unknown(model: nn.Module, name: str) -> str:
    known = list(adapter_configs(model))
    return f"no adapter named {name!r} is attached; attached adapters: {known or 'none'}"


def _names(model: nn.Module, names: str | list[str] | None) -> list[str]:
    configs = adapter_configs(model)
    if names is None:
        return list(configs)
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        if n not in configs:
            raise KeyError(_unknown(model, n))
    return names


def active_adapters(model: nn.Module) -> list[str]:
    return list(model.__dict__.get("_lorafit_active", []))


def set_active(model: nn.Module, names: str | list[str]) -> None:
    """Make exactly ``names`` the active adapters (their outputs add up)."""
    names = _names(model, names)
    merged = merged_adapters(model)
    if merged and set(merged) - set(names):
        raise ValueError(f"adapters {merged} are merged into the weights; unmerge them before changing the active set")
    for wrapper in _wrappers(model):
        wrapper.set_active(names)
    model.__dict__["_lorafit_active"] = names


def merged_adapters(model: nn.Module) -> list[str]:
    seen: list[str] = []
    for layer in _mergeable(model):
        seen += [n for n in layer.merged if n not in seen]
    return seen


def detach(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name``; layers left without adapters become their base layer again."""
    _names(model, name)
    _remove_everywhere(model, name)
    _retie(model)  # a merged adapter removed was unmerged first
    del adapter_configs(model)[name]
    model.__dict__["_lorafit_active"] = [n for n in active_adapters(model) if n != name]
    if not any(c.layer_replication for c in adapter_configs(model).values()):
        restore_layers(model)  # no adapter needs the repeated layers any more
    if not adapter_configs(model):
        _restore_requires_grad(model)
        fused_paths.restore(model)
    return model


def _remove_everywhere(model: nn.Module, name: str) -> None:
    """Take adapter ``name`` off every wrapper; wrappers left without adapters become their layer again."""
    alora.remove(model, name)
    for path, layer in _innermost_first(model):
        if name in layer.adapter_names:
            layer.remove_adapter(name)
        if not layer.adapter_names:
            _replace(model, path, layer.base_layer)
    for path, head in list(tied_lora_heads(model)):
        if not head.adapter_names:  # the embedding lost its last adapter
            _replace(model, path, head.base_layer)
    for path, wrapper in list(saved_modules(model)):
        if name in wrapper.adapter_names:
            wrapper.remove_adapter(name)
        if not wrapper.adapter_names:
            _replace(model, path, wrapper.original_module)
    layers = list(token_layers(model))
    for _, layer in layers:
        if isinstance(layer, TrainableTokens) and name in layer.adapter_names:
            layer.remove_adapter(name)
    for path, layer in layers:
        if not layer.adapter_names:
            _replace(model, path, layer.base_layer)


def drop_saved_copy(model: nn.Module, path: str, name: str) -> None:
    """Take adapter ``name``'s modules_to_save copy of module ``path`` off: the module runs as the base has it."""
    wrapper = model.get_submodule(path)
    wrapper.remove_adapter(name)
    if not wrapper.adapter_names:
        _replace(model, path, wrapper.original_module)


def _innermost_first(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """The LoRA wrappers in an order in which each can be replaced by its base layer: nested parameter
    wrappers from the inside out, so that each path still leads to its wrapper when its turn comes."""
    return list(lora_layers(model))[::-1]


def merge(model: nn.Module, names: str | list[str] | None = None, *, safe: bool = False) -> None:
    """Fold adapters (default: the active ones) into the base weights.

    A bf16/fp16 layer keeps a copy of its weight from before the first merge
    until it is fully unmerged (memory: one weight copy per merged layer), so
    that ``unmerge`` restores it bit-exactly; float32 weights keep no copy.
    With ``safe=True`` a layer whose merged weight would hold NaN or inf is left
    unchanged and a ``ValueError`` names the adapter.
    """
    names = active_adapters(model) if names is None else _names(model, names)
    inactive = [n for n in names if n not in active_adapters(model)]
    if inactive:
        raise ValueError(f"adapters {inactive} are not active; only active adapters can be merged")
    _check_mergeable(model, names)
    if replication(model) is not None:
        raise ValueError("the model's layers are repeated (layer_replication) and share their base weights, so an "
                         "adapter merged into one repeat would change the others; merge_and_unload gives each "
                         "repeat weights of its own first")
    shared = _shared_weights(model)
    for layer in _mergeable(model):
        _merge_untied(model, layer, [n for n in names if n in layer.adapter_names], shared, safe=safe)


def _merge_untied(model: nn.Module, layer: LoraLayer | TrainableTokens, names: list[str],
                  shared: dict[int, list[tuple[str, nn.Module, str]]], **merge_options) -> None:
    """``layer.merge(names)``, after any other module that shares the weight it merges into (a tied output head
    and input embedding; ``shared``: ``_shared_weights``) got a copy of it: merged into the shared tensor, a LoRA
    adapter of one of them would change the other too, which it does not do unmerged. Token rows
    (trainable_token_indices) score their tokens with the new rows in a tied head too, so they merge into the
    shared weight as it is."""
    if names and shared and isinstance(layer, LoraLayer) and not layer.merged:
        weight = layer.target_weight()
        sharers = [s for s in shared.get(id(weight), []) if s[1] is not layer.base_layer]
        if sharers:  # a tied head that applies this layer's adapters (ensure_weight_tying) keeps the shared weight
            applies = {id(h.base_layer) for _, h in tied_lora_heads(model) if h.embedding is layer}
            sharers = [s for s in sharers if id(s[1]) not in applies]
        if sharers:
            _untie(model, layer, weight, sharers)
    layer.merge(names, **merge_options)


def _shared_weights(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """The parameters that more than one module holds (tied weights), by id: (module path, module, name)."""
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for path, module in model.named_modules():
        for key, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((path, module, key))
    return {k: v for k, v in owners.items() if len(v) > 1}


def _untie(model: nn.Module, layer: LoraLayer, weight: nn.Parameter,
           sharers: list[tuple[str, nn.Module, str]]) -> None:
    untied = model.__dict__.setdefault(_UNTIED, [])
    config = getattr(model, "config", None)
    tied_config = bool(getattr(config, "tie_word_embeddings", False))
    for _, module, key in sharers:
        module._parameters[key] = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        untied.append((module, key, layer, tied_config))
    if tied_config:
        config.tie_word_embeddings = False  # so that save_pretrained / from_pretrained keep them apart
    names = ", ".join(repr(path) for path, _, _ in sharers)
    warnings.warn(f"merging into a weight that {names} shares (tied embeddings): {names} got a copy of it first, so "
                  "that it computes what it did unmerged (one more weight in memory until the adapter is unmerged)",
                  stacklevel=4)


def _retie(model: nn.Module) -> None:
    """Modules untied by a merge share the weight again once nothing is merged into it."""
    kept = []
    for module, key, layer, tied_config in model.__dict__.get(_UNTIED, []):
        if layer.merged:
            kept.append((module, key, layer, tied_config))
            continue
        module._parameters[key] = layer.target_weight()
        if tied_config:
            model.config.tie_word_embeddings = True
    if kept:
        model.__dict__[_UNTIED] = kept
    else:
        model.__dict__.pop(_UNTIED, None)


def _check_mergeable(model: nn.Module, names: list[str]) -> None:
    """Before any layer merges: an adapter's own bias (lora_bias) needs a base bias to go into, and an aLoRA
    adapter (which applies only from its invocation on) or one a layer cannot hold (``merge_refusal``) cannot be
    merged at all."""
    activated = [n for n in names if adapter_configs(model)[n].alora_invocation_tokens is not None]
    if activated:
        raise ValueError(f"adapter {activated[0]!r} is an aLoRA adapter (alora_invocation_tokens): it applies only "
                         "from its invocation on, and merged it would apply everywhere; nothing was merged")
    for path, layer in lora_layers(model):
        refusals = [layer.merge_refusal(n) for n in names if n in layer.adapter_names and n not in layer.merged]
        if any(refusals):
            raise ValueError(f"{path!r}: {next(r for r in refusals if r)}; nothing was merged")
        biased = [n for n in names if n in layer.lora_B_bias and n not in layer.merged]
        if biased and getattr(layer.base_layer, "bias", None) is None:
            raise ValueError(f"adapter {biased[0]!r} has a bias of its own (lora_bias=True), but {path!r} has no "
                             "bias to merge it into; nothing was merged")


def unmerge(model: nn.Module, names: str | list[str] | None = None) -> None:
    """Subtract merged adapters (default: all) from the base weights again."""
    names = None if names is None else _names(model, names)
    for layer in _mergeable(model):
        layer.unmerge(names)
    _retie(model)


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Run the base model: inside the block no adapter contributes to the output.

    Merged adapters are unmerged for the duration and merged back afterwards.
    """
    merged = {id(layer): list(layer.merged) for layer in _mergeable(model)}
    unmerge(model)
    wrappers = _wrappers(model)
    before = [w.disabled for w in wrappers]
    for w in wrappers:
        w.disabled = True
    try:
        yield model
    finally:
        for w, flag in zip(wrappers, before):
            w.disabled = flag
        shared = _shared_weights(model) if any(merged.values()) else {}
        for layer in _mergeable(model):
            _merge_untied(model, layer, merged.get(id(layer), []), shared)


def merge_and_unload(model: nn.Module, *, safe: bool = False) -> nn.Module:
    """Merge the active adapters and return the plain model, with no LoRA wrapper left.

    ``modules_to_save`` modules become the active adapter's trained copy; a
    quantized base is dequantized first (the merged model is a plain float model);
    layers repeated by ``layer_replication`` get weights of their own, and the
    model keeps its deeper stack.
    """
    names = active_adapters(model)
    _check_mergeable(model, names)
    untie_layers(model)  # repeated layers (layer_replication) become layers of their own
    quantized = [(path, m) for path, m in model.named_modules() if is_quantized(m)]
    # lorafit's and torchao's layers dequantize to their compute dtype; bitsandbytes' 8-bit codes to float32, so
    # its layers take the dtype of the model's other frozen weights
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad), None)
    for path, module in quantized:
        _replace(model, path, to_linear(module, dtype if is_bitsandbytes_linear(module) else None))
    if quantized:
        forget_quantization(model)
    shared = _shared_weights(model)
    for layer in _mergeable(model):
        # No weight copies for an exact unmerge: the wrappers are dropped right below.
        _merge_untied(model, layer, [n for n in names if n in layer.adapter_names], shared, safe=safe,
                      keep_original=False)
    model.__dict__.pop(_UNTIED, None)  # for good: the merged model keeps its own weights
    _unwrap_all(model, lambda wrapper: wrapper.current)
    _forget(model)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and return the original base model.

    If nothing was merged, the base weights are bitwise the originals; merged
    adapters are taken out first (bitwise for bf16/fp16 weights, up to
    floating-point rounding for float32).
    """
    unmerge(model)
    _unwrap_all(model, lambda wrapper: wrapper.original_module)
    restore_layers(model)
    _restore_requires_grad(model)
    _forget(model)
    return model


def _unwrap_all(model: nn.Module, kept_copy: Callable[[ModulesToSave], nn.Module]) -> None:
    """Every wrapper replaced by the module it stands in for; a modules_to_save wrapper by ``kept_copy`` of it."""
    for path, layer in _innermost_first(model):
        _replace(model, path, layer.base_layer)
    for path, wrapper in list(saved_modules(model)):
        _replace(model, path, kept_copy(wrapper))
    for path, layer in list(token_layers(model)) + list(tied_lora_heads(model)):
        _replace(model, path, layer.base_layer)


def _restore_requires_grad(model: nn.Module) -> None:
    original = model.__dict__.pop(_ORIGINAL_GRAD, {})
    for n, p in model.named_parameters():
        if n in original:
            p.requires_grad_(original[n])


def _forget(model: nn.Module) -> None:
    fused_paths.restore(model)
    for name in list(adapter_configs(model)):
        alora.remove(model, name)  # its hook too
    for key in (_CONFIGS, _ORIGINAL_GRAD, "_lorafit_active"):
        model.__dict__.pop(key, None)


@dataclass(frozen=True)
class ParameterReport:
    """Trainable vs total parameter counts (total includes the adapters)."""

    trainable: int
    total: int
    adapter: int

    @property
    def base(self) -> int:
        """Parameters of the model without adapters: what full fine-tuning would train."""
        return self.total - self.adapter

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    @property
    def reduction_vs_full(self) -> float:
        """Fraction fewer trainable parameters than full fine-tuning (0.86 = 86% fewer)."""
        return 1.0 - self.trainable / self.base if self.base else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.trainable_percent:.4f} || full fine-tuning would train {self.base:,} "
            f"({100 * self.reduction_vs_full:.1f}% fewer with LoRA)"
        )


def trainable_parameters(model: nn.Module) -> ParameterReport:
    """Count trainable parameters, all parameters, and those added by adapters.

    Each parameter is counted once even if it is shared (tied embeddings); the weight of a
    quantized base layer counts as ``out_features * in_features`` parameters.
    """
    seen: set[int] = set()
    trainable = total = adapter = 0
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
        if ".lora_" in f".{name}" or ".modules_to_save." in name or ".trainable_tokens_delta." in name:
            adapter += n
    # A quantized base weight is codes, stored as a buffer or packed, but it still stands for all its values.
    total += sum(uncounted_weight(m) for m in model.modules() if is_quantized(m))
    return ParameterReport(trainable=trainable, total=total, adapter=adapter)
