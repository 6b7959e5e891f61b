"""bench hostile: what a hostile peer can do to an edge under a trust policy, and what trust and
confidentiality cost, measured as a user runs the edge (whole `celslm decode` processes).

Set up in a temporary folder: the cloud's signing key, a stranger's, and an edge's encryption key;
a standard-library context prefilled here (as the cloud would) and compressed with `balanced`,
signed, plain and encrypted for the edge; a second context (B) signed by the stranger. The cloud is
a real serve-cache process holding both of the cloud's artifacts under signed tags.

Rows, each `celslm decode --kv ctx:latest --cloud CLOUD --trust cloud.pub` with a fresh edge cache:
  normal         no peer
  forged tag     a real serve-cache peer whose ctx:latest (signed by the stranger) names context B
  huge body      a peer answering every blob with an endless undeclared body (2 GB)
  huge declared  a peer declaring 10 GB for every blob
  huge counts    a peer answering every manifest with one declaring 10^9 tokens
  trickle        a peer sending one byte a second
Each says whether the answer is the normal one, its seconds and its own peak memory (wait4).

Confidentiality: the same decode of the plain and of the encrypted artifact (`--identity`), both
through the cloud with `--link 100mbit --no-pipeline`, and their `load_s`; the link is emulated and
labelled so. Signing, verification and decryption: in-process, per call. Repetitions are
interleaved (every row, then every row again): read the ratios. A run that fails is a row that did
not answer normally, with its error; the benchmark goes on.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from rich.table import Table

from celslm import prompting
from celslm.artifact import MemoryReader
from celslm.bench.edge import timed
from celslm.bench.ttft import stdlib_context
from celslm.blocks import recode
from celslm.calibrate import codec_codebook
from celslm.codecs import parse_codec
from celslm.confidential import Identity
from celslm.errors import CelslmError
from celslm.models import LoadedModel, celslm_home
from celslm.prefill import prefill
from celslm.sealing import seal_artifact
from celslm.store.http import HttpStore
from celslm.store.push import push
from celslm.testing.processes import CLI, ServeCache, Service, free_port
from celslm.trust import (TrustPolicy, generate_key, load_private_key, load_public_key, sign_artifact, sign_tag)

PROMPT = "What does this code do? Answer briefly."
LINK = "100mbit"
PEER_ROWS = (
    ("forged", "forged tag (signed by a stranger, names context B)"),
    ("huge", "huge body (2 GB, no length declared)"),
    ("declared", "huge declared (10 GB Content-Length)"),
    ("counts", "huge counts (manifest declaring 10^9 tokens)"),
    ("trickle", "trickle (1 byte/s)"),
)
FAULTS = {"huge": "huge", "declared": "huge-declared", "counts": "counts", "trickle": "trickle"}  # row -> faults mode


def _json_out(stderr: str, stdout: str) -> tuple[int, float | None, str]:
    report = json.loads(stdout)
    return report["new_tokens"], None, stdout


def _per_call_ms(call: Callable[[], object], count: int = 200) -> float:
    started = time.perf_counter()
    for _ in range(count):
        call()
    return round((time.perf_counter() - started) / count * 1000, 4)


def _edge_home(work: Path, index: int) -> Path:
    """A fresh CELSLM_HOME whose models are the user's: every run starts with an empty edge cache."""
    home = work / f"home-{index}"
    home.mkdir()
    (home / "models").symlink_to(celslm_home() / "models", target_is_directory=True)
    return home


def run(loaded: LoadedModel, spec: str, *, tokens: int = 1024, new_tokens: int = 16, repeats: int = 2,
        threads: int | None = None, progress: Callable[[str, int, int | None], None] | None = None) -> dict:
    """`loaded` is the model on transformers (the cloud's prefill); `spec` names it for the edges."""
    threads = threads or os.cpu_count() or 1
    base_env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "CELSLM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    framing = prompting.default_framing(loaded.tokenizer)
    text = stdlib_context(loaded.tokenizer, tokens)
    with tempfile.TemporaryDirectory(prefix="celslm-bench-hostile-") as tmp:
        work = Path(tmp)
        keys = {name: generate_key(str(work / name), kind=kind)
                for name, kind in (("cloud", "signing"), ("stranger", "signing"), ("edge", "encryption"))}
        cloud_key, stranger_key = load_private_key(keys["cloud"][0]), load_private_key(keys["stranger"][0])
        if progress:
            progress("prefill (the cloud's artifacts, transformers)", 0, None)
        codec = parse_codec("balanced")
        codebook = codec_codebook(codec, loaded)
        plain = recode(MemoryReader(prefill(loaded, prompting.context_ids(loaded.tokenizer, text, framing), framing=framing)),
                       codec, codebook)
        other = recode(MemoryReader(prefill(loaded, prompting.context_ids(loaded.tokenizer, text + "\n# B\n", framing),
                                            framing=framing)), codec, codebook)
        started = time.perf_counter()
        sealed = seal_artifact(plain, [load_public_key(keys["edge"][1], "encryption")])
        seal_s = time.perf_counter() - started
        for artifact, signer in ((plain, cloud_key), (sealed, cloud_key), (other, stranger_key)):
            artifact.signatures = (sign_artifact(signer, artifact.id),)

        servers = [ServeCache("--root", str(work / "cloud-store"), timeout_s=300)]
        try:
            servers.append(ServeCache("--root", str(work / "peer-store"), timeout_s=300))
            cloud, forger = (HttpStore(s.url) for s in servers)
            push(MemoryReader(plain), cloud, "ctx:latest", signed_tag=sign_tag(cloud_key, "ctx:latest", plain.id, 3600))
            push(MemoryReader(sealed), cloud, "ctx-enc:latest", signed_tag=sign_tag(cloud_key, "ctx-enc:latest", sealed.id, 3600))
            push(MemoryReader(other), forger, "ctx:latest", signed_tag=sign_tag(stranger_key, "ctx:latest", other.id, 3600))
            peers = {"forged": servers[1].url}
            for row, mode in FAULTS.items():  # each a process of its own, as a peer on the network is
                port = free_port()
                servers.append(Service([sys.executable, "-m", "celslm.testing.faults", str(work / "cloud-store"), str(port),
                                        mode], port, f"the {mode} peer", timeout_s=300))
                peers[row] = servers[-1].url

            decode = CLI + ["decode", "-m", spec, "-p", PROMPT, "-n", str(new_tokens), "--json", "--cloud", servers[0].url,
                            "--trust", str(keys["cloud"][1])]
            by_tag = decode + ["--kv", "ctx:latest"]
            configs = [("normal", "normal (no peer)", by_tag)]
            configs += [(key, label, by_tag + ["--peer", peers[key]]) for key, label in PEER_ROWS]
            linked = ["--link", LINK, "--no-pipeline"]
            configs += [("plain-link", f"plain artifact, emulated {LINK}", by_tag + linked),
                        ("sealed-link", f"encrypted artifact, emulated {LINK}",
                         decode + ["--kv", "ctx-enc:latest", "--identity", str(keys["edge"][0])] + linked)]
            runs: dict[str, list] = {key: [] for key, _, _ in configs}
            failures: dict[str, list] = {key: [] for key, _, _ in configs}
            total, index = repeats * len(configs), 0
            for rep in range(repeats):
                for key, label, cmd in configs:
                    if progress:
                        progress(f"run {rep + 1}/{repeats}: {label}", index, total)
                    env = {**base_env, "CELSLM_HOME": str(_edge_home(work, index))}
                    try:
                        runs[key].append(timed(cmd, env, _json_out, work, limit_s=300))
                    except CelslmError as exc:  # the row did not answer: say so, and go on
                        failures[key].append(str(exc))
                    index += 1
        finally:
            for server in servers:
                server.stop()

        identity = Identity.load([keys["edge"][0]])
        reader = MemoryReader(sealed)
        reader.identity = identity
        verify_s = _seconds(lambda: sum(1 for _ in reader.blobs()))
        decrypt_s = _seconds(lambda: sum(1 for _ in reader.plain_blobs())) - verify_s
        policy = TrustPolicy.load([keys["cloud"][1]])
        statement = sign_tag(cloud_key, "ctx:latest", plain.id, 3600)
        costs_ms = {
            "sign_artifact": _per_call_ms(lambda: sign_artifact(cloud_key, plain.id)),
            "verify_artifact": _per_call_ms(lambda: policy.check_artifact(plain.id, plain.signatures, "")),
            "sign_tag": _per_call_ms(lambda: sign_tag(cloud_key, "ctx:latest", plain.id, 3600)),
            "verify_tag": _per_call_ms(lambda: policy.check_tag("ctx:latest", statement, "")),
            "unwrap_content_key": _per_call_ms(lambda: identity.unwrap(sealed.manifest.encryption, "sealed"), 50),
        }
    return _summary(spec, runs, failures, configs, plain, sealed, seal_s, decrypt_s, costs_ms, new_tokens, repeats,
                    threads)


def _seconds(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _summary(spec, runs, failures, configs, plain, sealed, seal_s, decrypt_s, costs_ms, new_tokens, repeats,
             threads) -> dict:
    if not runs["normal"]:
        raise CelslmError(f"the normal decode failed, so there is nothing to compare with: {failures['normal'][0]}")
    med = lambda values: round(statistics.median(values), 4) if values else None  # noqa: E731
    reports = {key: [json.loads(r.text) for r in rs] for key, rs in runs.items()}
    normal_text = reports["normal"][0]["text"]
    normal_peak = max(r.peak_rss_mib for r in runs["normal"])
    rows = []
    for key, label, _ in configs:
        peak = max((r.peak_rss_mib for r in runs[key]), default=None)
        last = reports[key][-1] if reports[key] else {}
        rows.append({"key": key, "label": label, "runs": len(runs[key]), "failed": failures[key],
                     "answered_normally": not failures[key] and all(r["text"] == normal_text for r in reports[key]),
                     "artifact": last.get("artifact"), "total_s": med([r.total_s for r in runs[key]]),
                     "load_s": med([r["load_s"] for r in reports[key]]),
                     "peak_rss_mib": None if peak is None else round(peak, 1),
                     "peak_vs_normal": None if peak is None else round(peak / normal_peak, 3),
                     "bytes_by_source": last.get("bytes_by_source")})
    by_key = {row["key"]: row for row in rows}
    ratio = lambda a, b: round(a / b, 4) if a is not None and b else None  # noqa: E731
    blob_bytes = sealed.manifest.blob_bytes()
    return {
        "model": spec, "context_tokens": plain.manifest.token_count, "new_tokens": new_tokens, "repeats": repeats,
        "threads": threads, "artifact_bytes": plain.manifest.blob_bytes(), "sealed_bytes": blob_bytes,
        "rows": rows,
        "worst_peak_vs_normal": max((row["peak_vs_normal"] or 0 for row in rows if row["key"] in dict(PEER_ROWS))),
        "every_hostile_row_answered_normally": all(by_key[k]["answered_normally"] for k in dict(PEER_ROWS)),
        "trickle_extra_s": None if by_key["trickle"]["total_s"] is None else
        round(by_key["trickle"]["total_s"] - by_key["normal"]["total_s"], 3),
        "link": f"emulated {LINK}",
        "decrypt_load_ratio": ratio(by_key["sealed-link"]["load_s"], by_key["plain-link"]["load_s"]),
        "seal_s": round(seal_s, 4), "decrypt_s": round(decrypt_s, 4),
        "decrypt_mb_s": round(blob_bytes / decrypt_s / 1e6, 1) if decrypt_s > 0 else None,
        "costs_ms": costs_ms,
    }


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(result: dict) -> list:
    """The table and the cost lines `bench hostile` prints."""
    table = Table("edge run (--trust cloud.pub)", "answer", "total s", "load s", "peak MiB", "peak / normal",
                  title=f"{result['model']}: {result['context_tokens']}-token context (balanced, "
                        f"{result['artifact_bytes']:,} bytes), {result['new_tokens']} new tokens, median of "
                        f"{result['repeats']} interleaved runs")
    for r in result["rows"]:
        answer = "normal" if r["answered_normally"] else f"FAILED {len(r['failed'])}x" if r["failed"] else "OTHER"
        table.add_row(r["label"], answer, _fmt(r["total_s"], ".2f"), _fmt(r["load_s"], ".3f"),
                      _fmt(r["peak_rss_mib"], ".0f"), _fmt(r["peak_vs_normal"], ".2f"))
    costs = result["costs_ms"]
    return [table,
            f"hostile peers: every answer normal: {'yes' if result['every_hostile_row_answered_normally'] else 'NO'}; "
            f"worst peak memory {result['worst_peak_vs_normal']:.2f}x normal; the trickle cost "
            f"{_fmt(result['trickle_extra_s'], '+.1f')} s",
            f"signing (ms per call): sign artifact {costs['sign_artifact']:.3f}, verify artifact "
            f"{costs['verify_artifact']:.3f}, sign tag {costs['sign_tag']:.3f}, verify tag {costs['verify_tag']:.3f}",
            f"encryption: load time encrypted / plain at {result['link']}: {_fmt(result['decrypt_load_ratio'], '.3f')}x; "
            f"sealing {result['seal_s'] * 1000:.1f} ms, decrypting {result['decrypt_s'] * 1000:.1f} ms "
            f"({result['decrypt_mb_s']} MB/s) for {result['sealed_bytes']:,} bytes, unwrapping the key "
            f"{costs['unwrap_content_key']:.3f} ms"]


def notes(result: dict) -> list[str]:
    """Each row's first failure (for stderr)."""
    return [f"{r['label']}: {failure}" for r in result["rows"] for failure in r["failed"][:1]]
