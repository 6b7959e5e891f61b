"""A serve-cache server (the cloud or a peer) as a `Store`, over its HTTP API. Every blob it returns
has been verified.

A server may be hostile (a peer is another user's device), so no answer is read past what was asked
for: a blob no further than its declared size, anything else no further than a small limit. Every
request has an overall deadline, `DEADLINE_BASE_S` plus its bytes at `MIN_RATE_BPS`, whatever the
server trickles; a server that misses it is abandoned (the tiers then ask the next one).

A serve-cache may answer a blob with a redirect (307) to where the bytes are: a presigned object
URL, a CDN, a static server. It is followed only to https, to the server's own host, or to a host
`CELSLM_REDIRECT_HOSTS` (comma-separated) names; the bearer token never goes along, and the bytes
are verified against the digest as always.
"""

from __future__ import annotations

import heapq
import http.client
import itertools
import json
import os
import socket
import ssl
import threading
import time
from urllib.parse import quote, urljoin, urlsplit

from celslm.errors import CelslmError, InsufficientStorage, IntegrityError, TokenRequired, UnavailableError, UsageError
from celslm.manifest import MAX_MANIFEST_BYTES, SIGNATURES_NAME, TIMINGS_NAME, Timings, read_side_record, sha256_digest
from celslm.store.base import HashingWriter, Store, without_credentials
from celslm.trust import Signature, SignedTag, canonical_json


DEADLINE_BASE_S = 10.0  # connect, first byte and a small answer
MIN_RATE_BPS = 1_000_000  # slower than 1 MB/s (8 Mbit/s) on a blob counts as stalled
SMALL_BODY_BYTES = 64 << 10  # tags, signatures, lookups, timings, errors
LARGEST_BLOB_BYTES = 1 << 30  # a blob read with no declared size is read no further (serve-cache's --max-blob)
REDIRECTS = (301, 302, 303, 307, 308)


class DeadlineExceeded(UnavailableError):
    """A server that did not finish an answer in time (it may be trickling on purpose): not retried."""


class PartialBody(Exception):
    """The connection dropped in the middle of a response body."""

    def __init__(self, status: int, partial: bytes):
        super().__init__(f"HTTP {status}: body cut off after {len(partial)} bytes")
        self.status, self.partial = status, partial


class HttpStore(Store):
    def __init__(self, url: str, token: str | None = None, timeout_s: float | None = None, retries: int = 3,
                 backoff_s: float = 0.2, redirect_hosts: tuple[str, ...] | None = None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"{url}: not an http(s) URL of a celslm serve-cache server")
        self.url = without_credentials(f"{parts.scheme}://{parts.netloc}")
        self.token = token
        self.timeout_s = timeout_s or float(os.environ.get("CELSLM_TIMEOUT") or 30)
        self.retries, self.backoff_s = retries, backoff_s
        if redirect_hosts is None:
            redirect_hosts = tuple(os.environ.get("CELSLM_REDIRECT_HOSTS", "").split(","))
        self.redirect_hosts = frozenset(filter(None, map(_host_entry, redirect_hosts)))
        self.origin = (parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        self._local = threading.local()  # kept-alive connections of each fetching thread, by origin
        self._blob_base: tuple[tuple[str, str, int], str] | None = None  # (origin, path) blobs were redirected to

    def _connect(self, origin: tuple[str, str, int]) -> http.client.HTTPConnection:
        scheme, host, port = origin
        if scheme == "https":
            context = ssl.create_default_context()  # the system's CAs, and CELSLM_CA_FILE's besides
            if os.environ.get("CELSLM_CA_FILE"):
                context.load_verify_locations(os.environ["CELSLM_CA_FILE"])
            return http.client.HTTPSConnection(host, port, timeout=self.timeout_s, context=context)
        return http.client.HTTPConnection(host, port, timeout=self.timeout_s)

    def request(self, method: str, path: str, body: bytes | None = None, extra_headers: dict | None = None,
                limit: int = SMALL_BODY_BYTES) -> tuple[int, bytes]:
        """One request to the server; see `_request`."""
        status, data, _ = self._request(method, path, body, extra_headers, limit)
        return status, data

    def _request(self, method: str, path: str, body: bytes | None = None, extra_headers: dict | None = None,
                 limit: int = SMALL_BODY_BYTES, origin: tuple[str, str, int] | None = None):
        """One request on the kept-alive connection to `origin` (the server's own by default; only
        there does the token go), its answer read no further than `limit` bytes (more is refused as
        IntegrityError) and finished within the deadline for `limit` bytes (or `DeadlineExceeded`).
        A body cut off mid-way raises `PartialBody`. Returns (status, body, response)."""
        origin = origin or self.origin
        own = origin == self.origin
        headers = {"Authorization": f"Bearer {self.token}"} if self.token and own else {}
        headers.update(extra_headers or {})
        deadline_s = min(self.timeout_s, DEADLINE_BASE_S) + max(limit, len(body or b"")) / MIN_RATE_BPS
        where = self.url if own else f"{origin[0]}://{origin[1]}:{origin[2]}"
        conns = self._conns()
        for attempt in (0, 1):  # a kept-alive connection the server has closed is retried once
            if conns.get(origin) is None:
                conns[origin] = self._connect(origin)
            conn, expired = conns[origin], threading.Event()
            watchdog = WATCHDOG.watch(deadline_s, conn, expired)
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                declared = response.getheader("Content-Length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise _TooLarge(int(declared))
                data = _read_body(response, limit)
                break
            except _TooLarge as exc:
                self._close(origin)
                raise IntegrityError(f"{where} answered {path[:120]} with {exc.size or 'more than'} bytes "
                                     f"(at most {limit:,} expected); refused unread") from exc
            except http.client.IncompleteRead as exc:
                self._close(origin)
                if expired.is_set():
                    raise DeadlineExceeded(f"{where} did not finish {path[:120]} within {deadline_s:.0f} s") from exc
                raise PartialBody(response.status, bytes(exc.partial)) from exc
            except TimeoutError as exc:  # a stalled server: no point asking again at once
                self._close(origin)
                raise UnavailableError(f"{where} did not answer within {self.timeout_s:g} s") from exc
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                self._close(origin)
                if expired.is_set():
                    raise DeadlineExceeded(f"{where} did not finish {path[:120]} within {deadline_s:.0f} s") from exc
                if attempt:
                    raise UnavailableError(f"cannot reach {where}: {exc or type(exc).__name__}") from exc
            finally:
                WATCHDOG.cancel(watchdog)
        if own and response.status == 401:
            raise TokenRequired(f"{self.url} needs a bearer token")
        if own and response.status == 403:  # a wrong token, or (a tenant's) one that may not do this
            reason = data[:200].decode(errors="replace").strip().splitlines()
            raise UsageError(f"{self.url} refused the token" + (f": {reason[0]}" if reason else ""))
        return response.status, data, response

    def _conns(self) -> dict:
        if not hasattr(self._local, "conns"):
            self._local.conns = {}
        return self._local.conns

    def _close(self, origin: tuple[str, str, int]) -> None:
        conn = self._conns().pop(origin, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for origin in list(self._conns()):
            self._close(origin)

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

    def blob_size(self, digest: str) -> int | None:
        status, _, response = self._request("HEAD", f"/v1/blobs/{digest}")
        declared = response.getheader("Content-Length", "")
        return int(declared) if status == 200 and declared.isdigit() else None

    def read_blob(self, digest: str, limit: int | None = None) -> bytes | None:
        """The blob's verified bytes (at most `limit` of them, the size its manifest declares), or None
        if the server does not have it. A redirect is followed where `_redirect` allows; one to a fixed
        place (BASE/blobs/<hex>, no query: serve-cache's --blob-base) is remembered, and later blobs are
        asked there first, saving the server a round trip each; anything but the blob from there sends
        the read back to the server.

        Transient failures (no answer, 5xx, a dropped connection) are retried with exponential backoff;
        a body cut off mid-way is resumed with a Range request from the bytes already received. A
        server past its deadline is not asked again."""
        size = limit or LARGEST_BLOB_BYTES
        hex_id = digest.removeprefix("sha256:")
        received, origin, path = b"", None, f"/v1/blobs/{digest}"
        learned = self._blob_base  # where the server's redirects have pointed: asked first, without the server
        if learned is not None:
            origin, path = learned[0], f"{learned[1]}/blobs/{hex_id}"
        failures = redirects = 0
        refused = False  # a redirect target answered 403
        while failures <= self.retries:
            try:
                ranged = {"Range": f"bytes={len(received)}-"} if received else None
                status, data, response = self._request("GET", path, extra_headers=ranged, origin=origin,
                                                       limit=max(size - len(received), SMALL_BODY_BYTES))
            except PartialBody as cut:
                if cut.status == 206 or (cut.status == 200 and not received):
                    received += cut.partial[: size - len(received)]
                failures = self._backoff(failures)
                continue
            except DeadlineExceeded:
                raise
            except UnavailableError:
                if learned is not None:  # the learned place is down: the server says where now
                    learned = self._blob_base = None
                    origin, path, received = None, f"/v1/blobs/{digest}", b""
                    continue
                failures = self._backoff(failures)
                continue
            if learned is not None and status not in (200, 206):  # not there (any more): ask the server
                learned = self._blob_base = None
                origin, path, received = None, f"/v1/blobs/{digest}", b""
                continue
            if status in REDIRECTS and origin is None and redirects < self.retries + 1:
                origin, path = self._redirect(response.getheader("Location", ""), digest)
                if "?" not in path and path.endswith(f"/blobs/{hex_id}"):  # a fixed place (--blob-base): the
                    self._blob_base = (origin, path.removesuffix(f"/blobs/{hex_id}"))  # next blob goes straight there
                redirects += 1
                continue
            if status == 404 and not received:
                return None
            if status == 403 and origin is not None and not received:  # an expired URL, or a key the store lacks
                if refused:  # the server's fresh URL is refused too: the blob is not there
                    return None
                origin, path, refused = None, f"/v1/blobs/{digest}", True
                continue
            if status == 206 and received:
                received += data
            elif status == 200:
                received = data
            else:  # 5xx or an unexpected answer (an expired presigned URL): from the server again
                origin, path, received = None, f"/v1/blobs/{digest}", b""
                failures = self._backoff(failures)
                continue
            actual = sha256_digest(received)
            if actual != digest:
                where = self.url if origin is None else f"{self.url}'s redirect to {origin[1]}"
                raise IntegrityError(f"{where} sent corrupt bytes for blob {digest} (they hash to {actual})")
            return received
        raise UnavailableError(f"{self.url}: blob {digest} not received after {self.retries + 1} attempts")

    def _backoff(self, failures: int) -> int:
        """Wait before the next try (exponentially longer each time); the count of failures so far."""
        if failures < self.retries:
            time.sleep(self.backoff_s * 2 ** failures)
        return failures + 1

    def _redirect(self, location: str, digest: str) -> tuple[tuple[str, str, int], str]:
        """(origin, path) of a redirect the client may follow: to https, to the server's own host (if the
        server is not https itself), or to a host CELSLM_REDIRECT_HOSTS names; anything else is refused
        (the next tier is asked)."""
        parts = urlsplit(urljoin(f"{self.url}/v1/blobs/{digest}", location))
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:  # a port that is not one
            port = None
        if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
            raise UnavailableError(f"{self.url} redirected blob {digest} to {location[:80]!r}, not an http(s) URL")
        host = parts.hostname.lower()
        listed = host in self.redirect_hosts or f"{host}:{port}" in self.redirect_hosts
        own = host == self.origin[1].lower() and self.origin[0] == "http"
        if not (parts.scheme == "https" or own or listed):
            raise UnavailableError(f"{self.url} redirected blob {digest} to http://{host}:{port}, not https and not "
                                   "its own host; add the host to CELSLM_REDIRECT_HOSTS to follow it")
        if self.origin[0] == "https" and parts.scheme == "http" and not listed:
            raise UnavailableError(f"{self.url} redirected blob {digest} from https to http://{host}:{port}; add "
                                   "the host to CELSLM_REDIRECT_HOSTS to follow it")
        return (parts.scheme, host, port), (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    def put_blob(self, digest: str, data: bytes) -> None:
        status, body = self.request("PUT", f"/v1/blobs/{digest}", data)
        if status not in (200, 201):
            raise self._fail(status, body, f"PUT blob {digest}")

    def blob_writer(self, digest: str) -> "HttpBlobWriter":
        return HttpBlobWriter(self, digest)

    def check_blob(self, digest: str) -> bool:
        """Whether the server holds a valid copy: its HEAD verifies the blob before answering."""
        return self.has_blob(digest)

    def quarantine(self, digest: str) -> None:
        """Nothing to do here: the server quarantines a corrupt copy itself when it reads it."""

    def usage_bytes(self) -> int:
        status, data = self.request("GET", "/v1/health")
        if status != 200:
            raise self._fail(status, data, "GET health")
        return int(json.loads(data).get("store_bytes") or 0)

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
        status, body = self.request("PUT", f"/v1/artifacts/{artifact_id}{query}", data, limit=MAX_MANIFEST_BYTES)
        if status == 409:  # the missing digests: never longer than the manifest naming them
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

    def delete_tag(self, name: str) -> bool:
        status, answer = self.request("DELETE", f"/v1/tags/{quote(name, safe=':/')}")
        if status not in (200, 404):
            raise self._fail(status, answer, f"DELETE tag {name}")
        return status == 200

    def lookup(self, space: str | None, prefixes: list[str]) -> tuple[str, int] | None:
        query = f"space={space}&" if space else ""
        status, data = self.request("GET", f"/v1/lookup?{query}prefix={','.join(prefixes)}")
        if status != 200:
            raise self._fail(status, data, "lookup")
        found = json.loads(data)
        return (found["artifact"], found["chunks"]) if found["artifact"] else None


def _host_entry(text: str) -> str:
    """A CELSLM_REDIRECT_HOSTS entry as `_redirect` compares it: 'name' or 'name:port', lower case,
    an IPv6 address without its brackets ('[::1]:8080' -> '::1:8080')."""
    text = text.strip().lower()
    if not text:
        return ""
    parts = urlsplit(f"//{text}")
    try:
        return f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname or ""
    except ValueError:
        return ""


class HttpBlobWriter(HashingWriter):
    """A blob for a serve-cache behind this one: gathered in memory (the front server bounds its size),
    then sent in one PUT, which the server verifies again."""

    def __init__(self, store: HttpStore, digest: str):
        super().__init__(digest)
        self.store = store
        self._data = bytearray()

    def _put(self, chunk: bytes) -> None:
        self._data += chunk

    def _keep(self) -> None:
        self.store.put_blob(self.digest, bytes(self._data))
        self._data = bytearray()

    def abort(self) -> None:
        self._data = bytearray()


class _TooLarge(Exception):
    def __init__(self, size: int | None):
        super().__init__(size)
        self.size = size


class Watchdog:
    """One thread for every request's overall deadline: past it, the request's socket is shut so that
    a blocked read returns at once (a thread started per request costs about a quarter of a millisecond,
    as much as the request itself from a near server)."""

    def __init__(self):
        self._due: list[tuple[float, int, http.client.HTTPConnection, threading.Event]] = []  # a heap
        self._numbers = itertools.count()
        self._cancelled: set[int] = set()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, seconds: float, conn: http.client.HTTPConnection, expired: threading.Event) -> int:
        with self._wake:
            number = next(self._numbers)
            heapq.heappush(self._due, (time.monotonic() + seconds, number, conn, expired))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="celslm-deadlines", daemon=True)
                self._thread.start()
            elif self._due[0][1] == number:  # the earliest now: the thread sleeps until an earlier one
                self._wake.notify()
        return number

    def cancel(self, number: int) -> None:
        with self._wake:
            self._cancelled.add(number)

    def _run(self) -> None:
        with self._wake:
            while True:
                while self._due and self._due[0][1] in self._cancelled:
                    self._cancelled.discard(heapq.heappop(self._due)[1])
                if not self._due:
                    self._wake.wait()
                    continue
                wait_s = self._due[0][0] - time.monotonic()
                if wait_s > 0:
                    self._wake.wait(wait_s)
                    continue
                _, _, conn, expired = heapq.heappop(self._due)
                _cut(conn, expired)


WATCHDOG = Watchdog()


def _cut(conn: http.client.HTTPConnection, expired: threading.Event) -> None:
    """Past the deadline, shut the socket so that a blocked read returns at once."""
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
