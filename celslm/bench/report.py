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

from celslm.bench import modes, tasks
from celslm.corpus import calibration_files, stdlib_modules
from celslm.decode import Sampling
from celslm.models import LoadedModel
from celslm.stream import Link

Progress = Callable[[str, int, int | None], None]
QUICK = {"tasks_per_kind": 2, "context_chars": 2500, "new_tokens": 24, "levels": (1, 8, 32), "requests": 1}
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


def run_suite(llm: LoadedModel, slm: LoadedModel, *, tasks_per_kind: int, context_chars: int, new_tokens: int,
              link: str = "100mbit:20ms", threshold: float = 0.5, codec: str = "balanced",
              levels: tuple[int, ...] = (), requests: int = 1, workdir: Path | None = None,
              progress: Progress | None = None) -> dict:
    shaped = Link.parse(link)
    sampling = Sampling(max_new_tokens=new_tokens)
    suite = build_tasks(tasks_per_kind, context_chars)
    runners = {
        "edge-only": lambda t, raw: modes.edge_only(slm, t.context, t.prompt, sampling, raw),
        "cloud-only": lambda t, raw: modes.cloud_only(llm, t.context, t.prompt, sampling, raw, shaped),
        "ce-collm": lambda t, raw: modes.ce_collm(llm, slm, t.context, t.prompt, sampling, raw, shaped, threshold),
        "pice": lambda t, raw: modes.pice(llm, slm, t.context, t.prompt, sampling, raw, shaped),
        "ce-lslm": lambda t, raw: modes.ce_lslm(slm, t.context, t.prompt, sampling, raw, shaped, codec),
    }
    results = []
    started = time.perf_counter()
    total = len(suite) * len(runners)
    for index, task in enumerate(suite):
        raw = task.kind == "complete"  # code completion continues the file; questions use the chat template
        for name, runner in runners.items():
            if progress:
                progress("suite (task x mode)", len(results), total)
            outcome = runner(task, raw)
            results.append({"task": index, "kind": task.kind, **outcome.to_json(), "scores": tasks.score(task, outcome.text)})
    if progress:
        progress("suite (task x mode)", total, total)
    capacity = []
    if levels:
        from celslm.bench import concurrency

        qa = next((t for t in suite if t.kind == "qa"), suite[0])
        capacity = concurrency.run(str(llm.folder), slm, qa.context, qa.prompt, levels=levels, requests=requests,
                                   new_tokens=min(new_tokens, 8), codec=codec, workdir=workdir or Path("."),
                                   progress=progress)
    return {
        "llm": llm.name, "slm": slm.name, "link": shaped.label, "threshold": threshold, "codec": codec,
        "new_tokens": new_tokens, "tasks": [t.to_json() for t in suite], "results": results,
        "concurrency": capacity,
        "seconds": round(time.perf_counter() - started, 1),
    }


def rescore(result: dict) -> dict:
    """Score the saved outputs again (after a change to the scoring), without running a model."""
    saved = [tasks.Task(**t) for t in result["tasks"]]
    for row in result["results"]:
        row["scores"] = tasks.score(saved[row["task"]], row["text"])
    return result


def summary(result: dict) -> list[dict]:
    """Per mode: mean scores by task kind, mean times and bytes, privacy."""
    rows = []
    for mode in modes.MODES:
        mine = [r for r in result["results"] if r["mode"] == mode]
        if not mine:
            continue

        def mean(key, kind=None, score=False):
            values = [(r["scores"] if score else r)[key] for r in mine if kind is None or r["kind"] == kind]
            values = [v for v in values if v is not None]
            return sum(values) / len(values) if values else None

        rows.append({
            "mode": mode, "requests": len(mine),
            "exact": mean("exact", "complete", True), "edit_similarity": mean("edit_similarity", "complete", True),
            "qa_accuracy": mean("correct", "qa", True),
            **{k: mean(k) for k in ("ttft_s", "total_s", "t_com_c_s", "t_comm_s", "t_com_e_s", "cloud_prep_s",
                                    "bytes_up", "bytes_down", "prompt_bytes_sent", "edge_token_share")},
            "private": all(r["private"] for r in mine),
        })
    return rows


def render(result: dict, out: Path) -> Path:
    """Write report.md and its figures into `out` from a suite result."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps(result, indent=1))
    rows = summary(result)
    _plot_latency(rows, result, out / "latency.png")
    _plot_quality(rows, result, out / "quality.png")

    def fmt(value, spec=".3f"):
        return "n/a" if value is None else format(value, spec)

    lines = [
        "# celslm evaluation report", "",
        f"Large model (cloud) **{result['llm']}**, small model (edge) **{result['slm']}**; "
        f"{len(result['tasks'])} tasks from held-out Python standard-library files; link **{result['link']}** "
        f"(every time that includes the link is emulated: RTT/2 + bytes / rate per one-way message); "
        f"greedy decoding, {result['new_tokens']} new tokens; CE-CoLLM deferral threshold {result['threshold']}; "
        f"CE-LSLM codec `{result['codec']}`. Suite time {result['seconds']} s.", "",
        "## Quality and privacy", "",
        "| mode | completion exact | completion edit similarity | QA accuracy | prompt bytes sent | private | edge token share |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {fmt(r['exact'])} | {fmt(r['edit_similarity'])} | {fmt(r['qa_accuracy'])} | "
                     f"{fmt(r['prompt_bytes_sent'], '.0f')} | {'yes' if r['private'] else 'no'} | {fmt(r['edge_token_share'], '.2f')} |")
    lines += ["", "## Latency split per request (emulated link)", "",
              "| mode | TTFT s (emulated) | total s (emulated) | T_com_C s | T_comm s (emulated) | T_com_E s | bytes up | bytes down | cloud prep per context s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {fmt(r['ttft_s'])} | {fmt(r['total_s'])} | {fmt(r['t_com_c_s'])} | {fmt(r['t_comm_s'])} | "
                     f"{fmt(r['t_com_e_s'])} | {fmt(r['bytes_up'], ',.0f')} | {fmt(r['bytes_down'], ',.0f')} | {fmt(r['cloud_prep_s'])} |")
    edge = next((r for r in rows if r["mode"] == "edge-only"), None)
    best = next((r for r in rows if r["mode"] == "ce-lslm"), None)
    if edge and best and best["ttft_s"]:
        lines += ["", f"CE-LSLM time to first token: {edge['ttft_s'] / best['ttft_s']:.1f}x faster than edge-only "
                  f"({best['ttft_s']:.3f} s vs {edge['ttft_s']:.3f} s, emulated link)."]
    if result.get("concurrency"):
        _plot_capacity(result["concurrency"], out / "capacity.png")
        lines += ["", "## Concurrent capacity: edge clients against one cloud process (loopback)", "",
                  "Only the cloud's side of a request is timed (cloud-only: prompt in, text out; CE-LSLM: the "
                  "artifact pulled from serve-cache); edge compute is in the table above. Cloud CPU is the cloud "
                  "process's own CPU seconds (from /proc), divided by the requests it served.", "",
                  "| mode | clients | requests | errors | requests/s | p50 s | p99 s | cloud CPU s / request |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in result["concurrency"]:
            lines.append(f"| {r['mode']} | {r['clients']} | {r['requests']} | {r['errors']} | {r['rps']:.2f} | "
                         f"{fmt(r['p50_s'])} | {fmt(r['p99_s'])} | {fmt(r['cloud_cpu_s_per_request'], '.4f')} |")
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


def _plot_latency(rows: list[dict], result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [r["mode"] for r in rows]
    bottom = [0.0] * len(rows)
    for key, label in (("t_com_c_s", "T_com_C cloud compute"), ("t_comm_s", "T_comm link (emulated)"),
                       ("t_com_e_s", "T_com_E edge compute")):
        values = [r[key] or 0.0 for r in rows]
        ax.bar(names, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("seconds per request (mean)")
    ax.set_title(f"Where a request's time goes; link {result['link']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_quality(rows: list[dict], result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        moved = (r["bytes_up"] or 0) + (r["bytes_down"] or 0)
        quality = [v for v in (r["edit_similarity"], r["qa_accuracy"]) if v is not None]
        y = sum(quality) / len(quality) if quality else 0.0
        ax.scatter(max(moved, 1), y)
        ax.annotate(r["mode"] + ("" if r["private"] else " (not private)"), (max(moved, 1), y), fontsize=8,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("bytes on the link per request (log)")
    ax.set_ylabel("quality: mean of edit similarity and QA accuracy")
    ax.set_title("Quality vs bytes on the link", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_capacity(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in sorted({r["mode"] for r in rows}):
        mine = [r for r in rows if r["mode"] == mode]
        left.plot([r["clients"] for r in mine], [r["rps"] for r in mine], "o-", label=mode)
        right.plot([r["clients"] for r in mine], [r["cloud_cpu_s_per_request"] or 0 for r in mine], "o-", label=mode)
    left.set_xlabel("concurrent edge clients")
    left.set_ylabel("requests / s (cloud side)")
    right.set_xlabel("concurrent edge clients")
    right.set_ylabel("cloud CPU seconds per request")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    right.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
