"""celslm verify: check every blob of an artifact against its digest."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from celslm.artifact import open_artifact
from celslm.errors import EXIT_INTEGRITY
from celslm.trust import artifact_message
from .common import IdentityOpt, JsonOpt, TrustOpt, err_console, examples, identity, print_json, trust_policy

EPILOG = examples("celslm verify sched.kv && echo intact", "celslm verify sched.kv --json",
                  "celslm verify sched.kv --trust cloud.pub   # and signed by the cloud's key",
                  "celslm verify notes.kv --identity edge1.key   # an encrypted context's token ids too")


def verify(
    artifact: Annotated[str, typer.Argument(help="Artifact directory, .tar stream file, or - for stdin.")],
    trust: TrustOpt = None,
    identity_: IdentityOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Check every blob against its digest (and, with --trust, the producer's signature); exit 3 if anything is wrong."""
    policy = trust_policy(trust)
    keys = identity(identity_)
    reader = open_artifact(artifact, stdin=sys.stdin.buffer, identity=keys)
    signed_by = [sig.key_id for sig in reader.signatures if sig.valid_for(artifact_message(reader.id))]
    problems = [f"signature by {sig.key_id} does not verify" for sig in reader.signatures if sig.key_id not in signed_by]
    if policy is not None:
        trusted = [key for key in signed_by if key in policy.keys]
        if not trusted:
            problems.append(f"not signed by a trusted key ({'signed by ' + ', '.join(signed_by) if signed_by else 'no valid signature'})")
    problems += reader.problems()
    blobs = len(reader.manifest.blob_refs())
    encryption = reader.manifest.encryption
    sealed_for = encryption.key_ids() if encryption else []
    if json_:
        print_json({"id": reader.id, "ok": not problems, "blobs": blobs, "signed_by": signed_by,
                    "encrypted_for": sealed_for, "token_ids_checked": not encryption or keys is not None,
                    "problems": problems})
    elif problems:
        for problem in problems:
            err_console.print(f"[red]bad[/red] {problem}", highlight=False)
        err_console.print(f"{artifact}: {len(problems)} problem(s), {blobs} blobs", highlight=False)
    else:
        signed = f", signed by {', '.join(signed_by)}" if signed_by else ", unsigned"
        sealed = "" if not encryption else f", encrypted for {', '.join(k[:12] for k in sealed_for)}" + \
            ("" if keys else " (token ids unchecked without --identity)")
        print(f"ok {reader.id} ({blobs} blobs, {reader.manifest.blob_bytes():,} bytes{signed}{sealed})")
    if problems:
        raise typer.Exit(EXIT_INTEGRITY)
