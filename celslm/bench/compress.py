"""Compression vs quality, measured: bytes, perplexity ratio and top-1 agreement per codec.

Data: held-out Python standard-library files (real text nobody here wrote), or modules of
third-party libraries installed beside celslm (`--corpus third-party`). For each file and each
context length asked for, that many tokens of context and the following tokens as the continuation.
The model prefills each context once; every codec encodes that KV, decodes it (digests checked), and
the continuation is scored teacher-forced against the uncompressed artifact. Bytes are everything a
fetch moves for the context (manifest, token ids, fp16 sinks, scales, framing); a `tc` codec's
codebook is shared by every artifact of the model and reported once, beside the rows. It is
calibrated on files disjoint from the evaluation files, and the run checks that it is.

Peers run on the same data in the same run: llama.cpp's own q8_0 and q4_0 KV cache types (on the
model's GGUF, bytes as llama.cpp saves the state, quality against its own f16 cache), transformers'
QuantizedCache (quanto backend) and plain lz4 / zstd over fp16 bytes. Throughput is MB/s of fp16 KV on one core (torch and BLAS held to one thread):
encode is layers to artifact (transform, entropy coding, framing, hashing); decode is artifact to
the engine's form (verify, entropy decoding, inverse transform, re-rotation), the engine's own copy
into its cache left out. Decode is also timed with the layers on every core at once, as an edge
decodes them (a diagnostic: what a user waits for is `bench edge`'s first byte).
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from rich.table import Table

from celslm import kvcache
from celslm.artifact import MemoryReader
from celslm.blockread import open_layers
from celslm.blocks import build_artifact
from celslm.calibrate import model_codebook
from celslm.codebook import Codebook
from celslm.codecs import PRESETS, parse_codec
from celslm.corpus import Case, corpus_label, eval_cases
from celslm.decode import context_from_artifact
from celslm.errors import CelslmError
from celslm.manifest import Producer
from celslm.models import LoadedModel
from celslm.score import continuation_logits, kl, nll, top1

DEFAULT_CODECS = (
    "lossless", "balanced", "small", "tiny", "tc:q=0.5", "tc:q=1.0", "tc:q=1.6,ent=pco", "tc:q=1.0,ent=none+zstd", "tc:q=2.0",
    "int8:sink=4+lz4", "int4:sink=4+lz4", "int3:sink=4+lz4", "int2:kbits=3,kg=256,sink=4+lz4",
)
PEER_CODECS = ("fp16+lz4", "fp16+zstd")  # plain lz4 / zstd over fp16 bytes
QUANTO_BITS = (4, 2)
LLAMA_CACHE_TYPES = ("q8_0", "q4_0")

Progress = Callable[[str, int, int], None]


@dataclass
class Row:
    codec: str
    system: str  # "celslm" or the peer's name
    context: int  # context tokens of every case in the row
    kv_bytes: int = 0
    fp16_bytes: int = 0
    nll: float = 0.0
    ref_nll: float = 0.0
    top1: float = 0.0
    kl: float = 0.0
    encode_s: float | None = 0.0
    decode_s: float | None = 0.0
    decode_all_s: float | None = 0.0  # the same decoding, layers on every core at once
    cases: int = 0
    per_case: list = field(default_factory=list)

    def summary(self) -> dict:
        n = max(self.cases, 1)
        mb = self.fp16_bytes / 1e6
        return {
            "codec": self.codec,
            "system": self.system,
            "context_tokens": self.context,
            "bytes_vs_fp16": round(self.kv_bytes / self.fp16_bytes, 4),
            "ratio": round(self.fp16_bytes / self.kv_bytes, 3),
            "ppl_ratio": round(math.exp((self.nll - self.ref_nll) / n), 5),
            "nll_delta": round((self.nll - self.ref_nll) / n, 5),
            "top1_agreement": round(self.top1 / n, 5),
            "kl": round(self.kl / n, 6),
            "encode_mbps": round(mb / self.encode_s, 1) if self.encode_s else None,
            "decode_mbps": round(mb / self.decode_s, 1) if self.decode_s else None,
            "decode_mbps_all_cores": round(mb / self.decode_all_s, 1) if self.decode_all_s else None,
            "files": self.cases,
        }


def _one_thread(fn):
    """Codec throughput is measured on one core: torch's and BLAS's thread pools held to one thread."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            started = time.perf_counter()
            result = fn()
            return result, time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)


def run(loaded: LoadedModel, codecs: tuple[str, ...] = DEFAULT_CODECS, files: int = 20, contexts: tuple[int, ...] = (2048,),
        continuation: int = 128, peers: bool = True, progress: Progress | None = None,
        codebook: Codebook | None = None, gguf: str | None = None, quanto: bool = True, corpus: str = "stdlib") -> dict:
    """Rows per (context length, codec); a `tc` codec codes with `codebook` (default: the model's, calibrated
    once). llama.cpp's cache types run on `gguf` (default: the one kept beside a bundled model)."""
    all_codecs = tuple(codecs) + (PEER_CODECS if peers else ())
    started = time.perf_counter()
    fitting = codebook is None
    codebook = _codebook_for(loaded, all_codecs, codebook, progress)
    codebook_s = time.perf_counter() - started if fitting and codebook is not None else None
    by_length = {length: eval_cases(loaded.tokenizer, files, length, length, continuation, source=corpus)
                 for length in contexts}
    names = {c.name for cases in by_length.values() for c in cases}
    if codebook is not None and names & set(codebook.calibration.get("files_used", ())):
        raise CelslmError(f"the codebook was calibrated on evaluation files {sorted(names & set(codebook.calibration['files_used']))}")
    rows, quanto_rows = {}, {}
    for length in contexts:
        for spec in all_codecs:
            rows[length, spec] = Row(codec=f"{spec} ({PRESETS[spec]})" if spec in PRESETS else parse_codec(spec).spec,
                                     system="celslm" if spec not in PEER_CODECS else f"plain {spec.split('+')[1]} over fp16",
                                     context=length)
        for bits in (QUANTO_BITS if peers and quanto and _has_quanto() else ()):
            quanto_rows[length, bits] = Row(codec=f"quanto int{bits} g=64", system="transformers QuantizedCache (quanto)",
                                            context=length)
    llama = _llama_engines(loaded, gguf) if peers else {}
    llama_rows = {(length, kind): Row(codec=f"llama.cpp {kind} KV cache", system="llama.cpp (its own cache type, GGUF)",
                                      context=length)
                  for length in contexts for kind in llama if kind != "f16"}
    work = [(length, case) for length, cases in by_length.items() for case in cases]
    for index, (length, case) in enumerate(work):
        _measure(loaded, case, {spec: rows[length, spec] for spec in all_codecs},
                 {bits: row for (n, bits), row in quanto_rows.items() if n == length}, codebook)
        if llama:
            _measure_llama(llama, case, {kind: row for (n, kind), row in llama_rows.items() if n == length})
        if progress:
            progress("files", index + 1, len(work))
    return {
        "model": loaded.name,
        "corpus": corpus_label(corpus),
        "files": sorted(names),
        "contexts": list(contexts),
        "cases": {str(length): len(cases) for length, cases in by_length.items()},
        "continuation_tokens": continuation,
        "cores": os.cpu_count() or 1,
        "rows": [r.summary() for r in list(rows.values()) + list(quanto_rows.values()) + list(llama_rows.values()) if r.cases],
        "codebook": None if codebook is None else {
            "digest": codebook.digest, "bytes": len(codebook.to_bytes()), "fitted_s": round(codebook_s, 1) if codebook_s else None,
            "calibration_files": codebook.calibration.get("files_used"), "disjoint_from_evaluation": True,
            "note": "shared by every artifact of the model: fetched once per edge, not counted in the rows"},
        "bytes": "manifest + every blob of the context (token ids, sinks, scales, framing); codebook apart",
        "notes": {"quanto": "encode/decode throughput not separable from its prefill" if quanto_rows else
                  "optimum-quanto not installed: transformers QuantizedCache peer skipped",
                  "llama.cpp": "its rows: bytes of the saved sequence state, quality against its own f16 cache on the "
                               "GGUF" if llama else "no GGUF beside the model: llama.cpp cache-type peers skipped"},
    }


def _codebook_for(loaded: LoadedModel, specs, codebook: Codebook | None, progress: Progress | None) -> Codebook | None:
    """`codebook`, or the model's (cached, or calibrated once now) when one of `specs` is a tc codec."""
    if codebook is None and any(parse_codec(spec).transform for spec in specs):
        codebook = model_codebook(loaded, progress=progress)
    return codebook


def _measure(loaded: LoadedModel, case: Case, rows: dict, quanto_rows: dict, codebook: Codebook | None) -> None:
    """One case through every codec (and the quanto peer), accumulated into the rows."""
    space = loaded.space
    producer = Producer.native(space)
    with torch.inference_mode():
        sequence = loaded.engine.sequence()
        loaded.engine.prefill(sequence, case.context)
        layers = loaded.engine.context_layers(sequence)
    fp16_bytes = 2 * sum(k.numel() + v.numel() for k, v in layers)

    def build(codec):
        return build_artifact(space=space, producer=producer, token_ids=case.context, layers=layers, chunk_size=256,
                              dtype="float32", framing="raw", provenance=["native"] * len(layers), codec=codec,
                              codebook=codebook if codec.transform else None)

    reference = context_from_artifact(loaded, MemoryReader(build(parse_codec("none"))))
    ref_logits, targets = continuation_logits(loaded, reference, case.continuation)
    ref_nll = nll(ref_logits, targets)
    for spec, row in rows.items():
        artifact, encode_s = _one_thread(lambda: build(parse_codec(spec)))
        _, decode_s = _one_thread(lambda: _decode(loaded, artifact))
        _, decode_all_s = _one_thread(lambda: _decode(loaded, artifact, os.cpu_count() or 1))
        logits, _ = continuation_logits(loaded, context_from_artifact(loaded, MemoryReader(artifact)), case.continuation)
        _accumulate(row, logits, targets, ref_logits, ref_nll, fp16_bytes,
                    artifact.manifest.shipped_bytes(), encode_s, (decode_s, decode_all_s), case.name)
    for bits, row in quanto_rows.items():
        logits, kv_bytes = _quanto_logits(loaded, case, bits)
        _accumulate(row, logits, targets, ref_logits, ref_nll, fp16_bytes, kv_bytes, None, None, case.name)


def _decode(loaded: LoadedModel, artifact, workers: int = 1) -> list:
    """What decoding costs the codec: read and verify every blob, decode the blocks, bring them back to
    channels and re-rotate the keys into the engine's form (`place`), layers on `workers` threads at
    once. The engine's own copy into its cache is the engine's, whatever the codec, and is not counted."""
    _, layers = open_layers(MemoryReader(artifact))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda layer: loaded.engine.place(*layer.decode()), layers))


def _accumulate(row: Row, logits, targets, ref_logits, ref_nll, fp16_bytes, kv_bytes, encode_s, decode_s, name):
    """`decode_s`: (one core, all cores) seconds, or None where the row has no codec of ours."""
    value = nll(logits, targets)
    row.nll += value
    row.ref_nll += ref_nll
    row.top1 += top1(logits, ref_logits)
    row.kl += kl(logits, ref_logits)
    row.kv_bytes += kv_bytes
    row.fp16_bytes += fp16_bytes
    row.encode_s = None if encode_s is None else row.encode_s + encode_s
    row.decode_s = None if decode_s is None else row.decode_s + decode_s[0]
    row.decode_all_s = None if decode_s is None else row.decode_all_s + decode_s[1]
    row.cases += 1
    row.per_case.append({"file": name, "nll": value, "ref_nll": ref_nll})


def task_accuracy(loaded: LoadedModel, codecs: tuple[str, ...], per_kind: int, codebook: Codebook | None = None,
                  context_chars: int = 5000, new_tokens: int = 32, progress: Progress | None = None) -> dict:
    """The evaluation report's tasks (bench/tasks.py: completions and questions on held-out modules) answered
    from each codec's artifact, greedy, on the same engine: what compression does to answers, not only to
    perplexity. The uncompressed artifact ("none") is the reference row."""
    from celslm.bench import modes
    from celslm.bench.report import build_tasks
    from celslm.bench.tasks import score
    from celslm.blocks import recode
    from celslm.decode import Sampling

    suite = build_tasks(per_kind, context_chars)
    sampling = Sampling(max_new_tokens=new_tokens)
    specs = ("none",) + tuple(codecs)
    codebook = _codebook_for(loaded, specs, codebook, progress)
    scores: dict[str, list[dict]] = {spec: [] for spec in specs}
    for index, task in enumerate(suite):
        if progress:
            progress("tasks", index, len(suite))
        raw = task.kind == "complete"
        exact, prep_s = modes.native_artifact(loaded, task.context, raw, "none")
        for spec in specs:
            codec = parse_codec(spec)
            artifact = recode(MemoryReader(exact), codec, codebook if codec.transform else None)
            outcome = modes.ce_lslm(loaded, task.context, task.prompt, sampling, raw, spec, prepared=(artifact, prep_s))
            scores[spec].append({"kind": task.kind, **score(task, outcome.text)})
    if progress:
        progress("tasks", len(suite), len(suite))

    def mean(rows, kind, key):
        values = [r[key] for r in rows if r["kind"] == kind]
        return round(sum(values) / len(values), 4) if values else None

    return {"tasks": {kind: sum(t.kind == kind for t in suite) for kind in ("complete", "qa")}, "new_tokens": new_tokens,
            "rows": [{"codec": spec, "qa_correct": mean(rows, "qa", "correct"),
                      "complete_exact": mean(rows, "complete", "exact"),
                      "complete_edit_similarity": mean(rows, "complete", "edit_similarity")}
                     for spec, rows in scores.items()]}


def _llama_engines(loaded: LoadedModel, gguf: str | None) -> dict:
    """llama.cpp on the model's GGUF at f16 and at each quantized cache type, or {} without a GGUF."""
    from celslm.llamacpp import LlamaEngine
    from celslm.models import model_gguf

    gguf = gguf or model_gguf(loaded.name, loaded.folder)
    if gguf is None:
        return {}
    return {kind: LlamaEngine(str(gguf), cache_type=kind) for kind in ("f16", *LLAMA_CACHE_TYPES)}


def _measure_llama(engines: dict, case: Case, rows: dict) -> None:
    """The case on llama.cpp at each cache type, scored against its f16 cache (the same GGUF)."""
    results = {}
    last = len(case.context) - 1
    ids = [case.context[last]] + case.continuation[:-1]
    for kind, engine in engines.items():
        sequence = engine.sequence()
        engine.prefill(sequence, case.context[:last])
        state = engine.state_bytes()
        results[kind] = engine.evaluate(sequence, ids, logits_to_keep=len(ids)), state
    ref_logits, ref_state = results["f16"]
    targets = np.asarray(case.continuation, dtype=np.int64)
    ref_nll = nll(ref_logits, targets)
    for kind, row in rows.items():
        logits, state = results[kind]
        _accumulate(row, logits, targets, ref_logits, ref_nll, ref_state, state, None, None, case.name)


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


def render(result: dict) -> list:
    """The tables and lines `bench compress` prints."""
    cases = ", ".join(f"{n} at {length}" for length, n in result["cases"].items())
    table = Table("context", "codec", "system", "ratio vs fp16", "ppl ratio", "top-1", "KL", "encode MB/s", "decode MB/s",
                  f"decode MB/s, {result.get('cores', '?')} cores",
                  title=f"KV compression, {result['model']}: held-out {result['corpus']} files ({cases} tokens), "
                        f"{result['continuation_tokens']}-token continuations (MB/s of fp16 KV, one core unless named)")
    for row in result["rows"]:
        mbps = [f"{row[k]:.0f}" if row.get(k) else "n/a" for k in ("encode_mbps", "decode_mbps", "decode_mbps_all_cores")]
        table.add_row(str(row["context_tokens"]), row["codec"], row["system"], f"{row['ratio']:.2f}x",
                      f"{row['ppl_ratio']:.4f}", f"{row['top1_agreement']:.3f}", f"{row['kl']:.4f}", *mbps)
    shown: list = [table, f"bytes: {result['bytes']}"]
    if result["codebook"]:
        book = result["codebook"]
        shown.append(f"codebook: {book['digest']}, {book['bytes'] / 2**20:.2f} MiB once per model, calibrated on "
                     f"{len(book['calibration_files'] or [])} files none of which is evaluated")
    shown.append(f"note: {result['notes']['quanto']}")
    if "task_accuracy" in result:
        acc = result["task_accuracy"]
        table = Table("codec", "QA correct", "completion exact", "completion edit similarity",
                      title=f"the report's tasks answered from each artifact ({acc['tasks']['qa']} QA, "
                            f"{acc['tasks']['complete']} completions, greedy, {acc['new_tokens']} tokens)")
        for row in acc["rows"]:
            table.add_row(row["codec"], *(f"{row[k]:.3f}" if row[k] is not None else "n/a"
                                          for k in ("qa_correct", "complete_exact", "complete_edit_similarity")))
        shown.append(table)
    return shown
