"""serve-cache on loopback: API, push/pull, tiers, privacy, security and faults."""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import subprocess
import json
import socket
import struct
import time
import urllib.request
from pathlib import Path

import pytest

from celslm.errors import EXIT_USAGE, IntegrityError
from celslm.store.http import HttpStore
from tests.conftest import CONTEXT, run_cli
from tests.netutil import RecordingProxy, Server

PROMPT = "Which secret word unlocks greet? xyzzy-4417"


@pytest.fixture()
def servers(tmp_path):
    started = []

    def start(name: str, *args: str) -> Server:
        server = Server(tmp_path / name, *args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def artifact(prefilled):
    return prefilled, json.loads((prefilled / "a.kv" / "manifest.json").read_bytes())


def call(url: str, method: str, path: str, body: bytes | None = None, token: str | None = None, headers=None):
    return call_with_headers(url, method, path, body, token, headers)[:2]


def call_with_headers(url: str, method: str, path: str, body: bytes | None = None, token: str | None = None, headers=None):
    """(status, body, response headers)."""
    request = urllib.request.Request(url + path, data=body, method=method, headers=headers or {})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers


def first_block(manifest) -> str:
    return manifest["blocks"][0][0]["digest"]


def wait_until(condition, timeout_s: float = 10.0) -> bool:
    """Poll `condition` until it holds (True) or `timeout_s` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_push_then_pull_round_trips_and_second_push_sends_nothing(servers, artifact, tmp_path):
    folder, manifest = artifact
    cloud = servers("cloud")
    first = json.loads(run_cli("push", str(folder / "a.kv"), cloud.url, "--tag", "ctx:latest", "--json", check=True).stdout)
    again = json.loads(run_cli("push", str(folder / "a.kv"), cloud.url, "--json", check=True).stdout)
    assert first["blobs_sent"] == 1 + sum(len(layer) for layer in manifest["blocks"]) and first["blobs_skipped"] == 0
    assert again["blobs_sent"] == 0 and again["bytes_sent"] == 0
    run_cli("pull", f"{cloud.url}/v1/tags/ctx:latest", "--out", str(tmp_path / "b.kv"), check=True)
    assert (tmp_path / "b.kv" / "manifest.json").read_bytes() == (folder / "a.kv" / "manifest.json").read_bytes()
    assert run_cli("verify", str(tmp_path / "b.kv")).returncode == 0


def test_blob_get_supports_range_and_head(servers, artifact):
    folder, manifest = artifact
    cloud = servers("cloud")
    run_cli("push", str(folder / "a.kv"), cloud.url, check=True)
    digest = first_block(manifest)
    data = (folder / "a.kv" / "blobs" / digest.removeprefix("sha256:")).read_bytes()
    status, body = call(cloud.url, "GET", f"/v1/blobs/{digest}", headers={"Range": "bytes=10-29"})
    assert status == 206 and body == data[10:30]
    assert call(cloud.url, "HEAD", f"/v1/blobs/{digest}")[0] == 200
    assert call(cloud.url, "HEAD", "/v1/blobs/sha256:" + "0" * 64)[0] == 404


def test_manifest_with_missing_blobs_gets_409_listing_them(servers, artifact):
    folder, manifest = artifact
    cloud = servers("cloud")
    data = (folder / "a.kv" / "manifest.json").read_bytes()
    artifact_id = "sha256:" + hashlib.sha256(data).hexdigest()
    status, body = call(cloud.url, "PUT", f"/v1/artifacts/{artifact_id}", data)
    assert status == 409 and first_block(manifest) in json.loads(body)["missing"]
    assert call(cloud.url, "GET", f"/v1/artifacts/{artifact_id}")[0] == 404


def test_tokens_guard_writes_and_reads(servers, artifact):
    folder, manifest = artifact
    cloud = servers("cloud", "--write-token", "w-secret", "--read-token", "r-secret")
    blob = b"hello"
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    status, _, headers = call_with_headers(cloud.url, "PUT", f"/v1/blobs/{digest}", blob)
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert call(cloud.url, "PUT", f"/v1/blobs/{digest}", blob, token="wrong")[0] == 403
    assert call(cloud.url, "PUT", f"/v1/blobs/{digest}", blob, token="r-secret")[0] == 403
    assert call(cloud.url, "PUT", f"/v1/blobs/{digest}", blob, token="w-secret")[0] == 201
    assert call(cloud.url, "GET", f"/v1/blobs/{digest}")[0] == 401
    assert call(cloud.url, "GET", f"/v1/blobs/{digest}", token="r-secret") == (200, blob)
    refused = run_cli("push", str(folder / "a.kv"), cloud.url)
    assert refused.returncode == EXIT_USAGE and b"needs a bearer token; give one with --token or CELSLM_TOKEN" in refused.stderr


@pytest.mark.parametrize("path", ["/v1/blobs/sha256:xyz", "/v1/blobs/../../etc/passwd", "/v1/blobs/sha256:" + "A" * 64,
                                  "/v1/tags/..%2F..%2Fetc", "/v1/tags/a/b/c", "/v1/nothing", "/admin"])
def test_malformed_digests_traversal_and_unknown_routes_are_refused(servers, path):
    cloud = servers("cloud")
    assert call(cloud.url, "GET", path)[0] == 404
    assert call(cloud.url, "PUT", path, b"x")[0] in (404, 405)


def test_oversized_body_gets_413(servers):
    cloud = servers("cloud", "--max-blob", "1000")
    blob = b"x" * 5000
    status, _ = call(cloud.url, "PUT", "/v1/blobs/sha256:" + hashlib.sha256(blob).hexdigest(), blob)
    assert status == 413


def test_blob_whose_bytes_do_not_match_is_refused_and_not_stored(servers):
    cloud = servers("cloud")
    digest = "sha256:" + hashlib.sha256(b"the real bytes").hexdigest()
    status, body = call(cloud.url, "PUT", f"/v1/blobs/{digest}", b"other bytes")
    assert status == 422 and b"hash to" in body  # an IntegrityError: the status the table gives it
    assert call(cloud.url, "HEAD", f"/v1/blobs/{digest}")[0] == 404
    with pytest.raises(IntegrityError, match="hash to"):  # and the client reads it as one (push exits 3)
        HttpStore(cloud.url).put_blob(digest, b"other bytes")


def _partial_upload(url_port: int, digest: str, declared: int, sent: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", url_port), timeout=10)
    sock.sendall(f"PUT /v1/blobs/{digest} HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n\r\n".encode() + sent)
    return sock


def test_upload_killed_halfway_leaves_no_object(servers, tmp_path):
    cloud = servers("cloud")
    blob = bytes(range(256)) * 400
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    uploads = tmp_path / "cloud" / "tmp"
    upload = _partial_upload(cloud.port, digest, len(blob), blob[:30000])
    assert wait_until(lambda: any(uploads.iterdir())), "the upload never reached the store"
    upload.close()
    assert wait_until(lambda: not any(uploads.iterdir())), "the killed upload left its bytes behind"
    assert call(cloud.url, "HEAD", f"/v1/blobs/{digest}")[0] == 404
    assert not (tmp_path / "cloud" / "blobs" / digest.removeprefix("sha256:")).exists()


def test_silent_client_times_out(servers, tmp_path):
    cloud = servers("cloud", "--read-timeout", "1")
    blob = b"y" * 10000
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    sock = _partial_upload(cloud.port, digest, len(blob), blob[:100])
    started = time.monotonic()
    reply = sock.recv(4096)  # the server answers (408) or closes; it does not wait for us forever
    assert time.monotonic() - started < 10
    assert reply == b"" or b" 408 " in reply.split(b"\r\n")[0]
    sock.close()
    assert list((tmp_path / "cloud" / "tmp").iterdir()) == []


def test_a_corrupt_stored_blob_is_quarantined_and_a_new_push_repairs_it(servers, artifact, tmp_path):
    folder, manifest = artifact
    cloud = servers("cloud")
    run_cli("push", str(folder / "a.kv"), cloud.url, check=True)
    digest = first_block(manifest)
    hex_ = digest.removeprefix("sha256:")
    stored = tmp_path / "cloud" / "blobs" / hex_
    stored.write_bytes(stored.read_bytes()[:-1] + b"\x00")
    assert HttpStore(cloud.url).read_blob(digest, manifest["blocks"][0][0]["size"]) is None  # not served: 404
    assert (tmp_path / "cloud" / "quarantine" / hex_).is_file() and not stored.exists()
    again = json.loads(run_cli("push", str(folder / "a.kv"), cloud.url, "--json", check=True).stdout)
    assert again["blobs_sent"] == 1 and stored.read_bytes() == (folder / "a.kv" / "blobs" / hex_).read_bytes()
    run_cli("pull", f"{cloud.url}/v1/artifacts/{again['id']}", "--out", str(tmp_path / "back.kv"), check=True)


def test_decode_from_a_peer_that_has_everything_never_asks_the_cloud(servers, artifact, tiny_qwen):
    folder, manifest = artifact
    peer, cloud = servers("peer"), servers("cloud")
    run_cli("push", str(folder / "a.kv"), peer.url, "--tag", "ctx", check=True)
    run_cli("push", str(folder / "a.kv"), cloud.url, "--tag", "ctx", check=True)
    peer_proxy, cloud_proxy = RecordingProxy(peer.port), RecordingProxy(cloud.port)
    try:
        out = json.loads(run_cli("decode", "-m", str(tiny_qwen), "--kv", "ctx", "--peer", peer_proxy.url,
                                 "--cloud", cloud_proxy.url, "-p", PROMPT, "-n", "6", "--json", check=True).stdout)
        local = json.loads(run_cli("decode", "-m", str(tiny_qwen), "--kv", str(folder / "a.kv"), "-p", PROMPT,
                                   "-n", "6", "--json", check=True).stdout)
    finally:
        peer_proxy.close()
        cloud_proxy.close()
    assert out["text"] == local["text"]
    assert cloud_proxy.connections == 0 and cloud_proxy.sent == b""
    assert list(out["bytes_by_source"]) == [f"peer {peer_proxy.url}"]
    assert_private(peer_proxy.sent, tiny_qwen)


def assert_private(sent: bytes, model_folder) -> None:
    """Neither the prompt's text nor its token ids, in any plain encoding, crossed the link."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert sent, "the proxy recorded nothing: the test would prove nothing"
    needles = [PROMPT.encode(), b"xyzzy", ",".join(map(str, ids)).encode(), " ".join(map(str, ids)).encode(),
               struct.pack(f"<{len(ids)}I", *ids), struct.pack(f"<{len(ids)}q", *ids), bytes(ids) if max(ids) < 256 else b"\xff" * 64]
    for needle in needles:
        assert needle not in sent, needle


def test_partial_hit_reuses_the_cached_prefix_and_prefills_the_rest_privately(servers, artifact, tiny_qwen, tmp_path):
    folder, manifest = artifact
    cloud = servers("cloud")
    run_cli("push", str(folder / "a.kv"), cloud.url, check=True)
    longer = tmp_path / "longer.txt"
    longer.write_text(CONTEXT * 3 + "\ndef extra():\n    return 42\n")
    proxy = RecordingProxy(cloud.port)
    try:
        out = json.loads(run_cli("decode", "-m", str(tiny_qwen), "--context", str(longer), "--cloud", proxy.url,
                                 "--chunk-size", "64", "-p", PROMPT, "-n", "6", "--json", check=True).stdout)
    finally:
        proxy.close()
    edge = json.loads(run_cli("decode", "-m", str(tiny_qwen), "--context", str(longer), "-p", PROMPT, "-n", "6",
                              "--json", check=True).stdout)
    assert out["path"] == "partial" and out["text"] == edge["text"]
    assert out["artifact"] == "sha256:" + hashlib.sha256((folder / "a.kv" / "manifest.json").read_bytes()).hexdigest()
    assert sum(out["bytes_by_source"].values()) > 0
    assert_private(proxy.sent, tiny_qwen)


def test_capacity_evicts_least_recently_used_artifacts(servers, tiny_qwen, tmp_path):
    contexts = []
    for i in range(3):
        (tmp_path / f"c{i}.txt").write_text(f"# file {i}\n" + CONTEXT)
        run_cli("prefill", "-m", str(tiny_qwen), "-c", str(tmp_path / f"c{i}.txt"), "-o", str(tmp_path / f"c{i}.kv"), check=True)
        contexts.append(tmp_path / f"c{i}.kv")
    one = sum(p.stat().st_size for p in (contexts[0] / "blobs").iterdir())
    cloud = servers("cloud", "--capacity", str(int(one * 2.5)))
    ids = []
    for path in contexts:
        ids.append(json.loads(run_cli("push", str(path), cloud.url, "--json", check=True).stdout)["id"])
    assert call(cloud.url, "GET", f"/v1/artifacts/{ids[0]}")[0] == 404  # the oldest went
    assert call(cloud.url, "GET", f"/v1/artifacts/{ids[2]}")[0] == 200
    metrics = call(cloud.url, "GET", "/metrics")[1].decode()
    assert "celslm_evictions_total 1.0" in metrics and "celslm_bytes_in_total" in metrics


def test_sigterm_shuts_down_cleanly(servers):
    cloud = servers("cloud")
    assert call(cloud.url, "GET", "/v1/health")[0] == 200
    assert cloud.stop() == 0


def test_bench_serve_pulls_verified_artifacts_with_zero_errors():
    from celslm.bench import serve as serve_bench

    artifact = serve_bench.synthetic_artifact(tokens=256, layers=2)
    result = serve_bench.run(levels=(2,), seconds=5.0, max_pulls=3, artifact=artifact)  # 3 pulls each, unless the machine is slow
    for row in result["results"]:
        assert row["pulls"] > 0 and row["errors"] == 0 and row["corrupted"] == 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed (needed to make a test certificate)")
def test_tls_and_prefill_push_with_a_tag(tmp_path, tiny_qwen, monkeypatch):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem")], check=True, capture_output=True)
    server = Server(tmp_path / "store", "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem"),
                    "--write-token", "w", scheme="https", cafile=tmp_path / "cert.pem")
    monkeypatch.setenv("CELSLM_CA_FILE", str(tmp_path / "cert.pem"))
    try:
        (tmp_path / "ctx.txt").write_text(CONTEXT)
        done = json.loads(run_cli("prefill", "-m", str(tiny_qwen), "-c", str(tmp_path / "ctx.txt"), "--push", server.url,
                                  "--tag", "tls:1", "--token", "w", "--json", check=True).stdout)
        assert done["push"]["blobs_sent"] > 0 and done["push"]["tag"] == "tls:1"
        run_cli("pull", f"{server.url}/v1/tags/tls:1", "--out", str(tmp_path / "p.kv"), check=True)
        assert run_cli("inspect", str(tmp_path / "p.kv"), "--json", check=True).stdout.count(done["id"].encode()) == 1
        plain = run_cli("pull", f"{server.url.replace('https', 'http')}/v1/tags/tls:1", "--out", str(tmp_path / "q.kv"))
        assert plain.returncode != 0 and not (tmp_path / "q.kv").exists()
    finally:
        server.stop()


def test_a_hot_blob_is_sent_from_memory_only_while_the_store_holds_it(servers, artifact, tmp_path):
    folder, manifest = artifact
    cloud = servers("cloud")
    run_cli("push", str(folder / "a.kv"), cloud.url, check=True)
    digest = first_block(manifest)
    stored = tmp_path / "cloud" / "blobs" / digest.removeprefix("sha256:")
    good = stored.read_bytes()
    assert call(cloud.url, "GET", f"/v1/blobs/{digest}") == (200, good)  # read, verified, kept in memory
    stored.write_bytes(good[:-1] + b"\x00")  # rots on disk after that: memory still holds the verified bytes
    assert call(cloud.url, "GET", f"/v1/blobs/{digest}") == (200, good)
    assert call(cloud.url, "GET", f"/v1/blobs/{digest}", headers={"Range": "bytes=3-9"}) == (206, good[3:10])
    stored.unlink()  # gone from the store (evicted): no longer sent
    assert call(cloud.url, "GET", f"/v1/blobs/{digest}")[0] == 404
    no_memory = servers("plain", "--memory-cache", "0")
    run_cli("push", str(folder / "a.kv"), no_memory.url, check=True)
    plain = tmp_path / "plain" / "blobs" / digest.removeprefix("sha256:")
    assert call(no_memory.url, "GET", f"/v1/blobs/{digest}") == (200, good)
    plain.write_bytes(good[:-1] + b"\x00")  # without memory, every read rehashes: the rot is caught
    assert call(no_memory.url, "GET", f"/v1/blobs/{digest}")[0] == 404


WRK_REPORT = """Running 5s test @ http://127.0.0.1:18480
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.01ms    3.21ms  40.11ms   90.12%
    Req/Sec    19.55k     1.62k   23.01k    71.00%
  Latency Distribution
     50%    1.22ms
     75%    1.71ms
     90%    3.02ms
     99%   17.99ms
  194586 requests in 5.00s, 23.70GB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:  38897.32
Transfer/sec:      4.74GB
"""


def test_wrk_report_is_read_with_its_units():
    from celslm.bench.serve import parse_wrk

    row = parse_wrk(WRK_REPORT)
    assert row["requests_per_s"] == 38897.32 and row["mbps"] == pytest.approx(4.74 * 2**30 / 1e6)
    assert row["p50_s"] == pytest.approx(1.22e-3) and row["p99_s"] == pytest.approx(17.99e-3)
    assert row["non_2xx"] == 7 and row["socket_errors"] == 3
    with pytest.raises(ValueError):
        parse_wrk("wrk: connection refused\n")


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (apt-get install wrk; .ci/run does)")
def test_bench_serve_ceiling_drives_every_server_with_wrk_without_failures():
    from celslm.bench import serve as serve_bench

    artifact = serve_bench.synthetic_artifact(tokens=256, layers=2)
    result = serve_bench.ceiling(artifact=artifact, seconds=1, connections=8, workers=2, repeats=1, s3=False)  # the object-store rows: test_bench_serve
    names = [row["server"] for row in result["results"]]
    assert "serve-cache dir, 1 worker" in names and "serve-cache dir, 2 workers" in names
    if shutil.which("redis-server"):
        assert "serve-cache redis cluster, 2 workers" in names
    for row in result["results"]:
        assert row["requests_per_s"] > 0 and row["failed"] == 0, row


def test_a_manifest_evicted_between_the_lookup_and_its_read_is_no_artifact_not_a_500(tmp_path):
    """The prefix index names an artifact whose manifest is gone when it is read (evicted in between):
    the answer is the one for no artifact, which the client reads as a miss."""
    from aiohttp.test_utils import TestClient, TestServer

    from celslm.server import ServerConfig, State, app_for

    state = State.open(ServerConfig(store=str(tmp_path / "store")))
    prefixes = ["a" * 64, "b" * 64]
    state.store._write("prefixes", prefixes[1], f"sha256:{'1' * 64} 2".encode())  # the index still has it; no manifest

    async def ask():
        async with TestClient(TestServer(app_for(state))) as client:
            response = await client.get("/v1/lookup", params={"space": "f" * 64, "prefix": ",".join(prefixes)})
            url = str(client.make_url("/")).rstrip("/")
            return response.status, await response.json(), await asyncio.to_thread(HttpStore(url).lookup, "f" * 64, prefixes)

    assert asyncio.run(ask()) == (200, {"artifact": None, "chunks": 0}, None)


def test_every_library_error_has_one_status_and_the_readme_table_lists_it():
    import celslm.errors
    from celslm.confidential import Sealed
    from celslm.httpserver import STATUS_OF_ERROR, status_of
    from celslm.store.http import DeadlineExceeded
    from celslm.trust import Untrusted

    errors = [v for v in vars(celslm.errors).values() if isinstance(v, type) and issubclass(v, celslm.errors.CelslmError)]
    assert set(errors) | {Untrusted, Sealed} == set(STATUS_OF_ERROR)
    assert status_of(DeadlineExceeded("slow")) == 503 and status_of(celslm.errors.ModelSpaceMismatch("other")) == 400
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| \d+ \| (\d{3}) \|", readme, re.MULTILINE))
    assert rows == {cls.__name__: str(status) for cls, status in STATUS_OF_ERROR.items()}


def test_the_byte_lru_keeps_the_recently_used_within_its_budget():
    from celslm.httpserver import ByteLRU

    memory = ByteLRU(10, largest_bytes=6)
    memory.put("a", b"aaaa")
    memory.put("b", b"bbbb")
    assert memory.get("a") == b"aaaa"  # a is now the more recent
    memory.put("c", b"cccc")  # 12 bytes: the least recently used (b) goes
    assert (memory.get("b"), memory.get("a"), memory.get("c"), memory.size_bytes) == (None, b"aaaa", b"cccc", 8)
    memory.put("d", b"d" * 7)  # over largest_bytes: not kept, nothing pushed out
    assert memory.get("d") is None and len(memory) == 2
    memory.put("a", b"aa")  # replaced: counted at its new size
    assert memory.size_bytes == 6
