"""Layer features of one model over one token sequence: what alignment compares and projections read.

Per layer, rows of `[N, dim]`:
  hidden  the hidden state entering the layer, after the layer's input norm  [N, hidden]
  keys    pre-RoPE keys, heads concatenated                                  [N, H*D]
  values  values, heads concatenated                                         [N, H*D]
  queries pre-RoPE attention queries, heads concatenated (only when asked)  [N, Hq*D]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from celslm import kvcache
from celslm.models import LoadedModel

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


def layer_features(loaded: LoadedModel, token_ids: list[int], step: int = 256, queries: bool = False) -> LayerFeatures:
    """Run the model over `token_ids` at positions 0..T-1 and keep every layer's features (and with
    `queries`, its pre-RoPE attention queries `[T, Hq*D]`)."""
    cache, hidden, query_rows = kvcache.fill_capturing(loaded.model, token_ids, step, queries)
    kv = kvcache.pre_rope_layers(loaded.model, cache)
    return LayerFeatures(hidden, [to_rows(k) for k, _ in kv], [to_rows(v) for _, v in kv], query_rows)


def native_layers(loaded: LoadedModel, token_ids: list[int], count: int, step: int = 256) -> list[kvcache.LayerKV]:
    """The model's own pre-RoPE KV of its first `count` layers; only those layers run."""
    cache = kvcache.fill(loaded.model, token_ids, step, depth=count)
    return kvcache.pre_rope_layers(loaded.model, cache, count)
