"""Who may say which context an artifact is: producer keys, detached signatures, signed tag
statements, and the edge's trust policy.

Blobs are content-addressed, so anyone may serve them: the digest proves the bytes. What a peer could
lie about is *which* artifact answers a name: a tag, a prefix lookup, or a manifest it made itself
from another context's KV. So producers sign, as cosign signs OCI images:

    artifact signature   Ed25519 over "celslm artifact v1\\n" + the artifact id (a detached record)
    tag statement        Ed25519 over "celslm tag v1\\n" + canonical JSON of
                         {"tag", "artifact", "issued", "expires"} (unix seconds)

A signature record carries its public key, so a store can check it is well formed and valid; only
the edge's policy (`--trust PUBKEY`) says whose signatures count. A statement past `expires` is
stale; one issued before the newest the edge has accepted for that tag is a replay. Both are refused.

Keys are PEM files: `NAME.key` (PKCS#8, mode 0600) and `NAME.pub` (SubjectPublicKeyInfo), written
and read with `cryptography`, which is imported only by code that signs or checks (~30 ms).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from celslm.errors import IntegrityError, OutputExists, UsageError

ARTIFACT_CONTEXT = b"celslm artifact v1\n"
TAG_CONTEXT = b"celslm tag v1\n"
MAX_SIGNATURES = 16  # per artifact or statement: a store keeps no more
STATEMENT_TYPE = "celslm.tag/1"


class Untrusted(IntegrityError):
    """Something no trusted key vouches for, under a trust policy (exit 3, like any integrity failure)."""


def key_id(public_raw: bytes) -> str:
    """A public key's name: the first 32 hex digits of the sha256 of its 32 raw bytes."""
    return hashlib.sha256(public_raw).hexdigest()[:32]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text, length: int, what: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True) if isinstance(text, str) else b""
    except ValueError:
        data = b""
    if len(data) != length:
        raise ValueError(f"{what} is not {length} base64-encoded bytes")
    return data


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Signature:
    """One detached Ed25519 signature and the public key that made it."""

    public_key: bytes  # 32 raw bytes
    signature: bytes  # 64 bytes

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    def valid_for(self, message: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(self.signature, message)
            return True
        except (InvalidSignature, ValueError):
            return False

    def to_json(self) -> dict:
        return {"key": self.key_id, "public_key": b64(self.public_key), "signature": b64(self.signature)}

    @classmethod
    def from_json(cls, obj) -> Signature:
        if not isinstance(obj, dict) or set(obj) != {"key", "public_key", "signature"}:
            raise ValueError("a signature is {key, public_key, signature}")
        sig = cls(unb64(obj["public_key"], 32, "public_key"), unb64(obj["signature"], 64, "signature"))
        if obj["key"] != sig.key_id:
            raise ValueError(f"key id {str(obj['key'])[:40]!r} does not name its public key")
        return sig


def parse_signatures(data: bytes | list, source: str) -> tuple[Signature, ...]:
    """A list of signature records (JSON bytes or parsed); anything malformed is refused whole."""
    try:
        items = json.loads(data) if isinstance(data, (bytes, str)) else data
        if not isinstance(items, list) or len(items) > MAX_SIGNATURES:
            raise ValueError(f"expected a list of at most {MAX_SIGNATURES} signatures")
        return tuple(Signature.from_json(item) for item in items)
    except (ValueError, TypeError) as exc:
        raise IntegrityError(f"{source}: malformed signatures ({str(exc)[:120]})") from exc


def artifact_message(artifact_id: str) -> bytes:
    return ARTIFACT_CONTEXT + artifact_id.encode()


def merge_signatures(*groups) -> tuple[Signature, ...]:
    """Signatures from several places, each once (first seen first), at most MAX_SIGNATURES."""
    seen, merged = set(), []
    for group in groups:
        for sig in group:
            if (sig.public_key, sig.signature) not in seen:
                seen.add((sig.public_key, sig.signature))
                merged.append(sig)
    return tuple(merged[:MAX_SIGNATURES])


# ---------------------------------------------------------------- keys


def generate_key(out: str, force: bool = False, kind: str = "signing") -> tuple[Path, Path]:
    """Write a key pair, OUT.key (mode 0600) and OUT.pub: Ed25519 to sign, or X25519 to receive
    encrypted contexts (`kind="encryption"`)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    private = {"signing": Ed25519PrivateKey, "encryption": X25519PrivateKey}[kind].generate()
    key_path, pub_path = Path(out + ".key"), Path(out + ".pub")
    for path in (key_path, pub_path):
        if path.exists() and not force:
            raise OutputExists(f"{path} already exists")
    private_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    key_path.unlink(missing_ok=True)  # a new file, so the mode below is what it gets (never widened later)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    pub_path.write_bytes(public_pem)
    return key_path, pub_path


def _read_pem(path: str | Path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(16 << 10)
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror or exc}") from exc
    if b"-----BEGIN" not in data:
        raise UsageError(f"{what} {path}: not a PEM key file (make one with `celslm keys generate`)")
    return data


def load_private_key(path: str | Path, kind: str = "signing"):
    """An Ed25519 (signing) or X25519 (encryption) private key from a PEM file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    want = {"signing": Ed25519PrivateKey, "encryption": X25519PrivateKey}[kind]
    try:
        key = serialization.load_pem_private_key(_read_pem(path, "key"), password=None)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"key {path}: not an unencrypted PEM private key ({str(exc)[:80]})") from exc
    if not isinstance(key, want):
        raise UsageError(f"key {path}: not an {'Ed25519' if kind == 'signing' else 'X25519'} private key "
                         f"(`celslm keys generate{' --for encryption' if kind == 'encryption' else ''}` makes one)")
    return key


def load_public_key(path: str | Path, kind: str = "signing") -> bytes:
    """The 32 raw bytes of an Ed25519 (signing) or X25519 (encryption) public key in a PEM file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    want = {"signing": Ed25519PublicKey, "encryption": X25519PublicKey}[kind]
    try:
        key = serialization.load_pem_public_key(_read_pem(path, "public key"))
    except (ValueError, TypeError) as exc:
        raise UsageError(f"public key {path}: not a PEM public key ({str(exc)[:80]})") from exc
    if not isinstance(key, want):
        raise UsageError(f"public key {path}: not an {'Ed25519' if kind == 'signing' else 'X25519'} public key")
    return raw_public(key)


def raw_public(key) -> bytes:
    """The 32 raw bytes of an Ed25519 or X25519 key's public half (given the private or public key)."""
    from cryptography.hazmat.primitives import serialization

    public = key.public_key() if hasattr(key, "public_key") else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _sign(private_key, message: bytes) -> Signature:
    return Signature(raw_public(private_key), private_key.sign(message))


def sign_artifact(private_key, artifact_id: str) -> Signature:
    return _sign(private_key, artifact_message(artifact_id))


# ---------------------------------------------------------------- tag statements


@dataclass(frozen=True)
class TagStatement:
    """"`tag` names `artifact`", said at `issued` and good until `expires` (unix seconds)."""

    tag: str
    artifact: str
    issued: int
    expires: int

    def to_json(self) -> dict:
        return {"type": STATEMENT_TYPE, "tag": self.tag, "artifact": self.artifact, "issued": self.issued,
                "expires": self.expires}

    def message(self) -> bytes:
        return TAG_CONTEXT + canonical_json(self.to_json())

    @classmethod
    def from_json(cls, obj) -> TagStatement:
        if not isinstance(obj, dict) or obj.get("type") != STATEMENT_TYPE or set(obj) != set(cls("", "", 0, 0).to_json()):
            raise ValueError(f"a tag statement is {{type: {STATEMENT_TYPE}, tag, artifact, issued, expires}}")
        if not all(isinstance(obj[k], str) for k in ("tag", "artifact")) or \
                not all(isinstance(obj[k], int) and not isinstance(obj[k], bool) for k in ("issued", "expires")):
            raise ValueError("tag and artifact are strings, issued and expires integers")
        return cls(obj["tag"], obj["artifact"], obj["issued"], obj["expires"])


@dataclass(frozen=True)
class SignedTag:
    statement: TagStatement
    signatures: tuple[Signature, ...]

    def to_json(self) -> dict:
        return {"statement": self.statement.to_json(), "signatures": [sig.to_json() for sig in self.signatures]}

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    @classmethod
    def from_bytes(cls, data: bytes, source: str) -> SignedTag:
        try:
            obj = json.loads(data)
            if not isinstance(obj, dict) or set(obj) != {"statement", "signatures"}:
                raise ValueError("a signed tag is {statement, signatures}")
            signed = cls(TagStatement.from_json(obj["statement"]), parse_signatures(obj["signatures"], source))
        except (ValueError, TypeError, RecursionError) as exc:
            raise IntegrityError(f"{source}: malformed tag statement ({str(exc)[:120]})") from exc
        if not signed.signatures or not all(sig.valid_for(signed.statement.message()) for sig in signed.signatures):
            raise IntegrityError(f"{source}: a tag statement whose signatures do not verify")
        return signed


def sign_tag(private_key, tag: str, artifact_id: str, valid_s: int, now: float | None = None) -> SignedTag:
    issued = int(time.time() if now is None else now)
    statement = TagStatement(tag, artifact_id, issued, issued + valid_s)
    return SignedTag(statement, (_sign(private_key, statement.message()),))


# ---------------------------------------------------------------- the edge's policy


@dataclass(frozen=True)
class TrustPolicy:
    """The producer keys whose signatures count (`--trust`); everything else is vouched for by no one."""

    keys: frozenset[str]  # key ids

    @classmethod
    def load(cls, paths) -> TrustPolicy | None:
        """The policy the `--trust` files make, or None when none is given."""
        paths = [p for p in paths or () if str(p).strip()]
        return cls(frozenset(key_id(load_public_key(p)) for p in paths)) if paths else None

    def _trusted(self, signatures, message: bytes) -> str | None:
        for sig in signatures:
            if sig.key_id in self.keys and sig.valid_for(message):
                return sig.key_id
        return None

    def check_artifact(self, artifact_id: str, signatures, source: str) -> str:
        """The trusted key id that signed this artifact; Untrusted if none did."""
        found = self._trusted(signatures, artifact_message(artifact_id))
        if found is None:
            what = "no signature" if not signatures else \
                f"{len(signatures)} signature(s), none valid from a trusted key ({', '.join(s.key_id[:12] for s in signatures)})"
            raise Untrusted(f"{source}: artifact {artifact_id} is not signed by a trusted key ({what})")
        return found

    def check_tag(self, name: str, signed: SignedTag | None, source: str, newest_issued: int | None = None,
                  now: float | None = None) -> str:
        """The artifact id a tag statement names, if a trusted key signed it for this tag, it has not
        expired, and it is not older than one already accepted; Untrusted otherwise."""
        if signed is None:
            raise Untrusted(f"{source}: tag {name!r} is not signed (a producer signs it with push --tag --sign)")
        statement = signed.statement
        if statement.tag != name:
            raise Untrusted(f"{source}: the statement for tag {name!r} is about tag {statement.tag!r}")
        if self._trusted(signed.signatures, statement.message()) is None:
            raise Untrusted(f"{source}: tag {name!r} is signed by no trusted key "
                            f"({', '.join(s.key_id[:12] for s in signed.signatures)})")
        now = time.time() if now is None else now
        if statement.expires <= now:
            raise Untrusted(f"{source}: tag {name!r} statement expired {int(now - statement.expires)} s ago")
        if newest_issued is not None and statement.issued < newest_issued:
            raise Untrusted(f"{source}: tag {name!r} statement issued at {statement.issued} is older than one "
                            f"already accepted (issued {newest_issued}): a replay")
        return statement.artifact
