"""Run every benchmark of cicc.cloud (bench/bench_*.py) in turn and print each one's output.

Benchmarks print figures; they are not tests. Each script runs in a subprocess of this same
interpreter, from the repository root, one after the other (they measure time: never two at once).

--quick asks for small sizes: a script whose --help lists a --quick flag gets --quick; a script
without one but listed in QUICK_FALLBACK gets the arguments given there, provided its --help
still lists every flag they use; any other script runs with its defaults (and says so). A script
listed in QUICK_ONLY runs in its quick form either way: its full grid takes hours (run it by hand).

Usage: bench/run_all.py [--quick] [--list] [NAME ...]   (NAME: e.g. queue or bench_queue.py)
Exit code: 0 when every script exited 0, else 1.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

# Small sizes for scripts that have no --quick flag of their own (checked against their --help).
QUICK_FALLBACK = {
    "bench_worker.py": ["--repeats", "1"],
    "bench_xor.py": ["--sizes", "2MB,32MB", "--repeats", "3"],
}

# Scripts whose full sizes are too long for a run of every benchmark.
QUICK_ONLY = ("bench_sim.py",)


def discover(selected: list[str]) -> list[Path]:
    scripts = sorted(BENCH.glob("bench_*.py"))
    if not selected:
        return scripts
    wanted = {name if name.startswith("bench_") else f"bench_{name}" for name in selected}
    wanted = {name if name.endswith(".py") else f"{name}.py" for name in wanted}
    unknown = wanted - {script.name for script in scripts}
    if unknown:
        raise SystemExit(
            f"no such benchmark: {', '.join(sorted(unknown))} (have: {', '.join(s.name for s in scripts)})"
        )
    return [script for script in scripts if script.name in wanted]


def _flags(script: Path) -> str:
    """The script's --help text ('' when it has none or it fails)."""
    try:
        done = subprocess.run(
            [sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def quick_args(script: Path) -> tuple[list[str], str]:
    """(arguments, note) that make ``script`` run with small sizes."""
    help_text = _flags(script)
    if "--quick" in help_text:
        return ["--quick"], "--quick"
    fallback = QUICK_FALLBACK.get(script.name)
    if fallback and all(arg in help_text for arg in fallback if arg.startswith("--")):
        return fallback, "quick sizes: " + " ".join(fallback)
    return [], "no quick mode: default sizes"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes where a script supports it")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("names", nargs="*", help="only these benchmarks (e.g. queue xor)")
    args = parser.parse_args(argv)
    scripts = discover(args.names)
    if args.list or not scripts:
        print("\n".join(script.name for script in scripts) or "no bench/bench_*.py found")
        return 0
    summary = []
    for script in scripts:
        if args.quick or script.name in QUICK_ONLY:
            extra, note = quick_args(script)
        else:
            extra, note = [], "full sizes"
        command = [sys.executable, str(script.relative_to(ROOT)), *extra]
        print(f"==== {script.name} ({note}): {' '.join(command[1:])}", flush=True)
        started = time.monotonic()
        try:
            code = subprocess.run(command, cwd=ROOT, check=False).returncode
        except KeyboardInterrupt:
            print(f"==== {script.name} interrupted", flush=True)
            return 130
        seconds = time.monotonic() - started
        summary.append((script.name, code, seconds))
        print(f"==== {script.name}: exit {code} after {seconds:.1f} s\n", flush=True)
    print("benchmark        exit  seconds")
    for name, code, seconds in summary:
        print(f"{name:<16} {code:>4} {seconds:8.1f}")
    return 0 if all(code == 0 for _name, code, _seconds in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
