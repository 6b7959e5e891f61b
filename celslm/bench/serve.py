"""Load on loopback: N concurrent clients pulling one artifact from serve-cache, beside nginx.

nginx serves the very same store directory statically (blobs and manifests at the same paths), so
both are pulled by the same client code: GET the manifest, then every blob, each verified by its
sha256. Every loop is bounded by a duration and a count; only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from celslm.artifact import Artifact, Manifest, MemoryReader, ModelSpace, Producer, sha256_digest
from celslm.bench.concurrency import free_port
from celslm.blocks import build_artifact
from celslm.store.http import CacheClient
from celslm.store.tiers import push

NGINX_CONF = """
{user}daemon off;
worker_processes auto;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location ~ "^/v1/blobs/sha256:([0-9a-f]{{64}})$" {{ alias {root}/blobs/$1; }}
        location ~ "^/v1/artifacts/sha256:([0-9a-f]{{64}})$" {{ alias {root}/manifests/$1; }}
        location = /v1/health {{ return 200 "ok"; }}
    }}
}}
"""


@dataclass(frozen=True)
class LevelResult:
    server: str
    clients: int
    pulls: int
    seconds: float
    mbps: float  # MB/s of artifact bytes delivered and verified
    p50_s: float
    p99_s: float
    errors: int
    corrupted: int


def synthetic_artifact(tokens: int = 2048, layers: int = 24, kv_heads: int = 2, head_dim: int = 64) -> Artifact:
    """Random KV with qwen2.5-coder-0.5b's geometry, fp16 (the bytes a real artifact of that size has)."""
    generator = torch.Generator().manual_seed(0)
    kv = [(torch.randn(kv_heads, tokens, head_dim, generator=generator),
           torch.randn(kv_heads, tokens, head_dim, generator=generator)) for _ in range(layers)]
    space = ModelSpace("synthetic", "00" * 32)
    return build_artifact(space=space, producer=Producer.native(space),
                          token_ids=list(range(tokens)), layers=kv, chunk_size=256, dtype="float16", framing="raw",
                          provenance=["native"] * layers)


def _wait_up(url: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/v1/health", timeout=1).read()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}")
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not start in 60 s")


async def _client(url: str, artifact_id: str, deadline: float, max_pulls: int, latencies: list, counts: dict) -> None:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        pulls = 0
        while time.monotonic() < deadline and pulls < max_pulls:
            pulls += 1
            started = time.monotonic()
            try:
                async with session.get(f"{url}/v1/artifacts/{artifact_id}") as response:
                    manifest = await response.read()
                    if response.status != 200 or sha256_digest(manifest) != artifact_id:
                        counts["errors"] += 1
                        continue
                refs = Manifest.from_bytes(manifest).blob_refs()
                size = 0
                for ref in refs:
                    async with session.get(f"{url}/v1/blobs/{ref.digest}") as response:
                        data = await response.read()
                    if response.status != 200:
                        counts["errors"] += 1
                        break
                    if sha256_digest(data) != ref.digest:
                        counts["corrupted"] += 1
                        break
                    size += len(data)
                else:
                    latencies.append(time.monotonic() - started)
                    counts["bytes"] += size
                    counts["pulls"] += 1
            except (aiohttp.ClientError, asyncio.TimeoutError):
                counts["errors"] += 1


def run_level(server: str, url: str, artifact_id: str, clients: int, seconds: float, max_pulls: int) -> LevelResult:
    latencies: list[float] = []
    counts = {"errors": 0, "corrupted": 0, "bytes": 0, "pulls": 0}

    async def main():
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(_client(url, artifact_id, deadline, max_pulls, latencies, counts) for _ in range(clients)))

    started = time.monotonic()
    asyncio.run(main())
    elapsed = time.monotonic() - started
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    return LevelResult(server, clients, counts["pulls"], elapsed, counts["bytes"] / 1e6 / elapsed, pct(0.5), pct(0.99),
                       counts["errors"], counts["corrupted"])


def run(levels: tuple[int, ...] = (1, 8, 32, 64), seconds: float = 4.0, max_pulls: int = 1000,
        artifact: Artifact | None = None, progress=None) -> dict:
    artifact = artifact or synthetic_artifact()
    tmp = Path(tempfile.mkdtemp(prefix="celslm-bench-serve-"))
    procs = []
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cache = subprocess.Popen([sys.executable, "-c", "from celslm.commands.main import run; run()", "serve-cache",
                                  "--root", str(tmp / "store"), "--port", str(port)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
        procs.append(cache)
        _wait_up(url, cache, "serve-cache")
        push(MemoryReader(artifact), CacheClient(url))
        servers = {"celslm serve-cache": url}
        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
        note = None
        if nginx:
            nginx_port = free_port()
            (tmp / "nginx").mkdir()
            conf = tmp / "nginx" / "nginx.conf"
            user = "user root;\n" if os.geteuid() == 0 else ""  # the store's files are private to this user
            conf.write_text(NGINX_CONF.format(user=user, tmp=tmp / "nginx", port=nginx_port, root=tmp / "store"))
            proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(tmp / "nginx")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(proc)
            _wait_up(f"http://127.0.0.1:{nginx_port}", proc, "nginx")
            servers["nginx (static files)"] = f"http://127.0.0.1:{nginx_port}"
        else:
            note = "nginx not installed (apt-get install nginx-light): no ceiling measured"
        results = []
        for clients in levels:
            for name, server_url in servers.items():
                if progress:
                    progress(f"{name}, {clients} clients")
                results.append(run_level(name, server_url, artifact.id, clients, seconds, max_pulls))
        return {"artifact_bytes": artifact.manifest.blob_bytes(), "tokens": artifact.manifest.token_count,
                "seconds_per_level": seconds, "results": [r.__dict__ for r in results], "note": note}
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
