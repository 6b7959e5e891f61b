"""celslm push: upload an existing artifact to a store: a serve-cache server, a bucket, a directory."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from celslm.artifact import open_artifact
from celslm.store import open_store
from celslm.store.push import push as push_artifact
from celslm.trust import sign_artifact, sign_tag
from .common import JsonOpt, SignOpt, TagValidOpt, TokenOpt, examples, log, parse_duration, print_json, signing_key

EPILOG = examples("celslm push sched.kv http://cloud:8470 --tag sched:latest --sign cloud.key",
                  "celslm push sched.kv s3://kv-bucket/celslm --tag sched:latest   # AWS_* variables or ~/.aws say where and who",
                  "celslm prefill -m M -c doc.txt -o - | celslm push - http://cloud:8470 --token \"$TOKEN\"")


def push(
    artifact: Annotated[str, typer.Argument(help="Artifact directory, .tar stream file, or - for stdin.")],
    url: Annotated[str, typer.Argument(help="Where to: a serve-cache URL (http://cloud:8470), s3://BUCKET/PREFIX, "
                                            "redis://HOST:PORT/DB or a directory.")],
    tag: Annotated[str | None, typer.Option("--tag", help="Point this tag at the artifact after the upload.")] = None,
    token: TokenOpt = None,
    sign: SignOpt = None,
    tag_valid: TagValidOpt = "7d",
    json_: JsonOpt = False,
) -> None:
    """Upload an artifact: only the blobs the server lacks, then the manifest, its signatures, then the tag."""
    key = signing_key(sign)
    valid_s = parse_duration(tag_valid, "--tag-valid")
    reader = open_artifact(artifact, stdin=sys.stdin.buffer)
    signatures = (sign_artifact(key, reader.id),) if key is not None else ()
    signed_tag = sign_tag(key, tag, reader.id, valid_s) if key is not None and tag else None
    result = push_artifact(reader, open_store(url, token=token), tag, signatures, signed_tag)
    if json_:
        print_json(result)
    else:
        signed = f", signed by {', '.join(k[:12] for k in result['signatures'])}" if result["signatures"] else ""
        log(f"pushed {result['id']} to {url}: {result['blobs_sent']} blobs sent ({result['bytes_sent']:,} bytes), "
            f"{result['blobs_skipped']} already there{signed}"
            f"{', tagged ' + tag + (' (signed statement)' if signed_tag else ' (unsigned)') if tag else ''}")
