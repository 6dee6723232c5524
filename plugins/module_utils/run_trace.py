# -*- coding: utf-8 -*-
# Copyright: cicc.cloud contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The run's trace: a row for every attempt at every task, and a record for every worker's run.

Written by the worker, read by the run report. It imports only the standard library. Keys, under the
job's queue prefix P:

  P trace/<worker>/<run>-<n>.jsonl   attempts that ended, one JSON object a line, written once each
                                     (a batch every FLUSH_EVERY attempts and at the end of the run)
  P workers/<worker>/<run>.json      the worker's run: machine, code, start, first claim, last task
                                     end, stop, counts and S3 requests, written once at its end

<run> is the time the worker started (UTC, to the millisecond), so that runs of one machine never
share a key. A worker killed before its last batch loses those rows only: the task's manifest still
says how its outputs were made, and the attempt after it says the lease ran out.

The S3 requests a row counts are every HTTP attempt the worker's client sent for that attempt (its
claim, including the tries at other tasks on the way, staging, heartbeats, publishing, release);
the worker's record counts the rest (shared files, the image, compactions, its log, the trace).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import asdict, dataclass, field

FLUSH_EVERY = 20

# How an attempt ended.
DONE = "done"  # outputs and manifest published
RETRIED = "retried"  # failed, the task is pending again (the attempt counts)
FAILED = "failed"  # the task is recorded failed
GIVEN_BACK = "given back"  # a stop or a notice: the attempt does not count
LOST = "lost"  # the lease was lost (another worker took the task over)
ABANDONED = "abandoned"  # S3 went away mid-attempt: left to its lease
OUTCOMES = (DONE, RETRIED, FAILED, GIVEN_BACK, LOST, ABANDONED)

TIMES = ("claimed_at", "staged_at", "started_at", "ended_at", "published_at")

# How S3 bills a request (see request_class).
WRITE, READ, FREE = "write", "read", "free"


@dataclass
class Attempt:
    """One attempt at a task, from its claim to how it ended."""

    task: str
    attempt: int
    slot: str
    claimed_at: float = 0.0
    staged_at: float = 0.0
    started_at: float = 0.0
    ended_at: float = 0.0
    published_at: float = 0.0
    outcome: str = ABANDONED
    reason: str = ""
    exit_code: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    input_etag: str = ""
    output_etags: list = field(default_factory=list)
    requests: int = 0
    write_requests: int = 0  # of them billed as writes (PUT, POST, COPY, LIST); reads: GET, HEAD
    read_requests: int = 0

    def ended(self, outcome: str, reason: str = "") -> None:
        self.outcome, self.reason = outcome, reason


def code_version(*paths: str) -> str:
    """What the worker runs, as a short digest of its source files (the worker, the protocol, the job schema)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as source:
            digest.update(source.read())
    return digest.hexdigest()[:16]


def run_id(started_at: float) -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(started_at)) + f"{started_at % 1:.3f}"[1:] + "Z"


def trace_prefix(queue_prefix: str) -> str:
    return f"{queue_prefix}trace/"


def worker_key(queue_prefix: str, worker: str, run: str) -> str:
    return f"{queue_prefix}workers/{worker}/{run}.json"


class RequestCounter:
    """Counts the S3 requests a client sends, each charged to what the sending thread works for (an
    Attempt, through ``charge``), else to the worker itself. Attached to botocore's before-send event,
    so that retried requests count as AWS bills them."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self.unattributed = 0
        self.total = 0
        self.billed = {WRITE: 0, READ: 0, FREE: 0}  # the total by how S3 bills them

    def attach(self, client) -> None:
        client.meta.events.register("before-send.s3", self._sent)

    def charge(self, attempt: Attempt | None) -> None:
        """From now on this thread's requests are ``attempt``'s (None: the worker's)."""
        self._local.attempt = attempt

    def unattribute(self, attempt: Attempt) -> None:
        """An attempt that came to nothing (no task claimed): its requests were the worker's."""
        with self._lock:
            self.unattributed += attempt.requests
            attempt.requests = 0

    def _sent(self, request=None, **kwargs) -> None:
        attempt = getattr(self._local, "attempt", None)
        billed = request_class(request.method, request.url) if request is not None else FREE
        with self._lock:
            self.total += 1
            self.billed[billed] += 1
            if attempt is None:
                self.unattributed += 1
            else:
                attempt.requests += 1
                attempt.write_requests += billed == WRITE
                attempt.read_requests += billed == READ


def request_class(method: str, url: str) -> str:
    """How S3 bills a request: WRITE (PUT, POST, COPY and LIST), READ (GET, HEAD), FREE (DELETE)."""
    method = method.upper()
    if method in ("PUT", "POST") or (method == "GET" and "list-type=" in url.partition("?")[2]):
        return WRITE
    return READ if method in ("GET", "HEAD") else FREE


class TraceLog:
    """The attempts of one worker's run, written to the bucket in batches, each key written once."""

    def __init__(self, client, bucket: str, queue_prefix: str, worker: str, run: str, common: dict) -> None:
        self.client, self.bucket = client, bucket
        self.prefix = f"{trace_prefix(queue_prefix)}{worker}/{run}-"
        self.common = common  # fields every row of this run shares: job, worker, machine, image, code
        self._rows: list[dict] = []
        self._batches = 0
        self._lock = threading.Lock()
        self.written = 0

    def add(self, attempt: Attempt) -> None:
        with self._lock:
            self._rows.append({**self.common, **asdict(attempt)})
            due = len(self._rows) >= FLUSH_EVERY
        if due:
            self.flush()

    def flush(self) -> None:
        """Write the rows not written yet as one new key; on an S3 error they wait for the next flush."""
        with self._lock:
            rows, self._rows = self._rows, []
            if not rows:
                return
            self._batches += 1
            key = f"{self.prefix}{self._batches:05d}.jsonl"
        body = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode()
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*")
        except Exception:
            with self._lock:
                self._rows = rows + self._rows
            raise
        with self._lock:
            self.written += len(rows)


def _bodies(client, bucket: str, prefix: str):
    """The body of every object under ``prefix``."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            yield client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()


def read_trace(client, bucket: str, queue_prefix: str) -> list[dict]:
    """Every attempt row of the job's trace, ordered by claim time (read-only)."""
    rows = [
        json.loads(line) for body in _bodies(client, bucket, trace_prefix(queue_prefix)) for line in body.splitlines()
    ]
    return sorted(rows, key=lambda row: (row["claimed_at"], row["task"], row["attempt"]))


def read_workers(client, bucket: str, queue_prefix: str) -> list[dict]:
    """Every worker run's record (read-only)."""
    records = [json.loads(body) for body in _bodies(client, bucket, f"{queue_prefix}workers/")]
    return sorted(records, key=lambda record: record["started_at"])
