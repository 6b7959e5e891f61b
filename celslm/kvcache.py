"""The only module that touches transformers' internals: its Cache API (it changes between releases),
the decoder's layer list, hooks on layer inputs and projections, and RoPE.

Tensors handed in and out are per layer, without the batch dimension: keys and values `[H, T, D]`
(H = KV heads, T = tokens, D = head dim). Artifacts hold keys *pre-RoPE*; a cache holds them rotated
to their positions, as the model's attention expects.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from transformers import DynamicCache

from celslm.manifest import Geometry
from celslm.errors import UsageError
from celslm.engine import ComputeSpan, Engine, LayerFetch, LayerKV, Sequence, TokenProgress


def new_cache(model) -> DynamicCache:
    """An empty cache; a forward call appends to it in place, so build a fresh one per run."""
    return DynamicCache(config=model.config)


def inject(cache: DynamicCache, index: int, key: torch.Tensor, value: torch.Tensor) -> None:
    """Put layer `index`'s post-RoPE key and value `[H, T, D]` into the cache (layers go in order)."""
    cache.update(key.unsqueeze(0), value.unsqueeze(0), index)


def cache_layers(cache: DynamicCache, count: int | None = None) -> list[LayerKV]:
    """The cache's post-RoPE keys and values per layer (its first `count`), batch dimension dropped."""
    return [(layer.keys[0], layer.values[0]) for layer in cache.layers[:count]]


def cache_length(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def crop(cache: DynamicCache, length: int) -> None:
    """Drop every cached position from `length` on, in place."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)  # transformers 5.x: a negative count removes that many trailing positions


@torch.inference_mode()
def forward(model, token_ids: list[int], cache: DynamicCache, start: int, logits_to_keep: int = 1) -> torch.Tensor:
    """Run `token_ids` at positions start.. over `cache` (appended in place); logits `[logits_to_keep, V]`."""
    ids = torch.tensor([token_ids], dtype=torch.long)  # [1, q]
    positions = torch.arange(start, start + len(token_ids)).unsqueeze(0)  # [1, q]
    out = model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True,
                logits_to_keep=logits_to_keep)
    return out.logits[0].float()


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.model.layers


@torch.inference_mode()
def fill(model, token_ids: list[int], step: int = 256, progress: TokenProgress | None = None,
         cache: DynamicCache | None = None, depth: int | None = None) -> DynamicCache:
    """Run `token_ids` through the model `step` tokens at a time, after what `cache` holds (positions
    continue from its length); return the filled cache.

    With `depth`, only the first `depth` decoder layers run: a layer's KV depends on the layers below
    it alone, so their KV is exact and the rest is never computed."""
    cache = cache if cache is not None else new_cache(model)
    decoder = model.model
    every = decoder.layers
    if depth is not None:
        decoder.layers = torch.nn.ModuleList(every[:depth])
    begin = cache_length(cache)
    try:
        for start in range(0, len(token_ids), step):
            forward(model, token_ids[start : start + step], cache, begin + start)
            if progress:
                progress(min(start + step, len(token_ids)), len(token_ids))
    finally:
        decoder.layers = every
    return cache


def pre_rope_layers(model, cache: DynamicCache, count: int | None = None, start: int = 0) -> list[LayerKV]:
    """Per layer (key pre-RoPE `[H, T, D]`, value `[H, T, D]`) from a filled cache (its first `count`
    layers; its positions from `start` on)."""
    layers = cache_layers(cache, count)
    cos, sin = rope_tables(model, start, layers[0][0].shape[1] - start)
    return [(unapply_rope(key[:, start:], cos, sin), value[:, start:]) for key, value in layers]


@torch.inference_mode()
def fill_capturing(model, token_ids: list[int], step: int = 256, queries: bool = False
                   ) -> tuple[DynamicCache, list[torch.Tensor], list[torch.Tensor]]:
    """`fill`, keeping each decoder layer's normed input `[T, hidden]` and, with `queries`, its pre-RoPE
    attention queries `[T, Hq*D]` (empty lists otherwise)."""
    layers = decoder_layers(model)
    normed: list[list[torch.Tensor]] = [[] for _ in layers]
    query_parts: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.input_layernorm.register_forward_hook(lambda m, args, out, i=i: normed[i].append(out[0].float()))
             for i, layer in enumerate(layers)]
    if queries:
        hooks += [layer.self_attn.q_proj.register_forward_hook(lambda m, args, out, i=i: query_parts[i].append(out[0].float()))
                  for i, layer in enumerate(layers)]
    try:
        cache = fill(model, token_ids, step)
    finally:
        for hook in hooks:
            hook.remove()
    return cache, [torch.cat(parts) for parts in normed], [torch.cat(parts) for parts in query_parts] if queries else []


def output_projection(model, layer: int) -> torch.Tensor:
    """Layer `layer`'s attention output projection `[hidden, Hq*D]`: how each query head's output enters the
    residual stream (calibrate.py weighs value errors by it)."""
    return decoder_layers(model)[layer].self_attn.o_proj.weight


def attention_output(model, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Layer `layer`'s attention output after `o_proj` `[P, hidden]`, for pre-RoPE queries `[T, Hq*D]` at
    `positions` `[P]` over pre-RoPE keys and values `[Hk, T, D]` (causal). Differentiable in key and value."""
    attn = decoder_layers(model)[layer].self_attn
    head_dim = attn.head_dim
    q = query[positions].reshape(len(positions), -1, head_dim).transpose(0, 1)  # [Hq, P, D]
    q = apply_rope(q, cos[positions], sin[positions])
    groups = q.shape[0] // key.shape[0]
    k = apply_rope(key, cos[: key.shape[1]], sin[: key.shape[1]]).repeat_interleave(groups, 0)  # [Hq, T, D]
    v = value.repeat_interleave(groups, 0)
    mask = torch.arange(key.shape[1])[None, :] <= positions[:, None]  # [P, T]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
    return out.transpose(0, 1).reshape(len(positions), -1) @ attn.o_proj.weight.T


class LayerGate:
    """While active, each decoder layer l first pulls its context KV from `fetch(l)` into the cache.

    The prompt's forward pass thus runs layer l as soon as layer l's KV exists, while later layers
    are still arriving. Layer 0 is injected on entry: the attention mask is sized from it."""

    def __init__(self, model, cache: DynamicCache, fetch, on_compute=None):
        self.model, self.cache, self.fetch = model, cache, fetch
        self.on_compute = on_compute  # called with (start, end) of each stretch of compute between waits
        self._handles = []
        self._resumed = 0.0

    def _inject(self, index: int) -> None:
        paused = time.perf_counter()
        if self.on_compute and self._resumed:
            self.on_compute(self._resumed, paused)
        key, value = self.fetch(index)  # [H, T, D] each, post-RoPE
        inject(self.cache, index, key, value)
        self._resumed = time.perf_counter()

    def __enter__(self) -> "LayerGate":
        layers = decoder_layers(self.model)
        self._inject(0)
        for index in range(1, len(layers)):
            self._handles.append(layers[index].register_forward_pre_hook(lambda module, args, i=index: self._inject(i)))
        return self

    def __exit__(self, *exc) -> None:
        if self.on_compute and self._resumed:
            self.on_compute(self._resumed, time.perf_counter())
        for handle in self._handles:
            handle.remove()


# ---------------------------------------------------------------- RoPE


def kv_geometry(model) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a model's attention cache."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers, kv_heads, head_dim


def _rotary(model):
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None:
        raise ValueError(f"{type(model).__name__} has no shared rotary embedding; only RoPE models are supported")
    return rotary


@torch.inference_mode()
def rope_tables(model, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `[T, D]` for positions start..start+length, computed by the model's own rotary module."""
    positions = torch.arange(start, start + length).unsqueeze(0)  # [1, T]
    probe = torch.zeros(1, dtype=torch.float32)
    cos, sin = _rotary(model)(probe, positions)  # [1, T, D]
    return cos[0], sin[0]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pre-RoPE keys `[H, T, D]` to their positions: the model's own formula, `key * cos +
    rotate_half(key) * sin`, bit for bit (x0*c + (-x1)*s is x0*c - x1*s), without rotate_half's copy."""
    half = key.shape[-1] // 2
    out = key * cos
    out[..., :half] -= key[..., half:] * sin[..., :half]
    out[..., half:] += key[..., :half] * sin[..., half:]
    return out


def unapply_rope(key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of `apply_rope`: cos and sin repeat over the two halves, so rotating by -θ undoes it.

    Scaled RoPE variants multiply cos and sin by one factor s; dividing by s² keeps the inverse exact.
    """
    scale = (cos[..., :1] ** 2 + sin[..., :1] ** 2)  # s², [T, 1]
    return (key * cos - _rotate_half(key) * sin) / scale


# ---------------------------------------------------------------- transformers' quantized cache (a benchmark peer)


def quantized_cache(model, backend: str, nbits: int, group: int):
    """transformers' own QuantizedCache, as its users configure it."""
    from transformers import QuantizedCache

    return QuantizedCache(backend=backend, config=model.config, nbits=nbits, q_group_size=group)


def quantized_cache_bytes(cache) -> int:
    """Bytes the quantized cache actually holds (packed data, scales, shifts, residual), all layers."""

    def nbytes(obj) -> int:
        if type(obj) is torch.Tensor:
            return obj.numel() * obj.element_size()
        return sum(nbytes(v) for v in vars(obj).values() if isinstance(v, torch.Tensor)) if hasattr(obj, "__dict__") else 0

    total = 0
    for layer in cache.layers:
        for part in (layer._quantized_keys, layer._quantized_values, layer.keys, layer.values):
            if part is not None:
                total += nbytes(part)
    return total


# ---------------------------------------------------------------- the engine


class TransformersSequence(Sequence):
    def __init__(self, cache):
        self.cache = cache

    @property
    def length(self) -> int:
        return cache_length(self.cache)


class TransformersEngine(Engine):
    """A transformers causal LM in fp32: the reference engine."""

    name = "transformers"
    pipelines = True

    def __init__(self, model):
        self.model = model
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # context length -> (cos, sin) `[T, D]`

    @property
    def geometry(self) -> Geometry:
        return Geometry(*kv_geometry(self.model))

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def max_positions(self) -> int:
        return getattr(self.model.config, "max_position_embeddings", None) or 1 << 31

    def _check_positions(self, needed: int) -> None:
        if needed > self.max_positions:  # past them a model answers plausible garbage, so refuse
            raise UsageError(f"{needed} positions are more than {self.model.config.model_type} was trained for "
                             f"({self.max_positions})")

    def sequence(self) -> TransformersSequence:
        return TransformersSequence(new_cache(self.model))

    def prefill(self, seq: TransformersSequence, token_ids: list[int], step: int = 256,
                progress: TokenProgress | None = None) -> None:
        self._check_positions(seq.length + len(token_ids))
        fill(self.model, token_ids, step, progress, cache=seq.cache)

    def evaluate(self, seq: TransformersSequence, token_ids: list[int], logits_to_keep: int = 1) -> np.ndarray:
        self._check_positions(seq.length + len(token_ids))
        with torch.inference_mode():
            return forward(self.model, token_ids, seq.cache, seq.length, logits_to_keep).numpy()

    def place(self, key, value) -> LayerKV:
        key, value = torch.as_tensor(key), torch.as_tensor(value)  # numpy arrays from blockread
        length = key.shape[1]
        tables = self._rope.get(length)  # every layer of a context shares its tables
        if tables is None:
            tables = rope_tables(self.model, 0, length)
            self._rope = {length: tables}  # replaced whole, never mutated: safe beside another thread
        cos, sin = tables
        return apply_rope(key, cos, sin), value

    def inject(self, seq: TransformersSequence, layer: int, placed: LayerKV) -> None:
        inject(seq.cache, layer, *placed)

    def gated(self, seq: TransformersSequence, fetch: LayerFetch, on_compute: ComputeSpan | None = None
              ) -> LayerGate:
        return LayerGate(self.model, seq.cache, fetch, on_compute)

    def crop(self, seq: TransformersSequence, length: int) -> None:
        crop(seq.cache, length)

    def context_layers(self, seq: TransformersSequence, start: int = 0) -> list[LayerKV]:
        return pre_rope_layers(self.model, seq.cache, start=start)
