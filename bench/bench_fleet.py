"""Benchmark of the fleet on the local cloud (not a test): workers that drain the queue against the seed's
one task per boot.

Side by side in one run, on the same AMI and the same queue - the seed's data set, 7 tasks of 2,000,000
bytes - both through playbooks/fleet.yml (scripts/pipeline.sh), the only difference being two settings:

(a) drain         cicc_fleet_size=3: three machines, each works the queue until it is drained, then
                  terminates itself (the default);
(b) one per boot  the seed's way: each machine takes one task and terminates itself, so there is one
                  machine boot per task: cicc_fleet_size=7, cicc_fleet_tasks_per_machine=1 (user data).

Setup, untimed: a moto_server of its own, then site.yml on a project and bucket of its own (bucket and data
set, IAM, base instance, configure, AMI, a first drain). Each repeat resets the queue to the seed's state
(every key but the data set's removed, the two lists rewritten) before each approach, and runs the two in
alternating order. Measured per approach:
  boots           machines launched (each one a systemd container booting the AMI's image);
  fleet wall      what fleet.yml reports: launch until every worker has terminated (polled each second);
  machine time    the sum of the machines' running time (container start to stop, from the Docker Engine),
                  what an EC2 bill counts;
  playbook        fleet.yml's whole run, checks and summary included.
At the end: teardown.yml (bucket included) and the containers and images of the run removed.

Usage: bench/bench_fleet.py [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
from datetime import datetime

from common import LocalProject, OwnMoto, link_collection

SEED_INPUTS, SEED_DONE = 10, 3
APPROACHES = {
    "drain": {"cicc_fleet_size": 3, "cicc_fleet_tasks_per_machine": 0},
    "one per boot": {"cicc_fleet_size": SEED_INPUTS - SEED_DONE, "cicc_fleet_tasks_per_machine": 1},
}
_WALL = re.compile(r"([0-9.]+) s from launch until every worker had terminated")


class FleetRun(LocalProject):
    """The fleet measured on a project whose AMI is made: reset the queue, run fleet.yml, count."""

    def reset_queue(self) -> None:
        """The seed's state again: the data set's objects stay, every other key goes, the lists are rewritten."""
        from ansible_collections.cicc.cloud.plugins.module_utils import dataset

        pending, completed = dataset.task_names(SEED_INPUTS, SEED_DONE)
        kept = set(dataset.object_names(SEED_INPUTS, SEED_DONE))
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        for key in [item["Key"] for page in pages for item in page.get("Contents", [])]:
            if key not in kept:
                self.s3.delete_object(Bucket=self.bucket, Key=key)
        for key, names in ((dataset.TASKLIST, pending), (dataset.COMPLETED, completed)):
            self.s3.put_object(Bucket=self.bucket, Key=key, Body="".join(f"{name}\n" for name in names).encode())

    def machine_seconds(self, instance_ids: set[str]) -> float:
        total = 0.0
        for instance_id in instance_ids:
            state = self.docker.containers.get(instance_id).attrs["State"]
            total += (_timestamp(state["FinishedAt"]) - _timestamp(state["StartedAt"])).total_seconds()
        return total

    def measure(self, name: str) -> dict:
        self.reset_queue()
        before = self.instances(role="worker")
        output, playbook_seconds = self.playbook(APPROACHES[name], "playbooks/fleet.yml")
        launched = self.instances(role="worker") - before
        wall = _WALL.search(" ".join(output.split()))
        if not wall:
            raise SystemExit(f"fleet.yml printed no wall time:\n{output[-4000:]}")
        return {
            "approach": name,
            "boots": len(launched),
            "wall": float(wall.group(1)),
            "machine": self.machine_seconds(launched),
            "playbook": playbook_seconds,
        }


def _timestamp(text: str) -> datetime:
    """Docker's RFC 3339 time with nanoseconds, to a datetime (microseconds)."""
    head, _dot, fraction = text.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(fraction or '0')[:6]:0<6}+00:00")


def report(results: list[dict]) -> None:
    def median(name: str, field: str) -> float:
        return statistics.median(r[field] for r in results if r["approach"] == name)

    print()
    print(f"{'approach':<14} {'boots':>5} {'fleet wall s':>12} {'machine s':>10} {'playbook s':>11}  (medians)")
    for name in APPROACHES:
        print(
            f"{name:<14} {median(name, 'boots'):>5.0f} {median(name, 'wall'):>12.1f} "
            f"{median(name, 'machine'):>10.1f} {median(name, 'playbook'):>11.1f}"
        )
    ratios = {field: median("one per boot", field) / median("drain", field) for field in ("boots", "wall", "machine")}
    print(
        f"one per boot / drain: {ratios['boots']:.2f}x boots, {ratios['wall']:.2f}x fleet wall time, "
        f"{ratios['machine']:.2f}x machine time"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs (default 1)")
    args = parser.parse_args(argv)
    link_collection()
    print(f"fleet on the local cloud: the seed's {SEED_INPUTS - SEED_DONE} tasks, {args.repeats} repeat(s)")
    print(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs")
    results = []
    with OwnMoto() as moto:
        run = FleetRun(moto.url, moto.port)
        try:
            _output, seconds = run.playbook({"cicc_fleet_size": 3})
            print(f"setup: site.yml (bucket, IAM, base instance, configure, AMI, a first drain) in {seconds:.0f} s")
            for repeat in range(args.repeats):
                names = list(APPROACHES) if repeat % 2 == 0 else list(reversed(APPROACHES))
                for name in names:
                    result = run.measure(name)
                    results.append(result)
                    print(
                        f"repeat {repeat + 1} {name:<12}: {result['boots']} boots, fleet wall {result['wall']:.1f} s, "
                        f"machine time {result['machine']:.1f} s, playbook {result['playbook']:.1f} s",
                        flush=True,
                    )
        finally:
            run.clean_up()
    report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
