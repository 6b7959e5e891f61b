"""bench engines: how far apart transformers (fp32 reference) and llama.cpp (the GGUF as it is) are,
on artifacts each made, scored by each, on held-out standard-library files.

For every file: each engine prefills the context (its KV becomes an exact, float32 artifact), and each
engine scores the continuation after each artifact and after its own prefill (teacher-forced mean
NLL, as `celslm score`). The diagonal is each engine on its own KV; off the diagonal, an artifact
crossing engines. A nonzero difference between columns is what crossing costs; between rows, what
the engine costs (quantized weights and an f16 cache against fp32).
"""

from __future__ import annotations

import statistics
from typing import Callable

from rich.table import Table

from celslm.artifact import MemoryReader
from celslm.blocks import build_artifact
from celslm.corpus import eval_cases
from celslm.decode import context_from_artifact, context_from_ids
from celslm.manifest import Producer
from celslm.models import LoadedModel
from celslm.score import continuation_logits, nll, top1


def run(engines: list[LoadedModel], files: int = 8, context: int = 1024, continuation: int = 256,
        progress: Callable[[str, int, int | None], None] | None = None) -> dict:
    first = engines[0]
    cases = eval_cases(first.tokenizer, files=files, min_context=context, max_context=context, continuation=continuation)
    names = [e.engine.name for e in engines]
    scores = {(reader, maker): [] for reader in names for maker in [*names, "own"]}
    agreement = {reader: [] for reader in names}
    for index, case in enumerate(cases):
        if progress:
            progress("files", index, len(cases))
        artifacts = {}
        for maker in engines:
            sequence = maker.engine.sequence()
            maker.engine.prefill(sequence, case.context)
            layers = maker.engine.context_layers(sequence)
            artifacts[maker.engine.name] = build_artifact(
                space=maker.space, producer=Producer.native(maker.space), token_ids=case.context, layers=layers,
                chunk_size=256, dtype="float32", framing="raw", provenance=["native"] * len(layers))
        for reader in engines:
            name = reader.engine.name
            own_logits, targets = continuation_logits(reader, context_from_ids(reader, case.context, framing="raw"),
                                                      case.continuation)
            scores[name, "own"].append(nll(own_logits, targets))
            for maker, artifact in artifacts.items():
                logits, _ = continuation_logits(reader, context_from_artifact(reader, MemoryReader(artifact)), case.continuation)
                scores[name, maker].append(nll(logits, targets))
                if maker != name:
                    agreement[name].append(top1(logits, own_logits))
    if progress:
        progress("files", len(cases), len(cases))
    mean = {key: statistics.fmean(values) for key, values in scores.items()}
    return {
        "model": first.name, "files": [c.name for c in cases], "context_tokens": context, "continuation_tokens": continuation,
        "nll": [{"engine": reader, "artifact_from": maker, "nll": round(value, 5)} for (reader, maker), value in mean.items()],
        "crossing_cost": {reader: round(mean[reader, other] - mean[reader, reader], 5)
                          for reader in names for other in names if other != reader},
        "engine_gap": round(mean[names[1], "own"] - mean[names[0], "own"], 5) if len(names) > 1 else None,
        "top1_vs_own": {reader: round(statistics.fmean(values), 4) for reader, values in agreement.items() if values},
    }


def render(result: dict) -> list:
    """The table and the costs `bench engines` prints."""
    table = Table("scored on", "artifact from", "mean NLL", title=f"{result['model']}: {len(result['files'])} held-out files, "
                  f"{result['context_tokens']}-token contexts, {result['continuation_tokens']} tokens scored")
    for row in result["nll"]:
        table.add_row(row["engine"], row["artifact_from"].replace("own", "its own prefill"), f"{row['nll']:.4f}")
    shown: list = [table]
    for reader, cost in result["crossing_cost"].items():
        shown.append(f"on {reader}, the other engine's artifact costs {cost:+.4f} nats/token "
                     f"(top-1 agreement with its own {result['top1_vs_own'][reader]:.1%})")
    shown.append(f"llama.cpp's own prefill vs transformers' own: {result['engine_gap']:+.4f} nats/token")
    return shown
