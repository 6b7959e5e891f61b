"""bench edge: the edge as a user runs it, whole processes, against what a llama.cpp user runs instead.

At each context length (standard-library source nobody here wrote, cut to `tokens` tokens), one prompt,
greedy decoding of `new_tokens`, on the same GGUF. Each configuration is a fresh process, started by
this benchmark and timed from spawn to its first byte on stdout and to its exit; peak memory is that
process's own (wait4). Repetitions are interleaved (A B C ... A B C ...), so a busy machine slows
every row alike: read the ratios.

Rows, at every length:
  celslm decode --kv          the artifact (balanced codec, local disk) on the llama.cpp engine
  llama.cpp state restore     a plain llama-cpp-python script restoring llama.cpp's own saved
                              sequence state of the context (`llama_peer.py restore`): the peer
  ... over an emulated link   the same two, the artifact's bytes and the state file's through the
                              same emulated link (celslm decode --link; the peer's transfer runs beside
                              its model load, the best a script can do)
and at the first length only (the edge-only rows prefill the whole context each run, minutes past 8K
tokens on a small machine; `edge_only=False` leaves them out):
  celslm serve (warm)         curl streaming a chat completion from a running `celslm serve` that has
                              the context in memory already (peak memory: the service's)
  celslm edge-only            celslm decode --context, on llama.cpp and on transformers
  llama.cpp edge-only         the same script prefilling the context itself
and the warm service switching contexts: two contexts of the first length on local disk, asked for in
turn from a `celslm serve` whose memory holds one, so each request decodes its context again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import signal
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rich.table import Table

from celslm import prompting
from celslm.artifact import MemoryReader, write_dir
from celslm.batching import DEFAULT_CELLS
from celslm.blocks import recode
from celslm.bench.ttft import DEFAULT_FILES, stdlib_context
from celslm.calibrate import codec_codebook
from celslm.codecs import parse_codec
from celslm.errors import CelslmError, UsageError
from celslm.models import LoadedModel, model_gguf
from celslm.stream import Link
from celslm.testing.processes import CLI, Service, free_port

PROMPT = "What does this code do? Answer briefly."
PEER = Path(__file__).with_name("llama_peer.py")
PEER_CMD = [sys.executable, str(PEER)]
_DECODE_ROW = re.compile(r"of which decode \((\d+) tokens\)\D*?([\d.]+)")
_HIDDEN_ROW = re.compile(r"of it while the model loaded\D*?(\d+)%")
# A fork of this process would count its pages (the benchmark holds a model) in the child's peak RSS
# until exec; so a small interpreter forks, execs the command, and reports that child's own peak.
_LAUNCH = ("import os, sys\npid = os.fork()\nif pid == 0:\n    os.execvp(sys.argv[2], sys.argv[2:])\n"
           "_, status, usage = os.wait4(pid, 0)\nopen(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
           "sys.exit(os.waitstatus_to_exitcode(status))\n")


@dataclass
class Run:
    first_byte_s: float
    total_s: float
    peak_rss_mib: float
    tokens: int
    decode_tok_s: float | None
    text: str
    decode_hidden: float | None = None  # celslm decode --kv: share of the artifact's decoding done while the model loaded


@dataclass
class Row:
    key: str
    label: str
    runs: list[Run] = field(default_factory=list)

    def summary(self) -> dict:
        med = lambda values: round(statistics.median(values), 4) if values else None  # noqa: E731
        return {"key": self.key, "label": self.label, "runs": len(self.runs),
                "first_byte_s": med([r.first_byte_s for r in self.runs]),
                "total_s": med([r.total_s for r in self.runs]),
                "decode_tok_s": med([r.decode_tok_s for r in self.runs if r.decode_tok_s]),
                "peak_rss_mib": round(max(r.peak_rss_mib for r in self.runs), 1) if self.runs else None,
                "kv_decode_hidden_share": med([r.decode_hidden for r in self.runs if r.decode_hidden is not None]),
                "tokens": self.runs[-1].tokens if self.runs else 0}


def timed(cmd: list[str], env: dict, decode_rate: Callable[[str, str], tuple[int, float | None, str]], work: Path,
          limit_s: float = 900) -> Run:
    """Run `cmd`; seconds to its first stdout byte and to its exit, and its own peak RSS. A run past
    `limit_s`, or one this benchmark stops waiting for, is killed with everything it started."""
    rss_file = work / "peak-rss"
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCH, str(rss_file), *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)
    kill = lambda: os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None  # noqa: E731
    watchdog = threading.Timer(limit_s, kill)
    watchdog.start()
    try:
        errors: list[bytes] = []
        reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)
        reader.start()  # stderr drained beside stdout, so a chatty child never blocks on a full pipe
        first = proc.stdout.read(1)
        first_at = time.perf_counter()
        rest = proc.stdout.read()
        proc.wait()
        reader.join()
        ended = time.perf_counter()
    finally:
        watchdog.cancel()
        kill()
    stderr = b"".join(errors).decode(errors="replace")
    if ended - started >= limit_s:
        raise CelslmError(f"{' '.join(cmd[-8:])} ran past {limit_s:.0f} s and was stopped")
    if proc.returncode != 0:
        raise CelslmError(f"{' '.join(cmd[-8:])} exited {proc.returncode}: {stderr.strip().splitlines()[-1:] or ''}")
    tokens, rate, text = decode_rate(stderr, (first + rest).decode(errors="replace"))
    hidden = _HIDDEN_ROW.search(stderr)
    return Run(first_byte_s=first_at - started, total_s=ended - started, peak_rss_mib=int(rss_file.read_text()) / 1024,
               tokens=tokens, decode_tok_s=rate, text=text.strip(), decode_hidden=int(hidden.group(1)) / 100 if hidden else None)


def _rate(tokens: int, seconds: float) -> float | None:
    return (tokens - 1) / seconds if tokens > 1 and seconds > 0 else None


def _celslm_rate(stderr: str, stdout: str) -> tuple[int, float | None, str]:
    match = _DECODE_ROW.search(stderr)
    if not match:
        raise CelslmError("celslm decode --stats printed no decode row")
    tokens = int(match.group(1))
    return tokens, _rate(tokens, float(match.group(2))), stdout


def _peer_rate(stderr: str, stdout: str) -> tuple[int, float | None, str]:
    report = json.loads(stderr.strip().splitlines()[-1])
    return report["tokens"], _rate(report["tokens"], report["decode_s"]), stdout


def _sse_rate(stderr: str, stdout: str) -> tuple[int, float | None, str]:
    """A streamed chat completion: the text of its deltas; tokens and decode time from its last event."""
    events = [json.loads(line[6:]) for line in stdout.splitlines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    last = events[-1]
    tokens, timing = last["usage"]["completion_tokens"], last["celslm"]
    return tokens, _rate(tokens, timing["total_s"] - timing["ttft_s"]), text


def run(loaded: LoadedModel, spec: str, *, tokens: tuple[int, ...] = (2048,), new_tokens: int = 64, repeats: int = 3,
        transformers: bool = True, edge_only: bool = True, threads: int | None = None, link: str = "100mbit", switches: int = 5,
        keep: Path | None = None, progress: Callable[[str, int, int | None], None] | None = None) -> dict:
    """`loaded` is the model on transformers (it writes the artifacts, as the cloud would); `spec` names
    it for the processes measured. With `keep`, each length's artifact and llama.cpp state are kept in
    that folder and reused by the next run with the same context (the prefills take the better part of
    an hour at 32K tokens here)."""
    gguf = model_gguf(spec, loaded.folder)
    if gguf is None:
        raise UsageError(f"{spec}: bench edge needs the model's GGUF (a .gguf file or a bundled model)")
    Link.parse(link)  # a bad link is refused before minutes of prefill
    threads = threads or os.cpu_count() or 1
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "CELSLM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    bench = _Bench(loaded, spec, gguf, env, threads, new_tokens, repeats, link, keep, progress)
    lengths = [bench.length(count, first=index == 0, edge_only=edge_only, transformers=transformers)
               for index, count in enumerate(tokens)]
    return {"model": spec, "gguf": str(gguf), "new_tokens": new_tokens, "repeats": repeats, "threads": threads,
            "link": Link.parse(link).label, "lengths": lengths,
            "switch": bench.switch(tokens[0], switches) if switches and shutil.which("curl") else None}


@dataclass
class _Bench:
    loaded: LoadedModel
    spec: str
    gguf: Path
    env: dict
    threads: int
    new_tokens: int
    repeats: int
    link: str
    keep: Path | None
    progress: Callable[[str, int, int | None], None] | None

    def say(self, what: str, done: int = 0, total: int | None = None) -> None:
        if self.progress:
            self.progress(what, done, total)

    def prepare(self, work: Path, count: int, files: tuple[str, ...] = DEFAULT_FILES, state: bool = True) -> tuple:
        """The context's text and ids, its balanced artifact (the cloud's, on transformers) and llama.cpp's
        own saved state of it, in `work`."""
        loaded = self.loaded
        framing = prompting.default_framing(loaded.tokenizer)
        prompt_ids = prompting.prompt_ids(loaded.tokenizer, PROMPT, framing, raw=False)
        room = loaded.engine.max_positions - len(prompt_ids) - self.new_tokens - 8  # the frame's tokens too
        text = stdlib_context(loaded.tokenizer, min(count, room), files)
        context_ids = prompting.context_ids(loaded.tokenizer, text, framing)
        ids = json.dumps({"context": context_ids, "prompt": prompt_ids, "eos": sorted(loaded.eos_ids)})
        kept = _kept(work, ids, state)
        if kept is not None:
            self.say(f"{len(context_ids)} tokens: the artifact and state kept in {work}")
            return context_ids, prompt_ids, kept
        (work / _PREPARED).unlink(missing_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        (work / "context.txt").write_text(text)
        (work / "ids.json").write_text(ids)
        self.say(f"{len(context_ids)} tokens: prefill (the cloud's artifact, transformers)")
        from celslm.prefill import prefill

        exact = prefill(loaded, context_ids, framing=framing)
        codec = parse_codec("balanced")
        balanced = recode(MemoryReader(exact), codec, codec_codebook(codec, loaded))
        del exact
        write_dir(balanced, work / "context.kv", force=True)
        if state:
            self.say(f"{len(context_ids)} tokens: llama.cpp saves its own state of the context")
            subprocess.run(PEER_CMD + ["save", str(self.gguf), str(work / "context.state"), str(work / "ids.json"), "0",
                                       str(self.threads)], check=True, env=self.env, capture_output=True)
        artifact_bytes = balanced.manifest.blob_bytes()
        (work / _PREPARED).write_text(json.dumps({"artifact_bytes": artifact_bytes, "state": state}))
        return context_ids, prompt_ids, artifact_bytes

    def length(self, count: int, first: bool, edge_only: bool, transformers: bool) -> dict:
        with tempfile.TemporaryDirectory(prefix="celslm-bench-edge-") as tmp:
            work = self.keep / str(count) if self.keep else Path(tmp)
            context_ids, prompt_ids, artifact_bytes = self.prepare(work, count)
            decode = CLI + ["decode", "-m", self.spec, "-p", PROMPT, "-n", str(self.new_tokens), "--stats"]
            peer = PEER_CMD + ["restore", str(self.gguf), str(work / "context.state"), str(work / "ids.json"),
                               str(self.new_tokens), str(self.threads)]
            configs = [
                ("kv", "celslm decode --kv (llama.cpp, balanced, local disk)", decode + ["--kv", str(work / "context.kv")],
                 _celslm_rate),
                ("peer", "llama.cpp restoring its own saved state (plain llama-cpp-python)", peer, _peer_rate),
                ("kv-link", f"celslm decode --kv over an {Link.parse(self.link).label} link",
                 decode + ["--kv", str(work / "context.kv"), "--link", self.link], _celslm_rate),
                ("peer-link", f"llama.cpp's state over the same {Link.parse(self.link).label} link", peer + [self.link],
                 _peer_rate),
            ]
            if first and edge_only:
                configs += [
                    ("edge-llama", "celslm edge-only (llama.cpp)", decode + ["--context", str(work / "context.txt")],
                     _celslm_rate),
                    ("peer-edge", "llama.cpp edge-only (plain llama-cpp-python)",
                     PEER_CMD + ["prefill", str(self.gguf), str(work / "context.state"), str(work / "ids.json"),
                                 str(self.new_tokens), str(self.threads)], _peer_rate)]
                if transformers:
                    configs.append(("edge-transformers", "celslm edge-only (transformers, fp32)",
                                    decode + ["--engine", "transformers", "--context", str(work / "context.txt")],
                                    _celslm_rate))
            cells = -(-(len(context_ids) + len(prompt_ids) + self.new_tokens + 1) // 256) * 256
            service = _warm_service(self.spec, work / "context.kv", cells) if first and shutil.which("curl") else None
            if service:
                body = json.dumps({"context": str(work / "context.kv"), "messages": [{"role": "user", "content": PROMPT}],
                                   "max_tokens": self.new_tokens, "temperature": 0, "stream": True})
                configs.insert(2, ("warm", "celslm serve, context in memory (curl, streamed)",
                                   ["curl", "-sSN", "-H", "Content-Type: application/json", "-d", body,
                                    f"{service.url}/v1/chat/completions"], _sse_rate))
            rows = {key: Row(key, label) for key, label, _, _ in configs}
            total = self.repeats * len(configs)
            try:
                for rep in range(self.repeats):
                    for index, (key, label, cmd, rate) in enumerate(configs):
                        self.say(f"{len(context_ids)} tokens, run {rep + 1}/{self.repeats}: {label}",
                                 rep * len(configs) + index, total)
                        rows[key].runs.append(timed(cmd, self.env, rate, work))
                if service:  # the client is curl; the memory is the service's
                    for one in rows["warm"].runs:
                        one.peak_rss_mib = _peak_rss_mib(service.proc.pid)
            finally:
                if service:
                    service.stop()
            state_bytes = (work / "context.state").stat().st_size
        return _summary(rows, len(context_ids), len(prompt_ids), artifact_bytes, state_bytes)

    def switch(self, count: int, switches: int) -> dict:
        """Seconds from a request's arrival until its context is on the service's batch and its prompt runs
        (`context_s`), for two contexts asked for in turn from a service whose memory holds one of them:
        each request finds its context only in the edge cache (the artifact on local disk) and decodes it."""
        with tempfile.TemporaryDirectory(prefix="celslm-bench-switch-") as tmp:
            work = self.keep / f"switch-{count}" if self.keep else Path(tmp)
            longest = 0
            for name, files in (("a", DEFAULT_FILES), ("b", DEFAULT_FILES[::-1])):
                context_ids, prompt_ids, _ = self.prepare(work / name, count, files, state=False)
                longest = max(longest, len(context_ids) + len(prompt_ids) + 1)
            g = self.loaded.engine.geometry
            state = g.layers * 2 * g.kv_heads * g.head_dim * 2 * longest  # f16 K and V: one context's state bytes
            port = free_port()
            cells = -(-longest // 256) * 256  # room for one context and its request, not two
            service = Service(CLI + ["serve", "-m", self.spec, "--port", str(port), "--context-dir", str(work),
                                     "--memory-cache", str(int(state * 1.5)), "--parallel", "1",
                                     "--kv-cells", str(cells)],
                              port, "celslm serve", timeout_s=300, env=self.env)
            seconds, sources = [], []
            try:
                for index in range(switches + 2):  # the first two only load each context once
                    name = "ab"[index % 2]
                    self.say(f"warm service switching contexts: request {index + 1}/{switches + 2}", index, switches + 2)
                    body = json.dumps({"context": str(work / name / "context.kv"), "max_tokens": 1,
                                       "messages": [{"role": "user", "content": PROMPT}]})
                    request = urllib.request.Request(service.url + "/v1/chat/completions", body.encode(),
                                                     {"Content-Type": "application/json"})
                    timing = json.loads(urllib.request.urlopen(request, timeout=300).read())["celslm"]
                    if index >= 2:
                        seconds.append(timing["context_s"])
                        sources.append(timing["cache"])
            finally:
                service.stop()
        return {"context_tokens": count, "switches": len(seconds), "context_s": round(statistics.median(seconds), 4),
                "context_s_max": round(max(seconds), 4), "all_from_the_edge_cache": set(sources) == {"fetched"},
                "context_from": sources}


_PREPARED = "prepared.json"  # written last: the folder's artifact and state are whole


def _kept(work: Path, ids: str, state: bool) -> int | None:
    """The artifact's size when `work` (a `--keep` folder) already holds this context's artifact, and its
    llama.cpp state if `state`, from an earlier run; None when anything is missing or differs. The
    artifact's blobs are verified where they are read, by the processes measured."""
    try:
        prepared = json.loads((work / _PREPARED).read_text())
        same = (work / "ids.json").read_text() == ids and (not state or prepared["state"])
        return int(prepared["artifact_bytes"]) if same else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _summary(rows: dict, context_tokens: int, prompt_tokens: int, artifact_bytes: int, state_bytes: int) -> dict:
    summaries = {key: row.summary() for key, row in rows.items()}
    reference = rows["peer-edge"].runs[-1].text if "peer-edge" in rows else rows["peer"].runs[-1].text
    for key, row in rows.items():
        summaries[key]["same_text_as_llama_cpp"] = all(r.text == reference for r in row.runs)
    ratio = lambda a, b: round(a / b, 3) if a and b else None  # noqa: E731
    get = lambda key, field: summaries.get(key, {}).get(field)  # noqa: E731
    return {
        "context_tokens": context_tokens, "prompt_tokens": prompt_tokens, "artifact_bytes": artifact_bytes,
        "llama_state_bytes": state_bytes, "rows": list(summaries.values()),
        "kv_decode_hidden_share": get("kv", "kv_decode_hidden_share"),
        "ratios": {
            "first_byte_kv_vs_peer": ratio(get("kv", "first_byte_s"), get("peer", "first_byte_s")),
            "first_byte_kv_vs_peer_over_link": ratio(get("kv-link", "first_byte_s"), get("peer-link", "first_byte_s")),
            "decode_rate_kv_vs_peer": ratio(get("kv", "decode_tok_s"), get("peer", "decode_tok_s")),
            "peak_rss_kv_vs_peer": ratio(get("kv", "peak_rss_mib"), get("peer", "peak_rss_mib")),
            "state_bytes_vs_artifact": ratio(state_bytes, artifact_bytes),
            "first_byte_llama_edge_only_vs_kv": ratio(get("peer-edge", "first_byte_s"), get("kv", "first_byte_s")),
            "first_byte_llama_edge_only_vs_warm": ratio(get("peer-edge", "first_byte_s"), get("warm", "first_byte_s")),
        },
    }


def _warm_service(spec: str, context: Path, cells: int) -> Service:
    """A `celslm serve` on loopback with the context already in memory (one request served), its batch
    `cells` long, at least the service's default: room for the context, the prompt and the answer."""
    port = free_port()
    service = Service(CLI + ["serve", "-m", spec, "--port", str(port), "--context-dir", str(context.parent),
                             "--kv-cells", str(max(cells, DEFAULT_CELLS))], port, "celslm serve", timeout_s=300)
    body = json.dumps({"context": str(context), "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 1})
    request = urllib.request.Request(service.url + "/v1/chat/completions", body.encode(), {"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(request, timeout=300).read()
    except BaseException:
        service.stop()
        raise
    return service


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(result: dict) -> list:
    """A table per context length, its ratios, and the warm service's switch."""
    out = []
    for length in result["lengths"]:
        table = Table("process", "first byte s", "total s", "decode tok/s", "peak MiB", "text = llama.cpp",
                      title=f"{result['model']}: {length['context_tokens']}-token context, {result['new_tokens']} new "
                            f"tokens, median of {result['repeats']} interleaved runs, {result['threads']} threads")
        for r in length["rows"]:
            table.add_row(r["label"], _fmt(r["first_byte_s"], ".2f"), _fmt(r["total_s"], ".2f"),
                          _fmt(r["decode_tok_s"], ".1f"), _fmt(r["peak_rss_mib"], ".0f"),
                          "yes" if r["same_text_as_llama_cpp"] else "no")
        ratios = length["ratios"]
        out += [table,
                f"first byte, celslm --kv / llama.cpp state restore: {_fmt(ratios['first_byte_kv_vs_peer'], '.2f')}x "
                f"(local disk), {_fmt(ratios['first_byte_kv_vs_peer_over_link'], '.2f')}x ({result['link']}); "
                f"peak memory: {_fmt(ratios['peak_rss_kv_vs_peer'], '.2f')}x; decode rate: "
                f"{_fmt(ratios['decode_rate_kv_vs_peer'], '.2f')}x",
                f"artifact decode done while the model loaded: {_fmt(length['kv_decode_hidden_share'], '.0%')}; bytes: "
                f"artifact {length['artifact_bytes']:,}, llama.cpp f16 state {length['llama_state_bytes']:,} "
                f"({_fmt(ratios['state_bytes_vs_artifact'], '.1f')}x larger)"]
        if ratios["first_byte_llama_edge_only_vs_kv"]:
            out.append(f"llama.cpp edge-only first byte is {_fmt(ratios['first_byte_llama_edge_only_vs_kv'], '.1f')}x later "
                       f"than celslm --kv, {_fmt(ratios['first_byte_llama_edge_only_vs_warm'], '.1f')}x later than the warm service")
    switch = result.get("switch")
    if switch:
        out.append(f"warm service, switching to a {switch['context_tokens']}-token context in the edge cache but not in "
                   f"memory: {switch['context_s'] * 1000:.0f} ms median to the prompt's start (max "
                   f"{switch['context_s_max'] * 1000:.0f} ms, {switch['switches']} switches"
                   f"{'' if switch['all_from_the_edge_cache'] else '; NOT all decoded from the edge cache'})")
    return out
