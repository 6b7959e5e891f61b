"""Processes on loopback: free ports, the command line as its own process, a server process that is
healthy before it is handed over, and stopping one. Every wait is bounded and says why it gave up.

    with ServeCache("--root", str(store)) as cache:       # celslm serve-cache on a free port
        HttpStore(cache.url) ...
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

CLI = [sys.executable, "-m", "celslm"]  # the command line as its own process (this interpreter's celslm)


def free_ports(count: int, also_free_at: int | None = None) -> list[int]:
    """Ports free on 127.0.0.1, picked by binding port 0; with `also_free_at`, port + also_free_at is
    free as well (a Redis Cluster node's bus port)."""
    with ExitStack() as held:  # held open until all are picked, so no port is picked twice
        ports: list[int] = []
        for _ in range(200 * count):
            if len(ports) == count:
                return ports
            port = _bind(held, 0)
            if also_free_at and (port + also_free_at > 65535 or _bind(held, port + also_free_at) is None):
                continue
            ports.append(port)
    raise RuntimeError(f"found no {count} free ports on 127.0.0.1" + (f" with port + {also_free_at} free" if also_free_at else ""))


def free_port() -> int:
    return free_ports(1)[0]


def _bind(held: ExitStack, port: int) -> int | None:
    sock = held.enter_context(socket.socket())
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        return None
    return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, what: str, timeout_s: float = 60, context=None,
                 log: Path | None = None) -> bytes:
    """GET url/v1/health until it answers (the body), or fail on one line, with the last line the process
    wrote (to its stderr pipe, or to `log`), once it exits or timeout_s has passed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return urllib.request.urlopen(url + "/v1/health", timeout=2, context=context).read()
        except OSError:
            if proc.poll() is not None:
                words = log.read_bytes() if log is not None else proc.stderr.read() if proc.stderr else b""
                last = ([line for line in words.decode(errors="replace").splitlines() if line.strip()] or [""])[-1]
                raise RuntimeError(f"{what} exited with {proc.returncode}: {last.strip()}" + (f" (its log: {log})" if log else ""))
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not start in {timeout_s:g} s" + (f" (its log: {log})" if log else ""))


def stop_process(proc: subprocess.Popen, timeout_s: float = 45) -> int:
    """SIGTERM, then SIGKILL once it has had timeout_s (a serve-cache supervisor gives its workers 40 s);
    the exit code."""
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


class Service:
    """A server process listening on 127.0.0.1:`port`, healthy (GET /v1/health) when this returns;
    stopped by `stop()` or by leaving the `with` block. Its stderr is a pipe (read it after `stop()`),
    or the file `log`; its environment is `env` (default: this process's)."""

    def __init__(self, args: list[str], port: int, what: str, *, scheme: str = "http", context=None,
                 log: Path | None = None, timeout_s: float = 60, env: dict | None = None):
        self.port = port
        self.url = f"{scheme}://127.0.0.1:{port}"
        with ExitStack() as files:
            stderr = files.enter_context(open(log, "wb")) if log is not None else subprocess.PIPE
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr, env=env or os.environ.copy())
        try:
            self.health = wait_healthy(self.url, self.proc, what, timeout_s, context, log)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> int:
        return stop_process(self.proc)

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ServeCache(Service):
    """`celslm serve-cache *args` on a free loopback port (args name its store: --root or --backend)."""

    def __init__(self, *args: str, cli: list[str] = CLI, scheme: str = "http", context=None, log: Path | None = None,
                 timeout_s: float = 60, env: dict | None = None):
        port = free_port()
        super().__init__([*cli, "serve-cache", "--port", str(port), *args], port, "serve-cache", scheme=scheme,
                         context=context, log=log, timeout_s=timeout_s, env=env)
