"""Several artifacts in one context (issue 32): parts placed by rotation, link tokens computed over
what precedes them, all-or-none checks, on both engines and through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from celslm import compose
from celslm.artifact import DirectoryReader
from celslm.decode import context_from_ids
from celslm.models import load_model
from tests.conftest import CONTEXT, run_cli

PARTS = (CONTEXT, "def add(a, b):\n    return a + b\n\n" * 3, "class Stack:\n    def __init__(self):\n        self.items = []\n" * 2)


@pytest.fixture(scope="module")
def artifacts(tiny_qwen, tmp_path_factory):
    """Three contexts prefilled apart (lossless, chunks of 32)."""
    folder = tmp_path_factory.mktemp("parts")
    paths = []
    for index, text in enumerate(PARTS):
        (folder / f"p{index}.txt").write_text(text)
        run_cli("prefill", "-m", str(tiny_qwen), "-c", str(folder / f"p{index}.txt"), "-o", str(folder / f"p{index}.kv"),
                "--dtype", "float32", "--chunk-size", "32", check=True)
        paths.append(folder / f"p{index}.kv")
    return paths


@pytest.fixture(scope="module")
def loaded(tiny_qwen):
    return load_model(str(tiny_qwen))


def composed(loaded, paths, link_tokens):
    readers = [DirectoryReader(p) for p in paths]
    from celslm.stream import Timeline

    parts = compose.read_parts(loaded, readers, [Timeline() for _ in readers])
    framing = readers[0].manifest.framing
    return parts, compose.compose(loaded.engine, parts, compose.opening_ids(loaded.tokenizer, framing),
                                  compose.separator_ids(loaded.tokenizer), link_tokens)


def prefilled_layers(loaded, token_ids):
    context = context_from_ids(loaded, token_ids, framing="chat")
    return [tuple(np.asarray(x, dtype=np.float32) for x in layer) for layer in loaded.engine.context_layers(context.sequence)]


def test_parts_are_joined_by_the_separator_without_their_own_opening(loaded, artifacts):
    parts, result = composed(loaded, artifacts, 4)
    opening = compose.opening_ids(loaded.tokenizer, "chat")
    separator = compose.separator_ids(loaded.tokenizer)
    assert opening and parts[1].token_ids[: len(opening)] == opening
    expected = list(parts[0].token_ids)
    for part in parts[1:]:
        expected += separator + part.token_ids[len(opening):]
    assert result.token_ids == expected
    assert result.recomputed() == 2 * (len(separator) + 4)
    first = len(parts[0].token_ids)
    assert result.linked == [(first, first + len(separator) + 4),
                             (len(expected) - len(parts[2].token_ids) + len(opening) - len(separator),
                              len(expected) - len(parts[2].token_ids) + len(opening) + 4)]
    assert all(k.shape[1] == len(expected) == v.shape[1] for k, v in result.layers)


def test_with_every_token_linked_the_composition_is_the_prefill_of_the_joined_tokens(loaded, artifacts):
    """Link tokens covering whole parts leave only the first part's KV from its artifact: the rest is
    computed here over what precedes it, so the whole equals prefilling the joined ids."""
    _, result = composed(loaded, artifacts, 10_000)
    reference = prefilled_layers(loaded, result.token_ids)
    for (key, value), (rk, rv) in zip(result.layers, reference):
        np.testing.assert_allclose(key, rk, atol=2e-4)
        np.testing.assert_allclose(value, rv, atol=2e-4)


def test_a_part_past_its_link_tokens_keeps_its_own_kv_at_its_new_place(loaded, artifacts):
    """Keys are pre-RoPE: a part's own KV moves unchanged, and placing it rotates it to its new positions."""
    parts, result = composed(loaded, artifacts, 3)
    opening = len(compose.opening_ids(loaded.tokenizer, "chat"))
    separator = len(compose.separator_ids(loaded.tokenizer))
    start = len(parts[0].token_ids) + separator + 3  # the second part's first token not linked
    own = opening + 3
    count = len(parts[1].token_ids) - own
    for (key, value), (pk, pv) in zip(result.layers, parts[1].layers):
        np.testing.assert_array_equal(key[:, start : start + count], np.asarray(pk)[:, own:])
        np.testing.assert_array_equal(value[:, start : start + count], np.asarray(pv)[:, own:])
    # and the link tokens' KV is not the part's own (it attended to the first part)
    linked_key = result.layers[1][0][:, start - 3 : start]
    assert not np.allclose(linked_key, np.asarray(parts[1].layers[1][0])[:, opening : opening + 3], atol=1e-3)


def score(model, paths, *extra):
    args = [a for p in paths for a in ("--kv", str(p))]
    out = run_cli("score", "-m", str(model), *args, "--continuation", str(paths[0].parent / "p0.txt"), "--json", *extra,
                  check=True)
    return json.loads(out.stdout)


def test_decode_composes_every_kv_given_and_says_so(tiny_qwen, artifacts):
    """Repeated --kv used to keep the last one silently; now every artifact is read, in order."""
    out = json.loads(run_cli("decode", "-m", str(tiny_qwen), *[a for p in artifacts for a in ("--kv", str(p))],
                             "--link-tokens", "5", "-p", "What does greet return?", "-n", "4", "--json", check=True).stdout)
    ids = [DirectoryReader(p).id for p in artifacts]
    assert out["artifacts"] == ids and out["artifact"] is None and out["path"] == "composed"
    counts = [DirectoryReader(p).manifest.token_count for p in artifacts]
    separator = 2  # "\n\n" in the byte tokenizer
    opening = counts[0] - len(PARTS[0])  # the chat head, in bytes
    assert out["context_tokens"] == sum(counts) - 2 * opening + 2 * separator
    assert out["recomputed_tokens"] == 2 * (separator + 5)
    single = json.loads(run_cli("decode", "-m", str(tiny_qwen), "--kv", str(artifacts[0]), "-p", "What does greet return?",
                                "-n", "4", "--json", check=True).stdout)
    assert single["artifacts"] == [ids[0]] and single["artifact"] == ids[0]


@pytest.mark.parametrize("engine", ["transformers", "llama.cpp"])
def test_a_composition_linking_every_token_scores_as_prefilling_it_all(engine, tiny_gguf_parts):
    model, paths = tiny_gguf_parts
    linked = score(model, paths, "--link-tokens", "100000", "--engine", engine)
    recomputed = score(model, paths, "--recompute-last", "100000", "--engine", engine)
    unlinked = score(model, paths, "--link-tokens", "0", "--engine", engine)
    assert linked["nll"] == pytest.approx(recomputed["nll"], abs=2e-3)
    assert abs(unlinked["nll"] - linked["nll"]) > 1e-3  # the link tokens matter: the test can tell
    assert unlinked["recomputed_tokens"] == 2 * 2 and linked["recomputed_tokens"] > 100


@pytest.fixture(scope="module")
def tiny_gguf_parts(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from tests.tiny import save_tiny_gguf

    folder = tmp_path_factory.mktemp("gguf-parts")
    model = save_tiny_gguf(folder / "tiny.gguf", "qwen2", seed=3)
    paths = []
    for index, text in enumerate(PARTS):
        (folder / f"p{index}.txt").write_text(text)
        run_cli("prefill", "-m", str(model), "-c", str(folder / f"p{index}.txt"), "-o", str(folder / f"p{index}.kv"),
                "--chunk-size", "32", check=True)
        paths.append(folder / f"p{index}.kv")
    return model, paths


def test_parts_of_another_model_space_are_refused_naming_the_artifact(tiny_qwen, tiny_llama, artifacts, tmp_path):
    (tmp_path / "x.txt").write_text(CONTEXT)
    run_cli("prefill", "-m", str(tiny_llama), "-c", str(tmp_path / "x.txt"), "-o", str(tmp_path / "other.kv"), check=True)
    result = run_cli("decode", "-m", str(tiny_qwen), "--kv", str(artifacts[0]), "--kv", str(tmp_path / "other.kv"),
                     "-p", "Why?", "--json")
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "other.kv" in lines[0] and not result.stdout


def test_a_composition_past_the_models_window_is_refused_before_any_blob_is_read(tiny_gguf_parts, tmp_path):
    """The parts' declared lengths are summed from their manifests: a part whose blobs are gone is never
    reached, so the answer is the length, not a missing blob."""
    import shutil

    model, paths = tiny_gguf_parts
    long_text = "x = 1\n" * 90  # 540 bytes: two of them pass the tiny GGUF's 1,024 positions
    (tmp_path / "long.txt").write_text(long_text)
    run_cli("prefill", "-m", str(model), "-c", str(tmp_path / "long.txt"), "-o", str(tmp_path / "long.kv"), check=True)
    shutil.copytree(tmp_path / "long.kv", tmp_path / "gone.kv")
    for blob in (tmp_path / "gone.kv" / "blobs").rglob("*"):
        if blob.is_file():
            blob.unlink()
    result = run_cli("decode", "-m", str(model), "--kv", str(tmp_path / "long.kv"), "--kv", str(tmp_path / "gone.kv"),
                     "-p", "Why?")
    message = result.stderr.decode().strip()
    assert result.returncode == 2 and "positions" in message and "compose" in message and len(message.splitlines()) == 1


def test_every_part_is_checked_under_the_trust_policy(tiny_qwen, artifacts, tmp_path):
    run_cli("keys", "generate", "--out", str(tmp_path / "cloud"), check=True)
    (tmp_path / "s.txt").write_text(CONTEXT)
    run_cli("prefill", "-m", str(tiny_qwen), "-c", str(tmp_path / "s.txt"), "-o", str(tmp_path / "signed.kv"),
            "--sign", str(tmp_path / "cloud.key"), check=True)
    common = ["decode", "-m", str(tiny_qwen), "-p", "Why?", "-n", "2", "--trust", str(tmp_path / "cloud.pub")]
    assert run_cli(*common, "--kv", str(tmp_path / "signed.kv"), "--kv", str(tmp_path / "signed.kv")).returncode == 0
    refused = run_cli(*common, "--kv", str(tmp_path / "signed.kv"), "--kv", str(artifacts[1]))
    assert refused.returncode == 3 and "p1.kv" in refused.stderr.decode() and not refused.stdout


def test_the_service_composes_a_list_of_contexts_from_parts_kept_on_their_own(tiny_gguf_parts):
    """`"context": [A, B]` answers as `decode --kv A --kv B`; a new combination of parts already in memory
    is composed of them, asked by id (the service has no tier that could fetch an id: only its memory
    holds them), and a composition asked again comes back from memory."""
    openai = pytest.importorskip("openai")
    from tests.test_service import Service

    model, paths = tiny_gguf_parts
    ids = [DirectoryReader(p).id for p in paths]
    service = Service(model, "--memory-cache", "64MB", "--context-dir", str(paths[0].parent))
    try:
        def ask(context, **extra):
            return service.client().chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "What does greet return?"}], max_tokens=6,
                temperature=0, extra_body={"context": context, **extra})

        first = ask([p.name for p in paths[:2]], link_tokens=5)
        expected = json.loads(run_cli("decode", "-m", str(model), "--kv", str(paths[0]), "--kv", str(paths[1]),
                                      "--link-tokens", "5", "-p", "What does greet return?", "-n", "6", "--json",
                                      check=True).stdout)
        assert first.choices[0].message.content == expected["text"]
        assert first.model_extra["celslm"]["cache"] == "composed"
        assert first.model_extra["celslm"]["context_tokens"] == expected["context_tokens"]
        again = ask([p.name for p in paths[:2]], link_tokens=5)
        assert again.model_extra["celslm"]["cache"] in ("resident", "memory")
        assert again.choices[0].message.content == first.choices[0].message.content
        through = json.loads(run_cli("decode", "--server", service.url, "--kv", str(paths[0]), "--kv", str(paths[1]),
                                     "--link-tokens", "5", "-p", "What does greet return?", "-n", "6", "--json",
                                     check=True).stdout)
        assert list(through) == list(expected) and through["text"] == expected["text"]
        assert through["recomputed_tokens"] == expected["recomputed_tokens"] == 2 + 5
        assert through["artifacts"] == ids[:2] and through["artifact"] is None and through["path"] == "composed"
        swapped = ask([ids[1], ids[0]], link_tokens=5)
        assert swapped.model_extra["celslm"]["cache"] == "composed"
        assert service.get("/v1/health")["cached_contexts"] == 4  # two parts, two compositions
        with pytest.raises(openai.BadRequestError, match="link_tokens"):
            ask(paths[0].name, link_tokens=5)
    finally:
        assert service.stop() == 0


def test_bench_compose_measures_every_mode_over_the_same_tokens(tiny_gguf_parts, tmp_path):
    """With a lossless codec, one artifact of the concatenation, the edge's own prefill of it and the floor
    (every part after the first recomputed) are the same KV over the same ids: the same NLL. The warm
    service's rows come from where they say (each part fetched, then composed of parts it holds)."""
    from celslm.bench import compose as bench

    model, _ = tiny_gguf_parts
    loaded = load_model(str(model), engine="llama.cpp")
    result = bench.run(loaded, count=1, tokens=120, continuation=16, links=(0, 4), codec="lossless", max_new_tokens=2,
                       serve=str(model), work=tmp_path)
    assert result["served"]["requests"] == {"alone": 3, "composed": 1, "again": 1}
    rows = {row["key"]: row for row in result["rows"]}
    assert set(rows) == {"none", "last", "edge", "concat", "link0", "link4", f"link{compose.DEFAULT_LINK}", "floor"}
    assert rows["floor"]["nll"] == pytest.approx(rows["concat"]["nll"], abs=1e-3)
    assert rows["edge"]["nll"] == pytest.approx(rows["concat"]["nll"], abs=1e-3)
    assert rows["concat"]["gain_kept"] == 1.0 and rows["concat"]["edge_tokens"] == 0
    assert rows["link4"]["edge_tokens"] == 2 * (2 + 4) and rows["floor"]["edge_tokens"] > rows["link4"]["edge_tokens"]
    assert rows["link0"]["nll"] != rows["floor"]["nll"]


def test_parts_come_through_the_tiers_and_encrypted_parts_open_with_the_identity(tiny_qwen, artifacts, tmp_path):
    """One part by tag from a cloud store, one encrypted for this edge, one local file: composed as the
    three local plain parts are (the same tokens), and without the identity the sealed part is refused."""
    for name in ("cloud", "edge"):
        run_cli("keys", "generate", "--out", str(tmp_path / name), *(("--for", "encryption") if name == "edge" else ()),
                check=True)
    run_cli("push", str(artifacts[0]), str(tmp_path / "store"), "--tag", "first:latest", check=True)
    run_cli("prefill", "-m", str(tiny_qwen), "-c", str(artifacts[1].parent / "p1.txt"), "-o", str(tmp_path / "sealed.kv"),
            "--dtype", "float32", "--chunk-size", "32", "--encrypt-to", str(tmp_path / "edge.pub"), check=True)
    prompt = ["-p", "What does greet return?", "-n", "6", "--json"]
    plain = json.loads(run_cli("decode", "-m", str(tiny_qwen), *[a for p in artifacts for a in ("--kv", str(p))], *prompt,
                               check=True).stdout)
    mixed = run_cli("decode", "-m", str(tiny_qwen), "--kv", "first:latest", "--kv", str(tmp_path / "sealed.kv"),
                    "--kv", str(artifacts[2]), "--cloud", str(tmp_path / "store"), "--identity", str(tmp_path / "edge.key"),
                    *prompt, check=True)
    mixed = json.loads(mixed.stdout)
    assert mixed["text"] == plain["text"] and mixed["context_tokens"] == plain["context_tokens"]
    assert mixed["artifacts"][0] == plain["artifacts"][0] and mixed["bytes_by_source"]
    sealed = run_cli("decode", "-m", str(tiny_qwen), "--kv", str(artifacts[0]), "--kv", str(tmp_path / "sealed.kv"), *prompt)
    assert sealed.returncode == 2 and "sealed.kv" in sealed.stderr.decode() and not sealed.stdout


@pytest.mark.parametrize("engine", ["transformers", "llama.cpp"])
def test_an_unlinked_part_answers_at_its_new_place_as_the_concatenation_does(engine, tiny_gguf_parts):
    """With no link tokens a part keeps its own KV, only placed after the parts before it. Give the second
    part, as its own KV, the concatenation's KV at its positions: the composition must then predict a
    continuation exactly as the concatenation does. A part put at other positions fails here."""
    from celslm import prompting
    from celslm.decode import context_from_layers
    from celslm.score import continuation_logits

    model, _ = tiny_gguf_parts
    loaded = load_model(str(model), engine=engine)
    tokenizer = loaded.tokenizer
    opening, separator = compose.opening_ids(tokenizer, "chat"), compose.separator_ids(tokenizer)
    a, b = (prompting.context_ids(tokenizer, text, "chat") for text in PARTS[:2])
    joined = compose.joined_ids([a, b], opening, separator)
    full = prefilled_layers(loaded, joined)
    body = len(a) + len(separator)  # where the second part's text sits in the concatenation
    own = [tuple(np.concatenate([np.full_like(x[:, : len(opening)], 7.0), x[:, body:]], axis=1) for x in layer)
           for layer in full]
    first = [tuple(x[:, : len(a)] for x in layer) for layer in full]
    result = compose.compose(loaded.engine, [compose.Part("a", a, first), compose.Part("b", b, own)], opening, separator, 0)
    assert result.token_ids == joined
    follow = tokenizer("    return self.items\n", add_special_tokens=False)["input_ids"]
    got, _ = continuation_logits(loaded, context_from_layers(loaded, joined, result.layers, "chat"), follow)
    expected, _ = continuation_logits(loaded, context_from_layers(loaded, joined, full, "chat"), follow)
    np.testing.assert_allclose(got, expected, atol=2e-3)


def test_the_link_tokens_help_names_the_default_that_decode_uses():
    from celslm.commands.common import LinkTokensOpt

    assert f"Default: {compose.DEFAULT_LINK}," in LinkTokensOpt.__metadata__[0].help


@pytest.mark.parametrize("codec", ["int8+lz4", "pca:r=8+zstd"])
def test_a_compressed_part_composes_with_the_kv_its_codec_decodes_to(loaded, artifacts, tmp_path, codec):
    from celslm.blockread import open_context

    run_cli("compress", str(artifacts[1]), "--out", str(tmp_path / "small.kv"), "--codec", codec, check=True)
    parts, result = composed(loaded, [artifacts[0], tmp_path / "small.kv"], 3)
    _, layers = open_context(DirectoryReader(tmp_path / "small.kv"))
    for (index, key, value), (pk, pv) in zip(layers, parts[1].layers):
        np.testing.assert_array_equal(pk, key)
        np.testing.assert_array_equal(pv, value)
    assert result.token_ids[: len(parts[0].token_ids)] == parts[0].token_ids
