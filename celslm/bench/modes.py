"""Ways to split one request between a cloud LLM and an edge SLM, run on the same task and link.

Everything runs in this process; compute is measured, the link is emulated: each transfer costs
RTT/2 + bytes / rate one way (a request and its reply: one RTT), and every figure that includes it is
labelled emulated. The shared context is prepared in the cloud ahead of requests (its prefill, an
artifact, a sketch) and reported as `cloud_prep_s`; per-request work is what the figures compare.

  edge-only   the SLM prefills the context and decodes (nothing on the link)
  cloud-only  the prompt goes up, the LLM (holding the context's cache) decodes, tokens come back
              one message each (not private)
  ce-collm    early-exit deferral (arXiv 2411.02829): the SLM (own prefill) decodes; a token whose
              top probability is below the threshold is made by the LLM, which holds the context: the
              tokens it has not seen go up (the prompt included: not private), one token comes back
  pice        sketch-and-expand (arXiv 2501.09367): the LLM wrote a short sketch of the context ahead
              of time; the sketch comes down, the SLM expands it with the private prompt
  ce-lslm     the SLM's KV artifact (codec applied) comes down and the SLM decodes (private)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from celslm import kvcache, prompting
from celslm.artifact import MemoryReader, recode
from celslm.codecs import parse_codec
from celslm.decode import Sampling, context_from_artifact, context_from_ids, eos_ids, generate
from celslm.models import LoadedModel
from celslm.prefill import prefill
from celslm.stream import Link

MODES = ("edge-only", "cloud-only", "ce-collm", "pice", "ce-lslm")
TOKEN_MESSAGE_BYTES = 16  # one streamed token id with its framing


@dataclass
class Outcome:
    mode: str
    text: str = ""
    private: bool = True  # the prompt never left the edge
    ttft_s: float = 0.0  # includes emulated link time
    total_s: float = 0.0  # includes emulated link time
    t_com_c_s: float = 0.0  # cloud compute per request
    t_comm_s: float = 0.0  # emulated link time
    t_com_e_s: float = 0.0  # edge compute
    cloud_prep_s: float = 0.0  # per context, ahead of requests
    bytes_up: int = 0
    bytes_down: int = 0
    prompt_bytes_sent: int = 0
    edge_token_share: float = 1.0
    notes: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


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


def edge_only(slm: LoadedModel, context: str, prompt: str, sampling: Sampling, raw: bool) -> Outcome:
    framing = "raw" if raw else prompting.default_framing(slm.tokenizer)
    started = time.perf_counter()
    ctx = context_from_ids(slm, prompting.context_ids(slm.tokenizer, context, framing), framing=framing)
    prefill_s = time.perf_counter() - started
    tokens, first, total = _decode(slm, ctx, prompting.prompt_ids(slm.tokenizer, prompt, framing, raw), sampling)
    return Outcome("edge-only", _text(slm, tokens), ttft_s=prefill_s + first, total_s=prefill_s + total,
                   t_com_e_s=prefill_s + total)


def cloud_only(llm: LoadedModel, context: str, prompt: str, sampling: Sampling, raw: bool, link: Link) -> Outcome:
    framing = "raw" if raw else prompting.default_framing(llm.tokenizer)
    started = time.perf_counter()
    ctx = context_from_ids(llm, prompting.context_ids(llm.tokenizer, context, framing), framing=framing)
    prep_s = time.perf_counter() - started
    up = len(prompt.encode())
    tokens, first, total = _decode(llm, ctx, prompting.prompt_ids(llm.tokenizer, prompt, framing, raw), sampling)
    up_s, token_s = one_way_s(link, up), one_way_s(link, TOKEN_MESSAGE_BYTES)
    # tokens stream back behind generation: the last arrives one one-way trip after it was made
    return Outcome("cloud-only", _text(llm, tokens), private=False, ttft_s=up_s + first + token_s,
                   total_s=up_s + total + token_s, t_com_c_s=total, t_comm_s=up_s + token_s, cloud_prep_s=prep_s,
                   bytes_up=up, bytes_down=TOKEN_MESSAGE_BYTES * len(tokens), prompt_bytes_sent=up,
                   edge_token_share=0.0)


def ce_lslm(slm: LoadedModel, context: str, prompt: str, sampling: Sampling, raw: bool, link: Link,
            codec: str = "balanced") -> Outcome:
    framing = "raw" if raw else prompting.default_framing(slm.tokenizer)
    started = time.perf_counter()
    artifact = prefill(slm, prompting.context_ids(slm.tokenizer, context, framing), framing=framing)
    artifact = recode(MemoryReader(artifact), parse_codec(codec))
    prep_s = time.perf_counter() - started
    down = artifact.manifest.blob_bytes()
    comm_s = link.rtt_s + down * 8 / link.rate_bps  # request up, artifact down
    started = time.perf_counter()
    ctx = context_from_artifact(slm, MemoryReader(artifact))
    load_s = time.perf_counter() - started
    tokens, first, total = _decode(slm, ctx, prompting.prompt_ids(slm.tokenizer, prompt, framing, raw), sampling)
    return Outcome("ce-lslm", _text(slm, tokens), ttft_s=comm_s + load_s + first, total_s=comm_s + load_s + total,
                   t_comm_s=comm_s, t_com_e_s=load_s + total, cloud_prep_s=prep_s, bytes_down=down,
                   notes={"codec": artifact.manifest.codec, "pipelined": False})


def pice(llm: LoadedModel, slm: LoadedModel, context: str, prompt: str, sampling: Sampling, raw: bool, link: Link,
         sketch_tokens: int = 96) -> Outcome:
    framing = prompting.default_framing(llm.tokenizer)
    started = time.perf_counter()
    ctx = context_from_ids(llm, prompting.context_ids(llm.tokenizer, context, framing), framing=framing)
    ask = "Write a dense sketch of the text above: its key names, definitions and facts, as short notes."
    sketch_ids, _, _ = _decode(llm, ctx, prompting.prompt_ids(llm.tokenizer, ask, framing, False),
                               Sampling(max_new_tokens=sketch_tokens))
    sketch = _text(llm, sketch_ids)
    prep_s = time.perf_counter() - started
    down = len(sketch.encode())
    comm_s = link.rtt_s + down * 8 / link.rate_bps
    outcome = edge_only(slm, sketch, prompt, sampling, raw)
    return Outcome("pice", outcome.text, ttft_s=comm_s + outcome.ttft_s, total_s=comm_s + outcome.total_s,
                   t_comm_s=comm_s, t_com_e_s=outcome.t_com_e_s, cloud_prep_s=prep_s, bytes_down=down,
                   notes={"sketch_tokens": len(sketch_ids)})


@torch.inference_mode()
def ce_collm(llm: LoadedModel, slm: LoadedModel, context: str, prompt: str, sampling: Sampling, raw: bool,
             link: Link, threshold: float = 0.5) -> Outcome:
    """Greedy: the SLM's token when its top probability reaches `threshold`, else the LLM's."""
    framing = "raw" if raw else prompting.default_framing(slm.tokenizer)
    context_ids = prompting.context_ids(slm.tokenizer, context, framing)
    started = time.perf_counter()
    cloud = context_from_ids(llm, context_ids, framing=framing)
    prep_s = time.perf_counter() - started
    started = time.perf_counter()
    edge = context_from_ids(slm, context_ids, framing=framing)
    edge_s = time.perf_counter() - started
    pending = prompting.prompt_ids(slm.tokenizer, prompt, framing, raw)
    edge_position = cloud_position = len(context_ids)
    unseen = list(pending)  # tokens the cloud has not processed yet
    cloud_s = comm_s = 0.0
    ttft = None
    up = prompt_up = 0
    tokens, deferred = [], 0
    stop = eos_ids(slm)
    clock = time.perf_counter()
    for _ in range(sampling.max_new_tokens):
        logits = kvcache.forward(slm.model, pending, edge.cache, edge_position)[-1]
        edge_position += len(pending)
        probs = torch.softmax(logits, -1)
        token = int(probs.argmax())
        if probs[token] < threshold:  # defer: send what the cloud has not seen, get its token back
            sent = len(_text(slm, unseen).encode()) + 8
            up += sent
            prompt_up = prompt_up or sent  # the first message up carries the private prompt
            begun = time.perf_counter()
            cloud_logits = kvcache.forward(llm.model, unseen, cloud.cache, cloud_position)[-1]
            cloud_s += time.perf_counter() - begun
            cloud_position += len(unseen)
            token = int(cloud_logits.argmax())
            comm_s += one_way_s(link, sent) + one_way_s(link, TOKEN_MESSAGE_BYTES)
            deferred += 1
            unseen = [token]
        else:
            unseen.append(token)
        tokens.append(token)
        ttft = ttft if ttft is not None else edge_s + (time.perf_counter() - clock) + comm_s
        pending = [token]
        if token in stop:
            break
    total = edge_s + (time.perf_counter() - clock) + comm_s
    return Outcome("ce-collm", _text(slm, tokens), private=deferred == 0, ttft_s=ttft or 0.0, total_s=total,
                   t_com_c_s=cloud_s, t_comm_s=comm_s, t_com_e_s=total - comm_s - cloud_s, cloud_prep_s=prep_s,
                   bytes_up=up, bytes_down=TOKEN_MESSAGE_BYTES * deferred, prompt_bytes_sent=prompt_up,
                   edge_token_share=1 - deferred / max(len(tokens), 1), notes={"threshold": threshold})

