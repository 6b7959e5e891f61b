"""The edge's own cache is bounded: it keeps within its capacity, evicts least recently used blobs
first, and never one a running decode reads, in this process or another."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from celslm import prompting
from celslm.blocks import build_artifact
from celslm.errors import EXIT_USAGE
from celslm.manifest import ModelSpace, Producer, sha256_digest
from celslm.models import load_model
from collections import Counter
from celslm.prefill import prefill
from celslm.store.local import EdgeCache, LocalStore, _started
from celslm.store.tiers import Sources
from celslm.stream import StreamedReader, Timeline
from tests.conftest import CONTEXT, GREET_PROMPT, run_cli
from tests.netutil import Server
from tests.test_faults import one_line_error

SPACE = ModelSpace("random", "0" * 64)


def random_artifact(seed: int):
    """A small artifact of random KV: 2 layers x 3 chunks of 16 tokens, [H=2, T=48, D=8], its own blobs."""
    rng = np.random.default_rng(seed)
    layers = [(rng.standard_normal((2, 48, 8), dtype=np.float32), rng.standard_normal((2, 48, 8), dtype=np.float32))
              for _ in range(2)]
    return build_artifact(space=SPACE, producer=Producer.native(SPACE), token_ids=rng.integers(0, 1000, 48).tolist(),
                          layers=layers, chunk_size=16, dtype="float32", framing="raw", provenance=["native"] * 2)


def publish(store: LocalStore, artifact) -> None:
    for digest, data in artifact.blobs.items():
        store.put_blob(digest, data)
    assert store.put_manifest(artifact.id, artifact.manifest.canonical_bytes()) == []


def blob_bytes(root) -> int:
    """What the cache's blobs take on disk, measured."""
    return sum(path.stat().st_size for path in (root / "blobs").iterdir())


def pins(root) -> list[str]:
    return sorted(path.name for path in (root / "pins").iterdir()) if (root / "pins").is_dir() else []


def no_pins_left(root) -> bool:
    deadline = time.monotonic() + 2  # a fetch thread may still be letting go of its reader
    while pins(root) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not pins(root)


def stream(reader) -> dict[str, bytes]:
    """Every blob through the streaming read decode uses (a fetch thread ahead of the consumer)."""
    return {ref.digest: data for ref, data in StreamedReader(reader, Timeline()).blobs()}


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    """A serve-cache on loopback, and its store's folder to publish into."""
    root = tmp_path_factory.mktemp("cloud")
    server = Server(root)
    yield server.url, LocalStore(root)
    assert server.stop() == 0


def test_the_cache_stays_within_its_capacity_over_100_decodes_of_distinct_artifacts(cloud, celslm_home):
    url, store = cloud
    artifacts = [random_artifact(seed) for seed in range(100)]
    for artifact in artifacts:
        publish(store, artifact)
    capacity = 3 * artifacts[0].manifest.blob_bytes()  # three artifacts' worth
    biggest = max(len(data) for artifact in artifacts for data in artifact.blobs.values())
    sources, root = Sources(cloud=url, cache_bytes=capacity), celslm_home / "store"
    for artifact in artifacts:
        reader = sources.tiers().reader(artifact.id)
        assert stream(reader) == artifact.blobs
        del reader  # the decode is done: its pin goes
        assert blob_bytes(root) <= capacity + biggest
    assert blob_bytes(root) > capacity / 2  # it still caches
    assert no_pins_left(root)


def test_a_decode_keeps_its_own_blobs_while_it_reads_even_past_the_capacity(cloud, celslm_home):
    url, store = cloud
    artifact, other = random_artifact(1000), random_artifact(1001)
    publish(store, artifact)
    publish(store, other)
    sources, root = Sources(cloud=url, cache_bytes=artifact.manifest.blob_bytes() // 2), celslm_home / "store"
    tiers = sources.tiers()
    reader = tiers.reader(artifact.id)
    assert tiers.available_prefix(artifact.manifest) == artifact.manifest.chunks  # fetches every blob, as a fallback does
    assert all((root / "blobs" / digest.removeprefix("sha256:")).is_file() for digest in artifact.blobs)
    assert stream(reader) == artifact.blobs
    assert tiers.bytes_by_source["local"] == artifact.manifest.blob_bytes()  # read again from the cache, not fetched
    del reader
    assert no_pins_left(root)
    assert stream(sources.tiers().reader(other.id)) == other.blobs  # now artifact's blobs may go
    assert not any((root / "blobs" / digest.removeprefix("sha256:")).is_file() for digest in artifact.blobs)


def blobs(count: int, size: int = 1000) -> list[tuple[str, bytes]]:
    return [(sha256_digest(data), data) for data in (os.urandom(size) for _ in range(count))]


def put_aged(cache: EdgeCache, digest: str, data: bytes, age_s: float) -> None:
    cache.put_blob(digest, data)
    then = time.time() - age_s
    os.utime(cache.blob_path(digest), (then, then))


def test_a_recently_read_blob_survives_an_eviction_that_removes_an_older_one(tmp_path):
    cache = EdgeCache(tmp_path / "store", capacity_bytes=3000)
    (a, a_data), (b, b_data), (c, c_data), (d, d_data) = blobs(4)
    put_aged(cache, a, a_data, 30)
    put_aged(cache, b, b_data, 20)
    put_aged(cache, c, c_data, 10)
    assert cache.read_blob(a) == a_data  # the oldest stored, now the most recently used
    cache.put_blob(d, d_data)
    assert cache.has_blob(a) and cache.has_blob(d) and not cache.has_blob(b)
    assert blob_bytes(tmp_path / "store") <= 3000


PIN_HOLDER = """
import sys
from celslm.store.local import EdgeCache
EdgeCache(sys.argv[1]).pin([sys.argv[2]])
print("pinned", flush=True)
sys.stdin.read()
"""


def test_a_blob_pinned_by_a_live_process_stays_and_a_dead_ones_pin_protects_nothing(tmp_path):
    root = tmp_path / "store"
    cache = EdgeCache(root, capacity_bytes=3000)
    (old, old_data), *rest = blobs(6)
    put_aged(cache, old, old_data, 60)  # the least recently used of all
    holder = subprocess.Popen([sys.executable, "-c", PIN_HOLDER, str(root), old], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"pinned\n"
        started = _started(holder.pid)
        for digest, data in rest[:3]:
            cache.put_blob(digest, data)
        assert cache.evictions > 0 and cache.has_blob(old)
    finally:
        holder.send_signal(signal.SIGKILL)  # no chance to remove its pin
        holder.wait()
    assert pins(root) == [f"{holder.pid}-{started}-0"]
    for digest, data in rest[3:]:
        cache.put_blob(digest, data)
    assert not cache.has_blob(old) and pins(root) == []
    assert blob_bytes(root) <= 3000


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/stat"), reason="process start times are read from /proc")
def test_a_pin_whose_pid_was_reused_by_a_later_process_protects_nothing(tmp_path):
    root = tmp_path / "store"
    cache = EdgeCache(root, capacity_bytes=3000)
    (old, old_data), (kept, kept_data), *rest = blobs(6)
    put_aged(cache, old, old_data, 60)
    put_aged(cache, kept, kept_data, 50)  # the least recently used two
    reused = f"{os.getpid()}-{int(_started(os.getpid())) + 1}-0"  # a live pid, but another process's start time
    (root / "pins").mkdir(exist_ok=True)
    (root / "pins" / reused).write_text(old)
    live = cache.pin([kept])
    for digest, data in rest:
        cache.put_blob(digest, data)
    assert cache.evictions > 0
    assert not cache.has_blob(old) and cache.has_blob(kept)
    assert pins(root) == [live.name]


def test_the_count_equals_the_blobs_on_disk_across_stores_evictions_and_quarantines(tmp_path):
    root = tmp_path / "store"
    cache = EdgeCache(root, capacity_bytes=5500)
    stored = blobs(12)
    for digest, data in stored:
        cache.put_blob(digest, data)
        cache.put_blob(digest, data)  # already there: adds nothing
        assert cache.usage_bytes() == blob_bytes(root)
    assert cache.evictions > 0 and blob_bytes(root) <= 5500
    present = [digest for digest, _ in stored if cache.has_blob(digest)]
    cache.quarantine(present[0])
    cache.quarantine(present[0])  # gone already: subtracts nothing
    cache.blob_path(present[1]).write_bytes(bytes(1000))  # rotted on disk (its size unchanged)
    assert cache.read_blob(present[1]) is None  # quarantined on read
    assert cache.usage_bytes() == blob_bytes(root) == 1000 * (len(present) - 2)
    (root / "usage").write_text("damaged")
    assert EdgeCache(root, capacity_bytes=5500).usage_bytes() == blob_bytes(root)
    (root / "usage").unlink()
    assert EdgeCache(root, capacity_bytes=5500).usage_bytes() == blob_bytes(root)


STORER = """
import hashlib, sys
from celslm.store.local import EdgeCache
cache = EdgeCache(sys.argv[1], capacity_bytes=int(sys.argv[2]))
datas = [hashlib.sha256(str(i).encode()).digest() * 40 for i in range(int(sys.argv[3]))]  # 1280 bytes each
print("ready", flush=True)
sys.stdin.readline()
for data in datas:
    cache.put_blob("sha256:" + hashlib.sha256(data).hexdigest(), data)
print(cache.evictions, flush=True)
"""


def test_three_processes_storing_the_same_blobs_at_once_keep_the_count_exact(tmp_path):
    root = tmp_path / "store"
    storers = [subprocess.Popen([sys.executable, "-c", STORER, str(root), "40000", "150"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(3)]
    try:
        assert [storer.stdout.readline() for storer in storers] == [b"ready\n"] * 3
        for storer in storers:  # all start storing together, the same blobs in the same order
            storer.stdin.write(b"go\n")
            storer.stdin.flush()
        evictions = [int(storer.communicate(timeout=120)[0]) for storer in storers]
    finally:
        for storer in storers:
            storer.kill()
    assert all(storer.returncode == 0 for storer in storers)
    assert sum(evictions) > 0  # 150 x 1280 bytes pass 40,000 several times over
    assert int((root / "usage").read_text()) == blob_bytes(root) <= 40000


class ListingCache(EdgeCache):
    """An edge cache that counts the folders it lists."""

    def __init__(self, root, capacity_bytes=None):
        self.listed = Counter()
        super().__init__(root, capacity_bytes)

    def _entries(self, kind):
        self.listed[kind] += 1
        return super()._entries(kind)


def test_a_store_under_the_capacity_lists_no_folder_and_one_past_it_does(tmp_path):
    cache = ListingCache(tmp_path / "store", capacity_bytes=100_000)
    for digest, data in blobs(5000, size=4):  # a folder of 5,000 blobs, stored by an earlier celslm (no count)
        cache.blob_path(digest).write_bytes(data)
    assert cache.usage_bytes() == 20_000 and cache.listed == Counter(blobs=1)  # measured once
    cache.listed.clear()
    for digest, data in blobs(50):
        cache.put_blob(digest, data)
    assert cache.usage_bytes() == 70_000 and cache.listed == Counter()
    for digest, data in blobs(31):
        cache.put_blob(digest, data)
    assert cache.listed["blobs"] > 0 and cache.evictions > 0  # past the capacity: listed to sort by recency
    assert cache.usage_bytes() == blob_bytes(tmp_path / "store") <= 100_000


@pytest.fixture(scope="module")
def contexts(tiny_qwen, cloud):
    """Three artifacts of distinct contexts for the tiny model, published to the cloud: their ids and size."""
    _, store = cloud
    loaded = load_model(str(tiny_qwen))
    ids = []
    for index in range(3):
        text = CONTEXT.replace("greet", f"greet{index}") * 2
        artifact = prefill(loaded, prompting.context_ids(loaded.tokenizer, text, "chat"), framing="chat", chunk_size=64)
        publish(store, artifact)
        ids.append(artifact.id)
    return ids, artifact.manifest.blob_bytes(), max(len(data) for data in artifact.blobs.values())


def test_decode_keeps_the_edge_cache_within_cache_capacity_or_its_variable(tiny_qwen, cloud, contexts, celslm_home):
    url, _ = cloud
    ids, size, biggest = contexts
    capacity = size * 3 // 2  # one artifact and a half
    args = ["decode", "-m", str(tiny_qwen), "-p", GREET_PROMPT, "-n", "3", "--json", "--cloud", url]
    for artifact_id in [*ids, ids[0]]:  # the first comes back after eviction: fetched again
        out = json.loads(run_cli(*args, "--kv", artifact_id, "--cache-capacity", str(capacity), check=True).stdout)
        assert out["artifact"] == artifact_id and out["bytes_by_source"].get(f"cloud {url}")
        assert blob_bytes(celslm_home / "store") <= capacity + biggest
    run_cli(*args, "--kv", ids[1], env={"CELSLM_CACHE_CAPACITY": "1000"}, check=True)
    assert blob_bytes(celslm_home / "store") <= 1000 + biggest
    assert no_pins_left(celslm_home / "store")


def test_a_bad_cache_capacity_is_one_line_and_exit_2(tiny_qwen):
    line = one_line_error(run_cli("decode", "-m", str(tiny_qwen), "--kv", "ctx", "-p", "Hi", "--cache-capacity", "lots"),
                          EXIT_USAGE)
    assert "--cache-capacity" in line and "'lots'" in line
    line = one_line_error(run_cli("pull", "ctx", "--out", "x.kv", env={"CELSLM_CACHE_CAPACITY": "-5GB"}), EXIT_USAGE)
    assert "--cache-capacity" in line and "'-5GB'" in line
