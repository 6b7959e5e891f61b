"""A round trip from a normal install: run with the python of a fresh venv that installed the built wheel.

    python tests/wheel_roundtrip.py            (by `make wheel-check`, part of `make test`)

It checks that celslm is imported from that install (not this source tree); that the edge install
(no extras) has no matplotlib, and that a bench command needing it says so in one line; that `celslm --version` loads neither torch nor transformers and `python -m celslm`
runs; then on a tiny model: prefill, push to a serve-cache started here (loopback, by the wheel's
celslm.testing), decode from it by tag with an empty edge cache, and compare the answer with an
edge-only decode of the same context. Any failure exits non-zero with what went wrong.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CELSLM = Path(sys.executable).parent / "celslm"
CONTEXT = "def greet(name):\n    return 'Hello, ' + name + '!'\n\nclass Counter:\n    count = 0\n" * 4


def run(*args: str, env: dict) -> str:
    result = subprocess.run([str(CELSLM), *args], capture_output=True, text=True, env=env, timeout=300)
    if result.returncode != 0:
        sys.exit(f"wheel round trip: celslm {' '.join(args)} exited {result.returncode}: {result.stderr.strip()[-1500:]}")
    return result.stdout


def bench_needs_its_extra(env: dict) -> None:
    """Without the [bench] extra, a bench command that plots fails at once: one line naming the extra, exit 2."""
    if importlib.util.find_spec("matplotlib") is not None:
        sys.exit("wheel round trip: matplotlib is installed without the [bench] extra (pulled by a dependency?)")
    quiet = {key: value for key, value in env.items() if key != "CELSLM_DEBUG"}  # as a user sees it
    result = subprocess.run([str(CELSLM), "bench", "report", "--from", "suite.json", "--out", "report"],
                            capture_output=True, text=True, env=quiet, timeout=60)
    lines = result.stderr.strip().splitlines()
    if result.returncode != 2 or len(lines) != 1 or "celslm[bench]" not in lines[0]:
        sys.exit(f"wheel round trip: bench report without matplotlib exited {result.returncode}: {result.stderr[-1500:]}")


def main() -> None:
    os.environ["TQDM_DISABLE"] = "1"  # transformers' save bars
    work = Path(tempfile.mkdtemp(prefix="celslm-wheel-"))
    atexit.register(shutil.rmtree, work, True)  # on success and on sys.exit alike
    os.chdir(work)  # never the source tree: `import celslm` must find the installed package
    spec = importlib.util.find_spec("celslm")
    if spec is None or Path(sys.prefix).resolve() not in Path(spec.origin).resolve().parents:
        sys.exit(f"wheel round trip: celslm is not imported from the installed wheel ({spec and spec.origin})")
    env = {**os.environ, "CELSLM_HOME": str(work / "cloud-home"), "CELSLM_DEBUG": "1"}
    probe = ("import runpy, sys\nsys.argv = ['celslm', '--version']\n"
             "try:\n    runpy.run_module('celslm', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('heavy:' + ','.join(m for m in ('torch', 'transformers') if m in sys.modules))")
    heavy = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    if heavy.returncode != 0:
        sys.exit(f"wheel round trip: celslm --version failed:\n{heavy.stderr[-1500:]}")
    if heavy.stdout.splitlines()[-1:] != ["heavy:"]:
        sys.exit(f"wheel round trip: celslm --version loaded {heavy.stdout.splitlines()[-1]}")
    print(run("--version", env=env).strip())
    module = subprocess.run([sys.executable, "-m", "celslm", "--help"], capture_output=True, text=True, env=env, timeout=60)
    if module.returncode != 0 or "Usage: celslm" not in module.stdout:
        sys.exit(f"wheel round trip: python -m celslm --help exited {module.returncode}: {module.stderr[-1500:]}")
    bench_needs_its_extra(env)

    spec = importlib.util.spec_from_file_location("tiny", HERE / "tiny.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    model = str(tiny.save_tiny_model(work / "tiny-qwen2", "qwen2", seed=1))
    (work / "ctx.txt").write_text(CONTEXT)
    run("prefill", "-m", model, "-c", "ctx.txt", "-o", "ctx.kv", "--chunk-size", "32", env=env)

    from celslm.testing.processes import ServeCache  # the installed wheel's

    try:
        server = ServeCache("--root", "store", "--write-token", "w")
    except RuntimeError as exc:
        sys.exit(f"wheel round trip: {exc}")
    url = server.url
    try:
        run("push", "ctx.kv", url, "--tag", "ctx:latest", "--token", "w", env=env)
        edge = {**env, "CELSLM_HOME": str(work / "edge-home")}  # an empty edge cache: every blob comes from the server
        fetched = json.loads(run("decode", "-m", model, "--kv", "ctx:latest", "--cloud", url, "-p", "Who is greeted?",
                                 "-n", "12", "--json", env=edge))
    finally:
        server.stop()
    local = json.loads(run("decode", "-m", model, "--context", "ctx.txt", "-p", "Who is greeted?", "-n", "12", "--json",
                           env=env))
    if fetched["path"] != "artifact" or not fetched["bytes_by_source"].get(f"cloud {url}"):
        sys.exit(f"wheel round trip: the decode did not read the artifact from the server: {fetched}")
    if fetched["text"] != local["text"]:
        sys.exit(f"wheel round trip: decode by tag gave {fetched['text']!r}, edge-only gave {local['text']!r}")
    print(f"wheel round trip ok: prefill, push, decode by tag from {url} "
          f"({fetched['bytes_by_source'][f'cloud {url}']:,} bytes) = edge-only ({fetched['new_tokens']} tokens)")


if __name__ == "__main__":
    main()
