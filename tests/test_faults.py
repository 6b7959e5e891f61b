"""No data loss in the stores and no crash on bad input: every case is one line, a documented exit
code, and nothing lost or half-written."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import pytest

from celslm.errors import EXIT_INTEGRITY, EXIT_RUNTIME, EXIT_UNAVAILABLE, EXIT_USAGE
from celslm.manifest import sha256_digest
from celslm.trust import canonical_json
from tests.conftest import CLI, CONTEXT, run_cli
from tests.netutil import Server, free_port
from tests.test_server import call
from tests.tiny import save_tiny_model

PROMPT = "What does greet return?"


@pytest.fixture(scope="module")
def two(prefilled, tiny_qwen, tmp_path_factory):
    """Artifacts A (the shared prefilled one) and B (another context), about 480 kB each."""
    folder = tmp_path_factory.mktemp("two")
    (folder / "b.txt").write_text("# another context, shared blocks none\n" + CONTEXT * 3)
    run_cli("prefill", "-m", str(tiny_qwen), "-c", str(folder / "b.txt"), "-o", str(folder / "b.kv"),
            "--chunk-size", "64", check=True)
    return prefilled / "a.kv", folder / "b.kv"


def artifact_id(path) -> str:
    return sha256_digest((path / "manifest.json").read_bytes())


def one_line_error(result, code: int) -> str:
    assert result.returncode == code, result.stderr.decode()[-800:]
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("celslm: error:") and "Traceback" not in result.stderr.decode()
    return lines[0]


# ---------------------------------------------------------------- stores


def test_a_push_larger_than_the_store_is_refused_and_nothing_is_lost(two, tmp_path):
    a, _ = two
    server = Server(tmp_path / "small", "--capacity", "300kB")
    try:
        line = one_line_error(run_cli("push", str(a), server.url, "--tag", "ctx"), EXIT_UNAVAILABLE)
        assert "needs" in line and "the store holds 300,000" in line
        assert call(server.url, "GET", f"/v1/artifacts/{artifact_id(a)}")[0] == 404
    finally:
        server.stop()


def test_every_push_that_exits_0_can_be_pulled_by_id_and_eviction_takes_tags_along(two, tmp_path):
    a, b = two
    server = Server(tmp_path / "store", "--capacity", "700kB")  # room for one of them
    try:
        run_cli("push", str(a), server.url, "--tag", "ctx-a", check=True)
        run_cli("push", str(b), server.url, "--tag", "ctx-b", check=True)  # evicts A, never itself
        run_cli("pull", f"{server.url}/v1/artifacts/{artifact_id(b)}", "--out", str(tmp_path / "b.kv"), check=True)
        assert call(server.url, "GET", "/v1/tags/ctx-b")[1].decode() == artifact_id(b)
        assert call(server.url, "GET", "/v1/tags/ctx-a")[0] == 404  # gone with its artifact, not dangling
        assert call(server.url, "GET", f"/v1/artifacts/{artifact_id(a)}")[0] == 404
    finally:
        server.stop()


def test_orphan_blobs_from_an_interrupted_push_are_collected(two, tmp_path):
    a, b = two
    server = Server(tmp_path / "store", "--capacity", "700kB")
    try:
        orphan = os.urandom(300_000)
        assert call(server.url, "PUT", f"/v1/blobs/{sha256_digest(orphan)}", orphan)[0] == 201
        old = time.time() - 3600  # older than a push in progress gets
        os.utime(tmp_path / "store" / "blobs" / sha256_digest(orphan).removeprefix("sha256:"), (old, old))
        run_cli("push", str(a), server.url, check=True)
        assert not (tmp_path / "store" / "blobs" / sha256_digest(orphan).removeprefix("sha256:")).exists()
        assert call(server.url, "GET", f"/v1/artifacts/{artifact_id(a)}")[0] == 200
    finally:
        server.stop()


def test_a_corrupt_blob_in_the_edge_cache_is_replaced_by_the_verified_copy(two, tiny_qwen, tmp_path, celslm_home):
    a, _ = two
    server = Server(tmp_path / "cloud")
    try:
        run_cli("push", str(a), server.url, "--tag", "ctx", check=True)
        args = ["decode", "-m", str(tiny_qwen), "-p", PROMPT, "-n", "4", "--json", "--kv", "ctx", "--cloud", server.url]
        first = json.loads(run_cli(*args, check=True).stdout)
        cached = next((celslm_home / "store" / "blobs").iterdir())
        good = cached.read_bytes()
        cached.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
        again = json.loads(run_cli(*args, check=True).stdout)
        assert again["text"] == first["text"] and cached.read_bytes() == good
        assert (celslm_home / "store" / "quarantine" / cached.name).is_file()
    finally:
        server.stop()


def test_a_bad_range_header_gets_416_and_the_server_stays_well(tmp_path):
    server = Server(tmp_path / "store")
    try:
        for size in (1000, 5 << 20):  # from memory, and sent from disk with sendfile
            data = os.urandom(size)
            digest = sha256_digest(data)
            assert call(server.url, "PUT", f"/v1/blobs/{digest}", data)[0] == 201
            for header in ("bytes=abc", "bytes=5-2", "bytes=99999999-"):
                assert call(server.url, "GET", f"/v1/blobs/{digest}", headers={"Range": header})[0] == 416
            status, body = call(server.url, "GET", f"/v1/blobs/{digest}", headers={"Range": "bytes=10-19"})
            assert status == 206 and body == data[10:20]
            assert call(server.url, "GET", f"/v1/blobs/{digest}")[1] == data
    finally:
        assert server.stop() == 0
    assert b"Traceback" not in server.proc.stderr.read()


# ---------------------------------------------------------------- bad input, one line each


def test_an_empty_raw_prompt_is_one_line_every_time(tiny_qwen, prefilled):
    for _ in range(3):  # it aborted the process 1 run in 4 (a feed thread left running)
        result = run_cli("decode", "-m", str(tiny_qwen), "--kv", str(prefilled / "a.kv"), "-p", "", "--raw",
                         subprocess_=True)
        assert "the prompt is empty" in one_line_error(result, EXIT_USAGE)


def test_an_artifact_with_fewer_layers_than_the_model_is_refused(tiny_qwen, prefilled, tmp_path):
    shutil.copytree(prefilled / "a.kv", tmp_path / "short.kv")
    obj = json.loads((tmp_path / "short.kv" / "manifest.json").read_bytes())
    obj["blocks"], obj["provenance"] = obj["blocks"][:2], obj["provenance"][:2]
    obj["geometry"]["layers"] = 2
    (tmp_path / "short.kv" / "manifest.json").write_bytes(canonical_json(obj))
    for pipeline in ("--pipeline", "--no-pipeline"):
        result = run_cli("decode", "-m", str(tiny_qwen), "--kv", str(tmp_path / "short.kv"), "-p", PROMPT, pipeline,
                         subprocess_=True)
        assert "its KV is 2 layers" in one_line_error(result, EXIT_INTEGRITY)


def test_a_stream_cut_inside_the_manifest_is_an_integrity_error(tiny_qwen, prefilled, tmp_path):
    stream = run_cli("prefill", "-m", str(tiny_qwen), "-c", str(prefilled / "ctx.txt"), "-o", "-", check=True).stdout
    for cut in (600, 1200):  # inside manifest.json's data (it starts at byte 512)
        result = run_cli("verify", "-", input=stream[:cut])
        assert "truncated" in one_line_error(result, EXIT_INTEGRITY)


def test_a_full_disk_is_one_line_and_leaves_nothing_behind(tiny_qwen, prefilled):
    with open("/dev/full", "wb") as full:
        result = subprocess.run(CLI + ["prefill", "-m", str(tiny_qwen), "-c", str(prefilled / "ctx.txt"), "-o", "-"],
                                stdout=full, stderr=subprocess.PIPE, timeout=300)
    result.stderr = result.stderr  # noqa: PLW0127 - one_line_error reads it
    assert "No space left on device" in one_line_error(result, EXIT_RUNTIME)


def test_serve_cache_startup_problems_are_one_line(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "bad.pem").write_text("garbage")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        cases = [
            (["--root", str(tmp_path / "s"), "--port", port], EXIT_RUNTIME, "cannot listen"),
            (["--root", str(tmp_path / "file"), "--port", str(free_port())], EXIT_USAGE, "cannot use it as a store"),
            (["--root", str(tmp_path / "s"), "--port", str(free_port()), "--tls-cert", str(tmp_path / "bad.pem"),
              "--tls-key", str(tmp_path / "bad.pem")], EXIT_USAGE, "cannot load them"),
        ]
        for args, code, words in cases:
            result = run_cli("serve-cache", *args, subprocess_=True)
            assert words in one_line_error(result, code)


def test_a_context_longer_than_the_model_was_trained_for_is_refused(tmp_path, prefilled):
    short = save_tiny_model(tmp_path / "short", "qwen2", seed=1, max_position_embeddings=64)
    result = run_cli("decode", "-m", str(short), "--context", str(prefilled / "ctx.txt"), "-p", PROMPT)
    assert "trained for (64)" in one_line_error(result, EXIT_USAGE)
