"""Tiny offline models, tokenizers, data sets and configs for the training tests (plus the config tests).

Every model is randomly initialised with hidden size 32 and 2 layers and saved
with ``save_pretrained`` into a temporary directory, together with a word-level
tokenizer trained on the test rows, so ``model.name`` points at a local
directory exactly as a user's own model would.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from lorafit.train.config import RunConfig, load_config, parse_value  # noqa: E402

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<eos>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
POSITIVE = "good great fine nice lovely superb".split()
NEGATIVE = "bad awful poor nasty dull terrible".split()
FILLER = "the a movie film plot actor story was is very quite".split()


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 8))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def instruction_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(FILLER + POSITIVE) for _ in range(rng.randint(2, 6))]
        rows.append({"instruction": "repeat", "input": " ".join(words), "output": " ".join(reversed(words))})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tokenizer(texts: list[str], bert_style: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(texts + [CHAT_TEMPLATE.replace("{", " ").replace("}", " ")] +
                            ["<|user|> <|assistant|> <|system|> repeat"],
                            trainers.WordLevelTrainer(special_tokens=SPECIALS))
    if bert_style:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        eos_token="<eos>")
    return fast


def tiny_bert_dir(root: Path, rows: list[dict]) -> Path:
    tok = make_tokenizer([r["text"] for r in rows], bert_style=True)
    config = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     initializer_range=0.2)
    out = root / "tiny-bert"
    transformers.BertModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_llama_dir(root: Path, rows: list[dict], chat_template: bool = True) -> Path:
    tok = make_tokenizer([f"{r['instruction']} {r['input']} {r['output']}" for r in rows])
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                      bos_token_id=None, tie_word_embeddings=False, initializer_range=0.2)
    out = root / "tiny-llama"
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_t5_dir(root: Path, rows: list[dict]) -> Path:
    tok = make_tokenizer([f"{r['instruction']} {r['input']} {r['output']}" for r in rows])
    config = transformers.T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                   decoder_start_token_id=tok.pad_token_id, dropout_rate=0.0)
    out = root / "tiny-t5"
    transformers.T5ForConditionalGeneration(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def toml_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def classification_setup(tmp_path: Path, n_train: int = 96, n_val: int = 32, extra: str = "") -> Path:
    """A tiny BERT + sentiment rows + a run config; returns the config path."""
    train_rows, val_rows = sentiment_rows(n_train, 0), sentiment_rows(n_val, 1)
    model_dir = tiny_bert_dir(tmp_path, train_rows + val_rows)
    write_jsonl(tmp_path / "train.jsonl", train_rows)
    write_jsonl(tmp_path / "dev.jsonl", val_rows)
    return toml_config(tmp_path / "run.toml", f"""
output_dir = "{tmp_path / 'run'}"
[model]
name = "{model_dir}"
[data]
train = "{tmp_path / 'train.jsonl'}"
validation = "{tmp_path / 'dev.jsonl'}"
[task]
type = "classification"
max_length = 32
[lora]
r = 4
lora_alpha = 8
target_modules = ["query", "key", "value", "dense"]
[train]
epochs = 12
batch_size = 8
lr = 1e-2
warmup_ratio = 0.1
eval_every = 12
log_every = 2
num_threads = 1
{extra}
""")


def instruction_setup(tmp_path: Path, n_train: int, n_val: int = 0, output_dir: str = "run", lora: str = "",
                      train: str = "") -> Path:
    """A tiny Llama + instruction rows + a causal-LM run config (max length 48); ``lora`` and ``train`` are
    those sections' lines. Returns the config path."""
    rows = instruction_rows(n_train + n_val)
    model_dir = tiny_llama_dir(tmp_path, rows)
    write_jsonl(tmp_path / "train.jsonl", rows[:n_train])
    validation = ""
    if n_val:
        write_jsonl(tmp_path / "val.jsonl", rows[n_train:])
        validation = f'validation = "{tmp_path / "val.jsonl"}"\n'
    return toml_config(tmp_path / "lm.toml", f"""
output_dir = "{tmp_path / output_dir}"
[model]
name = "{model_dir}"
[data]
train = "{tmp_path / 'train.jsonl'}"
{validation}instruction_field = "instruction"
input_field = "input"
output_field = "output"
[task]
type = "causal_lm"
max_length = 48
[lora]
{lora}
[train]
{train}
""")


# -- config tests ----------------------------------------------------------------------


def test_overrides_are_typed_and_checked(tmp_path):
    path = classification_setup(tmp_path)
    config = load_config(path, ["train.lr=1e-4", "lora.r=16", "train.bf16=true",
                                'lora.target_modules=["query", "value"]', "train.method=full"])
    assert config.train.lr == 1e-4 and config.lora["r"] == 16 and config.train.bf16 is True
    assert config.lora["target_modules"] == ["query", "value"] and config.train.method == "full"
    with pytest.raises(ValueError, match="train.batch_size must be an integer"):
        load_config(path, ["train.batch_size=big"])
    with pytest.raises(ValueError, match="train.scheduler must be one of .*did you mean 'cosine'"):
        load_config(path, ["train.scheduler=cosin"])
    with pytest.raises(ValueError, match="train.model_dropout must be one of .*did you mean 'hashed'"):
        load_config(path, ["train.model_dropout=hash"])
    with pytest.raises(ValueError, match=r"\[lora\]: r must be an integer >= 1"):
        load_config(path, ["lora.r=0"])
    with pytest.raises(ValueError, match="expects key=value"):
        load_config(path, ["train.lr"])
    with pytest.raises(ValueError, match="train.fp16 and train.bf16 are both set"):
        load_config(path, ["train.fp16=true", "train.bf16=true"])
    with pytest.raises(ValueError, match="train.fp16 .* not supported with train.distributed = 'fsdp'"):
        load_config(path, ["train.fp16=true", "train.distributed=fsdp"])


def test_unknown_keys_suggest_the_closest(tmp_path):
    path = classification_setup(tmp_path)
    with pytest.raises(ValueError, match="unknown key 'train.learning_rat'.*did you mean 'train.learning_rate'|"
                                         "unknown key 'train.learning_rat'"):
        load_config(path, ["train.learning_rat=1"])
    with pytest.raises(ValueError, match="unknown key 'train.batchsize'; did you mean 'train.batch_size'"):
        load_config(path, ["train.batchsize=4"])
    with pytest.raises(ValueError, match="unknown key 'lora.rank'; did you mean 'lora.r'|unknown key 'lora.rank'"):
        load_config(path, ["lora.rank=4"])
    with pytest.raises(ValueError, match="unknown key 'lora.lora_alfa'; did you mean 'lora.lora_alpha'"):
        load_config(path, ["lora.lora_alfa=4"])
    bad = tmp_path / "bad.toml"
    bad.write_text(path.read_text().replace("[train]", "[train]\nwarmup_ration = 0.1"))
    with pytest.raises(ValueError, match="unknown key 'train.warmup_ration'; did you mean 'train.warmup_ratio'"):
        load_config(bad)


def test_config_round_trips_through_toml(tmp_path):
    config = load_config(classification_setup(tmp_path), ["data.labels=[0, 1]", 'data.instruction="say \\"hi\\""'])
    again = tmp_path / "again.toml"
    again.write_text(config.to_toml())
    assert load_config(again).to_dict() == config.to_dict()
    assert parse_value("3") == 3 and parse_value("abc") == "abc" and parse_value("[1, 2]") == [1, 2]
    assert RunConfig().train.method == "lora"


def test_model_dropout_hashed_swaps_the_models_dropout_modules(tmp_path):
    from torch import nn

    from lorafit.layers.hashed_dropout import HashedDropout
    from lorafit.train.run import apply_method, prepare

    path = classification_setup(tmp_path)
    for setting, kind in (("torch", nn.Dropout), ("hashed", HashedDropout)):
        prep = prepare(load_config(path, [f"train.model_dropout={setting}"]))
        apply_method(prep)
        dropouts = [m for m in prep.model.modules() if isinstance(m, nn.Dropout)]
        assert dropouts and all(type(m) is kind for m in dropouts)
