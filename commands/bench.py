"""celslm bench: benchmarks that print their figures, measured in one run."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer
from rich.table import Table

from celslm.bench import ttft as ttft_bench
from celslm.models import load_model
from .common import JsonOpt, ModelOpt, examples, out_console, print_json, progress_bar

app = typer.Typer(help="Benchmarks that print their figures (ratios measured in one run).",
                  no_args_is_help=True, rich_markup_mode="rich")


@app.command(epilog=examples("celslm bench ttft -m qwen2.5-coder-0.5b --tokens 2048",
                             "celslm bench ttft -m smollm2-135m --tokens 512 --json"))
def ttft(
    model: ModelOpt,
    tokens: Annotated[int, typer.Option("--tokens", min=1, help="Context length in tokens (standard-library source).")] = 2048,
    chunk_size: Annotated[int, typer.Option("--chunk-size", min=1)] = 256,
    json_: JsonOpt = False,
) -> None:
    """Time to first token from an artifact vs after the model's own prefill."""
    with progress_bar() as progress:
        loaded = load_model(model, progress)
    result = ttft_bench.run(loaded, context_tokens=tokens, chunk_size=chunk_size)
    if json_:
        print_json({**dataclasses.asdict(result), "speedup": round(result.speedup, 3)})
        return
    table = Table("measure", "value", title=f"time to first token, {result.model}, {result.context_tokens}-token context")
    table.add_row("cloud prefill (s)", f"{result.prefill_s:.3f}")
    table.add_row("artifact bytes", f"{result.artifact_bytes:,} ({result.artifact_bytes / 2**20:.1f} MiB)")
    table.add_row("TTFT from artifact (s)", f"{result.artifact_ttft_s:.3f}  (of which load {result.artifact_load_s:.3f})")
    table.add_row("TTFT after own prefill (s)", f"{result.edge_ttft_s:.3f}")
    table.add_row("speedup", f"{result.speedup:.1f}x")
    table.add_row("first token equal", "yes" if result.first_token_equal else "NO")
    out_console.print(table)
