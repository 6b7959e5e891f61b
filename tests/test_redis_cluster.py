"""A store on a real Redis Cluster (3 masters, each with a replica, on loopback): servers share it,
large blobs go in parts that are never seen half-written, and reads get through a master's death."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time

import pytest

from celslm.artifact import DirectoryReader
from celslm.errors import UnavailableError, UsageError
from celslm.manifest import sha256_digest
from celslm.store import open_store
from celslm.store.redis import PART_BYTES, cluster_address, key
from celslm.testing.processes import free_ports
from celslm.testing.redis_local import BUS_OFFSET, _start_node, cli, start_cluster
from tests.conftest import run_cli
from tests.netutil import Server
from tests.test_server import call

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
                                reason="redis-server not installed (apt-get install redis-server; .ci/run does)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with start_cluster(tmp_path_factory.mktemp("redis-cluster")) as started:
        yield started


def keys_in_cluster(cluster) -> int:
    return sum(int(cli(port, "dbsize")) for port in cluster.masters())


def random_blob(size: int) -> tuple[str, bytes]:
    data = os.urandom(size)
    return sha256_digest(data), data


def test_a_blob_of_several_parts_round_trips_and_is_stored_once(cluster):
    store = open_store(cluster.url)
    digest, data = random_blob(3 * PART_BYTES + 12345)
    usage = store.usage_bytes()
    store.put_blob(digest, data)
    store.put_blob(digest, data)
    assert open_store(cluster.url).read_blob(digest) == data
    assert store.usage_bytes() == usage + len(data)


def test_a_blob_is_invisible_until_its_upload_completes_and_an_aborted_one_leaves_nothing(cluster):
    store = open_store(cluster.url)
    before = keys_in_cluster(cluster)
    digest, data = random_blob(3 * PART_BYTES)
    writer = store.blob_writer(digest)
    writer.write(data)  # three parts written, the header not yet
    assert not store.has_blob(digest) and store.read_blob(digest) is None
    assert keys_in_cluster(cluster) == before + 3
    writer.abort()
    assert keys_in_cluster(cluster) == before and not store.has_blob(digest)
    writer = store.blob_writer(digest)
    writer.write(data)
    writer.commit()
    assert store.has_blob(digest) and store.read_blob(digest) == data


def test_two_uploads_of_one_blob_keep_one_copy(cluster):
    store = open_store(cluster.url)
    digest, data = random_blob(2 * PART_BYTES)
    first, second = store.blob_writer(digest), store.blob_writer(digest)
    first.write(data)
    second.write(data)  # each has written its two parts
    first.commit()
    before = keys_in_cluster(cluster)  # counted after the first commit, which may create the usage key
    second.commit()  # finds the first one's header: its own parts go
    assert keys_in_cluster(cluster) == before - 2
    assert store.read_blob(digest) == data


def test_an_unreachable_cluster_is_unavailable_in_one_line():
    port = free_ports(1)[0]
    with pytest.raises(UnavailableError, match=f"^cannot reach Redis Cluster at 127.0.0.1:{port}: [^\n]*$"):
        open_store(f"redis+cluster://127.0.0.1:{port}")


def test_a_cluster_url_parses_its_credentials_and_database_like_a_redis_url():
    nodes, user, password = cluster_address("redis+cluster://edge:s%40cret:x@10.0.0.5:7000,[::1]:7001/0")
    assert [(node.host, node.port) for node in nodes] == [("10.0.0.5", 7000), ("::1", 7001)]
    assert (user, password) == ("edge", "s@cret:x")
    assert cluster_address("redis+cluster://:pw@h:7000")[1:] == (None, "pw")
    assert cluster_address("redis+cluster://h:7000")[1:] == (None, None)


@pytest.mark.parametrize("url", ["redis+cluster://edge:hunter2@h:7000/1", "redis+cluster://edge:hunter2@h:7000/db",
                                 "redis+cluster://edge:hunter2@h:7000/0?db=1", "redis+cluster://edge:hunter2@h7000"])
def test_a_bad_cluster_url_is_one_line_without_its_password(url):
    with pytest.raises(UsageError) as raised:
        open_store(url)
    message = str(raised.value)
    assert "\n" not in message and "hunter2" not in message
    if url.endswith("/1"):
        assert message == "store redis+cluster://h:7000/1: Redis Cluster has only database 0, not '1'"


@pytest.fixture(scope="module")
def guarded_cluster(tmp_path_factory):
    """A one-node Redis Cluster (all slots on one master) that asks for a password: its URL without one."""
    workdir = tmp_path_factory.mktemp("guarded-cluster")
    port = free_ports(1, also_free_at=BUS_OFFSET)[0]
    node = _start_node(workdir, port, ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                       "--requirepass", PASSWORD))
    authed = ("-a", PASSWORD, "--no-auth-warning")
    try:
        deadline = time.monotonic() + 20
        while cli(port, *authed, "ping").strip() != "PONG":
            assert node.alive and time.monotonic() < deadline, "the guarded redis-server did not start"
            time.sleep(0.05)
        assert cli(port, *authed, "cluster", "addslotsrange", "0", "16383").strip() == "OK"
        while "cluster_state:ok" not in cli(port, *authed, "cluster", "info"):
            assert time.monotonic() < deadline, "the one-node cluster did not become ok"
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        node.stop()


PASSWORD = "s3cret/p@ss"  # a / and an @, percent-encoded in the URL
QUOTED = "s3cret%2Fp%40ss"


def test_a_cluster_with_a_password_is_reached_with_the_credentials_in_its_url(guarded_cluster):
    digest, data = random_blob(PART_BYTES + 5)
    for credentials in (f":{QUOTED}", f"default:{QUOTED}"):
        store = open_store(f"redis+cluster://{credentials}@{guarded_cluster}/0")
        store.put_blob(digest, data)
        assert store.read_blob(digest) == data


@pytest.mark.parametrize("credentials", ["", "default:wrong-hunter2@", "default:hunter2/unquoted@"])
def test_a_cluster_refusing_the_credentials_is_unavailable_in_one_line_without_them(guarded_cluster, credentials):
    with pytest.raises(UnavailableError) as raised:
        open_store(f"redis+cluster://{credentials}{guarded_cluster}")
    message = str(raised.value)
    assert message.startswith(f"cannot reach Redis Cluster at {guarded_cluster}: ")
    assert "\n" not in message and "hunter2" not in message


def test_two_servers_over_one_cluster_share_everything(cluster, prefilled, tmp_path):
    artifact = prefilled / "a.kv"
    manifest = json.loads((artifact / "manifest.json").read_bytes())
    first = Server(tmp_path / "unused-a", "--backend", cluster.url)
    second = Server(tmp_path / "unused-b", "--backend", cluster.url)
    try:
        pushed = json.loads(run_cli("push", str(artifact), first.url, "--tag", "shared", "--json", check=True).stdout)
        assert pushed["blobs_sent"] > 0
        assert json.loads(run_cli("push", str(artifact), second.url, "--json", check=True).stdout)["blobs_sent"] == 0
        run_cli("pull", f"{second.url}/v1/tags/shared", "--out", str(tmp_path / "b.kv"), check=True)
        assert (tmp_path / "b.kv" / "manifest.json").read_bytes() == (artifact / "manifest.json").read_bytes()
        for blob in (artifact / "blobs").iterdir():
            assert (tmp_path / "b.kv" / "blobs" / blob.name).read_bytes() == blob.read_bytes()
        unrelated = hashlib.sha256(b"another context").hexdigest()
        prefixes = ",".join([*manifest["prefix_hashes"], unrelated])
        status, body = call(second.url, "GET", f"/v1/lookup?space={manifest['space']['fingerprint']}&prefix={prefixes}")
        assert (status, json.loads(body)) == (200, {"artifact": pushed["id"], "chunks": len(manifest["prefix_hashes"])})
        digest, data = random_blob(2 * PART_BYTES + 7)
        assert call(first.url, "PUT", f"/v1/blobs/{digest}", data)[0] == 201
        assert call(second.url, "GET", f"/v1/blobs/{digest}") == (200, data)
    finally:
        first.stop()
        second.stop()


def kill_under_load(cluster, victim, digests: list[str], fetcher) -> tuple[list[tuple[float, float, str]], float, float]:
    """Four threads fetch `digests` round robin (each with its own `fetcher()`: digest -> outcome) while
    `victim` is SIGKILLed once its replica has caught up; 1.5 s of fetches follow the failover. Returns
    the fetches (start, seconds, outcome), when the kill happened and when the cluster was ok again."""
    lock, stop = threading.Lock(), threading.Event()
    fetches: list[tuple[float, float, str]] = []

    def loop(offset: int) -> None:
        fetch = fetcher()
        for index in range(offset, offset + 100_000):
            if stop.is_set():
                return
            start = time.monotonic()
            outcome = fetch(digests[index % len(digests)])
            with lock:
                fetches.append((start, time.monotonic() - start, outcome))

    threads = [threading.Thread(target=loop, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1)
        cluster.wait_caught_up(victim)  # what was written before has reached the replica
        killed_at = time.monotonic()
        cluster.kill(victim)
        cluster.wait_ok(timeout_s=30)
        recovered_at = time.monotonic()
        time.sleep(1.5)  # fetches after the failover
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    return fetches, killed_at, recovered_at


def test_reads_get_through_a_master_killed_under_load_and_nothing_stored_is_lost(cluster, prefilled):
    """SIGKILL the master holding an artifact's manifest while four threads read it: reads stall until
    the replica takes over, then go on; none returns other bytes, and the whole artifact is there."""
    store = open_store(cluster.url)
    reader = DirectoryReader(prefilled / "a.kv")
    blobs = dict((ref.digest, data) for ref, data in reader.blobs())
    big_digest, big = random_blob(3 * PART_BYTES)
    blobs[big_digest] = big
    for digest, data in blobs.items():
        store.put_blob(digest, data)
    assert store.put_manifest(reader.id, reader.manifest.canonical_bytes()) == []
    victim = cluster.master_of(key("manifests", reader.id.removeprefix("sha256:")))
    on_victim = [digest for digest in blobs
                 if cluster.master_of(key("blobs", digest.removeprefix("sha256:"))) is victim]
    assert on_victim, "no blob of the artifact is on the master to be killed: the test would prove nothing"

    def fetcher():
        def read(digest: str) -> str:  # ok, wrong, absent or the error
            try:
                data = store.read_blob(digest)
                return "ok" if data == blobs[digest] else "absent" if data is None else "wrong"
            except UnavailableError as exc:
                return str(exc)
        return read

    reads, killed_at, recovered_at = kill_under_load(cluster, victim, list(blobs), fetcher)

    outcomes = [outcome for _, _, outcome in reads]
    errors = [outcome for outcome in outcomes if outcome not in ("ok", "wrong", "absent")]
    stalled = [seconds for _, seconds, _ in reads if seconds > 0.5]
    after = [outcome for start, _, outcome in reads if start > recovered_at]
    print(f"\nfailover: {recovered_at - killed_at:.1f} s until the cluster was ok; {len(reads)} reads, "
          f"{outcomes.count('wrong')} wrong bytes, {outcomes.count('absent')} absent, {len(errors)} raised, "
          f"{len(stalled)} stalled over 0.5 s, longest {max(seconds for _, seconds, _ in reads):.1f} s; "
          f"{len(after)} after the failover")
    assert outcomes.count("wrong") == 0 and outcomes.count("absent") == 0
    assert errors == []
    assert after and set(after) == {"ok"}
    assert store.get_manifest(reader.id) == reader.manifest.canonical_bytes()
    assert all(store.read_blob(digest) == data for digest, data in blobs.items())
    assert store.lookup(reader.manifest.space.fingerprint, list(reader.manifest.prefix_hashes)) == (reader.id, reader.manifest.chunks)


def test_pulls_through_serve_cache_get_through_a_master_killed_under_load(tmp_path, prefilled):
    """The same over HTTP, as edges see it: two serve-cache workers over a fresh cluster (no memory cache,
    so every GET reaches Redis), four clients pulling the artifact's blobs, one master SIGKILLed."""
    from celslm.errors import CelslmError
    from celslm.store.http import HttpStore

    reader = DirectoryReader(prefilled / "a.kv")
    blobs = dict((ref.digest, data) for ref, data in reader.blobs())
    with start_cluster(tmp_path / "cluster") as fresh:
        server = Server(tmp_path / "unused", "--backend", fresh.url, "--workers", "2", "--memory-cache", "0")
        try:
            run_cli("push", str(prefilled / "a.kv"), server.url, check=True)
            victim = fresh.master_of(key("manifests", reader.id.removeprefix("sha256:")))
            assert any(fresh.master_of(key("blobs", d.removeprefix("sha256:"))) is victim for d in blobs)

            def fetcher():
                client = HttpStore(server.url)

                def pull(digest: str) -> str:
                    try:
                        data = client.read_blob(digest, len(blobs[digest]))
                        return "ok" if data == blobs[digest] else "absent" if data is None else "wrong"
                    except CelslmError as exc:  # IntegrityError (corrupt bytes) or Unavailable after its retries
                        return type(exc).__name__
                return pull

            pulls, killed_at, recovered_at = kill_under_load(fresh, victim, list(blobs), fetcher)
            outcomes = [outcome for _, _, outcome in pulls]
            after = [outcome for start, _, outcome in pulls if start > recovered_at]
            print(f"\nfailover over HTTP: {recovered_at - killed_at:.1f} s until the cluster was ok; {len(pulls)} pulls, "
                  f"{outcomes.count('wrong') + outcomes.count('IntegrityError')} corrupted, {outcomes.count('absent')} absent, "
                  f"{outcomes.count('UnavailableError')} unavailable after retries, "
                  f"{sum(seconds > 0.5 for _, seconds, _ in pulls)} stalled over 0.5 s, "
                  f"longest {max(seconds for _, seconds, _ in pulls):.1f} s; {len(after)} after the failover")
            assert outcomes.count("wrong") == 0 and outcomes.count("IntegrityError") == 0 and outcomes.count("absent") == 0
            assert after and set(after) == {"ok"}
            run_cli("pull", f"{server.url}/v1/artifacts/{reader.id}", "--out", str(tmp_path / "back.kv"), check=True)
            assert (tmp_path / "back.kv" / "manifest.json").read_bytes() == (prefilled / "a.kv" / "manifest.json").read_bytes()
        finally:
            server.stop()
