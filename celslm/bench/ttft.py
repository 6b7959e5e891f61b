"""Time to first token: decoding from an artifact vs after the model's own prefill, in one run.

The context is real text nobody here wrote: Python standard-library source files, cut to the
requested number of tokens. Both paths answer the same prompt; their first tokens must agree.
"""

from __future__ import annotations

import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from celslm import prompting
from celslm.artifact import open_artifact, write_dir
from celslm.decode import Sampling, context_from_artifact, context_from_ids, generate
from celslm.errors import UsageError
from celslm.models import LoadedModel
from celslm.prefill import prefill

DEFAULT_FILES = ("textwrap.py", "fnmatch.py", "shlex.py", "string.py", "argparse.py", "gettext.py")


@dataclass(frozen=True)
class TtftResult:
    model: str
    context_tokens: int
    prompt_tokens: int
    prefill_s: float  # cloud side: the artifact's prefill
    artifact_bytes: int
    artifact_ttft_s: float  # read + verify + inject + prompt prefill + first token
    artifact_load_s: float
    edge_ttft_s: float  # context prefill + prompt prefill + first token
    first_token_equal: bool

    @property
    def speedup(self) -> float:
        return self.edge_ttft_s / self.artifact_ttft_s


def stdlib_context(tokenizer, tokens: int, files: tuple[str, ...] = DEFAULT_FILES) -> str:
    """Concatenated standard-library sources, cut to about `tokens` tokens."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((stdlib / name).read_text() for name in files if (stdlib / name).is_file())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < tokens:
        raise UsageError(f"the standard-library files hold only {len(ids)} tokens; ask for fewer")
    return tokenizer.decode(ids[:tokens])


def run(loaded: LoadedModel, context_tokens: int = 2048, prompt: str = "What does this code do?",
        chunk_size: int = 256) -> TtftResult:
    framing = prompting.default_framing(loaded.tokenizer)
    text = stdlib_context(loaded.tokenizer, context_tokens)
    token_ids = prompting.context_ids(loaded.tokenizer, text, framing)[:context_tokens]
    prompt_ids = prompting.prompt_ids(loaded.tokenizer, prompt, framing, raw=False)
    one = Sampling(max_new_tokens=1)
    loaded.engine.prefill(loaded.engine.sequence(), token_ids[:64], 64)  # warm-up: first-call allocation should not count
    artifact = prefill(loaded, token_ids, framing=framing, chunk_size=chunk_size)
    with tempfile.TemporaryDirectory(prefix="celslm-bench-") as tmp:
        path = Path(tmp) / "context.kv"
        write_dir(artifact, path)
        ctx = context_from_artifact(loaded, open_artifact(str(path)))
        artifact_token = list(generate(loaded, ctx, prompt_ids, one))
        artifact_stats = ctx.stats
    edge = context_from_ids(loaded, token_ids, framing=framing, step=chunk_size)
    edge_token = list(generate(loaded, edge, prompt_ids, one))
    return TtftResult(
        model=loaded.name,
        context_tokens=len(token_ids),
        prompt_tokens=len(prompt_ids),
        prefill_s=artifact.timings.prefill_s,
        artifact_bytes=artifact.manifest.blob_bytes(),
        artifact_ttft_s=artifact_stats.ttft_s,
        artifact_load_s=artifact_stats.load_s,
        edge_ttft_s=edge.stats.ttft_s,
        first_token_equal=artifact_token == edge_token,
    )


def render(result: TtftResult, engine: str) -> list:
    """The table `bench ttft` prints."""
    table = Table("measure", "value", title=f"time to first token, {result.model} on {engine}, "
                                           f"{result.context_tokens}-token context")
    table.add_row("cloud prefill (s)", f"{result.prefill_s:.3f}")
    table.add_row("artifact bytes", f"{result.artifact_bytes:,} ({result.artifact_bytes / 2**20:.1f} MiB)")
    table.add_row("TTFT from artifact (s)", f"{result.artifact_ttft_s:.3f}  (of which load {result.artifact_load_s:.3f})")
    table.add_row("TTFT after own prefill (s)", f"{result.edge_ttft_s:.3f}")
    table.add_row("speedup", f"{result.speedup:.1f}x")
    table.add_row("first token equal", "yes" if result.first_token_equal else "NO")
    return [table]
