"""The HTTP API of ``lorafit serve`` (FastAPI).

    GET    /health                      liveness and what is served
    GET    /v1/adapters                 name, rank, size, loaded, pinned, hits of every adapter
    POST   /v1/adapters                 {"name", "pin"?}: load or reload (Authorization: Bearer TOKEN)
    DELETE /v1/adapters/{name}          unload (Authorization: Bearer TOKEN)
    POST   /v1/classify                 {"texts": [...], "text_pairs": [...]|null, "adapter": name|null} or
                                         {"conversations": [[{"role", "content"}, ...], ...], "adapter"}
                                         -> labels and probabilities (a one-output head: its score)
    POST   /v1/generate                 {"prompt" | "messages", "adapter", "max_new_tokens", "temperature",
                                         "top_p", "seed", "stop", "stream"} -> text (server-sent events if
                                         stream); the text ends before the first "stop" string it would hold
    GET    /metrics                     Prometheus text format (OpenMetrics if the Accept header asks)
    GET    /v1/models, POST /v1/completions, POST /v1/chat/completions: OpenAI's API (openai_api.py)

Errors: 401 bad or missing token, 403 load/unload disabled (no token at start-up),
404 unknown adapter, 400 corrupt adapter files, 413 body too large, 422 malformed
JSON (NaN and Infinity included), wrong types or values over a limit (FastAPI's
``detail`` list names the field), 503 busy, timed out or shutting down (with
``Retry-After`` when trying again can help). A request whose client disconnects
before its answer is dropped: not computed if still queued, a generation stopped
at its next token (logged as 499).
"""

import asyncio
import contextlib
import hmac
import json
import time
from dataclasses import dataclass, replace
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client.exposition import choose_encoder
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.routing import Match

from lorafit.chat import render
from lorafit.serve.engine import (
    CHARS_PER_TOKEN,
    Batcher,
    ClassifyRow,
    GenerateRequest,
    Job,
    QueueFull,
    classify_batch,
    conversation_row,
    generate_batch,
)
from lorafit.serve.metrics import Metrics
from lorafit.serve.registry import AdapterError, AdapterNotFound, AdapterRegistry, BadAdapter, BadName, check_name

ADAPTER_ERROR_STATUS = {AdapterNotFound: 404, BadAdapter: 400, BadName: 422}


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_texts: int = 64
    max_text_tokens: int = 256  # classification inputs are truncated to this many tokens
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 256
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 1024  # rows waiting for a batch; beyond them requests get 503
    request_timeout_s: float = 120.0  # from queueing to the last token


class Service:
    """Everything a running server holds: model, tokenizer, registry, batcher, metrics."""

    def __init__(self, model, tokenizer, task: Literal["classify", "generate"], registry: AdapterRegistry,
                 limits: Limits | None = None, token: str | None = None, model_name: str = "") -> None:
        self.model, self.tokenizer, self.task, self.registry = model, tokenizer, task, registry
        self.limits = limits or Limits()
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if task == "classify" and isinstance(positions, int) and self.limits.max_text_tokens > positions:
            # a longer text cut at max_text_tokens would index past the position embeddings: a 500
            self.limits = replace(self.limits, max_text_tokens=positions)
        self.token = token
        self.model_name = model_name
        self.metrics = Metrics()
        lock = registry.model_lock
        if task == "classify":
            def run(jobs):
                return classify_batch(model, tokenizer, lock, self.limits.max_text_tokens, jobs)
        else:
            def run(jobs):  # requests that come while it decodes join it (continuous batching)
                return generate_batch(model, tokenizer, lock, jobs, more=lambda room: self.batcher.take_more(
                    jobs[0].head, room), max_rows=self.limits.max_batch)
        self.batcher = Batcher(run, registry, max_batch=self.limits.max_batch,
                               max_wait=self.limits.max_wait_ms / 1000, max_queue=self.limits.max_queue,
                               on_batch=self.metrics.observe_batch)
        self.metrics.watch(registry, self.batcher.pending)
        self.started = time.time()

    def close(self) -> None:
        self.batcher.close()

    async def acquire(self, name: str | None):
        return None if name is None else await run_in_threadpool(self.registry.acquire, name)

    async def run(self, job: Job, request: Request | None = None):
        """``job``'s result, once its batch has run; 503 if the queue is full, shutting down or too slow.
        With ``request``, a client that disconnects first gets its job dropped (499, which nobody reads)."""
        return (await self.run_all([job], request))[0]

    async def run_all(self, jobs: list[Job], request: Request | None = None) -> list:
        """The results of ``jobs``, queued together (so that they can share batches), as ``run``'s: the first
        error ends the request and drops the jobs still to run."""
        futures = []
        try:
            for job in jobs:
                futures.append(self.batcher.submit(job))
        except RuntimeError as exc:
            for job in jobs[len(futures):]:
                if job.entry is not None:
                    self.registry.release(job.entry)
            for job in jobs[:len(futures)]:
                self.batcher.cancel(job)
            headers = {"Retry-After": "1"} if isinstance(exc, QueueFull) else None
            raise HTTPException(503, str(exc), headers=headers) from None
        result = asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        gone = asyncio.ensure_future(_disconnect(request)) if request is not None else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.request_timeout_s
        waiting = {result, gone} - {None}
        try:
            while True:
                done, _ = await asyncio.wait(waiting, timeout=max(0.0, deadline - loop.time()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if result in done:
                    return result.result()
                if not done:
                    raise HTTPException(503, f"the request did not finish within "
                                             f"{self.limits.request_timeout_s:g} s", headers={"Retry-After": "5"})
                if gone.exception() is None:
                    self.metrics.observe_cancelled("request")
                    raise HTTPException(499, "the client closed the connection before the answer")
                waiting = {result}  # the connection cannot be watched: wait for the answer alone
        finally:
            if gone is not None:
                gone.cancel()
            result.cancel()  # no one waits for it now: a later error of the batch is not "never retrieved"
            for job in jobs:
                self.batcher.cancel(job)  # a no-op once done; else (timed out, client gone) dropped or stopped


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects. The body has been read, so the next ASGI message is
    ``http.disconnect``: from the server when the connection drops, or once the response is sent."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


AdapterName = Annotated[str, AfterValidator(check_name)]


class AdapterLoad(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: AdapterName
    pin: bool | None = None


class Message(BaseModel):
    role: str = Field(max_length=32)
    content: str


class ClassifyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[str] | None = Field(default=None, min_length=1)  # at most limits.max_texts
    text_pairs: list[str] | None = None  # each text's second text, for adapters trained on pairs
    # instead of texts: chat conversations (a reward model's prompt and response), rendered as training rendered them
    conversations: list[Annotated[list[Message], Field(min_length=1, max_length=256)]] | None = Field(
        default=None, min_length=1)
    adapter: AdapterName | None = None


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str | None = None
    messages: list[Message] | None = Field(default=None, min_length=1, max_length=256)
    adapter: AdapterName | None = None
    max_new_tokens: int | None = Field(default=None, ge=0)  # at most limits.max_new_tokens; None: up to 64
    temperature: float = Field(default=0.0, ge=0.0, le=10.0)  # 0: greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(default=None, max_length=4)
    stream: bool = False


def _invalid(field: str, msg: str) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors."""
    return HTTPException(422, [{"loc": ["body", field], "msg": msg, "type": "value_error"}])


class FiniteJSONRequest(Request):
    async def json(self):
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), parse_constant=_refuse_constant)
        return self._json


def _refuse_constant(name: str):
    # Python's json reads NaN and Infinity, JSON has neither: such a number would reach the model,
    # or fail the rendering of the error response itself (a 500)
    raise HTTPException(422, [{"loc": ["body"], "msg": "JSON decode error", "type": "json_invalid",
                               "ctx": {"error": f"{name} is not a JSON number; send finite numbers"}}])


class FiniteJSONRoute(APIRoute):
    def get_route_handler(self):
        handler = super().get_route_handler()

        async def finite_json(request: Request):
            return await handler(FiniteJSONRequest(request.scope, request.receive))

        return finite_json


def service_of(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(service_of)]
router = APIRouter(route_class=FiniteJSONRoute)


def require_token(service: ServiceDep, authorization: Annotated[str | None, Header()] = None) -> None:
    if service.token is None:
        raise HTTPException(403, "loading and unloading adapters is disabled: start the server with --token")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), service.token.encode()):
        raise HTTPException(401, "missing or wrong token (send 'Authorization: Bearer <token>')",
                            headers={"WWW-Authenticate": "Bearer"})


@router.get("/health")
def health(service: ServiceDep):
    return {"status": "ok", "task": service.task, "model": service.model_name,
            "adapters_loaded": len(service.registry.loaded()), "uptime_s": round(time.time() - service.started, 1)}


@router.get("/v1/adapters")
def list_adapters(service: ServiceDep):
    return {"adapters": service.registry.describe()}


@router.post("/v1/adapters", dependencies=[Depends(require_token)])
async def load_adapter(body: AdapterLoad, service: ServiceDep):
    start = time.perf_counter()
    entry = await run_in_threadpool(service.registry.load, body.name, pin=body.pin)
    return {"name": entry.name, "rank": entry.rank, "size_bytes": entry.nbytes, "pinned": entry.pinned,
            "sha256": entry.digest, "load_ms": round(1000 * (time.perf_counter() - start), 2)}


@router.delete("/v1/adapters/{name}", dependencies=[Depends(require_token)])
def unload_adapter(name: Annotated[str, Path(max_length=200)], service: ServiceDep):
    if not service.registry.unload(name):
        raise HTTPException(404, f"adapter {name!r} is not loaded")
    return {"name": name, "unloaded": True}


@router.post("/v1/classify")
async def classify(body: ClassifyBody, service: ServiceDep, request: Request):
    if service.task != "classify":
        raise HTTPException(404, f"this server does {service.task}, not classification")
    if (body.texts is None) == (body.conversations is None):
        raise _invalid("texts", "give either texts or conversations")
    field, items = ("texts", body.texts) if body.texts is not None else ("conversations", body.conversations)
    if len(items) > service.limits.max_texts:
        raise _invalid(field, f"{len(items)} {field}; allowed up to {service.limits.max_texts}")
    if body.text_pairs is not None:
        if body.texts is None:
            raise _invalid("text_pairs", "goes with texts, not with conversations")
        if len(body.text_pairs) != len(body.texts):
            raise _invalid("text_pairs", f"{len(body.text_pairs)} second texts for {len(body.texts)} texts; give "
                           "one for each")
    if body.texts is not None:
        rows = [ClassifyRow(text, pair) for text, pair in zip(body.texts, body.text_pairs or [None] * len(items))]
    else:  # chat templates are the tokenizer's work: off the event loop
        rows = await run_in_threadpool(lambda: [conversation_row(service.tokenizer, [m.model_dump() for m in chat])
                                                for chat in body.conversations])
    entry = await service.acquire(body.adapter)
    results = await service.run(Job(rows=len(rows), payload=rows, entry=entry), request)
    return {"adapter": body.adapter, "results": results}


@router.post("/v1/generate")
async def generate(body: GenerateBody, service: ServiceDep, request: Request):
    if service.task != "generate":
        raise HTTPException(404, f"this server does {service.task}, not generation")
    req = await _generate_request(service, body)
    entry = await service.acquire(body.adapter)
    if body.stream:
        return StreamingResponse(_events(service, body.adapter, Job(rows=1, payload=req, entry=entry)),
                                 media_type="text/event-stream")
    result = await service.run(Job(rows=1, payload=req, entry=entry), request)
    return {"adapter": body.adapter, **result}


async def _generate_request(service: Service, body: GenerateBody, ids: list[int] | None = None) -> GenerateRequest:
    """The request ``body`` asks for; ``ids``: a prompt given as token ids (body's prompt and messages unset)."""
    limits, tokenizer = service.limits, service.tokenizer
    field = "messages" if body.messages else "prompt"
    if ids is None and (body.prompt is None) == (body.messages is None):
        raise _invalid("prompt", "give exactly one of prompt and messages")
    max_new_tokens = min(64, limits.max_new_tokens) if body.max_new_tokens is None else body.max_new_tokens
    if max_new_tokens > limits.max_new_tokens:
        raise _invalid("max_new_tokens", f"{max_new_tokens}; allowed up to {limits.max_new_tokens}")
    if ids is None:
        chars = len(body.prompt) if body.prompt is not None else sum(len(m.content) for m in body.messages)
        if chars > limits.max_prompt_tokens * CHARS_PER_TOKEN:  # surely too many tokens: not worth tokenizing
            raise _invalid(field, f"the prompt has {chars} characters; allowed up to "
                                  f"{limits.max_prompt_tokens * CHARS_PER_TOKEN} ({limits.max_prompt_tokens} tokens)")
        ids = await run_in_threadpool(_prompt_ids, tokenizer, body.prompt, body.messages)  # off the event loop
    else:
        # an id past the embedding would fail in the forward: a 500, and on a GPU a broken CUDA context
        vocabulary = service.model.get_input_embeddings().num_embeddings
        if bad := [i for i in ids if not 0 <= i < vocabulary]:
            raise _invalid(field, f"token id {bad[0]} is not in the model's vocabulary of {vocabulary} tokens")
    if len(ids) > limits.max_prompt_tokens or not ids:
        raise _invalid(field, f"the prompt has {len(ids)} tokens; allowed 1..{limits.max_prompt_tokens}")
    stop = {t for t in [tokenizer.eos_token_id] if t is not None}
    return GenerateRequest(ids=ids, max_new_tokens=max_new_tokens, temperature=body.temperature,
                           top_p=body.top_p, seed=body.seed, stop_ids=frozenset(stop),
                           stop_texts=tuple(body.stop or ()))


async def _generation(service: Service, job: Job):
    """A streamed generation as it comes: ``("delta", new text, the scores of its tokens)`` items (the scores
    empty unless the request asks for logprobs; a delta's text may be empty where its tokens wrote nothing),
    then ``("done", result)`` or ``("error", status, detail)``. If the consumer stops early (the client has
    gone; close it with ``contextlib.aclosing``), the generation stops at its next token."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def deliver(_row, text, scored):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (text, scored))
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass

    job.on_token = deliver
    task = asyncio.ensure_future(service.run(job))
    task.add_done_callback(lambda _t: queue.put_nowait(None))
    sent, scored, passed = "", [], 0  # the text and the scores sent, those waiting for their text
    try:
        # the engine holds back a tail that may become a stop text or is an unfinished character, for a piece
        # once sent cannot be taken back
        while (item := await queue.get()) is not None:
            text, new = item
            scored += new
            if len(text) > len(sent) and text.startswith(sent):
                yield "delta", text[len(sent):], scored
                sent, passed, scored = text, passed + len(scored), []
        try:
            result = task.result()
        except HTTPException as exc:
            yield "error", exc.status_code, exc.detail
            return
        except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
            yield "error", 500, str(exc)
            return
        rest = result["text"][len(sent):] if result["text"].startswith(sent) else ""
        left = result.get("logprobs", [])[passed:]
        if rest or left:
            yield "delta", rest, left
        yield "done", result
    finally:
        if not task.done():  # the client has gone
            service.batcher.cancel(job)
            service.metrics.observe_cancelled("stream")


async def _events(service: Service, adapter: str | None, job: Job):
    """Server-sent events: a ``delta`` per new piece of text, then ``done`` (or ``error``)."""
    async with contextlib.aclosing(_generation(service, job)) as pieces:
        async for kind, *value in pieces:
            if kind == "delta":
                if value[0]:  # not a delta of scores only: this stream sends the scores with done
                    yield f"data: {json.dumps({'delta': value[0]})}\n\n"
            elif kind == "error":
                yield f"event: error\ndata: {json.dumps({'status': value[0], 'detail': value[1]})}\n\n"
            else:
                yield f"event: done\ndata: {json.dumps({'adapter': adapter, **value[0]})}\n\n"


@router.get("/metrics")
def prometheus(service: ServiceDep, request: Request):
    # the format the scraper asks for (Prometheus text or OpenMetrics), as prometheus_client's own server does
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(service.metrics.registry), media_type=content_type)


async def adapter_error(_request, exc: AdapterError):
    return JSONResponse({"detail": str(exc)}, status_code=ADAPTER_ERROR_STATUS[type(exc)])


def create_app(service: Service) -> "Gate":
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        # uvicorn has stopped accepting and waited for in-flight requests; finish queued batches, stop the worker
        await run_in_threadpool(service.close)

    app = FastAPI(title="lorafit serve", version="0.1.0", lifespan=lifespan)
    app.state.service = service
    app.include_router(router)
    from lorafit.serve.openai_api import router as openai_router  # here: it builds on this module's routes

    app.include_router(openai_router)
    for error in ADAPTER_ERROR_STATUS:
        app.add_exception_handler(error, adapter_error)
    return Gate(app, service.limits.max_body_bytes, service.metrics, [*router.routes, *openai_router.routes])


def _prompt_ids(tokenizer, prompt: str | None, messages: list[Message] | None) -> list[int]:
    if messages is not None:  # rendered as lorafit train renders a prompt (chat.render)
        prompt = render(tokenizer, [m.model_dump() for m in messages], generation_prompt=True)
    return tokenizer(prompt, add_special_tokens=messages is None)["input_ids"]


class Gate:
    """ASGI wrapper: a request body over ``limit`` bytes gets 413 before the app reads it, and every
    response, 413s included, is counted in ``metrics`` by method and status, and by which of ``routes``
    it matched."""

    def __init__(self, app: FastAPI, limit: int, metrics: Metrics, routes: list) -> None:
        self.app, self.limit, self.metrics, self.routes = app, limit, metrics, routes
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500  # 500 unless a response starts

        async def counted_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._limited(scope, receive, counted_send)
        finally:
            self.metrics.observe(scope["method"], self._route(scope), status, time.perf_counter() - start)

    async def _limited(self, scope, receive, send):
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                chunks.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._reject(send)
            chunks.append(message)
            if not message.get("more_body"):
                break
        replay = iter(chunks)

        async def replayed():
            try:
                return next(replay)
            except StopIteration:
                return await receive()

        return await self.app(scope, replayed, send)

    def _route(self, scope) -> str:
        route = scope.get("route")  # set by the router; not for a request refused before it
        if route is None:
            route = next((r for r in self.routes if r.matches(scope)[0] == Match.FULL), None)
        return getattr(route, "path", None) or "unmatched"

    async def _reject(self, send):
        body = json.dumps({"detail": f"request body is larger than {self.limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
