"""Where artifacts live besides a plain directory: stores behind one interface (`base.Store`), chosen
by URL scheme as LMCache does, an HTTP client for serve-cache, and the tiered lookup local -> peers
-> cloud.

    open_store("/srv/celslm")                    a directory (local.py); also file:///srv/celslm
    open_store("redis://127.0.0.1:6379/0")       one Redis shared by many servers (redis.py)
    open_store("redis+cluster://10.0.0.5:7000,10.0.0.6:7000")
                                                 a Redis Cluster, found from any of these nodes (redis.py)
    open_store("s3://bucket/celslm")             S3-compatible object storage, AWS_* settings (s3.py)
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from celslm.errors import UsageError
from celslm.store.base import Store

SCHEMES = ("file", "redis", "redis+cluster", "s3")


def open_store(url: str | Path, capacity_bytes: int | None = None) -> Store:
    """The store a URL names: a plain path or file:// (a directory, with an optional capacity), redis://,
    redis+cluster:// or s3://."""
    text = str(url)
    scheme = urlsplit(text).scheme if "://" in text else "file"
    if scheme == "file":
        from celslm.store.local import LocalStore

        return LocalStore(Path(text.removeprefix("file://")), capacity_bytes)
    if scheme in ("redis", "redis+cluster"):
        if capacity_bytes is not None:
            raise UsageError("a capacity applies to a directory store; give Redis maxmemory and "
                             "maxmemory-policy noeviction instead")
        from celslm.store.redis import RedisStore  # the redis client loads only for a Redis store

        return RedisStore(text)
    if scheme == "s3":
        if capacity_bytes is not None:
            raise UsageError("a capacity applies to a directory store; an object store's room is its bucket's")
        from celslm.store.s3 import S3Store  # boto3 loads only for an S3 store

        return S3Store(text)
    raise UsageError(f"store {text}: unknown scheme {scheme!r}; use a path, file://PATH, redis://HOST:PORT/DB "
                     "redis+cluster://HOST:PORT[,HOST:PORT...] or s3://BUCKET/PREFIX")
