"""Context text -> KV artifact: prefill the context in chunks, un-rotate the keys, cut into blocks."""

from __future__ import annotations

import time
from typing import Callable

import torch

from celslm import kvcache
from celslm.artifact import Artifact, build_artifact
from celslm.errors import UsageError
from celslm.models import LoadedModel

# Called with (tokens done, tokens total).
TokenProgress = Callable[[int, int], None]


def prefill_cache(loaded: LoadedModel, token_ids: list[int], step: int = 256, progress: TokenProgress | None = None,
                  cache=None, begin: int = 0):
    """Run the context through the model `step` tokens at a time; return the filled cache.

    With `cache` holding the first `begin` tokens already, only the rest is run (a cached prefix)."""
    cache = cache if cache is not None else kvcache.new_cache(loaded.model)
    for start in range(begin, len(token_ids), step):
        kvcache.forward(loaded.model, token_ids[start : start + step], cache, start)
        if progress:
            progress(min(start + step, len(token_ids)), len(token_ids))
    return cache


def pre_rope_layers(loaded: LoadedModel, cache) -> list[kvcache.LayerKV]:
    """Per layer (key pre-RoPE `[H, T, D]`, value `[H, T, D]`) from a filled cache."""
    layers = kvcache.cache_layers(cache)
    cos, sin = kvcache.rope_tables(loaded.model, 0, layers[0][0].shape[1])
    return [(kvcache.unapply_rope(key, cos, sin), value) for key, value in layers]


def prefill(
    loaded: LoadedModel,
    token_ids: list[int],
    *,
    framing: str,
    chunk_size: int = 256,
    dtype: str = "float32",
    progress: TokenProgress | None = None,
) -> Artifact:
    """Compute a native artifact: the model's own KV over `token_ids`, in its own model space."""
    if not token_ids:
        raise UsageError("the context is empty; nothing to prefill")
    started = time.perf_counter()
    with torch.inference_mode():
        cache = prefill_cache(loaded, token_ids, chunk_size, progress)
        layers = pre_rope_layers(loaded, cache)
    prefill_s = time.perf_counter() - started
    return build_artifact(
        space=loaded.space,
        producer={"model": loaded.name, "fingerprint": loaded.fingerprint, "alignment": None},
        token_ids=token_ids,
        layers=layers,
        chunk_size=chunk_size,
        dtype=dtype,
        framing=framing,
        provenance=["native"] * len(layers),
        timings={"prefill_s": round(prefill_s, 6)},
    )
