"""bench link: real kernel shaping (Linux, root). serve-cache runs in one network namespace, decode in
the other, over a veth pair shaped by tc (`celslm.testing.netns`); every process, both namespaces and
the veth pair are created here and removed afterwards. Figures are labelled emulated (kernel).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from rich.table import Table

from celslm.errors import UnavailableError
from celslm.testing.netns import CLOUD_IP, ShapedPair
from celslm.testing.processes import CLI

PORT = 8470


def run(model: str, context_file: Path, prompt: str, rate: str = "100mbit", rtt_ms: float = 20.0,
        codec: str = "balanced", new_tokens: int = 16) -> dict:
    """Prefill + compress + push in the cloud namespace, then decode in the edge namespace over the shaped veth."""
    work = Path(tempfile.mkdtemp(prefix="celslm-netns-"))
    # serve-cache listens beyond loopback (the veth), so writes take a token
    env = {**os.environ, "CELSLM_HOME": os.environ.get("CELSLM_HOME", str(Path.home() / ".cache" / "celslm")),
           "CELSLM_WRITE_TOKEN": secrets.token_hex(16)}
    try:
        with ShapedPair(rate, rtt_ms) as pair:
            server = subprocess.Popen(["ip", "netns", "exec", pair.cloud, *CLI, "serve-cache", "--root", str(work / "store"),
                                       "--host", CLOUD_IP, "--port", str(PORT)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                return _measure(pair, server, work, env, model, context_file, prompt, codec, new_tokens)
            finally:
                server.terminate()
                server.wait(timeout=30)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(pair: ShapedPair, server, work: Path, env: dict, model: str, context_file: Path, prompt: str,
             codec: str, new_tokens: int) -> dict:
    url = f"http://{CLOUD_IP}:{PORT}"
    deadline = time.monotonic() + 60
    while pair.run(pair.cloud, ["python3", "-c", f"import urllib.request; urllib.request.urlopen('{url}/v1/health')"],
                   env).returncode != 0:
        if time.monotonic() > deadline or server.poll() is not None:
            raise UnavailableError("serve-cache did not start in the cloud namespace")
        time.sleep(0.5)
    steps = [
        ["prefill", "-m", model, "-c", str(context_file), "-o", str(work / "ctx.kv")],
        ["compress", str(work / "ctx.kv"), "-o", str(work / "small.kv"), "--codec", codec],
        ["push", str(work / "small.kv"), url, "--tag", "bench", "--token", env["CELSLM_WRITE_TOKEN"]],
    ]
    for step in steps:
        done = pair.run(pair.cloud, CLI + step, env)
        if done.returncode:
            raise UnavailableError(f"cloud step {step[0]} failed: {done.stderr.decode()[-300:]}")
    edge_env = {**env, "CELSLM_HOME": str(work / "edge-home")}
    (work / "edge-home" / "models").mkdir(parents=True)
    models = Path(env["CELSLM_HOME"]) / "models"
    if models.is_dir():  # the edge has the model installed, but no cached KV
        for entry in models.iterdir():
            (work / "edge-home" / "models" / entry.name).symlink_to(entry)
    results = {}
    for name, source in (("artifact+pipeline", ["--kv", "bench", "--cloud", url]),
                         ("edge-only", ["--context", str(context_file)])):
        done = pair.run(pair.edge, CLI + ["decode", "-m", model, *source, "-p", prompt, "-n", str(new_tokens),
                                          "--json"], edge_env)
        if done.returncode:
            raise UnavailableError(f"edge decode ({name}) failed: {done.stderr.decode()[-300:]}")
        results[name] = json.loads(done.stdout)
    return {"link": pair.label, "codec": codec, "runs": results}


def render(result: dict) -> list:
    """The table and the TTFT ratio, as `bench link` prints them."""
    table = Table("path", "TTFT s", "total s", "T_com_C", "T_comm", "T_com_E", "hidden",
                  title=f"{result['link']}, codec {result['codec']}")
    for name, r in result["runs"].items():
        table.add_row(name, f"{r['ttft_s']:.2f}", f"{r['total_s']:.2f}", f"{r['t_com_c_s']:.2f}", f"{r['t_comm_s']:.2f}",
                      f"{r['t_com_e_s']:.2f}", f"{r['hidden_share']:.0%}")
    runs = result["runs"]
    return [table, f"time to first token: {runs['edge-only']['ttft_s'] / runs['artifact+pipeline']['ttft_s']:.1f}x "
                   "faster from the artifact"]
