"""What the tests of the container programs (container/process.py, container/summary/summarize.py) share.

Both programs make the same promises (one output line, atomic outputs, 143 on SIGTERM, an image built
by scripts/process-image.sh), so their tests check them the same way: one copy of each check here keeps
the two suites from drifting apart. Imported by its full name, as ansible-test imports a collection's
tests, so that no other ``helpers`` module on sys.path can stand in for it.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[3]
BASE_IMAGE = os.environ.get("CICC_BASE_IMAGE", "cicc-base:bookworm")


def load_program(name: str, path: Path) -> ModuleType:
    """The program at ``path`` as the module ``name``, without a __pycache__ beside it: its directory is
    the image's build context."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    saved, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = saved
    return module


def one_line(text: str) -> str:
    """The only line of ``text``: each program promises exactly one line on stdout or stderr."""
    lines = text.splitlines()
    assert len(lines) == 1, f"expected exactly one line, got {lines!r}"
    return lines[0]


def make_dirs(root: Path, *names: str) -> list[Path]:
    """Empty directories ``names`` under ``root``, as a job's mounts lay them out (input, shared, output)."""
    directories = [root / name for name in names]
    for directory in directories:
        directory.mkdir()
    return directories


# ---------------------------------------------------------------------------------------------- damaged inputs
# Each takes the path of a staged file and spoils it in one way; tests parametrize over them.


def make_directory(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.mkdir()


def make_symlink_loop(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to(path.name)


def remove(path: Path) -> None:
    path.unlink()


# ---------------------------------------------------------------------------------------------- fsync


class Fsync:
    """A stand-in for ``os.fsync`` that records each descriptor and calls ``hook(call number)`` first: a
    hook that raises fails that call (the last moment before an output is published), one that returns
    lets the real fsync run."""

    def __init__(self, hook: Callable[[int], None]) -> None:
        self.hook = hook
        self.calls: list[int] = []
        self.real = os.fsync

    def __call__(self, fd: int) -> None:
        self.calls.append(fd)
        self.hook(len(self.calls))
        self.real(fd)


@contextlib.contextmanager
def fsync_replaced(
    monkeypatch: pytest.MonkeyPatch, program: ModuleType, hook: Callable[[int], None]
) -> Iterator[Fsync]:
    """``program``'s fsync replaced by an :class:`Fsync` of ``hook`` for the block only: ``os`` is shared with
    pytest, whose own writes after the block must not fail."""
    fsync = Fsync(hook)
    monkeypatch.setattr(program.os, "fsync", fsync)
    try:
        yield fsync
    finally:
        monkeypatch.undo()


# ---------------------------------------------------------------------------------------------- as a program


def run_script(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """``argv`` run to its end; its exit code and output are the test's to check."""
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def open_writer_when_read(fifo: Path, proc: subprocess.Popen, program: str, seconds: float = 30) -> int:
    """Open the FIFO's writer end once ``program`` has opened it for reading, so its handler is in place."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
        if proc.poll() is not None:
            pytest.fail(f"{program} exited with {proc.returncode} before opening its input: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{program} did not open its input within {seconds} s")
        time.sleep(0.02)


def terminate_while_reading(argv: list[str], fifo: Path, program: str, written: bytes = b"") -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``argv`` sent SIGTERM while it reads ``fifo``, after ``written`` (if any)
    reached it: the writer end stays open, so the program is blocked in a read, never at the input's end."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        writer = open_writer_when_read(fifo, proc, program)
        try:
            if written:
                os.write(writer, written)
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
        finally:
            os.close(writer)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, out, err


# ---------------------------------------------------------------------------------------------- the real image


def build_image(docker_client, image: str, *script_args: str) -> str:
    """``image``, built (or found up to date) by scripts/process-image.sh ``script_args``; fails the test when
    the base image is absent or the build fails, since setup provides both."""
    from docker.errors import ImageNotFound

    try:
        docker_client.images.get(BASE_IMAGE)
    except ImageNotFound:
        pytest.fail(f"base image {BASE_IMAGE} is absent: build it with scripts/base-image.sh (or `make setup`)")
    # Always run the script: it is a no-op when the image matches the sources, and rebuilds a stale one.
    result = subprocess.run(
        [str(ROOT / "scripts" / "process-image.sh"), *script_args],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if result.returncode != 0:
        pytest.fail(f"scripts/process-image.sh failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    docker_client.images.get(image)
    return image


def run_container(
    docker_client, image: str, args: list[str], mounts: dict[Path, tuple[str, str]], network_mode: str = "none"
) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of one container of ``image`` with ``mounts`` (host directory: (container
    path, "ro" or "rw")); the container is removed whatever happens."""
    container = docker_client.containers.run(
        image,
        args,
        volumes={str(host): {"bind": bind, "mode": mode} for host, (bind, mode) in mounts.items()},
        network_mode=network_mode,
        detach=True,
    )
    try:
        status = container.wait(timeout=120)["StatusCode"]
        out = container.logs(stdout=True, stderr=False).decode()
        err = container.logs(stdout=False, stderr=True).decode()
    finally:
        container.remove(force=True)
    return status, out, err
