"""Reading and writing KV artifacts: the one module that moves them to and from bytes.

    NAME.kv/manifest.json          the manifest (manifest.py): canonical JSON, the artifact id is its sha256
    NAME.kv/blobs/<sha256-hex>     every blob the manifest names: the token ids (tokenblob.py), the model's
                                   codebook (for a `tc` codec), per layer a basis and a block per chunk
    NAME.kv/signatures.json        producers' detached signatures over the id (trust.py), if signed
    NAME.kv/timings.json           the cloud's seconds: a side record, outside the id and unsigned

On a pipe the same artifact is one tar stream: manifest first, then the side records, then the token
blob, then the blocks layer-major, so a reader can start on layer 0 before the rest arrives. Writing
a directory is atomic. Every blob read is checked against its digest, and none is read past its
declared size. An encrypted artifact's blobs are ciphertext, verified unread; `plain_blobs` opens
them with the reader's `identity` (sealing.py).

Blocks hold keys pre-RoPE and values, each `[kv_heads, tokens, head_dim]`; the tensor side (KV layers
<-> blocks) is `blocks.py`. This module imports no torch: verify, inspect, push, pull and serve-cache
only move bytes.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from celslm.confidential import Identity
from celslm.errors import IntegrityError, OutputExists, UsageError
from celslm.manifest import (MAX_MANIFEST_BYTES, MAX_SIDE_RECORD_BYTES, SIDE_RECORDS, SIGNATURES_NAME, TIMINGS_NAME,
                             TOKENS, Artifact, BlobRef, BlobRole, Manifest, Timings, prefix_hashes, read_side_record,
                             sha256_digest)
from celslm.sealing import BlobKeys
from celslm.tokenblob import decode_tokens
from celslm.trust import Signature

MANIFEST_NAME = "manifest.json"


# ---------------------------------------------------------------- writing


def write_artifact(artifact: Artifact, out: str, force: bool = False, stdout: BinaryIO | None = None) -> None:
    """Write to a directory (atomically: it appears complete or not at all) or, for "-", a tar stream."""
    if out == "-":
        write_tar(artifact, stdout)
    else:
        write_dir(artifact, Path(out), force=force)


def write_dir(artifact: Artifact, path: Path, force: bool = False) -> None:
    if path.exists() and not force:
        raise OutputExists(f"{path} already exists")
    if path.exists() and not (path / MANIFEST_NAME).is_file():
        raise UsageError(f"{path} exists and is not a KV artifact; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        (staging / "blobs").mkdir()
        for ref in artifact.manifest.blob_refs():
            (staging / "blobs" / ref.hex).write_bytes(artifact.blobs[ref.digest])
        for name, data in artifact.side_records():
            (staging / name).write_bytes(data)
        (staging / MANIFEST_NAME).write_bytes(artifact.manifest.canonical_bytes())
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            staging.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_tar(artifact: Artifact, stream: BinaryIO) -> None:
    with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        _add_member(tar, MANIFEST_NAME, artifact.manifest.canonical_bytes())
        for name, data in artifact.side_records():
            _add_member(tar, name, data)
        for ref in artifact.manifest.blob_refs():
            _add_member(tar, f"blobs/{ref.hex}", artifact.blobs[ref.digest])
    stream.flush()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------- reading


def check_blob(ref: BlobRef, data: bytes, manifest: Manifest) -> str | None:
    """None if `data` is the blob `ref` names; otherwise what is wrong, naming the blob."""
    actual = sha256_digest(data)
    if actual != ref.digest:
        return f"{manifest.describe(ref)} is corrupt: its bytes hash to {actual}"
    return None


class ArtifactReader:
    """Reads an artifact from a directory or a tar stream; blobs come out verified, in stream order."""

    identity: Identity | None = None  # opens an encrypted artifact's blobs (`plain_blobs`)

    def __init__(self, manifest: Manifest, source: str, timings: Timings = Timings(),
                 signatures: tuple[Signature, ...] = ()):
        self.manifest = manifest
        self.source = source
        self.timings = timings  # side records: unsigned, not part of the id
        self.signatures = signatures

    @property
    def id(self) -> str:
        return self.manifest.id

    def raw_blobs(self, chunks: int | None = None) -> Iterator[tuple[BlobRef, bytes | None]]:
        """(ref, bytes) in stream order (see `Manifest.blob_refs`); bytes is None for a missing blob. Not verified."""
        raise NotImplementedError

    def blobs(self, chunks: int | None = None) -> Iterator[tuple[BlobRef, bytes]]:
        """Verified blobs in stream order; the first missing or corrupt one raises IntegrityError."""
        for ref, data in self.raw_blobs(chunks):
            if data is None:
                raise IntegrityError(f"{self.source}: {self.manifest.describe(ref)} is missing")
            problem = check_blob(ref, data, self.manifest)
            if problem:
                raise IntegrityError(f"{self.source}: {problem}")
            yield ref, data

    def plain_blobs(self, chunks: int | None = None) -> Iterator[tuple[BlobRef, bytes]]:
        """Verified blobs in stream order, decrypted when the artifact is encrypted: the content key is
        unwrapped through `identity` before any blob is read (Sealed without one that opens it)."""
        if self.manifest.encryption is None:
            yield from self.blobs(chunks)
            return
        keys = BlobKeys.unwrapped(self.manifest, self.identity, self.source)
        roles = iter(self.manifest.blob_roles(chunks))  # the same stream order as `blobs`
        for ref, data in self.blobs(chunks):
            yield ref, self._opened(keys, next(roles)[1], ref, data)

    def _opened(self, keys: BlobKeys, role: BlobRole, ref: BlobRef, data: bytes) -> bytes:
        try:
            return keys.open(role, ref, data)
        except IntegrityError as exc:
            raise IntegrityError(f"{self.source}: {self.manifest.describe(ref)} {exc}") from exc

    def problems(self) -> list[str]:
        """Everything wrong with the artifact, without stopping at the first problem. An encrypted
        artifact's blobs are opened (and its token ids checked) only with an `identity` that opens it."""
        m = self.manifest
        found = []
        token_ids, keys = None, None
        if m.encryption and self.identity:
            try:
                keys = BlobKeys.unwrapped(m, self.identity, self.source)
            except IntegrityError as exc:  # a forged or corrupt wrapped key; the digests are still checked
                found.append(str(exc).removeprefix(f"{self.source}: "))
        roles = iter(m.blob_roles())
        try:
            for ref, data in self.raw_blobs():
                role = next(roles)[1]
                if data is None:
                    found.append(f"{m.describe(ref)} is missing")
                    continue
                problem = check_blob(ref, data, m)
                if problem:
                    found.append(problem)
                    continue
                if keys is not None:
                    try:
                        data = self._opened(keys, role, ref, data)
                    except IntegrityError as exc:
                        found.append(str(exc).removeprefix(f"{self.source}: "))
                        continue
                if role == TOKENS and (m.encryption is None or keys):
                    token_ids = decode_tokens(data)
        except IntegrityError as exc:  # a truncated stream: nothing more can be read
            found.append(str(exc).removeprefix(f"{self.source}: "))
        if token_ids is not None:
            keyed = keys.prefix_key if keys else None
            if len(token_ids) != m.token_count:
                found.append(f"token ids blob holds {len(token_ids)} tokens, manifest says {m.token_count}")
            elif tuple(prefix_hashes(token_ids, m.space.fingerprint, m.chunk_size, keyed)) != m.prefix_hashes:
                found.append("prefix hashes do not match the token ids and model space")
        return found


class DirectoryReader(ArtifactReader):
    def __init__(self, path: Path):
        manifest = _read_file(path / MANIFEST_NAME, MAX_MANIFEST_BYTES)
        if manifest is None:
            raise UsageError(f"{path}: no {MANIFEST_NAME}; not a KV artifact directory")
        records = {}
        for name in SIDE_RECORDS:
            data = _read_file(path / name, MAX_SIDE_RECORD_BYTES)
            if data is not None:
                records[name] = read_side_record(name, data, str(path))
        super().__init__(Manifest.from_bytes(manifest, str(path)), str(path), records.get(TIMINGS_NAME, Timings()),
                         records.get(SIGNATURES_NAME, ()))
        self.path = path

    def raw_blobs(self, chunks=None):
        for ref in self.manifest.blob_refs(chunks):
            # a file of another size is corrupt: it is not read (it could be any size)
            yield ref, _read_file(self.path / "blobs" / ref.hex, ref.size)


def _read_file(path: Path, limit: int) -> bytes | None:
    """A file's bytes, None if absent; a file over `limit` bytes reads as its first `limit + 1`, which
    no digest or parser accepts."""
    try:
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except FileNotFoundError:
        return None


class TarStreamReader(ArtifactReader):
    """Reads the tar form sequentially, so it works on a pipe; blobs are yielded as they arrive."""

    def __init__(self, stream: BinaryIO, source: str):
        try:
            self._tar = tarfile.open(fileobj=stream, mode="r|")
            first = self._tar.next()
        except tarfile.TarError as exc:
            raise IntegrityError(f"{source}: not a KV artifact stream or truncated ({exc})") from exc
        if first is None or first.name != MANIFEST_NAME:
            raise IntegrityError(f"{source}: stream does not start with {MANIFEST_NAME}")
        manifest = Manifest.from_bytes(self._read(first, source, MAX_MANIFEST_BYTES), source)
        records = {}
        try:
            member = self._tar.next()
            while member is not None and member.name in SIDE_RECORDS:  # before the first blob
                records[member.name] = read_side_record(member.name, self._read(member, source, MAX_SIDE_RECORD_BYTES), source)
                member = self._tar.next()
        except (tarfile.TarError, EOFError) as exc:
            raise IntegrityError(f"{source}: truncated artifact stream ({exc})") from exc
        super().__init__(manifest, source, records.get(TIMINGS_NAME, Timings()), records.get(SIGNATURES_NAME, ()))

    def _read(self, member: tarfile.TarInfo, source: str, limit: int) -> bytes:
        """A member's bytes; one declaring more than `limit` is refused unread."""
        if member.size > limit:
            raise IntegrityError(f"{source}: {member.name} declares {member.size:,} bytes (at most {limit:,} expected)")
        try:
            handle = self._tar.extractfile(member)
            data = handle.read() if handle else b""
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise IntegrityError(f"{source}: truncated stream inside {member.name} ({exc})") from exc
        if len(data) != member.size:
            raise IntegrityError(f"{source}: truncated stream inside {member.name}")
        return data

    def raw_blobs(self, chunks=None):
        wanted = self.manifest.blob_refs(chunks)
        sizes = {ref.digest: ref.size for ref in self.manifest.blob_refs()}
        arrived: dict[str, bytes] = {}
        position = 0
        try:
            for member in self._tar:
                digest = "sha256:" + member.name.removeprefix("blobs/")
                if not member.name.startswith("blobs/") or digest not in sizes:
                    continue  # side records, and blobs this manifest does not list, are skipped unread
                arrived[digest] = self._read(member, self.source, sizes[digest])
                while position < len(wanted) and wanted[position].digest in arrived:
                    yield wanted[position], arrived[wanted[position].digest]
                    position += 1
        except (tarfile.TarError, EOFError) as exc:
            raise IntegrityError(f"{self.source}: truncated artifact stream ({exc})") from exc
        if position < len(wanted):
            missing = len(wanted) - position
            raise IntegrityError(
                f"{self.source}: truncated artifact stream: {missing} blobs never arrived, "
                f"first {self.manifest.describe(wanted[position])}"
            )


class MemoryReader(ArtifactReader):
    """Reads an in-memory artifact the same way (digests checked), e.g. to measure a codec round trip."""

    def __init__(self, artifact: Artifact, source: str = "<memory>"):
        super().__init__(artifact.manifest, source, artifact.timings, artifact.signatures)
        self._blobs = artifact.blobs

    def raw_blobs(self, chunks=None):
        for ref in self.manifest.blob_refs(chunks):
            yield ref, self._blobs.get(ref.digest)


def open_artifact(ref: str, stdin: BinaryIO | None = None, identity: Identity | None = None) -> ArtifactReader:
    """Open a directory, a .tar file, or "-" (a tar stream on stdin); `identity` opens it if it is encrypted."""
    if ref == "-":
        reader = TarStreamReader(stdin, "<stdin>")
    elif Path(ref).is_dir():
        reader = DirectoryReader(Path(ref))
    elif Path(ref).is_file():
        reader = TarStreamReader(open(ref, "rb"), ref)
    else:
        raise UsageError(f"{ref}: no such KV artifact (a directory, a .tar stream file, or - for stdin)")
    reader.identity = identity
    return reader
