"""celslm serve: the warm edge service, driven by the official openai client and by curl, on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import urllib.error
import urllib.request

import pytest

from tests.conftest import CLI, CONTEXT, run_cli
from tests.netutil import RecordingProxy, Server, free_port, stop_process, wait_healthy
from tests.tiny import save_tiny_gguf

openai = pytest.importorskip("openai")
pytest.importorskip("llama_cpp")
PROMPT = "What does greet return?"


class Service:
    def __init__(self, gguf, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(CLI + ["serve", "-m", str(gguf), "--port", str(self.port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
        try:
            self.health = json.loads(wait_healthy(self.url, self.proc, "celslm serve"))
        except BaseException:
            stop_process(self.proc)
            raise

    def client(self, key: str = "none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def get(self, path: str) -> dict:
        return json.loads(urllib.request.urlopen(self.url + path, timeout=10).read())

    def stop(self) -> int:
        return stop_process(self.proc)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    gguf = save_tiny_gguf(root / "tiny.gguf", "llama", seed=4)
    (root / "ctx.txt").write_text(CONTEXT)
    run_cli("prefill", "-m", str(gguf), "-c", str(root / "ctx.txt"), "-o", str(root / "a.kv"), check=True)
    service = Service(gguf, "--memory-cache", "64MB", "--context-dir", str(root))
    yield {"root": root, "gguf": gguf, "service": service, "kv": str(root / "a.kv")}
    assert service.stop() == 0


def decoded(setup, *extra: str) -> str:
    out = run_cli("decode", "-m", str(setup["gguf"]), "--kv", setup["kv"], "-p", PROMPT, "-n", "10", "--json", *extra,
                  check=True)
    return json.loads(out.stdout)["text"]


def test_chat_completion_is_what_decode_gives_streamed_or_not(setup):
    service = setup["service"]
    client = service.client()
    request = dict(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=10, temperature=0,
                   extra_body={"context": setup["kv"]})
    first = client.chat.completions.create(**request)
    assert first.choices[0].message.content == decoded(setup)
    assert first.choices[0].message.role == "assistant" and first.choices[0].finish_reason in ("stop", "length")
    assert first.usage.completion_tokens >= 1
    pieces, chunks = [], 0
    for chunk in client.chat.completions.create(**request, stream=True):
        chunks += 1
        pieces.append(chunk.choices[0].delta.content or "")
    assert "".join(pieces) == first.choices[0].message.content and chunks > 2
    # the context was decoded once; the later requests restored it from memory
    health = service.get("/v1/health")
    assert health["cached_contexts"] == 1 and health["engine"] == "llama.cpp" and 0 < health["cached_bytes"] <= 64_000_000
    again = client.chat.completions.create(**request)
    assert again.model_extra["celslm"]["cache"] == "resident" and again.choices[0].message.content == first.choices[0].message.content


def test_text_completion_continues_the_context_as_plain_text(setup):
    result = setup["service"].client().completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0,
                                                          extra_body={"context": setup["kv"]})
    assert result.choices[0].text == decoded(setup, "--raw")


def test_models_and_curl(setup):
    service = setup["service"]
    assert [m.id for m in service.client().models.list().data] == ["tiny.gguf"]
    body = json.dumps({"context": setup["kv"], "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 10})
    out = subprocess.run(["curl", "-sS", "-H", "Content-Type: application/json", "-d", body,
                          service.url + "/v1/chat/completions"], capture_output=True, timeout=60, check=True)
    assert json.loads(out.stdout)["choices"][0]["message"]["content"] == decoded(setup)


def test_errors_come_back_as_openai_errors(setup):
    service = setup["service"]
    client = service.client()
    message = [{"role": "user", "content": PROMPT}]
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="tiny", messages=message, extra_body={"context": "sha256:" + "0" * 64})
    assert missing.value.body["code"] == "context_not_found"
    with pytest.raises(openai.BadRequestError) as many:
        client.chat.completions.create(model="tiny", messages=message, max_tokens=10**6, extra_body={"context": setup["kv"]})
    assert many.value.body["code"] == "too_many_tokens"
    with pytest.raises(openai.BadRequestError) as none:
        client.chat.completions.create(model="tiny", messages=message)
    assert none.value.body["code"] == "context_required"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=message, temperature=5, extra_body={"context": setup["kv"]})
    def curl(*args: str) -> tuple[str, dict]:
        out = subprocess.run(["curl", "-sS", "-w", "\\n%{http_code}", *args, service.url + "/v1/chat/completions"],
                             capture_output=True, timeout=30, check=True, text=True)
        body, status = out.stdout.rsplit("\n", 1)
        return status, json.loads(body)["error"]

    json_type = ("-H", "Content-Type: application/json")
    big = json.dumps({"context": setup["kv"], "messages": message, "temperature": 10**400})
    streamed = json.dumps({"context": setup["kv"], "messages": message, "stream": "false"})
    cases = [
        ((*json_type, "-d", "{not json"), "400", "invalid_json"),
        ((*json_type, "-d", "[" * 100000), "400", "invalid_json"),  # nesting past the recursion limit
        (("-d", "{}"), "415", "unsupported_media_type"),  # a form post, what a web page may send unasked, is refused
        ((*json_type, "-d", big), "400", "invalid_value"),  # an integer too big for a float
        ((*json_type, "-d", streamed), "400", "invalid_value"),
    ]
    for context, status, code in (("-", "400", "invalid_context"),
                                  ("http://203.0.113.9:8470/v1/tags/x", "400", "context_server_refused"),
                                  (str(setup["root"] / "ctx.txt"), "422", "invalid_context")):  # not an artifact: IntegrityError
        cases.append(((*json_type, "-d", json.dumps({"context": context, "messages": message})), status, code))
    for args, status, code in cases:
        assert curl(*args)[0] == status and curl(*args)[1]["code"] == code, args[-1][:60]
    # a file outside the context folder, there or not, readable or not: one answer, whatever the file
    outside = [curl(*json_type, "-d", json.dumps({"context": path, "messages": message}))
               for path in ("/etc/passwd", "/etc/shadow", "/root/.ssh/nothing-here", "../../../etc/passwd")]
    assert {status for status, _ in outside} == {"400"} and {error["code"] for _, error in outside} == {"invalid_context"}
    assert len({error["message"].replace(path, "P") for (_, error), path in
                zip(outside, ("/etc/passwd", "/etc/shadow", "/root/.ssh/nothing-here", "../../../etc/passwd"))}) == 1
    assert service.proc.poll() is None  # still serving


def test_decode_through_the_service_prints_what_decode_prints(setup):
    out = run_cli("decode", "--server", setup["service"].url, "--kv", setup["kv"], "-p", PROMPT,  # no -m: the service's
                  "-n", "10", "--json", check=True)
    local = json.loads(run_cli("decode", "-m", str(setup["gguf"]), "--kv", setup["kv"], "-p", PROMPT, "-n", "10", "--json",
                               check=True).stdout)
    answered = json.loads(out.stdout)
    assert list(answered) == list(local) and answered["text"] == local["text"]  # decode --json's schema, key for key
    assert (answered["engine"], answered["new_tokens"], answered["path"]) == ("llama.cpp", local["new_tokens"], "artifact")
    assert answered["artifact"] == local["artifact"] and answered["ttft_s"] > 0 and answered["t_comm_s"] is None


def test_decode_through_the_service_exits_as_decode_would(setup, tmp_path):
    """A context the service refuses as corrupt is exit 3 through --server too, as without it; a missing one 2."""
    ask = ("decode", "--server", setup["service"].url, "-p", PROMPT, "-n", "2")
    corrupt = run_cli(*ask, "--kv", str(setup["root"] / "ctx.txt"))  # a file, not an artifact: 422
    assert corrupt.returncode == run_cli("decode", "-m", str(setup["gguf"]), "--kv", str(setup["root"] / "ctx.txt"),
                                         "-p", PROMPT, "-n", "2").returncode == 3, corrupt.stderr
    assert run_cli(*ask, "--kv", "sha256:" + "0" * 64).returncode == 2  # no tier holds it: 404


def test_binding_beyond_loopback_needs_a_token_and_the_token_is_checked(setup):
    refused = run_cli("serve", "-m", str(setup["gguf"]), "--host", "0.0.0.0", "--port", str(free_port()))
    assert refused.returncode == 2 and b"--api-token" in refused.stderr
    guarded = Service(setup["gguf"], "--api-token", "s3cret", "--context-dir", str(setup["root"]))
    try:
        with pytest.raises(openai.PermissionDeniedError):  # a wrong token: 403, as serve-cache answers it
            guarded.client("wrong").models.list()
        assert guarded.client("s3cret").models.list().data
        with pytest.raises(urllib.error.HTTPError) as missing:  # none at all: 401 and how to give one
            urllib.request.urlopen(guarded.url + "/metrics", timeout=10)
        assert missing.value.code == 401 and missing.value.headers["WWW-Authenticate"] == "Bearer"
        assert json.loads(missing.value.read())["error"]["code"] == "invalid_api_key"
        metrics = urllib.request.urlopen(urllib.request.Request(guarded.url + "/metrics", headers={
            "Authorization": "Bearer s3cret"}), timeout=10).read().decode()
        assert "celslm_requests_served_total 0.0" in metrics and "celslm_context_cache_bytes 0.0" in metrics
        assert guarded.get("/v1/health")["status"] == "ok"  # health stays open
        ask = ("decode", "--server", guarded.url, "--kv", setup["kv"], "-p", PROMPT, "-n", "2")
        assert run_cli(*ask, "--api-token", "s3cret").returncode == 0
        assert run_cli(*ask, env={"CELSLM_API_TOKEN": "s3cret"}).returncode == 0
        without = run_cli(*ask)
        assert without.returncode == 2 and b"--api-token" in without.stderr
    finally:
        assert guarded.stop() == 0


def test_the_prompt_never_reaches_the_cloud(setup, tmp_path):
    """The service fetches the context from the cloud by tag; what it sends there holds no prompt."""
    cloud = Server(tmp_path / "store")
    service = None
    try:
        proxy = RecordingProxy(cloud.port)
        service = Service(setup["gguf"], "--cloud", proxy.url)
        run_cli("push", setup["kv"], cloud.url, "--tag", "ctx:latest", check=True)
        secret = "Is the launch code 7741 still valid?"
        result = service.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": secret}],
                                                          max_tokens=4, extra_body={"context": "ctx:latest"})
        assert result.model_extra["celslm"]["cache"] == "fetched" and proxy.connections > 0
        assert b"7741" not in proxy.sent and b"launch" not in proxy.sent
    finally:
        stopped = service.stop() if service else 0
        cloud.stop()
        assert stopped == 0


def test_a_client_that_leaves_mid_stream_does_not_hold_the_model(setup):
    """The stream is dropped after its first chunk; the next request is answered as usual (on the tiny
    model the rest may finish before the drop is noticed: this checks the service survives it)."""
    client = setup["service"].client()
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=400,
                                            stream=True, extra_body={"context": setup["kv"]})
    next(iter(stream))
    stream.close()
    result = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=10,
                                            extra_body={"context": setup["kv"]})
    assert result.choices[0].message.content == decoded(setup)
    assert setup["service"].proc.poll() is None


def test_a_request_whose_client_left_stops_at_the_next_token_and_frees_its_cells(setup):
    """In the service itself: the client leaves after the first token; generation stops at the next step,
    nothing is counted as served, its cells are gone, and the next request is answered as usual."""
    from celslm.decode import Sampling
    from celslm.models import load_model
    from celslm.scheduler import Gone, Job
    from celslm.service import ANYONE, Service, ServiceConfig

    service = Service(load_model(str(setup["gguf"]), engine="llama.cpp"), ServiceConfig(context_dir=setup["root"]))
    try:
        events, ended = [], threading.Event()

        def leave(kind: str, value) -> None:
            events.append((kind, value))
            if kind == "piece":
                job.cancel()
            if kind in ("done", "error"):
                ended.set()

        job = Job(ANYONE, setup["kv"], PROMPT, False, Sampling(max_new_tokens=200, temperature=1.0, seed=1), (), leave)
        service.scheduler.submit(job)
        assert ended.wait(60)
        assert isinstance(events[-1][1], Gone) and job.generated <= 2
        assert service.scheduler.stats()["active"] == 0 and service.scheduler.active_seqs() == {}
        context_seq = next(iter(service.scheduler.resident_seqs().values()))
        assert {owners for _, owners in service.scheduler.cell_owners()} == {(context_seq,)}  # the context's cells only
        done = threading.Event()
        results = []
        service.scheduler.submit(Job(ANYONE, setup["kv"], PROMPT, False, Sampling(max_new_tokens=10), (),
                                     lambda kind, value: (results.append((kind, value)), kind in ("done", "error") and done.set())))
        assert done.wait(60) and results[-1][0] == "done" and results[-1][1]["text"] == decoded(setup)
        assert int(service.scheduler.m_served._value.get()) == 1
    finally:
        service.close()


def test_a_service_with_a_trust_policy_serves_signed_contexts_and_refuses_the_rest(setup, tmp_path):
    root = setup["root"]
    run_cli("keys", "generate", "--out", str(tmp_path / "producer"), check=True)
    run_cli("prefill", "-m", str(setup["gguf"]), "-c", str(root / "ctx.txt"), "-o", str(root / "signed.kv"),
            "--sign", str(tmp_path / "producer.key"), check=True)
    service = Service(setup["gguf"], "--trust", str(tmp_path / "producer.pub"), "--context-dir", str(root))
    try:
        ask = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}
        answer = service.client().chat.completions.create(model="celslm", extra_body={"context": "signed.kv"},
                                                          **ask)
        assert answer.choices[0].message.content is not None
        with pytest.raises(openai.PermissionDeniedError, match="not signed by a trusted key"):
            service.client().chat.completions.create(model="celslm", extra_body={"context": setup["kv"]}, **ask)
    finally:
        assert service.stop() == 0


def test_a_service_with_an_identity_answers_over_an_encrypted_context_and_one_without_refuses_it(setup, tmp_path):
    root = setup["root"]
    run_cli("keys", "generate", "--out", str(tmp_path / "edge"), "--for", "encryption", check=True)
    run_cli("prefill", "-m", str(setup["gguf"]), "-c", str(root / "ctx.txt"), "-o", str(root / "sealed.kv"),
            "--encrypt-to", str(tmp_path / "edge.pub"), check=True)
    ask = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 10, "temperature": 0}
    context = {"context": str(root / "sealed.kv")}
    with pytest.raises(openai.PermissionDeniedError, match="encrypted"):
        setup["service"].client().chat.completions.create(model="celslm", extra_body=context, **ask)
    service = Service(setup["gguf"], "--identity", str(tmp_path / "edge.key"), "--context-dir", str(root))
    try:
        answer = service.client().chat.completions.create(model="celslm", extra_body=context, **ask)
    finally:
        assert service.stop() == 0
    assert answer.choices[0].message.content == decoded(setup)
