"""An in-memory S3 for the simulator (bench/bench_sim.py): S3's answers to what the task queue and the
worker ask, without HTTP or botocore's serialisation, so that a million tasks fit in a run.

What it keeps of S3's semantics (tests/integration/test_sim_s3.py checks each against moto):
- ETags are the quoted MD5 of the body; LastModified and the response's ``date`` header come from the
  client's clock, to the second (as S3's HTTP headers give them), which is how task_queue reads leases;
- PutObject with IfNoneMatch="*" on an existing key, or IfMatch with another ETag, is refused with
  412 PreconditionFailed; IfMatch on a missing key answers 404 NoSuchKey; DeleteObject likewise;
- GetObject of a missing key raises NoSuchKey (404), HeadObject a bare "404"; GetObject with IfNoneMatch
  naming the current ETag answers 304 Not Modified, with no body; a Range "bytes=A-B" answers 206 with
  those bytes (to the end at most) and ContentRange, 416 InvalidRange from A at the end on;
- ListObjectsV2 pages of at most 1,000 keys in key order, with Prefix, Delimiter, StartAfter,
  ContinuationToken, KeyCount, IsTruncated and NextContinuationToken;
- errors are botocore ClientErrors with the Error.Code and HTTPStatusCode botocore would give.

Every call is one atomic request, applied when it is sent; the client then waits the modelled latency on
its clock (the simulator's virtual clock). A ``SimMeter`` counts the requests as bench_queue.py's Meter
does, by operation and status and by key class, with the body bytes, the refused conditional writes, and
each key's and each first path segment's busiest simulated second.
"""

from __future__ import annotations

import base64
import bisect
import collections
import datetime
import hashlib
import io
import threading
import time
import types
from email.utils import formatdate

from botocore.exceptions import ClientError

from common import key_class

PAGE_SIZE = 1000
# A ListObjectsV2 response's XML without its entries and prefix, and one entry without its key and size
# digits (Key, LastModified, ETag, ChecksumAlgorithm, Size, StorageClass), as measured on moto 5.2.5;
# listing bytes are reckoned from these.
LISTING_OVERHEAD_BYTES = 267
LISTING_ENTRY_BYTES = 228
WRITES = ("PutObject", "DeleteObject", "DeleteObjects")
_PRECONDITION = ("PreconditionFailed", 412, "At least one of the pre-conditions you specified did not hold")
_MISSING = ("NoSuchKey", 404, "The specified key does not exist.")


class NoSuchKey(ClientError):
    """What ``client.exceptions.NoSuchKey`` is on a botocore client."""


class NoSuchBucket(ClientError):
    pass


class WallClock:
    """Real time and no latency: the clock of an in-memory S3 used outside the simulator."""

    def time(self) -> float:
        return time.time()

    def pause(self, seconds: float) -> None:
        pass


class SimObject:
    __slots__ = ("body", "etag", "modified")

    def __init__(self, body: bytes, modified: int) -> None:
        self.body = body
        self.etag = '"' + hashlib.md5(body, usedforsecurity=False).hexdigest() + '"'
        self.modified = modified


class SimBody:
    """The streaming body of a GetObject answer: read(), iter_chunks(), close()."""

    def __init__(self, data: bytes) -> None:
        self._stream = io.BytesIO(data)

    def read(self, amount: int | None = None) -> bytes:
        return self._stream.read(amount)

    def iter_chunks(self, chunk_size: int = 1024):
        return iter(lambda: self._stream.read(chunk_size), b"")

    def close(self) -> None:
        self._stream.close()


class SimBucket:
    """Keys grouped by folder (the key up to its last "/"), so that a listing of locks/ or journal/ sorts
    only that folder, never the million inputs beside it."""

    def __init__(self) -> None:
        self.objects: dict[str, SimObject] = {}
        self.folders: dict[str, set[str]] = collections.defaultdict(set)
        self.version = 0
        self._sorted: dict[str, tuple[int, list[str]]] = {}  # prefix -> (version, keys)

    def store(self, key: str, obj: SimObject) -> None:
        if key not in self.objects:
            self.folders[key[: key.rfind("/") + 1]].add(key)
            self.version += 1
        self.objects[key] = obj

    def remove(self, key: str) -> bool:
        if self.objects.pop(key, None) is None:
            return False
        self.folders[key[: key.rfind("/") + 1]].discard(key)
        self.version += 1
        return True

    def keys_under(self, prefix: str) -> list[str]:
        """The keys starting with ``prefix``, sorted; kept while no key comes or goes (paginated listings)."""
        cached = self._sorted.get(prefix)
        if cached and cached[0] == self.version:
            return cached[1]
        keys = []
        for folder, members in self.folders.items():
            if folder.startswith(prefix):
                keys.extend(members)
            elif prefix.startswith(folder) and "/" not in prefix[len(folder) :]:
                # Only then can a key of this folder (no "/" after it) start with the prefix.
                keys.extend(key for key in members if key.startswith(prefix))
        keys.sort()
        if len(self._sorted) > 64:
            self._sorted.clear()
        self._sorted[prefix] = (self.version, keys)
        return keys


def first_segment(key: str) -> str:
    """The key's first path segment with its "/", or "(top)" for a key at the bucket's top (S3 scales
    request rates per prefix)."""
    cut = key.find("/")
    return key[: cut + 1] if cut >= 0 else "(top)"


class PeakRate:
    """The busiest simulated second of each name (a key, a prefix): only the current second's counts are
    kept, so a million keys cost no memory once their second has passed."""

    def __init__(self) -> None:
        self.second = None
        self.counts: collections.Counter = collections.Counter()
        self.peak = 0
        self.peak_name = ""
        self.peak_second = 0

    def add(self, name: str, second: int) -> None:
        if second != self.second:
            self._close()
            self.second = second
        self.counts[name] += 1

    def _close(self) -> None:
        if self.counts:
            name, count = self.counts.most_common(1)[0]
            if count > self.peak:
                self.peak, self.peak_name, self.peak_second = count, name, self.second
            self.counts.clear()

    def result(self) -> tuple[int, str, int]:
        """(peak per second, whose, in which second)."""
        self._close()
        return self.peak, self.peak_name, self.peak_second


class SimMeter:
    """Counts every request of the clients that share it, as bench_queue.Meter does on HTTP, plus the
    refused conditional writes and the peak rates. Its attributes named as Meter's serve verify()."""

    def __init__(self, claims_before_tail: int = 0) -> None:
        self.requests: collections.Counter = collections.Counter()  # op
        self.status: collections.Counter = collections.Counter()  # (op, status)
        self.by_class: collections.Counter = collections.Counter()  # (op, class)
        self.bytes_out: collections.Counter = collections.Counter()
        self.bytes_in: collections.Counter = collections.Counter()
        self.list_bytes = {"read": 0, "written": 0}
        self.list_bytes_by_file: collections.Counter = collections.Counter()
        self.listing_bytes = 0
        self.listing_by_prefix: collections.Counter = collections.Counter()
        self.output_writes: collections.Counter = collections.Counter()
        self.refused: collections.Counter = collections.Counter()  # (op, class) answered 412
        # Refused lock writes from ``tail_from`` on (simulated seconds): set once ``claims_before_tail``
        # different locks have been written, i.e. every task has been claimed once.
        self.claims_before_tail = claims_before_tail
        self._claimed: set[str] = set()
        self.tail_from: float | None = None
        self.refused_tail_locks = 0
        self.key_writes = PeakRate()
        self.prefix_requests = PeakRate()

    def record(self, now: float, op: str, key: str, status: int, sent: int, received: int, klass: str) -> None:
        self.requests[op] += 1
        self.status[(op, status)] += 1
        self.by_class[(op, klass)] += 1
        self.bytes_out[op] += sent
        self.bytes_in[op] += received
        second = int(now)
        self.prefix_requests.add(first_segment(key), second)
        if op in WRITES and op != "DeleteObjects":
            self.key_writes.add(key, second)
        if klass == "list" and status in (200, 206):  # 206: a stretch of the tasklist (a Range request)
            name = "folded/" if key.startswith("folded/") else key
            if op == "PutObject":
                self.list_bytes["written"] += sent
                self.list_bytes_by_file[(name, "written")] += sent
            elif op == "GetObject":
                self.list_bytes["read"] += received
                self.list_bytes_by_file[(name, "read")] += received
        if klass == "lock" and self.tail_from is None and self.claims_before_tail and op == "PutObject":
            if status == 200:
                self._claimed.add(key)
                if len(self._claimed) >= self.claims_before_tail:
                    self.tail_from, self._claimed = now, set()
        if status == 412:
            self.refused[(op, klass)] += 1
            if klass == "lock" and self.tail_from is not None and now >= self.tail_from:
                self.refused_tail_locks += 1
        if op == "PutObject" and status == 200 and klass == "output":
            self.output_writes[key] += 1

    @property
    def total(self) -> int:
        return sum(self.requests.values())


def _error(op: str, code: str, status: int, message: str, date: str, exception=ClientError, **extra) -> ClientError:
    response = {
        "Error": {"Code": code, "Message": message, **extra},
        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": {"date": date}, "RetryAttempts": 0},
    }
    return exception(response, op)


class SimS3:
    """The buckets; one store shared by every client of a run. Calls are serialised by a lock (the
    simulator runs one thread at a time anyway; the set-up may use a thread pool)."""

    def __init__(self) -> None:
        self.buckets: dict[str, SimBucket] = {}
        self.lock = threading.Lock()

    def client(self, clock=None, latency: float = 0.0, meter: SimMeter | None = None, jitter=None) -> SimClient:
        """A client whose requests take ``latency`` seconds on ``clock``, times ``jitter()`` when given."""
        return SimClient(self, clock or WallClock(), latency, meter, jitter)


class _Paginator:
    def __init__(self, client: SimClient) -> None:
        self.client = client

    def paginate(self, **kwargs):
        token = None
        while True:
            page = self.client.list_objects_v2(**kwargs, **({"ContinuationToken": token} if token else {}))
            yield page
            if not page["IsTruncated"]:
                return
            token = page["NextContinuationToken"]


class _Events:
    """botocore's event hooks as far as the worker uses them: before-send handlers run before each request
    (the worker counts its requests so)."""

    def __init__(self) -> None:
        self.before_send: list = []

    def register(self, name: str, handler, **_) -> None:
        if name.startswith("before-send"):
            self.before_send.append(handler)


class SimClient:
    """The subset of boto3's S3 client that task_queue.py, cicc_worker.py and the benchmarks call."""

    class exceptions:  # noqa: N801 - botocore's spelling
        NoSuchKey = NoSuchKey
        NoSuchBucket = NoSuchBucket
        ClientError = ClientError

    def __init__(self, s3: SimS3, clock, latency: float, meter: SimMeter | None, jitter=None) -> None:
        self.s3, self.clock, self.latency, self.meter, self.jitter = s3, clock, latency, meter, jitter
        self.meta = types.SimpleNamespace(events=_Events())

    # --- the request cycle

    def _begin(self, bucket: str, op: str) -> tuple[SimBucket, float, str]:
        for handler in self.meta.events.before_send:
            handler(request=None)
        now = self.clock.time()
        date = formatdate(int(now), usegmt=True)
        found = self.s3.buckets.get(bucket)
        if found is None and op != "CreateBucket":
            raise _error(op, "NoSuchBucket", 404, "The specified bucket does not exist", date, NoSuchBucket)
        return found, now, date

    def _end(self, now: float, op: str, key: str, status: int, sent: int = 0, received: int = 0, klass=None) -> None:
        if self.meter is not None:
            self.meter.record(now, op, key, status, sent, received, klass or key_class(key))
        if self.latency:
            self.clock.pause(self.latency * self.jitter() if self.jitter else self.latency)

    @staticmethod
    def _meta(status: int, date: str, **headers) -> dict:
        return {"HTTPStatusCode": status, "HTTPHeaders": {"date": date, **headers}, "RetryAttempts": 0}

    @staticmethod
    def _modified(obj: SimObject) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(obj.modified, datetime.timezone.utc)

    # --- buckets

    def create_bucket(self, Bucket: str, **_) -> dict:  # noqa: N803 - boto3's parameter names
        found, now, date = self._begin(Bucket, "CreateBucket")
        if found is None:
            self.s3.buckets[Bucket] = SimBucket()
        self._end(now, "CreateBucket", "", 200, klass="bucket")
        return {"Location": f"/{Bucket}", "ResponseMetadata": self._meta(200, date)}

    def delete_bucket(self, Bucket: str, **_) -> dict:  # noqa: N803
        found, now, date = self._begin(Bucket, "DeleteBucket")
        if found.objects:
            self._end(now, "DeleteBucket", "", 409, klass="bucket")
            raise _error("DeleteBucket", "BucketNotEmpty", 409, "The bucket you tried to delete is not empty", date)
        del self.s3.buckets[Bucket]
        self._end(now, "DeleteBucket", "", 204, klass="bucket")
        return {"ResponseMetadata": self._meta(204, date)}

    # --- objects

    def put_object(self, Bucket: str, Key: str, Body=b"", IfNoneMatch=None, IfMatch=None, **_) -> dict:  # noqa: N803
        if hasattr(Body, "read"):
            Body = Body.read()
        body = Body.encode() if isinstance(Body, str) else bytes(Body)
        bucket, now, date = self._begin(Bucket, "PutObject")
        with self.s3.lock:
            held = bucket.objects.get(Key)
            refusal, condition = None, {}
            if IfNoneMatch == "*" and held is not None:
                refusal, condition = _PRECONDITION, {"Condition": "If-None-Match"}
            elif IfMatch is not None and held is None:
                refusal = _MISSING
            elif IfMatch is not None and IfMatch != held.etag:
                refusal, condition = _PRECONDITION, {"Condition": "If-Match"}
            if refusal is None:
                obj = SimObject(body, int(now))
                bucket.store(Key, obj)
        if refusal:
            self._end(now, "PutObject", Key, refusal[1], sent=len(body))
            raise _error("PutObject", *refusal, date, NoSuchKey if refusal is _MISSING else ClientError, **condition)
        self._end(now, "PutObject", Key, 200, sent=len(body))
        return {"ETag": obj.etag, "ResponseMetadata": self._meta(200, date, etag=obj.etag)}

    def _lookup(self, op: str, Bucket: str, Key: str) -> tuple[SimObject, float, str]:  # noqa: N803
        bucket, now, date = self._begin(Bucket, op)
        obj = bucket.objects.get(Key)
        if obj is None:
            self._end(now, op, Key, 404)
            if op == "HeadObject":  # a HEAD answer has no body, so botocore knows only the status
                raise _error(op, "404", 404, "Not Found", date)
            raise _error(op, *_MISSING, date, NoSuchKey, Key=Key)
        return obj, now, date

    def _object_answer(self, obj: SimObject, date: str) -> dict:
        modified = self._modified(obj)
        headers = {
            "etag": obj.etag,
            "last-modified": formatdate(obj.modified, usegmt=True),
            "content-length": str(len(obj.body)),
        }
        return {
            "ETag": obj.etag,
            "LastModified": modified,
            "ContentLength": len(obj.body),
            "ContentType": "binary/octet-stream",
            "Metadata": {},
            "ResponseMetadata": self._meta(200, date, **headers),
        }

    def get_object(self, Bucket: str, Key: str, IfNoneMatch=None, Range=None, **_) -> dict:  # noqa: N803
        obj, now, date = self._lookup("GetObject", Bucket, Key)
        if IfNoneMatch is not None and IfNoneMatch in ("*", obj.etag):
            self._end(now, "GetObject", Key, 304)  # Not Modified: no body, and botocore raises it
            raise _error("GetObject", "304", 304, "Not Modified", date)
        if Range is None:
            self._end(now, "GetObject", Key, 200, received=len(obj.body))
            return {**self._object_answer(obj, date), "Body": SimBody(obj.body)}
        first, last = (int(end) for end in Range.removeprefix("bytes=").split("-"))
        if first >= len(obj.body):
            self._end(now, "GetObject", Key, 416)
            raise _error("GetObject", "InvalidRange", 416, "The requested range is not satisfiable", date)
        part = obj.body[first : last + 1]
        self._end(now, "GetObject", Key, 206, received=len(part))
        answer = self._object_answer(obj, date)
        answer.update(ContentLength=len(part), ContentRange=f"bytes {first}-{first + len(part) - 1}/{len(obj.body)}")
        answer["ResponseMetadata"]["HTTPStatusCode"] = 206
        return {**answer, "Body": SimBody(part)}

    def head_object(self, Bucket: str, Key: str, **_) -> dict:  # noqa: N803
        obj, now, date = self._lookup("HeadObject", Bucket, Key)
        self._end(now, "HeadObject", Key, 200)
        return self._object_answer(obj, date)

    def delete_object(self, Bucket: str, Key: str, IfMatch=None, **_) -> dict:  # noqa: N803
        bucket, now, date = self._begin(Bucket, "DeleteObject")
        with self.s3.lock:
            held = bucket.objects.get(Key)
            if IfMatch is not None and held is None:
                refusal = _MISSING
            elif IfMatch is not None and IfMatch != held.etag:
                refusal = _PRECONDITION
            else:
                refusal = None
                bucket.remove(Key)
        if refusal:
            self._end(now, "DeleteObject", Key, refusal[1])
            if refusal is _MISSING:
                raise _error("DeleteObject", *refusal, date, NoSuchKey)
            raise _error("DeleteObject", *refusal, date, Condition="If-Match")
        self._end(now, "DeleteObject", Key, 204)
        return {"ResponseMetadata": self._meta(204, date)}

    def delete_objects(self, Bucket: str, Delete: dict, **_) -> dict:  # noqa: N803
        bucket, now, date = self._begin(Bucket, "DeleteObjects")
        keys = [entry["Key"] for entry in Delete["Objects"]]
        with self.s3.lock:
            for key in keys:
                bucket.remove(key)
        # The request body is XML naming each key: about 30 bytes a key besides it.
        sent = sum(len(key) + 30 for key in keys)
        self._end(now, "DeleteObjects", keys[0] if keys else "", 200, sent=sent, klass="batch")
        answer = {"ResponseMetadata": self._meta(200, date)}
        if not Delete.get("Quiet"):
            answer["Deleted"] = [{"Key": key} for key in keys]
        return answer

    # --- listing

    def list_objects_v2(  # noqa: N803
        self, Bucket: str, Prefix: str = "", Delimiter=None, StartAfter=None, ContinuationToken=None, MaxKeys=1000, **_
    ) -> dict:
        bucket, now, date = self._begin(Bucket, "ListObjectsV2")
        limit = min(MaxKeys, PAGE_SIZE)
        with self.s3.lock:
            keys = bucket.keys_under(Prefix)
            after = base64.urlsafe_b64decode(ContinuationToken).decode() if ContinuationToken else StartAfter
            start = bisect.bisect_right(keys, after) if after else 0
            contents, common, last = [], [], None
            seen_common = set()
            position = start
            while position < len(keys) and len(contents) + len(common) < limit:
                key = keys[position]
                position += 1
                if Delimiter:
                    cut = key.find(Delimiter, len(Prefix))
                    if cut >= 0:
                        folder = key[: cut + len(Delimiter)]
                        if folder not in seen_common:
                            seen_common.add(folder)
                            common.append({"Prefix": folder})
                        last = key
                        continue
                obj = bucket.objects[key]
                contents.append(
                    {
                        "Key": key,
                        "LastModified": self._modified(obj),
                        "ETag": obj.etag,
                        "Size": len(obj.body),
                        "StorageClass": "STANDARD",
                    }
                )
                last = key
            if Delimiter and common:  # the rest of the last folder belongs to its common prefix
                folder = common[-1]["Prefix"]
                while position < len(keys) and keys[position].startswith(folder):
                    last = keys[position]
                    position += 1
            truncated = position < len(keys)
        answer = {
            "IsTruncated": truncated,
            "Name": Bucket,
            "Prefix": Prefix,
            "MaxKeys": MaxKeys,
            "KeyCount": len(contents) + len(common),
            "ResponseMetadata": self._meta(200, date),
        }
        if contents:
            answer["Contents"] = contents
        if Delimiter:
            answer["Delimiter"] = Delimiter
            if common:
                answer["CommonPrefixes"] = common
        if ContinuationToken:
            answer["ContinuationToken"] = ContinuationToken
        if StartAfter:
            answer["StartAfter"] = StartAfter
        if truncated:
            answer["NextContinuationToken"] = base64.urlsafe_b64encode(last.encode()).decode()
        received = (
            LISTING_OVERHEAD_BYTES
            + len(Prefix)
            + len(answer.get("NextContinuationToken", ""))
            + sum(LISTING_ENTRY_BYTES + len(item["Key"]) + len(str(item["Size"])) for item in contents)
        )
        received += sum(40 + len(item["Prefix"]) for item in common)
        if self.meter is not None:
            self.meter.listing_bytes += received
            self.meter.listing_by_prefix[Prefix] += received
        self._end(now, "ListObjectsV2", Prefix, 200, received=received, klass="listing:" + Prefix)
        return answer

    def get_paginator(self, operation: str) -> _Paginator:
        if operation != "list_objects_v2":
            raise NotImplementedError(f"the in-memory S3 paginates list_objects_v2 only, not {operation}")
        return _Paginator(self)
