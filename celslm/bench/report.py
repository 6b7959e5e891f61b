"""The evaluation suite: every collaboration mode on the same tasks and emulated link, one report.

`run_suite` builds tasks from held-out standard-library files (never alignment calibration files),
runs each mode on each task (`celslm.bench.modes`), scores the outputs (`celslm.bench.tasks`) and
returns everything as JSON-ready data: tasks, outputs, scores, times, bytes. `render` writes
`report.md` and its figures from that data alone, so a saved run can be re-rendered and re-scored.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from celslm.models import LoadedModel, check_tokenizers
from celslm.projection import Alignment
from celslm import plots
from celslm.bench import modes, tasks
from celslm.bench.concurrency import CLOUD_MODES
from celslm.corpus import calibration_files, stdlib_modules
from celslm.decode import Sampling
from celslm.errors import UsageError
from celslm.stream import Link

Progress = Callable[[str, int, int | None], None]
QUICK = {"tasks_per_kind": 2, "context_chars": 2500, "new_tokens": 24, "levels": (1, 32), "requests": 1}
FULL = {"tasks_per_kind": 8, "context_chars": 5000, "new_tokens": 48, "levels": (1, 2, 4, 8, 16, 32), "requests": 2}


def build_tasks(per_kind: int, context_chars: int) -> list[tasks.Task]:
    """Completion and QA tasks from evenly spaced modules that no alignment calibrates on."""
    reserved = {p.name for p in calibration_files(64)}
    paths = [p for p in stdlib_modules() if p.name not in reserved]
    built = {"complete": [], "qa": []}
    for path in paths[1::3]:
        for kind, make in (("complete", lambda p: tasks.completion_task(p, context_chars // 2)),
                           ("qa", lambda p: tasks.qa_task(p, context_chars))):
            if len(built[kind]) < per_kind and (task := make(path)) is not None:
                built[kind].append(_trimmed(task, context_chars))
        if all(len(v) == per_kind for v in built.values()):
            break
    return built["complete"] + built["qa"]


def _trimmed(task: tasks.Task, chars: int) -> tasks.Task:
    """Keep the last `chars` characters of a completion context, from a line start (the function's surroundings)."""
    if task.kind != "complete" or len(task.context) <= chars:
        return task
    cut = task.context.find("\n", len(task.context) - chars) + 1
    return tasks.Task(task.kind, task.file, task.context[cut:], task.prompt, task.answer)


DEFAULT_LINKS = ("10mbit:40ms", "100mbit:20ms", "1gbit:5ms")


def run_suite(llm: LoadedModel, slm: LoadedModel, *, tasks_per_kind: int, context_chars: int, new_tokens: int,
              links: tuple[str, ...] = DEFAULT_LINKS, threshold: float = 0.5, codec: str = "balanced",
              alignment: Alignment | None = None, only: tuple[str, ...] = (), levels: tuple[int, ...] = (),
              requests: int = 1, workdir: Path | None = None, progress: Progress | None = None,
              slm_llama: LoadedModel | None = None) -> dict:
    """Every mode (or those in `only`) on the same tasks; with `levels`, the concurrency part for them.
    `slm_llama`, the SLM on the llama.cpp engine, adds edge-only on llama.cpp as a baseline row."""
    check_modes(only, alignment is not None)
    shaped = list({link.label: link for link in map(Link.parse, links)}.values())  # one per distinct link
    check_tokenizers(llm.tokenizer, slm.tokenizer, llm.name, slm.name)  # CE-CoLLM exchanges token ids; the cross modes share them
    sampling = Sampling(max_new_tokens=new_tokens)
    suite = build_tasks(tasks_per_kind, context_chars)
    prepared: dict = {}  # per task: the artifacts two modes share, made once (their cloud prep time counted in each)

    def artifact(kind: str, t: tasks.Task, raw: bool) -> tuple:
        if kind not in prepared:
            prepared[kind] = (modes.native_artifact(slm, t.context, raw, codec) if kind == "native" else
                              modes.cross_artifact(llm, slm, alignment, t.context, raw, codec))
        return prepared[kind]

    runners = {
        "edge-only": lambda t, raw, a: modes.edge_only(slm, t.context, t.prompt, sampling, raw, a),
        "cloud-only": lambda t, raw, a: modes.cloud_only(llm, t.context, t.prompt, sampling, raw, a),
        "ce-collm": lambda t, raw, a: modes.ce_collm(llm, slm, t.context, t.prompt, sampling, raw, threshold, a),
        "pice": lambda t, raw, a: modes.pice(llm, slm, t.context, t.prompt, sampling, raw, answer=a),
        "ce-lslm": lambda t, raw, a: modes.ce_lslm(slm, t.context, t.prompt, sampling, raw, codec, a,
                                                   artifact("native", t, raw)),
        "ce-lslm-pipelined": lambda t, raw, a: modes.ce_lslm_pipelined(slm, t.context, t.prompt, sampling, raw,
                                                                      shaped, codec, a, artifact("native", t, raw)),
    }
    if slm_llama is not None:
        runners[modes.LLAMA_EDGE] = lambda t, raw, a: modes.edge_only(slm_llama, t.context, t.prompt, sampling, raw, a,
                                                                     name=modes.LLAMA_EDGE)
    if alignment is not None:
        runners["ce-lslm-cross"] = lambda t, raw, a: modes.ce_lslm_cross(
            llm, slm, alignment, t.context, t.prompt, sampling, raw, codec, a, artifact("cross", t, raw))
        runners["ce-lslm-hybrid"] = lambda t, raw, a: modes.ce_lslm_hybrid(
            llm, slm, alignment, t.context, t.prompt, sampling, raw, codec, answer=a, prepared=artifact("cross", t, raw))
    runners = {name: run for name, run in runners.items() if not only or name in only}
    results = []
    started = time.perf_counter()
    total = len(suite) * len(runners)
    for index, task in enumerate(suite):
        raw = task.kind == "complete"  # code completion continues the file; questions use the chat template
        answer = task.answer if raw else None  # the real continuation, scored teacher-forced
        prepared.clear()
        for name, runner in runners.items():
            if progress:
                progress("suite (task x mode)", len(results), total)
            outcome = runner(task, raw, answer)
            results.append({"task": index, "kind": task.kind, **outcome.to_json(shaped),
                            "scores": tasks.score(task, outcome.text)})
    if progress:
        progress("suite (task x mode)", total, total)
    capacity = []
    which = tuple({"ce-lslm" if name.startswith("ce-lslm") else name for name in runners} & {*CLOUD_MODES})
    if levels and which:
        from celslm.bench import concurrency

        qa_index = next((i for i, t in enumerate(suite) if t.kind == "qa"), 0)
        qa = suite[qa_index]
        notes = {r["mode"]: r["notes"] for r in results if r["task"] == qa_index}
        capacity = concurrency.run(str(llm.folder), slm, qa.context, qa.prompt, levels=levels, requests=requests,
                                   new_tokens=min(new_tokens, 8), codec=codec, workdir=workdir or Path("."),
                                   deferrals=notes.get("ce-collm", {}).get("deferrals"),
                                   sketch=notes.get("pice", {}).get("sketch"), which=which, progress=progress)
    return {
        "llm": llm.name, "slm": slm.name, "links": [link.label for link in shaped], "threshold": threshold,
        "codec": codec, "alignment": alignment.digest if alignment else None, "new_tokens": new_tokens,
        "tasks": [t.to_json() for t in suite], "results": results, "concurrency": capacity,
        "seconds": round(time.perf_counter() - started, 1),
    }


def check_modes(only: tuple[str, ...], aligned: bool) -> None:
    """Refuse unknown mode names, and the cross-model modes without an alignment."""
    if unknown := [m for m in only if m not in modes.MODES]:
        raise UsageError(f"unknown mode {', '.join(unknown)}; choose from {', '.join(modes.MODES)}")
    if not aligned and (cross := [m for m in only if m in modes.CROSS_MODES]):
        raise UsageError(f"mode {', '.join(cross)} needs an alignment (from `celslm align`)")


def rescore(result: dict) -> dict:
    """Score the saved outputs again (after a change to the scoring), without running a model."""
    saved = [tasks.Task(**t) for t in result["tasks"]]
    for row in result["results"]:
        row["scores"] = tasks.score(saved[row["task"]], row["text"])
    return result


def _links(result: dict) -> list[str]:
    return result.get("links") or [result["link"]]  # suites saved before several links were priced had one


def _timed(row: dict, label: str) -> dict:
    return row["links"][label] if "links" in row else {k: row[k] for k in ("ttft_s", "total_s", "t_comm_s")}


def summary(result: dict) -> list[dict]:
    """Per mode: mean scores by task kind, NLL of the real continuation, times per link, bytes, privacy."""
    rows = []
    for mode in modes.MODES:
        mine = [r for r in result["results"] if r["mode"] == mode]
        if not mine:
            continue

        def mean(values):
            values = [v for v in values if v is not None]
            return sum(values) / len(values) if values else None

        def scored(key, kind):
            return mean([r["scores"].get(key) for r in mine if r["kind"] == kind])

        rows.append({
            "mode": mode, "requests": len(mine),
            "exact": scored("exact", "complete"), "edit_similarity": scored("edit_similarity", "complete"),
            "qa_accuracy": scored("correct", "qa"), "nll": mean([r.get("nll") for r in mine]),
            **{k: mean([r[k] for r in mine]) for k in ("t_com_c_s", "t_com_e_s", "cloud_prep_s", "bytes_up",
                                                        "bytes_down", "prompt_bytes_sent", "edge_token_share")},
            "links": {label: {k: mean([_timed(r, label)[k] for r in mine]) for k in ("ttft_s", "total_s", "t_comm_s")}
                      for label in _links(result)},
            "private": all(r["private"] for r in mine),
        })
    return rows


def headline(rows: list[dict], label: str) -> dict | None:
    """CE-LSLM's fastest mode on `label` against edge-only: the time-to-first-token ratio and quality side by side."""
    edge = next((r for r in rows if r["mode"] == "edge-only"), None)
    ours = [r for r in rows if r["mode"].startswith("ce-lslm") and label in r["links"]]
    if not edge or not ours or label not in edge["links"]:
        return None
    best = min(ours, key=lambda r: r["links"][label]["ttft_s"])
    return {"mode": best["mode"], "link": label, "ttft_s": best["links"][label]["ttft_s"],
            "edge_ttft_s": edge["links"][label]["ttft_s"],
            "speedup": edge["links"][label]["ttft_s"] / best["links"][label]["ttft_s"],
            "quality": {k: (best[k], edge[k]) for k in ("exact", "edit_similarity", "qa_accuracy", "nll")},
            "prompt_bytes_sent": best["prompt_bytes_sent"]}


def render(result: dict, out: Path) -> Path:
    """Write report.md and its figures into `out` from a suite result."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps(result, indent=1))
    rows = summary(result)
    labels = _links(result)
    plots.report_latency(rows, labels, out / "latency.png")
    plots.report_quality(rows, out / "quality.png")

    def fmt(value, spec=".3f"):
        return "n/a" if value is None else format(value, spec)

    cross = ("cross-model modes use alignment " + result["alignment"][:12]) if result.get("alignment") else (
        "no alignment was given, so the cross-model modes did not run (`celslm align`, then `--align`)")
    lines = [
        "# celslm evaluation report", "",
        f"Large model (cloud) **{result['llm']}**, small model (edge) **{result['slm']}**; "
        f"{len(result['tasks'])} tasks from held-out Python standard-library files; links: "
        f"{'; '.join(labels)} (every time that includes the link is emulated: RTT/2 + bytes / rate per one-way "
        f"message, except ce-lslm-pipelined, measured live through a link paced in real time); greedy decoding, "
        f"{result['new_tokens']} new tokens; CE-CoLLM deferral threshold {result['threshold']}; CE-LSLM codec "
        f"`{result['codec']}`; {cross}. Suite time {result['seconds']} s.", "",
        "## Quality and privacy", "",
        "Completion NLL is the mean negative log-likelihood (nats/token) of the real continuation, teacher-forced.", "",
        "| mode | completion exact | completion edit similarity | completion NLL | QA accuracy | prompt bytes sent | private | edge token share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {fmt(r['exact'])} | {fmt(r['edit_similarity'])} | {fmt(r['nll'])} | "
                     f"{fmt(r['qa_accuracy'])} | {fmt(r['prompt_bytes_sent'], '.0f')} | "
                     f"{'yes' if r['private'] else 'no'} | {fmt(r['edge_token_share'], '.2f')} |")
    lines += ["", "## Latency split per request (emulated links)", "",
              "| mode | link (emulated) | TTFT s (emulated) | total s (emulated) | T_com_C s | T_comm s (emulated) | T_com_E s | bytes up | bytes down | cloud prep per context s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for label in labels:
        for r in rows:
            t = r["links"][label]
            lines.append(f"| {r['mode']} | {label.removeprefix('emulated ')} | {fmt(t['ttft_s'])} | {fmt(t['total_s'])} | "
                         f"{fmt(r['t_com_c_s'])} | {fmt(t['t_comm_s'])} | {fmt(r['t_com_e_s'])} | "
                         f"{fmt(r['bytes_up'], ',.0f')} | {fmt(r['bytes_down'], ',.0f')} | {fmt(r['cloud_prep_s'])} |")
    lines += ["", "T_com_C is the cloud's compute inside a request, cloud prep its work per context, ahead of requests."
              + (" ce-lslm-pipelined overlaps the link and the edge's compute, so its T_comm and T_com_E add up to more "
                 "than its total." if any(r["mode"] == "ce-lslm-pipelined" for r in rows) else ""), ""]
    for label in labels:
        if (h := headline(rows, label)) is not None:
            q = h["quality"]
            lines.append(f"- {label}: CE-LSLM's fastest mode, {h['mode']}, reaches the first token in {h['ttft_s']:.3f} s "
                         f"vs edge-only's {h['edge_ttft_s']:.3f} s: **{h['speedup']:.1f}x** edge-only's speed, "
                         f"sending {h['prompt_bytes_sent']:.0f} prompt bytes; completion edit similarity "
                         f"{fmt(q['edit_similarity'][0])} vs {fmt(q['edit_similarity'][1])}, NLL {fmt(q['nll'][0])} vs "
                         f"{fmt(q['nll'][1])}, QA accuracy {fmt(q['qa_accuracy'][0])} vs {fmt(q['qa_accuracy'][1])}.")
    if result.get("concurrency"):
        plots.report_capacity(result["concurrency"], out / "capacity.png")
        lines += ["", "## Concurrent capacity: edge clients against one cloud process (loopback)", "",
                  "Only the cloud's side of a request is timed: cloud-only, the prompt in and the text out; CE-CoLLM, "
                  "one request's deferral messages (as the suite's run on this context sent them) in one call, the cloud's "
                  "tokens out (their round trips are in the latency table); PICE, the context's sketch pulled; CE-LSLM, the artifact pulled from serve-cache. Edge compute is "
                  "in the table above. Cloud CPU is the cloud process's own CPU seconds (from /proc), divided by the "
                  "requests it served.", "",
                  "| mode | clients | requests | errors | requests/s | p50 s | p99 s | cloud CPU s / request |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["concurrency"]:
            cpu = r["cloud_cpu_s_per_request"]
            cpu = "< 0.01 in all (below /proc's resolution)" if cpu == 0 else fmt(cpu, ".4f")
            lines.append(f"| {r['mode']} | {r['clients']} | {r['requests']} | {r['errors']} | {r['rps']:.2f} | "
                         f"{fmt(r['p50_s'])} | {fmt(r['p99_s'])} | {cpu} |")
        if any(r["mode"] == "ce-collm" for r in result["results"]) and not any(
                r["mode"] == "ce-collm" for r in result["concurrency"]):
            lines += ["", "ce-collm has no row: on this context its request deferred no token, so it cost the cloud nothing."]
        top = max(r["clients"] for r in result["concurrency"])
        at_top = {r["mode"]: r["cloud_cpu_s_per_request"] for r in result["concurrency"] if r["clients"] == top}
        if at_top.get("cloud-only") and at_top.get("ce-lslm"):
            lines += ["", f"At {top} clients the cloud spends {at_top['cloud-only'] / at_top['ce-lslm']:.0f}x fewer CPU "
                      f"seconds per request with CE-LSLM ({at_top['ce-lslm']:.4f} s) than cloud-only "
                      f"({at_top['cloud-only']:.3f} s); the context's one-off prefill is in the cloud prep column."]
        lines += ["", "![capacity](capacity.png)"]
    lines += ["", "![latency split](latency.png)", "", "![quality vs bytes](quality.png)", "",
              "Rows are every mode run, including where CE-LSLM loses. Tasks, outputs and scores are in "
              "`suite.json`; `celslm bench report --from suite.json --out DIR` re-renders (and re-scores) them.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
