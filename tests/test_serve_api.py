"""The HTTP API of `lorafit serve` through FastAPI's TestClient, and one real uvicorn start."""

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
pytest.importorskip("transformers")

from fastapi.testclient import TestClient  # noqa: E402

import lorafit  # noqa: E402
from lorafit.serve.app import Limits, create_app  # noqa: E402
from lorafit.serve.server import build_service  # noqa: E402
from tests import serve_models as sm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    bert, llama = sm.bert_dir(root), sm.llama_dir(root)
    for i, name in enumerate(["pos-neg", "topic_v2", "c.3"]):
        sm.make_adapter(bert, root / "cls" / name, seed=i, r=2 + 2 * i,
                        labels=["neg", "neu", "pos"] if i == 0 else None)
    for i, name in enumerate(["chat", "poet"]):
        sm.make_adapter(llama, root / "gen" / name, seed=10 + i, r=4 * (i + 1))
    return root, bert, llama


@pytest.fixture
def cls_client(dirs, tmp_path):
    root, bert, _ = dirs
    adapters = tmp_path / "cls"
    shutil.copytree(root / "cls", adapters)
    service = build_service(str(bert), adapters, token=TOKEN, max_adapters=2,
                            limits=Limits(max_body_bytes=4096, max_texts=8, max_wait_ms=20))
    with TestClient(create_app(service)) as client:
        client.adapters = adapters
        client.service = service
        yield client


@pytest.fixture(scope="module")
def gen_client(dirs):
    root, _, llama = dirs
    service = build_service(str(llama), root / "gen", token=None,
                            limits=Limits(max_prompt_tokens=12, max_new_tokens=16, max_wait_ms=20))
    with TestClient(create_app(service)) as client:
        client.service = service
        yield client


def _direct_probs(model_dir, adapter_dir, texts):
    model = sm.load(model_dir)
    if adapter_dir is not None:
        lorafit.load_adapter(model, adapter_dir)
    tok = sm.tokenizer(causal=False)
    with torch.no_grad():
        return model(**tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1)


def test_health_and_adapter_list(cls_client):
    assert cls_client.get("/health").json()["status"] == "ok"
    rows = {r["name"]: r for r in cls_client.get("/v1/adapters").json()["adapters"]}
    assert set(rows) == {"pos-neg", "topic_v2", "c.3"}
    assert rows["topic_v2"]["rank"] == 4 and not rows["topic_v2"]["loaded"] and rows["topic_v2"]["size_bytes"] > 0


def test_classify_matches_the_adapter_alone(cls_client, dirs):
    _, bert, _ = dirs
    texts = ["great movie", "the plot was boring and bad", "fun"]
    for adapter in ("pos-neg", "topic_v2", None):
        body = cls_client.post("/v1/classify", json={"texts": texts, "adapter": adapter})
        assert body.status_code == 200, body.text
        results = body.json()["results"]
        expected = _direct_probs(bert, cls_client.adapters / adapter if adapter else None, texts)
        got = torch.tensor([list(r["probabilities"].values()) for r in results])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert set(results[0]["probabilities"]) == {"LABEL_0", "LABEL_1", "LABEL_2"}
    named = cls_client.post("/v1/classify", json={"texts": texts, "adapter": "pos-neg"}).json()["results"]
    assert named[0]["label"] in ("neg", "neu", "pos")
    rows = {r["name"]: r for r in cls_client.get("/v1/adapters").json()["adapters"]}
    assert rows["pos-neg"]["hits"] == 2 and rows["pos-neg"]["loaded"]


def test_text_pairs_and_one_output_heads(dirs, tmp_path):
    """text_pairs: each text's second text, tokenized as the pair a classifier trained on pairs saw (rows with and
    without one may share a batch); an adapter with a one-output head (a reward model) answers its raw score."""
    from lorafit.serve.engine import ClassifyRow, Job, classify_batch

    _, bert, _ = dirs
    adapters = tmp_path / "adapters"
    sm.make_adapter(bert, adapters / "nli", seed=3)
    sm.make_adapter(bert, adapters / "reward", seed=4, num_labels=1)
    service = build_service(str(bert), adapters, limits=Limits(max_texts=8, max_wait_ms=200))
    tok = sm.tokenizer(causal=False)
    texts, pairs = ["great movie", "the plot", "fun"], ["it was fun", "was boring and bad", "great"]

    def direct(adapter, second):
        model = sm.load(bert)
        lorafit.load_adapter(model, adapters / adapter)
        with torch.no_grad():
            return model(**tok(texts, second, padding=True, return_tensors="pt")).logits

    with TestClient(create_app(service)) as client:
        for second in (pairs, None):
            body = {"texts": texts, "adapter": "nli", **({"text_pairs": second} if second else {})}
            results = client.post("/v1/classify", json=body).json()["results"]
            got = torch.tensor([list(r["probabilities"].values()) for r in results])
            torch.testing.assert_close(got, direct("nli", second).softmax(-1), atol=1e-5, rtol=1e-4)
        # one batch of a request with pairs and one without gives each what it gives alone
        entry = service.registry.acquire("nli")
        jobs = [Job(rows=3, payload=[ClassifyRow(t, p) for t, p in zip(texts, pairs)], entry=entry),
                Job(rows=3, payload=[ClassifyRow(t) for t in texts], entry=entry)]
        mixed = classify_batch(service.registry.model, tok, service.registry.model_lock, 32, jobs)
        for results, second in zip(mixed, (pairs, None)):
            got = torch.tensor([list(r["probabilities"].values()) for r in results])
            torch.testing.assert_close(got, direct("nli", second).softmax(-1), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(direct("nli", pairs), direct("nli", None))
        scored = client.post("/v1/classify", json={"texts": texts, "text_pairs": pairs, "adapter": "reward"}).json()
        assert all(set(r) == {"label", "score"} for r in scored["results"])
        torch.testing.assert_close(torch.tensor([r["score"] for r in scored["results"]]),
                                   direct("reward", pairs)[:, 0], atol=1e-5, rtol=1e-4)
        r = client.post("/v1/classify", json={"texts": texts, "text_pairs": pairs[:2]})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "text_pairs"]


REWARD_ROWS = [{"prompt": "what was the movie", "chosen": "great fun", "rejected": "very boring"},
               {"prompt": "how was it", "chosen": "good",
                "rejected": "the plot was awful and boring but the music was really good"}]


def reward_conversations_and_features(tokenizer):
    """REWARD_ROWS' four conversations (each prompt with its chosen, then its rejected response) and the features
    lorafit train's reward task encodes them to."""
    from lorafit.train.config import RunConfig
    from lorafit.train.reward import Reward

    config = RunConfig()
    config.task.type, config.data.instruction_field = "reward", "prompt"
    features = Reward(config, tokenizer).encode(REWARD_ROWS, "train").features
    conversations = [[{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[side]}]
                     for row in REWARD_ROWS for side in ("chosen", "rejected")]
    return conversations, features


def test_a_causal_lm_serves_reward_scores_of_conversations_as_training_encoded_them(dirs, tmp_path):
    """--task classify loads a causal LM as a sequence classifier (its config without a pad token: the server sets
    the tokenizer's, where the score is read), so a reward adapter trained on it is served; each conversation is
    rendered with the chat template and tokenized as the reward task encoded it, and scores what the adapted model
    gives those tokens alone. Texts and conversations may share a batch."""
    from transformers import AutoModelForSequenceClassification

    from lorafit.serve.engine import ClassifyRow, Job, classify_batch, conversation_row

    _, _, llama = dirs
    base = tmp_path / "llama-no-pad"
    shutil.copytree(llama, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "pad_token_id": None}))
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or ".modules_to_save." in name:
                p.normal_(std=0.3)
    adapters = tmp_path / "adapters"
    lorafit.save_adapter(model, adapters / "reward")
    assert json.loads((adapters / "reward" / "adapter_config.json").read_text())["modules_to_save"] == ["score"]
    with pytest.raises(ValueError, match="--task generate needs a causal LM"):
        build_service(str(dirs[1]), adapters, task="generate")
    service = build_service(str(base), adapters, task="classify", limits=Limits(max_wait_ms=50))
    assert service.task == "classify" and service.model.config.pad_token_id == service.tokenizer.pad_token_id
    conversations, features = reward_conversations_and_features(service.tokenizer)
    model.eval()
    with torch.no_grad():
        want = torch.stack([model(input_ids=torch.tensor([f[key]])).logits[0, 0]
                            for f in features for key in ("input_ids", "rejected_ids")])
    with TestClient(create_app(service)) as client:
        r = client.post("/v1/classify", json={"conversations": conversations, "adapter": "reward"})
        assert r.status_code == 200, r.text
        torch.testing.assert_close(torch.tensor([x["score"] for x in r.json()["results"]]), want, atol=1e-5,
                                   rtol=1e-4)
        for body, field in [({"texts": ["fun"], "conversations": conversations}, "texts"), ({}, "texts"),
                            ({"conversations": conversations, "text_pairs": ["a"] * 4}, "text_pairs"),
                            ({"conversations": [[]]}, "conversations")]:
            r = client.post("/v1/classify", json=body)
            assert r.status_code == 422 and field in r.json()["detail"][0]["loc"], (body, r.text)
    # a plain text (the tokenizer's special tokens added) and a rendered conversation (its template's only) in one
    # batch give what each gives alone
    entry = service.registry.acquire("reward")
    text_job = Job(rows=1, payload=[ClassifyRow("the movie was great")], entry=entry)
    chat_job = Job(rows=1, payload=[conversation_row(service.tokenizer, conversations[3])], entry=entry)
    mixed = classify_batch(service.model, service.tokenizer, service.registry.model_lock, 64, [text_job, chat_job])
    alone = [classify_batch(service.model, service.tokenizer, service.registry.model_lock, 64, [job])[0]
             for job in (text_job, chat_job)]
    assert [rows[0]["score"] for rows in mixed] == pytest.approx([rows[0]["score"] for rows in alone], abs=1e-5)
    assert mixed[1][0]["score"] == pytest.approx(float(want[3]), abs=1e-5)


def test_an_encoder_reward_model_scores_a_conversation_as_its_prompt_and_response_pair(dirs, tmp_path):
    """An encoder's tokenizer without a chat template: a conversation is served as the text pair (the messages before
    the last, the last) the reward task trained the model on, token types included."""
    _, bert, _ = dirs
    adapters = tmp_path / "adapters"
    sm.make_adapter(bert, adapters / "reward", seed=6, num_labels=1)
    service = build_service(str(bert), adapters, limits=Limits(max_wait_ms=50))
    conversations, features = reward_conversations_and_features(service.tokenizer)
    assert "token_type_ids" in features[0]
    model = sm.load(bert)
    lorafit.load_adapter(model, adapters / "reward")
    with torch.no_grad():
        want = torch.stack([model(input_ids=torch.tensor([f[key]]),
                                  token_type_ids=torch.tensor([f[types]])).logits[0, 0]
                            for f in features for key, types in (("input_ids", "token_type_ids"),
                                                                 ("rejected_ids", "rejected_token_type_ids"))])
    with TestClient(create_app(service)) as client:
        r = client.post("/v1/classify", json={"conversations": conversations, "adapter": "reward"})
    torch.testing.assert_close(torch.tensor([x["score"] for x in r.json()["results"]]), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("template", ["the tokenizer's", "none"])
def test_a_chat_prompt_is_served_as_training_rendered_it(dirs, template):
    """/v1/generate's messages become the prompt tokens causal_lm training put before the assistant's turn, with
    the tokenizer's chat template or, without one, the default template training used."""
    from transformers import AutoTokenizer

    from lorafit.serve.app import Message, _prompt_ids
    from lorafit.train.config import RunConfig
    from lorafit.train.tasks import IGNORE, CausalLM

    tok = AutoTokenizer.from_pretrained(dirs[2])
    if template == "none":
        tok.chat_template = None
    messages = [{"role": "system", "content": "hello"}, {"role": "user", "content": "what was the movie"},
                {"role": "assistant", "content": "great fun"}]
    ids, labels = CausalLM(RunConfig(), tok).encode_messages(messages)
    prompt = ids[:next(i for i, label in enumerate(labels) if label != IGNORE)]
    assert _prompt_ids(tok, None, [Message(**m) for m in messages[:2]]) == prompt


def test_a_quantized_base_serves_what_the_adapter_gives_on_it(dirs):
    """--quantize 4: the base's linear layers in NF4, the classifier head (which adapters save a copy of) not; each
    row of a mixed batch gives what its adapter gives on the same quantized model."""
    from lorafit.quantize import QuantizedLinear, quantize_base
    from lorafit.serve.server import OUTPUT_HEADS

    root, bert, _ = dirs
    service = build_service(str(bert), root / "cls", quantize=4, limits=Limits(max_wait_ms=50))
    kinds = {type(m).__name__ for n, m in service.model.named_modules() if n.endswith(("query", "classifier"))}
    assert kinds == {"QuantizedLinear", "Linear"}
    texts = ["great movie", "the plot was boring and bad"]
    with TestClient(create_app(service)) as client, concurrent.futures.ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda a: client.post("/v1/classify", json={"texts": texts, "adapter": a}),
                                  ["pos-neg", "topic_v2", None]))
    for adapter, response in zip(["pos-neg", "topic_v2", None], responses):
        assert response.status_code == 200, response.text
        model = quantize_base(sm.load(bert), bits=4, skip=OUTPUT_HEADS)
        assert any(isinstance(m, QuantizedLinear) for m in model.modules())
        if adapter is not None:
            lorafit.load_adapter(model, root / "cls" / adapter)
        with torch.no_grad():
            expected = model(**sm.tokenizer(causal=False)(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
        got = torch.tensor([list(r["probabilities"].values()) for r in response.json()["results"]])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_requests_are_batched_across_adapters(cls_client, dirs):
    _, bert, _ = dirs
    names = ["pos-neg", "topic_v2", None, "pos-neg"] * 3
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda a: cls_client.post("/v1/classify", json={"texts": ["good fun"], "adapter": a}),
                                  names))
    assert all(r.status_code == 200 for r in responses)
    for adapter, r in zip(names, responses):
        expected = _direct_probs(bert, cls_client.adapters / adapter if adapter else None, ["good fun"])[0]
        torch.testing.assert_close(torch.tensor(list(r.json()["results"][0]["probabilities"].values())), expected,
                                   atol=1e-5, rtol=1e-4)
    count = _scrape(cls_client)[("lorafit_batch_rows_count", ())]
    assert count < len(names)  # some requests shared a batch


def test_adapters_with_heads_of_different_sizes(dirs, tmp_path):
    """A 2-class and a 4-class adapter on a 3-class base, requested concurrently: no global label
    count is needed, and every response has its adapter's classes and scores."""
    _, bert, _ = dirs
    adapters = tmp_path / "heads"
    sm.make_adapter(bert, adapters / "sst2", seed=20, num_labels=2, labels=["negative", "positive"])
    sm.make_adapter(bert, adapters / "agnews", seed=21, num_labels=4)
    service = build_service(str(bert), adapters, limits=Limits(max_wait_ms=200))
    names = ["sst2", "agnews", None, "agnews", "sst2", "agnews"]
    texts = ["good fun", "the story and the music"]
    with TestClient(create_app(service)) as client, concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        responses = list(pool.map(lambda a: client.post("/v1/classify", json={"texts": texts, "adapter": a}), names))
        count = _scrape(client)[("lorafit_batch_rows_count", ())]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    for adapter, r in zip(names, responses):
        results = r.json()["results"]
        expected = _direct_probs(bert, adapters / adapter if adapter else None, texts)
        assert expected.shape[1] == {"sst2": 2, "agnews": 4, None: 3}[adapter]
        got = torch.tensor([list(row["probabilities"].values()) for row in results])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        if adapter == "sst2":
            assert set(results[0]["probabilities"]) == {"negative", "positive"}
            assert results[0]["label"] in ("negative", "positive")
        else:
            assert set(results[0]["probabilities"]) == {f"LABEL_{i}" for i in range(expected.shape[1])}
    assert 3 <= count < len(names)  # one batch per head size at least, and requests of one size shared one


def test_bad_input(cls_client):
    post = cls_client.post
    assert post("/v1/classify", json={"texts": ["x"], "adapter": "missing"}).status_code == 404
    r = post("/v1/classify", content=b'{"texts": [', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"
    r = post("/v1/classify", json={"texts": "not a list"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "texts"]
    r = post("/v1/classify", json={"texts": [1, 2]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:2] == ["body", "texts"]
    r = post("/v1/classify", json={"texts": ["a"] * 9})  # max_texts=8
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "texts"]
    assert post("/v1/classify", json={"texts": []}).status_code == 422
    assert post("/v1/classify", json={"texts": ["a"], "unknown": 1}).status_code == 422
    r = post("/v1/classify", json={"texts": ["a" * 5000]})  # max_body_bytes=4096
    assert r.status_code == 413
    for name in ("../../etc", "..", "a/b", "x y"):
        r = post("/v1/classify", json={"texts": ["a"], "adapter": name})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "adapter"], name
    assert post("/v1/generate", json={"prompt": "hi"}).status_code == 404  # not a generation server
    assert cls_client.get("/health").status_code == 200


def test_load_and_unload_need_the_token(cls_client):
    assert cls_client.post("/v1/adapters", json={"name": "c.3"}).status_code == 401
    assert cls_client.post("/v1/adapters", json={"name": "c.3"}, headers={"Authorization": "Bearer no"}).status_code \
        == 401
    assert cls_client.delete("/v1/adapters/c.3").status_code == 401
    r = cls_client.post("/v1/adapters", json={"name": "c.3", "pin": True}, headers=AUTH)
    assert r.status_code == 200 and r.json()["rank"] == 6 and r.json()["pinned"]
    assert {r["name"]: r for r in cls_client.get("/v1/adapters").json()["adapters"]}["c.3"]["loaded"]
    assert cls_client.delete("/v1/adapters/c.3", headers=AUTH).status_code == 200
    assert cls_client.delete("/v1/adapters/c.3", headers=AUTH).status_code == 404  # not loaded any more
    assert cls_client.post("/v1/adapters", json={"name": "nope"}, headers=AUTH).status_code == 404
    r = cls_client.post("/v1/adapters", json={"name": "../../etc"}, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "name"]
    assert cls_client.delete("/v1/adapters/..%2F..%2Fetc", headers=AUTH).status_code in (404, 422)
    assert cls_client.delete("/v1/adapters/..", headers=AUTH).status_code in (404, 422)


def test_corrupt_adapter_is_400_and_the_server_keeps_serving(cls_client):
    bad = cls_client.adapters / "broken"
    shutil.copytree(cls_client.adapters / "c.3", bad)
    (bad / "adapter_model.safetensors").write_bytes(b"not safetensors")
    r = cls_client.post("/v1/adapters", json={"name": "broken"}, headers=AUTH)
    assert r.status_code == 400 and "safetensors" in r.json()["detail"]
    assert cls_client.post("/v1/classify", json={"texts": ["a"], "adapter": "broken"}).status_code == 400
    (bad / "adapter_config.json").write_text("{not json")
    assert cls_client.post("/v1/classify", json={"texts": ["a"], "adapter": "broken"}).status_code == 400
    assert cls_client.post("/v1/classify", json={"texts": ["fun"], "adapter": "c.3"}).status_code == 200


def test_metrics(cls_client):
    cls_client.post("/v1/classify", json={"texts": ["fun"], "adapter": "c.3"})
    cls_client.post("/v1/classify", json={"texts": ["fun"], "adapter": "zzz"})
    got = _scrape(cls_client)
    assert got[("lorafit_requests_total", (("method", "POST"), ("route", "/v1/classify"), ("status", "200")))] == 1
    assert got[("lorafit_requests_total", (("method", "POST"), ("route", "/v1/classify"), ("status", "404")))] == 1
    assert got[("lorafit_request_seconds_bucket", (("le", "+Inf"), ("route", "/v1/classify")))] == 2
    assert got[("lorafit_adapters_loaded", ())] == 1 and got[("lorafit_batch_rows_count", ())] == 1


def test_generate_matches_hf_generate_with_the_adapter(gen_client, dirs):
    root, _, llama = dirs
    tok = sm.tokenizer(causal=True)
    model = sm.load(llama)
    lorafit.load_adapter(model, root / "gen" / "poet")
    ids = tok("hello world the movie", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=0, eos_token_id=3)
    expected = tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    # two prompts of different lengths in one batch (left padding) give each its own answer
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda body: gen_client.post("/v1/generate", json=body), [
            {"prompt": "hello world the movie", "adapter": "poet", "max_new_tokens": 6},
            {"prompt": "hello", "adapter": "chat", "max_new_tokens": 6}])
    assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
    assert a.json()["text"] == expected


def test_a_bfloat16_server_answers_as_the_float32_model_does(dirs):
    """--dtype bfloat16: the base model and every adapter loaded into it in bfloat16; classification to bf16's
    rounding of the float32 model's probabilities, and generation runs."""
    root, bert, llama = dirs
    texts = ["great movie", "the plot was boring and bad"]
    service = build_service(str(bert), root / "cls", dtype=torch.bfloat16, device="cpu")
    with TestClient(create_app(service)) as client:
        got = client.post("/v1/classify", json={"texts": texts, "adapter": "pos-neg"})
    assert got.status_code == 200, got.text
    assert {p.dtype for p in service.model.parameters()} == {torch.bfloat16}
    probs = torch.tensor([list(r["probabilities"].values()) for r in got.json()["results"]])
    torch.testing.assert_close(probs, _direct_probs(bert, root / "cls" / "pos-neg", texts), atol=2e-2, rtol=0)
    service = build_service(str(llama), root / "gen", dtype=torch.bfloat16, device="cpu")
    with TestClient(create_app(service)) as client:
        got = client.post("/v1/generate", json={"prompt": "hello world", "adapter": "poet", "max_new_tokens": 4})
    assert got.status_code == 200 and got.json()["tokens"] == 4, got.text


def test_generation_passes_the_cache_under_the_models_own_name(dirs):
    """transformers renamed past_key_values to cache (the old name warns, and goes in 5.40): decoding uses
    whichever name the installed model's forward has, and no deprecation warning comes out of it."""
    from lorafit.serve.engine import _cache_name

    model = sm.load(dirs[2])
    name = _cache_name(model)
    ids = torch.tensor([[5, 6, 7]])
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("error", FutureWarning)
        out = model(input_ids=ids, use_cache=True)
        model(input_ids=ids[:, -1:], attention_mask=torch.ones(1, 4, dtype=torch.long), **{name: getattr(out, name)},
              use_cache=True)


def test_generate_sampling_chat_and_stream(gen_client):
    body = {"prompt": "the movie", "adapter": "chat", "max_new_tokens": 8, "temperature": 1.5, "top_p": 0.9,
            "seed": 7}
    first = gen_client.post("/v1/generate", json=body).json()
    assert first == gen_client.post("/v1/generate", json=body).json()  # same seed, same text
    chat = gen_client.post("/v1/generate", json={"messages": [{"role": "user", "content": "hello"}],
                                                 "max_new_tokens": 4})
    assert chat.status_code == 200 and chat.json()["tokens"] <= 4
    with gen_client.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e.strip()]
    deltas = [json.loads(e.removeprefix("data: "))["delta"] for e in events if e.startswith("data: ")]
    done = json.loads(events[-1].split("data: ", 1)[1])
    assert events[-1].startswith("event: done") and "".join(deltas) == done["text"] == first["text"]


def test_generate_limits(gen_client):
    post = gen_client.post
    r = post("/v1/generate", json={"prompt": "hello", "max_new_tokens": 17})  # limit 16
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "max_new_tokens"]
    r = post("/v1/generate", json={"prompt": "hello " * 20})  # limit 12 tokens
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "prompt"]
    r = post("/v1/generate", json={"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 422
    assert post("/v1/generate", json={"prompt": "hi", "temperature": "hot"}).status_code == 422
    assert post("/v1/generate", json={"prompt": "hi", "top_p": 0}).status_code == 422
    assert post("/v1/generate", json={"prompt": "hi", "adapter": "nope"}).status_code == 404
    assert post("/v1/classify", json={"texts": ["a"]}).status_code == 404
    # no token at start-up: loading over HTTP is disabled
    assert post("/v1/adapters", json={"name": "chat"}, headers=AUTH).status_code == 403


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_server_and_graceful_shutdown(dirs):
    """`lorafit serve` under uvicorn on 127.0.0.1: serves, and on SIGTERM finishes the request in flight."""
    import httpx

    root, bert, _ = dirs
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORAFIT_SERVE_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "lorafit.cli", "serve", "--model", str(bert), "--adapters",
                             str(root / "cls"), "--port", str(port), "--max-wait-ms", "1500", "--log-level", "warning"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-2000:]
            time.sleep(0.2)
        assert httpx.post(f"{url}/v1/adapters", json={"name": "c.3"}, headers=AUTH).status_code == 200
        result = {}

        def slow():  # waits ~1.5 s in the batcher (--max-wait-ms 1500)
            result["r"] = httpx.post(f"{url}/v1/classify", json={"texts": ["fun"], "adapter": "pos-neg"}, timeout=30)

        t = threading.Thread(target=slow)
        t.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert result["r"].status_code == 200 and result["r"].json()["results"][0]["label"] in ("neg", "neu", "pos")
        # uvicorn finishes the shutdown, then re-raises the signal it caught (exit by SIGTERM, as asked)
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_non_finite_numbers_are_422_not_500(cls_client, gen_client):
    for client, path, body in [(cls_client, "/v1/classify", b'{"texts": [NaN]}'),
                               (gen_client, "/v1/generate", b'{"prompt": "hi", "temperature": Infinity}'),
                               (gen_client, "/v1/generate", b'{"prompt": "hi", "top_p": -Infinity}')]:
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["type"] == "json_invalid" and "not a JSON number" in r.text


def test_token_needs_the_bearer_scheme(cls_client):
    assert cls_client.post("/v1/adapters", json={"name": "c.3"}, headers={"Authorization": TOKEN}).status_code == 401
    r = cls_client.post("/v1/adapters", json={"name": "c.3"}, headers={"Authorization": f"bearer {TOKEN}"})
    assert r.status_code == 200


def test_metrics_label_only_known_methods_and_count_413(cls_client):
    for i in range(5):
        cls_client.request(f"X{i}" * 100, "/health")
    cls_client.post("/v1/classify", json={"texts": ["a" * 5000]})  # max_body_bytes=4096
    assert "X0" not in cls_client.get("/metrics").text
    got = _scrape(cls_client)
    assert got[("lorafit_requests_total", (("method", "other"), ("route", "/health"), ("status", "405")))] == 5
    assert got[("lorafit_requests_total", (("method", "POST"), ("route", "/v1/classify"), ("status", "413")))] == 1


def _scrape(client, accept="*/*") -> dict:
    """``/metrics`` read by prometheus_client's own parser: {(sample name, labels): value}."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
    from prometheus_client.parser import text_string_to_metric_families

    r = client.get("/metrics", headers={"Accept": accept})
    assert r.status_code == 200
    parse = openmetrics_families if "openmetrics" in accept else text_string_to_metric_families
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in parse(r.text) for s in f.samples}


def _sample(service, name: str, **labels) -> float | None:
    return service.metrics.registry.get_sample_value(name, labels)


def test_metrics_parse_and_stay_per_app(cls_client, dirs):
    """/metrics parsed by prometheus_client after a few requests (a 413 and an invented method among
    them): the counts and histograms are exact, only known methods become labels, and a second app in
    the same process counts on its own."""
    from lorafit.serve.metrics import LATENCY_BUCKETS, METHODS

    _, bert, _ = dirs
    for _ in range(2):
        assert cls_client.post("/v1/classify", json={"texts": ["fun"], "adapter": "c.3"}).status_code == 200
    assert cls_client.post("/v1/classify", json={"texts": ["a" * 5000]}).status_code == 413
    assert cls_client.request("BREW", "/health").status_code == 405
    assert cls_client.get("/nowhere/123").status_code == 404
    got = _scrape(cls_client)
    requests = {labels: v for (name, labels), v in got.items() if name == "lorafit_requests_total"}
    assert requests == {
        (("method", "POST"), ("route", "/v1/classify"), ("status", "200")): 2,
        (("method", "POST"), ("route", "/v1/classify"), ("status", "413")): 1,
        (("method", "other"), ("route", "/health"), ("status", "405")): 1,
        (("method", "GET"), ("route", "unmatched"), ("status", "404")): 1,
    }
    assert {dict(labels)["method"] for labels in requests} <= METHODS | {"other"}
    buckets = [(float(dict(labels)["le"]), v) for (name, labels), v in got.items()
               if name == "lorafit_request_seconds_bucket" and ("route", "/v1/classify") in labels]
    assert [le for le, _ in buckets] == [*LATENCY_BUCKETS, float("inf")]
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and counts[-1] == 3  # cumulative
    assert got[("lorafit_request_seconds_count", (("route", "/v1/classify"),))] == 3
    assert got[("lorafit_batch_rows_sum", ())] == 2  # one row per accepted request; the 413 never reached a batch
    assert 1 <= got[("lorafit_batch_rows_count", ())] <= 2
    assert got[("lorafit_adapters_loaded", ())] == 1 and got[("lorafit_adapter_loads_total", ())] == 1
    assert got[("lorafit_adapter_bytes", ())] > 0 and got[("lorafit_queue_jobs", ())] == 0
    assert got[("lorafit_requests_cancelled_total", ())] == 0 == got[("lorafit_streams_cancelled_total", ())]
    assert not any(name.endswith("_created") for name, _ in got)
    # an OpenMetrics scraper gets the same counts in its format
    om = _scrape(cls_client, "application/openmetrics-text; version=1.0.0")
    assert om[("lorafit_requests_total", (("method", "other"), ("route", "/health"), ("status", "405")))] == 1

    other = build_service(str(bert), cls_client.adapters, limits=Limits(max_wait_ms=1))
    with TestClient(create_app(other)) as client:
        assert client.post("/v1/classify", json={"texts": ["fun", "more fun"]}).status_code == 200
        theirs = _scrape(client)
    assert {k: v for k, v in theirs.items() if k[0] == "lorafit_requests_total"} == {
        ("lorafit_requests_total", (("method", "POST"), ("route", "/v1/classify"), ("status", "200"))): 1}
    assert theirs[("lorafit_batch_rows_sum", ())] == 2 and theirs[("lorafit_adapters_loaded", ())] == 0
    ours = _scrape(cls_client)
    assert ours[("lorafit_requests_total", (("method", "POST"), ("route", "/v1/classify"), ("status", "200")))] == 2
    assert ours[("lorafit_batch_rows_sum", ())] == 2
    # the two earlier scrapes of this app are counted (a scrape is counted once it has been answered)
    assert ours[("lorafit_requests_total", (("method", "GET"), ("route", "/metrics"), ("status", "200")))] == 2


def test_errors_name_no_server_paths(cls_client):
    bad = cls_client.adapters / "broken"
    shutil.copytree(cls_client.adapters / "c.3", bad)
    (bad / "adapter_model.safetensors").write_bytes(b"not safetensors")
    for r in (cls_client.post("/v1/classify", json={"texts": ["a"], "adapter": "broken"}),
              cls_client.post("/v1/adapters", json={"name": "nope"}, headers=AUTH)):
        assert r.status_code in (400, 404) and str(cls_client.adapters) not in r.text


def test_full_queue_is_503_with_retry_after(dirs, tmp_path):
    _, bert, _ = dirs
    (tmp_path / "none").mkdir()
    service = build_service(str(bert), tmp_path / "none", limits=Limits(max_queue=2, max_wait_ms=300))
    with TestClient(create_app(service)) as client, concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: client.post("/v1/classify", json={"texts": ["a", "b"]}), range(4)))
    codes = sorted(r.status_code for r in responses)
    assert codes[0] == 200 and codes[-1] == 503, codes
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["detail"]


def test_request_timeout_is_503_and_the_job_never_runs(dirs, tmp_path):
    _, bert, _ = dirs
    (tmp_path / "none").mkdir()
    service = build_service(str(bert), tmp_path / "none", limits=Limits(request_timeout_s=0.2, max_wait_ms=1500))
    with TestClient(create_app(service)) as client:
        start = time.monotonic()
        r = client.post("/v1/classify", json={"texts": ["fun"]})
        assert r.status_code == 503 and "within 0.2 s" in r.json()["detail"] and time.monotonic() - start < 1.2
        time.sleep(1.5)
        assert _scrape(client)[("lorafit_batch_rows_count", ())] == 0  # the worker skipped it


def test_texts_are_cut_before_tokenizing(dirs):
    """A megabyte of text costs what a page does: the tokenizer sees at most 16 characters per token
    kept, and the result is the same as for the whole text."""
    from lorafit.serve.engine import CHARS_PER_TOKEN, ClassifyRow, Job, classify_batch

    _, bert, _ = dirs
    model, tok = sm.load(bert), sm.tokenizer(causal=False)
    seen = []

    def recording(texts, **kw):
        seen.extend(len(t) for t in texts)
        return tok(texts, **kw)

    text = "great fun but the plot was boring " * 30_000  # ~1 MB
    lock = threading.Lock()
    cut = classify_batch(model, recording, lock, 8, [Job(rows=1, payload=[ClassifyRow(text)], entry=None)])
    whole = classify_batch(model, tok, lock, 8, [Job(rows=1, payload=[ClassifyRow(text)], entry=None)])
    assert max(seen) == 8 * CHARS_PER_TOKEN and cut == whole


def test_prompt_far_over_the_limit_is_refused_before_tokenizing(gen_client):
    r = gen_client.post("/v1/generate", json={"prompt": "hello " * 50_000})
    assert r.status_code == 422 and "characters" in r.json()["detail"][0]["msg"]


def test_stream_never_splits_a_character(gen_client, monkeypatch):
    """A byte-level tokenizer decodes the first bytes of a multi-byte character as U+FFFD: such a piece
    is held back until the character is complete, so every delta is whole text."""
    text = "hé 世界🙂!".encode()
    monkeypatch.setattr(gen_client.service.tokenizer, "decode",
                        lambda ids, **kw: text[:len(ids)].decode("utf-8", errors="replace"))
    body = {"prompt": "hello", "max_new_tokens": 16, "temperature": 1.0, "seed": 1}
    with gen_client.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
        events = [e for e in r.read().decode().split("\n\n") if e.strip()]
    deltas = [json.loads(e.removeprefix("data: "))["delta"] for e in events if e.startswith("data: ")]
    done = json.loads(events[-1].split("data: ", 1)[1])
    # a generation that stops inside a character ends with U+FFFD, as its final text does
    assert "\ufffd" not in "".join(deltas).rstrip("\ufffd") and len(deltas) > 3
    assert "".join(deltas) == done["text"] == text[:done["tokens"]].decode("utf-8", "replace")


def test_serve_accepts_the_built_in_model_names_of_train(dirs, monkeypatch):
    """`--model smollm2-135m` goes through the model names of `lorafit train` (here resolved to the tiny
    llama, so that the test needs no download)."""
    from lorafit import base_models
    from lorafit.serve import engine
    from lorafit.train import models

    assert engine.resolve_model is models.resolve_model is base_models.resolve_model  # one list of names
    _, _, llama = dirs
    asked = []

    def resolve(name, what):
        asked.append((name, what))
        return base_models.ModelSource(str(llama), builtin=name)

    monkeypatch.setattr(engine, "resolve_model", resolve)
    _, _, task = engine.load_model("smollm2-135m")
    assert asked == [("smollm2-135m", "--model")] and task == "generate"
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="--model './nowhere' is not a model directory"):
        engine.load_model("./nowhere")



@pytest.mark.slow
def test_the_built_in_names_get_their_task():
    """smollm2-135m's GGUF config names no architecture; it is still served as a generator (its config
    is read, not its weights)."""
    from transformers import AutoConfig

    from lorafit.base_models import resolve_model
    from lorafit.serve.engine import model_task

    for name, task in (("smollm2-135m", "generate"), ("minilm", "classify")):
        try:
            source = resolve_model(name)
        except ImportError as exc:
            pytest.skip(str(exc))
        assert model_task(AutoConfig.from_pretrained(source.path, **source.kwargs), source.kwargs) == task, name



def test_a_stream_whose_client_left_stops_generating(gen_client, monkeypatch):
    """Closing the event stream (what the server does when its client disconnects) cancels the
    generation: it stops at its next token instead of running to max_new_tokens."""
    import asyncio

    from lorafit.serve.app import _events
    from lorafit.serve.engine import GenerateRequest, Job

    service = gen_client.service
    decode = service.tokenizer.decode
    monkeypatch.setattr(service.tokenizer, "decode", lambda ids, **kw: time.sleep(0.05) or decode(ids, **kw))
    req = GenerateRequest(ids=[2, 10, 11], max_new_tokens=16, temperature=1.0, top_p=1.0, seed=3,
                          stop_ids=frozenset())
    job = Job(rows=1, payload=req, entry=None)

    async def first_event_then_leave():
        events = _events(service, None, job)
        first = await anext(events)
        await events.aclose()
        return first

    assert asyncio.run(first_event_then_leave()).startswith("data: ")
    result = job.future.result(timeout=30)
    assert result["finish_reason"] == "cancelled" and result["tokens"] < 16
    assert _scrape(gen_client)[("lorafit_streams_cancelled_total", ())] == 1


def _uvicorn(app):
    """``app`` under uvicorn on 127.0.0.1, in a thread of this process (so the test can look at its service)."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    return server, thread, port


def _wait(condition, what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.02)


def test_a_queued_request_whose_client_left_is_never_computed(dirs, tmp_path):
    """A plain (non-streaming) request whose client disconnects while it waits for a batch is dropped:
    the batcher skips it, and only the other requests' rows are computed."""
    import httpx

    _, bert, _ = dirs
    (tmp_path / "none").mkdir()
    service = build_service(str(bert), tmp_path / "none", limits=Limits(max_wait_ms=1))
    jobs, submit = [], service.batcher.submit
    service.batcher.submit = lambda job: jobs.append(job) or submit(job)
    server, thread, port = _uvicorn(create_app(service))
    url = f"http://127.0.0.1:{port}"
    body = json.dumps({"texts": ["leaves before the answer"]}).encode()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            with service.registry.model_lock:  # the first batch waits for the model: the next job stays queued
                first = pool.submit(httpx.post, f"{url}/v1/classify", json={"texts": ["first"]}, timeout=60)
                _wait(lambda: _sample(service, "lorafit_batch_rows_count") == 1, "the first batch to start")
                with socket.create_connection(("127.0.0.1", port)) as s:
                    s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                    _wait(lambda: len(jobs) == 2, "the second job to be queued")
                _wait(lambda: jobs[1].future.cancelled(), "the job of the client that left to be cancelled")
            assert first.result(60).status_code == 200
        assert httpx.post(f"{url}/v1/classify", json={"texts": ["after"]}, timeout=60).status_code == 200
        # "first" and "after": the job of the client that left never ran
        assert _sample(service, "lorafit_batch_rows_sum") == 2
        with httpx.Client(base_url=url) as client:
            got = _scrape(client)
        assert got[("lorafit_requests_cancelled_total", ())] == 1
        assert got[("lorafit_requests_total", (("method", "POST"), ("route", "/v1/classify"), ("status", "499")))] == 1
    finally:
        server.should_exit = True
        thread.join(30)


def test_bounded_soak_leaves_memory_where_it_was(dirs, tmp_path):
    """Soak: 320 classify requests from 4 threads over three adapters and the base model (at most 2
    adapters held, so they are evicted and loaded again), every 8th text about 1 MB, plus 20 event
    streams dropped after their first piece. Afterwards the Python heap is within 8 MB of where it was
    after a warm-up, and no tensor memory beyond the loaded adapters' is left."""
    import asyncio
    import gc
    import tracemalloc

    from lorafit.batched import clear_stacks
    from lorafit.serve.app import _events
    from lorafit.serve.engine import GenerateRequest, Job
    from tests.test_serve_registry import _live_tensor_bytes

    root, bert, llama = dirs
    adapters = tmp_path / "cls"
    shutil.copytree(root / "cls", adapters)
    service = build_service(str(bert), adapters, token=TOKEN, max_adapters=2,
                            limits=Limits(max_body_bytes=2 << 20, max_texts=8, max_wait_ms=5))
    generator = build_service(str(llama), root / "gen", token=None,
                              limits=Limits(max_prompt_tokens=12, max_new_tokens=16, max_wait_ms=5))
    names = ["pos-neg", "topic_v2", "c.3", None]
    big = "a long review that goes on " * 40_000  # ~1 MB

    def request(client, i):
        body = {"texts": [big if i % 8 == 0 else f"short text {i}", "another one"]}
        if names[i % 4]:
            body["adapter"] = names[i % 4]
        r = client.post("/v1/classify", json=body)
        assert r.status_code == 200, r.text

    async def dropped_stream(seed):
        req = GenerateRequest(ids=[2, 10, 11], max_new_tokens=16, temperature=1.0, top_p=1.0, seed=seed,
                              stop_ids=frozenset())
        job = Job(rows=1, payload=req, entry=None)
        events = _events(generator, None, job)
        await anext(events)
        await events.aclose()
        job.future.result(timeout=30)

    def heap_and_tensors():
        clear_stacks(service.model)
        clear_stacks(generator.model)
        gc.collect()
        return tracemalloc.get_traced_memory()[0], _live_tensor_bytes(service.registry)

    with TestClient(create_app(service)) as client, TestClient(create_app(generator)) as gen_client:
        for i in range(16):  # warm-up: every adapter loaded once, the tokenizer and allocator caches filled
            request(client, i)
        tracemalloc.start()
        try:
            heap_before, tensors_before = heap_and_tensors()
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda i: request(client, i), range(320)))
            for seed in range(20):
                asyncio.run(dropped_stream(seed))
            heap_after, tensors_after = heap_and_tensors()
        finally:
            tracemalloc.stop()
        stats = service.registry.stats
        assert _scrape(gen_client)[("lorafit_streams_cancelled_total", ())] == 20
    assert stats["evictions"] > 50 and stats["loads"] > 50  # the soak did churn the adapters
    assert heap_after - heap_before < 8 << 20, (heap_before, heap_after)
    assert tensors_after - tensors_before < 1 << 20, (tensors_before, tensors_after)



def test_a_finished_row_is_answered_at_once_and_leaves_the_batch(gen_client, monkeypatch):
    """A batch whose rows want 2, 9 and 5 tokens (each with its adapter): the short ones are answered while the
    long one still decodes, and every row's text is the one it gets in a batch of its own (greedy)."""
    from lorafit.serve.engine import GenerateRequest, Job, generate_batch

    service = gen_client.service
    registry = service.registry

    def jobs(specs):
        out = []
        for ids, adapter, max_new in specs:
            req = GenerateRequest(ids=ids, max_new_tokens=max_new, temperature=0.0, top_p=1.0, seed=None,
                                  stop_ids=frozenset())  # no stop token: each row runs to its length
            out.append(Job(rows=1, payload=req, entry=registry.acquire(adapter) if adapter else None))
        return out

    def run(batch):
        for job in batch:
            job.future.set_running_or_notify_cancel()
        try:
            return generate_batch(service.model, service.tokenizer, registry.model_lock, batch)
        finally:
            for job in batch:
                if job.entry is not None:
                    registry.release(job.entry)

    specs = [([2, 10, 11, 12], "chat", 2), ([2, 13], "poet", 9), ([2, 14, 15], None, 5)]
    batch = jobs(specs)
    progress = {"long": 0}
    batch[1].on_token = lambda _row, _text, _scored: progress.__setitem__("long", progress["long"] + 1)
    answered_at = {}
    for k in (0, 2):
        batch[k].future.add_done_callback(lambda _f, k=k: answered_at.__setitem__(k, progress["long"]))
    sizes, plans = [], []
    hook = service.model.register_forward_pre_hook(
        lambda _m, _args, kwargs: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    from lorafit.serve import engine

    per_row = engine.adapter_per_row

    def planned(model, rows):
        plans.append(list(rows))
        return per_row(model, rows)

    monkeypatch.setattr(engine, "adapter_per_row", planned)
    try:
        together = run(batch)
    finally:
        hook.remove()
    assert [a["tokens"] for a in together] == [2, 9, 5]
    assert sizes == [3, 3, 2, 2, 2, 1, 1, 1, 1]  # the prefill, then one forward a token, for the rows left
    # the rows' adapters planned for the prefill and again only when rows left (not every token)
    internal = {e.name: e.internal for e in (batch[0].entry, batch[1].entry)}
    assert plans == [[internal["chat"], internal["poet"], None], [internal["poet"], None], [internal["poet"]]]
    # answered in the step of their own last token (the long row's tokens so far: rows are decided in order,
    # so row 0's second token comes before the long row's second), long before the long row's ninth
    assert answered_at == {0: 1, 2: 5}
    alone = [run(jobs([spec]))[0] for spec in specs]
    assert [a["text"] for a in together] == [a["text"] for a in alone]


@pytest.mark.parametrize("prompt", [[2, 16], [2, 10, 11, 12, 13, 14, 15, 16, 17]], ids=["shorter", "longer"])
def test_a_request_that_comes_while_a_batch_decodes_joins_it(gen_client, prompt):
    """Continuous batching: ``more`` hands over a request after the running rows have 3 tokens; it joins after
    its own prefill (its prompt shorter or longer than the batch's cache: either side is left-padded) and gets
    the text it gets alone (greedy), answered while the batch goes on."""
    from lorafit.serve.engine import GenerateRequest, Job, generate_batch

    service = gen_client.service
    registry = service.registry

    def job(ids, adapter, max_new):
        req = GenerateRequest(ids=ids, max_new_tokens=max_new, temperature=0.0, top_p=1.0, seed=None,
                              stop_ids=frozenset())
        made = Job(rows=1, payload=req, entry=registry.acquire(adapter) if adapter else None)
        made.future.set_running_or_notify_cancel()
        return made

    def run(batch, more=None):
        try:
            return generate_batch(service.model, service.tokenizer, registry.model_lock, batch, more=more,
                                  max_rows=4)
        finally:
            for j in batch:
                if j.entry is not None:
                    registry.release(j.entry)

    running = [job([2, 10, 11, 12], "chat", 10), job([2, 13, 14], None, 10)]
    late = job(prompt, "poet", 4)
    progress, asked, answered_at = {"tokens": 0}, [], []
    running[0].on_token = lambda _row, _text, _scored: progress.__setitem__("tokens", progress["tokens"] + 1)

    def more(room):
        asked.append(room)
        return [late] if progress["tokens"] == 3 else []

    late.future.add_done_callback(lambda _f: answered_at.append(progress["tokens"]))
    sizes = []
    hook = service.model.register_forward_pre_hook(
        lambda _m, _args, kwargs: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        together = run(running, more)
    finally:
        hook.remove()
    assert set(asked) == {2, 1} and answered_at == [6]  # it joined at 3 tokens, took 4 of its own
    assert sizes[:5] == [2, 2, 2, 1, 3] and len(sizes) == 1 + 9 + 1  # prefill 2, 2 steps, its prefill, 3 rows
    alone = run([job([2, 10, 11, 12], "chat", 10), job([2, 13, 14], None, 10)])
    joined_alone = run([job(prompt, "poet", 4)])
    assert [a["text"] for a in together] == [a["text"] for a in alone]
    assert late.future.result()["text"] == joined_alone[0]["text"] and late.future.result()["tokens"] == 4


def test_a_batch_scores_echoed_prompts_and_computes_last_logits_only_when_none_asks(gen_client):
    """Rows asking for their prompt's log-probabilities (echo) and rows that do not, in one left-padded batch,
    get what they get alone; the prefill asks the model for its last position's logits only when no row
    echoes (a prompt's other logits are [tokens, vocabulary] per row)."""
    from dataclasses import replace

    from lorafit.serve.engine import GenerateRequest, Job, generate_batch

    service = gen_client.service
    registry = service.registry
    plain = GenerateRequest(ids=[2, 10, 11, 12, 13, 14], max_new_tokens=3, temperature=0.0, top_p=1.0, seed=None,
                            stop_ids=frozenset())
    reqs = [(replace(plain, ids=[2, 13], echo=True, logprobs=2), "poet"), (plain, "chat"),
            (replace(plain, logprobs=0, max_new_tokens=2), None), (replace(plain, echo=True, max_new_tokens=0), None)]

    def run(specs):
        jobs = [Job(rows=1, payload=req, entry=registry.acquire(adapter) if adapter else None)
                for req, adapter in specs]
        for job in jobs:
            job.future.set_running_or_notify_cancel()
        try:
            return generate_batch(service.model, service.tokenizer, registry.model_lock, jobs)
        finally:
            for job in jobs:
                if job.entry is not None:
                    registry.release(job.entry)

    kept = []
    hook = service.model.register_forward_pre_hook(
        lambda _m, _args, kwargs: kept.append(kwargs.get("logits_to_keep")), with_kwargs=True)
    try:
        together = run(reqs)
        alone = [run([spec])[0] for spec in reqs]
    finally:
        hook.remove()
    assert kept[0] is None and kept.count(1) == 2  # the batch's prefill, then those of rows 1 and 2 alone
    for got, want in zip(together, alone):
        assert got["text"] == want["text"] and got.keys() == want.keys()
        for key in ("logprobs", "prompt_logprobs"):
            for a, b in zip(got.get(key) or [], want.get(key) or []):
                assert a.token == b.token and [t for t, _ in a.top] == [t for t, _ in b.top]
                assert a.logprob == b.logprob is None or abs(a.logprob - b.logprob) < 1e-5
    assert len(together[0]["prompt_logprobs"]) == 2 and len(together[0]["logprobs"]) == 3
    assert "logprobs" not in together[1] and "prompt_logprobs" not in together[1]
    assert len(together[2]["logprobs"]) == 2 and all(s.top == [] for s in together[2]["logprobs"])
    assert together[3]["tokens"] == 0 and len(together[3]["prompt_logprobs"]) == 6


def test_over_http_a_short_request_joins_a_long_generation_and_is_answered_first(gen_client):
    """The server's wiring of continuous batching: a request that arrives while a 16-token generation decodes
    (each forward slowed to 50 ms) is answered while that one still runs, not after it."""
    service = gen_client.service
    for adapter in ("chat", "poet"):  # loaded first: loading takes the model lock, which a running batch holds
        assert gen_client.post("/v1/generate", json={"prompt": "hi", "adapter": adapter,
                                                     "max_new_tokens": 1}).status_code == 200
    forwards = []

    def slow(_module, _args, kwargs):
        forwards.append(kwargs["input_ids"].shape[0])
        time.sleep(0.05)

    hook = service.model.register_forward_pre_hook(slow, with_kwargs=True)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            long = pool.submit(gen_client.post, "/v1/generate",  # greedy: 16 tokens without the stop token
                               json={"prompt": "the plot was", "adapter": "poet", "max_new_tokens": 16})
            _wait(lambda: len(forwards) >= 3, "the long generation to be decoding")
            short = gen_client.post("/v1/generate", json={"prompt": "the movie", "adapter": "chat",
                                                          "max_new_tokens": 2})
            assert short.status_code == 200 and short.json()["tokens"] <= 2
            assert not long.done()
            assert long.result(timeout=60).json()["tokens"] == 16
    finally:
        hook.remove()
    assert 2 in forwards  # the two decoded in one batch


def test_stop_texts_end_the_answer_before_them_also_across_tokens_and_in_streams(gen_client):
    """``stop``: the answer ends before the first stop text it would contain, one that spans two tokens
    included; streamed deltas hold back a tail that may still become a stop text, so it never shows."""
    body = {"prompt": "the movie", "max_new_tokens": 14}
    free = gen_client.post("/v1/generate", json=body).json()["text"]
    words = free.split(" ")
    spanning = f"{words[2][-1]} {words[3][0]}"  # the end of one word and the start of the next
    for stop in ([words[4]], [spanning], ["never there", words[5]]):
        cut = min(free.find(s) for s in stop if s in free)
        got = gen_client.post("/v1/generate", json={**body, "stop": stop}).json()
        assert (got["text"], got["finish_reason"]) == (free[:cut], "stop"), stop
        with gen_client.stream("POST", "/v1/generate", json={**body, "stop": stop, "stream": True}) as r:
            events = [e for e in r.read().decode().split("\n\n") if e.strip()]
        deltas = [json.loads(e.removeprefix("data: "))["delta"] for e in events if e.startswith("data: ")]
        assert "".join(deltas) == free[:cut] and all(not any(s in d for s in stop) for d in deltas)
    too_many = gen_client.post("/v1/generate", json={**body, "stop": ["a", "b", "c", "d", "e"]})
    assert too_many.status_code == 422 and too_many.json()["detail"][0]["loc"] == ["body", "stop"]
