"""celslm calibrate: fit a model's codebook for the `tc` codec on calibration text, and cache it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from celslm.calibrate import Calibration, calibrate as fit_codebook, codebook_path, read_codebook, save_codebook
from celslm.errors import OutputExists
from celslm.models import load_model
from .common import ForceOpt, JsonOpt, ModelOpt, examples, log, print_json, progress_bar

EPILOG = examples(
    "celslm calibrate -m qwen2.5-coder-0.5b",
    "celslm calibrate -m ./my-model --files 8 --tokens 512 --json",
    "celslm calibrate -m qwen2.5-coder-0.5b --out coder.codebook --force",
)


def calibrate(
    model: ModelOpt,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Write the codebook here (default: this machine's "
                                                                 "cache, where compress finds it).")] = None,
    files: Annotated[int, typer.Option("--files", min=1, max=64, help="Calibration files (standard-library modules "
                                                                      "that no evaluation uses).")] = Calibration.files,
    tokens: Annotated[int, typer.Option("--tokens", min=64, max=8192, help="Context tokens per file.")] = Calibration.tokens,
    probe_files: Annotated[int, typer.Option("--probe-files", min=1, max=16, help="Files whose continuations measure "
                                                                                  "each layer's sensitivity.")] = Calibration.probe_files,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Fit a model's codebook (bases across heads, steps from measured sensitivity) for the tc codec."""
    settings = Calibration(files=files, tokens=tokens, probe_files=min(probe_files, files))
    started = time.perf_counter()
    with progress_bar() as progress:
        loaded = load_model(model, progress)
        path = Path(out) if out else codebook_path(loaded.fingerprint)
        if path.exists() and not force:
            if out:
                raise OutputExists(f"{path} already exists")
            codebook, fitted = read_codebook(path, loaded.space), False
        else:
            codebook, fitted = fit_codebook(loaded, settings, progress), True
            save_codebook(codebook, path)
    summary = {"model": loaded.name, "fingerprint": loaded.fingerprint, "codebook": codebook.digest, "path": str(path),
               "bytes": path.stat().st_size, "fitted": fitted, "layers": codebook.geometry[0],
               "channels_per_token": codebook.geometry[1] * codebook.geometry[2],
               "calibration": {k: codebook.calibration.get(k) for k in ("files", "tokens", "probe_files", "files_used")},
               "seconds": round(time.perf_counter() - started, 2)}
    if json_:
        print_json(summary)
    elif fitted:
        log(f"wrote {codebook.describe()} to {path}: {summary['bytes'] / 2**20:.2f} MiB, {codebook.digest}, "
            f"fitted on {len(summary['calibration']['files_used'] or [])} files x {tokens} tokens in {summary['seconds']} s")
    else:
        log(f"{path} already holds the {codebook.describe()} ({codebook.digest}); --force fits it again")
