"""Loopback helpers for server tests: start serve-cache, and a proxy that records what clients send."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import threading
import time
import urllib.request

from tests.conftest import CLI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, what: str, context=None) -> bytes:
    """GET url/v1/health until it answers (the body), or fail with the process's last words."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            return urllib.request.urlopen(url + "/v1/health", timeout=1, context=context).read()
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not start in 60 s")


def stop_process(proc: subprocess.Popen) -> int:
    """SIGTERM, then SIGKILL after 30 s; the exit code."""
    proc.terminate()
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


class Server:
    def __init__(self, root, *args: str, scheme: str = "http", cafile=None, cli: list[str] = CLI):
        self.port = free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
        self.proc = subprocess.Popen(cli + ["serve-cache", "--root", str(root), "--port", str(self.port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
        wait_healthy(self.url, self.proc, "serve-cache", context)

    def stop(self) -> int:
        return stop_process(self.proc)


class RecordingProxy:
    """A TCP proxy on loopback that records every byte clients send to the target."""

    def __init__(self, target_port: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.sent = bytearray()
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(target_port, ready), daemon=True)
        self._thread.start()
        ready.wait(10)

    def _run(self, target_port: int, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def pipe(reader, writer, record: bool):
            try:
                while data := await reader.read(65536):
                    if record:
                        self.sent.extend(data)
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        async def handle(client_reader, client_writer):
            self.connections += 1
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target_port)
            await asyncio.gather(pipe(client_reader, server_writer, True), pipe(server_reader, client_writer, False))

        async def main():
            server = await asyncio.start_server(handle, "127.0.0.1", self.port)
            ready.set()
            async with server:
                await server.serve_forever()

        try:
            self._loop.run_until_complete(main())
        except RuntimeError:
            pass

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
