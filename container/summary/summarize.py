"""Summary step of cicc.cloud's second example job: a byte summary and a byte histogram of one input.

Usage, in a job's container (the task's input at /cicc/input, an empty /cicc/output whose contents
are published)::

    summarize.py --input /cicc/input/in3.dat --output-dir /cicc/output

writes two files into the output directory:

- ``summary.json``: ``{"distinct_bytes": int, "input": NAME, "max": int|null, "mean": float,
  "min": int|null, "sha256": HEX, "size": int, "zero_bytes": int}`` (sorted keys, indent 1, a
  final newline). ``input`` is the input's base name, ``mean`` the mean byte value (0.0 for an
  empty input), ``min``/``max`` the smallest and largest byte value (null for an empty input),
  ``zero_bytes`` the number of 0x00 bytes and ``distinct_bytes`` how many of the 256 values occur.
- ``histogram.npy``: ``numpy.save`` of a uint64 array of 256 counts, the count of each byte value
  (it sums to ``size``).

The input is read in chunks of 1 MiB, so memory stays flat whatever its size. Each output is
written atomically: a hidden temp file in the output directory, fsync, then ``os.replace`` onto its
name. Both are complete before either is published, ``histogram.npy`` first and ``summary.json``
last, so a new ``summary.json`` means both are there. On any failure the temp files are removed and
no partial output is ever visible. Only a SIGKILL can leave a ``.NAME.*.tmp`` file behind.

Exit codes (one stdout line ``SUCCESS NAME -> summary.json histogram.npy SIZE bytes`` on success,
one stderr line otherwise): 0 success, 2 usage (bad arguments, output directory missing or not a
directory), 3 input missing, 6 input unreadable (a directory, permission, I/O error), 7 an output
cannot be written, 143 stopped by SIGTERM (``docker stop``) before completing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
from types import FrameType
from typing import BinaryIO, NoReturn

import numpy as np

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NO_INPUT = 3
EXIT_UNREADABLE = 6
EXIT_CANNOT_WRITE = 7
EXIT_TERMINATED = 128 + signal.SIGTERM

PROG = "summarize.py"
SUMMARY_NAME = "summary.json"
HISTOGRAM_NAME = "histogram.npy"
CHUNK_BYTES = 1024 * 1024


class SummaryError(Exception):
    """A failure with the exit code and the one-line message a person acts on."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Terminated(BaseException):
    """Raised from the SIGTERM handler so that cleanup runs before the process ends."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise SummaryError(EXIT_USAGE, f"usage error: {message} (see {PROG} --help)")


def _path(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError("the path is empty")
    if "\0" in value:
        raise argparse.ArgumentTypeError(f"{value!r} contains NUL")
    return value


def _open_input(path: str) -> BinaryIO:
    try:
        return open(path, "rb", buffering=0)  # noqa: SIM115 - the caller closes it
    except FileNotFoundError:
        raise SummaryError(EXIT_NO_INPUT, f"input {path} does not exist: stage it first") from None
    except IsADirectoryError:
        raise SummaryError(EXIT_UNREADABLE, f"input {path} is a directory, not a file") from None
    except OSError as exc:
        raise SummaryError(EXIT_UNREADABLE, f"cannot open input {path}: {exc.strerror or exc}") from None


def histogram_and_digest(handle: BinaryIO, path: str) -> tuple[np.ndarray, str]:
    """Read ``handle`` to its end in chunks; return the 256 byte counts (uint64) and the sha256 hex digest."""
    counts = np.zeros(256, dtype=np.uint64)
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    try:
        while True:
            count = handle.readinto(view)
            if not count:
                break
            chunk = view[:count]
            digest.update(chunk)
            counts += np.bincount(np.frombuffer(chunk, dtype=np.uint8), minlength=256).astype(np.uint64)
    except IsADirectoryError:
        raise SummaryError(EXIT_UNREADABLE, f"input {path} is a directory, not a file") from None
    except OSError as exc:
        raise SummaryError(EXIT_UNREADABLE, f"cannot read input {path}: {exc.strerror or exc}") from None
    return counts, digest.hexdigest()


def summarize(name: str, counts: np.ndarray, sha256: str) -> dict[str, object]:
    """The summary of an input named ``name`` from its byte counts and digest."""
    values = [int(value) for value in counts]
    size = sum(values)
    present = [byte for byte, value in enumerate(values) if value]
    total = sum(byte * value for byte, value in enumerate(values))
    return {
        "input": name,
        "size": size,
        "sha256": sha256,
        "mean": total / size if size else 0.0,
        "min": present[0] if present else None,
        "max": present[-1] if present else None,
        "zero_bytes": values[0],
        "distinct_bytes": len(present),
    }


def _create_temp(directory: str, name: str) -> tuple[int, str]:
    """Create a new hidden file next to the output, with the mode any new file gets (0666 less umask)."""
    attempts = 100
    while True:
        path = os.path.join(directory, f".{name}.{os.urandom(4).hex()}.tmp")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), path
        except FileExistsError:
            attempts -= 1
            if not attempts:
                raise


def _fsync_directory(directory: str) -> None:
    """Make the renames durable; a file system that refuses to fsync a directory must not fail the run."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def write_outputs(directory: str, summary: dict[str, object], counts: np.ndarray) -> None:
    """Publish histogram.npy then summary.json in ``directory``, each whole or not at all."""
    temps: dict[str, str] = {}
    current = HISTOGRAM_NAME
    try:
        fd, temps[HISTOGRAM_NAME] = _create_temp(directory, HISTOGRAM_NAME)
        with open(fd, "wb") as out:
            np.save(out, counts.astype(np.uint64, copy=False), allow_pickle=False)
            out.flush()
            os.fsync(out.fileno())
        current = SUMMARY_NAME
        fd, temps[SUMMARY_NAME] = _create_temp(directory, SUMMARY_NAME)
        with open(fd, "w", encoding="utf-8") as out:
            out.write(json.dumps(summary, sort_keys=True, indent=1) + "\n")
            out.flush()
            os.fsync(out.fileno())
        for current in (HISTOGRAM_NAME, SUMMARY_NAME):
            os.replace(temps[current], os.path.join(directory, current))
            del temps[current]
    except OSError as exc:
        target = os.path.join(directory, current)
        raise SummaryError(EXIT_CANNOT_WRITE, f"cannot write output {target}: {exc.strerror or exc}") from exc
    finally:
        for tmp in temps.values():
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
    _fsync_directory(directory)


def run(input_path: str, output_dir: str) -> dict[str, object]:
    """Summarize one input into ``output_dir``; return the summary. Raises SummaryError."""
    if not os.path.isdir(output_dir):
        message = f"usage error: output directory {output_dir} does not exist or is not a directory"
        raise SummaryError(EXIT_USAGE, message)
    with _open_input(input_path) as handle:
        counts, sha256 = histogram_and_digest(handle, input_path)
    summary = summarize(os.path.basename(input_path), counts, sha256)
    write_outputs(output_dir, summary, counts)
    return summary


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=f"Write {SUMMARY_NAME} (size, sha256, mean/min/max byte, zero and distinct bytes) and "
        f"{HISTOGRAM_NAME} (uint64 count of each of the 256 byte values) of one input into a directory.",
        epilog="Example (a job's container): --input /cicc/input/in3.dat --output-dir /cicc/output. "
        "Exit codes: 0 success, 2 usage/output directory missing, 3 input missing, 6 input unreadable, "
        "7 output cannot be written, 143 stopped by SIGTERM.",
    )
    parser.add_argument("--input", required=True, type=_path, metavar="PATH", help="the file to summarize")
    parser.add_argument("--output-dir", required=True, type=_path, metavar="DIR", help="existing directory for both")
    return parser


def main(argv: list[str] | None = None) -> int:
    # As PID 1 in a container a signal without a handler is ignored, so `docker stop` needs this
    # to stop promptly; raising lets the temp-file cleanup run.
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        args = build_parser().parse_args(argv)
        summary = run(args.input, args.output_dir)
    except SummaryError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.code
    except _Terminated:
        print(f"{PROG}: stopped by SIGTERM before the run completed", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"SUCCESS {summary['input']} -> {SUMMARY_NAME} {HISTOGRAM_NAME} {summary['size']} bytes")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
