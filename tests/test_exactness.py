"""Decoding from an artifact gives the tokens and logits of one plain pass over context + prompt."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from celslm import prompting
from celslm.artifact import open_artifact, write_dir
from celslm.decode import Sampling, context_from_artifact, generate
from celslm.models import installed_path, is_installed, load_model
from celslm.prefill import prefill
from tests.conftest import CONTEXT, run_cli


@torch.inference_mode()
def reference_greedy(model, ids: list[int], steps: int, stop: set[int]) -> tuple[list[int], list[torch.Tensor]]:
    """No cache at all: a full forward over every token at every step."""
    ids = list(ids)
    tokens, logits = [], []
    for _ in range(steps):
        last = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        logits.append(last)
        token = int(torch.argmax(last))
        tokens.append(token)
        ids.append(token)
        if token in stop:
            break
    return tokens, logits


def decode_from_artifact(loaded, path, prompt: str, steps: int, raw: bool = False):
    ctx = context_from_artifact(loaded, open_artifact(str(path)))
    ids = prompting.prompt_ids(loaded.tokenizer, prompt, ctx.framing, raw)
    logits: list[torch.Tensor] = []
    tokens = list(generate(loaded, ctx, ids, Sampling(max_new_tokens=steps), logits_out=logits))
    return ctx.token_ids + ids, tokens, logits


@pytest.mark.parametrize("arch", ["tiny_qwen", "tiny_llama"])
@pytest.mark.parametrize("chunk_size", [16, 37])  # 16 divides the context below, 37 does not
def test_artifact_decode_matches_one_pass(arch, chunk_size, request, tmp_path):
    loaded = load_model(str(request.getfixturevalue(arch)))
    context = CONTEXT[:144]  # 144 bytes -> with chat framing a length that 16 divides
    ids = prompting.context_ids(loaded.tokenizer, context, "chat")
    if chunk_size == 16:
        ids = ids[: len(ids) // 16 * 16]
    assert (len(ids) % chunk_size == 0) == (chunk_size == 16)
    write_dir(prefill(loaded, ids, framing="chat", chunk_size=chunk_size), tmp_path / "c.kv")

    full_ids, tokens, logits = decode_from_artifact(loaded, tmp_path / "c.kv", "What does greet return?", 12)
    expected, expected_logits = reference_greedy(loaded.model, full_ids, 12, stop={257})

    assert tokens == expected
    for got, want in zip(logits, expected_logits):
        assert torch.max(torch.abs(torch.from_numpy(got) - want)).item() < 1e-4


def test_raw_framing_and_raw_prompt_also_exact(tiny_qwen, tmp_path):
    loaded = load_model(str(tiny_qwen))
    ids = prompting.context_ids(loaded.tokenizer, CONTEXT, "raw")
    write_dir(prefill(loaded, ids, framing="raw", chunk_size=32), tmp_path / "r.kv")
    full_ids, tokens, _ = decode_from_artifact(loaded, tmp_path / "r.kv", "x = greet(", 8, raw=True)
    assert full_ids == ids + loaded.tokenizer("x = greet(", add_special_tokens=False)["input_ids"]
    assert tokens == reference_greedy(loaded.model, full_ids, 8, stop={257})[0]


def test_piped_prefill_into_decode_matches_one_pass(tiny_llama, tmp_path):
    (tmp_path / "ctx.txt").write_text(CONTEXT)
    model = str(tiny_llama)
    stream = run_cli("prefill", "-m", model, "--context", str(tmp_path / "ctx.txt"), "--out", "-",
                     "--chunk-size", "24", check=True).stdout
    out = run_cli("decode", "-m", model, "--kv", "-", "--prompt", "Who counts?", "-n", "10", "--json",
                  input=stream, check=True)
    result = json.loads(out.stdout)

    loaded = load_model(model)
    ids = prompting.context_ids(loaded.tokenizer, CONTEXT, "chat")
    ids += prompting.prompt_ids(loaded.tokenizer, "Who counts?", "chat", raw=False)
    expected, _ = reference_greedy(loaded.model, ids, 10, stop={257})
    assert result["new_tokens"] == len(expected)
    assert result["text"] == loaded.tokenizer.decode([t for t in expected if t != 257], skip_special_tokens=True)
    assert result["context_tokens"] == len(prompting.context_ids(loaded.tokenizer, CONTEXT, "chat"))


def test_edge_only_decode_gives_the_same_text_as_the_artifact(tiny_qwen, tmp_path):
    (tmp_path / "ctx.txt").write_text(CONTEXT)
    model = str(tiny_qwen)
    run_cli("prefill", "-m", model, "-c", str(tmp_path / "ctx.txt"), "-o", str(tmp_path / "a.kv"), check=True)
    from_kv = json.loads(run_cli("decode", "-m", model, "--kv", str(tmp_path / "a.kv"), "-p", "Hi", "-n", "8",
                                 "--json", check=True).stdout)
    edge = json.loads(run_cli("decode", "-m", model, "--context", str(tmp_path / "ctx.txt"), "-p", "Hi", "-n", "8",
                              "--json", check=True).stdout)
    assert from_kv["text"] == edge["text"]
    assert (from_kv["path"], edge["path"]) == ("artifact", "edge-only")


SMOLLM = "smollm2-135m"


@pytest.mark.realmodel
@pytest.mark.skipif(not is_installed(installed_path(SMOLLM)), reason=f"{SMOLLM} not installed (celslm models pull {SMOLLM})")
def test_smollm2_artifact_decode_matches_one_pass(tmp_path):
    loaded = load_model(SMOLLM)
    ids = prompting.context_ids(loaded.tokenizer, CONTEXT * 6, "chat")  # not a multiple of 64
    assert len(ids) % 64
    write_dir(prefill(loaded, ids, framing="chat", chunk_size=64), tmp_path / "s.kv")
    full_ids, tokens, logits = decode_from_artifact(loaded, tmp_path / "s.kv", "What does greet return?", 8)
    expected, expected_logits = reference_greedy(loaded.model, full_ids, 8, stop=set())
    assert tokens == expected
    assert max(torch.max(torch.abs(torch.from_numpy(a) - b)).item() for a, b in zip(logits, expected_logits)) < 1e-4


def test_pipelined_decode_over_a_slow_link_gives_the_same_tokens_and_logits(tiny_qwen, tmp_path):
    from celslm.stream import Link

    loaded = load_model(str(tiny_qwen))
    ids = prompting.context_ids(loaded.tokenizer, CONTEXT * 4, "chat")
    write_dir(prefill(loaded, ids, framing="chat", chunk_size=32), tmp_path / "p.kv")
    prompt = prompting.prompt_ids(loaded.tokenizer, "What does greet return?", "chat", False)
    runs = {}
    for pipeline in (False, True):
        link = Link.parse("20mbit:5ms")  # emulated: slow enough that layers arrive while the prompt runs
        ctx = context_from_artifact(loaded, open_artifact(str(tmp_path / "p.kv")), link=link, pipeline=pipeline)
        logits: list = []
        tokens = list(generate(loaded, ctx, prompt, Sampling(max_new_tokens=10), logits_out=logits))
        runs[pipeline] = (tokens, logits, ctx.stats)
    assert runs[True][0] == runs[False][0]
    assert max(float(np.abs(a - b).max()) for a, b in zip(runs[True][1], runs[False][1])) < 1e-5
    stats = runs[True][2]
    assert stats.pipelined and stats.link.startswith("emulated 20 Mbit/s")
    assert stats.t_comm_s > 0 and stats.hidden_share > 0  # how much is a benchmark figure, not a unit test
    assert stats.ttft_s >= stats.t_comm_s * 0.9  # the last layer cannot be used before it has arrived


def test_bench_latency_reports_every_mode_with_its_split(tiny_qwen):
    from celslm.bench import latency

    loaded = load_model(str(tiny_qwen))
    result = latency.run(loaded, contexts=(96,), links=("1gbit:1ms",), codecs=("fp16",), new_tokens=3)
    modes = [(r["mode"], r["codec"]) for r in result["runs"]]
    assert modes == [("edge-only", None), ("artifact", "fp16"), ("artifact+pipeline", "fp16")]
    for run in result["runs"]:
        assert run["context_tokens"] == 96 and run["new_tokens"] == 3 and 0 < run["ttft_s"] <= run["total_s"]
        assert (run["t_comm_s"] > 0) == (run["mode"] != "edge-only")
        assert (run["link"] or "").startswith("emulated") == (run["mode"] != "edge-only")


def test_a_shorter_context_over_longer_chunks_decodes_as_that_context_alone(tiny_qwen):
    """A context that ends inside the artifact's last reused chunk: the KV past its end is dropped."""
    from celslm.artifact import MemoryReader
    from celslm.decode import context_from_prefix

    loaded = load_model(str(tiny_qwen))
    ids = prompting.context_ids(loaded.tokenizer, CONTEXT * 2, "raw")
    artifact = prefill(loaded, ids, framing="raw", chunk_size=64)
    short = ids[:150]  # chunks 0..2 cover 192 tokens
    ctx = context_from_prefix(loaded, short, "raw", MemoryReader(artifact), chunks=3)
    assert ctx.sequence.length == len(short)
    prompt = prompting.prompt_ids(loaded.tokenizer, "Go on.", "raw", raw=True)
    tokens = list(generate(loaded, ctx, prompt, Sampling(max_new_tokens=6)))
    assert tokens == reference_greedy(loaded.model, short + prompt, 6, stop={257})[0]
