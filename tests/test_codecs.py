"""Codecs: round-trip error bounds, bit-exact lossless stages, integrity, and tokens after int8."""

from __future__ import annotations

import json

import pytest
import torch

from celslm import prompting
from celslm import blockread, blocks
from celslm.artifact import DirectoryReader, MemoryReader, open_artifact, write_dir
from celslm.blocks import quantize, recode
from celslm.codecs import PRESETS, BlockShape, parse_codec
from celslm.decode import Sampling, context_from_artifact, generate
from celslm.errors import EXIT_INTEGRITY, EXIT_USAGE, IntegrityError, UsageError
from celslm.models import load_model
from celslm.prefill import prefill
from tests.conftest import CONTEXT, run_cli

WHERE = BlockShape(start=0, tokens=96, total=96)


def roundtrip(spec: str, key: torch.Tensor, value: torch.Tensor, where: BlockShape = WHERE):
    codec = parse_codec(spec)
    aux = blocks.fit_layer(codec, key, value)
    data = blocks.encode_block(codec, key, value, blocks.load_layer(aux), where)
    decoded = blockread.decode_block(codec, data, codec.media_type, blockread.load_bases(aux), tuple(key.shape))
    return tuple(torch.from_numpy(x) for x in decoded), data


@pytest.fixture()
def kv():
    torch.manual_seed(0)
    return torch.randn(2, 96, 32) * 3, torch.randn(2, 96, 32)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("kind", ["key", "value"])
def test_quantization_error_is_within_half_a_step(bits, kind, kv):
    """Keys are quantized per channel (groups along tokens), values per token (groups along channels)."""
    key, value = kv
    original = key if kind == "key" else value
    parts = quantize(original, bits, 32, along_tokens=(kind == "key"))
    decoded = dict(zip(("key", "value"), roundtrip(f"int{bits}:g=32", key, value)[0]))[kind]
    # every element is within half its group's quantization step (plus fp16 rounding of scale and zero)
    step = parts["scale"].float().max().item()
    assert (decoded - original).abs().max().item() <= 0.5 * step + 1e-2 * original.abs().max().item()


def test_fewer_bits_cost_fewer_bytes_and_more_error():
    torch.manual_seed(1)
    key, value = torch.randn(2, 256, 64), torch.randn(2, 256, 64)
    where = BlockShape(start=0, tokens=256, total=256)
    errors, sizes = [], []
    for bits in (8, 4, 3, 2):
        (k2, v2), data = roundtrip(f"int{bits}:g=64", key, value, where)
        errors.append(((k2 - key).pow(2).mean() + (v2 - value).pow(2).mean()).item())
        sizes.append(len(data))
    assert sizes == sorted(sizes, reverse=True) and errors == sorted(errors)
    fp16 = 2 * key.numel() * 2
    assert sizes[1] < 0.29 * fp16 and sizes[3] < 0.17 * fp16  # 4 (2) bits + fp16 scale and zero per 64


@pytest.mark.parametrize("spec", ["lz4", "zstd", "none", "lossless"])
def test_lossless_stages_are_bit_exact(spec, kv):
    (key, value), _ = roundtrip(spec, *kv)
    assert torch.equal(key, kv[0]) and torch.equal(value, kv[1])
    assert parse_codec(spec).lossless


def test_lz4_frames_carry_a_content_checksum(kv):
    _, data = roundtrip("int8+lz4", *kv)
    assert data[:4] == b"\x04\x22\x4d\x18" and data[4] & 0x04  # lz4 frame magic, content-checksum flag


def test_sink_and_keep_tokens_stay_fp16(kv):
    key, value = kv
    where = BlockShape(start=0, tokens=96, total=96)
    (k2, v2), _ = roundtrip("int2:sink=3,keep=5", key, value, where)
    assert torch.equal(k2[:, :3], key[:, :3].half().float()) and torch.equal(v2[:, -5:], value[:, -5:].half().float())
    assert not torch.equal(k2[:, 10:20], key[:, 10:20].half().float())  # the body is quantized


def test_full_rank_pca_reconstructs(kv):
    (key, value), _ = roundtrip("pca:r=32", *kv)
    assert torch.allclose(key, kv[0], atol=5e-2) and torch.allclose(value, kv[1], atol=2e-2)
    (key, _), data = roundtrip("pca:r=8,on=k+int8", *kv)
    assert (key - kv[0]).pow(2).mean() > 1e-3  # rank 8 of 32 loses something on random data


@pytest.mark.parametrize("spec,message", [
    ("int5", "unknown codec stage"), ("int4:q=3", "bad option"), ("lz4+int4", "must run"),
    ("int4+int8", "at most once"), ("pca+int4", "exactly one of r"), ("int4:g=0", "out of range"),
])
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_codec(spec)


def test_presets_parse_to_specs():
    for name, spec in PRESETS.items():
        assert parse_codec(name).spec == parse_codec(spec).spec
    assert parse_codec("lossless").lossless and not parse_codec("balanced").lossless


@pytest.fixture(scope="module")
def tiny(tiny_qwen):
    loaded = load_model(str(tiny_qwen))
    ids = prompting.context_ids(loaded.tokenizer, CONTEXT * 2, "chat")
    return loaded, ids, prefill(loaded, ids, framing="chat", chunk_size=64)


def greedy(loaded, reader, prompt="What does greet return?", n=16):
    ctx = context_from_artifact(loaded, reader)
    return list(generate(loaded, ctx, prompting.prompt_ids(loaded.tokenizer, prompt, ctx.framing, False),
                         Sampling(max_new_tokens=n)))


def test_int8_artifact_decodes_to_the_same_greedy_tokens(tiny):
    loaded, _, artifact = tiny
    compressed = recode(MemoryReader(artifact), parse_codec("int8+lz4"))
    assert compressed.manifest.codec == "int8+lz4"
    assert compressed.manifest.blob_bytes() < 0.4 * artifact.manifest.blob_bytes()
    assert greedy(loaded, MemoryReader(compressed)) == greedy(loaded, MemoryReader(artifact))


def test_pca_bases_are_stored_once_per_layer_and_stream_in_order(tiny, tmp_path):
    loaded, _, artifact = tiny
    compressed = recode(MemoryReader(artifact), parse_codec("pca:r=12+int8"))
    m = compressed.manifest
    assert len(m.bases) == m.layers and all(b is not None for b in m.bases)
    write_dir(compressed, tmp_path / "p.kv")
    reader = DirectoryReader(tmp_path / "p.kv")
    assert reader.id == compressed.id and reader.problems() == []
    order = [ref.digest for ref in m.blob_refs()]
    assert order.index(m.bases[1].digest) == order.index(m.blocks[0][-1].digest) + 1
    assert len(greedy(loaded, reader, n=4)) == 4


def test_corrupt_compressed_block_is_refused_by_digest(tiny, tmp_path):
    loaded, _, artifact = tiny
    write_dir(recode(MemoryReader(artifact), parse_codec("int4+lz4")), tmp_path / "c.kv")
    ref = DirectoryReader(tmp_path / "c.kv").manifest.blocks[2][1]
    path = tmp_path / "c.kv" / "blobs" / ref.hex
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=rf"{ref.digest} \(layer 2, chunk 1\) is corrupt"):
        context_from_artifact(loaded, open_artifact(str(tmp_path / "c.kv")))


def test_a_lossy_artifact_is_not_compressed_again(tiny):
    _, _, artifact = tiny
    lossy = recode(MemoryReader(artifact), parse_codec("int4"))
    with pytest.raises(UsageError, match="losses would compound"):
        recode(MemoryReader(lossy), parse_codec("int8"))
    lossless = recode(MemoryReader(artifact), parse_codec("lz4"))
    assert recode(MemoryReader(lossless), parse_codec("int8")).manifest.codec == "int8"


def test_compress_score_and_inspect_from_the_command_line(tiny_qwen, tmp_path):
    model = str(tiny_qwen)
    (tmp_path / "ctx.txt").write_text(CONTEXT)
    (tmp_path / "next.txt").write_text("\n    def reset(self):\n        self.count = 0\n")
    run_cli("prefill", "-m", model, "-c", str(tmp_path / "ctx.txt"), "-o", str(tmp_path / "a.kv"), "--raw", check=True)
    summary = json.loads(run_cli("compress", str(tmp_path / "a.kv"), "-o", str(tmp_path / "b.kv"), "--codec", "int8+lz4",
                                 "--json", check=True).stdout)
    assert summary["codec"] == "int8+lz4" and summary["ratio"] > 3
    info = json.loads(run_cli("inspect", str(tmp_path / "b.kv"), "--json", check=True).stdout)
    token_blob = json.loads((tmp_path / "b.kv" / "manifest.json").read_text())["tokens"]["size"]
    assert info["codec"] == "int8+lz4" and info["bytes"] == sum(info["bytes_per_layer"]) + token_blob

    base = json.loads(run_cli("score", "-m", model, "--kv", str(tmp_path / "a.kv"), "--continuation",
                              str(tmp_path / "next.txt"), "--json", check=True).stdout)
    same = json.loads(run_cli("score", "-m", model, "--kv", str(tmp_path / "a.kv"), "--ref", str(tmp_path / "a.kv"),
                              "--continuation", str(tmp_path / "next.txt"), "--json", check=True).stdout)
    int8 = json.loads(run_cli("score", "-m", model, "--kv", str(tmp_path / "b.kv"), "--ref", str(tmp_path / "a.kv"),
                              "--continuation", str(tmp_path / "next.txt"), "--json", check=True).stdout)
    alone = json.loads(run_cli("score", "-m", model, "--continuation", str(tmp_path / "next.txt"), "--json",
                               check=True).stdout)
    assert base["tokens"] == same["tokens"] == int8["tokens"] == len("\n    def reset(self):\n        self.count = 0\n")
    assert same["top1_agreement"] == 1.0 and same["nll"] == base["nll"]
    assert abs(int8["nll"] - base["nll"]) < 0.01 and int8["top1_agreement"] > 0.9
    assert alone["tokens"] == base["tokens"] - 1 and alone["nll"] != base["nll"]

    again = run_cli("compress", str(tmp_path / "b.kv"), "-o", str(tmp_path / "c.kv"), "--codec", "int4")
    assert again.returncode == EXIT_USAGE and b"losses would compound" in again.stderr
    assert not (tmp_path / "c.kv").exists()


def test_compress_stream_form_and_corrupt_stream(tiny_qwen, tmp_path):
    model = str(tiny_qwen)
    (tmp_path / "ctx.txt").write_text(CONTEXT)
    stream = run_cli("prefill", "-m", model, "-c", str(tmp_path / "ctx.txt"), "-o", "-", check=True).stdout
    packed = run_cli("compress", "-", "-o", "-", "--codec", "int4:g=32+zstd", input=stream, check=True).stdout
    assert len(packed) < len(stream) / 3
    out = json.loads(run_cli("decode", "-m", model, "--kv", "-", "-p", "hi", "-n", "4", "--json", input=packed,
                             check=True).stdout)
    assert out["new_tokens"] == 4
    verify = run_cli("verify", "-", input=packed[: len(packed) // 2])
    assert verify.returncode == EXIT_INTEGRITY


def test_compress_list_names_every_stage():
    listing = json.loads(run_cli("compress", "--list", "--json", check=True).stdout)
    assert set(listing["stages"]) == {"fp16", "pca", "int8", "int4", "int3", "int2", "tc", "lz4", "zstd"}
    assert set(listing["presets"]) == {"lossless", "balanced", "small", "tiny"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_uncompressed_blocks_hold_exactly_the_stored_dtype(kv, dtype):
    key, value = kv
    codec = parse_codec("none")
    data = blocks.encode_block(codec, key, value, {}, WHERE, dtype)
    decoded = blockread.decode_block(codec, data, codec.media_type, {}, tuple(key.shape))
    for original, back in zip((key, value), decoded):
        assert torch.equal(torch.from_numpy(back), original.to(dtype).float())
