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
  P completed.txt             names done           } rewritten only by compact(),
  P failed.txt                names given up on    } from the journal below
  P rejected.txt              tasklist lines that are not task names, with the reason
  P locks/<name>              the lease: a tiny JSON body (owner, token, attempts, lease length)
  P journal/<state>/<name>    a finished task not yet merged into the lists (state: completed|failed)
  P failed/<name>.json        the failed record: reason and attempts, kept for good
  P manifests/<name>.json     what the task published (keys, sizes, ETags) and how: the mark of a task done

A task's outputs are the job's business (plugins/module_utils/job.py names them); the protocol publishes
each with If-None-Match and then the manifest, and only the manifest makes the task done.

What it promises: every task listed ends either completed, with its outputs, or recorded failed with a
reason - never both, never neither, never twice. Why it holds:
- claim is PutObject If-None-Match:* on the lock: exactly one writer wins. A lock whose lease
  expired by S3's clock (LastModified against the response Date) is taken over with If-Match
  on its ETag, so only one of several takers wins that too.
- renew and release use If-Match on the holder's own ETag: a worker that lost its lease learns
  it at once and can neither extend nor delete the new owner's lock.
- the outputs and then the manifest are written before the task is journaled, each with
  If-None-Match:*, so nothing published is ever overwritten; a task whose manifest exists is
  finished, not recomputed, and a task with no manifest is not done (whatever outputs it left).
- each finish writes one small journal key; compact() folds the journal into the lists in
  batches with If-Match on every list, re-reading on conflict. The lists cost O(1) writes per
  batch instead of two full rewrites per task, and once the queue is drained they are exact.
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
    from botocore.exceptions import ClientError, ConnectionError as S3ConnectionError, HTTPClientError
except ImportError:  # pragma: no cover - the callers check for boto3 and say what to install
    ClientError = S3ConnectionError = HTTPClientError = None

TASKLIST = "tasklist.txt"
COMPLETED = "completed.txt"
FAILED = "failed.txt"
REJECTED = "rejected.txt"
LIST_NAMES = (TASKLIST, COMPLETED, FAILED, REJECTED)

MAX_NAME_BYTES = 200
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_PRECONDITION = ("PreconditionFailed", "412")
_CONFLICT = ("ConditionalRequestConflict", "409", "OperationAborted")
_MISSING = ("NoSuchKey", "404", "NotFound")
_DENIED = ("AccessDenied", "403")
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

    def journal_key(self, state: str, name: str) -> str:
        return f"{self.prefix}journal/{state}/{name}"

    def failed_key(self, name: str) -> str:
        return f"{self.prefix}failed/{name}.json"

    def manifest_key(self, name: str) -> str:
        return f"{self.prefix}manifests/{name}.json"


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
        """The lock's content: small on purpose (conditional writes are atomic for small bodies)."""
        return json.dumps(
            {
                "owner": self.owner,
                "token": self.token,
                "instance_id": self.instance_id,
                "attempts": self.attempts,
                "lease_seconds": self.lease_seconds,
                "last_error": self.last_error[:300],
                "written_at": time.time(),
            },
            sort_keys=True,
        ).encode()


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
    if name in LIST_NAMES:
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


def _exists(client, bucket: str, key: str) -> bool:
    try:
        client.head_object(Bucket=bucket, Key=key)
    except Exception as error:  # noqa: BLE001
        if _is(error, _MISSING):
            return False
        raise
    return True


def _list_keys(client, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return keys


def _lease_age(response: dict) -> float:
    """Seconds since the lock was last written, by S3's clock (never the worker's)."""
    server_now = parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
    return (server_now - response["LastModified"]).total_seconds()


# --- the protocol ---------------------------------------------------------------------------------


def read_tasklist(client, queue: Queue) -> TaskList:
    found = _get(client, queue.bucket, queue.key(TASKLIST))
    return parse_tasklist(found[0] if found else b"")


def claim(
    client, queue: Queue, name: str, owner: str, instance_id: str = "", take_over: bool = True, token: str = ""
) -> Lease:
    """Claim ``name`` for ``owner``.

    Raises ClaimConflict while another owner's lease is live (or whenever the lock exists, with
    take_over=False: one request per busy task for a worker scanning for free ones), and
    TaskFinished when the task needs no work. Passing the ``token`` of an earlier attempt whose
    reply was lost finds that claim again instead of failing against one's own lock.
    """
    check_name(name)
    lease = Lease(name, owner, token or uuid.uuid4().hex, "", 1, instance_id, queue.lease_seconds)
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


def _take_over(client, queue: Queue, lease: Lease, body: bytes, etag: str, response: dict) -> None:
    held = json.loads(body)
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
    """Under the lock, make sure the task still needs work; a finished one is journaled and let go."""
    state = finished_state(client, queue, lease.name)
    if state:
        # Output published or failed record written but maybe never journaled (its worker died
        # in between): journal it again (idempotent), don't recompute.
        _put(client, queue.bucket, queue.journal_key(state, lease.name), b"")
        _delete_lock(client, queue, lease)
        raise TaskFinished(lease.name, state)


def read_lock(client, queue: Queue, name: str) -> tuple[dict, str] | None:
    """The lock's content and ETag, or None when the task is not locked (read-only)."""
    found = _get(client, queue.bucket, queue.lock_key(name))
    return (json.loads(found[0]), found[1]) if found else None


def finished_state(client, queue: Queue, name: str) -> str | None:
    """ "completed" when the task's manifest exists, "failed" when its failed record does, else None
    (read-only)."""
    if _exists(client, queue.bucket, queue.manifest_key(name)):
        return "completed"
    if _exists(client, queue.bucket, queue.failed_key(name)):
        return "failed"
    return None


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
    with lease.guard:
        try:
            lease.etag = _put(client, queue.bucket, queue.lock_key(lease.name), lease.body(), IfMatch=lease.etag)
        except Exception as error:  # noqa: BLE001
            if _is(error, _PRECONDITION + _MISSING):
                raise LeaseLost(f"lease on {lease.name} lost: another worker took it over") from error
            raise
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
    if head["ETag"].strip('"') != md5:
        raise OutputConflict(
            f"output s3://{queue.bucket}/{key} exists with other content than task {lease.name} produced "
            f"(ETag {head['ETag']}, this attempt's MD5 {md5}): it is not overwritten; remove it, or publish the "
            "job under another outputs prefix"
        )
    return {"key": key, "size": size, "etag": head["ETag"], "existing": True}


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
    """Mark a task as completed, then let its lock go. Idempotent. Unless the caller has just
    published the manifest itself, its presence is checked first: no manifest, no completion."""
    if not published and not _exists(client, queue.bucket, queue.manifest_key(lease.name)):
        raise QueueError(f"task {lease.name} has no manifest {queue.manifest_key(lease.name)}; publish it first")
    _put(client, queue.bucket, queue.journal_key("completed", lease.name), b"")
    _delete_lock(client, queue, lease)


def release(client, queue: Queue, lease: Lease, error: str = "") -> str:
    """Give the task back. With ``error`` the attempt counts: after ``max_attempts`` the task is
    recorded failed; otherwise the lock is left expired so the next worker takes it over and
    carries the attempt count on. Without ``error`` (e.g. the machine is being reclaimed) the
    attempt does not count. Returns the task's state: "pending" or "failed"."""
    if error:
        lease.last_error = error
        if lease.attempts >= queue.max_attempts:
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
    _put(client, queue.bucket, queue.journal_key("failed", lease.name), b"")
    _delete_lock(client, queue, lease)


def _delete_lock(client, queue: Queue, lease: Lease) -> bool:
    """Delete the lock only if it is still ours. Returns False when it no longer was."""
    return _delete_unchanged_lock(client, queue, lease.name, lease.etag)


def _delete_unchanged_lock(client, queue: Queue, name: str, etag: str) -> bool:
    try:
        client.delete_object(Bucket=queue.bucket, Key=queue.lock_key(name), IfMatch=etag)
    except Exception as error:  # noqa: BLE001
        if _is(error, _PRECONDITION + _MISSING):
            return False
        raise
    return True


# --- the lists ------------------------------------------------------------------------------------


def _journal(client, queue: Queue) -> dict[str, list[str]]:
    """Journal keys by state, e.g. {"completed": [key, ...], "failed": [...]}."""
    entries: dict[str, list[str]] = {"completed": [], "failed": []}
    for key in _list_keys(client, queue.bucket, f"{queue.prefix}journal/"):
        state = key[len(queue.prefix) + len("journal/") :].split("/", 1)[0]
        entries.setdefault(state, []).append(key)
    return entries


def compact(client, queue: Queue, force: bool = False, min_batch: int = 1) -> dict:
    """Fold the journal into completed.txt / failed.txt, and drop finished names and lines that
    are not names (recorded in rejected.txt) from tasklist.txt. Every list write is conditional
    on the ETag read; on a conflict everything is re-read and re-applied, so concurrent
    compactions and people editing the tasklist lose nothing. ``force`` (a worker at its end, a
    person) folds any batch and also lets go of locks left on finished tasks. Returns what moved."""
    journal = _journal(client, queue)
    journaled = sum(len(keys) for keys in journal.values())
    if journaled < min_batch and not force:
        return {"completed": 0, "failed": 0, "rejected": 0, "conflicts": 0, "locks": 0}
    finished = {state: {key.rsplit("/", 1)[1] for key in keys} for state, keys in journal.items()}
    for attempt in range(20):
        try:
            moved = _apply_journal(client, queue, finished)
        except Exception as error:  # noqa: BLE001
            if not _is(error, _PRECONDITION + _CONFLICT):
                raise
            _backoff(attempt)
            continue
        done_keys = [key for keys in journal.values() for key in keys]
        for start in range(0, len(done_keys), 1000):
            chunk = [{"Key": key} for key in done_keys[start : start + 1000]]
            client.delete_objects(Bucket=queue.bucket, Delete={"Objects": chunk, "Quiet": True})
        moved["conflicts"] = attempt
        moved["locks"] = _let_go_finished_locks(client, queue) if force else 0
        return moved
    raise QueueError("the lists kept changing under compaction; try again")


def _let_go_finished_locks(client, queue: Queue) -> int:
    """Delete the locks left on finished tasks: their holder stopped between journaling the task and
    letting go of its lock (killed, or S3 went away), and no claim looks at a finished task again.
    Each is deleted only if unchanged since read; a holder still finishing finds its lock gone, which
    it takes in its stride. Returns how many went."""
    let_go = 0
    for key in _list_keys(client, queue.bucket, queue.lock_key("")):
        name = key.rsplit("/", 1)[1]
        found = _get(client, queue.bucket, key)
        if found and finished_state(client, queue, name) and _delete_unchanged_lock(client, queue, name, found[1]):
            let_go += 1
    return let_go


def _read_list(client, queue: Queue, list_name: str) -> tuple[bytes, dict]:
    """A list's body and the condition that writes it back only if nobody changed it meanwhile."""
    found = _get(client, queue.bucket, queue.key(list_name))
    return (found[0], {"IfMatch": found[1]}) if found else (b"", {"IfNoneMatch": "*"})


def _apply_journal(client, queue: Queue, finished: dict[str, set[str]]) -> dict:
    task_raw, task_cond = _read_list(client, queue, TASKLIST)
    tasks = parse_tasklist(task_raw)
    moved = {"completed": 0, "failed": 0, "rejected": len(tasks.rejected)}
    for state, list_name in (("completed", COMPLETED), ("failed", FAILED)):
        new = finished.get(state, set())
        if not new:
            continue
        raw, cond = _read_list(client, queue, list_name)
        present = set(parse_tasklist(raw).names)
        additions = sorted(new - present)
        if additions:
            body = raw if raw.endswith(b"\n") or not raw else raw + b"\n"
            _put(client, queue.bucket, queue.key(list_name), body + _lines(additions), **cond)
        moved[state] = len(additions)
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
        # Rewritten normalised: comments first, one name a line, LF, no duplicates.
        _put(client, queue.bucket, queue.key(TASKLIST), _lines(tasks.comments + remaining), **task_cond)
    return moved


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
    failed, folded or journaled), with If-Match on the list as every list edit. Returns the names
    added (in check mode: that would be)."""
    for attempt in range(20):
        raw, condition = _read_list(client, queue, TASKLIST)
        known = set(parse_tasklist(raw).names)
        for list_name in (COMPLETED, FAILED):
            known |= set(parse_tasklist(_read_list(client, queue, list_name)[0]).names)
        known |= {key.rsplit("/", 1)[1] for keys in _journal(client, queue).values() for key in keys}
        new = [name for name in dict.fromkeys(names) if name not in known]
        if not new or check_mode:
            return new
        body = raw if raw.endswith(b"\n") or not raw else raw + b"\n"
        try:
            _put(client, queue.bucket, queue.key(TASKLIST), body + _lines(new), **condition)
        except Exception as error:  # noqa: BLE001
            if not _is(error, _PRECONDITION + _CONFLICT):
                raise
            _backoff(attempt)
            continue
        return new
    raise QueueError("tasklist.txt kept changing while tasks were added; try again")


# --- reading the state ----------------------------------------------------------------------------


def queue_status(client, queue: Queue) -> dict:
    """The queue as a person wants to see it: counts, who holds what and for how long."""
    tasks = read_tasklist(client, queue)
    journal = {state: {key.rsplit("/", 1)[1] for key in keys} for state, keys in _journal(client, queue).items()}
    listed = {}
    for state, list_name in (("completed", COMPLETED), ("failed", FAILED)):
        found = _get(client, queue.bucket, queue.key(list_name))
        listed[state] = set(parse_tasklist(found[0] if found else b"").names) | journal.get(state, set())
    claimed = []
    for key in _list_keys(client, queue.bucket, f"{queue.prefix}locks/"):
        found = _get(client, queue.bucket, key)
        if found is None:
            continue
        held = json.loads(found[0])
        age = _lease_age(found[2])
        claimed.append(
            {
                "task": key.rsplit("/", 1)[1],
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
        "journaled": sum(len(names) for names in journal.values()),
        "drained": not pending and not claimed,
    }


def check_outputs(client, queue: Queue, names) -> dict:
    """For each completed task: its manifest, and every file it lists there with the ETag it lists
    (read-only). Tasks done without a manifest (outputs made before manifests, or by hand) are
    reported apart, not as wrong: nothing says what they should be."""
    wrong, unrecorded = [], []
    for name in names:
        manifest = read_manifest(client, queue, name)
        if manifest is None:
            unrecorded.append(name)
            continue
        for entry in manifest.get("files", []):
            try:
                etag = client.head_object(Bucket=queue.bucket, Key=entry["key"])["ETag"]
            except Exception as error:  # noqa: BLE001
                if not _is(error, _MISSING):
                    raise
                wrong.append(f"{name}: output {entry['key']} is missing")
                continue
            if etag != entry.get("etag", etag):
                wrong.append(
                    f"{name}: output {entry['key']} changed since it was published ({etag}, not {entry['etag']})"
                )
    return {"checked": len(names) - len(unrecorded), "without_manifest": unrecorded, "wrong": wrong}


# --- choosing what to claim -----------------------------------------------------------------------


class TaskPicker:
    """Finds the next task for one worker from a snapshot of the tasklist, so that a claim costs
    one request rather than one read of the whole list.

    Every worker walks the same snapshot in order from a random start and, whenever it runs into
    a task someone else holds or finished, jumps to a random unvisited place: workers soon work
    apart, each in its own stretch, and rarely touch the same task. Busy tasks are retried (with
    lease takeover) only when nothing else is left, after a pause and a fresh look. The snapshot
    leaves out locked tasks (put aside as busy) and is re-read after two misses in a row or once
    misses pass an eighth of the hits, so the requests per task stay flat whatever the number of
    workers."""

    REFRESH_STREAK = 2  # misses in a row that make the snapshot stale
    REFRESH_MISS_RATIO = 8  # ... or misses above hits / 8 since the last refresh

    def __init__(self, client, queue: Queue, owner: str, instance_id: str = "", poll_seconds: float = 5.0) -> None:
        self.client, self.queue, self.owner, self.instance_id = client, queue, owner, instance_id
        self.poll_seconds = poll_seconds
        self.finished: set[str] = set()
        self.rejected: list[tuple[str, str]] = []
        self._order: list[str] = []
        self._visited = bytearray()
        self._left = self._position = 0
        self._jump = True
        self._busy: list[str] = []
        self._tokens: dict[str, str] = {}  # a retried claim of a name reuses its token (lost replies)
        self._hits = self._misses = self._streak = 0
        self._fresh = False

    def _refresh(self) -> None:
        # Locks, then journal, then tasklist: a task is journaled before its lock goes, and a
        # compaction takes names out of the journal and the tasklist together, so a task that was
        # locked or finished when the locks were listed never looks free in this snapshot.
        locked = {key.rsplit("/", 1)[1] for key in _list_keys(self.client, self.queue.bucket, self.queue.lock_key(""))}
        journal = _journal(self.client, self.queue)
        tasks = read_tasklist(self.client, self.queue)
        self.rejected = tasks.rejected
        self.finished |= {key.rsplit("/", 1)[1] for keys in journal.values() for key in keys}
        pending = [name for name in tasks.names if name not in self.finished]
        self._order = [name for name in pending if name not in locked]
        self._busy = [name for name in pending if name in locked]
        self._visited = bytearray(len(self._order))
        self._left, self._jump = len(self._order), True
        self._hits = self._misses = self._streak = 0
        self._fresh = True

    def _stale(self) -> bool:
        """Whether recent misses say the snapshot is out of date (never right after a refresh)."""
        return not self._fresh and (
            self._streak >= self.REFRESH_STREAK
            or (self._misses >= self.REFRESH_STREAK and self._misses * self.REFRESH_MISS_RATIO > self._hits)
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
            lease = claim(self.client, self.queue, name, self.owner, self.instance_id, take_over, token)
        except ClaimConflict:
            self._busy.append(name)
        except TaskFinished:
            self.finished.add(name)
            self._tokens.pop(name)
        else:
            self._tokens.pop(name)
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
            self._refresh()
        while not stopped():
            while self._left and not stopped():
                if self._stale():
                    self._refresh()
                    continue
                lease = self._try(self._next_candidate(), take_over=False)
                if lease:
                    return lease
            if not self._fresh:  # an old snapshot ran out: look again before waiting
                self._refresh()
                continue
            if not self._busy:
                return None
            if not wait or not set(self._busy) - set(mine()):
                # Nothing free now and nothing worth waiting for: a later call looks afresh first.
                self._fresh = False
                return None
            # Only tasks held by others remain: wait for them to finish or for a lease to expire,
            # then look again, and try to take over only the tasks still locked.
            time.sleep(self.poll_seconds)
            self._refresh()
            if self._left:
                continue
            busy, self._busy = self._busy, []
            for name in busy:
                lease = None if stopped() else self._try(name, take_over=True)
                if lease:
                    return lease
        return None
