"""Time to first token and total time, edge-only vs artifact (with and without pipelining), over
emulated links, for several context lengths and two codecs: the T_total split of each run.

The edge-only run also yields the context's KV that the artifacts are cut from (one prefill per
length, as the cloud would do it). Every artifact run streams the artifact's bytes through an
in-process emulated link (bandwidth + RTT); every figure from it is labelled emulated.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass
from typing import Callable

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


def plot(result: dict, path: str) -> None:
    """Time to first token vs link rate, one panel per context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
