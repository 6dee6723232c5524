"""Benchmark of the S3 task queue (not a test): S3 requests and list traffic per task.

For each N (tasks) x K (workers) it makes a fresh bucket on an S3 emulator with ``tasklist.txt``
naming N tiny inputs (in00000.dat ...) and a 4-byte ``kernel.dat`` (this setup is not counted),
then runs K ``cicc_worker.Worker`` of the XOR job (jobs/xor.yml on that bucket, prefix "", no data
set) as threads of this process, each with its own boto3 session and client, one slot (``--slots``)
and a light in-process runner in place of the job's container (input XOR the shared kernel with
numpy, written to the task's output directory), until the queue is drained. Every HTTP request
the workers send is counted by a botocore hook (``before-send.s3`` / ``response-received.s3``, so
retried attempts count too), with the bytes of request and response bodies, by operation and by
key class:

- list traffic: bodies of tasklist.txt / completed.txt / failed.txt / rejected.txt read or written;
- listing traffic: ListObjectsV2 response bodies (counted separately).

After each run it checks that every task was done exactly once (one processing run and one
output write per task, N outputs and N manifests, completed.txt = the N names, tasklist.txt empty,
failed.txt empty, no lock and no compaction turn left) and prints FAIL otherwise.

Targets (the issue): <= 10 requests per task, flat in N and K; <= 64 KB of list traffic per task
at N = 10,000.

Usage: bench/bench_queue.py [--tasks 1000,10000] [--workers 1,8,32] [--endpoint URL]
                            [--lease-seconds 120] [--compact-every 20] [--max-attempts 10]
                            [--slots 1] [--quick] [--json FILE] [--task-queue PATH] [--worker PATH]

Without --endpoint it starts its own moto_server (from this interpreter's virtualenv) on a free
127.0.0.1 port and stops it at the end. --task-queue / --worker load another copy of
task_queue.py / cicc_worker.py (e.g. a prototype under /tmp) in place of the collection's.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import traceback
import types
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import REGION, OwnMoto, key_class, link_collection, load_by_path, load_worker, xor_job

TQ_MODULE = "ansible_collections.cicc.cloud.plugins.module_utils.task_queue"
INPUT_BYTES = 16
KERNEL = b"\x5a\xa5\x0f\xf0"
REQUEST_TARGET = 10.0
LIST_TARGET_BYTES = 64 * 1024
LIST_TARGET_AT = 10_000


# --- loading the code under test ------------------------------------------------------------------


def load_code(task_queue_path: str | None, worker_path: str | None) -> tuple[types.ModuleType, types.ModuleType]:
    """(task_queue, cicc_worker): the collection's, or the given copies (the worker, and the job module
    it imports, then use the copy of task_queue)."""
    link_collection()
    from ansible_collections.cicc.cloud.plugins import module_utils

    if task_queue_path:
        task_queue = load_by_path(TQ_MODULE, Path(task_queue_path))
        module_utils.task_queue = task_queue
    else:
        from ansible_collections.cicc.cloud.plugins.module_utils import task_queue
    worker = load_worker(Path(worker_path) if worker_path else None)
    if worker.task_queue is not task_queue or worker.jobs.task_queue is not task_queue:
        raise SystemExit("the worker did not pick up the task_queue module under test")
    return task_queue, worker


# --- counting -------------------------------------------------------------------------------------


class Meter:
    """Counts every S3 HTTP attempt of the clients it is attached to: by operation and status, by
    key class, and the body bytes sent and received (HEAD responses carry no body)."""

    def __init__(self, bucket: str) -> None:
        self.bucket = bucket
        self.lock = threading.Lock()
        self.local = threading.local()
        self.requests: collections.Counter = collections.Counter()  # op
        self.status: collections.Counter = collections.Counter()  # (op, status)
        self.by_class: collections.Counter = collections.Counter()  # (op, class)
        self.bytes_out: collections.Counter = collections.Counter()  # op
        self.bytes_in: collections.Counter = collections.Counter()  # op
        self.list_bytes = {"read": 0, "written": 0}
        self.list_bytes_by_file: collections.Counter = collections.Counter()
        self.listing_bytes = 0
        self.listing_by_prefix: collections.Counter = collections.Counter()
        self.output_writes: collections.Counter = collections.Counter()  # output key -> successful PUTs
        self.errors = 0

    def attach(self, client) -> None:
        client.meta.events.register("before-send.s3", self._before_send)
        client.meta.events.register("response-received.s3", self._response_received)

    def _key(self, url: str) -> tuple[str, dict]:
        parts = urllib.parse.urlsplit(url)
        path = urllib.parse.unquote(parts.path)
        head = f"/{self.bucket}"
        key = path[len(head) + 1 :] if path.startswith(head + "/") else ""
        return key, urllib.parse.parse_qs(parts.query, keep_blank_values=True)

    def _before_send(self, request, event_name: str, **_) -> None:
        op = event_name.rsplit(".", 1)[1]
        key, query = self._key(request.url)
        size = request.headers.get("Content-Length")
        if size is None:
            body = request.body
            size = len(body) if isinstance(body, (bytes, bytearray)) else 0
        size = int(size)
        self.local.current = (op, key, query)
        with self.lock:
            self.requests[op] += 1
            self.bytes_out[op] += size
            if op == "ListObjectsV2":
                self.by_class[(op, "listing:" + query.get("prefix", [""])[0])] += 1
            elif op == "DeleteObjects":
                self.by_class[(op, "batch")] += 1
            else:
                self.by_class[(op, key_class(key))] += 1
            if op == "PutObject" and key_class(key) == "list":
                self.list_bytes["written"] += size
                self.list_bytes_by_file[(key, "written")] += size

    def _response_received(self, event_name: str, response_dict, exception, **_) -> None:
        op, key, query = getattr(self.local, "current", (event_name.rsplit(".", 1)[1], "", {}))
        if response_dict is None:
            with self.lock:
                self.status[(op, "error")] += 1
                self.errors += 1
            return
        status = response_dict["status_code"]
        body = response_dict.get("body")
        if op == "HeadObject":
            size = 0
        elif isinstance(body, (bytes, bytearray)):
            size = len(body)
        else:
            size = int(response_dict["headers"].get("content-length", 0))
        with self.lock:
            self.status[(op, status)] += 1
            self.bytes_in[op] += size
            if op == "GetObject" and key_class(key) == "list" and status in (200, 206):  # 206: a Range read
                self.list_bytes["read"] += size
                self.list_bytes_by_file[(key, "read")] += size
            if op == "ListObjectsV2":
                self.listing_bytes += size
                self.listing_by_prefix[query.get("prefix", [""])[0]] += size
            if op == "PutObject" and status == 200 and key_class(key) == "output":
                self.output_writes[key] += 1

    @property
    def total(self) -> int:
        return sum(self.requests.values())


# --- the light processing step --------------------------------------------------------------------


class XorRunner:
    """The job's processing step in this process, in place of its container: output = input XOR the shared
    kernel (tiled; the reference XOR of module_utils/dataset.py), written to the task's output directory under
    the job's output name, atomically (a temp file beside it, renamed before the run returns, so only the output
    is published)."""

    def __init__(self, worker_mod) -> None:
        from ansible_collections.cicc.cloud.plugins.module_utils.dataset import xor_tiled  # after link_collection

        self.xor = xor_tiled
        self.result = worker_mod.RunResult
        self.runs: collections.Counter = collections.Counter()
        self.lock = threading.Lock()

    def prepare(self, job, fetch) -> str:
        return ""

    def run(self, job, task: str, dirs, image_id: str):
        with self.lock:
            self.runs[task] += 1
        output = job.output_name(task)
        data = self.xor((dirs.input / task).read_bytes(), (dirs.shared / job.shared[0]).read_bytes())
        partial = dirs.output.parent / f".{output}.tmp"
        partial.write_bytes(data)
        os.replace(partial, dirs.output / output)
        return self.result(0, f"SUCCESS {task} -> {output} ({len(data)} bytes)")

    def cancel(self) -> None:
        pass


# --- one run --------------------------------------------------------------------------------------


def _client(endpoint: str, pool: int, attempts: int = 10):
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
        region_name=REGION,
    )
    config = Config(
        max_pool_connections=pool,
        s3={"addressing_style": "path"},
        proxies={},
        retries={"mode": "standard", "max_attempts": attempts},
    )
    return session.client("s3", endpoint_url=endpoint, config=config)


def _input(index: int) -> bytes:
    return index.to_bytes(4, "big") * (INPUT_BYTES // 4)


def setup_bucket(admin, bucket: str, names: list[str]) -> None:
    from ansible_collections.cicc.cloud.plugins.module_utils.task_queue import TASKLIST

    admin.create_bucket(Bucket=bucket)
    admin.put_object(Bucket=bucket, Key="kernel.dat", Body=KERNEL)
    admin.put_object(Bucket=bucket, Key=TASKLIST, Body="".join(f"{n}\n" for n in names).encode())
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: admin.put_object(Bucket=bucket, Key=names[i], Body=_input(i)), range(len(names))))


def _all_keys(admin, bucket: str, prefix: str = "") -> list[str]:
    keys = []
    for page in admin.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return keys


def output_key(job, name: str) -> str:
    """Where the XOR job publishes the output of task ``name`` (out00003.dat for in00003.dat)."""
    return job.output_key(name, job.output_name(name))


def verify(admin, task_queue, job, names: list[str], runner: XorRunner, meter: Meter) -> list[str]:
    """Everything that is wrong after the run (empty when every task was done exactly once)."""
    problems = []
    bucket = job.bucket
    queue = task_queue.Queue(bucket, job.prefix)
    expected = set(names)
    keys = _all_keys(admin, bucket)
    outputs = {k for k in keys if key_class(k) == "output"}
    if outputs != {output_key(job, n) for n in names}:
        problems.append(f"{len(outputs)} outputs for {len(names)} tasks")
    manifests = {k for k in keys if key_class(k) == "manifest"}
    if manifests != {queue.manifest_key(n) for n in names}:
        problems.append(f"{len(manifests)} manifests for {len(names)} tasks")
    twice = [n for n, c in runner.runs.items() if c != 1]
    if twice or set(runner.runs) != expected:
        problems.append(f"{len(set(runner.runs))} tasks processed, {len(twice)} of them more than once")
    rewritten = [k for k, c in meter.output_writes.items() if c != 1]
    if len(meter.output_writes) != len(names) or rewritten:
        problems.append(f"{len(meter.output_writes)} outputs written, {len(rewritten)} more than once")

    def body(key: str) -> bytes:
        try:
            return admin.get_object(Bucket=bucket, Key=key)["Body"].read()
        except admin.exceptions.NoSuchKey:
            return b""

    completed = [line for line in body(task_queue.COMPLETED).decode().splitlines() if line]
    if len(completed) != len(set(completed)) or set(completed) != expected:
        problems.append(f"{task_queue.COMPLETED} has {len(completed)} lines, {len(set(completed) & expected)} tasks")
    if task_queue.parse_tasklist(body(task_queue.TASKLIST)).names:
        problems.append(f"{task_queue.TASKLIST} is not empty")
    if body(task_queue.FAILED).strip():
        problems.append(f"{task_queue.FAILED} is not empty")
    for prefix in ("locks/", "compaction.json", "failed/"):
        left = [k for k in keys if k.startswith(prefix)]
        if left:
            problems.append(f"{len(left)} {prefix} keys left")
    for index in (0, len(names) // 2, len(names) - 1):  # a few outputs are input XOR kernel
        got = body(output_key(job, names[index]))
        want = bytes(b ^ KERNEL[i % len(KERNEL)] for i, b in enumerate(_input(index)))
        if got != want:
            problems.append(f"output of {names[index]} is wrong")
    return problems


def cleanup(admin, bucket: str) -> None:
    keys = _all_keys(admin, bucket)
    for start in range(0, len(keys), 1000):
        chunk = [{"Key": k} for k in keys[start : start + 1000]]
        admin.delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})
    admin.delete_bucket(Bucket=bucket)


def run_one(endpoint: str, task_queue, worker_mod, n: int, k: int, args) -> dict:
    admin = _client(endpoint, 16)
    bucket = f"bench-q-n{n}-k{k}-{uuid.uuid4().hex[:8]}"
    names = [f"in{i:05d}.dat" for i in range(n)]
    setup_bucket(admin, bucket, names)
    job = xor_job(worker_mod.jobs, bucket)
    meter, runner = Meter(bucket), XorRunner(worker_mod)
    errors: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="cicc-bench-queue-"))
    workers = []
    for index in range(k):
        client = _client(endpoint, 4, args.max_attempts)
        meter.attach(client)
        settings_args = dict(
            endpoint_url=endpoint,
            workdir=str(workdir / f"w{index:02d}"),
            lease_seconds=args.lease_seconds,
            slots=args.slots,
            exit_action="none",
        )
        if args.compact_every:
            settings_args["compact_every"] = args.compact_every
        settings = worker_mod.Settings(**settings_args)
        workers.append(worker_mod.Worker(settings, client, job, runner, owner=f"bench-w{index:02d}"))

    def work(worker) -> None:
        try:
            code = worker.run()
            if code != 0:
                errors.append(f"{worker.owner} exited {code}")
        except Exception as error:  # noqa: BLE001 - reported as FAIL, with where it came from
            ours = [f for f in traceback.extract_tb(error.__traceback__) if "site-packages" not in f.filename]
            where = " <- ".join(f"{f.name}()" for f in reversed(ours[-3:]))
            errors.append(f"{worker.owner}: {type(error).__name__} in {where}: {error}")

    threads = [threading.Thread(target=work, args=(w,), name=w.owner) for w in workers]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started
    problems = errors + verify(admin, task_queue, job, names, runner, meter)
    shutil.rmtree(workdir, ignore_errors=True)
    cleanup(admin, bucket)
    list_total = meter.list_bytes["read"] + meter.list_bytes["written"]
    return {
        "tasks": n,
        "workers": k,
        "wall_s": wall,
        "tasks_per_s": n / wall,
        "requests": meter.total,
        "requests_per_task": meter.total / n,
        "by_operation": dict(meter.requests.most_common()),
        "by_status": {f"{op} {st}": c for (op, st), c in sorted(meter.status.items(), key=lambda x: -x[1])},
        "by_class": {f"{op} {cl}": c for (op, cl), c in sorted(meter.by_class.items(), key=lambda x: -x[1])},
        "bytes_out": dict(meter.bytes_out),
        "bytes_in": dict(meter.bytes_in),
        "list_bytes": dict(meter.list_bytes),
        "list_bytes_by_file": {f"{f} {d}": c for (f, d), c in meter.list_bytes_by_file.items()},
        "list_bytes_per_task": list_total / n,
        "listing_bytes": meter.listing_bytes,
        "listing_by_prefix": dict(meter.listing_by_prefix),
        "listing_bytes_per_task": meter.listing_bytes / n,
        "problems": problems,
    }


# --- report ---------------------------------------------------------------------------------------


def verdict(result: dict) -> str:
    if result["problems"]:
        return "FAIL"
    notes = []
    if result["requests_per_task"] > REQUEST_TARGET:
        notes.append("req>10")
    if result["tasks"] >= LIST_TARGET_AT and result["list_bytes_per_task"] > LIST_TARGET_BYTES:
        notes.append("list>64KB")
    return "ok" if not notes else "MISS " + ",".join(notes)


def print_detail(result: dict) -> None:
    n = result["tasks"]
    print(f"--- N={n} K={result['workers']}: {result['requests']} requests in {result['wall_s']:.1f} s")
    print(
        "  per task by operation and status: " + ", ".join(f"{k} {v / n:.3f}" for k, v in result["by_status"].items())
    )
    print("  per task by operation and key:    " + ", ".join(f"{k} {v / n:.3f}" for k, v in result["by_class"].items()))
    print(
        "  list bytes per task: "
        + ", ".join(f"{k} {v / n:,.0f}" for k, v in sorted(result["list_bytes_by_file"].items()))
        + "; listing bytes per task: "
        + ", ".join(f"{p or '(all)'} {v / n:,.0f}" for p, v in result["listing_by_prefix"].items())
    )
    for problem in result["problems"]:
        print(f"  FAIL: {problem}")
    sys.stdout.flush()


def print_table(results: list[dict], top: int) -> None:
    header = (
        f"{'N':>6} | {'K':>3} | {'wall s':>7} | {'tasks/s':>7} | {'req/task':>8} | {'list KB/task':>12} | "
        f"{'listing KB/task':>15} | {'verdict':<12} | top operations (requests/task)"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        n = r["tasks"]
        ops = ", ".join(f"{op} {c / n:.2f}" for op, c in list(r["by_operation"].items())[:top])
        print(
            f"{n:>6} | {r['workers']:>3} | {r['wall_s']:7.1f} | {r['tasks_per_s']:7.1f} | "
            f"{r['requests_per_task']:8.2f} | {r['list_bytes_per_task'] / 1024:12.2f} | "
            f"{r['listing_bytes_per_task'] / 1024:15.2f} | {verdict(r):<12} | {ops}"
        )


def _ints(text: str) -> list[int]:
    return [int(part.replace("_", "")) for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=_ints, default=_ints("1000,10000"), help="task counts N, e.g. 1000,10000")
    parser.add_argument("--workers", type=_ints, default=_ints("1,8,32"), help="worker counts K, e.g. 1,8,32")
    parser.add_argument("--endpoint", help="S3 endpoint URL of an emulator (default: start our own moto_server)")
    parser.add_argument("--lease-seconds", type=int, default=120)
    parser.add_argument("--compact-every", type=int, default=0, help="the worker's compact_every (default: its own)")
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=10,
        help="botocore attempts per call for the workers' clients (standard mode; every attempt is counted). "
        "moto 5.2 answers 500 to a ListObjectsV2 racing a DeleteObject in the same bucket",
    )
    parser.add_argument(
        "--slots",
        type=int,
        default=1,
        help="tasks each worker runs at once (its slots, at most vCPUs / the job's cpus; default 1: one loop a worker)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: --tasks 300 --workers 1,8")
    parser.add_argument("--top", type=int, default=6, help="operations shown per row")
    parser.add_argument("--json", help="also write the raw figures to this file")
    parser.add_argument("--task-queue", help="use this copy of task_queue.py (e.g. a prototype)")
    parser.add_argument("--worker", help="use this copy of cicc_worker.py")
    args = parser.parse_args(argv)
    if args.slots < 1:
        parser.error("--slots must be at least 1")
    if args.quick:
        args.tasks, args.workers = [300], [1, 8]
    task_queue, worker_mod = load_code(args.task_queue, args.worker)
    import boto3
    import botocore

    print(
        f"S3 task queue benchmark: N={args.tasks} K={args.workers}, lease {args.lease_seconds} s, "
        f"compact_every {args.compact_every or worker_mod.Settings().compact_every}, {args.slots} slot(s) a worker, "
        f"{args.max_attempts} attempts per S3 call; "
        f"{INPUT_BYTES}-byte inputs, {len(KERNEL)}-byte kernel; python {platform.python_version()}, "
        f"boto3 {boto3.__version__}, botocore {botocore.__version__}, {os.cpu_count()} cores; "
        f"task_queue {Path(task_queue.__file__).resolve()}"
    )
    results = []

    def matrix(endpoint: str) -> None:
        print(f"endpoint {endpoint}")
        sys.stdout.flush()
        for n in args.tasks:
            for k in args.workers:
                result = run_one(endpoint, task_queue, worker_mod, n, k, args)
                results.append(result)
                print_detail(result)

    if args.endpoint:
        matrix(args.endpoint)
    else:
        with OwnMoto() as moto:
            matrix(moto.url)
    print()
    print_table(results, args.top)
    print(
        f"targets: <= {REQUEST_TARGET:g} requests/task flat in N and K; <= {LIST_TARGET_BYTES // 1024} KB "
        f"list traffic/task at N >= {LIST_TARGET_AT:,} (list = tasklist/completed/failed/rejected bodies "
        "read or written; listing = ListObjectsV2 responses, reported apart)"
    )
    failed = [r for r in results if r["problems"]]
    missed = [r for r in results if verdict(r).startswith("MISS")]
    print(
        "result: "
        + ("FAIL (a run lost or repeated work)" if failed else "all runs correct")
        + ("; targets NOT met" if missed else "; targets met")
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
