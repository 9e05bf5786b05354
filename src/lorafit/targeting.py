"""Which modules of a model get an adapter.

Matching rules are PEFT's, because users' configs rely on them:
a list entry matches a module whose name equals it or ends with ``"." + entry``;
a string is a regex that must match the whole name; ``"all-linear"`` is every
linear layer except the output head (and, unlike PEFT's, every
nn.MultiheadAttention as a whole rather than its bypassed out_proj).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from lorafit.config import ALL_LINEAR, LoraConfig
from lorafit.layers import (LoraLayer, ModulesToSave, MultiheadAttentionLora, ParameterLora, TiedLoraHead, TiedTokens,
                            TrainableTokens, is_gpt2_conv1d)
from lorafit.quantize import QuantizedLinear

# Defaults for when a config names no targets, by transformers' config.model_type (mostly the attention
# query/value projections, as in the LoRA paper): PEFT's (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING),
# so that one config adapts the same modules in both, and DistilBERT's, which PEFT lacks
DEFAULT_TARGETS: dict[str, list[str] | str] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "electra": ["query", "value"],
    "layoutlm": ["query", "value"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "btlm": ["c_proj", "c_attn"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "codegen": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "RefinedWebModel": ["query_key_value"],
    "chatglm": ["query_key_value"],
    "mpt": ["Wqkv"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",  # the language model's, not the vision tower's
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
}
# Where transformers' sequence classifiers keep their head (a new, random module): attach trains and saves
# it with a SEQ_CLS adapter, "all-linear" leaves it alone. PEFT's names (classifier, score), plus BART's and
# T5's classification_head and XLNet's logits_proj, whose heads would otherwise stay random and frozen.
SEQ_CLS_HEADS = ("classifier", "score", "classification_head", "logits_proj")
# The heads each task_type trains with the adapter (PEFT's, for token classification and question answering)
TASK_HEADS = {"SEQ_CLS": SEQ_CLS_HEADS, "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}
SUPPORTED = "Linear (also quantized), Embedding, Conv1d, Conv2d, Conv3d, MultiheadAttention and transformers' Conv1D"


def layer_kind(module: nn.Module) -> str | None:
    """'linear', 'embedding', 'conv', 'attention' for modules lorafit can adapt, else None."""
    if isinstance(module, LoraLayer):
        module = module.base_layer
    if isinstance(module, (nn.Linear, QuantizedLinear)) or is_gpt2_conv1d(module):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(module, nn.MultiheadAttention):
        return "attention"
    return None


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules that could be targeted: never the insides of a LoRA or modules_to_save wrapper."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in skip):
            continue
        if isinstance(module, (LoraLayer, ModulesToSave, TrainableTokens, TiedTokens, TiedLoraHead)):
            skip.append(name + ".")
            if isinstance(module, ModulesToSave):
                continue
        yield name, module


def name_matches(spec: str | list[str], name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def layer_index_allowed(config: LoraConfig, name: str) -> bool:
    if config.layers_to_transform is None or config.layers_to_transform == []:
        return True  # PEFT reads an empty list as "no layer selection" too
    wanted = config.layers_to_transform
    wanted = [wanted] if isinstance(wanted, int) else wanted
    patterns = config.layers_pattern
    if patterns is None:
        # The first number segment after a named one: "model.layers.3.self_attn.q_proj" -> 3
        match = re.match(r"(?:^|.*?\.)[^.]+\.(\d+)\.", name)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name)
            if match:
                break
    return match is not None and int(match.group(1)) in wanted


def model_embedding(model: nn.Module, which: str) -> nn.Module | None:
    """A transformers model's "input" or "output" token embedding (get_input_embeddings / get_output_embeddings),
    None for any other module and for models without one: vision models such as ResNet raise NotImplementedError
    from get_input_embeddings."""
    get = getattr(model, f"get_{which}_embeddings", None)
    if not callable(get):
        return None
    try:
        return get()
    except NotImplementedError:
        return None


def output_head_names(model: nn.Module, config: LoraConfig) -> set[str]:
    """The modules "all-linear" leaves alone: the LM head, or a task's new head (a classifier's)."""
    heads: list[nn.Module] = []
    out = model_embedding(model, "output")
    if out is not None:
        heads.append(out)
    elif config.task_type in TASK_HEADS:
        heads += [getattr(model, n) for n in TASK_HEADS[config.task_type]
                  if isinstance(getattr(model, n, None), nn.Module)]
    return {name for name, module in model.named_modules() if any(module is h for h in heads)}


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules that ``config`` adapts in ``model``; raises when there are none."""
    spec = config.target_modules
    if spec is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                "target_modules is not set and lorafit has no default for this model "
                f"(model_type={model_type!r}); name the modules to adapt, e.g. target_modules=['q_proj', 'v_proj'], "
                f"or use {ALL_LINEAR!r}"
            )
        spec = DEFAULT_TARGETS[model_type]

    # Modules copied whole by modules_to_save (and everything inside them) are never adapted.
    saved = saved_names(model, config.modules_to_save or [])
    heads = output_head_names(model, config) if spec == ALL_LINEAR else set()
    found: list[str] = []
    for name, module in candidate_modules(model):
        if name in saved or any(name.startswith(s + ".") for s in saved):
            continue
        if config.exclude_modules is not None and name_matches(config.exclude_modules, name):
            continue
        if spec == ALL_LINEAR:
            if name in heads or not _all_linear_takes(model, config, name, module):
                continue
        elif not name_matches(spec, name):
            continue
        # As in PEFT, a module a list names in full is adapted whatever layers_to_transform says.
        if not layer_index_allowed(config, name) and not (isinstance(spec, list) and name in spec):
            continue
        kind = layer_kind(module)
        if isinstance(module, TiedLoraHead):
            if not config.ensure_weight_tying:
                raise ValueError(f"target_modules matches {name!r}, the output head that applies the tied input "
                                 "embedding's adapters (ensure_weight_tying); adapt it with ensure_weight_tying=True "
                                 "too, or exclude it")
            found.append(name)  # model._tie_targets makes it the embedding
            continue
        if isinstance(module, (TrainableTokens, TiedTokens)):
            raise ValueError(f"target_modules matches {name!r}, whose token rows an adapter trains "
                             "(trainable_token_indices); LoRA and token rows on one layer are not supported")
        if isinstance(module, ParameterLora) and not isinstance(module, MultiheadAttentionLora):
            raise ValueError(f"target_modules matches {name!r}, whose parameters an adapter adapts already "
                             "(target_parameters); adapt it one way only")
        if kind is None:
            raise ValueError(
                f"target_modules matches {name!r}, a {type(module).__name__}; lorafit can adapt {SUPPORTED}. "
                "Name the layers inside it instead"
            )
        if _attention_out_proj(model, name):
            raise ValueError(
                f"{name!r} belongs to nn.MultiheadAttention, which reads out_proj.weight directly and would "
                f"bypass the adapter; target the attention {_parent_name(name)!r} itself (its in- and "
                "out-projections both get the adapter), or exclude it"
            )
        found.append(name)

    if not found:
        raise ValueError(_nothing_matched(model, "target_modules", spec, config))
    return found


def exact_spec(model: nn.Module, names: list[str]) -> list[str] | str:
    """A target_modules value that matches exactly these modules of ``model``: the list of their names where no
    other module's name ends with ``"." + name`` (a list entry matches those too), else a regex of the names."""
    suffixes = {full.split(".", i)[i] for full, _ in model.named_modules() for i in range(1, full.count(".") + 1)}
    if suffixes.isdisjoint(names):
        return list(names)
    return "|".join(re.escape(n) for n in names)


def bypassed_out_projs(model: nn.Module, config: LoraConfig) -> list[str]:
    """The out_proj layers of nn.MultiheadAttention modules that ``config.target_modules`` names itself (not through
    "all-linear"), as PEFT's "all-linear" writes them into its files: PEFT wraps them as linear layers, which the
    attention never calls."""
    spec, exclude = config.target_modules, config.exclude_modules
    if spec is None or spec == ALL_LINEAR:
        return []
    return [name for name, _ in candidate_modules(model)
            if _attention_out_proj(model, name) and name_matches(spec, name)
            and not (exclude is not None and name_matches(exclude, name))]


def _all_linear_takes(model: nn.Module, config: LoraConfig, name: str, module: nn.Module) -> bool:
    """Whether "all-linear" adapts this module: a linear layer, or an nn.MultiheadAttention as a whole (its in- and
    out-projections are linear layers it computes with itself, so its out_proj is never adapted alone). Excluding
    an attention's out_proj excludes the attention: an adapter on it always changes that projection."""
    kind = layer_kind(module)
    if kind == "attention":
        return config.exclude_modules is None or not name_matches(config.exclude_modules, f"{name}.out_proj")
    return kind == "linear" and not _attention_out_proj(model, name)


def resolve_parameter_targets(model: nn.Module, config: LoraConfig) -> dict[str, list[str]]:
    """The parameters ``config.target_parameters`` adapts: module name -> its parameter names, in the order
    the module registers them. An entry matches ``<module>.<parameter>`` in full or at its end, as in PEFT
    (which applies no layers_to_transform or exclude_modules to them either)."""
    spec = config.target_parameters
    if not spec:
        return {}
    saved = saved_names(model, config.modules_to_save or [])
    found: dict[str, list[str]] = {}
    for name, module in candidate_modules(model):
        if name in saved or any(name.startswith(s + ".") for s in saved):
            continue
        # a module adapted through target_modules already is looked into only to refuse it
        adapted_layer = isinstance(module, MultiheadAttentionLora) or (
            isinstance(module, LoraLayer) and not isinstance(module, ParameterLora))
        owner = module.base_layer if adapted_layer else module.owner if isinstance(module, ParameterLora) else module
        for pname, _ in owner.named_parameters(recurse=False):
            if name_matches(spec, f"{name}.{pname}"):
                if adapted_layer:
                    raise ValueError(f"target_parameters matches {name}.{pname}, whose module is adapted "
                                     "through target_modules already; adapt it one way only")
                if _attention_out_proj(model, name):
                    raise ValueError(f"target_parameters matches {name}.{pname}, the out-projection of an "
                                     "nn.MultiheadAttention, which reads it directly and would bypass the adapter; "
                                     f"target the attention {_parent_name(name)!r} in target_modules instead")
                found.setdefault(name, []).append(pname)
    if not found:
        examples = [f"{n}.{p}" for n, m in candidate_modules(model) if not isinstance(m, LoraLayer)
                    for p, t in m.named_parameters(recurse=False) if t.ndim == 3][:3]
        hint = f"; this model's 3-D parameters include {', '.join(examples)}" if examples else ""
        raise ValueError(f"target_parameters {spec!r} matched no parameter{hint}")
    return found


def resolve_token_targets(model: nn.Module, config: LoraConfig) -> dict[str, list[int]]:
    """The layers ``config.trainable_token_indices`` trains rows of: module name -> token ids. A list means the
    model's input embedding (``get_input_embeddings``, else a module named ``embed_tokens``); a mapping may also
    name an untied output head (an ``nn.Linear``). A head that shares its weight with a named embedding (tied
    embeddings) is dropped: the embedding's rows score its tokens."""
    spec = config.trainable_token_indices
    if spec is None:
        return {}
    layers = {name: m for name, m in candidate_modules(model) if _has_token_rows(m)}
    embeddings = [name for name, m in layers.items() if not _is_head(m)]
    if not isinstance(spec, dict):
        wanted = model_embedding(model, "input")
        names = [n for n in embeddings if layers[n] is wanted] or [n for n in embeddings if n.endswith("embed_tokens")]
        if len(names) != 1:
            raise ValueError("trainable_token_indices is a list, but the model's input embedding is not known; name "
                             f"it: {{'<module>': [...]}} with one of: {', '.join(embeddings) or 'none'}")
        spec = {names[0]: spec}
    found: dict[str, list[int]] = {}
    for key, ids in spec.items():
        names = [n for n in layers if name_matches([key], n)]
        if not names:
            raise ValueError(f"trainable_token_indices names {key!r}, which matches no embedding or output head; "
                             f"this model's embeddings: {', '.join(embeddings) or 'none'}")
        found.update({n: ids for n in names})
    for name in found:
        if isinstance(layers[name], LoraLayer):
            raise ValueError(f"trainable_token_indices: {name!r} carries a LoRA adapter (target_modules); training "
                             "its rows as well is not supported")
    for name in [n for n in found if _is_head(layers[n])]:
        weight = unwrapped(layers[name]).weight
        tied = [e for e in embeddings if unwrapped(layers[e]).weight is weight]
        if not tied:
            continue
        named = [e for e in tied if e in found] or tied[:1]
        if any(found.get(e) != found[name] for e in named):
            raise ValueError(f"trainable_token_indices: {name!r} shares its weight with {named[0]!r} (tied "
                             f"embeddings), so their rows are the same: name {named[0]!r}, whose new rows the head "
                             "then scores with, or give both the same token ids")
        del found[name]
    # embeddings of one table (BART's and T5's shared, encoder and decoder embeddings) train its rows once
    first_of: dict[int, str] = {}
    for name in list(found):
        first = first_of.setdefault(id(unwrapped(layers[name]).weight), name)
        if first == name:
            continue
        if found[first] != found[name]:
            raise ValueError(f"trainable_token_indices: {first!r} and {name!r} share one table, so their rows are "
                             "the same: give both the same token ids")
        del found[name]
    return found


def unwrapped(module: nn.Module) -> nn.Module:
    """The layer an adapter wrapper stands in for (a modules_to_save wrapper: its original)."""
    if isinstance(module, ModulesToSave):
        return module.original_module
    return module.base_layer if isinstance(module, (LoraLayer, TrainableTokens, TiedTokens, TiedLoraHead)) \
        else module


def _has_token_rows(module: nn.Module) -> bool:
    """An embedding, or a linear layer (an output head), or a wrapper of one: its weight's rows are tokens."""
    return isinstance(unwrapped(module), (nn.Embedding, nn.Linear))


def _is_head(module: nn.Module) -> bool:
    return isinstance(unwrapped(module), nn.Linear)


def saved_name_matches(entries: list[str], name: str) -> bool:
    """modules_to_save's rule, which is PEFT's: a module whose name ends with an entry, as plain text, so that
    "classifier" takes DistilBERT's pre_classifier too. PEFT trains and saves such a module whole: lorafit must
    copy the same ones to load PEFT's files, and to write files that PEFT reads the same way."""
    return any(name.endswith(entry) for entry in entries)


def saved_names(model: nn.Module, entries: list[str]) -> list[str]:
    """The names of the modules modules_to_save ``entries`` match (see saved_name_matches)."""
    if not entries:
        return []
    return [name for name, _ in model.named_modules() if name and saved_name_matches(entries, name)]


def _parent_name(name: str) -> str:
    return name.rpartition(".")[0]


def _attention_out_proj(model: nn.Module, name: str) -> bool:
    """Whether module ``name`` is the out_proj of an nn.MultiheadAttention (which never calls it)."""
    return name.endswith("out_proj") and isinstance(model.get_submodule(_parent_name(name)), nn.MultiheadAttention)


def _nothing_matched(model: nn.Module, field: str, spec, config: LoraConfig) -> str:
    adaptable = [name for name, m in candidate_modules(model) if layer_kind(m)]
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in adaptable})
    msg = f"{field} {spec!r} matched no adaptable module"
    if config.layers_to_transform is not None:
        msg += f" in layers {config.layers_to_transform!r}"
    if not adaptable:
        return msg + f"; this model has no layer lorafit can adapt ({SUPPORTED})"
    examples = ", ".join(adaptable[:5])
    return (
        f"{msg}. Adaptable module names in this model: {', '.join(suffixes)} "
        f"({len(adaptable)} modules, e.g. {examples})"
    )
