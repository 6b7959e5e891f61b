"""Client for a serve-cache server (the cloud or a peer). Every blob it returns has been verified.

A server may be hostile (a peer is another user's device), so no answer is read past what was asked
for: a blob no further than its declared size, anything else no further than a small limit. Every
request has an overall deadline, `DEADLINE_BASE_S` plus its bytes at `MIN_RATE_BPS`, whatever the
server trickles; a server that misses it is abandoned (the tiers then ask the next one).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import threading
import time
from urllib.parse import quote, urlsplit

from celslm.errors import CelslmError, InsufficientStorage, IntegrityError, TokenRequired, UnavailableError, UsageError
from celslm.manifest import MAX_MANIFEST_BYTES, SIGNATURES_NAME, TIMINGS_NAME, Timings, read_side_record, sha256_digest
from celslm.trust import Signature, SignedTag, canonical_json


DEADLINE_BASE_S = 10.0  # connect, first byte and a small answer
MIN_RATE_BPS = 1_000_000  # slower than 1 MB/s (8 Mbit/s) on a blob counts as stalled
SMALL_BODY_BYTES = 64 << 10  # tags, signatures, lookups, timings, errors


class DeadlineExceeded(UnavailableError):
    """A server that did not finish an answer in time (it may be trickling on purpose): not retried."""


class PartialBody(Exception):
    """The connection dropped in the middle of a response body."""

    def __init__(self, status: int, partial: bytes):
        super().__init__(f"HTTP {status}: body cut off after {len(partial)} bytes")
        self.status, self.partial = status, partial


class CacheClient:
    def __init__(self, url: str, token: str | None = None, timeout_s: float | None = None, retries: int = 3,
                 backoff_s: float = 0.2):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"{url}: not an http(s) URL of a celslm serve-cache server")
        self.url = f"{parts.scheme}://{parts.netloc}"
        self.token = token
        self.timeout_s = timeout_s or float(os.environ.get("CELSLM_TIMEOUT") or 30)
        self.retries, self.backoff_s = retries, backoff_s
        self._parts = parts
        self._local = threading.local()  # one kept-alive connection per fetching thread

    def _connect(self) -> http.client.HTTPConnection:
        if self._parts.scheme == "https":
            context = ssl.create_default_context(cafile=os.environ.get("CELSLM_CA_FILE") or None)
            return http.client.HTTPSConnection(self._parts.hostname, self._parts.port or 443, timeout=self.timeout_s,
                                               context=context)
        return http.client.HTTPConnection(self._parts.hostname, self._parts.port or 80, timeout=self.timeout_s)

    def request(self, method: str, path: str, body: bytes | None = None, extra_headers: dict | None = None,
                limit: int = SMALL_BODY_BYTES) -> tuple[int, bytes]:
        """One request on the kept-alive connection, its answer read no further than `limit` bytes
        (more is refused as IntegrityError) and finished within the deadline for `limit` bytes (or
        `DeadlineExceeded`). A body cut off mid-way raises `PartialBody`."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        headers.update(extra_headers or {})
        deadline_s = min(self.timeout_s, DEADLINE_BASE_S) + max(limit, len(body or b"")) / MIN_RATE_BPS
        for attempt in (0, 1):  # a kept-alive connection the server has closed is retried once
            if getattr(self._local, "conn", None) is None:
                self._local.conn = self._connect()
            conn, expired = self._local.conn, threading.Event()
            watchdog = threading.Timer(deadline_s, _cut, (conn, expired))
            watchdog.daemon = True
            watchdog.start()
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                declared = response.getheader("Content-Length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise _TooLarge(int(declared))
                data = _read_body(response, limit)
                break
            except _TooLarge as exc:
                self.close()
                raise IntegrityError(f"{self.url} answered {path} with {exc.size or 'more than'} bytes "
                                     f"(at most {limit:,} expected); refused unread") from exc
            except http.client.IncompleteRead as exc:
                self.close()
                if expired.is_set():
                    raise DeadlineExceeded(f"{self.url} did not finish {path} within {deadline_s:.0f} s") from exc
                raise PartialBody(response.status, bytes(exc.partial)) from exc
            except TimeoutError as exc:  # a stalled server: no point asking again at once
                self.close()
                raise UnavailableError(f"{self.url} did not answer within {self.timeout_s:g} s") from exc
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                self.close()
                if expired.is_set():
                    raise DeadlineExceeded(f"{self.url} did not finish {path} within {deadline_s:.0f} s") from exc
                if attempt:
                    raise UnavailableError(f"cannot reach {self.url}: {exc or type(exc).__name__}") from exc
            finally:
                watchdog.cancel()
        if response.status == 401:
            raise TokenRequired(f"{self.url} needs a bearer token")
        if response.status == 403:  # a wrong token, or (a tenant's) one that may not do this
            reason = data[:200].decode(errors="replace").strip().splitlines()
            raise UsageError(f"{self.url} refused the token" + (f": {reason[0]}" if reason else ""))
        return response.status, data

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _fail(self, status: int, data: bytes, what: str) -> CelslmError:
        if status == 507:
            return InsufficientStorage(f"{self.url}: {what} refused: {data[:200].decode(errors='replace').strip()}")
        if status == 503:  # the server is up but its store is not (a Redis failing over): the next tier, or later
            return UnavailableError(f"{self.url}: {what} failed: {data[:200].decode(errors='replace').strip()}")
        if status == 422:  # the server found what was sent corrupt (a digest, a signature, a manifest)
            return IntegrityError(f"{self.url}: {what} refused: {data[:200].decode(errors='replace').strip()}")
        return CelslmError(f"{self.url}: {what} failed: HTTP {status} {data[:200].decode(errors='replace').strip()}")

    # ---- blobs

    def has_blob(self, digest: str) -> bool:
        status, _ = self.request("HEAD", f"/v1/blobs/{digest}")
        return status == 200

    def get_blob(self, digest: str, size: int) -> bytes | None:
        """The blob's verified bytes (`size` of them, as its manifest declares), or None if the server
        does not have it.

        Transient failures (no answer, 5xx, a dropped connection) are retried with exponential backoff;
        a body cut off mid-way is resumed with a Range request from the bytes already received. A
        server past its deadline is not asked again."""
        received = b""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                ranged = {"Range": f"bytes={len(received)}-"} if received else None
                status, data = self.request("GET", f"/v1/blobs/{digest}", extra_headers=ranged,
                                            limit=max(size - len(received), SMALL_BODY_BYTES))
            except PartialBody as cut:
                if cut.status == 206 or (cut.status == 200 and not received):
                    received += cut.partial[: size - len(received)]
                continue
            except DeadlineExceeded:
                raise
            except UnavailableError:
                continue
            if status == 404 and not received:
                return None
            if status == 206 and received:
                received += data
            elif status == 200:
                received = data
            else:
                continue  # 5xx or an unexpected answer: try again
            actual = sha256_digest(received)
            if actual != digest:
                raise IntegrityError(f"{self.url} sent corrupt bytes for blob {digest} (they hash to {actual})")
            return received
        raise UnavailableError(f"{self.url}: blob {digest} not received after {self.retries + 1} attempts")

    def put_blob(self, digest: str, data: bytes) -> None:
        status, body = self.request("PUT", f"/v1/blobs/{digest}", data)
        if status not in (200, 201):
            raise self._fail(status, body, f"PUT blob {digest}")

    # ---- manifests, tags, lookup

    def _get(self, path: str, what: str, limit: int = SMALL_BODY_BYTES) -> bytes | None:
        """GET a small object: its bytes, None on 404, an error otherwise."""
        status, data = self.request("GET", path, limit=limit)
        if status == 404:
            return None
        if status != 200:
            raise self._fail(status, data, f"GET {what}")
        return data

    def get_manifest(self, artifact_id: str) -> bytes | None:
        data = self._get(f"/v1/artifacts/{artifact_id}", f"artifact {artifact_id}", MAX_MANIFEST_BYTES)
        if data is not None and sha256_digest(data) != artifact_id:
            raise IntegrityError(f"{self.url} sent a manifest that does not hash to {artifact_id}")
        return data

    def put_manifest(self, artifact_id: str, data: bytes, tag: str | None = None) -> list[str]:
        """Store a manifest, or the blobs it still lacks; `tag`, the tag the push will set, lets a server
        with tenants refuse a tag the token may not write before any blob is sent."""
        query = f"?tag={quote(tag, safe=':/')}" if tag else ""
        status, body = self.request("PUT", f"/v1/artifacts/{artifact_id}{query}", data)
        if status == 409:
            return json.loads(body)["missing"]
        if status not in (200, 201):
            raise self._fail(status, body, f"PUT artifact {artifact_id}")
        return []

    def get_signatures(self, artifact_id: str) -> tuple[Signature, ...]:
        data = self._get(f"/v1/artifacts/{artifact_id}/signatures", f"signatures of {artifact_id}")
        return read_side_record(SIGNATURES_NAME, data, self.url) if data is not None else ()

    def put_signatures(self, artifact_id: str, signatures: tuple[Signature, ...]) -> None:
        body = canonical_json([sig.to_json() for sig in signatures])
        status, answer = self.request("PUT", f"/v1/artifacts/{artifact_id}/signatures", body)
        if status not in (200, 201):
            raise self._fail(status, answer, f"PUT signatures of {artifact_id}")

    def get_timings(self, artifact_id: str) -> Timings:
        data = self._get(f"/v1/artifacts/{artifact_id}/timings", f"timings of {artifact_id}")
        return read_side_record(TIMINGS_NAME, data, self.url) if data is not None else Timings()

    def put_timings(self, artifact_id: str, timings: Timings) -> None:
        status, answer = self.request("PUT", f"/v1/artifacts/{artifact_id}/timings", canonical_json(timings.to_json()))
        if status not in (200, 201):
            raise self._fail(status, answer, f"PUT timings of {artifact_id}")

    def get_tag(self, name: str) -> str | None:
        data = self._get(f"/v1/tags/{quote(name, safe=':/')}", f"tag {name}")
        return data.decode(errors="replace").strip() if data is not None else None

    def get_signed_tag(self, name: str) -> SignedTag | None:
        data = self._get(f"/v1/tags/{quote(name, safe=':/')}/statement", f"statement of tag {name}")
        return SignedTag.from_bytes(data, f"{self.url} tag {name}") if data is not None else None

    def put_tag(self, name: str, artifact_id: str, signed: SignedTag | None = None) -> None:
        body = signed.to_bytes() if signed else artifact_id.encode()
        status, answer = self.request("PUT", f"/v1/tags/{quote(name, safe=':/')}", body)
        if status not in (200, 201):
            raise self._fail(status, answer, f"PUT tag {name}")

    def get_codebook(self, fingerprint: str) -> str | None:
        data = self._get(f"/v1/codebooks/{fingerprint}", f"codebook of {fingerprint[:12]}")
        return data.decode(errors="replace").strip() if data is not None else None

    def lookup(self, space: str, prefixes: list[str]) -> tuple[str, int] | None:
        status, data = self.request("GET", f"/v1/lookup?space={space}&prefix={','.join(prefixes)}")
        if status != 200:
            raise self._fail(status, data, "lookup")
        found = json.loads(data)
        return (found["artifact"], found["chunks"]) if found["artifact"] else None


class _TooLarge(Exception):
    def __init__(self, size: int | None):
        super().__init__(size)
        self.size = size


def _cut(conn: http.client.HTTPConnection, expired: threading.Event) -> None:
    """The watchdog: past the deadline, shut the socket so that a blocked read returns at once."""
    expired.set()
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _read_body(response: http.client.HTTPResponse, limit: int) -> bytes:
    """The whole body, or `_TooLarge` as soon as it passes `limit` bytes; a body cut off raises
    IncompleteRead with everything received so far."""
    data = bytearray()
    try:
        while not response.isclosed():
            piece = response.read(limit + 1 - len(data))
            if not piece and (response.length or not response.isclosed()):  # closed before its declared length
                raise http.client.IncompleteRead(b"")
            data += piece
            if len(data) > limit:
                raise _TooLarge(None)
    except http.client.IncompleteRead as exc:
        raise http.client.IncompleteRead(bytes(data) + bytes(exc.partial)) from exc
    return bytes(data)
