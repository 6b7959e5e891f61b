"""The calibrated transform codec (tc): codebook fit and cache, round trips, and a missing or wrong codebook refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save

from celslm.artifact import DirectoryReader, MemoryReader, open_artifact, write_dir, write_tar
from celslm.blockread import decode_block, open_context
from celslm.blocks import encode_block, recode
from celslm.calibrate import Calibration, allocate, calibrate, codebook_path, read_codebook
from celslm.codebook import Codebook, EntropyModel, Transform, pco_decode, pco_encode
from celslm.codecs import MEDIA_BLOCK, BlockShape, parse_codec
from celslm.confidential import Identity
from celslm.errors import EXIT_INTEGRITY, EXIT_USAGE, IntegrityError, UsageError
from celslm.models import load_model
from celslm.sealing import seal_artifact
from celslm.store.local import LocalStore
from celslm.tensors import read_safetensors
from tests.conftest import run_cli
from tests.netutil import Server

FAST = Calibration(files=2, tokens=96, probe_files=1, probe_tokens=8)


@pytest.fixture(scope="module")
def tiny(tiny_qwen):
    return load_model(str(tiny_qwen))


@pytest.fixture(scope="module")
def codebook(tiny) -> Codebook:
    return calibrate(tiny, FAST)


def exact_layers(reader):
    _, layers = open_context(reader)
    return [(k, v) for _, k, v in layers]


def test_transform_codes_within_half_a_step_per_component():
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    t = Transform(mean=np.zeros(8, np.float32), basis=basis.astype(np.float32), std=np.full(8, 1.0, np.float32),
                  analysis=basis.astype(np.float32), unit=0.5)
    x = rng.standard_normal((2, 40, 4)).astype(np.float32)  # [H, t, D]: 8 channels per token
    codes = t.encode(x, q=1.0)
    assert codes.shape == (8, 40) and codes.dtype == np.int8
    back = t.decode(codes, 1.0, 2, 4)
    # the basis is orthonormal: the coefficient error (at most half a step each) is the channel error's norm
    err = np.linalg.norm((back - x).transpose(1, 0, 2).reshape(40, 8), axis=1)
    assert err.max() <= 0.5 * 0.5 * np.sqrt(8) + 1e-5


def test_components_under_the_drop_threshold_are_not_coded():
    std = np.array([4.0, 2.0, 1.0, 0.1], np.float32)
    t = Transform(mean=np.zeros(4, np.float32), basis=np.eye(4, dtype=np.float32), std=std,
                  analysis=np.eye(4, dtype=np.float32), unit=1.0)
    assert t.kept(1.0) == 3 and t.kept(8.0) == 2 and t.kept(100.0) == 0
    assert t.encode(np.ones((1, 5, 4), np.float32), 8.0).shape == (2, 5)


def test_ans_round_trip_is_exact_with_escapes():
    entropy = EntropyModel.gaussian()
    rng = np.random.default_rng(1)
    spreads = np.array([40.0, 3.0, 1.0, 0.3, 3.0], np.float32)
    codes = np.rint(rng.standard_normal((5, 50)) * spreads[:, None]).astype(np.int32)
    codes[2, 7], codes[3, 0], codes[0, 1] = 90, -5000, 127  # far past their classes' alphabets: escapes
    words, escapes = entropy.encode(codes, entropy.classes(spreads))
    assert len(escapes) >= 2 and words.dtype == np.uint32
    assert np.array_equal(entropy.decode(words, escapes, entropy.classes(spreads), 50), codes)
    with pytest.raises(ValueError, match="escaped codes"):
        entropy.decode(words, escapes[:-1], entropy.classes(spreads), 50)


def test_pcodec_round_trip_is_exact_and_sized_by_the_codebook():
    rng = np.random.default_rng(2)
    spreads = np.array([40.0, 3.0, 2.5, 0.3, 3.0, 1.0], np.float32)  # octaves 5, 1, 1, -2, 1, 0
    codes = np.rint(rng.standard_normal((6, 50)) * spreads[:, None]).astype(np.int32)
    codes[3, 0] = -5000
    chunks = pco_encode(codes, spreads)
    assert len(chunks) == 4 and all(c.dtype == np.uint8 for c in chunks)
    assert np.array_equal(pco_decode(chunks, spreads, 50), codes)
    with pytest.raises(ValueError, match="holds more codes"):  # the chunks say more tokens than the manifest
        pco_decode(chunks, spreads, 49)
    with pytest.raises(ValueError, match="holds 50 codes, expected 51"):
        pco_decode(chunks, spreads, 51)
    with pytest.raises(ValueError, match="3 pcodec chunks"):
        pco_decode(chunks[:3], spreads, 50)


def test_ans_codes_gaussian_components_near_their_entropy():
    """A class's table must match its spread: a component coded in the wrong class costs far more."""
    entropy = EntropyModel.gaussian()
    rng = np.random.default_rng(2)
    spreads = np.array([0.4, 0.8, 1.5, 3.0, 9.0], np.float32)
    codes = np.rint(rng.standard_normal((5, 4000)) * spreads[:, None]).astype(np.int32)
    words, _ = entropy.encode(codes, entropy.classes(spreads))
    ideal = 0.0
    for row in codes:
        _, counts = np.unique(row, return_counts=True)
        ideal -= (counts * np.log2(counts / counts.sum())).sum()
    assert words.size * 32 <= 1.05 * ideal + 64
    shifted, _ = entropy.encode(codes, np.minimum(entropy.classes(spreads) + 8, len(entropy.sizes) - 1))
    assert shifted.size > 1.1 * words.size


def test_allocation_gives_a_more_sensitive_tensor_a_finer_step():
    rms = np.ones((3, 2))
    sensitivity = np.array([[1.0, 1.0], [4.0, 1.0], [1.0, 0.25]])
    units = allocate(rms, sensitivity)
    assert units[1, 0] == pytest.approx(units[0, 0] / 2)  # 4x the error per step^2: half the step
    assert units[2, 1] == pytest.approx(units[0, 0] * 2)
    assert allocate(rms, np.array([[1.0, 1e9], [1.0, 1.0], [1.0, 1.0]]))[0, 1] == pytest.approx(1 / 4)  # clipped at 4x finer


def test_codebook_round_trips_through_its_bytes(codebook, tiny):
    again = Codebook.from_bytes(codebook.to_bytes())
    assert again.digest == codebook.digest and again.fingerprint == tiny.fingerprint
    assert again.calibration["files_used"] and len(again.calibration["sensitivity_kl"]) == codebook.geometry[0]
    for pair, other in zip(codebook.transforms, again.transforms):
        for a, b in zip(pair, other):
            assert np.array_equal(a.basis, b.basis) and a.unit == pytest.approx(b.unit)


def test_a_codebook_fits_the_size_a_manifest_may_declare_for_its_geometry():
    from celslm.manifest import Geometry, codebook_bound

    layers, heads, width = 3, 4, 128  # F = 512: the matrices dwarf the slack
    rng = np.random.default_rng(3)
    pair = tuple(Transform(mean=np.zeros(512, np.float32), basis=rng.standard_normal((512, 512)).astype(np.float32),
                           std=np.sort(rng.random(512).astype(np.float32))[::-1].copy(),
                           analysis=rng.standard_normal((512, 512)).astype(np.float32), unit=1.0) for _ in range(2))
    size = len(Codebook("m", "0" * 64, (layers, heads, width), (pair,) * layers, {}).to_bytes())
    bound = codebook_bound(Geometry(layers, heads, width))
    assert size <= bound < size + (1 << 20) + (1 << 16)


def test_corrupt_codebook_bytes_are_an_integrity_error(codebook):
    data = bytearray(codebook.to_bytes())
    data[-40:] = b"\xff" * 40  # NaNs in the last tensor
    with pytest.raises(IntegrityError, match="codebook does not decode"):
        Codebook.from_bytes(bytes(data))
    with pytest.raises(UsageError, match="not a celslm codebook"):
        Codebook.from_bytes(codebook.to_bytes().replace(b"celslm.codebook/1", b"celslm.codebook/9"))


def test_tc_artifact_decodes_close_with_sinks_exact(prefilled, codebook):
    reader = DirectoryReader(prefilled / "a.kv")
    exact = exact_layers(reader)
    coded = recode(reader, parse_codec("tc:q=0.5+zstd"), codebook)
    assert coded.manifest.codebook.digest == codebook.digest
    assert coded.blobs[codebook.digest] == codebook.to_bytes()
    for (k, v), (k2, v2), pair in zip(exact, exact_layers(MemoryReader(coded)), codebook.transforms):
        assert np.array_equal(k2[:, :4], k[:, :4].astype(np.float16).astype(np.float32))
        for a, b, t in ((k, k2, pair[0]), (v, v2, pair[1])):
            kept = t.kept(0.5)
            assert kept > 0
            # every coded component within half a step (plus the float16 basis's rounding)
            coeffs = [t.analysis[:, :kept].T @ (x[:, 4:].transpose(0, 2, 1).reshape(-1, x.shape[1] - 4) - t.mean[:, None])
                      for x in (a, b)]
            assert np.abs(coeffs[1] - coeffs[0]).max() <= 0.5 * t.step(0.5) + 0.01 * np.abs(coeffs[0]).max()
    assert coded.manifest.shipped_bytes() < reader.manifest.shipped_bytes() / 3


def test_pcodec_and_ans_blocks_hold_the_same_codes(prefilled, codebook):
    reader = DirectoryReader(prefilled / "a.kv")
    ans, pco = (recode(reader, parse_codec(f"tc:q=0.5,ent={ent}"), codebook) for ent in ("ans", "pco"))
    for (k, v), (k2, v2) in zip(exact_layers(MemoryReader(ans)), exact_layers(MemoryReader(pco))):
        assert np.array_equal(k, k2) and np.array_equal(v, v2)
    names = read_safetensors(next(b for r, b in MemoryReader(pco).plain_blobs() if r.media_type.startswith(MEDIA_BLOCK)))
    assert any(n.startswith("pco.") for n in names) and "ans" not in names


def test_coarser_q_is_smaller_and_lossier(prefilled, codebook):
    reader = DirectoryReader(prefilled / "a.kv")
    exact = exact_layers(reader)
    sizes, errors = [], []
    for q in (0.5, 2.0):
        coded = recode(reader, parse_codec(f"tc:q={q}+zstd"), codebook)
        sizes.append(coded.manifest.shipped_bytes())
        errors.append(sum(np.abs(k2 - k).mean() for (k, _), (k2, _) in zip(exact, exact_layers(MemoryReader(coded)))))
    assert sizes[1] < sizes[0] and errors[1] > errors[0]


def test_a_tc_codec_without_a_codebook_is_refused(prefilled):
    with pytest.raises(UsageError, match="needs the model's codebook"):
        recode(DirectoryReader(prefilled / "a.kv"), parse_codec("tc"))


def test_codebook_of_another_model_is_refused_at_encode(prefilled, tiny_llama):
    other = calibrate(load_model(str(tiny_llama)), FAST)
    with pytest.raises(IntegrityError, match="does not belong to this model space"):
        recode(DirectoryReader(prefilled / "a.kv"), parse_codec("tc"), other)


def test_tc_and_pca_do_not_combine():
    with pytest.raises(UsageError, match="drop the pca stage"):
        parse_codec("pca:r=4+tc")
    with pytest.raises(UsageError, match="out of range"):
        parse_codec("tc:q=0")


@pytest.fixture()
def coded_dir(prefilled, codebook, tmp_path):
    path = tmp_path / "tc.kv"
    write_dir(recode(DirectoryReader(prefilled / "a.kv"), parse_codec("tc"), codebook), path)
    return path


def test_missing_codebook_blob_is_an_integrity_error(coded_dir, tiny_qwen):
    manifest = DirectoryReader(coded_dir).manifest
    (coded_dir / "blobs" / manifest.codebook.hex).unlink()
    result = run_cli("decode", "-m", str(tiny_qwen), "--kv", str(coded_dir), "-p", "hi", "-n", "2")
    assert result.returncode == EXIT_INTEGRITY and b"codebook blob" in result.stderr and b"missing" in result.stderr
    assert b"Traceback" not in result.stderr


def test_swapped_codebook_bytes_fail_their_digest(coded_dir, tiny_qwen, tiny_llama):
    manifest = DirectoryReader(coded_dir).manifest
    other = calibrate(load_model(str(tiny_llama)), FAST)
    (coded_dir / "blobs" / manifest.codebook.hex).write_bytes(other.to_bytes())
    result = run_cli("decode", "-m", str(tiny_qwen), "--kv", str(coded_dir), "-p", "hi", "-n", "2")
    assert result.returncode == EXIT_INTEGRITY and b"codebook blob" in result.stderr and b"corrupt" in result.stderr


def test_a_codebook_parsed_once_is_still_read_and_verified_for_every_artifact(coded_dir, tiny_llama):
    """The parsed codebook is kept by digest (a warm service switching contexts parses it once), yet each
    artifact's codebook blob is read and checked: swapped bytes fail their digest even when that digest
    was parsed before."""
    from celslm import blockread

    def parsed():
        reader = DirectoryReader(coded_dir)
        blobs = reader.plain_blobs()
        next(blobs)  # the token ids
        return blockread.load_codebook(reader, blobs)

    blockread.keep_codebooks(0)  # as a process decoding one artifact (a service in this process keeps some)
    assert parsed() is not parsed()
    blockread.keep_codebooks(2)
    try:
        assert parsed() is parsed()
    finally:
        blockread.keep_codebooks(0)
    reader = DirectoryReader(coded_dir)
    other = calibrate(load_model(str(tiny_llama)), FAST)
    (coded_dir / "blobs" / reader.manifest.codebook.hex).write_bytes(other.to_bytes())
    with pytest.raises(IntegrityError, match="corrupt"):
        exact_layers(DirectoryReader(coded_dir))


def test_a_forged_manifest_naming_another_models_codebook_is_refused(prefilled, codebook, tiny_llama):
    """Digests all match (the blob is what the manifest names) but the codebook is another model's."""
    coded = recode(DirectoryReader(prefilled / "a.kv"), parse_codec("tc"), codebook)
    other = calibrate(load_model(str(tiny_llama)), FAST)
    data = other.to_bytes()
    ref = type(coded.manifest.codebook)(other.digest, len(data), coded.manifest.codebook.media_type)
    forged = type(coded)(coded.manifest.__class__(**{**coded.manifest.__dict__, "codebook": ref}),
                         {**coded.blobs, other.digest: data})
    with pytest.raises(IntegrityError, match="does not belong to this model space"):
        exact_layers(MemoryReader(forged))


def test_encrypted_tc_artifact_keeps_one_clear_codebook(prefilled, codebook, tmp_path):
    run_cli("keys", "generate", "--out", str(tmp_path / "edge"), "--for", "encryption", check=True)
    identity = Identity.load([tmp_path / "edge.key"])
    coded = recode(DirectoryReader(prefilled / "a.kv"), parse_codec("tc"), codebook)
    sealed = seal_artifact(coded, identity._publics())
    assert sealed.manifest.codebook == coded.manifest.codebook  # the same blob, shared with every artifact
    write_dir(sealed, tmp_path / "sealed.kv")
    reader = open_artifact(str(tmp_path / "sealed.kv"), identity=identity)
    assert reader.problems() == []
    for (k, v), (k2, v2) in zip(exact_layers(MemoryReader(coded)), exact_layers(reader)):
        assert np.array_equal(k, k2) and np.array_equal(v, v2)


def test_compress_calibrates_on_first_use_then_reuses_the_cache(prefilled, tiny_qwen, tmp_path, celslm_home):
    args = ["compress", str(prefilled / "a.kv"), "--codec", "tc:q=1.0+zstd", "--model", str(tiny_qwen), "--json"]
    first = run_cli(*args, "-o", str(tmp_path / "one.kv"), check=True)
    assert b"calibrating the codebook" in first.stderr
    cached = list((celslm_home / "codebooks").glob("*.codebook"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    second = run_cli(*args[:-3], "--json", "-o", str(tmp_path / "two.kv"), check=True)  # no --model: the cache
    assert b"calibrating" not in second.stderr and cached[0].stat().st_mtime_ns == stamp
    one, two = (json.loads(r.stdout) for r in (first, second))
    assert one["id"] == two["id"] and one["codebook"] == read_codebook(cached[0]).digest
    assert one["ratio_vs_fp16"] > 2 and one["codebook_bytes"] > 0


def test_compress_without_a_codebook_or_a_model_says_how(prefilled, tmp_path):
    result = run_cli("compress", str(prefilled / "a.kv"), "--codec", "tc", "-o", str(tmp_path / "x.kv"))
    assert result.returncode == EXIT_USAGE and b"--model" in result.stderr and b"--codebook" in result.stderr
    assert not (tmp_path / "x.kv").exists()


def test_calibrate_command_writes_a_codebook_compress_can_use(prefilled, tiny_qwen, tmp_path, celslm_home):
    out = tmp_path / "tiny.codebook"
    args = ["calibrate", "-m", str(tiny_qwen), "--files", "2", "--tokens", "96", "--probe-files", "1", "--json"]
    summary = json.loads(run_cli(*args, "--out", str(out), check=True).stdout)
    assert summary["fitted"] and read_codebook(out).digest == summary["codebook"]
    again = run_cli(*args, "--out", str(out))
    assert again.returncode == EXIT_USAGE and b"already exists" in again.stderr
    coded = json.loads(run_cli("compress", str(prefilled / "a.kv"), "--codec", "tc", "--codebook", str(out),
                               "-o", str(tmp_path / "c.kv"), "--json", check=True).stdout)
    assert coded["codebook"] == summary["codebook"]
    assert not codebook_path(summary["fingerprint"]).exists()  # --out: the cache is untouched


def test_verify_checks_the_codebook_blob(coded_dir):
    assert run_cli("verify", str(coded_dir)).returncode == 0
    manifest = DirectoryReader(coded_dir).manifest
    path = coded_dir / "blobs" / manifest.codebook.hex
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    result = run_cli("verify", str(coded_dir))
    assert result.returncode == EXIT_INTEGRITY and b"codebook blob" in result.stderr


def test_tc_artifact_decodes_from_a_tar_stream_as_from_its_directory(prefilled, codebook, tiny_qwen, tmp_path):
    coded = recode(DirectoryReader(prefilled / "a.kv"), parse_codec("tc"), codebook)
    write_dir(coded, tmp_path / "tc.kv")
    with (tmp_path / "tc.tar").open("wb") as stream:
        write_tar(coded, stream)
    decoded = [json.loads(run_cli("decode", "-m", str(tiny_qwen), "--kv", str(tmp_path / name), "-p", "hi", "-n", "4",
                                  "--json", check=True).stdout)["text"] for name in ("tc.kv", "tc.tar")]
    assert decoded[0] == decoded[1]


def test_compress_takes_the_codebook_the_cloud_coded_with_instead_of_calibrating(prefilled, codebook, tmp_path):
    write_dir(recode(DirectoryReader(prefilled / "a.kv"), parse_codec("tc:q=2.0"), codebook), tmp_path / "q2.kv")
    cloud = Server(tmp_path / "cloud")
    home = {"CELSLM_HOME": str(tmp_path / "second-cloud")}  # another machine: no codebook cached, no --model
    args = ["compress", str(prefilled / "a.kv"), "--codec", "small", "--json"]
    try:
        assert run_cli(*args, "-o", str(tmp_path / "none.kv"), "--cloud", cloud.url, env=home).returncode == EXIT_USAGE
        run_cli("push", str(tmp_path / "q2.kv"), cloud.url, check=True)
        result = run_cli(*args, "-o", str(tmp_path / "small.kv"), "--cloud", cloud.url, env=home, check=True)
    finally:
        cloud.stop()
    assert json.loads(result.stdout)["codebook"] == codebook.digest and b"fetched the codebook" in result.stderr
    assert b"calibrating" not in result.stderr
    assert read_codebook(tmp_path / "second-cloud" / "codebooks" / f"{codebook.fingerprint}.codebook").digest == codebook.digest


def test_the_codebook_travels_once_through_serve_cache_and_decodes_at_the_edge(prefilled, codebook, tiny_qwen, tmp_path):
    reader = DirectoryReader(prefilled / "a.kv")
    for q in ("1.0", "2.0"):
        write_dir(recode(reader, parse_codec(f"tc:q={q}"), codebook), tmp_path / f"q{q}.kv")
    cloud = Server(tmp_path / "cloud")
    try:
        first = json.loads(run_cli("push", str(tmp_path / "q1.0.kv"), cloud.url, "--json", check=True).stdout)
        second = json.loads(run_cli("push", str(tmp_path / "q2.0.kv"), cloud.url, "--tag", "ctx", "--json",
                                    check=True).stdout)
        blobs = len(DirectoryReader(tmp_path / "q2.0.kv").manifest.blob_refs())
        assert second["blobs_skipped"] == 2 and second["blobs_sent"] == blobs - 2  # the token ids and the codebook
        assert first["bytes_sent"] > second["bytes_sent"] + len(codebook.to_bytes()) // 2
        remote = json.loads(run_cli("decode", "-m", str(tiny_qwen), "--kv", "ctx", "--cloud", cloud.url, "-p", "hi",
                                    "-n", "4", "--json", env={"CELSLM_HOME": str(tmp_path / "edge")}, check=True).stdout)
    finally:
        cloud.stop()
    local = json.loads(run_cli("decode", "-m", str(tiny_qwen), "--kv", str(tmp_path / "q2.0.kv"), "-p", "hi", "-n", "4",
                               "--json", check=True).stdout)
    assert remote["text"] == local["text"] and remote["new_tokens"] == local["new_tokens"]


def test_compress_with_a_missing_or_foreign_codebook_file_is_one_line_and_exit_2(prefilled, tiny_llama, tmp_path):
    args = ["compress", str(prefilled / "a.kv"), "--codec", "small", "-o", str(tmp_path / "x.kv")]
    missing = run_cli(*args, "--codebook", str(tmp_path / "nope.codebook"))
    assert missing.returncode == EXIT_USAGE and b"cannot read codebook" in missing.stderr
    foreign = tmp_path / "llama.codebook"
    run_cli("calibrate", "-m", str(tiny_llama), "--files", "2", "--tokens", "96", "--probe-files", "1", "--out",
            str(foreign), check=True)
    refused = run_cli(*args, "--codebook", str(foreign))
    assert refused.returncode == EXIT_USAGE and b"not for" in refused.stderr
    assert len(refused.stderr.decode().strip().splitlines()) == 1 and not (tmp_path / "x.kv").exists()


def test_bench_task_accuracy_scores_a_lossless_artifact_as_the_uncompressed_one(tiny, codebook):
    from celslm.bench.compress import task_accuracy

    # contexts short enough for the tiny model's 1,024 positions (one byte a token)
    result = task_accuracy(tiny, ("lossless", "tc:q=4.0"), per_kind=1, codebook=codebook, context_chars=700, new_tokens=4)
    rows = {r["codec"]: r for r in result["rows"]}
    assert result["tasks"]["complete"] == 1 and set(rows) == {"none", "lossless", "tc:q=4.0"}
    assert {k: v for k, v in rows["lossless"].items() if k != "codec"} == {k: v for k, v in rows["none"].items() if k != "codec"}
    assert all(0 <= rows["tc:q=4.0"][k] <= 1 for k in ("complete_exact", "complete_edit_similarity"))


def test_tc_window_across_block_boundaries_stays_exact_and_the_rest_within_half_a_step(prefilled, codebook):
    reader = DirectoryReader(prefilled / "a.kv")  # chunks of 64: a 70-token window covers the last block and more
    exact = exact_layers(reader)
    coded = recode(reader, parse_codec("tc:q=0.5,keep=70"), codebook)
    for (k, v), (k2, v2), pair in zip(exact, exact_layers(MemoryReader(coded)), codebook.transforms):
        for a, b, t in ((k, k2, pair[0]), (v, v2, pair[1])):
            fp16 = np.r_[0:4, a.shape[1] - 70 : a.shape[1]]
            assert np.array_equal(b[:, fp16], a[:, fp16].astype(np.float16).astype(np.float32))
            body = slice(4, a.shape[1] - 70)
            kept = t.kept(0.5)
            coeffs = [t.analysis[:, :kept].T @ (x[:, body].transpose(0, 2, 1).reshape(-1, x[:, body].shape[1]) - t.mean[:, None])
                      for x in (a, b)]
            assert np.abs(coeffs[1] - coeffs[0]).max() <= 0.5 * t.step(0.5) + 0.01 * np.abs(coeffs[0]).max()


@pytest.mark.parametrize("forge", ["value sinks shorter than key sinks", "sinks in float32", "sinks longer than the block"])
def test_a_tc_block_with_malformed_fp16_spans_is_an_integrity_error(codebook, tiny, forge):
    heads, width = tiny.engine.geometry.kv_heads, tiny.engine.geometry.head_dim
    codec, bases = parse_codec("tc:q=0.5"), codebook.layer(0)
    key, value = torch.randn(heads, 16, width), torch.randn(heads, 16, width)
    data = encode_block(codec, key, value, bases, BlockShape(start=0, tokens=16, total=16))
    assert decode_block(codec, data, codec.media_type, bases, (heads, 16, width))[0].shape == (heads, 16, width)
    tensors = dict(read_safetensors(data))
    if forge == "value sinks shorter than key sinks":
        tensors["value.head"] = tensors["value.head"][:, :3]
    elif forge == "sinks in float32":
        tensors["key.head"] = tensors["key.head"].astype(np.float32)
    else:
        tensors["key.head"] = tensors["value.head"] = np.zeros((heads, 17, width), np.float16)
    with pytest.raises(IntegrityError):
        decode_block(codec, save({n: np.ascontiguousarray(t) for n, t in tensors.items()}), codec.media_type, bases,
                     (heads, 16, width))


def test_a_tier_naming_another_models_codebook_is_passed_over_for_the_next(prefilled, codebook, tiny_llama, tmp_path):
    foreign = calibrate(load_model(str(tiny_llama)), FAST)
    for root, book in ((tmp_path / "peer", foreign), (tmp_path / "cloud", codebook)):  # both name a codebook for qwen
        store = LocalStore(root)
        store.put_blob(book.digest, book.to_bytes())
        store._write("codebooks", codebook.fingerprint, book.digest.encode())
    peer, cloud = Server(tmp_path / "peer"), Server(tmp_path / "cloud")
    home = {"CELSLM_HOME": str(tmp_path / "home")}
    try:
        result = run_cli("compress", str(prefilled / "a.kv"), "-o", str(tmp_path / "small.kv"), "--codec", "small", "--json",
                         "--peer", peer.url, "--cloud", cloud.url, env=home, check=True)
    finally:
        peer.stop(), cloud.stop()
    assert json.loads(result.stdout)["codebook"] == codebook.digest
    assert b"does not belong to this model space" in result.stderr and b"passed over" in result.stderr


def test_a_prefix_of_a_tc_artifact_decodes_as_the_start_of_the_whole(prefilled, codebook):
    coded = recode(DirectoryReader(prefilled / "a.kv"), parse_codec("tc:q=0.5,keep=70"), codebook)
    whole = exact_layers(MemoryReader(coded))
    chunks = coded.manifest.chunks - 1
    _, layers = open_context(MemoryReader(coded), chunks)
    tokens = sum(coded.manifest.chunk_lengths()[:chunks])
    for (k, v), (_, k2, v2) in zip(whole, layers):
        assert k2.shape[1] == tokens
        assert np.allclose(k2, k[:, :tokens], atol=1e-5) and np.allclose(v2, v[:, :tokens], atol=1e-5)
