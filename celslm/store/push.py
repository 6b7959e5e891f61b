"""Publishing an artifact into any store (a serve-cache, a bucket, a directory, Redis): blobs first,
then the manifest, its side records, and the tag last, so that a reader never finds a manifest
naming a blob that is not there, nor a tag naming a manifest that is not."""

from __future__ import annotations

from celslm.artifact import ArtifactReader
from celslm.errors import IntegrityError
from celslm.store.base import Store
from celslm.trust import SignedTag, merge_signatures


def push(reader: ArtifactReader, store: Store, tag: str | None = None, signatures=(),
         signed_tag: SignedTag | None = None) -> dict:
    """Upload only the blobs the store lacks, then the manifest, its side records (the reader's
    signatures and `signatures`, its timings), then the tag (with `signed_tag` if given).

    The manifest is offered first: the store answers with the blobs it lacks (nothing is stored
    until none is missing), and refuses a tag or a quota (403, 507) before any blob is sent."""
    manifest = reader.manifest.canonical_bytes()
    missing = set(store.put_manifest(reader.id, manifest, tag))
    wanted = {ref.digest for ref in reader.manifest.blob_refs()}
    sent = bytes_sent = 0
    if missing:
        for ref, data in reader.blobs():
            if ref.digest in missing:
                store.put_blob(ref.digest, data)
                missing.discard(ref.digest)
                sent += 1
                bytes_sent += len(data)
        still = store.put_manifest(reader.id, manifest)
        if still:
            raise IntegrityError(f"{store.url} still lacks {len(still)} blobs after upload, first {still[0]}")
    signatures = merge_signatures(reader.signatures, signatures)
    if signatures:
        store.put_signatures(reader.id, signatures)
    if reader.timings.to_json():
        store.put_timings(reader.id, reader.timings)
    if tag:
        store.put_tag(tag, reader.id, signed_tag)
    return {"id": reader.id, "url": store.url, "tag": tag, "tag_signed": signed_tag is not None,
            "signatures": [sig.key_id for sig in signatures], "blobs_sent": sent, "blobs_skipped": len(wanted) - sent,
            "bytes_sent": bytes_sent}
