"""What celslm's two aiohttp servers share: serve-cache (`server.py`) and the edge service (`service.py`).

- bearer tokens, compared in constant time: no token 401 (`WWW-Authenticate: Bearer`), a wrong one 403;
- one table from library errors to HTTP statuses (`status_of`): each server writes the body its own
  way (plain text, OpenAI error JSON), the status is the same in both;
- `GET /v1/health` (always open: load balancers and supervisors ask it) and `GET /metrics`
  (Prometheus text), whose contents each server supplies;
- `ByteLRU`, the one memory cache bounded in bytes.
"""

from __future__ import annotations

import asyncio
import hmac
from collections import OrderedDict
from typing import Callable, Generic, Iterable, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from celslm.confidential import Sealed
from celslm.errors import (CelslmError, InsufficientStorage, IntegrityError, ModelSpaceMismatch, NotFound, OutputExists,
                           Overloaded, TokenRequired, UnavailableError, UsageError)
from celslm.trust import Untrusted

HEALTH_PATH = "/v1/health"
METRICS_PATH = "/metrics"

# The status of each library error, by its most specific class listed here (a subclass not listed,
# such as the client's DeadlineExceeded, gets its parent's). README's "HTTP statuses" table is this one.
STATUS_OF_ERROR: dict[type[CelslmError], int] = {
    NotFound: 404,  # no tier or store holds it
    Sealed: 403,  # encrypted, and this server is not one of its recipients
    OutputExists: 409,
    TokenRequired: 502,  # a server this one fetches from wants a token this one was not given
    ModelSpaceMismatch: 400,  # a context of another model
    UsageError: 400,  # the request itself is wrong
    Untrusted: 403,  # refused by the trust policy
    IntegrityError: 422,  # bytes that do not verify: a digest, a signature, a malformed manifest
    InsufficientStorage: 507,  # the store cannot take it without losing it
    Overloaded: 429,  # too much work in flight: ask again after Retry-After
    UnavailableError: 503,  # a store or tier that cannot be reached: ask again later, or elsewhere
    CelslmError: 500,
}


T = TypeVar("T")


def by_class(table: dict[type, T], exc: BaseException) -> T:
    """The entry of `table` for the most specific class of `exc` it lists."""
    return next(table[cls] for cls in type(exc).__mro__ if cls in table)


def status_of(exc: CelslmError) -> int:
    return by_class(STATUS_OF_ERROR, exc)


def authorize(request: web.Request, token: str | None) -> None:
    """Pass, or raise 401 (no bearer token) or 403 (another one); `token` None lets everyone in."""
    if token is None:
        return
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        raise web.HTTPUnauthorized(text="a bearer token is required (Authorization: Bearer ...)\n",
                                   headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(header.removeprefix("Bearer ").encode(), token.encode()):
        raise web.HTTPForbidden(text="wrong token\n")


def guard(token_for: Callable[[web.Request], str | None],
          render: Callable[[int, CelslmError], web.Response]) -> Callable:
    """The middleware both servers run: the bearer check (`token_for` the request; health stays open),
    then the handler, a library error it raises answered with `status_of` it, written by `render`."""

    @web.middleware
    async def guarded(request: web.Request, handler):
        if request.path != HEALTH_PATH:
            authorize(request, token_for(request))
        try:
            return await handler(request)
        except CelslmError as exc:
            return render(status_of(exc), exc)

    return guarded


HEALTH = web.AppKey("health", Callable[[], dict])  # the fields /v1/health reports besides "status"
REGISTRY = web.AppKey("registry", CollectorRegistry)


def add_health_and_metrics(app: web.Application, health: Callable[[], dict], registry: CollectorRegistry) -> None:
    app[HEALTH], app[REGISTRY] = health, registry
    app.router.add_get(HEALTH_PATH, health_route)
    app.router.add_get(METRICS_PATH, metrics_route)


async def health_route(request: web.Request) -> web.Response:
    fields = await asyncio.to_thread(request.app[HEALTH])  # may ask a store over the network: off the event loop
    return web.json_response({"status": "ok", **fields})


async def metrics_route(request: web.Request) -> web.Response:
    body = await asyncio.to_thread(generate_latest, request.app[REGISTRY])
    return web.Response(body=body, content_type="text/plain")


class ReadWhenScraped:
    """A Prometheus collector of values read at each scrape (a store's size, a cache's bytes)."""

    def __init__(self, read: Callable[[], Iterable[Metric]]):
        self.read = read

    def collect(self) -> Iterable[Metric]:
        yield from self.read()


V = TypeVar("V")


class ByteLRU(Generic[V]):
    """Values by key within `budget_bytes`, least recently used out first. A value over `largest_bytes`
    (default: the whole budget) is not kept, so one value never pushes out everything else."""

    def __init__(self, budget_bytes: int, size_of: Callable[[V], int] = len, largest_bytes: int | None = None):
        self.budget_bytes, self.size_bytes = budget_bytes, 0
        self.largest_bytes = budget_bytes if largest_bytes is None else largest_bytes
        self.size_of = size_of
        self._values: OrderedDict[str, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._values)

    def get(self, key: str) -> V | None:
        value = self._values.get(key)
        if value is not None:
            self._values.move_to_end(key)
        return value

    def put(self, key: str, value: V) -> None:
        if self.size_of(value) > self.largest_bytes:
            return
        if key in self._values:
            self.size_bytes -= self.size_of(self._values.pop(key))
        self._values[key] = value
        self.size_bytes += self.size_of(value)
        while self.size_bytes > self.budget_bytes:
            self.size_bytes -= self.size_of(self._values.popitem(last=False)[1])
