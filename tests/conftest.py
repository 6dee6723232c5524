"""Shared fixtures: real AWS emulators (a moto server on 127.0.0.1, and LocalStack's S3 for the tests marked
both_s3) and the real Docker Engine."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The collection is importable as ansible_collections.cicc.cloud through this link (scripts/setup.sh).
sys.path.insert(0, str(ROOT / ".collections"))

from ansible_collections.cicc.cloud.plugins.module_utils import (
    emulator as local_emulator,
)  # noqa: E402 - after the path

REGION = "us-east-1"


class _Emulator:
    """An emulator process (module_utils/emulator.py's Process) on a free 127.0.0.1 port, started at once and
    watched in the background until ``answers(endpoint)`` returns (an emulator loads a service on its first
    request: the watch pays for that, not the first test); waited for only when first needed. ``{port}`` and
    ``{home}`` in its command and environment stand for its port and a temporary directory of its own, which
    holds its output (shown when it fails to come up) and whatever it writes, and is removed when it stops."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], answers, start_seconds: float):
        self.name, self.start_seconds = name, start_seconds
        self.home = Path(tempfile.mkdtemp(prefix=f"cicc-{name}-"))
        port = local_emulator.free_port()
        self.endpoint = local_emulator.endpoint(port)
        self._ready = threading.Event()

        def fill(text: str) -> str:
            return text.replace("{port}", str(port)).replace("{home}", str(self.home))

        try:
            self._server = local_emulator.Process(
                [fill(part) for part in command],
                {key: fill(value) for key, value in env.items()},
                self.home / "output.log",
                cwd=self.home,
            )
        except OSError as error:  # reported by wait_ready, as a failure of the tests that need it
            self._server, self._error = None, f"{name} could not be started ({error}); run scripts/setup.sh"
            return
        threading.Thread(target=self._watch, args=(answers,), daemon=True).start()

    def _watch(self, answers) -> None:
        while self._server.proc.poll() is None:
            try:
                answers(self.endpoint)
            except Exception:  # noqa: BLE001 - not up yet, whatever the client says
                time.sleep(0.1)
            else:
                self._ready.set()
                return

    def wait_ready(self) -> str:
        """Its endpoint URL once it answers; a test failure with its output's tail if it does not."""
        if self._server is None:
            pytest.fail(self._error, pytrace=False)
        try:
            self._server.wait_until(self._ready.is_set, self.start_seconds, self.name)
        except local_emulator.EmulatorError as error:
            pytest.fail(f"{error}", pytrace=False)
        return self.endpoint

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(30)
        shutil.rmtree(self.home, ignore_errors=True)


def _moto_api_answers(endpoint: str) -> None:
    if not local_emulator.answers(endpoint):
        raise ConnectionError(f"no answer from {endpoint}")


def _s3_answers(endpoint: str) -> None:
    import boto3
    from botocore.config import Config

    once = Config(retries={"total_max_attempts": 1}, connect_timeout=1, read_timeout=120)
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=once,
    )
    client.list_buckets()


@contextlib.contextmanager
def _moto_server(**env: str):
    """A moto server on a free 127.0.0.1 port, with AWS's managed policies as on AWS (and ``env``);
    yields its endpoint URL and stops it afterwards."""
    try:
        command = local_emulator.moto_command("{port}")
    except local_emulator.EmulatorError as error:
        pytest.fail(f"{error}: run scripts/setup.sh", pytrace=False)
    server = _Emulator(
        "moto", command, {**local_emulator.MOTO_ENV, **env}, _moto_api_answers, local_emulator.START_SECONDS
    )
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def _start_localstack() -> _Emulator:
    """LocalStack's own S3 provider in host mode, from its virtualenv (requirements-localstack.txt)."""
    python = ROOT / ".venv-localstack" / "bin" / "python"
    env = {
        "SERVICES": "s3",
        "GATEWAY_LISTEN": "127.0.0.1:{port}",
        # Host mode keeps its state, cache and certificate under FILESYSTEM_ROOT, but only where it
        # does not think it runs in a container (this machine may be one): else /var/lib/localstack.
        "OVERRIDE_IN_DOCKER": "0",
        "FILESYSTEM_ROOT": "{home}",
        "TMPDIR": "{home}",
        "DNS_ADDRESS": "0",  # no DNS server of its own
        # No network here but the package registries: no certificate download, no usage events.
        "SKIP_SSL_CERT_DOWNLOAD": "1",
        "DISABLE_EVENTS": "1",
    }
    # Ready once S3 answers: LocalStack says Ready. seconds before its S3 provider is loaded.
    return _Emulator("LocalStack", [str(python), "-m", "localstack.runtime.main"], env, _s3_answers, 120)


_LOCALSTACK = pytest.StashKey[_Emulator]()


def _localstack_server(config) -> _Emulator:
    if _LOCALSTACK not in config.stash:
        config.stash[_LOCALSTACK] = _start_localstack()
    return config.stash[_LOCALSTACK]


@dataclasses.dataclass(frozen=True)
class S3Implementation:
    """An S3 the protocol's tests run on, and where it departs from AWS (README: "Two S3 implementations")."""

    name: str
    # AWS honours If-Match on DeleteObject (general purpose buckets, since September 2025).
    deletes_if_match: bool


S3_IMPLEMENTATIONS = {
    "moto": S3Implementation("moto", deletes_if_match=True),
    "localstack": S3Implementation("localstack", deletes_if_match=False),
}


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "both_s3: run the test on moto's S3 and on LocalStack's (ids moto, localstack) through s3_endpoint "
        "and the fixtures built on it (s3, bucket, make_worker); a test that uses none of them runs once",
    )


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("both_s3") and "s3_implementation" in metafunc.fixturenames:
        metafunc.parametrize("s3_implementation", list(S3_IMPLEMENTATIONS), indirect=True)


def _runs_on_localstack(item) -> bool:
    return getattr(item, "callspec", None) is not None and item.callspec.params.get("s3_implementation") == "localstack"


def pytest_collection_modifyitems(items):
    """In each module, the LocalStack runs after the others, which run while LocalStack starts (the
    modules stay in order, so that their fixtures are set up once)."""
    modules = {}
    for item in items:
        modules.setdefault(item.path, len(modules))
    items.sort(key=lambda item: (modules[item.path], _runs_on_localstack(item)))


def pytest_collection_finish(session):
    """Start LocalStack as soon as the tests are known, if any runs on it: its start then overlaps the
    tests before the first that needs it."""
    if any(map(_runs_on_localstack, session.items)) and not session.config.option.collectonly:
        _localstack_server(session.config)


def pytest_unconfigure(config):
    if _LOCALSTACK in config.stash:
        config.stash[_LOCALSTACK].stop()


def _export_endpoint(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point boto3, botocore and the amazon.aws modules at ``endpoint``, the ecosystem's way."""
    for key, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
    }.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="session")
def moto_server():
    """Start an emulator of a test's own: ``with moto_server(**env) as endpoint: ...``."""
    return _moto_server


@pytest.fixture(scope="session")
def emulator() -> str:
    """Endpoint URL of a moto server started for this test session, exported the ecosystem's way."""
    with _moto_server() as endpoint, pytest.MonkeyPatch.context() as monkeypatch:
        _export_endpoint(monkeypatch, endpoint)
        yield endpoint


@pytest.fixture(scope="session")
def localstack(request) -> str:
    """Endpoint URL of LocalStack's S3, started once a session (stopped as the session ends)."""
    return _localstack_server(request.config).wait_ready()


@pytest.fixture
def s3_implementation(request) -> S3Implementation:
    """The S3 the test runs on: moto, unless the test is marked both_s3 (then moto and LocalStack)."""
    return S3_IMPLEMENTATIONS[getattr(request, "param", "moto")]


@pytest.fixture
def s3_endpoint(request, s3_implementation, monkeypatch) -> str:
    """Endpoint URL of the test's S3: the session's moto server (``emulator``), or LocalStack, to which
    the AWS_* variables then point for the test's length (modules run by `ansible` read them)."""
    if s3_implementation.name == "moto":
        return request.getfixturevalue("emulator")
    endpoint = request.getfixturevalue("localstack")
    _export_endpoint(monkeypatch, endpoint)
    return endpoint


@pytest.fixture
def s3(s3_endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint, region_name=REGION)


@pytest.fixture
def bucket(s3) -> str:
    """A fresh, empty bucket on the test's S3 (a valid DNS name, as LocalStack requires)."""
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
def make_worker(s3_endpoint, bucket, tmp_path, worker_module):
    """Build a worker of the XOR job on the test bucket with its own S3 client and work directory;
    ``job`` gives another job, ``attempts``/``timeout_seconds`` change the XOR job's."""

    def make(runner, owner: str = "w1", spot_watch: bool = False, job=None, **settings):
        job = job or xor_job(
            bucket, **{key: settings.pop(key) for key in ("attempts", "timeout_seconds") if key in settings}
        )
        options = {"workdir": str(tmp_path), "lease_seconds": 30, "endpoint_url": s3_endpoint}
        worker_settings = worker_module.Settings(**{**options, **settings})
        client = worker_module.s3_client(worker_settings)
        watch = worker_module.SpotWatch(worker_settings, runner) if spot_watch else None
        return worker_module.Worker(worker_settings, client, job, runner, owner=owner, spot_watch=watch)

    return make
