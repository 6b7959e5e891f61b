"""celslm align: fit the maps that let a small model decode from a large model's KV cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from celslm.corpus import CALIBRATION_CORPORA, calibration_files, folder_files
from celslm.errors import UsageError
from celslm.plots import bench_extra
from .common import ForceOpt, JsonOpt, examples, log, out_console, print_json, progress_bar

EPILOG = examples(
    "celslm align --llm qwen2.5-coder-1.5b --slm qwen2.5-coder-0.5b --out coder.align --plots docs/align",
    "celslm align --llm ./big --slm ./small --calib docs/ --calib notes.txt --map proportional --out my.align --json",
    "celslm align --llm qwen2.5-coder-1.5b --slm qwen2.5-coder-0.5b --out coder.align --eval ./my-code --eval-files 10",
    "celslm prefill -m qwen2.5-coder-1.5b --align coder.align --auto --budget 2% -c sched.py -o sched-cross.kv",
)


def _calibration_paths(calib: list[str] | None, windows: int, corpus: str) -> list[Path]:
    if not calib:
        return calibration_files(windows * 2, corpus)  # more than needed: short files are skipped
    paths = []
    for item in calib:
        path = Path(item)
        if path.is_dir():
            paths.extend(folder_files(path))
        elif path.is_file():
            paths.append(path)
        else:
            raise UsageError(f"--calib {item}: no such file or directory")
    return paths


def align(
    llm: Annotated[str, typer.Option("--llm", help="The large (cloud) model: folder, .gguf, bundled name or hub id.")],
    slm: Annotated[str, typer.Option("--slm", help="The small (edge) model; must share the large model's tokenizer.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Alignment directory to write (NAME.align).")],
    calib: Annotated[list[str] | None, typer.Option("--calib", help="Calibration text files or folders (repeatable). Default: --calib-corpus.")] = None,
    calib_corpus: Annotated[str, typer.Option("--calib-corpus", metavar="stdlib|broad", help="Without --calib: stdlib (standard-library modules never used by `bench quality`) or broad (half those, half modules of 17 other installed libraries in turn: requests, pydantic, sympy, botocore, transformers and more, none of them the third-party evaluation's).")] = "stdlib",
    map_method: Annotated[str, typer.Option("--map", help="Layer map: cka or rsa (monotone, best total similarity) or proportional.")] = "cka",
    source: Annotated[str, typer.Option("--source", help="What the maps read from the large model: hidden (its normalized hidden state entering the mapped layer) or kv (its pre-RoPE keys and values).")] = "hidden",
    windows: Annotated[int, typer.Option("--windows", min=3, help="Calibration windows (one per file).")] = 16,
    window: Annotated[int, typer.Option("--window", min=64, help="Tokens per calibration window.")] = 1024,
    heldout: Annotated[int, typer.Option("--heldout", min=1, help="Windows held out to choose λ, report R² and measure perplexity.")] = 4,
    continuation: Annotated[int, typer.Option("--continuation", min=1, help="Tokens at the end of each held-out window scored for perplexity.")] = 128,
    rows: Annotated[int, typer.Option("--rows", min=16, help="Tokens sampled per window for fitting (disk, not memory, grows with it).")] = 512,
    refine_steps: Annotated[int, typer.Option("--refine-steps", min=0, help="Adam steps per layer tuning the maps so the small model's attention output matches its own (0: plain ridge).")] = 300,
    refine_windows: Annotated[int, typer.Option("--refine-windows", min=1, help="Calibration windows kept whole for refinement (disk, not memory, grows with it).")] = 12,
    eval_folder: Annotated[Path | None, typer.Option("--eval", metavar="DIR", help="Your own files (.py, .txt, .md, .rst): report the share of the context's gain the alignment keeps on them, before you deploy it (never on a calibration file).")] = None,
    eval_files: Annotated[int, typer.Option("--eval-files", min=1, max=200, help="Files of --eval measured, at most.")] = 10,
    plots: Annotated[Path | None, typer.Option("--plots", help="Write cka.png and rsa.png (layer heatmaps with the map) here.")] = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Align a large and a small model: layer map (CKA/RSA), ridge maps to the small model's KV, measured quality."""
    from celslm import align as alignment_lib  # torch and transformers: not for --help
    from celslm.projection import save_alignment

    if out.exists() and not force:
        raise UsageError(f"{out} exists; pass --force to replace it")
    options = alignment_lib.AlignOptions(map_method=map_method, source=source, window=window, windows=windows,
                                         heldout=heldout, continuation=continuation,
                                         rows_per_window=rows, refine_steps=refine_steps, refine_windows=refine_windows,
                                         eval_folder=eval_folder, eval_files=eval_files)
    options.check()
    if plots:  # an edge install has no matplotlib: say so now, not after the alignment has run
        bench_extra("matplotlib")
    if calib_corpus not in CALIBRATION_CORPORA:
        raise UsageError(f"--calib-corpus {calib_corpus!r}: choose {' or '.join(CALIBRATION_CORPORA)}")
    paths = _calibration_paths(calib, windows, calib_corpus)
    with progress_bar() as progress:  # the library loads each model when its turn comes, one at a time
        result = alignment_lib.align(llm, slm, paths, options, progress)
    digest = save_alignment(result, out, force=force)
    written = alignment_lib.plot_similarity(result, plots) if plots else []
    meta = result.to_json()  # rendered as alignment.json records it
    held = meta["heldout"]
    if json_:
        print_json({"digest": digest, "out": str(out), "plots": [str(p) for p in written],
                    **{k: meta.get(k) for k in ("llm", "slm", "source", "map_method", "layer_map", "r2", "heldout",
                                                "refine", "calibration", "eval", "seconds")}})
        return
    table = Table(title=f"{meta['slm']['name']} <- {meta['llm']['name']} ({meta['source']}, {meta['map_method']} map)")
    for column in ("layer", "reads LLM layer", "R² keys", "R² values", "Δ NLL alone", "NLL, first k native"):
        table.add_column(column, justify="right")
    for s, l in enumerate(meta["layer_map"]):
        table.add_row(str(s), str(l), f"{meta['r2']['key'][s]:.3f}", f"{meta['r2']['value'][s]:.3f}",
                      f"{held['sensitivity'][s]:+.4f}", f"k={s}: {held['hybrid_nll'][s]:.4f}")
    out_console.print(table)
    cross = held["hybrid_nll"][0]
    kept = alignment_lib.gain_kept(cross, held["own_nll"], held["no_context_nll"])
    log(f"held-out NLL: own prefill {held['own_nll']:.4f}, no context {held['no_context_nll']:.4f}, "
        f"cross (all projected) {cross:.4f} = {kept:.0%} of the context's gain kept")
    if held.get("split_nll"):
        curve = ", ".join(f"{n}: {alignment_lib.gain_kept(v, held['own_nll'], held['no_context_nll']):.0%}"
                          for n, v in held["split_nll"].items())
        advised = result.heldout.advised_split()
        log(f"token splits, the small model prefilling the context's last N tokens over the rest (N: gain kept): {curve}; "
            + (f"its artifacts advise decode to prefill the last {advised} by default" if advised else
               "its artifacts advise no split (decode --recompute-last N still makes one)"))
    if "eval" in meta:
        mine = meta["eval"]
        each = ", ".join(f"{f['file']} {f['gain_kept']:.0%}" for f in mine["files"])
        log(f"your files ({mine['folder']}, {len(mine['files'])}): own prefill {mine['own_nll']:.4f}, no context "
            f"{mine['no_context_nll']:.4f}, cross {mine['cross_nll']:.4f} = {mine['gain_kept']:.0%} of the context's gain "
            f"kept (per file: {each})" + (f"; with decode's default split (own last {mine['own_last']}): "
                                          f"{mine['split_gain_kept']:.0%}" if "own_last" in mine else ""))
    if "refine" in meta:
        refine = meta["refine"]
        before, after = (sum(refine[k]) / len(refine[k]) for k in ("before", "after"))
        log(f"refinement ({refine['steps']} steps per layer, {refine['windows']} windows): held-out attention-output "
            f"error {before:.3f} -> {after:.3f} (mean over layers), tuned maps kept in {sum(refine['kept'])} of "
            f"{len(refine['kept'])} layers")
    log(f"wrote {out} ({digest[:12]}) in {meta['seconds']:.0f} s" + (f"; plots: {', '.join(map(str, written))}" if written else ""))
