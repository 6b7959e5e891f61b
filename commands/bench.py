"""celslm bench: benchmarks that print their figures, measured in one run. Each command parses its
options, runs its celslm.bench module and prints what that module renders (or its --json)."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from celslm import plots
from celslm.errors import CelslmError, UsageError
from celslm.models import default_engine, load_model, model_gguf
from .common import (FLAG, CorpusOpt, EngineOpt, JsonOpt, MaxNewTokensOpt, ModelOpt, corpus_source, examples, for_option, log,
                     old_spelling, out_console, parse_budget, print_json, progress_bar, renamed)

# Shared by the benchmarks: --tokens counts tokens (a list where a benchmark sweeps lengths); --context
# names a file everywhere in celslm, so it is no longer a count here (kept one release, hidden).
OldContextCounts = Annotated[list[int] | None, old_spelling("--context", min=16)]
OldContextCount = Annotated[int | None, old_spelling("--context", min=16)]
OldNewTokens = Annotated[int | None, old_spelling("--new-tokens", min=1)]
StdlibTokensOpt = Annotated[int, typer.Option("--tokens", min=16, help="Context length in tokens (standard-library source).")]
RepeatsOpt = Annotated[int, typer.Option("--repeats", min=1, max=20, help="Interleaved repetitions of every row.")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", min=1, help="Threads for every engine (default: all cores).")]

app = typer.Typer(help="Benchmarks that print their figures (ratios measured in one run).",
                  no_args_is_help=True, rich_markup_mode="rich")


def show(rendered: list) -> None:
    """Print a benchmark's tables and lines on stdout, in order."""
    for item in rendered:
        out_console.print(item, highlight=False)


@app.command(epilog=examples("celslm bench ttft -m qwen2.5-coder-0.5b --tokens 2048",
                             "celslm bench ttft -m qwen2.5-coder-0.5b --tokens 2048 --engine transformers",
                             "celslm bench ttft -m smollm2-135m --tokens 512 --json"))
def ttft(
    model: ModelOpt,
    tokens: Annotated[int, typer.Option("--tokens", min=1, help="Context length in tokens (standard-library source).")] = 2048,
    chunk_size: Annotated[int, typer.Option("--chunk-size", min=1)] = 256,
    engine: EngineOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Time to first token from an artifact vs after the model's own prefill."""
    from celslm.bench import ttft as ttft_bench  # torch and transformers: not for --help

    with for_option("--engine"):
        engine = default_engine(model, engine)
    with progress_bar() as progress:
        loaded = load_model(model, progress, engine=engine)
    result = ttft_bench.run(loaded, context_tokens=tokens, chunk_size=chunk_size)
    if json_:
        print_json({**dataclasses.asdict(result), "speedup": round(result.speedup, 3)})
        return
    show(ttft_bench.render(result, loaded.engine.name))


@app.command("compose", epilog=examples(
    "celslm bench compose -m qwen2.5-coder-0.5b",
    "celslm bench compose -m qwen2.5-coder-0.5b --tasks 3 --tokens 500 --link-tokens 0 --link-tokens 64 --no-serve --json",
    "celslm bench compose -m qwen2.5-coder-0.5b --engine transformers --parts 4"))
def compose_(
    model: ModelOpt,
    tasks: Annotated[int, typer.Option("--tasks", min=1, help="Held-out tasks: one standard-library package each.")] = 6,
    parts: Annotated[int, typer.Option("--parts", min=2, max=8, help="Files of the package, each its own artifact.")] = 3,
    tokens: Annotated[int, typer.Option("--tokens", min=16, help="Context tokens per part (each file's first, cut at a line end).")] = 1000,
    continuation: Annotated[int, typer.Option("--continuation", min=2, help="Tokens after the last part scored (teacher-forced NLL).")] = 128,
    link_tokens: Annotated[list[int] | None, typer.Option("--link-tokens", min=0, help="Link tokens to measure (repeatable); default 0, 8, 16, 32, and always decode's default.")] = None,
    codec: Annotated[str, typer.Option("--codec", help="Codec of every artifact (the parts' and the concatenation's).")] = "balanced",
    new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Tokens generated per question at most.")] = 24,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", metavar=FLAG, help="Also time the first task as whole decode commands (composed, the concatenation's artifact, edge-only), and celslm serve on loopback: each part alone, then the parts together, a combination it has not seen.")] = True,
    repeats: RepeatsOpt = 3,
    engine: EngineOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Several contexts in one answer: composed artifacts against one artifact of the concatenation and edge-only."""
    from celslm.bench import compose as compose_bench  # torch and transformers: not for --help

    with for_option("--engine"):
        engine = default_engine(model, engine)
    with progress_bar() as progress, tempfile.TemporaryDirectory(prefix="celslm-compose-") as work:
        loaded = load_model(model, progress, engine=engine)
        result = compose_bench.run(loaded, count=tasks, tokens=tokens, parts=parts, continuation=continuation,
                                   links=tuple(link_tokens) if link_tokens else compose_bench.LINKS, codec=codec,
                                   max_new_tokens=new_tokens, serve=model if serve else None, work=Path(work),
                                   repeats=repeats, progress=progress)
    if json_:
        print_json(result)
        return
    show(compose_bench.render(result))


@app.command("compress", epilog=examples(
    "celslm bench compress -m qwen2.5-coder-0.5b --plot compress.png",
    "celslm bench compress -m qwen2.5-coder-0.5b --tokens 1024 --tokens 2048 --tokens 4096 --json",
    "celslm bench compress -m qwen2.5-coder-0.5b --corpus third-party --codec balanced --no-peers",
    "celslm bench compress -m qwen2.5-coder-0.5b --files 4 --codec small --no-peers --tasks 8",
    "celslm bench compress -m qwen2.5-coder-0.5b --files 5 --codec 'tc:q=1.5' --codec balanced --json"))
def compress_(
    model: ModelOpt,
    files: Annotated[int, typer.Option("--files", min=1, help="Held-out files of the corpus to evaluate.")] = 20,
    codec: Annotated[list[str] | None, typer.Option("--codec", help="Codec spec or preset to evaluate (repeatable); default: a standard set.")] = None,
    tokens: Annotated[list[int] | None, typer.Option("--tokens", min=16, help="Context length in tokens (repeatable; "
                                                                             "default 2048): every file gives one case per length.")] = None,
    continuation: Annotated[int, typer.Option("--continuation", min=2, help="Continuation tokens scored per file.")] = 128,
    peers: Annotated[bool, typer.Option("--peers/--no-peers", metavar=FLAG, help="Also run llama.cpp's q8_0/q4_0 cache types, transformers' QuantizedCache and plain lz4/zstd over fp16.")] = True,
    tasks: Annotated[int, typer.Option("--tasks", min=0, max=32, help="Also answer this many of the report's completion and QA tasks per kind from each preset's artifact (0: none).")] = 0,
    corpus: CorpusOpt = "stdlib",
    plot: Annotated[str | None, typer.Option("--plot", metavar="FILE", help="Write a PNG of compression ratio vs perplexity increase.")] = None,
    json_: JsonOpt = False,
    old_context: OldContextCounts = None,
) -> None:
    """Bytes vs quality per codec on held-out files, beside llama.cpp's and transformers' quantized caches."""
    from celslm.bench import compress as compress_bench  # torch and transformers: not for --help

    tokens = renamed("--context", "--tokens", old_context, tokens)
    corpus = corpus_source(corpus)
    if plot:
        plots.bench_extra("matplotlib")
    with progress_bar() as progress:
        loaded = load_model(model, progress)
        result = compress_bench.run(loaded, codecs=tuple(codec) if codec else compress_bench.DEFAULT_CODECS,
                                    files=files, contexts=tuple(tokens or (2048,)),
                                    continuation=continuation, peers=peers, progress=progress, corpus=corpus)
        if tasks:
            result["task_accuracy"] = compress_bench.task_accuracy(
                loaded, tuple(codec or ("balanced", "small", "tiny")), tasks, progress=progress)
    if plot:
        plots.compress_tradeoff(result, plot)
    if json_:
        print_json(result)
        return
    show(compress_bench.render(result))


@app.command("quality", epilog=examples(
    "celslm bench quality --llm qwen2.5-coder-1.5b --align coder.align --plot docs/quality.png",
    "celslm bench quality --llm qwen2.5-coder-1.5b --align coder.align --corpus third-party --files 10",
    "celslm bench quality --llm qwen2.5-coder-1.5b --align coder.align --corpus ./my-code --files 10 --no-llama",
    "celslm bench quality --llm qwen2.5-coder-1.5b --align coder.align --files 5 --native 6 --native 12 --json"))
def quality_(
    llm: Annotated[str, typer.Option("--llm", help="The large model the alignment maps from.")],
    align: Annotated[str, typer.Option("--align", help="Alignment directory (celslm align).")],
    slm: Annotated[str | None, typer.Option("--slm", help="Where to load the small model from (default: as the alignment names it).")] = None,
    files: Annotated[int, typer.Option("--files", min=1, help="Held-out files of the corpus (never calibration files).")] = 20,
    corpus: CorpusOpt = "stdlib",
    llama: Annotated[bool, typer.Option("--llama/--no-llama", metavar=FLAG, help="Also score own prefill, no context, the native and cross artifacts and the token splits on llama.cpp, the edge's engine (needs the small model's GGUF; default: when it has one).")] = True,
    tokens: Annotated[int, typer.Option("--tokens", min=8, help="Context tokens per file.")] = 1024,
    continuation: Annotated[int, typer.Option("--continuation", min=2, help="Continuation tokens scored per file.")] = 128,
    native: Annotated[list[int] | None, typer.Option("--native", min=1, help="Hybrid native layer counts to measure (repeatable); default 4, 8, 12, 16, plus --auto's pick.")] = None,
    budget: Annotated[str, typer.Option("--budget", help="Perplexity budget for the auto hybrid, e.g. 2%.")] = "2%",
    codec: Annotated[str, typer.Option("--codec", help="Codec of the shipped artifacts (link bytes and quality include it).")] = "balanced",
    plot: Annotated[str | None, typer.Option("--plot", metavar="FILE", help="Write a PNG of gain kept vs edge prefill avoided.")] = None,
    json_: JsonOpt = False,
    old_context: Annotated[int | None, old_spelling("--context", min=8)] = None,
) -> None:
    """The small model's quality from a large model's KV: cross, hybrid, equal-compute baselines, held out."""
    from celslm.bench import quality as quality_bench  # torch and transformers: not for --help
    from celslm.projection import load_aligned_models, load_alignment, small_spec

    tokens = renamed("--context", "--tokens", old_context, tokens, 1024)
    corpus = corpus_source(corpus)
    if plot:
        plots.bench_extra("matplotlib")
    alignment = load_alignment(align)
    with progress_bar() as progress:
        large = load_model(llm, progress)
        small = load_aligned_models(alignment, large, slm, progress)
        spec = small_spec(alignment, slm)
        edge = load_model(spec, progress, engine="llama.cpp") if llama and model_gguf(spec, small.folder) else None
        result = quality_bench.run(large, small, alignment, files=files, context=tokens, continuation=continuation,
                                   native_counts=tuple(native) if native else (4, 8, 12, 16),
                                   budget=parse_budget(budget), codec=codec, corpus=corpus, edge=edge,
                                   progress=progress)
    if plot:
        plots.quality_tradeoff(result, plot)
    if json_:
        print_json(result)
        return
    show(quality_bench.render(result))


@app.command("report", epilog=examples(
    "celslm bench report --llm qwen2.5-coder-1.5b --slm qwen2.5-coder-0.5b --quick --out report",
    "celslm bench report --llm qwen2.5-coder-1.5b --slm qwen2.5-coder-0.5b --align coder.align --quick --out report",
    "celslm bench report --llm qwen2.5-coder-1.5b --slm qwen2.5-coder-0.5b --link 100mbit:20ms --no-concurrency --out report",
    "celslm bench report --llm qwen2.5-coder-1.5b --slm qwen2.5-coder-0.5b --mode edge-only --mode ce-lslm-pipelined --quick --out report",
    "celslm bench report --from report/suite.json --out report"))
def report_(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for report.md, its PNGs and suite.json.")],
    llm: Annotated[str | None, typer.Option("--llm", help="The cloud's large model.")] = None,
    slm: Annotated[str | None, typer.Option("--slm", help="The edge's small model.")] = None,
    quick: Annotated[bool, typer.Option("--quick", metavar=FLAG, help="Few, short tasks (minutes); without it, the full suite.")] = False,
    from_: Annotated[Path | None, typer.Option("--from", help="Re-score and re-render a saved suite.json instead of running models.")] = None,
    tasks_per_kind: Annotated[int | None, typer.Option("--tasks", min=1, help="Tasks of each kind (completion, QA); overrides the preset.")] = None,
    context_chars: Annotated[int | None, typer.Option("--context-chars", min=200, help="Context size in characters (tasks are cut from files by characters); overrides the preset.")] = None,
    new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", "-n", min=1, help="Tokens generated per request at most; overrides the preset.")] = None,
    link: Annotated[list[str] | None, typer.Option("--link", help="Emulated link RATE[:RTT] between edge and cloud (repeatable); default 10mbit:40ms, 100mbit:20ms, 1gbit:5ms.")] = None,
    mode: Annotated[list[str] | None, typer.Option("--mode", help="Run only this mode (repeatable): edge-only, edge-only-llama.cpp, cloud-only, ce-collm, pice, ce-lslm, ce-lslm-pipelined, ce-lslm-cross, ce-lslm-hybrid.")] = None,
    align: Annotated[str | None, typer.Option("--align", help="Alignment directory (celslm align) from --llm to --slm: adds the cross-model and hybrid CE-LSLM modes.")] = None,
    threshold: Annotated[float, typer.Option("--threshold", min=0.0, max=1.0, help="CE-CoLLM: defer a token to the cloud below this top probability.")] = 0.5,
    codec: Annotated[str, typer.Option("--codec", help="CE-LSLM artifact codec.")] = "balanced",
    clients: Annotated[list[int] | None, typer.Option("--clients", min=1, max=64, help="Concurrency levels (repeatable); default 1 and 32 (--quick) or 1, 2, 4, 8, 16, 32.")] = None,
    no_concurrency: Annotated[bool, typer.Option("--no-concurrency", metavar=FLAG, help="Skip the concurrent-capacity part.")] = False,
    llama: Annotated[bool, typer.Option("--llama/--no-llama", metavar=FLAG, help="Add edge-only on llama.cpp (the SLM's GGUF) as a baseline row, when the SLM has a GGUF.")] = True,
    json_: JsonOpt = False,
    old_new_tokens: OldNewTokens = None,
) -> None:
    """Every collaboration mode (edge-only, cloud-only, CE-CoLLM, PICE, CE-LSLM native/pipelined/cross/hybrid) on the same tasks and links: report.md + figures."""
    from celslm.bench import report as report_bench  # torch and transformers: not for --help
    from celslm.projection import load_aligned_models, load_alignment
    from celslm.stream import Link

    new_tokens = renamed("--new-tokens", "--max-new-tokens", old_new_tokens, new_tokens)
    plots.bench_extra("matplotlib")  # the report's figures
    if from_ is not None:
        try:
            result = report_bench.rescore(json.loads(from_.read_text()))
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"--from {from_}: not a saved suite ({exc})") from exc
    else:
        if not (llm and slm):
            raise UsageError("give --llm and --slm (or --from a saved suite.json)")
        preset = report_bench.QUICK if quick else report_bench.FULL
        for spec in link or ():
            with for_option("--link"):
                Link.parse(spec)  # a bad --link or --mode fails before any model loads
        with for_option("--mode"):
            report_bench.check_modes(tuple(mode or ()), align is not None)
        with progress_bar() as progress, tempfile.TemporaryDirectory(prefix="celslm-report-") as scratch:
            alignment = load_alignment(align) if align else None
            large = load_model(llm, progress)
            small = load_aligned_models(alignment, large, slm, progress) if alignment else load_model(slm, progress)
            wanted = not mode or "edge-only-llama.cpp" in mode
            baseline = (load_model(slm, progress, engine="llama.cpp")
                        if llama and wanted and model_gguf(slm, small.folder) else None)
            result = report_bench.run_suite(
                large, small, tasks_per_kind=tasks_per_kind or preset["tasks_per_kind"],
                context_chars=context_chars or preset["context_chars"], new_tokens=new_tokens or preset["new_tokens"],
                links=tuple(link or report_bench.DEFAULT_LINKS), threshold=threshold, codec=codec, alignment=alignment,
                only=tuple(mode or ()),
                levels=() if no_concurrency else tuple(clients or preset["levels"]), requests=preset["requests"],
                workdir=Path(scratch), progress=progress, slm_llama=baseline)
    path = report_bench.render(result, out)
    if json_:
        print_json({"report": str(path), "summary": report_bench.summary(result)})
    else:
        log(f"wrote {path} (+ latency.png, quality.png, suite.json)")


@app.command("serve", epilog=examples(
    "celslm bench serve",
    "celslm bench serve --clients 1 --clients 32 --seconds 3 --json",
    "celslm bench serve --wrk-only --connections 64 --workers 2 --wrk-seconds 10 --repeats 3",
    "celslm bench serve --wrk-only --no-redis --wrk-seconds 3 --repeats 3 --pulls 5",
    "celslm bench serve --wrk-only --no-redis --no-s3 --wrk-seconds 2 --pulls 0"))
def serve_(
    clients: Annotated[list[int] | None, typer.Option("--clients", min=1, max=256, help="Concurrent clients per level (repeatable).")] = None,
    seconds: Annotated[float, typer.Option("--seconds", min=0.5, max=60, help="Duration of each level.")] = 4.0,
    max_pulls: Annotated[int, typer.Option("--max-pulls", min=1, help="Pulls per client at most, per level.")] = 1000,
    wrk_only: Annotated[bool, typer.Option("--wrk-only", metavar=FLAG, help="Skip the verifying Python clients' levels.")] = False,
    no_wrk: Annotated[bool, typer.Option("--no-wrk", metavar=FLAG, help="Skip the ceiling runs with wrk (apt-get install wrk).")] = False,
    connections: Annotated[int, typer.Option("--connections", min=1, max=4096, help="wrk's open connections.")] = 64,
    workers: Annotated[int | None, typer.Option("--workers", min=1, max=256, help="serve-cache workers for the N-worker rows (default: one per core).")] = None,
    wrk_seconds: Annotated[float, typer.Option("--wrk-seconds", min=1, max=120, help="Duration of each wrk run.")] = 5.0,
    repeats: Annotated[int, typer.Option("--repeats", min=1, max=20, help="wrk runs per server, interleaved across servers; the median is shown.")] = 2,
    pulls: Annotated[int, typer.Option("--pulls", min=0, max=50, help="Whole `celslm pull` processes timed per path (serve-cache, nginx proxy_cache in front), interleaved, each with a cold edge cache; 0: none.")] = 3,
    no_redis: Annotated[bool, typer.Option("--no-redis", metavar=FLAG, help="Skip the Redis and Redis Cluster rows.")] = False,
    no_s3: Annotated[bool, typer.Option("--no-s3", metavar=FLAG, help="Skip the object-store rows (SeaweedFS on loopback: "
                                        "serve-cache over it, redirecting to it, and read directly).")] = False,
    json_: JsonOpt = False,
) -> None:
    """Serve-cache under load on loopback, beside nginx over the same store: verifying clients pulling a
    2,048-token artifact, then wrk at each server's ceiling (1 and N workers; directory, Redis, Redis Cluster;
    nginx proxy_cache in front, deploy/nginx-proxy-cache.conf) and timed `celslm pull` processes."""
    from celslm.bench import serve as serve_bench

    say = lambda what: log(f"bench serve: {what}")  # noqa: E731
    try:  # a server that does not start, or wrk failing, is one line
        result = serve_bench.run(levels=tuple(clients or (1, 8, 32, 64)), seconds=seconds, max_pulls=max_pulls,
                                 progress=say) if not wrk_only else None
        ceiling = serve_bench.ceiling(seconds=wrk_seconds, connections=connections, workers=workers, repeats=repeats,
                                      pulls=pulls, redis=not no_redis, s3=not no_s3, progress=say) if not no_wrk else None
    except RuntimeError as exc:
        raise CelslmError(f"bench serve: {exc}") from exc
    if json_:
        print_json({"clients": result, "ceiling": ceiling})
        return
    show(serve_bench.render(result, ceiling))
    for note in serve_bench.notes(result, ceiling):
        log(note)


@app.command("edge", epilog=examples(
    "celslm bench edge -m qwen2.5-coder-0.5b",
    "celslm bench edge -m qwen2.5-coder-0.5b --tokens 2048 --tokens 8192 --no-transformers",
    "celslm bench edge -m qwen2.5-coder-0.5b --tokens 32768 --no-edge-only --switches 0 --repeats 2 --keep bench-32k",
    "celslm bench edge -m qwen2.5-coder-0.5b --tokens 1024 -n 32 --repeats 2 --no-transformers --json"))
def edge_(
    model: ModelOpt,
    tokens: Annotated[list[int] | None, typer.Option("--tokens", min=16, help="Context length in tokens (standard-library source), repeatable: the rows run at each; edge-only and the warm service at the first only. Capped at the model's window. Default 2048.")] = None,
    new_tokens: MaxNewTokensOpt = 64,
    repeats: RepeatsOpt = 3,
    transformers: Annotated[bool, typer.Option("--transformers/--no-transformers", metavar=FLAG, help="Include celslm edge-only on transformers (the slowest row).")] = True,
    edge_only: Annotated[bool, typer.Option("--edge-only/--no-edge-only", metavar=FLAG, help="Include the edge-only rows (a whole prefill per run: minutes past 8K tokens here).")] = True,
    link: Annotated[str, typer.Option("--link", help="The emulated link of the link rows, RATE[:RTT]: the artifact and llama.cpp's state over it.")] = "100mbit",
    switches: Annotated[int, typer.Option("--switches", min=0, max=50, help="Warm service context switches timed (0: none).")] = 5,
    keep: Annotated[Path | None, typer.Option("--keep", metavar="DIR", file_okay=False, help="Keep each length's artifact and llama.cpp state in DIR and reuse them on the next run with the same context (the two prefills take most of an hour at 32K tokens on a small machine).")] = None,
    threads: ThreadsOpt = None,
    json_: JsonOpt = False,
    old_new_tokens: OldNewTokens = None,
) -> None:
    """Whole processes on one GGUF at each context length: celslm decode from an artifact vs llama.cpp restoring its own state, on disk and over a link, edge-only, and the warm service switching contexts."""
    from celslm.bench import edge as edge_bench

    new_tokens = renamed("--new-tokens", "--max-new-tokens", old_new_tokens, new_tokens, 64)
    with progress_bar() as progress:
        loaded = load_model(model, progress)
        result = edge_bench.run(loaded, model, tokens=tuple(tokens or [2048]), new_tokens=new_tokens, repeats=repeats,
                                transformers=transformers, edge_only=edge_only, threads=threads, link=link, switches=switches,
                                keep=keep, progress=progress)
    if json_:
        print_json(result)
        return
    show(edge_bench.render(result))


@app.command("hostile", epilog=examples(
    "celslm bench hostile -m smollm2-135m",
    "celslm bench hostile -m qwen2.5-coder-0.5b --tokens 2048 --repeats 3 --json"))
def hostile_(
    model: ModelOpt,
    tokens: StdlibTokensOpt = 1024,
    new_tokens: MaxNewTokensOpt = 16,
    repeats: RepeatsOpt = 2,
    threads: ThreadsOpt = None,
    json_: JsonOpt = False,
    old_new_tokens: OldNewTokens = None,
) -> None:
    """A hostile peer against an edge under --trust (whole processes), and what signing and encryption cost."""
    from celslm.bench import hostile as hostile_bench

    new_tokens = renamed("--new-tokens", "--max-new-tokens", old_new_tokens, new_tokens, 16)
    with progress_bar() as progress:
        loaded = load_model(model, progress, engine="transformers")
        result = hostile_bench.run(loaded, model, tokens=tokens, new_tokens=new_tokens, repeats=repeats, threads=threads,
                                   progress=progress)
    if json_:
        print_json(result)
        return
    show(hostile_bench.render(result))
    for note in hostile_bench.notes(result):
        log(note)


@app.command("engines", epilog=examples(
    "celslm bench engines -m qwen2.5-coder-0.5b",
    "celslm bench engines -m qwen2.5-coder-0.5b --files 4 --tokens 512 --json"))
def engines_(
    model: ModelOpt,
    files: Annotated[int, typer.Option("--files", min=1, help="Held-out standard-library files.")] = 8,
    tokens: Annotated[int, typer.Option("--tokens", min=16, help="Context tokens per file.")] = 1024,
    continuation: Annotated[int, typer.Option("--continuation", min=2, help="Tokens scored after the context.")] = 256,
    json_: JsonOpt = False,
    old_context: OldContextCount = None,
) -> None:
    """NLL on held-out files: artifacts made by transformers and by llama.cpp, each scored by both engines."""
    from celslm.bench import engines as engines_bench

    tokens = renamed("--context", "--tokens", old_context, tokens, 1024)
    with progress_bar() as progress:
        loaded = [load_model(model, progress, engine="llama.cpp"), load_model(model, progress, engine="transformers")]
        result = engines_bench.run(loaded, files=files, context=tokens, continuation=continuation, progress=progress)
    if json_:
        print_json(result)
        return
    show(engines_bench.render(result))


@app.command("latency", epilog=examples(
    "celslm bench latency -m qwen2.5-coder-0.5b --plot latency.png",
    "celslm bench latency -m qwen2.5-coder-0.5b --tokens 1024 --link 10mbit:20ms -n 16",
    "celslm bench latency -m qwen2.5-coder-0.5b --quick --json"))
def latency_(
    model: ModelOpt,
    tokens: Annotated[list[int] | None, typer.Option("--tokens", min=16, help="Context length in tokens (repeatable); default 512 1024 2048 4096.")] = None,
    link: Annotated[list[str] | None, typer.Option("--link", help="Emulated link RATE[:RTT] (repeatable); default 10, 50, 100 Mbit/s and 1 Gbit/s.")] = None,
    codec: Annotated[list[str] | None, typer.Option("--codec", help="Artifact codec (repeatable); default fp16 and balanced.")] = None,
    new_tokens: MaxNewTokensOpt = 64,
    quick: Annotated[bool, typer.Option("--quick", metavar=FLAG, help="Only 512 and 2048 tokens over 10 and 100 Mbit/s.")] = False,
    plot: Annotated[str | None, typer.Option("--plot", metavar="FILE", help="Write a PNG of TTFT vs link rate.")] = None,
    llama: Annotated[bool, typer.Option("--llama/--no-llama", metavar=FLAG, help="Add edge-only on llama.cpp (the same GGUF) as a baseline row, when the model has a GGUF.")] = True,
    json_: JsonOpt = False,
    old_context: OldContextCounts = None,
    old_new_tokens: OldNewTokens = None,
) -> None:
    """TTFT and total time: edge-only vs artifact, with and without pipelining, over emulated links."""
    from celslm.bench import latency as latency_bench
    from celslm.codecs import parse_codec
    from celslm.stream import Link

    tokens = renamed("--context", "--tokens", old_context, tokens)
    new_tokens = renamed("--new-tokens", "--max-new-tokens", old_new_tokens, new_tokens, 64)
    contexts = tuple(tokens or ((512, 2048) if quick else (512, 1024, 2048, 4096)))
    links = tuple(link or (("10mbit:20ms", "100mbit:20ms") if quick else ("10mbit:20ms", "50mbit:20ms", "100mbit:20ms", "1gbit:5ms")))
    with for_option("--link"):  # bad values fail before the model loads
        [Link.parse(spec) for spec in links]
    with for_option("--codec"):
        [parse_codec(spec) for spec in codec or ()]
    if plot:
        plots.bench_extra("matplotlib")
    with progress_bar() as progress:
        loaded = load_model(model, progress)
        baseline = load_model(model, progress, engine="llama.cpp") if llama and model_gguf(model, loaded.folder) else None
    result = latency_bench.run(loaded, contexts=contexts, links=links, codecs=tuple(codec or ("fp16", "balanced")),
                               new_tokens=new_tokens, progress=lambda what: log(f"bench latency: {what}"), llama=baseline)
    if plot:
        plots.latency_ttft(result, plot)
    if json_:
        print_json(result)
        return
    show(latency_bench.render(result))


@app.command("link", epilog=examples(
    "sudo celslm bench link -m qwen2.5-coder-0.5b --rate 100mbit --rtt 20",
    "sudo celslm bench link -m qwen2.5-coder-0.5b --rate 10mbit --codec small --json"))
def link_(
    model: ModelOpt,
    rate: Annotated[str, typer.Option("--rate", help="tc netem rate, e.g. 100mbit.")] = "100mbit",
    rtt: Annotated[float, typer.Option("--rtt", min=0, help="Round-trip time in ms.")] = 20.0,
    codec: Annotated[str, typer.Option("--codec", help="Codec of the pushed artifact.")] = "balanced",
    context: Annotated[Path, typer.Option("--context", "-c", help="Context file (default: samples' sched.py).")] = Path("samples/context/sched.py"),
    new_tokens: MaxNewTokensOpt = 16,
    json_: JsonOpt = False,
    old_new_tokens: OldNewTokens = None,
) -> None:
    """Real kernel shaping (root): serve-cache and decode in two network namespaces over a tc-shaped veth."""
    from celslm.bench import link as link_bench

    new_tokens = renamed("--new-tokens", "--max-new-tokens", old_new_tokens, new_tokens, 16)
    if not context.is_file():
        raise UsageError(f"--context {context}: no such file")
    result = link_bench.run(model, context.resolve(), "What does this code do? Answer briefly.", rate, rtt, codec, new_tokens)
    if json_:
        print_json(result)
        return
    show(link_bench.render(result))


@app.command("tenants", epilog=examples(
    "celslm bench tenants -m qwen2.5-coder-0.5b",
    "celslm bench tenants -m qwen2.5-coder-0.5b --clients 1,4 --rounds 1 --poisson-requests 8",
    "celslm bench tenants -m qwen2.5-coder-0.5b --parallel 8 --threads 2 --llama-server ~/llama.cpp/build/bin/llama-server --json"))
def tenants_(
    model: ModelOpt,
    clients: Annotated[list[str] | None, typer.Option("--clients", help="Concurrent streaming clients per level, "
                                                     "comma-separated or repeated (default 1,2,4,8).")] = None,
    parallel: Annotated[int, typer.Option("--parallel", min=2, max=64, help="Sequences of the batching rows: celslm serve "
                                          "--parallel N and llama-server --parallel N.")] = 4,
    threads: ThreadsOpt = None,
    rounds: Annotated[int, typer.Option("--rounds", min=1, max=20, help="Interleaved rounds of every closed-loop row.")] = 2,
    new_tokens: MaxNewTokensOpt = 48,
    tokens: Annotated[int, typer.Option("--tokens", min=16, help="Context length in tokens (third-party source).")] = 2048,
    poisson_rate: Annotated[float | None, typer.Option("--poisson-rate", min=0.001, help="Open-loop arrivals per second "
                                                       "(default: 0.8x celslm --parallel N's measured capacity).")] = None,
    poisson_requests: Annotated[int, typer.Option("--poisson-requests", min=0, max=1000, help="Open-loop requests per "
                                                  "server (0: no open-loop run).")] = 16,
    overload_requests: Annotated[int, typer.Option("--overload-requests", min=0, max=1000, help="Requests of the "
                                                   "overload run: arrivals at 2x --parallel N's measured capacity, on a "
                                                   "service whose queue holds N (0: no overload run).")] = 32,
    llama_server: Annotated[str | None, typer.Option("--llama-server", metavar="PATH", help="llama-server executable "
                                                     "(default: make llama-server's .llama-server/bin/llama-server, else PATH).")] = None,
    json_: JsonOpt = False,
) -> None:
    """Concurrent streaming clients over one warm context: celslm serve --parallel 1 and N beside llama-server --parallel N."""
    from celslm.bench import tenants as tenants_bench

    levels = tenants_bench.parse_levels(clients)
    with for_option("--llama-server"):
        binary = tenants_bench.find_llama_server(llama_server)
    with progress_bar() as progress:
        loaded = load_model(model, progress, engine=default_engine(model, None))
    with tempfile.TemporaryDirectory(prefix="celslm-bench-tenants-") as work:
        try:  # a server that does not start or fails while warming is one line
            result = tenants_bench.run(loaded, model, Path(work), clients=levels, parallel=parallel, threads=threads,
                                       rounds=rounds, new_tokens=new_tokens, tokens=tokens, poisson_rate=poisson_rate,
                                       poisson_requests=poisson_requests, overload_requests=overload_requests, llama=binary,
                                       progress=lambda what: log(f"bench tenants: {what}"))
        except RuntimeError as exc:
            raise CelslmError(f"bench tenants: {exc}") from exc
    if json_:
        print_json(result)
    else:
        show(tenants_bench.render(result))
    for note in tenants_bench.notes(result):
        log(note)
