"""celslm prefill: compute a context's KV cache and write it as an artifact."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer

from celslm import prompting
from celslm.artifact import DTYPES, MemoryReader, write_artifact
from celslm.store.http import CacheClient
from celslm.store.tiers import push as push_artifact
from celslm.errors import UsageError
from celslm.models import load_model
from celslm.prefill import prefill as run_prefill
from .common import ForceOpt, JsonOpt, ModelOpt, TokenOpt, examples, log, print_json, progress_bar, read_file_or_stdin

EPILOG = examples(
    "celslm prefill -m qwen2.5-coder-0.5b --context samples/context/fnmatch.py --out fnmatch.kv",
    "cat notes.txt | celslm prefill -m ./my-model --context - --out notes.kv --json",
    "celslm prefill -m smollm2-135m -c doc.txt -o - | ssh edge celslm decode -m smollm2-135m --kv - --prompt 'Summarize.'",
    "celslm prefill -m qwen2.5-coder-0.5b -c sched.py --push http://cloud:8470 --tag sched:latest",
)


def prefill(
    model: ModelOpt,
    context: Annotated[str, typer.Option("--context", "-c", help="Context text file, or - for stdin.")],
    out: Annotated[str | None, typer.Option("--out", "-o", help="Artifact directory to write (NAME.kv), or - for a tar stream on stdout.")] = None,
    chunk_size: Annotated[int, typer.Option("--chunk-size", min=1, help="Tokens per chunk (one block per chunk and layer).")] = 256,
    dtype: Annotated[str, typer.Option("--dtype", help=f"Storage dtype of the blocks: {', '.join(DTYPES)}. float32 is exact.")] = "float32",
    raw: Annotated[bool, typer.Option("--raw", help="Prefill the context as plain text, not as the opening of a chat turn.")] = False,
    push: Annotated[str | None, typer.Option("--push", help="Upload the artifact to this serve-cache URL (only missing blobs).")] = None,
    tag: Annotated[str | None, typer.Option("--tag", help="With --push: point this tag at the artifact.")] = None,
    token: TokenOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Compute a context's KV cache and write it as an artifact (directory, tar stream, or a server)."""
    if out is None and push is None:
        raise UsageError("give --out PATH (or -) and/or --push URL")
    if tag and not push:
        raise UsageError("--tag goes with --push")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if out == "-" and sys.stdout.isatty():
        raise UsageError("--out - writes a binary tar stream; redirect stdout to a file or a pipe")
    if out == "-" and json_:
        raise UsageError("--json needs --out PATH: with --out - stdout carries the artifact")
    text = read_file_or_stdin(context, "--context")
    started = time.perf_counter()
    with progress_bar() as progress:
        loaded = load_model(model, progress)
        framing = "raw" if raw else prompting.default_framing(loaded.tokenizer)
        token_ids = prompting.context_ids(loaded.tokenizer, text, framing)
        artifact = run_prefill(loaded, token_ids, framing=framing, chunk_size=chunk_size, dtype=dtype,
                               progress=lambda done, total: progress("prefill (tokens)", done, total))
    if out is not None:
        write_artifact(artifact, out, force=force, stdout=sys.stdout.buffer)
    pushed = push_artifact(MemoryReader(artifact), CacheClient(push, token), tag) if push else None
    m = artifact.manifest
    summary = {
        "id": artifact.id,
        "out": out,
        "space": m.space,
        "tokens": m.token_count,
        "chunks": m.chunks,
        "layers": m.layers,
        "bytes": m.blob_bytes(),
        "prefill_s": m.timings["prefill_s"],
        "seconds": round(time.perf_counter() - started, 3),
        **({"push": pushed} if pushed else {}),
    }
    if json_:
        print_json(summary)
    else:
        log(f"wrote {artifact.id} to {out or push}: {m.token_count} tokens, {m.layers} layers x {m.chunks} chunks, "
            f"{m.blob_bytes() / 2**20:.1f} MiB, prefill {m.timings['prefill_s']:.2f} s")
