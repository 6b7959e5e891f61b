"""Decode keeps answering when the cloud misbehaves: down, stalled, dropping mid-blob, corrupt."""

from __future__ import annotations

import json
import time

from celslm.errors import EXIT_UNAVAILABLE
from celslm.store.tiers import PARALLEL
from celslm.testing.faults import FaultServer
from celslm.testing.processes import free_port
from tests.conftest import GREET_PROMPT as PROMPT, run_cli


def decode(model, *args, env=None, check=True):
    return run_cli("decode", "-m", str(model), "-p", PROMPT, "-n", "6", "--json", *args, env=env, check=check)


def test_a_blob_cut_off_mid_way_is_resumed_with_range(published, tiny_qwen):
    folder, manifest, expected = published
    cloud = FaultServer(folder / "store", mode="drop")
    try:
        out = json.loads(decode(tiny_qwen, "--kv", "ctx", "--cloud", cloud.url).stdout)
    finally:
        cloud.close()
    assert out["text"] == expected["text"] and out["fallback"] is None
    assert cloud.range_requests >= len(manifest.blob_refs())  # every blob was resumed, not restarted


def test_a_stalled_peer_is_skipped_for_the_cloud(published, tiny_qwen):
    folder, _, expected = published
    peer, cloud = FaultServer(folder / "store", mode="stall"), FaultServer(folder / "store")
    started = time.monotonic()
    try:
        out = json.loads(decode(tiny_qwen, "--kv", "ctx", "--peer", peer.url, "--cloud", cloud.url,
                                env={"CELSLM_TIMEOUT": "1"}).stdout)
    finally:
        peer.close()
        cloud.close()
    assert out["text"] == expected["text"]
    assert list(out["bytes_by_source"]) == [f"cloud {cloud.url}"]
    # the blobs in flight are each tried with backoff (4 attempts); then the peer is marked down, never asked again
    assert 4 <= peer.blob_requests <= PARALLEL * 4 and time.monotonic() - started < 60


def test_corrupt_blocks_beyond_the_first_chunk_are_recomputed_from_context(published, tiny_qwen):
    folder, manifest, expected = published
    later = {layer[chunk].digest for layer in manifest.blocks for chunk in range(1, manifest.chunks)}
    cloud = FaultServer(folder / "store", corrupt=later)
    try:
        out = json.loads(decode(tiny_qwen, "--kv", "ctx", "--cloud", cloud.url, "--context", str(folder / "ctx.txt"),
                                "--chunk-size", "64").stdout)
    finally:
        cloud.close()
    assert out["path"] == "partial" and "corrupt" in out["fallback"]
    assert out["text"] == expected["text"] and out["context_prefill_s"] > 0


def test_a_cloud_that_is_down_falls_back_to_local_prefill(published, tiny_qwen):
    folder, manifest, expected = published
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = json.loads(decode(tiny_qwen, "--kv", manifest.id, "--cloud", down, "--context", str(folder / "ctx.txt")).stdout)
    assert out["path"] == "edge-only" and "cannot reach" in out["fallback"] and out["text"] == expected["text"]


def test_no_source_and_no_context_is_a_clear_error(published, tiny_qwen):
    folder, manifest, _ = published
    down = f"http://127.0.0.1:{free_port()}"
    result = decode(tiny_qwen, "--kv", manifest.id, "--cloud", down, check=False)
    assert result.returncode == EXIT_UNAVAILABLE and result.stdout == b""
    lines = [line for line in result.stderr.decode().splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach" in lines[0]
