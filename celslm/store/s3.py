"""A store in S3-compatible object storage: s3://BUCKET/PREFIX, on AWS S3, MinIO, Ceph, R2 or SeaweedFS.

The client is boto3, AWS's own: it reads what every S3 tool reads (AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_REGION, ~/.aws/config and ~/.aws/credentials, instance roles),
and AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3 points it at any other S3-compatible service, so one
URL works everywhere unchanged. It is imported only when an s3:// store is opened.

Objects, laid out as the directory store's files (local.py), so that a static server or CDN in front of
the bucket serves PREFIX/blobs/<hex> exactly as nginx serves ROOT/blobs/<hex>:

    PREFIX/blobs/<hex>          blob bytes, named by sha256, written once (Cache-Control: immutable)
    PREFIX/manifests/<hex>      manifest bytes, named by the artifact id
    PREFIX/signatures/<hex>     producers' signatures; PREFIX/timings/<hex>: the cloud's seconds
    PREFIX/tags/<name>          {"artifact": id, "signed": ...}; a namespaced tag's slash is written %2F
    PREFIX/prefixes/<hash>, PREFIX/codebooks/<fingerprint>, PREFIX/tenants/<name> (changed by `update`)
    PREFIX/quarantine/<hex>     blobs found corrupt on read, kept aside

An object is visible whole or not at all (S3 has no partial PUT). A blob up to PART_BYTES is one PUT
after its digest is verified; a larger one goes up in parts as its bytes arrive (memory bounded by a
part) and becomes visible only when the upload is completed, after the digest is verified; an
aborted or abandoned upload is never visible, and `stale_tmp` aborts those older than an hour. A
manifest is written only once all its blobs are there (base.Store), and push writes tags last, so a
reader never sees a manifest naming a missing blob. S3 reads are strongly consistent after a write.

Blobs are written with If-None-Match: * where the service offers conditional writes (AWS S3 since
2024, recent MinIO, SeaweedFS): the first writer wins and a second finds it done. Where the service
answers NotImplemented it is written unconditionally; two writers of one digest then write the same
bytes, so the last writer winning is harmless. Records changed in one step (`update`: tenants'
ledgers) need If-Match; without it they are refused (UsageError) rather than raced.

Errors: an endpoint that cannot be reached, or answers 5xx after three tries, is UnavailableError;
credentials refused (403, a wrong signature) or a missing bucket is UsageError naming the bucket and
the request, never a key. The credentials need, on PREFIX: s3:ListBucket (S3 answers 403 instead of 404
for a missing object without it), GetObject, PutObject, DeleteObject, AbortMultipartUpload and
ListBucketMultipartUploads. `url` and `where` name the bucket and endpoint, never credentials.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from datetime import datetime, timedelta, timezone
from typing import Callable
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

from celslm.errors import CelslmError, UnavailableError, UsageError
from celslm.manifest import check_digest, sha256_digest
from celslm.store.base import IMMUTABLE, HashingWriter, Store, first_line

PART_BYTES = 8 << 20  # a multipart upload's part (S3's least is 5 MiB): what one blob upload holds in memory
PRESIGN_S = 3600  # a presigned URL's life
PRESIGNED_KEPT = 16384  # presigned URLs kept for reuse (about 10 MB)
USAGE_TTL_S = 60.0  # usage is a listing of every blob: health checks and scrapes reuse it this long
UPDATE_TRIES = 50  # `update` reads again after each conflict, at most this often
MISSING = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}
CONFLICT = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
UNSUPPORTED = {"NotImplemented", "501"}
REFUSED = {"AccessDenied", "403", "SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken",
           "AllAccessDisabled", "AccountProblem"}


class Answer(Exception):
    """An S3 error answer the caller asked to handle itself (`S3Store.call(..., expect=...)`)."""

    def __init__(self, code: str):
        super().__init__(code)
        self.code = code


def parse_s3_url(url: str) -> tuple[str, str]:
    """s3://BUCKET[/PREFIX] -> (bucket, prefix without slashes at either end)."""
    parts = urlsplit(url)
    if "@" in parts.netloc:  # never echo it: what precedes @ would be a secret
        raise UsageError("an s3:// URL carries no credentials; give them in AWS_ACCESS_KEY_ID and "
                         "AWS_SECRET_ACCESS_KEY (or ~/.aws/credentials)")
    if not parts.netloc or parts.query or parts.fragment:
        raise UsageError(f"store {url}: expected s3://BUCKET/PREFIX")
    return parts.netloc, parts.path.strip("/")


class S3BlobWriter(HashingWriter):
    """Holds a blob's bytes up to a part; past that, a multipart upload takes each part as it fills.
    The object appears only at `_keep` (one PUT, or the upload completed), after the digest is checked."""

    def __init__(self, store: "S3Store", digest: str):
        super().__init__(digest)
        self.store = store
        self.key = store.key("blobs", check_digest(digest))
        self._pending = bytearray()
        self._upload: str | None = None
        self._parts: list[dict] = []

    def _put(self, chunk: bytes) -> None:
        self._pending += chunk
        while len(self._pending) > self.store.part_bytes:  # a byte or more stays back: the last part is never empty
            self._upload_part(bytes(self._pending[:self.store.part_bytes]))
            del self._pending[:self.store.part_bytes]

    def _upload_part(self, data: bytes) -> None:
        if self._upload is None:
            self._upload = self.store.call("create_multipart_upload", Key=self.key, CacheControl=IMMUTABLE,
                                           ContentType="application/octet-stream")["UploadId"]
        number = len(self._parts) + 1
        answer = self.store.call("upload_part", Key=self.key, UploadId=self._upload, PartNumber=number, Body=data)
        self._parts.append({"PartNumber": number, "ETag": answer["ETag"]})

    def _keep(self) -> None:
        if self._upload is None:
            self.store.put_once(self.key, bytes(self._pending), CacheControl=IMMUTABLE,
                                ContentType="application/octet-stream")
        else:
            self._upload_part(bytes(self._pending))
            self.store.put_once(self.key, None, UploadId=self._upload, MultipartUpload={"Parts": self._parts})
            self._upload = None  # completed (or found done): nothing for `abort` to undo
        self._pending.clear()

    def abort(self) -> None:
        self._pending.clear()
        upload, self._upload = self._upload, None
        if upload is not None:
            try:
                self.store.call("abort_multipart_upload", Key=self.key, UploadId=upload)
            except CelslmError:
                pass  # stale_tmp aborts it later; an abort must not hide the error that caused it


class S3Store(Store):
    part_bytes = PART_BYTES

    def __init__(self, url: str):
        self.bucket, self.prefix = parse_s3_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30,
                        max_pool_connections=32, signature_version="s3v4")
        try:  # a session of its own: reads the environment now, as this store's credentials
            self.client = boto3.session.Session().client("s3", config=config)
        except (BotoCoreError, ValueError) as exc:
            raise UsageError(f"{self.url}: cannot set up the S3 client: {first_line(exc)}") from exc
        self.where = f"S3 bucket {self.bucket} at {self.client.meta.endpoint_url}"
        self.conditional_writes = True  # until the service answers NotImplemented
        self._presigned: OrderedDict[str, tuple[str, float]] = OrderedDict()  # digest -> (URL, reuse until)
        self._presigned_lock = threading.Lock()
        self._usage: tuple[float, int] | None = None  # (when listed, bytes)
        # the bucket exists and these credentials may list the prefix (a store needs to: without it S3
        # answers 403 for a missing object, not 404), or say why not now
        self.call("list_objects_v2", Prefix=self.key("blobs", ""), MaxKeys=1)

    def key(self, kind: str, name: str) -> str:
        name = name.replace("/", "%2F")  # a namespaced tag stays one object, as it stays one file
        return f"{self.prefix}/{kind}/{name}" if self.prefix else f"{kind}/{name}"

    def call(self, method: str, expect: set[str] = frozenset(), **params):
        """One S3 request on this bucket (botocore retries transient failures itself). An error answer
        whose code is in `expect` raises Answer; any other becomes one line with an exit code."""
        try:
            return getattr(self.client, method)(Bucket=self.bucket, **params)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in expect or str(status) in expect:
                raise Answer(code if code in expect else str(status)) from exc
            raise self._error(exc.operation_name, code, status) from exc
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise UsageError(f"{self.where}: no usable AWS credentials ({type(exc).__name__}); set "
                             "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or ~/.aws/credentials") from exc
        except BotoCoreError as exc:  # unreachable, timed out, cut off mid-answer
            raise UnavailableError(f"cannot reach {self.where}: {first_line(exc)}") from exc

    def _error(self, operation: str, code: str, status: int) -> CelslmError:
        answer = code if code and not code.isdigit() else f"HTTP {status}"  # a HEAD's answer has no body, so no code
        if code == "NoSuchBucket":
            return UsageError(f"{self.where}: the bucket does not exist; create it first")
        if code in REFUSED or status == 403:
            return UsageError(f"{self.where}: {operation} refused ({answer}); check the AWS credentials "
                              "and that they may use this bucket")
        if status >= 500 or code in ("SlowDown", "RequestTimeout"):
            return UnavailableError(f"{self.where} is unavailable: {operation} answered {answer}")
        return CelslmError(f"{self.where}: {operation} failed ({answer})")

    def _get(self, key: str) -> tuple[bytes, str] | None:
        """An object's bytes and ETag, None if there is none."""
        try:
            answer = self.call("get_object", MISSING, Key=key)
        except Answer:
            return None
        try:
            return answer["Body"].read(), answer["ETag"]
        except BotoCoreError as exc:
            raise UnavailableError(f"{self.where}: reading {key} was cut off: {first_line(exc)}") from exc

    def _head(self, key: str) -> dict | None:
        try:
            return self.call("head_object", MISSING, Key=key)
        except Answer:
            return None

    def put_once(self, key: str, data: bytes | None, **params) -> None:
        """Write an object that never changes (a blob): `data` in one PUT, or with data None the multipart
        upload in `params` completed. If-None-Match: * where the service offers it; an object already
        there is the same bytes, so finding it is success."""
        method = "put_object" if data is not None else "complete_multipart_upload"
        if data is not None:
            params["Body"] = data
        if self.conditional_writes:
            try:
                self.call(method, CONFLICT | UNSUPPORTED, Key=key, IfNoneMatch="*", **params)
                return
            except Answer as answer:
                if answer.code not in UNSUPPORTED:
                    if data is None:  # another upload stored it first: this one's parts are not needed
                        self.call("abort_multipart_upload", MISSING, Key=key, UploadId=params["UploadId"])
                    return
                self.conditional_writes = False
        self.call(method, Key=key, **params)

    def _read(self, kind: str, name: str) -> bytes | None:
        found = self._get(self.key(kind, name))
        return None if found is None else found[0]

    def _write(self, kind: str, name: str, data: bytes) -> None:
        self.call("put_object", Key=self.key(kind, name), Body=data)

    def _delete(self, kind: str, name: str) -> bool:
        key = self.key(kind, name)
        if self._head(key) is None:
            return False
        self.call("delete_object", Key=key)
        return True

    def has_blob(self, digest: str) -> bool:
        return self._head(self.key("blobs", check_digest(digest))) is not None

    def read_blob(self, digest: str, limit: int | None = None) -> bytes | None:
        """One GET: a blob longer than `limit` (its declared length says so) is not read; bytes that do
        not hash to the digest are quarantined and read as absent."""
        try:
            answer = self.call("get_object", MISSING, Key=self.key("blobs", check_digest(digest)))
        except Answer:
            return None
        if limit is not None and int(answer["ContentLength"]) > limit:
            answer["Body"].close()
            return None
        try:
            data = answer["Body"].read()
        except BotoCoreError as exc:
            raise UnavailableError(f"{self.where}: reading blob {digest} was cut off: {first_line(exc)}") from exc
        if sha256_digest(data) != digest:
            self.quarantine(digest)
            return None
        return data

    def blob_size(self, digest: str) -> int | None:
        head = self._head(self.key("blobs", check_digest(digest)))
        return None if head is None else int(head["ContentLength"])

    def blob_writer(self, digest: str) -> S3BlobWriter:
        return S3BlobWriter(self, digest)

    def blob_url(self, digest: str) -> str:
        """A presigned GET of the blob, good for at least half of `PRESIGN_S`: whoever holds it reads that
        one object (it carries the access key id, as every presigned URL does, and a signature; never
        the secret). Signing costs about as much CPU as the read it saves, so each digest's URL is kept
        (`PRESIGNED_KEPT` of them) until half its life is gone."""
        now = time.monotonic()
        with self._presigned_lock:
            kept = self._presigned.get(digest)
            if kept is not None and kept[1] > now:
                self._presigned.move_to_end(digest)
                return kept[0]
        url = self.client.generate_presigned_url("get_object", ExpiresIn=PRESIGN_S, Params={
            "Bucket": self.bucket, "Key": self.key("blobs", check_digest(digest))})
        with self._presigned_lock:
            self._presigned[digest] = (url, now + PRESIGN_S / 2)
            while len(self._presigned) > PRESIGNED_KEPT:
                self._presigned.popitem(last=False)
        return url

    def quarantine(self, digest: str) -> None:
        """Copy the corrupt blob to PREFIX/quarantine/<hex>, then delete it; a new push can store it again."""
        hex_id = check_digest(digest)
        source = self.key("blobs", hex_id)
        try:
            self.call("copy_object", MISSING, Key=self.key("quarantine", hex_id),
                      CopySource={"Bucket": self.bucket, "Key": source})
        except Answer:
            return  # gone already
        self.call("delete_object", Key=source)

    def usage_bytes(self) -> int:
        """Blob bytes stored: the sizes in a listing of PREFIX/blobs/ (a request per 1,000 blobs), as
        listed at most USAGE_TTL_S ago."""
        if self._usage is None or time.monotonic() - self._usage[0] > USAGE_TTL_S:
            total = 0
            for page in self._pages("list_objects_v2", Prefix=self.key("blobs", "")):
                total += sum(entry["Size"] for entry in page.get("Contents", ()))
            self._usage = time.monotonic(), total
        return self._usage[1]

    def _pages(self, method: str, **params):
        try:
            yield from self.client.get_paginator(method).paginate(Bucket=self.bucket, **params)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise self._error(exc.operation_name, str(error.get("Code", "")),
                              exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)) from exc
        except BotoCoreError as exc:
            raise UnavailableError(f"cannot reach {self.where}: {first_line(exc)}") from exc

    def update(self, kind: str, name: str, change: Callable[[bytes | None], bytes | None]) -> None:
        """Optimistically: read the record and its ETag, change it, and PUT it only if it is still that
        one (If-Match, or If-None-Match: * when there was none); after a conflict, read again."""
        key = self.key(kind, name)
        for _ in range(UPDATE_TRIES):
            found = self._get(key)
            new = change(None if found is None else found[0])
            if new is None:
                return
            condition = {"IfMatch": found[1]} if found is not None else {"IfNoneMatch": "*"}
            try:
                self.call("put_object", CONFLICT | UNSUPPORTED, Key=key, Body=new, **condition)
                return
            except Answer as answer:
                if answer.code in UNSUPPORTED:
                    raise UsageError(f"{self.where} does not offer conditional writes (If-Match), which keep "
                                     f"{kind} consistent across servers; use a service that does") from None
            time.sleep(0.01)
        raise UnavailableError(f"{self.where}: {key} kept changing under {UPDATE_TRIES} tries to update it")

    def stale_tmp(self, older_than_s: float = 3600) -> None:
        """Abort multipart uploads under the prefix that a crashed writer left, once older than `older_than_s`."""
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=older_than_s)
        for page in self._pages("list_multipart_uploads", Prefix=self.key("blobs", "")):
            for upload in page.get("Uploads", ()):
                if upload["Initiated"] < cutoff:
                    try:
                        self.call("abort_multipart_upload", MISSING, Key=upload["Key"], UploadId=upload["UploadId"])
                    except Answer:
                        pass  # completed or aborted meanwhile
