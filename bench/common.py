"""What the benchmarks share: the collection on sys.path, loading a file as a module, the XOR job, an emulator of their own.

And, for the benchmarks that time a worker against something else (bench_worker.py, bench_slots.py): its timed run,
the bucket it drains, the runner that times its containers and the lines their reports start and end with, so that
both measure and report a worker the same way."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import types
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import boto3
import docker

ROOT = Path(__file__).resolve().parents[1]
COLLECTIONS = ROOT / ".collections"
REGION = "us-east-1"
# The longest a playbook of the local pipeline may take.
PLAYBOOK_TIMEOUT = 1800


def key_class(key: str) -> str:
    # Imported here: the benchmarks put the collection on sys.path (link_collection) after importing this file.
    from ansible_collections.cicc.cloud.plugins.module_utils.task_queue import LIST_NAMES

    if key in LIST_NAMES or key.startswith("folded/"):  # the lists, and what compactions folded for them
        return "list"
    if key == "kernel.dat":
        return "kernel"
    prefixes = (
        ("locks/", "lock"),
        ("compaction.json", "compaction"),
        ("failed/", "failed-record"),
        ("manifests/", "manifest"),
        ("logs/", "log"),
    )
    for prefix, name in prefixes:
        if key.startswith(prefix):
            return name
    if key.startswith("in"):
        return "input"
    if key.startswith("out"):
        return "output"
    return "other"


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


class OwnMoto:
    """A moto_server of our own on a free loopback port (plugins/module_utils/emulator.py), stopped on exit."""

    def __init__(self) -> None:
        self._emulator = load_by_path("cicc_emulator_bench", ROOT / "plugins" / "module_utils" / "emulator.py")
        self.port = self._emulator.free_port()
        self.url = self._emulator.endpoint(self.port)
        self.server = None

    def __enter__(self) -> OwnMoto:
        emulator = self._emulator
        log = Path(tempfile.gettempdir()) / f"cicc-bench-moto-{self.port}.log"
        try:
            self.server = emulator.Process(emulator.moto_command(self.port), emulator.MOTO_ENV, log)
            self.server.wait_until(lambda: emulator.answers(self.url), emulator.START_SECONDS, f"moto on {self.url}")
        except emulator.EmulatorError as error:
            self.__exit__()
            raise SystemExit(f"{error} (run 'make setup', or pass --endpoint)") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.stop()


class LocalProject:
    """A project and bucket of its own on an emulator of the local cloud: playbooks run through scripts/pipeline.sh."""

    def __init__(self, endpoint: str, port: int) -> None:
        run_id = uuid.uuid4().hex[:8]
        self.endpoint, self.project, self.bucket = endpoint, f"bench{run_id}", f"cicc-bench-{run_id}"
        self.env = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "CICC_"))}
        self.env.update(
            CICC_EMULATOR_PORT=str(port),
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
        settings = {"cicc_project": self.project, "cicc_bucket": self.bucket, "cicc_fleet_poll_seconds": 1, **settings}
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


# --- a worker under measurement -------------------------------------------------------------------


def quiet_worker() -> None:
    """The emulator's credentials unless the caller set real ones, and no INFO line per task from the worker:
    its log would drown the figures (and printing it would be timed)."""
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        os.environ.setdefault(key, value)
    logging.getLogger("cicc-worker").setLevel(logging.WARNING)


def require_image(client: docker.DockerClient, image: str, hint: str) -> None:
    """Stop before anything runs when ``image`` is absent, saying how to build it (``hint``): a benchmark uses
    the image it is given and builds none."""
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        raise SystemExit(f"image {image} is absent: {hint}") from None


def fill_bucket(client, objects: dict[str, bytes], prefix: str = "cicc-bench-") -> str:
    """A fresh bucket ``prefix`` + a random suffix holding ``objects`` (key: body), put in their order (lists
    last, as build_dataset orders them); its name. A fresh bucket per run keeps runs from seeing each other's
    tasks; the upload is set-up, never timed."""
    bucket = f"{prefix}{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    for name, body in objects.items():
        client.put_object(Bucket=bucket, Key=name, Body=body)
    return bucket


class TimedRunner:
    """Wraps a runner and adds up the time its runs take, over every slot (``prepare``, the image lookup, is
    not a run); ``last_end`` is when the last run to end ended, so that what follows it (the end of the queue)
    can be told apart from the containers."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.seconds = 0.0
        self.runs = 0
        self.last_end = 0.0  # perf_counter() when the last run ended
        self._lock = threading.Lock()

    def prepare(self, job, fetch) -> str:
        return self.runner.prepare(job, fetch)

    def run(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.runner.run(*args, **kwargs)
        finally:
            ended = time.perf_counter()
            with self._lock:
                self.seconds += ended - started
                self.runs += 1
                self.last_end = max(self.last_end, ended)

    def cancel(self) -> None:
        self.runner.cancel()


def drain(worker, names: list[str], what: str) -> tuple[float, float]:
    """Time ``worker.run()`` from start to return: (wall seconds, perf_counter() at the return). FAIL (``what``
    names the run) unless it exited 0 with every task of ``names`` done and none failed: a run that did less
    work would look fast."""
    started = time.perf_counter()
    code = worker.run()
    ended = time.perf_counter()
    if code != 0 or sorted(worker.done) != sorted(names) or worker.failed:
        raise SystemExit(f"FAIL: {what} exited {code}, done {worker.done}, failed {worker.failed}")
    return ended - started, ended


def in_turn(order: Sequence, repeat: int) -> Sequence:
    """``order`` on even repeats and reversed on odd ones: neither side always runs second, on a machine the
    other has just warmed (or loaded)."""
    return order if repeat % 2 == 0 else order[::-1]


# --- the report -----------------------------------------------------------------------------------


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def print_machine(docker_version: str) -> None:
    """The lines that say what the figures were measured on; the machine is shared, hence its load."""
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, docker {docker_version}")
    print(f"load average at the start: {load_average()} (shared machine: see the paired ratios)")


def print_load_at_end() -> None:
    print(f"load average at the end: {load_average()} ({os.cpu_count()} CPUs)")


@contextlib.contextmanager
def s3_endpoint(endpoint: str | None) -> Iterator[str]:
    """``endpoint``, or else the URL of a moto_server of our own for the block (stopped after it, whatever
    happens); the line naming the endpoint is printed either way, so a report says what it measured against."""
    if endpoint:
        print(f"S3 endpoint {endpoint}")
        yield endpoint
        return
    with OwnMoto() as own:
        print(f"S3 endpoint {own.url} (own moto_server)")
        yield own.url


def print_header(header: str) -> None:
    """A table's header line, underlined to its width."""
    print(header)
    print("-" * len(header))
