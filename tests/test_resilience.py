"""Decode keeps answering when the cloud misbehaves: down, stalled, dropping mid-blob, corrupt."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

from aiohttp import web

from celslm.errors import EXIT_UNAVAILABLE
from celslm.store.local import LocalStore
from tests.conftest import GREET_PROMPT as PROMPT, run_cli
from tests.netutil import free_port



class FaultServer:
    """Serves a store like serve-cache does, misbehaving on blob GETs as told."""

    def __init__(self, root: Path, mode: str = "ok", corrupt: set[str] = frozenset()):
        self.root, self.mode, self.corrupt = root, mode, corrupt
        self.manifests: dict[str, bytes] = {}  # id -> bytes served instead of the store's
        self.tags: dict[str, str] = {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.range_requests = 0
        self.blob_requests = 0
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(10)

    async def blob(self, request):
        self.blob_requests += 1
        digest = request.match_info["digest"]
        path = self.root / "blobs" / digest.removeprefix("sha256:")
        if not path.is_file():
            raise web.HTTPNotFound()
        data = path.read_bytes()
        if self.mode == "stall":
            await asyncio.sleep(20)
        if self.mode in ("huge", "trickle"):  # a hostile peer: endless zeros, or one byte a second
            response = web.StreamResponse()
            await response.prepare(request)
            for _ in range(2000 if self.mode == "huge" else 60):  # bounded: 2 GB, or a minute
                await response.write(bytes(1 << 20) if self.mode == "huge" else b"\0")
                if self.mode == "trickle":
                    await asyncio.sleep(1)
            return response
        if self.mode == "huge-declared":
            return web.Response(body=b"", headers={"Content-Length": str(10**10)})
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

    async def manifest(self, request):
        data = self.manifests.get(request.match_info["digest"]) or LocalStore(self.root).get_manifest(request.match_info["digest"])
        return web.Response(body=data) if data else web.Response(status=404)

    async def tag(self, request):
        found = self.tags.get(request.match_info["name"]) or LocalStore(self.root).get_tag(request.match_info["name"])
        return web.Response(text=found) if found else web.Response(status=404)

    def _run(self, ready):
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/v1/blobs/{digest}", self.blob)
        app.router.add_get("/v1/artifacts/{digest}", self.manifest)
        app.router.add_get("/v1/tags/{name}", self.tag)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        ready.set()
        self._loop.run_forever()

    def close(self):
        async def stop():
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(stop(), self._loop)


def decode(model, *args, env=None, check=True):
    return run_cli("decode", "-m", str(model), "-p", PROMPT, "-n", "6", "--json", *args, env=env, check=check)


def test_a_blob_cut_off_mid_way_is_resumed_with_range(published, tiny_qwen):
    folder, manifest, expected = published
    cloud = FaultServer(folder / "store", mode="drop")
    try:
        out = json.loads(decode(tiny_qwen, "--kv", "ctx", "--cloud", cloud.url).stdout)
    finally:
        cloud.close()
    assert out["text"] == expected["text"] and out["fallback"] is None
    assert cloud.range_requests >= len(manifest.blob_refs())  # every blob was resumed, not restarted


def test_a_stalled_peer_is_skipped_for_the_cloud(published, tiny_qwen):
    folder, _, expected = published
    peer, cloud = FaultServer(folder / "store", mode="stall"), FaultServer(folder / "store")
    started = time.monotonic()
    try:
        out = json.loads(decode(tiny_qwen, "--kv", "ctx", "--peer", peer.url, "--cloud", cloud.url,
                                env={"CELSLM_TIMEOUT": "1"}).stdout)
    finally:
        peer.close()
        cloud.close()
    assert out["text"] == expected["text"]
    assert list(out["bytes_by_source"]) == [f"cloud {cloud.url}"]
    # the blobs in flight are each tried with backoff (4 attempts); then the peer is marked down, never asked again
    assert 4 <= peer.blob_requests <= 4 * 4 and time.monotonic() - started < 60


def test_corrupt_blocks_beyond_the_first_chunk_are_recomputed_from_context(published, tiny_qwen):
    folder, manifest, expected = published
    later = {layer[chunk].digest for layer in manifest.blocks for chunk in range(1, manifest.chunks)}
    cloud = FaultServer(folder / "store", corrupt=later)
    try:
        out = json.loads(decode(tiny_qwen, "--kv", "ctx", "--cloud", cloud.url, "--context", str(folder / "ctx.txt"),
                                "--chunk-size", "64").stdout)
    finally:
        cloud.close()
    assert out["path"] == "partial" and "corrupt" in out["fallback"]
    assert out["text"] == expected["text"] and out["context_prefill_s"] > 0


def test_a_cloud_that_is_down_falls_back_to_local_prefill(published, tiny_qwen):
    folder, manifest, expected = published
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = json.loads(decode(tiny_qwen, "--kv", manifest.id, "--cloud", down, "--context", str(folder / "ctx.txt")).stdout)
    assert out["path"] == "edge-only" and "cannot reach" in out["fallback"] and out["text"] == expected["text"]


def test_no_source_and_no_context_is_a_clear_error(published, tiny_qwen):
    folder, manifest, _ = published
    down = f"http://127.0.0.1:{free_port()}"
    result = decode(tiny_qwen, "--kv", manifest.id, "--cloud", down, check=False)
    assert result.returncode == EXIT_UNAVAILABLE and result.stdout == b""
    lines = [line for line in result.stderr.decode().splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach" in lines[0]
