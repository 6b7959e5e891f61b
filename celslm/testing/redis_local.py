"""Redis servers on loopback for tests and benchmarks: one server, or a Redis Cluster of masters with
replicas, each a child `redis-server` writing into a work directory, stopped with `stop()` or by
leaving the `with` block. Needs `redis-server` and `redis-cli` (7.0 or later) on PATH.

    with start_cluster(workdir) as cluster:              # 3 masters, each with a replica
        store = open_store(cluster.url)                  # redis+cluster://127.0.0.1:P1,...
        cluster.kill(cluster.master_of("some-key"))      # SIGKILL; its replica takes over in seconds
        cluster.wait_ok(30)

Every wait is bounded and says what it waited for when it gives up (RuntimeError).
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from celslm.testing.processes import free_ports

SLOTS = 16384
BUS_OFFSET = 10000  # a cluster node also listens on port + 10000 (the cluster bus)
NODE_TIMEOUT_MS = 2000  # how long a silent master has before its replica takes over (Redis' default: 15 s)


def cli(port: int, *args: str) -> str:
    """One redis-cli command against 127.0.0.1:port: its output ('' when the server does not answer)."""
    try:
        return subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args], capture_output=True,
                              text=True, timeout=10).stdout
    except subprocess.TimeoutExpired:
        return ""


@dataclass
class RedisNode:
    """One redis-server process."""

    port: int
    proc: subprocess.Popen

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM, then SIGKILL once it has had timeout_s."""
        if self.alive:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _start_node(workdir: Path, port: int, settings: tuple[str, ...]) -> RedisNode:
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir), "--logfile", f"redis-{port}.log", *settings],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return RedisNode(port, proc)


def _wait_ping(node: RedisNode, workdir: Path, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while cli(node.port, "ping").strip() != "PONG":
        if not node.alive or time.monotonic() > deadline:
            log = workdir / f"redis-{node.port}.log"
            last = log.read_text(errors="replace")[-1000:] if log.exists() else ""
            raise RuntimeError(f"redis-server on port {node.port} did not start: {last}")
        time.sleep(0.05)


class LocalRedis:
    """One redis-server; `url` is redis://127.0.0.1:PORT/0."""

    def __init__(self, node: RedisNode):
        self.node = node
        self.port = node.port
        self.url = f"redis://127.0.0.1:{node.port}/0"

    def stop(self) -> None:
        self.node.stop()

    def __enter__(self) -> "LocalRedis":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_redis(workdir: Path, *settings: str) -> LocalRedis:
    """Start one redis-server on a free loopback port, with extra `settings` (e.g. "--maxmemory", "2mb")."""
    node = _start_node(Path(workdir), free_ports(1)[0], settings)
    try:
        _wait_ping(node, Path(workdir))
    except BaseException:
        node.stop()
        raise
    return LocalRedis(node)


class LocalCluster:
    """A Redis Cluster on loopback; `url` is redis+cluster://127.0.0.1:P1,127.0.0.1:P2,... (every node)."""

    def __init__(self, nodes: list[RedisNode]):
        self.nodes = nodes
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in nodes)

    def node(self, port: int) -> RedisNode:
        return next(node for node in self.nodes if node.port == port)

    def masters(self) -> dict[int, list[range]]:
        """Live masters (port) and the slot ranges each serves, as a live node sees them."""
        for node in self.nodes:
            if node.alive and (text := cli(node.port, "cluster", "nodes")):
                return _masters(text)
        raise RuntimeError("no node of the cluster answers")

    def master_of(self, key: str) -> RedisNode:
        """The master now serving the slot of `key` (hash tags count, as for any key)."""
        slot = int(cli(self._live_port(), "cluster", "keyslot", key))
        for port, ranges in self.masters().items():
            if any(slot in slots for slots in ranges):
                return self.node(port)
        raise RuntimeError(f"no live master serves slot {slot} (of key {key!r})")

    def kill(self, node: RedisNode) -> None:
        """SIGKILL: the node dies as in a crash, with no chance to tell the others."""
        node.proc.kill()
        node.proc.wait()

    def wait_ok(self, timeout_s: float = 30) -> None:
        """Until every live node says cluster_state:ok and live masters serve all 16384 slots (after a
        kill, that is once a replica has taken over: until then the dead master still holds its slots)."""
        deadline = time.monotonic() + timeout_s
        while not self._ok():
            if time.monotonic() > deadline:
                states = {node.port: cli(node.port, "cluster", "info").split("\n", 1)[0].strip()
                          for node in self.nodes if node.alive}
                raise RuntimeError(f"the cluster is not ok after {timeout_s} s: {states}")
            time.sleep(0.1)

    def wait_replicated(self, replicas: int, timeout_s: float = 30) -> None:
        """Until `replicas` live replicas have synced with their masters (so that each can take over)."""
        deadline = time.monotonic() + timeout_s
        while (synced := sum("master_link_status:up" in cli(node.port, "info", "replication")
                             for node in self.nodes if node.alive)) < replicas:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{synced} of {replicas} replicas synced after {timeout_s} s")
            time.sleep(0.1)

    def wait_caught_up(self, master: RedisNode, timeout_s: float = 30) -> None:
        """Until every replica of `master` has applied all it has written (replication offsets equal):
        a write acknowledged before then could be lost with the master (replication is asynchronous)."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = cli(master.port, "info", "replication")
            written = int(re.search(r"master_repl_offset:(\d+)", info).group(1))
            applied = [int(offset) for offset in re.findall(r"slave\d+:.*?offset=(\d+)", info)]
            if applied and min(applied) >= written:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the replicas of {master.port} applied {applied} of {written} after {timeout_s} s")
            time.sleep(0.05)

    def _ok(self) -> bool:
        live = [node for node in self.nodes if node.alive]
        if not live or not all("cluster_state:ok" in cli(node.port, "cluster", "info") for node in live):
            return False
        views = [_masters(cli(node.port, "cluster", "nodes")) for node in live]
        ports = {node.port for node in live}
        return all(set(view) <= ports and sum(len(slots) for ranges in view.values() for slots in ranges) == SLOTS
                   for view in views)

    def _live_port(self) -> int:
        return next(node.port for node in self.nodes if node.alive)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _masters(cluster_nodes: str) -> dict[int, list[range]]:
    """Parse CLUSTER NODES: masters not flagged fail, by port, with their slot ranges."""
    masters = {}
    for line in cluster_nodes.splitlines():
        fields = line.split()
        if len(fields) < 8 or "master" not in fields[2].split(",") or "fail" in fields[2].split(","):
            continue
        port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
        ranges = []
        for text in fields[8:]:
            if text.startswith("["):  # a slot being migrated: "[slot->-node]"
                continue
            first, _, last = text.partition("-")
            ranges.append(range(int(first), int(last or first) + 1))
        masters[port] = ranges
    return masters


def start_cluster(workdir: Path, masters: int = 3, replicas: int = 1, timeout_s: float = 60) -> LocalCluster:
    """Start masters * (1 + replicas) cluster nodes on free loopback ports, join them with
    `redis-cli --cluster create`, and wait until the cluster is ok. A master's replica takes over
    about NODE_TIMEOUT_MS after it dies."""
    workdir = Path(workdir)
    ports = free_ports(masters * (1 + replicas), also_free_at=BUS_OFFSET)
    nodes: list[RedisNode] = []
    try:
        for port in ports:
            nodes.append(_start_node(workdir, port, (
                "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                "--cluster-replica-validity-factor", "0")))  # a replica always takes over, however long it was cut off
        for node in nodes:
            _wait_ping(node, workdir)
        created = subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{port}" for port in ports),
                                  "--cluster-replicas", str(replicas), "--cluster-yes"],
                                 capture_output=True, text=True, timeout=timeout_s)
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {(created.stdout + created.stderr)[-1000:]}")
        cluster = LocalCluster(nodes)
        cluster.wait_ok(timeout_s)
        cluster.wait_replicated(masters * replicas, timeout_s)
        return cluster
    except BaseException:
        for node in nodes:
            node.stop()
        raise
