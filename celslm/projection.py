"""The alignment as prefill uses it: per small-model (SLM) layer, which large-model (LLM) layer to read
and a linear map from its features to the SLM's pre-RoPE keys and values. `align.py` fits it.

The alignment is a directory: `alignment.json` (fingerprints, layer map, similarities, held-out R²,
per-layer sensitivity, the measured hybrid curve, the maps' digest) and `maps.safetensors`.
Its digest is the sha256 of `alignment.json`, which names the maps file's sha256.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors, save as save_tensors

from celslm import kvcache
from celslm.errors import IntegrityError, OutputExists, UsageError
from celslm.features import LayerFeatures, layer_features, native_layers, to_heads
from celslm.models import LoadedModel, Progress, load_model

FORMAT = "celslm-alignment/1"
SOURCES = ("hidden", "kv")  # what a projection reads from the mapped LLM layer


@dataclass
class Alignment:
    meta: dict  # everything in alignment.json but the maps
    maps: dict[str, torch.Tensor]  # "{layer}.{key|value}.{weight|bias}"
    digest: str = ""

    @property
    def layer_map(self) -> list[int]:
        return self.meta["layer_map"]

    @property
    def source(self) -> str:
        return self.meta["source"]

    @property
    def sink_tokens(self) -> int:
        return self.meta["sink_tokens"]

    def project(self, llm_features: LayerFeatures, kv_heads: int) -> list[kvcache.LayerKV]:
        """The SLM's pre-RoPE keys and values `[H, T, D]` per layer, from the LLM's features."""
        layers = []
        for s, l in enumerate(self.layer_map):
            x = regressor(llm_features, l, self.source)
            out = []
            for part in ("key", "value"):
                y = x @ self.maps[f"{s}.{part}.weight"] + self.maps[f"{s}.{part}.bias"]  # [T, H*D]
                out.append(to_heads(y, kv_heads).contiguous())
            layers.append((out[0], out[1]))
        return layers

    def budget_native_layers(self, budget: float) -> int | None:
        """The fewest leading native layers whose measured perplexity is within `budget` (0.02 = 2%) of
        the SLM's own prefill on held-out calibration text; None if no hybrid is."""
        own = self.meta["heldout"]["own_nll"]
        for k, nll in enumerate(self.meta["heldout"]["hybrid_nll"]):
            if math.exp(nll - own) - 1 <= budget:
                return k
        return None


def load_aligned_models(alignment: Alignment, llm: LoadedModel, slm_spec: str | None = None,
                        progress: Progress | None = None) -> LoadedModel:
    """Check `llm` is the alignment's large model; load and check its small model."""
    meta = alignment.meta
    if llm.fingerprint != meta["llm"]["fingerprint"]:
        raise UsageError(f"the alignment maps from {meta['llm']['name']} ({meta['llm']['fingerprint'][:12]}), "
                         f"not from {llm.name} ({llm.fingerprint[:12]})")
    folder = meta["slm"].get("folder")
    spec = slm_spec or (folder if folder and Path(folder).is_dir() else meta["slm"]["name"])
    slm = load_model(spec, progress)
    if slm.fingerprint != meta["slm"]["fingerprint"]:
        raise UsageError(f"the alignment maps to {meta['slm']['name']} ({meta['slm']['fingerprint'][:12]}), "
                         f"but {spec} loads {slm.fingerprint[:12]}; load the small model it names")
    return slm


def regressor(features: LayerFeatures, layer: int, source: str) -> torch.Tensor:
    """What a projection reads from LLM layer `layer`: its normed hidden state, or its keys and values."""
    if source == "hidden":
        return features.hidden[layer]
    return torch.cat([features.keys[layer], features.values[layer]], dim=1)


def save_alignment(alignment: Alignment, out: Path, force: bool = False) -> str:
    """Write the directory atomically (temp dir + rename); returns the alignment's digest."""
    out = Path(out)
    if out.exists():
        if not (out / "alignment.json").is_file():
            raise UsageError(f"{out} exists and is not an alignment; refusing to replace it")
        if not force:
            raise OutputExists(f"{out} already exists")
    maps_bytes = save_tensors(alignment.maps)
    meta = dict(alignment.meta, format=FORMAT,
                maps={"file": "maps.safetensors", "sha256": hashlib.sha256(maps_bytes).hexdigest()})
    meta_bytes = (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode()
    staging = out.with_name(f".{out.name}.tmp-{random.getrandbits(32):08x}")
    staging.mkdir(parents=True)
    (staging / "maps.safetensors").write_bytes(maps_bytes)
    (staging / "alignment.json").write_bytes(meta_bytes)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{random.getrandbits(32):08x}")
        out.rename(old)
        staging.rename(out)
        for child in old.iterdir():
            child.unlink()
        old.rmdir()
    else:
        staging.rename(out)
    alignment.meta, alignment.digest = meta, hashlib.sha256(meta_bytes).hexdigest()
    return alignment.digest


def load_alignment(path: str | Path) -> Alignment:
    """Read an alignment directory, checking the maps against the digest the JSON names."""
    path = Path(path)
    try:
        meta_bytes = (path / "alignment.json").read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: not an alignment directory (no alignment.json); make one with celslm align") from exc
    meta = json.loads(meta_bytes)
    if meta.get("format") != FORMAT:
        raise UsageError(f"{path}: alignment format {meta.get('format')!r}, expected {FORMAT}")
    try:
        maps_bytes = (path / meta["maps"]["file"]).read_bytes()
    except OSError as exc:
        raise IntegrityError(f"{path}: alignment maps file missing ({exc.strerror})") from exc
    if hashlib.sha256(maps_bytes).hexdigest() != meta["maps"]["sha256"]:
        raise IntegrityError(f"{path}: maps.safetensors does not match the digest in alignment.json")
    return Alignment(meta, load_tensors(maps_bytes), hashlib.sha256(meta_bytes).hexdigest())



def cross_layers(llm: LoadedModel | None, slm: LoadedModel, alignment: Alignment, token_ids: list[int],
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
