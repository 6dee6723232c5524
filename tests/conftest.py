"""Shared fixtures: a real AWS emulator (moto server on 127.0.0.1) and the real Docker Engine."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The collection is importable as ansible_collections.cicc.cloud through this link (scripts/setup.sh).
sys.path.insert(0, str(ROOT / ".collections"))

REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _moto_server(**env: str):
    """A moto server on a free 127.0.0.1 port, with AWS's managed policies as on AWS (and ``env``);
    yields its endpoint URL and stops it afterwards."""
    port = _free_port()
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "MOTO_IAM_LOAD_MANAGED_POLICIES": "true", **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="session")
def moto_server():
    """Start an emulator of a test's own: ``with moto_server(**env) as endpoint: ...``."""
    return _moto_server


@pytest.fixture(scope="session")
def emulator() -> str:
    """Endpoint URL of a moto server started for this test session, exported the ecosystem's way."""
    with _moto_server() as endpoint:
        saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_URL")}
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_URL=endpoint,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION=REGION,
            AWS_REGION=REGION,
        )
        yield endpoint
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3(emulator):
    import boto3

    return boto3.client("s3", endpoint_url=emulator, region_name=REGION)


@pytest.fixture
def bucket(s3) -> str:
    """A fresh, empty bucket on the emulator."""
    name = f"cicc-test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def docker_client():
    """The real Docker Engine; scripts/setup.sh installs and starts it, so its absence is a failure."""
    import docker

    client = docker.from_env()
    client.ping()
    return client


def _load_by_path(name: str, path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def worker_module():
    """worker/cicc_worker.py, imported as the instance runs it."""
    return _load_by_path("cicc_worker", ROOT / "worker" / "cicc_worker.py")


@pytest.fixture(scope="session")
def process_module():
    return _load_by_path("cicc_process", ROOT / "container" / "process.py")


def xor_job(bucket: str, prefix: str = "", **changes):
    """The clinic's XOR job (jobs/xor.yml) on ``bucket``, without its data set; ``changes`` replace
    top-level fields, and ``attempts``/``timeout_seconds`` the retry and time limits."""
    import yaml

    from ansible_collections.cicc.cloud.plugins.module_utils import job

    data = yaml.safe_load((ROOT / "jobs" / "xor.yml").read_text())["cicc_job"]
    data.update(bucket=bucket, prefix=prefix, dataset=None)
    if "attempts" in changes:
        data["retry"] = {**data["retry"], "attempts": changes.pop("attempts")}
    data.update(changes)
    return job.load(data)


@pytest.fixture(scope="session")
def summary_archive(tmp_path_factory, docker_client):
    """The summary job's image (container/summary) as `docker save` made it, and its image ID."""
    archive = tmp_path_factory.mktemp("images") / "cicc-summary.tar"
    script = [str(ROOT / "scripts" / "process-image.sh"), "container/summary", "cicc-summary:latest"]
    built = subprocess.run([*script, "--save", str(archive)], check=True, capture_output=True, text=True)
    return archive, built.stdout.split()[-1]


@pytest.fixture
def inline_runner(process_module, worker_module):
    """The light processing step: process.py's own XOR, run in this process instead of a container."""
    import numpy as np

    class InlineRunner:
        def __init__(self) -> None:
            self.runs: list[str] = []

        def prepare(self, job, fetch) -> str:
            return ""

        def run(self, job, task: str, dirs, image_id: str):
            self.runs.append(task)
            data = np.fromfile(dirs.input / task, dtype=np.uint8)
            process_module.xor_with_kernel(data, np.fromfile(dirs.shared / job.shared[0], dtype=np.uint8))
            data.tofile(dirs.output / job.output_name(task))
            return worker_module.RunResult(0, f"SUCCESS {task}")

        def cancel(self) -> None:
            pass

    return InlineRunner()


@pytest.fixture
def make_worker(emulator, bucket, tmp_path, worker_module):
    """Build a worker of the XOR job on the test bucket with its own S3 client and work directory;
    ``job`` gives another job, ``attempts``/``timeout_seconds`` change the XOR job's."""

    def make(runner, owner: str = "w1", spot_watch: bool = False, job=None, **settings):
        job = job or xor_job(
            bucket, **{key: settings.pop(key) for key in ("attempts", "timeout_seconds") if key in settings}
        )
        options = {"workdir": str(tmp_path), "lease_seconds": 30, "endpoint_url": emulator}
        worker_settings = worker_module.Settings(**{**options, **settings})
        client = worker_module.s3_client(worker_settings)
        watch = worker_module.SpotWatch(worker_settings, runner) if spot_watch else None
        return worker_module.Worker(worker_settings, client, job, runner, owner=owner, spot_watch=watch)

    return make
