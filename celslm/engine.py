"""The forward pass behind one small interface, so that decode, score, prefill and bench run on any engine.

An `Engine` runs one model. A `Sequence` is one token sequence's KV cache on it, opaque to callers,
filled from position 0 on by `prefill` (context tokens), `inject` (a context's KV from an artifact)
and `evaluate` (prompt and generated tokens, returning logits). Keys cross this interface pre-RoPE
`[H, T, D]`, values `[H, T, D]`, as artifacts hold them: `place` puts a layer into the engine's own
form (rotated by its RoPE convention, cast to its cache type), so artifacts stay engine-neutral.

transformers is the engine today (`kvcache.TransformersEngine`, the reference); llama.cpp comes next
behind the same calls. Alignment and its measurements stay on transformers (`kvcache`, `features`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable

import torch

from celslm.artifact import Geometry

LayerKV = tuple[torch.Tensor, torch.Tensor]  # (key [H, T, D], value [H, T, D])
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

    @property
    def geometry(self) -> Geometry:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def sequence(self) -> Sequence:
        """An empty sequence."""
        raise NotImplementedError

    def prefill(self, seq: Sequence, token_ids: list[int], step: int = 256, progress: TokenProgress | None = None) -> None:
        """Append `token_ids` (no logits kept), `step` tokens at a time."""
        raise NotImplementedError

    def evaluate(self, seq: Sequence, token_ids: list[int], logits_to_keep: int = 1) -> torch.Tensor:
        """Append `token_ids` and return the logits of the last `logits_to_keep` of them, `[n, V]` fp32."""
        raise NotImplementedError

    def place(self, key: torch.Tensor, value: torch.Tensor) -> object:
        """A context layer's pre-RoPE key and value `[H, T, D]` (positions 0..T-1) in this engine's form;
        thread-safe, so a feed thread can do it while the engine computes."""
        raise NotImplementedError

    def inject(self, seq: Sequence, layer: int, placed: object) -> None:
        """Put a placed context layer into an empty sequence; layers go in order, 0 first."""
        raise NotImplementedError

    def gated(self, seq: Sequence, fetch: LayerFetch, on_compute: ComputeSpan | None = None) -> AbstractContextManager:
        """While active, the next `evaluate` pulls layer l from `fetch(l)` just before it runs layer l."""
        raise NotImplementedError(f"the {self.name} engine cannot run a layer before the next one is in")

    def crop(self, seq: Sequence, length: int) -> None:
        """Forget every position from `length` on."""
        raise NotImplementedError

    def context_layers(self, seq: Sequence) -> list[LayerKV]:
        """The sequence's KV per layer, keys pre-RoPE, `[H, T, D]` fp32: what an artifact holds."""
        raise NotImplementedError
