"""Fit a model's codebook (`codebook.py`) on calibration text that no evaluation uses, and cache it.

1. Bases, in the metric that attention sees. The model prefills each calibration file; per layer and
   kind, the covariance of pre-RoPE keys and of values across heads (the first `sink` tokens left out:
   they stay fp16, and their outsized keys would skew it). An error in a key matters as much as the
   queries read it: the metric weighs each key channel by the queries' energy in its RoPE pair (the
   rotation averages a pair's two channels). An error in a value reaches the residual stream through
   the output projection: the metric is the heads' W_o^T W_o. The basis is the eigendecomposition of
   the covariance in that metric, so a uniform step spends error where the model looks least.
2. Steps, by measured error. On the probe files, only one layer's keys (or values) are coded at a
   probe step, everything else exact, and the KL divergence of the continuation's predictions from
   the exact ones is that tensor's sensitivity s. The error a tensor adds is about s x step^2 while
   its bits fall as log(step), so equal marginal cost puts step^2 in proportion to 1/s: the unit step
   is the tensor's RMS spread x sqrt(G / s), G the geometric mean of every s (clipped to 1/4..4x).

The cache is `$CELSLM_HOME/codebooks/<model fingerprint>.codebook`. `compress` without one asks its tiers
for the codebook the model's artifacts there were coded with (`GET /v1/codebooks/<fingerprint>`, then
the blob, verified), and calibrates only where none has one.
torch is imported only to calibrate: reading and caching codebooks does not need it.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from celslm.codebook import KINDS, Codebook, Transform
from celslm.codecs import Codec
from celslm.corpus import calibration_files
from celslm.decode import context_from_layers
from celslm.errors import CelslmError, UsageError
from celslm.manifest import Geometry, ModelSpace, codebook_bound
from celslm.models import LoadedModel, celslm_home
from celslm.score import continuation_logits, kl
from celslm.store.tiers import Sources

Progress = Callable[[str, int, int], None]
CLIP = 4.0  # a unit step stays within 1/CLIP..CLIP of the tensor's RMS spread


@dataclass(frozen=True)
class Calibration:
    files: int = 16  # calibration files prefilled for the bases
    tokens: int = 1024  # context tokens per file
    probe_files: int = 2  # of those, files whose continuations measure each tensor's sensitivity
    probe_tokens: int = 64  # continuation tokens scored per probe
    probe_q: float = 1.0  # the probe's step, in units of the tensor's RMS spread
    sink: int = 4  # leading tokens left out of the fit (the codec keeps them fp16)


def calibrate(loaded: LoadedModel, settings: Calibration = Calibration(), progress: Progress | None = None) -> Codebook:
    import torch  # the torch side: the model's queries and output projections

    from celslm import kvcache
    from celslm.features import layer_features, to_heads

    if loaded.model is None:
        raise UsageError("calibration reads the model's queries and output projections: load it with --engine transformers")
    cases = _cases(loaded, settings)
    geometry = loaded.engine.geometry
    sums, energy = None, None
    probes = []
    for index, (name, context, continuation) in enumerate(cases):
        if progress:
            progress("prefill", index, len(cases))
        with torch.inference_mode():
            features = layer_features(loaded, context, queries=True)
        layers = [(to_heads(k, geometry.kv_heads).float().numpy(), to_heads(v, geometry.kv_heads).float().numpy())
                  for k, v in zip(features.keys, features.values)]
        sums = _accumulate(sums, layers, settings.sink)
        energy = _query_energy(energy, [q.float().numpy() for q in features.queries], geometry, settings.sink)
        if len(probes) < settings.probe_files:
            probes.append((context, continuation, layers))
    if progress:
        progress("prefill", len(cases), len(cases))
    metrics = [(_key_metric(e), _value_metric(kvcache.output_projection(loaded.model, layer).detach().float().numpy(),
                                              geometry.kv_heads, geometry.head_dim))
               for layer, e in enumerate(energy)]
    transforms = [tuple(_fit(*moments, metric) for moments, metric in zip(layer, pair))
                  for layer, pair in zip(sums, metrics)]  # [layer] -> (key, value)
    sensitivity = _sensitivity(loaded, transforms, probes, settings, progress)
    units = allocate(np.array([[t.unit for t in pair] for pair in transforms]), sensitivity)
    transforms = tuple(tuple(replace(t, unit=float(u), _cache={}) for t, u in zip(pair, row))
                       for pair, row in zip(transforms, units))
    return Codebook(loaded.name, loaded.space.fingerprint, (geometry.layers, geometry.kv_heads, geometry.head_dim), transforms,
                    {**asdict(settings), "files_used": [name for name, _, _ in cases],
                     "sensitivity_kl": [[round(float(s), 8) for s in row] for row in sensitivity]})


def allocate(rms: np.ndarray, sensitivity: np.ndarray) -> np.ndarray:
    """Unit steps `[L, 2]` from each tensor's RMS spread and measured sensitivity (both `[L, 2]`):
    step^2 in proportion to 1/sensitivity, the geometric-mean tensor keeping its RMS spread."""
    sensitivity = np.maximum(np.asarray(sensitivity, dtype=np.float64), 1e-12)
    mean = math.exp(float(np.log(sensitivity).mean()))
    return np.asarray(rms, dtype=np.float64) * np.clip(np.sqrt(mean / sensitivity), 1 / CLIP, CLIP)


def _cases(loaded: LoadedModel, settings: Calibration) -> list[tuple[str, list[int], list[int]]]:
    tokens = min(settings.tokens, loaded.engine.max_positions - settings.probe_tokens)  # a short-context model
    need = tokens + settings.probe_tokens
    cases = []
    for path in calibration_files(4 * settings.files):
        ids = loaded.tokenizer(path.read_text(errors="replace"), add_special_tokens=True)["input_ids"]
        if len(ids) >= need:
            cases.append((path.name, ids[:tokens], ids[tokens:need]))
        if len(cases) == settings.files:
            break
    if len(cases) < max(1, settings.probe_files):
        raise UsageError(f"only {len(cases)} calibration files hold {need} tokens; ask for fewer tokens")
    return cases


def _accumulate(sums, layers, sink: int):
    """Per layer and kind: [count, sum [F], sum of outer products [F, F]] in float64."""
    if sums is None:
        width = layers[0][0].shape[0] * layers[0][0].shape[2]
        sums = [[[0, np.zeros(width), np.zeros((width, width))] for _ in KINDS] for _ in layers]
    for layer, pair in zip(sums, layers):
        for moments, x in zip(layer, pair):
            heads, tokens, width = x.shape
            flat = x[:, sink:].transpose(0, 2, 1).reshape(heads * width, -1).astype(np.float64)  # [F, t]
            moments[0] += flat.shape[1]
            moments[1] += flat.sum(axis=1)
            moments[2] += flat @ flat.T
    return sums


def _query_energy(energy, queries: list[np.ndarray], geometry, sink: int):
    """Per layer `[F]`: the summed energy of the queries that read each key channel, averaged over its RoPE
    pair (channels d and d + D/2, as transformers rotates them), over the query heads sharing a kv head."""
    heads, width = geometry.kv_heads, geometry.head_dim
    out = []
    for layer, q in enumerate(queries):  # [T, Hq*D]
        q = q[sink:].reshape(q.shape[0] - sink, heads, -1, width)  # [T, H, G, D]: kv head h serves G query heads
        e = (q.astype(np.float64) ** 2).sum(axis=(0, 2))  # [H, D]
        half = width // 2
        e[:, :half] = e[:, half:] = (e[:, :half] + e[:, half:]) / 2
        out.append(e.reshape(-1) + (energy[layer] if energy is not None else 0))
    return out


def _key_metric(energy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(S, S^-1) for keys: diagonal, the square root of the query energy (relative to its mean, floored)."""
    w = energy / max(float(energy.mean()), 1e-30)
    root = np.sqrt(np.maximum(w, 1e-3))
    return np.diag(root), np.diag(1 / root)


def _value_metric(output: np.ndarray, heads: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(S, S^-1) for values: block-diagonal, per kv head the square root of sum over its query heads of
    W_o^T W_o (`output` `[hidden, Hq*D]`), relative to its mean eigenvalue (floored)."""
    groups = output.shape[1] // (heads * width)
    root, inverse = np.zeros((heads * width,) * 2), np.zeros((heads * width,) * 2)
    for h in range(heads):
        block = output[:, h * groups * width : (h + 1) * groups * width].astype(np.float64)
        gram = sum(block[:, g * width : (g + 1) * width].T @ block[:, g * width : (g + 1) * width] for g in range(groups))
        eigvals, eigvecs = np.linalg.eigh(gram)
        eigvals = np.maximum(eigvals / max(float(eigvals.mean()), 1e-30), 1e-3)
        span = slice(h * width, (h + 1) * width)
        root[span, span] = (eigvecs * np.sqrt(eigvals)) @ eigvecs.T
        inverse[span, span] = (eigvecs / np.sqrt(eigvals)) @ eigvecs.T
    return root, inverse


def _fit(count: int, total: np.ndarray, outer: np.ndarray, metric: tuple[np.ndarray, np.ndarray]) -> Transform:
    """Principal components of x in the metric y = S x: read off with S B, rebuilt with S^-1 B."""
    root, inverse = metric
    mean = total / count
    cov = root @ (outer / count - np.outer(mean, mean)) @ root.T
    eigvals, eigvecs = np.linalg.eigh(cov)  # ascending
    eigvals, eigvecs = np.clip(eigvals[::-1], 0, None), eigvecs[:, ::-1]
    # as the codebook stores them (float16), so the probes code as the codec will
    analysis = (root.T @ eigvecs).astype(np.float16).astype(np.float32)
    basis = (inverse @ eigvecs).astype(np.float16).astype(np.float32)
    rms = math.sqrt(max(float(eigvals.mean()), 1e-12))
    return Transform(mean=mean.astype(np.float32), basis=basis, std=np.sqrt(eigvals).astype(np.float32),
                     analysis=analysis, unit=rms)


def _sensitivity(loaded, transforms, probes, settings: Calibration, progress) -> np.ndarray:
    """KL per layer and kind `[L, 2]`, averaged over the probe files."""
    out = np.zeros((len(transforms), len(KINDS)))
    total = len(probes) * out.size
    done = 0
    for context, continuation, layers in probes:
        reference, _ = continuation_logits(loaded, context_from_layers(loaded, context, layers), continuation)
        for layer, pair in enumerate(transforms):
            for index, transform in enumerate(pair):
                if progress:
                    progress("probe", done, total)
                coded = list(layers)
                coded[layer] = _coded(layers[layer], index, transform, settings)
                logits, _ = continuation_logits(loaded, context_from_layers(loaded, context, coded), continuation)
                out[layer, index] += kl(logits, reference) / len(probes)
                done += 1
    if progress:
        progress("probe", total, total)
    return np.maximum(out, 1e-9)


def _coded(pair, index: int, transform: Transform, settings: Calibration):
    x = pair[index]
    heads, _, width = x.shape
    body = transform.decode(transform.encode(x[:, settings.sink:], settings.probe_q), settings.probe_q, heads, width)
    coded = np.concatenate([x[:, : settings.sink], body], axis=1)
    return (coded, pair[1]) if index == 0 else (pair[0], coded)


# ---------------------------------------------------------------- the cache


def codebook_path(fingerprint: str) -> Path:
    return celslm_home() / "codebooks" / f"{fingerprint}.codebook"


def cached_codebook(space: ModelSpace) -> Codebook | None:
    """The cached codebook for `space`'s model, if one was calibrated here."""
    path = codebook_path(space.fingerprint)
    if not path.is_file():
        return None
    return read_codebook(path, space)


def read_codebook(path: Path, space: ModelSpace | None = None) -> Codebook:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read codebook {path}: {exc.strerror}") from exc
    codebook = Codebook.from_bytes(data, str(path))
    if space is not None and codebook.fingerprint != space.fingerprint:
        raise UsageError(f"{path} is the {codebook.describe()}, not for {space.name} "
                         f"(fingerprint {space.fingerprint[:12]})")
    return codebook


def save_codebook(codebook: Codebook, path: Path) -> None:
    """Write atomically: the file is complete or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(codebook.to_bytes())
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def model_codebook(loaded: LoadedModel, settings: Calibration = Calibration(), progress: Progress | None = None) -> Codebook:
    """The model's codebook: from the cache, or calibrated now and cached."""
    codebook = cached_codebook(loaded.space)
    if codebook is None:
        codebook = calibrate(loaded, settings, progress)
        save_codebook(codebook, codebook_path(loaded.space.fingerprint))
    return codebook


def fetched_codebook(space: ModelSpace, geometry: Geometry, sources: Sources,
                     announce: Callable[[str], None] | None = None) -> Codebook | None:
    """The codebook the first tier (the edge cache, peers, the cloud) that has a fitting one last coded
    this model's artifacts with, verified and checked against the model space, then cached here; None
    where no tier has one. One that does not parse or fit the model is passed over for the next tier."""
    tiers = sources.tiers(announce)
    for name, data in tiers.codebooks(space.fingerprint, codebook_bound(geometry)):
        try:
            codebook = Codebook.from_bytes(data, f"{name}: codebook")
            codebook.check_for(space.fingerprint, (geometry.layers, geometry.kv_heads, geometry.head_dim), name)
        except CelslmError as exc:
            tiers.warn(f"warning: {exc}; passed over")
            continue
        save_codebook(codebook, codebook_path(space.fingerprint))
        if announce:
            announce(f"fetched the codebook for {space.name} from {name} ({codebook.digest[:19]}; cached in "
                     f"{codebook_path(space.fingerprint)})")
        return codebook
    return None


def codebook_for(space: ModelSpace, model: str | None = None, settings: Calibration = Calibration(),
                 progress: Progress | None = None, announce: Callable[[str], None] | None = None,
                 geometry: Geometry | None = None, sources: Sources | None = None) -> Codebook:
    """The codebook for `space`'s model: cached; else fetched from `sources`' tiers (with the cache's
    `geometry`); else calibrated on first use with `model` (default: the space's name, when it names a
    bundled model) and cached."""
    from celslm.models import bundled_models, load_model

    codebook = cached_codebook(space)
    if codebook is None and sources is not None and sources.remote and geometry is not None:
        codebook = fetched_codebook(space, geometry, sources, announce)
    if codebook is not None:
        return codebook
    spec = model or (space.name if space.name in bundled_models() else None)
    if spec is None:
        raise UsageError(f"no codebook for {space.name} here: give --model with the model the artifact was made with "
                         f"(it is calibrated once and cached), or --codebook FILE")
    if announce:
        announce(f"calibrating the codebook for {space.name} (once per model; cached in {codebook_path(space.fingerprint)})")
    loaded = load_model(spec, progress)
    if loaded.fingerprint != space.fingerprint:
        raise UsageError(f"{spec} is not the model this artifact was made with ({space.name}, "
                         f"fingerprint {space.fingerprint[:12]}; {spec} has {loaded.fingerprint[:12]})")
    return model_codebook(loaded, settings, progress)


def codec_codebook(codec: Codec, loaded: LoadedModel, progress: Progress | None = None) -> Codebook | None:
    """What `build_artifact`/`recode` need for `codec` on `loaded`'s KV: the model's codebook (cached, or
    calibrated now) for a tc codec, None for any other."""
    return model_codebook(loaded, progress=progress) if codec.transform else None
