"""Print two `celslm decode --json` results side by side: answers and time split."""

import json
import sys

from rich.console import Console
from rich.table import Table

question, artifact_path, edge_path = sys.argv[1:4]
runs = {"from artifact": json.load(open(artifact_path)), "edge-only": json.load(open(edge_path))}
console = Console()
console.print(f"[bold]Question:[/bold] {question}\n")
for label, run in runs.items():
    console.print(f"[bold]{label}:[/bold] {run['text'].strip()}\n", highlight=False)

table = Table("seconds", *runs, title="time split (this machine; cloud prefill from the artifact's manifest)")
rows = [
    ("cloud prefill (once, shared)", "cloud_prefill_s"),
    ("load artifact (read, verify, inject)", "load_s"),
    ("context prefill (here)", "context_prefill_s"),
    ("prompt prefill", "prompt_prefill_s"),
    ("time to first token", "ttft_s"),
    ("decode", "generate_s"),
    ("total here", "total_s"),
]
for label, key in rows:
    table.add_row(label, *(f"{run[key]:.2f}" if run.get(key) is not None else "-" for run in runs.values()))
table.add_row("context / prompt / new tokens",
              *(f"{r['context_tokens']} / {r['prompt_tokens']} / {r['new_tokens']}" for r in runs.values()))
console.print(table)
a, e = runs["from artifact"], runs["edge-only"]
console.print(f"time to first token: {e['ttft_s'] / a['ttft_s']:.1f}x faster from the artifact "
              f"({a['artifact_bytes'] / 2**20:.1f} MiB artifact); same answer: {a['text'] == e['text']}")
