"""celslm prefill: compute a context's KV cache and write it as an artifact."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer

from celslm import prompting
from celslm.artifact import MemoryReader, write_artifact
from celslm.manifest import DTYPE_NAMES
from celslm.sealing import seal_artifact
from celslm.store import open_store
from celslm.store.push import push as push_artifact
from celslm.errors import UsageError
from celslm.models import default_engine, load_model
from celslm.trust import sign_artifact, sign_tag
from .common import (ENGINE_HELP, FLAG, EncryptToOpt, ForceOpt, for_option, JsonOpt, ModelOpt, SignOpt, TagValidOpt,
                     TokenOpt, examples, log, parse_budget, parse_duration, print_json, progress_bar, read_file_or_stdin,
                     recipients, signing_key)

EPILOG = examples(
    "celslm prefill -m qwen2.5-coder-0.5b --context samples/context/sched.py --out sched.kv",
    "cat notes.txt | celslm prefill -m ./my-model --context - --out notes.kv --json",
    "celslm prefill -m smollm2-135m -c doc.txt -o - | ssh edge celslm decode -m smollm2-135m --kv - --prompt 'Summarize.'",
    "celslm prefill -m qwen2.5-coder-0.5b -c sched.py --push http://cloud:8470 --tag sched:latest --sign cloud.key",
    "celslm prefill -m qwen2.5-coder-0.5b -c notes.txt -o notes.kv --encrypt-to edge1.pub --encrypt-to edge2.pub --sign cloud.key",
    "celslm prefill -m qwen2.5-coder-1.5b --align coder.align -c sched.py -o sched-cross.kv",
    "celslm prefill -m qwen2.5-coder-1.5b --align coder.align --auto --budget 2% -c sched.py -o sched-hybrid.kv",
)


def parse_native_layers(value: str | None) -> tuple[int, ...]:
    """`K` means the first K layers; `0,1,5` names layers."""
    if not value:
        return ()
    try:
        if "," in value:
            return tuple(sorted({int(v) for v in value.split(",") if v.strip()}))
        return tuple(range(int(value)))
    except ValueError as exc:
        raise UsageError(f"--native-layers {value!r}: give a count K (the first K layers) or a list like 0,1,2") from exc


def prefill(
    model: ModelOpt,
    context: Annotated[str, typer.Option("--context", "-c", help="Context text file, or - for stdin.")],
    out: Annotated[str | None, typer.Option("--out", "-o", help="Artifact directory to write (NAME.kv), or - for a tar stream on stdout.")] = None,
    chunk_size: Annotated[int, typer.Option("--chunk-size", min=1, help="Tokens per chunk (one block per chunk and layer).")] = 256,
    dtype: Annotated[str, typer.Option("--dtype", help=f"Storage dtype of the blocks: {', '.join(DTYPE_NAMES)}. float32 is exact.")] = "float32",
    raw: Annotated[bool, typer.Option("--raw", metavar=FLAG, help="Prefill the context as plain text, not as the opening of a chat turn.")] = False,
    align: Annotated[str | None, typer.Option("--align", help="Alignment directory (celslm align): --model is the large model; the artifact is in the small model's space.")] = None,
    slm: Annotated[str | None, typer.Option("--slm", help="With --align: where to load the small model from (default: as the alignment names it).")] = None,
    native_layers: Annotated[str | None, typer.Option("--native-layers", help="With --align: K (the small model's own KV for its first K layers, the rest projected) or a list 0,1,5.")] = None,
    auto: Annotated[bool, typer.Option("--auto", metavar=FLAG, help="With --align: the fewest leading native layers whose perplexity, measured by align on held-out text, is within --budget.")] = False,
    budget: Annotated[str, typer.Option("--budget", help="With --auto: allowed perplexity increase over the small model's own prefill, e.g. 2%.")] = "2%",
    push: Annotated[str | None, typer.Option("--push", help="Upload the artifact to this serve-cache URL (only missing blobs).")] = None,
    tag: Annotated[str | None, typer.Option("--tag", help="With --push: point this tag at the artifact.")] = None,
    token: TokenOpt = None,
    sign: SignOpt = None,
    encrypt_to: EncryptToOpt = None,
    tag_valid: TagValidOpt = "7d",
    force: ForceOpt = False,
    engine: Annotated[str | None, typer.Option("--engine", envvar="CELSLM_ENGINE", show_envvar=True,
                                              help=ENGINE_HELP + " With --align, transformers (alignment reads hidden states).")] = None,
    json_: JsonOpt = False,
) -> None:
    """Compute a context's KV cache and write it as an artifact (directory, tar stream, or a server)."""
    from celslm.prefill import prefill as run_prefill, prefill_cross  # torch and transformers: not for --help
    from celslm.projection import load_aligned_models, load_alignment

    if out is None and push is None:
        raise UsageError("give --out PATH (or -) and/or --push URL")
    if tag and not push:
        raise UsageError("--tag goes with --push")
    if dtype not in DTYPE_NAMES:
        raise UsageError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    if out == "-" and sys.stdout.isatty():
        raise UsageError("--out - writes a binary tar stream; redirect stdout to a file or a pipe")
    if out == "-" and json_:
        raise UsageError("--json needs --out PATH: with --out - stdout carries the artifact")
    if (native_layers or auto or slm) and not align:
        raise UsageError("--native-layers, --auto and --slm go with --align")
    if align and engine not in (None, "transformers"):
        raise UsageError("--align runs on --engine transformers (alignment reads the models' hidden states)")
    if native_layers and auto:
        raise UsageError("give either --native-layers or --auto, not both")
    key = signing_key(sign)
    sealed_for = recipients(encrypt_to)
    valid_s = parse_duration(tag_valid, "--tag-valid")
    alignment = load_alignment(align) if align else None
    native = parse_native_layers(native_layers)
    if auto:
        count = alignment.budget_native_layers(parse_budget(budget))
        if count is None:
            raise UsageError(f"no hybrid of {align} is within --budget {budget} on its held-out text; "
                             "raise the budget or prefill with the small model itself")
        native = tuple(range(count))
    text = read_file_or_stdin(context, "--context")
    started = time.perf_counter()
    with progress_bar() as progress:
        with for_option("--engine"):
            engine = default_engine(model, "transformers" if align else engine)
        loaded = load_model(model, progress, engine=engine)
        small = load_aligned_models(alignment, loaded, slm, progress) if alignment else None
        framing = "raw" if raw else prompting.default_framing(loaded.tokenizer)
        token_ids = prompting.context_ids(loaded.tokenizer, text, framing)
        report = lambda done, total: progress("prefill (tokens)", done, total)  # noqa: E731
        if alignment:
            artifact = prefill_cross(loaded, small, alignment, token_ids, framing=framing, native=native,
                                     chunk_size=chunk_size, dtype=dtype, progress=report)
        else:
            artifact = run_prefill(loaded, token_ids, framing=framing, chunk_size=chunk_size, dtype=dtype,
                                   progress=report)
    if sealed_for:
        artifact = seal_artifact(artifact, sealed_for)
    if key is not None:
        artifact.signatures = (sign_artifact(key, artifact.id),)
    if out is not None:
        write_artifact(artifact, out, force=force, stdout=sys.stdout.buffer)
    signed_tag = sign_tag(key, tag, artifact.id, valid_s) if key is not None and tag else None
    pushed = push_artifact(MemoryReader(artifact), open_store(push, token=token), tag, signed_tag=signed_tag) if push else None
    m = artifact.manifest
    summary = {
        "id": artifact.id,
        "out": out,
        "space": m.space.to_json(),
        "tokens": m.token_count,
        "chunks": m.chunks,
        "layers": m.layers,
        "bytes": m.blob_bytes(),
        "prefill_s": artifact.timings.prefill_s,
        "engine": loaded.engine.name,
        "signed_by": [sig.key_id for sig in artifact.signatures],
        "encrypted_for": m.encryption.key_ids() if m.encryption else [],
        **({"producer": m.producer.to_json(), "provenance": m.provenance} if alignment else {}),
        "seconds": round(time.perf_counter() - started, 3),
        **({"push": pushed} if pushed else {}),
    }
    if json_:
        print_json(summary)
    else:
        if alignment:
            log(f"cross-model: {m.producer.model} -> {m.space.name}, native layers "
                f"{list(native) or 'none'} (+ own KV of the first {alignment.sink_tokens} token(s)), the rest projected")
        log(f"wrote {artifact.id} to {out or push}: {m.token_count} tokens, {m.layers} layers x {m.chunks} chunks, "
            f"{m.blob_bytes() / 2**20:.1f} MiB, prefill {artifact.timings.prefill_s:.2f} s"
            f"{', encrypted for ' + ', '.join(k[:12] for k in m.encryption.key_ids()) if m.encryption else ''}")
