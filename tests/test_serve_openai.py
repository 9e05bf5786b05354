"""`lorafit serve`'s OpenAI-compatible routes, driven by OpenAI's own Python SDK (strict response validation:
every response and stream chunk must parse as OpenAI's types) and checked against /v1/generate."""

import asyncio
import json

import pytest
import torch

import lorafit

pytest.importorskip("fastapi")
pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
httpx2 = pytest.importorskip("httpx2")

from fastapi.testclient import TestClient  # noqa: E402

from lorafit.serve.app import Limits, create_app  # noqa: E402
from lorafit.serve.server import build_service  # noqa: E402
from tests import serve_models as sm  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    llama = sm.llama_dir(root)
    for i, name in enumerate(["chat", "poet"]):
        sm.make_adapter(llama, root / "adapters" / name, seed=20 + i, r=4)
    service = build_service(str(llama), root / "adapters", token=None,
                            limits=Limits(max_prompt_tokens=24, max_new_tokens=12, max_wait_ms=5))
    app = create_app(service)
    with TestClient(app) as client:  # runs the app's lifespan; the SDK talks to the same app in-process
        yield service, app, client


def ask(app, call, strict: bool = True):
    """Run ``call(client)`` with an AsyncOpenAI client whose requests go to ``app`` in-process."""
    async def run():
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://lorafit") as http:
            client = openai.AsyncOpenAI(base_url="http://lorafit/v1", api_key="unused", http_client=http,
                                        max_retries=0, _strict_response_validation=strict)
            return await call(client)
    return asyncio.run(run())


def generate(client, **body) -> dict:
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_models_lists_the_base_model_then_every_adapter(served):
    service, app, _ = served
    page = ask(app, lambda c: c.models.list())
    assert [m.id for m in page.data] == [service.model_name, "chat", "poet"]
    assert page.data[1].owned_by == "lorafit"


def test_chat_completion_is_generate_s_answer_with_openai_s_shape_and_usage(served):
    service, app, client = served
    messages = [{"role": "system", "content": "the movie"}, {"role": "user", "content": "hello world"}]
    want = generate(client, messages=messages, adapter="poet", max_new_tokens=7, temperature=0)
    got = ask(app, lambda c: c.chat.completions.create(model="poet", messages=messages, max_tokens=7,
                                                       temperature=0))
    assert got.object == "chat.completion" and got.model == "poet" and got.id.startswith("chatcmpl-")
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == want["text"]
    assert got.choices[0].finish_reason == ("length" if want["finish_reason"] == "length" else "stop")
    prompt = service.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_tokens = len(service.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (
        prompt_tokens, want["tokens"], prompt_tokens + want["tokens"])


def test_completion_on_the_base_model_with_openai_s_defaults(served):
    service, app, client = served
    want = generate(client, prompt="hello the movie", max_new_tokens=7, temperature=0)
    got = ask(app, lambda c: c.completions.create(model=service.model_name, prompt="hello the movie",
                                                  max_tokens=7, temperature=0))
    assert got.object == "text_completion" and got.choices[0].text == want["text"]
    assert got.usage.completion_tokens == want["tokens"]
    # OpenAI's defaults: 16 tokens (here the server's limit of 12 refuses it), temperature 1 (sampling)
    with pytest.raises(openai.UnprocessableEntityError, match="max_tokens"):
        ask(app, lambda c: c.completions.create(model="chat", prompt="hello"))
    seeded = [ask(app, lambda c: c.completions.create(model="chat", prompt="hello", max_tokens=10, seed=3))
              .choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1] == generate(client, prompt="hello", adapter="chat", max_new_tokens=10,
                                              temperature=1.0, seed=3)["text"]


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completion"])
def test_streams_are_openai_chunks_that_add_up_to_the_answer(served, chat):
    _, app, client = served
    messages = [{"role": "user", "content": "what is the plot"}]
    body = dict(model="chat", max_tokens=10, temperature=1.3, top_p=0.9, seed=11)
    if chat:
        want = generate(client, messages=messages, adapter="chat", max_new_tokens=10, temperature=1.3, top_p=0.9,
                        seed=11)

        async def call(c):
            stream = await c.chat.completions.create(messages=messages, stream=True,
                                                     stream_options={"include_usage": True}, **body)
            return [chunk async for chunk in stream]
    else:
        want = generate(client, prompt="what is the plot", adapter="chat", max_new_tokens=10, temperature=1.3,
                        top_p=0.9, seed=11)

        async def call(c):
            stream = await c.completions.create(prompt="what is the plot", stream=True,
                                                stream_options={"include_usage": True}, **body)
            return [chunk async for chunk in stream]
    # the SDK types a completion chunk's finish_reason as never null, which OpenAI's API sends until the last
    # chunk (and so does lorafit): that one stream is parsed without the strict check
    chunks = ask(app, call, strict=chat)
    assert len({c.id for c in chunks}) == 1
    *content, usage = chunks
    if chat:
        assert content[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in content)
    else:
        text = "".join(c.choices[0].text for c in content)
    assert text == want["text"] and len(content) > 2
    assert content[-1].choices[0].finish_reason in ("stop", "length")
    assert usage.choices == [] and usage.usage.completion_tokens == want["tokens"]


def test_what_lorafit_does_not_compute_is_refused_naming_the_field(served):
    _, app, client = served
    base = {"model": "chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    for field, value in [("best_of", 2), ("echo", True), ("presence_penalty", 0.5),
                         ("tools", [{"type": "function", "function": {"name": "f"}}])]:
        r = client.post("/v1/chat/completions", json={**base, field: value})
        assert r.status_code == 422 and r.json()["error"]["param"] == field, (field, r.text)
        assert f"does not support {field}" in r.json()["error"]["message"]
    # OpenAI's other fields, and the "not used" values of those above, are accepted
    r = client.post("/v1/chat/completions", json={**base, "user": "u1", "n": 1, "logprobs": False,
                                                  "metadata": {"k": "v"}})
    assert r.status_code == 200, r.text
    # content as OpenAI's text parts, and its "developer" role, are the plain text and "system" of the template
    parts = [{"role": "developer", "content": [{"type": "text", "text": "the "}, {"type": "text", "text": "plot"}]},
             {"role": "user", "content": "hello"}]
    plain = [{"role": "system", "content": "the plot"}, {"role": "user", "content": "hello"}]
    answers = [client.post("/v1/chat/completions", json={**base, "messages": m, "temperature": 0}).json()
               for m in (parts, plain)]
    assert answers[0]["choices"] == answers[1]["choices"] and answers[0]["usage"] == answers[1]["usage"]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]
    assert client.post("/v1/chat/completions", json={**base, "messages": image}).status_code == 422
    r = client.post("/v1/chat/completions", json={**base, "max_tokens": 13})  # the limit is 12
    assert r.status_code == 422 and r.json()["error"]["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError, match="'nope'") as caught:
        ask(app, lambda c: c.chat.completions.create(model="nope", messages=base["messages"]))
    assert caught.value.code == "model_not_found"
    for body, field in [({"model": "chat", "prompt": []}, "prompt"), ({"model": "chat"}, "prompt"),
                        ({"model": "chat", "prompt": "a", "temperature": "hot"}, "temperature"),
                        ({"model": "../x", "prompt": "a"}, "model"),
                        ({"model": "chat", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
                        ({"model": "chat", "prompt": "a", "stop": "x" * 201}, "stop")]:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 422 and r.json()["error"]["param"] == field, (body, r.text)
    stream = client.post("/v1/chat/completions", json={**base, "stream": True})
    events = [e for e in stream.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(json.loads(e[6:])["object"] == "chat.completion.chunk"
                                                for e in events[:-1])


def test_a_classification_server_has_no_completions(tmp_path):
    bert = sm.bert_dir(tmp_path)
    (tmp_path / "adapters").mkdir()
    service = build_service(str(bert), tmp_path / "adapters", token=None)
    with TestClient(create_app(service)) as client:
        r = client.post("/v1/chat/completions", json={"model": "x", "messages": [{"role": "user", "content": "a"}]})
        assert r.status_code == 404
        assert client.get("/v1/models").json()["data"][0]["id"] == str(bert)
    named = build_service(str(bert), tmp_path / "adapters", token=None, model_name="tiny-bert")  # --served-model-name
    with TestClient(create_app(named)) as client:
        assert client.get("/v1/models").json()["data"][0]["id"] == client.get("/health").json()["model"] == "tiny-bert"


def test_stop_strings_end_the_answer_before_them(served):
    """OpenAI's ``stop`` (a string or up to 4): the answer is /v1/generate's with the same stop texts, ending
    before the first of them, with finish_reason "stop"; streamed, the stop text never reaches the client."""
    _, app, client = served
    messages = [{"role": "user", "content": "hello world"}]
    free = generate(client, messages=messages, adapter="poet", max_new_tokens=12, temperature=0)["text"]
    stop = free.split()[3]
    assert free.find(stop) > 0
    want = generate(client, messages=messages, adapter="poet", max_new_tokens=12, temperature=0, stop=[stop])
    assert want["text"] == free[:free.find(stop)] and want["finish_reason"] == "stop"
    got = ask(app, lambda c: c.chat.completions.create(model="poet", messages=messages, max_tokens=12,
                                                       temperature=0, stop=stop))
    assert got.choices[0].message.content == want["text"] and got.choices[0].finish_reason == "stop"

    async def streamed(c):
        stream = await c.chat.completions.create(model="poet", messages=messages, max_tokens=12, temperature=0,
                                                 stop=["zzz", stop], stream=True)
        return [chunk async for chunk in stream]
    chunks = ask(app, streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want["text"]
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completion"])
def test_streamed_logprobs_are_the_answer_s_split_by_the_chunks_that_bring_their_text(served, chat):
    """With logprobs in a stream, each chunk carries the scores of the tokens whose text it brings: joined, they
    are the unstreamed answer's (text_offset included), also where a stop text ends the answer and the tokens
    of the held-back tail that might have become it came later or not at all."""
    _, app, client = served
    messages = [{"role": "user", "content": "what is the plot"}]
    body = dict(model="chat", max_tokens=12, temperature=1.2, seed=5)
    free = generate(client, adapter="chat", max_new_tokens=12, temperature=1.2, seed=5,
                    **({"messages": messages} if chat else {"prompt": "what is the plot"}))["text"]
    words = free.split()
    assert len(words) > 3
    # a stop text that word 1 ends begins holds back the token that ends it, which comes with the next one; the
    # other ends the answer
    for stop in (None, [words[1][-1] + "éé", words[3]]):
        if chat:
            async def call(c, **extra):
                return await c.chat.completions.create(messages=messages, logprobs=True, top_logprobs=2, stop=stop,
                                                       **body, **extra)
        else:
            async def call(c, **extra):
                return await c.completions.create(prompt="what is the plot", logprobs=2, stop=stop, **body, **extra)

        async def streamed(c):
            return [chunk async for chunk in await call(c, stream=True)]
        whole = ask(app, call, strict=chat).choices[0]
        chunks = [c.choices[0] for c in ask(app, streamed, strict=chat) if c.choices]
        if chat:
            want = [t.model_dump() for t in whole.logprobs.content]
            got = [t.model_dump() for c in chunks if c.logprobs for t in c.logprobs.content]
            texts = [(c.delta.content or "", [t.token for t in c.logprobs.content] if c.logprobs else [])
                     for c in chunks]
            assert "".join(text for text, _ in texts) == whole.message.content
        else:
            want = whole.logprobs.model_dump()
            got = {key: [x for c in chunks if c.logprobs for x in getattr(c.logprobs, key)] for key in want}
            texts = [(c.text, c.logprobs.tokens if c.logprobs else []) for c in chunks]
            assert "".join(text for text, _ in texts) == whole.text
        assert got == want and len(want) > 1
        # no token's score comes before its text (the first token reads with the space the prompt puts before
        # it; the last, with the start of the stop text that ended the answer)
        last = max(k for k, (_, tokens) in enumerate(texts) if tokens)
        for k in range(last):
            sent = "".join(text for text, _ in texts[:k + 1]).lstrip()
            assert sent.startswith("".join(t for _, tokens in texts[:k + 1] for t in tokens).lstrip()), texts
        assert any(text and not tokens for text, tokens in texts) == (stop is not None), texts


def reference_logprobs(ids: list[int], adapter_dir) -> torch.Tensor:
    """log p(token | tokens before) of every position of ``ids`` under the base model with the adapter, as a
    model of its own computes them (row j scores the token after position j)."""
    model = sm.load(adapter_dir.parent.parent / "tiny-llama")
    lorafit.load_adapter(model, adapter_dir)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_echo_with_logprobs_scores_the_prompt_as_evaluation_harnesses_need(served):
    """lm-evaluation-harness's ``local-completions`` sends token ids with ``echo``, ``logprobs`` 1 and
    ``max_tokens`` 1 and sums ``token_logprobs`` past the context: those are the adapter's log-likelihoods,
    for prompts of different lengths in one request (one left-padded batch), and the greedy token's is the
    largest of its ``top_logprobs``."""
    service, app, client = served
    prompts = [[2, 5, 9, 13, 21, 8, 30], [2, 17, 4], [2, 6, 6, 11, 12, 13, 14, 15, 16, 4, 5]]
    r = client.post("/v1/completions", json={"model": "poet", "prompt": prompts, "max_tokens": 1, "logprobs": 1,
                                             "echo": True, "temperature": 0})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    for ids, choice in zip(prompts, choices):
        want = reference_logprobs(ids, service.registry.root / "poet")
        logs = choice["logprobs"]
        assert len(logs["token_logprobs"]) == len(logs["tokens"]) == len(logs["text_offset"]) == len(ids) + 1
        assert logs["token_logprobs"][0] is None and logs["top_logprobs"][0] is None
        scored = torch.tensor(logs["token_logprobs"][1:len(ids)])
        torch.testing.assert_close(scored, want[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0],
                                   atol=1e-4, rtol=0)
        assert logs["tokens"][-1].strip() == service.tokenizer.decode([int(want[-1].argmax())])
        assert abs(logs["token_logprobs"][-1] - float(want[-1].max())) < 1e-4
        assert logs["token_logprobs"][-1] == max(logs["top_logprobs"][-1].values())
        for j, top in enumerate(logs["top_logprobs"][1:len(ids)]):  # the likeliest, and the token itself
            assert abs(max(top.values()) - float(want[j].max())) < 1e-4 and len(top) in (1, 2)
        assert logs["text_offset"] == sorted(logs["text_offset"]) and logs["text_offset"][0] == 0
        assert choice["text"].startswith(service.tokenizer.decode(ids))
    # max_tokens 0 scores the prompt alone; a text prompt is tokenized as /v1/generate does (with <s>)
    r = client.post("/v1/completions", json={"model": "poet", "prompt": "hello the movie", "max_tokens": 0,
                                             "logprobs": 0, "echo": True})
    logs = r.json()["choices"][0]["logprobs"]
    ids = service.tokenizer("hello the movie")["input_ids"]
    assert r.json()["choices"][0]["text"] == "hello the movie" and r.json()["usage"]["completion_tokens"] == 0
    want = reference_logprobs(ids, service.registry.root / "poet")
    torch.testing.assert_close(torch.tensor(logs["token_logprobs"][1:]),
                               want[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0], atol=1e-4, rtol=0)
    # through OpenAI's SDK, whose types have no null in token_logprobs, where OpenAI's API (and vLLM) put
    # the first prompt token's: parsed without the strict check
    got = ask(app, lambda c: c.completions.create(model="poet", prompt=prompts[1], max_tokens=2, logprobs=3,
                                                  echo=True, temperature=0), strict=False)
    assert got.choices[0].logprobs.token_logprobs[0] is None and len(got.choices[0].logprobs.tokens) == 5


def test_chat_logprobs_are_the_chosen_tokens_with_top_alternatives(served):
    service, app, client = served
    messages = [{"role": "user", "content": "hello world"}]
    got = ask(app, lambda c: c.chat.completions.create(model="chat", messages=messages, max_tokens=5,
                                                       temperature=0, logprobs=True, top_logprobs=3))
    content = got.choices[0].logprobs.content
    prompt = service.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = service.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    chosen = service.tokenizer(got.choices[0].message.content, add_special_tokens=False)["input_ids"]
    assert len(content) == len(chosen) == got.usage.completion_tokens
    want = reference_logprobs(ids + chosen, service.registry.root / "chat")[len(ids) - 1:-1]
    for j, entry in enumerate(content):
        assert abs(entry.logprob - float(want[j, chosen[j]])) < 1e-4
        assert entry.logprob == entry.top_logprobs[0].logprob  # greedy: the chosen token is the likeliest
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs),
                                                                 reverse=True)
        torch.testing.assert_close(torch.tensor([t.logprob for t in entry.top_logprobs]), want[j].topk(3).values,
                                   atol=1e-4, rtol=0)
        assert bytes(entry.bytes).decode() == entry.token
    assert "".join(e.token for e in content).strip() == got.choices[0].message.content
    # sampled tokens are scored too (the model's log-probabilities, not the tempered ones)
    hot = client.post("/v1/chat/completions", json={"model": "chat", "messages": messages, "max_tokens": 4,
                                                    "temperature": 1.5, "seed": 4, "logprobs": True}).json()
    assert all(e["top_logprobs"] == [] and e["logprob"] < 0 for e in hot["choices"][0]["logprobs"]["content"])


def test_a_stop_text_keeps_the_logprobs_of_the_tokens_up_to_it(served):
    service, _, client = served
    body = {"model": "chat", "prompt": "hello world", "max_tokens": 12, "temperature": 0, "logprobs": 0}
    free = client.post("/v1/completions", json=body).json()["choices"][0]
    stop = free["text"].split()[3]
    cut = client.post("/v1/completions", json={**body, "stop": stop}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == free["text"][:free["text"].find(stop)]
    kept = len(cut["logprobs"]["tokens"])
    assert cut["logprobs"]["token_logprobs"] == free["logprobs"]["token_logprobs"][:kept]
    # the kept tokens reach the stop text, and one fewer would not reach the cut
    assert len("".join(free["logprobs"]["tokens"][:kept]).strip()) >= len(cut["text"])
    assert len("".join(free["logprobs"]["tokens"][:kept - 1]).strip()) < len(cut["text"])


def test_n_choices_of_several_prompts_are_each_a_seeded_generation(served):
    """``n`` choices of each prompt, in OpenAI's order (prompt by prompt); with a seed, choice j samples as
    /v1/generate with seed + j does; usage counts each prompt once. Streamed, the choices' chunks add up to
    the same texts."""
    _, app, client = served
    prompts = ["hello the movie", "what is the plot"]
    body = {"model": "chat", "prompt": prompts, "max_tokens": 6, "temperature": 1.2, "seed": 40, "n": 3}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in r.json()["choices"]]
    want = [generate(client, prompt=p, adapter="chat", max_new_tokens=6, temperature=1.2, seed=40 + j)
            for p in prompts for j in range(3)]
    assert texts == [w["text"] for w in want] and len(set(texts[:3])) > 1
    assert [c["index"] for c in r.json()["choices"]] == list(range(6))
    usage = r.json()["usage"]
    tokenizer = served[0].tokenizer
    assert usage["prompt_tokens"] == sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    assert usage["completion_tokens"] == sum(w["tokens"] for w in want)

    async def streamed(c):
        stream = await c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hello"}],
                                                 max_tokens=6, temperature=1.2, seed=40, n=2, stream=True)
        return [chunk async for chunk in stream]
    chunks = ask(app, streamed)
    chat = client.post("/v1/chat/completions", json={"model": "chat", "messages": [{"role": "user",
                       "content": "hello"}], "max_tokens": 6, "temperature": 1.2, "seed": 40, "n": 2}).json()
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(c.delta.content or "" for c in mine) == chat["choices"][index]["message"]["content"]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason is not None


def test_logprobs_and_choices_refuse_what_they_cannot_do(served):
    service, _, client = served
    chat = {"model": "chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
    completion = {"model": "chat", "prompt": "hello", "max_tokens": 2}
    for path, body, field in [
            ("/v1/chat/completions", {**chat, "top_logprobs": 2}, "top_logprobs"),  # without logprobs
            ("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
            ("/v1/completions", {**completion, "echo": True, "stream": True}, "echo"),
            ("/v1/completions", {**completion, "logprobs": 21}, "logprobs"),
            ("/v1/completions", {**completion, "n": 0}, "n"),
            ("/v1/completions", {**completion, "prompt": ["hello"] * 8, "n": 9}, "n"),  # 72 > --max-texts 64
            ("/v1/completions", {**completion, "prompt": [2, 5, 10_000]}, "prompt"),  # not a token of the model
            ("/v1/completions", {**completion, "prompt": [[2, 5], []]}, "prompt"),
            ("/v1/completions", {**completion, "prompt": [2] * 25}, "prompt")]:  # over max_prompt_tokens 24
        r = client.post(path, json=body)
        assert r.status_code == 422 and r.json()["error"]["param"] == field, (body, r.text)
    assert "10000" in client.post("/v1/completions", json={**completion, "prompt": [2, 10_000]}).json()["error"][
        "message"]
