"""A context's KV tensors -> an artifact's blocks, through a codec: the writing side of the format.

`artifact.py` owns the format (manifest, blobs, streams, digests) and imports no torch; `codecs.py`
parses codec specs; `blockread.py` reads blocks back with numpy only. This module runs the tensor
stages (`fp16`, `pca`, `intN`, `tc`) on blocks of `[H, t, D]` keys (pre-RoPE) and values, and cuts
per-layer KV into blocks to build an artifact.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.numpy import save as st_save_numpy
from safetensors.torch import save as st_save

from celslm.artifact import ArtifactReader
from celslm.blockread import open_context
from celslm.codebook import MEDIA_CODEBOOK, Codebook, pco_encode
from celslm.codecs import KINDS, MEDIA_BASIS, BlockShape, Codec, parse_codec
from celslm.errors import UsageError
from celslm.manifest import (Artifact, BlobRef, Geometry, Manifest, ModelSpace, Producer, Timings, prefix_hashes,
                             sha256_digest)
from celslm.tokenblob import MEDIA_TOKENS, encode_tokens

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LayerKV = tuple[torch.Tensor, torch.Tensor]  # (key pre-RoPE [H, T, D], value [H, T, D]); numpy arrays do too


# ---------------------------------------------------------------- bit packing


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers in [0, 2**bits) into bytes: 8 values per `bits` bytes.

    2 and 4 bits share bytes lane by lane, 1 bit uses numpy's packbits, and 3 bits are a 2-bit plane
    followed by a 1-bit plane. numpy, not torch: blocks are small and torch's per-op cost dominates."""
    flat = values.reshape(-1).to(torch.uint8).numpy()
    pad = (-flat.size) % 8
    if pad:
        flat = np.concatenate([flat, np.zeros(pad, dtype=np.uint8)])
    return torch.from_numpy(_pack(flat, bits))


def _pack(flat: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return flat
    if bits == 1:
        return np.packbits(flat, bitorder="little")
    if bits == 3:
        return np.concatenate([_pack(flat & 3, 2), _pack(flat >> 2, 1)])
    lanes = flat.reshape(-1, 8 // bits)
    out = lanes[:, 0].copy()
    for i in range(1, 8 // bits):
        out |= lanes[:, i] << (bits * i)
    return out


# ---------------------------------------------------------------- quantization


def _grouped(x: torch.Tensor, group: int, along_tokens: bool) -> torch.Tensor:
    """`[H, t, W]` -> groups without a transposing copy: `[H, n, g, W]` along tokens, `[H, t, n, g]` along channels.

    A short last group is padded by repeating the last token (or channel), which changes no range."""
    axis = 1 if along_tokens else 2
    pad = (-x.shape[axis]) % group
    if pad:
        edge = x.narrow(axis, x.shape[axis] - 1, 1)
        x = torch.cat([x, edge.expand(*(pad if i == axis else n for i, n in enumerate(x.shape)))], dim=axis)
    heads, tokens, width = x.shape
    return x.view(heads, -1, group, width) if along_tokens else x.view(heads, tokens, -1, group)


def quantize(x: torch.Tensor, bits: int, group: int, along_tokens: bool) -> dict[str, torch.Tensor]:
    """Asymmetric quantization of `x` `[H, t, W]`, in groups along tokens (keys) or channels (values).

    scale and zero are fp16, `[H, n, W]` along tokens or `[H, t, n]` along channels."""
    group = min(group, x.shape[1] if along_tokens else x.shape[2])
    grouped = _grouped(x.float(), group, along_tokens)
    reduce = 2 if along_tokens else 3
    low, high = torch.aminmax(grouped, dim=reduce, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((high - low) / levels).clamp_min_(1e-8).half()
    zero = low.half()
    q = (grouped - zero.float()).mul_(1.0 / scale.float()).round_().clamp_(0, levels)
    return {"q": pack_bits(q, bits), "scale": scale.squeeze(reduce), "zero": zero.squeeze(reduce)}


# ---------------------------------------------------------------- PCA


def fit_basis(x: torch.Tensor, rank: int | None, energy: float | None) -> dict[str, torch.Tensor]:
    """Per-head PCA of `x` `[H, T, D]`: mean `[H, D]` and basis `[H, D, r]` (one r for all heads)."""
    x = x.float()
    mean = x.mean(dim=1)
    centered = x - mean.unsqueeze(1)
    cov = centered.transpose(1, 2) @ centered  # [H, D, D]
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    eigvals, eigvecs = eigvals.flip(-1).clamp_min(0), eigvecs.flip(-1)
    if rank is None:
        share = eigvals.cumsum(-1) / eigvals.sum(-1, keepdim=True).clamp_min(1e-12)  # [H, D]
        rank = int((share < energy).sum(-1).max().item()) + 1
    rank = max(1, min(rank, x.shape[-1]))
    return {"mean": mean.half(), "basis": eigvecs[..., :rank].contiguous().half()}


def project(x: torch.Tensor, basis: dict[str, torch.Tensor]) -> torch.Tensor:
    return (x.float() - basis["mean"].float().unsqueeze(1)) @ basis["basis"].float()  # [H, t, r]


# ---------------------------------------------------------------- a codec's tensor stages, per layer and per block


def fit_layer(codec: Codec, key: torch.Tensor, value: torch.Tensor) -> bytes | None:
    """The layer's auxiliary blob (PCA bases) fitted on all its tokens, or None if the codec needs none."""
    if not codec.pca:
        return None
    rank = int(codec.pca.params["r"]) if "r" in codec.pca.params else None
    energy = float(codec.pca.params["e"]) if "e" in codec.pca.params else None
    tensors = {}
    for kind, x in zip(KINDS, (key, value)):
        if codec.reduces(kind):
            fit_on = x[:, codec.sink:] if x.shape[1] > codec.sink else x  # sinks stay fp16 and would skew the basis
            for name, t in fit_basis(fit_on, rank, energy).items():
                tensors[f"{kind}.{name}"] = t
    return st_save(tensors)


def load_layer(data: bytes | None) -> dict[str, dict[str, torch.Tensor]]:
    if data is None:
        return {}
    tensors = st_load(data)
    return {kind: {n: tensors[f"{kind}.{n}"] for n in ("mean", "basis")} for kind in KINDS if f"{kind}.basis" in tensors}


def encode_block(codec: Codec, key: torch.Tensor, value: torch.Tensor, bases: dict, where: BlockShape,
                 store_dtype: torch.dtype = torch.float32) -> bytes:
    """One block's bytes; `bases` is `load_layer` of the layer's auxiliary blob (parsed once per layer)."""
    tensors: dict[str, torch.Tensor] = {}
    for kind, x in zip(KINDS, (key, value)):
        tensors.update(_encode_tensor(codec, kind, x, bases.get(kind), where, store_dtype))
    if codec.ent in ("ans", "pco") and "key.codes" in tensors:  # both kinds' codes (the same tokens) coded together
        codes = np.concatenate([tensors.pop(f"{kind}.codes").numpy().astype(np.int32) for kind in KINDS])
        spreads = np.concatenate([bases[kind].spreads(codec.q) for kind in KINDS])
        if codec.ent == "pco":
            tensors.update({f"pco.{i}": torch.from_numpy(chunk.copy()) for i, chunk in enumerate(pco_encode(codes, spreads))})
        else:
            entropy = bases["entropy"]
            words, escapes = entropy.encode(codes, entropy.classes(spreads))
            tensors["ans"], tensors["escapes"] = torch.from_numpy(words.view(np.int32)), torch.from_numpy(escapes)
    if any(t.dtype == torch.bfloat16 for t in tensors.values()):  # numpy has no bfloat16
        return codec.wrap(st_save(tensors))
    # the same bytes as safetensors.torch's save, at a fraction of its per-tensor cost
    return codec.wrap(st_save_numpy({name: t.numpy() for name, t in tensors.items()}))


def _encode_tensor(codec: Codec, kind, x, basis, where, store_dtype):
    """One kind's tensors: whole (fp16 or the store dtype), or fp16 sinks and window around a coded body
    (intN's packed codes and scales; tc's integer codes `[n, t]` under the codebook's transform)."""
    if codec.lossy_stage is None:
        cast = torch.float16 if codec.fp16 else store_dtype
        return {kind: (project(x, basis) if basis else x).to(cast).contiguous()}
    low, high = codec.body(where)
    out = {}
    if low:
        out[f"{kind}.head"] = x[:, :low].half().contiguous()
    if high < where.tokens:
        out[f"{kind}.tail"] = x[:, high:].half().contiguous()
    if high > low and codec.transform:
        out[f"{kind}.codes"] = torch.from_numpy(basis.encode(x[:, low:high].float().numpy(), codec.q))
    elif high > low:
        body = project(x[:, low:high], basis) if basis else x[:, low:high]
        parts = quantize(body, codec.bits(kind), codec.group(kind), along_tokens=(kind == "key"))
        out.update({f"{kind}.{n}": t.contiguous() for n, t in parts.items()})
    return out


# ---------------------------------------------------------------- layers -> artifact


def build_artifact(
    *,
    space: ModelSpace,
    producer: Producer,
    token_ids: list[int],
    layers: list[LayerKV],
    chunk_size: int,
    dtype: str,
    framing: str,
    provenance: list[str],
    timings: Timings = Timings(),
    codec: Codec | None = None,
    codebook: Codebook | None = None,
) -> Artifact:
    """Cut per-layer pre-RoPE keys and values `[H, T, D]` into blocks of `chunk_size` tokens, encoded by
    `codec` (a `tc` codec needs the model's `codebook`, whose blob the artifact then carries)."""
    if chunk_size <= 0:
        raise UsageError(f"chunk size must be positive, got {chunk_size}")
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    codec = codec or parse_codec("none")
    kv_heads, _, head_dim = layers[0][0].shape  # [H, T, D]
    geometry = Geometry(len(layers), kv_heads, head_dim)
    if codec.transform and codebook is None:
        raise UsageError(f"codec {codec.spec} needs the model's codebook (celslm calibrate -m {space.name})")
    if codec.transform:
        codebook.check_for(space.fingerprint, (geometry.layers, kv_heads, head_dim), f"codec {codec.spec}")
    blobs: dict[str, bytes] = {}

    def add(data: bytes, media_type: str) -> BlobRef:
        ref = BlobRef(sha256_digest(data), len(data), media_type)
        blobs[ref.digest] = data
        return ref

    token_ref = add(encode_tokens(token_ids), MEDIA_TOKENS)
    codebook_ref = add(codebook.to_bytes(), MEDIA_CODEBOOK) if codec.transform else None
    total = len(token_ids)
    blocks, bases = [], []
    for layer, (key, value) in enumerate(layers):
        key, value = torch.as_tensor(key), torch.as_tensor(value)  # numpy arrays from blockread or llama.cpp
        aux = fit_layer(codec, key, value)
        bases.append(add(aux, MEDIA_BASIS) if aux is not None else None)
        layer_bases = codebook.layer(layer) if codec.transform else load_layer(aux)
        refs = []
        for start in range(0, total, chunk_size):
            span = slice(start, start + chunk_size)
            where = BlockShape(start=start, tokens=min(chunk_size, total - start), total=total)
            data = encode_block(codec, key[:, span], value[:, span], layer_bases, where, DTYPES[dtype])
            refs.append(add(data, codec.media_type))
        blocks.append(tuple(refs))
    manifest = Manifest(
        space=space,
        producer=producer,
        token_count=total,
        chunk_size=chunk_size,
        tokens=token_ref,
        prefix_hashes=tuple(prefix_hashes(token_ids, space.fingerprint, chunk_size)),
        geometry=geometry,
        dtype=dtype,
        codec=codec.spec,
        framing=framing,
        blocks=tuple(blocks),
        provenance=tuple(provenance),
        bases=tuple(bases) if any(b is not None for b in bases) else (),
        codebook=codebook_ref,
    )
    return Artifact(manifest, blobs, timings)


def recode(reader: ArtifactReader, codec: Codec, codebook: Codebook | None = None) -> Artifact:
    """Re-encode every block of an artifact with another codec (`tc` codecs with the model's `codebook`).

    A lossy source is refused: decoding it and quantizing again compounds the error, silently. Compress
    from the uncompressed (or losslessly compressed) artifact instead.
    """
    source = reader.manifest
    if not parse_codec(source.codec).lossless:
        raise UsageError(f"{reader.source} is already compressed with lossy codec {source.codec}; "
                         "compress the uncompressed artifact instead (losses would compound)")
    started = time.perf_counter()
    token_ids, layer_iter = open_context(reader)
    layers = [(key, value) for _, key, value in layer_iter]
    artifact = build_artifact(
        space=source.space, producer=source.producer, token_ids=token_ids, layers=layers,
        chunk_size=source.chunk_size, dtype=source.dtype, framing=source.framing,
        provenance=list(source.provenance), codec=codec, codebook=codebook,
    )
    return replace(artifact, timings=replace(reader.timings, compress_s=round(time.perf_counter() - started, 6)))
