"""The llama.cpp engine: its KV state layout (pinned), keys placed as llama.cpp rotates them (NORM and
NEOX), artifacts both ways between engines, exact decoding of its own artifacts, and a tokenizer
that matches transformers'."""

from __future__ import annotations

import json
import shutil
import subprocess

from pathlib import Path

import numpy as np
import pytest

from celslm import llamastate
from celslm.errors import CelslmError, IntegrityError
from celslm.models import load_model, resolve_model
from tests.conftest import CONTEXT, run_cli
from tests.tiny import save_tiny_gguf

pytest.importorskip("llama_cpp")
ARCHS = ("llama", "qwen2")  # NORM RoPE with permuted Q/K rows, and NEOX


@pytest.fixture(scope="session", params=ARCHS)
def tiny_gguf(request, tmp_path_factory):
    return save_tiny_gguf(tmp_path_factory.mktemp(f"gguf-{request.param}") / f"tiny-{request.param}.gguf", request.param,
                          seed=3)


@pytest.fixture(scope="session")
def engines(tiny_gguf):
    """The same GGUF on both engines (the transformers one reads the folder converted from it)."""
    return load_model(str(tiny_gguf), engine="llama.cpp"), load_model(str(tiny_gguf), engine="transformers")


def ids_of(loaded, text=CONTEXT):
    return loaded.tokenizer(text, add_special_tokens=True)["input_ids"]


def test_state_bytes_round_trip_through_the_pinned_layout(engines):
    """What llama.cpp writes, decoded and encoded again by `llamastate`, is byte for byte what it wrote:
    a llama.cpp that changes its layout fails here, loudly."""
    llama, _ = engines
    engine = llama.engine
    seq = engine.sequence()
    engine.prefill(seq, ids_of(llama))
    data = engine._state()
    positions, keys, values = llamastate.decode(engine.layout, data)
    assert positions.tolist() == list(range(seq.length))
    assert llamastate.encode(engine.layout, keys, values) == data


def test_keys_read_back_from_llama_cpp_are_transformers_pre_rope_keys(engines):
    """llama.cpp's cache, un-rotated and put back in Hugging Face's channel order, is the reference's
    pre-RoPE KV (to f16 precision): the RoPE convention and the row permutation are right."""
    llama, reference = engines
    ids = ids_of(llama)
    layers = {}
    for loaded in (llama, reference):
        seq = loaded.engine.sequence()
        loaded.engine.prefill(seq, ids)
        layers[loaded.engine.name] = [(np.asarray(k), np.asarray(v)) for k, v in loaded.engine.context_layers(seq)]
    for (k1, v1), (k2, v2) in zip(layers["llama.cpp"], layers["transformers"]):
        assert k1.shape == k2.shape
        assert np.abs(k1 - k2).max() <= 2e-3 * np.abs(k2).max() + 1e-3
        assert np.abs(v1 - v2).max() <= 2e-3 * np.abs(v2).max() + 1e-3
    # and the tolerance means something: a key left rotated, or in the other channel order, is far off
    k1, k2 = layers["llama.cpp"][1][0], layers["transformers"][1][0]
    assert np.abs(k1[..., ::-1] - k2).max() > 10 * (2e-3 * np.abs(k2).max() + 1e-3)


def test_placed_keys_give_llama_cpps_own_logits(engines):
    """A context injected from pre-RoPE layers continues exactly as llama.cpp's own prefill does."""
    llama, _ = engines
    engine, ids = llama.engine, ids_of(llama)
    own = engine.sequence()
    engine.prefill(own, ids)
    layers = engine.context_layers(own)
    expected = engine.evaluate(own, [ids[0], ids[1]], logits_to_keep=2)
    injected = engine.sequence()
    for index, (key, value) in enumerate(layers):
        engine.inject(injected, index, engine.place(key, value))
    assert injected.length == len(ids)
    assert np.abs(engine.evaluate(injected, [ids[0], ids[1]], logits_to_keep=2) - expected).max() < 1e-3


def test_a_llama_cpp_artifact_decodes_to_llama_cpps_edge_only_tokens(tiny_gguf, tmp_path):
    """prefill --engine llama.cpp, then decode on llama.cpp: exactly the tokens of llama.cpp's own
    prefill of the context (greedy)."""
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(CONTEXT)
    run_cli("prefill", "-m", str(tiny_gguf), "--engine", "llama.cpp", "-c", str(ctx), "-o", str(tmp_path / "l.kv"),
            check=True)
    common = ["-m", str(tiny_gguf), "-p", "What next?", "-n", "12", "--json"]
    from_artifact = json.loads(run_cli("decode", *common, "--kv", str(tmp_path / "l.kv"), check=True).stdout)
    edge_only = json.loads(run_cli("decode", *common, "--context", str(ctx), check=True).stdout)
    assert from_artifact["engine"] == edge_only["engine"] == "llama.cpp"
    assert from_artifact["path"] == "artifact" and edge_only["path"] == "edge-only"
    assert from_artifact["new_tokens"] == 12 and from_artifact["text"] == edge_only["text"]


def test_artifacts_cross_between_engines_within_a_small_nll_difference(tiny_gguf, tmp_path):
    """A transformers-made artifact scores on llama.cpp as llama.cpp's own does, and the reverse."""
    ctx, cont = tmp_path / "ctx.txt", tmp_path / "cont.txt"
    ctx.write_text(CONTEXT)
    cont.write_text("The scheduler then returns the finished jobs in order.")
    for engine in ("llama.cpp", "transformers"):
        run_cli("prefill", "-m", str(tiny_gguf), "--engine", engine, "-c", str(ctx), "-o", str(tmp_path / f"{engine}.kv"),
                check=True)
    nll = {}
    for reader in ("llama.cpp", "transformers"):
        for maker in ("llama.cpp", "transformers"):
            out = run_cli("score", "-m", str(tiny_gguf), "--engine", reader, "--kv", str(tmp_path / f"{maker}.kv"),
                          "--continuation", str(cont), "--json", check=True)
            nll[reader, maker] = json.loads(out.stdout)["nll"]
    for reader in ("llama.cpp", "transformers"):
        assert abs(nll[reader, "llama.cpp"] - nll[reader, "transformers"]) < 0.01, nll


def test_compressed_artifact_and_recompute_last_run_on_llama_cpp(tiny_gguf, tmp_path):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(CONTEXT)
    run_cli("prefill", "-m", str(tiny_gguf), "-c", str(ctx), "-o", str(tmp_path / "a.kv"), "--chunk-size", "32", check=True)
    run_cli("compress", str(tmp_path / "a.kv"), "--codec", "balanced", "-o", str(tmp_path / "b.kv"), "--model", str(tiny_gguf),
            check=True)  # a GGUF is not a bundled model: compress is told what to calibrate the codebook with
    common = ["-m", str(tiny_gguf), "-p", "What next?", "-n", "6", "--json"]
    balanced = json.loads(run_cli("decode", *common, "--kv", str(tmp_path / "b.kv"), check=True).stdout)
    assert balanced["engine"] == "llama.cpp" and balanced["new_tokens"] > 0
    exact = json.loads(run_cli("decode", *common, "--kv", str(tmp_path / "a.kv"), check=True).stdout)
    # recomputing at least as many tokens as the context holds is edge-only, whatever the artifact held
    everything = json.loads(run_cli("decode", *common, "--kv", str(tmp_path / "b.kv"), "--recompute-last", "100000",
                                    check=True).stdout)
    edge_only = json.loads(run_cli("decode", *common, "--context", str(ctx), check=True).stdout)
    assert everything["text"] == edge_only["text"] == exact["text"]


def test_an_artifact_of_another_model_is_refused_before_llama_cpp_sees_it(tiny_gguf, tiny_qwen, tmp_path):
    """llama.cpp's state checks only shapes; celslm checks the model space first."""
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(CONTEXT)
    run_cli("prefill", "-m", str(tiny_qwen), "-c", str(ctx), "-o", str(tmp_path / "other.kv"), check=True)
    result = run_cli("decode", "-m", str(tiny_gguf), "--kv", str(tmp_path / "other.kv"), "-p", "Hi", "--json")
    assert result.returncode != 0 and b"model space" in result.stderr


def test_state_decoding_refuses_bytes_that_do_not_fit(engines):
    llama, _ = engines
    engine = llama.engine
    seq = engine.sequence()
    engine.prefill(seq, ids_of(llama)[:20])
    data = engine._state()
    with pytest.raises(IntegrityError, match="ends at byte"):
        llamastate.decode(engine.layout, data[:-3])
    with pytest.raises(IntegrityError, match="after its last layer"):
        llamastate.decode(engine.layout, data + b"\0")
    other = llamastate.CacheLayout(engine.layout.layers + 1, engine.layout.kv_heads, engine.layout.head_dim, 1, 1, True)
    with pytest.raises(IntegrityError, match="layers"):
        llamastate.decode(other, data)


def test_another_llama_cpp_python_version_is_refused():
    with pytest.raises(CelslmError, match="pip install llama-cpp-python==0.3.36"):
        llamastate.check_version("0.3.37", 3)
    with pytest.raises(CelslmError):
        llamastate.check_version("0.3.36", 4)
    import llama_cpp

    llamastate.check_version(llama_cpp.__version__, llama_cpp.LLAMA_STATE_SEQ_VERSION)  # the one installed passes


def test_llama_cpp_vocabulary_tokenizes_as_transformers(engines):
    """The llama.cpp edge tokenizes with the GGUF's vocabulary; the ids, the chat frame and the text are
    transformers' (SentencePiece and byte-level BPE)."""
    from celslm import prompting

    light, reference = engines[0].tokenizer, engines[1].tokenizer
    for text in (CONTEXT, "  leading spaces, ünïcödé, tabs\tand\nnew lines <|im_start|>", ""):
        for special in (True, False):
            assert light(text, add_special_tokens=special)["input_ids"] == reference(text, add_special_tokens=special)["input_ids"]
    assert prompting.chat_frame(light) == prompting.chat_frame(reference) is not None
    for framing in ("chat", "raw"):
        assert prompting.context_ids(light, CONTEXT, framing) == prompting.context_ids(reference, CONTEXT, framing)
        assert prompting.prompt_ids(light, "Why?", framing, False) == prompting.prompt_ids(reference, "Why?", framing, False)
    ids = reference("héllo <|im_end|> wörld")["input_ids"]
    for skip in (True, False):
        assert light.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
    from celslm.decode import eos_ids

    assert eos_ids(engines[0]) == eos_ids(engines[1]) and eos_ids(engines[0])


def test_decode_on_llama_cpp_never_imports_torch(tiny_gguf, tmp_path):
    """The edge on llama.cpp loads llama.cpp, numpy and a tokenizer: not torch, not transformers."""
    from tests.test_packaging import PROBED_CLI, heavy_loaded

    ctx = tmp_path / "ctx.txt"
    ctx.write_text(CONTEXT)
    resolve_model(str(tiny_gguf))  # the folder converted once (that needs transformers), as a first run would
    run_cli("prefill", "-m", str(tiny_gguf), "-c", str(ctx), "-o", str(tmp_path / "a.kv"), check=True)
    result = subprocess.run(PROBED_CLI + ["decode", "-m", str(tiny_gguf), "--kv", str(tmp_path / "a.kv"), "-p", "Hi",
                                          "-n", "3"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert heavy_loaded(result.stderr) == []


@pytest.mark.realmodel
def test_bundled_models_llama_cpp_vocabulary_tokenizes_as_transformers():
    """On qwen2.5-coder-0.5b: the same ids for 40 standard-library files, the same chat frame and text."""
    import sysconfig

    from transformers import AutoTokenizer

    from celslm import prompting
    from celslm.models import installed_path, is_installed

    folder = installed_path("qwen2.5-coder-0.5b")
    if not is_installed(folder) or not (folder / "model.gguf").is_file():
        pytest.skip("qwen2.5-coder-0.5b is not installed with its GGUF (celslm models pull qwen2.5-coder-0.5b)")
    light, reference = load_model("qwen2.5-coder-0.5b", engine="llama.cpp").tokenizer, AutoTokenizer.from_pretrained(folder)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
    for path in files:
        text = path.read_text(errors="replace")[:20000]
        ids = reference(text)["input_ids"]
        assert light(text)["input_ids"] == ids, path.name
        assert light.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True), path.name
    assert prompting.chat_frame(light) == prompting.chat_frame(reference)


def test_bench_latency_adds_llama_cpps_own_edge_only_as_a_baseline(engines):
    from celslm.bench import latency

    llama, reference = engines
    result = latency.run(reference, contexts=(96,), links=("1gbit:1ms",), codecs=("fp16",), new_tokens=3, llama=llama)
    modes = [r["mode"] for r in result["runs"]]
    assert modes == ["edge-only", "edge-only (llama.cpp)", "artifact", "artifact+pipeline"]
    baseline = result["runs"][1]
    assert baseline["context_tokens"] == 96 and 1 <= baseline["new_tokens"] <= 3 and baseline["link"] is None


def test_bench_compress_puts_llama_cpps_own_cache_types_beside_tc(tmp_path):
    from celslm.bench import compress

    # llama.cpp's q8_0/q4_0 blocks are 32 values: heads of 32 channels
    gguf = save_tiny_gguf(tmp_path / "tiny-32.gguf", "qwen2", seed=4, hidden_size=128, num_attention_heads=4)
    reference = load_model(str(gguf), engine="transformers")
    result = compress.run(reference, codecs=("tc:q=1.0", "int8"), files=2, contexts=(64,), continuation=8, gguf=str(gguf),
                          quanto=False)  # quanto's groups do not divide the tiny model's cache
    rows = {r["codec"]: r for r in result["rows"]}
    q8, q4 = rows["llama.cpp q8_0 KV cache"], rows["llama.cpp q4_0 KV cache"]
    assert 1.4 < q8["ratio"] < 1.9 < q4["ratio"] < 3.6  # bytes as llama.cpp saves the state (cell metadata too)
    assert q4["kl"] > q8["kl"] > 0 and q8["files"] == 2
    assert rows["tc:q=1.0"]["ratio"] > 1 and rows["tc:q=1.0"]["decode_mbps"] > 0 and rows["tc:q=1.0"]["decode_mbps_all_cores"] > 0
    assert result["codebook"]["disjoint_from_evaluation"] and not set(result["files"]) & set(result["codebook"]["calibration_files"])


def test_bench_ttft_runs_on_the_engine_chosen_as_every_command_chooses_it(tiny_gguf):
    """A .gguf is measured on llama.cpp unless --engine says otherwise; the artifact's first token is the edge's own."""
    for extra, engine in (((), "llama.cpp"), (("--engine", "transformers"), "transformers")):
        out = run_cli("bench", "ttft", "-m", str(tiny_gguf), "--tokens", "96", "--chunk-size", "32", *extra, check=True)
        assert f"on {engine}" in out.stdout.decode(), out.stdout.decode()
    result = json.loads(run_cli("bench", "ttft", "-m", str(tiny_gguf), "--tokens", "96", "--json", check=True).stdout)
    assert result["first_token_equal"] and result["context_tokens"] >= 64 and result["artifact_ttft_s"] > 0


def test_bench_edge_measures_every_process_it_names(tiny_gguf):
    """Whole processes, interleaved, at two lengths: every row has its figures, the peer restores llama.cpp's
    own state (on disk and over the emulated link), and the warm service's switches decode from the edge cache."""
    out = run_cli("bench", "edge", "-m", str(tiny_gguf), "--tokens", "160", "--tokens", "200", "--max-new-tokens", "4",
                  "--repeats", "1", "--switches", "2", "--no-transformers", "--json", check=True)
    result = json.loads(out.stdout)
    curl = shutil.which("curl") is not None  # the warm service's client is curl
    first, second = result["lengths"]
    assert first["context_tokens"] < second["context_tokens"]
    for length, extra in ((first, {"edge-llama", "peer-edge"} | ({"warm"} if curl else set())), (second, set())):
        rows = {r["key"]: r for r in length["rows"]}
        assert set(rows) == {"kv", "peer", "kv-link", "peer-link"} | extra
        for row in rows.values():
            assert row["runs"] == 1 and 0 < row["first_byte_s"] <= row["total_s"] and row["peak_rss_mib"] > 10
        # the same model, the same context, greedy: llama.cpp restoring its state answers as its own prefill does
        assert all(row["same_text_as_llama_cpp"] for key, row in rows.items() if key.startswith("peer"))
        assert rows["kv"]["kv_decode_hidden_share"] is not None and length["ratios"]["first_byte_kv_vs_peer_over_link"]
        assert length["llama_state_bytes"] > 0 and length["artifact_bytes"] > 0
    assert "emulated" in result["link"]
    if curl:
        assert result["switch"]["switches"] == 2 and result["switch"]["all_from_the_edge_cache"]
        assert 0 < result["switch"]["context_s"] <= result["switch"]["context_s_max"]


def test_bench_edge_keep_reuses_the_prefills_of_the_same_context_and_redoes_a_partial_one(tiny_gguf, tmp_path):
    """--keep: a second run with the same context measures the kept artifact and state (files unchanged); a
    folder whose preparation did not finish is prepared again."""
    from celslm.bench.edge import _PREPARED, _kept

    args = ("bench", "edge", "-m", str(tiny_gguf), "--tokens", "160", "--max-new-tokens", "2", "--repeats", "1",
            "--switches", "0", "--no-edge-only", "--no-transformers", "--keep", str(tmp_path / "keep"), "--json")
    first = json.loads(run_cli(*args, check=True).stdout)
    work = tmp_path / "keep" / "160"
    kept = {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.is_file() and p.name != "peak-rss"}
    assert work / "context.state" in kept and any(p.parent.name == "blobs" for p in kept)
    second = json.loads(run_cli(*args, check=True).stdout)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert second["lengths"][0]["artifact_bytes"] == first["lengths"][0]["artifact_bytes"]
    ids = (work / "ids.json").read_text()
    assert _kept(work, ids, state=True) == first["lengths"][0]["artifact_bytes"]
    assert _kept(work, ids.replace("[", "[1, ", 1), state=True) is None  # another context
    (work / _PREPARED).write_text("{")  # a run stopped while preparing
    assert _kept(work, ids, state=True) is None


def test_keys_rotated_before_the_model_loads_use_the_folders_rope_and_a_wrong_one_is_redone(engines, tiny_gguf):
    """Keys are rotated while the model loads, with the RoPE the folder's config describes; it must be
    llama.cpp's own, and a wrong one is undone and redone at injection."""
    import dataclasses

    from celslm.llamacpp import LlamaEngine, key_rows

    llama, _ = engines
    engine = llama.engine
    assert engine.rope_hint == engine.model.rope
    ids = ids_of(llama)
    own = engine.sequence()
    engine.prefill(own, ids)
    layers = engine.context_layers(own)
    expected = engine.evaluate(own, [ids[0]])
    bad = dataclasses.replace(engine.model.rope, base=engine.model.rope.base / 100)
    other = LlamaEngine(str(tiny_gguf), rope_hint=bad)
    # what `place` gives while the model is loading: odd layers rotated with the (wrong) hint, even ones not at all
    placed = [(key_rows(k, bad), LlamaEngine._columns(v), bad) if i % 2 else
              (np.asarray(k), LlamaEngine._columns(v), None) for i, (k, v) in enumerate(layers)]
    seq = other.sequence()
    for index, item in enumerate(placed):
        other.inject(seq, index, item)
    fixed = np.abs(other.evaluate(seq, [ids[0]]) - expected).max()
    assert fixed < 5e-2
    # and the tolerance means something: injected as rotated by the wrong RoPE, the logits are far off
    unfixed = other.sequence()
    for index, (key, value) in enumerate(layers):
        other.inject(unfixed, index, (key_rows(key, bad), LlamaEngine._columns(value), engine.model.rope))
    assert np.abs(other.evaluate(unfixed, [ids[0]]) - expected).max() > max(5e-2, 10 * fixed)


def test_bench_engines_scores_each_engines_artifacts_on_both(engines):
    from celslm.bench import engines as engines_bench

    result = engines_bench.run(list(engines), files=2, context=64, continuation=16)
    assert len(result["files"]) == 2 and len(result["nll"]) == 6
    nll = {(r["engine"], r["artifact_from"]): r["nll"] for r in result["nll"]}
    assert abs(nll["transformers", "transformers"] - nll["transformers", "own"]) < 1e-4  # the reference is exact
    assert abs(nll["llama.cpp", "llama.cpp"] - nll["llama.cpp", "own"]) < 1e-2  # f16 -> float32 -> f16
    assert set(result["crossing_cost"]) == {"llama.cpp", "transformers"} and result["engine_gap"] is not None


def test_bench_report_adds_llama_cpps_own_edge_only_as_a_baseline(engines):
    from celslm.bench import modes, report

    llama, reference = engines
    result = report.run_suite(reference, reference, tasks_per_kind=1, context_chars=400, new_tokens=3,
                              links=("100mbit:20ms",), only=("edge-only", modes.LLAMA_EDGE), slm_llama=llama)
    rows = {row["mode"]: row for row in report.summary(result)}
    assert set(rows) == {"edge-only", modes.LLAMA_EDGE}
    baseline = rows[modes.LLAMA_EDGE]
    assert baseline["private"] and baseline["bytes_down"] == 0 and baseline["nll"] is not None


def test_the_command_line_starts_loading_the_gguf_only_where_decode_would_run_it(tiny_gguf, tmp_path, monkeypatch):
    """The preload is a guess made before anything is parsed: it must not load a model the command
    will not run on llama.cpp (help, --server, --engine transformers, a Hugging Face folder)."""
    from celslm.commands.main import _preload_gguf

    home = tmp_path / "home"
    (home / "models" / "tiny").mkdir(parents=True)
    (home / "models" / "tiny" / "model.gguf").write_bytes(b"GGUF")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("CELSLM_HOME", str(home))
    monkeypatch.delenv("CELSLM_ENGINE", raising=False)
    monkeypatch.delenv("CELSLM_SERVER", raising=False)
    monkeypatch.delenv("CELSLM_MODEL", raising=False)
    guess = lambda *argv: _preload_gguf(list(argv), start=False)  # noqa: E731
    assert guess("decode", "-m", str(tiny_gguf), "--kv", "a.kv", "-p", "x") == str(tiny_gguf)
    assert guess("serve", "--model=tiny") == str(home / "models" / "tiny" / "model.gguf")
    assert guess("score", "-m", "tiny", "--engine", "llama.cpp", "--continuation", "c") is not None
    for argv in (("decode", "-m", str(tiny_gguf), "--help"), ("decode", "-m", "tiny", "--server=http://x", "-p", "x"),
                 ("decode", "-m", "tiny", "--engine", "transformers"), ("decode", "-m", str(folder), "-p", "x"),
                 ("prefill", "-m", str(tiny_gguf)), ("decode", "-m", "absent"), ()):
        assert guess(*argv) is None, argv


def test_bench_hostile_answers_every_hostile_peer_row_from_the_cloud(tmp_path, monkeypatch):
    """Whole decode processes under --trust: each hostile peer (forged tag, huge body, huge declared size,
    huge counts, trickle) leaves the answer and the artifact the normal run had."""
    gguf = save_tiny_gguf(tmp_path / "tiny.gguf", "llama", seed=5)
    out = run_cli("bench", "hostile", "-m", str(gguf), "--tokens", "96", "--max-new-tokens", "4", "--repeats", "1", "--json",
                  env={"CELSLM_TIMEOUT": "2"}, check=True)  # the trickle is abandoned at a 2 s deadline
    result = json.loads(out.stdout)
    rows = {r["key"]: r for r in result["rows"]}
    assert set(rows) == {"normal", "forged", "huge", "declared", "counts", "trickle", "plain-link", "sealed-link"}
    assert result["every_hostile_row_answered_normally"] and all(r["answered_normally"] for r in rows.values())
    assert {r["artifact"] for key, r in rows.items() if not key.endswith("-link")} == {rows["normal"]["artifact"]}
    assert rows["sealed-link"]["artifact"] != rows["plain-link"]["artifact"]
    assert result["link"].startswith("emulated") and result["decrypt_load_ratio"] > 0
    assert all(ms > 0 for ms in result["costs_ms"].values())


def test_half_rounding_through_llama_cpp_is_numpys_bit_for_bit():
    """The f16 cast that writes llama.cpp's state goes through llama.cpp's own converter (F16C, ~30x numpy's
    cast): on random bit patterns, every tie between two halves, subnormals and overflow, it gives numpy's
    bits exactly, so the numpy fallback writes the same KV."""
    from celslm import llamaload
    from celslm.llamacpp import to_half

    assert llamaload.half_converter() is not None  # the library ships it: the fast path is the one tested
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)
    halves = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
    ties = ((halves[:-1] + halves[1:]) / 2).astype(np.float32)  # exactly between two halves: round to even
    x = np.concatenate([patterns[np.isfinite(patterns)], ties, -ties,
                        np.float32([np.inf, -np.inf, 0.0, -0.0, 65519.0, 65520.0, 1e9, 2.0**-25, 2.0**-26, 3 * 2.0**-26])])
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16)
    assert np.array_equal(to_half(x).view(np.uint16), expected.view(np.uint16))
    assert np.array_equal(to_half(x, native=False).view(np.uint16), expected.view(np.uint16))


@pytest.mark.parametrize("kind,dims", [(0, 16), (2, 16), (2, 8)])  # NORM, NEOX, partial NEOX
def test_key_rows_rotate_and_round_as_rotate_then_cast(kind, dims):
    """Keys go into llama.cpp's rows in one pass (rotated from any layout, rounded once): the same bits
    as rotating with `rotate`, reordering and casting, on both f16 paths."""
    from celslm.llamacpp import Rope, _tables, key_rows, rotate, to_llama_order

    rope = Rope(kind, dims, 10000.0, 1.0)
    key = np.random.default_rng(kind + dims).normal(0, 30, (3, 301, 16)).astype(np.float32)
    rotated = to_llama_order(rotate(key, rope, _tables(rope, 301), dtype=np.float32), rope)
    expected = rotated.transpose(1, 0, 2).reshape(301, 48).astype(np.float16)
    token_major = np.ascontiguousarray(key.transpose(1, 0, 2)).transpose(1, 0, 2)  # how a decoded layer comes
    for layout in (key, token_major):
        for native in (True, False):
            assert np.array_equal(key_rows(layout, rope, native).view(np.uint16), expected.view(np.uint16))


def test_layers_decode_at_once_on_the_engines_threads_into_the_same_state(engines, monkeypatch):
    """A tc artifact's layers decode on `decode_threads` workers at once (two layers meet at a barrier
    inside their decoding: one at a time, it times out) and give llama.cpp the same state, byte for
    byte, as one thread does; the warm service's state bytes, made without llama.cpp, are those bytes."""
    import threading

    from celslm.artifact import MemoryReader
    from celslm.blockread import LayerBlocks
    from celslm.blocks import recode
    from celslm.calibrate import Calibration, calibrate
    from celslm.codecs import parse_codec
    from celslm.decode import context_from_artifact
    from celslm.prefill import prefill
    from celslm.stream import LayerFeed, Timeline

    llama, reference = engines
    codebook = calibrate(reference, Calibration(files=2, tokens=96, probe_files=1, probe_tokens=8))
    exact = prefill(reference, ids_of(reference, CONTEXT * 3), framing="raw", chunk_size=32)
    coded = recode(MemoryReader(exact), parse_codec("tc:q=1.0,ent=pco"), codebook)
    decode, meeting = LayerBlocks.decode, threading.Barrier(2, timeout=10)

    def met(layer):
        if layer.index < 2:
            meeting.wait()  # BrokenBarrierError (the test fails) unless layers 0 and 1 decode at once
        return decode(layer)

    states = {}
    for threads in (1, 3):
        monkeypatch.setattr(llama.engine, "decode_threads", threads)
        monkeypatch.setattr(LayerBlocks, "decode", met if threads > 1 else decode)
        states[threads] = llama.engine.snapshot(context_from_artifact(llama, MemoryReader(coded)).sequence)
    assert meeting.n_waiting == 0 and not meeting.broken
    assert states[3] == states[1]
    # the warm service's path: the same layers written into state bytes without a llama.cpp context
    feed = LayerFeed(llama.engine, MemoryReader(coded), Timeline())
    assert llama.engine.state_of(feed.wait).tobytes() == states[1]
