"""The deployment scripts under samples/, run for real against a serve-cache on loopback (tiny model)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from celslm.testing import netns
from tests.conftest import CONTEXT
from tests.netutil import Server

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
CLI_SHIM = "#!/bin/sh\nexec {python} -m celslm \"$@\"\n"


@pytest.fixture
def env(tiny_qwen, tmp_path, celslm_home):
    shim = tmp_path / "celslm"
    shim.write_text(CLI_SHIM.format(python=sys.executable))
    shim.chmod(0o755)
    return {**os.environ, "CELSLM": str(shim), "CELSLM_MODEL": str(tiny_qwen), "CELSLM_HOME": str(celslm_home)}


def refresh(context: Path, tag: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(SAMPLES / "cron" / "refresh-context.sh"), str(context), tag], capture_output=True,
                          text=True, env=env, timeout=300)


def tag_target(url: str, tag: str) -> str:
    return urllib.request.urlopen(f"{url}/v1/tags/{tag}", timeout=10).read().decode().strip()


def test_cron_refresh_is_quiet_idempotent_and_republishes_on_change(env, tmp_path):
    server = Server(tmp_path / "store")
    try:
        context = tmp_path / "ctx.txt"
        context.write_text(CONTEXT)
        env = {**env, "CELSLM_CLOUD": server.url}
        first = refresh(context, "ctx:nightly", env)
        assert (first.returncode, first.stdout, first.stderr) == (0, "", "")
        published = tag_target(server.url, "ctx:nightly")
        again = refresh(context, "ctx:nightly", env)
        assert (again.returncode, again.stdout, again.stderr) == (0, "", "")
        assert tag_target(server.url, "ctx:nightly") == published  # nothing recomputed, the tag did not move
        context.write_text(CONTEXT + "\ndef extra():\n    return 42\n")
        changed = refresh(context, "ctx:nightly", env)
        assert changed.returncode == 0 and tag_target(server.url, "ctx:nightly") != published
    finally:
        server.stop()


def test_cron_refresh_fails_loudly_when_the_cloud_is_down(env, tmp_path):
    context = tmp_path / "ctx.txt"
    context.write_text(CONTEXT)
    result = refresh(context, "ctx:nightly", {**env, "CELSLM_CLOUD": "http://127.0.0.1:9"})
    assert result.returncode == 1
    assert "failed" in result.stderr and "celslm: error" in result.stderr


def test_cron_refresh_never_overlaps_a_running_refresh(env, tmp_path, celslm_home):
    context = tmp_path / "ctx.txt"
    context.write_text(CONTEXT)
    (celslm_home / "refresh").mkdir(parents=True)
    with open(celslm_home / "refresh" / "ctx_nightly.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a run still going
        result = refresh(context, "ctx:nightly", {**env, "CELSLM_CLOUD": "http://127.0.0.1:9"})
    assert result.returncode == 75 and "still going" in result.stderr


def test_edge_ask_answers_from_the_cloud_and_without_it(env, tmp_path):
    server = Server(tmp_path / "store")
    context = tmp_path / "ctx.txt"
    context.write_text(CONTEXT)
    try:
        assert refresh(context, "ctx:live", {**env, "CELSLM_CLOUD": server.url}).returncode == 0
        ask = [str(SAMPLES / "edge" / "ask.sh"), "ctx:live", str(context), "What does greet return?"]
        online = subprocess.run(ask, capture_output=True, text=True, env={**env, "CELSLM_CLOUD": server.url}, timeout=300)
    finally:
        server.stop()
    assert online.returncode == 0 and "artifact" in online.stderr
    offline = subprocess.run(ask + ["http://127.0.0.1:9"], capture_output=True, text=True,
                             env={**env, "CELSLM_CLOUD": "http://127.0.0.1:9", "CELSLM_HOME": str(tmp_path / "other")},
                             timeout=300)
    assert offline.returncode == 0 and "recomputing" in offline.stderr
    assert offline.stdout == online.stdout  # the same answer, prefilled at the edge


@pytest.mark.skipif(netns.available() is not None, reason=f"network namespaces {netns.available()}")
def test_netns_walkthrough_runs_cloud_and_edge_as_two_hosts_and_cleans_up(env, tmp_path):
    context = tmp_path / "ctx.txt"
    context.write_text(CONTEXT * 4)
    result = subprocess.run([str(SAMPLES / "netns" / "walkthrough.sh"), str(context), "What does greet return?"],
                            capture_output=True, text=True, env={**env, "RATE": "20mbit"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    sources = [line for line in result.stdout.splitlines() if line.startswith("bytes by source:")]
    assert len(sources) == 2 and "10.47.0.1" in sources[0] and "local" in sources[1]
    assert "celslm-" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
