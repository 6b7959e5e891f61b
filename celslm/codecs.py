"""KV block codecs: stages joined by `+`, each `name[:key=value,...]`, applied left to right.

    pca:r=32+int4:g=64+lz4      project onto a per-layer PCA basis, quantize to 4 bits, wrap in lz4
    tc:q=1.5                    transform-code with the model's calibrated codebook, then ANS
    tc:q=1.5,ent=pco            the same codes under pcodec, by octave of spread (decodes ~2.5x faster, ~6% larger)
    tc:q=1.5,ent=none+zstd      the same codes as plain integers, wrapped in zstd (faster, larger)

Tensor stages (`fp16`, `pca`, `intN`, `tc`) rewrite a block's key and value tensors `[H, t, D]`; a byte
stage (`lz4`, `zstd`) wraps the block's safetensors bytes. Quantization is asymmetric with an fp16
scale and zero per group: keys per channel (groups run along tokens; keys are pre-RoPE, where a
channel's range is stable), values per token (groups run along channels), as KIVI does. Bit widths
2, 3, 4 and 8 pack 8 values into N bytes. `tc` projects each token's channels, across heads, onto a
basis calibrated once per model (`codebook.py`) and entropy-codes the integer codes with ANS under
the codebook's static models (or stores them plainly, component by component, for a byte stage);
the manifest names the codebook's digest.

This module is the spec: parsing, presets, media types, the byte stages; it imports no torch, so
reading a manifest (verify, inspect, serve-cache) never loads it. The tensor stages run in
`blocks.py`, which turns a context's KV into blocks and back; neither knows of files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import lz4.frame
import zstandard

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
    "tc": StageInfo("transform coding with the model's calibrated codebook (celslm calibrate): a basis across "
                    "heads, a step per layer from measured sensitivity, low-variance components dropped",
                    {"q": "step multiplier: higher is smaller and lossier (default 1.0)",
                     "ent": "ans (default: ANS under the codebook's static models), pco (pcodec over components "
                            "grouped by octave of spread: faster to decode, a few % larger) or none (plain integer "
                            "codes, for a byte stage such as zstd)",
                     "keep": "last N context tokens kept in float16 (default 0)",
                     "sink": "first N context tokens (attention sinks) kept in float16 (default 4)"}),
    "lz4": StageInfo("lz4 frame with content checksum around the block bytes (lossless)", {}),
    "zstd": StageInfo("zstandard frame with checksum around the block bytes (lossless)", {"l": "level 1-22 (default 3)"}),
}
BYTE_STAGES = ("lz4", "zstd")

# Presets stand for specs chosen from measurements (README, "Compression"): bench compress reproduces them.
# Old artifacts keep the spec they were made with in their manifest, so they decode whatever a preset means now.
PRESETS = {
    "lossless": "zstd:l=1",  # bit-exact; 9% smaller than the float32 source
    # balanced and small decode 2.2-2.5x faster under pcodec than under ANS, for 6% more bytes: at 100 Mbit/s
    # a 2K context is ~130 ms sooner. tiny is for slow links, where bytes are the time: ANS.
    "balanced": "tc:q=0.5,ent=pco",  # within 0.5% perplexity: 7.1x vs fp16, -0.1%
    "small": "tc:q=1.0,ent=pco",  # >= 10x within 1%: 11.1x, +0.67%
    "tiny": "tc:q=1.6",  # >= 16x within 5%: 17.6x, +2.05%
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


# ---------------------------------------------------------------- codec


class Codec:
    """A parsed codec spec: which stages, with which parameters. `blocks.py` runs the tensor stages."""

    def __init__(self, stages: list[Stage]):
        self.stages = tuple(stages)
        self.quant = self._stage(*(n for n in STAGES if n.startswith("int")))
        self.pca = self._stage("pca")
        self.fp16 = self._stage("fp16")
        self.transform = self._stage("tc")
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
        order = {"pca": 0, "fp16": 1, "tc": 1, **{n: 1 for n in STAGES if n.startswith("int")}, "lz4": 2, "zstd": 2}
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names) or sum(n in order and order[n] == 1 for n in names) > 1 \
                or sum(n in BYTE_STAGES for n in names) > 1:
            raise UsageError(f"codec {self.spec}: each kind of stage at most once (one of fp16/intN/tc, one of lz4/zstd)")
        if [order[n] for n in names] != sorted(order[n] for n in names):
            raise UsageError(f"codec {self.spec}: stages must run pca, then fp16 or intN, then lz4 or zstd")
        if self.transform and self.pca:
            raise UsageError(f"codec {self.spec}: tc brings its own calibrated basis; drop the pca stage")
        if self.pca and ("r" in self.pca.params) == ("e" in self.pca.params):
            raise UsageError(f"codec {self.spec}: pca needs exactly one of r=RANK or e=ENERGY")
        if self.pca and self.pca.params.get("on", "kv") not in ("k", "v", "kv"):
            raise UsageError(f"codec {self.spec}: pca on= must be k, v or kv")

    def bits(self, kind: str) -> int:
        q = self.quant
        return int(q.params.get(f"{kind[0]}bits", q.name[3:]))

    def group(self, kind: str) -> int:
        q = self.quant
        return int(q.params.get(f"{kind[0]}g", q.params.get("g", 64)))

    def reduces(self, kind: str) -> bool:
        return self.pca is not None and kind[0] in self.pca.params.get("on", "kv")

    @property
    def lossy_stage(self) -> Stage | None:
        """The stage that codes token by token with fp16 sinks and window: intN or tc."""
        return self.quant or self.transform

    @property
    def sink(self) -> int:
        stage = self.lossy_stage
        return int(stage.params.get("sink", 4 if stage is self.transform else 0)) if stage else 0

    @property
    def q(self) -> float:
        return float(self.transform.params.get("q", 1.0))

    @property
    def ent(self) -> str | None:
        """How a tc codec's codes are entropy-coded: "ans" (the default), "pco", or "none" (plain integers)."""
        return self.transform.params.get("ent", "ans") if self.transform is not None else None

    def body(self, where: BlockShape) -> tuple[int, int]:
        """The block's coded token range [low, high): the context's first `sink` tokens (attention
        sinks, whose outsized keys would inflate their groups' scales) and last `keep` tokens stay fp16."""
        keep = int(self.lossy_stage.params.get("keep", 0)) if self.lossy_stage else 0
        low = max(0, min(where.tokens, self.sink - where.start))
        high = max(low, min(where.tokens, where.total - keep - where.start))
        return low, high

    # -- the byte stages

    def wrap(self, data: bytes) -> bytes:
        wrapper = self.wrapper
        if wrapper is None:
            return data
        if wrapper.name == "lz4":
            return lz4.frame.compress(data, content_checksum=True)
        return zstandard.ZstdCompressor(level=int(wrapper.params.get("l", 3)), write_checksum=True).compress(data)

    def unwrap(self, data: bytes) -> bytes:
        wrapper = self.wrapper
        try:
            if wrapper is None:
                return data
            if wrapper.name == "lz4":
                return lz4.frame.decompress(data)
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
            raise UsageError(f"unknown codec stage {name!r} (known: {', '.join(STAGES)}; presets: {', '.join(PRESETS)})")
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
    if key == "ent":
        if value not in ("ans", "pco", "none"):
            raise UsageError(f"codec stage {stage}: ent= must be ans, pco or none")
        return value
    if key == "on":
        return value
    try:
        number = float(value) if key in ("e", "q") else int(value)
    except ValueError:
        raise UsageError(f"codec stage {stage}: {key}={value!r} is not a number") from None
    valid = {"e": 0 < number <= 1, "kbits": number in (2, 3, 4, 8), "vbits": number in (2, 3, 4, 8),
             "l": 1 <= number <= 22, "q": 0.01 <= number <= 100, "keep": number >= 0, "sink": number >= 0}.get(key, number >= 1)
    if not valid:
        raise UsageError(f"codec stage {stage}: {key}={value} is out of range")
    return number
