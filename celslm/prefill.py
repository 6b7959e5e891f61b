"""Context token ids -> KV artifact: prefill the context in chunks, un-rotate the keys, cut into blocks.

Native artifacts hold a model's own KV. Cross-model artifacts (`prefill_cross`) hold a small model's
KV projected from a large model's features through an alignment (`celslm.projection`), with the small
model's own KV for the first (sink) tokens and, for a hybrid, for its first layers.
"""

from __future__ import annotations

import time

import torch

from celslm.manifest import Artifact, Producer, Timings
from celslm.blocks import build_artifact
from celslm.errors import UsageError
from celslm.features import layer_features
from celslm.engine import TokenProgress
from celslm.models import LoadedModel
from celslm.projection import Alignment, cross_layers


def prefill_cross(
    llm: LoadedModel,
    slm: LoadedModel,
    alignment: Alignment,
    token_ids: list[int],
    *,
    framing: str,
    native: tuple[int, ...] = (),
    chunk_size: int = 256,
    dtype: str = "float32",
    progress: TokenProgress | None = None,
) -> Artifact:
    """An artifact in the SLM's space, computed by the LLM and projected through `alignment`."""
    if not token_ids:
        raise UsageError("the context is empty; nothing to prefill")
    layer_count = slm.model.config.num_hidden_layers
    if any(not 0 <= i < layer_count for i in native):
        raise UsageError(f"native layers must be within 0..{layer_count - 1} ({slm.name} has {layer_count} layers)")
    started = time.perf_counter()
    with torch.inference_mode():
        if progress:
            progress(0, len(token_ids))
        features = layer_features(llm, token_ids)
        prefill_s = time.perf_counter() - started
        layers = cross_layers(llm, slm, alignment, token_ids, native, features)
        if progress:
            progress(len(token_ids), len(token_ids))
    projection_s = time.perf_counter() - started - prefill_s
    return build_artifact(
        space=slm.space,
        producer=Producer(llm.name, llm.fingerprint, alignment.digest, tuple(sorted(native)), alignment.sink_tokens,
                          alignment.heldout.advised_split() if alignment.heldout and alignment.heldout.split_nll else None),
        token_ids=token_ids,
        layers=layers,
        chunk_size=chunk_size,
        dtype=dtype,
        framing=framing,
        provenance=["native" if i in native else "projected" for i in range(len(layers))],
        timings=Timings(prefill_s=round(prefill_s, 6), projection_s=round(projection_s, 6)),
    )


def prefill(
    loaded: LoadedModel,
    token_ids: list[int],
    *,
    framing: str,
    chunk_size: int = 256,
    dtype: str = "float32",
    progress: TokenProgress | None = None,
) -> Artifact:
    """Compute a native artifact: the model's own KV over `token_ids`, in its own model space."""
    if not token_ids:
        raise UsageError("the context is empty; nothing to prefill")
    started = time.perf_counter()
    with torch.inference_mode():
        sequence = loaded.engine.sequence()
        loaded.engine.prefill(sequence, token_ids, chunk_size, progress)
        layers = loaded.engine.context_layers(sequence)
    prefill_s = time.perf_counter() - started
    return build_artifact(
        space=loaded.space,
        producer=Producer.native(loaded.space),
        token_ids=token_ids,
        layers=layers,
        chunk_size=chunk_size,
        dtype=dtype,
        framing=framing,
        provenance=["native"] * len(layers),
        timings=Timings(prefill_s=round(prefill_s, 6)),
    )
