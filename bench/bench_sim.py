"""Simulated benchmark of the S3 task queue (not a test): the real worker loop on an in-memory S3 and a
virtual clock, for the sizes moto cannot reach (N up to 1,000,000 tasks, K up to 1,024 workers).

Each run makes an in-memory bucket (bench/sim_s3.py) laid out as bench_queue.py's (N 16-byte inputs,
tasklist.txt, the 4-byte kernel; set-up not counted), then runs K ``cicc_worker.Worker`` of the XOR job,
one slot each, with bench_queue.py's XorRunner after a "processing" of --task-seconds of virtual time.
task_queue.py and cicc_worker.py are executed afresh with a simulated ``time`` and ``threading``
(bench/sim_clock.py): their threads (slots, prefetch, heartbeats) are real threads that run one at a
time on a virtual clock, in an order fixed by --seed; every S3 request takes --latency of virtual time.
Heartbeats run for real (every lease/3 of virtual time). After each run bench_queue.verify() checks that
every task was done exactly once, on the in-memory bucket.

Per task it prints: S3 requests, protocol requests (less the input GET, output PUT and kernel GET),
list traffic (tasklist/completed/failed/rejected bodies), listing bytes (ListObjectsV2 answers, reckoned
from S3's XML layout), refused lock writes (412) once every task has been claimed (the tail), the
hottest key's peak writes per simulated second and the hottest first path segment's peak requests per
simulated second, and the S3 bill per million tasks (PUT, POST and LIST $0.005 per 1,000; GET and HEAD
$0.0004 per 1,000; DELETE free; refused writes billed as any).

Usage: bench/bench_sim.py [--tasks 1000,10000] [--workers 1,32] [--task-seconds 0,10,60] [--quick]
                          [--latency 0.02] [--seed 1] [--confirm [--moto-json FILE]] [--json FILE]

--confirm runs N = 10,000, K = 64 (0-s tasks) on the simulator and on moto (bench_queue.py in a
subprocess, starting its own moto_server; --moto-json reuses a file its --json wrote) and prints both
with their ratio.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import bench_queue
import sim_clock
from common import ROOT, quiet_worker, xor_job
from sim_s3 import SimMeter, SimS3

TASK_QUEUE_PATH = ROOT / "plugins" / "module_utils" / "task_queue.py"
GRID_TASKS, GRID_WORKERS, GRID_SECONDS = [1000, 10_000, 100_000], [1, 32, 256, 1024], [0.0, 10.0, 60.0]
QUICK = [(1000, 1, 0.0), (1000, 32, 10.0), (1000, 256, 60.0), (1000, 1024, 1.0), (10_000, 256, 60.0)]
# The redesign's targets (today's protocol is not expected to meet them).
TARGET_REQUESTS, TARGET_PROTOCOL, TARGET_LIST_BYTES = 8.0, 6.0, 2048
TARGET_TAIL_REFUSED, TARGET_TAIL_AT = 1.0, (10_000, 256, 60.0)
TARGET_KEY_WRITES, TARGET_PREFIX_REQUESTS, TARGET_RATES_AT = 10, 1000, (1024, 1.0)
PUT_CLASS = ("PutObject", "DeleteObjects", "ListObjectsV2", "CopyObject", "CreateBucket")
GET_CLASS = ("GetObject", "HeadObject")
PUT_PRICE, GET_PRICE = 0.005 / 1000, 0.0004 / 1000
# What task_queue.py, job.py and cicc_worker.py import besides time and threading.
IMPORTED_BY_CODE_UNDER_TEST = (
    "argparse",
    "dataclasses",
    "difflib",
    "email.utils",
    "fnmatch",
    "hashlib",
    "json",
    "logging",
    "os",
    "pathlib",
    "random",
    "re",
    "shutil",
    "signal",
    "socket",
    "subprocess",
    "urllib.request",
    "uuid",
    "yaml",
    "boto3",
    "botocore.config",
    "botocore.exceptions",
)


def load_simulated_code():
    """(task_queue, cicc_worker) executed afresh on the virtual clock; whatever else they import is
    imported first, so that only these two files (and job.py) see the simulated modules."""
    for name in IMPORTED_BY_CODE_UNDER_TEST:
        importlib.import_module(name)
    with sim_clock.simulated_modules():
        task_queue, worker_mod = bench_queue.load_code(str(TASK_QUEUE_PATH), None)
    if not issubclass(worker_mod.Heartbeat, sim_clock.Thread) or task_queue.time is not sim_clock.sim_time:
        raise SystemExit("the code under test did not bind the virtual clock (imported before the swap?)")
    # Lock tokens from the seeded generator, so that a run's ETags repeat too.
    task_queue.uuid = type("SeededUuid", (), {"uuid4": staticmethod(lambda: uuid.UUID(int=random.getrandbits(128)))})
    return task_queue, worker_mod


class TimedXorRunner(bench_queue.XorRunner):
    """bench_queue's XOR step after ``seconds`` of virtual processing time."""

    def __init__(self, worker_mod, scheduler: sim_clock.Scheduler, seconds: float) -> None:
        super().__init__(worker_mod)
        self.scheduler, self.seconds = scheduler, seconds

    def run(self, job, task: str, dirs, image_id: str):
        self.scheduler.sleep(self.seconds)
        return super().run(job, task, dirs, image_id)


def run_one(task_queue, worker_mod, n: int, k: int, seconds: float, args, latency: float | None = None) -> dict:
    scheduler = sim_clock.new_scheduler()
    random.seed(f"{args.seed}-{n}-{k}-{seconds}")
    s3 = SimS3()
    admin = s3.client(scheduler)  # no latency, not counted: the set-up and the checks
    bucket = f"sim-n{n}-k{k}"
    names = [f"in{i:06d}.dat" for i in range(n)]
    started = time.monotonic()
    bench_queue.setup_bucket(admin, bucket, names)
    setup_s = time.monotonic() - started
    job = xor_job(worker_mod.jobs, bucket)
    meter = SimMeter(claims_before_tail=n)
    runner = TimedXorRunner(worker_mod, scheduler, seconds)
    workdir = Path(tempfile.mkdtemp(prefix="cicc-bench-sim-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    # Uniform latency keeps the workers in step (all compacting at once); jitter, from a generator of its
    # own, lets them drift apart as on a real network.
    spread = random.Random(f"{args.seed}-latency")
    jitter = (lambda: spread.uniform(1 - args.jitter, 1 + args.jitter)) if args.jitter else None
    workers = []
    for index in range(k):
        settings = worker_mod.Settings(
            workdir=str(workdir), lease_seconds=args.lease_seconds, slots=1, exit_action="none"
        )
        client = s3.client(scheduler, args.latency if latency is None else latency, meter, jitter)
        workers.append(worker_mod.Worker(settings, client, job, runner, owner=f"sim-w{index:04d}"))
    errors: list[str] = []

    def work(worker) -> None:
        code = worker.run()
        if code != 0:
            errors.append(f"{worker.owner} exited {code}")

    def fleet() -> None:
        threads = [sim_clock.Thread(target=work, args=(worker,), name=worker.owner) for worker in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    started = time.monotonic()
    scheduler.run(fleet)
    wall = time.monotonic() - started
    problems = errors + scheduler.errors + bench_queue.verify(admin, task_queue, job, names, runner, meter)
    shutil.rmtree(workdir, ignore_errors=True)
    result = figures(meter, n, k, seconds, wall, setup_s, scheduler, problems)
    result["latency_s"] = args.latency if latency is None else latency
    return result


def figures(meter: SimMeter, n: int, k: int, seconds: float, wall: float, setup_s: float, scheduler, problems):
    data = meter.by_class[("GetObject", "input")] + meter.by_class[("PutObject", "output")]
    data += meter.by_class[("GetObject", "kernel")]
    key_peak, hot_key = meter.key_writes.result()[:2]
    prefix_peak, hot_prefix = meter.prefix_requests.result()[:2]
    puts = sum(meter.requests[op] for op in PUT_CLASS)
    gets = sum(meter.requests[op] for op in GET_CLASS)
    list_total = meter.list_bytes["read"] + meter.list_bytes["written"]
    return {
        "tasks": n,
        "workers": k,
        "task_seconds": seconds,
        "requests": meter.total,
        "requests_per_task": meter.total / n,
        "protocol_per_task": (meter.total - data) / n,
        "list_bytes_per_task": list_total / n,
        "listing_bytes_per_task": meter.listing_bytes / n,
        "refused_per_task": sum(meter.refused.values()) / n,
        "refused_tail_locks_per_task": meter.refused_tail_locks / n,
        "hot_key_writes_per_s": key_peak,
        "hot_key": hot_key,
        "hot_prefix_requests_per_s": prefix_peak,
        "hot_prefix": hot_prefix,
        "cost_per_million_usd": (puts * PUT_PRICE + gets * GET_PRICE) / n * 1e6,
        "virtual_s": scheduler.now,
        "tail_from_s": meter.tail_from - sim_clock.EPOCH if meter.tail_from else None,
        "wall_s": wall,
        "setup_s": setup_s,
        "switches": scheduler.switches,
        "by_operation": dict(meter.requests.most_common()),
        "by_status": {f"{op} {st}": c for (op, st), c in sorted(meter.status.items(), key=lambda x: -x[1])},
        "by_class": {f"{op} {cl}": c for (op, cl), c in sorted(meter.by_class.items(), key=lambda x: -x[1])},
        "refused": {f"{op} {cl}": c for (op, cl), c in meter.refused.items()},
        "list_bytes_by_file": {f"{f} {d}": c for (f, d), c in meter.list_bytes_by_file.items()},
        "listing_by_prefix": dict(meter.listing_by_prefix),
        "problems": problems,
    }


# --- report ---------------------------------------------------------------------------------------


def target_misses(r: dict) -> list[str]:
    misses = []
    if r["requests_per_task"] > TARGET_REQUESTS:
        misses.append("req>8")
    if r["protocol_per_task"] > TARGET_PROTOCOL:
        misses.append("proto>6")
    if r["list_bytes_per_task"] > TARGET_LIST_BYTES:
        misses.append("list>2KB")
    if (r["tasks"], r["workers"], r["task_seconds"]) == TARGET_TAIL_AT:
        if r["refused_tail_locks_per_task"] > TARGET_TAIL_REFUSED:
            misses.append("tail>1")
    if (r["workers"], r["task_seconds"]) == TARGET_RATES_AT:
        if r["hot_key_writes_per_s"] > TARGET_KEY_WRITES:
            misses.append("key>10/s")
        if r["hot_prefix_requests_per_s"] > TARGET_PREFIX_REQUESTS:
            misses.append("prefix>1000/s")
    return misses


def print_detail(r: dict) -> None:
    n = r["tasks"]
    print(
        f"--- N={n} K={r['workers']} task {r['task_seconds']:g} s: {r['requests']} requests, "
        f"{r['virtual_s']:.0f} s simulated (tail from {r['tail_from_s'] or 0:.0f} s) in {r['wall_s']:.1f} s wall "
        f"(+{r['setup_s']:.1f} s set-up, {r['switches']} thread switches)"
    )
    print("  per task by operation and status: " + ", ".join(f"{k} {v / n:.3f}" for k, v in r["by_status"].items()))
    print("  per task by operation and key:    " + ", ".join(f"{k} {v / n:.3f}" for k, v in r["by_class"].items()))
    print("  refused (412) per task: " + (", ".join(f"{k} {v / n:.3f}" for k, v in r["refused"].items()) or "none"))
    print(
        f"  hottest key {r['hot_key']} ({r['hot_key_writes_per_s']} writes/s), "
        f"hottest prefix {r['hot_prefix']} ({r['hot_prefix_requests_per_s']} requests/s)"
    )
    for problem in r["problems"]:
        print(f"  FAIL: {problem.splitlines()[0] if len(problem) > 2000 else problem}")
    sys.stdout.flush()


def print_table(results: list[dict]) -> None:
    header = (
        f"{'N':>7} | {'K':>4} | {'task s':>6} | {'req/task':>8} | {'proto/task':>10} | {'list KB/task':>12} | "
        f"{'listing KB/task':>15} | {'tail 412/task':>13} | {'key w/s':>7} | {'prefix r/s':>10} | "
        f"{'$/M tasks':>9} | {'sim s':>8} | {'wall s':>7} | verdict"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        misses = target_misses(r)
        verdict = "FAIL" if r["problems"] else ("MISS " + ",".join(misses) if misses else "ok")
        print(
            f"{r['tasks']:>7} | {r['workers']:>4} | {r['task_seconds']:>6g} | {r['requests_per_task']:8.2f} | "
            f"{r['protocol_per_task']:10.2f} | {r['list_bytes_per_task'] / 1024:12.2f} | "
            f"{r['listing_bytes_per_task'] / 1024:15.2f} | {r['refused_tail_locks_per_task']:13.2f} | "
            f"{r['hot_key_writes_per_s']:>7} | {r['hot_prefix_requests_per_s']:>10} | "
            f"{r['cost_per_million_usd']:9.2f} | {r['virtual_s']:8.0f} | {r['wall_s']:7.1f} | {verdict}"
        )
    print(
        f"targets (the redesign): <= {TARGET_REQUESTS:g} requests/task (<= {TARGET_PROTOCOL:g} protocol), "
        f"<= {TARGET_LIST_BYTES // 1024} KB list traffic/task, <= {TARGET_TAIL_REFUSED:g} refused lock write/task "
        f"in the tail at N={TARGET_TAIL_AT[0]:,} K={TARGET_TAIL_AT[1]} {TARGET_TAIL_AT[2]:g}-s tasks, "
        f"no key > {TARGET_KEY_WRITES} writes/s and no prefix > {TARGET_PREFIX_REQUESTS} requests/s at "
        f"K={TARGET_RATES_AT[0]} with {TARGET_RATES_AT[1]:g}-s tasks"
    )


# --- the comparison with moto ---------------------------------------------------------------------

CONFIRM_N, CONFIRM_K = 10_000, 64


def moto_figures(args) -> dict:
    path = args.moto_json
    if not path:
        path = str(Path(tempfile.mkdtemp(prefix="cicc-bench-sim-")) / "moto.json")
        command = [sys.executable, str(ROOT / "bench" / "bench_queue.py"), "--tasks", str(CONFIRM_N)]
        command += ["--workers", str(CONFIRM_K), "--lease-seconds", str(args.lease_seconds), "--json", path]
        print("moto: " + " ".join(command[1:]), flush=True)
        subprocess.run(command, cwd=ROOT, check=True)
    return json.loads(Path(path).read_text())[0]


def moto_latency(moto: dict) -> float:
    """The time a request of moto's took as its workers saw it (each sends one at a time): K x wall / requests."""
    return moto["workers"] * moto["wall_s"] / moto["requests"]


def print_confirm(sims: list[dict], moto: dict) -> None:
    """Each simulated run beside moto's (the last one had moto's own time per request), with their ratio."""
    n = moto["tasks"]
    ops = sorted(set(sims[0]["by_operation"]) | set(moto["by_operation"]))

    def rows(r: dict) -> list[tuple[str, float]]:
        found = [
            ("requests/task", r["requests_per_task"]),
            ("list KB/task", r["list_bytes_per_task"] / 1024),
            ("listing KB/task", r["listing_bytes_per_task"] / 1024),
        ]
        return found + [(f"{op}/task", r["by_operation"].get(op, 0) / n) for op in ops]

    runs = ", ".join(f"{r['wall_s']:.0f} s wall at {r['latency_s'] * 1000:.0f} ms a request" for r in sims)
    print(
        f"confirm: N={n:,} K={moto['workers']}, 0-s tasks; moto: {moto['wall_s']:.0f} s wall, "
        f"{moto_latency(moto) * 1000:.0f} ms a request as a worker sees it; simulator: {runs}"
    )
    columns = " | ".join(f"{'sim ' + format(r['latency_s'] * 1000, '.0f') + ' ms':>11} | {'ratio':>6}" for r in sims)
    header = f"{'figure':<20} | {'moto':>8} | {columns}"
    print(header)
    print("-" * len(header))
    ours = [rows(r) for r in sims]
    for index, (name, theirs) in enumerate(rows(moto)):
        cells = [
            f"{run[index][1]:11.3f} | " + (f"{run[index][1] / theirs:6.3f}" if theirs else "   n/a") for run in ours
        ]
        print(f"{name:<20} | {theirs:8.3f} | " + " | ".join(cells))
    if moto["problems"]:
        print("moto run problems: " + "; ".join(moto["problems"]))


def _ints(text: str) -> list[int]:
    return [int(part.replace("_", "")) for part in text.split(",") if part.strip()]


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=_ints, help=f"task counts N (default {GRID_TASKS})")
    parser.add_argument("--workers", type=_ints, help=f"worker counts K (default {GRID_WORKERS})")
    parser.add_argument("--task-seconds", type=_floats, help=f"virtual processing times (default {GRID_SECONDS})")
    parser.add_argument("--quick", action="store_true", help=f"only the runs {QUICK}")
    parser.add_argument("--latency", type=float, default=0.02, help="virtual seconds each S3 request takes")
    parser.add_argument(
        "--jitter", type=float, default=0.0, help="each request takes latency x uniform(1 - J, 1 + J) (default 0)"
    )
    parser.add_argument("--lease-seconds", type=int, default=120)
    parser.add_argument("--seed", default="1")
    parser.add_argument("--confirm", action="store_true", help=f"N={CONFIRM_N} K={CONFIRM_K} here and on moto")
    parser.add_argument("--moto-json", help="with --confirm: the moto figures a bench_queue.py --json run wrote")
    parser.add_argument("--json", help="also write the raw figures to this file")
    args = parser.parse_args(argv)
    quiet_worker()
    logging.getLogger("cicc-worker").setLevel(logging.ERROR)
    task_queue, worker_mod = load_simulated_code()
    if args.confirm:
        runs = [(CONFIRM_N, CONFIRM_K, 0.0)]
    elif args.quick and not (args.tasks or args.workers or args.task_seconds):
        runs = QUICK
    else:
        runs = [
            (n, k, t)
            for n in args.tasks or GRID_TASKS
            for k in args.workers or GRID_WORKERS
            for t in args.task_seconds or GRID_SECONDS
        ]
        if not (args.tasks or args.workers or args.task_seconds):  # the grid, and the rate targets' own run
            runs.append((10_000, *TARGET_RATES_AT))
    print(
        f"simulated S3 task queue: {len(runs)} run(s), latency {args.latency * 1000:g} ms a request "
        f"(jitter {args.jitter:g}), lease "
        f"{args.lease_seconds} s, compact_every {worker_mod.Settings().compact_every}, 1 slot a worker, seed {args.seed}"
    )
    moto = moto_figures(args) if args.confirm else None
    results = []
    for n, k, seconds in runs:
        results.append(run_one(task_queue, worker_mod, n, k, seconds, args))
        print_detail(results[-1])
        if args.json:  # after every run: a long grid stopped half-way keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=1))
    if moto:  # again with moto's latency: the figures that depend on how requests interleave
        results.append(run_one(task_queue, worker_mod, *runs[0], args, latency=moto_latency(moto)))
        print_detail(results[-1])
    print()
    print_table(results)
    if moto:
        print()
        print_confirm(results, moto)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    failed = [r for r in results if r["problems"]]
    print("result: " + ("FAIL (a run lost or repeated work)" if failed else "all runs correct"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
