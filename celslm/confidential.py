"""Confidential contexts: an artifact whose blobs only its recipients can read.

    content key   32 random bytes, one per artifact; it keys nothing itself: HKDF-SHA256 derives the
                  blob key (info BLOB_INFO) and the prefix key (info PREFIX_INFO) from it
    blob          nonce (12 random bytes) || AES-256-GCM(blob key, nonce, plaintext, aad), where aad binds
                  the blob to its role and its manifest: BLOB_AAD || sha256(the manifest's header: every
                  field but blob references, prefix hashes and recipients) || role (manifest.BlobRole:
                  "tokens", "basis L", "block L C") || "\n" || media type. Swapping blobs between roles,
                  or changing the token count, codec or model space a blob was sealed under, fails to
                  decrypt. The model's codebook is not sealed (sealing.py).
    recipient     an X25519 key (`celslm keys generate --for encryption`), wrapped for as age does it:
                  an ephemeral X25519 pair; shared = X25519(ephemeral, recipient);
                  wrap key = HKDF-SHA256(shared, salt = ephemeral public || recipient public, info = WRAP_INFO);
                  wrapped = nonce || AES-GCM(wrap key, nonce, content key, aad = WRAP_INFO)
    prefix key    keys the chunk prefix hashes of an encrypted artifact (manifest.prefix_hashes), so
                  nobody without a recipient's key can test a guess of the context against them

Digests are over the ciphertext, so stores, Redis and peers keep, verify and serve an encrypted
artifact without reading it. The recipients are in the manifest, under its id and signatures. What
stays readable: the model space, geometry, token and chunk counts, codec and blob sizes. Encryption
is random, so the same context encrypted twice gives two ids: equal ids would say equal contexts.
Every recipient holds the content key, so encryption says nothing of who made an artifact: sign it
after sealing, and decode under `--trust`.

A store answers a plain prefix lookup with no encrypted artifact (its hashes are keyed); an edge
reaches one by id or tag. `cryptography` is imported only here and in trust.py, when used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from celslm.errors import IntegrityError, UsageError
from celslm.trust import b64, key_id, load_private_key, raw_public, unb64

SCHEME = "celslm.seal/1"  # X25519 + HKDF-SHA256 key wrap, AES-256-GCM blobs
BLOB_AAD = b"celslm blob v1\n"
WRAP_INFO = b"celslm seal v1 wrap"
BLOB_INFO = b"celslm seal v1 blob"
PREFIX_INFO = b"celslm seal v1 prefix"
NONCE_BYTES, TAG_BYTES, KEY_BYTES = 12, 16, 32
OVERHEAD_BYTES = NONCE_BYTES + TAG_BYTES  # what encryption adds to each blob
MAX_RECIPIENTS = 64


class Sealed(UsageError):
    """An encrypted artifact and no identity that is one of its recipients (exit 2)."""


@dataclass(frozen=True)
class Recipient:
    """The content key, wrapped for one X25519 public key."""

    key: str  # the recipient's key id (trust.key_id of its 32 raw public bytes)
    ephemeral: bytes  # 32 raw bytes of the ephemeral X25519 public key
    wrapped: bytes  # nonce || AES-GCM(content key): 12 + 32 + 16 bytes

    def to_json(self) -> dict:
        return {"key": self.key, "ephemeral": b64(self.ephemeral), "wrapped": b64(self.wrapped)}

    @classmethod
    def from_json(cls, obj) -> Recipient:
        if not isinstance(obj, dict) or set(obj) != {"key", "ephemeral", "wrapped"} or not isinstance(obj["key"], str):
            raise ValueError("a recipient is {key, ephemeral, wrapped}")
        return cls(obj["key"], unb64(obj["ephemeral"], 32, "ephemeral"),
                   unb64(obj["wrapped"], NONCE_BYTES + KEY_BYTES + TAG_BYTES, "wrapped"))


@dataclass(frozen=True)
class Encryption:
    """How an artifact's blobs are encrypted, and for whom (the manifest's `encryption`)."""

    recipients: tuple[Recipient, ...]
    scheme: str = SCHEME

    def to_json(self) -> dict:
        return {"scheme": self.scheme, "recipients": [r.to_json() for r in self.recipients]}

    @classmethod
    def from_json(cls, obj) -> Encryption:
        if not isinstance(obj, dict) or set(obj) != {"scheme", "recipients"}:
            raise ValueError("encryption is {scheme, recipients}")
        if obj["scheme"] != SCHEME:
            raise ValueError(f"encryption scheme {str(obj['scheme'])[:40]!r} (this celslm reads {SCHEME})")
        items = obj["recipients"]
        if not isinstance(items, list) or not 0 < len(items) <= MAX_RECIPIENTS:
            raise ValueError(f"encryption needs 1 to {MAX_RECIPIENTS} recipients")
        return cls(tuple(Recipient.from_json(item) for item in items))

    def key_ids(self) -> list[str]:
        return [r.key for r in self.recipients]


def _hkdf(secret: bytes, salt: bytes | None, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(secret)


def _aead(key: bytes):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key)


def new_content_key() -> bytes:
    return os.urandom(KEY_BYTES)


def prefix_key(content_key: bytes) -> bytes:
    return _hkdf(content_key, None, PREFIX_INFO)


def blob_key(content_key: bytes) -> bytes:
    return _hkdf(content_key, None, BLOB_INFO)


def blob_aad(header_digest: bytes, role: str, media_type: str) -> bytes:
    """What a blob is sealed under besides its key: its manifest's header digest, its role, its media type."""
    return BLOB_AAD + header_digest + f"{role}\n{media_type}".encode()


def wrap(content_key: bytes, recipients: list[bytes]) -> Encryption:
    """The content key wrapped for each recipient's 32-byte X25519 public key (each once)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    unique = list(dict.fromkeys(recipients))
    if not 0 < len(unique) <= MAX_RECIPIENTS:
        raise UsageError(f"encrypt to 1 to {MAX_RECIPIENTS} recipients, not {len(unique)}")
    wrapped = []
    for public in unique:
        ephemeral = X25519PrivateKey.generate()
        ephemeral_public = raw_public(ephemeral)
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(public))
        nonce = os.urandom(NONCE_BYTES)
        wrap_key = _hkdf(shared, ephemeral_public + public, WRAP_INFO)
        wrapped.append(Recipient(key_id(public), ephemeral_public,
                                 nonce + _aead(wrap_key).encrypt(nonce, content_key, WRAP_INFO)))
    return Encryption(tuple(wrapped))


def seal_blob(key: bytes, data: bytes, aad: bytes) -> bytes:
    """`key` is the artifact's `blob_key`; `aad` its `blob_aad`."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + _aead(key).encrypt(nonce, data, aad)


def open_blob(key: bytes, data: bytes, aad: bytes) -> bytes:
    """A blob's plaintext; IntegrityError (saying what is wrong, not naming the blob) if it does not
    open under the key and `aad`: forged, moved from another role, or another artifact's."""
    from cryptography.exceptions import InvalidTag

    if len(data) < OVERHEAD_BYTES:
        raise IntegrityError(f"is {len(data)} bytes, shorter than any encrypted blob")
    try:
        return _aead(key).decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], aad)
    except InvalidTag as exc:
        raise IntegrityError("does not decrypt with the artifact's key in its place (forged, moved, or from "
                             "another artifact)") from exc


@dataclass(frozen=True)
class Identity:
    """X25519 private keys that may open encrypted artifacts (`--identity`)."""

    keys: tuple  # X25519PrivateKey

    @classmethod
    def load(cls, paths) -> Identity | None:
        paths = [p for p in paths or () if str(p).strip()]
        return cls(tuple(load_private_key(Path(p), "encryption") for p in paths)) if paths else None

    def _publics(self) -> list[bytes]:
        return [raw_public(k) for k in self.keys]

    def key_ids(self) -> list[str]:
        return [key_id(public) for public in self._publics()]

    def unwrap(self, encryption: Encryption, source: str) -> bytes:
        """The content key, from the first recipient entry one of these keys opens."""
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

        by_id = {r.key: r for r in encryption.recipients}
        for private, public in zip(self.keys, self._publics()):
            entry = by_id.get(key_id(public))
            if entry is None:
                continue
            try:  # a low-order ephemeral key (a forgery) is a ValueError in the exchange
                shared = private.exchange(X25519PublicKey.from_public_bytes(entry.ephemeral))
                wrap_key = _hkdf(shared, entry.ephemeral + public, WRAP_INFO)
                return _aead(wrap_key).decrypt(entry.wrapped[:NONCE_BYTES], entry.wrapped[NONCE_BYTES:], WRAP_INFO)
            except (InvalidTag, ValueError) as exc:
                raise IntegrityError(f"{source}: its content key for {entry.key[:12]} does not open (forged or corrupt)") from exc
        raise Sealed(f"{source}: encrypted for {', '.join(k[:12] for k in encryption.key_ids())}; "
                     f"no identity given is one of them ({', '.join(k[:12] for k in self.key_ids())})")


def content_key(encryption: Encryption, identity: Identity | None, source: str) -> bytes:
    """The artifact's content key through `identity`; Sealed when there is none to use."""
    if identity is None:
        raise Sealed(f"{source}: the context is encrypted (for {', '.join(k[:12] for k in encryption.key_ids())}); "
                     "reading it needs the private key of one of its recipients (an identity)")
    return identity.unwrap(encryption, source)
