"""Loopback helpers for server tests: serve-cache over a store folder, and a proxy that records what
clients send. Ports, health waits and stopping are celslm.testing.processes' (the benchmarks use them too)."""

from __future__ import annotations

import asyncio
import ssl
import threading

from celslm.testing.processes import CLI, ServeCache, free_port, stop_process, wait_healthy  # noqa: F401 (tests import them here)


class Server(ServeCache):
    """celslm serve-cache over the store folder `root`, trusting `cafile` for HTTPS."""

    def __init__(self, root, *args: str, scheme: str = "http", cafile=None, cli: list[str] = CLI):
        context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
        super().__init__("--root", str(root), *args, cli=cli, scheme=scheme, context=context)


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
