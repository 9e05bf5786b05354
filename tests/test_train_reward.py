"""task.type = "reward": a reward model (a one-output sequence classifier) trained on preference pairs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import lorafit  # noqa: E402
from lorafit.train import evaluate, train  # noqa: E402
from lorafit.train.config import RunConfig  # noqa: E402
from lorafit.train.reward import Reward  # noqa: E402
from tests.test_train_preference import TARGETS, assert_resume_matches, preference_rows, preference_setup  # noqa: E402,E501
from tests.test_train_support import tiny_bert_dir, tiny_llama_dir  # noqa: E402


def reward_setup(tmp_path: Path, n_train: int = 64, n_val: int = 32, encoder: bool = False) -> Path:
    """preference_setup's rows and config for task.type = "reward": a tiny Llama, or with ``encoder`` a tiny BERT."""
    model_dir = None
    if encoder:
        rows = preference_rows(n_train + n_val)
        model_dir = tiny_bert_dir(tmp_path, [{"text": " ".join(r.values())} for r in rows])
    return preference_setup(tmp_path, n_train, n_val, task='type = "reward"', model_dir=model_dir,
                            targets='"query", "value"' if encoder else TARGETS)


def tiny_reward_model(tmp_path: Path, rows: list[dict]):
    model_dir = tiny_llama_dir(tmp_path, [{"instruction": r["prompt"], "input": r["chosen"], "output": r["rejected"]}
                                          for r in rows])
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    return model_dir, tok, model


@pytest.mark.parametrize("centering, margins", [(0.0, None), (0.3, None), (0.0, [1.5, "0", -0.5])])
def test_the_loss_is_bradley_terry_on_each_conversation_s_score(tmp_path, centering, margins):
    """The batch loss is the sum over pairs of -log sigmoid(sc - sr - m) (+ centering (sc + sr)^2), each score the
    model's output for the conversation alone, without padding: the padded batch reads the last real token; m each
    row's data.margin_field (a number or its text), else 0. Its gradient reaches the adapter and the new score
    head, nothing else."""
    rows = preference_rows(3, seed=4)
    if margins is not None:
        rows = [{**row, "margin": m} for row, m in zip(rows, margins)]
    _, tok, model = tiny_reward_model(tmp_path, rows)
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))
    torch.manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.2)
    config = RunConfig()
    config.task.type, config.task.max_length, config.task.reward_centering = "reward", 64, centering
    config.data.instruction_field = "prompt"
    config.data.margin_field = "margin" if margins is not None else None
    task = Reward(config, tok)
    features = task.encode(rows, "train").features
    assert len(features) == 3 and not task.token_types
    batch = task.collate(features)
    assert batch["input_ids"].shape[0] == 6 and int(batch["units"]) == 3
    loss = task.loss_sum(model, batch)
    want = torch.zeros(())
    for row, f in zip(rows, features):
        # the conversation the chat template renders, tokenized on its own
        text = tok.apply_chat_template([{"role": "user", "content": row["prompt"]},
                                        {"role": "assistant", "content": row["chosen"]}], tokenize=False)
        assert f["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
        sc, sr = (model(input_ids=torch.tensor([f[key]])).logits[0, 0] for key in ("input_ids", "rejected_ids"))
        m = float(row.get("margin", 0))
        want = want - nn.functional.logsigmoid(sc - sr - m) + centering * (sc + sr) ** 2
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("lora_" in n for n in grads) and any("score" in n for n in grads)
    assert all("lora_" in n or "score" in n for n in grads), grads


def test_a_reward_model_learns_the_preferred_responses_and_peft_loads_it(tmp_path):
    config = reward_setup(tmp_path)
    summary = train(config, progress=False)
    run = tmp_path / "run"
    assert summary["task"] == "reward" and summary["best"]["metric"] == "accuracy"
    # held-out pairs: the chosen response scores higher in most of them, by a margin
    assert summary["validation"]["accuracy"] >= 0.8 and summary["validation"]["reward_margin"] > 1, summary
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and "score" in adapter_config["modules_to_save"]
    # `lorafit eval` reloads the adapter (and its score head) to the run's numbers
    again = evaluate(run, split="validation", samples=tmp_path / "pairs.jsonl")
    assert again["accuracy"] == pytest.approx(summary["validation"]["accuracy"])
    assert again["eval_loss"] == pytest.approx(summary["validation"]["eval_loss"], abs=1e-5)
    # --samples: each pair's conversations and scores, which the metrics come from
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert [p["example"] for p in pairs] == list(range(len(pairs))) and all(p["chosen"] != p["rejected"]
                                                                            for p in pairs)
    assert again["accuracy"] == pytest.approx(sum(p["right"] for p in pairs) / len(pairs))
    assert again["reward_margin"] == pytest.approx(
        sum(p["chosen_score"] - p["rejected_score"] for p in pairs) / len(pairs), rel=1e-5)
    # PEFT loads it onto a one-output classifier to the scores lorafit gives
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "tiny-llama", num_labels=1)
    ours = copy.deepcopy(base)
    lorafit.load_adapter(ours, run / "adapter")
    theirs = peft.PeftModel.from_pretrained(base, run / "adapter")
    ids = torch.tensor([[3, 5, 7, 9, 11], [4, 6, 8, 10, 12]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        fresh = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "tiny-llama", num_labels=1)
        assert not torch.allclose(ours(input_ids=ids).logits, fresh(input_ids=ids).logits)


def test_an_encoder_reward_model_reads_prompt_and_response_as_a_text_pair(tmp_path):
    """A tokenizer without a chat template (BERT): [CLS] prompt [SEP] response [SEP] with its token types; trained
    fully, it learns the preference too."""
    config = reward_setup(tmp_path, encoder=True)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tiny-bert")
    tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]  # as BERT's own tokenizer has them
    rc = RunConfig()
    rc.task.type, rc.data.instruction_field = "reward", "prompt"
    row = preference_rows(1, seed=9)[0]
    task = Reward(rc, tok)
    (feature,) = task.encode([row], "train").features
    pair = tok(row["prompt"], row["chosen"])
    assert feature["input_ids"] == pair["input_ids"] and feature["token_type_ids"] == pair["token_type_ids"]
    assert "token_type_ids" in task.collate([feature])
    summary = train(config, ["train.method='full'", "train.lr=3e-3"], progress=False)
    assert summary["validation"]["accuracy"] >= 0.8, summary["validation"]


def test_an_encoder_reads_each_row_as_lorafit_serve_scores_it_whatever_rows_share_its_batch(tmp_path):
    """Rows with and without a prompt in one tokenized batch: each row gets the tokens it gets alone (the text
    pair, or the response alone), which are the tokens /v1/classify scores its conversation on."""
    from lorafit.serve.engine import conversation_row

    reward_setup(tmp_path, encoder=True)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tiny-bert")
    tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    rc = RunConfig()
    rc.task.type, rc.data.instruction_field = "reward", "prompt"
    rows = preference_rows(4, seed=5)
    rows[1]["prompt"] = rows[3]["prompt"] = ""
    task = Reward(rc, tok)
    together = task.encode(rows, "train").features
    alone = [task.encode([row], "train").features[0] for row in rows]
    assert together == alone
    for row, feature in zip(rows, together):
        messages = [{"role": "user", "content": row["prompt"]}] if row["prompt"] else []
        served = conversation_row(tok, messages + [{"role": "assistant", "content": row["chosen"]}])
        enc = tok(served.text, served.pair)
        assert feature["input_ids"] == enc["input_ids"] and feature["token_type_ids"] == enc["token_type_ids"]
    assert tok.sep_token_id not in together[1]["input_ids"][1:-1]  # no empty first text before the response


def test_a_decoder_tokenizer_without_a_chat_template_gets_the_default_one(tmp_path):
    """No chat template and no separator token (a GPT-2-style tokenizer): a text pair would run the prompt into
    the response, so the conversation is rendered with causal_lm's default template."""
    from lorafit.chat import DEFAULT_CHAT_TEMPLATE

    rows = preference_rows(2, seed=3)
    _, tok, _ = tiny_reward_model(tmp_path, rows)
    tok.chat_template, tok.sep_token = None, None
    config = RunConfig()
    config.task.type, config.data.instruction_field = "reward", "prompt"
    task = Reward(config, tok)
    features = task.encode(rows, "train").features
    text = tok.apply_chat_template([{"role": "user", "content": rows[0]["prompt"]},
                                    {"role": "assistant", "content": rows[0]["chosen"]}],
                                   chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False)
    assert not task.text_pair and features[0]["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


def test_pairs_that_max_length_cuts_to_the_same_tokens_are_left_out(tmp_path):
    rows = preference_rows(4, seed=1)
    rows[0]["prompt"] = " ".join(["the film"] * 40)  # past max_length: both sides end inside the prompt
    _, tok, _ = tiny_reward_model(tmp_path, rows)
    config = RunConfig()
    config.task.type, config.task.max_length, config.data.instruction_field = "reward", 24, "prompt"
    encoded = Reward(config, tok).encode(rows, "train")
    assert len(encoded.features) == 3 and encoded.skipped == 1


def test_a_resumed_reward_run_ends_where_an_uninterrupted_one_does(tmp_path):
    config = reward_setup(tmp_path, n_train=32, n_val=8)
    assert_resume_matches(config, tmp_path, "task.reward_centering=0.01")


@pytest.mark.parametrize("setting, message", [
    ("task.reward_centering=-1", "task.reward_centering must be a finite number >= 0"),
    ("task.dpo_beta=0.5", "task.dpo_beta is for task.type = 'preference' or 'kto'; task.type is 'reward'"),
    ("task.type='preference' task.reward_centering=0.1", "task.reward_centering is for task.type = 'reward'"),
    ("data.rejected_field='chosen'", "data.rejected_field is data.chosen_field too"),
    ("data.output_field='chosen'", "data.output_field is not used by task.type = 'reward'"),
    ("data.rejected_field='worse'", "field 'worse' (data.rejected_field) not found"),
    ("data.margin_field='margin'", "field 'margin' (data.margin_field) not found"),
    ("task.type='preference' data.margin_field='margin'", "data.margin_field is for task.type = 'reward'"),
])
def test_what_reward_training_cannot_use_is_refused_naming_the_setting(tmp_path, setting, message):
    config = reward_setup(tmp_path, n_train=8, n_val=4)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(config, setting.split(" "), progress=False)
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_margin_that_is_not_a_number_names_the_field(tmp_path):
    rows = preference_rows(2, seed=1)
    _, tok, _ = tiny_reward_model(tmp_path, rows)
    config = RunConfig()
    config.task.type, config.data.instruction_field, config.data.margin_field = "reward", "prompt", "margin"
    with pytest.raises(ValueError, match=r"field 'margin' \(data.margin_field\) must hold a finite number, got 'much'"):
        Reward(config, tok).encode([{**rows[0], "margin": 1}, {**rows[1], "margin": "much"}], "train")


def test_a_given_classifier_must_have_one_output(tmp_path):
    config = reward_setup(tmp_path, n_train=8, n_val=4)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tiny-llama")
    two = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "tiny-llama", num_labels=2)
    with pytest.raises(ValueError, match="a reward model scores with one"):
        train(config, model=two, tokenizer=tok, progress=False)
    causal = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-llama")
    with pytest.raises(ValueError, match="task.type = 'reward' needs a sequence classifier with one output"):
        train(config, model=causal, tokenizer=tok, progress=False)
