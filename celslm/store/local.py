"""A content-addressed store on local disk: blobs, manifests, tags and a prefix index.

    ROOT/blobs/<hex>        blob bytes, named by sha256
    ROOT/manifests/<hex>    manifest bytes, named by the artifact id; mtime = last use (for LRU)
    ROOT/tags/<name>        an artifact id
    ROOT/prefixes/<hash>    "artifact-id chunk-count" for each chunk prefix hash of every stored artifact

Every write goes to ROOT/tmp first and is renamed into place, so a reader never sees half an object.
With a capacity, whole artifacts are evicted least recently used first, never one whose blobs are
being read; blobs still referenced by another artifact stay.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from celslm.artifact import Manifest
from celslm.errors import IntegrityError, UsageError

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'10GB', '512MiB', '1000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in UNITS:
        raise UsageError(f"bad size {text!r}; use e.g. 10GB, 512MiB or a byte count")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def check_digest(digest: str) -> str:
    if not DIGEST.match(digest):
        raise UsageError(f"malformed digest {digest!r}; expected sha256:<64 hex>")
    return digest.removeprefix("sha256:")


def check_tag(name: str) -> str:
    if not TAG.match(name):
        raise UsageError(f"bad tag name {name!r}; letters, digits and . _ : - (up to 128)")
    return name


class HashingWriter:
    """Receives one blob in chunks, hashing as it goes; `verify` refuses bytes that are not `digest`.

    Backends say where the bytes go (`_put`) and how a verified blob is kept (`_keep`)."""

    def __init__(self, digest: str):
        self.digest = digest
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self._put(chunk)
        self.size += len(chunk)

    def commit(self) -> None:
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self.digest:
            self.abort()
            raise IntegrityError(f"blob bytes hash to {actual}, not {self.digest}")
        self._keep()

    def _put(self, chunk: bytes) -> None:
        raise NotImplementedError

    def _keep(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


class BlobWriter(HashingWriter):
    """Streams one blob to a temporary file; a verified blob is renamed into place."""

    def __init__(self, store: "LocalStore", digest: str):
        super().__init__(digest)
        self.path = store.blob_path(digest)
        fd, tmp = tempfile.mkstemp(dir=store.root / "tmp", prefix="blob-")
        self._file = os.fdopen(fd, "wb")
        self._tmp = Path(tmp)

    def _put(self, chunk: bytes) -> None:
        self._file.write(chunk)

    def _keep(self) -> None:
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


class Store:
    """What every backend shares: manifests, tags and the prefix index over a few primitives."""

    capacity_bytes: int | None = None
    evictions = 0

    def _read(self, kind: str, name: str) -> bytes | None:  # kind: blobs, manifests, tags, prefixes
        raise NotImplementedError

    def _write(self, kind: str, name: str, data: bytes) -> None:
        raise NotImplementedError

    def _touch(self, artifact_hex: str) -> None:
        """Mark an artifact as just used (LRU)."""

    def has_blob(self, digest: str) -> bool:
        raise NotImplementedError

    def blob_writer(self, digest: str):
        raise NotImplementedError

    def blob_file(self, digest: str) -> Path | None:
        """A file holding the blob, for stores on local disk (the server then streams it with sendfile)."""
        return None

    def evict(self) -> int:
        return 0

    def usage_bytes(self) -> int:
        raise NotImplementedError

    @contextmanager
    def reading(self, digest: str):
        yield

    def read_blob(self, digest: str) -> bytes | None:
        return self._read("blobs", check_digest(digest))

    def put_blob(self, digest: str, data: bytes) -> None:
        if self.has_blob(digest):
            return
        writer = self.blob_writer(digest)
        try:
            writer.write(data)
            writer.commit()
        except BaseException:
            writer.abort()
            raise

    def get_manifest(self, artifact_id: str) -> bytes | None:
        hex_id = check_digest(artifact_id)
        data = self._read("manifests", hex_id)
        if data is not None:
            self._touch(hex_id)
        return data

    def put_manifest(self, artifact_id: str, data: bytes) -> list[str]:
        """Store a manifest whose blobs are all present; otherwise store nothing and return the missing digests."""
        hex_id = check_digest(artifact_id)
        if "sha256:" + hashlib.sha256(data).hexdigest() != artifact_id:
            raise IntegrityError(f"manifest bytes do not hash to {artifact_id}")
        manifest = Manifest.from_bytes(data, artifact_id)
        missing = [ref.digest for ref in manifest.blob_refs() if not self.has_blob(ref.digest)]
        if missing:
            return missing
        self._write("manifests", hex_id, data)
        self._touch(hex_id)
        for count, prefix in enumerate(manifest.prefix_hashes, start=1):
            self._write("prefixes", prefix, f"{artifact_id} {count}".encode())
        self.evict()
        return []

    def get_tag(self, name: str) -> str | None:
        data = self._read("tags", check_tag(name))
        return data.decode().strip() if data is not None else None

    def put_tag(self, name: str, artifact_id: str) -> None:
        if self._read("manifests", check_digest(artifact_id)) is None:
            raise UsageError(f"tag {name}: artifact {artifact_id} is not stored here")
        self._write("tags", check_tag(name), artifact_id.encode())

    def lookup(self, prefix_hashes: list[str]) -> tuple[str, int] | None:
        """The stored artifact holding the longest prefix of these chunk hashes: (artifact id, chunks)."""
        for prefix in prefix_hashes:
            if not re.fullmatch(r"[0-9a-f]{64}", prefix):
                raise UsageError(f"malformed prefix hash {prefix[:80]!r}")
        for count in range(len(prefix_hashes), 0, -1):
            entry = self._read("prefixes", prefix_hashes[count - 1])
            if entry is None:
                continue
            artifact_id, stored_count = entry.decode().split()
            if int(stored_count) == count and self._read("manifests", artifact_id.removeprefix("sha256:")) is not None:
                return artifact_id, count
        return None


class LocalStore(Store):
    def __init__(self, root: Path, capacity_bytes: int | None = None):
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        for sub in ("blobs", "manifests", "tags", "prefixes", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._reading: Counter[str] = Counter()  # blob digests with a read in flight
        self._lock = threading.Lock()
        self.evictions = 0

    def _read(self, kind: str, name: str) -> bytes | None:
        try:
            return (self.root / kind / name).read_bytes()
        except FileNotFoundError:
            return None

    def _write(self, kind: str, name: str, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, self.root / kind / name)

    def _touch(self, artifact_hex: str) -> None:
        try:
            os.utime(self.root / "manifests" / artifact_hex)
        except FileNotFoundError:
            pass

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / check_digest(digest)

    def blob_file(self, digest: str) -> Path | None:
        path = self.blob_path(digest)
        return path if path.is_file() else None

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def blob_writer(self, digest: str) -> BlobWriter:
        return BlobWriter(self, digest)

    @contextmanager
    def reading(self, digest: str):
        """Pin a blob (and so its artifacts) against eviction while it is being sent."""
        with self._lock:
            self._reading[digest] += 1
        try:
            yield
        finally:
            with self._lock:
                self._reading[digest] -= 1
                if not self._reading[digest]:
                    del self._reading[digest]

    # ---- capacity

    def usage_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.root / "blobs").iterdir())

    def evict(self) -> int:
        """Drop least recently used artifacts until the store fits its capacity; returns how many."""
        if self.capacity_bytes is None:
            return 0
        evicted = 0
        with self._lock:
            pinned = set(self._reading)
        manifests = sorted((self.root / "manifests").iterdir(), key=lambda p: p.stat().st_mtime)
        refs = {p.name: {r.digest for r in Manifest.from_bytes(p.read_bytes(), p.name).blob_refs()} for p in manifests}
        usage = self.usage_bytes()
        for path in manifests:
            if usage <= self.capacity_bytes:
                break
            mine = refs.pop(path.name)
            if mine & pinned:
                refs[path.name] = mine
                continue
            path.unlink(missing_ok=True)
            still_used = set().union(*refs.values()) if refs else set()
            for digest in mine - still_used:
                blob = self.blob_path(digest)
                try:
                    usage -= blob.stat().st_size
                    blob.unlink()
                except FileNotFoundError:
                    pass
            evicted += 1
        self.evictions += evicted
        return evicted

    def stale_tmp(self, older_than_s: float = 3600) -> None:
        """Remove temporary files left by a crash."""
        cutoff = time.time() - older_than_s
        for path in (self.root / "tmp").iterdir():
            if path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
