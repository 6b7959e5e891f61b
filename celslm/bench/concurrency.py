"""Concurrent capacity: 1..N edge clients against one cloud process on loopback, per mode.

  cloud-only  the cloud process holds the LLM with the context prefilled; each request uploads a
              prompt and waits for the generated text (requests are served one at a time: CPU bound)
  ce-collm    the same LLM process; each request sends one request's deferral messages (those the
              suite's run on this context sent) and gets the LLM's token for each
  pice        a process serving the context's sketch (written once, ahead of requests); each request
              pulls it
  ce-lslm     the cloud process is serve-cache holding the SLM's artifact; each request pulls it

Only the cloud side is measured: requests per second, p50/p99 latency, and the cloud process's CPU
seconds per request (from /proc). Edge compute is reported separately by the suite: edges and cloud
share this machine's cores here, so wall-clock capacity alone would mislead. Each level is bounded:
every client makes `requests` requests, and the level stops at `timeout_s`.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.request
from pathlib import Path

from celslm.testing.processes import ServeCache, Service, free_port

CLIENT_TIMEOUT_S = 600
CLOUD_MODES = ("ce-lslm", "pice", "cloud-only", "ce-collm")  # the modes with a cloud process to load


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cloud(args: list[str], port: int) -> Service:
    return Service(args, port, "cloud process", timeout_s=300)  # an LLM process loads its model first


def llm_server(model: str, context_file: str, new_tokens: int) -> Service:
    port = free_port()
    return _cloud([sys.executable, "-m", "celslm.bench.cloud_server", "--model", model, "--context", context_file,
                   "--port", str(port), "--max-new-tokens", str(new_tokens)], port)


def sketch_server(sketch_file: str) -> Service:
    port = free_port()
    return _cloud([sys.executable, "-m", "celslm.bench.cloud_server", "--sketch", sketch_file,
                   "--port", str(port)], port)


def level(request, clients: int, requests: int, pid: int, timeout_s: float) -> dict:
    """Run `clients` threads making `requests` requests each; latency percentiles, rps, cloud CPU per request."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + timeout_s

    def client():
        for _ in range(requests):
            if time.monotonic() > deadline:
                return
            begun = time.perf_counter()
            try:
                request()
            except Exception as exc:  # counted and reported, never hidden
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                latencies.append(time.perf_counter() - begun)

    cpu_before, started = cpu_seconds(pid), time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()) + CLIENT_TIMEOUT_S)
    elapsed, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu_before
    done = sorted(latencies)

    def pct(p):
        return done[min(len(done) - 1, int(p * len(done)))] if done else None

    return {"clients": clients, "requests": len(done), "errors": len(errors), "first_error": errors[0] if errors else None,
            "rps": len(done) / elapsed if elapsed else 0.0, "p50_s": pct(0.5), "p99_s": pct(0.99),
            "cloud_cpu_s_per_request": cpu / len(done) if done else None, "seconds": elapsed}


def generate_request(url: str, prompt: str):
    body = json.dumps({"prompt": prompt}).encode()

    def request():
        req = urllib.request.Request(url + "/v1/generate", data=body, headers={"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(req, timeout=CLIENT_TIMEOUT_S).read())

    return request


def defer_request(url: str, messages: list[list[int]]):
    body = json.dumps({"messages": messages}).encode()

    def request():
        req = urllib.request.Request(url + "/v1/defer", data=body, headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=CLIENT_TIMEOUT_S).read())
        if len(reply["tokens"]) != len(messages):
            raise RuntimeError(f"{len(reply['tokens'])} tokens for {len(messages)} deferrals")

    return request


def sketch_request(url: str, sketch: str):
    def request():
        if urllib.request.urlopen(url + "/v1/sketch", timeout=CLIENT_TIMEOUT_S).read().decode() != sketch:
            raise RuntimeError("the sketch came back changed")

    return request


def pull_request(url: str, artifact_id: str):
    from celslm.manifest import Manifest
    from celslm.store.http import HttpStore

    def request():
        client = HttpStore(url)
        try:
            manifest = Manifest.from_bytes(client.get_manifest(artifact_id), url)
            for ref in manifest.blob_refs():
                if client.read_blob(ref.digest, ref.size) is None:  # verified against its digest
                    raise RuntimeError(f"blob {ref.digest} missing on {url}")
        finally:
            client.close()

    return request


def run(llm_model: str, slm, context_text: str, prompt: str, *, levels: tuple[int, ...] = (1, 8, 32),
        requests: int = 2, new_tokens: int = 8, timeout_s: float = 240.0, codec: str = "balanced",
        deferrals: list[list[int]] | None = None, sketch: str | None = None, which: tuple[str, ...] = CLOUD_MODES,
        workdir: Path, progress=None) -> list[dict]:
    """The modes in `which` at every level; one cloud process per kind, started fresh and stopped after.
    CE-CoLLM runs when `deferrals` (one request's messages) are given, PICE when `sketch` is."""
    from celslm.artifact import MemoryReader
    from celslm.blocks import recode
    from celslm.calibrate import codec_codebook
    from celslm.codecs import parse_codec
    from celslm.prefill import prefill
    from celslm.prompting import context_ids, default_framing
    from celslm.store.http import HttpStore
    from celslm.store.push import push

    workdir.mkdir(parents=True, exist_ok=True)
    context_file = workdir / "context.txt"
    context_file.write_text(context_text, encoding="utf-8")
    rows = []

    def levels_of(mode: str, cloud: Service, request) -> None:
        for clients in levels:
            if progress:
                progress(f"concurrency: {mode}, {clients} clients", 0, None)
            rows.append({"mode": mode, **level(request, clients, requests, cloud.proc.pid, timeout_s)})

    framing = default_framing(slm.tokenizer)
    artifact = None if "ce-lslm" not in which else recode(MemoryReader(prefill(slm, context_ids(slm.tokenizer, context_text, framing), framing=framing)),
                      parse_codec(codec), codec_codebook(parse_codec(codec), slm))
    if "ce-lslm" in which:
        with ServeCache("--root", str(workdir / "store"), timeout_s=300) as cloud:
            push(MemoryReader(artifact), HttpStore(cloud.url))
            levels_of("ce-lslm", cloud, pull_request(cloud.url, artifact.id))
    if "pice" in which and sketch is not None:
        sketch_file = workdir / "sketch.txt"
        sketch_file.write_text(sketch, encoding="utf-8")
        with sketch_server(str(sketch_file)) as cloud:
            levels_of("pice", cloud, sketch_request(cloud.url, sketch))
    if "cloud-only" in which or ("ce-collm" in which and deferrals):
        with llm_server(llm_model, str(context_file), new_tokens) as cloud:
            if "cloud-only" in which:
                levels_of("cloud-only", cloud, generate_request(cloud.url, prompt))
            if "ce-collm" in which and deferrals:
                levels_of("ce-collm", cloud, defer_request(cloud.url, deferrals))
    return rows
