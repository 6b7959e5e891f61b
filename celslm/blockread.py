"""An artifact's verified blocks back into per-layer arrays, with numpy only.

The read side of `blocks.py`: an edge running llama.cpp decodes artifacts without importing torch
(4 s and 220 MB on this machine), so unpacking, dequantization, PCA reconstruction and the codebook's inverse
transform are numpy here.
Blocks are safetensors, parsed with every offset checked (`tensors.py`).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from celslm.artifact import ArtifactReader
from celslm.codebook import Codebook, pco_decode
from celslm.codecs import KINDS, Codec, parse_codec
from celslm.errors import IntegrityError
from celslm.tensors import read_safetensors
from celslm.tokenblob import decode_tokens

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
    if codec.transform:  # one block as a layer of one chunk
        heads, tokens, width = shape
        layer = CodedLayer(codec, bases, heads, tokens, width)
        layer.add(data, media_type, 0, tokens)
        return layer.finish()
    tensors = _block_tensors(codec, data, media_type)
    return tuple(_decode_tensor(codec, kind, tensors, bases.get(kind), shape) for kind in KINDS)


def _block_tensors(codec: Codec, data: bytes, media_type: str) -> dict[str, np.ndarray]:
    if media_type != codec.media_type:
        raise IntegrityError(f"media type {media_type} does not match codec {codec.spec}")
    return read_safetensors(codec.unwrap(data))


def _entropy_decode(codec: Codec, tensors: dict, bases: dict, body: int) -> dict[str, np.ndarray]:
    """The kinds' codes `[n, body]` from the block's one ANS stream (tc with ent=ans), or its pcodec chunks (ent=pco)."""
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


class CodedLayer:
    """One layer of a tc artifact, gathered block by block, then brought back to channels at once.

    Each block's codes land as columns of one coefficient matrix per kind, `[n + 1, T]` float32 (the
    last row all ones: it carries the mean), and its fp16 sinks and window are kept aside. `finish`
    runs one inverse transform per kind and head over the whole layer, straight into the output
    (blocks of 256 tokens would cost a matmul, a transposing copy and a concatenation each)."""

    def __init__(self, codec: Codec, bases: dict, heads: int, tokens: int, width: int):
        self.codec, self.bases, self.shape = codec, bases, (heads, tokens, width)
        self.kept = [bases[kind].kept(codec.q) for kind in KINDS]
        self.coeffs = [np.empty((n + 1, tokens), dtype=np.float32) for n in self.kept]
        for coeffs in self.coeffs:
            coeffs[-1] = 1.0
        self.exact: list[tuple[int, int, np.ndarray]] = []  # (kind, first token, fp16 [H, t, D])

    def add(self, data: bytes, media_type: str, start: int, tokens: int) -> None:
        """The block holding tokens start..start+tokens of the layer."""
        heads, _, width = self.shape
        tensors = _block_tensors(self.codec, data, media_type)
        spans = []
        for kind in KINDS:
            span = [tensors.get(f"{kind}.{part}") for part in ("head", "tail")]
            for part, x in zip(("head", "tail"), span):
                if x is not None and (x.ndim != 3 or x.shape[0] != heads or x.shape[2] != width or x.dtype != np.float16):
                    raise IntegrityError(f"{kind}.{part} is {x.dtype} {list(x.shape)}, expected float16 [{heads}, t, {width}]")
            spans.append([0 if x is None else x.shape[1] for x in span])
        if spans[0] != spans[1] or sum(spans[0]) > tokens:
            raise IntegrityError(f"fp16 sinks and window of {spans} tokens in a block of {tokens}")
        (low, tail), body = spans[0], tokens - sum(spans[0])
        if self.codec.ent in ("ans", "pco") and body > 0:
            tensors = {**tensors, **_entropy_decode(self.codec, tensors, self.bases, body)}
        for index, (kind, kept) in enumerate(zip(KINDS, self.kept)):
            for first, count, part in ((start, low, "head"), (start + tokens - tail, tail, "tail")):
                if count:
                    self.exact.append((index, first, tensors[f"{kind}.{part}"]))
                    self.coeffs[index][:kept, first : first + count] = 0.0
            if body <= 0:
                continue
            codes = tensors.get(f"{kind}.codes")
            if codes is None and kept == 0:  # every component under the step: the body is the mean
                continue
            if codes is None or codes.ndim != 2 or codes.shape != (kept, body) or codes.dtype.kind != "i":
                found = "no codes" if codes is None else f"codes {codes.dtype} {list(codes.shape)}"
                raise IntegrityError(f"{kind}: {found}; the codebook codes {kept} components x {body} tokens")
            self.coeffs[index][:kept, start + low : start + low + body] = codes

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """(key pre-RoPE, value), `[H, T, D]` float32, in the memory layouts llama.cpp's state takes: the
        key a view of token-major rows `[T, H*D]`, the value a view of channel-major `[H*D, T]` (its
        transposed V). One matmul per kind writes the whole layer; no transposing copy follows."""
        heads, tokens, width = self.shape
        key, value = (np.empty(shape, dtype=np.float32) for shape in ((tokens, heads * width), (heads * width, tokens)))
        self.bases["key"].decode_rows(self.coeffs[0], self.codec.q, key)
        self.bases["value"].decode_columns(self.coeffs[1], self.codec.q, value)
        out = (key.reshape(tokens, heads, width).transpose(1, 0, 2), value.reshape(heads, width, tokens).transpose(0, 2, 1))
        for index, first, exact in self.exact:
            out[index][:, first : first + exact.shape[1]] = exact
        return out


_CODEBOOKS: dict[str, Codebook] = {}  # parsed codebooks by digest: every context of a model shares one
_keep = [0]  # how many to keep: none in a process that decodes one artifact (`keep_codebooks`)


def keep_codebooks(count: int) -> None:
    """Keep the last `count` parsed codebooks (a warm service switching contexts parses each once)."""
    _keep[0] = count
    _trim(count)


def _trim(count: int) -> None:
    while len(_CODEBOOKS) > count:  # oldest first
        _CODEBOOKS.pop(next(iter(_CODEBOOKS)), None)


def load_codebook(reader: ArtifactReader, blobs) -> Codebook | None:
    """The artifact's codebook (the next blob, when the manifest names one), checked against its model space.
    The blob is read and verified each time; with `keep_codebooks`, its parsing (and the inverse maps
    made from it) is kept by digest, which a warm service switching between contexts of one model would
    otherwise redo each time."""
    m = reader.manifest
    if m.codebook is None:
        return None
    ref, data = next(blobs)
    codebook = _CODEBOOKS.get(ref.digest)
    if codebook is None:
        codebook = Codebook.from_bytes(data, f"{reader.source}: codebook {m.codebook.digest}")
        if _keep[0]:
            _CODEBOOKS[ref.digest] = codebook
            _trim(_keep[0])
    codebook.check_for(m.space.fingerprint, (m.layers, m.geometry.kv_heads, m.geometry.head_dim), reader.source)
    return codebook


# ---------------------------------------------------------------- artifact -> layers


def open_context(reader: ArtifactReader, chunks: int | None = None
                 ) -> tuple[list[int], Iterator[tuple[int, np.ndarray, np.ndarray]]]:
    """The context's token ids, and an iterator over its layers as they are read and verified:
    (index, key pre-RoPE `[H, T, D]`, value `[H, T, D]`), float32. With `chunks`, only that prefix
    of the context (all its token ids are still returned)."""
    token_ids, layers = open_layers(reader, chunks)
    return token_ids, ((layer.index, *layer.decode()) for layer in layers)


class LayerBlocks:
    """One layer's verified blocks, read and not yet decoded: `decode` is pure CPU work (entropy decoding,
    the inverse transform), so layers can decode on several threads at once."""

    def __init__(self, reader: ArtifactReader, index: int, bases: dict, blocks: list, lengths: list[int]):
        self.source, self.manifest = reader.source, reader.manifest
        self.index, self.bases, self.blocks, self.lengths = index, bases, blocks, lengths

    def decode(self) -> LayerArrays:
        """(key pre-RoPE, value), each `[H, T, D]` float32."""
        m = self.manifest
        codec = parse_codec(m.codec)
        heads, width, total = m.geometry.kv_heads, m.geometry.head_dim, sum(self.lengths)
        coded = CodedLayer(codec, self.bases, heads, total, width) if codec.transform else None
        key, value = (None, None) if coded else (np.empty((heads, total, width), dtype=np.float32) for _ in KINDS)
        start = 0
        for (ref, data), length in zip(self.blocks, self.lengths):
            shape = (heads, length, width)
            try:
                if coded:
                    coded.add(data, ref.media_type, start, length)
                else:
                    _place(decode_block(codec, data, ref.media_type, self.bases, shape), (key, value), start, shape)
            except IntegrityError as exc:
                raise IntegrityError(f"{self.source}: {m.describe(ref)}: {exc}") from exc
            except Exception as exc:  # digest matched, content does not fit the manifest
                raise IntegrityError(f"{self.source}: {m.describe(ref)} does not decode as {m.codec}: {exc}") from exc
            start += length
        return coded.finish() if coded else (key, value)


def open_layers(reader: ArtifactReader, chunks: int | None = None) -> tuple[list[int], Iterator[LayerBlocks]]:
    """`open_context`, with each layer's blocks read and verified in order but left to decode."""
    m = reader.manifest
    blobs = reader.plain_blobs(chunks)
    _, data = next(blobs)
    token_ids = decode_tokens(data, f"{reader.source}: token ids blob")
    if len(token_ids) != m.token_count:
        raise IntegrityError(f"{reader.source}: token ids blob holds {len(token_ids)} tokens, manifest says {m.token_count}")
    codebook = load_codebook(reader, blobs)
    return token_ids, _layer_blocks(reader, blobs, m.chunks if chunks is None else min(chunks, m.chunks), codebook)


def _layer_blocks(reader: ArtifactReader, blobs, chunks: int, codebook: Codebook | None) -> Iterator[LayerBlocks]:
    m = reader.manifest
    lengths = m.chunk_lengths()[:chunks]
    for layer in range(m.layers):
        try:
            layer_bases = codebook.layer(layer) if codebook else \
                load_bases(next(blobs)[1] if m.layer_aux(layer) else None)
        except Exception as exc:  # digest matched, content does not fit the manifest
            raise IntegrityError(f"{reader.source}: layer {layer}'s basis blob does not decode: {exc}") from exc
        yield LayerBlocks(reader, layer, layer_bases, [next(blobs) for _ in lengths], lengths)


def _place(block: LayerArrays, layer: LayerArrays, start: int, shape: tuple[int, int, int]) -> None:
    for x, out in zip(block, layer):
        if tuple(x.shape) != shape:
            raise IntegrityError(f"has shape {tuple(x.shape)}, expected {shape}")
        out[:, start : start + shape[1]] = x
