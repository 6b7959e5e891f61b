"""celslm inspect: describe an artifact from its manifest."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.table import Table

from celslm.artifact import ArtifactReader, open_artifact
from .common import JsonOpt, examples, out_console, print_json

EPILOG = examples("celslm inspect sched.kv", "celslm inspect sched.kv --json | jq .bytes")


def describe(reader: ArtifactReader) -> dict:
    manifest = reader.manifest
    return {
        "id": manifest.id,
        "space": manifest.space.to_json(),
        "producer": manifest.producer.to_json(),
        "tokens": manifest.token_count,
        "layers": manifest.layers,
        "chunks": manifest.chunks,
        "chunk_size": manifest.chunk_size,
        "codec": manifest.codec,
        "dtype": manifest.dtype,
        "keys": manifest.keys,
        "framing": manifest.framing,
        "geometry": manifest.geometry.to_json(),
        "bytes": manifest.blob_bytes(),
        "shipped_bytes": manifest.shipped_bytes(),  # manifest + blobs, less the model's shared codebook
        "ratio_vs_fp16": round(manifest.fp16_kv_bytes() / manifest.shipped_bytes(), 3),
        "codebook": manifest.codebook.to_json() if manifest.codebook else None,
        "bytes_per_layer": [manifest.layer_bytes(layer) for layer in range(manifest.layers)],
        "provenance": list(manifest.provenance),
        "timings": reader.timings.to_json(),  # a side record: unsigned
        "signatures": [sig.key_id for sig in reader.signatures],  # unchecked here: celslm verify --trust checks
        "encrypted_for": manifest.encryption.key_ids() if manifest.encryption else [],
    }


def inspect(
    artifact: Annotated[str, typer.Argument(help="Artifact directory, .tar stream file, or - for stdin.")],
    json_: JsonOpt = False,
) -> None:
    """Describe an artifact: model space, producer, tokens, layers, codec and bytes."""
    info = describe(open_artifact(artifact, stdin=sys.stdin.buffer))
    if json_:
        print_json(info)
        return
    table = Table(show_header=False, title=artifact)
    table.add_column("field", style="bold")
    table.add_column("value")
    per_layer = info["bytes_per_layer"]
    rows = [
        ("id", info["id"]),
        ("model space", f"{info['space']['name']} ({info['space']['fingerprint'][:16]})"),
        ("producer", f"{info['producer']['model']} ({info['producer']['fingerprint'][:16]})"
         + (f"; decode prefills the last {info['producer']['own_last']} tokens here by default (its alignment's advice)"
            if info["producer"].get("own_last") else "")),
        ("tokens", f"{info['tokens']} in {info['chunks']} chunks of {info['chunk_size']}"),
        ("layers", f"{info['layers']} ({', '.join(sorted(set(info['provenance'])))})"),
        ("geometry", f"{info['geometry']['kv_heads']} KV heads x {info['geometry']['head_dim']}"),
        ("keys / dtype / codec", f"{info['keys']} / {info['dtype']} / {info['codec']}"),
        ("framing", info["framing"]),
        ("bytes", f"{info['bytes']:,} ({info['bytes'] / 2**20:.2f} MiB)"),
        ("shipped per context", f"{info['shipped_bytes']:,} with the manifest, {info['ratio_vs_fp16']:.2f}x smaller than "
                                f"fp16 KV" + (" (the codebook aside)" if info["codebook"] else "")),
        ("codebook", f"{info['codebook']['digest']}, {info['codebook']['size']:,} bytes, shared by the model's artifacts"
         if info["codebook"] else "none"),
        ("cloud prefill", f"{info['timings'].get('prefill_s', float('nan')):.3f} s (side record, unsigned)"),
        ("signatures", ", ".join(info["signatures"]) or "none (celslm verify --trust checks them)"),
        ("encrypted for", ", ".join(info["encrypted_for"]) or "nobody: the blobs are in the clear"),
    ]
    for field, value in rows:
        table.add_row(field, str(value))
    out_console.print(table)
    layers = Table("layer", "provenance", "bytes", title=f"bytes per layer (codec {info['codec']})")
    for index, (provenance, size) in enumerate(zip(info["provenance"], per_layer)):
        layers.add_row(str(index), provenance, f"{size:,}")
    out_console.print(layers)
