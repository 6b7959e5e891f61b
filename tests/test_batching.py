"""Many tenants on one edge service: requests decoded together over one resident context, kept apart,
admitted fairly and refused at once past the limits (the scheduler and KV pool, on a tiny GGUF)."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager

import pytest

from tests.conftest import CONTEXT, run_cli
from tests.tiny import save_tiny_gguf

pytest.importorskip("llama_cpp")

from celslm.decode import Sampling  # noqa: E402
from celslm.errors import Overloaded, UsageError  # noqa: E402
from celslm.scheduler import Expired, Job, Limits, StopText, Tenant  # noqa: E402
from celslm.service import ANYONE, Service, ServiceConfig, make_app, read_tenants  # noqa: E402
from celslm.tenants import token_sha256  # noqa: E402

PROMPTS = ["What does greet return?", "Count to three, then explain bump in detail, line by line, please.",
           "Is Counter a class?", "Name every method."]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from celslm.models import load_model

    root = tmp_path_factory.mktemp("batching")
    gguf = save_tiny_gguf(root / "tiny.gguf", "llama", seed=4)
    (root / "ctx.txt").write_text(CONTEXT * 3)
    run_cli("prefill", "-m", str(gguf), "-c", str(root / "ctx.txt"), "-o", str(root / "a.kv"), check=True)
    (root / "other.txt").write_text(CONTEXT.upper())
    run_cli("prefill", "-m", str(gguf), "-c", str(root / "other.txt"), "-o", str(root / "b.kv"), check=True)
    return {"root": root, "loaded": load_model(str(gguf), engine="llama.cpp")}


@contextmanager
def service_of(model, **limits):
    service = Service(model["loaded"], ServiceConfig(context_dir=model["root"], limits=Limits(**limits)))
    try:
        yield service
    finally:
        service.close()


class Collected:
    """A job's sink: its pieces, its end, and a hook run on every piece (in the scheduler's thread)."""

    def __init__(self, on_piece=None):
        self.pieces, self.end, self.done = [], None, threading.Event()
        self.on_piece = on_piece
        self.first_at = None

    def __call__(self, kind: str, value) -> None:
        if kind == "piece":
            self.first_at = self.first_at or time.perf_counter()
            self.pieces.append(value)
            if self.on_piece:
                self.on_piece()
        else:
            self.end = (kind, value)
            self.done.set()

    def result(self) -> dict:
        assert self.done.wait(60), "the job did not end"
        kind, value = self.end
        if kind == "error":
            raise value
        return value


def job(sink, prompt=PROMPTS[0], context="a.kv", tenant=ANYONE, tokens=12, **sampling) -> Job:
    return Job(tenant, context, prompt, False, Sampling(max_new_tokens=tokens, **sampling), (), sink)


def test_a_greedy_answer_in_a_batch_is_its_answer_alone(model):
    """Four requests of different prompt lengths, read in small chunks while the others generate: each
    text equals what the same request gives alone, and they did run together."""
    with service_of(model, parallel=1) as alone:
        expected = []
        for prompt in PROMPTS:
            sink = Collected()
            alone.scheduler.submit(job(sink, prompt))
            expected.append(sink.result()["text"])
    with service_of(model, parallel=4, prompt_chunk=16) as service:
        together = []
        sinks = [Collected(on_piece=lambda: together.append(service.scheduler.stats()["active"])) for _ in PROMPTS]
        for sink, prompt in zip(sinks, PROMPTS):
            service.scheduler.submit(job(sink, prompt))
        assert [sink.result()["text"] for sink in sinks] == expected
        assert max(together) >= 3  # decoded in one batch, not one after the other
        assert all(sink.result()["celslm"]["cache"] in ("fetched", "memory", "resident") for sink in sinks)


def test_requests_share_the_context_cells_and_keep_their_own_apart(model):
    """Read from llama.cpp's own cell metadata while requests over two contexts interleave: every cell is
    a context's (held by its context sequence, and shared by requests over it) or one live request's
    own; each request holds exactly its context then its own positions; nothing is left of ended ones."""
    checks = []
    with service_of(model, parallel=3, prompt_chunk=16) as service:
        scheduler = service.scheduler

        def inspect() -> None:
            owners, active, resident = scheduler.cell_owners(), scheduler.active_seqs(), scheduler.resident_seqs()
            context_seqs = set(resident.values())
            for position, seqs in owners:
                ctx = context_seqs & set(seqs)
                assert len(ctx) == 1 or (not ctx and len(seqs) == 1 and seqs[0] in active), (position, seqs)
                assert set(seqs) <= context_seqs | set(active)
            for seq, length in active.items():
                assert sorted(p for p, seqs in owners if seq in seqs) == list(range(length))
            shared = sum(1 for _, seqs in owners if set(seqs) & context_seqs)
            assert shared == sum(service.scheduler.resident(a).tokens for a in resident)  # each context once
            checks.append(len(active))

        sinks = [Collected(on_piece=inspect) for _ in range(5)]
        for i, sink in enumerate(sinks):
            scheduler.submit(job(sink, PROMPTS[i % 4], context="a.kv" if i % 2 else "b.kv", tokens=8))
        for sink in sinks:
            sink.result()
        assert max(checks) >= 2
        context_seqs = set(scheduler.resident_seqs().values())
        assert {seqs for _, seqs in scheduler.cell_owners()} == {(seq,) for seq in context_seqs}
        assert len(context_seqs) == 2


@contextmanager
def held(service):
    """The scheduler's decode steps wait while this is held (admission goes on): what queues behind them
    is deterministic."""
    pool, gate = service.scheduler.pool, threading.Event()
    decode = pool.decode

    def gated(rows):
        assert gate.wait(60), "the test never let the step go"
        return decode(rows)

    pool.decode = gated
    try:
        yield
    finally:
        gate.set()


def wait_for(predicate, what: str) -> None:
    for _ in range(500):
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_past_the_queue_a_request_is_refused_at_once_and_the_rest_are_answered(model):
    with service_of(model, parallel=1, max_queue=1) as service:
        first, second = Collected(), Collected()
        with held(service):
            service.scheduler.submit(job(first))
            wait_for(lambda: service.scheduler.stats()["queued"] == 0, "the first request to start")
            service.scheduler.submit(job(second))
            with pytest.raises(Overloaded) as refused:
                service.scheduler.submit(job(Collected()))
            assert refused.value.retry_after_s >= 1
        assert first.result()["completion_tokens"] >= 1 and second.result()["completion_tokens"] >= 1


def test_tenants_take_turns_and_a_tenant_past_its_cap_is_refused(model):
    """Tenant a asks four times, then b once: b's request is the second to start, not the fifth."""
    a, b = Tenant("a", concurrency=4), Tenant("b")
    with service_of(model, parallel=1) as service:
        sinks = {name: Collected() for name in ("a1", "a2", "a3", "a4", "b1")}
        with held(service):
            for name, sink in sinks.items():
                service.scheduler.submit(job(sink, tenant=a if name[0] == "a" else b, tokens=2))
            wait_for(lambda: service.scheduler.stats()["queued"] == 4, "the first request to start")
            with pytest.raises(Overloaded, match="'a'"):
                service.scheduler.submit(job(Collected(), tenant=a))
        for sink in sinks.values():
            sink.result()
        order = sorted(sinks, key=lambda name: sinks[name].first_at)
        assert order[:2] == ["a1", "b1"], order


def test_a_request_past_its_deadline_ends_and_frees_its_place(model):
    with service_of(model, parallel=1, deadline_s=0.3) as service:
        running, waiting = Collected(), Collected()
        with held(service):
            service.scheduler.submit(job(running, tokens=4000 // 10))
            service.scheduler.submit(job(waiting))
            time.sleep(0.5)
        for sink in (running, waiting):
            with pytest.raises(Expired):
                sink.result()
        assert service.scheduler.stats()["active"] == 0


def test_a_request_whose_sampling_fails_ends_alone_and_the_service_goes_on(model):
    """A temperature so small that the logits overflow (HTTP refuses it; here it reaches the scheduler):
    its request ends with an error, the one beside it is answered, and the next one too."""
    with service_of(model, parallel=2) as service:
        broken, beside, after = Collected(), Collected(), Collected()
        service.scheduler.submit(job(broken, temperature=1e-320, seed=1))
        service.scheduler.submit(job(beside, PROMPTS[1]))
        with pytest.raises(Exception, match="sampling failed"):
            broken.result()
        assert beside.result()["completion_tokens"] >= 1
        service.scheduler.submit(job(after, PROMPTS[2]))
        assert after.result()["completion_tokens"] >= 1
        assert service.scheduler.stats()["active"] == 0


def test_a_request_too_big_for_the_cells_is_refused_with_the_reason(model):
    service = Service(model["loaded"], ServiceConfig(context_dir=model["root"], limits=Limits(parallel=1), kv_cells=256))
    try:
        sink = Collected()
        service.scheduler.submit(job(sink, tokens=300))
        with pytest.raises(UsageError, match="KV cells"):
            sink.result()
    finally:
        service.close()


class ByteTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_a_stop_string_ends_the_text_before_it_even_across_tokens():
    stop = StopText(ByteTokenizer(), skip=set(), stop=("END", "\n\n"))
    pieces = [stop.push(b) for b in b"one EN"]
    assert "".join(pieces) == "one " and not stop.stopped  # "EN" held back: it may become "END"
    assert stop.push(ord("D")) == "" and stop.stopped and stop.text == "one "
    plain = StopText(ByteTokenizer(), skip=set(), stop=("END",))
    assert "".join(plain.push(b) for b in b"the ENd") + plain.flush() == "the ENd" and not plain.stopped


def test_a_tenants_file_names_tenants_and_bad_files_are_refused_in_one_line(tmp_path):
    good = tmp_path / "keys.toml"
    good.write_text(f'[tenants.acme]\ntoken_sha256 = "{token_sha256("acme-key-0123456789")}"\nconcurrency = 2\n'
                    f'[tenants.beta]\ntoken_sha256 = ["{token_sha256("b1")}", "{token_sha256("b2")}"]\n')
    tenants = read_tenants(good)
    assert sorted((t.name, t.concurrency) for t in tenants.values()) == [("acme", 2), ("beta", None), ("beta", None)]
    assert tenants[token_sha256("b2")].name == "beta"
    same = f'token_sha256 = "{token_sha256("k")}"'
    for text, words in (('[tenants.a]\ntoken_sha256 = "abc"\n', "64 hex"), ("[tenants]\n", "expected"),
                        ('[tenants.a]\nkeys = ["aaaaaaaaaaaaaaaa"]\n', "nothing else"),
                        (f'[tenants.a]\n{same}\nconcurrency = 0\n', "concurrency"),
                        (f'[tenants.a]\n{same}\n[tenants.b]\n{same}\n', "also"),
                        ("not toml [", "cannot read")):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(UsageError, match=words):
            read_tenants(bad)


def test_over_http_a_refused_request_is_429_with_retry_after_and_keys_pick_the_tenant(model, tmp_path):
    from aiohttp.test_utils import TestClient, TestServer

    keys = tmp_path / "keys.toml"
    keys.write_text(f'[tenants.acme]\ntoken_sha256 = "{token_sha256("acme-key-0123456789")}"\nconcurrency = 1\n')
    service = Service(model["loaded"], ServiceConfig(context_dir=model["root"], tenants=read_tenants(keys),
                                                     limits=Limits(parallel=1, max_queue=4)))
    body = {"context": "a.kv", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 4}

    async def scenario() -> list:
        async with TestClient(TestServer(make_app(service))) as client:
            auth = {"Authorization": "Bearer acme-key-0123456789"}
            wrong = await client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
            with held(service):
                first = asyncio.ensure_future(client.post("/v1/chat/completions", json=body, headers=auth))
                await asyncio.sleep(0.3)
                started = time.perf_counter()
                refused = await client.post("/v1/chat/completions", json=body, headers=auth)
                waited = time.perf_counter() - started
                error = await refused.json()
            answered = await first
            closed = [(await client.get(path)).status for path in ("/metrics", "/v1/models")]
            opened = [(await client.get(path, headers=auth)).status for path in ("/metrics", "/v1/models")]
            bad = [(await client.post("/v1/chat/completions", json={**body, **extra}, headers=auth)).status
                   for extra in ({"temperature": 1e-320}, {"stop": ["x" * 257]})]
            return [wrong.status, refused.status, refused.headers.get("Retry-After"), error["error"], waited,
                    (await answered.json())["choices"][0]["message"]["content"] is not None, closed, opened, bad]

    try:
        wrong, status, retry_after, error, waited, answered, closed, opened, bad = asyncio.run(scenario())
    finally:
        service.close()
    assert wrong == 403 and status == 429 and int(retry_after) >= 1 and answered
    assert closed == [401, 401] and opened == [200, 200]  # a tenant's key, or nothing but health
    assert bad == [400, 400]  # a temperature that overflows the logits, a stop string past its bound
    assert error["code"] == "overloaded" and error["type"] == "rate_limit_error" and "acme" in error["message"]
    assert waited < 5  # answered while the engine was held: it did not wait for a step
