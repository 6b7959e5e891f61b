"""celslm score: perplexity of a continuation after an artifact's context."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from celslm.artifact import open_artifact
from celslm.errors import UsageError
from celslm.models import default_engine, load_model
from .common import (EngineOpt, IdentityOpt, JsonOpt, for_option, ModelOpt, examples, identity, identity_hint, print_json,
                     progress_bar, read_file_or_stdin)

EPILOG = examples(
    "celslm score -m qwen2.5-coder-0.5b --kv sched.kv --continuation next.py",
    "celslm score -m qwen2.5-coder-0.5b --kv sched-small.kv --ref sched.kv --continuation next.py --json",
    "celslm score -m qwen2.5-coder-0.5b --continuation next.py",
)


def score(
    model: ModelOpt,
    continuation: Annotated[str, typer.Option("--continuation", help="Text that follows the context: a file, or - for stdin.")],
    kv: Annotated[str | None, typer.Option("--kv", help="Context artifact; without it the continuation is scored alone.")] = None,
    ref: Annotated[str | None, typer.Option("--ref", help="Reference artifact: adds top-1 next-token agreement with decoding from it.")] = None,
    recompute_last: Annotated[int | None, typer.Option("--recompute-last", min=0, help="Prefill at least the context's last N tokens here, over the artifact's earlier chunks, as decode does. Default: as decode (what a cross-model artifact's alignment advises, 0 for a native one).")] = None,
    engine: EngineOpt = None,
    identity_: IdentityOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Mean negative log-likelihood and perplexity of a continuation after an artifact's context."""
    from celslm.edge import advised_recompute, context_from_reader  # torch and transformers: not for --help
    from celslm.score import continuation_logits, score as score_logits

    if continuation == "-" and "-" in (kv, ref):
        raise UsageError("only one of --continuation, --kv and --ref can read stdin")
    text = read_file_or_stdin(continuation, "--continuation")
    keys = identity(identity_)
    with progress_bar() as progress:
        with for_option("--engine"):
            engine = default_engine(model, engine)
        loaded = load_model(model, progress, engine=engine)
    if recompute_last is not None and kv is None:
        raise UsageError("--recompute-last goes with --kv")
    ids = loaded.tokenizer(text, add_special_tokens=kv is None)["input_ids"]
    recomputed = 0

    def logits_after(artifact: str | None, own_last: int | None = 0):
        nonlocal recomputed
        if artifact is None:
            return continuation_logits(loaded, None, ids)
        reader = open_artifact(artifact, stdin=sys.stdin.buffer, identity=keys)
        own_last = advised_recompute(reader.manifest) if own_last is None else own_last
        with identity_hint():
            context = context_from_reader(loaded, reader, recompute_last=own_last)
        recomputed = context.stats.recomputed_tokens if artifact == kv else recomputed
        return continuation_logits(loaded, context, ids)

    logits, targets = logits_after(kv, recompute_last)
    reference = logits_after(ref)[0] if ref else None
    if reference is not None and reference.shape != logits.shape:
        raise UsageError("--ref scores a different number of tokens (give --kv too, or neither)")
    result = score_logits(logits, targets, reference)
    if json_:
        print_json({"nll": round(result.nll, 6), "ppl": round(result.ppl, 4), "tokens": result.tokens, "engine": loaded.engine.name,
                    "recomputed_tokens": recomputed,
                    **({"top1_agreement": round(result.top1_agreement, 6)} if ref else {})})
    else:
        line = f"nll {result.nll:.4f}  ppl {result.ppl:.3f}  tokens {result.tokens}"
        if ref:
            line += f"  top-1 agreement {result.top1_agreement:.4f}"
        print(line)
