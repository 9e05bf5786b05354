"""OpenAI-compatible routes of ``lorafit serve``: clients written for OpenAI's API (its SDKs, and the tools
built on them) talk to a generation server by pointing their base URL at ``http://HOST:PORT/v1``.
``model`` names an adapter of the directory, as vLLM's LoRA serving does, or the base model by the name
``/health`` reports (which wins over an adapter of the same name).

    GET  /v1/models             the base model, then every adapter
    POST /v1/completions        {"model", "prompt", "max_tokens" (16), "temperature" (1), "top_p", "seed",
                                 "stop", "stream", "stream_options"}
    POST /v1/chat/completions   {"model", "messages", "max_completion_tokens" | "max_tokens" (the server's
                                 limit), "temperature" (1), "top_p", "seed", "stop", "stream",
                                 "stream_options"}

Defaults are OpenAI's. Requests go through the same batching, limits and errors as ``/v1/generate``.
What lorafit does not compute is refused with a 422 naming the field (``n`` > 1, log probabilities,
penalties, logit biases, tools, a response format other than text, ``echo``, ``suffix``);
other fields are accepted and ignored (``user``, ``metadata``, ...). Streams are server-sent events of
OpenAI's chunks, ending with ``data: [DONE]``.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from lorafit.serve.app import (ADAPTER_ERROR_STATUS, FiniteJSONRoute, GenerateBody, Message, ServiceDep, Service,
                               _generate_request, _generation, _invalid)
from lorafit.serve.engine import Job
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

# fields OpenAI defines that change what is computed, with the values that mean "not used"
_UNSUPPORTED: dict[str, tuple] = {
    "n": (None, 1), "best_of": (None, 1), "logprobs": (None, False, 0),
    "top_logprobs": (None, 0), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []),
    "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}), "echo": (None, False),
    "suffix": (None, ""),
}
# lorafit's field names in /v1/generate's errors, as this API calls them
_FIELDS = {"max_new_tokens": "max_tokens", "adapter": "model"}


StopText = Annotated[str, Field(max_length=200)]


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
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionBody(_Common):
    prompt: str | list[str]


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
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise _invalid("prompt", f"{len(prompt)} prompts; lorafit serve takes one a request")
        prompt = prompt[0]
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    return await _answer(service, request, body, "text_completion", max_tokens, prompt=prompt)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatBody, service: ServiceDep, request: Request):
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:
        max_tokens = service.limits.max_new_tokens
    return await _answer(service, request, body, "chat.completion", max_tokens,
                         messages=[m.plain() for m in body.messages])


async def _answer(service: Service, request: Request, body: _Common,
                  kind: Literal["text_completion", "chat.completion"], max_tokens: int, **prompt: Any):
    if service.task != "generate":
        raise HTTPException(404, f"this server does {service.task}, not generation")
    _refuse_unsupported(body)
    adapter = _adapter(service, body.model)
    try:
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        req = await _generate_request(service, GenerateBody(
            adapter=adapter, max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
            seed=body.seed, stop=[t for t in stop or [] if t] or None, **prompt))
    except HTTPException as exc:
        for error in exc.detail if isinstance(exc.detail, list) else []:
            error["loc"] = [_FIELDS.get(part, part) for part in error["loc"]]
        raise
    entry = await service.acquire(adapter)
    job = Job(rows=1, payload=req, entry=entry)
    head = {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()), "model": body.model}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream:
        return StreamingResponse(_chunks(service, job, head, kind, len(req.ids), include_usage),
                                 media_type="text/event-stream")
    result = await service.run(job, request)
    choice = {"index": 0, "finish_reason": _finish(result["finish_reason"])}
    if kind == "chat.completion":
        choice["message"] = {"role": "assistant", "content": result["text"]}
    else:
        choice.update(text=result["text"], logprobs=None)
    return {**head, "object": kind, "choices": [choice], "usage": _usage(len(req.ids), result["tokens"])}


async def _chunks(service: Service, job: Job, head: dict, kind: str, prompt_tokens: int, include_usage: bool):
    chat = kind == "chat.completion"
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def event(data: dict) -> str:
        return f"data: {json.dumps(data)}\n\n"

    def chunk(piece: str | None, finish: str | None = None, delta: dict | None = None) -> str:
        if chat:
            choice = {"index": 0, "delta": delta or ({} if piece is None else {"content": piece}),
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
        return event({**head, "choices": [choice]})

    async with contextlib.aclosing(_generation(service, job)) as pieces:
        if chat:
            yield chunk(None, delta={"role": "assistant", "content": ""})
        async for what, *value in pieces:
            if what == "delta":
                yield chunk(value[0])
            elif what == "error":
                status, detail = value
                message = detail if isinstance(detail, str) else json.dumps(detail)
                yield event({"error": {"message": message, "type": "server_error", "code": status}})
                return
            else:
                result = value[0]
                yield chunk(None, _finish(result["finish_reason"]))
                if include_usage:
                    yield event({**head, "choices": [], "usage": _usage(prompt_tokens, result["tokens"])})
    yield "data: [DONE]\n\n"


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}

