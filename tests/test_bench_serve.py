"""deploy/nginx-proxy-cache.conf in front of a real serve-cache on loopback (the very file the README gives and
`celslm bench serve` runs): blobs kept, policy passed through, a read token never bypassed; and the bench's
proxy_cache row and timed pulls."""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from celslm.testing.seaweed import weed_binary

from celslm.bench import serve as serve_bench
from celslm.manifest import sha256_digest
from celslm.testing.processes import ServeCache

needs_nginx = pytest.mark.skipif(serve_bench.find_nginx() is None, reason="nginx not installed (apt-get install nginx-light)")


def _request(url: str, method: str = "GET", body: bytes | None = None, token: str | None = None,
             headers: dict | None = None) -> tuple[int, bytes, dict]:
    """Status, body and headers of one request (an error status is an answer, not an exception)."""
    headers = {**(headers or {}), **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read(), dict(error.headers)


def _push(url: str, artifact, tag: str, token: str | None = None) -> None:
    """The artifact's blobs, manifest and tag, PUT as any client would."""
    for digest, data in artifact.blobs.items():
        assert _request(f"{url}/v1/blobs/{digest}", "PUT", data, token)[0] in (200, 201)
    assert _request(f"{url}/v1/artifacts/{artifact.id}", "PUT", artifact.manifest.canonical_bytes(), token)[0] in (200, 201)
    assert _request(f"{url}/v1/tags/{tag}", "PUT", artifact.id.encode(), token)[0] in (200, 201)


@pytest.fixture(scope="module")
def artifacts():
    return serve_bench.synthetic_artifact(tokens=256, layers=2), serve_bench.synthetic_artifact(tokens=512, layers=2)


def test_each_address_of_the_deploy_file_is_replaced_once(tmp_path):
    text = serve_bench.PROXY_CACHE_CONF.read_text()
    conf = serve_bench.proxy_cache_conf(text, tmp_path / "cache", "127.0.0.1:9999", 12345)
    assert f"proxy_cache_path {tmp_path / 'cache'} levels" in conf
    assert "server 127.0.0.1:9999;" in conf and "listen 127.0.0.1:12345;" in conf
    assert "8470" not in conf and "listen 8080" not in conf and "/var/cache/nginx" not in conf
    with pytest.raises(ValueError, match="listen ADDRESS"):  # the file changed: the bench says so
        serve_bench.proxy_cache_conf(text.replace("listen 8080;", "listen 8080 reuseport;"), tmp_path, "h:1", 1)


def test_the_readme_shows_lines_of_the_deploy_file_as_they_are():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    shown = readme.split("```nginx\n", 1)[1].split("```", 1)[0]
    lines = {line.strip() for line in serve_bench.PROXY_CACHE_CONF.read_text().splitlines()}
    assert [line for line in shown.splitlines() if line.strip() and line.strip() not in lines] == []


@needs_nginx
def test_proxy_cache_keeps_blobs_and_passes_manifests_and_tags_through(tmp_path, artifacts):
    first, second = artifacts
    running: list = []
    try:
        cache = ServeCache("--root", str(tmp_path / "store"), log=tmp_path / "serve-cache.log")
        running.append(cache)
        _push(cache.url, first, "ctx")
        nginx = serve_bench.start_proxy_cache(tmp_path, cache.url, running)
        digest, data = next(iter(first.blobs.items()))
        answers = [_request(f"{nginx}/v1/blobs/{digest}") for _ in range(2)]
        assert [(status, headers["X-Cache-Status"]) for status, _, headers in answers] == [(200, "MISS"), (200, "HIT")]
        assert all(sha256_digest(body) == digest for _, body, _ in answers)
        status, body, headers = _request(f"{nginx}/v1/blobs/{digest}", headers={"Range": "bytes=0-9"})
        assert (status, body, headers["X-Cache-Status"]) == (206, data[:10], "HIT")  # a range, from the cached copy

        assert _request(f"{nginx}/v1/tags/ctx")[1].decode() == first.id
        _push(cache.url, second, "ctx")  # the tag moves at serve-cache: nginx says so at once
        assert _request(f"{nginx}/v1/tags/ctx")[1].decode() == second.id

        late = b"a blob pushed after it was asked for"
        late_digest = sha256_digest(late)
        assert _request(f"{nginx}/v1/blobs/{late_digest}")[0] == 404
        assert _request(f"{nginx}/v1/blobs/{late_digest}", "PUT", late)[0] == 201  # a push through nginx
        assert _request(f"{nginx}/v1/blobs/{late_digest}")[:2] == (200, late)  # the 404 was not kept

        assert _request(f"{nginx}/v1/blobs/{digest}", "HEAD")[0] == 200
        (tmp_path / "store" / "blobs" / digest.removeprefix("sha256:")).unlink()  # the store loses a cached blob
        assert _request(f"{nginx}/v1/blobs/{digest}", "HEAD")[0] == 404  # HEAD asks serve-cache: a push resends it
        assert _request(f"{nginx}/v1/blobs/{digest}")[2]["X-Cache-Status"] == "HIT"  # GET: still the cached copy
        assert _request(f"{nginx}/v1/blobs/{digest}", "PUT", data)[0] == 201
        assert _request(f"{nginx}/v1/blobs/{digest}", "HEAD")[0] == 200

        cache.stop()  # serve-cache gone: blobs still come from the cache, manifests do not
        status, body, headers = _request(f"{nginx}/v1/blobs/{digest}")
        assert (status, sha256_digest(body), headers["X-Cache-Status"]) == (200, digest, "HIT")
        assert _request(f"{nginx}/v1/artifacts/{first.id}")[0] == 502
    finally:
        serve_bench.stop_services(running)


@needs_nginx
def test_proxy_cache_never_hands_a_read_token_guarded_blob_to_a_request_without_that_token(tmp_path, artifacts):
    first, _ = artifacts
    running: list = []
    try:
        cache = ServeCache("--root", str(tmp_path / "store"), "--read-token", "r-secret", "--write-token", "w-secret",
                           log=tmp_path / "serve-cache.log")
        running.append(cache)
        _push(cache.url, first, "ctx", token="w-secret")
        nginx = serve_bench.start_proxy_cache(tmp_path, cache.url, running)
        digest = next(iter(first.blobs))
        url = f"{nginx}/v1/blobs/{digest}"
        assert _request(url)[0] == 401
        reads = [_request(url, token="r-secret") for _ in range(2)]
        assert [(status, sha256_digest(body)) for status, body, _ in reads] == [(200, digest)] * 2
        # stored only where serve-cache marks blobs `Cache-Control: public`; either way, only for this token
        public = "public" in reads[0][2].get("Cache-Control", "")
        assert reads[1][2]["X-Cache-Status"] == ("HIT" if public else "MISS")
        assert _request(url)[0] == 401
        assert _request(url, token="another")[0] == 403
        assert _request(url, token="w-secret")[0] == 403
    finally:
        serve_bench.stop_services(running)


@needs_nginx
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (apt-get install wrk)")
def test_bench_ceiling_drives_proxy_cache_hot_beside_static_and_times_pulls_through_both():
    artifact = serve_bench.synthetic_artifact(tokens=256, layers=2)
    result = serve_bench.ceiling(artifact=artifact, seconds=1, connections=8, workers=2, repeats=1, pulls=1, redis=False)
    rows = {row["server"]: row for row in result["results"]}
    proxy = "nginx proxy_cache -> serve-cache dir, 2 workers (hot)"
    assert proxy in rows and serve_bench.STATIC in rows
    for row in rows.values():
        assert row["requests_per_s"] > 0 and row["failed"] == 0, row
    pulled = {row["server"]: row for row in result["pulls"]}
    object_store = {"serve-cache s3, 2 workers, no memory cache", "serve-cache s3, 2 workers, --presign",
                    "serve-cache s3, 2 workers, --blob-base (the bucket, public read)"}
    if weed_binary():  # SeaweedFS: serve-cache over the bucket, redirecting to it, and the bucket read directly
        assert object_store | {"SeaweedFS S3, read directly (presigned GETs)"} <= set(rows)
        assert rows["serve-cache s3, 2 workers, --presign"]["redirects"]
    assert set(pulled) == {"serve-cache dir, 2 workers", proxy} | (object_store if weed_binary() else set())
    assert all(row["mbps"] > 0 and len(row["seconds"]) == 1 for row in pulled.values())


@needs_nginx
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (apt-get install wrk)")
def test_more_rows_read_blobs_at_a_static_base_url(tmp_path):
    """The hook an object store's rows use: blobs at BASE/<digest> (here nginx over a folder of them)."""
    artifact = serve_bench.synthetic_artifact(tokens=256, layers=2)

    def more(scratch, artifact, running):
        folder = scratch / "bucket" / "prefix"
        folder.mkdir(parents=True)
        for digest, data in artifact.blobs.items():
            (folder / digest).write_bytes(data)
        base = serve_bench.start_nginx(scratch, "objects", running, lambda port: (
            f"server {{ listen 127.0.0.1:{port}; root {scratch / 'bucket'}; location = /v1/health {{ return 200; }} }}"))
        return {"objects read directly": serve_bench.object_store_target(f"{base}/prefix/", artifact)}

    result = serve_bench.ceiling(artifact=artifact, seconds=1, connections=8, workers=1, repeats=1, redis=False, s3=False, more=more)
    row = next(row for row in result["results"] if row["server"] == "objects read directly")
    assert row["requests_per_s"] > 0 and row["failed"] == 0 and not row["redirects"]
