"""The worker on the real emulator: the seed scenario with the real processing container, many
workers at once, and fault-matrix rows 2, 4, 9 and 12 plus the bad inputs."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ansible_collections.cicc.cloud.plugins.module_utils import dataset
from ansible_collections.cicc.cloud.plugins.module_utils import task_queue as tq

ROOT = Path(__file__).resolve().parents[2]


def _body(s3, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def _keys(s3, bucket: str, prefix: str = "") -> list[str]:
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


def _upload(s3, bucket: str, objects: dict[str, bytes]) -> None:
    for key, body in objects.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)


def _expected(s3, bucket: str, name: str) -> bytes:
    data = np.frombuffer(_body(s3, bucket, name), dtype=np.uint8)
    kernel = np.frombuffer(_body(s3, bucket, "kernel.dat"), dtype=np.uint8)
    return (data ^ np.resize(kernel, data.size)).tobytes()


def _run_all(workers) -> list[int]:
    codes: list[int] = [None] * len(workers)

    def run(index: int) -> None:
        codes[index] = workers[index].run()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(workers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    return codes


def _assert_drained(s3, bucket: str, done: list[str]) -> None:
    assert _body(s3, bucket, "tasklist.txt").strip() == b""
    completed = _body(s3, bucket, "completed.txt").decode().splitlines()
    assert sorted(completed) == sorted(done) and len(set(completed)) == len(completed)
    assert _keys(s3, bucket, "locks/") == [] and _keys(s3, bucket, "journal/") == []


@pytest.fixture(scope="module")
def process_image():
    subprocess.run([str(ROOT / "scripts" / "process-image.sh")], check=True)
    return os.environ.get("CICC_PROCESS_IMAGE", "cicc-process:latest")


def test_seed_scenario_three_workers_with_the_processing_container(
    s3, bucket, make_worker, worker_module, docker_client, process_image
):
    seed = dataset.build_dataset(seed=121325)
    _upload(s3, bucket, seed)
    runner = worker_module.DockerRunner(process_image)
    workers = [make_worker(runner, owner=f"i-seed{i}") for i in range(3)]
    assert _run_all(workers) == [0, 0, 0]

    for i in range(10):
        assert _body(s3, bucket, f"out{i}.dat") == _expected(s3, bucket, f"in{i}.dat"), f"out{i}.dat"
    for i in range(3):
        assert _body(s3, bucket, f"out{i}.dat") == seed[f"out{i}.dat"]  # untouched
    _assert_drained(s3, bucket, [f"in{i}.dat" for i in range(10)])
    assert sorted(sum((w.done for w in workers), [])) == [f"in{i}.dat" for i in range(3, 10)]
    assert not docker_client.containers.list(all=True, filters={"label": "cicc.task"})


def test_sixteen_workers_on_500_tasks_do_each_exactly_once(s3, bucket, make_worker, inline_runner):
    names = [f"in{i:03d}.dat" for i in range(500)]
    _upload(s3, bucket, {name: os.urandom(64) for name in names})
    _upload(s3, bucket, {"kernel.dat": os.urandom(8), "tasklist.txt": tq._lines(names)})
    workers = [make_worker(inline_runner, owner=f"w{i}") for i in range(16)]
    assert _run_all(workers) == [0] * 16

    assert sorted(inline_runner.runs) == names  # processed once each, never twice
    assert sorted(sum((w.done for w in workers), [])) == names
    _assert_drained(s3, bucket, names)
    outputs = [key for key in _keys(s3, bucket) if key.startswith("out")]
    assert len(outputs) == 500


def test_row2_killed_after_claiming_is_taken_over_once(s3, bucket, make_worker, inline_runner):
    _upload(s3, bucket, {"in1.dat": b"abcd", "kernel.dat": b"k", "tasklist.txt": b"in1.dat\n"})
    queue = tq.Queue(bucket, lease_seconds=2)
    tq.claim(s3, queue, "in1.dat", "killed")  # and then nothing: the worker died
    workers = [make_worker(inline_runner, owner=f"w{i}", lease_seconds=2) for i in range(3)]
    assert _run_all(workers) == [0, 0, 0]
    assert inline_runner.runs == ["in1.dat"]
    _assert_drained(s3, bucket, ["in1.dat"])


def _slow_program(tmp_path: Path, seconds: float) -> str:
    program = tmp_path / "slow_process.py"
    program.write_text(
        textwrap.dedent(
            f"""
            import runpy, sys, time
            time.sleep({seconds})
            sys.argv[0] = {str(ROOT / "container" / "process.py")!r}
            runpy.run_path(sys.argv[0], run_name="__main__")
            """
        )
    )
    return str(program)


def test_row4_paused_worker_is_refused_after_takeover(s3, bucket, emulator, tmp_path, make_worker, worker_module):
    _upload(s3, bucket, {"in1.dat": os.urandom(100), "kernel.dat": b"key", "tasklist.txt": b"in1.dat\n"})
    argv = [sys.executable, str(ROOT / "worker" / "cicc_worker.py"), "--bucket", bucket, "--endpoint-url", emulator]
    argv += ["--workdir", str(tmp_path / "paused"), "--lease-seconds", "2", "--instance-id", "i-paused"]
    argv += ["--runner", "process", "--program", _slow_program(tmp_path, 1.5)]
    paused = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": str(ROOT / ".collections")})
    deadline = time.monotonic() + 30
    while not _keys(s3, bucket, "locks/"):
        assert time.monotonic() < deadline and paused.poll() is None
        time.sleep(0.05)
    os.kill(paused.pid, signal.SIGSTOP)
    try:
        time.sleep(2.5)  # past the lease: the next worker takes the task over and finishes it
        rescuer = make_worker(worker_module.ProcessRunner(str(ROOT / "container" / "process.py")), lease_seconds=2)
        assert rescuer.run() == 0 and rescuer.done == ["in1.dat"]
        published = s3.head_object(Bucket=bucket, Key="out1.dat")["ETag"]
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    assert paused.wait(60) == 0
    log = (tmp_path / "paused" / "i-paused" / "log.txt").read_text()
    assert "lost" in log and "completed in1.dat" not in log
    assert s3.head_object(Bucket=bucket, Key="out1.dat")["ETag"] == published
    _assert_drained(s3, bucket, ["in1.dat"])


# Publishes in1.dat's output from a file that reads slowly, and says so, once the HTTP connection sends it
# (botocore reads the body beforehand for its checksums, fast), so that the test can kill the process in the
# middle of the upload.
_DYING_UPLOAD = """
import io, sys, time, traceback, boto3
from ansible_collections.cicc.cloud.plugins.module_utils import task_queue as tq
endpoint, bucket, path = sys.argv[1:4]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
queue = tq.Queue(bucket, lease_seconds=2)
lease = tq.claim(s3, queue, "in1.dat", "dying")

class SlowOnTheWire(io.FileIO):
    def read(self, size=-1):
        if any(frame.name == "urlopen" for frame in traceback.extract_stack()):
            print("uploading", flush=True)
            time.sleep(0.2)
            size = 65536
        return super().read(size)

with SlowOnTheWire(path) as body:
    tq.publish_output(s3, queue, lease, body)
print("published", flush=True)
"""


def test_row6_worker_killed_mid_upload_leaves_no_partial_output(s3, bucket, emulator, tmp_path, make_worker, inline_runner):
    data = os.urandom(4 * 1024 * 1024)
    _upload(s3, bucket, {"in1.dat": data, "kernel.dat": b"key", "tasklist.txt": b"in1.dat\n"})
    output = tmp_path / "out1.dat"
    output.write_bytes(os.urandom(len(data)))
    env = {**os.environ, "PYTHONPATH": str(ROOT / ".collections")}
    dying = subprocess.Popen(
        [sys.executable, "-c", _DYING_UPLOAD, emulator, bucket, str(output)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert dying.stdout.readline().strip() == "uploading"
        time.sleep(0.5)  # a few chunks are on the wire
    finally:
        dying.kill()
    assert dying.wait(10) == -signal.SIGKILL
    assert "out1.dat" not in _keys(s3, bucket), "a partial output is visible"
    time.sleep(2.5)  # the dead worker's lease runs out
    assert make_worker(inline_runner, "next", lease_seconds=2).run() == 0
    assert _body(s3, bucket, "out1.dat") == _expected(s3, bucket, "in1.dat")
    _assert_drained(s3, bucket, ["in1.dat"])


@pytest.mark.parametrize(
    "program, reason",
    [
        ("import sys; sys.exit(9)", "exited with code 9"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "exited with code -9"),
        ("import time; time.sleep(30)", "timed out"),
        ("print('done, honestly')", "without a SUCCESS report"),
    ],
    ids=["non-zero", "killed", "timeout", "no-report"],
)
def test_row9_failing_processing_counts_attempts_then_fails(s3, bucket, tmp_path, make_worker, worker_module,
                                                            program, reason):
    _upload(s3, bucket, {"in1.dat": b"x", "in2.dat": b"y", "kernel.dat": b"k", "tasklist.txt": b"in1.dat\nin2.dat\n"})
    script = tmp_path / "broken.py"
    script.write_text(program)
    worker = make_worker(worker_module.ProcessRunner(str(script)), max_attempts=2, task_timeout=1)
    assert worker.run() == 0
    assert sorted(worker.failed) == ["in1.dat", "in2.dat"]
    record = json.loads(_body(s3, bucket, "failed/in1.dat.json"))
    assert record["attempts"] == 2 and reason in record["reason"]
    assert sorted(_body(s3, bucket, "failed.txt").decode().split()) == ["in1.dat", "in2.dat"]
    assert _body(s3, bucket, "tasklist.txt") == b""
    assert [key for key in _keys(s3, bucket) if key.startswith("out")] == []
    assert _keys(s3, bucket, "locks/") == []


def test_row12_empty_or_finished_queue_every_worker_exits(s3, bucket, make_worker, inline_runner):
    _upload(s3, bucket, {"kernel.dat": b"k", "tasklist.txt": b""})
    assert _run_all([make_worker(inline_runner, owner=f"w{i}") for i in range(3)]) == [0, 0, 0]
    _upload(s3, bucket, {"in1.dat": b"a", "out1.dat": b"done before", "tasklist.txt": b"in1.dat\n"})
    assert _run_all([make_worker(inline_runner, owner=f"w{i}") for i in range(3)]) == [0, 0, 0]
    assert inline_runner.runs == []
    _assert_drained(s3, bucket, ["in1.dat"])
    assert _body(s3, bucket, "out1.dat") == b"done before"


def test_task_limit_stops_the_worker_and_leaves_the_rest(s3, bucket, make_worker, inline_runner, caplog):
    """max_tasks=1, the seed's one task per boot: each worker takes one task and stops; the queue drains."""
    names = [f"in{i}.dat" for i in range(3)]
    _upload(s3, bucket, {"kernel.dat": b"k", **{name: b"data" for name in names}})
    _upload(s3, bucket, {"tasklist.txt": "".join(f"{name}\n" for name in names).encode()})
    with caplog.at_level("INFO", logger="cicc-worker"):
        assert make_worker(inline_runner, owner="w1", max_tasks=1).run() == 0
    assert len(inline_runner.runs) == 1
    assert "task limit reached: 1 completed, 0 failed by w1" in caplog.text
    assert len(_body(s3, bucket, "completed.txt").split()) == 1
    assert _run_all([make_worker(inline_runner, owner=f"w{i}", max_tasks=1) for i in (2, 3, 4)]) == [0, 0, 0]
    assert len(inline_runner.runs) == len(names)
    _assert_drained(s3, bucket, names)


class _MetadataHandler(http.server.BaseHTTPRequestHandler):
    def do_PUT(self) -> None:
        self._answer(200, b"token" if self.path == "/latest/api/token" else b"")

    def do_GET(self) -> None:
        if self.path == "/latest/meta-data/spot/instance-action" and self.server.notice.is_set():
            self._answer(200, b'{"action": "terminate", "time": "2026-11-30T12:02:00Z"}')
        else:
            self._answer(404, b"")

    def _answer(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # quiet
        pass


class FakeMetadata(http.server.ThreadingHTTPServer):
    """The instance metadata service on 127.0.0.1: IMDSv2 tokens, and a spot notice once ``notice`` is set."""

    def __init__(self) -> None:
        self.notice = threading.Event()
        super().__init__(("127.0.0.1", 0), _MetadataHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/latest"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class NoticeDuringTask:
    """A processing step that runs until cancelled; AWS sends the spot notice while it runs."""

    def __init__(self, metadata: FakeMetadata, worker_module) -> None:
        self.metadata, self.error = metadata, worker_module.TaskError
        self.cancelled = threading.Event()
        self.runs: list[str] = []

    def run(self, task_dir, name, kernel, output, timeout) -> str:
        self.runs.append(name)
        self.metadata.notice.set()
        if not self.cancelled.wait(timeout):
            return "SUCCESS (never cancelled)"
        raise self.error("processing stopped")

    def cancel(self) -> None:
        self.cancelled.set()


def test_row10_spot_notice_gives_back_the_task_and_stops(s3, bucket, make_worker, inline_runner, worker_module, caplog):
    names = ["in1.dat", "in2.dat"]
    _upload(s3, bucket, {"kernel.dat": b"k", **{name: b"data" for name in names}})
    _upload(s3, bucket, {"tasklist.txt": "".join(f"{name}\n" for name in names).encode()})
    metadata = FakeMetadata()
    try:
        runner = NoticeDuringTask(metadata, worker_module)
        worker = make_worker(runner, "spot", spot_watch=True, metadata_url=metadata.url, spot_poll_seconds=1)
        with caplog.at_level("INFO", logger="cicc-worker"):
            assert worker.run() == 0
            # One claim, cancelled and given back: no output, no lock, no failure.
            assert len(runner.runs) == 1 and runner.cancelled.is_set()
            assert "spot interruption: 0 completed, 0 failed by spot" in caplog.text
            assert _keys(s3, bucket, "locks/") == [] and _keys(s3, bucket, "failed/") == []
            assert not [key for key in _keys(s3, bucket) if key.startswith("out")]
            # The next worker takes both tasks, the given-back one at its first attempt again.
            assert make_worker(inline_runner, "next").run() == 0
    finally:
        metadata.shutdown()
    assert sorted(inline_runner.runs) == names
    _assert_drained(s3, bucket, names)
    assert caplog.text.count("(attempt 1)") == 3 and "(attempt 2)" not in caplog.text


def test_row11_refused_termination_falls_back_to_shutdown(worker_module, monkeypatch) -> None:
    """TerminateInstances refused: the worker shuts the OS down (the instance's shutdown behaviour terminates it)."""

    class Refusing:
        def client(self, *args, **kwargs):
            return self

        def terminate_instances(self, **kwargs):
            raise RuntimeError("UnauthorizedOperation")

    commands = []
    monkeypatch.setattr(worker_module.subprocess, "run", lambda argv, **kwargs: commands.append(argv))
    worker_module.terminate_self(worker_module.Settings(bucket="b", instance_id="i-1"), Refusing())
    assert commands == [["systemctl", "poweroff"]]


def test_bad_inputs_are_recorded_and_lose_nothing(s3, bucket, make_worker, inline_runner, worker_module, monkeypatch):
    tasklist = b"\xef\xbb\xbfin1.dat\r\nmissing.dat\r\n../escape.dat\r\nhuge.dat \r\nempty.dat\nin1.dat"
    _upload(s3, bucket, {"in1.dat": b"abc", "huge.dat": b"x" * 4096, "empty.dat": b"", "kernel.dat": b"kk"})
    _upload(s3, bucket, {"tasklist.txt": tasklist})
    real_usage = worker_module.shutil.disk_usage
    monkeypatch.setattr(worker_module.shutil, "disk_usage", lambda path: real_usage(path)._replace(free=3000))
    worker = make_worker(inline_runner)
    assert worker.run() == 0
    assert sorted(worker.done) == ["empty.dat", "in1.dat"]
    assert _body(s3, bucket, "out_empty.dat") == b""
    assert "is missing" in json.loads(_body(s3, bucket, "failed/missing.dat.json"))["reason"]
    assert "local disk allows" in json.loads(_body(s3, bucket, "failed/huge.dat.json"))["reason"]
    assert "../escape.dat\tcontains a path separator" in _body(s3, bucket, "rejected.txt").decode()
    assert _body(s3, bucket, "tasklist.txt") == b""
    assert not list((Path(worker.settings.workdir)).glob("**/escape.dat"))


@pytest.mark.parametrize("kernel", [None, b""], ids=["missing", "empty"])
def test_unusable_kernel_claims_nothing(s3, bucket, make_worker, inline_runner, kernel):
    _upload(s3, bucket, {"in1.dat": b"abc", "tasklist.txt": b"in1.dat\n"})
    if kernel is not None:
        _upload(s3, bucket, {"kernel.dat": kernel})
    assert make_worker(inline_runner).run() == 2
    assert _keys(s3, bucket, "locks/") == [] and _body(s3, bucket, "tasklist.txt") == b"in1.dat\n"
