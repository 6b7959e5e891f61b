"""A hostile peer against the edge: bodies past their declared size, counts past any model, a trickle.
The edge reads no further than it asked for, allocates nothing from an unchecked number, gives up on
the peer within the deadline and answers from the cloud."""

from __future__ import annotations

import json
import resource
import time

from celslm.errors import EXIT_INTEGRITY
from celslm.manifest import sha256_digest
from celslm.testing.faults import FaultServer
from celslm.trust import canonical_json
from tests.test_resilience import decode


def test_a_peer_sending_an_endless_body_is_refused_and_the_cloud_answers(published, tiny_qwen):
    folder, manifest, expected = published
    for mode in ("huge", "huge-declared"):
        peer, cloud = FaultServer(folder / "store", mode=mode), FaultServer(folder / "store")
        try:
            out = json.loads(decode(tiny_qwen, "--kv", "ctx", "--peer", peer.url, "--cloud", cloud.url).stdout)
        finally:
            peer.close()
            cloud.close()
        assert out["text"] == expected["text"]
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 2 << 20  # KiB: never near the 2 GB sent
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
        result = decode(tiny_qwen, "--kv", "ctx", "--cloud", peer.url, check=False)
    finally:
        peer.close()
    assert result.returncode == EXIT_INTEGRITY and b"declares tokens 1000000000" in result.stderr
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 2 << 20


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
