"""The warm edge service behind `celslm serve`: the model stays loaded, recently used contexts stay
decoded in memory, and an OpenAI-compatible API answers on loopback.

A request names its context in an extension field, `context`: an artifact id, a tag, a path, or a
server URL, resolved as `celslm decode --kv` resolves it (own disk -> peers -> cloud). The prompt is
tokenized and run here; no request this service makes carries it. A context used once is kept as the
engine's own snapshot (llama.cpp state bytes) in an LRU bounded in bytes, keyed by artifact id, so the
next request over it restores it in milliseconds instead of fetching and decoding blocks.

One model, one sequence at a time: requests queue on a lock and run in a worker thread, so the event
loop keeps answering (health, streaming) while one generates. The bearer check, the status of each
library error, /v1/health, /metrics and the LRU are celslm.httpserver's, shared with serve-cache; the
bodies are OpenAI's error JSON.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from celslm import prompting
from celslm.confidential import Sealed
from celslm.decode import Context, DecodeStats, Sampling, TextStream, eos_ids, generate
from celslm.edge import context_from_reader
from celslm.errors import CelslmError, IntegrityError, NotFound, TokenRequired, UnavailableError, UsageError
from celslm.httpserver import ByteLRU, ReadWhenScraped, add_health_and_metrics, by_class, guard, status_of
from celslm.manifest import DIGEST
from celslm.models import LoadedModel
from celslm.store.tiers import Sources, open_ref, split_url_ref
from celslm.trust import Untrusted

MAX_TOKENS_LIMIT = 4096  # the most tokens one request may ask for


@dataclass(frozen=True)
class ServiceConfig:
    sources: Sources = Sources()
    cache_bytes: int = 1 << 30
    token: str | None = None  # required as a bearer token on every /v1 call but health, when set
    max_tokens: int = MAX_TOKENS_LIMIT


@dataclass
class _Entry:
    token_ids: list[int]
    framing: str
    state: bytes


class ClientGone(Exception):
    """A streaming client disconnected; its generation stops at the next token."""


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, type and code."""

    def __init__(self, status: int, message: str, code: str, kind: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param
        self.kind = kind or ("server_error" if status >= 500 else "invalid_request_error")

    def response(self, headers: dict | None = None) -> web.Response:
        body = {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}
        return web.json_response(body, status=self.status, headers=headers)


@dataclass(frozen=True)
class Request:
    context: str
    prompt: str
    raw: bool  # completions: the prompt continues the context as plain text
    sampling: Sampling
    stream: bool
    chat: bool


class Service:
    def __init__(self, loaded: LoadedModel, config: ServiceConfig, warn=None):
        self.loaded, self.config = loaded, config
        self.warn = warn  # where warnings about unchecked tags and lookups go (the service's log)
        self.cache: ByteLRU[_Entry] = ByteLRU(config.cache_bytes, size_of=lambda entry: len(entry.state))
        self.cacheable = hasattr(loaded.engine, "snapshot")
        self.lock = threading.Lock()  # one sequence on the engine at a time
        self.served = 0

    # -- blocking work (a worker thread)

    def _context(self, ref: str) -> tuple[Context, str, bool]:
        """The context `ref` names, from the cache or fetched and decoded; (context, artifact id, hit)."""
        engine, sources = self.loaded.engine, self.config.sources
        check_context_ref(ref, sources)
        entry = self.cache.get(ref) if DIGEST.match(ref) else None
        reader = None
        if entry is None:
            reader, _ = open_ref(ref, sources, warn=self.warn)
            entry = self.cache.get(reader.id)
        if entry is not None:
            started = time.perf_counter()
            sequence = engine.restore(entry.state, len(entry.token_ids))
            stats = DecodeStats(path="artifact", context_tokens=len(entry.token_ids), load_s=time.perf_counter() - started)
            return Context(entry.token_ids, sequence, entry.framing, stats, started), reader.id if reader else ref, True
        ctx = context_from_reader(self.loaded, reader, pipeline=False)
        if self.cacheable:
            self.cache.put(reader.id, _Entry(list(ctx.token_ids), ctx.framing, engine.snapshot(ctx.sequence)))
        return ctx, reader.id, False

    def run(self, request: Request, emit=None) -> dict:
        """Answer one request; `emit(piece)` gets the text as it is generated, once per token (the piece
        may be empty), and may raise `ClientGone` to stop it."""
        with self.lock:
            ctx, artifact, hit = self._context(request.context)
            tokenizer = self.loaded.tokenizer
            prompt_ids = prompting.prompt_ids(tokenizer, request.prompt, ctx.framing, request.raw)
            if not prompt_ids:
                raise ApiError(400, "the prompt is empty", "empty_prompt")
            stop = eos_ids(self.loaded)
            stream = TextStream(tokenizer, skip=stop)
            pieces, finish = [], "length"
            for token in generate(self.loaded, ctx, prompt_ids, request.sampling):
                if token in stop:
                    finish = "stop"
                piece = stream.push(token)
                if piece:
                    pieces.append(piece)
                if emit:
                    emit(piece)
            tail = stream.flush()
            if tail:
                pieces.append(tail)
                if emit:
                    emit(tail)
            self.served += 1
            s = ctx.stats
            return {"text": "".join(pieces), "finish": finish, "prompt_tokens": s.prompt_tokens,
                    "completion_tokens": s.new_tokens,
                    "celslm": {"context": artifact, "context_tokens": s.context_tokens, "cache": "hit" if hit else "miss",
                               "engine": self.loaded.engine.name, "ttft_s": round(s.ttft_s, 6), "total_s": round(s.total_s, 6)}}


def check_context_ref(ref: str, sources: Sources) -> None:
    """A request may name an id, a tag, a path on this machine, or a URL of a server the service was
    configured with: never another server (it would get the service's cache token, and the service
    would fetch from wherever a client points it)."""
    if ref == "-":
        raise ApiError(400, "the context cannot be stdin here: give an id, a tag, a path or a server URL", "invalid_context",
                       param="context")
    try:
        url = split_url_ref(ref)
    except UsageError as exc:
        raise ApiError(400, str(exc), "invalid_context", param="context") from exc
    if url and url[0].rstrip("/") not in {s.rstrip("/") for s in (*sources.peers, sources.cloud) if s}:
        raise ApiError(400, f"{url[0]} is not one of this service's --peer or --cloud servers", "context_server_refused",
                       param="context")


# ---------------------------------------------------------------- HTTP


def _text_of(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"{where} must be a string or a list of text parts", "invalid_content", param=where)


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high or not math.isfinite(float(value)):
        raise ApiError(400, f"{name} must be {'an integer' if integer else 'a number'} in [{low:g}, {high:g}], got {value!r}",
                       "invalid_value", param=name)
    return value


def parse_request(body, chat: bool, config: ServiceConfig) -> Request:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_body")
    context = body.get("context")
    if not isinstance(context, str) or not context:
        raise ApiError(400, "name the context in the `context` field: an artifact id, a tag, a path or a server URL "
                            "(openai clients: extra_body={'context': ...})", "context_required", param="context")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ApiError(400, "messages must be a non-empty list of objects", "invalid_messages", param="messages")
        roles = [m.get("role") for m in messages]
        if roles != ["user"]:
            raise ApiError(400, f"one user message is answered over the context (the context opens the user's turn); "
                                f"got roles {roles}", "unsupported_messages", param="messages")
        prompt = _text_of(messages[0].get("content"), "messages[0].content")
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "prompt must be a string", "invalid_prompt", param="prompt")
    limit = config.max_tokens
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= limit):
        raise ApiError(400, f"max_tokens must be an integer from 1 to {limit}, got {max_tokens!r}", "too_many_tokens",
                       param="max_tokens")
    if body.get("n", 1) != 1:
        raise ApiError(400, "n must be 1", "invalid_value", param="n")
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 1e-6, 1.0)
    seed = _number(body, "seed", None, 0, 2**63 - 1, integer=True)
    sampling = Sampling(max_new_tokens=max_tokens or 256, temperature=float(temperature), top_p=float(top_p), seed=seed)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r}", "invalid_value", param="stream")
    return Request(context, prompt, raw=not chat, sampling=sampling, stream=stream, chat=chat)


SERVICE = web.AppKey("service", Service)


def make_app(service: Service) -> web.Application:
    middleware = guard(lambda request: service.config.token,
                       lambda status, exc: ApiError(status, str(exc), by_class(ERROR_CODES, exc)[0]).response())
    app = web.Application(middlewares=[openai_errors, middleware], client_max_size=1 << 20)
    app[SERVICE] = service
    registry = CollectorRegistry()
    registry.register(ReadWhenScraped(lambda: _readings(service)))
    add_health_and_metrics(app, lambda: _health(service), registry)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", text_completions)
    app.router.add_get("/v1/models", models)
    return app


def _health(service: Service) -> dict:
    return {"model": service.loaded.name, "engine": service.loaded.engine.name, "cached_contexts": len(service.cache),
            "cached_bytes": service.cache.size_bytes, "cache_capacity": service.cache.budget_bytes,
            "served": service.served}


def _readings(service: Service) -> list:
    return [CounterMetricFamily("celslm_requests_served", "Requests answered to the end", value=service.served),
            GaugeMetricFamily("celslm_context_cache_bytes", "Bytes of decoded contexts kept in memory",
                              value=service.cache.size_bytes),
            GaugeMetricFamily("celslm_context_cache_entries", "Decoded contexts kept in memory", value=len(service.cache))]


@web.middleware
async def openai_errors(request: web.Request, handler):
    """Every error as an OpenAI error body: ours, the bearer check's, aiohttp's (no such route)."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status in (401, 403):
            refused = ApiError(exc.status, exc.text.strip(), "invalid_api_key", kind="authentication_error")
            return refused.response({k: v for k, v in exc.headers.items() if k == "WWW-Authenticate"})
        return ApiError(exc.status, exc.reason, "not_found" if exc.status == 404 else "http_error").response()


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await completions(request, chat=True)


async def text_completions(request: web.Request) -> web.StreamResponse:
    return await completions(request, chat=False)


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [
        {"id": request.app[SERVICE].loaded.name, "object": "model", "created": 0, "owned_by": "celslm"}]})


async def completions(request: web.Request, chat: bool) -> web.StreamResponse:
    service = request.app[SERVICE]
    if request.content_type != "application/json":  # also keeps web pages from posting here (no CORS)
        raise ApiError(415, f"send the request as application/json, not {request.content_type or 'nothing'}",
                       "unsupported_media_type")
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError, LookupError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ApiError(400, f"the body is not JSON: {str(exc)[:200]}", "invalid_json") from exc
    parsed = parse_request(body, chat, service.config)
    answer = _Answer(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "chat.completion" if chat else "text_completion",
                     int(time.time()), service.loaded.name, chat)
    loop = asyncio.get_running_loop()
    if not parsed.stream:
        gone = threading.Event()

        def check(_piece: str) -> None:  # a client that left gets no more tokens
            if gone.is_set():
                raise ClientGone()

        work = loop.run_in_executor(None, _guarded, service, parsed, check)
        watcher = asyncio.ensure_future(_watch(request, gone, work))
        try:
            result = await work
        except ClientGone:
            return web.Response(status=499)  # nobody is there to read it
        finally:
            watcher.cancel()
        choice = ({"index": 0, "message": {"role": "assistant", "content": result["text"]}, "finish_reason": result["finish"]}
                  if chat else {"index": 0, "text": result["text"], "finish_reason": result["finish"], "logprobs": None})
        return web.json_response({"id": answer.ident, "object": answer.kind, "created": answer.created, "model": answer.model,
                                  "choices": [choice], "usage": _usage(result), "celslm": result["celslm"]})
    queue: asyncio.Queue = asyncio.Queue()
    gone = threading.Event()  # the client went away: stop generating for it

    def emit(piece: str) -> None:
        if gone.is_set():
            raise ClientGone()
        if piece:
            loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece))

    work = loop.run_in_executor(None, _guarded, service, parsed, emit)
    work.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, ("done", None)))
    try:
        return await _stream(request, queue, work, answer)
    except (ConnectionError, asyncio.CancelledError):
        gone.set()
        work.add_done_callback(lambda done: done.exception())  # ClientGone, expected: retrieved, not logged
        raise


@dataclass(frozen=True)
class _Answer:
    """What every chunk of one answer repeats."""

    ident: str
    kind: str  # chat.completion or text_completion
    created: int
    model: str
    chat: bool

    def chunk(self, delta_text: str | None, finish: str | None = None, role: bool = False, extra: dict | None = None) -> bytes:
        if self.chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": delta_text} if delta_text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta_text or "", "finish_reason": finish, "logprobs": None}
        obj = {"id": self.ident, "object": f"{self.kind}.chunk" if self.chat else self.kind, "created": self.created,
               "model": self.model, "choices": [choice], **(extra or {})}
        return f"data: {json.dumps(obj)}\n\n".encode()


async def _stream(request: web.Request, queue: asyncio.Queue, work, answer: _Answer) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    started = False
    while True:
        what, piece = await queue.get()
        if what == "piece":
            if not started:
                await response.prepare(request)
                started = True
                if answer.chat:
                    await response.write(answer.chunk(None, role=True))
            await response.write(answer.chunk(piece))
            continue
        try:
            result = work.result()
        except ApiError as exc:
            if not started:
                return exc.response()
            await response.write(f"data: {json.dumps({'error': {'message': str(exc), 'code': exc.code}})}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            return response
        if not started:
            await response.prepare(request)
            if answer.chat:
                await response.write(answer.chunk(None, role=True))
        await response.write(answer.chunk(None if answer.chat else "", result["finish"],
                                          extra={"usage": _usage(result), "celslm": result["celslm"]}))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def _watch(request: web.Request, gone: threading.Event, work) -> None:
    """Set `gone` when the client of a non-streamed request disconnects before its answer is ready."""
    while not work.done():
        transport = request.transport
        if transport is None or transport.is_closing():
            gone.set()
            return
        await asyncio.sleep(0.1)


def _usage(result: dict) -> dict:
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}


# A library error met while answering: its code, and what the message says of the context (None: the
# error's own message is the whole message). The status is httpserver.status_of's.
ERROR_CODES: dict[type, tuple[str, str | None]] = {
    NotFound: ("context_not_found", ""),
    TokenRequired: ("context_unavailable", " cannot be fetched"),
    UnavailableError: ("context_unavailable", " cannot be fetched"),
    Untrusted: ("context_untrusted", " refused by the trust policy"),
    Sealed: ("context_encrypted", " cannot be opened here"),
    IntegrityError: ("context_corrupt", " failed verification"),
    UsageError: ("invalid_request", None),
    CelslmError: ("engine_error", None),
}


def _guarded(service: Service, request: Request, emit) -> dict:
    """`Service.run`, its library errors turned into OpenAI-style ones."""
    try:
        return service.run(request, emit)
    except (ApiError, ClientGone):
        raise
    except CelslmError as exc:
        code, words = by_class(ERROR_CODES, exc)
        if code == "context_corrupt" and os.path.exists(request.context):  # a file the client named: its mistake
            code, words = "invalid_context", " is not a valid artifact"
        message = str(exc) if words is None else f"context {request.context!r}{words}: {exc}"
        raise ApiError(status_of(exc), message, code, param=None if words is None else "context") from exc
    except Exception as exc:  # a bug of ours: one line to the client, not a traceback; the service goes on
        raise ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error") from exc
