"""The HTTP API of ``lorafit serve`` (FastAPI).

    GET    /health                      liveness and what is served
    GET    /v1/adapters                 name, rank, size, loaded, pinned, hits of every adapter
    POST   /v1/adapters                 {"name", "pin"?}: load or reload (Authorization: Bearer TOKEN)
    DELETE /v1/adapters/{name}          unload (Authorization: Bearer TOKEN)
    POST   /v1/classify                 {"texts": [...], "adapter": name|null} -> labels and probabilities
    POST   /v1/generate                 {"prompt" | "messages", "adapter", "max_new_tokens", "temperature",
                                         "top_p", "seed", "stream"} -> text (server-sent events if stream)
    GET    /metrics                     Prometheus text format

Errors: 401 bad or missing token, 403 load/unload disabled (no token at start-up),
404 unknown adapter, 400 corrupt adapter files, 413 body too large, 422 malformed
JSON, wrong types or values over a limit (FastAPI's ``detail`` list names the field),
503 shutting down.
"""


import asyncio
import contextlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from lorafit.serve.engine import Batcher, GenerateRequest, Job, classify_batch, generate_batch
from lorafit.serve.metrics import Metrics
from lorafit.serve.registry import NAME, AdapterNotFound, AdapterRegistry, BadAdapter

NAME_PATTERN = f"^{NAME.pattern}$"


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_texts: int = 64
    max_text_tokens: int = 256  # classification inputs are truncated to this many tokens
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 256
    max_batch: int = 32
    max_wait_ms: float = 5.0


class Service:
    """Everything a running server holds: model, tokenizer, registry, batcher, metrics."""

    def __init__(self, model, tokenizer, task: Literal["classify", "generate"], registry: AdapterRegistry,
                 limits: Limits | None = None, token: str | None = None, model_name: str = "") -> None:
        self.model, self.tokenizer, self.task, self.registry = model, tokenizer, task, registry
        self.limits = limits or Limits()
        self.token = token
        self.model_name = model_name
        self.metrics = Metrics()
        lock = registry.model_lock
        if task == "classify":
            def run(jobs):
                return classify_batch(model, tokenizer, lock, self.limits.max_text_tokens, jobs)
        else:
            def run(jobs):
                return generate_batch(model, tokenizer, lock, jobs)
        self.batcher = Batcher(run, registry, max_batch=self.limits.max_batch,
                               max_wait=self.limits.max_wait_ms / 1000, on_batch=self.metrics.observe_batch)
        self.started = time.time()

    def close(self) -> None:
        self.batcher.close()


class AdapterLoad(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN, max_length=200)
    pin: bool | None = None


class Message(BaseModel):
    role: str = Field(max_length=32)
    content: str


def create_app(service: Service) -> FastAPI:
    limits = service.limits
    adapter_field = Field(default=None, pattern=NAME_PATTERN, max_length=200)

    class ClassifyBody(BaseModel):
        model_config = ConfigDict(extra="forbid")
        texts: list[str] = Field(min_length=1, max_length=limits.max_texts)
        adapter: str | None = adapter_field

    class GenerateBody(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prompt: str | None = None
        messages: list[Message] | None = Field(default=None, min_length=1, max_length=256)
        adapter: str | None = adapter_field
        max_new_tokens: int = Field(default=min(64, limits.max_new_tokens), ge=0, le=limits.max_new_tokens)
        temperature: float = Field(default=0.0, ge=0.0, le=10.0)  # 0: greedy
        top_p: float = Field(default=1.0, gt=0.0, le=1.0)
        seed: int | None = Field(default=None, ge=0, lt=2**63)
        stream: bool = False

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        # uvicorn has stopped accepting and waited for in-flight requests; finish queued batches, stop the worker
        await run_in_threadpool(service.close)

    app = FastAPI(title="lorafit serve", version="0.1.0", lifespan=lifespan)
    app.state.service = service
    metrics = service.metrics
    registry = service.registry

    @app.middleware("http")
    async def measure(request: Request, call_next):
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            metrics.observe(request.method, _route(request), 500, time.perf_counter() - start)
            raise
        metrics.observe(request.method, _route(request), response.status_code, time.perf_counter() - start)
        return response

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        if service.token is None:
            raise HTTPException(403, "loading and unloading adapters is disabled: start the server with --token")
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), service.token.encode()):
            raise HTTPException(401, "missing or wrong token (send 'Authorization: Bearer <token>')",
                                headers={"WWW-Authenticate": "Bearer"})

    async def acquire(name: str | None):
        if name is None:
            return None
        try:
            return await run_in_threadpool(registry.acquire, name)
        except AdapterNotFound as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        except BadAdapter as exc:
            raise HTTPException(400, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(422, [{"loc": ["body", "adapter"], "msg": str(exc), "type": "value_error"}]) from None

    async def run(job: Job):
        try:
            future = service.batcher.submit(job)
        except RuntimeError as exc:
            if job.entry is not None:
                registry.release(job.entry)
            raise HTTPException(503, str(exc)) from None
        return await asyncio.wrap_future(future)

    @app.get("/health")
    def health():
        return {"status": "ok", "task": service.task, "model": service.model_name,
                "adapters_loaded": len(registry.loaded()), "uptime_s": round(time.time() - service.started, 1)}

    @app.get("/v1/adapters")
    def list_adapters():
        return {"adapters": registry.describe()}

    @app.post("/v1/adapters", dependencies=[Depends(require_token)])
    async def load_adapter(body: AdapterLoad):
        start = time.perf_counter()
        try:
            entry = await run_in_threadpool(registry.load, body.name, pin=body.pin)
        except AdapterNotFound as exc:
            raise HTTPException(404, str(exc.args[0])) from None
        except BadAdapter as exc:
            raise HTTPException(400, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(422, [{"loc": ["body", "name"], "msg": str(exc), "type": "value_error"}]) from None
        return {"name": entry.name, "rank": entry.rank, "size_bytes": entry.nbytes, "pinned": entry.pinned,
                "sha256": entry.digest, "load_ms": round(1000 * (time.perf_counter() - start), 2)}

    @app.delete("/v1/adapters/{name}", dependencies=[Depends(require_token)])
    def unload_adapter(name: Annotated[str, Path(pattern=NAME_PATTERN, max_length=200)]):
        try:
            unloaded = registry.unload(name)
        except ValueError as exc:
            raise HTTPException(422, [{"loc": ["path", "name"], "msg": str(exc), "type": "value_error"}]) from None
        if not unloaded:
            raise HTTPException(404, f"adapter {name!r} is not loaded")
        return {"name": name, "unloaded": True}

    @app.post("/v1/classify")
    async def classify(body: ClassifyBody):
        if service.task != "classify":
            raise HTTPException(404, f"this server does {service.task}, not classification")
        entry = await acquire(body.adapter)
        results = await run(Job(rows=len(body.texts), payload=body.texts, entry=entry))
        return {"adapter": body.adapter, "results": results}

    @app.post("/v1/generate")
    async def generate(body: GenerateBody):
        if service.task != "generate":
            raise HTTPException(404, f"this server does {service.task}, not generation")
        if (body.prompt is None) == (body.messages is None):
            raise HTTPException(422, [{"loc": ["body", "prompt"], "msg": "give exactly one of prompt and messages",
                                       "type": "value_error"}])
        ids = _prompt_ids(service.tokenizer, body.prompt, body.messages)
        if len(ids) > limits.max_prompt_tokens or not ids:
            raise HTTPException(422, [{"loc": ["body", "messages" if body.messages else "prompt"],
                                       "msg": f"the prompt has {len(ids)} tokens; allowed 1..{limits.max_prompt_tokens}",
                                       "type": "value_error"}])
        stop = {t for t in [service.tokenizer.eos_token_id] if t is not None}
        req = GenerateRequest(ids=ids, max_new_tokens=body.max_new_tokens, temperature=body.temperature,
                              top_p=body.top_p, seed=body.seed, stop_ids=frozenset(stop))
        entry = await acquire(body.adapter)
        if not body.stream:
            result = await run(Job(rows=1, payload=req, entry=entry))
            return {"adapter": body.adapter, **result}

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        sent = {"text": ""}

        def on_token(_row: int, text: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, text)

        job = Job(rows=1, payload=req, entry=entry, on_token=on_token)
        task = asyncio.ensure_future(run(job))
        task.add_done_callback(lambda _t: loop.call_soon_threadsafe(queue.put_nowait, None))

        async def events():
            while True:
                text = await queue.get()
                if text is None:
                    break
                delta, sent["text"] = text[len(sent["text"]):], text
                yield f"data: {json.dumps({'delta': delta})}\n\n"
            try:
                result = task.result()
            except HTTPException as exc:
                yield f"event: error\ndata: {json.dumps({'status': exc.status_code, 'detail': exc.detail})}\n\n"
                return
            except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
                yield f"event: error\ndata: {json.dumps({'status': 500, 'detail': str(exc)})}\n\n"
                return
            yield f"event: done\ndata: {json.dumps({'adapter': body.adapter, **result})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/metrics")
    def prometheus():
        return PlainTextResponse(metrics.render(registry, service.batcher.pending()),
                                 media_type="text/plain; version=0.0.4")

    @app.exception_handler(BadAdapter)
    async def bad_adapter(_request, exc: BadAdapter):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    return BodyLimit(app, limits.max_body_bytes)


def _route(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def _prompt_ids(tokenizer, prompt: str | None, messages: list[Message] | None) -> list[int]:
    if messages is not None:
        chat = [m.model_dump() for m in messages]
        if getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        else:
            prompt = "".join(f"{m['role']}: {m['content']}\n" for m in chat) + "assistant:"
    return tokenizer(prompt, add_special_tokens=messages is None)["input_ids"]


class BodyLimit:
    """ASGI wrapper: a request body over ``limit`` bytes gets 413 before the app reads it."""

    def __init__(self, app: FastAPI, limit: int) -> None:
        self.app, self.limit = app, limit
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
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

    async def _reject(self, send):
        body = json.dumps({"detail": f"request body is larger than {self.limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

