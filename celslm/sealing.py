"""An artifact's blobs sealed for recipients, and opened again with a recipient's identity.

Sealing encrypts every blob but the model's codebook (model-wide, made from public text, shared by
every artifact of the model) under the artifact's content key, each bound to its role and its
manifest's header (confidential.blob_aad), and keys the prefix hashes; confidential.py holds the
scheme itself. Nothing here reads or writes files, and checking a manifest (manifest.py) never comes
here: only reading an encrypted artifact's blobs does (artifact.py, with an identity).
"""

from __future__ import annotations

from dataclasses import replace

from celslm.confidential import (Identity, blob_aad, blob_key, content_key, new_content_key, open_blob, prefix_key,
                                 seal_blob, wrap)
from celslm.errors import UsageError
from celslm.manifest import CODEBOOK, TOKENS, Artifact, BlobRef, BlobRole, Manifest, prefix_hashes, sha256_digest
from celslm.tokenblob import decode_tokens


def is_sealed(role: BlobRole) -> bool:
    """Whether an encrypted artifact encrypts the blob in `role`: all but the model's codebook."""
    return role != CODEBOOK


class BlobKeys:
    """What an artifact's content key derives: the key its blobs are sealed under, each with its role
    and media type, and the key its prefix hashes are keyed with."""

    def __init__(self, key: bytes, manifest: Manifest):
        self._blob_key = blob_key(key)
        self._header = manifest.header_digest()
        self.prefix_key = prefix_key(key)

    @classmethod
    def unwrapped(cls, manifest: Manifest, identity: Identity | None, source: str) -> BlobKeys:
        """An encrypted artifact's keys, through `identity`: Sealed without one of its recipients,
        IntegrityError for a forged or corrupt wrapped key."""
        return cls(content_key(manifest.encryption, identity, source), manifest)

    def aad(self, role: BlobRole, media_type: str) -> bytes:
        """What the blob in `role` is sealed under besides the key (confidential.blob_aad)."""
        return blob_aad(self._header, str(role), media_type)

    def seal(self, role: BlobRole, ref: BlobRef, data: bytes) -> bytes:
        return seal_blob(self._blob_key, data, self.aad(role, ref.media_type)) if is_sealed(role) else data

    def open(self, role: BlobRole, ref: BlobRef, data: bytes) -> bytes:
        """The plaintext of the blob in `role`; IntegrityError (not naming the blob) if it does not open there."""
        return open_blob(self._blob_key, data, self.aad(role, ref.media_type)) if is_sealed(role) else data


def seal_artifact(artifact: Artifact, recipients: list[bytes]) -> Artifact:
    """The same context with every blob encrypted for `recipients` (32-byte X25519 public keys) and
    its prefix hashes keyed (confidential.py): a new id, and no signatures (sign after sealing)."""
    m = artifact.manifest
    if m.encryption is not None:
        raise UsageError("the artifact is already encrypted")
    key = new_content_key()
    keys = BlobKeys(key, m)
    blobs: dict[str, bytes] = {}

    def sealed(ref: BlobRef | None, role: BlobRole) -> BlobRef | None:
        if ref is None:
            return None
        data = keys.seal(role, ref, artifact.blobs[ref.digest])
        out = BlobRef(sha256_digest(data), len(data), ref.media_type)
        blobs[out.digest] = data
        return out

    token_ids = decode_tokens(artifact.blobs[m.tokens.digest])
    manifest = replace(
        m, tokens=sealed(m.tokens, TOKENS), codebook=sealed(m.codebook, CODEBOOK), encryption=wrap(key, recipients),
        blocks=tuple(tuple(sealed(ref, BlobRole.block(layer, chunk)) for chunk, ref in enumerate(refs))
                     for layer, refs in enumerate(m.blocks)),
        bases=tuple(sealed(ref, BlobRole.basis(layer)) for layer, ref in enumerate(m.bases)),
        prefix_hashes=tuple(prefix_hashes(token_ids, m.space.fingerprint, m.chunk_size, keys.prefix_key)))
    return Artifact(manifest, blobs, artifact.timings)
