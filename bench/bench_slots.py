"""Benchmark of the worker's slots (not a test): one machine running one task at a time against two at once.

The target: on this 2-core machine a worker with slots=2 drains a queue of CPU-bound tasks at least
1.8 x as fast as with slots=1, measured side by side in the same run.

The job is the benchmark's own, CPU-bound: image ``cicc-base:bookworm`` (source baked), command
``python3 -c <program>``, cpus 1, memory_mib 256, outputs ``results/{task}/{file}``. The program
burns one CPU until the container has used ``--seconds`` of CPU time (``time.process_time()``:
the same work per task whatever else runs on the machine, so a slower CPU shows as a longer
wall time, never as less work), then writes ``{output_dir}/result.txt`` (the task, its loop count
and CPU seconds) and prints a SUCCESS line.

Each repeat drains the same queue of T tasks (t000.dat ..., 16-byte inputs the program does not
read, listed in tasklist.txt; the upload is not timed) on a fresh bucket twice, in alternating
order (slots=1 first on even repeats, slots=2 first on odd ones): one ``cicc_worker.Worker`` of the
job with ``DockerRunner()``, its own S3 client (``cicc_worker.s3_client``) and work directory,
lease_seconds 120, ``Settings.slots`` 1 or 2. ``run()`` is timed from start to return (image
lookup, claims, containers, publishing the result and the manifest, final compaction).

Figures per slots value (medians over repeats): wall time, throughput (tasks/s) and, side by side,
the ratio slots=2 / slots=1 of the throughputs (= the ratio of wall times; median of the ratios of
each repeat's pair). In containers = time inside ``runner.run`` (container create, start, wait,
logs, remove), summed over the slots, over slots x wall: the share of the worker's slot-seconds
spent in containers; burning = T x seconds over slots x wall, the share spent on the task's own
work; tail = from the end of the last container to the return of ``run()`` (publishing the last
result, a slot's last look for work at the end of the queue, final compaction). After each run:
every task done once, none failed, each result.txt and manifest in the bucket (not timed).

Usage: bench/bench_slots.py [--tasks 12] [--seconds 3] [--repeats 2] [--quick] [--endpoint URL]
                            [--image cicc-base:bookworm]

--quick: 4 tasks of 1 s, one repeat (the ratio is then lower: container starts and the end of the queue weigh more).
Without --endpoint it starts its own moto_server (from this interpreter's virtualenv) on a free
127.0.0.1 port and stops it at the end.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import types
import uuid
from pathlib import Path

import common

TARGET = 1.8
DEFAULT_IMAGE = "cicc-base:bookworm"
SLOTS = (1, 2)
RESULT = "result.txt"
INPUT = b"cicc bench slots"  # 16 bytes; the program does not read it
# The job's program, one command item: {output_dir} and {task} are the job's placeholders (and the
# only braces in it); SECONDS is filled in before the job is made.
PROGRAM = """import time
loops = 0
end = time.process_time() + SECONDS
while time.process_time() < end:
    loops += 1
used = time.process_time()
with open('{output_dir}/result.txt', 'w') as result:
    result.write('%s %d %.3f' % ('{task}', loops, used))
print('SUCCESS {task}: %d loops in %.2f s of CPU' % (loops, used))
"""


# --- loading the code under test ------------------------------------------------------------------


def load_code() -> types.ModuleType:
    """cicc_worker from this checkout (its ``jobs`` is plugins/module_utils/job.py)."""
    common.link_collection()
    return common.load_worker()


def burn_job(jobs: types.ModuleType, bucket: str, image: str, seconds: float):
    """The benchmark's CPU-bound job on ``bucket``."""
    return jobs.load(
        {
            "name": "bench-slots",
            "bucket": bucket,
            "prefix": "",
            "tasks": {"source": "tasklist"},
            "image": {"name": image, "source": "baked"},
            "command": ["python3", "-c", PROGRAM.replace("SECONDS", repr(float(seconds)))],
            "cpus": 1,
            "memory_mib": 256,
            "timeout_seconds": int(seconds * 20) + 120,
            "retry": {"attempts": 1},
            "outputs": {"prefix": "results/", "key": "{task}/{file}"},
        }
    )


# --- one run --------------------------------------------------------------------------------------


def queue_objects(names: list[str]) -> dict[str, bytes]:
    """The queue's objects: each task's input, then tasklist.txt naming them all."""
    from ansible_collections.cicc.cloud.plugins.module_utils.task_queue import TASKLIST

    tasklist = "".join(f"{name}\n" for name in names).encode()
    return {**{name: INPUT for name in names}, TASKLIST: tasklist}


def check_results(client, cicc_worker, job, names: list[str]) -> list[tuple[int, float]]:
    """(loops, CPU seconds) of each task's result.txt; FAIL when a result or a manifest is missing or wrong."""
    queue = cicc_worker.task_queue.Queue(job.bucket, job.prefix)
    results = []
    for name in names:
        key = job.output_key(name, RESULT)
        try:
            task, loops, used = client.get_object(Bucket=job.bucket, Key=key)["Body"].read().decode().split()
            client.head_object(Bucket=job.bucket, Key=queue.manifest_key(name))
        except Exception as error:  # noqa: BLE001 - reported as FAIL with what was missing
            raise SystemExit(f"FAIL: {name}: no result s3://{job.bucket}/{key} or no manifest ({error})") from None
        if task != name:
            raise SystemExit(f"FAIL: s3://{job.bucket}/{key} is the result of {task}, not {name}")
        results.append((int(loops), float(used)))
    return results


def run_worker(cicc_worker, endpoint: str, names: list[str], slots: int, args, tmp: Path) -> dict:
    settings = cicc_worker.Settings(
        endpoint_url=endpoint, workdir=str(tmp / f"slots{slots}-{uuid.uuid4().hex[:8]}"), lease_seconds=120, slots=slots
    )
    client = cicc_worker.s3_client(settings)
    bucket = common.fill_bucket(client, queue_objects(names), "cicc-bench-slots-")
    job = burn_job(cicc_worker.jobs, bucket, args.image, args.seconds)
    client.list_objects_v2(Bucket=bucket, MaxKeys=1)  # warm: connection and credentials (untimed)
    runner = common.TimedRunner(cicc_worker.DockerRunner())
    worker = cicc_worker.Worker(settings, client, job, runner, owner=f"bench-slots{slots}")
    wall, ended = common.drain(worker, names, f"slots={slots}: worker")
    if worker.slots != slots:
        raise SystemExit(f"FAIL: asked for {slots} slots, the worker ran {worker.slots} (too few vCPUs or memory?)")
    results = check_results(client, cicc_worker, job, names)
    shutil.rmtree(settings.workdir, ignore_errors=True)
    return {
        "slots": slots,
        "wall": wall,
        "tasks_per_s": len(names) / wall,
        "runner": runner.seconds,
        "in_containers": runner.seconds / (slots * wall),
        "tail": ended - runner.last_end,
        "per_container": runner.seconds / runner.runs,
        "burning": len(names) * args.seconds / (slots * wall),
        "loops_per_cpu_s": statistics.median(loops / used for loops, used in results),
    }


def warm_up(image: str) -> float:
    """One untimed container of the image, so neither slots value pays for its first start."""
    import docker

    client = docker.from_env()
    started = time.perf_counter()
    client.containers.run(image, ["python3", "-c", "pass"], network_mode="none", remove=True)
    seconds = time.perf_counter() - started
    client.close()
    return seconds


# --- report ---------------------------------------------------------------------------------------


def report(runs: dict[int, list[dict]], pairs: list[float], tasks: int) -> bool:
    def med(slots: int, field: str) -> float:
        return statistics.median(run[field] for run in runs[slots])

    print()
    print(
        f"{tasks} tasks, medians over {len(pairs)} repeat(s); ratio = slots 2 / slots 1 throughput, paired per repeat"
    )
    common.print_header(
        f"{'slots':>5} | {'wall s':>7} | {'tasks/s':>7} | {'each repeat (s)':<16} | {'s/container':>11} | "
        f"{'in containers':>13} | {'burning':>7} | {'tail s':>6} | {'loops/CPU-s':>11} | ratio"
    )
    verdict = statistics.median(pairs)
    for slots in SLOTS:
        each = " ".join(f"{run['wall']:.1f}" for run in runs[slots])
        ratio = f"{verdict:.2f} x (each repeat: {' '.join(f'{r:.2f}' for r in pairs)})" if slots == 2 else "1"
        print(
            f"{slots:>5} | {med(slots, 'wall'):7.2f} | {med(slots, 'tasks_per_s'):7.3f} | {each:<16} | "
            f"{med(slots, 'per_container'):11.2f} | {med(slots, 'in_containers'):13.1%} | {med(slots, 'burning'):7.1%} | "
            f"{med(slots, 'tail'):6.2f} | {med(slots, 'loops_per_cpu_s'):11.3g} | {ratio}"
        )
    met = verdict >= TARGET
    print(f"verdict (median of paired ratios): {verdict:.2f} x, target >= {TARGET} x {'met' if met else 'NOT met'}")
    print("  s/container: time in runner.run per task; in containers: time in runner.run over slots x wall;")
    print("  burning: the tasks' CPU seconds over slots x wall; tail: from the last container's end to run()'s return;")
    print(
        "  loops/CPU-s: the program's loop rate per CPU second (lower with 2 slots if the cores slow each other down)"
    )
    return met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=12, help="tasks T in the queue (default 12)")
    parser.add_argument("--seconds", type=float, default=3.0, help="CPU seconds each task burns (default 3)")
    parser.add_argument("--repeats", type=int, default=2, help="repeats of each slots value, alternated (default 2)")
    parser.add_argument("--quick", action="store_true", help="small sizes: --tasks 4 --seconds 1 --repeats 1")
    parser.add_argument("--endpoint", help="S3 endpoint URL (default: a moto_server of our own)")
    parser.add_argument(
        "--image", default=DEFAULT_IMAGE, help=f"the job's image, with python3 (default {DEFAULT_IMAGE})"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.seconds, args.repeats = 4, 1.0, 1
    if args.tasks < 1 or args.seconds <= 0 or args.repeats < 1:
        parser.error("--tasks and --repeats must be at least 1, --seconds above 0")
    common.quiet_worker()

    import docker

    cicc_worker = load_code()
    client = docker.from_env()
    docker_version = client.version()["Version"]
    common.require_image(client, args.image, "scripts/setup.sh builds it")
    names = [f"t{index:03d}.dat" for index in range(args.tasks)]
    print(
        f"worker slots 1 vs 2: {args.tasks} CPU-bound tasks of {args.seconds:g} s of CPU, image {args.image}, "
        f"cpus 1, memory 256 MiB, {args.repeats} repeat(s)"
    )
    common.print_machine(docker_version)
    runs: dict[int, list[dict]] = {slots: [] for slots in SLOTS}
    pairs: list[float] = []
    with common.s3_endpoint(args.endpoint) as endpoint:
        print(f"warm-up container run (untimed in results): {warm_up(args.image):.2f} s")
        with tempfile.TemporaryDirectory(prefix="cicc-bench-slots-") as tmp_name:
            for repeat in range(args.repeats):
                pair = {}
                for slots in common.in_turn(SLOTS, repeat):
                    result = run_worker(cicc_worker, endpoint, names, slots, args, Path(tmp_name))
                    runs[slots].append(result)
                    pair[slots] = result
                    print(
                        f"  repeat {repeat + 1} slots {slots}: {result['wall']:.2f} s, {result['tasks_per_s']:.3f} tasks/s, "
                        f"in containers {result['in_containers']:.1%}, tail {result['tail']:.2f} s"
                    )
                pairs.append(pair[2]["tasks_per_s"] / pair[1]["tasks_per_s"])
    common.print_load_at_end()
    report(runs, pairs, args.tasks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
