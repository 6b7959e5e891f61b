"""The warm edge service behind `celslm serve`: the model stays loaded, recently used contexts stay
decoded in memory, and an OpenAI-compatible API answers on loopback.

A request names its context in an extension field, `context`: an artifact id, a tag, a path, or a
server URL, resolved as `celslm decode --kv` resolves it (own disk -> peers -> cloud). The prompt is
tokenized and run here; no request this service makes carries it. A context used once is kept as the
engine's own snapshot (llama.cpp state bytes) in an LRU bounded in bytes, keyed by artifact id, so the
next request over it restores it in milliseconds instead of fetching and decoding blocks.

One model, one sequence at a time: requests queue on a lock and run in a worker thread, so the event
loop keeps answering (health, streaming) while one generates.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from aiohttp import web

from celslm import prompting
from celslm.confidential import Sealed
from celslm.decode import Context, DecodeStats, Sampling, TextStream, eos_ids, generate
from celslm.edge import context_from_reader
from celslm.errors import CelslmError, IntegrityError, NotFound, UnavailableError, UsageError
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


@dataclass
class ContextCache:
    """Decoded contexts by artifact id, least recently used first out, within `capacity` bytes."""

    capacity: int
    entries: OrderedDict = field(default_factory=OrderedDict)
    bytes: int = 0

    def get(self, key: str) -> _Entry | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: _Entry) -> None:
        if len(entry.state) > self.capacity:
            return  # bigger than the whole cache: used once, not kept
        if key in self.entries:
            self.bytes -= len(self.entries.pop(key).state)
        self.entries[key] = entry
        self.bytes += len(entry.state)
        while self.bytes > self.capacity:
            _, old = self.entries.popitem(last=False)
            self.bytes -= len(old.state)


class ClientGone(Exception):
    """A streaming client disconnected; its generation stops at the next token."""


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, type and code."""

    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.kind, self.param = status, code, kind, param

    def response(self) -> web.Response:
        body = {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}
        return web.json_response(body, status=self.status)


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
        self.cache = ContextCache(config.cache_bytes)
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


def make_app(service: Service) -> web.Application:
    name = service.loaded.name

    @web.middleware
    async def errors(request, handler):
        try:
            if service.config.token and request.path != "/v1/health":
                if request.headers.get("Authorization") != f"Bearer {service.config.token}":
                    raise ApiError(401, "a bearer token is required (Authorization: Bearer ...)", "invalid_api_key",
                                   kind="authentication_error")
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except web.HTTPException as exc:
            return ApiError(exc.status, exc.reason, "not_found" if exc.status == 404 else "http_error").response()

    async def completions(request: web.Request, chat: bool):
        if request.content_type != "application/json":  # also keeps web pages from posting here (no CORS)
            raise ApiError(415, f"send the request as application/json, not {request.content_type or 'nothing'}",
                           "unsupported_media_type")
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError, LookupError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            raise ApiError(400, f"the body is not JSON: {str(exc)[:200]}", "invalid_json") from exc
        parsed = parse_request(body, chat, service.config)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
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
            return web.json_response({"id": ident, "object": kind, "created": created, "model": name, "choices": [choice],
                                      "usage": _usage(result), "celslm": result["celslm"]})
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
            return await _stream(request, queue, work, chat, ident, kind, created)
        except (ConnectionError, asyncio.CancelledError):
            gone.set()
            work.add_done_callback(lambda done: done.exception())  # ClientGone, expected: retrieved, not logged
            raise

    async def _stream(request, queue, work, chat: bool, ident: str, kind: str, created: int):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        started = False

        def chunk(delta_text: str | None, finish: str | None = None, role: bool = False, extra: dict | None = None) -> bytes:
            if chat:
                delta = ({"role": "assistant"} if role else {}) | ({"content": delta_text} if delta_text is not None else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": finish, "logprobs": None}
            obj = {"id": ident, "object": f"{kind}.chunk" if chat else kind, "created": created, "model": name,
                   "choices": [choice], **(extra or {})}
            return f"data: {json.dumps(obj)}\n\n".encode()

        while True:
            what, piece = await queue.get()
            if what == "piece":
                if not started:
                    await response.prepare(request)
                    started = True
                    if chat:
                        await response.write(chunk(None, role=True))
                await response.write(chunk(piece))
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
                if chat:
                    await response.write(chunk(None, role=True))
            await response.write(chunk(None if chat else "", result["finish"],
                                       extra={"usage": _usage(result), "celslm": result["celslm"]}))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response

    async def chat_completions(request):
        return await completions(request, chat=True)

    async def text_completions(request):
        return await completions(request, chat=False)

    async def models(request):
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "celslm"}]})

    async def health(request):
        return web.json_response({"status": "ok", "model": name, "engine": service.loaded.engine.name,
                                  "cached_contexts": len(service.cache.entries), "cached_bytes": service.cache.bytes,
                                  "cache_capacity": service.cache.capacity, "served": service.served})

    app = web.Application(middlewares=[errors], client_max_size=1 << 20)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", text_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/health", health)
    return app


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


def _guarded(service: Service, request: Request, emit) -> dict:
    """`Service.run`, its library errors turned into OpenAI-style ones."""
    try:
        return service.run(request, emit)
    except ApiError:
        raise
    except NotFound as exc:
        raise ApiError(404, f"context {request.context!r}: {exc}", "context_not_found", param="context") from exc
    except UnavailableError as exc:
        raise ApiError(503, f"context {request.context!r} cannot be fetched: {exc}", "context_unavailable",
                       kind="server_error", param="context") from exc
    except Untrusted as exc:
        raise ApiError(403, f"context {request.context!r} refused by the trust policy: {exc}", "context_untrusted",
                       param="context") from exc
    except Sealed as exc:
        raise ApiError(403, f"context {request.context!r} cannot be opened here: {exc}", "context_encrypted",
                       param="context") from exc
    except IntegrityError as exc:
        if os.path.exists(request.context):  # a file the client named: its mistake, not a server's
            raise ApiError(400, f"context {request.context!r} is not a valid artifact: {exc}", "invalid_context",
                           param="context") from exc
        raise ApiError(502, f"context {request.context!r} failed verification: {exc}", "context_corrupt",
                       kind="server_error", param="context") from exc
    except UsageError as exc:
        raise ApiError(400, str(exc), "invalid_request") from exc
    except CelslmError as exc:
        raise ApiError(500, str(exc), "engine_error", kind="server_error") from exc
    except ClientGone:
        raise
    except Exception as exc:  # a bug of ours: one line to the client, not a traceback; the service goes on
        raise ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error", kind="server_error") from exc
