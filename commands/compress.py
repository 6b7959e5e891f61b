"""celslm compress: re-encode every block of an artifact with a codec."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer
from rich.table import Table

from celslm.artifact import open_artifact, seal_artifact, write_artifact
from celslm.codecs import PRESETS, STAGES, parse_codec
from celslm.errors import UsageError
from celslm.trust import sign_artifact
from .common import (FLAG, EncryptToOpt, for_option, ForceOpt, IdentityOpt, JsonOpt, SignOpt, examples, identity,
                     identity_hint, log, out_console, print_json, recipients, signing_key)

EPILOG = examples(
    "celslm compress sched.kv --out sched-small.kv --codec balanced --sign cloud.key",
    "celslm compress sched.kv --out sched-i4.kv --codec 'pca:r=32+int4:g=64+lz4' --json",
    "celslm prefill -m qwen2.5-coder-0.5b -c doc.txt -o - | celslm compress - -o - --codec small > doc.tar",
    "celslm compress notes.kv -o notes-small.kv --codec small --identity edge1.key --encrypt-to edge1.pub",
    "celslm compress --list",
)


def compress(
    artifact: Annotated[str | None, typer.Argument(help="Input artifact: directory, .tar stream file, or - for stdin.")] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Output artifact directory, or - for a tar stream on stdout.")] = None,
    codec: Annotated[str, typer.Option("--codec", help="Codec spec (stages joined by +) or preset: lossless, balanced, small.")] = "balanced",
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
    key = signing_key(sign)
    sealed_for = recipients(encrypt_to)
    keys = identity(identity_)
    started = time.perf_counter()
    reader = open_artifact(artifact, stdin=sys.stdin.buffer, identity=keys)
    source = reader.manifest
    if source.encryption and not sealed_for:
        raise UsageError(f"{artifact} is encrypted: give --encrypt-to RECIPIENT.pub for the output too "
                         "(it would be written in the clear)")
    with identity_hint():
        result = recode(reader, parsed)
    if sealed_for:
        result = seal_artifact(result, sealed_for)
    if key is not None:  # a new id: the input's signatures do not carry over
        result.signatures = (sign_artifact(key, result.id),)
    write_artifact(result, out, force=force, stdout=sys.stdout.buffer)
    m = result.manifest
    kv_in = source.blob_bytes() - source.tokens.size
    kv_out = m.blob_bytes() - m.tokens.size
    fp16 = 2 * 2 * m.layers * m.geometry.kv_heads * m.geometry.head_dim * m.token_count
    summary = {"id": result.id, "out": out, "codec": m.codec, "bytes_in": source.blob_bytes(), "bytes": m.blob_bytes(),
               "ratio": round(kv_in / kv_out, 3), "ratio_vs_fp16": round(fp16 / kv_out, 3),
               "signed_by": [sig.key_id for sig in result.signatures],
               "encrypted_for": m.encryption.key_ids() if m.encryption else [], "seconds": round(time.perf_counter() - started, 3)}
    if json_:
        print_json(summary)
    else:
        log(f"wrote {result.id} to {out}: codec {m.codec}, {kv_in / 2**20:.1f} -> {kv_out / 2**20:.2f} MiB of KV "
            f"({summary['ratio']:.2f}x smaller, {summary['ratio_vs_fp16']:.2f}x vs fp16)")


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
