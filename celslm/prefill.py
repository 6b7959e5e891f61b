"""Context token ids -> KV artifact: prefill the context in chunks, un-rotate the keys, cut into blocks.

Native artifacts hold a model's own KV. Cross-model artifacts (`prefill_cross`) hold a small model's
KV projected from a large model's features through an alignment (`celslm.align`), with the small
model's own KV for the first (sink) tokens and, for a hybrid, for its first layers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from celslm import kvcache
from celslm.artifact import Artifact, build_artifact
from celslm.errors import UsageError
from celslm.models import LoadedModel

if TYPE_CHECKING:
    from celslm.align import Alignment

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


def pre_rope_layers(loaded: LoadedModel, cache, count: int | None = None) -> list[kvcache.LayerKV]:
    """Per layer (key pre-RoPE `[H, T, D]`, value `[H, T, D]`) from a filled cache (its first `count` layers)."""
    layers = kvcache.cache_layers(cache, count)
    cos, sin = kvcache.rope_tables(loaded.model, 0, layers[0][0].shape[1])
    return [(kvcache.unapply_rope(key, cos, sin), value) for key, value in layers]


FEATURES = ("hidden", "keys", "values")


@dataclass
class LayerFeatures:
    """One model's features over one token sequence (or sampled rows of several), per layer, `[N, dim]` each."""

    hidden: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    queries: list[torch.Tensor] = field(default_factory=list)  # only when asked for

    def rows(self, index: torch.Tensor) -> "LayerFeatures":
        return LayerFeatures(*[[t[index] for t in getattr(self, f)] for f in FEATURES])

    @staticmethod
    def concat(parts: list["LayerFeatures"]) -> "LayerFeatures":
        return LayerFeatures(*[[torch.cat(ts) for ts in zip(*[getattr(p, f) for p in parts])] for f in FEATURES])


def to_rows(t: torch.Tensor) -> torch.Tensor:
    """Per-head `[H, T, D]` -> one row per token `[T, H*D]` (how features are kept)."""
    return t.permute(1, 0, 2).reshape(t.shape[1], -1)


def to_heads(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of `to_rows`: `[T, H*D]` -> `[H, T, D]`."""
    return rows.reshape(rows.shape[0], heads, -1).permute(1, 0, 2)


@torch.inference_mode()
def layer_features(loaded: LoadedModel, token_ids: list[int], step: int = 256, queries: bool = False) -> LayerFeatures:
    """Run the model over `token_ids` at positions 0..T-1 and keep every layer's features (and with
    `queries`, its pre-RoPE attention queries `[T, Hq*D]`)."""
    layers = loaded.model.model.layers
    normed: list[list[torch.Tensor]] = [[] for _ in layers]
    query_parts: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.input_layernorm.register_forward_hook(lambda m, args, out, i=i: normed[i].append(out[0].float()))
             for i, layer in enumerate(layers)]
    if queries:
        hooks += [layer.self_attn.q_proj.register_forward_hook(lambda m, args, out, i=i: query_parts[i].append(out[0].float()))
                  for i, layer in enumerate(layers)]
    try:
        cache = prefill_cache(loaded, token_ids, step)
    finally:
        for hook in hooks:
            hook.remove()
    kv = pre_rope_layers(loaded, cache)

    return LayerFeatures([torch.cat(parts) for parts in normed], [to_rows(k) for k, _ in kv], [to_rows(v) for _, v in kv],
                         [torch.cat(parts) for parts in query_parts] if queries else [])


def native_layers(loaded: LoadedModel, token_ids: list[int], count: int, step: int = 256) -> list[kvcache.LayerKV]:
    """The model's own pre-RoPE KV of its first `count` layers; only those layers run (a layer's KV
    depends on the layers below it alone)."""
    decoder = loaded.model.model
    every = decoder.layers
    decoder.layers = torch.nn.ModuleList(every[:count])
    try:
        with torch.inference_mode():
            cache = prefill_cache(loaded, token_ids, step)
    finally:
        decoder.layers = every
    return pre_rope_layers(loaded, cache, count)


def cross_layers(llm: LoadedModel, slm: LoadedModel, alignment: "Alignment", token_ids: list[int],
                 native: tuple[int, ...] = (), llm_features: LayerFeatures | None = None) -> list[kvcache.LayerKV]:
    """The SLM's KV over `token_ids`: projected from the LLM, except the sink tokens (always the SLM's own)
    and the layers in `native` (the SLM's own over the whole context)."""
    features = llm_features or layer_features(llm, token_ids)
    _, kv_heads, _ = kvcache.kv_geometry(slm.model)
    layers = alignment.project(features, kv_heads)
    sink = min(alignment.sink_tokens, len(token_ids))
    if sink:
        own = native_layers(slm, token_ids[:sink], len(layers))
        layers = [(torch.cat([ok, k[:, sink:]], 1), torch.cat([ov, v[:, sink:]], 1))
                  for (ok, ov), (k, v) in zip(own, layers)]
    if native:
        own = native_layers(slm, token_ids, max(native) + 1)
        layers = [own[i] if i in native else layer for i, layer in enumerate(layers)]
    return layers


def prefill_cross(
    llm: LoadedModel,
    slm: LoadedModel,
    alignment: "Alignment",
    token_ids: list[int],
    *,
    framing: str,
    native: tuple[int, ...] = (),
    chunk_size: int = 256,
    dtype: str = "float32",
    progress: TokenProgress | None = None,
) -> Artifact:
    """An artifact in the SLM's space, computed by the LLM and projected through `alignment`."""
    if not token_ids:
        raise UsageError("the context is empty; nothing to prefill")
    layer_count = slm.model.config.num_hidden_layers
    if any(not 0 <= i < layer_count for i in native):
        raise UsageError(f"--native-layers must be within 0..{layer_count - 1} ({slm.name} has {layer_count} layers)")
    started = time.perf_counter()
    with torch.inference_mode():
        if progress:
            progress(0, len(token_ids))
        features = layer_features(llm, token_ids)
        prefill_s = time.perf_counter() - started
        layers = cross_layers(llm, slm, alignment, token_ids, native, features)
        if progress:
            progress(len(token_ids), len(token_ids))
    projection_s = time.perf_counter() - started - prefill_s
    return build_artifact(
        space=slm.space,
        producer={"model": llm.name, "fingerprint": llm.fingerprint, "alignment": alignment.digest,
                  "native_layers": sorted(native), "sink_tokens": alignment.sink_tokens},
        token_ids=token_ids,
        layers=layers,
        chunk_size=chunk_size,
        dtype=dtype,
        framing=framing,
        provenance=["native" if i in native else "projected" for i in range(len(layers))],
        timings={"prefill_s": round(prefill_s, 6), "projection_s": round(projection_s, 6)},
    )


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
