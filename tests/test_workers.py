"""serve-cache --workers N: forked workers accepting on one port, counters added up across them, a
dead worker replaced, SIGTERM stopping them all."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.netutil import Server
from tests.test_server import call

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads worker pids from /proc (Linux)")


def workers_of(server: Server) -> set[int]:
    """The supervisor's child processes."""
    pid = server.proc.pid
    return {int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def counter(url: str, name: str) -> float:
    metrics = call(url, "GET", "/metrics")[1].decode()
    match = re.search(rf"^{name} ([0-9.e+]+)$", metrics, re.MULTILINE)
    assert match, f"{name} missing from /metrics:\n{metrics[:2000]}"
    return float(match.group(1))


@pytest.fixture()
def two_workers(tmp_path, prefilled):
    server = Server(tmp_path / "store", "--workers", "2")
    pushed = json.loads(run_cli("push", str(prefilled / "a.kv"), server.url, "--json", check=True).stdout)
    manifest = json.loads((prefilled / "a.kv" / "manifest.json").read_bytes())
    yield server, pushed["id"], [block["digest"] for layer in manifest["blocks"] for block in layer]
    server.stop()


def test_workers_share_the_port_and_metrics_add_up_across_them(two_workers):
    server, _, digests = two_workers
    assert len(workers_of(server)) == 2
    hits, sent = counter(server.url, "celslm_cache_hits_total"), counter(server.url, "celslm_bytes_out_total")
    gets, size = 0, 0
    for _ in range(3):  # every request on a new connection: the kernel hands them to both workers
        for digest in digests:
            status, data = call(server.url, "GET", f"/v1/blobs/{digest}")
            assert status == 200 and "sha256:" + hashlib.sha256(data).hexdigest() == digest
            gets, size = gets + 1, size + len(data)
    assert counter(server.url, "celslm_cache_hits_total") - hits == gets
    assert counter(server.url, "celslm_bytes_out_total") - sent == size
    assert len(hits_by_worker(server)) == 2, "one worker served every GET: the sum proves nothing"


def hits_by_worker(server: Server) -> dict[int, float]:
    """Each worker's own hit count, from its prometheus multiprocess file (pid in the file's name)."""
    from prometheus_client.mmap_dict import MmapedDict

    pids = workers_of(server)
    found = {}
    for path in Path(tempfile.gettempdir()).glob("celslm-metrics-*/counter_*.db"):  # serve-cache's metrics folder
        pid = int(path.stem.removeprefix("counter_"))
        hits = sum(value for key, value, *_ in MmapedDict.read_all_values_from_file(str(path))
                   if '"celslm_cache_hits_total"' in key)
        if pid in pids and hits:
            found[pid] = hits
    return found


def test_a_killed_worker_is_replaced_and_sigterm_stops_them_all(two_workers):
    server, artifact_id, digests = two_workers
    before = workers_of(server)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while (len(workers_of(server)) != 2 or victim in workers_of(server)) and time.monotonic() < deadline:
        time.sleep(0.1)
    after = workers_of(server)
    assert len(after) == 2 and victim not in after, after
    for _ in range(10):
        assert call(server.url, "GET", f"/v1/artifacts/{artifact_id}")[0] == 200
    assert call(server.url, "GET", f"/v1/blobs/{digests[0]}")[0] == 200
    assert server.stop() == 0
    assert not any(Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
                   for pid in after)
    assert f"worker {victim} exited (signal 9); starting another" in server.proc.stderr.read().decode()


def test_the_fifth_worker_death_in_30_s_stops_the_server(tmp_path):
    """The store becomes a file once the server is up, so every worker started after that dies opening
    it: deaths one to four are replaced (and logged as such), the fifth stops the server with exit 4."""
    root = tmp_path / "store"
    server = Server(root, "--workers", "2")
    shutil.rmtree(root)
    root.write_text("not a store")
    for pid in workers_of(server):
        os.kill(pid, signal.SIGKILL)
    assert server.proc.wait(timeout=60) == 4
    stderr = server.proc.stderr.read().decode()
    assert stderr.count("; starting another") == 4, stderr
    assert "workers exited 5 times in 30 s" in stderr.strip().splitlines()[-1] and "Traceback" not in stderr


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_workers_that_cannot_start_stop_the_server_with_one_line(tmp_path):
    """Redis goes away and the workers die: each replacement says why in one line and, after a few,
    the supervisor stops (exit 4) instead of restarting forever."""
    from celslm.testing.redis_local import start_redis

    redis = start_redis(tmp_path / "redis")
    server = Server(tmp_path / "unused", "--backend", redis.url, "--workers", "2")
    redis.stop()
    for pid in workers_of(server):
        os.kill(pid, signal.SIGKILL)
    assert server.proc.wait(timeout=60) == 4
    stderr = server.proc.stderr.read().decode()
    assert "cannot reach Redis" in stderr and "Traceback" not in stderr
    assert "times in 30 s" in stderr.strip().splitlines()[-1]
