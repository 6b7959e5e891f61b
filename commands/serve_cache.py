"""celslm serve-cache: the KV cache server the cloud and every edge peer run."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Annotated

import typer

from celslm.errors import UsageError
from celslm.store.base import parse_size
from .common import examples, listening_socket, log

EPILOG = examples(
    "celslm serve-cache --root /srv/celslm --port 8470 --write-token \"$TOKEN\"",
    "CELSLM_WRITE_TOKEN=s3cret celslm serve-cache --root cache --capacity 10GB --host 0.0.0.0",
    "celslm serve-cache --root cache --tls-cert cert.pem --tls-key key.pem --read-token r --write-token w",
    "celslm serve-cache --backend redis://127.0.0.1:6379/0 --port 8471",
)


def serve_cache(
    root: Annotated[Path, typer.Option("--root", help="Directory of the local store.")] = Path("celslm-cache"),
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on.")] = 8470,
    capacity: Annotated[str | None, typer.Option("--capacity", help="Store capacity (e.g. 10GB); LRU eviction of whole artifacts.")] = None,
    write_token: Annotated[str | None, typer.Option("--write-token", envvar="CELSLM_WRITE_TOKEN", show_envvar=True,
                                                    help="Bearer token required for PUT.")] = None,
    read_token: Annotated[str | None, typer.Option("--read-token", envvar="CELSLM_READ_TOKEN", show_envvar=True,
                                                   help="Bearer token required for GET/HEAD (optional).")] = None,
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="PEM certificate: serve HTTPS.")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="PEM private key for --tls-cert.")] = None,
    max_blob: Annotated[str, typer.Option("--max-blob", help="Largest accepted upload; bigger bodies get 413.")] = "1GiB",
    read_timeout: Annotated[float, typer.Option("--read-timeout", min=0.1, help="Seconds a client may stay silent mid-request before it is dropped.")] = 30.0,
    backend: Annotated[str | None, typer.Option("--backend", envvar="CELSLM_BACKEND", show_envvar=True,
                                                help="redis://HOST:PORT/DB: share one Redis store between servers (instead of --root).")] = None,
) -> None:
    """Serve KV artifacts over HTTP: blobs, manifests, tags, prefix lookup, metrics."""
    from aiohttp import web  # the server's imports are for serving, not for --help

    from celslm.server import ServerConfig, make_app

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
    if backend and not backend.startswith("redis://"):
        raise UsageError(f"--backend {backend}: expected redis://HOST:PORT/DB (a directory store is --root)")
    if backend and capacity:
        raise UsageError("--capacity applies to --root; with Redis set maxmemory and maxmemory-policy allkeys-lru")
    config = ServerConfig(store=backend or str(root), capacity_bytes=parse_size(capacity) if capacity else None,
                          write_token=write_token, read_token=read_token, max_blob_bytes=parse_size(max_blob),
                          read_timeout_s=read_timeout)
    try:
        app = make_app(config)
    except OSError as exc:
        raise UsageError(f"--root {root}: cannot use it as a store ({exc.strerror or exc})") from exc
    sock = listening_socket(host, port)  # before the banner: a busy port is an error, not a server
    scheme = "https" if context else "http"
    log(f"serve-cache: {scheme}://{host}:{port} store {backend or root} "
        f"(writes {'need a token' if write_token else 'open'}, reads {'need a token' if read_token else 'open'})")
    # run_app handles SIGTERM/SIGINT: it stops accepting and lets in-flight requests finish.
    web.run_app(app, sock=sock, ssl_context=context, print=None, shutdown_timeout=30, access_log=None)
