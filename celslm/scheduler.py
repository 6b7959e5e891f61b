"""The edge service's scheduler: requests from many tenants admitted fairly, then decoded together on
one `batching.KVPool` by one thread, a step at a time.

A request goes through
  queued     admitted to a bounded queue (past it, or past its tenant's cap: `Overloaded`, at once);
             its context is resolved and its prompt tokenized meanwhile, in the loader thread
  started    a request sequence is free and the KV has room: its context is made resident (loaded
             once, however many requests use it) and shared into the request's sequence
  prompting  its prompt is read in chunks, interleaved with the others' decode steps
  generating one token per step, sampled with its own settings, until a stop, its limit, its
  done       deadline, or its client leaving; its own cells are removed whichever way it ends
Tenants take turns: each admission goes to the next tenant, in order, with a request ready, so one
tenant's burst queues behind its own requests, not everyone's.

Every request reserves the cells it can need (prompt + max new tokens) when it starts, so a step
never runs out of cells; a context no running request uses is evicted first when room is needed (its
state bytes stay in the host-memory LRU, the second level).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from celslm.batching import KVPool, Row
from celslm.decode import Sampling, TextStream, next_token
from celslm.errors import CelslmError, Overloaded, UnavailableError, UsageError


GATHER_S = 0.02  # how long an idle scheduler waits for requests arriving together with the first
GATHER_MAX_S = 0.2  # ... and at most, for those that arrived but whose context and prompt are still being prepared


@dataclass(frozen=True)
class Limits:
    parallel: int = 4  # request sequences decoded together
    prompt_chunk: int = 64  # prompt tokens read per step, over all requests still reading theirs
    max_queue: int = 64  # requests waiting for a sequence, at most
    deadline_s: float = 300.0  # from arrival to the last token


@dataclass(frozen=True)
class Tenant:
    name: str
    concurrency: int | None = None  # requests queued or running at once, at most (None: no cap)


@dataclass(frozen=True)
class ContextState:
    """A public context ready to load: llama.cpp state bytes of positions 0..tokens-1."""

    artifact: str  # its artifact id, or for a composition its parts' ids and link tokens (`service.composed_key`)
    tokens: int
    framing: str
    state: bytes | np.ndarray  # a numpy uint8 buffer as `LlamaEngine.state_of` makes it
    token_ids: tuple[int, ...] = ()  # the context's ids, which a composition's link tokens are read from
    parts: tuple[str, ...] = ()  # the artifacts it was made of, in order: one, or a composition's
    recomputed: int = 0  # a composition's separators and link tokens, computed here


@dataclass(frozen=True)
class Prepared:
    context: ContextState
    prompt_ids: list[int]
    source: str  # where the context came from: "resident", "memory", "fetched" or "composed" (of parts)


class Expired(UnavailableError):
    """A request's deadline passed before its last token."""


class Gone(Exception):
    """The client left: the request ends without an answer."""


@dataclass
class Job:
    """One request. `sink(kind, value)` is called from the scheduler's threads: ("piece", text) as text
    comes, then once ("done", result dict) or ("error", exception)."""

    tenant: Tenant
    context_ref: str | tuple[str, ...]  # several: composed, `link_tokens` of each after the first computed here
    prompt: str
    raw: bool
    sampling: Sampling
    stop: tuple[str, ...]
    sink: Callable[[str, object], None]
    link_tokens: int | None = None  # None: compose.DEFAULT_LINK
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # set by the scheduler
    prepared: Prepared | BaseException | None = None
    seq: int = -1
    read: int = 0  # prompt tokens evaluated so far
    position: int = 0  # the next position of the sequence
    pending: int | None = None  # the sampled token to evaluate next
    generated: int = 0
    started_at: float | None = None  # its context resident and a sequence its own: the prompt runs next
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished: bool = False
    text: "StopText | None" = None
    rng: np.random.Generator | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def cells(self) -> int:
        return len(self.prepared.prompt_ids) + self.sampling.max_new_tokens


class StopText:
    """Generated ids -> text pieces, ending at the first stop string (which is not part of the text).
    Text that could be the start of a stop string is held back until it cannot be."""

    def __init__(self, tokenizer, skip: set[int], stop: tuple[str, ...]):
        self.stream, self.stop = TextStream(tokenizer, skip), stop
        self.held = ""  # decoded, not yet given out
        self.given = []
        self.stopped = False

    def push(self, token: int) -> str:
        return self._cut(self.held + self.stream.push(token))

    def flush(self) -> str:
        piece = self._cut(self.held + self.stream.flush(), final=True)
        return piece + (self.held if not self.stopped else "")

    def _cut(self, text: str, final: bool = False) -> str:
        for stop in self.stop:
            at = text.find(stop)
            if at >= 0:
                self.stopped, self.held = True, ""
                return self._give(text[:at])
        keep = 0 if final else max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep :] if keep else ""
        return self._give(text[: len(text) - keep])

    def _give(self, piece: str) -> str:
        self.given.append(piece)
        return piece

    @property
    def text(self) -> str:
        return "".join(self.given)


@dataclass
class _Resident:
    context: ContextState
    seq: int
    users: int = 0
    used_at: float = 0.0


class Scheduler:
    """Admits jobs and decodes them on `pool`; `prepare(job)` resolves a job's context and prompt (in
    the loader thread, where fetching and decoding an artifact may take seconds)."""

    def __init__(self, pool: KVPool, limits: Limits, prepare: Callable[[Job], Prepared], tokenizer, stop_ids: set[int],
                 max_positions: int, registry: CollectorRegistry | None = None):
        self.pool, self.limits, self.prepare, self.tokenizer = pool, limits, prepare, tokenizer
        self.stop_ids, self.max_positions = stop_ids, max_positions
        self._lock = threading.Condition()  # the queues and counts; taken before _pool_lock, never after
        self._pool_lock = threading.Lock()  # llama.cpp's context: the steps, and reads of its cells
        self._waiting: OrderedDict[str, deque[Job]] = OrderedDict()  # by tenant, in turn order
        self._in_flight: dict[str, int] = {}
        self._queued = 0
        self._active: list[Job] = []
        self._free = list(range(pool.requests))
        self._resident: dict[str, _Resident] = {}
        self._committed = 0  # cells reserved by resident contexts and running requests
        self._closed = False
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="celslm-context")
        self._metrics(registry or CollectorRegistry())
        self._thread = threading.Thread(target=self._loop, name="celslm-scheduler", daemon=True)
        self._thread.start()

    def _metrics(self, registry: CollectorRegistry) -> None:
        self.m_active = Gauge("celslm_active_sequences", "Requests decoding now", registry=registry)
        self.m_queue = Gauge("celslm_queue_depth", "Requests waiting for a sequence", registry=registry)
        self.m_tokens = Counter("celslm_tokens_generated", "Tokens generated", registry=registry)
        self.m_served = Counter("celslm_requests_served", "Requests answered to the end", registry=registry)
        self.m_refused = Counter("celslm_requests_refused", "Requests refused as overload (429)", ["reason"],
                                 registry=registry)
        self.m_contexts = Counter("celslm_context_lookups", "Contexts a request needed, by where they were found "
                                  "(resident in the KV cache, in memory, fetched, composed of parts)", ["source"], registry=registry)
        self.m_ttft = Histogram("celslm_time_to_first_token_seconds", "From arrival to the first token", registry=registry,
                                buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64))
        self.m_token = Histogram("celslm_time_per_token_seconds", "Between one token of a request and its next",
                                 registry=registry, buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2))
        self.m_resident = Gauge("celslm_resident_contexts", "Contexts held in the KV cache", registry=registry)
        self.m_cells = Gauge("celslm_kv_cells_reserved", "KV cells reserved by contexts and running requests",
                             registry=registry)

    # -- from any thread

    def submit(self, job: Job) -> None:
        """Queue `job`, or raise `Overloaded` at once."""
        with self._lock:
            if self._closed:
                raise UnavailableError("the service is shutting down")
            name, cap = job.tenant.name, job.tenant.concurrency
            if cap is not None and self._in_flight.get(name, 0) >= cap:
                self.m_refused.labels("tenant_cap").inc()
                raise Overloaded(f"tenant {name!r} already has {cap} requests in flight (its cap)",
                                 retry_after_s=self._retry_after())
            if self._queued >= self.limits.max_queue:
                self.m_refused.labels("queue_full").inc()
                raise Overloaded(f"{self._queued} requests are already waiting (the queue's limit)",
                                 retry_after_s=self._retry_after())
            self._in_flight[name] = self._in_flight.get(name, 0) + 1
            self._waiting.setdefault(name, deque()).append(job)
            self._queued += 1
            self.m_queue.set(self._queued)
        try:
            self._loader.submit(self._prepare, job)
        except RuntimeError as exc:  # closed between the check above and here
            raise UnavailableError("the service is shutting down") from exc

    def _retry_after(self) -> float:
        """About when a sequence frees: the shortest remaining answer at the current step rate, at least 1 s."""
        return 1.0 if not self._active else max(1.0, min(j.sampling.max_new_tokens - j.generated for j in self._active) * 0.1)

    def stats(self) -> dict:
        with self._lock:
            return {"parallel": self.pool.requests, "active": len(self._active), "queued": self._queued,
                    "resident_contexts": len(self._resident), "kv_cells": self.pool.cells,
                    "kv_cells_reserved": self._committed}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join()  # the pool is freed after this: never under a step
        self._loader.shutdown(wait=True, cancel_futures=True)

    # -- the loader thread

    def _prepare(self, job: Job) -> None:
        try:
            if job.cancelled.is_set():
                raise Gone()
            prepared = self.prepare(job)
            needed = prepared.context.tokens + len(prepared.prompt_ids)
            if needed + job.sampling.max_new_tokens > self.pool.cells:
                raise UsageError(f"context ({prepared.context.tokens} tokens), prompt ({len(prepared.prompt_ids)}) and "
                                 f"max_tokens ({job.sampling.max_new_tokens}) need {needed + job.sampling.max_new_tokens} "
                                 f"KV cells; this service holds {self.pool.cells}")
            self.m_contexts.labels(prepared.source).inc()
        except BaseException as exc:  # delivered by the scheduler thread, in order with everything else
            prepared = exc
        with self._lock:
            job.prepared = prepared
            self._lock.notify_all()

    # -- the scheduler thread

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._active and not self._startable():
                    self._lock.wait(timeout=1.0)
                    self._expire_waiting()
                if self._closed:
                    break
                if not self._active:
                    self._gather()
                self._expire_waiting()
                self._admit()
            if self._active:
                try:
                    self._step()
                except Exception as exc:  # a defect in one step must not hang every client: end what ran in it
                    for job in list(self._active):
                        if not job.finished:
                            self._finish(job, CelslmError(f"the service failed while decoding: {type(exc).__name__}: {exc}"))
        for job in list(self._active):
            self._finish(job, UnavailableError("the service is shutting down"))
        with self._lock:
            for job in [job for queue in self._waiting.values() for job in queue]:
                self._deliver_error(job, UnavailableError("the service is shutting down"))
            self._waiting.clear()

    def _gather(self) -> None:
        """Idle, with a request ready: wait a moment for others arriving with it, and for those already
        arrived to be prepared, so that their prompts are read in the same first step instead of each
        waiting for the step before it (on a CPU a step's cost grows with its prompt tokens)."""
        start = time.perf_counter()
        while (now := time.perf_counter()) < start + GATHER_MAX_S and not self._closed:
            jobs = [job for queue in self._waiting.values() for job in queue]
            ready = sum(job.prepared is not None for job in jobs)
            if ready >= len(self._free) or (ready == len(jobs) and now >= start + GATHER_S):
                return
            self._lock.wait(timeout=start + (GATHER_S if ready == len(jobs) else GATHER_MAX_S) - now)

    def _startable(self) -> bool:
        return any(job.prepared is not None for queue in self._waiting.values() for job in queue)

    def _expire_waiting(self) -> None:
        now = time.perf_counter()
        for queue in self._waiting.values():
            for job in list(queue):
                if job.cancelled.is_set() or now - job.arrived > self.limits.deadline_s:
                    queue.remove(job)
                    self._dequeued(job)
                    self._deliver_error(job, Gone() if job.cancelled.is_set() else
                                        Expired(f"the request waited past its {self.limits.deadline_s:g} s deadline"))

    def _dequeued(self, job: Job) -> None:
        self._queued -= 1
        self.m_queue.set(self._queued)

    def _admit(self) -> None:
        """Start ready jobs while sequences and cells allow, one tenant after the other."""
        while self._free:
            job = self._next_ready()
            if job is None:
                break
            if isinstance(job.prepared, BaseException):
                self._deliver_error(job, job.prepared)
                continue
            if not self._start(job):
                self._waiting.setdefault(job.tenant.name, deque()).appendleft(job)  # stays first in its turn
                self._queued += 1
                break
        self.m_queue.set(self._queued)

    def _next_ready(self) -> Job | None:
        for name in list(self._waiting):
            queue = self._waiting[name]
            job = next((j for j in queue if j.prepared is not None), None)
            if job is None:
                continue
            queue.remove(job)
            self._waiting.move_to_end(name)  # its turn is over
            if not queue:
                del self._waiting[name]
            self._queued -= 1
            return job
        return None

    def _start(self, job: Job) -> bool:
        """Give `job` a sequence over its context; False when the KV has no room for it yet."""
        prepared = job.prepared
        resident = self._resident.get(prepared.context.artifact)
        if resident is None:
            resident = self._make_resident(prepared.context, job.cells)
            if resident is None:
                return False
        elif self._committed + job.cells > self.pool.cells and not self._evict_idle(job.cells, keep=resident):
            return False
        job.seq = self._free.pop()
        with self._pool_lock:
            self.pool.share(resident.seq, job.seq)
        resident.users += 1
        resident.used_at = time.perf_counter()
        self._committed += job.cells
        self.m_cells.set(self._committed)
        job.position = prepared.context.tokens
        job.text = StopText(self.tokenizer, self.stop_ids, job.stop)
        job.rng = np.random.default_rng(job.sampling.seed)
        job.started_at = time.perf_counter()
        self._active.append(job)
        self.m_active.set(len(self._active))
        return True

    def _make_resident(self, context: ContextState, extra: int) -> _Resident | None:
        needed = context.tokens + extra
        if self._committed + needed > self.pool.cells and not self._evict_idle(needed):
            return None
        seq = self._free_context_seq()
        if seq is None and self._evict_idle(0, one=True):
            seq = self._free_context_seq()
        if seq is None:
            return None
        while True:  # a state needs a run of free cells as long as it: make one, or wait for requests to end
            with self._pool_lock:
                if self.pool.load(seq, context.state):
                    break
            if not self._evict_idle(0, one=True):
                return None
        resident = _Resident(context, seq)
        self._resident[context.artifact] = resident
        self._committed += context.tokens
        self.m_resident.set(len(self._resident))
        return resident

    def _free_context_seq(self) -> int | None:
        taken = {r.seq for r in self._resident.values()}
        return next((s for s in map(self.pool.context_seq, range(self.pool.contexts)) if s not in taken), None)

    def _evict_idle(self, needed: int, keep: _Resident | None = None, one: bool = False) -> bool:
        """Evict contexts no request uses, least recently used first, until `needed` more cells fit (or
        one is gone, with `one`); False if that cannot be done."""
        idle = sorted((r for r in self._resident.values() if r.users == 0 and r is not keep), key=lambda r: r.used_at)
        for resident in idle:
            if not one and self._committed + needed <= self.pool.cells:
                return True
            with self._pool_lock:
                self.pool.drop(resident.seq)
            del self._resident[resident.context.artifact]
            self._committed -= resident.context.tokens
            self.m_resident.set(len(self._resident))
            if one:
                return True
        return not one and self._committed + needed <= self.pool.cells

    def _step(self) -> None:
        """One batch: a token for each generating request, then prompt chunks."""
        now = time.perf_counter()
        for job in list(self._active):
            if job.cancelled.is_set():
                self._finish(job, Gone())
            elif now - job.arrived > self.limits.deadline_s:
                self._finish(job, Expired(f"the request ran past its {self.limits.deadline_s:g} s deadline"))
        rows, owners = [], []
        for job in self._active:
            if job.pending is not None:
                rows.append(Row(job.pending, job.position, job.seq, True))
                owners.append(job)
        budget = self.limits.prompt_chunk
        for job in self._active:
            prompt = job.prepared.prompt_ids
            if job.pending is not None or job.read == len(prompt) or budget <= 0:
                continue
            take = min(budget, len(prompt) - job.read)
            for i in range(take):
                last = job.read + i == len(prompt) - 1
                rows.append(Row(prompt[job.read + i], job.position + i, job.seq, last))
                if last:
                    owners.append(job)
            budget -= take
        if not rows:
            return
        try:
            with self._pool_lock:
                logits = self.pool.decode(rows)
        except Exception as exc:  # nothing of this step can be trusted: end every request in it
            error = exc if isinstance(exc, CelslmError) else CelslmError(f"llama_decode failed: {type(exc).__name__}: {exc}")
            for job in list(self._active):
                self._finish(job, error)
            return
        for job in self._active:  # advance positions of everything the batch read
            count = sum(1 for r in rows if r.seq == job.seq)
            job.position += count
            if job.pending is None:
                job.read += count
        for job, row in zip(owners, logits):
            try:
                self._emit(job, next_token(row, job.sampling, job.rng))
            except Exception as exc:  # this request's sampling or text failed: it ends, the others go on
                if not job.finished:
                    self._finish(job, exc if isinstance(exc, CelslmError) else
                                 CelslmError(f"sampling failed: {type(exc).__name__}: {exc}"))

    def _emit(self, job: Job, token: int) -> None:
        now = time.perf_counter()
        if job.first_token_at is None:
            job.first_token_at = now
            self.m_ttft.observe(now - job.arrived)
        else:
            self.m_token.observe(now - job.last_token_at)
        job.last_token_at = now
        job.generated += 1
        self.m_tokens.inc()
        piece = job.text.push(token)
        if piece:
            job.sink("piece", piece)
        ended = (token in self.stop_ids or job.text.stopped or job.generated >= job.sampling.max_new_tokens
                 or job.position >= self.max_positions)
        if ended:
            self._finish(job, None, "stop" if token in self.stop_ids or job.text.stopped else "length")
        else:
            job.pending = token

    def _finish(self, job: Job, error: BaseException | None, reason: str = "length") -> None:
        """End a running job: its cells go, its context loses a user, its client gets the end."""
        with self._pool_lock:
            self.pool.drop(job.seq)
        with self._lock:
            self._active.remove(job)
            self._free.append(job.seq)
            self._committed -= job.cells
            resident = self._resident.get(job.prepared.context.artifact)
            if resident is not None:
                resident.users -= 1
            self._release(job)
            self.m_active.set(len(self._active))
            self.m_cells.set(self._committed)
            self._lock.notify_all()
        job.finished = True
        if error is not None:
            job.sink("error", error)
            return
        tail = job.text.flush()
        if tail:
            job.sink("piece", tail)
        self.m_served.inc()
        now = time.perf_counter()
        context = job.prepared.context
        job.sink("done", {"text": job.text.text, "finish": reason, "prompt_tokens": len(job.prepared.prompt_ids),
                          "completion_tokens": job.generated,
                          "celslm": {"context": context.artifact, "parts": list(context.parts), "context_tokens": context.tokens,
                                     "recomputed_tokens": context.recomputed,
                                     "cache": job.prepared.source, "engine": self.pool.engine.name,
                                     "context_s": round(job.started_at - job.arrived, 6),
                                     "ttft_s": round(job.first_token_at - job.arrived, 6),
                                     "total_s": round(now - job.arrived, 6)}})

    def _release(self, job: Job) -> None:
        name = job.tenant.name
        self._in_flight[name] -= 1
        if not self._in_flight[name]:
            del self._in_flight[name]

    def _deliver_error(self, job: Job, error: BaseException) -> None:
        """A job that never started ends (called with the lock held)."""
        self._release(job)
        job.finished = True
        job.sink("error", error)

    def cell_owners(self) -> list[tuple[int, tuple[int, ...]]]:
        """llama.cpp's cell metadata, read between steps (`KVPool.cell_owners`)."""
        with self._pool_lock:
            return self.pool.cell_owners()

    def resident(self, artifact: str) -> ContextState | None:
        with self._lock:
            entry = self._resident.get(artifact)
            return entry.context if entry else None

    def resident_seqs(self) -> dict[str, int]:
        with self._lock:
            return {artifact: r.seq for artifact, r in self._resident.items()}

    def active_seqs(self) -> dict[int, int]:
        """Running requests' sequences and the positions they hold so far."""
        with self._lock:
            return {job.seq: job.position for job in self._active}
