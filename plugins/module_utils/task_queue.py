# -*- coding: utf-8 -*-
# Copyright: cicc.cloud contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The task-claim protocol of cicc.cloud: a work queue kept in S3, with leases.

One implementation, three callers: the modules (task_claim, task_complete, task_release,
task_info), the boot worker on each instance, and the tests. It imports only the standard
library and boto3's exceptions, never Ansible.

Keys, all under the queue prefix P:

  I<name>                     a task's input, under the input prefix I (the queue prefix unless the job says otherwise)
  P tasklist.txt              names still to do, one per line (people edit it)
  P completed.txt             names done           } rewritten only by compact(), from the
  P failed.txt                names given up on    } finished marks below
  P rejected.txt              tasklist lines that are not task names, with the reason
  P locks/<name>              the lease: a small JSON body (owner, token, attempts, lease length), padded to
                              LEASE_BYTES plus the lease in seconds; or, once the task is finished, its
                              finished mark (a few bytes: "completed" or "failed") until compact() folds it
  P compaction.json           held by the one compaction running (a short lease of its own)
  P failed/<name>.json        the failed record: reason and attempts, kept for good
  P manifests/<name>.json     what the task published (keys, sizes, ETags) and how: the mark of a task done
  P superseded/<name>/<t>.json  a manifest whose outputs are made again on request (recompute()), kept

A lock's size tells a listing what it is without reading it: a finished mark, or a lease and its length,
so that with LastModified and the listing's Date a worker knows which leases ran out.

A task's outputs are the job's business (plugins/module_utils/job.py names them); the protocol publishes
each with If-None-Match and then the manifest, and only the manifest makes the task done.

What it promises: every task listed ends either completed, with its outputs, or recorded failed with a
reason - never both, never neither, never twice. Why it holds:
- claim is PutObject If-None-Match:* on the lock: exactly one writer wins. A lock whose lease
  expired by S3's clock (LastModified against the response Date) is taken over with If-Match
  on its ETag, so only one of several takers wins that too.
- renew, release and the finished mark use If-Match on the holder's own ETag: a worker that lost its
  lease learns it at once and can neither extend nor overwrite the new owner's lock.
- the outputs and then the manifest are written before the task is marked finished, each with
  If-None-Match:*, so nothing published is ever overwritten; a task whose manifest exists is
  finished, not recomputed, and a task with no manifest is not done (whatever outputs it left).
  Only when a person asks for a task to be made again (recompute()) does its manifest move aside, and
  then an output is replaced only if it is the very object (If-Match on the ETag) that manifest lists.
- finishing a task costs one write, its lock turned into its finished mark; compact() (one at a time)
  folds the marks into the lists in batches with If-Match on every list, re-reading on conflict, and
  only then deletes them. Once the queue is drained the lists are exact.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import random
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

try:
    from botocore.config import Config
    from botocore.exceptions import ClientError, ConnectionError as S3ConnectionError, HTTPClientError
except ImportError:  # pragma: no cover - the callers check for boto3 and say what to install
    Config = ClientError = S3ConnectionError = HTTPClientError = None

TASKLIST = "tasklist.txt"
COMPLETED = "completed.txt"
FAILED = "failed.txt"
REJECTED = "rejected.txt"
COMPACTION = "compaction.json"
FOLDED = "folded/"
LIST_NAMES = (TASKLIST, COMPLETED, FAILED, REJECTED)
RESERVED_NAMES = LIST_NAMES + (COMPACTION,)

# A lease's lock is padded to LEASE_BYTES plus its lease in seconds; a finished mark is one of these bodies.
WINDOW_BYTES = 16 * 1024  # a picker's view of a large tasklist: about 1,000 names
LEASE_BYTES = 2048
MARKS = {"completed": b"completed\n", "failed": b"failed\n"}
_MARK_OF_SIZE = {len(body): state for state, body in MARKS.items()}
COMPACTION_SECONDS = 120  # a compaction's turn; one that stopped without giving it back holds it this long

MAX_NAME_BYTES = 200
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_PRECONDITION = ("PreconditionFailed", "412")
_CONFLICT = ("ConditionalRequestConflict", "409", "OperationAborted")
_MISSING = ("NoSuchKey", "404", "NotFound")
_DENIED = ("AccessDenied", "403")
_NOT_MODIFIED = ("304", "NotModified")
_RANGE = ("InvalidRange", "416")
_THROTTLED = ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "503")


class QueueError(Exception):
    """A queue operation could not be carried out."""


class ClaimConflict(QueueError):
    """Another worker holds a live lease on the task."""


class LeaseLost(QueueError):
    """The lease expired and another worker took the task over (or it was released)."""


class TaskFinished(QueueError):
    """The task needs no work: it is completed or recorded failed. ``state`` says which."""

    def __init__(self, name: str, state: str) -> None:
        super().__init__(f"task {name} is already {state}")
        self.name = name
        self.state = state


class BadInput(QueueError):
    """The task's input cannot be processed (missing, denied, too large): retrying won't help."""


class BadTaskName(QueueError):
    """A tasklist entry that cannot be a task name; it is never turned into a key or path."""


class OutputConflict(BadInput):
    """An output key holds other content than the task produced: it is never overwritten, and
    retrying cannot help (the task is recorded failed with this reason)."""


@dataclass(frozen=True)
class Queue:
    """Where a queue lives and its rules."""

    bucket: str
    prefix: str = ""
    lease_seconds: int = 120
    max_attempts: int = 3
    # Where the tasks' inputs are; None: under the queue prefix, as in the seed's layout.
    input_prefix: str | None = None

    def key(self, name: str) -> str:
        return self.prefix + name

    def input_key(self, name: str) -> str:
        return (self.prefix if self.input_prefix is None else self.input_prefix) + name

    def lock_key(self, name: str) -> str:
        return f"{self.prefix}locks/{name}"

    def failed_key(self, name: str) -> str:
        return f"{self.prefix}failed/{name}.json"

    def manifest_key(self, name: str) -> str:
        return f"{self.prefix}manifests/{name}.json"

    def superseded_key(self, name: str, stamp: str = "") -> str:
        return f"{self.prefix}superseded/{name}/{stamp}"


@dataclass
class Lease:
    """A claim held by ``owner``; ``etag`` is the lock's current ETag, the proof of ownership."""

    name: str
    owner: str
    token: str
    etag: str
    attempts: int
    instance_id: str = ""
    lease_seconds: int = 120
    last_error: str = ""
    renewed_at: float = field(default_factory=time.monotonic, compare=False)
    # The heartbeat thread and the publishing thread both renew: one at a time, or the second
    # would be refused by the first one's new ETag and mistake it for a lost lease.
    guard: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def as_dict(self) -> dict:
        keys = ("name", "owner", "token", "etag", "attempts", "instance_id", "lease_seconds", "last_error")
        return {key: getattr(self, key) for key in keys}

    def body(self) -> bytes:
        """The lock's content, padded with spaces to LEASE_BYTES + lease_seconds so that a listing shows the
        lease's length (small still: conditional writes are atomic for small bodies)."""
        text = json.dumps(
            {
                "owner": self.owner[:200],
                "token": self.token[:64],
                "instance_id": self.instance_id[:100],
                "attempts": self.attempts,
                "lease_seconds": self.lease_seconds,
                "last_error": self.last_error[:200],
                "written_at": time.time(),
            },
            sort_keys=True,
        ).encode()
        return text.ljust(LEASE_BYTES + self.lease_seconds)


# --- names and lists ------------------------------------------------------------------------------


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a task name, or None when it can.

    Names are plain object names inside the queue prefix: no folders, no dots or dashes first,
    so a name can never become a key or a local path outside the work area.
    """
    if not name:
        return "empty name"
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        return f"longer than {MAX_NAME_BYTES} bytes"
    if "/" in name or "\\" in name:
        return "contains a path separator; task names are plain object names in the queue prefix"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "contains a control character"
    if name in RESERVED_NAMES:
        return "is the name of a queue list"
    if not _NAME_RE.fullmatch(name):
        return "may hold only letters, digits and . _ + - and must start with a letter or digit"
    return None


def check_name(name: str) -> str:
    problem = name_problem(name)
    if problem:
        raise BadTaskName(f"task name {name!r} rejected: {problem}")
    return name


@dataclass
class TaskList:
    """A parsed tasklist: the names in order (first occurrence), and the lines that are not names."""

    names: list[str]
    rejected: list[tuple[str, str]]
    comments: list[str]


def parse_tasklist(raw: bytes) -> TaskList:
    """Read a tasklist as people write it: BOM, CRLF, trailing spaces, blank lines, # comments,
    duplicates and a missing final newline are all fine; lines that are not task names are
    returned in ``rejected`` with the reason, never dropped silently."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    names: list[str] = []
    seen: set[str] = set()
    rejected: list[tuple[str, str]] = []
    comments: list[str] = []
    for raw_line in raw.split(b"\n"):
        try:
            line = raw_line.decode("utf-8").strip()
        except UnicodeDecodeError:
            rejected.append((raw_line.decode("utf-8", "backslashreplace").strip(), "not UTF-8"))
            continue
        if not line:
            continue
        if line.startswith("#"):
            comments.append(line)
            continue
        problem = name_problem(line)
        if problem:
            rejected.append((line, problem))
        elif line not in seen:
            seen.add(line)
            names.append(line)
    return TaskList(names, rejected, comments)


def _lines(names) -> bytes:
    return "".join(f"{name}\n" for name in names).encode()


# --- S3 calls -------------------------------------------------------------------------------------


def _code(error: Exception) -> str:
    return str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))


def _is(error: Exception, codes: tuple[str, ...]) -> bool:
    return ClientError is not None and isinstance(error, ClientError) and _code(error) in codes


def transient(error: BaseException) -> bool:
    """Whether an S3 error passes by itself: throttling, a server error, or the network (a connection
    refused, dropped or timed out). What the client's own retries did not get through is worth waiting
    out; every step of the protocol is conditional writes, so taking one up again is safe."""
    if ClientError is None:
        return False
    if isinstance(error, (S3ConnectionError, HTTPClientError)):
        return True
    if not isinstance(error, ClientError):
        return False
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return status >= 500 or _code(error) in _THROTTLED


# The retries of every S3 client of the protocol, the modules' and the worker's: S3 answers 500/503 now and then
# under load, and throttles; botocore's standard mode retries those (with backoff) up to this many attempts, and
# what outlasts them is waited out by the callers (transient()).
S3_RETRIES = {"max_attempts": 10, "mode": "standard"}


def s3_config(**settings) -> Config:
    """The botocore configuration of an S3 client of the protocol: S3_RETRIES, and ``settings`` (a pool size)."""
    return Config(retries=dict(S3_RETRIES), **settings)


def _backoff(attempt: int) -> None:
    time.sleep(min(2.0, 0.05 * 2**attempt) * random.uniform(0.5, 1.5))


def _put(client, bucket: str, key: str, body: bytes, **conditions) -> str:
    """PutObject that retries S3's 409 (a concurrent conditional write) and returns the new ETag."""
    for attempt in range(8):
        if hasattr(body, "seek"):
            body.seek(0)
        try:
            return client.put_object(Bucket=bucket, Key=key, Body=body, **conditions)["ETag"]
        except Exception as error:  # noqa: BLE001 - filtered by _is
            if not _is(error, _CONFLICT) or attempt == 7:
                raise
            _backoff(attempt)
    raise AssertionError("unreachable")


def _get(client, bucket: str, key: str) -> tuple[bytes, str, dict] | None:
    """(body, etag, response) of an object, or None when it does not exist."""
    try:
        response = client.get_object(Bucket=bucket, Key=key)
    except Exception as error:  # noqa: BLE001
        if _is(error, _MISSING):
            return None
        raise
    return response["Body"].read(), response["ETag"], response


def _get_if_changed(client, bucket: str, key: str, etag: str) -> tuple[bytes, str] | None:
    """(body, etag) of an object unless its ETag is still ``etag`` (None then: S3 answers 304 with no body);
    (b"", "") when it does not exist."""
    try:
        response = client.get_object(Bucket=bucket, Key=key, **({"IfNoneMatch": etag} if etag else {}))
    except Exception as error:  # noqa: BLE001
        if _is(error, _NOT_MODIFIED):
            return None
        if _is(error, _MISSING):
            return b"", ""
        raise
    return response["Body"].read(), response["ETag"]


def _head(client, bucket: str, key: str) -> dict | None:
    """HeadObject's answer, or None when the object does not exist."""
    try:
        return client.head_object(Bucket=bucket, Key=key)
    except Exception as error:  # noqa: BLE001
        if _is(error, _MISSING):
            return None
        raise


def _exists(client, bucket: str, key: str) -> bool:
    return _head(client, bucket, key) is not None


def _server_now(response: dict):
    return parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])


def _lease_age(response: dict) -> float:
    """Seconds since the lock was last written, by S3's clock (never the worker's)."""
    return (_server_now(response) - response["LastModified"]).total_seconds()


@dataclass(frozen=True)
class LockEntry:
    """A lock as a listing shows it: its state ("completed" or "failed" for a finished mark, "held" for a
    lease), its age by S3's clock, the lease's length read from its size, and its ETag."""

    name: str
    state: str
    age: float
    lease_seconds: float | None
    etag: str

    @property
    def expired(self) -> bool:
        """Whether the lease ran out (or its size does not say how long it is: then reading it tells)."""
        return self.state == "held" and (self.lease_seconds is None or self.age >= self.lease_seconds)


def list_locks(client, queue: Queue, first: str = "", last: str = "") -> dict[str, LockEntry]:
    """The queue's locks by task name, from a listing alone (read-only): all of them, or those of the names
    from ``first`` to ``last`` (in key order: one page for a picker's window, whatever the queue's size)."""
    entries = {}
    prefix = queue.lock_key("")
    request = {"Bucket": queue.bucket, "Prefix": prefix}
    if first:
        request["StartAfter"] = queue.lock_key(first)[:-1]  # just before first's lock
    for page in client.get_paginator("list_objects_v2").paginate(**request):
        now = _server_now(page)
        for item in page.get("Contents", []):
            name = item["Key"][len(prefix) :]
            if last and name > last:
                return entries
            size, state = item["Size"], _MARK_OF_SIZE.get(item["Size"], "held")
            lease = size - LEASE_BYTES if size >= LEASE_BYTES else None
            age = (now - item["LastModified"]).total_seconds()
            entries[name] = LockEntry(name, state, age, lease, item["ETag"])
    return entries


def finished_marks(locks: dict[str, LockEntry]) -> dict[str, set[str]]:
    """The names of the finished marks among ``locks``, by state."""
    marks: dict[str, set[str]] = {state: set() for state in MARKS}
    for entry in locks.values():
        if entry.state in MARKS:
            marks[entry.state].add(entry.name)
    return marks


# --- the protocol ---------------------------------------------------------------------------------


def read_tasklist(client, queue: Queue) -> TaskList:
    found = _get(client, queue.bucket, queue.key(TASKLIST))
    return parse_tasklist(found[0] if found else b"")


def claim(
    client,
    queue: Queue,
    name: str,
    owner: str,
    instance_id: str = "",
    take_over: bool = True,
    token: str = "",
    lease_seconds: int | None = None,
) -> Lease:
    """Claim ``name`` for ``owner``, for ``lease_seconds`` (the queue's lease when None).

    Raises ClaimConflict while another owner's lease is live (or whenever the lock exists, with
    take_over=False: one request per busy task for a worker scanning for free ones), and
    TaskFinished when the task needs no work. Passing the ``token`` of an earlier attempt whose
    reply was lost finds that claim again instead of failing against one's own lock.
    """
    check_name(name)
    lease = Lease(name, owner, token or uuid.uuid4().hex, "", 1, instance_id, lease_seconds or queue.lease_seconds)
    for _attempt in range(3):
        try:
            lease.etag = _put(client, queue.bucket, queue.lock_key(name), lease.body(), IfNoneMatch="*")
            break
        except Exception as error:  # noqa: BLE001
            if not _is(error, _PRECONDITION):
                raise
        if not take_over:
            raise ClaimConflict(f"task {name} is locked")
        found = _get(client, queue.bucket, queue.lock_key(name))
        if found is not None:
            _take_over(client, queue, lease, *found)
            break
        # The lock was deleted between our two calls: try a fresh claim again.
    else:
        raise ClaimConflict(f"task {name} keeps changing hands")
    lease.renewed_at = time.monotonic()
    _check_unfinished(client, queue, lease)
    return lease


def predict_claim(client, queue: Queue, name: str, lease: Lease, held: dict | None) -> tuple[str, object]:
    """What claim() of ``name`` by ``lease``'s owner (and token) would do, by reading only: ("claim", the lease it
    would hold), ("held", why) or ("finished", state). ``held``: the task's claim as queue_status lists it."""
    if held is not None:
        lock = read_lock(client, queue, name) if lease.token else None
        mine = lock is not None and lock[0].get("token") == lease.token
        if not mine and not held["expired"]:
            return "held", f"task {name} is held by {held['owner']} (lease {held['lease_age_seconds']:.0f} s old)"
        lease.attempts = held["attempts"] if mine else held["attempts"] + 1
        if lease.attempts > queue.max_attempts:
            return "finished", "failed"
    state = finished_state(client, queue, name)
    return ("finished", state) if state else ("claim", lease)


def _take_over(client, queue: Queue, lease: Lease, body: bytes, etag: str, response: dict) -> None:
    held = _lock_content(body)
    if "finished" in held:
        raise TaskFinished(lease.name, held["finished"])
    if held.get("token") == lease.token:  # our own claim whose reply was lost: refresh it
        lease.etag, lease.attempts = etag, held.get("attempts", 1)
        try:
            renew(client, queue, lease)
        except LeaseLost as error:
            raise ClaimConflict(str(error)) from error
        return
    age = _lease_age(response)
    if age < held.get("lease_seconds", queue.lease_seconds):
        raise ClaimConflict(f"task {lease.name} is held by {held.get('owner')} (lease {age:.0f} s old)")
    lease.attempts = held.get("attempts", 0) + 1
    lease.last_error = held.get("last_error") or f"lease of {held.get('owner')} expired"
    if lease.attempts > queue.max_attempts:
        lease.etag, lease.attempts = etag, lease.attempts - 1
        try:
            _record_failed(client, queue, lease, f"gave up after {lease.attempts} attempts: {lease.last_error}")
        except LeaseLost as error:
            raise ClaimConflict(f"task {lease.name} was taken over by another worker first") from error
        raise TaskFinished(lease.name, "failed")
    try:
        lease.etag = _put(client, queue.bucket, queue.lock_key(lease.name), lease.body(), IfMatch=etag)
    except Exception as error:  # noqa: BLE001
        if _is(error, _PRECONDITION + _MISSING):
            raise ClaimConflict(f"task {lease.name} was taken over by another worker first") from error
        raise


def _check_unfinished(client, queue: Queue, lease: Lease) -> None:
    """Under the lock, make sure the task still needs work; a finished one gets its finished mark back."""
    state = finished_state(client, queue, lease.name)
    if state:
        # Output published or failed record written but maybe never marked (its worker died in between),
        # or marked and folded already (a snapshot older than the compaction): mark it, don't recompute.
        _mark(client, queue, lease, state)
        raise TaskFinished(lease.name, state)


def _lock_content(body: bytes) -> dict:
    """A lock's body read: the lease's fields, or {"finished": state} for a finished mark."""
    for state, mark in MARKS.items():
        if body == mark:
            return {"finished": state}
    return json.loads(body)


def read_lock(client, queue: Queue, name: str) -> tuple[dict, str] | None:
    """The lock's content (see _lock_content) and ETag, or None when the task is not locked (read-only)."""
    found = _get(client, queue.bucket, queue.lock_key(name))
    return (_lock_content(found[0]), found[1]) if found else None


def finished_state(client, queue: Queue, name: str) -> str | None:
    """ "completed" when the task's manifest exists, "failed" when its failed record does, else None
    (read-only)."""
    if _exists(client, queue.bucket, queue.manifest_key(name)):
        return "completed"
    if _exists(client, queue.bucket, queue.failed_key(name)):
        return "failed"
    return None


def finished_tasks(client, queue: Queue, locks: dict[str, LockEntry] | None = None) -> dict[str, set[str]]:
    """The names of the finished tasks by state: in the lists, in folded segments not merged yet, and
    marked (from ``locks``, listed first when not given) (read-only)."""
    finished = finished_marks(list_locks(client, queue) if locks is None else locks)
    for state, items in _folded_segments(client, queue).items():
        finished.setdefault(state, set()).update(_folded_names(client, queue, items))
    for state, list_name in (("completed", COMPLETED), ("failed", FAILED)):
        found = _get(client, queue.bucket, queue.key(list_name))
        finished[state] |= set(parse_tasklist(found[0]).names) if found else set()
    return finished


def recorded_completed(client, queue: Queue, name: str) -> bool:
    """Whether the task is recorded completed: its lock is its completed mark, or it has no lock and
    completed.txt lists it (read-only)."""
    lock = read_lock(client, queue, name)
    if lock is not None:
        return lock[0].get("finished") == "completed"
    return name in finished_tasks(client, queue, locks={})["completed"]


def read_manifest(client, queue: Queue, name: str) -> dict | None:
    """The task's manifest, or None when the task is not done (read-only)."""
    found = _get(client, queue.bucket, queue.manifest_key(name))
    return json.loads(found[0]) if found else None


def describe_outputs(client, queue: Queue, keys: list[str]) -> list[dict]:
    """Key, size and ETag of each output object, for a manifest of outputs published by other means
    (read-only). Raises QueueError naming the first key that does not exist."""
    files = []
    for key in keys:
        try:
            head = client.head_object(Bucket=queue.bucket, Key=key)
        except Exception as error:  # noqa: BLE001
            if _is(error, _MISSING):
                raise QueueError(f"output s3://{queue.bucket}/{key} does not exist; publish it first") from error
            raise
        files.append({"name": key.rsplit("/", 1)[-1], "key": key, "size": head["ContentLength"], "etag": head["ETag"]})
    return files


def renew(client, queue: Queue, lease: Lease) -> Lease:
    """Extend the lease (the heartbeat). Raises LeaseLost if anyone else wrote the lock since."""
    key = queue.lock_key(lease.name)
    with lease.guard:
        try:
            lease.etag = _put(client, queue.bucket, key, lease.body(), IfMatch=lease.etag)
        except Exception as error:  # noqa: BLE001
            if not _is(error, _PRECONDITION + _MISSING):
                raise
            # A renewal whose reply was lost (a dropped connection) changed the ETag: the lock is still ours,
            # unless this claim gave it back since (a lease given back is not renewed, only given back again).
            held = read_lock(client, queue, lease.name) if _is(error, _PRECONDITION) else None
            lost = LeaseLost(f"lease on {lease.name} lost: another worker took it over")
            given_back = held is not None and held[0].get("lease_seconds", 0) == 0 < lease.lease_seconds
            if not held or held[0].get("token") != lease.token or given_back:
                raise lost from error
            try:
                lease.etag = _put(client, queue.bucket, key, lease.body(), IfMatch=held[1])
            except Exception as again:  # noqa: BLE001
                raise (lost if _is(again, _PRECONDITION + _MISSING) else again) from again
        lease.renewed_at = time.monotonic()
    return lease


def ensure_live(client, queue: Queue, lease: Lease) -> None:
    """Renew unless the lease was renewed recently, so a paused worker finds out before it writes."""
    if time.monotonic() - lease.renewed_at > lease.lease_seconds / 2:
        renew(client, queue, lease)


def download(client, queue: Queue, key: str, path, max_bytes: int | None = None) -> str | None:
    """Stream an object of the queue's bucket to a local file (in full or not at all).
    Returns its ETag, or None when it does not exist."""
    try:
        response = client.get_object(Bucket=queue.bucket, Key=key)
    except Exception as error:  # noqa: BLE001
        if _is(error, _MISSING):
            return None
        if _is(error, _DENIED):
            raise BadInput(f"access to s3://{queue.bucket}/{key} is denied") from error
        raise
    size = response["ContentLength"]
    if max_bytes is not None and size > max_bytes:
        response["Body"].close()
        raise BadInput(f"s3://{queue.bucket}/{key} is {size} bytes, more than the {max_bytes} the local disk allows")
    partial = f"{path}.part"
    with open(partial, "wb") as out:
        for chunk in response["Body"].iter_chunks(1 << 20):
            out.write(chunk)
    os.replace(partial, path)
    return response["ETag"]


def _md5(path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as source:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def publish_file(client, queue: Queue, lease: Lease, key: str, path) -> dict:
    """Upload one output of a claimed task to ``key``, never over anything: If-None-Match:*.

    An object already at ``key`` with the same bytes (an earlier attempt that died before its
    manifest, or a deterministic command run again) counts as published; one with other bytes raises
    OutputConflict and is left as it is. Returns {"key", "size", "etag", "existing"}."""
    ensure_live(client, queue, lease)
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as body:
            etag = _put(client, queue.bucket, key, body, IfNoneMatch="*")
        return {"key": key, "size": size, "etag": etag, "existing": False}
    except Exception as error:  # noqa: BLE001
        if not _is(error, _PRECONDITION):
            raise
    # Read the file again only then: an upload is one read of it.
    head, md5 = client.head_object(Bucket=queue.bucket, Key=key), _md5(path)
    if head["ETag"].strip('"') == md5:
        return {"key": key, "size": size, "etag": head["ETag"], "existing": True}
    if (key, head["ETag"]) not in superseded_outputs(client, queue, lease.name):
        raise OutputConflict(
            f"output s3://{queue.bucket}/{key} exists with other content than task {lease.name} produced "
            f"(ETag {head['ETag']}, this attempt's MD5 {md5}): it is not overwritten; remove it, publish the "
            "job under another outputs prefix, or ask for the task to be recomputed"
        )
    with open(path, "rb") as body:  # made again on request: exactly the object its old manifest lists
        etag = _put(client, queue.bucket, key, body, IfMatch=head["ETag"])
    return {"key": key, "size": size, "etag": etag, "existing": False, "replaced": head["ETag"]}


def superseded_manifests(client, queue: Queue, name: str) -> list[dict]:
    """The task's manifests set aside by recompute(), oldest first (read-only)."""
    found = []
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=queue.bucket, Prefix=queue.superseded_key(name))
    for page in pages:
        for item in page.get("Contents", []):
            body = _get(client, queue.bucket, item["Key"])
            found += [json.loads(body[0])] if body else []
    return found


def superseded_outputs(client, queue: Queue, name: str) -> set[tuple[str, str]]:
    """(key, ETag) of every output the task's superseded manifests list: what a new attempt may replace."""
    return {
        (entry["key"], entry["etag"]) for old in superseded_manifests(client, queue, name) for entry in old["files"]
    }


def publish_manifest(client, queue: Queue, lease: Lease, manifest: dict) -> bool:
    """Write the task's manifest once its outputs are published: the task is then done. Returns False
    when a manifest was there already (an earlier attempt finished it; the first one stands)."""
    ensure_live(client, queue, lease)
    body = json.dumps({"task": lease.name, **manifest}, indent=1, sort_keys=True).encode()
    try:
        _put(client, queue.bucket, queue.manifest_key(lease.name), body, IfNoneMatch="*")
    except Exception as error:  # noqa: BLE001
        if _is(error, _PRECONDITION):
            return False
        raise
    return True


def complete(client, queue: Queue, lease: Lease, published: bool = False) -> None:
    """Mark a task as completed: its lock becomes its finished mark. Idempotent. Unless the caller has just
    published the manifest itself, its presence is checked first: no manifest, no completion."""
    if not published and not _exists(client, queue.bucket, queue.manifest_key(lease.name)):
        raise QueueError(f"task {lease.name} has no manifest {queue.manifest_key(lease.name)}; publish it first")
    _mark(client, queue, lease, "completed")


def release(client, queue: Queue, lease: Lease, error: str = "") -> str:
    """Give the task back. With ``error`` the attempt counts: after ``max_attempts`` the task is
    recorded failed; otherwise the lock is left expired so the next worker takes it over and
    carries the attempt count on. Without ``error`` (e.g. the machine is being reclaimed) the
    attempt does not count; a first attempt given back deletes the lock (with If-Match on its ETag, which
    not every S3 implementation honours on a delete). Raises LeaseLost when the lease is no longer ours
    and the lock is to be rewritten. Returns the task's state: "pending" or "failed"."""
    if error:
        lease.last_error = error
        if release_outcome(queue, lease, error) == "failed":
            _record_failed(client, queue, lease, f"gave up after {lease.attempts} attempts: {error}")
            return "failed"
    else:
        lease.attempts -= 1
        if lease.attempts <= 0:
            _delete_lock(client, queue, lease)
            return "pending"
    lease.lease_seconds = 0  # expired at once: free for the next claim
    renew(client, queue, lease)
    return "pending"


def release_outcome(queue: Queue, lease: Lease, error: str = "", fail_now: bool = False) -> str:
    """What release() (or, ``fail_now``, fail()) leaves the task as: "failed" or "pending" (no S3 call)."""
    return "failed" if fail_now or (error and lease.attempts >= queue.max_attempts) else "pending"


def released_state(client, queue: Queue, lease: Lease) -> str | None:
    """The task's state when this lease was given back already (a re-run), None while the lease holds the lock
    (read-only). Raises LeaseLost when another owner holds the task now: the lease has nothing left to give."""
    lock = read_lock(client, queue, lease.name)
    if lock is not None and lock[1] == lease.etag:
        return None
    if finished_state(client, queue, lease.name) == "failed":
        return "failed"
    if lock is None:
        return "pending"
    held = lock[0]
    if held.get("token") == lease.token and held.get("lease_seconds") == 0:
        return "pending"  # released by this claim, not yet taken by anyone
    raise LeaseLost(f"lease on {lease.name} lost: {held.get('owner')} holds the task now")


def fail(client, queue: Queue, lease: Lease, reason: str) -> None:
    """Record the task failed for good (bad input: no retry can help) and let its lock go."""
    lease.last_error = reason
    _record_failed(client, queue, lease, reason)


def _record_failed(client, queue: Queue, lease: Lease, reason: str) -> None:
    # Prove the lock is still ours first: a worker that lost its lease must not record failed a
    # task its successor may be completing.
    renew(client, queue, lease)
    record = {"task": lease.name, "reason": reason, "attempts": lease.attempts, "owner": lease.owner}
    _put(client, queue.bucket, queue.failed_key(lease.name), json.dumps(record, indent=1).encode())
    _mark(client, queue, lease, "failed")


def _mark(client, queue: Queue, lease: Lease, state: str) -> bool:
    """Turn the lease's lock into the task's finished mark, only if the lock is still ours: a worker that
    lost its lease leaves the new owner's lock alone (the new owner finds the task finished and marks it).
    Returns False when the lock was no longer ours. The lease keeps the lease's ETag: a renewal after this
    is refused, never turns the mark back into a lease."""
    with lease.guard:
        try:
            _put(client, queue.bucket, queue.lock_key(lease.name), MARKS[state], IfMatch=lease.etag)
        except Exception as error:  # noqa: BLE001
            if _is(error, _PRECONDITION + _MISSING):
                return False
            raise
    return True


def _delete_lock(client, queue: Queue, lease: Lease) -> bool:
    """Delete the lock only if it is still ours. Returns False when it no longer was."""
    try:
        client.delete_object(Bucket=queue.bucket, Key=queue.lock_key(lease.name), IfMatch=lease.etag)
    except Exception as error:  # noqa: BLE001
        if _is(error, _PRECONDITION + _MISSING):
            return False
        raise
    return True


# --- the lists ------------------------------------------------------------------------------------


def compact(client, queue: Queue, force: bool = False, min_batch: int = 1) -> dict:
    """Fold the finished marks into the lists: their names appended to a folded segment (folded/), taken
    out of tasklist.txt with the lines that are not names (recorded in rejected.txt), then the marks
    deleted; the segments are merged into completed.txt / failed.txt once they hold as much as the list
    (so each list is rewritten a few times in all, not once a batch), and always when ``force``. Every
    list write is conditional on the ETag read; on a conflict the list is read and the edit applied
    again, so people editing the tasklist lose nothing. One compaction runs at a time: with another one
    running this one is skipped ("busy"). ``force`` (a worker at its end, a person) folds any batch,
    marks the expired locks left on finished tasks, and waits for a running compaction to end, then folds
    what that one left. Returns what moved."""
    moved = {"completed": 0, "failed": 0, "rejected": 0, "conflicts": 0, "locks": 0, "busy": False}
    locks = list_locks(client, queue)
    if sum(len(names) for names in finished_marks(locks).values()) < min_batch and not force:
        return moved
    turn = _compaction_turn(client, queue)
    if turn is None and not force:
        return {**moved, "busy": True}
    while turn is None:
        _wait_for_turn(client, queue)
        locks = list_locks(client, queue)
        if not any(finished_marks(locks).values()) and not any(entry.expired for entry in locks.values()):
            return moved  # the compaction that ran folded everything there is
        turn = _compaction_turn(client, queue)
    try:
        marks = finished_marks(locks)
        if force:
            moved["locks"] = _mark_finished_locks(client, queue, locks, marks)
        for state, names in marks.items():
            if names:  # recorded first: a name leaves the tasklist only once a segment holds it
                stamp = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
                _put(client, queue.bucket, queue.key(f"{FOLDED}{state}-{stamp}.txt"), _lines(sorted(names)))
            moved[state] = len(names)
        moved["rejected"], moved["conflicts"] = _retried(lambda: _fold_tasklist(client, queue, marks))
        moved["conflicts"] += _retried(lambda: _merge_folded(client, queue, force))[1]
        # A mark is final (nothing rewrites it), so it goes unconditionally; a claim that finds the lock
        # gone finds the task's manifest or failed record.
        folded = [queue.lock_key(name) for name in sorted(set().union(*marks.values()))]
        for first in range(0, len(folded), 1000):
            chunk = [{"Key": key} for key in folded[first : first + 1000]]
            client.delete_objects(Bucket=queue.bucket, Delete={"Objects": chunk, "Quiet": True})
        return moved
    finally:
        _end_turn(client, queue, turn)


def _retried(edit) -> tuple:
    """(what ``edit`` returned, the conflicts it met): a list edit is read and applied again while another
    writer changed the list in between (If-Match refused)."""
    for attempt in range(20):
        try:
            return edit(), attempt
        except Exception as error:  # noqa: BLE001
            if not _is(error, _PRECONDITION + _CONFLICT):
                raise
            _backoff(attempt)
    raise QueueError("the queue's lists kept changing while they were edited; try again")


def _compaction_turn(client, queue: Queue) -> str | None:
    """Take the compaction's turn: the ETag of compaction.json written by us, or None while another
    compaction holds it. Looked at first (a read), so that workers finding it taken write nothing."""
    key, body = queue.key(COMPACTION), json.dumps({"started_at": time.time()}).encode()
    for _attempt in range(3):
        head = _head(client, queue.bucket, key)
        if head is not None and _lease_age(head) < COMPACTION_SECONDS:
            return None
        try:  # free, or its compaction stopped without giving the turn back
            condition = {"IfMatch": head["ETag"]} if head else {"IfNoneMatch": "*"}
            return _put(client, queue.bucket, key, body, **condition)
        except Exception as error:  # noqa: BLE001
            if not _is(error, _PRECONDITION + _MISSING):
                raise
    return None


def _wait_for_turn(client, queue: Queue) -> None:
    """Wait until the running compaction ends, or its turn runs out (one HEAD a second or so)."""
    while True:
        head = _head(client, queue.bucket, queue.key(COMPACTION))
        if head is None or _lease_age(head) >= COMPACTION_SECONDS:
            return
        time.sleep(random.uniform(0.5, 1.5))


def _end_turn(client, queue: Queue, etag: str) -> None:
    try:
        client.delete_object(Bucket=queue.bucket, Key=queue.key(COMPACTION), IfMatch=etag)
    except Exception as error:  # noqa: BLE001 - a turn left behind runs out by itself
        if not _is(error, _PRECONDITION + _MISSING):
            raise


def _mark_finished_locks(client, queue: Queue, locks: dict[str, LockEntry], marks: dict[str, set[str]]) -> int:
    """Turn the expired locks left on finished tasks into their marks (added to ``marks``): their holder stopped
    between publishing and marking (killed, or S3 went away), and no claim looks at a finished task again.
    Each is rewritten only if unchanged since listed; a holder still finishing finds its lock marked, which
    it takes in its stride. Returns how many."""
    marked = 0
    for entry in locks.values():
        # A live lease's holder marks its task itself; only a lease that ran out may have lost its holder.
        state = entry.expired and finished_state(client, queue, entry.name)
        if not state:
            continue
        try:
            _put(client, queue.bucket, queue.lock_key(entry.name), MARKS[state], IfMatch=entry.etag)
        except Exception as error:  # noqa: BLE001
            if _is(error, _PRECONDITION + _MISSING):
                continue
            raise
        marks[state].add(entry.name)
        marked += 1
    return marked


def _read_list(client, queue: Queue, list_name: str) -> tuple[bytes, dict]:
    """A list's body and the condition that writes it back only if nobody changed it meanwhile."""
    found = _get(client, queue.bucket, queue.key(list_name))
    return (found[0], {"IfMatch": found[1]}) if found else (b"", {"IfNoneMatch": "*"})


def _fold_tasklist(client, queue: Queue, finished: dict[str, set[str]]) -> int:
    """Take the finished names and the lines that are not names out of tasklist.txt (those recorded in
    rejected.txt); returns how many lines were rejected."""
    task_raw, task_cond = _read_list(client, queue, TASKLIST)
    tasks = parse_tasklist(task_raw)
    if tasks.rejected:
        raw, cond = _read_list(client, queue, REJECTED)
        recorded = set(raw.decode("utf-8", "replace").splitlines())
        lines = [f"{line}\t{reason}" for line, reason in tasks.rejected]
        additions = [line for line in lines if line not in recorded]
        if additions:
            _put(client, queue.bucket, queue.key(REJECTED), raw + _lines(additions), **cond)
    done = set().union(*finished.values())
    remaining = [name for name in tasks.names if name not in done]
    if len(remaining) < len(tasks.names) or tasks.rejected:
        # Rewritten normalised: comments first, then the names sorted (a picker's window of it is then a
        # stretch of lock keys), one a line, LF, no duplicates.
        _put(client, queue.bucket, queue.key(TASKLIST), _lines(tasks.comments + sorted(remaining)), **task_cond)
    return len(tasks.rejected)


def _folded_segments(client, queue: Queue) -> dict[str, list[dict]]:
    """The folded segments by state ("completed", "failed"), oldest first: their listing entries."""
    segments: dict[str, list[dict]] = {state: [] for state in MARKS}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=queue.bucket, Prefix=queue.key(FOLDED)):
        for item in page.get("Contents", []):
            state = item["Key"][len(queue.key(FOLDED)) :].split("-", 1)[0]
            segments.setdefault(state, []).append(item)
    return segments


def _folded_names(client, queue: Queue, items: list[dict]) -> list[str]:
    names: list[str] = []
    for item in items:
        found = _get(client, queue.bucket, item["Key"])
        names += parse_tasklist(found[0]).names if found else []
    return names


def _merge_folded(client, queue: Queue, force: bool) -> None:
    """Merge the folded segments of each state into its list, without duplicates, once they hold as many
    bytes as the list (or ``force``), then delete them."""
    for state, items in _folded_segments(client, queue).items():
        list_name = COMPLETED if state == "completed" else FAILED
        head = _head(client, queue.bucket, queue.key(list_name)) if items and not force else None
        if not items or (head and sum(item["Size"] for item in items) < head["ContentLength"]):
            continue
        _append_names(client, queue, list_name, _folded_names(client, queue, items))
        keys = [{"Key": item["Key"]} for item in items]
        for first in range(0, len(keys), 1000):
            client.delete_objects(Bucket=queue.bucket, Delete={"Objects": keys[first : first + 1000], "Quiet": True})


def list_inputs(client, queue: Queue, pattern: str = "*", exclude=()) -> list[str]:
    """Names of the objects directly under the input prefix that match ``pattern`` (fnmatch) and can
    be task names, sorted; the queue's lists and ``exclude`` (the shared files) left out (read-only)."""
    prefix = queue.input_key("")
    names = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=queue.bucket, Prefix=prefix, Delimiter="/"):
        for item in page.get("Contents", []):
            name = item["Key"][len(prefix) :]
            if fnmatch.fnmatchcase(name, pattern) and name not in exclude and name_problem(name) is None:
                names.append(name)
    return sorted(names)


def add_tasks(client, queue: Queue, names: list[str], check_mode: bool = False) -> list[str]:
    """Append to tasklist.txt the names it does not list and that are not finished (completed or
    failed, folded or marked), with If-Match on the list as every list edit. Returns the names
    added (in check mode: that would be)."""
    finished = frozenset().union(*finished_tasks(client, queue).values())
    return _retried(lambda: _append_names(client, queue, TASKLIST, names, finished, check_mode))[0]


def recompute(client, queue: Queue, names, check_mode: bool = False) -> list[str]:
    """Queue completed tasks again so that their outputs are made anew (stale ones, when a person asks):
    each manifest moves to superseded/<task>/ (kept: how the old outputs were made, and the only outputs
    the next attempt may replace), then, with every finished mark folded, the name goes back into
    tasklist.txt and out of completed.txt (If-Match on each list, in the compaction's turn). A task done
    without a manifest is left alone (nothing says which outputs are its own); one whose manifest was set
    aside already (a recompute cut short) is queued. Returns the names queued (in check mode: would be)."""
    chosen = []
    for name in sorted(set(names)):
        found = _get(client, queue.bucket, queue.manifest_key(name))
        if found is None and not superseded_manifests(client, queue, name):
            continue
        chosen.append(name)
        if found is not None and not check_mode:
            stamp = f"{json.loads(found[0]).get('published_at', 0):017.6f}.json"
            try:
                _put(client, queue.bucket, queue.superseded_key(name, stamp), found[0], IfNoneMatch="*")
            except Exception as error:  # noqa: BLE001 - set aside already (a recompute cut short)
                if not _is(error, _PRECONDITION):
                    raise
            client.delete_object(Bucket=queue.bucket, Key=queue.manifest_key(name), IfMatch=found[1])
    if not chosen or check_mode:
        return chosen
    compact(client, queue, force=True)  # a completed mark left on a task would make its claim find it finished
    turn = _compaction_turn(client, queue)
    while turn is None:
        _wait_for_turn(client, queue)
        turn = _compaction_turn(client, queue)
    try:  # queued first: cut short in between, the task is listed twice for a while, never lost
        _retried(lambda: _append_names(client, queue, TASKLIST, chosen))
        _retried(lambda: _drop_completed(client, queue, set(chosen)))
    finally:
        _end_turn(client, queue, turn)
    return chosen


def _append_names(client, queue: Queue, list_name: str, names, known=frozenset(), check_mode=False) -> list[str]:
    """Append to a list the names it (and ``known``) does not hold, If-Match on what was read; returns them
    (in check mode: those it would append)."""
    raw, condition = _read_list(client, queue, list_name)
    present = known.union(parse_tasklist(raw).names)
    new = [name for name in dict.fromkeys(names) if name not in present]
    if new and not check_mode:
        body = raw if raw.endswith(b"\n") or not raw else raw + b"\n"
        _put(client, queue.bucket, queue.key(list_name), body + _lines(new), **condition)
    return new


def _drop_completed(client, queue: Queue, names: set[str]) -> None:
    raw, condition = _read_list(client, queue, COMPLETED)
    listed = parse_tasklist(raw)
    if names.intersection(listed.names):
        kept = [name for name in listed.names if name not in names]
        _put(client, queue.bucket, queue.key(COMPLETED), _lines(listed.comments + kept), **condition)


# --- reading the state ----------------------------------------------------------------------------


def queue_status(client, queue: Queue) -> dict:
    """The queue as a person wants to see it: counts, who holds what and for how long."""
    locks = list_locks(client, queue)  # before the lists: a mark folded meanwhile is in them then
    listed = finished_tasks(client, queue, locks)
    tasks = read_tasklist(client, queue)
    claimed = []
    for entry in locks.values():
        found = entry.state == "held" and _get(client, queue.bucket, queue.lock_key(entry.name))
        held = _lock_content(found[0]) if found else {"finished": "gone"}
        if "finished" in held:
            continue
        age = _lease_age(found[2])
        claimed.append(
            {
                "task": entry.name,
                "owner": held.get("owner", ""),
                "instance_id": held.get("instance_id", ""),
                "attempts": held.get("attempts", 0),
                "lease_age_seconds": round(age, 1),
                "expired": age >= held.get("lease_seconds", queue.lease_seconds),
            }
        )
    finished = listed["completed"] | listed["failed"]
    pending = [name for name in tasks.names if name not in finished]
    return {
        "pending": len(pending),
        "pending_tasks": pending,
        "claimed": len(claimed),
        "claims": claimed,
        "completed": len(listed["completed"]),
        "completed_tasks": sorted(listed["completed"]),
        "failed": len(listed["failed"]),
        "failed_tasks": sorted(listed["failed"]),
        "rejected": [{"line": line, "reason": reason} for line, reason in tasks.rejected],
        "unfolded": sum(entry.state in MARKS for entry in locks.values()),
        "drained": not pending and not claimed,
    }


def check_outputs(client, queue: Queue, names, image_id: str = "") -> dict:
    """For each completed task: its manifest, and every file it lists there with the ETag it lists
    (read-only). Tasks done without a manifest (outputs made before manifests, or by hand) are
    reported apart, not as wrong: nothing says what they should be. An output is stale when what it was
    made from changed since: its input's or a shared file's ETag is not the one its manifest lists, or its
    image is not ``image_id`` (the job's pinned digest), else the one the newest manifest names (the image
    the job runs now); stale outputs are reported, never recomputed here (recompute() does, on request)."""
    wrong, unrecorded, manifests = [], [], {}
    for name in names:
        manifest = read_manifest(client, queue, name)
        if manifest is None:
            unrecorded.append(name)
            continue
        manifests[name] = manifest
        for entry in manifest.get("files", []):
            etag = object_etag(client, queue.bucket, entry["key"])
            if etag is None:
                wrong.append(f"{name}: output {entry['key']} is missing")
            elif etag != entry.get("etag", etag):
                wrong.append(
                    f"{name}: output {entry['key']} changed since it was published ({etag}, not {entry['etag']})"
                )
    return {
        "checked": len(manifests),
        "without_manifest": unrecorded,
        "wrong": wrong,
        "stale": _stale_outputs(client, queue, manifests, image_id),
    }


def object_body(client, bucket: str, key: str) -> bytes | None:
    """The object's bytes, or None when it does not exist (read-only)."""
    found = _get(client, bucket, key)
    return found[0] if found else None


def object_etag(client, bucket: str, key: str) -> str | None:
    """The object's ETag as S3 gives it (quoted), or None when it does not exist (read-only)."""
    head = _head(client, bucket, key)
    return head["ETag"] if head else None


def _stale_outputs(client, queue: Queue, manifests: dict[str, dict], image_now: str = "") -> list[dict]:
    """The tasks whose outputs were made from another input, shared file or image than the job's now."""
    newest = max(manifests.values(), key=lambda manifest: manifest.get("published_at", 0), default={})
    image_now = image_now or newest.get("image", {}).get("id", "")
    shared_now: dict[str, str | None] = {}  # shared files are common to every task: looked at once
    stale = []
    for name, manifest in sorted(manifests.items()):
        why = []
        made_from = manifest.get("input") or {}
        if made_from.get("key"):
            etag = object_etag(client, queue.bucket, made_from["key"])
            if etag != made_from.get("etag"):
                why.append(f"input {made_from['key']} {'is gone' if etag is None else 'changed'} since")
        for entry in manifest.get("shared", []):
            if entry["key"] not in shared_now:
                shared_now[entry["key"]] = object_etag(client, queue.bucket, entry["key"])
            if shared_now[entry["key"]] != entry.get("etag"):
                why.append(f"shared file {entry['key']} changed since")
        image = manifest.get("image", {}).get("id", "")
        if image and image_now and image != image_now:
            why.append(f"made by image {image}, the job now runs {image_now}")
        if why:
            stale.append({"task": name, "why": "; ".join(why)})
    return stale


# --- choosing what to claim -----------------------------------------------------------------------


class TaskPicker:
    """Finds the next task for one worker from a snapshot of the tasklist, so that a claim costs
    one request rather than one read of the whole list.

    The snapshot is a window of the tasklist: all of it while it is small (read again with If-None-Match:
    304, no body, when unchanged), else about WINDOW_BYTES of it from a random place, read with a Range
    request. The compaction keeps the names sorted, so a window's locks are one listing from its first
    name to its last: what a window costs does not grow with the queue. Every worker walks its window in
    order from a random start and, whenever it runs into a task someone else holds or finished, jumps to
    a random unvisited place: workers soon work apart, each in its own stretch, and rarely touch the same
    task. The window leaves out locked tasks (put aside as busy); its locks are listed again after two
    misses in a row (four right after a listing) or once misses pass an eighth of the hits, and the
    stretch itself is read again after REREAD_CLAIMS claims or once a claim found a task finished whose
    lock was gone (folded since). A window used up, the worker reads the next one; once round the whole
    list without a free task, it folds the finished ones (the list shrinks) and pauses. Busy tasks are taken over only once their
    lease has run out, as the listing shows, so idle workers at the end of the queue do not knock on live
    leases. ``compaction_due`` says when the tasks in view that are finished and not folded yet are a
    25th of the names in view and at least ``compact_every``, times a factor from 1 to 2 each worker draws
    (one worker folds what all of them see): lists rewritten that rarely cost a few hundred bytes a task,
    whatever the queue's size."""

    REFRESH_STREAK = 2  # misses in a row that make the snapshot stale
    FRESH_STREAK = 4  # ... right after a refresh
    REFRESH_MISS_RATIO = 8  # ... or misses above hits / 8 since the last refresh
    COMPACT_FRACTION = 25  # a compaction is due once marks reach names in view / this
    REREAD_CLAIMS = 50  # claims from one reading of a stretch, at most

    def __init__(
        self,
        client,
        queue: Queue,
        owner: str,
        instance_id: str = "",
        poll_seconds: float = 5.0,
        compact_every: int = 20,
    ) -> None:
        self.client, self.queue, self.owner, self.instance_id = client, queue, owner, instance_id
        self.poll_seconds, self.compact_every = poll_seconds, compact_every
        self.lease_seconds: int | None = None  # of the next claims; None: the queue's
        self.finished: set[str] = set()
        self.rejected: list[tuple[str, str]] = []
        self.compaction_due = False
        # Every worker sees the same marks: each its own threshold, so that one of them compacts, not all at once.
        self._compact_spread = random.uniform(1.0, 2.0)
        self._order: list[str] = []
        self._visited = bytearray()
        self._left = self._position = 0
        self._jump = True
        self._busy: list[str] = []
        self._locks: dict[str, LockEntry] = {}
        self._window: TaskList | None = None
        self._whole = True  # the window is the whole tasklist
        self._size = self._next_start = self._window_start = self._window_claims = 0
        self._window_stale = False
        self._cycle_left: int | None = None  # bytes of a large tasklist still to see this time round
        self._tasks_etag = ""
        self._tokens: dict[str, str] = {}  # a retried claim of a name reuses its token (lost replies)
        self._hits = self._misses = self._streak = 0
        self._fresh = False

    # --- the window

    def _read_window(self, again: bool = False) -> None:
        """Read the next window of the tasklist (``again``: the same stretch afresh): all of it while it is
        small, else a stretch."""
        key = self.queue.key(TASKLIST)
        self._window_claims, self._window_stale = 0, False
        if self._window is None:  # where to start: a random place of a large list
            head = _head(self.client, self.queue.bucket, key)
            self._size = head["ContentLength"] if head else 0
            self._next_start = random.randrange(self._size) if self._size > WINDOW_BYTES else 0
        if self._size <= WINDOW_BYTES:
            changed = _get_if_changed(self.client, self.queue.bucket, key, self._tasks_etag)
            if changed is not None:
                self._window, self._tasks_etag = parse_tasklist(changed[0]), changed[1]
                self._size = len(changed[0])
            self._whole, self._cycle_left = True, 0
            return
        self._whole, self._tasks_etag = False, ""
        if again:
            self._window = parse_tasklist(_read_stretch(self.client, self.queue, self._window_start)[0])
            return
        start = self._window_start = self._next_start if self._next_start < self._size else 0
        if self._cycle_left is None:
            self._cycle_left = self._size
        text, self._size, self._next_start = _read_stretch(self.client, self.queue, start)
        self._window = parse_tasklist(text)
        self._cycle_left -= max(self._next_start - start, 1)
        if self._next_start >= self._size:
            self._next_start = 0

    def _refresh(self) -> None:
        if self._whole:
            # Locks, then the tasklist: a finished task keeps its lock (as its mark) until a compaction has
            # taken it out of the tasklist, so a task that was locked or finished when the locks were
            # listed never looks free in this snapshot.
            self._locks = list_locks(self.client, self.queue)
            self._read_window()
            names = self._window.names if self._window else []
        else:
            # A window's names come first (they say which locks to list): one folded in between looks free,
            # and the claim that finds it finished has the stretch read again.
            names = self._window.names if self._window else []
            self._locks = list_locks(self.client, self.queue, min(names, default=""), max(names, default=""))
        self.rejected = self._window.rejected if self._whole and self._window else self.rejected
        marks = set().union(*finished_marks(self._locks).values())
        self.finished |= marks
        unfolded = marks.intersection(names)  # a folded task's name is out of the list, its mark not yet
        due_at = max(self.compact_every, len(names) / self.COMPACT_FRACTION) * self._compact_spread
        self.compaction_due = len(unfolded) >= due_at
        pending = [name for name in names if name not in self.finished]
        self._order = [name for name in pending if name not in self._locks]
        self._busy = [name for name in pending if name in self._locks]
        self._visited = bytearray(len(self._order))
        self._left, self._jump = len(self._order), True
        self._hits = self._misses = self._streak = 0
        self._fresh = True

    def _look(self, advance: bool) -> None:
        """List the window's locks again, first moving on to the next stretch (``advance``). A whole
        tasklist is read again too if it changed, a stretch once it is dated (a compaction took finished
        names out of the list and deleted their marks): after REREAD_CLAIMS claims, or once a claim found a
        task finished whose lock was gone."""
        if self._window is None or (advance and not self._whole):
            self._read_window()
        elif not self._whole and (self._window_stale or self._window_claims >= self.REREAD_CLAIMS):
            self._read_window(again=True)
        self._refresh()

    def _start_cycle(self) -> None:
        self._cycle_left = None  # from the next window on

    # --- claiming

    def _stale(self) -> bool:
        """Whether recent misses say the snapshot is out of date. Right after a refresh only a longer streak
        does (workers racing for the same few free tasks: a listing costs what a refused claim does and shows
        which are left), or a claim that found a task finished whose lock was gone (the tasklist changed under
        the window)."""
        if self._window_stale:
            return True
        if self._fresh:
            return self._streak >= self.FRESH_STREAK
        return self._streak >= self.REFRESH_STREAK or (
            self._misses >= self.REFRESH_STREAK and self._misses * self.REFRESH_MISS_RATIO > self._hits
        )

    def _next_candidate(self) -> str:
        size = len(self._order)
        position = random.randrange(size) if self._jump else self._position % size
        while self._visited[position]:
            position = (position + 1) % size
        self._visited[position] = 1
        self._left -= 1
        self._position = position + 1
        return self._order[position]

    def _try(self, name: str, take_over: bool) -> Lease | None:
        token = self._tokens.setdefault(name, uuid.uuid4().hex)
        try:
            lease = claim(
                self.client, self.queue, name, self.owner, self.instance_id, take_over, token, self.lease_seconds
            )
        except ClaimConflict:
            self._busy.append(name)
        except TaskFinished:
            self.finished.add(name)
            self._tokens.pop(name)
            self._window_stale = not take_over  # unlocked yet finished: folded since the window was read
        else:
            self._tokens.pop(name)
            self._window_claims += 1
            self._hits += 1
            self._streak = 0
            self._fresh = self._jump = False
            return lease
        self._misses += 1
        self._streak += 1
        self._jump = True
        return None

    def next(self, stopped=lambda: False, wait: bool = True, mine=frozenset) -> Lease | None:
        """The next claimed task, or None once nothing is pending or held by anyone, or once
        ``stopped()`` says to claim no more (it is asked before every claim and after every wait).
        With ``wait=False`` it returns None at once when only tasks held by others remain (a worker
        looking ahead while its own task runs); the next call then looks afresh first. ``mine()``
        names the tasks the caller's own worker holds in its other slots: not worth waiting for,
        since that slot takes back what it gives back."""
        if not self._left and not self._busy:
            self._start_cycle()
            self._look(advance=True)
        while not stopped():
            while self._left and not stopped():
                if self._stale():
                    self._look(advance=False)
                    continue
                lease = self._try(self._next_candidate(), take_over=False)
                if lease:
                    return lease
            if not self._fresh:  # an old snapshot ran out: look again before moving on
                self._look(advance=False)
                continue
            # Nothing free in view: take over the leases here that ran out.
            due = self._expired_busy()
            for name in due:
                lease = None if stopped() else self._try(name, take_over=True)
                if lease:
                    return lease
            if due:
                self._fresh = False  # the listing that showed them expired is out of date now
                continue
            if not self._whole and (self._cycle_left is None or self._cycle_left > 0):
                self._look(advance=True)
                continue
            if not self._whole or self._busy:
                if not wait or (self._whole and not set(self._busy) - set(mine())):
                    # Nothing free now and nothing worth waiting for: a later call looks afresh first.
                    self._fresh = False
                    self._busy = self._busy if self._whole else []
                    return None
                if not self._whole:  # round the whole list with nothing free: fold the finished ones
                    compact(self.client, self.queue)
                # Wait for the tasks held by others to finish or their leases to run out, then look again.
                time.sleep(self.poll_seconds)
                self._start_cycle()
                self._look(advance=True)
                continue
            return None
        return None

    def _expired_busy(self) -> list[str]:
        """The busy tasks whose lease the last listing showed run out, taken out of the busy ones."""
        due = [name for name in self._busy if name in self._locks and self._locks[name].expired]
        self._busy = [name for name in self._busy if name not in set(due)]
        return due


def _read_stretch(client, queue: Queue, start: int) -> tuple[bytes, int, int]:
    """About WINDOW_BYTES of the tasklist's whole lines from ``start`` on (a Range request from the byte
    before it, to tell whether ``start`` begins a line): (text, the list's size, where the next stretch
    starts). A stretch never splits a line, and one stretch ends where the next begins."""
    first = max(start - 1, 0)
    try:
        response = client.get_object(
            Bucket=queue.bucket, Key=queue.key(TASKLIST), Range=f"bytes={first}-{start + WINDOW_BYTES - 1}"
        )
    except Exception as error:  # noqa: BLE001
        if _is(error, _MISSING) or (_is(error, _RANGE) and start == 0):
            return b"", 0, 0  # no tasklist, or an empty one
        if not _is(error, _RANGE):
            raise
        return _read_stretch(client, queue, 0)  # the list shrank under the offset: start over
    body = response["Body"].read()
    size = int(response["ContentRange"].rsplit("/", 1)[1]) if "ContentRange" in response else len(body)
    begin = body.find(b"\n") + 1 if start > 0 else 0  # the byte before start ends a line, or the line is cut
    end = len(body) if first + len(body) >= size else body.rfind(b"\n") + 1
    if end <= begin:  # one line longer than a window: skip it
        return b"", size, first + len(body)
    return body[begin:end], size, first + end
