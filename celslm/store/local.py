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
        self.store = store
        self.path = store.blob_path(digest)
        fd, tmp = tempfile.mkstemp(dir=store.root / "tmp", prefix="blob-")
        self._file = os.fdopen(fd, "wb")
        self._tmp = Path(tmp)

    def _put(self, chunk: bytes) -> None:
        self._file.write(chunk)

    def _keep(self) -> None:
        self._file.close()
        self.store.place_blob(self._tmp, self.path)

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

    def place_blob(self, written: Path, path: Path) -> None:
        """Move a verified blob from its temporary file into place."""
        os.replace(written, path)

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
USAGE = "usage"  # ROOT/usage: the edge cache's blob bytes, changed under ROOT/.usage.lock


class EdgeCache(LocalStore):
    """The edge's own cache: blobs fetched through the tiers (tiers.py), kept without their manifests,
    so capacity is kept blob by blob, least recently used first out.

        ROOT/usage                      bytes of the blobs in ROOT/blobs (decimal), changed under a lock
        ROOT/pins/<pid>-<start>-<n>     digests (one a line) a reader in process <pid> is reading;
                                        <start>: when that process started (Linux), absent elsewhere

    A hit marks the blob used (its mtime). Once the blobs on disk exceed the capacity, the least
    recently used are removed until they fill `low_water` of it, so that not every blob stored starts
    an eviction; never the blob just stored, never a pinned one (what this process's pins held past
    the capacity goes when they are released; another's, at the next eviction). Several processes
    share the folder (decodes, the `celslm serve` service), so pins are files every process's eviction
    honours; a pin whose process is gone protects nothing and is removed, and so does one whose pid now
    belongs to a process started at another time (a reused pid).

    The byte count is shared the same way: every process adds a blob it stores and subtracts one it
    evicts or quarantines, each under an exclusive lock (flock) together with the rename or unlink, so
    a blob another process stored first adds nothing and the count equals a listing of ROOT/blobs. A
    store therefore lists nothing; eviction lists (it sorts by recency) only once the count is past
    the capacity. The folder is measured by a listing only where the count is missing or damaged (to
    measure it again, delete ROOT/usage): a process killed between a rename and its count leaves it
    off by that blob, and a blob's file changed in size behind the cache's back by the change. A blob
    evicted under a reader that has not read it yet reads as absent and is fetched again from the next
    tier; every read is verified, so a race costs a fetch, never wrong bytes.
    """

    low_water = 0.9  # an eviction frees this much below the capacity

    def __init__(self, root: Path, capacity_bytes: int | None = None):
        super().__init__(root, capacity_bytes)
        self._lock = threading.RLock()  # a reader released by the garbage collector unpins in whatever thread it runs

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
            if self.capacity_bytes is not None and self.usage_bytes() > self.capacity_bytes:
                self.evict(keep=digest)

    # ---- the shared count

    def usage_bytes(self) -> int:
        """Bytes of the blobs stored, as counted (measured first if the count is missing or damaged)."""
        usage = _count(self._read("", USAGE))
        return self._change_usage(lambda counted: counted) if usage is None else usage

    def _measure(self) -> int:
        return sum(stat.st_size for _, stat in self._entries("blobs"))

    def _change_usage(self, change: Callable[[int], int]) -> int:
        """Apply `change` (the count -> the new count, which may move or remove blobs) under the lock
        every process sharing the cache takes; the new count."""
        new = 0

        def counted(data: bytes | None) -> bytes:
            nonlocal new
            usage = _count(data)
            new = change(self._measure() if usage is None else usage)
            return str(new).encode()

        self.update("", USAGE, counted)
        return new

    def place_blob(self, written: Path, path: Path) -> None:
        size = written.stat().st_size

        def place(usage: int) -> int:
            if path.exists():  # stored by another thread or process meanwhile: counted once
                written.unlink()
                return usage
            os.replace(written, path)
            return usage + size

        self._change_usage(place)

    def quarantine(self, digest: str) -> None:
        path = self.blob_path(digest)

        def set_aside(usage: int) -> int:
            try:
                size = path.stat().st_size
                os.replace(path, self.root / "quarantine" / path.name)
            except FileNotFoundError:
                return usage  # set aside or evicted by another
            return usage - size

        self._change_usage(set_aside)

    def _evict(self, keep: str | None) -> int:
        """Past the capacity, remove the least recently used blobs (never `keep`, never a pinned one)
        until they fit `low_water` of it. Returns how many blobs went."""
        if self.usage_bytes() <= self.capacity_bytes:
            return 0
        spared = self.pinned() | {keep}
        blobs = sorted(self._entries("blobs"), key=lambda entry: entry[1].st_mtime)  # least recently used first
        gone = 0

        def remove(usage: int) -> int:  # the count now, with what others stored and removed since the listing
            nonlocal gone
            for path, _ in blobs:
                if usage <= self.capacity_bytes * self.low_water:
                    break
                if "sha256:" + path.name not in spared and (size := self._remove(path)):
                    usage -= size
                    gone += 1
            return usage

        self._change_usage(remove)
        self.evictions += gone
        return gone

    # ---- pins

    def pin(self, digests: Iterable[str]) -> Path | None:
        """Keep these blobs from every process's eviction until `unpin`; None where no pin can be
        written (a cache this process cannot write, which then stores nothing either)."""
        pid = os.getpid()
        started = _started(pid)
        name = f"{pid}-{started}-{next(_pin_numbers)}" if started else f"{pid}-{next(_pin_numbers)}"
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
        if self.capacity_bytes is None or not self._evicting.acquire(blocking=False):
            return
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
            if not _pin_holder_alive(path.name):
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    pass  # another user's stale pin: it protects nothing either way
                continue
            digests.update((self._read("pins", path.name) or b"").decode(errors="replace").split())
        return digests


def _count(data: bytes | None) -> int | None:
    """The usage record's bytes, or None where it is missing or damaged."""
    text = (data or b"").decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def _pin_holder_alive(name: str) -> bool:
    """Whether the process that wrote pin `name` runs: its pid is alive and, where the name gives its
    start time, that process started then (a pid can be reused by another process)."""
    pid, *rest = name.split("-")
    if not pid.isdigit():
        return True  # not a pin's name: its digests are honoured
    if not _alive(int(pid)):
        return False
    started = _started(int(pid))
    return len(rest) < 2 or started is None or started == rest[0]


def _started(pid: int) -> str | None:
    """When the process started, in clock ticks after boot (field 22 of /proc/<pid>/stat); None where
    that cannot be read (not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # after the command name, which may hold spaces: fields 3 on
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: asks whether the process exists, sends nothing
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
