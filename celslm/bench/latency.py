"""Time to first token and total time, edge-only vs artifact (with and without pipelining), over
emulated links, for several context lengths and two codecs: the T_total split of each run.

The edge-only run also yields the context's KV that the artifacts are cut from (one prefill per
length, as the cloud would do it). Every artifact run streams the artifact's bytes through an
in-process emulated link (bandwidth + RTT); every figure from it is labelled emulated.
"""

from __future__ import annotations

import itertools
import re
import time
from dataclasses import asdict, dataclass
from typing import Callable

from rich.table import Table

from celslm import prompting
from celslm.artifact import MemoryReader
from celslm.manifest import Producer, Timings
from celslm.blocks import build_artifact
from celslm.bench.ttft import stdlib_context
from celslm.calibrate import codec_codebook
from celslm.codecs import parse_codec
from celslm.decode import DecodeStats, Sampling, context_from_artifact, context_from_ids, generate
from celslm.models import LoadedModel
from celslm.stream import Link

PROMPT = "What does this code do? Answer briefly."


@dataclass(frozen=True)
class Run:
    context_tokens: int
    mode: str  # "edge-only", "artifact", "artifact+pipeline"
    codec: str | None
    link: str | None
    artifact_bytes: int
    ttft_s: float
    total_s: float
    new_tokens: int
    t_com_c_s: float
    t_comm_s: float
    t_com_e_s: float
    hidden_share: float


def _run(loaded: LoadedModel, context, prompt_ids: list[int], new_tokens: int, mode: str, codec, link, size) -> Run:
    tokens = list(generate(loaded, context, prompt_ids, Sampling(max_new_tokens=new_tokens)))
    s: DecodeStats = context.stats
    return Run(len(context.token_ids), mode, codec, link.label if link else None, size, s.ttft_s, s.total_s,
               len(tokens), s.t_com_c_s, s.t_comm_s, s.t_com_e_s, s.hidden_share)


def run(loaded: LoadedModel, contexts=(512, 1024, 2048, 4096), links=("10mbit:20ms", "50mbit:20ms", "100mbit:20ms", "1gbit:5ms"),
        codecs=("fp16", "balanced"), new_tokens: int = 64, progress: Callable[[str], None] | None = None,
        llama: LoadedModel | None = None) -> dict:
    """`llama`, the same model on the llama.cpp engine, adds the baseline an edge user has without celslm:
    llama.cpp prefilling the context itself ("edge-only (llama.cpp)")."""
    runs: list[Run] = []
    for length in contexts:
        framing = prompting.default_framing(loaded.tokenizer)
        token_ids = prompting.context_ids(loaded.tokenizer, stdlib_context(loaded.tokenizer, length), framing)[:length]
        prompt_ids = prompting.prompt_ids(loaded.tokenizer, PROMPT, framing, raw=False)
        if progress:
            progress(f"{length} tokens: edge-only")
        edge = context_from_ids(loaded, token_ids, framing=framing)
        cloud_started = time.perf_counter()
        layers = loaded.engine.context_layers(edge.sequence)  # the cloud's KV: the same prefill, before the prompt
        prefill_s = edge.stats.context_prefill_s + (time.perf_counter() - cloud_started)
        runs.append(_run(loaded, edge, prompt_ids, new_tokens, "edge-only", None, None, 0))
        if llama is not None:
            if progress:
                progress(f"{length} tokens: edge-only on llama.cpp")
            baseline = context_from_ids(llama, token_ids, framing=framing)
            runs.append(_run(llama, baseline, prompt_ids, new_tokens, "edge-only (llama.cpp)", None, None, 0))
        for spec in codecs:
            codec = parse_codec(spec)
            encode_started = time.perf_counter()
            artifact = build_artifact(space=loaded.space, producer=Producer.native(loaded.space),
                                      token_ids=token_ids, layers=layers, chunk_size=256, dtype="float32",
                                      framing=framing, provenance=["native"] * len(layers), codec=codec,
                                      codebook=codec_codebook(codec, loaded))
            artifact.timings = Timings(prefill_s=prefill_s, compress_s=time.perf_counter() - encode_started)
            size = artifact.manifest.blob_bytes()
            for link_spec, pipeline in itertools.product(links, (False, True)):
                link = Link.parse(link_spec)
                mode = "artifact+pipeline" if pipeline else "artifact"
                if progress:
                    progress(f"{length} tokens: {mode}, {spec}, {link.label}")
                context = context_from_artifact(loaded, MemoryReader(artifact), link=link, pipeline=pipeline)
                runs.append(_run(loaded, context, prompt_ids, new_tokens, mode, spec, link, size))
    return {"model": loaded.name, "prompt": PROMPT, "new_tokens": new_tokens, "runs": [asdict(r) for r in runs],
            "note": "artifact transfers go through an in-process emulated link (bandwidth + RTT), labelled per run"}


def render(result: dict) -> list:
    """The table `bench latency` prints."""
    table = Table("ctx", "mode", "codec", "link", "MiB", "TTFT", "total", "T_com_C", "T_comm", "T_com_E", "hidden",
                  "speedup", caption="seconds; link = emulated rate / RTT; speedup = edge-only TTFT / TTFT",
                  title=f"{result['model']}: time to first token and total for {result['new_tokens']} tokens "
                        "(links emulated in-process)")
    edge = {r["context_tokens"]: r["ttft_s"] for r in result["runs"] if r["mode"] == "edge-only"}
    for r in result["runs"]:
        link = re.sub(r"emulated (\S+) Mbit/s, (\S+) ms RTT", r"\1M/\2ms", r["link"] or "-")
        table.add_row(str(r["context_tokens"]), r["mode"].replace("artifact+pipeline", "pipelined"), r["codec"] or "-", link,
                      f"{r['artifact_bytes'] / 2**20:.1f}", f"{r['ttft_s']:.2f}", f"{r['total_s']:.2f}",
                      f"{r['t_com_c_s']:.2f}", f"{r['t_comm_s']:.2f}", f"{r['t_com_e_s']:.2f}",
                      f"{r['hidden_share']:.0%}" if not r["mode"].startswith("edge-only") else "-",
                      f"{edge[r['context_tokens']] / r['ttft_s']:.1f}x")
    return [table]
