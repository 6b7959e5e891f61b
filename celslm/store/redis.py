"""A Redis-backed store: many serve-cache processes (on one machine or several) sharing one store.

Keys: `celslm:<kind>:<name>` for blobs, manifests, tags and prefixes, plus `celslm:usage` (blob bytes).
Capacity is Redis's own business here. Run it with `maxmemory` and `maxmemory-policy noeviction`:
a full Redis then refuses the write, and the push gets 507 and exits 4. An evicting policy
(`allkeys-lru`) would drop single blobs of stored artifacts, losing them silently.
"""

from __future__ import annotations

from celslm.artifact import check_digest
from celslm.errors import InsufficientStorage, UnavailableError
from celslm.store.base import HashingWriter, Store


class RedisBlobWriter(HashingWriter):
    """Collects one blob (bounded by the server's upload limit); a verified blob is set once."""

    def __init__(self, store: "RedisStore", digest: str):
        super().__init__(digest)
        self.store = store
        self._parts: list[bytes] = []

    def _put(self, chunk: bytes) -> None:
        self._parts.append(chunk)

    def _keep(self) -> None:
        key = self.store.key("blobs", check_digest(self.digest))
        if self.store.guarded(lambda: self.store.redis.set(key, b"".join(self._parts), nx=True)):
            self.store.guarded(lambda: self.store.redis.incrby(self.store.key("usage"), self.size))

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
        self.guarded(lambda: self.redis.set(self.key(kind, name), data))

    def guarded(self, write):
        """A write; a Redis at its `maxmemory` refuses it (OOM), which is the store being full (507)."""
        import redis

        try:
            return write()
        except redis.exceptions.OutOfMemoryError as exc:
            raise InsufficientStorage(f"Redis at {self.url} is full (its maxmemory): {exc}") from exc

    def has_blob(self, digest: str) -> bool:
        return bool(self.redis.exists(self.key("blobs", check_digest(digest))))

    def blob_writer(self, digest: str) -> RedisBlobWriter:
        check_digest(digest)
        return RedisBlobWriter(self, digest)

    def quarantine(self, digest: str) -> None:
        key = self.key("blobs", check_digest(digest))
        size = self.redis.strlen(key)
        if self.redis.delete(key):
            self.redis.decrby(self.key("usage"), size)

    def usage_bytes(self) -> int:
        return int(self.redis.get(self.key("usage")) or 0)
