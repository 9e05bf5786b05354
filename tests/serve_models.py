"""Tiny random models, offline tokenizers and adapter directories for the serve tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import lorafit

WORDS = ("the a movie film was is great good bad awful plot actors boring fun loved hated it this and but not "
         "very really story ending music hello world user assistant system what how why who").split()
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def tokenizer(causal: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<s>", "</s>"] if causal else ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(special + list(WORDS) + [":", "\n"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=special[1]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if causal:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
        from tokenizers import decoders
        tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                       eos_token="</s>", chat_template=CHAT_TEMPLATE)
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def bert_dir(root: Path) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tok = tokenizer(causal=False)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=3, pad_token_id=0)
    model = BertForSequenceClassification(cfg)
    path = root / "tiny-bert"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def llama_dir(root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = tokenizer(causal=True)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model = LlamaForCausalLM(cfg)
    path = root / "tiny-llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def load(path: Path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    cls = AutoModelForCausalLM if cfg.architectures[0].endswith("ForCausalLM") else AutoModelForSequenceClassification
    return cls.from_pretrained(path).eval()


def make_adapter(model_dir: Path, out: Path, seed: int, r: int = 4, labels: list[str] | None = None,
                 num_labels: int | None = None) -> Path:
    """A random adapter (non-zero B) for the model in ``model_dir``; classifiers get their own head
    (with ``num_labels`` outputs if given, else the model's)."""
    model = load(model_dir)
    if num_labels is not None:
        model.classifier = torch.nn.Linear(model.classifier.in_features, num_labels)
    causal = "Llama" in type(model).__name__
    targets = ["q_proj", "v_proj", "down_proj"] if causal else ["query", "value", "dense"]
    config = lorafit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                task_type="CAUSAL_LM" if causal else "SEQ_CLS")
    lorafit.attach(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name or ".modules_to_save." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    lorafit.save_adapter(model, out)
    if labels:
        (out / "labels.json").write_text(json.dumps(labels))
    return out
