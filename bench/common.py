"""What the benchmarks share: the collection on sys.path, loading a file as a module, an emulator of their own."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLLECTIONS = ROOT / ".collections"
REGION = "us-east-1"


def link_collection() -> None:
    """Make ``ansible_collections.cicc.cloud`` importable from this checkout (scripts/setup.sh makes the same link)."""
    link = COLLECTIONS / "ansible_collections" / "cicc" / "cloud"
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(ROOT)
    sys.path.insert(0, str(COLLECTIONS))
    sys.dont_write_bytecode = True


def load_by_path(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_worker(path: Path | None = None) -> types.ModuleType:
    """worker/cicc_worker.py (or a copy of it), imported as an instance runs it."""
    return load_by_path("cicc_worker_bench", path or ROOT / "worker" / "cicc_worker.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OwnMoto:
    """A moto_server of our own on a free loopback port; stopped (by its pid) on exit."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> OwnMoto:
        moto = Path(sys.executable).with_name("moto_server")
        if not moto.exists():
            raise SystemExit(f"{moto} not found: run 'make setup' or pass --endpoint")
        self.proc = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(self.port)],
            # AWS's managed policies exist as on AWS (iam.yml attaches one).
            env={**os.environ, "MOTO_IAM_LOAD_MANAGED_POLICIES": "true"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        while True:
            try:
                opener.open(self.url + "/moto-api/", timeout=1).close()
                return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise SystemExit(f"moto_server did not start on {self.url}") from None
                time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
