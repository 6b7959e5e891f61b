"""Tiered lookup for the edge: its own cache, then peers in order, then the cloud.

Each blob comes from the first place that has it and is kept in the local cache; every byte is
verified before use. The private prompt is never part of any request: only digests, tags and chunk
prefix hashes of the shared context are sent.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from celslm.artifact import DIGEST, ArtifactReader, Manifest, open_artifact, sha256_digest
from celslm.errors import IntegrityError, NotFound, UnavailableError, UsageError
from celslm.models import celslm_home
from celslm.store.http import CacheClient
from celslm.store.local import LocalStore


class BlobSourceReader(ArtifactReader):
    """An artifact whose blobs are fetched through the tiers as the reader reaches them."""

    def __init__(self, manifest: Manifest, source: str, tiers: "Tiers"):
        super().__init__(manifest, source)
        self._tiers = tiers

    def raw_blobs(self, chunks: int | None = None):
        refs = self.manifest.blob_refs(chunks)
        pool = ThreadPoolExecutor(self._tiers.parallel, thread_name_prefix="celslm-get")
        try:  # up to `parallel` blobs in flight; results come back in stream order
            for ref, data in zip(refs, pool.map(lambda r: self._tiers.blob(r.digest), refs)):
                if data is None and ref.digest in self._tiers.refused:
                    raise IntegrityError(f"{self.manifest.describe(ref)}: {self._tiers.refused[ref.digest]}")
                if data is None and self._tiers.down:
                    raise UnavailableError(f"{self.manifest.describe(ref)}: no reachable tier has it ({self._tiers.why_down()})")
                yield ref, data
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


class Tiers:
    def __init__(self, local: LocalStore, peers: list[CacheClient] = (), cloud: CacheClient | None = None,
                 parallel: int = 4):
        self.local = local
        self.parallel = parallel  # blob requests in flight at once
        self._lock = threading.Lock()  # the counters below are updated from several fetching threads
        self.remotes = [("peer " + p.url, p) for p in peers] + ([("cloud " + cloud.url, cloud)] if cloud else [])
        self.bytes_by_source: Counter[str] = Counter()
        self.requests_by_source: Counter[str] = Counter()
        self.down: dict[str, str] = {}  # tiers that failed this session, with why
        self.refused: dict[str, str] = {}  # blobs some tier sent corrupt, with what was wrong

    def _ask(self, name: str, call):
        if name in self.down:
            return None
        with self._lock:
            self.requests_by_source[name] += 1
        try:
            return call()
        except UnavailableError as exc:
            self.down[name] = str(exc)  # skipped from now on; the next tier may have it
            return None

    def blob(self, digest: str) -> bytes | None:
        data = self.local.read_blob(digest)
        if data is not None and sha256_digest(data) == digest:
            self._count("local", data)
            return data
        for name, client in self.remotes:
            try:
                data = self._ask(name, lambda: client.get_blob(digest))
            except IntegrityError as exc:
                self.refused[digest] = str(exc)  # a corrupt copy is refused; try the next tier
                continue
            if data is not None:
                self._count(name, data)
                self.local.put_blob(digest, data)
                return data
        return None

    def _count(self, source: str, data: bytes) -> None:
        with self._lock:
            self.bytes_by_source[source] += len(data)

    def manifest(self, artifact_id: str) -> Manifest:
        data = self.local.get_manifest(artifact_id)
        if data is None:
            for name, client in self.remotes:
                data = self._ask(name, lambda: client.get_manifest(artifact_id))
                if data is not None:
                    break
        if data is None:
            where = f"artifact {artifact_id} not found locally{' or at ' if self.remotes else ''}" \
                    f"{', '.join(n for n, _ in self.remotes)}"
            raise UnavailableError(f"{where} ({self.why_down()})") if self.down else NotFound(where)
        return Manifest.from_bytes(data, artifact_id)

    def resolve(self, ref: str) -> str:
        """An artifact id for a ref: an id, or a tag (asked locally, then at each tier)."""
        if DIGEST.match(ref):
            return ref
        found = self.local.get_tag(ref)
        for name, client in self.remotes:
            if found:
                break
            found = self._ask(name, lambda: client.get_tag(ref))
        if not found:
            where = f"no tag {ref!r} locally{' or at ' if self.remotes else ''}{', '.join(n for n, _ in self.remotes)}"
            raise UnavailableError(f"{where} ({self.why_down()})") if self.down else NotFound(where)
        return found

    def reader(self, ref: str) -> BlobSourceReader:
        artifact_id = self.resolve(ref)
        manifest = self.manifest(artifact_id)
        return BlobSourceReader(manifest, artifact_id, self)

    def why_down(self) -> str:
        return "; ".join(f"{name}: {reason}" for name, reason in self.down.items())

    def available_prefix(self, manifest: Manifest) -> int:
        """How many leading chunks can be had, every layer's block of each, from any tier (fetching them)."""
        if any(ref is not None and self.blob(ref.digest) is None for ref in (manifest.tokens, *manifest.bases)):
            return 0
        for chunk in range(manifest.chunks):
            if any(self.blob(layer[chunk].digest) is None for layer in manifest.blocks):
                return chunk
        return manifest.chunks

    def lookup(self, space: str, prefixes: list[str]) -> tuple[str, int] | None:
        """The longest cached prefix among all tiers (local first; a longer remote hit wins)."""
        best = self.local.lookup(prefixes)
        for name, client in self.remotes:
            if best and best[1] == len(prefixes):
                break
            found = self._ask(name, lambda: client.lookup(space, prefixes))
            if found and (best is None or found[1] > best[1]):
                best = found
        return best


def split_url_ref(ref: str) -> tuple[str, str] | None:
    """'http://host:port/v1/artifacts/sha256:…' or '…/v1/tags/NAME' -> (server URL, id or tag)."""
    parts = urlsplit(ref)
    if parts.scheme not in ("http", "https"):
        return None
    for prefix in ("/v1/artifacts/", "/v1/tags/"):
        if parts.path.startswith(prefix) and len(parts.path) > len(prefix):
            return f"{parts.scheme}://{parts.netloc}", parts.path[len(prefix):]
    raise UsageError(f"{ref}: expected a URL ending in /v1/artifacts/sha256:<hex> or /v1/tags/<name>")


def edge_cache() -> LocalStore:
    return LocalStore(Path(celslm_home()) / "store")


def push(reader: ArtifactReader, client: CacheClient, tag: str | None = None) -> dict:
    """Upload only the blobs the server lacks, then the manifest, then the tag."""
    sent = skipped = bytes_sent = 0
    for ref, data in reader.blobs():
        if client.has_blob(ref.digest):
            skipped += 1
            continue
        client.put_blob(ref.digest, data)
        sent += 1
        bytes_sent += len(data)
    missing = client.put_manifest(reader.id, reader.manifest.canonical_bytes())
    if missing:
        raise IntegrityError(f"{client.url} still lacks {len(missing)} blobs after upload, first {missing[0]}")
    if tag:
        client.put_tag(tag, reader.id)
    return {"id": reader.id, "url": client.url, "tag": tag, "blobs_sent": sent, "blobs_skipped": skipped,
            "bytes_sent": bytes_sent}


def make_tiers(peers: list[str], cloud: str | None, token: str | None) -> Tiers:
    return Tiers(edge_cache(), [CacheClient(p, token) for p in peers], CacheClient(cloud, token) if cloud else None)


def open_ref(ref: str, peers: list[str], cloud: str | None, token: str | None, stdin=None) -> tuple[ArtifactReader, Tiers | None]:
    """A path, '-', a .tar file, an artifact id, a tag, or a server URL -> a reader (and the tiers it uses)."""
    if ref == "-" or Path(ref).exists():
        return open_artifact(ref, stdin=stdin), None
    url = split_url_ref(ref)
    if url:
        server, ref = url
        if server not in peers and server != cloud:
            peers = [*peers, server] if cloud else peers
            cloud = cloud or server
    if not DIGEST.match(ref) and "/" in ref:
        raise UsageError(f"{ref}: no such file, and not an artifact id, tag or URL")
    tiers = make_tiers(peers, cloud, token)
    return tiers.reader(ref), tiers
