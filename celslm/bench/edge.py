"""bench edge: the edge as a user runs it, whole processes, against what a llama.cpp user runs instead.

One context (standard-library source nobody here wrote, cut to `tokens` tokens), one prompt, greedy
decoding of `new_tokens`, on the same GGUF. Each configuration is a fresh process, started by this
benchmark and timed from spawn to its first byte on stdout and to its exit; peak memory is that
process's own (wait4). Repetitions are interleaved (A B C ... A B C ...), so a busy machine slows
every row alike: read the ratios.

Rows:
  celslm decode --kv          the artifact (balanced codec, local disk) on the llama.cpp engine
  celslm serve (warm)         curl streaming a chat completion from a running `celslm serve` that has
                              the context in memory already (peak memory: the service's)
  celslm edge-only            celslm decode --context, on llama.cpp and on transformers
  llama.cpp state restore     a plain llama-cpp-python script restoring llama.cpp's own saved
                              sequence state of the context (`llama_peer.py restore`): the peer
  llama.cpp edge-only         the same script prefilling the context itself
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
from celslm.blocks import recode
from celslm.bench.ttft import stdlib_context
from celslm.calibrate import codec_codebook
from celslm.codecs import parse_codec
from celslm.errors import CelslmError, UsageError
from celslm.models import LoadedModel, model_gguf
from celslm.testing.processes import CLI, Service, free_port

PROMPT = "What does this code do? Answer briefly."
PEER = Path(__file__).with_name("llama_peer.py")
_DECODE_ROW = re.compile(r"of which decode \((\d+) tokens\)\D*?([\d.]+)")
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
    return Run(first_byte_s=first_at - started, total_s=ended - started, peak_rss_mib=int(rss_file.read_text()) / 1024,
               tokens=tokens, decode_tok_s=rate, text=text.strip())


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


def run(loaded: LoadedModel, spec: str, *, tokens: int = 2048, new_tokens: int = 64, repeats: int = 3,
        transformers: bool = True, threads: int | None = None,
        progress: Callable[[str, int, int | None], None] | None = None) -> dict:
    """`loaded` is the model on transformers (it writes the artifact, as the cloud would); `spec` names
    it for the processes measured."""
    gguf = model_gguf(spec, loaded.folder)
    if gguf is None:
        raise UsageError(f"{spec}: bench edge needs the model's GGUF (a .gguf file or a bundled model)")
    threads = threads or os.cpu_count() or 1
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "CELSLM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    framing = prompting.default_framing(loaded.tokenizer)
    text = stdlib_context(loaded.tokenizer, tokens)
    context_ids = prompting.context_ids(loaded.tokenizer, text, framing)
    prompt_ids = prompting.prompt_ids(loaded.tokenizer, PROMPT, framing, raw=False)
    with tempfile.TemporaryDirectory(prefix="celslm-bench-edge-") as tmp:
        work = Path(tmp)
        (work / "context.txt").write_text(text)
        (work / "ids.json").write_text(json.dumps({"context": context_ids, "prompt": prompt_ids, "eos": sorted(loaded.eos_ids)}))
        if progress:
            progress("prefill (the cloud's artifact, transformers)", 0, None)
        from celslm.prefill import prefill

        exact = prefill(loaded, context_ids, framing=framing)
        balanced = recode(MemoryReader(exact), parse_codec("balanced"), codec_codebook(parse_codec("balanced"), loaded))
        write_dir(balanced, work / "context.kv")
        if progress:
            progress("llama.cpp saves its own state of the context", 0, None)
        peer = [sys.executable, str(PEER)]
        subprocess.run(peer + ["save", str(gguf), str(work / "context.state"), str(work / "ids.json"), "0", str(threads)],
                       check=True, env=env, capture_output=True)
        decode = CLI + ["decode", "-m", spec, "-p", PROMPT, "-n", str(new_tokens), "--stats"]
        configs = [
            ("kv", "celslm decode --kv (llama.cpp, balanced, local disk)", decode + ["--kv", str(work / "context.kv")], _celslm_rate),
            ("peer", "llama.cpp restoring its own saved state (plain llama-cpp-python)",
             peer + ["restore", str(gguf), str(work / "context.state"), str(work / "ids.json"), str(new_tokens), str(threads)],
             _peer_rate),
            ("edge-llama", "celslm edge-only (llama.cpp)", decode + ["--context", str(work / "context.txt")], _celslm_rate),
            ("peer-edge", "llama.cpp edge-only (plain llama-cpp-python)",
             peer + ["prefill", str(gguf), str(work / "context.state"), str(work / "ids.json"), str(new_tokens), str(threads)],
             _peer_rate),
        ]
        service = _warm_service(spec, work / "context.kv") if shutil.which("curl") else None
        if service:
            body = json.dumps({"context": str(work / "context.kv"), "messages": [{"role": "user", "content": PROMPT}],
                               "max_tokens": new_tokens, "temperature": 0, "stream": True})
            configs.insert(1, ("warm", "celslm serve, context in memory (curl, streamed)",
                               ["curl", "-sSN", "-H", "Content-Type: application/json", "-d", body,
                                f"{service.url}/v1/chat/completions"], _sse_rate))
        if transformers:
            configs.append(("edge-transformers", "celslm edge-only (transformers, fp32)",
                            decode + ["--engine", "transformers", "--context", str(work / "context.txt")], _celslm_rate))
        rows = {key: Row(key, label) for key, label, _, _ in configs}
        total = repeats * len(configs)
        try:
            for rep in range(repeats):
                for index, (key, label, cmd, rate) in enumerate(configs):
                    if progress:
                        progress(f"run {rep + 1}/{repeats}: {label}", rep * len(configs) + index, total)
                    rows[key].runs.append(timed(cmd, env, rate, work))
            if service:  # the client is curl; the memory is the service's
                for one in rows["warm"].runs:
                    one.peak_rss_mib = _peak_rss_mib(service.proc.pid)
        finally:
            if service:
                service.stop()
        state_bytes = (work / "context.state").stat().st_size
    summaries = {key: row.summary() for key, row in rows.items()}
    reference = rows["peer-edge"].runs[-1].text
    for key, row in rows.items():
        summaries[key]["same_text_as_llama_cpp_edge_only"] = all(r.text == reference for r in row.runs)
    kv, peer_row, warm = summaries["kv"], summaries["peer"], summaries.get("warm", {})
    ratio = lambda a, b: round(a / b, 3) if a and b else None  # noqa: E731
    return {
        "model": spec, "gguf": str(gguf), "context_tokens": len(context_ids), "prompt_tokens": len(prompt_ids),
        "new_tokens": new_tokens, "repeats": repeats, "threads": threads,
        "artifact_bytes": balanced.manifest.blob_bytes(), "llama_state_bytes": state_bytes,
        "rows": list(summaries.values()),
        "ratios": {
            "first_byte_kv_vs_peer": ratio(kv["first_byte_s"], peer_row["first_byte_s"]),
            "decode_rate_kv_vs_peer": ratio(kv["decode_tok_s"], peer_row["decode_tok_s"]),
            "peak_rss_kv_vs_peer": ratio(kv["peak_rss_mib"], peer_row["peak_rss_mib"]),
            "state_bytes_vs_artifact": ratio(state_bytes, balanced.manifest.blob_bytes()),
            "first_byte_llama_edge_only_vs_kv": ratio(summaries["peer-edge"]["first_byte_s"], kv["first_byte_s"]),
            "first_byte_llama_edge_only_vs_warm": ratio(summaries["peer-edge"]["first_byte_s"], warm.get("first_byte_s")),
        },
    }


def _warm_service(spec: str, context: Path) -> Service:
    """A `celslm serve` on loopback with the context already in memory (one request served)."""
    port = free_port()
    service = Service(CLI + ["serve", "-m", spec, "--port", str(port), "--context-dir", str(context.parent)], port,
                      "celslm serve", timeout_s=300)
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
    """The table and the ratios `bench edge` prints."""
    table = Table("process", "first byte s", "total s", "decode tok/s", "peak MiB", "text = llama.cpp edge-only",
                  title=f"{result['model']}: {result['context_tokens']}-token context, {result['new_tokens']} new tokens, "
                        f"median of {result['repeats']} interleaved runs, {result['threads']} threads")
    for r in result["rows"]:
        table.add_row(r["label"], _fmt(r["first_byte_s"], ".2f"), _fmt(r["total_s"], ".2f"),
                      _fmt(r["decode_tok_s"], ".1f"), _fmt(r["peak_rss_mib"], ".0f"),
                      "yes" if r["same_text_as_llama_cpp_edge_only"] else "no")
    ratios = result["ratios"]
    return [table,
            f"first byte, celslm --kv / llama.cpp state restore: {_fmt(ratios['first_byte_kv_vs_peer'], '.2f')}x   "
            f"decode rate: {_fmt(ratios['decode_rate_kv_vs_peer'], '.2f')}x   "
            f"peak memory: {_fmt(ratios['peak_rss_kv_vs_peer'], '.2f')}x",
            f"bytes: artifact {result['artifact_bytes']:,}, llama.cpp f16 state {result['llama_state_bytes']:,} "
            f"({_fmt(ratios['state_bytes_vs_artifact'], '.1f')}x larger); llama.cpp edge-only first byte is "
            f"{_fmt(ratios['first_byte_llama_edge_only_vs_kv'], '.1f')}x later than celslm --kv, "
            f"{_fmt(ratios['first_byte_llama_edge_only_vs_warm'], '.1f')}x later than the warm service"]
