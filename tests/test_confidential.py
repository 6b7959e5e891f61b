"""Confidential contexts: blobs encrypted per artifact for recipients' X25519 keys, stored and served
unread by serve-cache and the edge cache, opened only with a recipient's identity."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from celslm.errors import EXIT_INTEGRITY, EXIT_USAGE
from celslm.manifest import sha256_digest
from celslm.trust import canonical_json
from tests.conftest import CONTEXT, run_cli
from tests.netutil import Server

TEXT = CONTEXT * 3 + "# the code is 4812\n"
PROMPT = "What is the code?"


@pytest.fixture(scope="module")
def sealed(tiny_qwen, tmp_path_factory):
    """Keys (the cloud's signing key, edge1's and edge2's encryption keys), the context's plain artifact
    plain.kv, and e.kv and e2.kv: the same context encrypted for edge1, twice, signed by the cloud."""
    root = tmp_path_factory.mktemp("sealed")
    run_cli("keys", "generate", "--out", str(root / "cloud"), check=True)
    for name in ("edge1", "edge2"):
        run_cli("keys", "generate", "--out", str(root / name), "--for", "encryption", check=True)
    (root / "ctx.txt").write_text(TEXT)
    common = ["prefill", "-m", str(tiny_qwen), "-c", str(root / "ctx.txt"), "--chunk-size", "64"]
    run_cli(*common, "-o", str(root / "plain.kv"), check=True)
    for name in ("e", "e2"):
        run_cli(*common, "-o", str(root / f"{name}.kv"), "--encrypt-to", str(root / "edge1.pub"),
                "--sign", str(root / "cloud.key"), check=True)
    return root


def decode(model, kv, *args, check=True):
    result = run_cli("decode", "-m", str(model), "--kv", str(kv), "-p", PROMPT, "-n", "8", "--json", *args, check=check)
    return (json.loads(result.stdout) if result.returncode == 0 else None), result


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_bytes())


def test_an_encrypted_artifact_decodes_to_the_plain_artifacts_tokens(sealed, tiny_qwen):
    plain, _ = decode(tiny_qwen, sealed / "plain.kv")
    opened, _ = decode(tiny_qwen, sealed / "e.kv", "--identity", str(sealed / "edge1.key"),
                       "--trust", str(sealed / "cloud.pub"))
    assert opened["text"] == plain["text"] and opened["new_tokens"] == plain["new_tokens"] == 8
    assert opened["artifact"] == sha256_digest((sealed / "e.kv" / "manifest.json").read_bytes())


def test_decode_without_the_identity_is_one_clear_line_and_exit_2(sealed, tiny_qwen):
    _, result = decode(tiny_qwen, sealed / "e.kv", check=False)
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == EXIT_USAGE and len(lines) == 1, result.stderr
    assert "encrypted" in lines[0] and "--identity" in lines[0] and "Traceback" not in lines[0]
    _, wrong = decode(tiny_qwen, sealed / "e.kv", "--identity", str(sealed / "edge2.key"), check=False)
    assert wrong.returncode == EXIT_USAGE and "no identity given is one of them" in wrong.stderr.decode()


def test_a_signing_key_is_no_identity(sealed, tiny_qwen):
    _, result = decode(tiny_qwen, sealed / "e.kv", "--identity", str(sealed / "cloud.key"), check=False)
    assert result.returncode == EXIT_USAGE and "X25519" in result.stderr.decode()


def test_no_window_of_a_plaintext_blob_reaches_either_store(sealed, tiny_qwen, celslm_home, tmp_path):
    server = Server(tmp_path / "cloud-store")
    try:
        run_cli("push", str(sealed / "e.kv"), server.url, "--tag", "ctx:latest", "--sign", str(sealed / "cloud.key"),
                check=True)
        out, _ = decode(tiny_qwen, "ctx:latest", "--cloud", server.url, "--identity", str(sealed / "edge1.key"),
                        "--trust", str(sealed / "cloud.pub"))
    finally:
        server.stop()
    assert out["bytes_by_source"].get("cloud " + server.url, 0) > 0  # the edge cache was filled from the cloud
    stores = [tmp_path / "cloud-store", celslm_home / "store"]
    haystack = b"".join(p.read_bytes() for store in stores for p in sorted(store.rglob("*")) if p.is_file())
    assert len(haystack) > manifest(sealed / "e.kv")["tokens"]["size"]
    # Any 64-byte window shared with a plaintext blob contains one of its 33-byte pieces at a multiple of 32
    plaintexts = [p.read_bytes() for p in sorted((sealed / "plain.kv" / "blobs").iterdir())]
    leaks = [(i, at) for i, blob in enumerate(plaintexts) for at in range(0, len(blob) - 32, 32)
             if blob[at : at + 33] in haystack]
    assert not leaks, f"{len(leaks)} plaintext pieces found in the stores, first {leaks[0]}"


def test_the_same_context_encrypted_twice_has_two_ids_and_keyed_prefix_hashes(sealed):
    plain, first, second = (manifest(sealed / f"{name}.kv") for name in ("plain", "e", "e2"))
    digests = [{ref["digest"] for layer in m["blocks"] for ref in layer} for m in (first, second)]
    assert sha256_digest(canonical_json(first)) != sha256_digest(canonical_json(second))
    assert not digests[0] & digests[1]  # no block's ciphertext says two artifacts hold the same KV
    assert not set(first["prefix_hashes"]) & set(plain["prefix_hashes"])  # no plain lookup can find it
    assert not set(first["prefix_hashes"]) & set(second["prefix_hashes"])


def test_verify_checks_an_encrypted_artifacts_token_ids_with_its_identity(sealed):
    result = run_cli("verify", str(sealed / "e.kv"), "--json", check=True)
    assert json.loads(result.stdout)["token_ids_checked"] is False
    result = run_cli("verify", str(sealed / "e.kv"), "--identity", str(sealed / "edge1.key"), "--json", check=True)
    report = json.loads(result.stdout)
    assert report["ok"] and report["token_ids_checked"] and report["encrypted_for"]


def test_a_blob_from_another_encryption_of_the_same_context_does_not_decrypt(sealed, tiny_qwen, tmp_path):
    """A forged manifest listing the other artifact's token blob: its digest is right, its key is not."""
    forged = tmp_path / "forged.kv"
    shutil.copytree(sealed / "e.kv", forged)
    (forged / "signatures.json").unlink()
    ours, theirs = manifest(forged), manifest(sealed / "e2.kv")
    ours["tokens"] = theirs["tokens"]
    blob = theirs["tokens"]["digest"].removeprefix("sha256:")
    shutil.copy(sealed / "e2.kv" / "blobs" / blob, forged / "blobs" / blob)
    (forged / "manifest.json").write_bytes(canonical_json(ours))
    _, result = decode(tiny_qwen, forged, "--identity", str(sealed / "edge1.key"), check=False)
    assert result.returncode == EXIT_INTEGRITY and "does not decrypt" in result.stderr.decode(), result.stderr


def forged(sealed, tmp_path, change) -> Path:
    """e.kv with its manifest changed by `change` (and so unsigned): the same ciphertext, re-listed."""
    out = tmp_path / "forged.kv"
    shutil.copytree(sealed / "e.kv", out)
    (out / "signatures.json").unlink()
    obj = manifest(out)
    change(obj)
    (out / "manifest.json").write_bytes(canonical_json(obj))
    return out


@pytest.mark.parametrize("change", [
    lambda m: m["blocks"].__setitem__(slice(0, 2), m["blocks"][1::-1]),  # layers 0 and 1 swapped
    lambda m: [layer.__setitem__(slice(0, 2), layer[1::-1]) for layer in m["blocks"]],  # chunks 0 and 1 swapped
    lambda m: m.__setitem__("framing", "raw" if m["framing"] != "raw" else "chat"),  # the header, not a blob
], ids=["layers-swapped", "chunks-swapped", "framing-changed"])
def test_a_manifest_that_moves_sealed_blobs_or_changes_their_header_does_not_decrypt(sealed, tiny_qwen, tmp_path, change):
    path = forged(sealed, tmp_path, change)
    _, result = decode(tiny_qwen, path, "--identity", str(sealed / "edge1.key"), check=False)
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == EXIT_INTEGRITY and len(lines) == 1 and "does not decrypt" in lines[0], result.stderr
    verified = run_cli("verify", str(path), "--identity", str(sealed / "edge1.key"), "--json")
    assert verified.returncode == EXIT_INTEGRITY and not json.loads(verified.stdout)["ok"]


def test_a_low_order_ephemeral_key_is_one_line_and_exit_3(sealed, tiny_qwen, tmp_path):
    path = forged(sealed, tmp_path, lambda m: m["encryption"]["recipients"][0].__setitem__("ephemeral", "A" * 43 + "="))
    _, result = decode(tiny_qwen, path, "--identity", str(sealed / "edge1.key"), check=False)
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == EXIT_INTEGRITY and len(lines) == 1 and "does not open" in lines[0], result.stderr


def test_compress_keeps_a_context_encrypted(sealed, tiny_qwen, tmp_path):
    refused = run_cli("compress", str(sealed / "e.kv"), "-o", str(tmp_path / "clear.kv"), "--codec", "lossless",
                      "--identity", str(sealed / "edge1.key"))
    assert refused.returncode == EXIT_USAGE and "--encrypt-to" in refused.stderr.decode()
    assert not (tmp_path / "clear.kv").exists()
    run_cli("compress", str(sealed / "e.kv"), "-o", str(tmp_path / "small.kv"), "--codec", "lossless",
            "--identity", str(sealed / "edge1.key"), "--encrypt-to", str(sealed / "edge2.pub"), check=True)
    plain, _ = decode(tiny_qwen, sealed / "plain.kv")
    opened, _ = decode(tiny_qwen, tmp_path / "small.kv", "--identity", str(sealed / "edge2.key"))
    assert opened["text"] == plain["text"]


def test_an_encrypted_tar_stream_decodes_from_stdin(sealed, tiny_qwen):
    stream = run_cli("prefill", "-m", str(tiny_qwen), "-c", str(sealed / "ctx.txt"), "--chunk-size", "64", "-o", "-",
                     "--encrypt-to", str(sealed / "edge1.pub"), check=True).stdout
    plain, _ = decode(tiny_qwen, sealed / "plain.kv")
    result = run_cli("decode", "-m", str(tiny_qwen), "--kv", "-", "-p", PROMPT, "-n", "8", "--json",
                     "--identity", str(sealed / "edge1.key"), input=stream, check=True)
    assert json.loads(result.stdout)["text"] == plain["text"]


def test_score_reads_an_encrypted_artifact_with_its_identity(sealed, tiny_qwen, tmp_path):
    (tmp_path / "next.txt").write_text("def main():\n    return greet('x')\n")
    common = ["score", "-m", str(tiny_qwen), "--continuation", str(tmp_path / "next.txt"), "--json"]
    plain = json.loads(run_cli(*common, "--kv", str(sealed / "plain.kv"), check=True).stdout)
    opened = json.loads(run_cli(*common, "--kv", str(sealed / "e.kv"), "--identity", str(sealed / "edge1.key"),
                                check=True).stdout)
    assert opened["nll"] == plain["nll"] and opened["tokens"] == plain["tokens"]
    refused = run_cli(*common, "--kv", str(sealed / "e.kv"))
    assert refused.returncode == EXIT_USAGE and b"--identity" in refused.stderr
