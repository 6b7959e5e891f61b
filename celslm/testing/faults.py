"""A serve-cache that misbehaves as told: it serves a store's manifests, tags and blobs as serve-cache
does (GET only, no signed statements or signatures: those are 404), and lies in one way.

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

from celslm.manifest import sha256_digest
from celslm.store.local import LocalStore
from celslm.testing.processes import free_port
from celslm.trust import canonical_json

MODES = ("ok", "stall", "drop", "huge", "huge-declared", "trickle", "counts")


class Faults:
    """The misbehaving server's state and routes (`app`); it counts the requests it was sent."""

    def __init__(self, root: Path, mode: str = "ok", corrupt: set[str] = frozenset()):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
        self.root, self.mode, self.corrupt = Path(root), mode, corrupt
        self.store = LocalStore(self.root)
        self.manifests: dict[str, bytes] = {}  # id -> bytes served instead of the store's
        self.tags: dict[str, str] = {}
        self.range_requests = 0
        self.blob_requests = 0

    def app(self) -> web.Application:
        application = web.Application()
        application.router.add_get("/v1/health", self.health)
        application.router.add_get("/v1/blobs/{digest}", self.blob)
        application.router.add_get("/v1/artifacts/{digest}", self.manifest)
        application.router.add_get("/v1/tags/{name}", self.tag)
        return application  # anything else (statements, signatures, timings, lookups): 404

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "faults": self.mode})

    async def blob(self, request: web.Request) -> web.StreamResponse:
        self.blob_requests += 1
        digest = request.match_info["digest"]
        path = self.root / "blobs" / digest.removeprefix("sha256:")
        if not path.is_file():
            raise web.HTTPNotFound()
        if self.mode == "stall":
            await asyncio.sleep(20)
        if self.mode in ("huge", "trickle"):  # endless zeros, or one byte a second
            response = web.StreamResponse()
            await response.prepare(request)
            for _ in range(2000 if self.mode == "huge" else 60):  # bounded: 2 GB, or a minute
                await response.write(bytes(1 << 20) if self.mode == "huge" else b"\0")
                if self.mode == "trickle":
                    await asyncio.sleep(1)
            return response
        if self.mode == "huge-declared":
            return web.Response(body=b"", headers={"Content-Length": str(10**10)})
        data = path.read_bytes()
        if digest in self.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        if self.mode == "drop":
            if "Range" in request.headers:
                self.range_requests += 1
                start = int(request.headers["Range"].removeprefix("bytes=").rstrip("-"))
                return web.Response(status=206, body=data[start:],
                                    headers={"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
            response = web.StreamResponse()
            response.content_length = len(data)
            await response.prepare(request)
            await response.write(data[: len(data) // 2])
            request.transport.close()  # the connection dies mid-blob
            return response
        return web.Response(body=data)

    async def manifest(self, request: web.Request) -> web.Response:
        artifact_id = request.match_info["digest"]
        data = self.manifests.get(artifact_id) or self.store.get_manifest(artifact_id)
        if data and self.mode == "counts":
            data = self._inflated(data)
            self.manifests[sha256_digest(data)] = data
        return web.Response(body=data) if data else web.Response(status=404)

    async def tag(self, request: web.Request) -> web.Response:
        found = self.tags.get(request.match_info["name"]) or self.store.get_tag(request.match_info["name"])
        if found and self.mode == "counts":
            data = self.manifests.get(found) or self.store.get_manifest(found)
            found = None
            if data:
                data = self._inflated(data)
                found = sha256_digest(data)
                self.manifests[found] = data
        return web.Response(text=found) if found else web.Response(status=404)

    @staticmethod
    def _inflated(data: bytes) -> bytes:
        """The manifest, forged to declare 10^9 tokens."""
        obj = json.loads(data)
        obj["tokens"]["count"] = 10**9
        return canonical_json(obj)


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
