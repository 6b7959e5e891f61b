"""celslm compress: re-encode every block of an artifact with a codec."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer
from rich.table import Table

from celslm.artifact import open_artifact, write_artifact
from celslm.codecs import PRESETS, STAGES, parse_codec
from celslm.errors import UsageError
from celslm.sealing import seal_artifact
from celslm.store.tiers import Sources
from celslm.trust import sign_artifact
from .common import (FLAG, CacheCapacityOpt, CloudOpt, EncryptToOpt, for_option, ForceOpt, IdentityOpt, JsonOpt, PeerOpt,
                     SignOpt, TokenOpt, cache_capacity, examples, identity, identity_hint, log, out_console, print_json,
                     progress_bar, recipients, signing_key)

EPILOG = examples(
    "celslm compress sched.kv --out sched-small.kv --codec balanced --sign cloud.key",
    "celslm compress sched.kv --out sched-i4.kv --codec 'pca:r=32+int4:g=64+lz4' --json",
    "celslm prefill -m qwen2.5-coder-0.5b -c doc.txt -o - | celslm compress - -o - --codec small > doc.tar",
    "celslm compress notes.kv -o notes-small.kv --codec small --identity edge1.key --encrypt-to edge1.pub",
    "celslm compress sched.kv -o sched-tiny.kv --codec 'tc:q=2.0+zstd' --codebook coder.codebook",
    "celslm compress sched.kv -o sched-small.kv --codec small --cloud http://cloud:8470   # the cloud's codebook, not a new one",
    "celslm compress --list",
)


def compress(
    artifact: Annotated[str | None, typer.Argument(help="Input artifact: directory, .tar stream file, or - for stdin.")] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Output artifact directory, or - for a tar stream on stdout.")] = None,
    codec: Annotated[str, typer.Option("--codec", help=f"Codec spec (stages joined by +) or preset: {', '.join(PRESETS)}.")] = "balanced",
    codebook: Annotated[str | None, typer.Option("--codebook", help="For a tc codec: the model's codebook file (default: "
                                                                  "this machine's, calibrated on first use).")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="For a tc codec without a cached codebook: the "
                                                                  "model to calibrate one with (default: the artifact's, "
                                                                  "if bundled).")] = None,
    peer: PeerOpt = None,
    cloud: CloudOpt = None,
    token: TokenOpt = None,
    cache_capacity_: CacheCapacityOpt = None,
    list_: Annotated[bool, typer.Option("--list", metavar=FLAG, help="Show the codec stages, their options and the presets.")] = False,
    sign: SignOpt = None,
    identity_: IdentityOpt = None,
    encrypt_to: EncryptToOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Re-encode every block of an artifact with a codec (quantization, PCA, lz4/zstd)."""
    if list_:
        show_stages(json_)
        return
    if artifact is None or out is None:
        raise UsageError("give an input artifact and --out (or --list to see the codecs)")
    if out == "-" and json_:
        raise UsageError("--json needs --out PATH: with --out - stdout carries the artifact")
    if out == "-" and sys.stdout.isatty():
        raise UsageError("--out - writes a binary tar stream; redirect stdout to a file or a pipe")
    from celslm.blocks import recode  # torch: only when blocks are re-encoded

    with for_option("--codec", "; see celslm compress --list"):
        parsed = parse_codec(codec)
    capacity = cache_capacity(cache_capacity_)
    key = signing_key(sign)
    sealed_for = recipients(encrypt_to)
    keys = identity(identity_)
    started = time.perf_counter()
    reader = open_artifact(artifact, stdin=sys.stdin.buffer, identity=keys)
    source = reader.manifest
    if source.encryption and not sealed_for:
        raise UsageError(f"{artifact} is encrypted: give --encrypt-to RECIPIENT.pub for the output too "
                         "(it would be written in the clear)")
    sources = Sources(tuple(peer or ()), cloud, token, cache_bytes=capacity)
    book = _codebook(source, codebook, model, sources) if parsed.transform else None
    with identity_hint():
        result = recode(reader, parsed, book)
    if sealed_for:
        result = seal_artifact(result, sealed_for)
    if key is not None:  # a new id: the input's signatures do not carry over
        result.signatures = (sign_artifact(key, result.id),)
    write_artifact(result, out, force=force, stdout=sys.stdout.buffer)
    m = result.manifest
    summary = {"id": result.id, "out": out, "codec": m.codec, "bytes_in": source.shipped_bytes(), "bytes": m.shipped_bytes(),
               "ratio": round(source.shipped_bytes() / m.shipped_bytes(), 3),
               "ratio_vs_fp16": round(m.fp16_kv_bytes() / m.shipped_bytes(), 3),
               "codebook": m.codebook.digest if m.codebook else None, "codebook_bytes": m.codebook.size if m.codebook else 0,
               "signed_by": [sig.key_id for sig in result.signatures],
               "encrypted_for": m.encryption.key_ids() if m.encryption else [], "seconds": round(time.perf_counter() - started, 3)}
    if json_:
        print_json(summary)
    else:
        shared = f"; the model's codebook ({m.codebook.size / 2**20:.2f} MiB) is shared by all its artifacts" if m.codebook else ""
        log(f"wrote {result.id} to {out}: codec {m.codec}, {source.shipped_bytes() / 2**20:.1f} -> "
            f"{m.shipped_bytes() / 2**20:.2f} MiB ({summary['ratio']:.2f}x smaller, {summary['ratio_vs_fp16']:.2f}x vs fp16, "
            f"counting token ids and manifest){shared}")


def _codebook(source, path: str | None, model: str | None, sources):
    """The codebook a tc codec codes with: the file given, or this machine's; else the one the tiers
    (--peer, --cloud) coded this model's artifacts with; else calibrated here on first use."""
    from pathlib import Path

    from celslm.calibrate import codebook_for, read_codebook

    if path:
        return read_codebook(Path(path), source.space)
    with progress_bar() as progress:
        return codebook_for(source.space, model, progress=progress, announce=log, geometry=source.geometry,
                            sources=sources)


def show_stages(json_: bool) -> None:
    if json_:
        print_json({"stages": {n: {"summary": s.summary, "options": s.options} for n, s in STAGES.items()},
                    "presets": PRESETS})
        return
    table = Table("stage", "what it does", "options", title="codec stages (join with +, e.g. int4:g=64+lz4)")
    for name, stage in STAGES.items():
        table.add_row(name, stage.summary, "\n".join(f"{k}: {v}" for k, v in stage.options.items()) or "-")
    out_console.print(table)
    presets = Table("preset", "spec", title="presets (figures in README, 'Compression')")
    for name, spec in PRESETS.items():
        presets.add_row(name, spec)
    out_console.print(presets)
