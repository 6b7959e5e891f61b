"""celslm serve-cache: the KV cache server the cloud and every edge peer run."""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from celslm.errors import UsageError
from .common import FLAG, byte_size, examples, is_loopback, listening_socket, log

EPILOG = examples(
    "celslm serve-cache --root store --port 8470 --write-token \"$TOKEN\"",
    "CELSLM_WRITE_TOKEN=s3cret celslm serve-cache --root cache --capacity 10GB --host 0.0.0.0",
    "celslm serve-cache --root cache --tls-cert cert.pem --tls-key key.pem --read-token r --write-token w",
    "celslm serve-cache --backend redis://127.0.0.1:6379/0 --port 8471",
    "celslm serve-cache --root store --workers 4 --host 0.0.0.0 --write-token \"$TOKEN\"",
    "celslm serve-cache --root mirror --host 0.0.0.0 --allow-open-writes   # a closed network: anyone may push and move tags",
    "celslm serve-cache --backend redis+cluster://10.0.0.5:7000,10.0.0.6:7000 --workers 4",
    "celslm serve-cache --root store --host 0.0.0.0 --tenants tenants.toml   # each token: its tags acme/..., its quota",
)


def serve_cache(
    root: Annotated[Path, typer.Option("--root", help="Directory of the local store.")] = Path("celslm-cache"),
    host: Annotated[str, typer.Option("--host", help="Address to listen on; anything but loopback needs --write-token "
                                                     "(or --allow-open-writes).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on.")] = 8470,
    capacity: Annotated[str | None, typer.Option("--capacity", metavar="SIZE", help="The most the store keeps, e.g. 10GB "
                                                 "or 512MiB: beyond it whole artifacts go, least recently used first.")] = None,
    write_token: Annotated[str | None, typer.Option("--write-token", envvar="CELSLM_WRITE_TOKEN", show_envvar=True,
                                                    help="Bearer token required for PUT (pushes and tags).")] = None,
    allow_open_writes: Annotated[bool, typer.Option("--allow-open-writes", metavar=FLAG,
                                                    help="Listen beyond loopback without --write-token, on purpose: "
                                                         "anyone who reaches the port may push and repoint tags.")] = False,
    read_token: Annotated[str | None, typer.Option("--read-token", envvar="CELSLM_READ_TOKEN", show_envvar=True,
                                                   help="Bearer token required for GET/HEAD (optional).")] = None,
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="PEM certificate: serve HTTPS.")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="PEM private key for --tls-cert.")] = None,
    max_blob: Annotated[str, typer.Option("--max-blob", metavar="SIZE", help="Largest accepted upload; bigger bodies get 413.")] = "1GiB",
    read_timeout: Annotated[float, typer.Option("--read-timeout", min=0.1, help="Seconds a client may stay silent mid-request before it is dropped.")] = 30.0,
    backend: Annotated[str | None, typer.Option("--backend", envvar="CELSLM_BACKEND", show_envvar=True,
                                                help="redis://HOST:PORT/DB (one Redis), redis+cluster://HOST:PORT[,HOST:PORT...] "
                                                     "(a Redis Cluster) or s3://BUCKET/PREFIX (object storage, AWS_* "
                                                     "settings): share one store between servers (instead of --root).")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, max=256, envvar="CELSLM_WORKERS", show_envvar=True,
                                         help="Worker processes accepting on the one port (one per core saturates the "
                                              "machine); /metrics adds them up.")] = 1,
    memory_cache: Annotated[str, typer.Option("--memory-cache", metavar="SIZE", help="Verified blobs each worker keeps in memory "
                                              "(least recently used out first); 0 reads every blob from the store.")] = "256MiB",
    tenants: Annotated[Path | None, typer.Option("--tenants", metavar="FILE", help="TOML file of tenants: each token "
                                                 "(by its sha256) writes only tags NAME/..., holds at most its quota "
                                                 "(507 past it) and reads all or only its own (see README, Tenants).")] = None,
) -> None:
    """Serve KV artifacts over HTTP: blobs, manifests, tags, prefix lookup, metrics."""
    if (write_token or tenants) and allow_open_writes:
        raise UsageError(f"--allow-open-writes and {'--write-token' if write_token else '--tenants'} contradict each "
                         "other; give one")
    if not is_loopback(host) and not write_token and not tenants and not allow_open_writes:
        raise UsageError(f"--host {host} is not loopback: give --write-token so that only your producers can push and "
                         "move tags (or --allow-open-writes to leave writes open on purpose)")
    with tempfile.TemporaryDirectory(prefix="celslm-metrics-") as metrics_dir:
        if workers > 1:  # before prometheus_client is imported: it picks per-process files then
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        _serve_cache(root, host, port, capacity, write_token, read_token, tls_cert, tls_key, max_blob, read_timeout,
                     backend, workers, memory_cache, tenants)


def _serve_cache(root, host, port, capacity, write_token, read_token, tls_cert, tls_key, max_blob, read_timeout,
                 backend, workers, memory_cache, tenants_file) -> None:
    from celslm.server import ServerConfig, make_app, serve
    from celslm.tenants import load_tenants, tenant_of

    if (tls_cert is None) != (tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    context = None
    if tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(tls_cert, tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"--tls-cert {tls_cert} / --tls-key {tls_key}: cannot load them "
                             f"({getattr(exc, 'strerror', None) or exc})") from exc
    if backend and not backend.startswith(("redis://", "redis+cluster://", "s3://")):
        raise UsageError(f"--backend {backend}: expected redis://HOST:PORT/DB, redis+cluster://HOST:PORT[,HOST:PORT...] "
                         "or s3://BUCKET/PREFIX (a directory store is --root)")
    if capacity and workers > 1:
        raise UsageError("--capacity evicts within one process; with --workers give the store its room instead "
                         "(a directory without --capacity, or Redis with maxmemory)")
    if backend and capacity:
        raise UsageError("--capacity applies to --root; with Redis set its maxmemory (maxmemory-policy noeviction: a full Redis refuses pushes)")
    if tenants_file and capacity:
        raise UsageError("--capacity evicts whole artifacts, whichever tenant holds them; with --tenants the quotas "
                         "bound the store")
    tenants = load_tenants(tenants_file) if tenants_file else ()
    for flag, token in (("--write-token", write_token), ("--read-token", read_token)):
        clash = tenant_of(tenants, token) if token else None
        if clash:
            raise UsageError(f"{flag} is also tenant {clash.name}'s token in {tenants_file}; give each its own")
    config = ServerConfig(store=backend or str(root), capacity_bytes=byte_size(capacity, "--capacity") if capacity else None,
                          write_token=write_token, read_token=read_token, max_blob_bytes=byte_size(max_blob, "--max-blob"),
                          read_timeout_s=read_timeout, memory_bytes=byte_size(memory_cache, "--memory-cache"), tenants=tenants)
    try:
        app = make_app(config)  # the store opens (or says why not) here, before any worker starts
    except OSError as exc:
        raise UsageError(f"--root {root}: cannot use it as a store ({exc.strerror or exc})") from exc
    sock = listening_socket(host, port)  # before the banner: a busy port is an error, not a server
    scheme = "https" if context else "http"
    log(f"serve-cache: {scheme}://{host}:{port} store {backend or root} "
        f"(writes {'need a token' if write_token or tenants else 'open'}"
        f"{f', {len(tenants)} tenant' + ('s' if len(tenants) > 1 else '') if tenants else ''}, reads {'need a token' if read_token or any(t.reads_own_only for t in tenants) else 'open'}"
        f"{f', {workers} workers' if workers > 1 else ''})")
    serve(config, sock, workers, context, log, app)
