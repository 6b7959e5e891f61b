"""A round trip from a normal install: run with the python of a fresh venv that installed the built wheel.

    python tests/wheel_roundtrip.py            (by `make wheel-check`, part of `make test`)

It checks that celslm is imported from that install (not this source tree), that `celslm --version`
loads neither torch nor transformers, then on a tiny model: prefill, push to a serve-cache started
here (loopback), decode from it by tag with an empty edge cache, and compare the answer with an
edge-only decode of the same context. Any failure exits non-zero with what went wrong.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
CELSLM = Path(sys.executable).parent / "celslm"
CONTEXT = "def greet(name):\n    return 'Hello, ' + name + '!'\n\nclass Counter:\n    count = 0\n" * 4


def run(*args: str, env: dict) -> str:
    result = subprocess.run([str(CELSLM), *args], capture_output=True, text=True, env=env, timeout=300)
    if result.returncode != 0:
        sys.exit(f"wheel round trip: celslm {' '.join(args)} exited {result.returncode}: {result.stderr.strip()[-1500:]}")
    return result.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"wheel round trip: serve-cache exited {server.returncode}: {server.stderr.read().decode()[-1500:]}")
        try:
            urllib.request.urlopen(f"{url}/v1/health", timeout=1).read()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit("wheel round trip: serve-cache did not answer within 60 s")


def main() -> None:
    os.environ["TQDM_DISABLE"] = "1"  # transformers' save bars
    work = Path(tempfile.mkdtemp(prefix="celslm-wheel-"))
    atexit.register(shutil.rmtree, work, True)  # on success and on sys.exit alike
    os.chdir(work)  # never the source tree: `import celslm` must find the installed package
    spec = importlib.util.find_spec("celslm")
    if spec is None or Path(sys.prefix).resolve() not in Path(spec.origin).resolve().parents:
        sys.exit(f"wheel round trip: celslm is not imported from the installed wheel ({spec and spec.origin})")
    env = {**os.environ, "CELSLM_HOME": str(work / "cloud-home"), "CELSLM_DEBUG": "1"}
    probe = ("import sys\nsys.argv = ['celslm', '--version']\nfrom celslm.commands.main import run\n"
             "try:\n    run()\nexcept SystemExit:\n    pass\n"
             "print('heavy:' + ','.join(m for m in ('torch', 'transformers') if m in sys.modules))")
    heavy = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    if heavy.returncode != 0:
        sys.exit(f"wheel round trip: celslm --version failed:\n{heavy.stderr[-1500:]}")
    if heavy.stdout.splitlines()[-1:] != ["heavy:"]:
        sys.exit(f"wheel round trip: celslm --version loaded {heavy.stdout.splitlines()[-1]}")
    print(run("--version", env=env).strip())

    spec = importlib.util.spec_from_file_location("tiny", HERE / "tiny.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    model = str(tiny.save_tiny_model(work / "tiny-qwen2", "qwen2", seed=1))
    (work / "ctx.txt").write_text(CONTEXT)
    run("prefill", "-m", model, "-c", "ctx.txt", "-o", "ctx.kv", "--chunk-size", "32", env=env)

    url = f"http://127.0.0.1:{free_port()}"
    server = subprocess.Popen([str(CELSLM), "serve-cache", "--root", "store", "--port", url.rsplit(":", 1)[1],
                               "--write-token", "w"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_healthy(url, server)
        run("push", "ctx.kv", url, "--tag", "ctx:latest", "--token", "w", env=env)
        edge = {**env, "CELSLM_HOME": str(work / "edge-home")}  # an empty edge cache: every blob comes from the server
        fetched = json.loads(run("decode", "-m", model, "--kv", "ctx:latest", "--cloud", url, "-p", "Who is greeted?",
                                 "-n", "12", "--json", env=edge))
    finally:
        server.terminate()
        server.wait(timeout=30)
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
