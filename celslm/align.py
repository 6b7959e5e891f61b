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

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from celslm import kvcache
from celslm.decode import context_from_layers
from celslm.errors import UsageError
from celslm.features import FEATURES, LayerFeatures, layer_features, native_layers, to_heads
from celslm.models import LoadedModel, Progress, check_tokenizers
from celslm.projection import SOURCES, Alignment, cross_layers, regressor
from celslm.score import continuation_logits

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


@dataclass
class Calibration:
    """Sampled rows of both models' features, split by window into fitting and held-out rows, plus
    whole held-out windows (with a continuation) for measuring quality."""

    llm_fit: LayerFeatures
    slm_fit: LayerFeatures
    llm_test: LayerFeatures
    slm_test: LayerFeatures
    heldout_windows: list[tuple[list[int], list[int]]]  # (context ids, continuation ids)
    files: list[str]
    full_fit: list["FullWindow"]  # whole windows for `refine_maps`
    full_test: list["FullWindow"]
    tokens: int
    seconds: dict = field(default_factory=dict)


def calibration_windows(tokenizer, paths: list[Path], window: int, count: int) -> tuple[list[list[int]], list[str]]:
    """Up to `count` windows of `window` tokens (each starting a file), in file order."""
    windows, names = [], []
    for path in paths:
        ids = tokenizer(path.read_text(errors="replace"), add_special_tokens=True)["input_ids"]
        if len(ids) < window:
            continue
        windows.append(ids[:window])
        names.append(path.name)
        if len(windows) == count:
            break
    if len(windows) < 2:
        raise UsageError(f"calibration text gives {len(windows)} window(s) of {window} tokens; give more or longer files")
    return windows, names


def calibrate(llm: LoadedModel, slm: LoadedModel, windows: list[list[int]], names: list[str], *,
              heldout: int, continuation: int, rows_per_window: int, sink: int, full_windows: int = 0,
              source: str = "hidden", seed: int = 0, progress: Progress | None = None) -> Calibration:
    """Run both models over the windows. The last `heldout` windows are held out: their rows score the
    maps, and their first `len - continuation` tokens + the rest measure perplexity. The first
    `full_windows` fitting windows and up to 2 held-out ones are also kept whole (for refinement)."""
    generator = torch.Generator().manual_seed(seed)
    parts = {"llm_fit": [], "slm_fit": [], "llm_test": [], "slm_test": []}
    seconds = {"llm": 0.0, "slm": 0.0}
    heldout_windows, full = [], {"fit": [], "test": []}
    for index, ids in enumerate(windows):
        if progress:
            progress("calibration (windows)", index, len(windows))
        is_test = index >= len(windows) - heldout
        if is_test:
            heldout_windows.append((ids[: len(ids) - continuation], ids[len(ids) - continuation :]))
        usable = len(ids) - (continuation if is_test else 0)
        # rows from the context part only, never the sink tokens
        rows = sink + torch.randperm(usable - sink, generator=generator)[:rows_per_window]
        split = "test" if is_test else "fit"
        keep_whole = len(full[split]) < (min(2, heldout) if is_test else full_windows)
        features = {}
        for model, key in ((llm, "llm"), (slm, "slm")):
            started = time.perf_counter()
            features[key] = layer_features(model, ids[:usable], queries=keep_whole and key == "slm")
            seconds[key] += time.perf_counter() - started
            parts[f"{key}_{split}"].append(features[key].rows(rows))
        if keep_whole:
            full[split].append(FullWindow.of(features["llm"], features["slm"], source))
    if progress:
        progress("calibration (windows)", len(windows), len(windows))
    return Calibration(**{k: LayerFeatures.concat(v) for k, v in parts.items()}, heldout_windows=heldout_windows,
                       files=names, full_fit=full["fit"], full_test=full["test"], tokens=sum(len(w) for w in windows),
                       seconds={k: round(v, 2) for k, v in seconds.items()})


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
    return torch.nn.functional.cross_entropy(logits, targets).item()


def measure_heldout(llm: LoadedModel, slm: LoadedModel, alignment: Alignment, windows, progress: Progress | None = None) -> dict:
    """Mean NLL over held-out windows of: own prefill, sink tokens only (no context), every hybrid
    (first k layers native, k = 0..L; k = 0 is fully cross-model), and each layer projected alone."""
    count = slm.model.config.num_hidden_layers
    sink = alignment.sink_tokens
    totals = {"own": 0.0, "no_context": 0.0, "hybrid": [0.0] * (count + 1), "alone": [0.0] * count}
    for index, (ctx, cont) in enumerate(windows):
        if progress:
            progress("held-out quality (windows)", index, len(windows))
        own = native_layers(slm, ctx, count)
        projected = cross_layers(llm, slm, alignment, ctx)
        nll_own = continuation_nll(slm, ctx, own, cont)
        totals["own"] += nll_own
        totals["no_context"] += continuation_nll(slm, ctx[:sink], [(k[:, :sink], v[:, :sink]) for k, v in own], cont)
        for k in range(count + 1):
            totals["hybrid"][k] += nll_own if k == count else continuation_nll(slm, ctx, own[:k] + projected[k:], cont)
        for layer in range(count):
            mixed = own[:layer] + [projected[layer]] + own[layer + 1 :]
            totals["alone"][layer] += continuation_nll(slm, ctx, mixed, cont) - nll_own
    if progress:
        progress("held-out quality (windows)", len(windows), len(windows))
    n = len(windows)
    return {
        "windows": n,
        "own_nll": round(totals["own"] / n, 5),
        "no_context_nll": round(totals["no_context"] / n, 5),
        "hybrid_nll": [round(t / n, 5) for t in totals["hybrid"]],
        "sensitivity": [round(t / n, 5) for t in totals["alone"]],
    }


def gain_kept(nll: float, own: float, no_context: float) -> float:
    """Share of the context's benefit kept: 1 = as good as own prefill, 0 = as bad as no context."""
    return (no_context - nll) / (no_context - own) if no_context != own else float("nan")


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


def align(llm: LoadedModel, slm: LoadedModel, paths: list[Path], options: AlignOptions = AlignOptions(),
          progress: Progress | None = None) -> Alignment:
    """Calibrate, compare layers, map, fit, and measure; the result is ready for `save_alignment`."""
    options.check()
    tokenizer = check_tokenizers(llm, slm)
    started = time.perf_counter()
    windows, names = calibration_windows(slm.tokenizer, paths, options.window, options.windows)
    heldout = min(options.heldout, len(windows) - 1)
    cal = calibrate(llm, slm, windows, names, heldout=heldout, continuation=options.continuation,
                    rows_per_window=options.rows_per_window, sink=options.sink_tokens,
                    full_windows=options.refine_windows if options.refine_steps else 0, source=options.source,
                    seed=options.seed, progress=progress)
    sims = similarities(cal, seed=options.seed)
    small, large = slm.model.config.num_hidden_layers, llm.model.config.num_hidden_layers
    layer_map = choose_map(options.map_method, sims, small, large)
    maps, fit_report = fit_maps(cal, layer_map, options.source, progress)
    meta = {
        "llm": {**llm.space.to_json(), "layers": large},
        "slm": {**slm.space.to_json(), "layers": small, "folder": str(Path(slm.folder).resolve())},
        "tokenizer": tokenizer,
        "source": options.source,
        "map_method": options.map_method,
        "layer_map": layer_map,
        "sink_tokens": options.sink_tokens,
        "similarity": {m: {f: [[round(v, 4) for v in row] for row in t.tolist()] for f, t in by.items()}
                       for m, by in sims.items()},
        "r2": fit_report["r2"],
        "lambda": fit_report["lambda"],
        "calibration": {"files": cal.files, "fit_windows": len(windows) - heldout, "heldout_windows": heldout,
                        "window_tokens": options.window, "tokens": cal.tokens,
                        "rows": int(cal.llm_fit.hidden[0].shape[0]), "continuation_tokens": options.continuation,
                        "forward_s": cal.seconds},
    }
    alignment = Alignment(meta, maps)
    if options.refine_steps and cal.full_fit and cal.full_test:
        alignment.meta["refine"] = {"steps": options.refine_steps, "windows": len(cal.full_fit),
                                    **refine_maps(slm, alignment, cal.full_fit, cal.full_test,
                                                  steps=options.refine_steps, seed=options.seed, progress=progress)}
    alignment.meta["heldout"] = measure_heldout(llm, slm, alignment, cal.heldout_windows, progress)
    alignment.meta["seconds"] = round(time.perf_counter() - started, 1)
    return alignment


def plot_similarity(alignment: Alignment, folder: Path) -> list[Path]:
    """`cka.png` and `rsa.png`: SLM layer x LLM layer heatmaps per feature, the layer map drawn on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    meta = alignment.meta
    for method, by_feature in meta["similarity"].items():
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.6))
        for ax, feature in zip(axes, FEATURES):
            image = ax.imshow(by_feature[feature], origin="lower", aspect="auto", cmap="viridis")
            ax.plot(alignment.layer_map, range(len(alignment.layer_map)), "w.-", linewidth=1, markersize=4)
            ax.set_title(f"{method.upper()} on {feature}")
            ax.set_xlabel(f"{meta['llm']['name']} layer")
            ax.set_ylabel(f"{meta['slm']['name']} layer")
            fig.colorbar(image, ax=ax, fraction=0.046)
        fig.suptitle(f"{method.upper()} similarity; white: the {meta['map_method']} layer map")
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
    values and queries per layer (`[T, dim]` each)."""

    regressor: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    queries: list[torch.Tensor]


    @staticmethod
    def of(large: LayerFeatures, small: LayerFeatures, source: str) -> "FullWindow":
        # clones: features come out of inference mode, and autograd may not save inference tensors
        return FullWindow([regressor(large, l, source).clone() for l in range(len(large.hidden))],
                          [t.clone() for t in small.keys], [t.clone() for t in small.values],
                          [t.clone() for t in small.queries])


def refine_maps(slm: LoadedModel, alignment: Alignment, fit: list[FullWindow], test: list[FullWindow], *,
                steps: int = 300, queries: int = 256, lr: float = 0.01, seed: int = 0,
                progress: Progress | None = None) -> dict:
    """Tune each layer's maps (from the ridge fit) by Adam so that the SLM's own queries, attending over
    the projected keys and values, give the attention output they give over its own (after `o_proj`,
    relative squared error). A layer keeps the tuned maps only if its held-out error falls."""
    sink = alignment.sink_tokens
    generator = torch.Generator().manual_seed(seed)
    longest = max(w.keys[0].shape[0] for w in fit + test)
    cos, sin = (t.clone() for t in kvcache.rope_tables(slm.model, 0, longest))
    _, kv_heads, _ = kvcache.kv_geometry(slm.model)
    report = {"before": [], "after": [], "kept": []}
    for s, l in enumerate(alignment.layer_map):
        if progress:
            progress("refining maps (layers)", s, len(alignment.layer_map))
        rows = torch.cat([w.regressor[l][sink:] for w in fit])
        mean, std = rows.mean(0), rows.std(0).clamp_min(1e-6)
        params = {}
        for part in ("key", "value"):
            weight, bias = alignment.maps[f"{s}.{part}.weight"], alignment.maps[f"{s}.{part}.bias"]
            params[part] = (weight * std[:, None]).clone().requires_grad_(), (bias + mean @ weight).clone().requires_grad_()

        def heads(rows):
            return to_heads(rows, kv_heads)

        def loss(window: FullWindow, positions: torch.Tensor) -> torch.Tensor:
            x = (window.regressor[l] - mean) / std
            kv = []
            for part, own in (("key", window.keys[s]), ("value", window.values[s])):
                weight, bias = params[part]
                kv.append(heads(torch.cat([own[:sink], x[sink:] @ weight + bias])))
            with torch.no_grad():
                target = kvcache.attention_output(slm.model, s, window.queries[s], heads(window.keys[s]),
                                                  heads(window.values[s]), cos, sin, positions)
            out = kvcache.attention_output(slm.model, s, window.queries[s], kv[0], kv[1], cos, sin, positions)
            return ((out - target) ** 2).mean() / (target ** 2).mean()

        def held_out() -> float:
            with torch.no_grad():
                return sum(loss(w, torch.arange(sink, w.keys[0].shape[0])).item() for w in test) / len(test)

        before = held_out()
        optimizer = torch.optim.Adam([{"params": [w], "lr": lr * w.detach().abs().mean().item()} for pair in params.values() for w in pair])
        with torch.enable_grad():
            for step in range(steps):
                window = fit[step % len(fit)]
                length = window.keys[0].shape[0]
                positions = sink + torch.randperm(length - sink, generator=generator)[:queries].sort().values
                optimizer.zero_grad()
                loss(window, positions).backward()
                optimizer.step()
        after = held_out()
        kept = after < before
        if kept:
            for part, (weight, bias) in params.items():
                raw = (weight.detach() / std[:, None]).contiguous()
                alignment.maps[f"{s}.{part}.weight"] = raw
                alignment.maps[f"{s}.{part}.bias"] = (bias.detach() - mean @ raw).contiguous()
        report["before"].append(round(before, 5))
        report["after"].append(round(after, 5))
        report["kept"].append(kept)
    if progress:
        progress("refining maps (layers)", len(alignment.layer_map), len(alignment.layer_map))
    return report
