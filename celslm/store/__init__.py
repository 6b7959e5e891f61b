"""Where artifacts live: stores behind one protocol (`base.Store`), opened by URL as LMCache does,
and the tiered lookup local -> peers -> cloud over any of them (tiers.py).

    open_store("/srv/celslm")                    a directory (local.py); also file:///srv/celslm
    open_store("redis://127.0.0.1:6379/0")       one Redis shared by many servers (redis.py)
    open_store("redis+cluster://10.0.0.5:7000,10.0.0.6:7000")
                                                 a Redis Cluster, found from any of these nodes (redis.py)
    open_store("s3://bucket/celslm")             S3-compatible object storage, AWS_* settings (s3.py)
    open_store("http://cloud:8470", token=T)     a serve-cache server, the cloud or a peer (http.py)
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from celslm.errors import UsageError
from celslm.store.base import Store, without_credentials

SCHEMES = ("file", "redis", "redis+cluster", "s3", "http", "https")


def open_store(url: str | Path, capacity_bytes: int | None = None, token: str | None = None, create: bool = True) -> Store:
    """The store a URL names: a plain path or file:// (a directory, with an optional capacity; made
    unless `create` is False), redis://, redis+cluster://, s3://, or http(s):// (a serve-cache, with
    its bearer `token`)."""
    text = str(url)
    scheme = urlsplit(text).scheme if "://" in text else "file"
    if scheme == "file" and re.fullmatch(r"[A-Za-z0-9.-]+:\d+(/.*)?", text):  # cloud:8470 is not a folder name
        raise UsageError(f"store {text}: a server without its scheme? give http://{text} (or ./{text} for a folder)")
    if scheme == "file" and not create and not Path(text.removeprefix("file://")).is_dir():
        raise UsageError(f"store {text}: no such directory")
    if capacity_bytes is not None and scheme != "file":
        room = {"redis": "; give Redis maxmemory and maxmemory-policy noeviction instead",
                "s3": "; an object store's room is its bucket's"}
        raise UsageError(f"store {without_credentials(text)}: a capacity applies to a directory store"
                         + room.get(scheme.partition("+")[0], ""))
    if scheme == "file":
        from celslm.store.local import LocalStore

        return LocalStore(Path(text.removeprefix("file://")), capacity_bytes)
    if scheme in ("redis", "redis+cluster"):
        from celslm.store.redis import RedisStore  # the redis client loads only for a Redis store

        return RedisStore(text)
    if scheme == "s3":
        from celslm.store.s3 import S3Store  # boto3 loads only for an S3 store

        return S3Store(text)
    if scheme in ("http", "https"):
        from celslm.store.http import HttpStore

        return HttpStore(text, token)
    raise UsageError(f"store {without_credentials(text)}: unknown scheme {scheme!r}; use a path, file://PATH, "
                     "redis://HOST:PORT/DB, redis+cluster://HOST:PORT[,HOST:PORT...], s3://BUCKET/PREFIX or "
                     "http(s)://HOST:PORT")
