"""Generation over a context (from a KV artifact, or prefilled here) plus a private prompt.

The prompt's KV is computed locally and attends over context + prompt; its positions continue after
the context. Time is accounted per phase so every run can say where its seconds went. Every forward
pass goes through the model's `Engine` (`engine.py`); this module never touches a cache itself.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from celslm import prompting
from celslm.engine import Sequence
from celslm.engine import LayerKV, TokenProgress
from celslm.artifact import ArtifactReader
from celslm.errors import IntegrityError, ModelSpaceMismatch, UsageError
from celslm.models import LoadedModel
from celslm.stream import LayerFeed, Link, StreamedReader, Timeline


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UsageError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top-p must be in (0, 1] (1 keeps every token), got {self.top_p}")
        if self.max_new_tokens < 1:
            raise UsageError(f"max new tokens must be at least 1, got {self.max_new_tokens}")


@dataclass
class DecodeStats:
    path: str = ""  # "artifact", "partial" (cached prefix + local prefill), "composed" (several artifacts) or "edge-only"
    pipelined: bool = False  # the prompt's forward ran while later layers were still arriving
    link: str | None = None  # the emulated link's label, if any
    context_tokens: int = 0
    recomputed_tokens: int = 0  # of the context's, prefilled here over the artifact's earlier chunks
    prompt_tokens: int = 0
    new_tokens: int = 0
    load_s: float = 0.0  # reading, verifying and injecting the artifact before the prompt runs
    context_prefill_s: float = 0.0  # prefilling (part of) the context here
    prompt_prefill_s: float = 0.0
    generate_s: float = 0.0  # from the first generated token to the last
    ttft_s: float = 0.0  # wall clock from the start of context work to the first generated token
    total_s: float = 0.0
    t_com_c_s: float = 0.0  # T_com_C: the cloud's prefill, projection and compression (from the manifest)
    t_comm_s: float = 0.0  # T_comm: first blob requested to last blob arrived
    t_com_e_s: float = 0.0  # T_com_E: decoding blocks, local prefill, prompt prefill, generation
    hidden_share: float = 0.0  # share of min(T_comm, overlappable compute) that ran at the same time
    kv_decode_s: float = 0.0  # wall time the artifact's layers took to decode (on several threads at once)
    kv_decode_hidden: float = 0.0  # share of it spent while the model was still loading
    cloud_prefill_s: float | None = None  # from the artifact's manifest
    artifact_bytes: int = 0
    bytes_by_source: dict = field(default_factory=dict)  # bytes fetched from local cache, each peer, the cloud
    fallback: str | None = None  # why the artifact was abandoned and (part of) the context recomputed

    def to_json(self) -> dict:
        """The stable schema of `decode --json` (besides "text" and "artifact")."""
        seconds = ("t_com_c_s", "t_comm_s", "t_com_e_s", "ttft_s", "total_s", "load_s", "context_prefill_s",
                   "prompt_prefill_s", "generate_s")
        return {
            "path": self.path,
            "pipelined": self.pipelined,
            "link": self.link,
            **{name: round(getattr(self, name), 6) for name in seconds},
            "hidden_share": round(self.hidden_share, 4),
            "kv_decode_s": round(self.kv_decode_s, 6),
            "kv_decode_hidden_share": round(self.kv_decode_hidden, 4),
            "bytes_by_source": self.bytes_by_source,
            "context_tokens": self.context_tokens,
            "recomputed_tokens": self.recomputed_tokens,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "artifact_bytes": self.artifact_bytes,
            "cloud_prefill_s": self.cloud_prefill_s,
            "fallback": self.fallback,
        }


@dataclass
class Context:
    """A context ready to decode over: its token ids and their KV on the engine (still filling, when
    `feed` is set)."""

    token_ids: list[int]
    sequence: Sequence
    framing: str
    stats: DecodeStats = field(default_factory=DecodeStats)
    started: float = field(default_factory=time.perf_counter)  # when work on this context began
    feed: LayerFeed | None = None  # layers still to be injected during the prompt's forward pass
    timeline: Timeline | None = None


def check_space(reader: ArtifactReader, loaded: LoadedModel) -> None:
    space = reader.manifest.space
    if space.fingerprint != loaded.fingerprint:
        raise ModelSpaceMismatch(
            f"{reader.source} belongs to model space {space.name} ({space.fingerprint[:12]}), "
            f"but the model given is {loaded.name} ({loaded.fingerprint[:12]}); decode it with the model that produced it"
        )


def context_from_artifact(loaded: LoadedModel, reader: ArtifactReader, *, link: Link | None = None,
                          pipeline: bool = False) -> Context:
    """Stream an artifact's layers in (verified, decoded, re-rotated to positions 0..T-1).

    With `pipeline`, the cache is returned while layers are still arriving; `generate` injects layer l
    just before the prompt's forward pass reaches it. Otherwise every layer is in before this returns."""
    check_space(reader, loaded)
    started = time.perf_counter()
    timeline = Timeline()
    feed = LayerFeed(loaded.engine, StreamedReader(reader, timeline, link), timeline)
    stats = _artifact_stats(reader, len(feed.token_ids))
    pipeline = pipeline and loaded.engine.pipelines
    stats.pipelined, stats.link = pipeline, link.label if link else None
    context = Context(feed.token_ids, loaded.engine.sequence(), reader.manifest.framing, stats, started, feed, timeline)
    if not pipeline:
        _drain_feed(loaded, context)
        stats.load_s = time.perf_counter() - started
    return context


def context_from_prefix(loaded: LoadedModel, token_ids: list[int] | None, framing: str, reader: ArtifactReader,
                        chunks: int, step: int = 256, progress: TokenProgress | None = None,
                        link: Link | None = None) -> Context:
    """A cached prefix of `chunks` chunks from `reader`, and the rest of `token_ids` (default: the
    artifact's own) prefilled here."""
    check_space(reader, loaded)
    started = time.perf_counter()
    timeline = Timeline()
    feed = LayerFeed(loaded.engine, StreamedReader(reader, timeline, link), timeline, chunks)
    token_ids = feed.token_ids if token_ids is None else token_ids
    prefix = min(len(token_ids), chunks * reader.manifest.chunk_size)
    if feed.token_ids[:prefix] != token_ids[:prefix]:
        raise IntegrityError(f"{reader.source}: its first {chunks} chunks hold other tokens than this context")
    stats = _artifact_stats(reader, len(token_ids))
    stats.path, stats.link = ("partial" if prefix < len(token_ids) else "artifact"), link.label if link else None
    stats.recomputed_tokens = len(token_ids) - prefix
    context = Context(token_ids, loaded.engine.sequence(), framing, stats, started, feed, timeline)
    _drain_feed(loaded, context)
    loaded.engine.crop(context.sequence, prefix)  # the last chunk may hold tokens past a shorter context
    stats.load_s = time.perf_counter() - started
    begun = time.perf_counter()
    loaded.engine.prefill(context.sequence, token_ids[prefix:], step, _offset(progress, prefix, len(token_ids)))
    stats.context_prefill_s = time.perf_counter() - begun
    return context


def _drain_feed(loaded: LoadedModel, context: Context) -> None:
    """Inject every layer now (no pipelining)."""
    context.feed.check(loaded.engine)
    for index in range(loaded.engine.geometry.layers):
        loaded.engine.inject(context.sequence, index, context.feed.wait(index))
    context.feed = None


def _offset(progress: TokenProgress | None, done: int, total: int) -> TokenProgress | None:
    """Progress over the whole context while only its tail (after `done` tokens) is prefilled."""
    return (lambda count, _: progress(done + count, total)) if progress else None


def _artifact_stats(reader: ArtifactReader, tokens: int) -> DecodeStats:
    timings = reader.timings
    return DecodeStats(path="artifact", context_tokens=tokens, cloud_prefill_s=timings.prefill_s,
                       artifact_bytes=reader.manifest.blob_bytes(), t_com_c_s=timings.cloud_s)


def context_from_text(loaded: LoadedModel, text: str, *, framing: str | None = None, step: int = 256,
                      progress: TokenProgress | None = None) -> Context:
    """Edge-only: tokenize and prefill the context here."""
    framing = framing or prompting.default_framing(loaded.tokenizer)
    return context_from_ids(loaded, prompting.context_ids(loaded.tokenizer, text, framing), framing=framing,
                            step=step, progress=progress)


def context_from_ids(loaded: LoadedModel, token_ids: list[int], *, framing: str, step: int = 256,
                     progress: TokenProgress | None = None) -> Context:
    """Edge-only: prefill already tokenized context here."""
    if not token_ids:
        raise UsageError("the context is empty")
    started = time.perf_counter()
    sequence = loaded.engine.sequence()
    loaded.engine.prefill(sequence, token_ids, step, progress)
    stats = DecodeStats(path="edge-only", context_tokens=len(token_ids),
                        context_prefill_s=time.perf_counter() - started)
    return Context(token_ids, sequence, framing, stats, started)


def context_from_layers(loaded: LoadedModel, token_ids: list[int], layers: list[LayerKV],
                        framing: str = "raw") -> Context:
    """A context from pre-RoPE keys and values already in memory (exact: no codec, no artifact)."""
    sequence = loaded.engine.sequence()
    for index, (key, value) in enumerate(layers):
        loaded.engine.inject(sequence, index, loaded.engine.place(key, value))
    return Context(token_ids, sequence, framing, DecodeStats(path="artifact", context_tokens=len(token_ids)))


def eos_ids(loaded: LoadedModel) -> set[int]:
    """Generation stops after any of these: the generation config's and the tokenizer's end token."""
    extra = getattr(loaded.tokenizer, "eos_token_id", None)
    return set(loaded.eos_ids) | ({extra} if extra is not None else set())


def next_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """Pick a token from last-position logits `[V]`."""
    if sampling.temperature <= 0:
        return int(np.argmax(logits))
    scaled = np.asarray(logits, dtype=np.float64) / sampling.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_probs = probs[order]
        keep = np.cumsum(sorted_probs) - sorted_probs < sampling.top_p  # always keeps the top one
        probs = np.zeros_like(probs)
        probs[order[keep]] = sorted_probs[keep]
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))


def generate(loaded: LoadedModel, context: Context, prompt_ids: list[int], sampling: Sampling,
             logits_out: list | None = None) -> Iterator[int]:
    """Yield generated token ids; `context.stats` is filled as it goes. The cache grows in place."""
    if not prompt_ids:
        raise UsageError("the prompt is empty")
    engine, sequence = loaded.engine, context.sequence
    needed = len(context.token_ids) + len(prompt_ids)
    if needed > engine.max_positions:  # past them a model answers plausible garbage: refuse
        raise UsageError(f"context ({len(context.token_ids)} tokens) and prompt ({len(prompt_ids)}) need {needed} "
                         f"positions; {loaded.name} was trained for {engine.max_positions}")
    if context.feed is not None:
        context.feed.check(engine)
    stats = context.stats
    stats.prompt_tokens = len(prompt_ids)
    rng = np.random.default_rng(sampling.seed)
    stop = eos_ids(loaded)
    started = time.perf_counter()
    timeline = context.timeline
    if context.feed is not None:  # pipelined: layer l of the prompt runs as soon as layer l's KV is in
        record = timeline.compute.append if timeline else None
        with engine.gated(sequence, context.feed.wait, on_compute=lambda a, b: record((a, b))):
            logits = engine.evaluate(sequence, prompt_ids)[-1]  # [V]
        context.feed = None
    else:
        logits = engine.evaluate(sequence, prompt_ids)[-1]  # [V]
        if timeline is not None:
            timeline.compute.append((started, time.perf_counter()))
    stats.prompt_prefill_s = time.perf_counter() - started
    first_at = None
    for index in range(sampling.max_new_tokens):
        if logits_out is not None:
            logits_out.append(logits)
        token = next_token(logits, sampling, rng)
        stats.new_tokens += 1
        if first_at is None:
            first_at = time.perf_counter()
            stats.ttft_s = first_at - context.started
        yield token
        if token in stop or index + 1 == sampling.max_new_tokens or needed + index + 1 >= engine.max_positions:
            break  # no forward pass for a token nobody will read, nor past the model's positions
        logits = engine.evaluate(sequence, [token])[-1]
    finished = time.perf_counter()
    stats.generate_s = finished - (first_at or finished)
    stats.total_s = finished - context.started
    if timeline is not None:
        stats.t_comm_s, stats.hidden_share = timeline.comm_s, timeline.hidden_share()
        stats.kv_decode_s, stats.kv_decode_hidden = timeline.decode_s(), timeline.decode_before(engine.loaded_at)
        stats.t_com_e_s = timeline.compute_s + stats.context_prefill_s + stats.generate_s
    else:
        stats.t_com_e_s = stats.context_prefill_s + stats.prompt_prefill_s + stats.generate_s


class TextStream:
    """Turns generated ids into text pieces, holding back an incomplete multi-byte character."""

    def __init__(self, tokenizer, skip: set[int]):
        self.tokenizer = tokenizer
        self.skip = skip
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        if token not in self.skip:
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted :], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece, self.emitted = text[self.emitted :], len(text)
        return piece
