"""bench tenants: many streaming clients at once over one warm shared context, whole processes on
loopback, beside llama-server on the same GGUF.

One context (`tokens` tokens of third-party code: the first of `corpus.eval_cases(source="third-party")`
in the model's chat framing) is prefilled once into an exact fp16 artifact, in a folder every celslm
service is started with (`--context-dir`). Three servers run side by side, each warm before anything
is timed:

  celslm serve --parallel 1   the context resident, one sequence at a time
  celslm serve --parallel N   up to N sequences decoding together over the context's shared cells
  llama-server --parallel N   llama.cpp's own server (--kv-unified), the context already in every
                              slot's prompt cache: each slot is warmed by one of N concurrent
                              requests, and a second round must find it

Requests cycle through 16 prompts that differ from their first word on, in one order for every server:
like requests of different tenants, no request finds another's prompt in a cache (llama-server would
reuse it; celslm serve never shares prompt cells), only the context.

Closed loop: at each level, `clients` streaming clients send one request each at the same instant;
servers and levels interleave (A B C A B C ...) over `rounds`. Open loop: requests arrive as a seeded
Poisson process, the same schedule for every server, at a rate below celslm --parallel N's measured
capacity (bounded in count and in time). Per row: aggregate tokens/s (tokens streamed / wall time from
the first send to the last end; the median over rounds), p50 and p99 time to first token (the first
chunk carrying a token, pooled over rounds), errors. Greedy, `new_tokens` per answer: llama-server
ignores end-of-sequence so every answer has exactly that many; celslm's API cannot be told to, so its
rate counts the tokens it reports (usage.completion_tokens). Memory: each server's VmRSS and VmHWM
after the runs (/proc), and the KV buffer llama-server logs.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import random
import re
import shutil
import statistics
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rich.table import Table

from celslm import prompting
from celslm.artifact import write_dir
from celslm.corpus import eval_cases
from celslm.errors import UsageError
from celslm.models import LoadedModel, model_gguf
from celslm.testing.processes import CLI, Service, free_port

PROMPT = "Explain what this code does, function by function."
QUESTIONS = 16  # requests cycle through this many prompts, which differ from their first word on


def prompts() -> list[str]:
    """The prompts requests cycle through, in one order for every server: each differs from the last at
    its start, so no server can answer from a cache of another request's prompt (llama-server would
    otherwise; celslm serve never shares prompt cells), only of the context."""
    return [f"Question {i + 1}: {PROMPT}" for i in range(QUESTIONS)]
ARTIFACT_NAME = "context.kv"  # in the --context-dir folder
# The checkout's `make llama-server` output (an editable install: celslm/bench/ -> the repository root).
LLAMA_SERVER = Path(__file__).resolve().parents[2] / ".llama-server" / "bin" / "llama-server"
LLAMA_SERVER_HINT = "make llama-server builds it from the llama.cpp the pinned llama-cpp-python vendors"
CLIENT_TIMEOUT_S = 600
POISSON_MAX_S = 120.0  # the open-loop schedule never spans more than this
POISSON_LOAD = 0.8  # default arrival rate: this share of celslm --parallel N's measured requests/s
OVERLOAD = 2.0  # the overload run's arrival rate: this multiple of celslm --parallel N's measured requests/s
_KV_LOG = re.compile(r"KV buffer size\s*=\s*([\d.]+) MiB")
_KV_METRIC = re.compile(r"^(\w*kv\w*)(\{[^}]*\})?\s+([-+\d.eE]+)$", re.MULTILINE | re.IGNORECASE)


@dataclass(frozen=True)
class Reading:
    """What one streamed event says: whether it carries a token, its text, and what the final event adds."""

    token: bool = False
    text: str = ""
    tokens: int | None = None  # the answer's token count (final event)
    cache_hit: bool | None = None  # the context came from the server's cache (final event)
    error: str | None = None


@dataclass(frozen=True)
class Sample:
    """One request, on its level's clock (seconds from the level's start)."""

    sent_s: float
    end_s: float
    ttft_s: float | None  # from its own send to its first token's chunk
    tokens: int
    text: str
    cache_hit: bool | None = None
    error: str | None = None


@dataclass
class Server:
    """A running server and how to ask it for `new_tokens` over the context."""

    key: str
    label: str
    service: Service
    path: str  # the endpoint streamed from
    body: Callable[[int], dict]  # new tokens -> request body
    read: Callable[[dict], Reading]  # one event -> what it says
    log: Path
    samples: dict = field(default_factory=dict)  # (run, clients) -> list of rounds, each a list of Samples


# ---------------------------------------------------------------- pure parts


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in (0, 1]): a value that was measured; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def poisson_schedule(rate_per_s: float, count: int, max_s: float = POISSON_MAX_S, seed: int = 0) -> list[float]:
    """Arrival offsets in seconds: the first at 0, then exponential gaps of mean 1/rate; at most `count`
    of them and none past `max_s`. The same seed gives the same schedule (every server gets it)."""
    if rate_per_s <= 0:
        raise UsageError(f"the arrival rate must be positive, got {rate_per_s:g}")
    rng, offsets, now = random.Random(seed), [], 0.0
    while len(offsets) < count and now <= max_s:
        offsets.append(now)
        now += rng.expovariate(rate_per_s)
    return offsets


def parse_levels(values: list[str] | None, default: tuple[int, ...] = (1, 2, 4, 8)) -> tuple[int, ...]:
    """`--clients 1,2,4 --clients 8` -> (1, 2, 4, 8): comma lists or repeats, each 1..256."""
    if not values:
        return default
    levels = []
    for value in values:
        for part in value.split(","):
            if not part.strip().isdigit() or not 1 <= int(part) <= 256:
                raise UsageError(f"--clients {value!r}: give client counts from 1 to 256, e.g. 1,2,4,8")
            levels.append(int(part))
    return tuple(dict.fromkeys(levels))


def summarize(rounds: list[list[Sample]]) -> dict:
    """A row from its rounds: tokens/s is each round's (its tokens over its first send to last end),
    the median over rounds; time-to-first-token percentiles pool every round's requests."""
    done = [s for samples in rounds for s in samples if s.error is None]
    failed = [s for samples in rounds for s in samples if s.error is not None]
    rates = []
    for samples in rounds:
        if samples:
            wall = max(s.end_s for s in samples) - min(s.sent_s for s in samples)
            rates.append(sum(s.tokens for s in samples if s.error is None) / wall if wall > 0 else 0.0)
    ttfts = [s.ttft_s for s in done if s.ttft_s is not None]
    hits = [s.cache_hit for s in done if s.cache_hit is not None]
    return {"requests": len(done) + len(failed), "errors": len(failed), "first_error": failed[0].error if failed else None,
            "tokens": sum(s.tokens for s in done), "min_tokens": min((s.tokens for s in done), default=0),
            "tok_s": round(statistics.median(rates), 3) if rates else None,
            "ttft_p50_s": _round(percentile(ttfts, 0.5)), "ttft_p99_s": _round(percentile(ttfts, 0.99)),
            "ttft_max_s": _round(max(ttfts, default=None)),
            "latency_p50_s": _round(percentile([s.end_s - s.sent_s for s in done], 0.5)),
            "cache_hits": f"{sum(hits)}/{len(hits)}" if hits else None}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def celslm_event(event: dict) -> Reading:
    """An event of `celslm serve`'s streamed chat completion."""
    if "error" in event:
        return Reading(error=str(event["error"].get("message", event["error"])))
    delta = (event.get("choices") or [{}])[0].get("delta", {})
    usage, extra = event.get("usage"), event.get("celslm") or {}
    return Reading(token="content" in delta, text=delta.get("content") or "",
                   tokens=usage["completion_tokens"] if usage else None,
                   cache_hit=extra["cache"] in ("resident", "memory") if "cache" in extra else None)


def llama_event(prompt_tokens: int) -> Callable[[dict], Reading]:
    """Reads llama-server's streamed /completion events; the context was cached when it evaluated no
    more than the prompt's own tokens (and the one it always re-reads)."""
    def read(event: dict) -> Reading:
        if "error" in event:
            return Reading(error=str(event["error"].get("message", event["error"])))
        if "prompt_progress" in event:
            return Reading()
        if not event.get("stop"):
            return Reading(token=True, text=event.get("content", ""))
        evaluated = (event.get("timings") or {}).get("prompt_n")
        return Reading(text=event.get("content", ""), tokens=event.get("tokens_predicted", 0),
                       cache_hit=None if evaluated is None else evaluated <= prompt_tokens + 1)
    return read


def ratios(result: dict) -> dict:
    """The issue's targets, as ratios of this run's rows (None where a row is missing)."""
    rows = {(r["server"], r["run"], r["clients"]): r for r in result["rows"]}
    parallel, one, many = result["parallel"], "celslm-1", "celslm-n"
    div = lambda a, b: round(a / b, 3) if a is not None and b else None  # noqa: E731
    out = {}
    for clients in result["clients"]:
        lone, batched = rows.get((many, "closed", 1)), rows.get((many, "closed", clients))
        serial, peer = rows.get((one, "closed", clients)), rows.get(("llama-server", "closed", clients))
        out[str(clients)] = {
            "slowest_ttft_vs_lone": div(batched and batched["ttft_max_s"], lone and lone["ttft_p50_s"]),
            "tok_s_vs_parallel_1": div(batched and batched["tok_s"], serial and serial["tok_s"]),
            "tok_s_vs_llama_server": div(batched and batched["tok_s"], peer and peer["tok_s"]),
            "ttft_p99_vs_llama_server": div(batched and batched["ttft_p99_s"], peer and peer["ttft_p99_s"]),
        }
    memory = {m["server"]: m for m in result["memory"]}
    out["hwm_parallel_n_vs_1"] = div(memory.get(many, {}).get("vm_hwm_mib"), memory.get(one, {}).get("vm_hwm_mib"))
    out["parallel"] = parallel
    return out


# ---------------------------------------------------------------- clients


async def _request(session, server: Server, body: dict, clock: float) -> Sample:
    import aiohttp

    sent = time.perf_counter()
    first, pieces, tokens, hit, error = None, [], None, None, None
    try:
        async with session.post(server.service.url + server.path, json=body) as response:
            if response.status != 200:
                error = f"HTTP {response.status}: {(await response.text())[:200]}"
            else:
                async for line in response.content:
                    if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                        continue
                    reading = server.read(json.loads(line[6:]))
                    if reading.error:
                        error = reading.error
                        break
                    if reading.token and first is None:
                        first = time.perf_counter()
                    pieces.append(reading.text)
                    if reading.tokens is not None:
                        tokens, hit = reading.tokens, reading.cache_hit
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    ended = time.perf_counter()
    if error is None and tokens is None:
        error = "the stream ended without its final event"
    return Sample(sent - clock, ended - clock, None if first is None else first - sent, tokens or 0, "".join(pieces),
                  hit, error)


def _session():
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), read_bufsize=1 << 20,
                                 timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S))


def closed_loop(server: Server, clients: int, new_tokens: int) -> list[Sample]:
    """`clients` requests sent at once; each client waits for its whole answer."""
    async def main():
        async with _session() as session:
            clock = time.perf_counter()
            return await asyncio.gather(*(_request(session, server, server.body(new_tokens), clock) for _ in range(clients)))
    return list(asyncio.run(main()))


def open_loop(server: Server, offsets: list[float], new_tokens: int) -> list[Sample]:
    """One request at each offset (seconds), whether or not earlier ones have finished."""
    async def main():
        async with _session() as session:
            clock = time.perf_counter()

            async def at(offset: float) -> Sample:
                await asyncio.sleep(max(0.0, clock + offset - time.perf_counter()))
                return await _request(session, server, server.body(new_tokens), clock)
            return await asyncio.gather(*(at(offset) for offset in offsets))
    return list(asyncio.run(main()))


# ---------------------------------------------------------------- servers


def context_of(loaded: LoadedModel, tokens: int) -> tuple[list[int], list[int], str]:
    """(context ids, each prompt's ids, framing): `tokens` context tokens of third-party code in the
    model's framing, and the prompts that close the user's turn, as `celslm serve` builds them."""
    cases = eval_cases(loaded.tokenizer, files=1, min_context=tokens, max_context=tokens, continuation=1, source="third-party")
    if not cases:
        raise UsageError(f"no installed third-party module holds {tokens} tokens; ask for fewer")
    framing = prompting.default_framing(loaded.tokenizer)
    text = loaded.tokenizer.decode(cases[0].context)
    context = prompting.context_ids(loaded.tokenizer, text, framing)[:tokens]
    return context, [prompting.prompt_ids(loaded.tokenizer, text, framing, raw=False) for text in prompts()], framing


def celslm_server(spec: str, parallel: int, context_dir: Path, env: dict, work: Path, serve_cli: list[str] = CLI,
                  max_queue: int | None = None) -> Server:
    port, log = free_port(), work / f"celslm-{parallel}{'-bounded' if max_queue is not None else ''}.log"
    bounded = ["--max-queue", str(max_queue)] if max_queue is not None else []
    service = Service([*serve_cli, "serve", "-m", spec, "--port", str(port), "--context-dir", str(context_dir),
                       "--parallel", str(parallel), *bounded], port, f"celslm serve --parallel {parallel}", log=log,
                      timeout_s=300, env=env)
    context = str(context_dir / ARTIFACT_NAME)
    questions = itertools.cycle(prompts())
    body = lambda new: {"context": context, "messages": [{"role": "user", "content": next(questions)}],  # noqa: E731
                        "max_tokens": new, "temperature": 0, "stream": True}
    label = f"celslm serve --parallel {parallel}" + (f" --max-queue {max_queue}" if max_queue is not None else "")
    return Server("celslm-1" if parallel == 1 else "celslm-n", label, service, "/v1/chat/completions", body, celslm_event, log)


def llama_server(binary: Path, gguf: Path, parallel: int, context: list[int], prompt_ids: list[list[int]], new_tokens: int,
                 threads: int, env: dict, work: Path) -> Server:
    """llama-server with a unified KV cache of room for every slot's whole sequence; idle slots keep
    their cells (--no-cache-idle-slots), so each keeps the context it was warmed with."""
    port, log = free_port(), work / "llama-server.log"
    longest = max(len(ids) for ids in prompt_ids)
    cells = parallel * 256 * math.ceil((len(context) + longest + new_tokens + 64) / 256)
    service = Service([str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--parallel", str(parallel),
                       "--kv-unified", "--no-cache-idle-slots", "-c", str(cells), "-t", str(threads), "-tb", str(threads),
                       "--no-webui"], port, f"llama-server --parallel {parallel}", log=log, timeout_s=300, env=env)
    questions = itertools.cycle(prompt_ids)
    body = lambda new: {"prompt": context + next(questions), "n_predict": new, "temperature": 0,  # noqa: E731
                        "ignore_eos": True, "cache_prompt": True, "stream": True}
    return Server("llama-server", f"llama-server --parallel {parallel}", service, "/completion", body,
                  llama_event(longest), log)


def warm(server: Server, parallel: int) -> dict:
    """One request, then `parallel` at once, twice (every llama-server slot gets the context); the last
    round must find the context cached."""
    closed_loop(server, 1, 1)
    closed_loop(server, parallel, 1)
    check = closed_loop(server, parallel, 1)
    errors = [s.error for s in check if s.error]
    if errors:
        raise RuntimeError(f"{server.label} failed while warming: {errors[0]}")
    return {"server": server.key, "hits": sum(bool(s.cache_hit) for s in check), "of": len(check)}


def memory(server: Server) -> dict:
    """The server process's resident memory now and at its peak, and the KV buffer it logged."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{server.service.proc.pid}/status").read_text().splitlines()
                  if ":" in line)
    mib = lambda key: round(int(status[key].split()[0]) / 1024, 1) if key in status else None  # noqa: E731
    kv = [float(m) for m in _KV_LOG.findall(server.log.read_text(errors="replace"))] if server.log.exists() else []
    return {"server": server.key, "label": server.label, "vm_rss_mib": mib("VmRSS"), "vm_hwm_mib": mib("VmHWM"),
            "kv_buffer_mib": round(sum(kv), 1) if kv else None, "kv_metrics": kv_metrics(server.service.url)}


def kv_metrics(url: str) -> dict[str, float]:
    """The samples of /metrics whose name mentions KV (cells, bytes), as the server reports them; {}
    when it has no such metric or no /metrics."""
    try:
        text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode(errors="replace")
    except OSError:
        return {}
    return {name + (labels or ""): float(value) for name, labels, value in _KV_METRIC.findall(text)}


def find_llama_server(path: str | None) -> Path | None:
    """--llama-server, else the checkout's `make llama-server` output, else llama-server on PATH."""
    if path:
        found = Path(path).expanduser()
        if not found.is_file() or not os.access(found, os.X_OK):
            raise UsageError(f"{path}: no such executable; {LLAMA_SERVER_HINT}")
        return found
    if LLAMA_SERVER.is_file():
        return LLAMA_SERVER
    which = shutil.which("llama-server")
    return Path(which) if which else None


def run(loaded: LoadedModel, spec: str, work: Path, *, clients: tuple[int, ...] = (1, 2, 4, 8), parallel: int = 4,
        threads: int | None = None, rounds: int = 2, new_tokens: int = 48, tokens: int = 2048,
        poisson_rate: float | None = None, poisson_requests: int = 16, overload_requests: int = 32, llama: Path | None = None,
        serve_cli: list[str] = CLI, progress: Callable[[str], None] | None = None) -> dict:
    """Every row on `loaded` (its engine prefills the artifact; `spec` names the model for the processes)."""
    say = progress or (lambda what: None)
    gguf = model_gguf(spec, loaded.folder)
    threads = threads or os.cpu_count() or 1
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "CELSLM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    context, prompt_ids, framing = context_of(loaded, tokens)
    say(f"prefilling the {len(context)}-token context into an artifact")
    from celslm.prefill import prefill

    context_dir = work / "contexts"
    write_dir(prefill(loaded, context, framing=framing, dtype="float16"), context_dir / ARTIFACT_NAME)
    notes = []
    if llama is None:
        notes.append(f"no llama-server row: {LLAMA_SERVER_HINT}, or give --llama-server PATH")
    elif gguf is None:
        notes.append(f"no llama-server row: {spec} has no GGUF")
        llama = None
    servers: list[Server] = []
    try:
        for parallel_of in (1, parallel):
            say(f"starting celslm serve --parallel {parallel_of}")
            servers.append(celslm_server(spec, parallel_of, context_dir, env, work, serve_cli))
        if llama is not None:
            say(f"starting llama-server --parallel {parallel}")
            servers.append(llama_server(llama, gguf, parallel, context, prompt_ids, new_tokens, threads, env, work))
        warmed = []
        for server in servers:
            say(f"warming {server.label}")
            warmed.append(warm(server, parallel))
        for round_ in range(rounds):  # interleaved: every server at a level, then the next level
            for level in clients:
                for server in servers:
                    say(f"round {round_ + 1}/{rounds}: {level} clients, {server.label}")
                    server.samples.setdefault(("closed", level), []).append(closed_loop(server, level, new_tokens))
        schedule, rate = [], None
        if poisson_requests:
            rate = poisson_rate or POISSON_LOAD * _capacity_rps(servers[1], clients)
            schedule = poisson_schedule(rate, poisson_requests)
            for server in servers:
                say(f"Poisson arrivals, {rate:.2f}/s x {len(schedule)}: {server.label}")
                server.samples[("poisson", len(schedule))] = [open_loop(server, schedule, new_tokens)]
        measured = [memory(server) for server in servers]
        overloaded = None
        if overload_requests:
            capacity = _capacity_rps(servers[1], clients)
            say(f"starting celslm serve --parallel {parallel} --max-queue {parallel} for the overload run")
            servers.append(celslm_server(spec, parallel, context_dir, env, work, serve_cli, max_queue=parallel))
            warm(servers[-1], parallel)
            say(f"overload: {OVERLOAD:g}x capacity, {OVERLOAD * capacity:.2f}/s x {overload_requests}")
            samples = open_loop(servers[-1], poisson_schedule(OVERLOAD * capacity, overload_requests, seed=1), new_tokens)
            overloaded = overload_summary(samples, OVERLOAD * capacity, servers[-1].label) | {"memory": memory(servers[-1])}
            servers.pop().service.stop()
    finally:
        for server in servers:
            server.service.stop()
    rows = [{"server": server.key, "label": server.label, "run": run_, "clients": level, **summarize(rounds_)}
            for server in servers for (run_, level), rounds_ in server.samples.items()]
    texts = {server.key: server.samples[("closed", clients[0])][0][0].text for server in servers}
    agree = {key: _same_start(text, texts["celslm-1"]) for key, text in texts.items() if key != "celslm-1"}
    result = {"model": spec, "gguf": str(gguf) if gguf else None, "context_tokens": len(context), "prompt_tokens": max(len(ids) for ids in prompt_ids),
              "new_tokens": new_tokens, "parallel": parallel, "threads": threads, "cores": os.cpu_count(), "rounds": rounds,
              "clients": list(clients), "poisson_rate_per_s": round(rate, 4) if rate else None,
              "poisson_span_s": round(schedule[-1], 2) if schedule else None, "llama_server": str(llama) if llama else None,
              "warm": warmed, "rows": rows, "memory": measured, "overload": overloaded, "same_text_as_parallel_1": agree, "notes": notes}
    result["ratios"] = ratios(result)
    return result


def overload_summary(samples: list[Sample], rate: float, label: str) -> dict:
    """What an overload run shows: how many were answered, how many refused with 429 and how fast the
    refusal came, and how many failed any other way (none should)."""
    refused = [s for s in samples if s.error and s.error.startswith("HTTP 429")]
    failed = [s for s in samples if s.error and not s.error.startswith("HTTP 429")]
    answered = [s for s in samples if not s.error]
    slowest = max((s.end_s - s.sent_s for s in refused), default=None)
    return {"label": label, "rate_per_s": round(rate, 4), "requests": len(samples), "answered": len(answered),
            "refused_429": len(refused), "refusal_max_s": _round(slowest), "failed_otherwise": len(failed),
            "failures": [s.error for s in failed][:3], "ttft_p99_answered_s": _round(percentile(
                [s.ttft_s for s in answered if s.ttft_s is not None], 0.99))}


def _capacity_rps(server: Server, clients: tuple[int, ...]) -> float:
    """Requests/s the server finished at the largest closed-loop level (median over rounds)."""
    rates = [len(samples) / (max(s.end_s for s in samples) - min(s.sent_s for s in samples))
             for samples in server.samples[("closed", max(clients))]]
    return statistics.median(rates)


def _same_start(a: str, b: str) -> bool:
    """Greedy answers agree over their common length (celslm may stop at end-of-sequence first)."""
    shorter = min(len(a), len(b))
    return shorter > 0 and a[:shorter] == b[:shorter]


# ---------------------------------------------------------------- output


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(result: dict) -> list:
    """The table and the lines `bench tenants` prints."""
    table = Table("server", "run", "tokens/s", "TTFT p50 s", "TTFT p99 s", "TTFT max s", "tokens", "context cached",
                  "errors",
                  title=f"{result['model']}: one warm {result['context_tokens']}-token context, {result['new_tokens']} new "
                        f"tokens, streamed, {result['threads']} threads on {result['cores']} cores; tokens/s: median of "
                        f"{result['rounds']} interleaved rounds")
    for r in result["rows"]:
        run = f"{r['clients']} at once" if r["run"] == "closed" else f"Poisson {result['poisson_rate_per_s']:.2f}/s x {r['clients']}"
        table.add_row(r["label"], run, _fmt(r["tok_s"], ".1f"), _fmt(r["ttft_p50_s"], ".2f"), _fmt(r["ttft_p99_s"], ".2f"),
                      _fmt(r["ttft_max_s"], ".2f"), f"{r['tokens']:,}", r["cache_hits"] or "-", str(r["errors"]))
    shown: list = [table]
    memory = Table("server", "VmRSS MiB", "VmHWM MiB", "KV buffer MiB", title="memory after the runs")
    for m in result["memory"]:
        memory.add_row(m.get("label", m["server"]), _fmt(m["vm_rss_mib"], ".0f"), _fmt(m["vm_hwm_mib"], ".0f"), _fmt(m["kv_buffer_mib"], ".0f"))
    shown.append(memory)
    r = result["ratios"]
    for clients in result["clients"]:
        at = r[str(clients)]
        shown.append(f"{clients} clients, celslm --parallel {result['parallel']}: slowest first token "
                     f"{_fmt(at['slowest_ttft_vs_lone'], '.2f')}x a lone client's; tokens/s "
                     f"{_fmt(at['tok_s_vs_parallel_1'], '.2f')}x --parallel 1, {_fmt(at['tok_s_vs_llama_server'], '.2f')}x "
                     f"llama-server; TTFT p99 {_fmt(at['ttft_p99_vs_llama_server'], '.2f')}x llama-server's")
    shown.append(f"peak memory, --parallel {result['parallel']} / --parallel 1: {_fmt(r['hwm_parallel_n_vs_1'], '.2f')}x")
    if o := result.get("overload"):
        shown.append(f"overload, {o['label']}, Poisson {o['rate_per_s']:.2f}/s ({OVERLOAD:g}x its measured capacity) x "
                     f"{o['requests']}: {o['answered']} answered, {o['refused_429']} refused with 429 (slowest refusal "
                     f"{_fmt(o['refusal_max_s'] and o['refusal_max_s'] * 1000, '.0f')} ms), {o['failed_otherwise']} failed "
                     f"otherwise; peak memory {_fmt(o['memory']['vm_hwm_mib'], '.0f')} MiB")
    if any(r["min_tokens"] < result["new_tokens"] for r in result["rows"] if r["server"] != "llama-server"):
        shown.append(f"celslm stopped some answers at end-of-sequence before {result['new_tokens']} tokens: its tokens/s "
                     f"counts the tokens it generated (llama-server ignores end-of-sequence)")
    return shown


def notes(result: dict) -> list[str]:
    """What was left out, and servers that did not have the context cached (for stderr)."""
    lines = [f"note: {note}" for note in result["notes"]]
    lines += [f"note: {w['server']} had the context cached for {w['hits']} of {w['of']} warm requests"
              for w in result["warm"] if w["hits"] < w["of"]]
    lines += [f"note: {key}'s first answer differs from celslm --parallel 1's" for key, same in
              result["same_text_as_parallel_1"].items() if not same]
    return lines
