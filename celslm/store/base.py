"""The one protocol every place an artifact lives speaks (`Store`): a directory, Redis, a bucket, or
another serve-cache over HTTP. Blob reads bounded in size, has and put; manifests, their signatures
and timings; tags; the codebook record; prefix lookup in a model space; and, where the bytes can be
fetched without this process, a URL for a blob (`blob_url`, which serve-cache redirects to).

Stores that hold the bytes implement a few primitives (`_read`, `_write`, a `HashingWriter`...) and
inherit the rest; the HTTP client (http.py) implements the public methods over serve-cache's API.

A store keeps what it is given and checks what it can without trusting anyone: blob digests,
canonical manifests whose blobs are all present, signatures valid for their own public keys, tag
statements about this tag. Whose signatures count is the reader's policy (trust.py), not the store's.
"""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from celslm.errors import InsufficientStorage, IntegrityError, NotFound, UsageError
from celslm.manifest import DIGEST, Manifest, Timings, check_digest, read_side_record, sha256_digest
from celslm.manifest import SIGNATURES_NAME, TIMINGS_NAME
from celslm.trust import Signature, SignedTag, artifact_message, canonical_json, merge_signatures

# A tag may carry one namespace, `acme/sched:latest` (a serve-cache tenant writes only its own); its
# last part is never `statement`, which would read as the statement route of the namespace's tag.
NAMESPACE = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
TAG = re.compile(rf"^(?:{NAMESPACE}/)?[A-Za-z0-9][A-Za-z0-9._:-]{{0,127}}$")
IMMUTABLE = "public, max-age=31536000, immutable"  # what any HTTP cache may do with a blob: keep it for good
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def without_credentials(url: str) -> str:
    """The URL with any user:password@ taken out (up to the last @: a password may hold a bare / or @):
    what messages, metrics and errors may show."""
    scheme, sep, rest = url.partition("://")
    return scheme + sep + rest.rpartition("@")[2]


def first_line(exc: BaseException) -> str:
    """An exception's message, first line only (a client library's may run to pages)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def parse_size(text: str) -> int:
    """'10GB', '512MiB', '1000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in UNITS:
        raise UsageError(f"bad size {text!r}; use e.g. 10GB, 512MiB or a byte count")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def check_tag(name: str) -> str:
    if not TAG.match(name) or name.endswith("/statement"):
        raise UsageError(f"bad tag name {name!r}; letters, digits and . _ : - (up to 128), after an optional "
                         "namespace and a slash (acme/sched:latest)")
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
        actual = "sha256:" + self._hash.hexdigest()  # streamed: sha256_digest needs the whole blob
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


class Store:
    """What every backend shares: manifests, tags and the prefix index over a few primitives."""

    capacity_bytes: int | None = None
    evictions = 0
    on_disk = False  # blobs are files (blob_file); a server checks one is still there before sending it from memory
    url = ""  # where it is, for messages: never credentials

    def _read(self, kind: str, name: str) -> bytes | None:  # kind: blobs, manifests, signatures, timings, tags, prefixes, codebooks
        raise NotImplementedError

    def _write(self, kind: str, name: str, data: bytes) -> None:
        raise NotImplementedError

    def _touch(self, artifact_hex: str) -> None:
        """Mark an artifact as just used (LRU)."""

    def has_blob(self, digest: str) -> bool:
        raise NotImplementedError

    def blob_size(self, digest: str) -> int | None:
        """The stored blob's size in bytes, None if it is not stored (not verified: a size is not a read)."""
        data = self._read("blobs", check_digest(digest))
        return None if data is None else len(data)

    def update(self, kind: str, name: str, change: Callable[[bytes | None], bytes | None]) -> None:
        """Read, change and write one record as one step for every process sharing the store: `change`
        gets the record (None if absent) and returns its new bytes, or None to leave it; what it raises
        leaves the record as it was. Serve-cache's tenant ledgers (tenants.py) are kept this way."""
        raise UsageError(f"{type(self).__name__} cannot change a record in one step for all its users")

    def blob_writer(self, digest: str):
        raise NotImplementedError

    def blob_file(self, digest: str) -> Path | None:
        """A file holding the blob, for stores on local disk (the server then streams it with sendfile)."""
        return None

    def evict(self, keep: str | None = None) -> int:
        return 0

    def stale_tmp(self) -> None:
        """Remove what a crashed write left behind (stores that stage writes)."""

    def usage_bytes(self) -> int:
        raise NotImplementedError

    @contextmanager
    def reading(self, digest: str):
        yield

    def read_blob(self, digest: str, limit: int | None = None) -> bytes | None:
        """The blob's bytes, verified; a stored copy that no longer matches its digest is quarantined
        (so a new push or fetch can replace it) and reads as absent. One larger than `limit` (the size
        a manifest declares for it) is not read, and reads as absent."""
        if limit is not None and (self.blob_size(digest) or 0) > limit:
            return None
        data = self._read("blobs", check_digest(digest))
        if data is not None and sha256_digest(data) != digest:
            self.quarantine(digest)
            return None
        return data

    def quarantine(self, digest: str) -> None:
        """Take a corrupt blob out of service (kept aside where the backend can, for a look)."""
        raise NotImplementedError

    def check_blob(self, digest: str) -> bool:
        """Whether a valid copy of the blob is stored (a corrupt one is quarantined, and so absent)."""
        return self.read_blob(digest) is not None

    def blob_url(self, digest: str) -> str | None:
        """A URL any HTTP client can GET the blob from without this process (a presigned object URL),
        or None where there is none."""
        return None

    def put_blob(self, digest: str, data: bytes) -> None:
        if self.check_blob(digest):
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

    def put_manifest(self, artifact_id: str, data: bytes, tag: str | None = None) -> list[str]:
        """Store a manifest whose blobs are all present; otherwise store nothing and return the missing
        digests. `tag` names the tag a push will set, so that a store that would refuse it (a serve-cache
        tenant's namespace) does so before any blob is sent."""
        hex_id = check_digest(artifact_id)
        if tag is not None:
            check_tag(tag)
        if sha256_digest(data) != artifact_id:
            raise IntegrityError(f"manifest bytes do not hash to {artifact_id}")
        manifest = Manifest.from_bytes(data, artifact_id)
        size = sum({ref.digest: ref.size for ref in manifest.blob_refs()}.values())
        if self.capacity_bytes is not None and size > self.capacity_bytes:
            raise InsufficientStorage(f"artifact {artifact_id} needs {size:,} bytes; the store holds {self.capacity_bytes:,}")
        # each blob checked against its digest (a corrupt copy is quarantined): a push then repairs it
        missing = [digest for digest in dict.fromkeys(ref.digest for ref in manifest.blob_refs())
                   if not self.check_blob(digest)]
        if missing:
            return missing
        self._write("manifests", hex_id, data)
        self._touch(hex_id)
        for count, prefix in enumerate(manifest.prefix_hashes, start=1):
            self._write("prefixes", prefix, f"{artifact_id} {count}".encode())
        if manifest.codebook is not None:  # so that other machines compressing for this model can share it
            self._write("codebooks", manifest.space.fingerprint, manifest.codebook.digest.encode())
        self.evict(keep=artifact_id)  # others make room; what was just accepted stays
        return []

    def get_signatures(self, artifact_id: str) -> tuple[Signature, ...]:
        data = self._read("signatures", check_digest(artifact_id))
        return read_side_record(SIGNATURES_NAME, data, artifact_id) if data is not None else ()

    def put_signatures(self, artifact_id: str, signatures: tuple[Signature, ...]) -> None:
        """Add signatures over a stored artifact's id; one that does not verify is refused (all of them)."""
        hex_id = check_digest(artifact_id)
        if self._read("manifests", hex_id) is None:
            raise NotFound(f"artifact {artifact_id} is not stored here; push it before its signatures")
        if not all(sig.valid_for(artifact_message(artifact_id)) for sig in signatures):
            raise IntegrityError(f"a signature over {artifact_id} does not verify with its own public key")
        merged = merge_signatures(self.get_signatures(artifact_id), signatures)
        self._write("signatures", hex_id, canonical_json([sig.to_json() for sig in merged]))

    def get_timings(self, artifact_id: str) -> Timings:
        data = self._read("timings", check_digest(artifact_id))
        return read_side_record(TIMINGS_NAME, data, artifact_id) if data is not None else Timings()

    def put_timings(self, artifact_id: str, timings: Timings) -> None:
        hex_id = check_digest(artifact_id)
        if self._read("manifests", hex_id) is None:
            raise NotFound(f"artifact {artifact_id} is not stored here; push it before its timings")
        self._write("timings", hex_id, canonical_json(timings.to_json()))

    def get_tag(self, name: str) -> str | None:
        record = self._tag_record(name)
        return record[0] if record else None

    def get_signed_tag(self, name: str) -> SignedTag | None:
        record = self._tag_record(name)
        return record[1] if record else None

    def _tag_record(self, name: str) -> tuple[str, SignedTag | None] | None:
        """(artifact id, signed statement or None). Stored as {"artifact", "signed"}; a bare id is an
        unsigned tag written before statements existed."""
        data = self._read("tags", check_tag(name))
        if data is None:
            return None
        if DIGEST.match(data.decode(errors="replace").strip()):
            return data.decode().strip(), None
        try:
            obj = json.loads(data)
            signed = obj["signed"] and SignedTag.from_bytes(canonical_json(obj["signed"]), f"tag {name}")
            return str(obj["artifact"]), signed or None
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"tag {name}: stored record is malformed ({str(exc)[:80]})") from exc

    def put_tag(self, name: str, artifact_id: str, signed: SignedTag | None = None) -> None:
        """Point a tag at a stored artifact; a signed statement must be about this tag and artifact."""
        check_tag(name)
        if self._read("manifests", check_digest(artifact_id)) is None:
            raise UsageError(f"tag {name}: artifact {artifact_id} is not stored here")
        if signed is not None and (signed.statement.tag, signed.statement.artifact) != (name, artifact_id):
            raise UsageError(f"tag {name}: the statement names tag {signed.statement.tag!r} and "
                             f"{signed.statement.artifact}, not this tag and {artifact_id}")
        record = {"artifact": artifact_id, "signed": signed.to_json() if signed else None}
        self._write("tags", name, canonical_json(record))

    def delete_tag(self, name: str) -> bool:
        """Remove a tag; whether there was one."""
        return self._delete("tags", check_tag(name))

    def _delete(self, kind: str, name: str) -> bool:
        raise UsageError(f"{type(self).__name__} cannot delete a {kind[:-1]}")

    def get_codebook(self, fingerprint: str) -> str | None:
        """The digest of the codebook the last stored artifact of this model (fingerprint) was coded with."""
        if not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
            raise UsageError(f"malformed model fingerprint {fingerprint[:80]!r}")
        data = self._read("codebooks", fingerprint)
        if data is None:
            return None
        if not DIGEST.match(data.decode(errors="replace")):
            raise IntegrityError(f"codebook of {fingerprint[:12]}: stored record is malformed")
        return data.decode()

    def lookup(self, space: str | None, prefix_hashes: list[str]) -> tuple[str, int] | None:
        """The stored artifact of model space `space` (a fingerprint; None: any) holding the longest
        prefix of these chunk hashes: (artifact id, chunks)."""
        for prefix in prefix_hashes:
            if not re.fullmatch(r"[0-9a-f]{64}", prefix):
                raise UsageError(f"malformed prefix hash {prefix[:80]!r}")
        for count in range(len(prefix_hashes), 0, -1):
            entry = self._read("prefixes", prefix_hashes[count - 1])
            if entry is None:
                continue
            artifact_id, stored_count = entry.decode().split()
            if int(stored_count) != count:
                continue
            data = self._read("manifests", artifact_id.removeprefix("sha256:"))  # evicted since: a miss
            try:
                if data is not None and (space is None or Manifest.from_bytes(data, artifact_id).space.fingerprint == space):
                    return artifact_id, count
            except IntegrityError:  # a damaged record is a miss here; reading the artifact says what is wrong
                continue
        return None


