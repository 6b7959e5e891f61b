"""Teacher-forced quality of a continuation after a context: mean NLL, perplexity, top-1 agreement.

Like llama.cpp's perplexity tool: every continuation token is predicted from everything before it.
The cache does not keep the context's last logits, so the last context position is dropped from the
cache and run again with the continuation; every continuation token is then scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from celslm.decode import Context
from celslm.errors import UsageError
from celslm.models import LoadedModel


@dataclass(frozen=True)
class Score:
    nll: float  # mean negative log-likelihood per token (nats)
    ppl: float
    tokens: int  # continuation tokens scored
    top1_agreement: float | None = None  # share of positions whose argmax matches the reference's


def continuation_logits(loaded: LoadedModel, context: Context | None, continuation: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits `[N, V]`, targets `[N]`): the prediction of each scored continuation token."""
    if context is None:  # no context: the first token has nothing to be predicted from
        if len(continuation) < 2:
            raise UsageError("a continuation without context needs at least 2 tokens")
        logits = loaded.engine.evaluate(loaded.engine.sequence(), continuation[:-1], logits_to_keep=len(continuation) - 1)
        return logits, torch.tensor(continuation[1:])
    if not continuation:
        raise UsageError("the continuation is empty")
    last = len(context.token_ids) - 1
    loaded.engine.crop(context.sequence, last)
    ids = [context.token_ids[last]] + continuation[:-1]
    logits = loaded.engine.evaluate(context.sequence, ids, logits_to_keep=len(ids))
    return logits, torch.tensor(continuation)


def score(logits: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor | None = None) -> Score:
    nll = torch.nn.functional.cross_entropy(logits.float(), targets).item()
    agreement = None
    if reference is not None:
        agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return Score(nll=nll, ppl=math.exp(nll), tokens=int(targets.numel()), top1_agreement=agreement)
