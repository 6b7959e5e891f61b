"""Shared fixtures: tiny random models (tests/tiny.py), the real CLI in a subprocess, a home of our own."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from celslm.artifact import DirectoryReader
from celslm.store.local import LocalStore
from celslm.testing.processes import CLI
from tests.tiny import save_tiny_model


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", seed=1)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=2)


# Real-model tests read the models installed here; everything else gets a home of its own.
USER_HOME = Path(os.environ.get("CELSLM_HOME") or Path.home() / ".cache" / "celslm")


@pytest.fixture(scope="session", autouse=True)
def session_home(tmp_path_factory):
    """Session fixtures (the tiny models' artifacts, the aligned pair) run the CLI too: not in the user's home."""
    patch = pytest.MonkeyPatch()
    patch.setenv("CELSLM_HOME", str(tmp_path_factory.mktemp("celslm-home")))
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def celslm_home(request, tmp_path, monkeypatch) -> Path:
    """Keep every test's models and caches out of the user's home (real-model tests read the installed ones)."""
    home = USER_HOME if request.node.get_closest_marker("realmodel") else tmp_path / "celslm-home"
    monkeypatch.setenv("CELSLM_HOME", str(home))
    return home


def run_cli(*args: str, input: bytes | None = None, env: dict | None = None, check: bool = False,
            subprocess_: bool = False):
    """Run the real command line (its entry point, `run`); returns a CompletedProcess with bytes output.

    In this process by default: the same code path from argv to exit code, without paying a new
    interpreter's torch import per call. `subprocess_=True` runs it as its own process, for what only
    a process shows (signals, pipes between processes, import-time behaviour)."""
    if subprocess_:
        result = subprocess.run(CLI + list(args), input=input, capture_output=True,
                                env={**os.environ, **(env or {})}, timeout=300)
    else:
        result = _run_in_process(list(args), input, env)
    if check and result.returncode != 0:
        raise AssertionError(f"celslm {' '.join(args)} exited {result.returncode}: {result.stderr.decode()[-2000:]}")
    return result


def _run_in_process(args: list[str], input: bytes | None, env: dict | None) -> subprocess.CompletedProcess:
    from celslm.commands.main import run

    streams = [io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", write_through=True) for data in (input or b"", b"", b"")]
    saved = sys.stdin, sys.stdout, sys.stderr, sys.argv, dict(os.environ)
    os.environ.update(env or {})
    sys.stdin, sys.stdout, sys.stderr = streams
    sys.argv = ["celslm", *args]
    code = 0
    try:
        run()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.stdin, sys.stdout, sys.stderr, sys.argv, environ = saved
        os.environ.clear()
        os.environ.update(environ)
    return subprocess.CompletedProcess(["celslm", *args], code, streams[1].buffer.getvalue(), streams[2].buffer.getvalue())


GREET_PROMPT = "What does greet return?"
CONTEXT = (
    "def greet(name):\n    \"\"\"Return a greeting for name.\"\"\"\n    return 'Hello, ' + name + '!'\n\n"
    "class Counter:\n    def __init__(self):\n        self.count = 0\n\n    def bump(self):\n        self.count += 1\n"
)


@pytest.fixture(scope="session")
def prefilled(tiny_qwen, tmp_path_factory) -> Path:
    """A folder with ctx.txt and its artifact a.kv (tiny Qwen2, chunks of 64), shared by the server tests."""
    folder = tmp_path_factory.mktemp("prefilled")
    (folder / "ctx.txt").write_text(CONTEXT * 3)
    run_cli("prefill", "-m", str(tiny_qwen), "-c", str(folder / "ctx.txt"), "-o", str(folder / "a.kv"),
            "--chunk-size", "64", check=True)
    return folder


@pytest.fixture(scope="session")
def published(prefilled, tiny_qwen):
    """What the resilience and hostile-peer tests' cloud holds: the prefilled artifact in a store
    directory, tagged `ctx`; with its manifest and the answer decoded from it locally."""
    folder = prefilled
    reader = DirectoryReader(folder / "a.kv")
    store = LocalStore(folder / "store")
    for ref, data in reader.blobs():
        store.put_blob(ref.digest, data)
    assert store.put_manifest(reader.id, reader.manifest.canonical_bytes()) == []
    store.put_tag("ctx", reader.id)
    expected = json.loads(run_cli("decode", "-m", str(tiny_qwen), "--kv", str(folder / "a.kv"), "-p", GREET_PROMPT, "-n", "6",
                                  "--json", check=True).stdout)
    return folder, reader.manifest, expected


# Two tiny Qwen2 models sharing the byte tokenizer: different depths (5 vs 3) and head dims (24 vs 16),
# and an alignment between them (seconds to build).
LARGE = dict(hidden_size=96, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="session")
def aligned_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    large = save_tiny_model(root / "large", "qwen2", seed=3, **LARGE)
    small = save_tiny_model(root / "small", "qwen2", seed=4)
    calib = root / "calib"
    calib.mkdir()
    for index in range(5):  # distinct texts, each long enough for one 160-byte window
        (calib / f"c{index}.txt").write_text((CONTEXT.replace("name", f"name{index}") + f"# file {index}\n") * 2)
    out = root / "pair.align"
    run_cli("align", "--llm", str(large), "--slm", str(small), "--out", str(out), "--calib", str(calib),
            "--windows", "5", "--window", "160", "--heldout", "1", "--continuation", "32", "--rows", "64",
            "--refine-steps", "0", "--plots", str(root / "plots"), check=True)  # refinement has its own test
    return {"large": large, "small": small, "align": out, "root": root}
