"""The aiohttp app behind `celslm serve-cache`: the cloud and every edge peer run the same one.

    GET  /v1/health                         liveness and store usage
    GET  /metrics                           Prometheus text: hits, misses, bytes in/out, evictions
    HEAD|GET /v1/blobs/sha256:<hex>         a blob (Range supported), streamed from disk
    PUT  /v1/blobs/sha256:<hex>             upload, streamed; digest checked on arrival; idempotent
    PUT|GET /v1/artifacts/sha256:<hex>      a manifest; a PUT whose blobs are missing gets 409 listing them
    PUT|GET /v1/artifacts/sha256:<hex>/signatures   producers' signatures over the id (a PUT adds)
    PUT|GET /v1/artifacts/sha256:<hex>/timings      the cloud's seconds (side record, unsigned)
    PUT|GET /v1/tags/<name>                 a mutable name -> artifact id; a PUT may carry a signed statement
    GET  /v1/tags/<name>/statement          the tag's signed statement (404 if it has none)
    GET  /v1/lookup?space=<fp>&prefix=h1,…  the longest cached prefix: artifact id and chunk count

A write token guards PUT; an optional read token guards GET and HEAD; /v1/health stays open. The
bearer check, the status of each library error and the health and metrics routes are celslm.httpserver's,
shared with the edge service. Every handler is a module function over `request.app[STATE]`.

`serve` runs the app in one process, or in N forked workers that accept on one listening socket
(the pre-fork model of gunicorn and nginx): the kernel hands each connection to one of them. Their
counters live in prometheus_client's multiprocess files (PROMETHEUS_MULTIPROC_DIR, which the caller
sets before prometheus_client is imported), so /metrics, answered by any worker, adds them all up.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

from celslm.errors import UnavailableError, UsageError
from celslm.httpserver import ByteLRU, ReadWhenScraped, add_health_and_metrics, guard
from celslm.manifest import DIGEST, MEDIA_MANIFEST, SIGNATURES_NAME, TIMINGS_NAME, Manifest, read_side_record
from celslm.trust import SignedTag
from celslm.store import Store, open_store

DIGEST_ROUTE = r"{digest:sha256:[0-9a-f]{64}}"
TAG_ROUTE = r"{name:[A-Za-z0-9][A-Za-z0-9._:-]{0,127}}"
SMALL_BLOB_BYTES = 4 << 20  # blobs up to this size are sent from memory; bigger ones stream with sendfile


@dataclass(frozen=True)
class ServerConfig:
    store: str  # a directory (or file://PATH), or redis://HOST:PORT/DB to share one store between servers
    capacity_bytes: int | None = None
    write_token: str | None = None
    read_token: str | None = None
    max_blob_bytes: int = 1 << 30  # bodies over this get 413
    max_manifest_bytes: int = 16 << 20
    read_timeout_s: float = 30.0  # a client that sends nothing for this long is dropped
    memory_bytes: int = 256 << 20  # verified blobs kept in each worker's memory, least recently used out first


class Metrics:
    """Counters of this server (summed over its workers when it has several), and the store's size."""

    def __init__(self, store: Store):
        self.registry = CollectorRegistry()
        counters = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # workers: each counts in its own file, any one adds them up
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(self.registry)
            counters = None
        self.hits = Counter("celslm_cache_hits", "Blob and manifest reads that found the object", registry=counters)
        self.misses = Counter("celslm_cache_misses", "Blob and manifest reads that did not", registry=counters)
        self.bytes_in = Counter("celslm_bytes_in", "Bytes received in uploads", registry=counters)
        self.bytes_out = Counter("celslm_bytes_out", "Blob bytes sent", registry=counters)
        self.evictions = Counter("celslm_evictions", "Artifacts evicted since start", registry=counters)
        # read from the store when scraped: the store is shared by all workers
        self.registry.register(ReadWhenScraped(lambda: [
            GaugeMetricFamily("celslm_store_bytes", "Bytes of blobs stored", value=store.usage_bytes())]))


@dataclass(frozen=True)
class State:
    """What every handler works on, as `request.app[STATE]`: a test or a bench peer builds an app over
    its own (`app_for`) and reuses the handlers."""

    config: ServerConfig
    store: Store
    metrics: Metrics
    memory: ByteLRU[bytes]  # blobs already read and verified: a hot blob is sent without a disk read or a rehash

    @classmethod
    def open(cls, config: ServerConfig) -> State:
        store = open_store(config.store, config.capacity_bytes)
        store.stale_tmp()
        # one blob never takes more than an eighth of the memory
        return cls(config, store, Metrics(store), ByteLRU(config.memory_bytes, largest_bytes=config.memory_bytes // 8))


STATE = web.AppKey("state", State)


def make_app(config: ServerConfig) -> web.Application:
    return app_for(State.open(config))


def app_for(state: State) -> web.Application:
    config = state.config
    writes = ("PUT", "POST", "DELETE")
    middleware = guard(lambda request: config.write_token if request.method in writes else config.read_token,
                       lambda status, exc: web.Response(status=status, text=f"{exc}\n"))
    app = web.Application(middlewares=[middleware], client_max_size=config.max_manifest_bytes)
    app[STATE] = state
    store = state.store
    add_health_and_metrics(app, lambda: {"store_bytes": store.usage_bytes(), "capacity_bytes": store.capacity_bytes},
                           state.metrics.registry)
    app.add_routes(ROUTES)
    return app


async def get_blob(request: web.Request) -> web.StreamResponse:
    """Every blob sent is verified first: a stored copy gone bad is quarantined and answered 404,
    so the client asks its next tier and a new push can replace it. A hot blob's GET is answered
    from the verified copy in memory: from a directory, while its file is still there; from Redis
    without asking (the bytes are right either way). HEAD, which decides what a push uploads,
    always asks the store, so a push repairs a blob the store has lost."""
    state = request.app[STATE]
    store, metrics = state.store, state.metrics
    digest = request.match_info["digest"]
    path = store.blob_file(digest)
    hot = request.method == "GET" and (path is not None or not store.on_disk)
    data = state.memory.get(digest) if hot else None
    if data is not None:
        return _send(request, digest, data)
    try:
        large = path is not None and path.stat().st_size > SMALL_BLOB_BYTES
    except FileNotFoundError:
        large = False
    if large:  # streamed from disk with sendfile (Range and HEAD handled by aiohttp) once its hash is checked
        with store.reading(digest):
            if not await asyncio.to_thread(store.check_blob, digest):
                metrics.misses.inc()
                raise web.HTTPNotFound(text=f"no blob {digest}\n")
            metrics.hits.inc()
            response = _BlobFile(path, headers={"Docker-Content-Digest": digest})
            await response.prepare(request)
            if request.method == "GET":
                metrics.bytes_out.inc(response.content_length or 0)
            return response
    data = await asyncio.to_thread(store.read_blob, digest)  # a KV block: one read, verified
    if data is None:
        metrics.misses.inc()
        raise web.HTTPNotFound(text=f"no blob {digest}\n")
    state.memory.put(digest, data)
    return _send(request, digest, data)


def _send(request: web.Request, digest: str, data: bytes) -> web.Response:
    metrics = request.app[STATE].metrics
    metrics.hits.inc()
    headers = {"Docker-Content-Digest": digest, "Accept-Ranges": "bytes"}
    status, body = 200, data
    if "Range" in request.headers:
        try:
            start, stop, _ = request.http_range.indices(len(data))
        except ValueError:  # a malformed header: nothing of it can be satisfied
            start, stop = 0, 0
        if start >= stop:
            raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{len(data)}"})
        status, body = 206, data[start:stop]
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
    if request.method == "GET":
        metrics.bytes_out.inc(len(body))
    return web.Response(status=status, body=body if request.method == "GET" else None, headers=headers,
                        content_type="application/octet-stream")


async def put_blob(request: web.Request) -> web.Response:
    state = request.app[STATE]
    store, config = state.store, state.config
    digest = request.match_info["digest"]
    if request.content_length is not None and request.content_length > config.max_blob_bytes:
        raise web.HTTPRequestEntityTooLarge(max_size=config.max_blob_bytes, actual_size=request.content_length)
    if store.capacity_bytes is not None and (request.content_length or 0) > store.capacity_bytes:
        raise web.HTTPInsufficientStorage(text=f"a blob of {request.content_length:,} bytes; the store holds "
                                               f"{store.capacity_bytes:,}\n")
    if await asyncio.to_thread(store.check_blob, digest):  # a corrupt copy is quarantined and replaced
        await _drain(request, config)
        return web.Response(status=200, text="exists\n")
    writer = store.blob_writer(digest)
    try:
        while True:
            chunk = await asyncio.wait_for(request.content.readany(), config.read_timeout_s)
            if not chunk:
                break
            if store.on_disk:
                writer.write(chunk)
            else:  # a Redis write of a whole part may wait out a failover: off the event loop
                await asyncio.to_thread(writer.write, chunk)
            if writer.size > config.max_blob_bytes:
                raise web.HTTPRequestEntityTooLarge(max_size=config.max_blob_bytes, actual_size=writer.size)
        if request.content_length is not None and writer.size != request.content_length:
            raise web.HTTPBadRequest(text="upload ended early\n")
        await asyncio.to_thread(writer.commit)  # verifies the digest; a mismatch raises IntegrityError (422)
    except asyncio.TimeoutError as exc:
        await _abort(writer, store)
        raise web.HTTPRequestTimeout(text="client too slow\n") from exc
    except BaseException:
        await _abort(writer, store)  # a killed upload leaves no object
        raise
    state.metrics.bytes_in.inc(writer.size)
    return web.Response(status=201, text="created\n")


async def get_artifact(request: web.Request) -> web.Response:
    state = request.app[STATE]
    data = await asyncio.to_thread(state.store.get_manifest, request.match_info["digest"])
    if data is None:
        state.metrics.misses.inc()
        raise web.HTTPNotFound(text="no such artifact\n")
    state.metrics.hits.inc()
    return web.Response(body=data, content_type=MEDIA_MANIFEST)


async def put_artifact(request: web.Request) -> web.Response:
    state = request.app[STATE]
    store = state.store
    data = await _read_small(request, state.config.max_manifest_bytes, state.config)
    evicted = store.evictions
    missing = await asyncio.to_thread(store.put_manifest, request.match_info["digest"], data)
    state.metrics.evictions.inc(max(0, store.evictions - evicted))
    if missing:
        return web.json_response({"error": "missing blobs", "missing": missing}, status=409)
    state.metrics.bytes_in.inc(len(data))
    return web.Response(status=201, text="created\n")


async def get_signatures(request: web.Request) -> web.Response:
    signatures = await asyncio.to_thread(request.app[STATE].store.get_signatures, request.match_info["digest"])
    return web.json_response([sig.to_json() for sig in signatures])


async def put_signatures(request: web.Request) -> web.Response:
    return await _put_side_record(request, SIGNATURES_NAME, 64 << 10, "signed")


async def get_timings(request: web.Request) -> web.Response:
    timings = await asyncio.to_thread(request.app[STATE].store.get_timings, request.match_info["digest"])
    return web.json_response(timings.to_json())


async def put_timings(request: web.Request) -> web.Response:
    return await _put_side_record(request, TIMINGS_NAME, 4096, "stored")


async def _put_side_record(request: web.Request, name: str, limit: int, done: str) -> web.Response:
    """Signatures or timings: checked as a client reads them, then stored beside the artifact."""
    state = request.app[STATE]
    digest = request.match_info["digest"]
    record = read_side_record(name, await _read_small(request, limit, state.config), digest)
    store_it = state.store.put_signatures if name == SIGNATURES_NAME else state.store.put_timings
    await asyncio.to_thread(store_it, digest, record)
    return web.Response(status=201, text=f"{done}\n")


async def get_tag(request: web.Request) -> web.Response:
    artifact_id = await asyncio.to_thread(request.app[STATE].store.get_tag, request.match_info["name"])
    if artifact_id is None:
        raise web.HTTPNotFound(text="no such tag\n")
    return web.Response(text=artifact_id)


async def get_tag_statement(request: web.Request) -> web.Response:
    signed = await asyncio.to_thread(request.app[STATE].store.get_signed_tag, request.match_info["name"])
    if signed is None:
        raise web.HTTPNotFound(text="no signed statement for this tag\n")
    return web.Response(body=signed.to_bytes(), content_type="application/json")


async def put_tag(request: web.Request) -> web.Response:
    """The body is an artifact id (an unsigned tag) or a signed statement {statement, signatures}."""
    state = request.app[STATE]
    name = request.match_info["name"]
    body = (await _read_small(request, 64 << 10, state.config)).strip()
    if DIGEST.match(body.decode(errors="replace")):
        artifact_id, signed = body.decode(), None
    else:
        signed = SignedTag.from_bytes(body, f"tag {name}")
        artifact_id = signed.statement.artifact
    await asyncio.to_thread(state.store.put_tag, name, artifact_id, signed)
    return web.Response(status=201, text="tagged\n")


async def get_codebook(request: web.Request) -> web.Response:
    digest = await asyncio.to_thread(request.app[STATE].store.get_codebook, request.match_info["fingerprint"])
    if digest is None:
        raise web.HTTPNotFound(text="no codebook for this model here\n")
    return web.Response(text=digest)


NO_ARTIFACT = {"artifact": None, "chunks": 0}  # what a lookup that finds nothing answers (the client's "none")


async def lookup(request: web.Request) -> web.Response:
    """The longest cached prefix of `prefix=h1,h2,…` whose artifact is of model space `space`."""
    state = request.app[STATE]
    prefixes = [p for p in request.query.get("prefix", "").split(",") if p]
    if not prefixes:
        raise UsageError("lookup needs prefix=h1,h2,...")
    found = await asyncio.to_thread(state.store.lookup, prefixes)
    data = None
    if found is not None:  # evicted since the index was read: None, the same as never found
        data = await asyncio.to_thread(state.store.get_manifest, found[0])
    space = request.query.get("space")
    if data is None or (space and Manifest.from_bytes(data, found[0]).space.fingerprint != space):
        state.metrics.misses.inc()
        return web.json_response(NO_ARTIFACT)
    state.metrics.hits.inc()
    return web.json_response({"artifact": found[0], "chunks": found[1]})


ROUTES = [  # web.get answers HEAD too
    web.get(f"/v1/blobs/{DIGEST_ROUTE}", get_blob),
    web.put(f"/v1/blobs/{DIGEST_ROUTE}", put_blob),
    web.get(f"/v1/artifacts/{DIGEST_ROUTE}", get_artifact),
    web.put(f"/v1/artifacts/{DIGEST_ROUTE}", put_artifact),
    web.get(f"/v1/artifacts/{DIGEST_ROUTE}/signatures", get_signatures),
    web.put(f"/v1/artifacts/{DIGEST_ROUTE}/signatures", put_signatures),
    web.get(f"/v1/artifacts/{DIGEST_ROUTE}/timings", get_timings),
    web.put(f"/v1/artifacts/{DIGEST_ROUTE}/timings", put_timings),
    web.get(f"/v1/tags/{TAG_ROUTE}", get_tag),
    web.put(f"/v1/tags/{TAG_ROUTE}", put_tag),
    web.get(f"/v1/tags/{TAG_ROUTE}/statement", get_tag_statement),
    web.get("/v1/lookup", lookup),
    web.get("/v1/codebooks/{fingerprint:[0-9a-f]{64}}", get_codebook),
]


async def _abort(writer, store: Store) -> None:
    """Drop an upload's bytes: on disk at once; in Redis (network calls that may wait out a failover)
    off the event loop, and even if this request is being cancelled."""
    if store.on_disk:
        writer.abort()
    else:
        await asyncio.shield(asyncio.to_thread(writer.abort))


class _BlobFile(web.FileResponse):
    """A FileResponse prepared inside the handler (so the blob stays pinned while it is sent); aiohttp
    prepares it again when the handler returns, which FileResponse does not expect."""

    async def prepare(self, request):
        return None if self.prepared else await super().prepare(request)


async def _read_small(request: web.Request, limit: int, config: ServerConfig) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    body = bytearray()
    while chunk := await asyncio.wait_for(request.content.readany(), config.read_timeout_s):
        body += chunk
        if len(body) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(body))
    return bytes(body)


async def _drain(request: web.Request, config: ServerConfig) -> None:
    while await asyncio.wait_for(request.content.readany(), config.read_timeout_s):
        pass


def serve(config: ServerConfig, sock, workers: int = 1, ssl_context=None, log: Callable[[str], None] = print,
          app: web.Application | None = None) -> None:
    """Serve on a listening socket until SIGTERM or SIGINT: in this process (`app` if given), or in
    `workers` forked processes (each with its own event loop and store client) that a supervisor
    restarts if one dies."""
    if workers <= 1:
        _run(app or make_app(config), sock, ssl_context)
        return
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        raise UsageError("several workers count in PROMETHEUS_MULTIPROC_DIR (a fresh directory), set before "
                         "prometheus_client is imported")
    _supervise(config, sock, workers, ssl_context, log)


def _run(app: web.Application, sock, ssl_context) -> None:
    # run_app handles SIGTERM/SIGINT: it stops accepting and lets in-flight requests finish.
    web.run_app(app, sock=sock, ssl_context=ssl_context, print=None, shutdown_timeout=30, access_log=None)


RESTARTS = 5  # workers that die this often within RESTART_WINDOW_S stop the server: they cannot start
RESTART_WINDOW_S = 30.0


def _start_worker(config: ServerConfig, sock, ssl_context, log) -> int:
    pid = os.fork()
    if pid == 0:  # the worker: serve until told to stop, and never return into the supervisor's code
        code = 1
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the supervisor's handlers, until run_app sets its own
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            _die_with_parent()
            _run(make_app(config), sock, ssl_context)
            code = 0
        except BaseException as exc:  # one line, then the supervisor decides
            log(f"serve-cache: worker {os.getpid()}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
        finally:
            os._exit(code)
    return pid


def _die_with_parent() -> None:
    """Ask Linux to send this worker SIGTERM when the supervisor dies, so no orphan keeps the port."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: a worker outlives a killed supervisor


def _supervise(config: ServerConfig, sock, workers: int, ssl_context, log) -> None:
    """Start the workers, restart one that dies (at most one restart a second), and on SIGTERM/SIGINT
    pass SIGTERM on and wait for them to finish their requests. Workers that keep dying (RESTARTS in
    RESTART_WINDOW_S: a store they cannot open) stop the server with an error."""
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    pids = {_start_worker(config, sock, ssl_context, log) for _ in range(workers)}
    restarts: list[float] = []
    try:
        while not stopping:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.2)
                continue
            pids.discard(pid)
            now = time.monotonic()
            restarts = [at for at in restarts if at > now - RESTART_WINDOW_S] + [now]
            if len(restarts) >= RESTARTS:  # the RESTARTS-th death stops it
                raise UnavailableError(f"workers exited {len(restarts)} times in {RESTART_WINDOW_S:g} s (the last: "
                                       f"{_exit_text(status)}); stopping")
            log(f"serve-cache: worker {pid} exited ({_exit_text(status)}); starting another")
            time.sleep(max(0.0, restarts[-2] + 1.0 - now) if len(restarts) > 1 else 0.0)
            if not stopping:
                pids.add(_start_worker(config, sock, ssl_context, log))
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 40
        while pids and time.monotonic() < deadline:
            for pid in list(pids):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    pids.discard(pid)
            time.sleep(0.1)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _exit_text(status: int) -> str:
    return f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"code {os.WEXITSTATUS(status)}"
