"""A hostile peer against the edge: bodies past their declared size, counts past any model, a trickle.
The edge reads no further than it asked for, allocates nothing from an unchecked number, gives up on
the peer within the deadline and answers from the cloud."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from celslm.errors import EXIT_INTEGRITY
from celslm.manifest import sha256_digest
from celslm.testing.faults import FaultServer
from celslm.trust import canonical_json
from tests.conftest import CLI, GREET_PROMPT as PROMPT
from tests.test_resilience import decode

MAX_RSS_KIB = 1 << 20  # 1 GiB: the edge peaks near 400 MiB; a hostile peer sends 2 GB


# wait4 in a small process of its own: Linux carries a parent's peak into a forked child's ru_maxrss, so
# a child forked from pytest (hundreds of MiB after other tests) would report pytest's peak, not its own
LAUNCHER = ("import os, subprocess, sys\nchild = subprocess.Popen(sys.argv[2:])\n_, status, usage = os.wait4(child.pid, 0)\n"
            "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\nsys.exit(os.waitstatus_to_exitcode(status))\n")


def decode_in_child(model, *args: str) -> tuple[subprocess.CompletedProcess, int]:
    """`decode --json` as a process of its own; returns its result and its peak resident set (KiB): the
    child's alone, whatever this process or other tests' children held."""
    with tempfile.TemporaryDirectory() as folder:
        rss = os.path.join(folder, "maxrss")
        result = subprocess.run([sys.executable, "-c", LAUNCHER, rss, *CLI, "decode", "-m", str(model), "-p", PROMPT,
                                 "-n", "6", "--json", *args], capture_output=True, timeout=300)
        return result, int(open(rss).read())


def test_a_peer_sending_an_endless_body_is_refused_and_the_cloud_answers(published, tiny_qwen):
    folder, manifest, expected = published
    for mode in ("huge", "huge-declared"):
        peer, cloud = FaultServer(folder / "store", mode=mode), FaultServer(folder / "store")
        try:
            result, max_rss_kib = decode_in_child(tiny_qwen, "--kv", "ctx", "--peer", peer.url, "--cloud", cloud.url)
        finally:
            peer.close()
            cloud.close()
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        assert json.loads(result.stdout)["text"] == expected["text"]
        assert max_rss_kib < MAX_RSS_KIB, f"{mode}: the edge peaked at {max_rss_kib >> 10} MiB"
        # the peer is asked no more after its first bad blob: only what was already in flight (4 at a time)
        assert peer.blob_requests <= 8 < len(manifest.blob_refs()), peer.blob_requests


def test_a_trickling_peer_is_abandoned_at_its_deadline(published, tiny_qwen):
    folder, _, expected = published
    peer, cloud = FaultServer(folder / "store", mode="trickle"), FaultServer(folder / "store")
    started = time.monotonic()
    try:
        out = json.loads(decode(tiny_qwen, "--kv", "ctx", "--peer", peer.url, "--cloud", cloud.url,
                                env={"CELSLM_TIMEOUT": "2"}).stdout)
    finally:
        peer.close()
        cloud.close()
    assert out["text"] == expected["text"]
    assert time.monotonic() - started < 20  # the trickle would last a minute per blob


def test_a_manifest_declaring_a_billion_tokens_is_refused_before_anything_is_built(published, tiny_qwen):
    folder, manifest, _ = published
    obj = json.loads(manifest.canonical_bytes())
    obj["tokens"]["count"] = 10**9
    forged = canonical_json(obj)
    peer = FaultServer(folder / "store")
    peer.manifests[sha256_digest(forged)] = forged
    peer.tags["ctx"] = sha256_digest(forged)
    try:
        result, max_rss_kib = decode_in_child(tiny_qwen, "--kv", "ctx", "--cloud", peer.url)
    finally:
        peer.close()
    assert result.returncode == EXIT_INTEGRITY and b"declares tokens 1000000000" in result.stderr
    assert max_rss_kib < MAX_RSS_KIB, f"the edge peaked at {max_rss_kib >> 10} MiB"


def test_a_peer_sending_another_manifest_for_an_id_is_passed_over_for_the_cloud(published, tiny_qwen):
    folder, manifest, expected = published
    obj = json.loads(manifest.canonical_bytes())
    obj["tokens"]["count"] = 10**9
    peer, cloud = FaultServer(folder / "store"), FaultServer(folder / "store")
    peer.manifests[manifest.id] = canonical_json(obj)  # served for the id it does not hash to
    try:
        result = decode(tiny_qwen, "--kv", manifest.id, "--peer", peer.url, "--cloud", cloud.url)
    finally:
        peer.close()
        cloud.close()
    assert json.loads(result.stdout)["text"] == expected["text"]
    assert b"does not hash to" in result.stderr
