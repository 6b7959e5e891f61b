"""What every subcommand shares: option aliases, stdin/stdout handling, progress, JSON output."""

from __future__ import annotations

import ipaddress
import json
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from celslm.errors import CelslmError, UsageError

err_console = Console(stderr=True)
# Piped output is not cut to 80 columns: wide tables (benchmarks) stay readable in files and logs.
out_console = Console() if Console().is_terminal else Console(width=200)

FLAG = ""  # the metavar of boolean flags: their help shows no value placeholder (Typer's default is <bool>)
MODEL_HELP = "Model: a Hugging Face folder, a .gguf file, a bundled name (celslm models list) or a hub id."
ModelOpt = Annotated[str, typer.Option("--model", "-m", envvar="CELSLM_MODEL", show_envvar=True, help=MODEL_HELP)]
ENGINE_HELP = "llama.cpp (the GGUF as it is; default for a .gguf or bundled model) or transformers (fp32 reference)."
EngineOpt = Annotated[str | None, typer.Option("--engine", envvar="CELSLM_ENGINE", show_envvar=True, help=ENGINE_HELP)]
CorpusOpt = Annotated[str, typer.Option("--corpus", metavar="stdlib|third-party|DIR", help="Held-out text: stdlib (standard-library modules), third-party (libraries installed beside celslm, written elsewhere) or a folder of your own (its .py, .txt, .md and .rst files).")]


def check_link_tokens(link_tokens: int | None, kv: list[str] | None) -> None:
    """--link-tokens joins the artifacts of a composition: it needs two --kv at least."""
    if link_tokens is not None and len(kv or ()) < 2:
        raise UsageError("--link-tokens goes with several --kv (a composition)")


def corpus_source(corpus: str) -> str:
    """`--corpus` checked: stdlib, third-party, or an existing folder (as a path)."""
    from pathlib import Path

    from celslm.corpus import SOURCES
    from celslm.errors import UsageError

    if corpus in SOURCES:
        return corpus
    if not Path(corpus).is_dir():
        raise UsageError(f"--corpus {corpus!r}: choose stdlib, third-party or a folder of text files")
    return str(Path(corpus))


JsonOpt = Annotated[bool, typer.Option("--json", metavar=FLAG, help="Print machine-readable JSON on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", metavar=FLAG, help="Replace the output if it exists.")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="CELSLM_TOKEN", show_envvar=True,
                                              help="Bearer token for serve-cache servers.")]
PeerOpt = Annotated[list[str] | None, typer.Option("--peer", help="A peer: its serve-cache URL, or any store (s3://BUCKET/PREFIX, a directory), asked before the cloud (repeatable, in order).")]
CloudOpt = Annotated[str | None, typer.Option("--cloud", envvar="CELSLM_CLOUD", show_envvar=True,
                                              help="The cloud: its serve-cache URL, or any store (s3://BUCKET/PREFIX, redis://, a directory), asked last.")]
CacheCapacityOpt = Annotated[str | None, typer.Option(
    "--cache-capacity", envvar="CELSLM_CACHE_CAPACITY", show_envvar=True, metavar="SIZE",
    help="The most the edge cache ($CELSLM_HOME/store) keeps of fetched blocks, e.g. 10GB or 512MiB (default 10GB): "
         "beyond it the least recently used are removed, never one a running decode reads.")]
TrustOpt = Annotated[list[str] | None, typer.Option(
    "--trust", envvar="CELSLM_TRUST", show_envvar=True,
    help="A producer's public key (PEM, from celslm keys generate): only artifacts and tags it signed are used, "
         "anything else is refused (exit 3). Repeatable; the variable takes space-separated paths.")]
SignOpt = Annotated[str | None, typer.Option(
    "--sign", envvar="CELSLM_SIGN_KEY", show_envvar=True,
    help="Sign the artifact id (and a --tag) with this private key (PEM, from celslm keys generate).")]
IdentityOpt = Annotated[list[str] | None, typer.Option(
    "--identity", envvar="CELSLM_IDENTITY", show_envvar=True,
    help="Your X25519 private key (PEM, from celslm keys generate --for encryption): opens contexts encrypted "
         "to it. Repeatable; the variable takes space-separated paths.")]
EncryptToOpt = Annotated[list[str] | None, typer.Option(
    "--encrypt-to", help="Encrypt every blob for this recipient's X25519 public key (PEM, from celslm keys generate "
                         "--for encryption): stores and peers keep and serve it unread. Repeatable.")]
MaxNewTokensOpt = Annotated[int, typer.Option(
    "--max-new-tokens", "-n", min=1, help="Tokens to generate at most (an OpenAI body's max_tokens).")]
LinkTokensOpt = Annotated[int | None, typer.Option(
    "--link-tokens", min=0, help="With several --kv: the first N tokens of every artifact after the first are computed "
                                 "here over the contexts before them, joining it to them (EPIC's link tokens). "
                                 "Default: 0, only the separator (celslm bench compose measured 0 to 32 alike).")]
ApiTokenOpt = Annotated[str | None, typer.Option(
    "--api-token", envvar="CELSLM_API_TOKEN", show_envvar=True,
    help="Bearer token of the edge service's API (celslm serve); not the serve-cache --token.")]
TagValidOpt = Annotated[str, typer.Option(
    "--tag-valid", help="With --tag and --sign: how long the signed tag statement holds, e.g. 7d, 12h, 3600s; "
                        "edges refuse it after that.")]


def parse_duration(value: str, flag: str) -> int:
    """`7d`, `12h`, `30m`, `3600s` or `3600` -> seconds."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    text = value.strip().lower()
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    if not number.isdigit() or int(number) <= 0:
        raise UsageError(f"{flag} {value!r}: give a positive duration like 7d, 12h, 30m or 3600s")
    return int(number) * units[unit]


def byte_size(value: str, flag: str) -> int:
    """Every byte budget on the command line (`10GB`, `512MiB`, `0`): one parser, errors naming the flag."""
    from celslm.store.base import parse_size

    with for_option(flag):
        return parse_size(value)


def cache_capacity(value: str | None) -> int:
    """`--cache-capacity` in bytes (the library's default without one)."""
    from celslm.store.tiers import EDGE_CACHE_BYTES

    return EDGE_CACHE_BYTES if value is None else byte_size(value, "--cache-capacity")


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host`: what both servers check before they listen without a token."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def typed(invocation: typer.Context, name: str) -> bool:
    """Whether the user typed option `name` on the command line (not its default, not its environment variable)."""
    source = invocation.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def old_spelling(flag: str, **checks) -> typer.models.OptionInfo:
    """A flag renamed in this release: hidden from --help, still accepted, with a warning (see `renamed`);
    `checks` (min=, max=) are the new flag's, so the old spelling lets through nothing the new one refuses."""
    return typer.Option(flag, hidden=True, **checks)


def renamed(old_flag: str, new_flag: str, old_value, new_value, new_default=None):
    """The value of an option with an old spelling kept for one release: the old one still works and
    warns; both at once (the new one set away from its default) is a usage error."""
    if old_value is None:
        return new_value
    if new_value != new_default:
        raise UsageError(f"{old_flag} is the old spelling of {new_flag}; give only {new_flag}")
    warn(f"{old_flag} is renamed {new_flag}; the old spelling goes in the next release")
    return old_value


def warn(message: str) -> None:
    err_console.print(f"celslm: warning: {message}", highlight=False, markup=False, soft_wrap=True)


def trust_policy(paths: list[str] | None):
    """The policy `--trust` names (None without one); the key files are read now, so a bad one fails first."""
    from celslm.trust import TrustPolicy

    with for_option("--trust"):
        return TrustPolicy.load(path for value in paths or () for path in value.split())


def identity(paths: list[str] | None):
    """The keys `--identity` names (None without one), read now so that a bad file fails first."""
    from celslm.confidential import Identity

    with for_option("--identity"):
        return Identity.load(path for value in paths or () for path in value.split())


def recipients(paths: list[str] | None) -> list[bytes]:
    """The X25519 public keys `--encrypt-to` names."""
    from celslm.trust import load_public_key

    with for_option("--encrypt-to"):
        return [load_public_key(path, "encryption") for path in paths or ()]


@contextmanager
def identity_hint() -> Iterator[None]:
    """An encrypted context nobody could open: say which option opens it."""
    from celslm.confidential import Sealed

    try:
        yield
    except Sealed as exc:
        raise Sealed(f"{exc}; give --identity with one of its recipients' private keys (or CELSLM_IDENTITY)") from exc


def signing_key(path: str | None):
    from celslm.trust import load_private_key

    if path is None:
        return None
    with for_option("--sign"):
        return load_private_key(path)


def examples(*lines: str) -> str:
    """An epilog listing example invocations, one per line."""
    return "[bold]Examples[/bold]\n\n" + "\n\n".join(f"  [cyan]$ {line}[/cyan]" for line in lines)


def read_text(value: str, what: str) -> str:
    """A literal text argument, or "-" to read it from stdin."""
    if value == "-":
        if sys.stdin.isatty():
            raise UsageError(f"{what} is '-' but stdin is a terminal; pipe the text in")
        return sys.stdin.read()
    return value


def read_file_or_stdin(value: str, what: str) -> str:
    if value == "-":
        return read_text(value, what)
    path = Path(value)
    if not path.is_file():
        raise UsageError(f"{what} {value}: no such file (give a path, or - for stdin)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} {value}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def parse_budget(value: str) -> float:
    """`2%` or `0.02`."""
    try:
        budget = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError as exc:
        raise UsageError(f"--budget {value!r}: give a perplexity budget like 2% or 0.02") from exc
    if budget < 0:
        raise UsageError("--budget must not be negative")
    return budget


@contextmanager
def for_option(flag: str, hint: str = "") -> Iterator[None]:
    """Library errors name the value that was wrong; the user typed a flag, so the message names it too."""
    try:
        yield
    except UsageError as exc:
        raise type(exc)(f"{flag}: {exc}{hint}") from exc


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


@contextmanager
def progress_bar(bytes_: bool = False) -> Iterator:
    """A transient progress bar on stderr (hidden when stderr is not a terminal).

    Yields a callback (description, done, total-or-None) that creates or updates one task per description.
    """
    columns = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn()]
    if bytes_:
        columns.append(DownloadColumn())
    columns.append(TimeElapsedColumn())
    progress = Progress(*columns, console=err_console, transient=True, disable=not err_console.is_terminal)
    tasks: dict[str, int] = {}

    def update(description: str, done: int, total: int | None) -> None:
        if description not in tasks:
            tasks[description] = progress.add_task(description, total=total)
        progress.update(tasks[description], completed=done, total=total)

    with progress:
        yield update


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound and listening on host:port, or one line saying why not (a busy port, a bad host)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=1024)
    except OSError as exc:
        raise CelslmError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def log(message: str) -> None:
    err_console.print(message, highlight=False, soft_wrap=True)  # one message, one line: logs are grepped
