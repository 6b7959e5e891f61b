"""Cross-model KV: layer maps, ridge maps, alignment artifacts and projected/hybrid prefill (tiny model pairs)."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import shutil
import weakref

import pytest
import torch

from celslm import align as A
from celslm.align import fit_ridge, monotone_map, proportional_map
from celslm.artifact import open_artifact
from celslm.blockread import open_context
from celslm.models import load_model
from celslm.projection import load_alignment
from tests.conftest import CONTEXT, LARGE, run_cli, save_tiny_model

@pytest.fixture(scope="module")
def pair(aligned_pair):
    return aligned_pair


def test_monotone_map_is_the_best_non_decreasing_map():
    torch.manual_seed(0)
    for _ in range(5):
        sim = torch.rand(4, 5)
        mapping = monotone_map(sim)
        best = max((m for m in itertools.product(range(5), repeat=4) if list(m) == sorted(m)),
                   key=lambda m: sum(sim[s, l].item() for s, l in enumerate(m)))
        assert mapping == list(best)
        assert mapping == sorted(mapping)


def test_proportional_map_spans_both_ends():
    assert proportional_map(24, 28)[0] == 0 and proportional_map(24, 28)[-1] == 27
    assert proportional_map(24, 28) == sorted(proportional_map(24, 28))


def test_ridge_recovers_a_known_linear_map():
    generator = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(12, 5, generator=generator), torch.randn(5, generator=generator)
    x = torch.randn(3000, 12, generator=generator) * torch.linspace(0.1, 10, 12)  # uneven scales
    y = x @ weight + bias + 1e-3 * torch.randn(3000, 5, generator=generator)
    fit = fit_ridge(x[:2000], y[:2000], x[2000:], y[2000:])
    assert torch.allclose(fit.weight, weight, atol=1e-2)
    assert torch.allclose(fit.bias, bias, atol=1e-2)
    assert fit.r2 > 0.9999


def test_ridge_r2_is_low_for_unrelated_targets():
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(2000, 8, generator=generator), torch.randn(2000, 3, generator=generator)
    assert fit_ridge(x[:1500], y[:1500], x[1500:], y[1500:]).r2 < 0.05


def test_alignment_records_a_monotone_map_fits_and_measured_quality(pair):
    meta = json.loads((pair["align"] / "alignment.json").read_text())
    assert len(meta["layer_map"]) == 3 and meta["layer_map"] == sorted(meta["layer_map"])
    assert all(0 <= l < 5 for l in meta["layer_map"])
    assert len(meta["r2"]["key"]) == len(meta["r2"]["value"]) == 3
    assert len(meta["similarity"]["cka"]["hidden"]) == 3 and len(meta["similarity"]["cka"]["hidden"][0]) == 5
    held = meta["heldout"]
    assert len(held["hybrid_nll"]) == 4 and len(held["sensitivity"]) == 3
    # own_nll is the small model's loss on the held-out continuation: one plain forward pass over the window agrees
    small = load_model(str(pair["small"]))
    windows, _ = A.calibration_windows(small.tokenizer, sorted((pair["root"] / "calib").iterdir()), 160, 5)
    with torch.no_grad():
        logits = small.model(torch.tensor([windows[-1]])).logits[0, -33:-1]
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(windows[-1][-32:])).item()
    assert abs(held["own_nll"] - expected) < 1e-3
    assert held["hybrid_nll"][0] != held["own_nll"]  # all projected: not the small model's own
    assert (pair["root"] / "plots" / "cka.png").stat().st_size > 0 and (pair["root"] / "plots" / "rsa.png").is_file()


def _layers(path):
    reader = open_artifact(str(path))
    _, layers = open_context(reader)
    return reader.manifest, [(torch.from_numpy(key), torch.from_numpy(value)) for _, key, value in layers]


def test_projected_artifact_is_in_the_small_models_space_and_decodes(pair, tmp_path):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(CONTEXT)
    run_cli("prefill", "-m", str(pair["large"]), "--align", str(pair["align"]), "-c", str(ctx), "-o",
            str(tmp_path / "x.kv"), check=True)
    run_cli("prefill", "-m", str(pair["small"]), "-c", str(ctx), "-o", str(tmp_path / "own.kv"), check=True)
    manifest, layers = _layers(tmp_path / "x.kv")
    own_manifest, own = _layers(tmp_path / "own.kv")
    assert manifest.space == own_manifest.space
    assert manifest.producer.alignment == hashlib.sha256((pair["align"] / "alignment.json").read_bytes()).hexdigest()
    assert list(manifest.provenance) == ["projected"] * 3
    for (key, value), (own_key, own_value) in zip(layers, own):
        assert key.shape == own_key.shape and value.shape == own_value.shape  # the small model's geometry
        assert torch.allclose(key[:, :1], own_key[:, :1], atol=1e-5)  # the sink token is the small model's own
        assert not torch.allclose(key[:, 1:], own_key[:, 1:], atol=1e-3)  # the rest is projected
    result = run_cli("decode", "-m", str(pair["small"]), "--kv", str(tmp_path / "x.kv"), "--prompt", "Go on.",
                     "--max-new-tokens", "4", "--json", check=True)
    assert json.loads(result.stdout)["new_tokens"] > 0


def test_hybrid_keeps_the_small_models_own_kv_in_its_native_layers(pair, tmp_path):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(CONTEXT)
    run_cli("prefill", "-m", str(pair["large"]), "--align", str(pair["align"]), "--native-layers", "2", "-c", str(ctx),
            "-o", str(tmp_path / "h.kv"), check=True)
    run_cli("prefill", "-m", str(pair["small"]), "-c", str(ctx), "-o", str(tmp_path / "own.kv"), check=True)
    manifest, layers = _layers(tmp_path / "h.kv")
    _, own = _layers(tmp_path / "own.kv")
    assert list(manifest.provenance) == ["native", "native", "projected"]
    for index in (0, 1):
        assert torch.allclose(layers[index][0], own[index][0], atol=1e-5)
        assert torch.allclose(layers[index][1], own[index][1], atol=1e-5)
    assert not torch.allclose(layers[2][1], own[2][1], atol=1e-3)


def test_auto_picks_the_fewest_native_layers_within_the_budget(pair, tmp_path):
    meta = json.loads((pair["align"] / "alignment.json").read_text())
    held = meta["heldout"]
    budget = max(math.exp(held["hybrid_nll"][1] - held["own_nll"]) - 1, 0) + 1e-9
    expected = next(k for k, nll in enumerate(held["hybrid_nll"]) if math.exp(nll - held["own_nll"]) - 1 <= budget)
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(CONTEXT)
    result = run_cli("prefill", "-m", str(pair["large"]), "--align", str(pair["align"]), "--auto", "--budget",
                     f"{budget * 100:.9f}%", "-c", str(ctx), "-o", str(tmp_path / "a.kv"), "--json", check=True)
    assert json.loads(result.stdout)["provenance"].count("native") == expected


def test_models_with_different_tokenizers_are_refused(pair, tmp_path):
    other = save_tiny_model(tmp_path / "other", "qwen2", seed=5, extra_special=("<|tool|>",))
    result = run_cli("align", "--llm", str(pair["large"]), "--slm", str(other), "--out", str(tmp_path / "o.align"),
                     "--calib", str(pair["root"] / "calib"), "--windows", "5", "--window", "160", "--heldout", "1",
                     "--continuation", "32")
    assert result.returncode == 2
    assert b"different tokenizers" in result.stderr
    assert not (tmp_path / "o.align").exists()


def test_tampered_maps_are_refused_and_nothing_is_written(pair, tmp_path):
    copy = tmp_path / "t.align"
    copy.mkdir()
    for name in ("alignment.json", "maps.safetensors"):
        (copy / name).write_bytes((pair["align"] / name).read_bytes())
    data = bytearray((copy / "maps.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (copy / "maps.safetensors").write_bytes(bytes(data))
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(CONTEXT)
    result = run_cli("prefill", "-m", str(pair["large"]), "--align", str(copy), "-c", str(ctx), "-o", str(tmp_path / "x.kv"))
    assert result.returncode == 3
    assert b"does not match the digest" in result.stderr
    assert not (tmp_path / "x.kv").exists()


def test_an_alignment_is_refused_for_another_large_model(pair, tmp_path):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(CONTEXT)
    result = run_cli("prefill", "-m", str(pair["small"]), "--align", str(pair["align"]), "-c", str(ctx), "-o", str(tmp_path / "x.kv"))
    assert result.returncode == 2
    assert b"the alignment maps from" in result.stderr


def test_bench_quality_reports_every_mode_on_held_out_files(pair):
    result = run_cli("bench", "quality", "--llm", str(pair["large"]), "--align", str(pair["align"]), "--files", "2",
                     "--tokens", "96", "--continuation", "16", "--native", "1", "--native", "2", "--codec", "lossless",
                     "--json", check=True)
    report = json.loads(result.stdout)
    rows = {row["key"]: row for row in report["rows"]}
    assert {"own", "none", "native", "cross", "hybrid1", "last1", "split1", "hybrid2", "last2", "split2", "llm"} <= set(rows)
    assert len(report["files"]) == 2
    assert rows["own"]["gain_kept"] == 1 and rows["none"]["gain_kept"] == 0 and rows["own"]["top1_vs_own"] == 1
    # a losslessly shipped native artifact is the small model's own prefill, bit for bit
    assert rows["native"]["nll"] == pytest.approx(rows["own"]["nll"], abs=1e-4)
    assert rows["native"]["link_bytes"] > 0 and rows["own"]["link_bytes"] == 0
    assert rows["hybrid1"]["edge_prefill_avoided"] == pytest.approx(2 / 3, abs=1e-3)


@pytest.fixture(scope="module")
def gguf_pair(tmp_path_factory):
    """A tiny pair as GGUF files (one tokenizer), aligned: the small one runs on both engines."""
    from tests.tiny import save_tiny_gguf

    root = tmp_path_factory.mktemp("gguf-pair")
    large = save_tiny_gguf(root / "large.gguf", "qwen2", seed=3, layers=5, hidden_size=96, num_attention_heads=4,
                           num_key_value_heads=2)
    small = save_tiny_gguf(root / "small.gguf", "qwen2", seed=4)
    calib, held = root / "calib", root / "mine"
    for folder, names in ((calib, [f"c{i}.txt" for i in range(5)]), (held, ["a.py", "sub/b.py", "c0.txt"])):
        for index, name in enumerate(names):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text((CONTEXT.replace("name", f"{folder.name}{index}") + f"# {name}\n") * 2)
    out = root / "pair.align"
    run_cli("align", "--llm", str(large), "--slm", str(small), "--out", str(out), "--calib", str(calib),
            "--windows", "5", "--window", "160", "--heldout", "1", "--continuation", "32", "--rows", "64",
            "--refine-steps", "0", check=True)
    return {"large": large, "small": small, "align": out, "mine": held}


def test_bench_quality_scores_a_folder_of_the_users_on_both_engines(gguf_pair):
    """--corpus FOLDER: its files, never the alignment's calibration files (c0.txt is one), scored on
    transformers and on llama.cpp, each engine's gain kept against its own prefill and no context."""
    result = json.loads(run_cli("bench", "quality", "--llm", str(gguf_pair["large"]), "--align", str(gguf_pair["align"]),
                                "--slm", str(gguf_pair["small"]), "--corpus", str(gguf_pair["mine"]), "--files", "3",
                                "--tokens", "96", "--continuation", "16", "--native", "1", "--codec", "lossless",
                                "--json", check=True).stdout)
    assert result["files"] == ["a.py", "sub/b.py"] and result["corpus"] == f"folder {gguf_pair['mine']}"
    assert result["engines"] == ["transformers", "llama.cpp"]
    rows = {row["key"]: row for row in result["rows"]}
    edge = {key: row for key, row in rows.items() if row["engine"] == "llama.cpp"}
    assert set(edge) == {"edge-own", "edge-none", "edge-native", "edge-cross", "edge-split1"}
    assert edge["edge-own"]["gain_kept"] == 1 and edge["edge-none"]["gain_kept"] == 0
    # the lossless native artifact on llama.cpp is llama.cpp's own prefill, up to its f16 cache
    assert edge["edge-native"]["nll"] == pytest.approx(edge["edge-own"]["nll"], abs=2e-2)
    assert edge["edge-cross"]["link_bytes"] > 0 and 0 < edge["edge-split1"]["edge_prefill_avoided"] < 1
    assert rows["own"]["nll"] != edge["edge-own"]["nll"]  # two engines, two measurements
    bad = run_cli("bench", "quality", "--llm", str(gguf_pair["large"]), "--align", str(gguf_pair["align"]),
                  "--corpus", str(gguf_pair["mine"] / "nothing-here"))
    assert bad.returncode == 2 and b"--corpus" in bad.stderr and b"Traceback" not in bad.stderr


def test_align_eval_reports_the_gain_kept_on_the_users_files_as_bench_quality_measures_it(gguf_pair, tmp_path):
    """align --eval DIR: the gain kept on the user's files (never its calibration files), recorded in the
    alignment; the same cross NLL bench quality gets from a lossless artifact of the same alignment."""
    from tests.tiny import save_tiny_model

    large = save_tiny_model(tmp_path / "large", "qwen2", seed=3, **LARGE)
    small = save_tiny_model(tmp_path / "small", "qwen2", seed=4)
    calib = tmp_path / "calib"
    calib.mkdir()
    for index in range(5):
        (calib / f"c{index}.txt").write_text((CONTEXT.replace("name", f"name{index}") + f"# file {index}\n") * 2)
    out = tmp_path / "mine.align"
    common = ("--llm", str(large), "--slm", str(small), "--calib", str(calib), "--windows", "5", "--window", "160",
              "--heldout", "1", "--continuation", "32", "--rows", "64", "--refine-steps", "0")
    result = json.loads(run_cli("align", *common, "--out", str(out), "--eval", str(gguf_pair["mine"]), "--json",
                                check=True).stdout)
    mine = result["eval"]
    assert [f["file"] for f in mine["files"]] == ["a.py", "sub/b.py"]  # c0.txt is a calibration file
    assert all(f["context_tokens"] == 128 for f in mine["files"])  # a random model: NLLs only, no direction
    assert mine["gain_kept"] == pytest.approx(
        (mine["no_context_nll"] - mine["cross_nll"]) / (mine["no_context_nll"] - mine["own_nll"]), abs=1e-3)
    assert json.loads((out / "alignment.json").read_text())["eval"]["gain_kept"] == mine["gain_kept"]
    quality = json.loads(run_cli("bench", "quality", "--llm", str(large), "--align", str(out), "--corpus",
                                 str(gguf_pair["mine"]), "--tokens", "128", "--continuation", "32", "--native", "1",
                                 "--codec", "lossless", "--json", check=True).stdout)
    rows = {row["key"]: row for row in quality["rows"]}
    assert quality["files"] == ["a.py", "sub/b.py"]
    assert rows["cross"]["nll"] == pytest.approx(mine["cross_nll"], abs=1e-3)
    assert rows["own"]["nll"] == pytest.approx(mine["own_nll"], abs=1e-3)
    missing = run_cli("align", *common, "--out", str(tmp_path / "x.align"), "--eval", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and b"--eval" in missing.stderr and not (tmp_path / "x.align").exists()


def test_calibration_files_are_never_evaluation_files():
    from celslm.corpus import THIRD_PARTY, calibration_files, eval_cases, file_name, stdlib_modules, third_party_modules
    from tests.tiny import byte_tokenizer

    evaluated = {case.name for case in eval_cases(byte_tokenizer(), files=20, min_context=64, max_context=64, continuation=8)}
    assert len(evaluated) == 20
    assert not evaluated & {path.name for path in calibration_files(40)}
    # the broad mix: the standard library's calibration picks in turn with other libraries, none of them
    # a library the third-party evaluation reads (package-disjoint, so "out of domain" is unseen code)
    broad = calibration_files(200, "broad")
    stdlib = set(stdlib_modules())
    from_stdlib = [path for path in broad if path in stdlib]
    assert len(broad) == 200 and from_stdlib == calibration_files(len(from_stdlib))  # the same picks, in turn
    assert not set(broad) & set(third_party_modules())
    packages = {p.parts[p.parts.index("site-packages") + 1] for p in broad if "site-packages" in p.parts}
    assert len(packages) >= 8 and not packages & set(THIRD_PARTY)
    assert 10 <= sum(path in stdlib for path in broad) < 100
    # a library module is named from its package on: no third-party file is passed over for sharing a bare
    # name (connection.py, utils.py) with one, so every alignment is scored on the same third-party files
    names = {file_name(path) for path in broad}
    assert "requests/adapters.py" in names
    everything = [case.name for case in eval_cases(byte_tokenizer(), 20, 64, 64, 8, source="third-party")]
    assert any(name.rsplit("/", 1)[-1] in {p.name for p in broad} for name in everything)  # bare names do collide
    assert [case.name for case in eval_cases(byte_tokenizer(), 20, 64, 64, 8, exclude=names, source="third-party")] == everything


def test_recompute_last_over_a_cross_artifact_matches_the_own_prefill_when_it_covers_everything(pair, tmp_path):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(CONTEXT)
    run_cli("prefill", "-m", str(pair["large"]), "--align", str(pair["align"]), "-c", str(ctx), "-o",
            str(tmp_path / "x.kv"), "--chunk-size", "32", check=True)
    args = ("-m", str(pair["small"]), "--prompt", "Go on.", "--max-new-tokens", "8", "--json")
    edge = json.loads(run_cli("decode", "--context", str(ctx), *args, check=True).stdout)
    full = json.loads(run_cli("decode", "--kv", str(tmp_path / "x.kv"), "--recompute-last", "100000", *args, check=True).stdout)
    some = json.loads(run_cli("decode", "--kv", str(tmp_path / "x.kv"), "--recompute-last", "40", *args, check=True).stdout)
    assert full["text"] == edge["text"]
    assert some["path"] == "partial" and some["context_tokens"] == edge["context_tokens"]


def test_a_cross_artifact_carries_the_split_its_alignment_advises_and_decode_and_score_follow_it(pair, tmp_path):
    meta = json.loads((pair["align"] / "alignment.json").read_text())
    held = meta["heldout"]
    assert sorted(held["split_nll"]) == ["32", "64"]  # the splits shorter than the held-out context (128 tokens)
    # tiny random models gain nothing from any split: give this copy a curve that pays at 32 tokens
    held["split_nll"] = {"32": held["own_nll"], "64": held["own_nll"]}
    held["hybrid_nll"][0] = held["no_context_nll"]
    shutil.copytree(pair["align"], tmp_path / "curve.align")
    (tmp_path / "curve.align" / "alignment.json").write_text(json.dumps(meta))
    advised = load_alignment(tmp_path / "curve.align").heldout.advised_split()
    assert advised == 32
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(CONTEXT)
    run_cli("prefill", "-m", str(pair["large"]), "--align", str(tmp_path / "curve.align"), "-c", str(ctx), "-o",
            str(tmp_path / "x.kv"), "--chunk-size", "16", check=True)
    info = json.loads(run_cli("inspect", str(tmp_path / "x.kv"), "--json", check=True).stdout)
    assert info["producer"]["own_last"] == advised
    args = ("-m", str(pair["small"]), "--kv", str(tmp_path / "x.kv"), "--prompt", "Go on.", "--max-new-tokens", "8", "--json")
    default = json.loads(run_cli("decode", *args, check=True).stdout)
    given = json.loads(run_cli("decode", *args, "--recompute-last", str(advised), check=True).stdout)
    off = json.loads(run_cli("decode", *args, "--recompute-last", "0", check=True).stdout)
    assert default["text"] == given["text"] and default["recomputed_tokens"] == given["recomputed_tokens"]
    assert advised <= default["recomputed_tokens"] < advised + 16 and off["recomputed_tokens"] == 0 and off["path"] == "artifact"
    cont = tmp_path / "cont.txt"
    cont.write_text(CONTEXT[:200])
    scored = [json.loads(run_cli("score", "-m", str(pair["small"]), "--kv", str(tmp_path / "x.kv"), "--continuation", str(cont),
                                 *flag, "--json", check=True).stdout) for flag in ((), ("--recompute-last", str(advised)),
                                                                                 ("--recompute-last", "0"))]
    assert scored[0] == scored[1] and scored[0]["recomputed_tokens"] == default["recomputed_tokens"]
    assert scored[2]["recomputed_tokens"] == 0


def test_the_advised_split_is_where_the_gain_curve_flattens():
    from celslm.projection import HeldOut

    def curve(*gains):  # gain kept at 0 (all projected), 32, 64, 128, 256 own last tokens; own NLL 1, none 2
        nlls = [2 - g for g in gains]
        return HeldOut(1, 1.0, 2.0, (nlls[0],), (), dict(zip((32, 64, 128, 256), nlls[1:])))

    assert curve(0.40, 0.60, 0.75, 0.78, 0.80).advised_split() == 64  # within 5 points of the best (256's)
    assert curve(0.40, 0.78, 0.79, 0.80, 0.81).advised_split() == 32
    assert curve(0.40, 0.50, 0.60, 0.70, 0.80).advised_split() == 256  # never flattens: the largest measured
    assert curve(0.80, 0.81, 0.82, 0.83, 0.84).advised_split() == 0  # all projected is as good
    assert HeldOut(1, 1.0, 2.0, (1.5,), ()).advised_split() == 0  # an alignment from before splits were measured


def test_recompute_last_over_a_native_artifact_changes_nothing(pair, tmp_path):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(CONTEXT)
    run_cli("prefill", "-m", str(pair["small"]), "-c", str(ctx), "-o", str(tmp_path / "own.kv"), "--chunk-size", "32", check=True)
    args = ("-m", str(pair["small"]), "--kv", str(tmp_path / "own.kv"), "--prompt", "Go on.", "--max-new-tokens", "8", "--json")
    plain = json.loads(run_cli("decode", *args, check=True).stdout)
    split = json.loads(run_cli("decode", *args, "--recompute-last", "70", check=True).stdout)
    assert split["text"] == plain["text"] and split["path"] == "partial"


def test_refinement_repairs_maps_whose_attention_output_is_off(pair, tmp_path):
    large, small = load_model(str(pair["large"])), load_model(str(pair["small"]))
    alignment = load_alignment(pair["align"])
    paths = sorted((pair["root"] / "calib").iterdir())
    windows, names = A.calibration_windows(small.tokenizer, paths, 160, 5)
    cal, _ = A.calibrate(lambda: large, lambda: small, windows, names, A.Spill(tmp_path), heldout=1, continuation=32,
                         rows_per_window=64, sink=1, full_windows=3)
    for name in list(alignment.maps):
        if name.startswith(("0.value", "1.value", "2.value")):
            alignment.maps[name] = alignment.maps[name] * 0.3  # values far too small: attention outputs shrink
    _, report = A.refine_maps(small, alignment, cal.full_fit, cal.full_test, steps=60)
    assert all(report["kept"])
    assert all(after < 0.9 * before for before, after in zip(report["before"], report["after"]))


def test_align_holds_one_model_at_a_time_and_cleans_its_spill(pair, celslm_home):
    """The large model is gone before the small one loads (their weights never share memory), and the
    features spilled to disk meanwhile are removed."""
    loaded, alive_at_load = {}, []

    def load(spec, progress=None):
        alive_at_load.append(sorted(name for name, model in loaded.items() if model() is not None))
        result = load_model(spec, progress)
        loaded[spec] = weakref.ref(result.model)
        return result

    options = A.AlignOptions(windows=5, window=160, heldout=1, continuation=32, rows_per_window=64, refine_steps=4,
                             refine_windows=2)
    alignment = A.align(str(pair["large"]), str(pair["small"]), sorted((pair["root"] / "calib").iterdir()), options,
                        load=load)
    assert alive_at_load == [[], []]
    assert len(alignment.heldout.hybrid_nll) == 4 and len(alignment.report["refine"]["kept"]) == 3
    assert list((celslm_home / "tmp").iterdir()) == []
