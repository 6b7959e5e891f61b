"""Ways to split one request between a cloud LLM and an edge SLM, run on the same task and link.

Everything runs in this process; compute is measured, the link is emulated. Each mode records the
one-way messages on its critical path (bytes each); `Outcome.on(link)` prices them at RTT/2 + bytes /
rate apiece, so one run is priced on every link, and every figure that includes them is labelled
emulated. The pipelined mode overlaps transfer and compute, so it is measured live through each link
instead (`celslm.stream.Link` paces the bytes in real time). The shared context is prepared in the
cloud ahead of requests (its prefill, an artifact, a sketch) and reported as `cloud_prep_s`;
per-request work is what the figures compare.

  edge-only          the SLM prefills the context and decodes (nothing on the link)
  edge-only-llama.cpp  the same on llama.cpp running the SLM's GGUF (when it has one): what an edge
                     user runs without celslm
  cloud-only         the prompt goes up, the LLM (holding the context's cache) decodes, tokens come
                     back one message each (not private)
  ce-collm           early-exit deferral (arXiv 2411.02829): the SLM (own prefill) decodes; a token
                     whose top probability is below the threshold is made by the LLM, which holds the
                     context: the tokens it has not seen go up (the prompt included: not private), one
                     token comes back
  pice               sketch-and-expand (arXiv 2501.09367): the LLM wrote a short sketch of the context
                     ahead of time; the sketch comes down, the SLM expands it with the private prompt
  ce-lslm            the SLM's own KV artifact (codec applied) comes down whole, then the SLM decodes
  ce-lslm-pipelined  the same artifact, the prompt's layer l running as soon as layer l has arrived
  ce-lslm-cross      an artifact the LLM computed, projected into the SLM's space by an alignment
  ce-lslm-hybrid     token split: the cross artifact's older chunks come down and the SLM prefills the
                     rest of the context (its most recent tokens) itself over them

With an `answer` (code completion), each mode also scores the real continuation teacher-forced: the
mean NLL of the answer's tokens after the context and prompt, under the model(s) that would produce
them (CE-CoLLM: the SLM where its confidence reaches the threshold, else the LLM).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from celslm import prompting
from celslm.artifact import MemoryReader
from celslm.blocks import recode
from celslm.calibrate import codec_codebook
from celslm.codecs import parse_codec
from celslm.decode import Context, Sampling, context_from_ids, eos_ids, generate
from celslm.edge import context_from_reader, kept_chunks
from celslm.models import LoadedModel
from celslm.prefill import prefill, prefill_cross
from celslm.projection import Alignment
from celslm.score import continuation_logits, nll as mean_nll
from celslm.stream import Link

LLAMA_EDGE = "edge-only-llama.cpp"  # the baseline an edge user has without celslm: llama.cpp prefilling itself
MODES = ("edge-only", LLAMA_EDGE, "cloud-only", "ce-collm", "pice", "ce-lslm", "ce-lslm-pipelined", "ce-lslm-cross",
         "ce-lslm-hybrid")
CROSS_MODES = ("ce-lslm-cross", "ce-lslm-hybrid")  # need an alignment
TOKEN_MESSAGE_BYTES = 16  # one streamed token id with its framing
SPLIT_CHUNK = 64  # tokens per chunk of a hybrid's artifact: the granularity of the token split


@dataclass
class Outcome:
    mode: str
    text: str = ""
    private: bool = True  # the prompt never left the edge
    compute_first_s: float = 0.0  # compute on the critical path to the first token (cloud + edge)
    compute_s: float = 0.0  # compute on the critical path to the last token
    messages_first: list[int] = field(default_factory=list)  # one-way messages (bytes) before the first token
    messages: list[int] = field(default_factory=list)  # every one-way message on the critical path
    t_com_c_s: float = 0.0  # cloud compute per request
    t_com_e_s: float = 0.0  # edge compute
    cloud_prep_s: float = 0.0  # per context, ahead of requests
    bytes_up: int = 0
    bytes_down: int = 0
    prompt_bytes_sent: int = 0
    edge_token_share: float = 1.0
    nll: float | None = None  # mean NLL of the real continuation (completion tasks)
    links: dict = field(default_factory=dict)  # link label -> {ttft_s, total_s, t_comm_s}; measured live if set
    notes: dict = field(default_factory=dict)

    def on(self, link: Link) -> dict:
        """Time to first token, total time and link time on `link` (emulated)."""
        if link.label in self.links:
            return self.links[link.label]
        if self.notes.get("measured_live"):
            raise ValueError(f"{self.mode} was measured live and not on {link.label}")
        first = sum(one_way_s(link, n) for n in self.messages_first)
        comm = sum(one_way_s(link, n) for n in self.messages)
        return {"ttft_s": self.compute_first_s + first, "total_s": self.compute_s + comm, "t_comm_s": comm}

    def to_json(self, links: list[Link]) -> dict:
        data = asdict(self)
        data["links"] = {link.label: {k: round(v, 4) for k, v in self.on(link).items()} for link in links}
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in data.items()}


def one_way_s(link: Link, nbytes: int) -> float:
    return link.rtt_s / 2 + nbytes * 8 / link.rate_bps


def _decode(loaded: LoadedModel, ctx, prompt_ids: list[int], sampling: Sampling) -> tuple[list[int], float, float]:
    """(tokens, seconds to the first token, seconds in all) of generating over a ready context."""
    started = time.perf_counter()
    tokens, first = [], None
    for token in generate(loaded, ctx, prompt_ids, sampling):
        tokens.append(token)
        first = first or time.perf_counter() - started
    return tokens, first or 0.0, time.perf_counter() - started


def _text(loaded: LoadedModel, tokens: list[int]) -> str:
    return loaded.tokenizer.decode(tokens, skip_special_tokens=True)


@torch.inference_mode()
def answer_logits(loaded: LoadedModel, ctx: Context, prompt_ids: list[int], answer_ids: list[int]) -> np.ndarray:
    """Logits `[A, V]` predicting each answer token after the context and the prompt (the cache is
    cropped back to the context first, so this may follow a generation over the same context)."""
    loaded.engine.crop(ctx.sequence, len(ctx.token_ids))
    logits, _ = continuation_logits(loaded, ctx, prompt_ids + answer_ids)
    return logits[-len(answer_ids):]


def _nll(logits: np.ndarray, answer_ids: list[int]) -> float:
    return mean_nll(logits, answer_ids)


def _answer_ids(loaded: LoadedModel, answer: str | None) -> list[int]:
    return loaded.tokenizer.encode(answer, add_special_tokens=False) if answer else []


def _scored(loaded: LoadedModel, ctx: Context, prompt_ids: list[int], answer: str | None) -> float | None:
    ids = _answer_ids(loaded, answer)
    return _nll(answer_logits(loaded, ctx, prompt_ids, ids), ids) if ids else None


def _prefilled(loaded: LoadedModel, context: str, framing: str) -> tuple[Context, float]:
    """(context, seconds): the model's own prefill of `context`."""
    started = time.perf_counter()
    ctx = context_from_ids(loaded, prompting.context_ids(loaded.tokenizer, context, framing), framing=framing)
    return ctx, time.perf_counter() - started


def edge_only(slm: LoadedModel, context: str, prompt: str, sampling: Sampling, raw: bool,
              answer: str | None = None, name: str = "edge-only") -> Outcome:
    framing = "raw" if raw else prompting.default_framing(slm.tokenizer)
    ctx, prefill_s = _prefilled(slm, context, framing)
    prompt_ids = prompting.prompt_ids(slm.tokenizer, prompt, framing, raw)
    tokens, first, total = _decode(slm, ctx, prompt_ids, sampling)
    return Outcome(name, _text(slm, tokens), compute_first_s=prefill_s + first, compute_s=prefill_s + total,
                   t_com_e_s=prefill_s + total, nll=_scored(slm, ctx, prompt_ids, answer))


def cloud_only(llm: LoadedModel, context: str, prompt: str, sampling: Sampling, raw: bool,
               answer: str | None = None) -> Outcome:
    framing = "raw" if raw else prompting.default_framing(llm.tokenizer)
    ctx, prep_s = _prefilled(llm, context, framing)
    up = len(prompt.encode())
    prompt_ids = prompting.prompt_ids(llm.tokenizer, prompt, framing, raw)
    tokens, first, total = _decode(llm, ctx, prompt_ids, sampling)
    # the prompt goes up; tokens stream back behind generation: the last arrives one one-way trip after it was made
    trip = [up, TOKEN_MESSAGE_BYTES]
    return Outcome("cloud-only", _text(llm, tokens), private=False, compute_first_s=first, compute_s=total,
                   messages_first=trip, messages=trip, t_com_c_s=total, cloud_prep_s=prep_s, bytes_up=up,
                   bytes_down=TOKEN_MESSAGE_BYTES * len(tokens), prompt_bytes_sent=up, edge_token_share=0.0,
                   nll=_scored(llm, ctx, prompt_ids, answer))


def _artifact_mode(name: str, slm: LoadedModel, artifact, prep_s: float, prompt: str, sampling: Sampling, raw: bool,
                   answer: str | None, recompute_last: int = 0, notes: dict | None = None) -> Outcome:
    """The edge's side of every KV-sharing mode, as `celslm decode --kv` runs it: `artifact` comes down
    (with `recompute_last`, only its chunks before the context's last that many tokens, the rest prefilled
    here), then the SLM decodes."""
    framing = artifact.manifest.framing
    started = time.perf_counter()
    ctx = context_from_reader(slm, MemoryReader(artifact), recompute_last=recompute_last, pipeline=False)
    down = sum(ref.size for ref in artifact.manifest.blob_refs(kept_chunks(artifact.manifest, recompute_last)
                                                                if recompute_last else None))
    load_s = time.perf_counter() - started
    prompt_ids = prompting.prompt_ids(slm.tokenizer, prompt, framing, raw)
    tokens, first, total = _decode(slm, ctx, prompt_ids, sampling)
    trip = [0, down]  # the request up, the artifact down
    return Outcome(name, _text(slm, tokens), compute_first_s=load_s + first, compute_s=load_s + total,
                   messages_first=trip, messages=trip, t_com_e_s=load_s + total, cloud_prep_s=prep_s,
                   bytes_down=down, nll=_scored(slm, ctx, prompt_ids, answer),
                   notes={"codec": artifact.manifest.codec, **(notes or {})})


def native_artifact(slm: LoadedModel, context: str, raw: bool, codec: str = "balanced"):
    """(artifact, seconds): the SLM's own KV over the context, prefilled in the cloud, codec applied."""
    framing = "raw" if raw else prompting.default_framing(slm.tokenizer)
    started = time.perf_counter()
    artifact = prefill(slm, prompting.context_ids(slm.tokenizer, context, framing), framing=framing)
    return recode(MemoryReader(artifact), parse_codec(codec), codec_codebook(parse_codec(codec), slm)), \
        time.perf_counter() - started


def cross_artifact(llm: LoadedModel, slm: LoadedModel, alignment: Alignment, context: str, raw: bool,
                   codec: str = "balanced"):
    """(artifact, seconds): the SLM-space KV the LLM computed and the alignment projected, codec applied."""
    framing = "raw" if raw else prompting.default_framing(slm.tokenizer)
    started = time.perf_counter()
    artifact = prefill_cross(llm, slm, alignment, prompting.context_ids(slm.tokenizer, context, framing),
                             framing=framing, chunk_size=SPLIT_CHUNK)
    return recode(MemoryReader(artifact), parse_codec(codec), codec_codebook(parse_codec(codec), slm)), \
        time.perf_counter() - started


def ce_lslm(slm: LoadedModel, context: str, prompt: str, sampling: Sampling, raw: bool, codec: str = "balanced",
            answer: str | None = None, prepared: tuple | None = None) -> Outcome:
    """`prepared`: (artifact, seconds) from `native_artifact`, when another mode already made it."""
    artifact, prep_s = prepared or native_artifact(slm, context, raw, codec)
    return _artifact_mode("ce-lslm", slm, artifact, prep_s, prompt, sampling, raw, answer)


def ce_lslm_pipelined(slm: LoadedModel, context: str, prompt: str, sampling: Sampling, raw: bool, links: list[Link],
                      codec: str = "balanced", answer: str | None = None, prepared: tuple | None = None) -> Outcome:
    """The native artifact streamed through each link live; layer l of the prompt runs once layer l is in."""
    artifact, prep_s = prepared or native_artifact(slm, context, raw, codec)
    framing = artifact.manifest.framing
    prompt_ids = prompting.prompt_ids(slm.tokenizer, prompt, framing, raw)
    measured, text, nll, edge_s = {}, "", None, 0.0
    for index, link in enumerate(links):
        paced = Link(link.rate_bps, link.rtt_s)  # a fresh, idle link per run
        ctx = context_from_reader(slm, MemoryReader(artifact), link=paced, pipeline=True)
        tokens = list(generate(slm, ctx, prompt_ids, sampling))
        s = ctx.stats
        measured[link.label] = {"ttft_s": s.ttft_s, "total_s": s.total_s, "t_comm_s": s.t_comm_s,
                                "hidden_share": s.hidden_share}
        if index == 0:
            text, edge_s = _text(slm, tokens), s.t_com_e_s
            nll = _scored(slm, ctx, prompt_ids, answer)
    down = artifact.manifest.blob_bytes()
    return Outcome("ce-lslm-pipelined", text, t_com_e_s=edge_s, cloud_prep_s=prep_s, bytes_down=down,
                   messages_first=[0, down], messages=[0, down], nll=nll, links=measured,
                   notes={"codec": artifact.manifest.codec, "measured_live": True})


def ce_lslm_cross(llm: LoadedModel, slm: LoadedModel, alignment: Alignment, context: str, prompt: str,
                  sampling: Sampling, raw: bool, codec: str = "balanced", answer: str | None = None,
                  prepared: tuple | None = None) -> Outcome:
    """`prepared`: (artifact, seconds) from `cross_artifact`, when another mode already made it."""
    artifact, prep_s = prepared or cross_artifact(llm, slm, alignment, context, raw, codec)
    return _artifact_mode("ce-lslm-cross", slm, artifact, prep_s, prompt, sampling, raw, answer,
                          notes={"alignment": alignment.digest[:12]})


def ce_lslm_hybrid(llm: LoadedModel, slm: LoadedModel, alignment: Alignment, context: str, prompt: str,
                   sampling: Sampling, raw: bool, codec: str = "balanced", recompute_share: float = 0.5,
                   answer: str | None = None, prepared: tuple | None = None) -> Outcome:
    """Token split: the cross artifact's chunks before the context's last `recompute_share` come down; the
    SLM prefills the rest itself over them (`celslm decode --recompute-last N`)."""
    artifact, prep_s = prepared or cross_artifact(llm, slm, alignment, context, raw, codec)
    tokens = artifact.manifest.token_count
    recompute = round(tokens * recompute_share)
    kept = min(tokens, (kept_chunks(artifact.manifest, recompute) if recompute else artifact.manifest.chunks)
               * artifact.manifest.chunk_size)
    return _artifact_mode("ce-lslm-hybrid", slm, artifact, prep_s, prompt, sampling, raw, answer, recompute,
                          notes={"alignment": alignment.digest[:12], "edge_prefilled_tokens": tokens - kept,
                                 "context_tokens": tokens})


def pice(llm: LoadedModel, slm: LoadedModel, context: str, prompt: str, sampling: Sampling, raw: bool,
         sketch_tokens: int = 96, answer: str | None = None) -> Outcome:
    sketch, prep_s, made = write_sketch(llm, context, sketch_tokens)
    down = len(sketch.encode())
    outcome = edge_only(slm, sketch, prompt, sampling, raw, answer)
    trip = [0, down]
    return Outcome("pice", outcome.text, compute_first_s=outcome.compute_first_s, compute_s=outcome.compute_s,
                   messages_first=trip, messages=trip, t_com_e_s=outcome.t_com_e_s, cloud_prep_s=prep_s,
                   bytes_down=down, nll=outcome.nll, notes={"sketch_tokens": made, "sketch": sketch})


def write_sketch(llm: LoadedModel, context: str, sketch_tokens: int = 96) -> tuple[str, float, int]:
    """(sketch, seconds, tokens): the LLM's short notes on the context, written once per context."""
    started = time.perf_counter()
    framing = prompting.default_framing(llm.tokenizer)
    ctx, _ = _prefilled(llm, context, framing)
    ask = "Write a dense sketch of the text above: its key names, definitions and facts, as short notes."
    ids, _, _ = _decode(llm, ctx, prompting.prompt_ids(llm.tokenizer, ask, framing, False),
                        Sampling(max_new_tokens=sketch_tokens))
    return _text(llm, ids), time.perf_counter() - started, len(ids)


@torch.inference_mode()
def ce_collm(llm: LoadedModel, slm: LoadedModel, context: str, prompt: str, sampling: Sampling, raw: bool,
             threshold: float = 0.5, answer: str | None = None) -> Outcome:
    """Greedy: the SLM's token when its top probability reaches `threshold`, else the LLM's."""
    framing = "raw" if raw else prompting.default_framing(slm.tokenizer)
    cloud, prep_s = _prefilled(llm, context, framing)
    edge, edge_s = _prefilled(slm, context, framing)
    prompt_ids = prompting.prompt_ids(slm.tokenizer, prompt, framing, raw)
    pending = list(prompt_ids)
    unseen = list(pending)  # tokens the cloud has not processed yet
    cloud_s = 0.0
    compute_first = None
    messages, deferrals, messages_first = [], [], None
    prompt_up = 0
    tokens, deferred_at = [], []
    stop = eos_ids(slm)
    clock = time.perf_counter()
    for _ in range(sampling.max_new_tokens):
        logits = torch.from_numpy(slm.engine.evaluate(edge.sequence, pending)[-1])
        probs = torch.softmax(logits, -1)
        token = int(probs.argmax())
        deferred = probs[token] < threshold
        if deferred:  # defer: send what the cloud has not seen, get its token back
            sent = len(_text(slm, unseen).encode()) + 8
            prompt_up = prompt_up or sent  # the first message up carries the private prompt
            begun = time.perf_counter()
            cloud_logits = llm.engine.evaluate(cloud.sequence, unseen)[-1]
            cloud_s += time.perf_counter() - begun
            token = int(cloud_logits.argmax())
            messages += [sent, TOKEN_MESSAGE_BYTES]
            deferrals.append(list(unseen))
            unseen = [token]
        else:
            unseen.append(token)
        tokens.append(token)
        deferred_at.append(bool(deferred))
        if compute_first is None:
            compute_first, messages_first = edge_s + time.perf_counter() - clock, list(messages)
        pending = [token]
        if token in stop:
            break
    compute = edge_s + time.perf_counter() - clock
    nll = None
    if answer_ids := _answer_ids(slm, answer):
        small = answer_logits(slm, edge, prompt_ids, answer_ids)
        large = answer_logits(llm, cloud, prompt_ids, answer_ids)
        vocab = min(small.shape[-1], large.shape[-1])  # same tokenizer; the embedding tables may be padded differently
        small, large = torch.from_numpy(small[:, :vocab]), torch.from_numpy(large[:, :vocab])
        confident = torch.softmax(small, -1).max(-1).values >= threshold
        nll = _nll(torch.where(confident[:, None], torch.log_softmax(small, -1), torch.log_softmax(large, -1)).numpy(),
                   answer_ids)
    return Outcome("ce-collm", _text(slm, tokens), private=not deferrals, compute_first_s=compute_first or 0.0,
                   compute_s=compute, messages_first=messages_first or [], messages=messages, t_com_c_s=cloud_s,
                   t_com_e_s=compute - cloud_s, cloud_prep_s=prep_s, bytes_up=sum(messages[::2]),
                   bytes_down=TOKEN_MESSAGE_BYTES * len(deferrals), prompt_bytes_sent=prompt_up,
                   edge_token_share=1 - len(deferrals) / max(len(tokens), 1), nll=nll,
                   notes={"threshold": threshold, "deferrals": deferrals,
                          "deferred_tokens": [t for t, d in zip(tokens, deferred_at) if d]})
