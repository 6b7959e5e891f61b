"""Tiered lookup for the edge: its own cache, then peers in order, then the cloud.

Each blob comes from the first place that has it and is kept in the local cache (`EdgeCache`: bounded,
least recently used blobs out; a reader's blobs are pinned while it lives); every byte is verified
before use. The private prompt is never part of any request: only digests, tags and chunk
prefix hashes of the shared context are sent.

Blobs are content-addressed, so any tier may serve them. Which artifact a tag or a prefix lookup
names is another matter: under a trust policy (`Sources.trust`) an artifact counts only if a trusted
key signed its id, and a tag only through a signed, unexpired statement no older than one already
accepted. A peer's unsigned answer is passed over for the next tier; without a policy, an answer
from a peer is used with a warning.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

from celslm.artifact import ArtifactReader, open_artifact
from celslm.codebook import MEDIA_CODEBOOK
from celslm.confidential import Identity
from celslm.errors import CelslmError, IntegrityError, NotFound, UnavailableError, UsageError
from celslm.manifest import DIGEST, BlobRef, Manifest, Timings, sha256_digest
from celslm.home import celslm_home
from celslm.store import open_store
from celslm.store.base import TAG, Store
from celslm.store.local import EdgeCache
from celslm.trust import SignedTag, TrustPolicy, Untrusted, merge_signatures

Warn = Callable[[str], None]
EDGE_CACHE_BYTES = 10 * 10**9  # the edge cache's default capacity: 10 GB
PARALLEL = 8  # blob requests in flight at once: a redirect doubles each one's round trips


@dataclass(frozen=True)
class Sources:
    """Where artifacts may come from besides local paths (peers in order, then the cloud: any URL
    `open_store` opens, a serve-cache, a bucket, a directory), and whose signatures count."""

    peers: tuple[str, ...] = ()
    cloud: str | None = None
    token: str | None = None
    chunk_size: int = 256  # chunk size of the prefix lookup for a context given as text
    trust: TrustPolicy | None = None
    identity: Identity | None = None  # opens encrypted artifacts
    cache_bytes: int | None = EDGE_CACHE_BYTES  # the edge cache's capacity (None: unbounded)

    @property
    def remote(self) -> bool:
        return bool(self.peers or self.cloud)

    def tiers(self, warn: Warn | None = None) -> Tiers:
        return Tiers(edge_cache(self.cache_bytes), [open_store(p, token=self.token, create=False) for p in self.peers],
                     open_store(self.cloud, token=self.token, create=False) if self.cloud else None, policy=self.trust, warn=warn,
                     identity=self.identity)


class BlobSourceReader(ArtifactReader):
    """An artifact whose blobs are fetched through the tiers as the reader reaches them.

    While the reader lives its blobs are pinned in the edge cache, so no process evicts what a decode
    is about to read, however many times it reads it (`Tiers.available_prefix`, then the stream); the
    pin goes with the reader (when the last reference to it is dropped, or at exit)."""

    def __init__(self, manifest: Manifest, source: str, tiers: "Tiers", timings: Timings = Timings(),
                 signatures=()):
        super().__init__(manifest, source, timings, signatures)
        self._tiers = tiers
        self.identity = tiers.identity
        pin = tiers.local.pin(ref.digest for ref in manifest.blob_refs())
        weakref.finalize(self, tiers.local.unpin, pin)

    def raw_blobs(self, chunks: int | None = None):
        refs = self.manifest.blob_refs(chunks)
        pool = ThreadPoolExecutor(self._tiers.parallel, thread_name_prefix="celslm-get")
        try:  # up to `parallel` blobs in flight; results come back in stream order
            for ref, data in zip(refs, pool.map(self._tiers.blob, refs)):
                if data is None and ref.digest in self._tiers.refused:
                    raise IntegrityError(f"{self.manifest.describe(ref)}: {self._tiers.refused[ref.digest]}")
                if data is None and self._tiers.down:
                    raise UnavailableError(f"{self.manifest.describe(ref)}: no reachable tier has it ({self._tiers.why_down()})")
                yield ref, data
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


class Tiers:
    def __init__(self, local: EdgeCache, peers: list[Store] = (), cloud: Store | None = None,
                 parallel: int = PARALLEL, policy: TrustPolicy | None = None, warn: Warn | None = None,
                 identity: Identity | None = None):
        self.local = local
        self.identity = identity
        self.parallel = parallel  # blob requests in flight at once
        self.policy = policy
        self.warn = warn or (lambda message: None)
        self._lock = threading.Lock()  # the counters below are updated from several fetching threads
        self.remotes = [("peer " + p.url, p) for p in peers] + ([("cloud " + cloud.url, cloud)] if cloud else [])
        self.peer_names = {"peer " + p.url for p in peers}
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

    def blob(self, ref: BlobRef) -> bytes | None:
        """A blob's verified bytes from the first tier that has them, or None. A peer's refused or late
        copy sends the fetch on to the next tier, and that peer is not asked again this session."""
        digest = ref.digest
        data = self.local.read_blob(digest)  # verified; a corrupt copy is quarantined, then replaced below
        if data is not None:
            self._count("local", data)
            return data
        for name, client in self.remotes:
            try:
                data = self._ask(name, lambda: client.read_blob(digest, ref.size))
            except IntegrityError as exc:
                self.refused[digest] = str(exc)  # a corrupt copy is refused; try the next tier
                if name in self.peer_names and name not in self.down:  # and a peer that sent one is asked no more
                    self.down[name] = f"sent a bad blob ({exc})"
                    self.warn(f"warning: {name} sent a bad blob; not asked again ({exc})")
                continue
            if data is not None:
                self._count(name, data)
                self._keep(digest, data)
                return data
        return None

    def _keep(self, digest: str, data: bytes) -> None:
        """Cache a fetched blob locally; a cache that cannot take it (a full disk) costs only the copy."""
        try:
            self.local.put_blob(digest, data)
        except OSError as exc:
            if "cache" not in self.down:
                self.down["cache"] = str(exc)
                self.warn(f"warning: the edge cache {self.local.root} cannot keep blobs ({exc.strerror or exc}); "
                          "going on without caching")

    def _count(self, source: str, data: bytes) -> None:
        with self._lock:
            self.bytes_by_source[source] += len(data)

    def manifest(self, artifact_id: str) -> Manifest:
        """The manifest an id names, from the first tier that sends bytes hashing to it (a tier that
        sends others is passed over for the next)."""
        for name, data in self._answers(lambda store: store.get_manifest(artifact_id)):
            if data is not None and sha256_digest(data) == artifact_id:
                break
            if data is not None:
                self.warn(f"warning: {name} holds a manifest that does not hash to {artifact_id}; passed over")
                data = None
        if data is None:
            where = f"artifact {artifact_id} not found locally{' or at ' if self.remotes else ''}" \
                    f"{', '.join(n for n, _ in self.remotes)}"
            raise UnavailableError(f"{where} ({self.why_down()})") if self.down else NotFound(where)
        return Manifest.from_bytes(data, artifact_id)

    def _answers(self, call):
        """(tier name, answer) from the local store, then each tier in order; a tier that cannot be
        reached, or answers with something malformed, is passed over (a peer, for the session)."""
        yield "local", call(self.local)
        for name, client in self.remotes:
            try:
                yield name, self._ask(name, lambda: call(client))
            except IntegrityError as exc:
                self.warn(f"warning: {name}: {exc}")
                if name in self.peer_names:
                    self.down.setdefault(name, f"sent a malformed answer ({exc})")

    def codebooks(self, fingerprint: str, bound: int) -> Iterator[tuple[str, bytes]]:
        """(tier, bytes) of the codebook each tier that knows one last coded this model's artifacts with,
        in tier order: the blob is verified against the digest that tier names, and read up to `bound`
        bytes. Which codebook is a tier's unsigned word, like an unsigned tag: under a trust policy a
        peer's is passed over; without one, a peer's is used with a warning."""
        for name, digest in self._answers(lambda store: store.get_codebook(fingerprint)):
            if digest is None:
                continue
            if not DIGEST.match(digest):
                self.warn(f"warning: {name} names {digest[:80]!r} as a codebook, not a digest; passed over")
                continue
            if name in self.peer_names:
                if self.policy is not None:
                    self.warn(f"warning: {name} names a codebook, unsigned; passed over under the trust policy")
                    continue
                self.warn(f"warning: the codebook comes from {name}'s unsigned word")
            data = self.blob(BlobRef(digest, bound, MEDIA_CODEBOOK))
            if data is not None:
                yield name, data

    def resolve(self, ref: str) -> str:
        """An artifact id for a ref: an id, or a tag (asked locally, then at each tier)."""
        if DIGEST.match(ref):
            return ref
        if self.policy is not None:
            return self._resolve_signed(ref)
        for name, found in self._answers(lambda store: store.get_tag(ref)):
            if found:
                if not DIGEST.match(found):
                    raise IntegrityError(f"{name}: tag {ref!r} names {found[:80]!r}, not an artifact id")
                if name in self.peer_names:
                    self.warn(f"warning: tag {ref!r} answered by {name}, unchecked; "
                              "give --trust PRODUCER.pub to accept only tags the producer signed")
                return found
        raise self._not_found(f"no tag {ref!r}")

    def _resolve_signed(self, ref: str) -> str:
        """The artifact a tag names, through the first statement the policy accepts."""
        seen = self.local.get_seen_tag(ref)
        floor = seen.statement.issued if seen else None
        refused = []
        for name, signed in self._answers(lambda store: store.get_signed_tag(ref)):
            if signed is None and name != "local":
                refused.append(f"{name}: unsigned")
                self.warn(f"warning: {name} has no signed statement for tag {ref!r}; passed over")
                continue
            if signed is None:
                continue
            try:
                artifact_id = self.policy.check_tag(ref, signed, name, floor)
            except Untrusted as exc:
                refused.append(str(exc))
                self.warn(f"warning: {exc}; passed over")
                continue
            if not DIGEST.match(artifact_id):
                refused.append(f"{name}: the statement names {artifact_id[:80]!r}, not an artifact id")
                continue
            self._remember(ref, signed)
            return artifact_id
        if refused:
            raise Untrusted(f"tag {ref!r}: no statement signed by a trusted key ({'; '.join(refused)})")
        raise self._not_found(f"no tag {ref!r}")

    def _remember(self, tag: str, signed: SignedTag) -> None:
        try:
            self.local.put_seen_tag(tag, signed)
        except OSError as exc:  # the replay floor is not kept; the statement itself was checked
            self.warn(f"warning: cannot record tag {tag!r} as seen ({exc.strerror or exc})")

    def _not_found(self, what: str) -> CelslmError:
        where = f"{what} locally{' or at ' if self.remotes else ''}{', '.join(n for n, _ in self.remotes)}"
        return UnavailableError(f"{where} ({self.why_down()})") if self.down else NotFound(where)

    def signatures(self, artifact_id: str):
        """Every signature over the id the tiers hold; under a policy, asking stops at a trusted one."""
        found = ()
        for _, signatures in self._answers(lambda store: store.get_signatures(artifact_id)):
            found = merge_signatures(found, signatures or ())
            if self._trusted(artifact_id, found) if self.policy is not None else found:
                break
        return found

    def _trusted(self, artifact_id: str, signatures) -> bool:
        try:
            self.policy.check_artifact(artifact_id, signatures, "")
            return True
        except Untrusted:
            return False

    def timings(self, artifact_id: str) -> Timings:
        for _, timings in self._answers(lambda store: store.get_timings(artifact_id)):
            if timings and timings.to_json():
                return timings
        return Timings()

    def reader(self, ref: str) -> BlobSourceReader:
        artifact_id = self.resolve(ref)
        signatures = self.signatures(artifact_id) if self.policy is not None else ()
        if self.policy is not None:  # before the manifest is parsed or any blob fetched
            self.policy.check_artifact(artifact_id, signatures, ref)
        manifest = self.manifest(artifact_id)
        return BlobSourceReader(manifest, artifact_id, self, self.timings(artifact_id), signatures)

    def why_down(self) -> str:
        return "; ".join(f"{name}: {reason}" for name, reason in self.down.items())

    def available_prefix(self, manifest: Manifest) -> int:
        """How many leading chunks can be had, every layer's block of each, from any tier (fetching them).
        The caller's reader of `manifest` keeps what is fetched here pinned until it reads it again."""
        if any(ref is not None and self.blob(ref) is None for ref in (manifest.tokens, manifest.codebook, *manifest.bases)):
            return 0
        for chunk in range(manifest.chunks):
            if any(self.blob(layer[chunk]) is None for layer in manifest.blocks):
                return chunk
        return manifest.chunks

    def lookup(self, space: str, prefixes: list[str]) -> tuple[str, int] | None:
        """The longest cached prefix among all tiers (local first; a longer remote hit wins). Under a
        policy an answer whose artifact no trusted key signed is passed over (a miss, with a warning)."""
        best, best_from = None, None
        for name, found in self._answers(lambda store: store.lookup(space, prefixes)):
            if not found or not DIGEST.match(found[0]) or not 0 < found[1] <= len(prefixes):
                continue
            if best is not None and found[1] <= best[1]:
                continue
            if self.policy is not None and not self._trusted(found[0], self.signatures(found[0])):
                self.warn(f"warning: {name} answered the prefix lookup with {found[0]}, which no trusted key signed; "
                          "passed over")
                continue
            best, best_from = found, name
            if best[1] == len(prefixes):
                break
        if best and self.policy is None and best_from in self.peer_names:
            self.warn(f"warning: cached prefix {best[0]} found at {best_from}, unchecked; "
                      "give --trust PRODUCER.pub to accept only artifacts the producer signed")
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


def edge_cache(capacity_bytes: int | None = EDGE_CACHE_BYTES) -> EdgeCache:
    return EdgeCache(Path(celslm_home()) / "store", capacity_bytes)


def check_reader(reader: ArtifactReader, policy: TrustPolicy | None) -> ArtifactReader:
    """Under a policy, an artifact read from a path or a stream must carry a trusted signature."""
    if policy is not None:
        policy.check_artifact(reader.id, reader.signatures, reader.source)
    return reader


def open_ref(ref: str, sources: Sources, stdin=None, warn: Warn | None = None) -> tuple[ArtifactReader, Tiers | None]:
    """A path, '-', a .tar file, an artifact id, a tag, or a server URL -> a reader (and the tiers it
    uses), checked against the sources' trust policy before any blob is read."""
    if ref == "-" or Path(ref).exists():
        return check_reader(open_artifact(ref, stdin=stdin, identity=sources.identity), sources.trust), None
    url = split_url_ref(ref)
    if url:
        server, ref = url
        peers, cloud = list(sources.peers), sources.cloud
        if server not in peers and server != cloud:
            peers = [*peers, server] if cloud else peers
            cloud = cloud or server
        sources = replace(sources, peers=tuple(peers), cloud=cloud)
    if not DIGEST.match(ref) and "/" in ref and not TAG.match(ref):  # acme/sched:latest is a tag
        raise UsageError(f"{ref}: no such file, and not an artifact id, tag or URL")
    tiers = sources.tiers(warn)
    return tiers.reader(ref), tiers
