"""A Redis-backed store: many serve-cache processes (on one machine or several) sharing one store, in
one Redis (redis://[USER:PASSWORD@]HOST:PORT/DB) or a Redis Cluster
(redis+cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...], the nodes to ask for the cluster's layout,
with the same credentials for all; only database 0, as a cluster has no other). Errors show the URL
without its credentials.

Keys, the same in both; the part in braces is the hash tag, which puts what is read or changed
together in one cluster slot and spreads the rest (one Redis ignores it):

    celslm:{b:<hex>}:blobs               "<upload> <parts> <bytes>": the blob is complete (written last)
    celslm:{b:<hex>}:part:<upload>:<i>   its i-th part, PART_BYTES at most
    celslm:{a:<hex>}:manifests           an artifact's manifest, and beside it its
    celslm:{a:<hex>}:signatures            signatures and
    celslm:{a:<hex>}:timings               timings
    celslm:{t:<name>}:tags, celslm:{p:<hash>}:prefixes, celslm:{c:<fingerprint>}:codebooks
    celslm:{q:<name>}:tenants            a serve-cache tenant's ledger (tenants.py), changed by SWAP
    celslm:usage                         blob bytes stored

A blob is written in parts as its bytes arrive (memory bounded by one part), under a name of its
own upload; the parts expire unless the upload completes, when one script keeps them and writes
the header. So a reader, or `has_blob`, never sees part of a blob, two uploads of the same blob
cannot mix their parts, and an upload that dies leaves nothing for long. A manifest is accepted
only once all its blobs are (base.Store), and re-pushing anything stores nothing new.

A Redis Cluster client follows MOVED and retries through a failover (a master dies, its replica
takes over, seconds with a short cluster-node-timeout): a request then waits, for up to about 23 s
(RETRIES), and bytes are checked against their digest as always. Redis replicates
asynchronously, so a write acknowledged in the last instant before its master dies can be lost
with it (Redis Cluster's own guarantee); a blob lost that way makes its artifact fail to pull
until it is pushed again. A Redis that stays unreachable is UnavailableError, one line.

Capacity is Redis's own business here. Run it with `maxmemory` and `maxmemory-policy noeviction`:
a full Redis then refuses the write, and the push gets 507 and exits 4. An evicting policy
(`allkeys-lru`) would drop single parts of stored blobs, losing them silently.
"""

from __future__ import annotations

import os
from typing import Callable
from urllib.parse import unquote

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import OutOfMemoryError, RedisClusterException, RedisError
from redis.retry import Retry

from celslm.errors import InsufficientStorage, UnavailableError, UsageError
from celslm.manifest import check_digest
from celslm.store.base import HashingWriter, Store, first_line, without_credentials

PART_BYTES = 1 << 20
READ_PARTS = 8  # parts fetched by one MGET: bounds what one reply holds
UPLOAD_GRACE_S = 3600  # parts of an upload that never completes expire after this
RETRIES = 25  # backoff 0.1, 0.2, 0.4, 0.8, then 1 s: a command gives up after about 23 s
SLOT_OF = {"blobs": "b", "manifests": "a", "signatures": "a", "timings": "a",  # an artifact's records share a slot
           "tags": "t", "prefixes": "p", "codebooks": "c", "tenants": "q"}
USAGE = "celslm:usage"

# KEYS: the header, then the upload's parts; ARGV[1]: the header. Keeps the parts and writes the header,
# unless a header is there already (another upload of the same bytes finished first, or this one's
# first try, whose answer was lost): that header is returned instead.
COMMIT = """
local stored = redis.call('GET', KEYS[1])
if stored then return stored end
for i = 2, #KEYS do
    if redis.call('PERSIST', KEYS[i]) == 0 and redis.call('EXISTS', KEYS[i]) == 0 then
        return redis.error_reply('ERR a part of this upload expired before it finished')
    end
end
redis.call('SET', KEYS[1], ARGV[1])
return false
"""

# KEYS: the header, then its parts; ARGV[1]: the header as read. Deletes them if the header is still
# that one (not a new copy stored since): the number of keys deleted.
DELETE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', unpack(KEYS))
"""

# KEYS[1]: a record; ARGV[1]: its bytes as read ("" when absent), ARGV[2]: the new bytes. Writes them
# only if the record is still as read: 1, or 0 when another writer came first (read again and retry).
SWAP = """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""


def key(kind: str, name: str) -> str:
    return f"celslm:{{{SLOT_OF[kind]}:{name}}}:{kind}"


def part_key(hex_id: str, upload: str, index: int) -> str:
    return f"celslm:{{b:{hex_id}}}:part:{upload}:{index}"


def cluster_address(url: str) -> tuple[list[ClusterNode], str | None, str | None]:
    """redis+cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...][/0] -> the nodes, user and password
    (percent-decoded, as in redis://); [v6]:PORT for IPv6. A cluster has only database 0."""
    credentials, _, hosts_db = url.removeprefix("redis+cluster://").rpartition("@")
    hosts, _, database = hosts_db.partition("/")
    if database not in ("", "0"):
        raise UsageError(f"store {without_credentials(url)}: Redis Cluster has only database 0, not {database!r}")
    user, _, password = credentials.partition(":")
    nodes = []
    for address in hosts.split(","):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise UsageError(f"store {without_credentials(url)}: {address!r} is not HOST:PORT; use "
                             "redis+cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]")
        nodes.append(ClusterNode(host.strip("[]"), int(port)))
    return nodes, unquote(user) or None, unquote(password) or None


class RedisBlobWriter(HashingWriter):
    """Writes one blob's parts as they fill; a verified blob's header is written last (COMMIT)."""

    def __init__(self, store: "RedisStore", digest: str):
        super().__init__(digest)
        self.store = store
        self.hex_id = check_digest(digest)
        self.upload = os.urandom(8).hex()
        self._pending = bytearray()
        self._parts: list[str] = []  # keys of the parts written

    def _put(self, chunk: bytes) -> None:
        self._pending += chunk
        while len(self._pending) >= PART_BYTES:
            self._write_part(bytes(self._pending[:PART_BYTES]))
            del self._pending[:PART_BYTES]

    def _write_part(self, data: bytes) -> None:
        part = part_key(self.hex_id, self.upload, len(self._parts))
        self.store.call(self.store.redis.set, part, data, ex=UPLOAD_GRACE_S)
        self._parts.append(part)

    def _keep(self) -> None:
        if self._pending:
            self._write_part(bytes(self._pending))
            self._pending.clear()
        header = f"{self.upload} {len(self._parts)} {self.size}".encode()
        stored = self.store.call(self.store.redis.eval, COMMIT, 1 + len(self._parts), key("blobs", self.hex_id),
                                 *self._parts, header)
        if stored is None or stored == header:
            self._parts = []  # committed: an abort from here on must not touch them
            try:  # a count on another node: a failover there must not undo a stored blob
                self.store.call(self.store.redis.incrby, USAGE, self.size)
            except UnavailableError:
                pass
        else:  # another upload stored these bytes first: this one's parts are not needed
            self.abort()

    def abort(self) -> None:
        self._pending.clear()
        parts, self._parts = self._parts, []
        if parts:
            try:
                self.store.redis.delete(*parts)
            except (RedisError, RedisClusterException):
                pass  # they expire after UPLOAD_GRACE_S; an abort must not hide the error that caused it


class RedisStore(Store):
    def __init__(self, url: str):
        clustered = url.startswith("redis+cluster://")
        shown = self.url = without_credentials(url)  # errors reach HTTP clients: never the credentials
        self.where = f"Redis Cluster at {shown.removeprefix('redis+cluster://')}" if clustered else f"Redis at {shown}"
        try:
            if clustered:  # retries go to the cluster client: it refreshes the layout between them
                retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), RETRIES)
                nodes, user, password = cluster_address(url)
                self.redis = RedisCluster(startup_nodes=nodes, username=user, password=password, retry=retry,
                                          socket_timeout=5, socket_connect_timeout=2)
            else:
                self.redis = _redis_at(url, shown)
            self.redis.ping()
        except (RedisError, RedisClusterException) as exc:
            raise UnavailableError(f"cannot reach {self.where}: {first_line(exc)}") from exc

    def call(self, command, *args, **kwargs):
        """One Redis command: a Redis at its `maxmemory` refuses a write (OOM), which is the store being
        full (507); one that does not answer, even after the client's retries, is unavailable."""
        try:
            return command(*args, **kwargs)
        except OutOfMemoryError as exc:
            raise InsufficientStorage(f"{self.where} is full (its maxmemory): {first_line(exc)}") from exc
        except (RedisError, RedisClusterException) as exc:
            raise UnavailableError(f"{self.where} is unavailable: {first_line(exc)}") from exc

    def _read(self, kind: str, name: str) -> bytes | None:
        if kind == "blobs":
            return self._read_blob(name)
        return self.call(self.redis.get, key(kind, name))

    def _stored_blob(self, hex_id: str) -> tuple[bytes, list[str], int] | None:
        """A complete blob's header, the keys of its parts and its size."""
        header = self.call(self.redis.get, key("blobs", hex_id))
        if header is None:
            return None
        upload, count, size = header.decode().split()
        return header, [part_key(hex_id, upload, index) for index in range(int(count))], int(size)

    def _read_blob(self, hex_id: str) -> bytes | None:
        stored = self._stored_blob(hex_id)
        if stored is None:
            return None
        header, parts, size = stored
        data = bytearray()
        for start in range(0, len(parts), READ_PARTS):
            for part in self.call(self.redis.mget, parts[start:start + READ_PARTS]):
                if part is None:  # quarantined while being read, or lost: a header with no blob is removed
                    self._drop_if(hex_id, header, parts)
                    return None
                data += part
        return bytes(data) if len(data) == size else None

    def _drop_if(self, hex_id: str, header: bytes, parts: list[str]) -> None:
        """Delete the blob if its header is still `header` (not a new copy stored since)."""
        self.call(self.redis.eval, DELETE, 1 + len(parts), key("blobs", hex_id), *parts, header)

    def _write(self, kind: str, name: str, data: bytes) -> None:
        self.call(self.redis.set, key(kind, name), data)

    def _delete(self, kind: str, name: str) -> bool:
        return bool(self.call(self.redis.delete, key(kind, name)))

    def has_blob(self, digest: str) -> bool:
        return bool(self.call(self.redis.exists, key("blobs", check_digest(digest))))

    def blob_size(self, digest: str) -> int | None:
        stored = self._stored_blob(check_digest(digest))
        return None if stored is None else stored[2]

    def update(self, kind: str, name: str, change: Callable[[bytes | None], bytes | None]) -> None:
        """Optimistically: read, change, and swap in the new bytes only if nobody wrote in between
        (SWAP, one key, so one cluster slot); otherwise read again."""
        while True:
            data = self._read(kind, name)
            new = change(data)
            if new is None or self.call(self.redis.eval, SWAP, 1, key(kind, name), data or b"", new):
                return

    def blob_writer(self, digest: str) -> RedisBlobWriter:
        return RedisBlobWriter(self, digest)

    def quarantine(self, digest: str) -> None:
        """Delete the blob (Redis has no place aside); a new push can then store it again."""
        hex_id = check_digest(digest)
        stored = self._stored_blob(hex_id)
        if stored is None:
            return
        header, parts, size = stored
        if self.call(self.redis.eval, DELETE, 1 + len(parts), key("blobs", hex_id), *parts, header):
            self.call(self.redis.decrby, USAGE, size)

    def usage_bytes(self) -> int:
        return int(self.call(self.redis.get, USAGE) or 0)


def _redis_at(url: str, shown: str) -> redis.Redis:
    """A client of redis://...; a URL it cannot parse is a UsageError (its own words may quote part of
    a password)."""
    try:
        return redis.Redis.from_url(url)
    except ValueError as exc:
        raise UsageError(f"store {shown}: not a Redis URL; use redis://[USER:PASSWORD@]HOST:PORT/DB, with / "
                         "and @ in a password percent-encoded") from exc
