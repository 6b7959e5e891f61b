"""celslm push / pull: move existing artifacts to and from a serve-cache server."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from celslm.artifact import open_artifact, write_artifact
from celslm.manifest import Artifact
from celslm.store.http import CacheClient
from celslm.store.tiers import Sources, open_ref, push as push_artifact
from celslm.trust import sign_artifact, sign_tag
from .common import (CacheCapacityOpt, CloudOpt, ForceOpt, JsonOpt, PeerOpt, SignOpt, TagValidOpt, TokenOpt, TrustOpt,
                     cache_capacity, examples, log, parse_duration, print_json, signing_key, trust_policy)

PUSH_EPILOG = examples("celslm push sched.kv http://cloud:8470 --tag sched:latest --sign cloud.key",
                       "celslm prefill -m M -c doc.txt -o - | celslm push - http://cloud:8470")
PULL_EPILOG = examples("celslm pull http://cloud:8470/v1/tags/sched:latest --out sched.kv --trust cloud.pub",
                       "celslm pull sched:latest --cloud http://cloud:8470 --peer http://peer:8470 --out sched.kv",
                       "celslm pull sha256:4fe9… --cloud http://cloud:8470 --out - | celslm inspect -")


def push(
    artifact: Annotated[str, typer.Argument(help="Artifact directory, .tar stream file, or - for stdin.")],
    url: Annotated[str, typer.Argument(help="serve-cache URL, e.g. http://cloud:8470")],
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
    result = push_artifact(reader, CacheClient(url, token), tag, signatures, signed_tag)
    if json_:
        print_json(result)
    else:
        signed = f", signed by {', '.join(k[:12] for k in result['signatures'])}" if result["signatures"] else ""
        log(f"pushed {result['id']} to {url}: {result['blobs_sent']} blobs sent ({result['bytes_sent']:,} bytes), "
            f"{result['blobs_skipped']} already there{signed}"
            f"{', tagged ' + tag + (' (signed statement)' if signed_tag else ' (unsigned)') if tag else ''}")


def pull(
    ref: Annotated[str, typer.Argument(help="A server URL (…/v1/artifacts/sha256:… or …/v1/tags/NAME), an artifact id or a tag.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Artifact directory to write, or - for a tar stream.")],
    peer: PeerOpt = None,
    cloud: CloudOpt = None,
    token: TokenOpt = None,
    trust: TrustOpt = None,
    cache_capacity_: CacheCapacityOpt = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Download an artifact (local cache, then peers, then the cloud), verifying every blob."""
    capacity = cache_capacity(cache_capacity_)
    policy = trust_policy(trust)
    reader, tiers = open_ref(ref, Sources(tuple(peer or ()), cloud, token, trust=policy, cache_bytes=capacity), warn=log)
    blobs = {ref_.digest: data for ref_, data in reader.blobs()}
    signatures = reader.signatures or (tiers.signatures(reader.id) if tiers else ())  # kept, for a later --trust
    write_artifact(Artifact(reader.manifest, blobs, reader.timings, signatures), out, force=force,
                   stdout=sys.stdout.buffer)
    sources = dict(tiers.bytes_by_source) if tiers else {}
    if json_:
        print_json({"id": reader.id, "out": out, "bytes": reader.manifest.blob_bytes(), "bytes_by_source": sources,
                    "signed_by": [sig.key_id for sig in signatures]})
    else:
        log(f"pulled {reader.id} to {out} ({', '.join(f'{k}: {v:,} B' for k, v in sources.items()) or 'local'})")
