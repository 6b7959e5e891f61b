"""The KV artifact format (schema celslm.kv/2) as typed values: the manifest, its parts, and their checks.

An artifact is a manifest plus content-addressed blobs, like an OCI image. The manifest is canonical
JSON and the artifact id is its sha256; it names every blob by digest, each in its role (`BlobRole`):
the token ids, the model's codebook (for a `tc` codec), per layer a basis (if the codec has one) and
per chunk a block. Signatures and timings are side records: outside the id, and unsigned.

The id-bearing bytes hold only what the context, the model, the chunking and the codec decide, so
the same work gives the same id on every run and machine (encryption, which is random, aside).

A manifest may come from an untrusted peer: `Manifest.from_bytes` checks every count and size it
declares against its geometry and sane limits before anything is allocated from it, and accepts
only the canonical bytes of what it parsed. Checking a manifest reads no blob and decrypts nothing:
reading and writing artifacts is `artifact.py`, sealing and opening them `sealing.py`.

This module imports no torch: verify, inspect, push, pull and serve-cache only move bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import struct
from dataclasses import dataclass

from celslm.codebook import MEDIA_CODEBOOK
from celslm.codecs import parse_codec
from celslm.confidential import Encryption
from celslm.errors import IntegrityError, UsageError
from celslm.trust import Signature, canonical_json, parse_signatures

SCHEMA = "celslm.kv/2"
OLD_SCHEMAS = ("celslm.kv/1",)  # its timings were inside the id; such artifacts are made again with prefill
MEDIA_MANIFEST = "application/vnd.celslm.kv.manifest.v1+json"
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
class BlobRole:
    """A blob's place in an artifact: the token ids, the model's codebook, a layer's basis, or the block
    of a layer and chunk. Its text ("tokens", "codebook", "basis L", "block L C") is part of what an
    encrypted blob is sealed under (sealing.py): changed, no artifact sealed before would open."""

    kind: str  # "tokens", "codebook", "basis" or "block"
    layer: int | None = None  # a basis's or a block's
    chunk: int | None = None  # a block's

    @classmethod
    def basis(cls, layer: int) -> BlobRole:
        return cls("basis", layer)

    @classmethod
    def block(cls, layer: int, chunk: int) -> BlobRole:
        return cls("block", layer, chunk)

    def __str__(self) -> str:
        return " ".join([self.kind, *(str(n) for n in (self.layer, self.chunk) if n is not None)])

    def describe(self, digest: str) -> str:
        """Name the blob in this role for an error message: which layer and chunk it holds."""
        if self.kind == "block":
            return f"block {digest} (layer {self.layer}, chunk {self.chunk})"
        if self.kind == "basis":
            return f"basis blob {digest} (layer {self.layer})"
        return f"{'token ids' if self.kind == 'tokens' else self.kind} blob {digest}"


TOKENS, CODEBOOK = BlobRole("tokens"), BlobRole("codebook")


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
    own_last: int | None = None  # cross-model only: the context's last tokens the alignment advises the edge to prefill

    @classmethod
    def native(cls, space: ModelSpace) -> Producer:
        return cls(space.name, space.fingerprint)

    def to_json(self) -> dict:
        obj = {"model": self.model, "fingerprint": self.fingerprint, "alignment": self.alignment}
        if self.native_layers is not None:
            obj["native_layers"] = list(self.native_layers)
        if self.sink_tokens is not None:
            obj["sink_tokens"] = self.sink_tokens
        if self.own_last is not None:
            obj["own_last"] = self.own_last
        return obj

    @classmethod
    def from_json(cls, obj: dict) -> Producer:
        alignment = obj.get("alignment")
        native = obj.get("native_layers")
        sink = obj.get("sink_tokens")
        own_last = obj.get("own_last")
        if own_last is not None and not 0 <= int(own_last) <= MAX_TOKENS:
            raise ValueError(f"own_last {own_last} is out of range")
        return cls(str(obj["model"]), _fingerprint(obj["fingerprint"]), None if alignment is None else str(alignment),
                   None if native is None else tuple(int(i) for i in native), None if sink is None else int(sink),
                   None if own_last is None else int(own_last))


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

    def blob_roles(self, chunks: int | None = None) -> list[tuple[BlobRef, BlobRole]]:
        """Every blob in stream order with its role: the token ids, the model's codebook (if the codec uses
        one), then per layer its basis (if any) and its blocks; with `chunks`, only the blocks of the
        first `chunks` chunks (a cached prefix)."""
        roles = [(self.tokens, TOKENS)] + ([(self.codebook, CODEBOOK)] if self.codebook else [])
        for layer, blocks in enumerate(self.blocks):
            aux = self.layer_aux(layer)
            roles += ([(aux, BlobRole.basis(layer))] if aux else []) + \
                [(ref, BlobRole.block(layer, chunk)) for chunk, ref in enumerate(blocks[:chunks])]
        return roles

    def blob_refs(self, chunks: int | None = None) -> list[BlobRef]:
        """Every blob in stream order (see `blob_roles`)."""
        return [ref for ref, _ in self.blob_roles(chunks)]

    def header_digest(self) -> bytes:
        """sha256 of every field but the blob references, prefix hashes and recipients: what an
        encrypted artifact's blobs are sealed under (sealing.py), so that a manifest that
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
        """Name a blob for an error message: its role, which layer and chunk it holds."""
        role = next((role for listed, role in self.blob_roles() if listed.digest == ref.digest), None)
        return role.describe(ref.digest) if role else f"blob {ref.digest}"

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


# ---------------------------------------------------------------- side records


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


# ---------------------------------------------------------------- in memory


@dataclass
class Artifact:
    """A manifest with its blobs and side records in memory: what prefill and compress make, sealing.py
    seals, and artifact.py writes as a directory or a tar stream."""

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
