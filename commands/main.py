"""The celslm command line: registers one module per subcommand and maps errors to exit codes."""

from __future__ import annotations

import os
import sys

# celslm draws its own progress on stderr; library tqdm bars (the GGUF reader's) would only clutter it.
# tqdm reads this when it is first imported, so it must be set before any library import.
os.environ.setdefault("TQDM_DISABLE", "1")
# OpenMP threads that spin while waiting collapse decode speed on a busy 2-core machine (both engines
# were measured: 5x slower); passive waiting costs nothing when the machine is idle. Read at OpenMP's
# start, so set before torch or llama.cpp loads. CELSLM_THREADS sets the thread count.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _preload_gguf(argv: list[str], start: bool = True) -> str | None:
    """decode, score and serve on llama.cpp spend their first ~0.35 s loading the GGUF: start that in a
    thread now, while Python imports the command line (~0.3 s). A hint only: the command resolves and
    checks the model itself, and takes the loaded model over only if it is the same file. Returns the
    file it starts loading, if any."""
    if not argv or argv[0] not in ("decode", "score", "serve") or {"-h", "--help"} & set(argv) \
            or any(arg.startswith("--server") for arg in argv):
        return None
    options = {}
    for index, arg in enumerate(argv[1:], 1):
        name, eq, value = arg.partition("=")
        if name in ("-m", "--model", "--engine"):
            options[name.lstrip("-")[0]] = value if eq else (argv[index + 1] if index + 1 < len(argv) else "")
    engine = options.get("e") or os.environ.get("CELSLM_ENGINE")
    model = options.get("m") or os.environ.get("CELSLM_MODEL") or ""
    if engine == "transformers" or not model or os.environ.get("CELSLM_SERVER"):
        return None
    home = os.environ.get("CELSLM_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "celslm")
    # the edge's default engine is llama.cpp for a .gguf file or a bundled model's name (never a folder path)
    path = model if model.lower().endswith(".gguf") else os.path.join(home, "models", model, "model.gguf")
    if not model.lower().endswith(".gguf") and (os.sep in model or model.startswith(".")):
        return None
    if not os.path.isfile(path):
        return None
    if start:
        import threading

        def begin() -> None:
            try:
                from celslm import llamaload

                llamaload.preload(path).result()
            except Exception:  # noqa: BLE001 - the command reports any problem when it loads the model itself
                pass
            finally:
                sys.setswitchinterval(interval)

        # llama.cpp logs ~900 lines while loading, each through a Python callback that needs the GIL:
        # switch threads more often than every 5 ms while the imports run beside the load
        interval = sys.getswitchinterval()
        sys.setswitchinterval(0.0002)
        threading.Thread(target=begin, name="celslm-preload", daemon=True).start()
    return path


_preload_gguf(sys.argv[1:])

import importlib  # noqa: E402

import typer  # noqa: E402

from celslm import __version__  # noqa: E402
from celslm.errors import EXIT_RUNTIME, CelslmError, OutputExists, TokenRequired  # noqa: E402

from .common import FLAG, err_console  # noqa: E402

SETTINGS = dict(
    name="celslm",
    help="Cloud-edge collaborative LM inference over shared KV artifacts. "
    "Environment: CELSLM_HOME (models and caches, default ~/.cache/celslm), CELSLM_MODEL (default --model), "
    "CELSLM_DEBUG=1 (tracebacks on errors).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
# Each command's module, imported only when a command line holds it: a process imports the one it runs
# (the command modules and what they import took ~0.1 s more than decode's own).
COMMANDS = {"align": "align", "prefill": "prefill", "decode": "decode", "inspect": "inspect", "verify": "verify",
            "calibrate": "calibrate", "compress": "compress", "score": "score", "serve": "serve",
            "serve-cache": "serve_cache", "push": "push", "pull": "pull"}
GROUPS = {"models": "models", "keys": "keys", "bench": "bench"}


def _module(name: str):
    return importlib.import_module(f".{name}", __package__)


def _version(value: bool) -> None:
    if value:
        print(f"celslm {__version__}")
        raise typer.Exit()


def main(version: bool = typer.Option(False, "--version", metavar=FLAG, callback=_version, is_eager=True, help="Show the version.")) -> None:
    """Cloud-edge collaborative LM inference over shared KV artifacts."""


def command_line(names=None) -> typer.Typer:
    """The command line with the commands and groups `names` (default: all). typer reads the signature
    of every command it holds each time a process starts (~0.14 s for all of them), so `run` builds one
    with only the command the arguments name."""
    line = typer.Typer(**SETTINGS)
    for name, module in COMMANDS.items():
        if names is None or name in names:
            module = _module(module)
            line.command(name, epilog=module.EPILOG)(getattr(module, module.__name__.rpartition(".")[2]))
    for name, module in GROUPS.items():
        if names is None or name in names:
            line.add_typer(_module(module).app, name=name)
    line.callback()(main)
    return line


def __getattr__(name: str):
    """`app`, the whole command line (help, completion, the tests), is built when first asked for."""
    if name == "app":
        globals()["app"] = line = command_line()
        return line
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# What the command line adds to library errors that only a flag can fix.
HOW_TO = {OutputExists: "; choose another --out, or pass --force to replace it",
          TokenRequired: "; give one with --token or CELSLM_TOKEN"}


def run() -> None:
    """Console entry point: user errors become one line on stderr and a documented exit code."""
    named = sys.argv[1] if len(sys.argv) > 1 else None
    whole = named not in COMMANDS and named not in GROUPS or any(key.startswith("_CELSLM_COMPLETE") for key in os.environ)
    try:
        (command_line() if whole else command_line({named}))(prog_name="celslm")
    except CelslmError as exc:
        if os.environ.get("CELSLM_DEBUG") == "1":
            raise
        err_console.print(f"celslm: error: {exc}{HOW_TO.get(type(exc), '')}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        # stdout closed early (e.g. piped into head): not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_RUNTIME)
    except OSError as exc:  # a full or read-only disk, a vanished file: the system's words, on one line
        if os.environ.get("CELSLM_DEBUG") == "1":
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        err_console.print(f"celslm: error: {where}{exc.strerror or exc}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(EXIT_RUNTIME)
    except KeyboardInterrupt:
        sys.exit(130)
