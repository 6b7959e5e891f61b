"""Several artifacts prefilled apart, composed into one context at the edge.

The parts are read in the order given. An artifact holds its keys before RoPE, so a part's KV goes
anywhere in the sequence by being placed (rotated) at its new positions; a post-RoPE state file could
not move. Every part after the first drops the tokens its framing opened it with (the chat template's
head, or a tokenizer's BOS) and is joined to what precedes it by a separator (`prompting.SEPARATOR`,
as between a context and its prompt) and its own first `link_tokens` tokens, all computed here over
everything before them: the "link" recipe of EPIC (arXiv 2410.15332). The rest of a part keeps the KV
its artifact holds, computed without the parts before it; the private prompt reads them all.

With the engine's interface only (inject into an empty sequence, prefill, read back), each part
after the first costs one injection of what precedes it, the link tokens' forward pass, and a read
back; the composed context is injected once more at the end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from celslm import prompting
from celslm.artifact import ArtifactReader
from celslm.decode import Context, DecodeStats, check_space
from celslm.engine import Engine, LayerKV, TokenProgress
from celslm.errors import UsageError
from celslm.manifest import Geometry
from celslm.models import LoadedModel
from celslm.stream import LayerFeed, Link, StreamedReader, Timeline

DEFAULT_LINK = 0  # link tokens per part after the first (its separator is always computed here): `celslm bench
# compose` kept the concatenated artifact's gain with 0, 8, 16 and 32 alike (within 0.4 points), and each costs
# a forward pass
MAX_PARTS = 16  # artifacts in one composition


@dataclass(frozen=True)
class Part:
    """One artifact's context: its token ids and pre-RoPE KV per layer, `[H, T, D]` float32."""

    source: str
    token_ids: list[int]
    layers: list[LayerKV]


@dataclass(frozen=True)
class Composition:
    """The composed context: every token id and its pre-RoPE KV, and where tokens were computed here."""

    token_ids: list[int]
    layers: list[LayerKV]
    linked: list[tuple[int, int]]  # positions [start, end) of each part's separator and link tokens

    def recomputed(self, before: int | None = None) -> int:
        """Positions computed here, of those before `before` (all by default)."""
        end = len(self.token_ids) if before is None else before
        return sum(max(0, min(b, end) - a) for a, b in self.linked)


def opening_ids(tokenizer, framing: str) -> list[int]:
    """The ids every context with this framing opens with (a chat template's head, a BOS, or none)."""
    return prompting.context_ids(tokenizer, "", framing)


def separator_ids(tokenizer) -> list[int]:
    return tokenizer(prompting.SEPARATOR, add_special_tokens=False)["input_ids"]


def joined_ids(parts: list[list[int]], opening: list[int], separator: list[int]) -> list[int]:
    """The composed context's ids: the first part whole, each next one after the separator and without
    its own opening."""
    ids = list(parts[0])
    for part in parts[1:]:
        ids += separator + part[_common_prefix(part, opening):]
    return ids


@dataclass(frozen=True)
class Declared:
    """What a part says of itself before any of its blobs is read: from its manifest, or from a
    context already decoded (the service's)."""

    source: str
    framing: str
    tokens: int

    @classmethod
    def of(cls, reader: ArtifactReader) -> "Declared":
        return cls(reader.source, reader.manifest.framing, reader.manifest.token_count)


def check_parts(parts: list[Declared], loaded: LoadedModel) -> int:
    """All or none: one framing, and a composed length the model can take, without waiting for the
    model to load: bounded as if no part dropped an opening and each separator took a token per byte,
    and one more. Errors name the artifact. Returns the bound. (Each artifact's model space is
    `decode.check_space`'s, on its reader.)"""
    if not parts:
        raise UsageError("no artifact to compose")
    if len(parts) > MAX_PARTS:
        raise UsageError(f"{len(parts)} artifacts; a composition takes at most {MAX_PARTS}")
    for part in parts:
        if part.framing != parts[0].framing:
            raise UsageError(f"{part.source} was prefilled with {part.framing} framing, {parts[0].source} with "
                             f"{parts[0].framing}: compose contexts framed alike")
    length = sum(p.tokens for p in parts) + (len(parts) - 1) * (len(prompting.SEPARATOR.encode()) + 1)
    if length >= loaded.engine.max_positions:
        raise UsageError(f"the {len(parts)} contexts compose to up to {length} tokens; {loaded.name} was trained "
                         f"for {loaded.engine.max_positions} positions, context and prompt together")
    return length


def compose(engine: Engine, parts: list[Part], opening: list[int], separator: list[int], link_tokens: int,
            progress: TokenProgress | None = None) -> Composition:
    """The parts in order, each after the first joined by the separator and its own first `link_tokens`
    tokens computed over everything before them (module docstring)."""
    if link_tokens < 0:
        raise UsageError(f"link tokens must be >= 0, got {link_tokens}")
    layers = [_arrays(layer) for layer in parts[0].layers]
    spans, done, total = [], len(parts[0].token_ids), sum(len(p.token_ids) for p in parts)
    for part in parts[1:]:
        start = _common_prefix(part.token_ids, opening)  # the part's own opening is dropped
        linked = separator + part.token_ids[start : start + link_tokens]
        computed = _computed_here(engine, layers, linked)
        at = layers[0][0].shape[1]
        keep = start + len(linked) - len(separator)  # the part's KV from here on comes from its artifact
        layers = [_joined(before, here, _arrays(own), keep) for before, here, own in zip(layers, computed, part.layers)]
        spans.append((at, at + len(linked)))
        done += len(part.token_ids)
        if progress:
            progress(done, total)
    return Composition(joined_ids([p.token_ids for p in parts], opening, separator), layers, spans)


def _computed_here(engine: Engine, layers: list[LayerKV], token_ids: list[int]) -> list[LayerKV]:
    """The KV of `token_ids` run here after a context of `layers`: pre-RoPE, `[H, len(token_ids), D]`."""
    sequence = engine.sequence()
    for index, (key, value) in enumerate(layers):
        engine.inject(sequence, index, engine.place(key, value))
    engine.prefill(sequence, token_ids)
    return [_arrays(layer) for layer in engine.context_layers(sequence, start=sequence.length - len(token_ids))]


def _joined(before: LayerKV, here: LayerKV, own: LayerKV, keep: int) -> LayerKV:
    """One layer: what precedes, the tokens computed here, and the part's own KV from `keep` on."""
    return tuple(np.concatenate([a, b, c[:, keep:]], axis=1) for a, b, c in zip(before, here, own))


def _arrays(layer: LayerKV) -> tuple[np.ndarray, np.ndarray]:
    key, value = layer
    return np.asarray(key, dtype=np.float32), np.asarray(value, dtype=np.float32)


def _common_prefix(ids: list[int], opening: list[int]) -> int:
    count = 0
    for a, b in zip(ids, opening):
        if a != b:
            break
        count += 1
    return count


class _Arrays:
    """An engine stand-in for `LayerFeed`: a layer comes back as decoded, pre-RoPE arrays, not placed."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.decode_threads = engine.decode_threads

    @property
    def geometry(self) -> Geometry:
        return self.engine.geometry

    def reserve(self, tokens: int) -> None:
        pass

    def after_load(self, callback) -> bool:
        return self.engine.after_load(callback)

    def place(self, key, value) -> LayerKV:
        return np.asarray(key, dtype=np.float32), np.asarray(value, dtype=np.float32)


def read_parts(loaded: LoadedModel, readers: list[ArtifactReader], timelines: list[Timeline],
               link: Link | None = None) -> list[Part]:
    """Every artifact fetched, verified and decoded at once, each on its own feed and timeline (an
    emulated `link` shared by them all)."""
    raw = _Arrays(loaded.engine)
    feeds = []
    try:
        for reader, timeline in zip(readers, timelines, strict=True):
            feeds.append(LayerFeed(raw, StreamedReader(reader, timeline, link), timeline))
        parts = []
        for reader, feed in zip(readers, feeds):
            feed.check(loaded.engine)
            parts.append(Part(reader.source, feed.token_ids, [feed.wait(i) for i in range(loaded.engine.geometry.layers)]))
        return parts
    finally:
        for feed in feeds:
            feed.close()


def context_from_readers(loaded: LoadedModel, readers: list[ArtifactReader], *, link_tokens: int = DEFAULT_LINK,
                         recompute_last: int = 0, link: Link | None = None,
                         progress: TokenProgress | None = None) -> Context:
    """The artifacts composed into one context on the engine, at least its last `recompute_last` tokens
    prefilled here."""
    for reader in readers:
        check_space(reader, loaded)
    loaded.engine.reserve(check_parts([Declared.of(r) for r in readers], loaded))
    started = time.perf_counter()
    timelines = [Timeline() for _ in readers]
    parts = read_parts(loaded, readers, timelines, link)
    framing = readers[0].manifest.framing
    begun = time.perf_counter()
    composed = compose(loaded.engine, parts, opening_ids(loaded.tokenizer, framing), separator_ids(loaded.tokenizer),
                       link_tokens, progress)
    linked_s = time.perf_counter() - begun
    ids = composed.token_ids
    kept = len(ids) - min(recompute_last, len(ids) - 1)
    sequence = loaded.engine.sequence()
    for index, (key, value) in enumerate(composed.layers):
        loaded.engine.inject(sequence, index, loaded.engine.place(key[:, :kept], value[:, :kept]))
    begun = time.perf_counter()
    if kept < len(ids):
        loaded.engine.prefill(sequence, ids[kept:])
    stats = DecodeStats(path="composed", context_tokens=len(ids), recomputed_tokens=composed.recomputed(kept) + len(ids) - kept,
                        context_prefill_s=linked_s + time.perf_counter() - begun,
                        artifact_bytes=sum(r.manifest.blob_bytes() for r in readers),
                        cloud_prefill_s=sum(r.timings.prefill_s or 0.0 for r in readers),
                        t_com_c_s=sum(r.timings.cloud_s for r in readers))
    stats.load_s = time.perf_counter() - started - stats.context_prefill_s
    stats.t_comm_s, stats.link = Timeline.merged(timelines).comm_s, link.label if link else None
    return Context(ids, sequence, framing, stats, started)
