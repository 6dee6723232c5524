"""Processing step of the cicc.cloud pipeline: output = input XOR kernel.

Usage, in a job's container (the task's input at /cicc/input, the shared files at /cicc/shared,
an empty /cicc/output whose contents are published)::

    process.py --data /cicc/input --input in3.dat --kernel-dir /cicc/shared --kernel kernel.dat \\
        --output-dir /cicc/output --output out3.dat

``--kernel-dir`` and ``--output-dir`` default to ``--data``, so with one directory for all three
(the boot worker's staged task, bind-mounted at /data)::

    process.py --data /data --input in3.dat --kernel kernel.dat --output out3.dat

The three names are plain file names inside their directories (input in the data directory, kernel
in the kernel directory, output in the output directory); a name that is empty, is ``.``, contains
``/``, ``\\``, ``..``, NUL or another control character (C0, DEL, C1), or is longer than 200 bytes
is refused as a usage error, so no name can reach a file outside its directory. Each directory must
exist. The output must not be the input or the kernel: the same name is refused only where it would
be the same path (the output directory is the input's or the kernel's).

Tiling rule: the kernel is repeated along the input and its last repetition is truncated, i.e.
``output[i] = input[i] ^ kernel[i % len(kernel)]``. So an input whose length is not a multiple of
the kernel length is still processed, a kernel longer than the input is truncated to it, and an
empty input gives an empty output (success). An empty kernel is an error.

The output is written atomically: a hidden temp file in the output directory, fsync, then
``os.replace`` onto the output name, so a partial output is never visible. On any failure the
temp file is removed, no output is created and an existing output is left as it was; an existing
output is replaced only by a complete new one. Only a SIGKILL can leave a ``.NAME.*.tmp`` file
behind (never under the output name). Nothing is written in the data or kernel directory
unless it is also the output directory.

Exit codes (one stdout line ``SUCCESS ...`` on success, one stderr line otherwise):
0 success, 2 usage, bad name or a directory missing, 3 input missing, 4 kernel missing, 5 kernel empty,
6 input or kernel unreadable (permission, I/O error, directory, changed while read, no memory),
7 output cannot be written, 143 stopped by SIGTERM (``docker stop``) before completing.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from types import FrameType
from typing import BinaryIO, NoReturn

import numpy as np

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NO_INPUT = 3
EXIT_NO_KERNEL = 4
EXIT_EMPTY_KERNEL = 5
EXIT_UNREADABLE = 6
EXIT_CANNOT_WRITE = 7
EXIT_TERMINATED = 128 + signal.SIGTERM

PROG = "process.py"
# Leaves room under the file system's 255-byte limit for the temp file ".NAME.xxxxxxxx.tmp".
NAME_MAX_BYTES = 200
# The kernel is tiled into rows of about this size before the broadcast XOR. Measured on x86-64
# (bench/bench_xor.py): 8-12 KiB rows run at or above copy speed, because the row stays in the
# L1 data cache next to the streamed input while numpy's per-row overhead stays small; 2-4 KiB rows
# are about 40 % slower, and 16-64 KiB rows fall out of L1 and lose up to 30 %.
_BLOCK_BYTES = 10 * 1024


class ProcessError(Exception):
    """A failure with the exit code and the one-line message a person acts on."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Terminated(BaseException):
    """Raised from the SIGTERM handler so that cleanup runs before the process ends."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ProcessError(EXIT_USAGE, f"usage error: {message} (see {PROG} --help)")


def plain_name(value: str) -> str:
    """Accept only a plain file name, never a path: it must stay inside the data directory."""
    if not value:
        raise argparse.ArgumentTypeError("the name is empty; give a plain file name such as in3.dat")
    if value == "." or ".." in value or "/" in value or "\\" in value:
        raise argparse.ArgumentTypeError(f"{value!r} is not a plain file name ('/', '\\', '..' and '.' are refused)")
    if any(ord(char) < 32 or 127 <= ord(char) < 160 for char in value):
        raise argparse.ArgumentTypeError(f"{value!r} contains NUL or another control character")
    size = len(os.fsencode(value))
    if size > NAME_MAX_BYTES:
        raise argparse.ArgumentTypeError(f"a name of {size} bytes is longer than the {NAME_MAX_BYTES} allowed")
    return value


def xor_with_kernel(data: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """XOR ``data`` in place with ``kernel`` tiled along it (last repetition truncated); return ``data``.

    Both arrays are 1-D uint8. The kernel is first tiled into a block a whole number of kernels
    long, so the XOR runs as a broadcast over rows of that block plus one truncated tail.
    """
    if kernel.size == 0:
        raise ValueError("kernel is empty")
    reps = max(1, _BLOCK_BYTES // kernel.size)
    # A broadcast assignment builds the block several times faster than np.tile, which matters
    # next to the ~50 us an in-cache 2 MB input takes.
    tiled = np.empty((reps, kernel.size), dtype=np.uint8)
    tiled[...] = kernel
    block = tiled.ravel()
    rows, tail = divmod(data.size, block.size)
    if rows:
        body = data[: rows * block.size].reshape(rows, block.size)
        body ^= block
    if tail:
        data[rows * block.size :] ^= block[:tail]
    return data


def _open_for_read(path: str, role: str, missing_code: int, where: str = "data directory") -> BinaryIO:
    try:
        handle = open(path, "rb", buffering=0)  # noqa: SIM115 - the caller closes it
    except FileNotFoundError:
        message = f"{role} {path} does not exist: stage it in the {where} first"
        raise ProcessError(missing_code, message) from None
    except IsADirectoryError:
        raise ProcessError(EXIT_UNREADABLE, f"{role} {path} is a directory, not a file") from None
    except OSError as exc:
        raise ProcessError(EXIT_UNREADABLE, f"cannot open {role} {path}: {exc.strerror or exc}") from None
    return handle


def _read_all(handle: BinaryIO, path: str, role: str) -> np.ndarray:
    """Read the whole file into one uint8 array, refusing a file that changes size while read."""
    try:
        size = os.fstat(handle.fileno()).st_size
        try:
            data = np.empty(size, dtype=np.uint8)
        except MemoryError:
            raise ProcessError(EXIT_UNREADABLE, f"not enough memory to load {role} {path} ({size} bytes)") from None
        view = memoryview(data)
        done = 0
        while done < size:
            count = handle.readinto(view[done:])
            if not count:
                raise ProcessError(EXIT_UNREADABLE, f"{role} {path} shrank while being read ({done} of {size} bytes)")
            done += count
        if handle.read(1):
            raise ProcessError(EXIT_UNREADABLE, f"{role} {path} grew while being read (more than {size} bytes)")
    except IsADirectoryError:
        raise ProcessError(EXIT_UNREADABLE, f"{role} {path} is a directory, not a file") from None
    except OSError as exc:
        raise ProcessError(EXIT_UNREADABLE, f"cannot read {role} {path}: {exc.strerror or exc}") from None
    return data


def _create_temp(directory: str, name: str) -> tuple[int, str]:
    """Create a new hidden file next to the output, with the mode any new file gets (0666 less umask).

    Plain os.open rather than tempfile.mkstemp, which forces mode 0600 on what becomes the output."""
    attempts = 100
    while True:
        path = os.path.join(directory, f".{name}.{os.urandom(4).hex()}.tmp")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), path
        except FileExistsError:
            attempts -= 1
            if not attempts:
                raise


def _write_atomically(data: np.ndarray, directory: str, name: str) -> None:
    """Publish ``data`` under ``directory/name`` whole or not at all."""
    target = os.path.join(directory, name)
    tmp = None
    try:
        fd, tmp = _create_temp(directory, name)
        with open(fd, "wb") as out:
            out.write(memoryview(data))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        raise ProcessError(EXIT_CANNOT_WRITE, f"cannot write output {target}: {exc.strerror or exc}") from exc
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make the rename durable. The output is already whole and published, so a file system that
    refuses to fsync a directory (some FUSE mounts answer EINVAL) must not turn success into failure."""
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


def _same_path(dir_a: str, name_a: str, dir_b: str, name_b: str) -> bool:
    """Whether two names in two directories are one path (``/d``, ``/d/`` and a link to ``/d`` are one)."""
    return name_a == name_b and os.path.realpath(dir_a) == os.path.realpath(dir_b)


def run(
    data_dir: str,
    input_name: str,
    kernel_name: str,
    output_name: str,
    kernel_dir: str | None = None,
    output_dir: str | None = None,
) -> int:
    """Process one input; return the number of bytes written. Raises ProcessError.

    The input is read from ``data_dir``, the kernel from ``kernel_dir`` and the output written to
    ``output_dir``; both default to ``data_dir``."""
    kernel_dir = data_dir if kernel_dir is None else kernel_dir
    output_dir = data_dir if output_dir is None else output_dir
    for role, directory in (("data", data_dir), ("kernel", kernel_dir), ("output", output_dir)):
        if not os.path.isdir(directory):
            message = f"usage error: {role} directory {directory} does not exist or is not a directory"
            raise ProcessError(EXIT_USAGE, message)
    if _same_path(output_dir, output_name, data_dir, input_name) or _same_path(
        output_dir, output_name, kernel_dir, kernel_name
    ):
        target = os.path.join(output_dir, output_name)
        raise ProcessError(EXIT_USAGE, f"usage error: output {target} must differ from the input and the kernel")
    input_path = os.path.join(data_dir, input_name)
    kernel_path = os.path.join(kernel_dir, kernel_name)
    kernel_where = "data directory" if kernel_dir == data_dir else "kernel directory"
    # The input is opened first so a missing input is reported as such, but read after the
    # small kernel is checked, so a bad kernel never costs a full read of the input.
    with _open_for_read(input_path, "input", EXIT_NO_INPUT) as input_handle:
        with _open_for_read(kernel_path, "kernel", EXIT_NO_KERNEL, kernel_where) as kernel_handle:
            kernel = _read_all(kernel_handle, kernel_path, "kernel")
        if kernel.size == 0:
            raise ProcessError(EXIT_EMPTY_KERNEL, f"kernel {kernel_path} is empty: it needs at least one byte")
        data = _read_all(input_handle, input_path, "input")
    xor_with_kernel(data, kernel)
    _write_atomically(data, output_dir, output_name)
    return int(data.size)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Write OUTPUT = INPUT XOR KERNEL (kernel tiled along the input, last repetition truncated).",
        epilog="Example (a job's container): --data /cicc/input --input in3.dat --kernel-dir /cicc/shared "
        "--kernel kernel.dat --output-dir /cicc/output --output out3.dat. "
        "Exit codes: 0 success, 2 usage/bad name/directory missing, 3 input missing, 4 kernel missing, "
        "5 kernel empty, 6 input or kernel unreadable, 7 output cannot be written, 143 stopped by SIGTERM.",
    )
    data_help = "directory holding the input; also the default of --kernel-dir and --output-dir"
    parser.add_argument("--data", required=True, metavar="DIR", help=data_help)
    parser.add_argument("--input", required=True, type=plain_name, help="input file name inside the data directory")
    parser.add_argument("--kernel-dir", metavar="DIR", help="directory holding the kernel (default: --data)")
    parser.add_argument("--kernel", required=True, type=plain_name, help="kernel file name inside the kernel directory")
    parser.add_argument("--output-dir", metavar="DIR", help="directory that receives the output (default: --data)")
    parser.add_argument("--output", required=True, type=plain_name, help="output file name inside the output directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    # As PID 1 in a container a signal without a handler is ignored, so `docker stop` needs this
    # to stop promptly; raising lets the temp-file cleanup run.
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        args = build_parser().parse_args(argv)
        size = run(args.data, args.input, args.kernel, args.output, args.kernel_dir, args.output_dir)
    except ProcessError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.code
    except _Terminated:
        print(f"{PROG}: stopped by SIGTERM before the run completed", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"SUCCESS {args.input} -> {args.output} {size} bytes")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
