# -*- coding: utf-8 -*-
# Copyright: cicc.cloud contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The local cloud's AWS emulator, a moto server on 127.0.0.1: the one place that starts and stops one.

Two ways to hold one. ``Process``: a child of the caller that ends with it (the tests, the benchmarks).
``start``/``stop``/``status``: a server that outlives its starter, found again by a pid file and a log per port
under a state directory (the ``local_emulator`` module the playbooks run, ``scripts/emulator.sh``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DEFAULT_PORT = 5000
DEFAULT_STATE_DIR = "~/.cache/cicc"
START_SECONDS = 30
# AWS's managed policies exist on the emulator as on AWS (playbooks/iam.yml attaches AmazonSSMManagedInstanceCore).
MOTO_ENV = {"MOTO_IAM_LOAD_MANAGED_POLICIES": "true"}


class EmulatorError(Exception):
    """The emulator could not be started or stopped; the message says why and what to do."""


def endpoint(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def moto_command(port: int | str, python: str = sys.executable) -> list[str]:
    """moto's server, from the environment of ``python``, listening on 127.0.0.1:``port`` (a placeholder too)."""
    server = Path(python).with_name("moto_server")
    if not server.exists():
        raise EmulatorError(f"{server} is not installed: install moto with its server (pip install 'moto[server]')")
    return [str(server), "-H", "127.0.0.1", "-p", str(port)]


def answers(url: str, timeout: float = 1) -> bool:
    """True when moto's management API answers at ``url`` (no proxy: this is loopback traffic)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        opener.open(url + "/moto-api/", timeout=timeout).close()
    except OSError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait_until(ready, exit_code, seconds: float, name: str, log: Path) -> None:
    """Poll ``ready()`` until it is true; EmulatorError with ``log``'s tail once ``exit_code()`` is not None (the
    server ended) or ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    while not ready():
        code = exit_code()
        if code is not None or time.monotonic() > deadline:
            state = f"exited with {code}" if code is not None else f"gave no answer within {seconds:.0f} s"
            raise EmulatorError(f"{name} {state}; the end of {log} says:\n{_tail(log)}")
        time.sleep(0.1)


class Process:
    """An emulator run as a child of this process, its output in ``log``; ``stop()`` ends it."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path, cwd: Path | None = None, detach=False):
        self.log = log
        with open(log, "ab") as output:
            # pylint: disable-next=consider-using-with
            self.proc = subprocess.Popen(  # it outlives this call
                command,
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                # A detached server is in a session of its own: it outlives its starter and its starter's signals.
                start_new_session=detach,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_until(self, ready, seconds: float, name: str = "the emulator") -> None:
        """Poll ``ready()`` until it is true; EmulatorError (with the log's tail) if it exits or takes too long."""
        _wait_until(ready, self.proc.poll, seconds, name, self.log)

    def stop(self, grace: float = 10) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- a server that outlives its starter -------------------------------------------------------------------


def _files(port: int, state_dir: str) -> tuple[Path, Path]:
    directory = Path(os.path.expanduser(state_dir))
    return directory / f"emulator-{port}.pid", directory / f"emulator-{port}.log"


def _our_pid(pid_file: Path) -> int | None:
    """The pid in the pid file, when that process is alive and still a moto server (pids get reused)."""
    try:
        pid = int(pid_file.read_text().strip())
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"moto_server" in command else None


def status(port: int = DEFAULT_PORT, state_dir: str = DEFAULT_STATE_DIR) -> dict:
    """{"url", "answers", "pid" (ours, or None), "log"} of the emulator on ``port``."""
    pid_file, log = _files(port, state_dir)
    url = endpoint(port)
    return {"url": url, "answers": answers(url), "pid": _our_pid(pid_file), "log": str(log)}


def start(port: int = DEFAULT_PORT, state_dir: str = DEFAULT_STATE_DIR, python: str = sys.executable) -> dict:
    """Start a moto server on ``port`` unless one answers there already (whoever started it); its status, with
    "started" true when this call started it."""
    if not 1 <= int(port) <= 65535:
        raise EmulatorError(f"the emulator's port must be 1-65535, not {port}")
    now = status(port, state_dir)
    if now["answers"]:
        return {**now, "started": False}
    pid_file, log = _files(port, state_dir)
    if now["pid"] is None:
        if not _port_free(port):
            raise EmulatorError(
                f"port {port} on 127.0.0.1 is in use by a program that is not a moto server: stop it, or choose "
                f"another port, e.g. {port % 65535 + 1} (cicc_emulator_port; CICC_EMULATOR_PORT for scripts/emulator.sh)"
            )
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        server = Process(moto_command(port, python), MOTO_ENV, log, cwd=pid_file.parent, detach=True)
        pid_file.write_text(f"{server.pid}\n")
        try:
            server.wait_until(lambda: answers(now["url"]), START_SECONDS, f"the moto server on port {port}")
        except EmulatorError:
            server.stop()
            pid_file.unlink(missing_ok=True)
            raise
    else:  # ours, started by an earlier call and not answering yet

        def ended():
            return None if _our_pid(pid_file) else "an unknown code"

        _wait_until(lambda: answers(now["url"]), ended, START_SECONDS, f"the moto server (pid {now['pid']})", log)
    return {**status(port, state_dir), "started": True}


def stop(port: int = DEFAULT_PORT, state_dir: str = DEFAULT_STATE_DIR, grace: float = 10) -> int | None:
    """Stop the moto server this module started on ``port``; its pid, or None when none was running."""
    pid_file, _log = _files(port, state_dir)
    pid = _our_pid(pid_file)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while _our_pid(pid_file) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        if _our_pid(pid_file) is not None:
            os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return pid
