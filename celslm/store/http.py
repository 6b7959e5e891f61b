"""Client for a serve-cache server (the cloud or a peer). Every blob it returns has been verified."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import threading
import time
from urllib.parse import quote, urlsplit

from celslm.artifact import SIGNATURES_NAME, TIMINGS_NAME, Timings, canonical_json, read_side_record, sha256_digest
from celslm.errors import CelslmError, IntegrityError, TokenRequired, UnavailableError, UsageError
from celslm.trust import Signature, SignedTag


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

    def request(self, method: str, path: str, body: bytes | None = None,
                extra_headers: dict | None = None) -> tuple[int, bytes]:
        """One request on the kept-alive connection. A body cut off mid-way raises `PartialBody`."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        headers.update(extra_headers or {})
        for attempt in (0, 1):  # a kept-alive connection the server has closed is retried once
            if getattr(self._local, "conn", None) is None:
                self._local.conn = self._connect()
            try:
                self._local.conn.request(method, path, body=body, headers=headers)
                response = self._local.conn.getresponse()
                data = response.read()
                break
            except http.client.IncompleteRead as exc:
                self.close()
                raise PartialBody(response.status, bytes(exc.partial)) from exc
            except TimeoutError as exc:  # a stalled server: no point asking again at once
                self.close()
                raise UnavailableError(f"{self.url} did not answer within {self.timeout_s:g} s") from exc
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                self.close()
                if attempt:
                    raise UnavailableError(f"cannot reach {self.url}: {exc or type(exc).__name__}") from exc
        if response.status == 401:
            raise TokenRequired(f"{self.url} needs a bearer token")
        if response.status == 403:
            raise UsageError(f"{self.url} refused the token")
        return response.status, data

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _fail(self, status: int, data: bytes, what: str) -> CelslmError:
        return CelslmError(f"{self.url}: {what} failed: HTTP {status} {data[:200].decode(errors='replace').strip()}")

    # ---- blobs

    def has_blob(self, digest: str) -> bool:
        status, _ = self.request("HEAD", f"/v1/blobs/{digest}")
        return status == 200

    def get_blob(self, digest: str) -> bytes | None:
        """The blob's verified bytes, or None if the server does not have it.

        Transient failures (no answer, 5xx, a dropped connection) are retried with exponential backoff;
        a body cut off mid-way is resumed with a Range request from the bytes already received."""
        received = b""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                ranged = {"Range": f"bytes={len(received)}-"} if received else None
                status, data = self.request("GET", f"/v1/blobs/{digest}", extra_headers=ranged)
            except PartialBody as cut:
                if cut.status == 206 or (cut.status == 200 and not received):
                    received += cut.partial
                continue
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

    def _get(self, path: str, what: str) -> bytes | None:
        """GET a small object: its bytes, None on 404, an error otherwise."""
        status, data = self.request("GET", path)
        if status == 404:
            return None
        if status != 200:
            raise self._fail(status, data, f"GET {what}")
        return data

    def get_manifest(self, artifact_id: str) -> bytes | None:
        data = self._get(f"/v1/artifacts/{artifact_id}", f"artifact {artifact_id}")
        if data is not None and sha256_digest(data) != artifact_id:
            raise IntegrityError(f"{self.url} sent a manifest that does not hash to {artifact_id}")
        return data

    def put_manifest(self, artifact_id: str, data: bytes) -> list[str]:
        status, body = self.request("PUT", f"/v1/artifacts/{artifact_id}", data)
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
        data = self._get(f"/v1/tags/{quote(name, safe=':')}", f"tag {name}")
        return data.decode(errors="replace").strip() if data is not None else None

    def get_signed_tag(self, name: str) -> SignedTag | None:
        data = self._get(f"/v1/tags/{quote(name, safe=':')}/statement", f"statement of tag {name}")
        return SignedTag.from_bytes(data, f"{self.url} tag {name}") if data is not None else None

    def put_tag(self, name: str, artifact_id: str, signed: SignedTag | None = None) -> None:
        body = signed.to_bytes() if signed else artifact_id.encode()
        status, answer = self.request("PUT", f"/v1/tags/{quote(name, safe=':')}", body)
        if status not in (200, 201):
            raise self._fail(status, answer, f"PUT tag {name}")

    def lookup(self, space: str, prefixes: list[str]) -> tuple[str, int] | None:
        status, data = self.request("GET", f"/v1/lookup?space={space}&prefix={','.join(prefixes)}")
        if status != 200:
            raise self._fail(status, data, "lookup")
        found = json.loads(data)
        return (found["artifact"], found["chunks"]) if found["artifact"] else None
