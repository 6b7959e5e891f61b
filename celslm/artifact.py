"""KV artifact format v1: the one module that writes and reads it.

An artifact is a manifest plus content-addressed blobs, like an OCI image:

    NAME.kv/manifest.json          schema celslm.kv/2, canonical JSON; the artifact id is its sha256
    NAME.kv/blobs/<sha256-hex>     one safetensors file per block (layer x chunk), plus the token ids
                                   (and the model's codebook, for a `tc` codec)
    NAME.kv/signatures.json        producers' detached signatures over the id (trust.py), if signed
    NAME.kv/timings.json           the cloud's seconds: a side record, outside the id and unsigned

An encrypted artifact (`seal_artifact`) lists its recipients in the manifest, and its blobs are
ciphertext (confidential.py): digests are over the ciphertext, so stores verify it unread, and
`plain_blobs` opens it with the reader's `identity`.

The id-bearing bytes hold only what the context, the model, the chunking and the codec decide, so
the same work gives the same id on every run and machine (encryption, which is random, aside). Blocks hold keys pre-RoPE and values,
each `[kv_heads, tokens, head_dim]`. On a pipe the same artifact is one tar stream: manifest first,
then the side records, then the token blob, then the blocks layer-major, so a reader can start on
layer 0 before the rest arrives. Every blob read is checked against its digest.

Every count and size a manifest declares is checked against its geometry and sane limits before
anything is allocated from it, and no blob is read past its declared size: a manifest may come
from an untrusted peer.

Everything else sees typed objects (`Manifest`, `ModelSpace`, `Producer`, `Timings`, `Geometry`).
This module imports no torch: verify, inspect, push, pull and serve-cache only move bytes. The
tensor side (KV layers <-> blocks) is `blocks.py`.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import re
import shutil
import struct
import tarfile
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from celslm.codebook import MEDIA_CODEBOOK
from celslm.codecs import parse_codec
from celslm.errors import IntegrityError, OutputExists, UsageError
from celslm.confidential import (Encryption, Identity, blob_aad, blob_key, content_key, new_content_key, open_blob,
                                 prefix_key, seal_blob, wrap)
from celslm.trust import Signature, canonical_json, parse_signatures

SCHEMA = "celslm.kv/2"
OLD_SCHEMAS = ("celslm.kv/1",)  # its timings were inside the id; such artifacts are made again with prefill
MEDIA_MANIFEST = "application/vnd.celslm.kv.manifest.v1+json"
MEDIA_TOKENS = "application/vnd.celslm.kv.tokens.v1+safetensors"
MANIFEST_NAME = "manifest.json"
SIGNATURES_NAME = "signatures.json"
TIMINGS_NAME = "timings.json"
SIDE_RECORDS = (SIGNATURES_NAME, TIMINGS_NAME)
# Limits on what a manifest may declare, far above any model this runs (checked before any allocation)
MAX_MANIFEST_BYTES = 16 << 20
MAX_SIDE_RECORD_BYTES = 64 << 10
MAX_TOKENS = 1 << 22
MAX_LAYERS, MAX_KV_HEADS, MAX_HEAD_DIM = 1024, 1024, 1024
BLOB_SLACK_BYTES = 1 << 20  # safetensors headers, codec scales, an lz4 frame's worst-case growth
DTYPE_NAMES = ("float32", "float16", "bfloat16")  # how uncompressed blocks store their tensors
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: str) -> str:
    """A well-formed `sha256:<64 hex>` digest's hex part; anything else is refused."""
    if not isinstance(digest, str) or not DIGEST.match(digest):
        raise UsageError(f"malformed digest {str(digest)[:80]!r}; expected sha256:<64 hex>")
    return digest.removeprefix("sha256:")


def prefix_hashes(token_ids: list[int], fingerprint: str, chunk_size: int, key: bytes | None = None) -> list[str]:
    """h_i = sha256(h_{i-1} || fingerprint bytes || chunk i's ids as little-endian uint32); h_{-1} = 32 zero bytes.
    With `key` (an encrypted artifact's prefix key) every link is HMAC-SHA256 under it instead, so
    that only a holder of the key can compute or test them."""
    space = bytes.fromhex(fingerprint)
    previous = bytes(32)
    hashes = []
    for start in range(0, len(token_ids), chunk_size):
        chunk = token_ids[start : start + chunk_size]
        message = previous + space + struct.pack(f"<{len(chunk)}I", *chunk)
        previous = hmac.digest(key, message, "sha256") if key else hashlib.sha256(message).digest()
        hashes.append(previous.hex())
    return hashes


@dataclass(frozen=True)
class BlobRef:
    digest: str  # "sha256:<hex>"
    size: int
    media_type: str

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")

    def to_json(self) -> dict:
        return {"digest": self.digest, "size": self.size, "media_type": self.media_type}

    @classmethod
    def from_json(cls, obj: dict) -> BlobRef:
        digest = obj["digest"]
        if not isinstance(digest, str) or not DIGEST.match(digest):
            raise ValueError(f"malformed digest {str(digest)[:80]!r}")
        size = obj["size"]
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError(f"blob size {str(size)[:40]} is not a positive integer")
        return cls(digest, size, str(obj["media_type"]))


def _fingerprint(value) -> str:
    if not isinstance(value, str) or not FINGERPRINT.match(value):
        raise ValueError(f"malformed fingerprint {str(value)[:80]!r} (expected 64 hex digits)")
    return value


@dataclass(frozen=True)
class ModelSpace:
    """The model whose attention consumes a KV cache: a name for people, a fingerprint for machines."""

    name: str
    fingerprint: str  # sha256 hex over config, weights and tokenizer (models.model_fingerprint)

    def to_json(self) -> dict:
        return {"name": self.name, "fingerprint": self.fingerprint}

    @classmethod
    def from_json(cls, obj: dict) -> ModelSpace:
        return cls(str(obj["name"]), _fingerprint(obj["fingerprint"]))


@dataclass(frozen=True)
class Producer:
    """Who computed the KV: the model that ran, and for a cross-model artifact the alignment's digest,
    which of the small model's layers are its own (`native_layers`) and how many sink tokens."""

    model: str
    fingerprint: str
    alignment: str | None = None
    native_layers: tuple[int, ...] | None = None  # cross-model only
    sink_tokens: int | None = None  # cross-model only

    @classmethod
    def native(cls, space: ModelSpace) -> Producer:
        return cls(space.name, space.fingerprint)

    def to_json(self) -> dict:
        obj = {"model": self.model, "fingerprint": self.fingerprint, "alignment": self.alignment}
        if self.native_layers is not None:
            obj["native_layers"] = list(self.native_layers)
        if self.sink_tokens is not None:
            obj["sink_tokens"] = self.sink_tokens
        return obj

    @classmethod
    def from_json(cls, obj: dict) -> Producer:
        alignment = obj.get("alignment")
        native = obj.get("native_layers")
        sink = obj.get("sink_tokens")
        return cls(str(obj["model"]), _fingerprint(obj["fingerprint"]), None if alignment is None else str(alignment),
                   None if native is None else tuple(int(i) for i in native), None if sink is None else int(sink))


@dataclass(frozen=True)
class Timings:
    """Cloud-side seconds, recorded by the producer: T_com_C is their sum."""

    prefill_s: float | None = None
    projection_s: float | None = None
    compress_s: float | None = None

    @property
    def cloud_s(self) -> float:
        return sum((t for t in (self.prefill_s, self.projection_s, self.compress_s) if t is not None), 0.0)

    def to_json(self) -> dict:
        return {k: v for k, v in (("prefill_s", self.prefill_s), ("projection_s", self.projection_s),
                                   ("compress_s", self.compress_s)) if v is not None}

    @classmethod
    def from_json(cls, obj: dict) -> Timings:
        unknown = set(obj) - {"prefill_s", "projection_s", "compress_s"}
        if unknown:
            raise ValueError(f"unknown timings {sorted(unknown)}")
        values = {k: float(v) for k, v in obj.items()}
        if any(not 0 <= v < float("inf") for v in values.values()):
            raise ValueError("timings must be finite and non-negative")
        return cls(**values)


@dataclass(frozen=True)
class Geometry:
    """The attention cache's shape: per layer, `kv_heads` heads of `head_dim` channels."""

    layers: int
    kv_heads: int
    head_dim: int

    def to_json(self) -> dict:
        return {"layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim}

    @classmethod
    def from_json(cls, obj: dict) -> Geometry:
        geometry = cls(int(obj["layers"]), int(obj["kv_heads"]), int(obj["head_dim"]))
        if min(geometry.layers, geometry.kv_heads, geometry.head_dim) <= 0:
            raise ValueError(f"geometry must be positive, got {obj}")
        return geometry


@dataclass(frozen=True)
class Manifest:
    space: ModelSpace  # the model whose attention consumes this KV
    producer: Producer  # who computed it (alignment digest for cross-model)
    token_count: int
    chunk_size: int
    tokens: BlobRef  # the token-id blob; its digest is the token-id digest
    prefix_hashes: tuple[str, ...]
    geometry: Geometry
    dtype: str
    codec: str
    framing: str  # "chat": the context opens a chat-template user turn; "raw": plain text
    blocks: tuple[tuple[BlobRef, ...], ...]  # [layer][chunk], layer-major
    provenance: tuple[str, ...]  # per layer: "native" or "projected"
    keys: str = "pre-rope"
    bases: tuple[BlobRef | None, ...] = ()  # per layer: the codec's auxiliary blob (PCA bases), if any
    encryption: Encryption | None = None  # every blob encrypted for these recipients (confidential.py)
    codebook: BlobRef | None = None  # the model's codebook (codebook.py), for a `tc` codec: never encrypted

    def layer_aux(self, layer: int) -> BlobRef | None:
        return self.bases[layer] if self.bases else None

    def layer_bytes(self, layer: int) -> int:
        aux = self.layer_aux(layer)
        return sum(ref.size for ref in self.blocks[layer]) + (aux.size if aux else 0)

    @property
    def layers(self) -> int:
        return len(self.blocks)

    @property
    def chunks(self) -> int:
        return len(self.prefix_hashes)

    def chunk_lengths(self) -> list[int]:
        full, last = divmod(self.token_count, self.chunk_size)
        return [self.chunk_size] * full + ([last] if last else [])

    def blob_places(self, chunks: int | None = None) -> list[tuple[BlobRef, str]]:
        """Every blob in stream order with its place: the token ids ("tokens"), the model's codebook
        ("codebook", if the codec uses one), then per layer its
        auxiliary blob ("basis L", if any) and its blocks ("block L C"); with `chunks`, only the blocks
        of the first `chunks` chunks (a cached prefix)."""
        places = [(self.tokens, "tokens")] + ([(self.codebook, "codebook")] if self.codebook else [])
        for layer, blocks in enumerate(self.blocks):
            aux = self.layer_aux(layer)
            places += ([(aux, f"basis {layer}")] if aux else []) + \
                [(ref, f"block {layer} {chunk}") for chunk, ref in enumerate(blocks[:chunks])]
        return places

    def blob_refs(self, chunks: int | None = None) -> list[BlobRef]:
        """Every blob in stream order (see `blob_places`)."""
        return [ref for ref, _ in self.blob_places(chunks)]

    def header_digest(self) -> bytes:
        """sha256 of every field but the blob references, prefix hashes and recipients: what an
        encrypted artifact's blobs are sealed under (confidential.blob_aad), so that a manifest that
        changes any of it, around the same ciphertext, fails to decrypt."""
        obj = self.to_json()
        for name in ("blocks", "bases", "prefix_hashes", "encryption"):
            obj.pop(name, None)
        obj["tokens"] = {"count": self.token_count, "chunk_size": self.chunk_size}
        return hashlib.sha256(canonical_json(obj)).digest()

    def blob_bytes(self) -> int:
        return sum(ref.size for ref in self.blob_refs())

    def shipped_bytes(self) -> int:
        """What fetching this context moves: its manifest and every blob but the model's codebook (which
        every artifact of the model shares, so it is counted once per model, not per context)."""
        return len(self.canonical_bytes()) + self.blob_bytes() - (self.codebook.size if self.codebook else 0)

    def fp16_kv_bytes(self) -> int:
        """The context's keys and values at float16: what compression ratios are measured against."""
        g = self.geometry
        return 2 * 2 * g.layers * g.kv_heads * g.head_dim * self.token_count

    def describe(self, ref: BlobRef) -> str:
        """Name a blob for an error message: which layer and chunk it holds."""
        if ref.digest == self.tokens.digest:
            return f"token ids blob {ref.digest}"
        if self.codebook and ref.digest == self.codebook.digest:
            return f"codebook blob {ref.digest}"
        for layer, aux in enumerate(self.bases):
            if aux and aux.digest == ref.digest:
                return f"basis blob {ref.digest} (layer {layer})"
        for layer, refs in enumerate(self.blocks):
            for chunk, block in enumerate(refs):
                if block.digest == ref.digest:
                    return f"block {ref.digest} (layer {layer}, chunk {chunk})"
        return f"blob {ref.digest}"

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "space": self.space.to_json(),
            "producer": self.producer.to_json(),
            "tokens": {"count": self.token_count, "chunk_size": self.chunk_size, **self.tokens.to_json()},
            "prefix_hashes": list(self.prefix_hashes),
            "geometry": self.geometry.to_json(),
            "keys": self.keys,
            "dtype": self.dtype,
            "codec": self.codec,
            "framing": self.framing,
            "blocks": [[ref.to_json() for ref in layer] for layer in self.blocks],
            "provenance": list(self.provenance),
            **({"bases": [ref.to_json() if ref else None for ref in self.bases]} if any(self.bases) else {}),
            **({"encryption": self.encryption.to_json()} if self.encryption else {}),
            **({"codebook": self.codebook.to_json()} if self.codebook else {}),
        }

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    @property
    def id(self) -> str:
        return sha256_digest(self.canonical_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "manifest") -> Manifest:
        if len(data) > MAX_MANIFEST_BYTES:
            raise IntegrityError(f"{source}: manifest of {len(data):,} bytes (the limit is {MAX_MANIFEST_BYTES:,})")
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise IntegrityError(f"{source}: manifest is not valid JSON ({str(exc)[:120]})") from exc
        if not isinstance(obj, dict) or obj.get("schema") != SCHEMA:
            found = obj.get("schema") if isinstance(obj, dict) else None
            if found in OLD_SCHEMAS:
                raise UsageError(f"{source}: artifact format {found} (its id depends on timings); "
                                 f"make it again with this celslm's prefill ({SCHEMA})")
            raise UsageError(f"{source}: not a celslm KV artifact (schema {str(found)[:40]!r}, expected {SCHEMA!r})")
        _check_counts(obj, source)
        try:
            tokens = obj["tokens"]
            manifest = cls(
                space=ModelSpace.from_json(obj["space"]),
                producer=Producer.from_json(obj["producer"]),
                token_count=int(tokens["count"]),
                chunk_size=int(tokens["chunk_size"]),
                tokens=BlobRef.from_json(tokens),
                prefix_hashes=tuple(obj["prefix_hashes"]),
                geometry=Geometry.from_json(obj["geometry"]),
                dtype=str(obj["dtype"]),
                codec=str(obj["codec"]),
                framing=str(obj["framing"]),
                blocks=tuple(tuple(BlobRef.from_json(b) for b in layer) for layer in obj["blocks"]),
                provenance=tuple(obj["provenance"]),
                keys=str(obj["keys"]),
                bases=tuple(BlobRef.from_json(b) if b else None for b in obj.get("bases", [])),
                encryption=Encryption.from_json(obj["encryption"]) if "encryption" in obj else None,
                codebook=BlobRef.from_json(obj["codebook"]) if "codebook" in obj else None,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise IntegrityError(f"{source}: malformed manifest ({type(exc).__name__}: {exc})") from exc
        manifest._check_shape(source)
        if manifest.canonical_bytes() != data:  # the id names exactly these bytes, and one manifest has one id
            what = "fields or values this version of celslm does not write" \
                if manifest.canonical_bytes() != canonical_json(obj) else "bytes that are not its canonical JSON"
            raise IntegrityError(f"{source}: manifest has {what}")
        return manifest

    def _check_shape(self, source: str) -> None:
        if not 0 < self.chunk_size <= MAX_TOKENS or self.chunks != -(-self.token_count // self.chunk_size):
            raise IntegrityError(f"{source}: {self.chunks} prefix hashes for {self.token_count} tokens")
        if any(len(layer) != self.chunks for layer in self.blocks) or len(self.provenance) != self.layers:
            raise IntegrityError(f"{source}: block table does not match {self.chunks} chunks x {self.layers} layers")
        if self.layers != self.geometry.layers:
            raise IntegrityError(f"{source}: {self.layers} layers of blocks, geometry says {self.geometry.layers}")
        if any(not FINGERPRINT.match(str(h)) for h in self.prefix_hashes):
            raise IntegrityError(f"{source}: malformed prefix hash")
        if self.keys != "pre-rope" or self.dtype not in DTYPE_NAMES:
            raise UsageError(f"{source}: unsupported key layout {self.keys!r} or dtype {self.dtype!r}")
        if self.bases and len(self.bases) != self.layers:
            raise IntegrityError(f"{source}: {len(self.bases)} basis entries for {self.layers} layers")
        codec = parse_codec(self.codec)  # an unknown codec is refused here, before any block is read
        if bool(codec.transform) != (self.codebook is not None):
            raise IntegrityError(f"{source}: codec {self.codec} " + ("names no codebook" if codec.transform else
                                                                      "does not use the codebook the manifest names"))
        if self.codebook and self.codebook.media_type != MEDIA_CODEBOOK:
            raise IntegrityError(f"{source}: codebook blob has media type {self.codebook.media_type[:80]}")
        self._check_sizes(source)

    def _check_sizes(self, source: str) -> None:
        """No blob may declare more bytes than its tensors at float32 (plus slack): a reader trusts
        these sizes to bound what it reads from a peer."""
        g = self.geometry
        if self.tokens.size > 8 * self.token_count + BLOB_SLACK_BYTES:
            raise IntegrityError(f"{source}: token ids blob declares {self.tokens.size:,} bytes for {self.token_count} tokens")
        basis_bound = 2 * 4 * g.kv_heads * g.head_dim * (g.head_dim + 1) + BLOB_SLACK_BYTES
        if self.codebook and self.codebook.size > codebook_bound(g):
            raise IntegrityError(f"{source}: the codebook blob declares {self.codebook.size:,} bytes, more than its "
                                 f"geometry needs")
        if any(ref is not None and ref.size > basis_bound for ref in self.bases):
            raise IntegrityError(f"{source}: a basis blob declares more than {basis_bound:,} bytes")
        for chunk, tokens in enumerate(self.chunk_lengths()):
            bound = 2 * 4 * g.kv_heads * tokens * g.head_dim + BLOB_SLACK_BYTES
            for layer, refs in enumerate(self.blocks):
                if refs[chunk].size > bound:
                    raise IntegrityError(f"{source}: block (layer {layer}, chunk {chunk}) declares "
                                         f"{refs[chunk].size:,} bytes; its tensors fit in {bound:,}")


def codebook_bound(g: Geometry) -> int:
    """The most bytes a codebook for this geometry holds: per layer and kind, two float16 [F, F] matrices
    (analysis and basis) and three [F] rows; its entropy tables and description fit in the slack."""
    width = g.kv_heads * g.head_dim
    return g.layers * 2 * (2 * 2 * width * width + 16 * width + 256) + BLOB_SLACK_BYTES


def _check_counts(obj: dict, source: str) -> None:
    """Refuse counts past the limits while they are still numbers in parsed JSON, before any list or
    object is built from them."""
    try:
        count, geometry = obj["tokens"]["count"], obj["geometry"]
        values = {"tokens": count, "layers": geometry["layers"], "kv_heads": geometry["kv_heads"],
                  "head_dim": geometry["head_dim"]}
    except (KeyError, TypeError) as exc:
        raise IntegrityError(f"{source}: malformed manifest (no {exc})") from exc
    limits = {"tokens": MAX_TOKENS, "layers": MAX_LAYERS, "kv_heads": MAX_KV_HEADS, "head_dim": MAX_HEAD_DIM}
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limits[name]:
            raise IntegrityError(f"{source}: manifest declares {name} {str(value)[:40]} (must be 1 to {limits[name]:,})")


# ---------------------------------------------------------------- blob encoding


def encode_tokens(token_ids: list[int]) -> bytes:
    return st_save({"token_ids": np.asarray(token_ids, dtype=np.int64)})


def decode_tokens(data: bytes, source: str = "token ids blob") -> list[int]:
    try:
        ids = st_load(data)["token_ids"]
    except Exception as exc:  # the digest matched: a writer's bug or a forged blob, not ours to crash on
        raise IntegrityError(f"{source} does not decode as token ids ({exc})") from exc
    if ids.ndim != 1 or ids.dtype != np.int64:
        raise IntegrityError(f"{source} holds {ids.dtype} of shape {ids.shape}, not a list of int64 token ids")
    return ids.tolist()


def check_blob(ref: BlobRef, data: bytes, manifest: Manifest) -> str | None:
    """None if `data` is the blob `ref` names; otherwise what is wrong, naming the blob."""
    actual = sha256_digest(data)
    if actual != ref.digest:
        return f"{manifest.describe(ref)} is corrupt: its bytes hash to {actual}"
    return None


# ---------------------------------------------------------------- building and writing


@dataclass
class Artifact:
    """A manifest with its blobs in memory, ready to be written as a directory or a tar stream."""

    manifest: Manifest
    blobs: dict[str, bytes]  # digest -> bytes
    timings: Timings = Timings()  # side record: not part of the id
    signatures: tuple[Signature, ...] = ()  # over the id, so they stay valid whatever the side records say

    @property
    def id(self) -> str:
        return self.manifest.id

    def side_records(self) -> list[tuple[str, bytes]]:
        """(file name, bytes) of the side records this artifact has, in stream order."""
        records = []
        if self.signatures:
            records.append((SIGNATURES_NAME, canonical_json([sig.to_json() for sig in self.signatures])))
        if self.timings.to_json():
            records.append((TIMINGS_NAME, canonical_json(self.timings.to_json())))
        return records


def seal_artifact(artifact: Artifact, recipients: list[bytes]) -> Artifact:
    """The same context with every blob encrypted for `recipients` (32-byte X25519 public keys) and
    its prefix hashes keyed (confidential.py): a new id, and no signatures (sign after sealing)."""
    m = artifact.manifest
    if m.encryption is not None:
        raise UsageError("the artifact is already encrypted")
    key = new_content_key()
    sealing, header = blob_key(key), m.header_digest()
    blobs: dict[str, bytes] = {}

    def sealed(ref: BlobRef | None, place: str) -> BlobRef | None:
        if ref is None:
            return None
        data = seal_blob(sealing, artifact.blobs[ref.digest], blob_aad(header, place, ref.media_type))
        out = BlobRef(sha256_digest(data), len(data), ref.media_type)
        blobs[out.digest] = data
        return out

    token_ids = decode_tokens(artifact.blobs[m.tokens.digest])
    if m.codebook:  # model-wide, made from public text, shared by every artifact of the model: not sealed
        blobs[m.codebook.digest] = artifact.blobs[m.codebook.digest]
    manifest = replace(
        m, tokens=sealed(m.tokens, "tokens"), encryption=wrap(key, recipients),
        blocks=tuple(tuple(sealed(ref, f"block {layer} {chunk}") for chunk, ref in enumerate(refs))
                     for layer, refs in enumerate(m.blocks)),
        bases=tuple(sealed(ref, f"basis {layer}") for layer, ref in enumerate(m.bases)),
        prefix_hashes=tuple(prefix_hashes(token_ids, m.space.fingerprint, m.chunk_size, prefix_key(key))))
    return Artifact(manifest, blobs, artifact.timings)


def read_side_record(name: str, data: bytes, source: str) -> tuple[Signature, ...] | Timings:
    """A side record's contents: the signatures or the timings."""
    if len(data) > MAX_SIDE_RECORD_BYTES:
        raise IntegrityError(f"{source}: {name} of {len(data):,} bytes (the limit is {MAX_SIDE_RECORD_BYTES:,})")
    if name == SIGNATURES_NAME:
        return parse_signatures(data, f"{source}: {name}")
    try:
        return Timings.from_json(json.loads(data))
    except (ValueError, TypeError, AttributeError) as exc:
        raise IntegrityError(f"{source}: {name} is malformed ({str(exc)[:120]})") from exc


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
        encryption = self.manifest.encryption
        if encryption is None:
            yield from self.blobs(chunks)
            return
        opened = self._opener(content_key(encryption, self.identity, self.source))
        places = iter(self.manifest.blob_places(chunks))  # the same stream order as `blobs`
        for ref, data in self.blobs(chunks):
            place = next(places)[1]
            yield ref, data if place == "codebook" else opened(place, ref, data)

    def _opener(self, key: bytes):
        """(place, ref, ciphertext) -> plaintext under the artifact's content `key`; IntegrityError names the blob."""
        sealing, header = blob_key(key), self.manifest.header_digest()

        def opened(place: str, ref: BlobRef, data: bytes) -> bytes:
            try:
                return open_blob(sealing, data, blob_aad(header, place, ref.media_type))
            except IntegrityError as exc:
                raise IntegrityError(f"{self.source}: {self.manifest.describe(ref)} {exc}") from exc

        return opened

    def problems(self) -> list[str]:
        """Everything wrong with the artifact, without stopping at the first problem. An encrypted
        artifact's blobs are opened (and its token ids checked) only with an `identity` that opens it."""
        m = self.manifest
        found = []
        token_ids, key, opened = None, None, None
        if m.encryption and self.identity:
            try:
                key = content_key(m.encryption, self.identity, self.source)
                opened = self._opener(key)
            except IntegrityError as exc:  # a forged or corrupt wrapped key; the digests are still checked
                found.append(str(exc).removeprefix(f"{self.source}: "))
        places = iter(m.blob_places())
        try:
            for ref, data in self.raw_blobs():
                place = next(places)[1]
                if data is None:
                    found.append(f"{m.describe(ref)} is missing")
                    continue
                problem = check_blob(ref, data, m)
                if problem:
                    found.append(problem)
                    continue
                if opened is not None and place != "codebook":
                    try:
                        data = opened(place, ref, data)
                    except IntegrityError as exc:
                        found.append(str(exc).removeprefix(f"{self.source}: "))
                        continue
                if ref.media_type == MEDIA_TOKENS and (m.encryption is None or key):
                    token_ids = decode_tokens(data)
        except IntegrityError as exc:  # a truncated stream: nothing more can be read
            found.append(str(exc).removeprefix(f"{self.source}: "))
        if token_ids is not None:
            keyed = prefix_key(key) if key else None
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
