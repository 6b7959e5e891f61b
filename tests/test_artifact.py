"""The KV artifact (celslm.kv/2): content addressing, pre-RoPE keys, both forms, integrity on every read,
blob roles that seal as they always did."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import rotate_half

from celslm import kvcache, prompting
from celslm.artifact import MANIFEST_NAME, DirectoryReader, TarStreamReader, open_artifact, write_dir, write_tar
from celslm.blockread import open_context
from celslm.codecs import MEDIA_BASIS, MEDIA_BLOCK
from celslm.confidential import BLOB_AAD, Identity, Sealed
from celslm.decode import context_from_artifact
from celslm.errors import IntegrityError, UsageError
from celslm.manifest import (CODEBOOK, TOKENS, Artifact, BlobRef, BlobRole, Geometry, Manifest, ModelSpace, Producer,
                             prefix_hashes, sha256_digest)
from celslm.models import load_model
from celslm.prefill import prefill
from celslm.sealing import BlobKeys
from celslm.tokenblob import MEDIA_TOKENS, decode_tokens, encode_tokens
from tests.conftest import CONTEXT


@pytest.fixture(scope="module")
def loaded(tiny_qwen):
    return load_model(str(tiny_qwen))


@pytest.fixture()
def artifact(loaded):
    ids = prompting.context_ids(loaded.tokenizer, CONTEXT, "chat")
    return prefill(loaded, ids, framing="chat", chunk_size=32)


def test_artifact_id_is_sha256_of_manifest_bytes_on_disk(artifact, tmp_path):
    write_dir(artifact, tmp_path / "a.kv")
    data = (tmp_path / "a.kv" / MANIFEST_NAME).read_bytes()
    assert artifact.id == "sha256:" + hashlib.sha256(data).hexdigest()
    assert DirectoryReader(tmp_path / "a.kv").id == artifact.id


def test_blobs_are_named_by_their_digest_and_laid_out_layer_major(artifact, tmp_path):
    write_dir(artifact, tmp_path / "a.kv")
    m = artifact.manifest
    assert m.layers == 3 and m.chunks == -(-m.token_count // 32)
    for ref in m.blob_refs():
        data = (tmp_path / "a.kv" / "blobs" / ref.hex).read_bytes()
        assert hashlib.sha256(data).hexdigest() == ref.hex and len(data) == ref.size
    on_disk = json.loads((tmp_path / "a.kv" / MANIFEST_NAME).read_bytes())
    assert len(on_disk["blocks"]) == m.layers and all(len(layer) == m.chunks for layer in on_disk["blocks"])
    assert on_disk["provenance"] == ["native"] * 3 and on_disk["keys"] == "pre-rope"


def test_keys_are_stored_pre_rope_as_k_proj_computes_them(loaded, artifact, tmp_path):
    write_dir(artifact, tmp_path / "a.kv")
    token_ids, layers = open_context(DirectoryReader(tmp_path / "a.kv"))
    key0 = torch.from_numpy(next(layers)[1])  # [H, T, D]
    model = loaded.model
    with torch.inference_mode():
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor([token_ids])))
        k_proj = model.model.layers[0].self_attn.k_proj(hidden)[0]  # [T, H*D]
    expected = k_proj.view(len(token_ids), key0.shape[0], key0.shape[2]).transpose(0, 1)
    assert torch.allclose(key0, expected, atol=1e-5)


def test_rope_round_trip_restores_post_rope_keys(loaded):
    key = torch.randn(2, 40, 16)
    cos, sin = kvcache.rope_tables(loaded.model, 0, 40)
    assert torch.allclose(kvcache.unapply_rope(kvcache.apply_rope(key, cos, sin), cos, sin), key, atol=1e-6)


def test_apply_rope_is_the_models_own_formula_bit_for_bit(loaded):
    key = torch.randn(2, 40, 16) * 30
    cos, sin = kvcache.rope_tables(loaded.model, 0, 40)
    assert torch.equal(kvcache.apply_rope(key, cos, sin), key * cos + rotate_half(key) * sin)


def test_tar_stream_round_trip_gives_the_same_artifact(artifact, tmp_path):
    write_dir(artifact, tmp_path / "a.kv")
    buffer = io.BytesIO()
    write_tar(artifact, buffer)
    reader = TarStreamReader(io.BytesIO(buffer.getvalue()), "<test>")
    assert reader.id == artifact.id
    tar_ids, tar_layers = open_context(reader)
    dir_ids, dir_layers = open_context(DirectoryReader(tmp_path / "a.kv"))
    assert tar_ids == dir_ids
    for (_, k1, v1), (_, k2, v2) in zip(tar_layers, dir_layers):
        assert np.array_equal(k1, k2) and np.array_equal(v1, v2)


def test_truncated_stream_is_refused(artifact):
    buffer = io.BytesIO()
    write_tar(artifact, buffer)
    cut = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    reader = TarStreamReader(io.BytesIO(cut), "<test>")
    token_ids, layers = open_context(reader)
    with pytest.raises(IntegrityError, match="truncated"):
        list(layers)


def test_corrupt_block_is_named_on_read(loaded, artifact, tmp_path):
    write_dir(artifact, tmp_path / "a.kv")
    ref = artifact.manifest.blocks[1][2]
    path = tmp_path / "a.kv" / "blobs" / ref.hex
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=rf"{ref.digest} \(layer 1, chunk 2\) is corrupt"):
        context_from_artifact(loaded, open_artifact(str(tmp_path / "a.kv")))
    assert len(DirectoryReader(tmp_path / "a.kv").problems()) == 1


def test_missing_block_is_named(artifact, tmp_path):
    write_dir(artifact, tmp_path / "a.kv")
    ref = artifact.manifest.blocks[0][0]
    (tmp_path / "a.kv" / "blobs" / ref.hex).unlink()
    assert DirectoryReader(tmp_path / "a.kv").problems() == [f"block {ref.digest} (layer 0, chunk 0) is missing"]


def test_existing_output_is_left_untouched_without_force(artifact, tmp_path):
    target = tmp_path / "a.kv"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(UsageError):
        write_dir(artifact, target, force=True)  # not an artifact: never replaced
    with pytest.raises(UsageError):
        write_dir(artifact, target)
    assert (target / "keep.txt").read_text() == "mine" and sorted(p.name for p in target.iterdir()) == ["keep.txt"]


def test_failed_write_leaves_nothing_behind(artifact, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = Path.write_bytes

    def failing(self, data):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("disk full")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", failing)
    with pytest.raises(OSError, match="disk full"):
        write_dir(artifact, tmp_path / "a.kv")
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_an_artifact_atomically(loaded, artifact, tmp_path):
    write_dir(artifact, tmp_path / "a.kv")
    other = prefill(loaded, [5, 6, 7, 8, 9], framing="raw", chunk_size=2)
    write_dir(other, tmp_path / "a.kv", force=True)
    assert DirectoryReader(tmp_path / "a.kv").id == other.id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.kv"]


def test_prefix_hashes_chain_over_chunks():
    fp = "ab" * 32
    ids = list(range(100))
    base = prefix_hashes(ids, fp, 32)
    changed = prefix_hashes(ids[:40] + [999] + ids[41:], fp, 32)
    assert len(base) == 4
    assert base[0] == changed[0] and all(a != b for a, b in zip(base[1:], changed[1:]))
    assert prefix_hashes(ids, "cd" * 32, 32)[0] != base[0]  # another model space, another key
    # Stable across processes and machines: a fixed value, not Python's hash().
    assert base[0] == hashlib.sha256(bytes(32) + bytes.fromhex(fp) + b"".join(
        i.to_bytes(4, "little") for i in range(32))).hexdigest()


def test_wrong_schema_is_refused(tmp_path):
    (tmp_path / "x.kv").mkdir()
    (tmp_path / "x.kv" / MANIFEST_NAME).write_text(json.dumps({"schema": "other/1"}))
    with pytest.raises(UsageError, match="not a celslm KV artifact"):
        open_artifact(str(tmp_path / "x.kv"))


# A tiny context made by hand, and the same sealed by celslm before blob roles were a type (once, by a
# script over that commit's code, with its recipient's key beside it): ids pinned from that code.
SEALED_BEFORE = Path(__file__).parent / "data" / "sealed_v2"
SEALED_BEFORE_ID = "sha256:35e8095740b9701b183c75c573311a793ce4eea81e0ec79f607419ae6aa83093"
PLAIN_BEFORE_ID = "sha256:5c1fb4521d3cdbb0034067339631598a66cc4fbc3b159f597b7cbc8e858cd06f"


def hand_made_context() -> Artifact:
    """Token ids 11..15 in chunks of 2, two layers each with a basis; every blob but the token ids holds
    its role's name."""
    blobs = {}

    def add(data: bytes, media_type: str) -> BlobRef:
        blobs[sha256_digest(data)] = data
        return BlobRef(sha256_digest(data), len(data), media_type)

    ids, space = [11, 12, 13, 14, 15], ModelSpace("tiny", "ab" * 32)
    manifest = Manifest(
        space=space, producer=Producer.native(space), token_count=len(ids), chunk_size=2,
        tokens=add(encode_tokens(ids), MEDIA_TOKENS), prefix_hashes=tuple(prefix_hashes(ids, space.fingerprint, 2)),
        geometry=Geometry(2, 1, 4), dtype="float32", codec="pca:r=2", framing="raw", provenance=("native",) * 2,
        blocks=tuple(tuple(add(f"block {layer} {chunk} plaintext".encode(), MEDIA_BLOCK) for chunk in range(3))
                     for layer in range(2)),
        bases=tuple(add(f"basis {layer} plaintext".encode(), MEDIA_BASIS) for layer in range(2)))
    return Artifact(manifest, blobs)


def test_blob_roles_read_as_the_place_names_blobs_have_always_been_sealed_under():
    manifest = hand_made_context().manifest
    assert [str(role) for _, role in manifest.blob_roles()] == [
        "tokens", "basis 0", "block 0 0", "block 0 1", "block 0 2", "basis 1", "block 1 0", "block 1 1", "block 1 2"]
    keys = BlobKeys(bytes(32), manifest)
    for role, text in ((TOKENS, "tokens"), (CODEBOOK, "codebook"), (BlobRole.basis(3), "basis 3"),
                       (BlobRole.block(2, 17), "block 2 17")):
        assert str(role) == text
        assert keys.aad(role, "application/x") == BLOB_AAD + manifest.header_digest() + f"{text}\napplication/x".encode()


def test_a_manifest_has_the_same_bytes_and_id_as_before_the_split():
    assert hand_made_context().id == PLAIN_BEFORE_ID


def test_an_artifact_sealed_before_blob_roles_were_a_type_still_opens_with_the_same_id():
    plain = hand_made_context()
    identity = Identity.load([SEALED_BEFORE / "edge.key"])
    reader = open_artifact(str(SEALED_BEFORE / "context.tar"), identity=identity)
    assert reader.id == SEALED_BEFORE_ID and reader.manifest.header_digest() == plain.manifest.header_digest()
    opened = [data for _, data in reader.plain_blobs()]
    assert opened == [plain.blobs[ref.digest] for ref in plain.manifest.blob_refs()]
    assert decode_tokens(opened[0]) == [11, 12, 13, 14, 15]
    assert open_artifact(str(SEALED_BEFORE / "context.tar"), identity=identity).problems() == []


def test_a_sealed_artifact_verifies_without_an_identity_but_does_not_open():
    assert open_artifact(str(SEALED_BEFORE / "context.tar")).problems() == []
    with pytest.raises(Sealed):
        next(open_artifact(str(SEALED_BEFORE / "context.tar")).plain_blobs())
