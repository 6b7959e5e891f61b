"""Several contexts in one answer (`celslm bench compose`): held-out multi-file tasks, each a few
source files of one standard-library package prefilled apart and composed at the edge.

A task (`compose_tasks`): the parts (each file's first `tokens` tokens, cut at a line end), one
continuation per part (the text after that part in its own file, scored after all the parts:
teacher-forced NLL, the mean over the parts, so every part's place in the composition is read) and
questions (what a named function of a part returns, `tasks.qa_task`, one per part that has one),
each answered over all the parts. Package modules are never calibration files (`corpus.package_groups`).

Modes, on the edge's engine, every one over the same token ids (`compose.joined_ids`):
  no context       the prompt alone (the gain's zero)
  last part alone  one artifact per answer, as before composition (it cannot read the other parts)
  edge-only        the edge prefills the concatenation itself
  concatenated     one artifact prefilled from the concatenation (the ceiling)
  composed N       the parts' artifacts composed, N link tokens per part after the first
  floor            the first part's artifact, everything after it prefilled here (the least saving)
Every artifact is prefilled by the same engine and shipped through the codec. *Gain kept* =
(NLL with no context - NLL) / (NLL with no context - NLL over the concatenated artifact). Times are in
this process, the model loaded and the artifacts in memory (no fetch): from the start of the context's
work to the first token of the first question, so the edge's context compute plus the prompt's.
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from rich.table import Table

from celslm import prompting
from celslm.artifact import MemoryReader, write_dir
from celslm.blocks import build_artifact
from celslm.bench import tasks as task_scores
from celslm.bench.edge import timed
from celslm.calibrate import codec_codebook
from celslm.codecs import parse_codec
from celslm.compose import DEFAULT_LINK, context_from_readers, joined_ids, opening_ids, separator_ids
from celslm.corpus import file_name, package_groups
from celslm.decode import Context, Sampling, context_from_artifact, context_from_ids, context_from_layers, generate
from celslm.errors import CelslmError, UsageError
from celslm.manifest import Artifact, Producer, Timings
from celslm.models import LoadedModel
from celslm.score import continuation_logits, nll as mean_nll
from celslm.testing.processes import CLI, Service, free_port

Progress = Callable[[str, int, int], None]
LINKS = (0, 8, 16, 32)
EVERYTHING = 1 << 30  # link tokens past any part: the floor recomputes every part after the first


@dataclass(frozen=True)
class ComposeTask:
    package: str
    files: list[str]
    parts: list[str]  # each file's first tokens, cut at a line end
    continuations: list[str]  # what follows each part in its own file
    questions: list[task_scores.Task]


def compose_tasks(tokenizer, count: int, tokens: int, parts: int, continuation: int) -> list[ComposeTask]:
    """Up to `count` tasks, one per package with `parts` modules long enough for `tokens` tokens and a
    continuation."""
    found = []
    for package, paths in package_groups(parts):
        texts = []
        for path in paths:
            text = path.read_text(errors="replace")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) < tokens + continuation:
                continue
            cut = tokenizer.decode(ids[:tokens])
            cut = cut[: cut.rfind("\n") + 1] or cut
            texts.append((path, text, cut))
            if len(texts) == parts:
                break
        if len(texts) < parts:
            continue
        questions = [q for q in (task_scores.qa_task(p, len(c)) for p, _, c in texts) if q is not None]
        follows = [tokenizer(text[len(cut):], add_special_tokens=False)["input_ids"][:continuation] for _, text, cut in texts]
        found.append(ComposeTask(package, [file_name(p) for p, _, _ in texts], [c for _, _, c in texts],
                                 [tokenizer.decode(f) for f in follows], questions))
        if len(found) == count:
            break
    return found


@dataclass
class Mode:
    name: str
    nll: list[float] = field(default_factory=list)
    correct: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    edge_tokens: list[int] = field(default_factory=list)  # context tokens computed here
    edge_s: list[float] = field(default_factory=list)  # seconds of context compute here


def run(loaded: LoadedModel, *, count: int = 6, tokens: int = 1000, parts: int = 3, continuation: int = 128,
        links: tuple[int, ...] = LINKS, codec: str = "balanced", max_new_tokens: int = 24, serve: str | None = None,
        work: Path | None = None, repeats: int = 3, progress: Progress | None = None) -> dict:
    """Every task in every mode; with `serve` (the model as the command line takes it) and a `work`
    folder, the first task as whole commands (`_commands`) and the warm service (`_served`) too."""
    tokenizer = loaded.tokenizer
    found = compose_tasks(tokenizer, count, tokens, parts, continuation)
    if not found:
        raise UsageError(f"no standard-library package has {parts} modules of {tokens + continuation} tokens")
    spec = parse_codec(codec)
    codebook = codec_codebook(spec, loaded)
    framing = prompting.default_framing(tokenizer)
    opening, separator = opening_ids(tokenizer, framing), separator_ids(tokenizer)
    links = tuple(sorted(set(links) | {DEFAULT_LINK}))
    modes = {"none": Mode("no context"), "last": Mode("last part alone (one artifact)"),
             "edge": Mode("edge-only over the concatenation"),
             "concat": Mode(f"one artifact of the concatenation ({spec.spec}, the ceiling)"),
             **{f"link{n}": Mode(f"composed, {n} link tokens" + (" (the default)" if n == DEFAULT_LINK else "")) for n in links},
             "floor": Mode("composed, every part after the first recomputed (the floor)")}
    sampling = Sampling(max_new_tokens=max_new_tokens)
    kept: list[list[Artifact]] = []
    first: tuple | None = None  # the first task's artifacts and texts, for the timed commands
    for index, task in enumerate(found):
        if progress:
            progress("compose (tasks)", index, len(found))
        part_ids = [prompting.context_ids(tokenizer, text, framing) for text in task.parts]
        joined = joined_ids(part_ids, opening, separator)
        follows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in task.continuations]
        shipped = [_shipped(loaded, ids, framing, spec, codebook) for ids in part_ids]
        concat = _shipped(loaded, joined, framing, spec, codebook)
        builders = {
            "none": lambda: context_from_ids(loaded, opening or joined[:1], framing=framing),
            "last": lambda: context_from_artifact(loaded, MemoryReader(shipped[-1]), pipeline=False),
            "edge": lambda: context_from_ids(loaded, joined, framing=framing),
            "concat": lambda: context_from_artifact(loaded, MemoryReader(concat), pipeline=False),
            **{f"link{n}": (lambda n=n: context_from_readers(loaded, [MemoryReader(a) for a in shipped], link_tokens=n))
               for n in links},
            "floor": lambda: context_from_readers(loaded, [MemoryReader(a) for a in shipped], link_tokens=EVERYTHING),
        }
        for key, build in builders.items():
            _measure(loaded, modes[key], build, task, follows, sampling, len(joined) if key == "edge" else None)
        kept.append(shipped)
        first = first or (task, shipped, concat)
    if progress:
        progress("compose (tasks)", len(found), len(found))
    result = _result(loaded, found, modes, spec.spec, tokens, continuation, parts)
    if serve is not None and work is not None:
        result["commands"] = _commands(serve, loaded.engine.name, *first, work, repeats, progress)
        if loaded.engine.name == "llama.cpp":  # the service runs on llama.cpp only: its times next to the same engine's
            result["served"] = _served(serve, found, kept, work, max_new_tokens, _median(modes["edge"].ttft_s), progress)
    return result


def _commands(spec: str, engine: str, task: ComposeTask, shipped: list[Artifact], concat: Artifact, work: Path,
              repeats: int, progress: Progress | None) -> dict:
    """The first task as a user runs it, whole processes from spawn to the first byte on stdout (the first
    token, streamed) and to exit, repetitions interleaved: `decode --kv` of every part (composed, the
    default link tokens), `decode --kv` of the concatenation's artifact, `decode --context` of the
    concatenated text (edge-only)."""
    folder = work / "compose-commands"
    paths = [folder / f"part{number}.kv" for number in range(len(shipped))]
    for path, artifact in zip(paths, [*shipped]):
        write_dir(artifact, path, force=True)
    write_dir(concat, folder / "concatenated.kv", force=True)
    (folder / "concatenated.txt").write_text(prompting.SEPARATOR.join(task.parts))
    question = task.questions[0].prompt if task.questions else "What does this code do?"
    common = [*CLI, "decode", "-m", spec, "--engine", engine, "-p", question, "-n", "8"]
    commands = {"composed": [*common, *[a for p in paths for a in ("--kv", str(p))]],
                "concatenated": [*common, "--kv", str(folder / "concatenated.kv")],
                "edge-only": [*common, "--context", str(folder / "concatenated.txt")]}
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    runs: dict[str, list] = {key: [] for key in commands}
    for repeat in range(repeats):
        if progress:
            progress("compose (commands)", repeat, repeats)
        for key, command in commands.items():
            runs[key].append(timed(command, env, lambda stderr, stdout: (0, None, stdout), folder))
    first_byte = {key: round(_median([r.first_byte_s for r in values]), 4) for key, values in runs.items()}
    return {"first_byte_s": first_byte, "total_s": {key: round(_median([r.total_s for r in v]), 4) for key, v in runs.items()},
            "repeats": repeats, "commands": {key: " ".join(["celslm", *c[len(CLI):]]) for key, c in commands.items()},
            "composed_vs_concatenated": round(first_byte["composed"] / first_byte["concatenated"], 3),
            "composed_sooner_than_edge_only": round(first_byte["edge-only"] / first_byte["composed"], 2)}


def _served(spec: str, found: list[ComposeTask], kept: list[list[Artifact]], work: Path, max_new_tokens: int,
            edge_ttft_s: float, progress: Progress | None) -> dict:
    """`celslm serve` on loopback over the tasks' part artifacts: each part asked alone first (fetched,
    decoded, kept in memory), then the parts together, a combination it has not seen (composed of parts
    it holds: only the link tokens and the rotation), then that combination again. Times are a
    streaming client's, from its send to the first token's event."""
    folder = work / "compose-artifacts"
    names = []
    for index, parts in enumerate(kept):
        names.append([f"task{index}-part{number}.kv" for number in range(len(parts))])
        for name, artifact in zip(names[-1], parts):
            write_dir(artifact, folder / name, force=True)
    port = free_port()
    rows = {"alone": [], "composed": [], "again": []}
    with Service([*CLI, "serve", "-m", spec, "--port", str(port), "--context-dir", str(folder)], port, "celslm serve",
                 log=work / "compose-serve.log", timeout_s=300) as service:
        for index, (task, parts) in enumerate(zip(found, names)):
            if progress:
                progress("compose (served)", index, len(found))
            question = task.questions[0].prompt if task.questions else "What does this code do?"
            for name in parts:
                rows["alone"].append(_first_token(service.url, name, question, max_new_tokens, "fetched"))
            rows["composed"].append(_first_token(service.url, parts, question, max_new_tokens, "composed"))
            rows["again"].append(_first_token(service.url, parts, question, max_new_tokens, ("resident", "memory")))
    medians = {key: round(_median(values), 4) for key, values in rows.items()}
    return {"ttft_s": medians, "requests": {key: len(values) for key, values in rows.items()},
            "edge_only_ttft_s": round(edge_ttft_s, 4),
            "composed_sooner_than_edge_only": round(edge_ttft_s / medians["composed"], 2)}


def _first_token(url: str, context, question: str, max_new_tokens: int, expected) -> float:
    """Seconds from sending a streamed chat request to its first event (sent once the first token is
    out); the service must say the context came from where `expected` says (a wrong cache would time
    something else)."""
    body = {"context": context, "messages": [{"role": "user", "content": question}], "max_tokens": max_new_tokens,
            "temperature": 0, "stream": True}
    request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    sent, first, source = time.perf_counter(), None, None
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise CelslmError(f"celslm serve: {event['error'].get('message')}")
            if first is None:  # the service opens the stream once the first token is out
                first = time.perf_counter() - sent
            source = (event.get("celslm") or {}).get("cache", source)
    if first is None or source not in ((expected,) if isinstance(expected, str) else expected):
        raise CelslmError(f"celslm serve answered {context!r} from {source!r} (expected {expected!r}) "
                          f"{'with no token' if first is None else ''}")
    return first


def _shipped(loaded: LoadedModel, ids: list[int], framing: str, spec, codebook) -> Artifact:
    """What the cloud publishes for `ids`: the same model's KV, through the codec."""
    begun = time.perf_counter()
    sequence = loaded.engine.sequence()
    loaded.engine.prefill(sequence, ids)
    layers = loaded.engine.context_layers(sequence)
    return build_artifact(space=loaded.space, producer=Producer.native(loaded.space), token_ids=ids, layers=layers,
                          chunk_size=256, dtype="float32", framing=framing, provenance=["native"] * len(layers),
                          timings=Timings(prefill_s=round(time.perf_counter() - begun, 6)), codec=spec, codebook=codebook)


def _measure(loaded: LoadedModel, mode: Mode, build: Callable[[], Context], task: ComposeTask, follows: list[list[int]],
             sampling: Sampling, edge_tokens: int | None) -> None:
    """One mode on one task: the first question's time to first token from a context built now, then
    every question's answer and the continuations' mean NLL over copies of that context."""
    context = build()
    again = _copies(loaded, context)
    stats = context.stats
    mode.edge_tokens.append(stats.recomputed_tokens if edge_tokens is None else edge_tokens)
    mode.edge_s.append(stats.context_prefill_s)
    answers = []
    for number, question in enumerate(task.questions):
        current = context if number == 0 else again()
        ids = prompting.prompt_ids(loaded.tokenizer, question.prompt, current.framing, raw=False)
        answers.append(loaded.tokenizer.decode(list(generate(loaded, current, ids, sampling)), skip_special_tokens=True))
        if number == 0:
            mode.ttft_s.append(current.stats.ttft_s)
    if not task.questions:  # the time to first token all the same, for a question nobody scores
        ids = prompting.prompt_ids(loaded.tokenizer, "What does this code do?", context.framing, raw=False)
        next(generate(loaded, context, ids, sampling))
        mode.ttft_s.append(context.stats.ttft_s)
    mode.correct += [task_scores.score(q, a)["correct"] for q, a in zip(task.questions, answers)]
    mode.nll.append(_mean([mean_nll(*continuation_logits(loaded, again(), follow)) for follow in follows]))


def _copies(loaded: LoadedModel, context: Context) -> Callable[[], Context]:
    """Fresh copies of a built context (the first one is consumed by its question)."""
    engine = loaded.engine
    if hasattr(engine, "snapshot"):  # llama.cpp: its state bytes, restored in milliseconds
        data, length = engine.snapshot(context.sequence), context.sequence.length
        return lambda: Context(context.token_ids, engine.restore(data, length), context.framing)
    layers = [tuple(np.asarray(x) for x in layer) for layer in engine.context_layers(context.sequence)]
    return lambda: context_from_layers(loaded, context.token_ids, layers, context.framing)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def _result(loaded: LoadedModel, found: list[ComposeTask], modes: dict[str, Mode], codec: str, tokens: int,
            continuation: int, parts: int) -> dict:
    none, ceiling = _mean(modes["none"].nll), _mean(modes["concat"].nll)
    edge_ttft = _median(modes["edge"].ttft_s)
    concat_ttft = _median(modes["concat"].ttft_s)
    rows = []
    for key, mode in modes.items():
        nll, ttft = _mean(mode.nll), _median(mode.ttft_s)
        rows.append({"mode": mode.name, "key": key, "nll": round(nll, 5), "ppl": round(math.exp(nll), 4),
                     "gain_kept": round((none - nll) / (none - ceiling), 4) if none != ceiling else None,
                     "qa_correct": round(_mean(mode.correct), 4) if mode.correct else None, "questions": len(mode.correct),
                     "ttft_s": round(ttft, 4), "ttft_vs_concatenated": round(ttft / concat_ttft, 3),
                     "sooner_than_edge_only": round(edge_ttft / ttft, 2),
                     "edge_tokens": round(_mean(mode.edge_tokens), 1), "edge_s": round(_mean(mode.edge_s), 4)})
    return {"model": loaded.name, "engine": loaded.engine.name, "codec": codec, "default_link_tokens": DEFAULT_LINK,
            "tasks": [{"package": t.package, "files": t.files, "questions": len(t.questions)} for t in found],
            "parts": parts, "part_tokens": tokens, "continuation_tokens": continuation, "rows": rows}


def render(result: dict) -> list:
    table = Table(title=f"bench compose: {len(result['tasks'])} tasks of {result['parts']} parts x ~{result['part_tokens']} "
                        f"tokens, {result['model']} on {result['engine']} (times in this process, no fetch)")
    for column in ("mode", "NLL", "gain kept", "QA correct", "TTFT s", "vs concatenated", "sooner than edge-only",
                   "edge tokens", "edge s"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for row in result["rows"]:
        gain = "n/a" if row["gain_kept"] is None else f"{row['gain_kept']:.1%}"
        correct = f"{row['qa_correct']:.0%} of {row['questions']}" if row["questions"] else "n/a"
        table.add_row(row["mode"], f"{row['nll']:.4f}", gain, correct,
                      f"{row['ttft_s']:.3f}", f"x{row['ttft_vs_concatenated']:.2f}", f"{row['sooner_than_edge_only']:.1f}x",
                      f"{row['edge_tokens']:.0f}", f"{row['edge_s']:.3f}")
    packages = ", ".join(f"{t['package']} ({', '.join(Path(f).name for f in t['files'])})" for t in result["tasks"])
    lines = [table, f"tasks: {packages}"]
    commands = result.get("commands")
    if commands:
        first, total = commands["first_byte_s"], commands["total_s"]
        lines.append(f"whole commands, the first task (median of {commands['repeats']}, interleaved; first byte / exit, s): "
                     + "; ".join(f"{key} {first[key]:.2f} / {total[key]:.2f}" for key in first)
                     + f": composed x{commands['composed_vs_concatenated']:.2f} the concatenated artifact's first byte, "
                       f"{commands['composed_sooner_than_edge_only']:.1f}x sooner than edge-only")
    served = result.get("served")
    if served:
        ttft = served["ttft_s"]
        lines.append(f"celslm serve, a streaming client's first token (median): each part alone, fetched {ttft['alone']:.3f} s; "
                     f"the parts together, a new combination composed of parts it holds {ttft['composed']:.3f} s; "
                     f"that combination again {ttft['again']:.3f} s; edge-only over the concatenation (this process) "
                     f"{served['edge_only_ttft_s']:.3f} s: composed {served['composed_sooner_than_edge_only']:.1f}x sooner")
    return lines
