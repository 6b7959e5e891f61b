"""Collaboration modes and tasks (issue 7 groundwork): tiny model pairs, real outcomes."""

from __future__ import annotations

import pytest

from celslm.bench import modes, tasks
from celslm.corpus import stdlib_modules
from celslm.decode import Sampling
from celslm.models import load_model
from celslm.stream import Link
from tests.conftest import CONTEXT, save_tiny_model

PROMPT = "What does greet return?"
SAMPLING = Sampling(max_new_tokens=6)
LINK = Link.parse("100mbit:20ms")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("modes")
    large = save_tiny_model(root / "large", "qwen2", seed=3, hidden_size=96, num_hidden_layers=5)
    small = save_tiny_model(root / "small", "qwen2", seed=4)
    return load_model(str(large)), load_model(str(small))


def test_ce_lslm_with_a_lossless_codec_answers_exactly_as_edge_only(models):
    _, slm = models
    edge = modes.edge_only(slm, CONTEXT, PROMPT, SAMPLING, raw=False)
    shared = modes.ce_lslm(slm, CONTEXT, PROMPT, SAMPLING, raw=False, link=LINK, codec="lossless")
    assert shared.text == edge.text
    assert shared.private and shared.prompt_bytes_sent == 0 and shared.bytes_down > 0
    assert shared.t_comm_s >= LINK.rtt_s


def test_cloud_only_sends_the_prompt(models):
    llm, _ = models
    outcome = modes.cloud_only(llm, CONTEXT, PROMPT, SAMPLING, raw=False, link=LINK)
    assert not outcome.private and outcome.prompt_bytes_sent == len(PROMPT.encode())


def test_ce_collm_never_defers_at_threshold_zero_and_always_defers_above_one(models):
    llm, slm = models
    edge = modes.edge_only(slm, CONTEXT, PROMPT, SAMPLING, raw=False)
    cloud = modes.cloud_only(llm, CONTEXT, PROMPT, SAMPLING, raw=False, link=LINK)
    local = modes.ce_collm(llm, slm, CONTEXT, PROMPT, SAMPLING, raw=False, link=LINK, threshold=0.0)
    remote = modes.ce_collm(llm, slm, CONTEXT, PROMPT, SAMPLING, raw=False, link=LINK, threshold=1.01)
    assert local.text == edge.text and local.edge_token_share == 1 and local.private and local.bytes_up == 0
    assert remote.text == cloud.text and remote.edge_token_share == 0 and not remote.private
    assert remote.prompt_bytes_sent >= len(PROMPT.encode())


def test_pice_ships_only_the_sketch(models):
    llm, slm = models
    outcome = modes.pice(llm, slm, CONTEXT, PROMPT, SAMPLING, raw=False, link=LINK, sketch_tokens=8)
    assert outcome.private and 0 < outcome.bytes_down and outcome.notes["sketch_tokens"] <= 8


def test_tasks_have_ground_truth_from_the_files_and_score_it():
    built = [t for p in stdlib_modules()[:40] for t in (tasks.completion_task(p, 3000), tasks.qa_task(p, 6000)) if t]
    complete = [t for t in built if t.kind == "complete"]
    qa = [t for t in built if t.kind == "qa"]
    assert complete and qa
    for task in complete:
        assert task.prompt.lstrip().startswith("def ") and task.answer.splitlines()[0] in open(
            next(p for p in stdlib_modules() if p.name == task.file)).read()
        assert tasks.score(task, task.answer) == {"exact": 1.0, "edit_similarity": 1.0}
        assert tasks.score(task, "pass")["exact"] == 0.0
    for task in qa:
        assert tasks.score(task, f"It returns `{task.answer}`.") == {"correct": 1.0}
        assert tasks.score(task, "None of it") == {"correct": 0.0}


def test_bench_report_has_every_mode_and_re_renders_from_its_saved_suite(models, tmp_path):
    import json

    from tests.conftest import run_cli

    llm, slm = models
    out = tmp_path / "report"
    result = run_cli("bench", "report", "--llm", str(llm.folder), "--slm", str(slm.folder), "--out", str(out),
                     "--tasks", "1", "--context-chars", "600", "--new-tokens", "4", "--clients", "1", "--clients", "3",
                     "--json", check=True)
    summary = json.loads(result.stdout)["summary"]
    assert [row["mode"] for row in summary] == list(modes.MODES)
    assert {row["mode"]: row["private"] for row in summary}["cloud-only"] is False
    report = (out / "report.md").read_text()
    assert all(f"| {mode} |" in report for mode in modes.MODES) and "emulated" in report
    assert (out / "latency.png").stat().st_size > 0 and (out / "quality.png").stat().st_size > 0
    capacity = json.loads((out / "suite.json").read_text())["concurrency"]
    assert {(r["mode"], r["clients"]) for r in capacity} == {(m, c) for m in ("ce-lslm", "cloud-only") for c in (1, 3)}
    # the full preset: 2 requests per client; /proc counts CPU in 10 ms ticks, so tiny levels may read 0
    assert all(r["errors"] == 0 and r["requests"] == 2 * r["clients"] and r["cloud_cpu_s_per_request"] >= 0
               for r in capacity)
    assert "Concurrent capacity" in report
    assert sorted(p.name for p in out.iterdir()) == ["capacity.png", "latency.png", "quality.png", "report.md", "suite.json"]
    again = tmp_path / "again"
    run_cli("bench", "report", "--from", str(out / "suite.json"), "--out", str(again), check=True)
    assert (again / "report.md").read_text().split("## Quality")[1] == report.split("## Quality")[1]
