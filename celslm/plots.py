"""Every figure celslm draws, and the one place matplotlib is imported (files only: the Agg backend).

matplotlib comes with the `[bench]` extra, not with an edge install: `bench_extra` checks for it
before a command starts its work, and says in one line how to install it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from celslm.errors import UsageError

BENCH_EXTRA = "pip install 'celslm[bench]'"


def bench_extra(*modules: str) -> None:
    """Each of `modules` (matplotlib) is installed, or a UsageError naming the extra."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; "
                         f"benchmarks and figures need the bench extra: {BENCH_EXTRA}")


def pyplot():
    """matplotlib.pyplot, drawing to files only."""
    bench_extra("matplotlib")
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def compress_tradeoff(result: dict, path: str) -> None:
    """Compression ratio vs perplexity increase, one point per codec."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in result["rows"]:
        loss = (row["ppl_ratio"] - 1) * 100
        marker = "o" if row["system"] == "celslm" else "s"
        ax.scatter(row["ratio"], max(loss, 1e-3), marker=marker, color="C0" if row["system"] == "celslm" else "C3")
        label = row["codec"] + (f" @{row['context_tokens']}" if len(result["contexts"]) > 1 else "")
        ax.annotate(label, (row["ratio"], max(loss, 1e-3)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(1, color="gray", linestyle="--", linewidth=0.8)
    ax.axhline(5, color="gray", linestyle=":", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("compression ratio vs fp16 KV")
    ax.set_ylabel("perplexity increase, % (log)")
    ax.set_title(f"{result['model']}: {len(result['files'])} held-out stdlib files (circles celslm, squares peers)")
    _save(fig, path, dpi=120)


def latency_ttft(result: dict, path: str) -> None:
    """Time to first token vs link rate, one panel per context length."""
    plt = pyplot()
    lengths = sorted({r["context_tokens"] for r in result["runs"]})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 4), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        runs = [r for r in result["runs"] if r["context_tokens"] == length]
        edge = next(r for r in runs if r["mode"] == "edge-only")
        series = sorted({(r["mode"], r["codec"]) for r in runs if not r["mode"].startswith("edge-only")})
        for mode, codec in series:
            points = sorted((r for r in runs if (r["mode"], r["codec"]) == (mode, codec)), key=lambda r: r["link"])
            rates = [float(r["link"].split()[1]) for r in points]
            order = sorted(range(len(rates)), key=rates.__getitem__)
            ax.plot([rates[i] for i in order], [points[i]["ttft_s"] for i in order], marker="o", label=f"{mode}, {codec}")
        ax.axhline(edge["ttft_s"], color="black", linestyle="--", label="edge-only (transformers)")
        for baseline in (r for r in runs if r["mode"] == "edge-only (llama.cpp)"):
            ax.axhline(baseline["ttft_s"], color="gray", linestyle=":", label="edge-only (llama.cpp)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{length}-token context")
        ax.set_xlabel("emulated link, Mbit/s")
        ax.set_ylabel("time to first token, s")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{result['model']}: TTFT over emulated links (in-process bandwidth + RTT emulation)")
    _save(fig, path, dpi=110)


def quality_tradeoff(result: dict, path: str) -> None:
    """Gain kept vs edge prefill avoided: one line per way of splitting the work, points for the rest."""
    plt = pyplot()
    rows = {row["key"]: row for row in result["rows"]}

    def point(row):
        return row["edge_prefill_avoided"] * 100, row["gain_kept"] * 100

    series = {
        "layer split: own first k layers, rest projected": ["cross"] + [k for k in rows if k.startswith("hybrid")],
        "token split: cross + own last N tokens": ["cross"] + [k for k in rows if k.startswith("split")],
        "baseline: own last N tokens only": [k for k in rows if k.startswith("last")],
    }
    fig, ax = plt.subplots(figsize=(8.5, 5))
    for (label, keys), style in zip(series.items(), ("o-", "s-", "^--")):
        xy = sorted(point(rows[k]) for k in keys)
        ax.plot([x for x, _ in xy], [y for _, y in xy], style, label=label)
    for key, marker in (("native", "*"), ("own", "D")):
        ax.plot(*point(rows[key]), marker, markersize=10, label=rows[key]["mode"])
    ax.set_ylim(max(0, min(point(rows[k])[1] for k in rows if k not in ("none", "llm")) - 10), 101)
    ax.set_xlabel("edge prefill compute avoided, %")
    ax.set_ylabel("gain kept, % (100 = own prefill, 0 = no context)")
    ax.set_title(f"{result['slm']} from {result['llm']}: {len(result['files'])} held-out files, "
                 f"{result['context_tokens']}-token contexts, codec {result['codec']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    _save(fig, path, dpi=120)


# The evaluation report's figures (celslm.bench.report.render)


def report_latency(rows: list[dict], labels: list[str], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels) + 1, 5), sharey=True, squeeze=False)
    names = [r["mode"] for r in rows]
    for ax, label in zip(axes[0], labels):
        bottom = [0.0] * len(rows)
        parts = (("T_com_C cloud compute", [r["t_com_c_s"] or 0.0 for r in rows]),
                 ("T_comm link (emulated)", [r["links"][label]["t_comm_s"] or 0.0 for r in rows]),
                 ("T_com_E edge compute", [r["t_com_e_s"] or 0.0 for r in rows]))
        for name, values in parts:
            ax.bar(names, values, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.scatter(names, [r["links"][label]["ttft_s"] for r in rows], marker="_", s=300, color="black", zorder=3,
                   label="time to first token")
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", rotation=60, labelsize=8)
    axes[0][0].set_ylabel("seconds per request (mean)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Where a request's time goes (link times emulated)", fontsize=10)
    _save(fig, path)


def report_quality(rows: list[dict], path: Path) -> None:
    plt = pyplot()
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
    _save(fig, path)


def report_capacity(rows: list[dict], path: Path) -> None:
    plt = pyplot()
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
    _save(fig, path)


def _save(fig, path: Path | str, dpi: int = 110) -> None:
    """Lay out, write and close a figure (closed: a long benchmark draws many)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
