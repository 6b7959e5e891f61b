"""The warm edge service behind `celslm serve`: the model stays loaded, contexts in use stay resident
in llama.cpp's KV cache, and an OpenAI-compatible API answers on loopback.

A request names its context in an extension field, `context`: an artifact id, a tag, a URL of one
of the service's own servers, or a name inside its `context_dir`; resolved as `celslm decode --kv`
resolves it (own disk -> peers -> cloud). The prompt is tokenized and run here; no request this
service makes carries it.

Requests from many clients decode together (`scheduler`, `batching`): one llama.cpp batch per step,
each request's sequence a share of its context's cells. A context is held at two levels: resident in
the KV cache while requests use it (and after, until its cells are needed), and as llama.cpp state
bytes in a host-memory LRU bounded in bytes, keyed by artifact id, so a context used before is back in
milliseconds instead of being fetched and decoded again.

The bearer check, the status of each library error, /v1/health, /metrics and the LRU are
celslm.httpserver's, shared with serve-cache; the bodies are OpenAI's error JSON.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from celslm import compose, prompting
from celslm.artifact import ArtifactReader
from celslm.batching import DEFAULT_CELLS, KVPool
from celslm.blockread import keep_codebooks
from celslm.confidential import Sealed
from celslm.decode import Sampling, check_space, eos_ids
from celslm.errors import (CelslmError, IntegrityError, NotFound, Overloaded, TokenRequired, UnavailableError,
                           UsageError)
from celslm.httpserver import HEALTH_PATH, ByteLRU, ReadWhenScraped, add_health_and_metrics, by_class, guard, status_of
from celslm.manifest import DIGEST
from celslm.models import LoadedModel
from celslm.scheduler import ContextState, Expired, Gone, Job, Limits, Prepared, Scheduler, Tenant
from celslm.store.base import TAG
from celslm.store.tiers import Sources, open_ref, split_url_ref
from celslm.stream import LayerFeed, StreamedReader, Timeline
from celslm.tenants import token_sha256
from celslm.trust import Untrusted

MAX_TOKENS_LIMIT = 4096  # the most tokens one request may ask for
MAX_STOPS = 4  # stop strings per request, as OpenAI allows
MAX_STOP_CHARS = 256  # each stop string's length: every token is checked against it
MIN_TEMPERATURE = 1e-3  # below this (but not 0) the logits overflow when divided
MAX_LINK_TOKENS = 4096  # a composition's link tokens per part, at most (a part shorter than that is all computed)


@dataclass(frozen=True)
class ServiceConfig:
    sources: Sources = Sources()
    cache_bytes: int = 1 << 30  # host memory for contexts' state bytes (the second level)
    token: str | None = None  # required as a bearer token on every /v1 call but health, when set
    max_tokens: int = MAX_TOKENS_LIMIT
    limits: Limits = Limits()
    kv_cells: int = DEFAULT_CELLS
    context_dir: Path | None = None  # the only folder whose files a client may name
    tenants: dict[str, Tenant] = field(default_factory=dict)  # by the sha256 of their API keys

    def __post_init__(self):
        if self.token and self.tenants:
            raise UsageError("give one API token or a file of tenants' keys, not both")


ANYONE = Tenant("default")


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, type and code."""

    def __init__(self, status: int, message: str, code: str, kind: str | None = None, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.param, self.headers = status, code, param, headers
        self.kind = kind or ("server_error" if status >= 500 else "invalid_request_error")

    def response(self, headers: dict | None = None) -> web.Response:
        body = {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}
        return web.json_response(body, status=self.status, headers=headers or self.headers)


@dataclass(frozen=True)
class Request:
    context: str | tuple[str, ...]  # several: composed
    prompt: str
    raw: bool  # completions: the prompt continues the context as plain text
    sampling: Sampling
    stream: bool
    chat: bool
    stop: tuple[str, ...] = ()
    link_tokens: int | None = None  # with several contexts; None: compose.DEFAULT_LINK


class Service:
    def __init__(self, loaded: LoadedModel, config: ServiceConfig, warn=None, registry: CollectorRegistry | None = None):
        if not hasattr(loaded.engine, "snapshot") or not hasattr(loaded.engine, "_lib"):
            raise UsageError("the service batches requests on llama.cpp: give it a GGUF model (--engine llama.cpp)")
        self.loaded, self.config = loaded, config
        keep_codebooks(4)  # contexts of one model share a codebook: parsed once, not at every switch
        self.warn = warn  # where warnings about unchecked tags and lookups go (the service's log)
        self.memory: ByteLRU[ContextState] = ByteLRU(config.cache_bytes, size_of=lambda context: len(context.state))
        self._composing = threading.Lock()
        self.registry = registry or CollectorRegistry()
        limits = config.limits
        self.pool = KVPool(loaded.engine, limits.parallel, limits.parallel + 2, config.kv_cells,
                           batch=limits.parallel + limits.prompt_chunk)
        self.scheduler = Scheduler(self.pool, limits, self.prepare, loaded.tokenizer, eos_ids(loaded),
                                   loaded.engine.max_positions, self.registry)

    def close(self) -> None:
        self.scheduler.close()
        self.pool.close()

    def tenant_of(self, request: web.Request) -> Tenant:
        """The tenant whose API key the request carries (with tenants' keys), else everyone's."""
        if not self.config.tenants:
            return ANYONE
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            raise web.HTTPUnauthorized(text="a bearer token is required (Authorization: Bearer ...)\n",
                                       headers={"WWW-Authenticate": "Bearer"})
        tenant = self.config.tenants.get(token_sha256(header.removeprefix("Bearer ")))  # keys are looked up by hash
        if tenant is None:
            raise web.HTTPForbidden(text="wrong token\n")
        return tenant

    # -- the loader thread (scheduler.Scheduler calls it)

    def prepare(self, job: Job) -> Prepared:
        """The job's context as state bytes, from where it is nearest, and its prompt's ids."""
        if isinstance(job.context_ref, tuple):
            link_tokens = compose.DEFAULT_LINK if job.link_tokens is None else job.link_tokens
            context, source = self._composed(job.context_ref, link_tokens)
        else:
            found = self._cached_or_opened(job.context_ref)
            context, source = found if isinstance(found[0], ContextState) else self._fetched(found[0])
        prompt_ids = prompting.prompt_ids(self.loaded.tokenizer, job.prompt, context.framing, job.raw)
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", "empty_prompt")
        needed = context.tokens + len(prompt_ids)
        limit = self.loaded.engine.max_positions
        if needed >= limit:
            raise UsageError(f"context ({context.tokens} tokens) and prompt ({len(prompt_ids)}) need {needed} positions; "
                             f"{self.loaded.name} was trained for {limit}")
        return Prepared(context, prompt_ids, source)

    def _cached_or_opened(self, ref: str) -> tuple[ContextState | ArtifactReader, str]:
        """A context already resident or in memory (and where), or its reader (the manifest read, no blob)."""
        ref = self.resolve(ref)
        context = self.scheduler.resident(ref) or self.memory.get(ref) if DIGEST.match(ref) else None
        if context is None:
            reader, _ = open_ref(ref, self.config.sources, warn=self.warn)
            context = self.scheduler.resident(reader.id) or self.memory.get(reader.id)
            if context is None:
                return reader, "fetched"
        return context, "resident" if self.scheduler.resident(context.artifact) else "memory"

    def _fetched(self, reader: ArtifactReader) -> tuple[ContextState, str]:
        context = self._load(reader)
        self.memory.put(context.artifact, context)
        return context, "fetched"

    def _composed(self, refs: tuple[str, ...], link_tokens: int) -> tuple[ContextState, str]:
        """Several contexts in one (`compose`): each part from where it is nearest and kept on its own, so
        a new combination of parts already here costs only the link tokens and the rotation. Every part
        is resolved and its length known before any blob is fetched."""
        found = [self._cached_or_opened(ref) for ref in refs]
        for reader, _ in found:
            if not isinstance(reader, ContextState):
                check_space(reader, self.loaded)
        ids = [f.artifact if isinstance(f, ContextState) else f.id for f, _ in found]
        key = composed_key(ids, link_tokens)
        context = self.scheduler.resident(key) or self.memory.get(key)
        if context is not None:
            return context, "resident" if self.scheduler.resident(key) else "memory"
        compose.check_parts([compose.Declared(f.artifact, f.framing, f.tokens) if isinstance(f, ContextState)
                             else compose.Declared.of(f) for f, _ in found], self.loaded)
        states = [f if isinstance(f, ContextState) else self._fetched(f)[0] for f, _ in found]
        tokenizer, framing = self.loaded.tokenizer, states[0].framing
        opening, separator = compose.opening_ids(tokenizer, framing), compose.separator_ids(tokenizer)
        engine = self.loaded.engine
        parts = [compose.Part(s.artifact, list(s.token_ids), engine.layers_of_state(s.state)) for s in states]
        with self._composing:  # the engine's own llama.cpp context runs the link tokens, one composition at a time
            result = compose.compose(engine, parts, opening, separator, link_tokens)
        state = engine.state_of(lambda layer: engine.place(*result.layers[layer]))
        context = ContextState(key, len(result.token_ids), framing, state, tuple(result.token_ids), tuple(ids),
                               result.recomputed())
        self.memory.put(key, context)
        return context, "composed"

    def _load(self, reader) -> ContextState:
        """Fetch, verify and decode an artifact into its state bytes: the layers decode on the engine's
        threads and are written straight into the state, no llama.cpp context in between."""
        engine = self.loaded.engine
        check_space(reader, self.loaded)
        feed = LayerFeed(engine, StreamedReader(reader, Timeline()), Timeline())
        try:
            feed.check(engine)
            state = engine.state_of(feed.wait)
        finally:
            feed.close()
        return ContextState(reader.id, len(feed.token_ids), reader.manifest.framing, state, tuple(feed.token_ids),
                            (reader.id,))

    def resolve(self, ref: str) -> str:
        """What `open_ref` may open for a client: an id, a tag, a URL of this service's own servers, or a
        file inside the context folder (as a path). Anything else gets one error, whether or not such a
        file exists, so that the answer tells nothing about this machine's files."""
        sources, folder = self.config.sources, self.config.context_dir
        if ref == "-":
            raise ApiError(400, "the context cannot be stdin here: give an id, a tag, or a server URL", "invalid_context",
                           param="context")
        try:
            url = split_url_ref(ref)
        except UsageError as exc:
            raise ApiError(400, str(exc), "invalid_context", param="context") from exc
        if url:
            if url[0].rstrip("/") not in {s.rstrip("/") for s in (*sources.peers, sources.cloud) if s}:
                raise ApiError(400, f"{url[0]} is not one of this service's --peer or --cloud servers",
                               "context_server_refused", param="context")
            return ref
        if DIGEST.match(ref):
            return ref
        if folder is not None:
            root = folder.resolve()
            path = (root / ref).resolve()
            if path.is_relative_to(root) and path != root and path.exists():
                return str(path)
        if TAG.match(ref):
            return ref
        what = ("an artifact id, a tag, a URL of this service's servers or a name inside its context folder" if folder
                else "an artifact id, a tag or a URL of this service's servers (this service opens no files)")
        raise ApiError(400, f"context {ref!r} is not {what}", "invalid_context", param="context")


def composed_key(artifact_ids: list[str], link_tokens: int) -> str:
    """What a composition is cached under: its parts in order and its link tokens."""
    return "+".join(artifact_ids) + f"#link={link_tokens}"


def read_tenants(path: Path) -> dict[str, Tenant]:
    """Tenants by the sha256 of their API keys, from a TOML file shaped as serve-cache's `--tenants`:

        [tenants.acme]
        token_sha256 = "9f86d0…"   # hex sha256 of its key, or a list of them: the file holds no secret
        concurrency = 2             # requests queued or running at once (optional)
    """
    import tomllib

    try:
        table = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: cannot read tenants: {exc}") from exc
    tenants, by_key = table.get("tenants"), {}
    if set(table) != {"tenants"} or not isinstance(tenants, dict) or not tenants:
        raise UsageError(f"{path}: expected [tenants.NAME] tables, each with token_sha256 (and concurrency = N)")
    for name, entry in tenants.items():
        if not isinstance(entry, dict) or set(entry) - {"token_sha256", "concurrency"}:
            raise UsageError(f"{path}: tenant {name!r} takes token_sha256 and concurrency, nothing else")
        digests, cap = entry.get("token_sha256"), entry.get("concurrency")
        digests = [digests] if isinstance(digests, str) else digests
        if not isinstance(digests, list) or not digests or not all(
                isinstance(d, str) and re.fullmatch(r"[0-9a-f]{64}", d) for d in digests):
            raise UsageError(f"{path}: tenant {name!r} needs token_sha256: the 64 hex digits of sha256(key) "
                             "(printf %s \"$KEY\" | sha256sum), or a list of them")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise UsageError(f"{path}: tenant {name!r}: concurrency must be a whole number >= 1, got {cap!r}")
        for digest in digests:
            if digest in by_key:
                raise UsageError(f"{path}: a key of tenant {name!r} is also {by_key[digest].name!r}'s")
            by_key[digest] = Tenant(name, cap)
    return by_key


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
    if isinstance(context, list) and 0 < len(context) <= compose.MAX_PARTS and all(isinstance(c, str) and c for c in context):
        context = tuple(context) if len(context) > 1 else context[0]
    elif not isinstance(context, str) or not context:
        raise ApiError(400, "name the context in the `context` field: an artifact id, a tag, a path or a server URL, or a "
                            f"list of up to {compose.MAX_PARTS} of them to compose (openai clients: extra_body={{'context': ...}})",
                       "context_required", param="context")
    link_tokens = _number(body, "link_tokens", None, 0, MAX_LINK_TOKENS, integer=True)
    if link_tokens is not None and not isinstance(context, tuple):
        raise ApiError(400, "link_tokens goes with two or more contexts (a composition)", "invalid_value", param="link_tokens")
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
    if 0 < temperature < MIN_TEMPERATURE:
        raise ApiError(400, f"temperature must be 0 (greedy) or from {MIN_TEMPERATURE:g} to 2, got {temperature!r}",
                       "invalid_value", param="temperature")
    top_p = _number(body, "top_p", 1.0, 1e-6, 1.0)
    seed = _number(body, "seed", None, 0, 2**63 - 1, integer=True)
    sampling = Sampling(max_new_tokens=max_tokens or 256, temperature=float(temperature), top_p=float(top_p), seed=seed)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r}", "invalid_value", param="stream")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or len(stop) > MAX_STOPS or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
        raise ApiError(400, f"stop must be a string or a list of up to {MAX_STOPS} non-empty strings of at most "
                       f"{MAX_STOP_CHARS} characters", "invalid_value", param="stop")
    return Request(context, prompt, raw=not chat, sampling=sampling, stream=stream, chat=chat, stop=tuple(stop),
                   link_tokens=link_tokens)


SERVICE = web.AppKey("service", Service)


def make_app(service: Service) -> web.Application:
    middleware = guard(lambda request: service.config.token,  # tenants' keys: checked by Service.tenant_of
                       lambda status, exc: ApiError(status, str(exc), by_class(ERROR_CODES, exc)[0]).response())
    app = web.Application(middlewares=[openai_errors, middleware, tenants_only], client_max_size=1 << 20)
    app[SERVICE] = service
    service.registry.register(ReadWhenScraped(lambda: _readings(service)))
    add_health_and_metrics(app, lambda: _health(service), service.registry)
    app.on_cleanup.append(lambda _app: asyncio.to_thread(service.close))
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", text_completions)
    app.router.add_get("/v1/models", models)
    return app


def _health(service: Service) -> dict:
    return {"model": service.loaded.name, "engine": service.loaded.engine.name, "cached_contexts": len(service.memory),
            "cached_bytes": service.memory.size_bytes, "cache_capacity": service.memory.budget_bytes,
            "served": int(service.scheduler.m_served._value.get()), **service.scheduler.stats()}


def _readings(service: Service) -> list:
    return [GaugeMetricFamily("celslm_context_cache_bytes", "Bytes of contexts' state kept in host memory",
                              value=service.memory.size_bytes),
            GaugeMetricFamily("celslm_context_cache_entries", "Contexts' states kept in host memory",
                              value=len(service.memory))]


@web.middleware
async def tenants_only(request: web.Request, handler):
    """With tenants' keys, every route but health needs one of them (/metrics and /v1/models too)."""
    if request.path != HEALTH_PATH:
        request.app[SERVICE].tenant_of(request)
    return await handler(request)


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
    tenant = service.tenant_of(request)
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
    events: asyncio.Queue = asyncio.Queue()
    job = Job(tenant, parsed.context, parsed.prompt, parsed.raw, parsed.sampling, parsed.stop,
              sink=lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value)),
              link_tokens=parsed.link_tokens)
    try:
        service.scheduler.submit(job)
    except Overloaded as exc:
        raise ApiError(429, str(exc), "overloaded", kind="rate_limit_error",
                       headers={"Retry-After": str(math.ceil(exc.retry_after_s))}) from exc
    try:
        if parsed.stream:
            return await _stream(request, events, answer, parsed.context)
        return await _whole(request, events, answer, parsed.context)
    finally:
        job.cancel()  # a client that left frees its sequence at the next step; a finished job ignores it


async def _next(request: web.Request, events: asyncio.Queue) -> tuple[str, object] | None:
    """The job's next event, or None once the client has left (checked every 0.1 s while waiting)."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), timeout=0.1)
        except asyncio.TimeoutError:
            transport = request.transport
            if transport is None or transport.is_closing():
                return None


async def _whole(request: web.Request, events: asyncio.Queue, answer: "_Answer", context: str | tuple[str, ...]) -> web.Response:
    """A non-streamed answer, given when it is done; a client that leaves first cancels it."""
    pieces = []
    while True:
        event = await _next(request, events)
        if event is None:
            return web.Response(status=499)  # nobody is there to read it
        kind, value = event
        if kind == "piece":
            pieces.append(value)
        elif kind == "error":
            if isinstance(value, Gone):
                return web.Response(status=499)
            raise api_error(value, context)
        else:
            result = value
            choice = ({"index": 0, "message": {"role": "assistant", "content": result["text"]},
                       "finish_reason": result["finish"]} if answer.chat else
                      {"index": 0, "text": result["text"], "finish_reason": result["finish"], "logprobs": None})
            return web.json_response({"id": answer.ident, "object": answer.kind, "created": answer.created,
                                      "model": answer.model, "choices": [choice], "usage": _usage(result),
                                      "celslm": result["celslm"]})


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


async def _stream(request: web.Request, events: asyncio.Queue, answer: "_Answer", context: str | tuple[str, ...]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    started = False
    while True:
        event = await _next(request, events)
        if event is None:  # the client left: the caller's cancel frees its sequence
            return response if started else web.Response(status=499)
        kind, value = event
        if kind == "error" and not started:
            if isinstance(value, Gone):
                return web.Response(status=499)
            raise api_error(value, context)
        if not started:
            await response.prepare(request)
            started = True
            if answer.chat:
                await response.write(answer.chunk(None, role=True))
        if kind == "piece":
            await response.write(answer.chunk(value))
        elif kind == "error":
            error = api_error(value, context)
            await response.write(f"data: {json.dumps({'error': {'message': str(error), 'code': error.code}})}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            return response
        else:
            await response.write(answer.chunk(None if answer.chat else "", value["finish"],
                                              extra={"usage": _usage(value), "celslm": value["celslm"]}))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response


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


def api_error(exc: BaseException, context: str | tuple[str, ...]) -> ApiError:
    """A job's failure as an OpenAI-style error: library errors by class, bugs as one line (the service goes on)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, Expired):
        return ApiError(503, str(exc), "deadline_exceeded")
    if isinstance(exc, CelslmError):
        code, words = by_class(ERROR_CODES, exc)
        if code == "context_corrupt" and isinstance(context, str) and os.path.exists(context):  # a file in the context folder: the client's mistake
            code, words = "invalid_context", " is not a valid artifact"
        named = f"context {context!r}" if isinstance(context, str) else f"a context of {list(context)!r}"
        message = str(exc) if words is None else f"{named}{words}: {exc}"
        return ApiError(status_of(exc), message, code, param=None if words is None else "context")
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")
