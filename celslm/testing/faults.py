"""A serve-cache that misbehaves as told: serve-cache's own app (server.app_for) over a store that
lies (`FaultyStore`), with the transport faults in front of its blob route. Tests and `bench hostile`
both use it. Signatures, signed statements, timings and lookups are never there (404 or a miss).

  ok             as serve-cache
  stall          every blob waits 20 s before it comes
  drop           every blob is cut off half-way (the connection dies); a Range request gets the rest
  huge           every blob is an endless body of zeros, no length declared (bounded: 2 GB)
  huge-declared  every blob declares 10 GB and sends nothing
  trickle        every blob comes one byte a second (bounded: a minute)
  counts         every manifest asked for is one declaring 10^9 tokens, and every tag names it, unsigned

`corrupt` digests are served with their last byte flipped; `manifests` and `tags` are served instead
of the store's. It listens on loopback only; every answer is bounded in bytes and time.

    peer = FaultServer(store_root, mode="trickle")        # in a thread of this process
    ... decode --peer peer.url ...; peer.blob_requests; peer.close()

    python -m celslm.testing.faults ROOT PORT MODE        # as its own process (bench hostile)
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from pathlib import Path

from aiohttp import web

from celslm.manifest import Timings, sha256_digest
from celslm.server import ServerConfig, State, app_for
from celslm.store.local import LocalStore
from celslm.testing.processes import free_port
from celslm.trust import canonical_json

MODES = ("ok", "stall", "drop", "huge", "huge-declared", "trickle", "counts")


class FaultyStore(LocalStore):
    """A directory store that lies: corrupt blobs, forged manifests and tags (`manifests`, `tags`, and
    in mode `counts` every manifest inflated to 10^9 tokens), and no signatures, statements, timings or
    lookups. Its blobs are read through `read_blob` only, so the server sends what it says."""

    on_disk = False

    def __init__(self, root: Path, mode: str = "ok", corrupt: set[str] = frozenset()):
        super().__init__(root)
        self.mode, self.corrupt = mode, corrupt
        self.manifests: dict[str, bytes] = {}  # id -> bytes served instead of the store's
        self.tags: dict[str, str] = {}

    def blob_file(self, digest: str) -> Path | None:
        return None

    def read_blob(self, digest: str, limit: int | None = None) -> bytes | None:
        data = self._read("blobs", digest.removeprefix("sha256:"))
        if data and digest in self.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        return data

    def get_manifest(self, artifact_id: str) -> bytes | None:
        data = self.manifests.get(artifact_id) or super().get_manifest(artifact_id)
        return self._inflated(data) if data and self.mode == "counts" else data

    def get_tag(self, name: str) -> str | None:
        found = self.tags.get(name) or super().get_tag(name)
        if found and self.mode == "counts":
            data = self.get_manifest(found)
            return sha256_digest(data) if data else None
        return found

    def get_signed_tag(self, name: str):
        return None

    def get_signatures(self, artifact_id: str) -> tuple:
        return ()

    def get_timings(self, artifact_id: str) -> Timings:
        return Timings()

    def lookup(self, space, prefix_hashes):
        return None

    def _inflated(self, data: bytes) -> bytes:
        """The manifest, forged to declare 10^9 tokens (and kept, so its id can be asked for)."""
        obj = json.loads(data)
        obj["tokens"]["count"] = 10**9
        forged = canonical_json(obj)
        self.manifests[sha256_digest(forged)] = forged
        return forged


class Faults:
    """The misbehaving server: serve-cache's app over a `FaultyStore`, with `mode`'s transport fault
    in front of blob reads (`app`); it counts the blob requests it was sent."""

    def __init__(self, root: Path, mode: str = "ok", corrupt: set[str] = frozenset()):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
        self.root, self.mode = Path(root), mode
        self.store = FaultyStore(self.root, mode, corrupt)
        self.manifests, self.tags = self.store.manifests, self.store.tags
        self.range_requests = 0
        self.blob_requests = 0

    def app(self) -> web.Application:
        config = ServerConfig(store=str(self.root), memory_bytes=0)
        return app_for(State.over(config, self.store), middlewares=(self._transport,))

    @web.middleware
    async def _transport(self, request: web.Request, handler):
        if not request.path.startswith("/v1/blobs/") or request.method != "GET":
            return await handler(request)
        self.blob_requests += 1
        if self.mode == "stall":
            await asyncio.sleep(20)
        if self.mode in ("huge", "trickle", "huge-declared"):
            if not await asyncio.to_thread(self.store.has_blob, request.match_info.get("digest", "")):
                raise web.HTTPNotFound()
            if self.mode == "huge-declared":
                return web.Response(body=b"", headers={"Content-Length": str(10**10)})
            response = web.StreamResponse()  # endless zeros, or one byte a second
            await response.prepare(request)
            for _ in range(2000 if self.mode == "huge" else 60):  # bounded: 2 GB, or a minute
                await response.write(bytes(1 << 20) if self.mode == "huge" else b"\0")
                if self.mode == "trickle":
                    await asyncio.sleep(1)
            return response
        if self.mode == "drop" and "Range" in request.headers:
            self.range_requests += 1
        answer = await handler(request)
        if self.mode != "drop" or "Range" in request.headers or answer.status != 200:
            return answer
        response = web.StreamResponse()
        response.content_length = len(answer.body)
        await response.prepare(request)
        await response.write(answer.body[: len(answer.body) // 2])
        request.transport.close()  # the connection dies mid-blob
        return response


class FaultServer(Faults):
    """Faults served from a thread of this process on a free loopback port (`url`) until `close()`."""

    def __init__(self, root: Path, mode: str = "ok", corrupt: set[str] = frozenset()):
        super().__init__(root, mode, corrupt)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        if not ready.wait(10):
            raise RuntimeError(f"the fault server on port {self.port} did not start in 10 s")

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        runner = web.AppRunner(self.app())
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        async def stop():
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(stop(), self._loop)


if __name__ == "__main__":
    root, port, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    if mode not in MODES:
        sys.exit(f"mode {mode!r}: one of {', '.join(MODES)}")
    web.run_app(Faults(root, mode).app(), host="127.0.0.1", port=port, print=None, access_log=None)
