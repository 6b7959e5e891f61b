"""Cross-model KV: which small-model layer reads which large-model layer, and the maps between them.

`calibrate` runs a large model (LLM) and a small model (SLM) that share a tokenizer over the same
calibration windows and keeps, per layer, three features of sampled tokens:
  hidden  the hidden state entering the layer, after the layer's input norm  [N, hidden]
  keys    pre-RoPE keys, heads concatenated                                  [N, H*D]
  values  values, heads concatenated                                         [N, H*D]
`align` compares every SLM layer with every LLM layer (linear CKA and RSA on each feature), picks a
monotone layer map by dynamic programming, and fits per SLM layer a ridge map from the mapped LLM
layer's features to the SLM's keys and values. The first `sink` tokens of a context are never
projected: attention sinks project badly, and one token of the SLM's own prefill costs nothing.

The result is an `Alignment` (`projection.py`: the maps, their file format, and how prefill uses them).
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from celslm import kvcache
from celslm.corpus import file_name
from celslm.decode import context_from_layers
from celslm.errors import UsageError
from celslm.features import FEATURES, LayerFeatures, layer_features, native_layers, to_heads
from celslm.models import LoadedModel, Progress, celslm_home, check_tokenizers, load_model, load_tokenizer
from celslm.plots import pyplot
from celslm.projection import SOURCES, SPLIT_TOKENS, AlignedModel, Alignment, HeldOut, cross_layers, gain_kept, regressor
from celslm.score import continuation_logits, nll

MAP_METHODS = ("cka", "rsa", "proportional")
LAMBDAS = (1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)  # ridge strengths, times the Gram's mean eigenvalue


# ---------------------------------------------------------------- similarity and the layer map


def _centered_gram(x: torch.Tensor) -> torch.Tensor:
    x = x.double() - x.double().mean(0)
    return x @ x.T  # [n, n]


def linear_cka(grams_a: list[torch.Tensor], grams_b: list[torch.Tensor]) -> torch.Tensor:
    """Linear CKA between every pair of layers from centered Gram matrices; `[len(a), len(b)]`."""
    flat_a = torch.stack([g.flatten() / g.norm() for g in grams_a])
    flat_b = torch.stack([g.flatten() / g.norm() for g in grams_b])
    return (flat_a @ flat_b.T).float()


def _rdm(x: torch.Tensor) -> torch.Tensor:
    """Representational dissimilarity: 1 - Pearson correlation between tokens, upper triangle."""
    x = x.double() - x.double().mean(1, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    rows, cols = torch.triu_indices(x.shape[0], x.shape[0], 1)
    return 1.0 - (x @ x.T)[rows, cols]


def rsa(feats_a: list[torch.Tensor], feats_b: list[torch.Tensor]) -> torch.Tensor:
    """RSA: Pearson correlation between the layers' dissimilarity matrices; `[len(a), len(b)]`."""

    def standardized(x):
        d = _rdm(x)
        d = d - d.mean()
        return d / d.norm().clamp_min(1e-12)

    flat_a = torch.stack([standardized(x) for x in feats_a])
    flat_b = torch.stack([standardized(x) for x in feats_b])
    return (flat_a @ flat_b.T).float()


def monotone_map(similarity: torch.Tensor) -> list[int]:
    """The non-decreasing map small layer -> large layer with the largest total similarity (DP)."""
    small, large = similarity.shape
    best = similarity[0].double().clone()  # best total for layers 0..s with layer s mapped to l
    choice = []
    for s in range(1, small):
        running, arg = best.cummax(0)  # best predecessor l' <= l
        choice.append(arg)
        best = running + similarity[s].double()
    mapping = [int(best.argmax())]
    for arg in reversed(choice):
        mapping.append(int(arg[mapping[-1]]))
    return mapping[::-1]


def proportional_map(small: int, large: int) -> list[int]:
    return [round(s * (large - 1) / max(small - 1, 1)) for s in range(small)]


# ---------------------------------------------------------------- ridge maps


@dataclass(frozen=True)
class RidgeFit:
    weight: torch.Tensor  # [d_in, d_out], applies to raw (unstandardized) inputs
    bias: torch.Tensor  # [d_out]
    lam: float  # chosen ridge strength, relative to the Gram's mean eigenvalue
    r2: float  # on the held-out rows


def fit_ridge(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
              lambdas: tuple[float, ...] = LAMBDAS) -> RidgeFit:
    """Ridge regression y ≈ x W + b on standardized inputs; λ picked by held-out squared error."""
    x, y, x_test, y_test = (t.double() for t in (x, y, x_test, y_test))
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    y_mean = y.mean(0)
    evals, evecs = torch.linalg.eigh(xs.T @ xs)
    evals = evals.clamp_min(0)
    xty = evecs.T @ (xs.T @ (y - y_mean))  # [d_in, d_out] in the eigenbasis
    test_e = ((x_test - mean) / std) @ evecs
    total = ((y_test - y_test.mean(0)) ** 2).sum()
    best = None
    for lam in lambdas:
        coef = xty / (evals + lam * evals.mean())[:, None]
        error = ((test_e @ coef + y_mean - y_test) ** 2).sum()
        if best is None or error < best[0]:
            best = (error, lam, coef)
    error, lam, coef = best
    weight = (evecs @ coef) / std[:, None]
    bias = y_mean - mean @ weight
    return RidgeFit(weight.float(), bias.float(), lam, float(1 - error / total))


# ---------------------------------------------------------------- calibration


class SpilledLayers(SequenceABC):
    """One feature's per-layer tensors, kept on disk (one safetensors file per window) and read back one
    layer at a time, the windows' rows concatenated: `[N, dim]` for layer i is `self[i]`."""

    def __init__(self, paths: list[Path], feature: str, count: int):
        self.paths, self.feature, self.count = paths, feature, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, layer: int) -> torch.Tensor:
        if not 0 <= layer < self.count:
            raise IndexError(layer)
        parts = []
        for path in self.paths:
            with safe_open(path, "pt") as tensors:
                parts.append(tensors.get_tensor(f"{self.feature}.{layer}"))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class Spill:
    """A temporary folder that calibration writes features to as each window is computed, so that only
    one model and one window's features are in memory at a time."""

    def __init__(self, folder: Path):
        self.folder = folder

    def write(self, name: str, features: dict[str, list[torch.Tensor]]) -> Path:
        path = self.folder / f"{name}.safetensors"
        save_file({f"{feature}.{i}": t.contiguous() for feature, ts in features.items() for i, t in enumerate(ts)}, path)
        return path

    @staticmethod
    def features(paths: list[Path], layers: int) -> LayerFeatures:
        return LayerFeatures(*[SpilledLayers(paths, feature, layers) for feature in FEATURES])


@dataclass
class Calibration:
    """Sampled rows of both models' features, split by window into fitting and held-out rows, plus
    whole held-out windows (with a continuation) for measuring quality. The features live in a `Spill`."""

    llm_fit: LayerFeatures
    slm_fit: LayerFeatures
    llm_test: LayerFeatures
    slm_test: LayerFeatures
    heldout_windows: list[tuple[list[int], list[int]]]  # (context ids, continuation ids)
    heldout_llm: list[LayerFeatures]  # the LLM's features over each held-out context, every position
    files: list[str]
    full_fit: list["FullWindow"]  # whole windows for `refine_maps`
    full_test: list["FullWindow"]
    tokens: int
    llm: AlignedModel  # recorded while the LLM was loaded
    seconds: dict = field(default_factory=dict)
    evaluated: list = field(default_factory=list)  # `corpus.Case`s of the user's files (`AlignOptions.eval_folder`)
    evaluated_llm: list[LayerFeatures] = field(default_factory=list)  # the LLM's features over each case's context


def calibration_windows(tokenizer, paths: list[Path], window: int, count: int) -> tuple[list[list[int]], list[str]]:
    """Up to `count` windows of `window` tokens (each starting a file), in file order, and the files'
    names (`corpus.file_name`)."""
    windows, names = [], []
    for path in paths:
        ids = tokenizer(path.read_text(errors="replace"), add_special_tokens=True)["input_ids"]
        if len(ids) < window:
            continue
        windows.append(ids[:window])
        names.append(file_name(path))
        if len(windows) == count:
            break
    if len(windows) < 2:
        raise UsageError(f"calibration text gives {len(windows)} window(s) of {window} tokens; give more or longer files")
    return windows, names


def calibrate(llm: Callable[[], LoadedModel], slm: Callable[[], LoadedModel], windows: list[list[int]],
              names: list[str], spill: Spill, *, heldout: int, continuation: int, rows_per_window: int, sink: int,
              full_windows: int = 0, source: str = "hidden", seed: int = 0, evaluated: list = (),
              progress: Progress | None = None) -> tuple[Calibration, LoadedModel]:
    """Run each model over the windows, the LLM first (`llm()` loads it; it is dropped before `slm()`
    loads the SLM, so that the two never share memory), writing features to `spill` window by window.
    The last `heldout` windows are held out: their rows score the maps, and their first
    `len - continuation` tokens + the rest measure perplexity. The first `full_windows` fitting windows
    and up to 2 held-out ones are also kept whole (for refinement). For each of the `evaluated` cases
    (the user's own files) the LLM's features over its context are kept too. Returns the SLM, still loaded."""
    generator = torch.Generator().manual_seed(seed)
    plan = []  # per window: (held out?, usable tokens, sampled rows, kept whole?)
    kept = {"fit": 0, "test": 0}
    for index, ids in enumerate(windows):
        is_test = index >= len(windows) - heldout
        usable = len(ids) - (continuation if is_test else 0)
        # rows from the context part only, never the sink tokens
        rows = sink + torch.randperm(usable - sink, generator=generator)[:rows_per_window]
        split = "test" if is_test else "fit"
        keep_whole = kept[split] < (min(2, heldout) if is_test else full_windows)
        kept[split] += keep_whole
        plan.append((is_test, usable, rows, keep_whole))
    seconds = {"llm": 0.0, "slm": 0.0}
    paths: dict[str, list[Path]] = {k: [] for k in ("llm_fit", "slm_fit", "llm_test", "slm_test", "heldout_llm",
                                                    "whole_llm_fit", "whole_slm_fit", "whole_llm_test", "whole_slm_test",
                                                    "evaluated_llm")}
    layers = {}
    for key, load in (("llm", llm), ("slm", slm)):
        model = load()
        layers[key] = model.engine.geometry.layers
        for index, (ids, (is_test, usable, rows, keep_whole)) in enumerate(zip(windows, plan)):
            if progress:
                progress(f"calibration, {model.name} (windows)", index, len(windows))
            split = "test" if is_test else "fit"
            started = time.perf_counter()
            features = layer_features(model, ids[:usable], queries=keep_whole and key == "slm")
            seconds[key] += time.perf_counter() - started
            name = f"{key}-{index}"
            paths[f"{key}_{split}"].append(spill.write(f"{name}-rows", {f: [t[rows] for t in getattr(features, f)]
                                                                         for f in FEATURES}))
            if key == "llm" and is_test:  # the held-out context, for measuring the projection
                paths["heldout_llm"].append(spill.write(f"{name}-all", {f: getattr(features, f) for f in FEATURES}))
            if keep_whole and key == "llm":
                whole = {"regressor": [regressor(features, l, source) for l in range(layers[key])]}
            elif keep_whole:
                whole = {"keys": features.keys, "values": features.values, "queries": features.queries}
            if keep_whole:
                paths[f"whole_{key}_{split}"].append(spill.write(f"{name}-whole", whole))
            del features
        if progress:
            progress(f"calibration, {model.name} (windows)", len(windows), len(windows))
        if key == "llm":
            for index, case in enumerate(evaluated):
                if progress:
                    progress(f"{model.name} over your files", index, len(evaluated))
                started = time.perf_counter()
                features = layer_features(model, case.context)
                seconds[key] += time.perf_counter() - started
                paths["evaluated_llm"].append(spill.write(f"eval-{index}", {f: getattr(features, f) for f in FEATURES}))
                del features
            llm_model = AlignedModel(model.name, model.fingerprint, layers[key])
            del model  # only the SLM is in memory from here on
            gc.collect()
    calibration = Calibration(
        **{k: Spill.features(paths[k], layers[k[:3]]) for k in ("llm_fit", "slm_fit", "llm_test", "slm_test")},
        heldout_windows=[(ids[:usable], ids[usable:]) for ids, (is_test, usable, _, _) in zip(windows, plan) if is_test],
        heldout_llm=[Spill.features([path], layers["llm"]) for path in paths["heldout_llm"]],
        files=names,
        full_fit=[FullWindow.spilled(a, b, layers) for a, b in zip(paths["whole_llm_fit"], paths["whole_slm_fit"])],
        full_test=[FullWindow.spilled(a, b, layers) for a, b in zip(paths["whole_llm_test"], paths["whole_slm_test"])],
        tokens=sum(len(w) for w in windows), llm=llm_model, seconds={k: round(v, 2) for k, v in seconds.items()},
        evaluated=list(evaluated), evaluated_llm=[Spill.features([path], layers["llm"]) for path in paths["evaluated_llm"]])
    return calibration, model


def similarities(cal: Calibration, sample: int = 1024, seed: int = 0) -> dict:
    """CKA and RSA, SLM layers x LLM layers, on each feature, over `sample` fitting rows."""
    rows = torch.randperm(cal.llm_fit.hidden[0].shape[0], generator=torch.Generator().manual_seed(seed))[:sample]
    llm, slm = cal.llm_fit.rows(rows), cal.slm_fit.rows(rows)
    result = {"cka": {}, "rsa": {}}
    for feature in FEATURES:
        a, b = getattr(slm, feature), getattr(llm, feature)
        result["cka"][feature] = linear_cka([_centered_gram(x) for x in a], [_centered_gram(x) for x in b])
        result["rsa"][feature] = rsa(a, b)
    return result


def choose_map(method: str, sims: dict, small: int, large: int) -> list[int]:
    """The layer map; `cka`/`rsa` maximize the mean of that measure over hidden states, keys and values."""
    if method == "proportional":
        return proportional_map(small, large)
    if method not in sims:
        raise UsageError(f"layer map {method!r} is not one of {', '.join(MAP_METHODS)}")
    return monotone_map(torch.stack([sims[method][f] for f in FEATURES]).mean(0))


def fit_maps(cal: Calibration, layer_map: list[int], source: str, progress: Progress | None = None
             ) -> tuple[dict[str, torch.Tensor], dict]:
    """Per SLM layer, ridge maps from the mapped LLM layer's features to the SLM's keys and values."""
    maps, report = {}, {"r2": {"key": [], "value": []}, "lambda": {"key": [], "value": []}}
    for s, l in enumerate(layer_map):
        if progress:
            progress("fitting maps (layers)", s, len(layer_map))
        x, x_test = regressor(cal.llm_fit, l, source), regressor(cal.llm_test, l, source)
        for part, feature in (("key", "keys"), ("value", "values")):
            fit = fit_ridge(x, getattr(cal.slm_fit, feature)[s], x_test, getattr(cal.slm_test, feature)[s])
            maps[f"{s}.{part}.weight"], maps[f"{s}.{part}.bias"] = fit.weight.contiguous(), fit.bias.contiguous()
            report["r2"][part].append(round(fit.r2, 4))
            report["lambda"][part].append(fit.lam)
    if progress:
        progress("fitting maps (layers)", len(layer_map), len(layer_map))
    return maps, report


# ---------------------------------------------------------------- measured quality on held-out windows


def continuation_nll(slm: LoadedModel, token_ids: list[int], layers, continuation: list[int]) -> float:
    """The SLM's mean NLL of `continuation` after a context held as pre-RoPE `layers`."""
    logits, targets = continuation_logits(slm, context_from_layers(slm, token_ids, layers), continuation)
    return nll(logits, targets)


def split_nll(slm: LoadedModel, token_ids: list[int], projected, continuation: list[int], own_last: int) -> float:
    """The SLM's mean NLL of `continuation` after a token split: the projected KV of the context but its
    last `own_last` tokens, which the SLM prefills itself over it (`decode --recompute-last`)."""
    kept = len(token_ids) - own_last
    context = context_from_layers(slm, token_ids[:kept], [(k[:, :kept], v[:, :kept]) for k, v in projected])
    logits, _ = continuation_logits(slm, context, token_ids[kept:] + continuation)
    return nll(logits[-len(continuation):], continuation)


def measure_heldout(slm: LoadedModel, alignment: Alignment, windows, llm_features: list[LayerFeatures],
                    progress: Progress | None = None) -> HeldOut:
    """Mean NLL over held-out windows of: own prefill, sink tokens only (no context), every hybrid
    (first k layers native, k = 0..L; k = 0 is fully cross-model), each layer projected alone, and each
    token split of `SPLIT_TOKENS` shorter than every window's context.
    `llm_features` holds the LLM's features over each window's context (the LLM itself is not needed)."""
    count = slm.model.config.num_hidden_layers
    sink = alignment.sink_tokens
    splits = [n for n in SPLIT_TOKENS if n < min(len(ctx) for ctx, _ in windows) - sink]
    totals = {"own": 0.0, "no_context": 0.0, "hybrid": [0.0] * (count + 1), "alone": [0.0] * count,
              "split": dict.fromkeys(splits, 0.0)}
    for index, ((ctx, cont), features) in enumerate(zip(windows, llm_features)):
        if progress:
            progress("held-out quality (windows)", index, len(windows))
        own = native_layers(slm, ctx, count)
        projected = cross_layers(None, slm, alignment, ctx, llm_features=features)
        nll_own = continuation_nll(slm, ctx, own, cont)
        totals["own"] += nll_own
        totals["no_context"] += continuation_nll(slm, ctx[:sink], [(k[:, :sink], v[:, :sink]) for k, v in own], cont)
        for k in range(count + 1):
            totals["hybrid"][k] += nll_own if k == count else continuation_nll(slm, ctx, own[:k] + projected[k:], cont)
        for layer in range(count):
            mixed = own[:layer] + [projected[layer]] + own[layer + 1 :]
            totals["alone"][layer] += continuation_nll(slm, ctx, mixed, cont) - nll_own
        for own_last in splits:
            totals["split"][own_last] += split_nll(slm, ctx, projected, cont, own_last)
    if progress:
        progress("held-out quality (windows)", len(windows), len(windows))
    n = len(windows)
    return HeldOut(n, round(totals["own"] / n, 5), round(totals["no_context"] / n, 5),
                   tuple(round(t / n, 5) for t in totals["hybrid"]), tuple(round(t / n, 5) for t in totals["alone"]),
                   {k: round(t / n, 5) for k, t in totals["split"].items()})


def measure_files(slm: LoadedModel, alignment: Alignment, cases: list, llm_features: list[LayerFeatures],
                  progress: Progress | None = None, own_last: int = 0) -> dict:
    """The gain the alignment keeps on the user's files (`align --eval`): per file and overall, the SLM's
    NLL of each file's continuation after its own prefill, after no context (the sink tokens only),
    after the context projected from the LLM (every layer, exact: no codec) and, with `own_last`, after
    that token split (`split_nll`: what decode does by default)."""
    count = slm.model.config.num_hidden_layers
    sink = alignment.sink_tokens
    files = []
    for index, (case, features) in enumerate(zip(cases, llm_features)):
        if progress:
            progress("your files (gain kept)", index, len(cases))
        ctx, cont = case.context, case.continuation
        own = native_layers(slm, ctx, count)
        projected = cross_layers(None, slm, alignment, ctx, llm_features=features)
        nlls = {"own_nll": continuation_nll(slm, ctx, own, cont),
                "no_context_nll": continuation_nll(slm, ctx[:sink], [(k[:, :sink], v[:, :sink]) for k, v in own], cont),
                "cross_nll": continuation_nll(slm, ctx, projected, cont)}
        if own_last and own_last < len(ctx) - sink:
            nlls["split_nll"] = split_nll(slm, ctx, projected, cont, own_last)
        files.append({"file": case.name, "context_tokens": len(ctx), **{k: round(v, 5) for k, v in nlls.items()},
                      "gain_kept": round(gain_kept(nlls["cross_nll"], nlls["own_nll"], nlls["no_context_nll"]), 4)})
    if progress:
        progress("your files (gain kept)", len(cases), len(cases))
    mean = {k: round(sum(f[k] for f in files) / len(files), 5) for k in ("own_nll", "no_context_nll", "cross_nll")}
    result = {"files": files, **mean, "gain_kept": round(gain_kept(mean["cross_nll"], mean["own_nll"], mean["no_context_nll"]), 4)}
    if own_last and all("split_nll" in f for f in files):
        split = round(sum(f["split_nll"] for f in files) / len(files), 5)
        result |= {"own_last": own_last, "split_nll": split,
                   "split_gain_kept": round(gain_kept(split, mean["own_nll"], mean["no_context_nll"]), 4)}
    return result


# ---------------------------------------------------------------- the whole run


@dataclass(frozen=True)
class AlignOptions:
    map_method: str = "cka"
    source: str = "hidden"
    window: int = 1024
    windows: int = 16
    heldout: int = 4
    continuation: int = 128
    rows_per_window: int = 512
    sink_tokens: int = 1
    refine_steps: int = 300  # per layer; 0 keeps the ridge maps
    refine_windows: int = 12
    seed: int = 0
    eval_folder: Path | None = None  # the user's own files: the gain kept on them is measured and reported
    eval_files: int = 10

    def check(self) -> None:
        """Refuse settings that cannot work, before any model runs."""
        if self.source not in SOURCES:
            raise UsageError(f"map source {self.source!r} is not one of {', '.join(SOURCES)}")
        if self.map_method not in MAP_METHODS:
            raise UsageError(f"layer map {self.map_method!r} is not one of {', '.join(MAP_METHODS)}")
        if not 1 <= self.heldout < self.windows:
            raise UsageError(f"held-out windows ({self.heldout}) must be at least 1 and fewer than all windows ({self.windows})")
        if self.window <= self.continuation + self.sink_tokens + 1:
            raise UsageError(f"a {self.window}-token window leaves no context before the {self.continuation}-token continuation")
        if self.eval_folder is not None and not Path(self.eval_folder).is_dir():
            raise UsageError(f"--eval {self.eval_folder}: not a folder (give a folder of your .py, .txt, .md or .rst files)")


def align(llm: str, slm: str, paths: list[Path], options: AlignOptions = AlignOptions(),
          progress: Progress | None = None, load: Callable[[str, Progress | None], LoadedModel] = load_model
          ) -> Alignment:
    """Calibrate, compare layers, map, fit, and measure; the result is ready for `save_alignment`.

    The two models are named, not loaded: the LLM is loaded for its pass over the calibration windows
    and dropped before the SLM loads, and features wait on disk, so memory holds one model at a time."""
    options.check()
    slm_tokenizer = load_tokenizer(slm, progress)
    tokenizer = check_tokenizers(load_tokenizer(llm, progress), slm_tokenizer, llm, slm)
    started = time.perf_counter()
    windows, names = calibration_windows(slm_tokenizer, paths, options.window, options.windows)
    heldout = min(options.heldout, len(windows) - 1)
    evaluated = _evaluated(slm_tokenizer, options, names)
    scratch = celslm_home() / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    for stale in scratch.glob(".align-*"):  # left by a killed run (a finished one removes its own)
        if time.time() - stale.stat().st_mtime > 86400:
            shutil.rmtree(stale, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=".align-", dir=scratch))
    try:
        cal, small = calibrate(lambda: load(llm, progress), lambda: load(slm, progress), windows, names, Spill(folder),
                               heldout=heldout, continuation=options.continuation,
                               rows_per_window=options.rows_per_window, sink=options.sink_tokens,
                               full_windows=options.refine_windows if options.refine_steps else 0,
                               source=options.source, seed=options.seed, evaluated=evaluated, progress=progress)
        sims = similarities(cal, seed=options.seed)
        layer_map = choose_map(options.map_method, sims, small.engine.geometry.layers, cal.llm.layers)
        maps, fit_report = fit_maps(cal, layer_map, options.source, progress)
        report = {
            "similarity": {m: {f: [[round(v, 4) for v in row] for row in t.tolist()] for f, t in by.items()}
                           for m, by in sims.items()},
            "r2": fit_report["r2"],
            "lambda": fit_report["lambda"],
            "calibration": {"files": cal.files, "fit_windows": len(windows) - heldout, "heldout_windows": heldout,
                            "window_tokens": options.window, "tokens": cal.tokens,
                            "rows": int(cal.llm_fit.hidden[0].shape[0]), "continuation_tokens": options.continuation,
                            "forward_s": cal.seconds},
        }
        slm_model = AlignedModel(small.name, small.fingerprint, small.engine.geometry.layers,
                                 str(Path(small.folder).resolve()))
        alignment = Alignment(cal.llm, slm_model, tokenizer, options.source, options.map_method, tuple(layer_map),
                              options.sink_tokens, maps, report=report)
        if options.refine_steps and cal.full_fit and cal.full_test:
            tuned, refined = refine_maps(small, alignment, cal.full_fit, cal.full_test, steps=options.refine_steps,
                                         seed=options.seed, progress=progress)
            alignment = replace(alignment, maps=tuned, report={
                **report, "refine": {"steps": options.refine_steps, "windows": len(cal.full_fit), **refined}})
        heldout_nll = measure_heldout(small, alignment, cal.heldout_windows, cal.heldout_llm, progress)
        if evaluated:
            mine = measure_files(small, alignment, cal.evaluated, cal.evaluated_llm, progress, heldout_nll.advised_split())
            alignment = replace(alignment, report={**alignment.report, "eval": {"folder": str(options.eval_folder), **mine}})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return replace(alignment, heldout=heldout_nll,
                   report={**alignment.report, "seconds": round(time.perf_counter() - started, 1)})


def _evaluated(tokenizer, options: AlignOptions, calibration: list[str]) -> list:
    """The user's files to measure the alignment on (`--eval`): up to `eval_files` of them with room for
    some context and the continuation, none of the files the alignment is fitted on."""
    if options.eval_folder is None:
        return []
    from celslm.corpus import eval_cases

    context = options.window - options.continuation
    least = min(context, 4 * options.continuation)
    cases = eval_cases(tokenizer, options.eval_files, least, context, options.continuation, exclude=set(calibration),
                       source=str(options.eval_folder))
    if not cases:
        raise UsageError(f"--eval {options.eval_folder}: no file gives {least} context and {options.continuation} "
                         "continuation tokens (calibration files excluded)")
    return cases


def plot_similarity(alignment: Alignment, folder: Path) -> list[Path]:
    """`cka.png` and `rsa.png`: SLM layer x LLM layer heatmaps per feature, the layer map drawn on top."""
    plt = pyplot()  # matplotlib: the [bench] extra
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for method, by_feature in alignment.report["similarity"].items():
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.6))
        for ax, feature in zip(axes, FEATURES):
            image = ax.imshow(by_feature[feature], origin="lower", aspect="auto", cmap="viridis")
            ax.plot(alignment.layer_map, range(len(alignment.layer_map)), "w.-", linewidth=1, markersize=4)
            ax.set_title(f"{method.upper()} on {feature}")
            ax.set_xlabel(f"{alignment.llm.name} layer")
            ax.set_ylabel(f"{alignment.slm.name} layer")
            fig.colorbar(image, ax=ax, fraction=0.046)
        fig.suptitle(f"{method.upper()} similarity; white: the {alignment.map_method} layer map")
        fig.tight_layout()
        path = folder / f"{method}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------- refinement: match what attention makes of the KV


@dataclass
class FullWindow:
    """One calibration window at every position: the LLM's regressor per layer, the SLM's own keys,
    values and queries per layer (`[T, dim]` each), read from disk a layer at a time."""

    regressor: SequenceABC[torch.Tensor]
    keys: SequenceABC[torch.Tensor]
    values: SequenceABC[torch.Tensor]
    queries: SequenceABC[torch.Tensor]

    @staticmethod
    def spilled(llm: Path, slm: Path, layers: dict[str, int]) -> "FullWindow":
        return FullWindow(SpilledLayers([llm], "regressor", layers["llm"]),
                          *[SpilledLayers([slm], feature, layers["slm"]) for feature in ("keys", "values", "queries")])

    def layer(self, small: int, large: int) -> tuple[torch.Tensor, ...]:
        """(regressor of LLM layer `large`, keys, values, queries of SLM layer `small`)."""
        return self.regressor[large], self.keys[small], self.values[small], self.queries[small]


def refine_maps(slm: LoadedModel, alignment: Alignment, fit: list[FullWindow], test: list[FullWindow], *,
                steps: int = 300, queries: int = 256, lr: float = 0.01, seed: int = 0,
                progress: Progress | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Tune each layer's maps (from the ridge fit) by Adam so that the SLM's own queries, attending over
    the projected keys and values, give the attention output they give over its own (after `o_proj`,
    relative squared error). A layer keeps the tuned maps only if its held-out error falls.
    Returns the maps (tuned where kept) and the per-layer errors before and after."""
    maps = dict(alignment.maps)
    sink = alignment.sink_tokens
    generator = torch.Generator().manual_seed(seed)
    longest = max(len(w.keys[0]) for w in fit + test)
    cos, sin = (t.clone() for t in kvcache.rope_tables(slm.model, 0, longest))
    _, kv_heads, _ = kvcache.kv_geometry(slm.model)
    report = {"before": [], "after": [], "kept": []}
    for s, l in enumerate(alignment.layer_map):
        if progress:
            progress("refining maps (layers)", s, len(alignment.layer_map))
        fit_l, test_l = [w.layer(s, l) for w in fit], [w.layer(s, l) for w in test]  # this layer's part, read once
        rows = torch.cat([regressor_rows[sink:] for regressor_rows, *_ in fit_l])
        mean, std = rows.mean(0), rows.std(0).clamp_min(1e-6)
        params = {}
        for part in ("key", "value"):
            weight, bias = maps[f"{s}.{part}.weight"], maps[f"{s}.{part}.bias"]
            params[part] = (weight * std[:, None]).clone().requires_grad_(), (bias + mean @ weight).clone().requires_grad_()

        def heads(rows):
            return to_heads(rows, kv_heads)

        def loss(window: tuple[torch.Tensor, ...], positions: torch.Tensor) -> torch.Tensor:
            regressor_rows, own_keys, own_values, own_queries = window
            x = (regressor_rows - mean) / std
            kv = []
            for part, own in (("key", own_keys), ("value", own_values)):
                weight, bias = params[part]
                kv.append(heads(torch.cat([own[:sink], x[sink:] @ weight + bias])))
            with torch.no_grad():
                target = kvcache.attention_output(slm.model, s, own_queries, heads(own_keys), heads(own_values),
                                                  cos, sin, positions)
            out = kvcache.attention_output(slm.model, s, own_queries, kv[0], kv[1], cos, sin, positions)
            return ((out - target) ** 2).mean() / (target ** 2).mean()

        def held_out() -> float:
            with torch.no_grad():
                return sum(loss(w, torch.arange(sink, len(w[1]))).item() for w in test_l) / len(test_l)

        before = held_out()
        optimizer = torch.optim.Adam([{"params": [w], "lr": lr * w.detach().abs().mean().item()} for pair in params.values() for w in pair])
        with torch.enable_grad():
            for step in range(steps):
                window = fit_l[step % len(fit_l)]
                length = len(window[1])
                positions = sink + torch.randperm(length - sink, generator=generator)[:queries].sort().values
                optimizer.zero_grad()
                loss(window, positions).backward()
                optimizer.step()
        after = held_out()
        kept = after < before
        if kept:
            for part, (weight, bias) in params.items():
                raw = (weight.detach() / std[:, None]).contiguous()
                maps[f"{s}.{part}.weight"] = raw
                maps[f"{s}.{part}.bias"] = (bias.detach() - mean @ raw).contiguous()
        report["before"].append(round(before, 5))
        report["after"].append(round(after, 5))
        report["kept"].append(kept)
    if progress:
        progress("refining maps (layers)", len(alignment.layer_map), len(alignment.layer_map))
    return maps, report
