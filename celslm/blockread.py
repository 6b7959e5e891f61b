"""An artifact's verified blocks back into per-layer arrays, with numpy only.

The read side of `blocks.py`: an edge running llama.cpp decodes artifacts without importing torch
(4 s and 220 MB on this machine), so unpacking, dequantization, PCA reconstruction and the codebook's inverse
transform are numpy here.
Blocks are safetensors, parsed with every offset checked (`tensors.py`).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from celslm.artifact import ArtifactReader, decode_tokens
from celslm.codebook import Codebook, Transform, pco_decode
from celslm.codecs import KINDS, Codec, parse_codec
from celslm.errors import IntegrityError
from celslm.tensors import read_safetensors

# (key pre-RoPE [H, T, D], value [H, T, D]), float32
LayerArrays = tuple[np.ndarray, np.ndarray]


# ---------------------------------------------------------------- bit unpacking


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """`count` integers in [0, 2**bits) from bytes packed by `blocks.pack_bits` (`count` a multiple of 8)."""
    if bits == 8:
        return packed[:count]
    if bits == 1:
        return np.unpackbits(packed, bitorder="little", count=count)
    if bits == 3:
        return unpack(packed[: count // 4], 2, count) | (unpack(packed[count // 4 :], 1, count) << 2)
    mask = (1 << bits) - 1
    return np.stack([(packed >> (bits * i)) & mask for i in range(8 // bits)], axis=1).reshape(-1)[:count]


def dequantize(parts: dict[str, np.ndarray], bits: int, group: int, shape: tuple[int, int, int],
               along_tokens: bool) -> np.ndarray:
    """Inverse of `blocks.quantize` for a tensor of `shape` `[H, t, W]`, in float32."""
    heads, tokens, width = shape
    group = min(group, tokens if along_tokens else width)
    reduce = 2 if along_tokens else 3
    scale = np.expand_dims(parts["scale"].astype(np.float32), reduce)
    zero = np.expand_dims(parts["zero"].astype(np.float32), reduce)
    grouped_shape = list(scale.shape)
    grouped_shape[reduce] = group
    count = int(np.prod(grouped_shape))
    q = unpack(parts["q"], bits, count + (-count) % 8)[:count].reshape(grouped_shape).astype(np.float32)
    x = q * scale + zero
    x = x.reshape(heads, -1, width) if along_tokens else x.reshape(heads, tokens, -1)
    return np.ascontiguousarray(x[:, :tokens] if along_tokens else x[..., :width])


def load_bases(data: bytes | None) -> dict[str, dict[str, np.ndarray]]:
    """A layer's auxiliary blob (PCA bases per kind: mean `[H, D]`, basis `[H, D, r]`)."""
    if data is None:
        return {}
    tensors = read_safetensors(data)
    return {kind: {n: tensors[f"{kind}.{n}"].astype(np.float32) for n in ("mean", "basis")}
            for kind in KINDS if f"{kind}.basis" in tensors}


def reconstruct(coeffs: np.ndarray, basis: dict[str, np.ndarray]) -> np.ndarray:
    return coeffs @ basis["basis"].transpose(0, 2, 1) + basis["mean"][:, None, :]


def decode_block(codec: Codec, data: bytes, media_type: str, bases: dict,
                 shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(key, value), each `[H, t, D]` float32; `shape` is what the manifest says the block holds."""
    if media_type != codec.media_type:
        raise IntegrityError(f"media type {media_type} does not match codec {codec.spec}")
    tensors = read_safetensors(codec.unwrap(data))
    if codec.ent in ("ans", "pco"):
        tensors = {**tensors, **_entropy_decode(codec, tensors, bases, shape)}
    return tuple(_decode_tensor(codec, kind, tensors, bases.get(kind), shape) for kind in KINDS)


def _entropy_decode(codec: Codec, tensors: dict, bases: dict, shape) -> dict[str, np.ndarray]:
    """The kinds' codes `[n, t]` from the block's one ANS stream (tc with ent=ans), or its pcodec chunks (ent=pco)."""
    _, tokens, _ = shape
    body = tokens - sum(tensors[f"key.{p}"].shape[1] for p in ("head", "tail") if f"key.{p}" in tensors)
    kept = [bases[kind].kept(codec.q) for kind in KINDS]
    if body <= 0 or not sum(kept):
        return {}
    spreads = np.concatenate([bases[kind].spreads(codec.q) for kind in KINDS])
    if codec.ent == "pco":
        chunks = [tensors.get(f"pco.{i}") for i in range(sum(name.startswith("pco.") for name in tensors))]
        if not chunks or any(c is None or c.dtype != np.uint8 or c.ndim != 1 for c in chunks):
            raise IntegrityError("the block has no pcodec chunks")
        try:
            codes = pco_decode(chunks, spreads, body)
        except Exception as exc:  # the digest matched: a writer's bug or a forged block
            raise IntegrityError(f"pcodec chunks do not decode: {str(exc)[:160]}") from exc
        return {"key.codes": codes[: kept[0]], "value.codes": codes[kept[0] :]}
    words, escapes = tensors.get("ans"), tensors.get("escapes")
    if words is None or escapes is None or words.dtype != np.int32 or escapes.dtype != np.int32:
        raise IntegrityError("the block has no ANS stream")
    entropy = bases["entropy"]
    try:
        codes = entropy.decode(words.view(np.uint32), escapes, entropy.classes(spreads), body)
    except Exception as exc:  # the digest matched: a writer's bug or a forged block
        raise IntegrityError(f"ANS stream does not decode: {str(exc)[:160]}") from exc
    return {"key.codes": codes[: kept[0]], "value.codes": codes[kept[0] :]}


def _decode_tensor(codec: Codec, kind, tensors, basis, shape):
    if codec.transform:
        return _decode_transformed(codec, kind, tensors, basis, shape)
    if kind in tensors:
        x = tensors[kind].astype(np.float32)
        return reconstruct(x, basis) if basis else x
    heads, tokens, width = shape
    head, tail = tensors.get(f"{kind}.head"), tensors.get(f"{kind}.tail")
    pieces = [head.astype(np.float32)] if head is not None else []
    if f"{kind}.q" in tensors:
        kept = sum(t.shape[1] for t in (head, tail) if t is not None)
        body_shape = (heads, tokens - kept, basis["basis"].shape[-1] if basis else width)
        parts = {n: tensors[f"{kind}.{n}"] for n in ("q", "scale", "zero")}
        body = dequantize(parts, codec.bits(kind), codec.group(kind), body_shape, along_tokens=(kind == "key"))
        pieces.append(reconstruct(body, basis) if basis else body)
    if tail is not None:
        pieces.append(tail.astype(np.float32))
    return np.concatenate(pieces, axis=1)


def _decode_transformed(codec: Codec, kind: str, tensors: dict, transform: Transform, shape) -> np.ndarray:
    heads, tokens, width = shape
    head, tail, codes = (tensors.get(f"{kind}.{part}") for part in ("head", "tail", "codes"))
    pieces = [head.astype(np.float32)] if head is not None else []
    body = tokens - sum(t.shape[1] for t in (head, tail) if t is not None)
    if body > 0:
        kept = transform.kept(codec.q)
        if codes is None and kept == 0:  # every component under the step: the body is the mean
            codes = np.zeros((0, body), dtype=np.int8)
        if codes is None or codes.ndim != 2 or codes.shape != (kept, body) or codes.dtype.kind != "i":
            found = "no codes" if codes is None else f"codes {codes.dtype} {list(codes.shape)}"
            raise IntegrityError(f"{kind}: {found}; the codebook codes {kept} components x {body} tokens")
        pieces.append(transform.decode(codes, codec.q, heads, width))
    if tail is not None:
        pieces.append(tail.astype(np.float32))
    return np.concatenate(pieces, axis=1)


def load_codebook(reader: ArtifactReader, blobs) -> Codebook | None:
    """The artifact's codebook (the next blob, when the manifest names one), checked against its model space."""
    m = reader.manifest
    if m.codebook is None:
        return None
    _, data = next(blobs)
    codebook = Codebook.from_bytes(data, f"{reader.source}: codebook {m.codebook.digest}")
    codebook.check_for(m.space.fingerprint, (m.layers, m.geometry.kv_heads, m.geometry.head_dim), reader.source)
    return codebook


# ---------------------------------------------------------------- artifact -> layers


def open_context(reader: ArtifactReader, chunks: int | None = None
                 ) -> tuple[list[int], Iterator[tuple[int, np.ndarray, np.ndarray]]]:
    """The context's token ids, and an iterator over its layers as they are read and verified:
    (index, key pre-RoPE `[H, T, D]`, value `[H, T, D]`), float32. With `chunks`, only that prefix
    of the context (all its token ids are still returned)."""
    m = reader.manifest
    blobs = reader.plain_blobs(chunks)
    _, data = next(blobs)
    token_ids = decode_tokens(data, f"{reader.source}: token ids blob")
    if len(token_ids) != m.token_count:
        raise IntegrityError(f"{reader.source}: token ids blob holds {len(token_ids)} tokens, manifest says {m.token_count}")
    codebook = load_codebook(reader, blobs)
    return token_ids, _layers(reader, blobs, m.chunks if chunks is None else min(chunks, m.chunks), codebook)


def _layers(reader: ArtifactReader, blobs, chunks: int, codebook: Codebook | None):
    m = reader.manifest
    codec = parse_codec(m.codec)
    lengths = m.chunk_lengths()
    heads, width = m.geometry.kv_heads, m.geometry.head_dim
    for layer in range(m.layers):
        try:
            layer_bases = codebook.layer(layer) if codebook else \
                load_bases(next(blobs)[1] if m.layer_aux(layer) else None)
        except Exception as exc:  # digest matched, content does not fit the manifest
            raise IntegrityError(f"{reader.source}: layer {layer}'s basis blob does not decode: {exc}") from exc
        total = sum(lengths[:chunks])
        key, value = (np.empty((heads, total, width), dtype=np.float32) for _ in KINDS)  # blocks land in place
        start = 0
        for chunk in range(chunks):
            ref, data = next(blobs)
            shape = (heads, lengths[chunk], width)
            try:
                block = decode_block(codec, data, ref.media_type, layer_bases, shape)
            except IntegrityError as exc:
                raise IntegrityError(f"{reader.source}: {m.describe(ref)}: {exc}") from exc
            except Exception as exc:  # digest matched, content does not fit the manifest
                raise IntegrityError(f"{reader.source}: {m.describe(ref)} does not decode as {m.codec}: {exc}") from exc
            for x, out in zip(block, (key, value)):
                if tuple(x.shape) != shape:
                    raise IntegrityError(f"{reader.source}: {m.describe(ref)} has shape {tuple(x.shape)}, expected {shape}")
                out[:, start : start + shape[1]] = x
            start += shape[1]
        yield layer, key, value
