"""celslm decode: generate from a KV artifact (or an edge-only prefill) and a private prompt."""

from __future__ import annotations

import itertools
import sys
from typing import Annotated

import typer
from rich.table import Table

from celslm import prompting
from celslm.artifact import prefix_hashes
from celslm.decode import (DecodeStats, Sampling, TextStream, context_from_artifact, context_from_ids, context_from_prefix,
                           eos_ids, generate)
from celslm.store.tiers import BlobSourceReader, make_tiers, open_ref
from celslm.stream import Link
from celslm.errors import IntegrityError, UnavailableError, UsageError
from celslm.models import load_model
from .common import (CloudOpt, JsonOpt, ModelOpt, PeerOpt, TokenOpt, err_console, examples, log, print_json, progress_bar,
                     read_file_or_stdin, read_text)

EPILOG = examples(
    "celslm decode -m qwen2.5-coder-0.5b --kv fnmatch.kv --prompt 'What does fnmatch.filter return?'",
    "celslm decode -m qwen2.5-coder-0.5b --context samples/context/fnmatch.py --prompt 'What does filter return?' --stats",
    "celslm prefill -m smollm2-135m -c doc.txt -o - | celslm decode -m smollm2-135m --kv - --prompt 'Summarize.' --json",
    "celslm decode -m qwen2.5-coder-0.5b --kv sched:latest --peer http://peer:8470 --cloud http://cloud:8470 -p 'Why?'",
    "celslm decode -m qwen2.5-coder-0.5b --context sched.py --cloud http://cloud:8470 -p 'Why?'   # cached prefix + local rest",
    "celslm decode -m qwen2.5-coder-0.5b --kv sched-cross.kv --recompute-last 512 -p 'Why?'   # cross-model KV + own recent tokens",
)


def decode(
    model: ModelOpt,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The private prompt text, or - for stdin. Never leaves this machine.")],
    kv: Annotated[str | None, typer.Option("--kv", help="KV artifact: a directory, .tar file, - (stdin), an artifact id, a tag, or a server URL.")] = None,
    context: Annotated[str | None, typer.Option("--context", "-c", help="Context file (or -): edge-only without --kv; with --kv, recomputes what cannot be fetched.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Stop after this many tokens.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 is greedy; above 0 samples.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass (with --temperature > 0).")] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed for sampling, for repeatable output.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Do not apply the model's chat template to the prompt.")] = False,
    peer: PeerOpt = None,
    cloud: CloudOpt = None,
    token: TokenOpt = None,
    recompute_last: Annotated[int, typer.Option("--recompute-last", min=0, help="With --kv: prefill at least the context's last N tokens here, over the artifact's earlier chunks (trades edge compute for quality with cross-model artifacts).")] = 0,
    chunk_size: Annotated[int, typer.Option("--chunk-size", min=1, help="With --context and servers: chunk size of the prefix lookup.")] = 256,
    link: Annotated[str | None, typer.Option("--link", help="Emulate a link for the artifact's bytes, RATE[:RTT] (e.g. 100mbit:20ms); numbers are labelled emulated.")] = None,
    pipeline: Annotated[bool, typer.Option("--pipeline/--no-pipeline", help="Run the prompt's layer l as soon as layer l's KV is in (default), or wait for all of it.")] = True,
    stats: Annotated[bool, typer.Option("--stats", help="Print the time split on stderr after generation.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Generate from a KV artifact (or an edge-only prefill) and a private prompt."""
    if kv is None and context is None:
        raise UsageError("give --kv ARTIFACT, --context FILE (edge-only), or both (the context recomputes what cannot be fetched)")
    if recompute_last and kv is None:
        raise UsageError("--recompute-last goes with --kv")
    if prompt == "-" and "-" in (kv, context):
        raise UsageError("only one of --prompt and --kv/--context can read stdin")
    prompt_text = read_text(prompt, "--prompt")
    shaped = Link.parse(link) if link else None
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    context_text = read_file_or_stdin(context, "--context") if context is not None else None
    with progress_bar() as progress:
        loaded = load_model(model, progress)
        prefill_progress = lambda done, total: progress("prefill (tokens)", done, total)  # noqa: E731
        tiers, reader = None, None
        try:
            if kv is not None:
                reader, tiers = open_ref(kv, peer or [], cloud, token, stdin=sys.stdin.buffer)
                if recompute_last:
                    m = reader.manifest
                    keep = max(0, m.token_count - recompute_last) // m.chunk_size
                    ctx = context_from_prefix(loaded, None, m.framing, reader, keep, m.chunk_size, prefill_progress,
                                              link=shaped)
                else:
                    ctx = context_from_artifact(loaded, reader, link=shaped, pipeline=pipeline)
            else:
                framing = prompting.default_framing(loaded.tokenizer)
                token_ids = prompting.context_ids(loaded.tokenizer, context_text, framing)
                found = None
                if peer or cloud:  # ask for the longest cached prefix; prefill only the rest here
                    tiers = make_tiers(peer or [], cloud, token)
                    found = tiers.lookup(loaded.fingerprint, prefix_hashes(token_ids, loaded.fingerprint, chunk_size))
                if found:
                    reader = tiers.reader(found[0])
                    ctx = context_from_prefix(loaded, token_ids, framing, reader, found[1], chunk_size,
                                              prefill_progress, link=shaped)
                else:
                    ctx = context_from_ids(loaded, token_ids, framing=framing, step=chunk_size, progress=prefill_progress)
            ids = prompting.prompt_ids(loaded.tokenizer, prompt_text, ctx.framing, raw)
            tokens = generate(loaded, ctx, ids, sampling)
            first = next(tokens)  # with pipelining, the artifact is still arriving until here
        except (IntegrityError, UnavailableError) as exc:
            if context_text is None or kv is None:
                raise
            log(f"warning: {exc}; recomputing what could not be fetched from --context")
            ctx = fallback_context(loaded, context_text, reader, tiers, chunk_size, prefill_progress)
            ctx.stats.fallback = str(exc)
            ids = prompting.prompt_ids(loaded.tokenizer, prompt_text, ctx.framing, raw)
            tokens = generate(loaded, ctx, ids, sampling)
            first = next(tokens)
        if tiers:
            ctx.stats.bytes_by_source = dict(tiers.bytes_by_source)
    artifact_id = reader.id if reader is not None and ctx.stats.path != "edge-only" else None
    stream = TextStream(loaded.tokenizer, skip=eos_ids(loaded))
    pieces = []
    for token in itertools.chain([first], tokens):
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


def fallback_context(loaded, text: str, reader, tiers, chunk_size: int, progress):
    """The artifact could not be had whole: reuse the chunks every tier can still give, prefill the rest."""
    framing = reader.manifest.framing if reader is not None else prompting.default_framing(loaded.tokenizer)
    token_ids = prompting.context_ids(loaded.tokenizer, text, framing)
    chunks = tiers.available_prefix(reader.manifest) if tiers is not None and reader is not None else 0
    if chunks:
        source = BlobSourceReader(reader.manifest, reader.source, tiers)
        try:
            return context_from_prefix(loaded, token_ids, framing, source, chunks, chunk_size, progress)
        except IntegrityError:
            pass  # the artifact holds another context than --context: recompute it all
    return context_from_ids(loaded, token_ids, framing=framing, step=chunk_size, progress=progress)


def stats_json(s: DecodeStats) -> dict:
    seconds = ("t_com_c_s", "t_comm_s", "t_com_e_s", "ttft_s", "total_s", "load_s", "context_prefill_s",
               "prompt_prefill_s", "generate_s")
    return {
        "path": s.path,
        "pipelined": s.pipelined,
        "link": s.link,
        **{name: round(getattr(s, name), 6) for name in seconds},
        "hidden_share": round(s.hidden_share, 4),
        "bytes_by_source": s.bytes_by_source,
        "context_tokens": s.context_tokens,
        "prompt_tokens": s.prompt_tokens,
        "new_tokens": s.new_tokens,
        "artifact_bytes": s.artifact_bytes,
        "cloud_prefill_s": s.cloud_prefill_s,
        "fallback": s.fallback,
    }


def stats_table(s: DecodeStats) -> Table:
    title = f"time split ({s.path}{', pipelined' if s.pipelined else ''}{', ' + s.link if s.link else ''})"
    table = Table(title=title, show_header=True)
    table.add_column("part")
    table.add_column("seconds", justify="right")
    rows = [
        ("T_com_C  cloud compute (from the manifest)", s.t_com_c_s),
        ("T_comm   transfer" + (" (emulated)" if s.link else ""), s.t_comm_s),
        ("T_com_E  edge compute", s.t_com_e_s),
        ("  of which context prefill here", s.context_prefill_s),
        (f"  of which prompt prefill ({s.prompt_tokens} tokens)", s.prompt_prefill_s),
        (f"  of which decode ({s.new_tokens} tokens)", s.generate_s),
        ("time to first token (wall)", s.ttft_s),
        ("total on this machine (wall)", s.total_s),
    ]
    for part, seconds in rows:
        table.add_row(part, f"{seconds:.3f}")
    table.add_row("transfer hidden by pipelining", f"{s.hidden_share:.0%}")
    for source, count in s.bytes_by_source.items():
        table.add_row(f"bytes from {source}", f"{count:,}")
    return table
