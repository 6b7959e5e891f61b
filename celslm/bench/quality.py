"""Cross-model quality, measured: what the small model loses when its context KV comes from the large one.

Held-out standard-library files never used to calibrate the alignment. Per file: a context of
`context` tokens and the next `continuation` tokens, scored teacher-forced by the small model (SLM)
after each way of getting the context into its cache:

  own prefill         the SLM prefills the whole context itself (the reference; nothing on the link)
  no context          only the sink token(s)
  native artifact     the SLM's own KV, prefilled in the cloud and shipped (the codec applied)
  cross               every layer projected from the large model (LLM), own KV for the sink token(s)
  hybrid k            the SLM's own first k layers, the rest projected
  own last N          equal-compute baseline: the SLM prefills the sink token(s) + the last N context
                      tokens itself, N matched to hybrid k's edge compute (N ~ T * k / layers, rounded
                      up to whole 64-token chunks)
  cross + own last N  token split at the same compute: the cross artifact's first T - N tokens, and
                      the SLM prefills the last N itself over them (`decode --recompute-last N`)
  decode's default    the token split the alignment advises (`HeldOut.advised_split`), which `decode`
                      and `score` use for its cross-model artifacts unless told otherwise
  LLM alone           the large model after its own prefill (its own NLL; a different model)

Edge prefill avoided counts layer-tokens the edge does not compute, assuming a hybrid's native layers
are computed at the edge (when the cloud or a peer computes them, the edge avoids all of it).

With `edge` (the small model on llama.cpp, from its GGUF), the artifacts are also scored where an edge
runs them: own prefill, no context, the native and cross artifacts and each token split, on llama.cpp,
each row's gain kept against llama.cpp's own prefill and no-context NLL.

The files come from `corpus`: held-out standard-library modules (in the domain the default alignment
is calibrated on), third-party libraries installed beside celslm (out of it), or a folder of the
user's; an alignment's calibration files are never among them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from rich.table import Table

from celslm.align import gain_kept
from celslm.artifact import MemoryReader
from celslm.manifest import Producer
from celslm.blocks import build_artifact
from celslm.calibrate import codec_codebook
from celslm.codecs import parse_codec
from celslm.corpus import corpus_label, eval_cases
from celslm.decode import context_from_artifact, context_from_ids, context_from_layers
from celslm.edge import context_from_reader, kept_chunks
from celslm.errors import UsageError
from celslm.models import LoadedModel
from celslm.features import layer_features, native_layers, to_heads
from celslm.projection import Alignment, cross_layers
from celslm.score import continuation_logits, nll as mean_nll, top1

Progress = Callable[[str, int, int | None], None]
CHUNK = 64  # tokens per chunk of the shipped artifacts: the granularity of a token split


@dataclass
class Mode:
    name: str
    kind: str  # reference | baseline | celslm | llm
    edge_avoided: float = 0.0  # share of the full prefill's layer-tokens not computed at the edge
    link_bytes: float = 0.0  # mean bytes on the link per context
    nll: list[float] = field(default_factory=list)
    top1: list[float] = field(default_factory=list)
    engine: str = "transformers"


def run(llm: LoadedModel, slm: LoadedModel, alignment: Alignment, *, files: int = 20, context: int = 1024,
        continuation: int = 128, native_counts: tuple[int, ...] = (4, 8, 12, 16), budget: float = 0.02,
        codec: str = "balanced", corpus: str = "stdlib", edge: LoadedModel | None = None,
        progress: Progress | None = None) -> dict:
    layers_total = slm.engine.geometry.layers
    sink = alignment.sink_tokens
    calibration = set(alignment.report["calibration"]["files"])
    cases = eval_cases(slm.tokenizer, files, context, context, continuation, exclude=calibration, source=corpus)
    if not cases:
        raise UsageError(f"{corpus_label(corpus)}: no file gives {context} context and {continuation} continuation tokens "
                         "(calibration files excluded)")
    auto = alignment.budget_native_layers(budget)
    counts = sorted({k for k in native_counts if 0 < k < layers_total} | ({auto} if auto else set()))
    spec = parse_codec(codec)
    codebook = codec_codebook(spec, slm)
    modes = {"own": Mode("own prefill (exact)", "reference"), "none": Mode("no context (sink only)", "baseline", 1.0),
             "native": Mode(f"native artifact ({codec})", "celslm", 1.0), "cross": Mode(f"cross ({codec})", "celslm", 1.0)}
    advised = alignment.heldout.advised_split() if alignment.heldout else 0
    if advised:
        modes["advised"] = Mode(f"cross + own last {advised}, decode's default ({codec})", "celslm")
    for k in counts:
        label = f"hybrid k={k}" + (f" (auto, budget {budget:.0%})" if k == auto else "")
        modes[f"hybrid{k}"] = Mode(f"{label} ({codec})", "celslm", 1 - k / layers_total)
        modes[f"last{k}"] = Mode(f"own last N, compute of k={k}", "baseline")
        modes[f"split{k}"] = Mode(f"cross + own last N, compute of k={k} ({codec})", "celslm")
    modes["llm"] = Mode(f"{llm.name} alone", "llm", 1.0)
    if edge is not None:
        on_edge = {"engine": "llama.cpp"}
        modes |= {"edge-own": Mode("own prefill (exact)", "reference", **on_edge),
                  "edge-none": Mode("no context (sink only)", "baseline", 1.0, **on_edge),
                  "edge-native": Mode(f"native artifact ({codec})", "celslm", 1.0, **on_edge),
                  "edge-cross": Mode(f"cross ({codec})", "celslm", 1.0, **on_edge)}
        if advised:
            modes["edge-advised"] = Mode(f"cross + own last {advised}, decode's default ({codec})", "celslm", **on_edge)
        for k in counts:
            modes[f"edge-split{k}"] = Mode(f"cross + own last N, compute of k={k} ({codec})", "celslm", **on_edge)
    llm_heads = llm.engine.geometry.kv_heads
    for index, case in enumerate(cases):
        if progress:
            progress("quality (files)", index, len(cases))
        ctx, cont = case.context, case.continuation
        with torch.inference_mode():
            features = layer_features(llm, ctx)
            own = native_layers(slm, ctx, layers_total)
            projected = cross_layers(llm, slm, alignment, ctx, (), features)
            ref_logits, targets = continuation_logits(slm, context_from_layers(slm, ctx, own), cont)

            def record(key: str, logits, link_bytes: int = 0) -> None:
                mode = modes[key]
                mode.nll.append(mean_nll(logits, targets))
                mode.top1.append(top1(logits, ref_logits))
                mode.link_bytes += link_bytes / len(cases)

            def shipped(key: str, layers, provenance):
                artifact = build_artifact(space=slm.space, producer=Producer(llm.name, llm.fingerprint, alignment.digest),
                                          token_ids=ctx, layers=layers, chunk_size=CHUNK, dtype="float32",
                                          framing="raw", provenance=provenance, codec=spec, codebook=codebook)
                logits, _ = continuation_logits(slm, context_from_artifact(slm, MemoryReader(artifact)), cont)
                record(key, logits, artifact.manifest.blob_bytes())
                return artifact

            record("own", ref_logits)
            sink_only = [(k[:, :sink], v[:, :sink]) for k, v in own]
            record("none", continuation_logits(slm, context_from_layers(slm, ctx[:sink], sink_only), cont)[0])
            native = shipped("native", own, ["native"] * layers_total)
            cross = shipped("cross", projected, ["projected"] * layers_total)
            if advised:
                modes["advised"].edge_avoided += (1 - _tail(cross, len(ctx), advised) / len(ctx)) / len(cases)
                record("advised", continuation_logits(slm, context_from_reader(slm, MemoryReader(cross), recompute_last=advised,
                                                                               pipeline=False), cont)[0],
                       sum(ref.size for ref in cross.manifest.blob_refs(kept_chunks(cross.manifest, advised))))
            for k in counts:
                shipped(f"hybrid{k}", own[:k] + projected[k:], ["native"] * k + ["projected"] * (layers_total - k))
                recompute, kept, tail = _split(cross, len(ctx), k, layers_total)
                short = ctx[:sink] + ctx[len(ctx) - tail :]
                modes[f"last{k}"].edge_avoided += (1 - len(short) / len(ctx)) / len(cases)
                record(f"last{k}", continuation_logits(slm, context_from_layers(slm, short, native_layers(slm, short, layers_total)), cont)[0])
                split = context_from_reader(slm, MemoryReader(cross), recompute_last=recompute, pipeline=False)
                modes[f"split{k}"].edge_avoided += (1 - tail / len(ctx)) / len(cases)
                record(f"split{k}", continuation_logits(slm, split, cont)[0],
                       sum(ref.size for ref in cross.manifest.blob_refs(kept)))
            if edge is not None:
                _on_the_edge(edge, modes, case, native, cross, counts, layers_total, sink, len(cases), advised)
            llm_kv = [(to_heads(k, llm_heads), to_heads(v, llm_heads)) for k, v in zip(features.keys, features.values)]
            llm_logits, _ = continuation_logits(llm, context_from_layers(llm, ctx, llm_kv), cont)
            modes["llm"].nll.append(mean_nll(llm_logits, targets))
    if progress:
        progress("quality (files)", len(cases), len(cases))
    references = {engine: (_mean(modes[f"{prefix}own"].nll), _mean(modes[f"{prefix}none"].nll))
                  for engine, prefix in (("transformers", ""), ("llama.cpp", "edge-")) if f"{prefix}own" in modes}
    rows = []
    for key, mode in modes.items():
        nll = _mean(mode.nll)
        own_nll, none_nll = references.get(mode.engine, references["transformers"])
        rows.append({
            "mode": mode.name, "key": key, "kind": mode.kind, "engine": mode.engine, "nll": round(nll, 5),
            "ppl": round(math.exp(nll), 4),
            "ppl_vs_own": round(math.exp(nll - own_nll), 5), "gain_kept": round(gain_kept(nll, own_nll, none_nll), 4),
            "top1_vs_own": round(_mean(mode.top1), 4) if mode.top1 else None,
            "link_bytes": round(mode.link_bytes), "edge_prefill_avoided": round(mode.edge_avoided, 4),
        })
    return {
        "llm": llm.name, "slm": slm.name, "alignment": alignment.digest, "source": alignment.source,
        "map": alignment.map_method, "codec": spec.spec, "budget": budget, "auto_native_layers": auto, "advised_split": advised,
        "corpus": corpus_label(corpus), "files": [c.name for c in cases], "context_tokens": context,
        "continuation_tokens": continuation, "engines": list(references), "rows": rows,
    }


def _split(cross, tokens: int, k: int, layers_total: int) -> tuple[int, int, int]:
    """A token split at the edge compute of k native layers: the tokens to recompute, the cross
    artifact's chunks kept, and the tokens the edge prefills (whole chunks)."""
    recompute = round(tokens * k / layers_total)
    kept = kept_chunks(cross.manifest, recompute) if recompute else cross.manifest.chunks
    return recompute, kept, tokens - min(tokens, kept * CHUNK)


def _tail(cross, tokens: int, recompute: int) -> int:
    """The tokens the edge prefills for `decode --recompute-last recompute` (whole chunks)."""
    return tokens - min(tokens, kept_chunks(cross.manifest, recompute) * CHUNK)


def _on_the_edge(edge: LoadedModel, modes: dict, case, native, cross, counts, layers_total: int, sink: int,
                 cases: int, advised: int = 0) -> None:
    """One file's rows on llama.cpp: its own prefill and no context, the shipped native and cross
    artifacts, and each token split over the cross artifact (`decode --recompute-last N`)."""
    ctx, cont = case.context, case.continuation
    reference, targets = continuation_logits(edge, context_from_ids(edge, ctx, framing="raw"), cont)

    def record(key: str, context, link_bytes: int = 0) -> None:
        logits, _ = continuation_logits(edge, context, cont)
        mode = modes[key]
        mode.nll.append(mean_nll(logits, targets))
        mode.top1.append(top1(logits, reference))
        mode.link_bytes += link_bytes / cases

    modes["edge-own"].nll.append(mean_nll(reference, targets))
    modes["edge-own"].top1.append(1.0)
    record("edge-none", context_from_ids(edge, ctx[:sink], framing="raw"))
    record("edge-native", context_from_artifact(edge, MemoryReader(native)), native.manifest.blob_bytes())
    record("edge-cross", context_from_artifact(edge, MemoryReader(cross)), cross.manifest.blob_bytes())
    if advised:
        modes["edge-advised"].edge_avoided += (1 - _tail(cross, len(ctx), advised) / len(ctx)) / cases
        record("edge-advised", context_from_reader(edge, MemoryReader(cross), recompute_last=advised, pipeline=False),
               sum(ref.size for ref in cross.manifest.blob_refs(kept_chunks(cross.manifest, advised))))
    for k in counts:
        recompute, kept, tail = _split(cross, len(ctx), k, layers_total)
        modes[f"edge-split{k}"].edge_avoided += (1 - tail / len(ctx)) / cases
        record(f"edge-split{k}", context_from_reader(edge, MemoryReader(cross), recompute_last=recompute, pipeline=False),
               sum(ref.size for ref in cross.manifest.blob_refs(kept)))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def render(result: dict) -> list:
    """The table `bench quality` prints."""
    engines = result.get("engines", ["transformers"])
    table = Table("mode", *(["engine"] if len(engines) > 1 else []), "NLL", "ppl vs own", "gain kept", "top-1 vs own",
                  "link bytes", "edge prefill avoided",
                  title=f"{result['slm']} from {result['llm']} ({result['source']} maps, {result['map']} map), "
                        f"{len(result['files'])} held-out files ({result.get('corpus', 'stdlib')}), "
                        f"{result['context_tokens']}-token contexts, {result['continuation_tokens']}-token continuations")
    for row in result["rows"]:
        top1 = "n/a" if row["top1_vs_own"] is None else f"{row['top1_vs_own']:.3f}"
        table.add_row(row["mode"], *([row.get("engine", "transformers")] if len(engines) > 1 else []), f"{row['nll']:.4f}",
                      f"{row['ppl_vs_own']:.4f}", f"{row['gain_kept']:.0%}", top1, f"{row['link_bytes']:,}",
                      f"{row['edge_prefill_avoided']:.0%}")
    return [table]
