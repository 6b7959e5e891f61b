"""celslm decode: generate from a KV artifact (or an edge-only prefill) and a private prompt."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.table import Table

from celslm import prompting
from celslm.artifact import open_artifact
from celslm.decode import DecodeStats, Sampling, TextStream, context_from_artifact, context_from_text, eos_ids, generate
from celslm.errors import UsageError
from celslm.models import load_model
from .common import JsonOpt, ModelOpt, err_console, examples, print_json, progress_bar, read_file_or_stdin, read_text

EPILOG = examples(
    "celslm decode -m qwen2.5-coder-0.5b --kv fnmatch.kv --prompt 'What does fnmatch.filter return?'",
    "celslm decode -m qwen2.5-coder-0.5b --context samples/context/fnmatch.py --prompt 'What does filter return?' --stats",
    "celslm prefill -m smollm2-135m -c doc.txt -o - | celslm decode -m smollm2-135m --kv - --prompt 'Summarize.' --json",
)


def decode(
    model: ModelOpt,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The private prompt text, or - for stdin. Never leaves this machine.")],
    kv: Annotated[str | None, typer.Option("--kv", help="KV artifact: a directory, a .tar stream file, or - for a stream on stdin.")] = None,
    context: Annotated[str | None, typer.Option("--context", "-c", help="Edge-only: prefill this context file (or -) here instead of reading --kv.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Stop after this many tokens.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 is greedy; above 0 samples.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (with --temperature > 0).")] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed for sampling, for repeatable output.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Do not apply the model's chat template to the prompt.")] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Print the time split on stderr after generation.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Generate from a KV artifact (or an edge-only prefill) and a private prompt."""
    if (kv is None) == (context is None):
        raise UsageError("give exactly one of --kv ARTIFACT or --context FILE (edge-only)")
    if prompt == "-" and "-" in (kv, context):
        raise UsageError("only one of --prompt and --kv/--context can read stdin")
    prompt_text = read_text(prompt, "--prompt")
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    with progress_bar() as progress:
        loaded = load_model(model, progress)
        if kv is not None:
            reader = open_artifact(kv, stdin=sys.stdin.buffer)
            ctx = context_from_artifact(loaded, reader)
            artifact_id = reader.id
        else:
            text = read_file_or_stdin(context, "--context")
            ctx = context_from_text(loaded, text, progress=lambda d, t: progress("prefill (tokens)", d, t))
            artifact_id = None
    ids = prompting.prompt_ids(loaded.tokenizer, prompt_text, ctx.framing, raw)
    stream = TextStream(loaded.tokenizer, skip=eos_ids(loaded))
    pieces = []
    for token in generate(loaded, ctx, ids, sampling):
        piece = stream.push(token)
        pieces.append(piece)
        if not json_ and piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
    tail = stream.flush()
    pieces.append(tail)
    if not json_:
        sys.stdout.write(tail + "\n")
        sys.stdout.flush()
    if stats:
        err_console.print(stats_table(ctx.stats))
    if json_:
        print_json({"text": "".join(pieces), "artifact": artifact_id, **stats_json(ctx.stats)})


def stats_json(s: DecodeStats) -> dict:
    return {
        "path": s.path,
        "context_tokens": s.context_tokens,
        "prompt_tokens": s.prompt_tokens,
        "new_tokens": s.new_tokens,
        "artifact_bytes": s.artifact_bytes,
        "cloud_prefill_s": s.cloud_prefill_s,
        "load_s": round(s.load_s, 6),
        "context_prefill_s": round(s.context_prefill_s, 6),
        "prompt_prefill_s": round(s.prompt_prefill_s, 6),
        "ttft_s": round(s.ttft_s, 6),
        "generate_s": round(s.generate_s, 6),
        "total_s": round(s.total_s, 6),
    }


def stats_table(s: DecodeStats) -> Table:
    table = Table(title=f"time split ({s.path})", show_header=True)
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    rows = [("cloud prefill (from manifest)", s.cloud_prefill_s)] if s.path == "artifact" else []
    rows += [
        ("load artifact (read, verify, inject)" if s.path == "artifact" else "context prefill (here)",
         s.load_s if s.path == "artifact" else s.context_prefill_s),
        (f"prompt prefill ({s.prompt_tokens} tokens)", s.prompt_prefill_s),
        ("time to first token", s.ttft_s),
        (f"decode ({s.new_tokens} tokens)", s.generate_s),
        ("total on this machine", s.total_s),
    ]
    for phase, seconds in rows:
        table.add_row(phase, "-" if seconds is None else f"{seconds:.3f}")
    return table
