"""Real kernel shaping (Linux, root): two network namespaces joined by a veth pair, the link shaped by
`tc netem` (rate and delay); `bench link` runs serve-cache in one and decode in the other.

Both namespaces and the veth pair are created here and removed on leaving the `with` block; the only
addresses used are the two ends of that veth pair.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from celslm.errors import UnavailableError

CLOUD_IP, EDGE_IP = "10.231.0.1", "10.231.0.2"


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
