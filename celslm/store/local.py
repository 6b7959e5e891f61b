"""A content-addressed store on local disk: blobs, manifests, tags and a prefix index.

    ROOT/blobs/<hex>        blob bytes, named by sha256
    ROOT/manifests/<hex>    manifest bytes, named by the artifact id; mtime = last use (for LRU)
    ROOT/signatures/<hex>   producers' signatures over the artifact id (JSON list)
    ROOT/timings/<hex>      the cloud's seconds for the artifact (side record)
    ROOT/tags/<name>        {"artifact": id, "signed": statement or null}; a namespaced tag's slash is
                            written %2F (ROOT/tags/acme%2Fsched:latest)
    ROOT/seen/<name>        the newest tag statement this edge accepted (the floor against replays)
    ROOT/quarantine/<hex>   blobs found corrupt on read, kept aside; a new copy can then be stored
    ROOT/prefixes/<hash>    "artifact-id chunk-count" for each chunk prefix hash of every stored artifact
    ROOT/tenants/<name>     a serve-cache tenant's ledger (tenants.py), changed under ROOT/tenants/.<name>.lock

Every write goes to ROOT/tmp first and is renamed into place, so a reader never sees half an object.
With a capacity, an artifact larger than the whole store is refused; otherwise, once an artifact is
complete, whole artifacts are evicted least recently used first until the store fits, never the one
just stored and never one whose blobs are being read. An evicted artifact takes its tags, signatures
and timings with it (a tag never points at nothing, so a publisher sees it is gone). Blobs still
referenced by another artifact stay; blobs no manifest names (an interrupted push) are collected
once they are older than `orphan_grace_s`, the time a push in progress gets to finish.

The edge's own cache (`EdgeCache`) holds blobs fetched through the tiers without their manifests, so
its capacity is kept blob by blob instead; see its docstring.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import os
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

from celslm.errors import CelslmError, IntegrityError
from celslm.manifest import Manifest, check_digest
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
        self.url = str(self.root)
        self.capacity_bytes = capacity_bytes
        self._evicting = threading.Lock()  # one eviction at a time: two would race over the same files
        for sub in ("blobs", "manifests", "signatures", "timings", "tags", "seen", "prefixes", "codebooks", "quarantine", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._reading: Counter[str] = Counter()  # blob digests with a read in flight
        self._lock = threading.Lock()
        self.evictions = 0

    def _path(self, kind: str, name: str) -> Path:
        return self.root / kind / name.replace("/", "%2F")  # a namespaced tag stays one file

    def _read(self, kind: str, name: str) -> bytes | None:
        try:
            return self._path(kind, name).read_bytes()
        except FileNotFoundError:
            return None

    def _write(self, kind: str, name: str, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, self._path(kind, name))

    def _delete(self, kind: str, name: str) -> bool:
        try:
            self._path(kind, name).unlink()
            return True
        except FileNotFoundError:
            return False

    def update(self, kind: str, name: str, change: Callable[[bytes | None], bytes | None]) -> None:
        """Under an exclusive lock on a file beside the record, which every process and thread opening
        it honours (flock: one machine's processes, which a directory store's workers are)."""
        (self.root / kind).mkdir(exist_ok=True)
        with open(self._path(kind, f".{name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            data = change(self._read(kind, name))
            if data is not None:
                self._write(kind, name, data)

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

    def blob_size(self, digest: str) -> int | None:
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            return None

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
        manifests = sorted(self._entries("manifests"), key=lambda entry: entry[1].st_mtime)
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

    def _entries(self, kind: str) -> list[tuple[Path, os.stat_result]]:
        """(path, stat) of the files in a folder, skipping any that vanish while it is listed."""
        found = []
        for path in (self.root / kind).iterdir():
            try:
                found.append((path, path.stat()))
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
        for path, stat in self._entries("blobs"):
            if "sha256:" + path.name not in named and stat.st_mtime < cutoff:
                self._remove(path)

    def _drop_tags(self, gone: set[str]) -> None:
        if not gone:
            return
        for path, _ in self._entries("tags"):
            try:
                record = self._tag_record(path.name.replace("%2F", "/"))
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


_pin_numbers = itertools.count()  # names this process's pin files apart, whichever cache they are in


class EdgeCache(LocalStore):
    """The edge's own cache: blobs fetched through the tiers (tiers.py), kept without their manifests,
    so capacity is kept blob by blob, least recently used first out.

        ROOT/pins/<pid>-<n>     digests (one a line) a reader in process <pid> is reading

    A hit marks the blob used (its mtime). Once the blobs on disk exceed the capacity, the least
    recently used are removed until they fill `low_water` of it, so that not every blob stored starts
    an eviction; never the blob just stored, never a pinned one (what this process's pins held past
    the capacity goes when they are released; another's, at the next eviction). Several processes
    share the folder (decodes, the `celslm serve` service), so pins are files every process's eviction
    honours; a pin whose process is gone protects nothing and is removed. Usage is counted in this
    process as blobs are stored and measured on disk again when the count passes the capacity or is
    `recount_s` old (other processes store and evict too), so the cache exceeds its capacity by at most
    what is stored in the meantime. A blob evicted under a reader that has not read it yet reads as
    absent and is fetched again from the next tier; every read is verified, so a race costs a fetch,
    never wrong bytes.
    """

    low_water = 0.9  # an eviction frees this much below the capacity
    recount_s = 2.0

    def __init__(self, root: Path, capacity_bytes: int | None = None):
        super().__init__(root, capacity_bytes)
        self._lock = threading.RLock()  # a reader released by the garbage collector unpins in whatever thread it runs
        self._usage_bytes: int | None = None  # blob bytes on disk as last measured, plus those stored since
        self._measured_at = 0.0
        self._stored_meanwhile = 0  # bytes stored by other threads while an eviction measures the disk

    def read_blob(self, digest: str, limit: int | None = None) -> bytes | None:
        data = super().read_blob(digest, limit)
        if data is not None:
            try:
                os.utime(self.blob_path(digest))
            except OSError:
                pass  # evicted meanwhile, or a cache this process cannot write: recency is only a hint
        return data

    def put_blob(self, digest: str, data: bytes) -> None:
        with self.reading(digest):  # an eviction in another thread spares it too
            super().put_blob(digest, data)
            if self._count_stored(len(data)):
                self.evict(keep=digest)

    def _count_stored(self, size: int) -> bool:
        """Add a stored blob to the count; whether usage must be measured on disk (and made to fit)."""
        if self.capacity_bytes is None:
            return False
        with self._lock:
            if self._usage_bytes is None:
                return True
            self._usage_bytes += size
            self._stored_meanwhile += size
            return self._usage_bytes > self.capacity_bytes or time.monotonic() - self._measured_at > self.recount_s

    def _evict(self, keep: str | None) -> int:
        """Measure the blobs on disk; past the capacity, remove the least recently used (never `keep`,
        never a pinned one) until they fit `low_water` of it. Returns how many blobs went."""
        with self._lock:
            self._stored_meanwhile = 0
        blobs = sorted(self._entries("blobs"), key=lambda entry: entry[1].st_mtime)  # least recently used first
        usage = sum(stat.st_size for _, stat in blobs)
        gone = 0
        if usage > self.capacity_bytes:
            spared = self.pinned() | {keep}
            for path, stat in blobs:
                if usage <= self.capacity_bytes * self.low_water:
                    break
                if "sha256:" + path.name not in spared:
                    self._remove(path)
                    usage -= stat.st_size  # gone, whether this process or another removed it
                    gone += 1
        with self._lock:
            # fetch threads store while this measures: what they counted meanwhile is kept (perhaps
            # twice, if the listing saw it too: the count errs high, never low)
            self._usage_bytes, self._measured_at = usage + self._stored_meanwhile, time.monotonic()
        self.evictions += gone
        return gone

    def pin(self, digests: Iterable[str]) -> Path | None:
        """Keep these blobs from every process's eviction until `unpin`; None where no pin can be
        written (a cache this process cannot write, which then stores nothing either)."""
        name = f"{os.getpid()}-{next(_pin_numbers)}"
        try:
            (self.root / "pins").mkdir(exist_ok=True)
            self._write("pins", name, "\n".join(digests).encode())  # whole or not at all: an evictor may read it now
        except OSError:
            return None
        return self.root / "pins" / name

    def unpin(self, pin: Path | None) -> None:
        """Release a pin; if the cache is past its capacity (pins held it there), evict now, unless an
        eviction is running already."""
        if pin is None:
            return
        pin.unlink(missing_ok=True)
        over = self.capacity_bytes is not None and (self._usage_bytes or 0) > self.capacity_bytes
        if over and self._evicting.acquire(blocking=False):
            try:
                self._evict(None)
            except OSError:
                pass  # a cache this process cannot clean: the next blob stored tries again
            finally:
                self._evicting.release()

    def pinned(self) -> set[str]:
        """Digests being read: in this process, or pinned by a live one (a dead process's pins are removed)."""
        with self._lock:
            digests = set(self._reading)
        if not (self.root / "pins").is_dir():
            return digests
        for path, _ in self._entries("pins"):
            pid = path.name.partition("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    pass  # another user's stale pin: it protects nothing either way
                continue
            digests.update((self._read("pins", path.name) or b"").decode(errors="replace").split())
        return digests


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: asks whether the process exists, sends nothing
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
