"""celslm verify: check every blob of an artifact against its digest."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from celslm.artifact import open_artifact
from celslm.errors import EXIT_INTEGRITY
from .common import JsonOpt, err_console, examples, print_json

EPILOG = examples("celslm verify sched.kv && echo intact", "celslm verify sched.kv --json")


def verify(
    artifact: Annotated[str, typer.Argument(help="Artifact directory, .tar stream file, or - for stdin.")],
    json_: JsonOpt = False,
) -> None:
    """Check every blob against its digest; exit 3 if any is missing or corrupt."""
    reader = open_artifact(artifact, stdin=sys.stdin.buffer)
    problems = reader.problems()
    blobs = len(reader.manifest.blob_refs())
    if json_:
        print_json({"id": reader.id, "ok": not problems, "blobs": blobs, "problems": problems})
    elif problems:
        for problem in problems:
            err_console.print(f"[red]bad[/red] {problem}", highlight=False)
        err_console.print(f"{artifact}: {len(problems)} of {blobs} blobs bad", highlight=False)
    else:
        print(f"ok {reader.id} ({blobs} blobs, {reader.manifest.blob_bytes():,} bytes)")
    if problems:
        raise typer.Exit(EXIT_INTEGRITY)
