"""The token-id blob: a context's token ids as one safetensors int64 vector (`token_ids`).

Its digest is the artifact's token-id digest; prefill writes it, and the prefix hashes and every
decode are computed from what it holds (numpy, no torch).
"""

from __future__ import annotations

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from celslm.errors import IntegrityError

MEDIA_TOKENS = "application/vnd.celslm.kv.tokens.v1+safetensors"


def encode_tokens(token_ids: list[int]) -> bytes:
    return st_save({"token_ids": np.asarray(token_ids, dtype=np.int64)})


def decode_tokens(data: bytes, source: str = "token ids blob") -> list[int]:
    try:
        ids = st_load(data)["token_ids"]
    except Exception as exc:  # the digest matched: a writer's bug or a forged blob, not ours to crash on
        raise IntegrityError(f"{source} does not decode as token ids ({exc})") from exc
    if ids.ndim != 1 or ids.dtype != np.int64:
        raise IntegrityError(f"{source} holds {ids.dtype} of shape {ids.shape}, not a list of int64 token ids")
    return ids.tolist()
