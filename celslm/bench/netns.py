"""Real kernel shaping (Linux, root): cloud and edge in two network namespaces joined by a veth pair,
the link shaped by `tc netem` (rate and delay), serve-cache in one and decode in the other.

Both namespaces, the veth pair and every process are created here and removed afterwards; the only
addresses used are the two ends of that veth pair. Figures are labelled emulated (kernel).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from celslm.errors import UnavailableError

CLOUD_IP, EDGE_IP = "10.231.0.1", "10.231.0.2"
CLI = [sys.executable, "-c", "from celslm.commands.main import run; run()"]


def available() -> str | None:
    """None if kernel shaping can run here, else why not."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs {tool} (Debian iproute2)"
    return None


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


class ShapedPair:
    """Two namespaces and a veth pair; `rate` and `delay` apply each way (RTT = 2 x delay)."""

    def __init__(self, rate: str, rtt_ms: float):
        tag = f"{os.getpid() % 100000}"
        self.cloud, self.edge = f"celslm-c{tag}", f"celslm-e{tag}"
        self.rate, self.delay_ms = rate, rtt_ms / 2
        self.qdisc = ""

    def __enter__(self) -> "ShapedPair":
        reason = available()
        if reason:
            raise UnavailableError(f"kernel link shaping {reason}")
        try:
            for ns in (self.cloud, self.edge):
                _sh("ip", "netns", "add", ns)
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "link", "add", "vc" + self.cloud[-6:], "netns", self.cloud, "type", "veth",
                "peer", "name", "ve" + self.edge[-6:], "netns", self.edge)
            for ns, dev, ip in ((self.cloud, "vc" + self.cloud[-6:], CLOUD_IP), (self.edge, "ve" + self.edge[-6:], EDGE_IP)):
                _sh("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
                _sh("ip", "-n", ns, "link", "set", dev, "up")
                self._shape(ns, dev)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _shape(self, ns: str, dev: str) -> None:
        """netem (rate + delay) where the kernel has it; otherwise tbf, which shapes the rate only."""
        tc = ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root"]
        netem = subprocess.run(tc + ["netem", "delay", f"{self.delay_ms}ms", "rate", self.rate, "limit", "100000"],
                               capture_output=True)
        if netem.returncode == 0:
            self.qdisc = "netem"
            return
        self.qdisc = "tbf"
        _sh(*tc, "tbf", "rate", self.rate, "burst", "256kb", "latency", "100ms")

    @property
    def label(self) -> str:
        if self.qdisc == "netem":
            return f"emulated (kernel tc netem) {self.rate}, {2 * self.delay_ms:g} ms RTT"
        return f"emulated (kernel tc tbf; netem unavailable, no added delay) {self.rate}"

    def run(self, ns: str, args: list[str], env: dict, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", ns, *args], env=env, capture_output=True, **kwargs)

    def __exit__(self, *exc) -> None:
        for ns in (self.cloud, self.edge):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # takes its veth end with it


def run(model: str, context_file: Path, prompt: str, rate: str = "100mbit", rtt_ms: float = 20.0,
        codec: str = "balanced", new_tokens: int = 16) -> dict:
    """Prefill + compress + push in the cloud namespace, then decode in the edge namespace over the shaped veth."""
    work = Path(tempfile.mkdtemp(prefix="celslm-netns-"))
    env = {**os.environ, "CELSLM_HOME": os.environ.get("CELSLM_HOME", str(Path.home() / ".cache" / "celslm"))}
    try:
        with ShapedPair(rate, rtt_ms) as pair:
            server = subprocess.Popen(["ip", "netns", "exec", pair.cloud, *CLI, "serve-cache", "--root", str(work / "store"),
                                       "--host", CLOUD_IP, "--port", "8470"], env=env,
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
    url = f"http://{CLOUD_IP}:8470"
    deadline = time.monotonic() + 60
    while pair.run(pair.cloud, ["python3", "-c", f"import urllib.request; urllib.request.urlopen('{url}/v1/health')"],
                   env).returncode != 0:
        if time.monotonic() > deadline or server.poll() is not None:
            raise UnavailableError("serve-cache did not start in the cloud namespace")
        time.sleep(0.5)
    steps = [
        ["prefill", "-m", model, "-c", str(context_file), "-o", str(work / "ctx.kv")],
        ["compress", str(work / "ctx.kv"), "-o", str(work / "small.kv"), "--codec", codec],
        ["push", str(work / "small.kv"), url, "--tag", "bench"],
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
