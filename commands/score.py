"""celslm score: perplexity of a continuation after an artifact's context."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from celslm.artifact import open_artifact
from celslm.errors import UsageError
from celslm.models import default_engine, load_model
from .common import (EngineOpt, IdentityOpt, JsonOpt, LinkTokensOpt, ModelOpt, check_link_tokens, examples, for_option,
                     identity, identity_hint, print_json, progress_bar, read_file_or_stdin)

EPILOG = examples(
    "celslm score -m qwen2.5-coder-0.5b --kv sched.kv --continuation next.py",
    "celslm score -m qwen2.5-coder-0.5b --kv sched-small.kv --ref sched.kv --continuation next.py --json",
    "celslm score -m qwen2.5-coder-0.5b --continuation next.py",
    "celslm score -m qwen2.5-coder-0.5b --kv models.kv --kv views.kv --link-tokens 32 --continuation urls.py --json",
)


def score(
    model: ModelOpt,
    continuation: Annotated[str, typer.Option("--continuation", help="Text that follows the context: a file, or - for stdin.")],
    kv: Annotated[list[str] | None, typer.Option("--kv", help="Context artifact; without it the continuation is scored alone. Repeat it to score after several contexts composed, as decode composes them.")] = None,
    ref: Annotated[str | None, typer.Option("--ref", help="Reference artifact: adds top-1 next-token agreement with decoding from it.")] = None,
    recompute_last: Annotated[int | None, typer.Option("--recompute-last", min=0, help="Prefill at least the context's last N tokens here, over the artifact's earlier chunks, as decode does. Default: as decode (what a cross-model artifact's alignment advises, 0 for a native one).")] = None,
    link_tokens: LinkTokensOpt = None,
    engine: EngineOpt = None,
    identity_: IdentityOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Mean negative log-likelihood and perplexity of a continuation after an artifact's context."""
    from celslm.compose import DEFAULT_LINK, context_from_readers  # torch and transformers: not for --help
    from celslm.edge import advised_recompute, context_from_reader
    from celslm.score import continuation_logits, score as score_logits

    if [continuation, ref, *(kv or ())].count("-") > 1:
        raise UsageError("only one of --continuation, --kv and --ref can read stdin")
    check_link_tokens(link_tokens, kv)
    text = read_file_or_stdin(continuation, "--continuation")
    keys = identity(identity_)
    with progress_bar() as progress:
        with for_option("--engine"):
            engine = default_engine(model, engine)
        loaded = load_model(model, progress, engine=engine)
    if recompute_last is not None and not kv:
        raise UsageError("--recompute-last goes with --kv")
    ids = loaded.tokenizer(text, add_special_tokens=not kv)["input_ids"]
    recomputed = 0

    def logits_after(artifacts: list[str], own_last: int | None = 0, main: bool = False):
        nonlocal recomputed
        if not artifacts:
            return continuation_logits(loaded, None, ids)
        readers = [open_artifact(artifact, stdin=sys.stdin.buffer, identity=keys) for artifact in artifacts]
        own_last = advised_recompute(readers[-1].manifest) if own_last is None else own_last
        with identity_hint():
            if len(readers) == 1:
                context = context_from_reader(loaded, readers[0], recompute_last=own_last)
            else:
                context = context_from_readers(loaded, readers, recompute_last=own_last,
                                               link_tokens=DEFAULT_LINK if link_tokens is None else link_tokens)
        recomputed = context.stats.recomputed_tokens if main else recomputed
        return continuation_logits(loaded, context, ids)

    logits, targets = logits_after(kv or [], recompute_last, main=True)
    reference = logits_after([ref])[0] if ref else None
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
