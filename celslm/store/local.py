"""A content-addressed store on local disk: blobs, manifests, tags and a prefix index.

    ROOT/blobs/<hex>        blob bytes, named by sha256
    ROOT/manifests/<hex>    manifest bytes, named by the artifact id; mtime = last use (for LRU)
    ROOT/signatures/<hex>   producers' signatures over the artifact id (JSON list)
    ROOT/timings/<hex>      the cloud's seconds for the artifact (side record)
    ROOT/tags/<name>        {"artifact": id, "signed": statement or null}
    ROOT/seen/<name>        the newest tag statement this edge accepted (the floor against replays)
    ROOT/quarantine/<hex>   blobs found corrupt on read, kept aside; a new copy can then be stored
    ROOT/prefixes/<hash>    "artifact-id chunk-count" for each chunk prefix hash of every stored artifact

Every write goes to ROOT/tmp first and is renamed into place, so a reader never sees half an object.
With a capacity, an artifact larger than the whole store is refused; otherwise, once an artifact is
complete, whole artifacts are evicted least recently used first until the store fits, never the one
just stored and never one whose blobs are being read. An evicted artifact takes its tags, signatures
and timings with it (a tag never points at nothing, so a publisher sees it is gone). Blobs still
referenced by another artifact stay; blobs no manifest names (an interrupted push) are collected
once they are older than `orphan_grace_s`, the time a push in progress gets to finish.
"""

from __future__ import annotations

import os
import hashlib
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from celslm.artifact import Manifest, check_digest
from celslm.errors import CelslmError, IntegrityError
from celslm.store.base import HashingWriter, Store, check_tag
from celslm.trust import SignedTag


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


class LocalStore(Store):
    orphan_grace_s = 600.0
    on_disk = True

    def __init__(self, root: Path, capacity_bytes: int | None = None):
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self._evicting = threading.Lock()  # one eviction at a time: two would race over the same files
        for sub in ("blobs", "manifests", "signatures", "timings", "tags", "seen", "prefixes", "codebooks", "quarantine", "tmp"):
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

    def get_seen_tag(self, name: str) -> SignedTag | None:
        """The newest statement for this tag this edge accepted (a damaged record sets no floor)."""
        data = self._read("seen", check_tag(name))
        try:
            return SignedTag.from_bytes(data, f"seen tag {name}") if data is not None else None
        except IntegrityError:
            return None

    def put_seen_tag(self, name: str, signed: SignedTag) -> None:
        self._write("seen", check_tag(name), signed.to_bytes())

    def quarantine(self, digest: str) -> None:
        try:
            os.replace(self.blob_path(digest), self.root / "quarantine" / check_digest(digest))
        except FileNotFoundError:
            pass

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

    def check_blob(self, digest: str) -> bool:
        """Whether a valid copy is stored, hashing the file in pieces; a corrupt one is quarantined."""
        digester = hashlib.sha256()
        try:
            with open(self.blob_path(digest), "rb") as f:
                while chunk := f.read(1 << 20):
                    digester.update(chunk)
        except FileNotFoundError:
            return False
        if "sha256:" + digester.hexdigest() != digest:
            self.quarantine(digest)
            return False
        return True

    def evict(self, keep: str | None = None) -> int:
        """Collect orphan blobs, then drop least recently used artifacts (never `keep`, never one being
        read) until the store fits its capacity; returns how many artifacts went."""
        if self.capacity_bytes is None:
            return 0
        with self._evicting:
            return self._evict(keep)

    def _evict(self, keep: str | None) -> int:
        with self._lock:
            pinned = set(self._reading)
        manifests = sorted(self._entries("manifests"), key=lambda p: p[1])
        refs = {path.name: self._refs(path) for path, _ in manifests}
        self._collect_orphans(set().union(*refs.values()) | pinned if refs else pinned)
        usage = self.usage_bytes()
        gone = []
        for path, _ in manifests:
            if usage <= self.capacity_bytes:
                break
            mine = refs.pop(path.name)
            if "sha256:" + path.name == keep or mine & pinned:
                refs[path.name] = mine
                continue
            for kind in ("manifests", "signatures", "timings"):
                (self.root / kind / path.name).unlink(missing_ok=True)
            still_used = set().union(*refs.values()) if refs else set()
            for digest in mine - still_used:
                usage -= self._remove(self.blob_path(digest))
            gone.append("sha256:" + path.name)
        self._drop_tags(set(gone))
        self.evictions += len(gone)
        return len(gone)

    def _entries(self, kind: str) -> list[tuple[Path, float]]:
        """(path, mtime) of the files in a folder, skipping any that vanish while it is listed."""
        found = []
        for path in (self.root / kind).iterdir():
            try:
                found.append((path, path.stat().st_mtime))
            except FileNotFoundError:
                pass
        return found

    def _refs(self, path: Path) -> set[str]:
        try:
            return {ref.digest for ref in Manifest.from_bytes(path.read_bytes(), path.name).blob_refs()}
        except (CelslmError, OSError):
            return set()  # a damaged or vanished manifest holds no blob; it is evicted like any other

    @staticmethod
    def _remove(path: Path) -> int:
        try:
            size = path.stat().st_size
            path.unlink()
            return size
        except FileNotFoundError:
            return 0

    def _collect_orphans(self, named: set[str]) -> None:
        cutoff = time.time() - self.orphan_grace_s
        for path, mtime in self._entries("blobs"):
            if "sha256:" + path.name not in named and mtime < cutoff:
                self._remove(path)

    def _drop_tags(self, gone: set[str]) -> None:
        if not gone:
            return
        for path, _ in self._entries("tags"):
            try:
                record = self._tag_record(path.name)
            except (CelslmError, OSError):
                continue
            if record and record[0] in gone:
                path.unlink(missing_ok=True)

    def stale_tmp(self, older_than_s: float = 3600) -> None:
        """Remove temporary files left by a crash."""
        cutoff = time.time() - older_than_s
        for path in (self.root / "tmp").iterdir():
            if path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
