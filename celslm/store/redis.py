"""A Redis-backed store: many serve-cache processes (on one machine or several) sharing one store.

Keys: `celslm:<kind>:<name>` for blobs, manifests, tags and prefixes, plus `celslm:usage` (blob bytes).
Capacity is Redis's own business here: run it with `maxmemory` and `maxmemory-policy allkeys-lru`.
"""

from __future__ import annotations

import hashlib

from celslm.errors import IntegrityError, UnavailableError
from celslm.store.local import Store, check_digest


class RedisBlobWriter:
    """Collects one blob (bounded by the server's upload limit), verifies it, then sets it once."""

    def __init__(self, store: "RedisStore", digest: str):
        self.store, self.digest = store, digest
        self._parts: list[bytes] = []
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self._parts.append(chunk)
        self.size += len(chunk)

    def commit(self) -> None:
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.digest:
            raise IntegrityError(f"blob bytes hash to {actual}, not {self.digest}")
        if self.store.redis.set(self.store.key("blobs", check_digest(self.digest)), b"".join(self._parts), nx=True):
            self.store.redis.incrby(self.store.key("usage"), self.size)

    def abort(self) -> None:
        self._parts.clear()


class RedisStore(Store):
    def __init__(self, url: str):
        import redis

        self.url = url
        self.redis = redis.Redis.from_url(url)
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            raise UnavailableError(f"cannot reach Redis at {url}: {exc}") from exc

    @staticmethod
    def key(kind: str, name: str = "") -> str:
        return f"celslm:{kind}:{name}" if name else f"celslm:{kind}"

    def _read(self, kind: str, name: str) -> bytes | None:
        return self.redis.get(self.key(kind, name))

    def _write(self, kind: str, name: str, data: bytes) -> None:
        self.redis.set(self.key(kind, name), data)

    def has_blob(self, digest: str) -> bool:
        return bool(self.redis.exists(self.key("blobs", check_digest(digest))))

    def blob_writer(self, digest: str) -> RedisBlobWriter:
        check_digest(digest)
        return RedisBlobWriter(self, digest)

    def usage_bytes(self) -> int:
        return int(self.redis.get(self.key("usage")) or 0)
