"""celslm serve: the warm edge service (OpenAI-compatible API) over shared KV artifacts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from celslm.errors import UsageError
from celslm.models import default_engine, load_model
from celslm.batching import DEFAULT_CELLS
from .common import (ApiTokenOpt, CacheCapacityOpt, CloudOpt, EngineOpt, IdentityOpt, ModelOpt, PeerOpt, TokenOpt, TrustOpt,
                     byte_size, cache_capacity, examples, for_option, identity, is_loopback, listening_socket, log,
                     old_spelling, progress_bar, renamed, trust_policy, typed, warn)

EPILOG = examples(
    "celslm serve -m qwen2.5-coder-0.5b --cloud http://cloud:8470 --trust cloud.pub",
    "celslm serve -m qwen2.5-coder-0.5b --parallel 8 --max-queue 32 --context-dir ./contexts",
    "celslm serve -m qwen2.5-coder-0.5b --host 0.0.0.0 --tenants tenants.toml --cloud http://cloud:8470",
    "celslm serve -m qwen2.5-coder-0.5b --port 8480 --memory-cache 512MB --peer http://peer:8470",
    "celslm serve -m qwen2.5-coder-0.5b --host 0.0.0.0 --api-token \"$API_TOKEN\" --cloud http://cloud:8470 --token \"$CACHE_TOKEN\"",
    "curl -s localhost:8480/v1/chat/completions -H 'Content-Type: application/json' -d '{\"context\": \"sched:latest\", "
    "\"messages\": [{\"role\": \"user\", \"content\": \"What does run return?\"}]}'",
    "celslm decode --server http://127.0.0.1:8480 --kv sched:latest -p 'What does run return?'",
)


def serve(
    invocation: typer.Context,
    model: ModelOpt,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; anything but loopback needs --api-token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on.")] = 8480,
    api_token: ApiTokenOpt = None,
    memory_cache: Annotated[str, typer.Option("--memory-cache", metavar="SIZE", help="Memory for decoded contexts kept "
                                              "between requests (least recently used out first).")] = "1GiB",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, max=65536,
                                                help="The most new tokens one request may ask for (its max_tokens).")] = 4096,
    parallel: Annotated[int, typer.Option("--parallel", min=1, max=64, help="Requests decoded together, in one batch "
                                          "per step, over shared context KV.")] = 4,
    kv_cells: Annotated[int, typer.Option("--kv-cells", min=256, metavar="N", help="KV cells of the batch (contexts in "
                                          "use, then each running request's prompt and max_tokens).")] = DEFAULT_CELLS,
    prompt_chunk: Annotated[int, typer.Option("--prompt-chunk", min=16, max=4096, metavar="TOKENS",
                                              help="Prompt tokens read per step: a long prompt delays the others' next "
                                                   "token by at most this much compute.")] = 64,
    max_queue: Annotated[int, typer.Option("--max-queue", min=0, help="Requests waiting for a sequence, at most; past "
                                           "it, 429 with Retry-After.")] = 64,
    deadline: Annotated[float, typer.Option("--deadline", min=0.1, metavar="SECONDS", help="A request not done this long "
                                            "after it arrived ends with 503.")] = 300.0,
    context_dir: Annotated[Path | None, typer.Option("--context-dir", file_okay=False, help="The only "
                                                     "folder whose artifacts a client may name, by a name inside it.")] = None,
    tenants_file: Annotated[Path | None, typer.Option("--tenants", dir_okay=False, metavar="FILE", help="TOML of "
                                                      "tenants: [tenants.NAME] token_sha256 = \"...\", concurrency = N "
                                                      "(README, Tenants).")] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, envvar="CELSLM_THREADS", show_envvar=True,
                                                help="llama.cpp threads (default: all cores).")] = None,
    peer: PeerOpt = None,
    cloud: CloudOpt = None,
    token: TokenOpt = None,
    trust: TrustOpt = None,
    identity_: IdentityOpt = None,
    cache_capacity_: CacheCapacityOpt = None,
    engine: EngineOpt = None,
    cache_token: Annotated[str | None, old_spelling("--cache-token")] = None,
    cache_bytes: Annotated[str | None, old_spelling("--cache-bytes")] = None,
    max_tokens: Annotated[int | None, old_spelling("--max-tokens", min=1, max=65536)] = None,
) -> None:
    """Keep a model loaded and answer OpenAI-style requests over shared contexts; the prompt stays here."""
    from aiohttp import web  # serving imports: not for --help

    from celslm.scheduler import Limits
    from celslm.service import Service, ServiceConfig, make_app, read_tenants
    from celslm.store.tiers import Sources

    api_token, token = _tokens(invocation, api_token, token, cache_token)
    memory_cache = renamed("--cache-bytes", "--memory-cache", cache_bytes, memory_cache, "1GiB")
    max_new_tokens = renamed("--max-tokens", "--max-new-tokens", max_tokens, max_new_tokens, 4096)
    if api_token and tenants_file:
        raise UsageError("give --api-token or --tenants, not both")
    if not is_loopback(host) and not (api_token or tenants_file):
        raise UsageError(f"--host {host} is not loopback: give --api-token or --tenants so that only your clients can "
                         "use the model")
    if context_dir and not context_dir.is_dir():
        raise UsageError(f"--context-dir {context_dir}: no such folder")
    tenants = read_tenants(tenants_file) if tenants_file else {}
    capacity = byte_size(memory_cache, "--memory-cache")
    edge_cache_bytes = cache_capacity(cache_capacity_)
    policy = trust_policy(trust)
    keys = identity(identity_)
    with for_option("--engine"):
        engine = default_engine(model, engine)
    if engine != "llama.cpp":
        raise UsageError("serve batches requests on llama.cpp: give a GGUF model (transformers is decode's reference engine)")
    if threads:
        os.environ["CELSLM_THREADS"] = str(threads)
    with progress_bar() as progress:
        loaded = load_model(model, progress, engine=engine)
        loaded.engine.geometry  # the model is loaded before the port opens  # noqa: B018
    sources = Sources(tuple(peer or ()), cloud, token, trust=policy, identity=keys, cache_bytes=edge_cache_bytes)
    limits = Limits(parallel=parallel, prompt_chunk=prompt_chunk, max_queue=max_queue, deadline_s=deadline)
    config = ServiceConfig(sources=sources, cache_bytes=capacity, token=api_token, max_tokens=max_new_tokens, limits=limits,
                           kv_cells=kv_cells, context_dir=context_dir, tenants=tenants)
    with for_option("--kv-cells"):
        service = Service(loaded, config, warn=log)
    app = make_app(service)
    sock = listening_socket(host, port)
    log(f"serve: http://{host}:{port}/v1 model {loaded.name} on {loaded.engine.name}, {parallel} requests at once over "
        f"{service.pool.cells} KV cells, contexts cached in {memory_cache}"
        f"{', token required' if api_token else ''}{f', {len(set(t.name for t in tenants.values()))} tenants' if tenants else ''}")
    web.run_app(app, sock=sock, print=None, shutdown_timeout=10, access_log=None)


def _tokens(invocation: typer.Context, api_token: str | None, token: str | None, cache_token: str | None):
    """(the API token, the serve-cache token). Until this release `serve --token` was the API token and
    `--cache-token` the serve-cache one; now `--token` is the serve-cache token, as in every other command.
    A `--token` typed without `--api-token` could be either: for one release it is refused rather than
    guessed, since a wrong guess sends the API token to every peer, or leaves the API open."""
    given = {name for name in ("api_token", "token") if typed(invocation, name)}
    if cache_token is not None:  # the old dialect: a --token beside it is the API token
        if {"api_token", "token"} <= given:
            raise UsageError("--cache-token is the old spelling of --token (the serve-cache token); give --api-token "
                             "and --token only")
        if "token" in given:
            warn("serve --token T --cache-token C is the old spelling of --api-token T --token C; read that way, "
                 "and the old spelling goes in the next release")
            return token, cache_token
        return api_token, renamed("--cache-token", "--token", cache_token, None)
    if "token" in given and api_token is None:  # with CELSLM_API_TOKEN set (new in this release) it is the new dialect
        raise UsageError("serve --token is now the serve-cache token (the API token is --api-token): give --api-token "
                         "beside it, or the serve-cache token as CELSLM_TOKEN")
    return api_token, token
