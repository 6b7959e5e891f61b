"""Compression vs quality, measured: bytes, perplexity ratio and top-1 agreement per codec.

Data: held-out Python standard-library files (real text nobody here wrote). For each file, a context
of 1,024-2,048 tokens and the following tokens as the continuation. The small model prefills each
context once; every codec encodes that KV, decodes it (digests checked), and the continuation is
scored teacher-forced against the uncompressed artifact. Peers run on the same data in the same run:
transformers' QuantizedCache (quanto backend) and plain lz4 / zstd over fp16 bytes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from celslm import kvcache
from celslm.artifact import MemoryReader, Producer
from celslm.blocks import build_artifact
from celslm.codecs import PRESETS, parse_codec
from celslm.corpus import Case, eval_cases
from celslm.decode import context_from_artifact
from celslm.models import LoadedModel
from celslm.score import continuation_logits, nll, top1

DEFAULT_CODECS = (
    "lossless", "balanced", "small",
    "lz4", "int8:sink=4+lz4", "int4:g=64", "int4:sink=4+lz4", "int4:vbits=3,sink=4+lz4",
    "int3:vbits=2,sink=4+lz4", "int2:g=64", "pca:e=0.99,on=kv+int4:sink=4+lz4",
)
PEER_CODECS = ("fp16+lz4", "fp16+zstd")  # plain lz4 / zstd over fp16 bytes
QUANTO_BITS = (4, 2)

Progress = Callable[[str, int, int], None]


@dataclass
class Row:
    codec: str
    system: str  # "celslm" or the peer's name
    kv_bytes: int = 0
    fp16_bytes: int = 0
    nll: float = 0.0
    ref_nll: float = 0.0
    top1: float = 0.0
    encode_s: float | None = 0.0
    decode_s: float | None = 0.0
    cases: int = 0
    per_case: list = field(default_factory=list)

    def summary(self) -> dict:
        n = max(self.cases, 1)
        mb = self.fp16_bytes / 1e6
        return {
            "codec": self.codec,
            "system": self.system,
            "bytes_vs_fp16": round(self.kv_bytes / self.fp16_bytes, 4),
            "ratio": round(self.fp16_bytes / self.kv_bytes, 3),
            "ppl_ratio": round(math.exp((self.nll - self.ref_nll) / n), 5),
            "nll_delta": round((self.nll - self.ref_nll) / n, 5),
            "top1_agreement": round(self.top1 / n, 5),
            "encode_mbps": round(mb / self.encode_s, 1) if self.encode_s else None,
            "decode_mbps": round(mb / self.decode_s, 1) if self.decode_s else None,
            "files": self.cases,
        }


def _one_thread(fn):
    """Codec throughput is measured on one core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)


def run(loaded: LoadedModel, codecs: tuple[str, ...] = DEFAULT_CODECS, files: int = 20, min_context: int = 1024,
        max_context: int = 2048, continuation: int = 128, peers: bool = True, progress: Progress | None = None) -> dict:
    cases = eval_cases(loaded.tokenizer, files, min_context, max_context, continuation)
    all_codecs = tuple(codecs) + (PEER_CODECS if peers else ())
    rows = {spec: Row(codec=f"{spec} ({PRESETS[spec]})" if spec in PRESETS else parse_codec(spec).spec,
                      system="celslm" if spec not in PEER_CODECS else f"plain {spec.split('+')[1]} over fp16")
            for spec in all_codecs}
    quanto_rows = {bits: Row(codec=f"quanto int{bits} g=64", system="transformers QuantizedCache (quanto)")
                   for bits in (QUANTO_BITS if peers and _has_quanto() else ())}
    space = loaded.space
    producer = Producer.native(space)
    for index, case in enumerate(cases):
        if progress:
            progress("files", index, len(cases))
        with torch.inference_mode():
            sequence = loaded.engine.sequence()
            loaded.engine.prefill(sequence, case.context)
            layers = loaded.engine.context_layers(sequence)
        fp16_bytes = 2 * sum(k.numel() + v.numel() for k, v in layers)

        def build(codec):
            return build_artifact(space=space, producer=producer, token_ids=case.context, layers=layers, chunk_size=256,
                                  dtype="float32", framing="raw", provenance=["native"] * len(layers), codec=codec)

        reference = context_from_artifact(loaded, MemoryReader(build(parse_codec("none"))))
        ref_logits, targets = continuation_logits(loaded, reference, case.continuation)
        ref_nll = nll(ref_logits, targets)
        for spec, row in rows.items():
            artifact, encode_s = _one_thread(lambda: build(parse_codec(spec)))
            ctx, decode_s = _one_thread(lambda: context_from_artifact(loaded, MemoryReader(artifact)))
            logits, _ = continuation_logits(loaded, ctx, case.continuation)
            _accumulate(row, logits, targets, ref_logits, ref_nll, fp16_bytes,
                        artifact.manifest.blob_bytes() - artifact.manifest.tokens.size, encode_s, decode_s, case.name)
        for bits, row in quanto_rows.items():
            logits, kv_bytes = _quanto_logits(loaded, case, bits)
            _accumulate(row, logits, targets, ref_logits, ref_nll, fp16_bytes, kv_bytes, None, None, case.name)
    if progress:
        progress("files", len(cases), len(cases))
    return {
        "model": loaded.name,
        "files": [c.name for c in cases],
        "context_tokens": [len(c.context) for c in cases],
        "continuation_tokens": continuation,
        "rows": [r.summary() for r in list(rows.values()) + list(quanto_rows.values())],
        "notes": {"quanto": "encode/decode throughput not separable from its prefill" if quanto_rows else
                  "optimum-quanto not installed: transformers QuantizedCache peer skipped"},
    }


def _accumulate(row: Row, logits, targets, ref_logits, ref_nll, fp16_bytes, kv_bytes, encode_s, decode_s, name):
    value = nll(logits, targets)
    row.nll += value
    row.ref_nll += ref_nll
    row.top1 += top1(logits, ref_logits)
    row.kv_bytes += kv_bytes
    row.fp16_bytes += fp16_bytes
    row.encode_s = None if encode_s is None else row.encode_s + encode_s
    row.decode_s = None if decode_s is None else row.decode_s + decode_s
    row.cases += 1
    row.per_case.append({"file": name, "nll": value, "ref_nll": ref_nll})


def _has_quanto() -> bool:
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        return False
    return True


def _quanto_logits(loaded: LoadedModel, case: Case, bits: int) -> tuple[np.ndarray, int]:
    """transformers' own quantized cache on the same context: prefill all but the last context token
    into it, then score the continuation exactly as `continuation_logits` does."""
    cache = kvcache.quantized_cache(loaded.model, backend="quanto", nbits=bits, group=64)
    last = len(case.context) - 1
    kvcache.forward(loaded.model, case.context[:last], cache, 0)
    kv_bytes = kvcache.quantized_cache_bytes(cache)
    ids = [case.context[last]] + case.continuation[:-1]
    logits = kvcache.forward(loaded.model, ids, cache, last, logits_to_keep=len(ids))
    return logits.numpy(), kv_bytes


def plot(result: dict, path: str) -> None:
    """Compression ratio vs perplexity increase, one point per codec."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for row in result["rows"]:
        loss = (row["ppl_ratio"] - 1) * 100
        marker = "o" if row["system"] == "celslm" else "s"
        ax.scatter(row["ratio"], max(loss, 1e-3), marker=marker, color="C0" if row["system"] == "celslm" else "C3")
        ax.annotate(row["codec"], (row["ratio"], max(loss, 1e-3)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(1, color="gray", linestyle="--", linewidth=0.8)
    ax.axhline(5, color="gray", linestyle=":", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("compression ratio vs fp16 KV")
    ax.set_ylabel("perplexity increase, % (log)")
    ax.set_title(f"{result['model']}: {len(result['files'])} held-out stdlib files (circles celslm, squares peers)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
