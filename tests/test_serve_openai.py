"""`lorafit serve`'s OpenAI-compatible routes, driven by OpenAI's own Python SDK (strict response validation:
every response and stream chunk must parse as OpenAI's types) and checked against /v1/generate."""

import asyncio
import json

import pytest

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
    for field, value in [("n", 2), ("logprobs", True), ("presence_penalty", 0.5),
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
    for body, field in [({"model": "chat", "prompt": ["a", "b"]}, "prompt"), ({"model": "chat"}, "prompt"),
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
