"""A hostile peer for `bench hostile`: serves a store's manifests as serve-cache does, and lies as told.

    python hostile_peer.py ROOT PORT MODE

  huge      every blob is an endless body of zeros, no length declared (bounded: 2 GB)
  declared  every blob declares 10 GB and sends nothing
  trickle   every blob comes one byte a second (bounded: a minute)
  counts    every manifest asked for is one declaring 10^9 tokens, and every tag names it, unsigned

It has no signed statements and no signatures (404), so under a trust policy its tags are passed
over and the cloud's are used. It listens on loopback only; every answer is bounded in bytes and time.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from aiohttp import web

from celslm.manifest import sha256_digest
from celslm.store.local import LocalStore
from celslm.trust import canonical_json

MODES = ("huge", "declared", "trickle", "counts")


def app(root: Path, mode: str) -> web.Application:
    store = LocalStore(root)
    inflated: dict[str, bytes] = {}  # a manifest's id -> its forgery declaring 10^9 tokens

    def forged(artifact_id: str) -> bytes | None:
        if artifact_id not in inflated:
            data = store.get_manifest(artifact_id)
            if data is None:
                return None
            obj = json.loads(data)
            obj["tokens"]["count"] = 10**9
            inflated[artifact_id] = canonical_json(obj)
        return inflated[artifact_id]

    async def blob(request: web.Request) -> web.StreamResponse:
        if mode == "declared":
            return web.Response(body=b"", headers={"Content-Length": str(10**10)})
        if mode not in ("huge", "trickle"):
            raise web.HTTPNotFound()
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(2000 if mode == "huge" else 60):
            await response.write(bytes(1 << 20) if mode == "huge" else b"\0")
            if mode == "trickle":
                await asyncio.sleep(1)
        return response

    async def manifest(request: web.Request) -> web.Response:
        artifact_id = request.match_info["digest"]
        data = forged(artifact_id) if mode == "counts" else store.get_manifest(artifact_id)
        return web.Response(body=data) if data else web.Response(status=404)

    async def tag(request: web.Request) -> web.Response:
        if mode != "counts":
            raise web.HTTPNotFound()
        found = store.get_tag(request.match_info["name"])
        data = forged(found) if found else None
        return web.Response(text=sha256_digest(data)) if data else web.Response(status=404)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "hostile": mode})

    async def absent(request: web.Request) -> web.Response:
        return web.Response(status=404)

    application = web.Application()
    application.router.add_get("/v1/health", health)
    application.router.add_get("/v1/blobs/{digest}", blob)
    application.router.add_get("/v1/artifacts/{digest}", manifest)
    application.router.add_get("/v1/tags/{name}", tag)
    application.router.add_route("*", "/{tail:.*}", absent)  # statements, signatures, timings, lookups: none
    return application


if __name__ == "__main__":
    root, port, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    if mode not in MODES:
        sys.exit(f"mode {mode!r}: one of {', '.join(MODES)}")
    web.run_app(app(root, mode), host="127.0.0.1", port=port, print=None, access_log=None)
