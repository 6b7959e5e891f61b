"""The edge's policy in one call: where the context comes from, then the answer to a private prompt.

The context comes, in this order of preference, from
  1. an artifact (`kv`: a directory, a tar stream, an id, a tag or a URL, through the tiers), all of
     it or, with `recompute_last`, its earlier chunks with the rest prefilled here; or several
     artifacts composed into one context (`compose`);
  2. the longest prefix of `context_text` any tier has cached (prefix lookup), the rest prefilled here;
  3. `context_text` prefilled here (edge-only).
When an artifact cannot be had whole (a dead tier, a corrupt blob) and `context_text` is given, the
chunks every tier can still give are reused and the rest recomputed (`stats.fallback` says why).
The prompt is tokenized and run here only: no request carries it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, Sequence

from celslm import prompting
from celslm.artifact import ArtifactReader
from celslm.compose import DEFAULT_LINK, context_from_readers
from celslm.manifest import Manifest, prefix_hashes
from celslm.decode import (Context, Sampling, context_from_artifact, context_from_ids, context_from_prefix,
                           generate)
from celslm.errors import IntegrityError, UnavailableError, UsageError
from celslm.engine import TokenProgress
from celslm.models import LoadedModel
from celslm.store.tiers import BlobSourceReader, Sources, Tiers, open_ref
from celslm.stream import Link


@dataclass
class Answer:
    context: Context  # its `stats` fill in as `tokens` is consumed
    tokens: Iterator[int]  # every generated id; the first is computed before `answer` returns
    artifact_id: str | None  # the artifact the context came from, if one
    artifacts: tuple[str, ...] = ()  # every artifact the context came from, in order (several: composed)


def kept_chunks(manifest: Manifest, recompute_last: int) -> int:
    """How many leading chunks to take from an artifact so that at least its last `recompute_last`
    tokens are prefilled here."""
    return max(0, manifest.token_count - recompute_last) // manifest.chunk_size


def context_from_reader(loaded: LoadedModel, reader: ArtifactReader, *, recompute_last: int = 0,
                        link: Link | None = None, pipeline: bool = True, step: int | None = None,
                        progress: TokenProgress | None = None) -> Context:
    """An artifact's context: all of it streamed in, or its earlier chunks with at least the last
    `recompute_last` tokens prefilled here (for cross-model artifacts: the edge's own recent KV)."""
    if not recompute_last:
        return context_from_artifact(loaded, reader, link=link, pipeline=pipeline)
    m = reader.manifest
    return context_from_prefix(loaded, None, m.framing, reader, kept_chunks(m, recompute_last), step or m.chunk_size,
                               progress, link=link)


def advised_recompute(manifest: Manifest) -> int:
    """The context's last tokens to prefill here by default: what a cross-model artifact's alignment
    advises (its measured gain curve, `HeldOut.advised_split`), none for a native artifact."""
    return manifest.producer.own_last or 0


def answer(loaded: LoadedModel, prompt: str, *, kv: str | Sequence[str] | None = None, context_text: str | None = None,
           sources: Sources = Sources(), recompute_last: int | None = None, link_tokens: int = DEFAULT_LINK,
           link: Link | None = None, pipeline: bool = True, raw: bool = False, sampling: Sampling = Sampling(),
           progress: TokenProgress | None = None, stdin: BinaryIO | None = None,
           warn: Callable[[str], None] | None = None) -> Answer:
    """Find the context (module docstring), run the prompt over it and compute the first token.
    `recompute_last` None: what the artifact advises (`advised_recompute`). Several artifacts in `kv`
    are composed into one context (`compose`), `link_tokens` of each after the first computed here."""
    if kv is None and context_text is None:
        raise UsageError("no context: give an artifact, a context text, or both")
    if recompute_last and kv is None:
        raise UsageError("recomputing the last tokens of a context needs an artifact")
    if prompting.empty_prompt(loaded.tokenizer, prompt, raw):  # before any thread starts on the context
        raise UsageError("the prompt is empty")
    refs = [kv] if isinstance(kv, str) else list(kv or ())
    if len(refs) > 1:
        if context_text is not None:
            raise UsageError("a context text stands in for one artifact, not for a composition of several")
        return _composed(loaded, prompt, refs, sources, recompute_last, link_tokens, link, raw, sampling, progress,
                         stdin, warn)
    kv = refs[0] if refs else None
    tiers, reader = None, None
    try:
        if kv is not None:
            reader, tiers = open_ref(kv, sources, stdin=stdin, warn=warn)
            own_last = advised_recompute(reader.manifest) if recompute_last is None else recompute_last
            ctx = context_from_reader(loaded, reader, recompute_last=own_last, link=link, pipeline=pipeline,
                                      progress=progress)
        else:
            ctx, reader, tiers = _context_from_text(loaded, context_text, sources, link, progress, warn)
        tokens = _started(loaded, ctx, prompt, raw, sampling)
    except (IntegrityError, UnavailableError) as exc:
        if context_text is None or kv is None:
            raise
        if warn:
            warn(f"warning: {exc}; recomputing what could not be fetched from the context text")
        ctx = _fallback_context(loaded, context_text, reader, tiers, sources.chunk_size, progress)
        ctx.stats.fallback = str(exc)
        tokens = _started(loaded, ctx, prompt, raw, sampling)
    if tiers:
        ctx.stats.bytes_by_source = dict(tiers.bytes_by_source)
    artifact_id = reader.id if reader is not None and ctx.stats.path != "edge-only" else None
    return Answer(ctx, tokens, artifact_id, (artifact_id,) if artifact_id else ())


def _composed(loaded: LoadedModel, prompt: str, refs: list[str], sources: Sources, recompute_last: int | None,
              link_tokens: int, link: Link | None, raw: bool, sampling: Sampling, progress: TokenProgress | None,
              stdin: BinaryIO | None, warn: Callable[[str], None] | None) -> Answer:
    """Several artifacts, each opened through the tiers and checked under the trust policy, all before
    any blob is read; then composed. By default the last part's advice says how many of the context's
    last tokens to prefill here (its tail is the last part's)."""
    if refs.count("-") > 1:
        raise UsageError("only one artifact can come from stdin")
    opened = [open_ref(ref, sources, stdin=stdin, warn=warn) for ref in refs]
    readers = [reader for reader, _ in opened]
    own_last = advised_recompute(readers[-1].manifest) if recompute_last is None else recompute_last
    ctx = context_from_readers(loaded, readers, link_tokens=link_tokens, recompute_last=own_last, link=link,
                               progress=progress)
    tokens = _started(loaded, ctx, prompt, raw, sampling)
    for _, tiers in opened:
        for source, count in (tiers.bytes_by_source if tiers else {}).items():
            ctx.stats.bytes_by_source[source] = ctx.stats.bytes_by_source.get(source, 0) + count
    return Answer(ctx, tokens, None, tuple(reader.id for reader in readers))


def _started(loaded: LoadedModel, ctx: Context, prompt: str, raw: bool, sampling: Sampling) -> Iterator[int]:
    """The generation with its first token already computed: with pipelining, the artifact is in by then,
    so a fetch failure surfaces here, where the fallback can still catch it."""
    ids = prompting.prompt_ids(loaded.tokenizer, prompt, ctx.framing, raw)
    tokens = generate(loaded, ctx, ids, sampling)
    try:
        first = next(tokens)
    except BaseException:
        if ctx.feed is not None:  # a feed thread left running would abort the process at exit
            ctx.feed.close()
        raise

    def rest() -> Iterator[int]:
        yield first
        yield from tokens

    return rest()


def _context_from_text(loaded: LoadedModel, text: str, sources: Sources, link: Link | None,
                       progress: TokenProgress | None, warn: Callable[[str], None] | None,
                       ) -> tuple[Context, ArtifactReader | None, Tiers | None]:
    """The longest cached prefix of the text any tier has, and the rest prefilled here (or all of it)."""
    framing = prompting.default_framing(loaded.tokenizer)
    token_ids = prompting.context_ids(loaded.tokenizer, text, framing)
    tiers = sources.tiers(warn) if sources.remote else None
    found = tiers and tiers.lookup(loaded.fingerprint, prefix_hashes(token_ids, loaded.fingerprint, sources.chunk_size))
    if not found:
        return context_from_ids(loaded, token_ids, framing=framing, step=sources.chunk_size, progress=progress), None, tiers
    reader = tiers.reader(found[0])
    ctx = context_from_prefix(loaded, token_ids, framing, reader, found[1], sources.chunk_size, progress, link=link)
    return ctx, reader, tiers


def _fallback_context(loaded: LoadedModel, text: str, reader: ArtifactReader | None, tiers: Tiers | None,
                      chunk_size: int, progress: TokenProgress | None) -> Context:
    """The artifact could not be had whole: reuse the chunks every tier can still give, prefill the rest."""
    framing = reader.manifest.framing if reader is not None else prompting.default_framing(loaded.tokenizer)
    token_ids = prompting.context_ids(loaded.tokenizer, text, framing)
    chunks = tiers.available_prefix(reader.manifest) if tiers is not None and reader is not None else 0
    if chunks:
        source = BlobSourceReader(reader.manifest, reader.source, tiers)
        try:
            return context_from_prefix(loaded, token_ids, framing, source, chunks, chunk_size, progress)
        except IntegrityError:
            pass  # the artifact holds another context than the text: recompute it all
    return context_from_ids(loaded, token_ids, framing=framing, step=chunk_size, progress=progress)
