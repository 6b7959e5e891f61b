"""celslm serve: the warm edge service (OpenAI-compatible API) over shared KV artifacts."""

from __future__ import annotations

import ipaddress
from typing import Annotated

import typer

from celslm.errors import UsageError
from celslm.models import default_engine, load_model
from celslm.store.base import parse_size
from .common import (CacheCapacityOpt, CloudOpt, EngineOpt, IdentityOpt, ModelOpt, PeerOpt, TrustOpt, cache_capacity,
                     examples, for_option, identity, listening_socket, log, progress_bar, trust_policy)

EPILOG = examples(
    "celslm serve -m qwen2.5-coder-0.5b --cloud http://cloud:8470 --trust cloud.pub",
    "celslm serve -m qwen2.5-coder-0.5b --port 8480 --cache-bytes 512MB --peer http://peer:8470",
    "curl -s localhost:8480/v1/chat/completions -d '{\"context\": \"sched:latest\", \"messages\": [{\"role\": \"user\", \"content\": \"What does run return?\"}]}'",
    "celslm decode --server http://127.0.0.1:8480 --kv sched:latest -p 'What does run return?'",
)


def serve(
    model: ModelOpt,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on.")] = 8480,
    token: Annotated[str | None, typer.Option("--token", envvar="CELSLM_API_TOKEN", show_envvar=True,
                                              help="Bearer token every API call must carry (health excepted).")] = None,
    cache_bytes: Annotated[str, typer.Option("--cache-bytes", help="Memory for decoded contexts kept between requests (LRU).")] = "1GiB",
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, max=65536, help="The most tokens one request may ask for.")] = 4096,
    peer: PeerOpt = None,
    cloud: CloudOpt = None,
    cache_token: Annotated[str | None, typer.Option("--cache-token", envvar="CELSLM_TOKEN", show_envvar=True,
                                                    help="Bearer token for the peers' and cloud's serve-cache.")] = None,
    trust: TrustOpt = None,
    identity_: IdentityOpt = None,
    cache_capacity_: CacheCapacityOpt = None,
    engine: EngineOpt = None,
) -> None:
    """Keep a model loaded and answer OpenAI-style requests over shared contexts; the prompt stays here."""
    from aiohttp import web  # serving imports: not for --help

    from celslm.service import Service, ServiceConfig, make_app
    from celslm.store.tiers import Sources

    if not _loopback(host) and not token:
        raise UsageError(f"--host {host} is not loopback: give --token so that only your clients can use the model")
    with for_option("--cache-bytes"):
        capacity = parse_size(cache_bytes)
    edge_cache_bytes = cache_capacity(cache_capacity_)
    policy = trust_policy(trust)
    keys = identity(identity_)
    with for_option("--engine"):
        engine = default_engine(model, engine)
    with progress_bar() as progress:
        loaded = load_model(model, progress, engine=engine)
        loaded.engine.geometry  # the model is loaded before the port opens  # noqa: B018
    sources = Sources(tuple(peer or ()), cloud, cache_token, trust=policy, identity=keys, cache_bytes=edge_cache_bytes)
    config = ServiceConfig(sources=sources, cache_bytes=capacity, token=token, max_tokens=max_tokens)
    app = make_app(Service(loaded, config, warn=log))
    sock = listening_socket(host, port)
    log(f"serve: http://{host}:{port}/v1 model {loaded.name} on {loaded.engine.name}, contexts cached in "
        f"{cache_bytes}{', token required' if token else ''}")
    web.run_app(app, sock=sock, print=None, shutdown_timeout=10, access_log=None)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
