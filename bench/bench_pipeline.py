"""Benchmark of the whole local pipeline (not a test): wall time of site.yml cold and warm, of an idempotent
re-run, and of teardown.

On a moto_server of its own and the Docker Engine, with the seed's data set (7 tasks of 2,000,000 bytes) and a
fleet of 3, in this order:
  first run   site.yml on an empty emulator, with the controller's wheel cache (~/.cache/cicc/wheels, the
              boto3 the worker role vendors) emptied first unless --keep-cache: bucket and data set, IAM,
              base instance, configure, AMI, fleet until drained, outputs checked;
  re-run      site.yml again: nothing to change (its changed count is printed), no machine launched;
  teardown    teardown.yml with the bucket: nothing tagged is left;
  warm run    site.yml again from nothing ("delete everything and do it over"), caches now filled;
  teardown    again.
The local base image and the processing image are the machine's (scripts/setup.sh builds them once).

Usage: bench/bench_pipeline.py [--keep-cache]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from pathlib import Path

from common import LocalProject, OwnMoto

WHEEL_CACHE = Path(os.environ.get("HOME", "/root")) / ".cache" / "cicc" / "wheels"
_CHANGED = re.compile(r"^localhost\s*:\s*ok=\d+\s+changed=(\d+)", re.MULTILINE)


def changed(output: str) -> int:
    found = _CHANGED.search(output)
    if not found:
        raise SystemExit(f"no PLAY RECAP in:\n{output[-3000:]}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-cache", action="store_true", help="keep the controller's wheel cache for the first run")
    args = parser.parse_args(argv)
    print(f"local pipeline: the seed's 7 tasks, a fleet of 3; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    if not args.keep_cache:
        shutil.rmtree(WHEEL_CACHE, ignore_errors=True)
    rows = []
    with OwnMoto() as moto:
        for label in ("first run", "warm run"):
            run, start = LocalProject(moto.url, moto.port), len(rows)
            try:
                output, seconds = run.playbook({"cicc_fleet_size": 3})
                rows.append((label, seconds, changed(output)))
                if label == "first run":
                    output, seconds = run.playbook({"cicc_fleet_size": 3})
                    rows.append(("re-run", seconds, changed(output)))
            except BaseException:
                run.clean_up()
                raise
            output, seconds = run.playbook({"cicc_delete_bucket": True}, "playbooks/teardown.yml")
            rows.append(("teardown", seconds, changed(output)))
            print(
                "\n".join(f"{name:<10} {seconds:6.1f} s  changed={count}" for name, seconds, count in rows[start:]),
                flush=True,
            )
    print(f"\n{'step':<10} {'wall s':>6}  changed tasks")
    for name, seconds, count in rows:
        print(f"{name:<10} {seconds:6.1f}  {count}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
