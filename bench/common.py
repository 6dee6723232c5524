"""What the benchmarks share: the collection on sys.path, loading a file as a module, the XOR job, an emulator of their own."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import types
import urllib.request
import uuid
from pathlib import Path

import boto3
import docker

ROOT = Path(__file__).resolve().parents[1]
COLLECTIONS = ROOT / ".collections"
REGION = "us-east-1"
# The longest a playbook of the local pipeline may take.
PLAYBOOK_TIMEOUT = 1800


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


def xor_job(jobs: types.ModuleType, bucket: str, prefix: str = "", **changes):
    """The clinic's XOR job (jobs/xor.yml) on ``bucket``, without its data set, validated by ``jobs``
    (plugins/module_utils/job.py, or the copy a worker under test imports); ``changes`` replace
    top-level fields, and ``image_name`` the image's name (as tests/conftest.py's xor_job)."""
    import yaml

    data = yaml.safe_load((ROOT / "jobs" / "xor.yml").read_text())["cicc_job"]
    data.update(bucket=bucket, prefix=prefix, dataset=None)
    if "image_name" in changes:
        data["image"] = {**data["image"], "name": changes.pop("image_name")}
    data.update(changes)
    return jobs.load(data)


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


class LocalProject:
    """A project and bucket of its own on an emulator of the local cloud: playbooks run through scripts/pipeline.sh."""

    def __init__(self, endpoint: str, port: int) -> None:
        run_id = uuid.uuid4().hex[:8]
        self.endpoint, self.project, self.bucket = endpoint, f"bench{run_id}", f"cicc-bench-{run_id}"
        self.env = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "CICC_"))}
        self.env.update(
            CICC_TARGET="local",
            CICC_PROJECT=self.project,
            CICC_EMULATOR_PORT=str(port),
            CICC_REGION=REGION,
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_DEPRECATION_WARNINGS="0",
        )
        session = boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
        )
        self.s3 = session.client("s3", endpoint_url=endpoint)
        self.ec2 = session.client("ec2", endpoint_url=endpoint)
        self.docker = docker.from_env()

    def playbook(self, settings: dict, *args: str) -> tuple[str, float]:
        """Run a playbook (site.yml unless args name one); (its output, its wall time). Fails loudly."""
        settings = {"cicc_bucket": self.bucket, "cicc_fleet_poll_seconds": 1, **settings}
        started = time.monotonic()
        done = subprocess.run(
            [str(ROOT / "scripts" / "pipeline.sh"), *args, "-e", json.dumps(settings)],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=PLAYBOOK_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(args) or 'site.yml'} failed:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}")
        return done.stdout, time.monotonic() - started

    def instances(self, **tags: str) -> set[str]:
        """Ids of the project's instances (in any state) carrying these tags too."""
        filters = [
            {"Name": f"tag:{key}", "Values": [value]} for key, value in {"project": self.project, **tags}.items()
        ]
        reservations = self.ec2.describe_instances(Filters=filters)["Reservations"]
        return {instance["InstanceId"] for reservation in reservations for instance in reservation["Instances"]}

    def clean_up(self) -> None:
        """teardown.yml with the bucket: on the local cloud it also removes the machines' containers, their
        files and the AMIs' images."""
        self.playbook({"cicc_delete_bucket": True}, "playbooks/teardown.yml")
