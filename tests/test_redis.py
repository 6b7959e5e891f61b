"""Two serve-cache processes over one real Redis each serve what the other received."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from celslm.errors import EXIT_USAGE
from celslm.testing.redis_local import start_redis
from tests.conftest import CONTEXT, run_cli
from tests.netutil import Server
from tests.test_faults import one_line_error
from tests.test_server import call

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server not installed (apt-get install redis-server; .ci/run does)")


@pytest.fixture()
def redis_url(tmp_path):
    with start_redis(tmp_path) as redis:
        yield redis.url


def test_two_servers_over_one_redis_share_everything(redis_url, tiny_qwen, tmp_path):
    (tmp_path / "ctx.txt").write_text(CONTEXT)
    run_cli("prefill", "-m", str(tiny_qwen), "-c", str(tmp_path / "ctx.txt"), "-o", str(tmp_path / "a.kv"), check=True)
    first, second = Server(tmp_path / "unused-a", "--backend", redis_url), Server(tmp_path / "unused-b", "--backend", redis_url)
    try:
        pushed = json.loads(run_cli("push", str(tmp_path / "a.kv"), first.url, "--tag", "shared", "--json", check=True).stdout)
        assert pushed["blobs_sent"] > 0
        assert json.loads(run_cli("push", str(tmp_path / "a.kv"), second.url, "--json", check=True).stdout)["blobs_sent"] == 0
        run_cli("pull", f"{second.url}/v1/tags/shared", "--out", str(tmp_path / "b.kv"), check=True)
        assert (tmp_path / "b.kv" / "manifest.json").read_bytes() == (tmp_path / "a.kv" / "manifest.json").read_bytes()
        manifest = json.loads((tmp_path / "a.kv" / "manifest.json").read_bytes())
        digest = manifest["blocks"][1][0]["digest"]
        data = (tmp_path / "a.kv" / "blobs" / digest.removeprefix("sha256:")).read_bytes()
        assert call(second.url, "GET", f"/v1/blobs/{digest}", headers={"Range": "bytes=5-14"}) == (206, data[5:15])
        bad = b"not what the digest says"
        assert call(second.url, "PUT", f"/v1/blobs/sha256:{hashlib.sha256(b'x').hexdigest()}", bad)[0] == 422
        out = json.loads(run_cli("decode", "-m", str(tiny_qwen), "--kv", "shared", "--cloud", second.url, "-p", "hi",
                                 "-n", "4", "--json", check=True).stdout)
        assert out["artifact"] == pushed["id"] and out["new_tokens"] == 4
    finally:
        first.stop()
        second.stop()


def test_a_full_redis_refuses_the_push_and_every_push_that_exited_0_can_be_pulled(tiny_qwen, tmp_path):
    """maxmemory with noeviction, as the README says to run it: a push that does not fit gets 507 and
    exits 4, and the artifacts pushed before it are still whole."""
    redis = start_redis(tmp_path, "--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    server = Server(tmp_path / "unused", "--backend", redis.url)
    try:
        stored, refused = [], []
        for index in range(6):  # ~0.6 MB each: Redis is full after two or three
            (tmp_path / f"{index}.txt").write_text(CONTEXT * 3 + f"# context {index}\n")
            run_cli("prefill", "-m", str(tiny_qwen), "-c", str(tmp_path / f"{index}.txt"), "-o", str(tmp_path / f"{index}.kv"),
                    check=True)
            result = run_cli("push", str(tmp_path / f"{index}.kv"), server.url, "--json")
            (stored if result.returncode == 0 else refused).append((index, result))
        assert stored and refused, "the store should take some and refuse some"
        assert all(result.returncode == 4 and b"full" in result.stderr for _, result in refused), refused[0][1].stderr
        for index, result in stored:
            run_cli("pull", f"{server.url}/v1/artifacts/{json.loads(result.stdout)['id']}", "--out",
                    str(tmp_path / f"back-{index}.kv"), check=True)
            assert (tmp_path / f"back-{index}.kv" / "manifest.json").read_bytes() == \
                (tmp_path / f"{index}.kv" / "manifest.json").read_bytes()
    finally:
        server.stop()
        redis.stop()


@pytest.mark.parametrize("url", ["redis://edge:hun/ter2@127.0.0.1:6379/0", "redis+cluster://edge:hunter2@127.0.0.1:7000/1"])
def test_a_bad_backend_url_is_one_line_exit_2_and_never_shows_its_password(url):
    line = one_line_error(run_cli("serve-cache", "--backend", url), EXIT_USAGE)
    assert "ter2" not in line and "hun" not in line and "127.0.0.1:" in line
