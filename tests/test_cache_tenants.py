"""serve-cache --tenants: each token writes only its namespace's tags, holds at most its quota, reads
what its entry allows; blobs stay shared; a store shows nothing of a refused push."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import pytest

from celslm.artifact import DirectoryReader
from celslm.errors import EXIT_UNAVAILABLE, EXIT_USAGE, InsufficientStorage
from celslm.store.http import HttpStore
from celslm.store.local import LocalStore
from celslm.store.push import push
from celslm.tenants import Ledger, Tenant, load_tenants
from celslm.testing.redis_local import start_redis
from tests.conftest import CONTEXT, run_cli
from tests.netutil import Server
from tests.test_server import call

TOKENS = {"acme": "acme-s3cret", "globex": "globex-s3cret", "tiny": "tiny-s3cret"}


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def tenants_file(folder: Path, **quotas_and_reads: tuple[str, str]) -> Path:
    """[tenants.NAME] for each NAME=(quota, reads), with TOKENS[NAME]'s hash."""
    path = folder / "tenants.toml"
    path.write_text("".join(f'[tenants.{name}]\ntoken_sha256 = "{sha(TOKENS[name])}"\nquota = "{quota}"\nreads = "{reads}"\n\n'
                            for name, (quota, reads) in quotas_and_reads.items()))
    return path


@pytest.fixture(scope="module")
def two_artifacts(prefilled, tiny_qwen, tmp_path_factory) -> tuple[Path, Path]:
    """a.kv (shared with the server tests) and b.kv, another context that shares no blob with it."""
    folder = tmp_path_factory.mktemp("tenants")
    (folder / "other.txt").write_text("# another file\n" + CONTEXT * 2)
    run_cli("prefill", "-m", str(tiny_qwen), "-c", str(folder / "other.txt"), "-o", str(folder / "b.kv"),
            "--chunk-size", "64", check=True)
    return prefilled / "a.kv", folder / "b.kv"


def charged_bytes(artifact: Path) -> int:
    """What holding an artifact costs a tenant: its manifest and each distinct blob."""
    reader = DirectoryReader(artifact)
    return len(reader.manifest.canonical_bytes()) + sum({ref.digest: ref.size for ref in reader.manifest.blob_refs()}.values())


def snapshot(root: Path) -> dict[str, bytes]:
    """Everything a store holds (lock files, which hold nothing, aside)."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*"))
            if path.is_file() and not path.name.startswith(".")}


def pushed(artifact: Path, url: str, tenant: str, tag: str | None = None):
    return run_cli("push", str(artifact), url, "--token", TOKENS[tenant], *(["--tag", tag] if tag else []))


def one_line_error(result) -> str:
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_tenant_cannot_write_a_tag_outside_its_namespace_and_the_store_is_unchanged(two_artifacts, tmp_path):
    a, b = two_artifacts
    spec = tenants_file(tmp_path, acme=("10MB", "all"), globex=("10MB", "all"))
    with Server(tmp_path / "store", "--tenants", str(spec), "--write-token", "operator") as cloud:
        assert pushed(a, cloud.url, "acme", "acme/ctx:latest").returncode == 0
        before = snapshot(tmp_path / "store")
        refused = pushed(b, cloud.url, "globex", "acme/ctx:latest")
        assert refused.returncode == EXIT_USAGE
        assert "tag acme/ctx:latest is outside this token's namespace globex/" in one_line_error(refused)
        assert snapshot(tmp_path / "store") == before  # refused before a blob was sent
        a_id = DirectoryReader(a).id
        for method, body in (("PUT", a_id.encode()), ("DELETE", None)):
            assert call(cloud.url, method, "/v1/tags/acme/ctx:latest", body, token=TOKENS["globex"])[0] == 403
        assert call(cloud.url, "PUT", "/v1/tags/ctx:latest", a_id.encode(), token=TOKENS["acme"])[0] == 403
        assert snapshot(tmp_path / "store") == before
        assert call(cloud.url, "GET", "/v1/tags/acme/ctx:latest") == (200, a_id.encode())
        # its own namespace, yes; an artifact it does not hold, no (it would hold it uncharged)
        assert call(cloud.url, "PUT", "/v1/tags/globex/a", a_id.encode(), token=TOKENS["globex"])[0] == 403
        assert pushed(b, cloud.url, "globex", "globex/b").returncode == 0
        assert call(cloud.url, "DELETE", "/v1/tags/globex/b", token=TOKENS["globex"])[0] == 200
        assert call(cloud.url, "GET", "/v1/tags/globex/b")[0] == 404
        # the operator's --write-token writes anywhere, as without tenants
        assert call(cloud.url, "PUT", "/v1/tags/ctx:latest", a_id.encode(), token="operator")[0] == 201
        assert call(cloud.url, "PUT", "/v1/tags/ctx:latest", a_id.encode(), token="nobody's")[0] == 403
        assert call(cloud.url, "PUT", "/v1/tags/ctx:latest", a_id.encode())[0] == 401


def test_a_push_past_the_quota_gets_507_and_leaves_the_store_unchanged(two_artifacts, tmp_path):
    a, b = two_artifacts
    spec = tenants_file(tmp_path, acme=(str(charged_bytes(a) + charged_bytes(b) // 2), "all"), globex=("10MB", "all"))
    with Server(tmp_path / "store", "--tenants", str(spec)) as cloud:
        assert pushed(a, cloud.url, "acme", "acme/a").returncode == 0
        before = snapshot(tmp_path / "store")
        refused = pushed(b, cloud.url, "acme", "acme/b")
        assert refused.returncode == EXIT_UNAVAILABLE and "past its quota" in one_line_error(refused)
        assert snapshot(tmp_path / "store") == before
        # a blob past what is left (half of b) is refused before it is read, and kept nowhere
        blob = b"x" * charged_bytes(b)
        status, body = call(cloud.url, "PUT", f"/v1/blobs/sha256:{hashlib.sha256(blob).hexdigest()}", blob,
                            token=TOKENS["acme"])
        assert status == 507 and b"past its quota" in body
        assert snapshot(tmp_path / "store") == before
        # the other tenant is not touched by acme's quota, and acme's artifact is whole
        assert pushed(b, cloud.url, "globex", "globex/b").returncode == 0
        assert run_cli("pull", f"{cloud.url}/v1/tags/acme/a", "--out", str(tmp_path / "a-again.kv")).returncode == 0
        assert run_cli("verify", str(tmp_path / "a-again.kv")).returncode == 0


def test_blobs_uploaded_without_a_manifest_count_against_the_quota(two_artifacts, tmp_path):
    """Uploading blobs and never the manifest is no way past a quota."""
    a, _ = two_artifacts
    spec = tenants_file(tmp_path, tiny=("100KB", "all"))
    with Server(tmp_path / "store", "--tenants", str(spec)) as cloud:
        statuses = [call(cloud.url, "PUT", f"/v1/blobs/{ref.digest}", data, token=TOKENS["tiny"])[0]
                    for ref, data in DirectoryReader(a).blobs()]
        assert 201 in statuses and 507 in statuses
        stored = sum(path.stat().st_size for path in (tmp_path / "store" / "blobs").iterdir())
        assert 0 < stored <= 100_000
        usage = Ledger(LocalStore(tmp_path / "store")).usage(load_tenants(spec)[0])
        assert usage.bytes_ == stored and not usage.artifacts


def test_one_context_pushed_by_two_tenants_is_stored_once_and_charged_to_each(two_artifacts, tmp_path):
    a, _ = two_artifacts
    spec = tenants_file(tmp_path, acme=("10MB", "all"), globex=("10MB", "all"))
    with Server(tmp_path / "store", "--tenants", str(spec)) as cloud:
        assert pushed(a, cloud.url, "acme", "acme/ctx").returncode == 0
        assert json.loads(run_cli("push", str(a), cloud.url, "--token", TOKENS["globex"], "--tag", "globex/ctx",
                                  "--json", check=True).stdout)["blobs_sent"] == 0
    manifest = DirectoryReader(a).manifest
    distinct = {ref.digest: ref.size for ref in manifest.blob_refs()}
    blobs = list((tmp_path / "store" / "blobs").iterdir())
    assert len(blobs) == len(distinct) and sum(p.stat().st_size for p in blobs) == sum(distinct.values())
    ledger = Ledger(LocalStore(tmp_path / "store"))
    assert [ledger.usage(tenant).bytes_ for tenant in load_tenants(spec)] == [charged_bytes(a)] * 2


def test_a_tenant_that_reads_only_its_own_gets_403_elsewhere(two_artifacts, tmp_path):
    a, b = two_artifacts
    spec = tenants_file(tmp_path, acme=("10MB", "own"), globex=("10MB", "all"))
    with Server(tmp_path / "store", "--tenants", str(spec)) as cloud:
        assert pushed(a, cloud.url, "acme", "acme/a").returncode == 0
        assert pushed(b, cloud.url, "globex", "globex/b").returncode == 0
        a_id, b_id = DirectoryReader(a).id, DirectoryReader(b).id
        acme = TOKENS["acme"]
        assert call(cloud.url, "GET", "/v1/tags/acme/a", token=acme) == (200, a_id.encode())
        assert call(cloud.url, "GET", f"/v1/artifacts/{a_id}", token=acme)[0] == 200
        for path in ("/v1/tags/globex/b", "/v1/tags/globex/b/statement", f"/v1/artifacts/{b_id}",
                     f"/v1/artifacts/{b_id}/timings", f"/v1/artifacts/sha256:{'0' * 64}"):
            assert call(cloud.url, "GET", path, token=acme)[0] == 403, path
        manifest = DirectoryReader(b).manifest
        lookup = f"/v1/lookup?space={manifest.space.fingerprint}&prefix={','.join(manifest.prefix_hashes)}"
        assert json.loads(call(cloud.url, "GET", lookup, token=acme)[1]) == {"artifact": None, "chunks": 0}
        assert json.loads(call(cloud.url, "GET", lookup, token=TOKENS["globex"])[1])["artifact"] == b_id
        assert call(cloud.url, "GET", "/v1/tags/globex/b")[0] == 401  # reads need a token now
        refused = run_cli("pull", f"{cloud.url}/v1/tags/globex/b", "--token", acme, "--out", str(tmp_path / "b.kv"))
        assert refused.returncode == EXIT_USAGE and "outside this token's namespace acme/" in one_line_error(refused)
        assert run_cli("pull", f"{cloud.url}/v1/tags/acme/a", "--token", acme, "--out", str(tmp_path / "a.kv"),
                       check=True).returncode == 0


def test_without_a_tenants_file_one_write_token_writes_every_tag(two_artifacts, tmp_path):
    a, _ = two_artifacts
    with Server(tmp_path / "store", "--write-token", "w") as cloud:
        assert run_cli("push", str(a), cloud.url, "--token", "w", "--tag", "acme/ctx").returncode == 0
        assert run_cli("push", str(a), cloud.url, "--token", "w", "--tag", "ctx").returncode == 0
        assert run_cli("push", str(a), cloud.url, "--token", TOKENS["acme"], "--tag", "acme/ctx").returncode == EXIT_USAGE
        assert call(cloud.url, "GET", "/v1/tags/acme/ctx")[1] == call(cloud.url, "GET", "/v1/tags/ctx")[1]
    assert not (tmp_path / "store" / "tenants").exists()


def test_concurrent_pushes_through_several_workers_never_pass_the_quota(two_artifacts, tmp_path):
    """Two workers, one tenant, two artifacts that fit its quota one at a time: one push of the pair
    at once is refused, whichever worker each lands on."""
    a, b = two_artifacts
    quota = max(charged_bytes(a), charged_bytes(b)) + min(charged_bytes(a), charged_bytes(b)) // 2
    spec = tenants_file(tmp_path, acme=(str(quota), "all"))
    outcomes = []
    with Server(tmp_path / "store", "--tenants", str(spec), "--workers", "2") as cloud:
        def push_one(artifact: Path) -> None:
            try:
                push(DirectoryReader(artifact), HttpStore(cloud.url, TOKENS["acme"]), f"acme/{artifact.stem}")
                outcomes.append("pushed")
            except InsufficientStorage:
                outcomes.append("507")

        threads = [threading.Thread(target=push_one, args=(artifact,)) for artifact in (a, b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert sorted(outcomes) == ["507", "pushed"]
    usage = Ledger(LocalStore(tmp_path / "store")).usage(load_tenants(spec)[0])
    assert usage.bytes_ <= quota and len(usage.artifacts) == 1


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed (apt-get install redis-server)")
def test_quotas_hold_over_a_redis_store_shared_by_two_servers(two_artifacts, tmp_path):
    a, b = two_artifacts
    spec = tenants_file(tmp_path, acme=(str(charged_bytes(a) + charged_bytes(b) // 2), "all"))
    with start_redis(tmp_path / "redis") as redis, \
            Server(tmp_path / "unused-1", "--backend", redis.url, "--tenants", str(spec)) as first, \
            Server(tmp_path / "unused-2", "--backend", redis.url, "--tenants", str(spec)) as second:
        assert pushed(a, first.url, "acme", "acme/a").returncode == 0
        assert pushed(b, second.url, "acme", "acme/b").returncode == EXIT_UNAVAILABLE
        assert call(second.url, "GET", "/v1/tags/acme/a")[1] == DirectoryReader(a).id.encode()
        assert call(second.url, "GET", "/v1/tags/acme/b")[0] == 404


@pytest.mark.parametrize("text, problem", [
    ("[tenants.acme]\nquota = \"1GB\"\n", "tenant acme: missing token_sha256"),
    (f"[tenants.acme]\ntoken_sha256 = \"{sha('t')}\"\nquota = \"lots\"\n", "tenant acme: quota: bad size 'lots'"),
    (f"[tenants.acme]\ntoken_sha256 = \"{sha('t')}\"\nquota = 1\nreads = \"some\"\n", "reads must be \"all\" or \"own\""),
    (f"[tenants.acme]\ntoken_sha256 = \"{sha('t')}\"\nquota = 1\n[tenants.globex]\ntoken_sha256 = \"{sha('t')}\"\nquota = 1\n",
     "two tenants have the same token_sha256"),
    (f"[tenants.\"a/b\"]\ntoken_sha256 = \"{sha('t')}\"\nquota = 1\n", "tenant 'a/b': a name is its tag namespace"),
    (f"[tenants.acme]\ntoken = \"t\"\nquota = 1\n", "tenant acme: unknown field 'token'"),
    ("tenants = 3\n", "expected [tenants.NAME] tables"),
    ("[tenants\n", "not TOML"),
])
def test_a_bad_tenants_file_exits_2_naming_the_file_and_the_problem(tmp_path, text, problem):
    (tmp_path / "t.toml").write_text(text)
    result = run_cli("serve-cache", "--root", str(tmp_path / "store"), "--port", "0", "--tenants", str(tmp_path / "t.toml"))
    assert result.returncode == EXIT_USAGE
    line = one_line_error(result)
    assert f"tenants file {tmp_path / 't.toml'}: " in line and problem in line, line


def test_tenants_refuse_a_capacity_that_would_evict_one_for_another(tmp_path):
    spec = tenants_file(tmp_path, acme=("1MB", "all"))
    result = run_cli("serve-cache", "--root", str(tmp_path / "store"), "--tenants", str(spec), "--capacity", "1GB")
    assert result.returncode == EXIT_USAGE and "--capacity evicts whole artifacts" in one_line_error(result)


def test_a_tenant_owns_only_tags_under_its_name_and_a_slash():
    tenant = Tenant("acme", sha("t"), 1)
    assert tenant.owns_tag("acme/x") and not tenant.owns_tag("acmex/y") and not tenant.owns_tag("acme")
