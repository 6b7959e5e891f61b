"""Load on loopback: N concurrent clients pulling one artifact from serve-cache, beside nginx.

nginx serves the very same store directory statically (blobs and manifests at the same paths), so
both are pulled by the same client code: GET the manifest, then every blob, each verified by its
sha256. Every loop is bounded by a duration and a count; only 127.0.0.1 is contacted.

`ceiling` finds each server's ceiling with wrk (a native load generator: the Python client above is
the bottleneck long before the servers are): serve-cache with 1 and N workers over a directory, one
Redis and a Redis Cluster (started here on loopback), with and without its memory cache, and nginx
over the same directory, each fetching the artifact's blobs round robin, runs interleaved.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table

from celslm.artifact import MemoryReader
from celslm.blocks import build_artifact
from celslm.manifest import Artifact, Manifest, ModelSpace, Producer, sha256_digest
from celslm.store.http import HttpStore
from celslm.store.push import push
from celslm.testing import redis_local
from celslm.testing.processes import ServeCache, Service, free_port

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
    running: list = []
    try:
        url = _start_cache(tmp, "serve-cache", running, "--root", str(tmp / "store"))
        push(MemoryReader(artifact), HttpStore(url))
        servers = {"celslm serve-cache": url}
        note = None
        started = _start_nginx(tmp, tmp / "store", running)
        if started:
            servers["nginx (static files)"] = started
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
        _stop(running)
        shutil.rmtree(tmp, ignore_errors=True)


def _stop(running: list) -> None:
    for service in reversed(running):  # servers, then the Redis they use
        service.stop()


WRK_SCRIPT = """
local paths = {}
for line in io.lines(os.getenv("CELSLM_WRK_PATHS")) do paths[#paths + 1] = line end
local next_path = 0
request = function()
  next_path = next_path + 1
  return wrk.format("GET", paths[(next_path % #paths) + 1])
end
"""
UNITS = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40,
         "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _quantity(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text.strip())
    if not match or match.group(2) not in UNITS:
        raise ValueError(f"wrk printed {text!r}")
    return float(match.group(1)) * UNITS[match.group(2)]


def parse_wrk(output: str) -> dict:
    """Requests/s, bytes/s, p50/p99 latency and the failures from `wrk --latency`'s report."""
    def field(pattern: str, default: str | None = None) -> str:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None and default is None:
            raise ValueError(f"wrk's report has no {pattern!r}: {output[-400:]}")
        return match.group(1) if match else default

    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return {"requests_per_s": float(field(r"^Requests/sec:\s+([0-9.]+)")),
            "mbps": _quantity(field(r"^Transfer/sec:\s+(\S+)")) / 1e6,
            "p50_s": _quantity(field(r"^\s+50%\s+(\S+)")), "p99_s": _quantity(field(r"^\s+99%\s+(\S+)")),
            "non_2xx": int(field(r"Non-2xx or 3xx responses: (\d+)", "0")),
            "socket_errors": sum(int(n) for n in errors.groups()) if errors else 0}


def run_wrk(url: str, paths_file: Path, script: Path, connections: int, seconds: float, threads: int = 2) -> dict:
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "--latency",
               "-s", str(script), url]  # a request slower than 10 s counts as failed
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60,
                          env={**os.environ, "CELSLM_WRK_PATHS": str(paths_file)})
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited with {done.returncode}: {done.stderr.strip()[-300:]}")
    return parse_wrk(done.stdout)


def _start_cache(tmp: Path, name: str, running: list, *args: str) -> str:
    """A serve-cache process (in `running` once it is up; stopped on failure before), logging to a file; its URL."""
    running.append(ServeCache(*args, log=tmp / f"{name}.log"))
    return running[-1].url


def _start_nginx(tmp: Path, store: Path, running: list) -> str | None:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not nginx:
        return None
    port = free_port()
    (tmp / "nginx").mkdir()
    conf = tmp / "nginx" / "nginx.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""  # the store's files are private to this user
    conf.write_text(NGINX_CONF.format(user=user, tmp=tmp / "nginx", port=port, root=store))
    running.append(Service([nginx, "-c", str(conf), "-p", str(tmp / "nginx")], port, "nginx", log=tmp / "nginx.log"))
    return running[-1].url


def ceiling(artifact: Artifact | None = None, seconds: float = 5.0, connections: int = 64, workers: int | None = None,
            repeats: int = 2, progress=None) -> dict:
    """Each server's requests/s, MB/s and latency under wrk at `connections`, fetching the artifact's
    blobs round robin; every server first serves one verified pull of the artifact."""
    artifact = artifact or synthetic_artifact()
    workers = workers or os.cpu_count() or 1
    say = progress or (lambda what: None)
    if not shutil.which("wrk"):
        return {"results": [], "note": "wrk not installed (apt-get install wrk): no ceiling measured"}
    tmp = Path(tempfile.mkdtemp(prefix="celslm-bench-ceiling-"))
    running, servers, notes = [], {}, []
    try:
        store = tmp / "store"
        url = _start_cache(tmp, "dir-1", running, "--root", str(store))
        push(MemoryReader(artifact), HttpStore(url))
        servers["serve-cache dir, 1 worker"] = url
        for name, args in ((f"serve-cache dir, {workers} workers", ()),
                           (f"serve-cache dir, {workers} workers, no memory cache", ("--memory-cache", "0"))):
            servers[name] = _start_cache(tmp, re.sub(r"\W", "", name), running, "--root", str(store), "--workers", str(workers), *args)
        if shutil.which("redis-server") and shutil.which("redis-cli"):
            say("starting Redis and a Redis Cluster (3 masters, 3 replicas) on loopback")
            single = redis_local.start_redis(tmp / "redis")
            running.append(single)
            cluster = redis_local.start_cluster(tmp / "cluster")
            running.append(cluster)
            for label, backend in (("redis", single.url), ("redis cluster", cluster.url)):
                for suffix, args in (("", ()), (", no memory cache", ("--memory-cache", "0"))):
                    name = f"serve-cache {label}, {workers} workers{suffix}"
                    url = _start_cache(tmp, re.sub(r"\W", "", name), running, "--backend", backend, "--workers", str(workers), *args)
                    if not suffix:
                        push(MemoryReader(artifact), HttpStore(url))
                    servers[name] = url
        else:
            notes.append("redis-server not installed (apt-get install redis-server): no Redis rows")
        started = _start_nginx(tmp, store, running)
        if started:
            servers["nginx (static files)"] = started
        else:
            notes.append("nginx not installed (apt-get install nginx-light): no ceiling to compare with")
        for name, url in servers.items():  # every server answers a verified pull (and warms its memory cache)
            check = run_level(name, url, artifact.id, 1, 30.0, 1)
            if check.pulls != 1 or check.corrupted or check.errors:
                raise RuntimeError(f"{name} did not serve the artifact intact: {check}")
        paths = tmp / "paths.txt"
        paths.write_text("".join(f"/v1/blobs/{ref.digest}\n" for ref in artifact.manifest.blob_refs()))
        script = tmp / "blobs.lua"
        script.write_text(WRK_SCRIPT)
        runs: dict[str, list[dict]] = {name: [] for name in servers}
        for repeat in range(repeats):  # interleaved: A B C ... A B C
            for name, url in servers.items():
                say(f"wrk -c{connections} {seconds:g} s: {name} (run {repeat + 1}/{repeats})")
                runs[name].append(run_wrk(url, paths, script, connections, seconds))
        results = []
        for name, found in runs.items():
            row = {"server": name, "runs": found}
            for key in ("requests_per_s", "mbps", "p50_s", "p99_s"):
                row[key] = statistics.median(r[key] for r in found)
            row["failed"] = sum(r["non_2xx"] + r["socket_errors"] for r in found)
            results.append(row)
        blob_sizes = [ref.size for ref in artifact.manifest.blob_refs()]
        return {"connections": connections, "seconds": seconds, "repeats": repeats, "workers": workers,
                "cores": os.cpu_count(), "blobs": len(blob_sizes), "mean_blob_bytes": sum(blob_sizes) / len(blob_sizes),
                "results": results, "note": "; ".join(notes) or None}
    finally:
        _stop(running)
        shutil.rmtree(tmp, ignore_errors=True)


def render(result: dict | None, ceiling: dict | None) -> list:
    """The tables `bench serve` prints: the verifying clients' levels, and wrk's ceilings."""
    shown = []
    if result:
        table = Table("server", "clients", "pulls", "MB/s", "p50 s", "p99 s", "errors", "corrupted",
                      title=f"pulling a {result['tokens']}-token artifact ({result['artifact_bytes'] / 2**20:.1f} MiB, "
                            f"synthetic KV, qwen2.5-coder-0.5b geometry, fp16) over loopback, "
                            f"{result['seconds_per_level']:g} s per level")
        for r in result["results"]:
            table.add_row(r["server"], str(r["clients"]), str(r["pulls"]), f"{r['mbps']:.0f}", f"{r['p50_s']:.3f}",
                          f"{r['p99_s']:.3f}", str(r["errors"]), str(r["corrupted"]))
        shown.append(table)
    if ceiling and ceiling["results"]:
        rows = ceiling["results"]
        nginx = next((r for r in rows if r["server"].startswith("nginx")), None)
        table = Table("server", "requests/s", "MB/s", "of nginx", "p50 ms", "p99 ms", "failed",
                      title=f"wrk -c{ceiling['connections']}, {ceiling['seconds']:g} s x {ceiling['repeats']} interleaved "
                            f"(median), GET of {ceiling['blobs']} blobs round robin ({ceiling['mean_blob_bytes'] / 1e3:.0f} kB "
                            f"mean), wrk and servers sharing {ceiling['cores']} cores on loopback")
        for r in rows:
            table.add_row(r["server"], f"{r['requests_per_s']:,.0f}", f"{r['mbps']:,.0f}",
                          f"{r['mbps'] / nginx['mbps']:.0%}" if nginx else "-", f"{r['p50_s'] * 1e3:.2f}",
                          f"{r['p99_s'] * 1e3:.2f}", str(r["failed"]))
        shown.append(table)
    return shown


def notes(result: dict | None, ceiling: dict | None) -> list[str]:
    """What was left out and why (for stderr)."""
    return [f"note: {part['note']}" for part in (result, ceiling) if part and part["note"]]
