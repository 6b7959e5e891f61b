"""Signed artifacts and tags against a hostile peer: two real serve-cache processes on loopback, the
peer answering with another context (unsigned, signed by a stranger, expired, replayed, forged)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import time

import pytest

from celslm.errors import EXIT_INTEGRITY, EXIT_USAGE
from celslm.manifest import SCHEMA, sha256_digest
from celslm.store.http import HttpStore
from celslm.trust import canonical_json, load_private_key, sign_artifact, sign_tag
from tests.conftest import CONTEXT, run_cli
from tests.netutil import Server
from tests.test_server import call

TEXT_A = CONTEXT * 3 + "# the code is 4812\n"
TEXT_B = CONTEXT * 3 + "# the code is 9066\n"
PROMPT = "What is the code?"


@pytest.fixture(scope="module")
def world(tiny_qwen, tmp_path_factory):
    """Keys (the cloud's, a stranger's), contexts A and B, their artifacts (A and B signed by the cloud)
    and a forged one: A's token ids over B's KV."""
    root = tmp_path_factory.mktemp("trust")
    for name in ("cloud", "stranger"):
        run_cli("keys", "generate", "--out", str(root / name), check=True)
    for name, text in (("a", TEXT_A), ("b", TEXT_B)):
        (root / f"{name}.txt").write_text(text)
        run_cli("prefill", "-m", str(tiny_qwen), "-c", str(root / f"{name}.txt"), "-o", str(root / f"{name}.kv"),
                "--chunk-size", "64", "--sign", str(root / "cloud.key"), check=True)
    forge(root / "a.kv", root / "b.kv", root / "forged.kv")
    ids = {name: sha256_digest((root / f"{name}.kv" / "manifest.json").read_bytes()) for name in ("a", "b", "forged")}
    return root, ids


def forge(a, b, out):
    """An artifact whose token ids (and so prefix hashes) are A's and whose KV is B's, unsigned."""
    shutil.copytree(b, out)
    (out / "signatures.json").unlink()
    manifest_a, manifest = (json.loads((p / "manifest.json").read_bytes()) for p in (a, out))
    manifest["tokens"], manifest["prefix_hashes"] = manifest_a["tokens"], manifest_a["prefix_hashes"]
    token_blob = manifest_a["tokens"]["digest"].removeprefix("sha256:")
    shutil.copy(a / "blobs" / token_blob, out / "blobs" / token_blob)
    (out / "manifest.json").write_bytes(canonical_json(manifest))


@pytest.fixture()
def servers(tmp_path):
    started = []

    def start(name):
        started.append(Server(tmp_path / name))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def answer(model, *args, check=True):
    result = run_cli("decode", "-m", str(model), "-p", PROMPT, "-n", "8", "--json", *args, check=check)
    return (json.loads(result.stdout) if result.returncode == 0 else None), result


def publish(world, cloud, peer, peer_artifact="b", peer_tag_key=None):
    """The cloud holds A tagged ctx:latest (signed statement); the peer holds `peer_artifact` under the same tag."""
    root, _ = world
    run_cli("push", str(root / "a.kv"), cloud.url, "--tag", "ctx:latest", "--sign", str(root / "cloud.key"), check=True)
    tag_args = ["--tag", "ctx:latest"] + (["--sign", str(root / f"{peer_tag_key}.key")] if peer_tag_key else [])
    run_cli("push", str(root / f"{peer_artifact}.kv"), peer.url, *tag_args, check=True)


def test_keys_generate_writes_a_private_key_only_its_owner_reads(tmp_path):
    result = json.loads(run_cli("keys", "generate", "--out", str(tmp_path / "k"), "--json", check=True).stdout)
    assert stat.S_IMODE(os.stat(tmp_path / "k.key").st_mode) == 0o600
    assert run_cli("keys", "id", str(tmp_path / "k.pub"), check=True).stdout.decode().strip() == result["id"]
    again = run_cli("keys", "generate", "--out", str(tmp_path / "k"))
    assert again.returncode == EXIT_USAGE and b"already exists" in again.stderr


def test_the_same_context_gives_the_same_id_on_every_run(world, tiny_qwen, tmp_path):
    root, ids = world
    run_cli("prefill", "-m", str(tiny_qwen), "-c", str(root / "a.txt"), "-o", str(tmp_path / "again.kv"),
            "--chunk-size", "64", check=True)
    assert sha256_digest((tmp_path / "again.kv" / "manifest.json").read_bytes()) == ids["a"]
    assert json.loads((tmp_path / "again.kv" / "timings.json").read_bytes())["prefill_s"] > 0  # beside, not inside
    assert b"timings" not in (tmp_path / "again.kv" / "manifest.json").read_bytes()


def test_a_manifest_that_is_not_canonical_is_refused(world, tmp_path, servers):
    root, _ = world
    shutil.copytree(root / "a.kv", tmp_path / "loose.kv")
    obj = json.loads((root / "a.kv" / "manifest.json").read_bytes())
    loose = json.dumps(obj, indent=1, sort_keys=True).encode()  # same content, other bytes: another id
    (tmp_path / "loose.kv" / "manifest.json").write_bytes(loose)
    result = run_cli("verify", str(tmp_path / "loose.kv"))
    assert result.returncode == EXIT_INTEGRITY and b"canonical" in result.stderr
    cloud = servers("cloud")
    run_cli("push", str(root / "a.kv"), cloud.url, check=True)  # the blobs are there; the manifest is not canonical
    status, body = call(cloud.url, "PUT", f"/v1/artifacts/{sha256_digest(loose)}", loose)
    assert status == 422 and b"canonical" in body


def test_verify_with_trust_accepts_the_producers_signature_only(world, tmp_path):
    root, _ = world
    assert run_cli("verify", str(root / "a.kv"), "--trust", str(root / "cloud.pub")).returncode == 0
    stranger = run_cli("verify", str(root / "a.kv"), "--trust", str(root / "stranger.pub"))
    assert stranger.returncode == EXIT_INTEGRITY and b"not signed by a trusted key" in stranger.stderr
    unsigned = run_cli("verify", str(root / "forged.kv"), "--trust", str(root / "cloud.pub"))
    assert unsigned.returncode == EXIT_INTEGRITY
    shutil.copytree(root / "a.kv", tmp_path / "moved.kv")  # A's signature beside B's manifest
    shutil.copy(root / "b.kv" / "manifest.json", tmp_path / "moved.kv" / "manifest.json")
    shutil.copytree(root / "b.kv" / "blobs", tmp_path / "moved.kv" / "blobs", dirs_exist_ok=True)
    moved = run_cli("verify", str(tmp_path / "moved.kv"), "--trust", str(root / "cloud.pub"))
    assert moved.returncode == EXIT_INTEGRITY and b"does not verify" in moved.stderr


def test_a_peers_unsigned_tag_is_passed_over_for_the_clouds_signed_one(world, tiny_qwen, servers):
    root, ids = world
    cloud, peer = servers("cloud"), servers("peer")
    publish(world, cloud, peer)
    local, _ = answer(tiny_qwen, "--kv", str(root / "a.kv"))
    trusted, result = answer(tiny_qwen, "--kv", "ctx:latest", "--peer", peer.url, "--cloud", cloud.url,
                             "--trust", str(root / "cloud.pub"))
    assert trusted["artifact"] == ids["a"] and trusted["text"] == local["text"]
    unchecked, result = answer(tiny_qwen, "--kv", "ctx:latest", "--peer", peer.url, "--cloud", cloud.url)
    assert unchecked["artifact"] == ids["b"] and b"answered by peer" in result.stderr  # no policy: a warning


def test_a_tag_signed_by_a_stranger_is_refused(world, tiny_qwen, servers):
    root, ids = world
    cloud, peer = servers("cloud"), servers("peer")
    publish(world, cloud, peer, peer_tag_key="stranger")
    trusted, _ = answer(tiny_qwen, "--kv", "ctx:latest", "--peer", peer.url, "--cloud", cloud.url,
                        "--trust", str(root / "cloud.pub"))
    assert trusted["artifact"] == ids["a"]
    _, alone = answer(tiny_qwen, "--kv", "ctx:latest", "--cloud", peer.url, "--trust", str(root / "cloud.pub"), check=False)
    assert alone.returncode == EXIT_INTEGRITY and b"signed by no trusted key" in alone.stderr
    errors = [line for line in alone.stderr.splitlines() if line.startswith(b"celslm: error:")]
    assert len(errors) == 1 and alone.stderr.splitlines()[-1] == errors[0] and b"Traceback" not in alone.stderr


def test_an_expired_tag_statement_is_refused(world, tiny_qwen, servers):
    root, ids = world
    cloud = servers("cloud")
    run_cli("push", str(root / "a.kv"), cloud.url, "--sign", str(root / "cloud.key"), check=True)
    key = load_private_key(root / "cloud.key")
    HttpStore(cloud.url).put_tag("ctx:latest", ids["a"], sign_tag(key, "ctx:latest", ids["a"], 60, now=time.time() - 120))
    _, result = answer(tiny_qwen, "--kv", "ctx:latest", "--cloud", cloud.url, "--trust", str(root / "cloud.pub"), check=False)
    assert result.returncode == EXIT_INTEGRITY and b"expired" in result.stderr


def test_a_replayed_older_statement_is_refused_once_a_newer_one_was_seen(world, tiny_qwen, servers):
    root, ids = world
    cloud, peer = servers("cloud"), servers("peer")
    key = load_private_key(root / "cloud.key")
    for server, name in ((cloud, "a"), (peer, "b")):  # both artifacts genuinely signed by the cloud
        run_cli("push", str(root / f"{name}.kv"), server.url, check=True)
    old = sign_tag(key, "ctx:latest", ids["b"], 3600, now=time.time() - 600)  # what the tag said ten minutes ago
    HttpStore(peer.url).put_tag("ctx:latest", ids["b"], old)
    HttpStore(cloud.url).put_tag("ctx:latest", ids["a"], sign_tag(key, "ctx:latest", ids["a"], 3600))
    pub = str(root / "cloud.pub")
    first, _ = answer(tiny_qwen, "--kv", "ctx:latest", "--cloud", cloud.url, "--trust", pub)
    assert first["artifact"] == ids["a"]  # the edge has now seen the newer statement
    replayed, result = answer(tiny_qwen, "--kv", "ctx:latest", "--peer", peer.url, "--cloud", cloud.url, "--trust", pub)
    assert replayed["artifact"] == ids["a"] and b"a replay" in result.stderr
    _, alone = answer(tiny_qwen, "--kv", "ctx:latest", "--cloud", peer.url, "--trust", pub, check=False)
    assert alone.returncode == EXIT_INTEGRITY and b"a replay" in alone.stderr


def test_a_forged_prefix_answer_is_passed_over_under_a_policy(world, tiny_qwen, servers):
    root, ids = world
    cloud, peer = servers("cloud"), servers("peer")
    run_cli("push", str(root / "a.kv"), cloud.url, check=True)
    run_cli("push", str(root / "forged.kv"), peer.url, check=True)
    local, _ = answer(tiny_qwen, "--kv", str(root / "a.kv"))
    args = ["--context", str(root / "a.txt"), "--chunk-size", "64", "--peer", peer.url, "--cloud", cloud.url]
    fooled, result = answer(tiny_qwen, *args)
    assert fooled["artifact"] == ids["forged"] and b"unchecked" in result.stderr  # the attack, without a policy
    trusted, result = answer(tiny_qwen, *args, "--trust", str(root / "cloud.pub"))
    assert trusted["artifact"] == ids["a"] and trusted["text"] == local["text"]
    assert b"passed over" in result.stderr


def test_an_unsigned_artifact_is_refused_before_any_blob_is_read(world, tiny_qwen, tmp_path):
    root, _ = world
    shutil.copytree(root / "forged.kv", tmp_path / "f.kv")
    for blob in (tmp_path / "f.kv" / "blobs").iterdir():
        blob.write_bytes(b"x")  # any read of a blob would fail on its digest instead
    _, result = answer(tiny_qwen, "--kv", str(tmp_path / "f.kv"), "--trust", str(root / "cloud.pub"), check=False)
    assert result.returncode == EXIT_INTEGRITY and b"not signed by a trusted key (no signature)" in result.stderr


def test_a_store_refuses_a_signature_that_does_not_verify(world, servers):
    root, ids = world
    cloud = servers("cloud")
    run_cli("push", str(root / "a.kv"), cloud.url, check=True)
    wrong = sign_artifact(load_private_key(root / "cloud.key"), ids["b"]).to_json()  # B's signature, offered for A
    status, body = call(cloud.url, "PUT", f"/v1/artifacts/{ids['a']}/signatures", canonical_json([wrong]))
    assert status == 422 and b"does not verify" in body
    stored = json.loads(call(cloud.url, "GET", f"/v1/artifacts/{ids['a']}/signatures")[1])
    assert stored == json.loads((root / "a.kv" / "signatures.json").read_bytes())  # A's own, pushed with it, only


def test_the_schema_is_versioned(world):
    root, _ = world
    assert json.loads((root / "a.kv" / "manifest.json").read_bytes())["schema"] == SCHEMA == "celslm.kv/2"
