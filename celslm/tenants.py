"""Tenants of one serve-cache (`--tenants FILE`): which tags each write token may write, how many bytes
it may hold, and what it may read. The server maps these decisions to HTTP (server.py); this module
knows no HTTP.

The file (TOML), one table a tenant, named by its namespace:

    [tenants.acme]
    token_sha256 = "9f86d0…"   # sha256 (hex) of the bearer token: the file holds no secret
    quota = "10GB"              # the most the tenant holds (a byte count, or 10GB, 512MiB, ...)
    reads = "own"               # "all" (the default): every tag and artifact; "own": only its own

A tenant writes only tags of its namespace (`acme/sched:latest`), and side records (signatures,
timings) only of artifacts it holds.

Blobs stay shared and content-addressed: two tenants pushing one context store it once. What a tenant
holds is charged to it in full, whoever stored the bytes first: each artifact whose manifest it pushed
(the manifest's bytes and the stored size of each distinct blob it names), and each blob it uploaded
that none of its artifacts names yet (an unfinished push). So a tenant's usage never depends on what
others push or delete, one tenant cannot fill another's quota, and uploading blobs without a manifest
is no way past a quota. Two artifacts of one tenant that name one blob (a model's codebook) count it
twice: the charge errs high, never low. A push sends its manifest first (store/tiers.py): the server
answers 507 then, before any blob is sent, or claims the whole artifact's bytes for the push, so two
pushes at once cannot both pass the quota halfway through their blobs.

The ledger of each tenant is one record in the store (`Store.update`: a lock file in a directory,
a compare-and-swap in Redis), so every worker and every server sharing the store sees one count, and
a charge that would pass the quota is refused (InsufficientStorage) before anything is written.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from celslm.errors import InsufficientStorage, IntegrityError, UsageError
from celslm.manifest import Manifest, sha256_digest
from celslm.store.base import NAMESPACE, Store, parse_size

READS = ("all", "own")
FIELDS = {"token_sha256", "quota", "reads"}


@dataclass(frozen=True)
class Tenant:
    name: str  # also its tag namespace: it writes `name/...`
    token_sha256: str  # hex
    quota_bytes: int
    reads: str = "all"  # "all" or "own"

    def owns_tag(self, tag: str) -> bool:
        return tag.startswith(self.name + "/")

    @property
    def reads_own_only(self) -> bool:
        return self.reads == "own"


def load_tenants(path: Path) -> tuple[Tenant, ...]:
    """The tenants a file names; UsageError naming the file and what is wrong in it."""
    try:
        doc = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"tenants file {path}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"tenants file {path}: not TOML ({exc})") from exc
    try:
        return parse_tenants(doc)
    except UsageError as exc:
        raise UsageError(f"tenants file {path}: {exc}") from exc


def parse_tenants(doc: dict) -> tuple[Tenant, ...]:
    if set(doc) != {"tenants"} or not isinstance(doc["tenants"], dict) or not doc["tenants"]:
        raise UsageError("expected [tenants.NAME] tables and nothing else")
    tenants = tuple(_tenant(name, entry) for name, entry in doc["tenants"].items())
    hashes = [tenant.token_sha256 for tenant in tenants]
    if len(set(hashes)) != len(hashes):
        raise UsageError("two tenants have the same token_sha256")
    return tenants


def _tenant(name: str, entry) -> Tenant:
    if not re.fullmatch(NAMESPACE, name):
        raise UsageError(f"tenant {name!r}: a name is its tag namespace: letters, digits and . _ - (up to 64)")
    if not isinstance(entry, dict):
        raise UsageError(f"tenant {name}: expected a table")
    if unknown := set(entry) - FIELDS:
        raise UsageError(f"tenant {name}: unknown field {sorted(unknown)[0]!r} (fields: {', '.join(sorted(FIELDS))})")
    if missing := {"token_sha256", "quota"} - set(entry):
        raise UsageError(f"tenant {name}: missing {sorted(missing)[0]}")
    digest = entry["token_sha256"]
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise UsageError(f"tenant {name}: token_sha256 must be 64 lowercase hex digits "
                         "(printf %s \"$TOKEN\" | sha256sum)")
    quota = entry["quota"]
    if isinstance(quota, bool) or not isinstance(quota, (int, str)):
        raise UsageError(f"tenant {name}: quota must be a byte count or a size such as 10GB")
    try:
        quota_bytes = quota if isinstance(quota, int) else parse_size(quota)
    except UsageError as exc:
        raise UsageError(f"tenant {name}: quota: {exc}") from exc
    reads = entry.get("reads", "all")
    if reads not in READS:
        raise UsageError(f"tenant {name}: reads must be \"all\" or \"own\", not {reads!r}")
    return Tenant(name, digest, quota_bytes, reads)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def tenant_of(tenants: tuple[Tenant, ...], token: str) -> Tenant | None:
    """The tenant whose token this is (each hash compared in constant time), or None."""
    digest = token_sha256(token).encode()
    found = None
    for tenant in tenants:
        if hmac.compare_digest(digest, tenant.token_sha256.encode()):
            found = tenant
    return found


RESERVATION_S = 600.0  # a push's claim on blobs it has not sent yet lasts this long


@dataclass(frozen=True)
class Usage:
    """One tenant's ledger: the bytes charged for each artifact it holds, and for each blob that none of
    them names yet, as (bytes, reserved_at): a blob it uploaded (reserved_at 0, charged until one of its
    artifacts names it) or one a push of it will send or name (the time of the claim: it lapses after
    RESERVATION_S, so a push that dies holds nothing for long)."""

    artifacts: dict[str, int]
    pending: dict[str, tuple[int, float]]

    @property
    def bytes_(self) -> int:
        return sum(self.artifacts.values()) + sum(size for size, _ in self.pending.values())

    @classmethod
    def from_bytes(cls, data: bytes | None, name: str, now: float) -> Usage:
        """The ledger as stored, its lapsed claims left out."""
        if data is None:
            return cls({}, {})
        try:
            obj = json.loads(data)
            pending = {str(k): (int(v[0]), float(v[1])) for k, v in obj["pending"].items()}
            return cls({str(k): int(v) for k, v in obj["artifacts"].items()},
                       {k: v for k, v in pending.items() if not v[1] or v[1] > now - RESERVATION_S})
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise UsageError(f"tenant {name}: its ledger in the store is malformed ({str(exc)[:80]})") from exc

    def to_bytes(self) -> bytes:
        return json.dumps({"artifacts": self.artifacts, "pending": self.pending}, sort_keys=True).encode()


class Ledger:
    """What each tenant holds, kept in the store shared by every worker (see the module docstring)."""

    KIND = "tenants"

    def __init__(self, store: Store, clock: Callable[[], float] = time.time):
        self.store, self.clock = store, clock

    def usage(self, tenant: Tenant) -> Usage:
        return Usage.from_bytes(self.store._read(self.KIND, tenant.name), tenant.name, self.clock())

    def holds(self, tenant: Tenant, artifact_id: str) -> bool:
        return artifact_id in self.usage(tenant).artifacts

    def check_room(self, tenant: Tenant, size: int, what: str) -> None:
        """Refuse at once what cannot fit even now (a blob's declared length), before reading it."""
        self._refuse_past_quota(tenant, self.usage(tenant).bytes_ + size, what)

    def _update(self, tenant: Tenant, change: Callable[[Usage], Usage | None]) -> None:
        self.store.update(self.KIND, tenant.name, lambda data: _bytes_or_none(
            change(Usage.from_bytes(data, tenant.name, self.clock()))))

    def reserve_blob(self, tenant: Tenant, digest: str, size: int) -> None:
        """Charge an uploaded blob before it is kept (InsufficientStorage past the quota); a claim a push
        made on it becomes the blob's charge."""
        def change(usage: Usage) -> Usage:
            claimed = usage.pending.get(digest, (0, 0.0))[0]
            if size > claimed:
                self._refuse_past_quota(tenant, usage.bytes_ - claimed + size, f"blob {digest} ({size:,} bytes)")
            return Usage(usage.artifacts, {**usage.pending, digest: (size, 0.0)})

        self._update(tenant, change)

    def release_blob(self, tenant: Tenant, digest: str) -> None:
        """Undo `reserve_blob` for a blob that was not kept after all."""
        self._update(tenant, lambda usage: Usage(usage.artifacts, _without(usage.pending, {digest}))
                     if digest in usage.pending else None)

    def charge(self, tenant: Tenant, artifact_id: str, manifest_bytes: bytes) -> bool:
        """Charge an artifact (its manifest's bytes and its distinct blobs' stored sizes, in place of their
        blobs' charges); InsufficientStorage if that passes the quota. While blobs are missing (counted at
        their declared sizes) the tenant claims them all instead, so that a second push cannot take the
        room this one needs. Whether the artifact was charged now (not before, nor only claimed)."""
        if sha256_digest(manifest_bytes) != artifact_id:
            raise IntegrityError(f"manifest bytes do not hash to {artifact_id}")
        manifest = Manifest.from_bytes(manifest_bytes, artifact_id)
        declared = {ref.digest: ref.size for ref in manifest.blob_refs()}
        stored = {digest: self.store.blob_size(digest) for digest in declared}
        sizes = {digest: declared[digest] if size is None else size for digest, size in stored.items()}
        size = len(manifest_bytes) + sum(sizes.values())
        complete = None not in stored.values()
        charged = []

        def change(usage: Usage) -> Usage | None:
            charged[:] = [False]
            if artifact_id in usage.artifacts:
                return None
            others = _without(usage.pending, set(declared))
            held = Usage({**usage.artifacts, artifact_id: size}, others)
            self._refuse_past_quota(tenant, held.bytes_, f"artifact {artifact_id} ({size:,} bytes)")
            if complete:
                charged[:] = [True]
                return held
            now = self.clock()
            uploaded = {digest: entry for digest, entry in usage.pending.items() if digest in declared and not entry[1]}
            return Usage(usage.artifacts, {**others, **{digest: (sizes[digest], now) for digest in declared}, **uploaded})

        self._update(tenant, change)
        return charged[0]

    def release(self, tenant: Tenant, artifact_id: str) -> None:
        """Stop charging an artifact to a tenant."""
        self._update(tenant, lambda usage: Usage(_without(usage.artifacts, {artifact_id}), usage.pending)
                     if artifact_id in usage.artifacts else None)

    @staticmethod
    def _refuse_past_quota(tenant: Tenant, total: int, what: str) -> None:
        if total > tenant.quota_bytes:
            raise InsufficientStorage(f"{what} would bring tenant {tenant.name} to {total:,} bytes, past its "
                                      f"quota of {tenant.quota_bytes:,}")


def _without(entries: dict, keys: set[str]) -> dict:
    return {k: v for k, v in entries.items() if k not in keys}


def _bytes_or_none(usage: Usage | None) -> bytes | None:
    return None if usage is None else usage.to_bytes()
