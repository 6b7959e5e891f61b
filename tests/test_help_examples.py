"""Every example in every command's --help, as a user would paste it.

Each `celslm …` in an example is parsed by the command it names (types, ranges, required options), and
may use only the flags that command shows: a renamed, hidden or made-up flag fails. An example that needs
neither a model nor the network runs as written, in a shell, against tiny fixtures (a tiny model's
artifacts, keys, codebook, a TLS pair); a serve-cache example starts in a network namespace of its own
and must answer its health route. Benchmarks are parsed, not run: they take minutes on real models.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import typer.core
import typer.main

from celslm.commands.main import app
from tests.conftest import CONTEXT, run_cli

EXAMPLE = re.compile(r"\[cyan\]\$ (.*?)\[/cyan\]")  # how commands.common.examples writes each line
ROOT = typer.main.get_command(app)
SEPARATORS = {"|", "||", "&&", ";", "&"}
REDIRECTS = {">", ">>", "<"}
MODEL_FLAGS = {"-m", "--model", "--llm", "--slm"}
NEEDS_NETWORK = {("models", "pull")}  # downloads wheels from PyPI
RUNS_ALONE = {"celslm", "jq", "echo"}  # programs an example may pipe through and still run here
ENV = {"TOKEN": "s3cret", "API_TOKEN": "api-s3cret", "CACHE_TOKEN": "s3cret"}  # what "$TOKEN" and the like stand for


def walk(command: typer.core.TyperCommand = ROOT, path: tuple[str, ...] = ()):
    """Every command and group under `celslm`, with its path (("bench", "serve"), …)."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from walk(sub, (*path, name))


def all_examples() -> list:
    return [pytest.param(line, id=f"{' '.join(path)}-{index}")
            for path, command in walk() for index, line in enumerate(EXAMPLE.findall(command.epilog or ""))]


def stages(line: str) -> list[list[str]]:
    """The simple commands of a shell line (pipes, && and ; split it; redirections and comments dropped)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    found, current, tokens = [], [], iter(lexer)
    for token in tokens:
        if token in SEPARATORS:
            found.append(current)
            current = []
        elif token in REDIRECTS:
            next(tokens, None)
        else:
            current.append(token)
    return [stage for stage in found + [current] if stage]


def invocations(line: str) -> list[tuple[dict[str, str], list[str]]]:
    """Each `celslm …` in a line: the variables set before it, and its arguments (also after `ssh HOST`)."""
    found = []
    for stage in stages(line):
        if "celslm" not in stage:
            continue
        at = stage.index("celslm")
        env = dict(word.split("=", 1) for word in stage[:at] if re.fullmatch(r"[A-Z_]+=.*", word))
        found.append((env, stage[at + 1:]))
    return found


def parse(args: list[str], env: dict[str, str] | None = None) -> tuple[tuple[str, ...], typer.Context]:
    """The command `celslm ARGS` names and its parsed parameters; an AssertionError or a click error says
    what is wrong. Nothing runs."""
    command, path, args = ROOT, (), list(args)
    while isinstance(command, typer.core.TyperGroup):
        assert args and args[0] in command.commands, f"celslm {' '.join(path)} has no command {args[:1]}"
        command, path = command.commands[args[0]], (*path, args.pop(0))
    hidden = {opt for param in command.params if getattr(param, "hidden", False) for opt in param.opts}
    used = {arg.split("=", 1)[0] for arg in args if arg.startswith("-") and arg != "-"}
    assert not used & hidden, f"celslm {' '.join(path)}: {sorted(used & hidden)} is an old spelling, hidden from --help"
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        return path, command.make_context(f"celslm {' '.join(path)}", args)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def command_path(args: list[str]) -> tuple[str, ...]:
    command, path = ROOT, ()
    for arg in args:
        if not isinstance(command, typer.core.TyperGroup) or arg not in command.commands:
            break
        command, path = command.commands[arg], (*path, arg)
    return path


def needs_model_or_network(line: str) -> bool:
    programs = {next(word for word in stage if not re.fullmatch(r"[A-Z_]+=.*", word)) for stage in stages(line)}
    return "://" in line or not programs <= RUNS_ALONE or any(
        command_path(args)[:1] == ("bench",) or command_path(args) in NEEDS_NETWORK
        or MODEL_FLAGS & {arg.split("=", 1)[0] for arg in args} for _, args in invocations(line))


def without_comment(line: str) -> str:
    """The line less a trailing `# comment` (a # that starts a word outside quotes)."""
    quote, after_space = None, True
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and after_space:
            return line[:index].rstrip()
        after_space = char.isspace()
    return line


EXAMPLES = all_examples()
RUNNABLE = [param for param in EXAMPLES if not needs_model_or_network(param.values[0])]


@pytest.fixture(autouse=True)
def no_celslm_environment(monkeypatch):
    """An example must stand on its own: no CELSLM_MODEL or the like fills in what it leaves out."""
    for name in list(os.environ):
        if name.startswith("CELSLM_") and name != "CELSLM_HOME":
            monkeypatch.delenv(name)


def test_every_command_shows_examples():
    bare = [" ".join(path) for path, command in walk() if not isinstance(command, typer.core.TyperGroup)
            and not EXAMPLE.search(command.epilog or "")]
    assert not bare, f"commands without examples in --help: {bare}"
    assert len(RUNNABLE) >= 15  # the run below covers real ground, not an empty list


@pytest.mark.parametrize("line", EXAMPLES)
def test_every_example_uses_only_commands_and_flags_that_exist(line):
    for env, args in invocations(line):
        parse(args, env)
    for stage in stages(line):  # the service wants JSON bodies labelled as such (415 otherwise)
        if stage[0] == "curl" and "-d" in stage:
            assert "Content-Type: application/json" in stage, f"{line!r} posts JSON without its Content-Type"
    assert invocations(line) or any(stage[0] == "curl" for stage in stages(line)), f"nothing checkable in {line!r}"


@pytest.mark.parametrize("line, says", [
    ("celslm inspect sched.kv --made-up-flag", "No such option"),
    ("celslm verify sched.kv --trust", "requires an argument"),
    ("celslm serve-cache --port 99999", "65535"),
    ("celslm pusher sched.kv http://cloud:8470", "no command"),
    ("celslm serve -m x --cache-bytes 1GB", "old spelling"),
    ("celslm prefill -m M -c doc.txt -o x.kv | celslm decode -m M --kv - -p hi --max-tokens 5", "No such option"),
    ("celslm prefill -c doc.txt -o x.kv", "Missing option '--model'"),
    ("curl -s localhost:8480/v1/completions -d '{}'", "without its Content-Type"),
])
def test_the_check_fails_on_a_flag_or_command_that_does_not_exist(line, says):
    with pytest.raises((AssertionError, typer.TyperException)) as caught:
        test_every_example_uses_only_commands_and_flags_that_exist(line)
    message = caught.value.format_message() if isinstance(caught.value, typer.TyperException) else str(caught.value)
    assert says in message


def test_the_split_finds_each_celslm_of_a_pipeline_and_drops_comments_and_redirections():
    line = "celslm prefill -m M -c doc.txt -o - | ssh edge celslm decode --kv - -p 'Why? #1' > out.txt   # a note"
    assert invocations(line) == [({}, ["prefill", "-m", "M", "-c", "doc.txt", "-o", "-"]),
                                 ({}, ["decode", "--kv", "-", "-p", "Why? #1"])]
    assert invocations("CELSLM_WRITE_TOKEN=s3cret celslm serve-cache --host 0.0.0.0") == \
        [({"CELSLM_WRITE_TOKEN": "s3cret"}, ["serve-cache", "--host", "0.0.0.0"])]
    assert needs_model_or_network(line) and not needs_model_or_network("celslm inspect sched.kv --json | jq .bytes")
    assert without_comment("celslm keys generate --out a   # writes a.key # and a.pub") == "celslm keys generate --out a"
    assert without_comment("celslm decode -p 'Why #1?' # why") == "celslm decode -p 'Why #1?'"


# ---------------------------------------------------------------- running them


@pytest.fixture(scope="module")
def fixtures(tiny_qwen, tmp_path_factory) -> Path:
    """What the runnable examples name, made with a tiny model: keys, sched.kv (signed by cloud.key),
    notes.kv (encrypted for edge1.pub), coder.codebook and the machine's own codebook, a TLS pair."""
    folder = tmp_path_factory.mktemp("help-fixtures")
    home = folder / ".home"
    env = {"CELSLM_HOME": str(home)}
    (folder / "doc.txt").write_text(CONTEXT * 2)
    (folder / "tenants.toml").write_text(f'[tenants.acme]\ntoken_sha256 = "{"0" * 64}"\nquota = "10GB"\n')
    run = lambda *args: run_cli(*args, env=env, check=True)  # noqa: E731
    run("keys", "generate", "--out", str(folder / "cloud"))
    run("keys", "generate", "--out", str(folder / "edge1"), "--for", "encryption")
    run("prefill", "-m", str(tiny_qwen), "-c", str(folder / "doc.txt"), "-o", str(folder / "sched.kv"),
        "--chunk-size", "32", "--sign", str(folder / "cloud.key"))
    run("prefill", "-m", str(tiny_qwen), "-c", str(folder / "doc.txt"), "-o", str(folder / "notes.kv"),
        "--chunk-size", "32", "--encrypt-to", str(folder / "edge1.pub"), "--sign", str(folder / "cloud.key"))
    calibration = ("--files", "2", "--tokens", "64", "--probe-files", "1")
    run("calibrate", "-m", str(tiny_qwen), *calibration)  # this machine's: compress finds it for balanced and small
    run("calibrate", "-m", str(tiny_qwen), "--out", str(folder / "coder.codebook"), *calibration)
    _tls_pair(folder / "cert.pem", folder / "key.pem")
    shim = folder / ".bin" / "celslm"
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m celslm \"$@\"\n")
    shim.chmod(0o755)
    return folder


def _tls_pair(cert_path: Path, key_path: Path) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


def workdir(fixtures: Path, line: str, into: Path) -> dict[str, str]:
    """A fresh folder holding the fixtures the line names (an output it writes, like keys generate's, is
    not there yet); the environment to run it in."""
    named = {word for stage in stages(line) for word in stage}
    for path in fixtures.iterdir():
        if path.name in named:
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, into / path.name)
    return {**{k: v for k, v in os.environ.items() if not k.startswith("CELSLM_")}, **ENV,
            "PATH": f"{fixtures / '.bin'}{os.pathsep}{os.environ['PATH']}", "CELSLM_HOME": str(fixtures / ".home")}


def network_namespace() -> str | None:
    """Why a private network namespace (its own loopback and ports) cannot be had, or None."""
    if not shutil.which("unshare") or not shutil.which("curl"):
        return "needs unshare and curl"
    probe = subprocess.run(["unshare", "-rn", "ip", "link", "set", "lo", "up"], capture_output=True)
    return None if probe.returncode == 0 else f"unshare -rn: {probe.stderr.decode().strip()[:100]}"


@pytest.mark.parametrize("line", RUNNABLE)
def test_an_example_that_needs_no_model_or_network_runs_as_written(line, fixtures, tmp_path):
    env = workdir(fixtures, line, tmp_path)
    servers = [(path, ctx) for path, ctx in (parse(args, e) for e, args in invocations(line)) if path == ("serve-cache",)]
    if servers:
        return _serve_briefly(line, servers[0][1], env, tmp_path)
    result = subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"{line}\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr and "warning" not in result.stderr, result.stderr[-2000:]


def _serve_briefly(line: str, parsed: typer.Context, env: dict[str, str], cwd: Path) -> None:
    """Start the server as written in a network namespace of its own, wait for its health route, stop it."""
    why = network_namespace()
    if why:
        pytest.skip(f"a serve-cache example listens on a fixed port: {why}")
    scheme = "https" if parsed.params.get("tls_cert") else "http"
    url = f"{scheme}://127.0.0.1:{parsed.params['port']}/v1/health"
    script = (f"ip link set lo up\n{without_comment(line)} &\nserver=$! up=1\n"
              f"for _ in $(seq 300); do curl -skf -o /dev/null {url} && up=0 && break; kill -0 $server 2>/dev/null || break; sleep 0.1; done\n"
              "kill -TERM $server 2>/dev/null; wait $server\nexit $up\n")
    with open(cwd / "server.log", "w+") as log:
        shell = subprocess.Popen(["unshare", "-rn", "bash", "-c", script], cwd=cwd, env=env, stdout=log, stderr=log,
                                 start_new_session=True)
        try:
            up = shell.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(shell.pid, signal.SIGKILL)  # only the group this example started
            shell.wait()
            raise
        log.seek(0)
        output = log.read()
    assert up == 0, f"{line}\n{output[-2000:]}"
    assert "Traceback" not in output and "warning" not in output, output[-2000:]
