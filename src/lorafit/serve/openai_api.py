"""OpenAI-compatible routes of ``lorafit serve``: clients written for OpenAI's API (its SDKs, and the tools
built on them) talk to a generation server by pointing their base URL at ``http://HOST:PORT/v1``.
``model`` names an adapter of the directory, as vLLM's LoRA serving does, or the base model by the name
``/health`` reports (which wins over an adapter of the same name).

    GET  /v1/models             the base model, then every adapter
    POST /v1/completions        {"model", "prompt" (a text, token ids, or a list of either), "max_tokens" (16),
                                 "temperature" (1), "top_p", "seed", "stop", "n" (1), "logprobs" (0..20),
                                 "echo", "stream", "stream_options"}
    POST /v1/chat/completions   {"model", "messages", "max_completion_tokens" | "max_tokens" (the server's
                                 limit), "temperature" (1), "top_p", "seed", "stop", "n" (1), "logprobs",
                                 "top_logprobs" (0..20), "stream", "stream_options"}

Defaults are OpenAI's. Requests go through the same batching, limits and errors as ``/v1/generate``; a
request's prompts and choices are queued together, so they share batches. Log-probabilities are the model's
(before temperature and top-p). ``echo`` with ``logprobs`` scores the prompt's tokens too, which is how
evaluation harnesses (lm-evaluation-harness's ``local-completions``) compute a model's log-likelihood of a
text: ``max_tokens`` 0 scores the prompt alone. What lorafit does not compute is refused with a 422 naming
the field (penalties, logit biases, tools, a response format other than text, ``best_of``, ``suffix``,
``echo`` in a stream); other fields are accepted and ignored (``user``, ``metadata``, ...). Streams are
server-sent events of OpenAI's chunks, ending with ``data: [DONE]``; with ``logprobs``, a chunk carries the
log-probabilities of the tokens whose text it brings (a token that ends in an unfinished character or in what
may become a stop text waits for the chunk that completes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import replace
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from lorafit.serve.app import (ADAPTER_ERROR_STATUS, FiniteJSONRoute, GenerateBody, Message, ServiceDep, Service,
                               _generate_request, _generation, _invalid)
from lorafit.serve.engine import GenerateRequest, Job, Scored
from lorafit.serve.registry import AdapterError, AdapterNotFound, check_name


class OpenAIRoute(FiniteJSONRoute):
    """Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, which its SDKs show to the
    user (they show only the status for any other body); the status codes are the rest of the API's."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def openai_errors(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return _error(422, exc.errors())
            except HTTPException as exc:
                return _error(exc.status_code, exc.detail, exc.headers)
            except AdapterError as exc:
                return _error(ADAPTER_ERROR_STATUS[type(exc)], str(exc),
                              code="model_not_found" if isinstance(exc, AdapterNotFound) else None, param="model")

        return openai_errors


def _error(status: int, detail: Any, headers: dict | None = None, code: str | None = None,
           param: str | None = None) -> JSONResponse:
    if isinstance(detail, list):  # validation errors: each names its field by its location in the body
        fields = [str(e["loc"][1]) for e in detail if len(e.get("loc", ())) > 1 and e["loc"][0] == "body"]
        param = param or (fields[0] if fields else None)
        detail = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', [])[1:]) or 'body'}: {e.get('msg')}"
                           for e in detail)
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": str(detail), "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


router = APIRouter(route_class=OpenAIRoute)

# fields OpenAI defines that change what is computed, with the values that mean "not used" (a body that
# declares the field itself checks it: echo and logprobs are the completions', top_logprobs the chat's)
_UNSUPPORTED: dict[str, tuple] = {
    "best_of": (None, 1), "top_logprobs": (None, 0), "echo": (None, False),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []),
    "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}), "suffix": (None, ""),
}
# lorafit's field names in /v1/generate's errors, as this API calls them
_FIELDS = {"max_new_tokens": "max_tokens", "adapter": "model"}
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's chat API allows


StopText = Annotated[str, Field(max_length=200)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI's other fields: checked by _refuse_unsupported
    model: str = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=10.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: StopText | list[StopText] | None = Field(default=None, max_length=4)
    n: int = Field(default=1, ge=1)  # choices per prompt; with a seed, choice j samples with seed + j
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionBody(_Common):
    # a text, texts, token ids (as evaluation harnesses send them, tokenized their way) or lists of them
    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: not used
    role: str = Field(max_length=32)
    content: str | list[TextPart] | None = None  # None: an assistant turn that only called tools

    def plain(self) -> Message:
        """As the chat template takes it: the text parts joined, OpenAI's "developer" role as "system"."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return Message(role="system" if self.role == "developer" else self.role, content=text)


class ChatBody(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)


def _refuse_unsupported(body: _Common) -> None:
    extra = body.model_extra or {}
    for field, off in _UNSUPPORTED.items():
        if field in extra and extra[field] not in off:
            raise _invalid(field, f"{extra[field]!r}: lorafit serve does not support {field}; leave it out")


def _adapter(service: Service, model: str) -> str | None:
    """The adapter ``model`` names (a bad name: 422), or None for the base model."""
    return None if model == service.model_name else check_name(model)


@router.get("/v1/models")
def models(service: ServiceDep):
    created = int(service.started)
    base = {"id": service.model_name, "object": "model", "created": created, "owned_by": "lorafit"}
    adapters = [{"id": row["name"], "object": "model", "created": created, "owned_by": "lorafit",
                 "parent": service.model_name} for row in service.registry.describe()]
    return {"object": "list", "data": [base, *adapters]}


@router.post("/v1/completions")
async def completions(body: CompletionBody, service: ServiceDep, request: Request):
    prompt = body.prompt
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        prompt = [prompt]
    prompts = [{"prompt": p} if isinstance(p, str) else {"ids": p} for p in prompt]
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    return await _answer(service, request, body, "text_completion", max_tokens, prompts, body.logprobs, body.echo)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatBody, service: ServiceDep, request: Request):
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:
        max_tokens = service.limits.max_new_tokens
    if body.top_logprobs is not None and not body.logprobs:
        raise _invalid("top_logprobs", "top_logprobs needs logprobs set to true")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return await _answer(service, request, body, "chat.completion", max_tokens,
                         [{"messages": [m.plain() for m in body.messages]}], logprobs)


async def _answer(service: Service, request: Request, body: _Common,
                  kind: Literal["text_completion", "chat.completion"], max_tokens: int, prompts: list[dict],
                  logprobs: int | None, echo: bool = False):
    """Every choice of every prompt (each prompt's ``n`` in a row, as OpenAI orders them), batched together."""
    if service.task != "generate":
        raise HTTPException(404, f"this server does {service.task}, not generation")
    _refuse_unsupported(body)
    if len(prompts) * body.n > service.limits.max_texts:
        raise _invalid("n", f"{len(prompts)} prompts x n={body.n} choices; allowed up to "
                            f"{service.limits.max_texts} a request (lorafit serve --max-texts)")
    if body.stream and echo:
        raise _invalid("echo", "not available with stream; leave it out or set stream to false")
    adapter = _adapter(service, body.model)
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    common = GenerateBody(adapter=adapter, max_new_tokens=max_tokens, temperature=body.temperature,
                          top_p=body.top_p, seed=body.seed, stop=[t for t in stop or [] if t] or None)
    try:
        reqs = [await _generate_request(service, common.model_copy(update={k: v for k, v in p.items() if k != "ids"}),
                                        p.get("ids")) for p in prompts]
    except HTTPException as exc:
        for error in exc.detail if isinstance(exc.detail, list) else []:
            error["loc"] = [_FIELDS.get(part, part) for part in error["loc"]]
        raise
    choices = [(p, replace(req, seed=None if body.seed is None else (body.seed + j) % 2**63, logprobs=logprobs,
                           echo=echo))
               for p, req in zip(prompts, reqs) for j in range(body.n)]
    jobs = [Job(rows=1, payload=req, entry=await service.acquire(adapter)) for _, req in choices]
    head = {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()), "model": body.model}
    prompt_tokens = sum(len(req.ids) for req in reqs)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_chunks(service, jobs, [req for _, req in choices], head, kind, prompt_tokens,
                                         include_usage), media_type="text/event-stream")
    results = await service.run_all(jobs, request)
    # decoding every scored token (and its alternatives) is the tokenizer's work: off the event loop
    out = await run_in_threadpool(_choices, service.tokenizer, kind, choices, results, logprobs, echo)
    usage = _usage(prompt_tokens, sum(r["tokens"] for r in results))
    return {**head, "object": kind, "choices": out, "usage": usage}


def _choices(tokenizer, kind: str, choices: list[tuple[dict, GenerateRequest]], results: list[dict],
             logprobs: int | None, echo: bool) -> list[dict]:
    out = []
    for index, ((prompt, req), result) in enumerate(zip(choices, results)):
        choice = {"index": index, "finish_reason": _finish(result["finish_reason"])}
        # an echo scores the prompt's tokens from the first; else the scored tokens follow the prompt
        before, scored = ([], [*result["prompt_logprobs"], *result.get("logprobs", [])]) if echo else \
            (req.ids, result.get("logprobs", []))
        if kind == "chat.completion":
            choice["message"] = {"role": "assistant", "content": result["text"]}
            choice["logprobs"] = None if logprobs is None else _chat_logprobs(tokenizer, before, scored)
        else:
            text = result["text"]
            if echo:
                text = prompt.get("prompt", tokenizer.decode(req.ids)) + text
            logs = None if logprobs is None else _completion_logprobs(tokenizer, before, scored)
            choice.update(text=text, logprobs=logs)
        out.append(choice)
    return out


def _pieces(tokenizer, context: list[int], tokens: list[int]) -> list[str]:
    """Each of ``tokens``' text where it follows the few tokens of ``context`` (tokenizers that mark a word's
    start, such as SentencePiece's, drop that space in a token decoded alone)."""
    start = len(tokenizer.decode(context, skip_special_tokens=False).rstrip("\ufffd")) if context else 0
    return [tokenizer.decode([*context, token], skip_special_tokens=False)[start:] for token in tokens]


def _scored_tokens(tokenizer, before: list[int], scored: list[Scored]) -> list[tuple[Scored, str, list[str]]]:
    """Scored tokens that follow the ids ``before``, each with its text and its alternatives'."""
    ids = [*before, *(s.token for s in scored)]
    out = []
    for j, s in enumerate(scored, start=len(before)):
        text, *alternatives = _pieces(tokenizer, ids[max(0, j - 4):j], [s.token, *(t for t, _ in s.top)])
        out.append((s, text, alternatives))
    return out


def _completion_logprobs(tokenizer, before: list[int], scored: list[Scored], offset: int = 0) -> dict:
    """The completions API's log-probabilities of tokens that follow ``before``: ``text_offset`` counts
    characters from the start of the choice's text, where these tokens' first is at ``offset``; a token's
    ``top_logprobs`` holds the ``logprobs`` likeliest and the token itself."""
    tokens = _scored_tokens(tokenizer, before, scored)
    offsets, at = [], offset
    for _, text, _ in tokens:
        offsets.append(at)
        at += len(text)
    top = [None if s.logprob is None else {**{a: lp for a, (_, lp) in zip(alternatives, s.top)}, text: s.logprob}
           for s, text, alternatives in tokens]
    return {"tokens": [text for _, text, _ in tokens], "token_logprobs": [s.logprob for s, _, _ in tokens],
            "top_logprobs": top, "text_offset": offsets}


def _chat_logprobs(tokenizer, before: list[int], scored: list[Scored]) -> dict:
    def entry(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = [{**entry(text, s.logprob), "top_logprobs": [entry(a, lp) for a, (_, lp) in zip(alternatives, s.top)]}
               for s, text, alternatives in _scored_tokens(tokenizer, before, scored)]
    return {"content": content, "refusal": None}


async def _chunks(service: Service, jobs: list[Job], reqs: list[GenerateRequest], head: dict, kind: str,
                  prompt_tokens: int, include_usage: bool):
    """The choices' streams, merged as their pieces come (each chunk names its choice's index); with logprobs,
    a piece's chunk carries its tokens' log-probabilities."""
    chat = kind == "chat.completion"
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    tokenizer = service.tokenizer
    before = [list(req.ids) for req in reqs]  # each choice's ids so far: the context of its next tokens' texts
    offsets = [0] * len(reqs)  # the completions API's text_offset of each choice's next token

    def event(data: dict) -> str:
        return f"data: {json.dumps(data)}\n\n"

    def logprobs_of(index: int, scored: list[Scored]) -> dict | None:
        if reqs[index].logprobs is None:
            return None
        if chat:
            logs = _chat_logprobs(tokenizer, before[index][-4:], scored)
        else:
            logs = _completion_logprobs(tokenizer, before[index][-4:], scored, offsets[index])
            offsets[index] += sum(map(len, logs["tokens"]))
        before[index] += [s.token for s in scored]
        return logs

    def chunk(index: int, piece: str | None, finish: str | None = None, delta: dict | None = None,
              scored: list[Scored] | None = None) -> str:
        logs = None if scored is None else logprobs_of(index, scored)
        if chat:
            choice = {"index": index, "delta": delta or ({} if piece is None else {"content": piece}),
                      "finish_reason": finish}
            if logs is not None:
                choice["logprobs"] = logs
        else:
            choice = {"index": index, "text": piece or "", "logprobs": logs, "finish_reason": finish}
        return event({**head, "choices": [choice]})

    queue: asyncio.Queue = asyncio.Queue()

    async def follow(index: int, job: Job) -> None:
        async with contextlib.aclosing(_generation(service, job)) as pieces:
            async for item in pieces:
                queue.put_nowait((index, item))
        queue.put_nowait((index, None))

    followers = [asyncio.ensure_future(follow(i, job)) for i, job in enumerate(jobs)]
    try:
        if chat:
            for index in range(len(jobs)):
                yield chunk(index, None, delta={"role": "assistant", "content": ""})
        running, completion_tokens = len(jobs), 0
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
                continue
            what, *value = item
            if what == "delta":
                yield chunk(index, value[0], scored=value[1])
            elif what == "error":
                status, detail = value
                message = detail if isinstance(detail, str) else json.dumps(detail)
                yield event({"error": {"message": message, "type": "server_error", "code": status}})
                return
            else:
                completion_tokens += value[0]["tokens"]
                yield chunk(index, None, _finish(value[0]["finish_reason"]))
        if include_usage:
            yield event({**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
    finally:
        for follower in followers:  # the client has gone, or a choice failed: the others stop
            follower.cancel()
    yield "data: [DONE]\n\n"


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
