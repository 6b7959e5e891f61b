"""The command line as a user meets it: outputs, one-line errors and documented exit codes."""

from __future__ import annotations

import json

import pytest

from celslm.errors import EXIT_INTEGRITY, EXIT_UNAVAILABLE, EXIT_USAGE
from tests.conftest import CONTEXT, run_cli


@pytest.fixture(scope="module")
def artifact_dir(tiny_qwen, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    (folder / "ctx.txt").write_text(CONTEXT)
    out = run_cli("prefill", "-m", str(tiny_qwen), "-c", str(folder / "ctx.txt"), "-o", str(folder / "a.kv"),
                  "--chunk-size", "32", "--json", check=True)
    return folder / "a.kv", json.loads(out.stdout)


def assert_one_line_error(result, code: int, *words: str):
    stderr = result.stderr.decode()
    assert result.returncode == code, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("celslm: error:"), stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_prefill_json_reports_id_tokens_bytes_seconds(artifact_dir):
    path, summary = artifact_dir
    assert summary["id"].startswith("sha256:") and summary["tokens"] > 0 and summary["seconds"] > 0
    assert summary["bytes"] == sum(p.stat().st_size for p in (path / "blobs").iterdir())


def test_inspect_json_fields(artifact_dir):
    path, summary = artifact_dir
    info = json.loads(run_cli("inspect", str(path), "--json", check=True).stdout)
    for field in ("id", "space", "producer", "tokens", "layers", "chunk_size", "codec", "bytes"):
        assert field in info
    assert (info["id"], info["tokens"], info["bytes"], info["layers"], info["chunk_size"], info["codec"]) == \
        (summary["id"], summary["tokens"], summary["bytes"], 3, 32, "none")


def test_verify_passes_then_fails_on_a_flipped_byte(artifact_dir, tmp_path):
    import shutil

    path, _ = artifact_dir
    copy = tmp_path / "copy.kv"
    shutil.copytree(path, copy)
    assert run_cli("verify", str(copy)).returncode == 0
    blob = sorted((copy / "blobs").iterdir())[3]
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    result = run_cli("verify", str(copy), "--json")
    assert result.returncode == EXIT_INTEGRITY
    report = json.loads(result.stdout)
    assert report["ok"] is False and len(report["problems"]) == 1 and blob.name in report["problems"][0]


def test_decode_refuses_a_corrupt_blob_naming_it(artifact_dir, tmp_path, tiny_qwen):
    import shutil

    path, _ = artifact_dir
    copy = tmp_path / "copy.kv"
    shutil.copytree(path, copy)
    blob = max((copy / "blobs").iterdir(), key=lambda p: p.stat().st_size)
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")
    result = run_cli("decode", "-m", str(tiny_qwen), "--kv", str(copy), "-p", "hi")
    assert_one_line_error(result, EXIT_INTEGRITY, blob.name, "corrupt")
    assert result.stdout == b""  # no tokens from a bad cache


def test_decode_refuses_another_model_space(artifact_dir, tiny_llama):
    path, _ = artifact_dir
    result = run_cli("decode", "-m", str(tiny_llama), "--kv", str(path), "-p", "hi")
    assert_one_line_error(result, EXIT_USAGE, "model space")


def test_decode_refuses_a_truncated_stream(artifact_dir, tiny_qwen):
    path, _ = artifact_dir
    stream = run_cli("prefill", "-m", str(tiny_qwen), "-c", str(path.parent / "ctx.txt"), "-o", "-", check=True).stdout
    result = run_cli("decode", "-m", str(tiny_qwen), "--kv", "-", "-p", "hi", input=stream[: len(stream) * 2 // 3])
    assert_one_line_error(result, EXIT_INTEGRITY, "truncated")


def test_prompt_from_stdin_and_sampling_with_seed_is_repeatable(artifact_dir, tiny_qwen):
    path, _ = artifact_dir
    args = ("decode", "-m", str(tiny_qwen), "--kv", str(path), "-p", "-", "-n", "12", "--temperature", "1.0",
            "--top-p", "0.9", "--seed", "7", "--json")
    first = json.loads(run_cli(*args, input=b"Tell me.", check=True).stdout)
    second = json.loads(run_cli(*args, input=b"Tell me.", check=True).stdout)
    assert first["text"] == second["text"] and first["new_tokens"] == second["new_tokens"] > 0


def test_bad_inputs_exit_2_with_one_line(tiny_qwen, tmp_path):
    assert_one_line_error(run_cli("prefill", "-m", "no-such-model", "-c", "-", "-o", str(tmp_path / "o"), input=b"x"), EXIT_USAGE, "no-such-model")
    assert_one_line_error(run_cli("prefill", "-m", str(tiny_qwen), "-c", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "o")),
                          EXIT_USAGE, "missing.txt")
    assert_one_line_error(run_cli("decode", "-m", str(tiny_qwen), "-p", "hi"), EXIT_USAGE, "--kv")
    assert_one_line_error(run_cli("inspect", str(tmp_path / "nothing.kv")), EXIT_USAGE, "nothing.kv")
    assert_one_line_error(run_cli("models", "pull", "gpt-9"), EXIT_USAGE, "gpt-9")
    assert_one_line_error(run_cli("decode", "-m", str(tiny_qwen), "-c", "-", "-p", "hi", "--link", "fast", input=b"x"),
                          EXIT_USAGE, "--link: bad link 'fast'")
    assert_one_line_error(run_cli("serve-cache", "--backend", "localhost:6379"), EXIT_USAGE, "expected redis://")
    for flag, value, says in (("--top-p", "0", "top-p must be in (0, 1]"), ("--temperature", "inf", "finite")):
        assert_one_line_error(run_cli("decode", "-m", str(tiny_qwen), "-c", "-", "-p", "hi", flag, value, input=b"x"),
                              EXIT_USAGE, says)
    assert not (tmp_path / "o").exists()


def test_an_existing_output_is_kept_and_the_error_says_how_to_replace_it(artifact_dir, tmp_path):
    path, _ = artifact_dir
    (tmp_path / "b.kv").mkdir()
    (tmp_path / "b.kv" / "manifest.json").write_text("{}")
    result = run_cli("compress", str(path), "-o", str(tmp_path / "b.kv"), "--codec", "int8")
    assert_one_line_error(result, EXIT_USAGE, "already exists; choose another --out, or pass --force")
    assert (tmp_path / "b.kv" / "manifest.json").read_text() == "{}"


def test_bundled_model_not_installed_says_how_to_pull():
    assert_one_line_error(run_cli("decode", "-m", "smollm2-135m", "--kv", "x", "-p", "hi"), EXIT_USAGE,
                          "celslm models pull smollm2-135m")


def test_hub_id_offline_fails_with_one_line():
    result = run_cli("prefill", "-m", "some-org/some-model", "-c", "-", "-o", "x.kv", input=b"text",
                     env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(result, EXIT_UNAVAILABLE, "some-org/some-model", "offline")


def test_debug_env_shows_the_traceback():
    result = run_cli("models", "pull", "gpt-9", env={"CELSLM_DEBUG": "1"}, subprocess_=True)  # the traceback ends the process
    assert result.returncode != 0 and b"Traceback" in result.stderr


def test_models_list_json_names_the_bundled_models():
    rows = json.loads(run_cli("models", "list", "--json", check=True).stdout)
    assert [r["name"] for r in rows] == ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
    assert all(r["installed"] is False for r in rows)  # the tests' CELSLM_HOME is empty


# ---------------------------------------------------------------- one dialect, one security default


def test_serve_cache_beyond_loopback_needs_a_write_token_or_open_writes_on_purpose(tmp_path):
    from tests.netutil import Server, free_port

    for args in (("--host", "0.0.0.0"), ("--host", "192.0.2.1"), ("--host", "::")):
        result = run_cli("serve-cache", "--root", str(tmp_path / "store"), "--port", str(free_port()), *args)
        assert_one_line_error(result, EXIT_USAGE, f"--host {args[1]} is not loopback", "--write-token", "--allow-open-writes")
    assert not (tmp_path / "store").exists()  # refused before the store is made
    assert_one_line_error(run_cli("serve-cache", "--host", "0.0.0.0", "--write-token", "w", "--allow-open-writes"),
                          EXIT_USAGE, "contradict")
    server = Server(tmp_path / "store", "--host", "0.0.0.0", "--allow-open-writes")  # on purpose: it starts
    try:
        assert server.proc.poll() is None
    finally:
        server.stop()
    assert b"writes open" in server.proc.stderr.read()


def test_every_byte_budget_error_names_its_flag(tmp_path):
    cases = [(("serve-cache", "--capacity", "lots"), "--capacity"), (("serve-cache", "--max-blob", "1 parsec"), "--max-blob"),
             (("serve-cache", "--memory-cache", "-5MB"), "--memory-cache"),
             (("serve", "-m", "no-such-model", "--memory-cache", "much"), "--memory-cache"),
             (("pull", "x:latest", "-o", str(tmp_path / "x.kv"), "--cache-capacity", "big"), "--cache-capacity")]
    for args, flag in cases:
        assert_one_line_error(run_cli(*args), EXIT_USAGE, f"{flag}: bad size")


def test_old_spellings_still_work_for_a_release_with_a_warning_and_clash_with_the_new_one():
    result = run_cli("serve", "-m", "no-such-model", "--cache-bytes", "much")
    stderr = result.stderr.decode()
    assert result.returncode == EXIT_USAGE
    assert "warning: --cache-bytes is renamed --memory-cache" in stderr and "--memory-cache: bad size 'much'" in stderr
    assert_one_line_error(run_cli("serve", "-m", "x", "--max-tokens", "5", "--max-new-tokens", "7"), EXIT_USAGE,
                          "--max-tokens is the old spelling of --max-new-tokens")
    assert b"--cache-bytes" not in run_cli("serve", "--help").stdout  # hidden from --help
    assert run_cli("serve", "-m", "x", "--max-tokens", "0").returncode == EXIT_USAGE  # checked as the new flag is


def test_serve_token_typed_without_api_token_is_refused_not_guessed():
    result = run_cli("serve", "-m", "no-such-model", "--token", "t")
    assert_one_line_error(result, EXIT_USAGE, "--token is now the serve-cache token", "--api-token", "CELSLM_TOKEN")
    assert_one_line_error(run_cli("serve", "-m", "x", "--api-token", "a", "--token", "t", "--cache-token", "c"),
                          EXIT_USAGE, "old spelling")
    beyond = run_cli("serve", "-m", "x", "--host", "0.0.0.0", env={"CELSLM_TOKEN": "only-the-cache-token"})
    assert_one_line_error(beyond, EXIT_USAGE, "not loopback", "--api-token")  # the serve-cache token opens no API


@pytest.mark.parametrize("typed, given, expected, warns", [
    ({"api_token", "token"}, ("a", "t", None), ("a", "t"), False),  # the new dialect
    (set(), ("a", "t", None), ("a", "t"), False),  # both from the environment: CELSLM_API_TOKEN and CELSLM_TOKEN
    ({"token"}, (None, "t", "c"), ("t", "c"), True),  # the old: serve --token T --cache-token C
    (set(), (None, None, "c"), (None, "c"), True),  # --cache-token alone
    (set(), ("a", "env", "c"), ("a", "c"), True),  # --cache-token over CELSLM_TOKEN
    ({"token"}, ("env", "t", None), ("env", "t"), False),  # --token beside CELSLM_API_TOKEN (new): the new dialect
])
def test_serve_reads_old_and_new_token_spellings(typed, given, expected, warns, capsys):
    from types import SimpleNamespace

    from celslm.commands.serve import _tokens

    ctx = SimpleNamespace(get_parameter_source=lambda name: SimpleNamespace(
        name="COMMANDLINE" if name in typed else "ENVIRONMENT"))
    assert _tokens(ctx, *given) == expected
    assert ("warning" in capsys.readouterr().err) == warns


def test_decode_needs_a_model_unless_a_server_answers():
    assert_one_line_error(run_cli("decode", "--kv", "x.kv", "-p", "hi"), EXIT_USAGE, "--model")


def test_decode_server_refuses_typed_local_settings_but_not_the_environment_set_for_local_decodes():
    ask = ("decode", "--server", "http://127.0.0.1:9", "--kv", "sha256:" + "0" * 64, "-p", "hi")
    assert_one_line_error(run_cli(*ask, "--cloud", "http://c:8470", "--token", "t"), EXIT_USAGE,
                          "--cloud, --token are the service's own settings")
    unreachable = run_cli(*ask, env={"CELSLM_CLOUD": "http://c:8470", "CELSLM_TOKEN": "t"})  # asks the service
    assert_one_line_error(unreachable, EXIT_UNAVAILABLE, "127.0.0.1:9")


def test_an_artifact_no_tier_holds_is_not_found_exit_2_and_an_unreachable_tier_is_exit_4(tiny_qwen, tmp_path):
    from tests.netutil import Server

    server = Server(tmp_path / "store")
    try:
        for ref, says in (("nosuch:latest", "no tag 'nosuch:latest'"), ("sha256:" + "0" * 64, "not found")):
            assert_one_line_error(run_cli("pull", ref, "--cloud", server.url, "-o", str(tmp_path / "x.kv")), EXIT_USAGE,
                                  says)
        assert_one_line_error(run_cli("decode", "-m", str(tiny_qwen), "--kv", "nosuch:latest", "--cloud", server.url,
                                      "-p", "hi"), EXIT_USAGE, "no tag 'nosuch:latest'")
    finally:
        server.stop()
    down = run_cli("decode", "-m", str(tiny_qwen), "--kv", "nosuch:latest", "--cloud", "http://127.0.0.1:9", "-p", "hi")
    assert_one_line_error(down, EXIT_UNAVAILABLE, "nosuch:latest")
    assert not (tmp_path / "x.kv").exists()


def test_prefill_chooses_its_engine_as_decode_does_and_transformers_for_align(tmp_path, aligned_pair):
    pytest.importorskip("llama_cpp")
    from tests.tiny import save_tiny_gguf

    gguf = save_tiny_gguf(tmp_path / "tiny.gguf", "qwen2", seed=5)
    (tmp_path / "ctx.txt").write_text(CONTEXT)
    args = ("prefill", "-c", str(tmp_path / "ctx.txt"), "--json")
    auto = json.loads(run_cli(*args, "-m", str(gguf), "-o", str(tmp_path / "a.kv"), check=True).stdout)
    assert auto["engine"] == "llama.cpp"  # a .gguf runs as it is, like decode's default
    pinned = json.loads(run_cli(*args, "-m", str(gguf), "-o", str(tmp_path / "t.kv"), env={"CELSLM_ENGINE": "transformers"},
                                check=True).stdout)
    assert pinned["engine"] == "transformers" and pinned["tokens"] == auto["tokens"]
    cross = json.loads(run_cli(*args, "-m", str(aligned_pair["large"]), "--align", str(aligned_pair["align"]),
                               "-o", str(tmp_path / "x.kv"), check=True).stdout)
    assert cross["engine"] == "transformers"
    assert_one_line_error(run_cli(*args, "-m", str(gguf), "--align", str(aligned_pair["align"]), "--engine", "llama.cpp",
                                  "-o", str(tmp_path / "y.kv")), EXIT_USAGE, "--align runs on --engine transformers")

def test_bench_old_spellings_still_work_for_one_release_with_a_warning(tmp_path):
    """`--new-tokens` (now --max-new-tokens) is hidden but taken, with a warning; both at once is a usage error."""
    old = run_cli("bench", "report", "--from", str(tmp_path / "absent.json"), "--out", str(tmp_path / "r"), "--new-tokens", "4")
    stderr = old.stderr.decode()
    assert "--new-tokens is renamed --max-new-tokens" in stderr and "not a saved suite" in stderr
    assert old.returncode == EXIT_USAGE
    both = run_cli("bench", "report", "--from", str(tmp_path / "absent.json"), "--out", str(tmp_path / "r"),
                   "--new-tokens", "4", "-n", "4")
    assert_one_line_error(both, EXIT_USAGE, "give only --max-new-tokens")
    assert "--new-tokens" not in run_cli("bench", "report", "--help").stdout.decode()
    assert "--context " not in run_cli("bench", "compress", "--help").stdout.decode()  # counts are --tokens
