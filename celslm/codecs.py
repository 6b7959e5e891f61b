"""KV block codecs: stages joined by `+`, each `name[:key=value,...]`, applied left to right.

    pca:r=32+int4:g=64+lz4      project onto a per-layer PCA basis, quantize to 4 bits, wrap in lz4

Tensor stages (`fp16`, `pca`, `intN`) rewrite a block's key and value tensors `[H, t, D]`; a byte
stage (`lz4`, `zstd`) wraps the block's safetensors bytes. Quantization is asymmetric with an fp16
scale and zero per group: keys per channel (groups run along tokens; keys are pre-RoPE, where a
channel's range is stable), values per token (groups run along channels), as KIVI does. Bit widths
2, 3, 4 and 8 pack 8 values into N bytes.

This module knows nothing of manifests or files: `artifact.py` calls it for every block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import lz4.frame
import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from celslm.errors import IntegrityError, UsageError

MEDIA_BLOCK = "application/vnd.celslm.kv.block.v1+safetensors"
MEDIA_BASIS = "application/vnd.celslm.kv.basis.v1+safetensors"
KINDS = ("key", "value")


@dataclass(frozen=True)
class StageInfo:
    summary: str
    options: dict[str, str]  # option -> help


STAGES: dict[str, StageInfo] = {
    "fp16": StageInfo("store tensors as float16 (lossy cast from float32)", {}),
    "pca": StageInfo("project keys/values onto a per-layer PCA basis stored once per layer",
                     {"r": "rank to keep (e.g. 32)", "e": "or: smallest rank retaining this energy share (e.g. 0.99)",
                      "on": "k, v or kv (default kv): which tensors to reduce"}),
    **{f"int{bits}": StageInfo(f"asymmetric {bits}-bit quantization, keys per channel, values per token",
                               {"g": "group size (default 64)", "kg": "key group size (default g)",
                                "vg": "value group size (default g)", "kbits": f"key bits (default {bits})",
                                "vbits": f"value bits (default {bits})",
                                "keep": "last N context tokens kept in float16 (default 0)",
                                "sink": "first N context tokens (attention sinks) kept in float16 (default 0)"})
       for bits in (8, 4, 3, 2)},
    "lz4": StageInfo("lz4 frame with content checksum around the block bytes (lossless)", {}),
    "zstd": StageInfo("zstandard frame with checksum around the block bytes (lossless)", {"l": "level 1-22 (default 3)"}),
}
BYTE_STAGES = ("lz4", "zstd")

# Presets stand for specs chosen from measurements (README, "Compression"): bench compress reproduces them.
PRESETS = {
    "lossless": "zstd:l=1",  # bit-exact; 9% smaller than the float32 source
    "balanced": "int3:sink=4+lz4",  # smallest found within 1% perplexity: 4.6x vs fp16, +0.44%
    "small": "int2:kbits=3,kg=256,sink=4+lz4",  # smallest found within 5%: 5.8x vs fp16, +3.3%
}


@dataclass(frozen=True)
class Stage:
    name: str
    params: dict = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.params.items())


@dataclass(frozen=True)
class BlockShape:
    """Where a block sits in its context, for stages that treat the context's tail differently."""

    start: int  # first token position of the block
    tokens: int  # tokens in the block
    total: int  # tokens in the whole context


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


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    padded = count + (-count) % 8
    return torch.from_numpy(_unpack(packed.numpy(), bits, padded)[:count])


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    if bits == 8:
        return packed[:count]
    if bits == 1:
        return np.unpackbits(packed, bitorder="little", count=count)
    if bits == 3:
        return _unpack(packed[: count // 4], 2, count) | (_unpack(packed[count // 4 :], 1, count) << 2)
    mask = (1 << bits) - 1
    return np.stack([(packed >> (bits * i)) & mask for i in range(8 // bits)], axis=1).reshape(-1)[:count]


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


def dequantize(parts: dict[str, torch.Tensor], bits: int, group: int, shape: tuple[int, int, int],
               along_tokens: bool) -> torch.Tensor:
    """Inverse of `quantize` for a tensor of `shape` `[H, t, W]`."""
    heads, tokens, width = shape
    group = min(group, tokens if along_tokens else width)
    reduce = 2 if along_tokens else 3
    scale = parts["scale"].float().unsqueeze(reduce)
    zero = parts["zero"].float().unsqueeze(reduce)
    grouped_shape = list(scale.shape)
    grouped_shape[reduce] = group
    count = math.prod(grouped_shape)
    q = unpack_bits(parts["q"], bits, count).view(grouped_shape).float()
    x = q.mul_(scale).add_(zero)
    x = x.reshape(heads, -1, width) if along_tokens else x.reshape(heads, tokens, -1)
    return (x[:, :tokens] if along_tokens else x[..., :width]).contiguous()


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


def reconstruct(coeffs: torch.Tensor, basis: dict[str, torch.Tensor]) -> torch.Tensor:
    return coeffs @ basis["basis"].float().transpose(1, 2) + basis["mean"].float().unsqueeze(1)


# ---------------------------------------------------------------- codec


class Codec:
    """A parsed codec spec; encodes and decodes blocks."""

    def __init__(self, stages: list[Stage]):
        self.stages = tuple(stages)
        self.quant = self._stage(*(n for n in STAGES if n.startswith("int")))
        self.pca = self._stage("pca")
        self.fp16 = self._stage("fp16")
        self.wrapper = self._stage(*BYTE_STAGES)
        self._check()

    @property
    def spec(self) -> str:
        return "+".join(str(s) for s in self.stages) or "none"

    def _stage(self, *names: str) -> Stage | None:
        return next((s for s in self.stages if s.name in names), None)

    @property
    def lossless(self) -> bool:
        return all(s.name in BYTE_STAGES for s in self.stages)

    @property
    def media_type(self) -> str:
        return MEDIA_BLOCK + (f"+{self.wrapper.name}" if self.wrapper else "")

    def _check(self) -> None:
        order = {"pca": 0, "fp16": 1, **{n: 1 for n in STAGES if n.startswith("int")}, "lz4": 2, "zstd": 2}
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names) or sum(n in order and order[n] == 1 for n in names) > 1 \
                or sum(n in BYTE_STAGES for n in names) > 1:
            raise UsageError(f"codec {self.spec}: each kind of stage at most once (one of fp16/intN, one of lz4/zstd)")
        if [order[n] for n in names] != sorted(order[n] for n in names):
            raise UsageError(f"codec {self.spec}: stages must run pca, then fp16 or intN, then lz4 or zstd")
        if self.pca and ("r" in self.pca.params) == ("e" in self.pca.params):
            raise UsageError(f"codec {self.spec}: pca needs exactly one of r=RANK or e=ENERGY")
        if self.pca and self.pca.params.get("on", "kv") not in ("k", "v", "kv"):
            raise UsageError(f"codec {self.spec}: pca on= must be k, v or kv")

    def _bits(self, kind: str) -> int:
        q = self.quant
        return int(q.params.get(f"{kind[0]}bits", q.name[3:]))

    def _group(self, kind: str) -> int:
        q = self.quant
        return int(q.params.get(f"{kind[0]}g", q.params.get("g", 64)))

    def _reduces(self, kind: str) -> bool:
        return self.pca is not None and kind[0] in self.pca.params.get("on", "kv")

    # -- per layer

    def fit_layer(self, key: torch.Tensor, value: torch.Tensor) -> bytes | None:
        """The layer's auxiliary blob (PCA bases) fitted on all its tokens, or None if the codec needs none."""
        if not self.pca:
            return None
        rank = int(self.pca.params["r"]) if "r" in self.pca.params else None
        energy = float(self.pca.params["e"]) if "e" in self.pca.params else None
        sink = int(self.quant.params.get("sink", 0)) if self.quant else 0
        tensors = {}
        for kind, x in zip(KINDS, (key, value)):
            if self._reduces(kind):
                fit_on = x[:, sink:] if x.shape[1] > sink else x  # sinks stay fp16 and would skew the basis
                for name, t in fit_basis(fit_on, rank, energy).items():
                    tensors[f"{kind}.{name}"] = t
        return st_save(tensors)

    @staticmethod
    def load_layer(data: bytes | None) -> dict[str, dict[str, torch.Tensor]]:
        if data is None:
            return {}
        tensors = st_load(data)
        return {kind: {n: tensors[f"{kind}.{n}"] for n in ("mean", "basis")} for kind in KINDS if f"{kind}.basis" in tensors}

    # -- per block

    def encode_block(self, key: torch.Tensor, value: torch.Tensor, bases: dict, where: BlockShape,
                     store_dtype: torch.dtype = torch.float32) -> bytes:
        """One block's bytes; `bases` is `load_layer` of the layer's auxiliary blob (parsed once per layer)."""
        tensors: dict[str, torch.Tensor] = {}
        for kind, x in zip(KINDS, (key, value)):
            tensors.update(self._encode_tensor(kind, x, bases.get(kind), where, store_dtype))
        return self._wrap(st_save(tensors))

    def _encode_tensor(self, kind, x, basis, where, store_dtype):
        if self.quant is None:
            cast = torch.float16 if self.fp16 else store_dtype
            return {kind: (project(x, basis) if basis else x).to(cast).contiguous()}
        low, high = self._body(where)
        out = {}
        if low:
            out[f"{kind}.head"] = x[:, :low].half().contiguous()
        if high < where.tokens:
            out[f"{kind}.tail"] = x[:, high:].half().contiguous()
        if high > low:
            body = project(x[:, low:high], basis) if basis else x[:, low:high]
            parts = quantize(body, self._bits(kind), self._group(kind), along_tokens=(kind == "key"))
            out.update({f"{kind}.{n}": t.contiguous() for n, t in parts.items()})
        return out

    def _body(self, where: BlockShape) -> tuple[int, int]:
        """The block's quantized token range [low, high): the context's first `sink` tokens (attention
        sinks, whose outsized keys would inflate their groups' scales) and last `keep` tokens stay fp16."""
        sink = int(self.quant.params.get("sink", 0)) if self.quant else 0
        keep = int(self.quant.params.get("keep", 0)) if self.quant else 0
        low = max(0, min(where.tokens, sink - where.start))
        high = max(low, min(where.tokens, where.total - keep - where.start))
        return low, high

    def decode_block(self, data: bytes, media_type: str, bases: dict,
                     shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(key, value), each `[H, t, D]` in fp32; `shape` is what the manifest says the block holds."""
        if media_type != self.media_type:
            raise IntegrityError(f"media type {media_type} does not match codec {self.spec}")
        tensors = st_load(self._unwrap(data))
        return tuple(self._decode_tensor(kind, tensors, bases.get(kind), shape) for kind in KINDS)

    def _decode_tensor(self, kind, tensors, basis, shape):
        if kind in tensors:
            x = tensors[kind].float()
            return reconstruct(x, basis) if basis else x
        heads, tokens, width = shape
        head, tail = tensors.get(f"{kind}.head"), tensors.get(f"{kind}.tail")
        pieces = [head.float()] if head is not None else []
        if f"{kind}.q" in tensors:
            kept = sum(t.shape[1] for t in (head, tail) if t is not None)
            body_shape = (heads, tokens - kept, basis["basis"].shape[-1] if basis else width)
            parts = {n: tensors[f"{kind}.{n}"] for n in ("q", "scale", "zero")}
            body = dequantize(parts, self._bits(kind), self._group(kind), body_shape, along_tokens=(kind == "key"))
            pieces.append(reconstruct(body, basis) if basis else body)
        if tail is not None:
            pieces.append(tail.float())
        return torch.cat(pieces, dim=1)

    # -- bytes

    def _wrap(self, data: bytes) -> bytes:
        wrapper = self.wrapper
        if wrapper is None:
            return data
        if wrapper.name == "lz4":
            return lz4.frame.compress(data, content_checksum=True)
        import zstandard

        return zstandard.ZstdCompressor(level=int(wrapper.params.get("l", 3)), write_checksum=True).compress(data)

    def _unwrap(self, data: bytes) -> bytes:
        wrapper = self.wrapper
        try:
            if wrapper is None:
                return data
            if wrapper.name == "lz4":
                return lz4.frame.decompress(data)
            import zstandard

            return zstandard.ZstdDecompressor().decompress(data)
        except Exception as exc:  # the digest already matched, so this is a writer's bug or a forged blob
            raise IntegrityError(f"{wrapper.name} frame does not decode: {exc}") from exc


def parse_codec(spec: str) -> Codec:
    """Parse `name[:k=v,...]+...` (or a preset name, or "none")."""
    spec = PRESETS.get(spec, spec).strip()
    if spec in ("", "none"):
        return Codec([])
    stages = []
    for part in spec.split("+"):
        name, _, options = part.strip().partition(":")
        if name not in STAGES:
            raise UsageError(f"unknown codec stage {name!r}; see celslm compress --list")
        params = {}
        for option in filter(None, options.split(",")):
            key, eq, value = option.partition("=")
            if not eq or key not in STAGES[name].options:
                allowed = ", ".join(STAGES[name].options) or "none"
                raise UsageError(f"codec stage {name}: bad option {option!r} (options: {allowed})")
            params[key] = _number(name, key, value)
        stages.append(Stage(name, params))
    return Codec(stages)


def _number(stage: str, key: str, value: str):
    if key == "on":
        return value
    try:
        number = float(value) if key == "e" else int(value)
    except ValueError:
        raise UsageError(f"codec stage {stage}: {key}={value!r} is not a number") from None
    valid = {"e": 0 < number <= 1, "kbits": number in (2, 3, 4, 8), "vbits": number in (2, 3, 4, 8),
             "l": 1 <= number <= 22, "keep": number >= 0, "sink": number >= 0}.get(key, number >= 1)
    if not valid:
        raise UsageError(f"codec stage {stage}: {key}={value} is out of range")
    return number
