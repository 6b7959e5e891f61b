"""The streaming cache: an artifact's layers resolve as their blocks land.

A producer thread pulls blobs (from a directory, a tar stream, or the tiers) through an optional
emulated link into a bounded queue; a feed thread verifies and decodes them and publishes each
layer's post-RoPE KV as soon as all its blocks are in. The prompt's forward pass waits for layer l
only when it reaches layer l, so transfer and compute overlap. Every interval is recorded so a run
can say how much transfer time the pipeline hid.
"""

from __future__ import annotations

import queue
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from celslm.artifact import ArtifactReader
from celslm.blockread import open_layers
from celslm.engine import Engine
from celslm.errors import CelslmError, IntegrityError, UsageError

_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}


@dataclass
class Link:
    """An emulated link: bandwidth shared by every transfer, plus a round-trip time per request.

    Requests are pipelined: a transfer that follows the previous one within a round trip streams right
    behind it; one that starts on an idle link first pays the RTT. Numbers measured through it are
    labelled emulated."""

    rate_bps: float
    rtt_s: float = 0.0
    _free_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def parse(cls, spec: str) -> "Link":
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*(?::\s*(\d+(?:\.\d+)?)\s*(ms|s))?\s*", spec)
        if not match or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
            raise UsageError(f"bad link {spec!r}; use RATE[:RTT] such as 100mbit:20ms or 1gbit")
        rtt = float(match.group(3) or 0) / (1000 if (match.group(4) or "ms") == "ms" else 1)
        return cls(float(match.group(1)) * _UNITS[match.group(2).lower()], rtt)

    @property
    def label(self) -> str:
        return f"emulated {self.rate_bps / 1e6:g} Mbit/s, {self.rtt_s * 1000:g} ms RTT"

    def transfer(self, nbytes: int) -> None:
        with self._lock:
            now = time.perf_counter()
            begin = max(now, self._free_at) if now - self._free_at < self.rtt_s else now + self.rtt_s
            self._free_at = arrival = begin + nbytes * 8 / self.rate_bps
        delay = arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


@dataclass
class Timeline:
    """What happened when, in perf_counter seconds."""

    comm_start: float | None = None
    comm_end: float | None = None
    bytes: int = 0
    consumer_wait_s: float = 0.0  # time the decoder spent waiting for bytes
    compute: list = field(default_factory=list)  # (start, end) intervals of edge compute that could overlap
    decode: list = field(default_factory=list)  # (start, end) of each layer's decoding, on several threads at once

    @property
    def comm_s(self) -> float:
        return (self.comm_end - self.comm_start) if self.comm_start is not None and self.comm_end else 0.0

    @classmethod
    def merged(cls, timelines: list["Timeline"]) -> "Timeline":
        """Several transfers' timelines as one: from the first start to the last end, every byte and span."""
        starts = [t.comm_start for t in timelines if t.comm_start is not None]
        ends = [t.comm_end for t in timelines if t.comm_end]
        return cls(min(starts, default=None), max(ends, default=None), sum(t.bytes for t in timelines),
                   sum(t.consumer_wait_s for t in timelines), [s for t in timelines for s in t.compute],
                   [s for t in timelines for s in t.decode])

    @property
    def compute_s(self) -> float:
        return sum(end - start for start, end in self.compute)

    def decode_s(self) -> float:
        """Wall time the layers' decoding took: the union of their intervals."""
        return sum(end - start for start, end in _union(self.decode))

    def decode_before(self, moment: float) -> float:
        """Share of that wall time spent before `moment` (when the model finished loading: hidden behind it)."""
        total = self.decode_s()
        hidden = sum(max(0.0, min(end, moment) - start) for start, end in _union(self.decode))
        return hidden / total if total > 0 else 0.0

    def hidden_share(self) -> float:
        """Share of min(transfer, compute) during which both ran at once."""
        shorter = min(self.comm_s, self.compute_s)
        if shorter <= 0:
            return 0.0
        overlap = sum(max(0.0, min(end, self.comm_end) - max(start, self.comm_start)) for start, end in self.compute)
        return min(1.0, overlap / shorter)


class StreamedReader(ArtifactReader):
    """Wraps a reader: a producer thread fetches its blobs ahead (through `link`, if any)."""

    def __init__(self, inner: ArtifactReader, timeline: Timeline, link: Link | None = None, ahead: int = 64):
        super().__init__(inner.manifest, inner.source)
        self.identity = inner.identity
        self.inner, self.link, self.timeline, self.ahead = inner, link, timeline, ahead

    def raw_blobs(self, chunks=None):
        slots: queue.Queue = queue.Queue(maxsize=self.ahead)
        done = object()

        def produce():
            try:
                self.timeline.comm_start = time.perf_counter()
                for ref, data in self.inner.raw_blobs(chunks):
                    if data is not None and self.link:
                        self.link.transfer(len(data))
                    self.timeline.bytes += len(data or b"")
                    self.timeline.comm_end = time.perf_counter()
                    slots.put((ref, data))
                slots.put(done)
            except BaseException as exc:  # handed to the consumer, raised there
                slots.put(exc)

        threading.Thread(target=produce, name="celslm-fetch", daemon=True).start()
        while True:
            waited = time.perf_counter()
            item = slots.get()
            self.timeline.consumer_wait_s += time.perf_counter() - waited
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            yield item


class LayerFeed:
    """Layer l, placed in the engine's form (`Engine.place`), becomes available as soon as its blocks are
    decoded. One thread reads and verifies blocks in order; layers decode and are placed on
    `engine.decode_threads` workers at once (numpy, pcodec and hashing release the GIL), with numpy's
    BLAS held to one thread meanwhile (`_one_blas_thread`)."""

    def __init__(self, engine: Engine, reader: ArtifactReader, timeline: Timeline, chunks: int | None = None):
        self.timeline = timeline
        self.geometry = reader.manifest.geometry
        self.source = reader.source
        self.token_ids, layers = open_layers(reader, chunks)
        engine.reserve(len(self.token_ids))
        count = reader.manifest.layers
        self._slots: list = [None] * count
        self._events = [threading.Event() for _ in range(count)]
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(engine, layers), name="celslm-feed", daemon=True)
        self._thread.start()

    def check(self, engine: Engine) -> None:
        """The artifact's KV must have the engine's shape: a manifest can claim a model's fingerprint
        and still hold fewer layers or other heads (a forgery or a bug), which no layer index survives."""
        if self.geometry != engine.geometry:
            self.close()
            raise IntegrityError(f"{self.source}: its KV is {self.geometry.layers} layers x {self.geometry.kv_heads} heads "
                                 f"x {self.geometry.head_dim}, the model's {engine.geometry.layers} x "
                                 f"{engine.geometry.kv_heads} x {engine.geometry.head_dim}")

    def close(self) -> None:
        """Stop decoding layers and wait for the thread: one still running torch or llama.cpp when the
        process exits aborts it."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=60)

    def _run(self, engine: Engine, layers) -> None:
        workers = max(1, engine.decode_threads)
        free = threading.Semaphore(2 * workers)  # layers read ahead of the decoding, at most
        # While the model loads, its loader has a core: the layers take the others, and that one once it is in
        self._cores = threading.Semaphore(max(1, workers - 1))
        if workers > 1 and not engine.after_load(self._cores.release):
            self._cores.release()
        try:
            with _one_blas_thread(), ThreadPoolExecutor(workers, thread_name_prefix="celslm-decode") as pool:
                while not self._stop.is_set() and self._error is None:
                    free.acquire()
                    layer = next(layers, None)  # waits for bytes, verifies them
                    if layer is None:
                        break
                    pool.submit(self._decode, engine, layer, free)
                pool.shutdown(wait=True, cancel_futures=self._stop.is_set() or self._error is not None)
            if self._stop.is_set() and self._error is None:
                raise CelslmError(f"{self.source}: stopped before every layer was in")
        except BaseException as exc:
            self._fail(exc)

    def _decode(self, engine: Engine, layer, free: threading.Semaphore) -> None:
        try:
            if self._stop.is_set() or self._error is not None:
                return
            with self._cores:
                begun = time.perf_counter()
                self._slots[layer.index] = engine.place(*layer.decode())
            span = (begun, time.perf_counter())
            self.timeline.compute.append(span)
            self.timeline.decode.append(span)
            self._events[layer.index].set()
        except BaseException as exc:
            self._fail(exc)
        finally:
            free.release()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        for event in self._events:
            event.set()

    def wait(self, layer: int):
        if layer >= len(self._events):
            raise IntegrityError(f"{self.source}: the model asks for layer {layer}; the artifact has {len(self._events)}")
        self._events[layer].wait()
        if self._error is not None:
            raise self._error
        placed, self._slots[layer] = self._slots[layer], None  # handed over: the feed keeps no layer it gave
        return placed


def _union(spans: list) -> list:
    """Overlapping (start, end) intervals merged."""
    merged: list = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _one_blas_thread():
    """numpy's BLAS held to one thread while layers decode: the workers are the decode's threads, and
    OpenBLAS splits a matmul differently on two threads than on one (the last bit of a value differs),
    so the KV would depend on the machine's core count."""
    from threadpoolctl import threadpool_limits  # only where an artifact is decoded

    return threadpool_limits(1, user_api="blas")
