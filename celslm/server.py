"""The aiohttp app behind `celslm serve-cache`: the cloud and every edge peer run the same one.

    GET  /v1/health                         liveness and store usage
    GET  /metrics                           Prometheus text: hits, misses, bytes in/out, evictions
    HEAD|GET /v1/blobs/sha256:<hex>         a blob (Range, If-None-Match), or a 307 to where it lies (--blob-base, --presign)
    PUT  /v1/blobs/sha256:<hex>             upload, streamed; digest checked on arrival; idempotent
    PUT|GET /v1/artifacts/sha256:<hex>      a manifest; a PUT whose blobs are missing gets 409 listing them
    PUT|GET /v1/artifacts/sha256:<hex>/signatures   producers' signatures over the id (a PUT adds)
    PUT|GET /v1/artifacts/sha256:<hex>/timings      the cloud's seconds (side record, unsigned)
    PUT|GET|DELETE /v1/tags/<name>          a mutable name -> artifact id; a PUT may carry a signed statement
    GET  /v1/tags/<name>/statement          the tag's signed statement (404 if it has none)
    GET  /v1/lookup?space=<fp>&prefix=h1,…  the longest cached prefix: artifact id and chunk count

A write token guards PUT; an optional read token guards GET and HEAD; /v1/health stays open. The
bearer check, the status of each library error and the health and metrics routes are celslm.httpserver's,
shared with the edge service. Every handler is a module function over `request.app[STATE]`.

With tenants (tenants.py) each tenant's token writes only its namespace's tags (403 outside it) and
holds at most its quota (507 past it, refused before anything is written); `request[TENANT]` is the
tenant a request came from, None for the write and read tokens and open reads, which are not limited.

Blobs are immutable and content-addressed, and every client verifies them, so any HTTP cache may
keep them: their answers say `Cache-Control: public, max-age=31536000, immutable` with the digest as
ETag. A GET may instead be redirected (307) to the same bytes elsewhere: `blob_base/blobs/<hex>` (a
CDN or static server over the store's files) or the store's own presigned URL (`presign`), so that
the bytes never pass through Python. HEAD, which decides what a push uploads, and manifests, tags and
lookups, which carry policy, are always answered here; they may be cached for `SMALL_MAX_AGE_S`
(manifests: immutable too) or not at all (tags and lookups, which move).

`serve` runs the app in one process, or in N forked workers that accept on one listening socket
(the pre-fork model of gunicorn and nginx): the kernel hands each connection to one of them. Their
counters live in prometheus_client's multiprocess files (PROMETHEUS_MULTIPROC_DIR, which the caller
sets before prometheus_client is imported), so /metrics, answered by any worker, adds them all up.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
from dataclasses import dataclass
from typing import Callable

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

from celslm.errors import UnavailableError, UsageError
from celslm.httpserver import HEALTH_PATH, ByteLRU, ReadWhenScraped, add_health_and_metrics, authorize, guard
from celslm.manifest import DIGEST, MEDIA_MANIFEST, SIGNATURES_NAME, TIMINGS_NAME, read_side_record, sha256_digest
from celslm.tenants import Ledger, Tenant, tenant_of
from celslm.trust import SignedTag
from celslm.store import Store, open_store
from celslm.store.base import IMMUTABLE, NAMESPACE, check_tag

DIGEST_ROUTE = r"{digest:sha256:[0-9a-f]{64}}"
TAG_ROUTE = rf"{{name:(?:{NAMESPACE}/)?[A-Za-z0-9][A-Za-z0-9._:-]{{0,127}}}}"  # store.base.TAG
WRITES = ("PUT", "POST", "DELETE")
SMALL_BLOB_BYTES = 4 << 20  # blobs up to this size are sent from memory; bigger ones stream with sendfile
GUARDED = "private, max-age=31536000, immutable"  # the same where reads need a token: no shared cache keeps them
MOVING = "no-cache"  # tags and lookups: a cache must ask again each time


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
    tenants: tuple[Tenant, ...] = ()  # write tokens each limited to a tag namespace and a quota (tenants.py)
    blob_base: str | None = None  # GET of a blob: 307 to blob_base/blobs/<hex> (a CDN or static server over the store)
    presign: bool = False  # GET of a blob: 307 to the store's presigned URL (an object store's)


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
        self.redirects = Counter("celslm_blob_redirects", "Blob reads answered with a redirect", registry=counters)
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
    ledger: Ledger | None = None  # what each tenant holds, with tenants

    @classmethod
    def open(cls, config: ServerConfig) -> State:
        if config.tenants and config.capacity_bytes is not None:
            raise UsageError("a capacity evicts whole artifacts, whichever tenant holds them: with tenants, "
                             "their quotas bound the store instead")
        return cls.over(config, open_store(config.store, config.capacity_bytes))

    @classmethod
    def over(cls, config: ServerConfig, store: Store) -> State:
        """The state of a server over `store`, whatever it is (what `config.store` names, opened by
        `open`, or one a test or a bench builds: the faulty store of celslm.testing.faults)."""
        if config.presign and store.blob_url("sha256:" + "0" * 64) is None:
            raise UsageError(f"store {store.url} has no presigned URLs to redirect to; --presign needs an s3:// store")
        if config.tenants and type(store).update is Store.update:
            raise UsageError(f"store {config.store} cannot keep tenants' ledgers; use a directory or Redis")
        store.stale_tmp()
        # one blob never takes more than an eighth of the memory
        return cls(config, store, Metrics(store), ByteLRU(config.memory_bytes, largest_bytes=config.memory_bytes // 8),
                   Ledger(store) if config.tenants else None)


STATE = web.AppKey("state", State)
CLIENT = web.AppKey("client", aiohttp.ClientSession)  # reads blobs from an object store's URLs
TENANT = web.RequestKey("tenant", Tenant | None)


def make_app(config: ServerConfig) -> web.Application:
    return app_for(State.open(config))


def app_for(state: State, middlewares=()) -> web.Application:
    """serve-cache's app over `state`; `middlewares` run inside its own (the faults of celslm.testing)."""
    config = state.config
    app = web.Application(middlewares=[*middlewares_of(config), *middlewares], client_max_size=config.max_manifest_bytes)
    app[STATE] = state
    store = state.store
    add_health_and_metrics(app, lambda: {"store_bytes": store.usage_bytes(), "capacity_bytes": store.capacity_bytes},
                           state.metrics.registry)
    app.add_routes(ROUTES)
    app.on_cleanup.append(_close_client)
    return app


def middlewares_of(config: ServerConfig) -> list:
    """The bearer check (with tenants, theirs) and the status of each library error."""
    render = lambda status, exc: web.Response(status=status, text=f"{exc}\n")  # noqa: E731
    if config.tenants:  # the tenant guard checks tokens; guard only answers library errors
        return [_tenant_guard(config), guard(lambda request: None, render)]
    return [guard(lambda request: config.write_token if request.method in WRITES else config.read_token, render)]


def _tenant_guard(config: ServerConfig) -> Callable:
    """The bearer check with tenants: a tenant's token (found by its hash) writes within its limits;
    otherwise the write and read tokens work as without tenants. Reads need a token once there is a
    read token or a tenant that reads only its own (open reads would let anyone past that)."""
    reads_need_token = config.read_token is not None or any(t.reads_own_only for t in config.tenants)
    nobody = secrets.token_urlsafe(32)  # no client holds it: where no token was given, every token is refused

    @web.middleware
    async def identify(request: web.Request, handler):
        header = request.headers.get("Authorization", "")
        tenant = tenant_of(config.tenants, header.removeprefix("Bearer ")) if header.startswith("Bearer ") else None
        write = request.method in WRITES
        if tenant is None and request.path != HEALTH_PATH and (write or reads_need_token):
            authorize(request, (config.write_token if write else config.read_token) or nobody)
        request[TENANT] = tenant
        return await handler(request)

    return identify


def _may_write_tag(request: web.Request, name: str) -> None:
    tenant = request.get(TENANT)
    if tenant is not None and not tenant.owns_tag(name):
        raise web.HTTPForbidden(text=f"tag {name} is outside this token's namespace {tenant.name}/\n")


def _may_read_tag(request: web.Request, name: str) -> None:
    tenant = request.get(TENANT)
    if tenant is not None and tenant.reads_own_only and not tenant.owns_tag(name):
        raise web.HTTPForbidden(text=f"tag {name} is outside this token's namespace {tenant.name}/\n")


async def _must_hold(request: web.Request, artifact_id: str, reading: bool = False) -> None:
    """A tenant changes (and, reading only its own, reads) only artifacts it holds: 403 otherwise,
    whether or not the artifact is stored, so the answer tells nothing about others'."""
    tenant = request.get(TENANT)
    if tenant is None or (reading and not tenant.reads_own_only):
        return
    if not await asyncio.to_thread(request.app[STATE].ledger.holds, tenant, artifact_id):
        raise web.HTTPForbidden(text=f"artifact {artifact_id} is not one tenant {tenant.name} holds; push it "
                                     "with this token first\n")


async def get_blob(request: web.Request) -> web.StreamResponse:
    """Every blob sent is verified first: a stored copy gone bad is quarantined and answered 404,
    so the client asks its next tier and a new push can replace it. A hot blob's GET is answered
    from the verified copy in memory: from a directory, while its file is still there; from Redis
    without asking (the bytes are right either way). HEAD, which decides what a push uploads,
    always asks the store, so a push repairs a blob the store has lost."""
    state = request.app[STATE]
    store, metrics, config = state.store, state.metrics, state.config
    digest = request.match_info["digest"]
    if digest in (tag.value for tag in request.if_none_match or ()):  # the client holds these very bytes
        raise web.HTTPNotModified(headers=_blob_headers(request, digest))
    if request.method == "GET" and (config.blob_base or config.presign):
        metrics.redirects.inc()
        location = store.blob_url(digest) if config.presign else f"{config.blob_base}/blobs/{digest.removeprefix('sha256:')}"
        raise web.HTTPTemporaryRedirect(location, headers={"Cache-Control": "no-store"})
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
            response = _BlobFile(path, headers=_blob_headers(request, digest))
            await response.prepare(request)
            if request.method == "GET":
                metrics.bytes_out.inc(response.content_length or 0)
            return response
    url = store.blob_url(digest) if not store.on_disk else None
    if url is not None:  # an object store: fetched in this event loop (no thread, no client library), verified
        data = await _fetch(request.app, url, digest)
    else:
        data = await asyncio.to_thread(store.read_blob, digest)  # a KV block: one read, verified
    if data is None:
        metrics.misses.inc()
        raise web.HTTPNotFound(text=f"no blob {digest}\n")
    state.memory.put(digest, data)
    return _send(request, digest, data)


async def _fetch(app: web.Application, url: str, digest: str) -> bytes | None:
    """A blob from its store's own URL (presigned), read no further than --max-blob and verified: None if
    the store does not have it, or has it corrupt (then quarantined, so a push can replace it)."""
    state = app[STATE]
    if CLIENT not in app:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=state.config.read_timeout_s)
        app[CLIENT] = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
    limit = state.config.max_blob_bytes
    try:
        async with app[CLIENT].get(url) as response:
            if response.status in (403, 404):  # no such key (403 where listing is not allowed)
                return None
            if response.status != 200 or (response.content_length or 0) > limit:
                raise UnavailableError(f"{state.store.url}: blob {digest}: HTTP {response.status} from the store")
            if response.content_length is not None:  # read whole, as declared (a body cut short raises)
                data = await response.read()
            else:
                data = bytearray()
                async for chunk in response.content.iter_chunked(1 << 16):
                    data += chunk
                    if len(data) > limit:
                        raise UnavailableError(f"{state.store.url}: blob {digest}: more than {limit:,} bytes from the store")
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:  # a body cut off short is one of these
        raise UnavailableError(f"{state.store.url}: blob {digest}: {str(exc)[:120] or type(exc).__name__}") from exc
    if sha256_digest(data) != digest:  # the whole body, as the store holds it: corrupt
        await asyncio.to_thread(state.store.quarantine, digest)
        return None
    return bytes(data)


async def _close_client(app: web.Application) -> None:
    if CLIENT in app:
        await app[CLIENT].close()


def _blob_headers(request: web.Request, digest: str) -> dict:
    return {"Docker-Content-Digest": digest, "ETag": f'"{digest}"', "Cache-Control": _immutable(request)}


def _immutable(request: web.Request) -> str:
    """How long an answer named by its digest may be kept, and by whom: any cache while reads are open,
    only the client's own once they need a token (a shared cache would hand them to anyone)."""
    config = request.app[STATE].config
    return GUARDED if config.read_token or any(t.reads_own_only for t in config.tenants) else IMMUTABLE


def _send(request: web.Request, digest: str, data: bytes) -> web.Response:
    metrics = request.app[STATE].metrics
    metrics.hits.inc()
    headers = {**_blob_headers(request, digest), "Accept-Ranges": "bytes"}
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
    tenant = request.get(TENANT)
    if tenant is not None and request.content_length is not None:  # refused before a byte is read
        await asyncio.to_thread(state.ledger.check_room, tenant, request.content_length, f"blob {digest}")
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
        if tenant is not None:  # charged before it is kept: past the quota (507) nothing is kept
            await asyncio.to_thread(state.ledger.reserve_blob, tenant, digest, writer.size)
        try:
            await asyncio.to_thread(writer.commit)  # verifies the digest; a mismatch raises IntegrityError (422)
        except BaseException:
            if tenant is not None:
                await asyncio.shield(asyncio.to_thread(state.ledger.release_blob, tenant, digest))
            raise
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
    await _must_hold(request, request.match_info["digest"], reading=True)
    data = await asyncio.to_thread(state.store.get_manifest, request.match_info["digest"])
    if data is None:
        state.metrics.misses.inc()
        raise web.HTTPNotFound(text="no such artifact\n")
    state.metrics.hits.inc()
    return web.Response(body=data, content_type=MEDIA_MANIFEST, headers={"Cache-Control": _immutable(request)})


async def put_artifact(request: web.Request) -> web.Response:
    """`?tag=NAME` says which tag the push will set, so a tag the token may not write is refused (403)
    before any blob is sent; a tenant's quota is checked (507) whether blobs are missing (409) or not."""
    state = request.app[STATE]
    store, tenant = state.store, request.get(TENANT)
    artifact_id = request.match_info["digest"]
    if "tag" in request.query:
        _may_write_tag(request, check_tag(request.query["tag"]))
    data = await _read_small(request, state.config.max_manifest_bytes, state.config)
    charged = tenant is not None and await asyncio.to_thread(state.ledger.charge, tenant, artifact_id, data)
    evicted = store.evictions
    try:
        missing = await asyncio.to_thread(store.put_manifest, artifact_id, data)
    except BaseException:
        if charged:
            await asyncio.shield(asyncio.to_thread(state.ledger.release, tenant, artifact_id))
        raise
    if charged and missing:  # a blob gone since the charge: the push uploads it and tries again
        await asyncio.to_thread(state.ledger.release, tenant, artifact_id)
    state.metrics.evictions.inc(max(0, store.evictions - evicted))
    if missing:
        return web.json_response({"error": "missing blobs", "missing": missing}, status=409)
    state.metrics.bytes_in.inc(len(data))
    return web.Response(status=201, text="created\n")


async def get_signatures(request: web.Request) -> web.Response:
    await _must_hold(request, request.match_info["digest"], reading=True)
    signatures = await asyncio.to_thread(request.app[STATE].store.get_signatures, request.match_info["digest"])
    return web.json_response([sig.to_json() for sig in signatures])


async def put_signatures(request: web.Request) -> web.Response:
    return await _put_side_record(request, SIGNATURES_NAME, 64 << 10, "signed")


async def get_timings(request: web.Request) -> web.Response:
    await _must_hold(request, request.match_info["digest"], reading=True)
    timings = await asyncio.to_thread(request.app[STATE].store.get_timings, request.match_info["digest"])
    return web.json_response(timings.to_json())


async def put_timings(request: web.Request) -> web.Response:
    return await _put_side_record(request, TIMINGS_NAME, 4096, "stored")


async def _put_side_record(request: web.Request, name: str, limit: int, done: str) -> web.Response:
    """Signatures or timings: checked as a client reads them, then stored beside the artifact."""
    state = request.app[STATE]
    digest = request.match_info["digest"]
    await _must_hold(request, digest)
    record = read_side_record(name, await _read_small(request, limit, state.config), digest)
    store_it = state.store.put_signatures if name == SIGNATURES_NAME else state.store.put_timings
    await asyncio.to_thread(store_it, digest, record)
    return web.Response(status=201, text=f"{done}\n")


async def get_tag(request: web.Request) -> web.Response:
    _may_read_tag(request, request.match_info["name"])
    artifact_id = await asyncio.to_thread(request.app[STATE].store.get_tag, request.match_info["name"])
    if artifact_id is None:
        raise web.HTTPNotFound(text="no such tag\n")
    return web.Response(text=artifact_id, headers={"Cache-Control": MOVING})


async def get_tag_statement(request: web.Request) -> web.Response:
    _may_read_tag(request, request.match_info["name"])
    signed = await asyncio.to_thread(request.app[STATE].store.get_signed_tag, request.match_info["name"])
    if signed is None:
        raise web.HTTPNotFound(text="no signed statement for this tag\n")
    return web.Response(body=signed.to_bytes(), content_type="application/json", headers={"Cache-Control": MOVING})


async def put_tag(request: web.Request) -> web.Response:
    """The body is an artifact id (an unsigned tag) or a signed statement {statement, signatures}."""
    state = request.app[STATE]
    name = request.match_info["name"]
    _may_write_tag(request, name)
    body = (await _read_small(request, 64 << 10, state.config)).strip()
    if DIGEST.match(body.decode(errors="replace")):
        artifact_id, signed = body.decode(), None
    else:
        signed = SignedTag.from_bytes(body, f"tag {name}")
        artifact_id = signed.statement.artifact
    await _must_hold(request, artifact_id)
    await asyncio.to_thread(state.store.put_tag, name, artifact_id, signed)
    return web.Response(status=201, text="tagged\n")


async def delete_tag(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    _may_write_tag(request, name)
    if not await asyncio.to_thread(request.app[STATE].store.delete_tag, name):
        raise web.HTTPNotFound(text="no such tag\n")
    return web.Response(text="deleted\n")


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
    found = await asyncio.to_thread(state.store.lookup, request.query.get("space") or None, prefixes)
    tenant = request.get(TENANT)
    if found is not None and tenant is not None and tenant.reads_own_only:  # another's artifact: a miss
        found = found if await asyncio.to_thread(state.ledger.holds, tenant, found[0]) else None
    (state.metrics.hits if found else state.metrics.misses).inc()
    answer = {"artifact": found[0], "chunks": found[1]} if found else NO_ARTIFACT
    return web.json_response(answer, headers={"Cache-Control": MOVING})


ROUTES = [  # web.get answers HEAD too
    web.get(f"/v1/blobs/{DIGEST_ROUTE}", get_blob),
    web.put(f"/v1/blobs/{DIGEST_ROUTE}", put_blob),
    web.get(f"/v1/artifacts/{DIGEST_ROUTE}", get_artifact),
    web.put(f"/v1/artifacts/{DIGEST_ROUTE}", put_artifact),
    web.get(f"/v1/artifacts/{DIGEST_ROUTE}/signatures", get_signatures),
    web.put(f"/v1/artifacts/{DIGEST_ROUTE}/signatures", put_signatures),
    web.get(f"/v1/artifacts/{DIGEST_ROUTE}/timings", get_timings),
    web.put(f"/v1/artifacts/{DIGEST_ROUTE}/timings", put_timings),
    web.get(f"/v1/tags/{TAG_ROUTE}/statement", get_tag_statement),  # first: acme/statement is tag acme's statement
    web.get(f"/v1/tags/{TAG_ROUTE}", get_tag),
    web.put(f"/v1/tags/{TAG_ROUTE}", put_tag),
    web.delete(f"/v1/tags/{TAG_ROUTE}", delete_tag),
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
    prepares it again when the handler returns, which FileResponse does not expect. Its ETag stays
    the digest (FileResponse would set one of the file's mtime and size)."""

    @property
    def etag(self):
        return super().etag

    @etag.setter
    def etag(self, value) -> None:
        pass

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
