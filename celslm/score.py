"""Teacher-forced quality of a continuation after a context: mean NLL, perplexity, top-1 agreement.

Like llama.cpp's perplexity tool: every continuation token is predicted from everything before it.
The cache does not keep the context's last logits, so the last context position is dropped from the
cache and run again with the continuation; every continuation token is then scored. Logits are numpy
`[N, V]` float32, whichever engine computed them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from celslm.decode import Context
from celslm.errors import UsageError
from celslm.models import LoadedModel


@dataclass(frozen=True)
class Score:
    nll: float  # mean negative log-likelihood per token (nats)
    ppl: float
    tokens: int  # continuation tokens scored
    top1_agreement: float | None = None  # share of positions whose argmax matches the reference's


def continuation_logits(loaded: LoadedModel, context: Context | None, continuation: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(logits `[N, V]`, targets `[N]`): the prediction of each scored continuation token."""
    if context is None:  # no context: the first token has nothing to be predicted from
        if len(continuation) < 2:
            raise UsageError("a continuation without context needs at least 2 tokens")
        logits = loaded.engine.evaluate(loaded.engine.sequence(), continuation[:-1], logits_to_keep=len(continuation) - 1)
        return logits, np.asarray(continuation[1:], dtype=np.int64)
    if not continuation:
        raise UsageError("the continuation is empty")
    last = len(context.token_ids) - 1
    loaded.engine.crop(context.sequence, last)
    ids = [context.token_ids[last]] + continuation[:-1]
    logits = loaded.engine.evaluate(context.sequence, ids, logits_to_keep=len(ids))
    return logits, np.asarray(continuation, dtype=np.int64)


def nll(logits: np.ndarray, targets) -> float:
    """Mean cross-entropy (nats) of `targets` `[N]` under `logits` `[N, V]`, computed in float64."""
    x = np.asarray(logits, dtype=np.float64)
    top = x.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(x - top).sum(axis=-1)) + top[:, 0]
    picked = x[np.arange(len(x)), np.asarray(targets, dtype=np.int64)]
    return float((log_z - picked).mean())


def kl(logits: np.ndarray, reference: np.ndarray) -> float:
    """Mean KL(reference || logits) per position (nats), in float64: how far a perturbed cache moves
    the model's predictions, token by token, whatever the targets."""
    def log_softmax(x):
        x = np.asarray(x, dtype=np.float64)
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    ref, other = log_softmax(reference), log_softmax(logits)
    return float((np.exp(ref) * (ref - other)).sum(axis=-1).mean())


def top1(logits: np.ndarray, reference: np.ndarray) -> float:
    """Share of positions whose argmax matches the reference logits' argmax."""
    return float((np.asarray(logits).argmax(-1) == np.asarray(reference).argmax(-1)).mean())


def score(logits: np.ndarray, targets, reference: np.ndarray | None = None) -> Score:
    value = nll(logits, targets)
    agreement = top1(logits, reference) if reference is not None else None
    return Score(nll=value, ppl=math.exp(value), tokens=len(targets), top1_agreement=agreement)
