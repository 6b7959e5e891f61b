"""Blob reads off Python: cache headers on serve-cache's answers, and redirects (307) to a static
server over the store's files, which the edge follows only where it may, without its token, and
verifies as always."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from celslm.errors import EXIT_INTEGRITY, EXIT_UNAVAILABLE
from celslm.server import IMMUTABLE
from celslm.store.tiers import PARALLEL
from celslm.testing.processes import Service, free_port
from tests.conftest import run_cli
from tests.netutil import RecordingProxy, Server
from tests.test_server import call_with_headers, first_block

READ_TOKEN = "read-s3cret-5531"


@pytest.fixture()
def pushed(prefilled, tmp_path):
    """A store folder holding the artifact (pushed through serve-cache), the artifact's id and manifest."""
    folder = prefilled / "a.kv"
    manifest = json.loads((folder / "manifest.json").read_bytes())
    with Server(tmp_path / "store") as origin:
        artifact_id = json.loads(run_cli("push", str(folder), origin.url, "--tag", "ctx:1", "--json", check=True).stdout)["id"]
    return tmp_path / "store", artifact_id, manifest


@pytest.fixture()
def static(pushed):
    """Python's own static file server over the store's folder (its files at /store/...), behind a proxy
    that records what it is sent; `base` is the URL of the store's files."""
    served = pushed[0].parent
    (served / "v1").mkdir()
    (served / "v1" / "health").write_text("{}")  # what Service waits for
    port = free_port()
    server = Service([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(served), str(port)],
                     port, "http.server", timeout_s=30)
    proxy = RecordingProxy(port)
    proxy.base = f"{proxy.url}/{pushed[0].name}"
    yield proxy
    proxy.close()
    server.stop()


def test_blobs_and_manifests_say_they_are_immutable_and_tags_that_they_move(pushed):
    root, artifact_id, manifest = pushed
    digest = first_block(manifest)
    with Server(root) as cloud:
        status, _, headers = call_with_headers(cloud.url, "GET", f"/v1/blobs/{digest}")
        assert status == 200 and headers["Cache-Control"] == IMMUTABLE and headers["ETag"] == f'"{digest}"'
        status, body, _ = call_with_headers(cloud.url, "GET", f"/v1/blobs/{digest}", headers={"If-None-Match": f'"{digest}"'})
        assert status == 304 and body == b""
        other = call_with_headers(cloud.url, "GET", f"/v1/blobs/{digest}", headers={"If-None-Match": '"sha256:00"'})
        assert other[0] == 200 and len(other[1]) == manifest["blocks"][0][0]["size"]
        assert call_with_headers(cloud.url, "GET", f"/v1/artifacts/{artifact_id}")[2]["Cache-Control"] == IMMUTABLE
        assert call_with_headers(cloud.url, "GET", "/v1/tags/ctx:1")[2]["Cache-Control"] == "no-cache"
        assert call_with_headers(cloud.url, "GET", f"/v1/lookup?prefix={'a' * 64}")[2]["Cache-Control"] == "no-cache"


def test_the_edge_follows_a_redirect_to_its_own_host_without_its_token_and_verifies(pushed, static, tmp_path):
    root, artifact_id, manifest = pushed
    digest = first_block(manifest)
    with Server(root, "--blob-base", static.base, "--read-token", READ_TOKEN) as cloud:
        status, _, headers = call_with_headers(cloud.url, "HEAD", f"/v1/blobs/{digest}", token=READ_TOKEN)
        assert status == 200  # HEAD, which decides what a push sends, is answered by serve-cache itself
        assert headers["Cache-Control"].startswith("private")  # reads need a token: no shared cache may keep it
        pulled = run_cli("pull", artifact_id, "--cloud", cloud.url, "--token", READ_TOKEN, "--out", str(tmp_path / "b.kv"),
                         "--json", check=True)
        assert json.loads(pulled.stdout)["id"] == artifact_id
        assert run_cli("verify", str(tmp_path / "b.kv")).returncode == 0
        blobs = sum(len(layer) for layer in manifest["blocks"])
        assert static.sent.count(b"GET /store/blobs/") >= blobs  # the bytes came from the static server
        metrics = call_with_headers(cloud.url, "GET", "/metrics", token=READ_TOKEN)[1].decode()
        redirects = float(re.search(r"^celslm_blob_redirects_total (\S+)$", metrics, re.M).group(1))
        assert 1 <= redirects <= PARALLEL < blobs  # the place learned: later blobs go straight there
        assert READ_TOKEN.encode() not in static.sent and b"Authorization" not in static.sent

        (root / "blobs" / digest.removeprefix("sha256:")).write_bytes(b"not the blob")  # what the static server sends
        again = run_cli("pull", artifact_id, "--cloud", cloud.url, "--token", READ_TOKEN, "--out", str(tmp_path / "c.kv"),
                        env={"CELSLM_HOME": str(tmp_path / "cold-edge")})
        assert again.returncode == EXIT_INTEGRITY and "corrupt bytes" in again.stderr.decode()
        assert len(again.stderr.strip().splitlines()) == 1 and not (tmp_path / "c.kv").exists()


def test_a_redirect_to_another_plain_http_host_is_followed_only_where_allowed(pushed, static, tmp_path):
    root, artifact_id, _ = pushed
    other_host = static.base.replace("127.0.0.1", "localhost")  # not the server's own host name, and not https
    with Server(root, "--blob-base", other_host) as cloud:
        refused = run_cli("pull", artifact_id, "--cloud", cloud.url, "--out", str(tmp_path / "b.kv"))
        assert refused.returncode == EXIT_UNAVAILABLE and "CELSLM_REDIRECT_HOSTS" in refused.stderr.decode()
        assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "b.kv").exists()
        allowed = run_cli("pull", artifact_id, "--cloud", cloud.url, "--out", str(tmp_path / "b.kv"),
                          env={"CELSLM_REDIRECT_HOSTS": "localhost"})
        assert allowed.returncode == 0, allowed.stderr.decode()
        assert run_cli("verify", str(tmp_path / "b.kv")).returncode == 0


def test_serve_cache_refuses_redirect_options_that_cannot_work(tmp_path):
    for args, words in ((("--blob-base", "ftp://x/y"), "expected http(s)://"), (("--presign",), "presigned"),
                        (("--blob-base", "http://u:pw@x/y"), "no credentials"),
                        (("--blob-base", "http://x", "--presign"), "give one")):
        result = subprocess.run([sys.executable, "-m", "celslm", "serve-cache", "--root", str(tmp_path / "s"),
                                 "--port", str(free_port()), *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_push_to_a_directory_and_pull_from_it_as_the_cloud(prefilled, tmp_path):
    """Any store is a push target and a tier: no serve-cache in between."""
    folder = prefilled / "a.kv"
    store = tmp_path / "bucket-like"
    first = json.loads(run_cli("push", str(folder), str(store), "--tag", "ctx:1", "--json", check=True).stdout)
    again = json.loads(run_cli("push", str(folder), str(store), "--json", check=True).stdout)
    assert first["blobs_sent"] > 0 and again["blobs_sent"] == 0 and again["blobs_skipped"] == first["blobs_sent"]
    run_cli("pull", "ctx:1", "--cloud", f"file://{store}", "--out", str(tmp_path / "b.kv"), check=True)
    assert (tmp_path / "b.kv" / "manifest.json").read_bytes() == (folder / "manifest.json").read_bytes()
    assert run_cli("verify", str(tmp_path / "b.kv")).returncode == 0


def test_redirect_rules_refuse_a_downgrade_a_bad_port_and_unlisted_hosts():
    from celslm.errors import UnavailableError
    from celslm.store.http import HttpStore

    digest = "sha256:" + "ab" * 32
    plain = HttpStore("http://cache.example:8470", redirect_hosts=("CDN.example", "[::1]:8080"))
    secure = HttpStore("https://cache.example:8470", redirect_hosts=())
    assert plain._redirect("http://cache.example:8333/b?x=1", digest) == (("http", "cache.example", 8333), "/b?x=1")
    assert plain._redirect("http://cdn.example/b", digest)[0] == ("http", "cdn.example", 80)  # listed, any case
    assert plain._redirect("http://[::1]:8080/b", digest)[0] == ("http", "::1", 8080)
    assert plain._redirect("https://anywhere.example/b", digest)[0] == ("https", "anywhere.example", 443)
    assert plain._redirect("/elsewhere", digest) == (("http", "cache.example", 8470), "/elsewhere")
    for server, location in ((plain, "http://other.example/b"), (plain, "//other.example/b"),
                             (plain, "http://cdn.example:abc/b"), (plain, "ftp://cdn.example/b"),
                             (secure, "http://cache.example/b")):
        with pytest.raises(UnavailableError):
            server._redirect(location, digest)


def test_a_push_repairs_a_blob_gone_bad_in_the_store(pushed, prefilled):
    root, artifact_id, manifest = pushed
    digest = first_block(manifest)
    stored = root / "blobs" / digest.removeprefix("sha256:")
    good = stored.read_bytes()
    stored.write_bytes(b"rot" + good[3:])
    with Server(root) as cloud:
        again = json.loads(run_cli("push", str(prefilled / "a.kv"), cloud.url, "--json", check=True).stdout)
    assert again["blobs_sent"] == 1 and stored.read_bytes() == good


def test_a_server_given_without_its_scheme_is_refused_not_made_a_folder(prefilled, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in (("push", str(prefilled / "a.kv"), "cloud.example:8470"), ("pull", "x:1", "--cloud", "cloud.example:8470", "--out", "o.kv"),
                 ("pull", "x:1", "--cloud", "no-such-store", "--out", "o.kv")):
        result = run_cli(*args)
        assert result.returncode == 2 and len(result.stderr.decode().strip().splitlines()) == 1, result.stderr
    assert [path.name for path in tmp_path.iterdir()] == ["celslm-home"]  # the edge cache only: no store folder


def test_a_learned_blob_place_that_fails_sends_the_read_back_to_the_server(pushed, static):
    """The edge asks a --blob-base it learned first; when that place answers anything but the blob (here:
    nothing listens there any more), it asks serve-cache again and learns where blobs are now."""
    from celslm.store.http import HttpStore

    root, _, manifest = pushed
    refs = [block for layer in manifest["blocks"] for block in layer]
    with Server(root, "--blob-base", static.base) as cloud:
        client = HttpStore(cloud.url)
        gone = (("http", "127.0.0.1", free_port()), "/moved")
        client._blob_base = gone
        data = client.read_blob(refs[0]["digest"], refs[0]["size"])
        assert data is not None and len(data) == refs[0]["size"]  # verified against its digest inside
        assert client._blob_base not in (None, gone) and client._blob_base[1] == "/store"
        client._blob_base = (client._blob_base[0], "/no-such-folder")  # there, but without the blob: a 404
        assert client.read_blob(refs[1]["digest"], refs[1]["size"]) is not None
        assert client._blob_base[1] == "/store"
