"""celslm pull: download an artifact through the tiers (local cache, peers, the cloud), verifying every blob."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from celslm.artifact import write_artifact
from celslm.manifest import Artifact
from celslm.store.tiers import Sources, open_ref
from .common import (CacheCapacityOpt, CloudOpt, ForceOpt, JsonOpt, PeerOpt, TokenOpt, TrustOpt, cache_capacity, examples, log,
                     print_json, trust_policy)

EPILOG = examples("celslm pull http://cloud:8470/v1/tags/sched:latest --out sched.kv --trust cloud.pub",
                  "celslm pull sched:latest --cloud http://cloud:8470 --peer http://peer:8470 --out sched.kv",
                  "celslm pull sha256:4fe9… --cloud http://cloud:8470 --out - | celslm inspect -")


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
