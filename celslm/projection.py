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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors, save as save_tensors

from celslm import kvcache
from celslm.errors import IntegrityError, OutputExists, UsageError
from celslm.features import LayerFeatures, layer_features, native_layers, to_heads
from celslm.models import LoadedModel, Progress, load_model

FORMAT = "celslm-alignment/1"
SOURCES = ("hidden", "kv")  # what a projection reads from the mapped LLM layer


@dataclass(frozen=True)
class AlignedModel:
    """One side of an alignment: which model, by fingerprint, and how deep it is."""

    name: str
    fingerprint: str
    layers: int
    folder: str | None = None  # where the small model was loaded from, to load it again

    def to_json(self) -> dict:
        return {"name": self.name, "fingerprint": self.fingerprint, "layers": self.layers,
                **({"folder": self.folder} if self.folder is not None else {})}

    @classmethod
    def from_json(cls, obj: dict) -> AlignedModel:
        return cls(str(obj["name"]), str(obj["fingerprint"]), int(obj["layers"]),
                   None if obj.get("folder") is None else str(obj["folder"]))


SPLIT_TOKENS = (32, 64, 128, 256)  # token splits align measures: the edge prefills the context's last N itself
KNEE = 0.05  # the advised split is the fewest own tokens within this share of the context's gain of the best split


def gain_kept(nll: float, own: float, no_context: float) -> float:
    """Share of the context's benefit kept: 1 = as good as own prefill, 0 = as bad as no context."""
    return (no_context - nll) / (no_context - own) if no_context != own else float("nan")


@dataclass(frozen=True)
class HeldOut:
    """Mean NLL on the held-out calibration windows: the SLM's own prefill, no context (sink tokens
    only), every hybrid (first k layers native, k = 0..L), each layer projected alone (Δ NLL), and
    each token split (every layer projected but the context's last N tokens, the SLM's own: N -> NLL)."""

    windows: int
    own_nll: float
    no_context_nll: float
    hybrid_nll: tuple[float, ...]
    sensitivity: tuple[float, ...]
    split_nll: dict[int, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"windows": self.windows, "own_nll": self.own_nll, "no_context_nll": self.no_context_nll,
                "hybrid_nll": list(self.hybrid_nll), "sensitivity": list(self.sensitivity),
                **({"split_nll": {str(n): v for n, v in self.split_nll.items()}} if self.split_nll else {})}

    @classmethod
    def from_json(cls, obj: dict) -> HeldOut:
        return cls(int(obj["windows"]), float(obj["own_nll"]), float(obj["no_context_nll"]),
                   tuple(float(v) for v in obj["hybrid_nll"]), tuple(float(v) for v in obj["sensitivity"]),
                   {int(n): float(v) for n, v in obj.get("split_nll", {}).items()})

    def advised_split(self) -> int:
        """How many of the context's last tokens the edge should prefill itself over a cross-model
        artifact, read off the measured gain curve: the fewest (0 = none) whose gain kept is within
        `KNEE` of the best any measured split reaches."""
        if not self.split_nll or not self.hybrid_nll:
            return 0
        curve = [(0, self.hybrid_nll[0])] + sorted(self.split_nll.items())
        kept = [(n, gain_kept(nll, self.own_nll, self.no_context_nll)) for n, nll in curve]
        best = max(share for _, share in kept)
        return next(n for n, share in kept if share >= best - KNEE)


@dataclass(frozen=True)
class Alignment:
    llm: AlignedModel
    slm: AlignedModel
    tokenizer: str  # digest of the vocabulary both models share
    source: str  # what the maps read from the mapped LLM layer: "hidden" or "kv"
    map_method: str
    layer_map: tuple[int, ...]  # per SLM layer, the LLM layer it reads
    sink_tokens: int  # the first tokens of a context are always the SLM's own
    maps: dict[str, torch.Tensor]  # "{layer}.{key|value}.{weight|bias}"
    heldout: HeldOut | None = None
    # What alignment.json records for people and plots (similarity, r2, lambda, calibration, refine,
    # seconds): measurements, never read to project.
    report: dict = field(default_factory=dict)
    digest: str = ""  # sha256 of alignment.json, once written or read

    def to_json(self) -> dict:
        """Everything alignment.json holds but the maps' file entry."""
        return {**self.report, "llm": self.llm.to_json(), "slm": self.slm.to_json(), "tokenizer": self.tokenizer,
                "source": self.source, "map_method": self.map_method, "layer_map": list(self.layer_map),
                "sink_tokens": self.sink_tokens, **({"heldout": self.heldout.to_json()} if self.heldout else {})}

    @classmethod
    def from_json(cls, obj: dict, maps: dict[str, torch.Tensor], digest: str) -> Alignment:
        known = {"llm", "slm", "tokenizer", "source", "map_method", "layer_map", "sink_tokens", "heldout", "format", "maps"}
        return cls(AlignedModel.from_json(obj["llm"]), AlignedModel.from_json(obj["slm"]), str(obj["tokenizer"]),
                   str(obj["source"]), str(obj["map_method"]), tuple(int(l) for l in obj["layer_map"]),
                   int(obj["sink_tokens"]), maps, HeldOut.from_json(obj["heldout"]) if obj.get("heldout") else None,
                   {k: v for k, v in obj.items() if k not in known}, digest)

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
        if self.heldout is None:
            return None
        own = self.heldout.own_nll
        for k, nll in enumerate(self.heldout.hybrid_nll):
            if math.exp(nll - own) - 1 <= budget:
                return k
        return None


def load_aligned_models(alignment: Alignment, llm: LoadedModel, slm_spec: str | None = None,
                        progress: Progress | None = None) -> LoadedModel:
    """Check `llm` is the alignment's large model; load and check its small model."""
    large, small = alignment.llm, alignment.slm
    if llm.fingerprint != large.fingerprint:
        raise UsageError(f"the alignment maps from {large.name} ({large.fingerprint[:12]}), "
                         f"not from {llm.name} ({llm.fingerprint[:12]})")
    spec = small_spec(alignment, slm_spec)
    slm = load_model(spec, progress)
    if slm.fingerprint != small.fingerprint:
        raise UsageError(f"the alignment maps to {small.name} ({small.fingerprint[:12]}), "
                         f"but {spec} loads {slm.fingerprint[:12]}; load the small model it names")
    return slm


def small_spec(alignment: Alignment, slm_spec: str | None = None) -> str:
    """Where the alignment's small model loads from: `slm_spec`, else the folder it names, else its name."""
    small = alignment.slm
    return slm_spec or (small.folder if small.folder and Path(small.folder).is_dir() else small.name)


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
    meta = dict(alignment.to_json(), format=FORMAT,
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
    return hashlib.sha256(meta_bytes).hexdigest()


def load_alignment(path: str | Path) -> Alignment:
    """Read an alignment directory, checking the maps against the digest the JSON names."""
    path = Path(path)
    try:
        meta_bytes = (path / "alignment.json").read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: not an alignment directory (no alignment.json); make one with celslm align") from exc
    try:
        meta = json.loads(meta_bytes)
        found = meta.get("format") if isinstance(meta, dict) else None
    except ValueError as exc:
        raise IntegrityError(f"{path}: alignment.json is not valid JSON ({exc})") from exc
    if found != FORMAT:
        raise UsageError(f"{path}: alignment format {found!r}, expected {FORMAT}")
    try:
        maps_bytes = (path / Path(str(meta["maps"]["file"])).name).read_bytes()
        if hashlib.sha256(maps_bytes).hexdigest() != meta["maps"]["sha256"]:
            raise IntegrityError(f"{path}: maps.safetensors does not match the digest in alignment.json")
        return Alignment.from_json(meta, load_tensors(maps_bytes), hashlib.sha256(meta_bytes).hexdigest())
    except OSError as exc:
        raise IntegrityError(f"{path}: alignment maps file missing ({exc.strerror})") from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"{path}: malformed alignment ({type(exc).__name__}: {exc})") from exc



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
