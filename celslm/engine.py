"""The forward pass behind one small interface, so that decode, score, prefill and bench run on any engine.

An `Engine` runs one model. A `Sequence` is one token sequence's KV cache on it, opaque to callers,
filled from position 0 on by `prefill` (context tokens), `inject` (a context's KV from an artifact)
and `evaluate` (prompt and generated tokens, returning logits, numpy float32). Keys cross this
interface pre-RoPE `[H, T, D]`, values `[H, T, D]`, as artifacts hold them (numpy arrays or torch
tensors): `place` puts a layer into the engine's own form (rotated by its RoPE convention, cast to
its cache type), so artifacts stay engine-neutral.

Two engines: `kvcache.TransformersEngine` (fp32 transformers, the reference; alignment and its
measurements stay there) and `llamacpp.LlamaEngine` (the GGUF as it is, through llama-cpp-python; the
edge's default). This module imports neither torch nor numpy, so an edge on llama.cpp never loads torch.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable

from celslm.manifest import Geometry

LayerKV = tuple[Any, Any]  # (key [H, T, D], value [H, T, D]): numpy arrays or torch tensors
TokenProgress = Callable[[int, int], None]  # called with (tokens done, tokens total)
# fetch(layer) -> that layer as `place` returned it; on_compute(start, end) records a stretch of compute
LayerFetch = Callable[[int], object]
ComputeSpan = Callable[[float, float], None]


class Sequence:
    """One token sequence's KV cache on an engine; `length` positions (0..length-1) are filled."""

    @property
    def length(self) -> int:
        raise NotImplementedError


class Engine:
    name = "engine"
    pipelines = False  # True: `gated` runs the prompt's layer l as soon as layer l's KV is in
    decode_threads = 1  # threads that decode an artifact's layers at once (`stream.LayerFeed`)
    loaded_at = 0.0  # perf_counter when the model was in (an engine that loads in the background sets it)

    @property
    def geometry(self) -> Geometry:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def max_positions(self) -> int:
        """The most positions (context + prompt + answer) the model was trained for."""
        raise NotImplementedError

    def sequence(self) -> Sequence:
        """An empty sequence."""
        raise NotImplementedError

    def prefill(self, seq: Sequence, token_ids: list[int], step: int = 256, progress: TokenProgress | None = None) -> None:
        """Append `token_ids` (no logits kept), `step` tokens at a time."""
        raise NotImplementedError

    def evaluate(self, seq: Sequence, token_ids: list[int], logits_to_keep: int = 1) -> Any:
        """Append `token_ids` and return the logits of the last `logits_to_keep` of them: numpy `[n, V]` float32."""
        raise NotImplementedError

    def place(self, key: Any, value: Any) -> object:
        """A context layer's pre-RoPE key and value `[H, T, D]` (positions 0..T-1) in this engine's form;
        thread-safe, so a feed thread can do it while the engine computes."""
        raise NotImplementedError

    def inject(self, seq: Sequence, layer: int, placed: object) -> None:
        """Put a placed context layer into an empty sequence; layers go in order, 0 first."""
        raise NotImplementedError

    def reserve(self, tokens: int) -> None:
        """A hint, before the context's layers arrive: a sequence of about `tokens` positions comes next."""

    def after_load(self, callback: Callable[[], None]) -> bool:
        """Call `callback` once the model is in, if it is still loading (in a thread of its own): True then."""
        return False

    def gated(self, seq: Sequence, fetch: LayerFetch, on_compute: ComputeSpan | None = None) -> AbstractContextManager:
        """While active, the next `evaluate` pulls layer l from `fetch(l)` just before it runs layer l."""
        raise NotImplementedError(f"the {self.name} engine cannot run a layer before the next one is in")

    def crop(self, seq: Sequence, length: int) -> None:
        """Forget every position from `length` on."""
        raise NotImplementedError

    def context_layers(self, seq: Sequence, start: int = 0) -> list[LayerKV]:
        """The sequence's KV per layer, keys pre-RoPE, `[H, T, D]` float32: what an artifact holds (its
        positions from `start` on)."""
        raise NotImplementedError
