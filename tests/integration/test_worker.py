"""The worker on the real emulator: the seed scenario with the real processing container, many
workers at once, the fault-matrix rows (those of S3 on moto's and on LocalStack's S3), the bad inputs,
slots, signals and the trace."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

from ansible_collections.cicc.cloud.plugins.module_utils import dataset
from ansible_collections.cicc.cloud.plugins.module_utils import task_queue as tq
from ansible_collections.cicc.cloud.tests.helpers import list_keys, read_body, upload
from conftest import xor_job

ROOT = Path(__file__).resolve().parents[2]


def _worker_command(job: str, endpoint: str) -> list[str]:
    """The worker as its unit runs it, on ``job`` against the S3 at ``endpoint``."""
    return [sys.executable, str(ROOT / "worker" / "cicc_worker.py"), "--job", job, "--endpoint-url", endpoint]


def _expected(s3, bucket: str, name: str) -> bytes:
    return dataset.xor_tiled(read_body(s3, bucket, name), read_body(s3, bucket, "kernel.dat"))


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
    assert read_body(s3, bucket, "tasklist.txt").strip() == b""
    completed = read_body(s3, bucket, "completed.txt").decode().splitlines()
    assert sorted(completed) == sorted(done) and len(set(completed)) == len(completed)
    assert list_keys(s3, bucket, "locks/") == [] and list_keys(s3, bucket, "compaction.json") == []


@pytest.fixture(scope="module")
def process_image():
    subprocess.run([str(ROOT / "scripts" / "process-image.sh")], check=True)
    return os.environ.get("CICC_PROCESS_IMAGE", "cicc-process:latest")


def test_seed_scenario_three_workers_with_the_processing_container(
    s3, bucket, make_worker, worker_module, docker_client, process_image
):
    seed = dataset.build_dataset(seed=121325)
    upload(s3, bucket, seed)
    runner = worker_module.DockerRunner()
    workers = [make_worker(runner, owner=f"i-seed{i}", slots=1) for i in range(3)]
    assert _run_all(workers) == [0, 0, 0]

    for i in range(10):
        assert read_body(s3, bucket, f"out{i}.dat") == _expected(s3, bucket, f"in{i}.dat"), f"out{i}.dat"
    for i in range(3):
        assert read_body(s3, bucket, f"out{i}.dat") == seed[f"out{i}.dat"]  # untouched
    _assert_drained(s3, bucket, [f"in{i}.dat" for i in range(10)])
    assert sorted(sum((w.done for w in workers), [])) == [f"in{i}.dat" for i in range(3, 10)]
    assert not docker_client.containers.list(all=True, filters={"label": ["cicc.task", "cicc.job=xor"]})
    # Each done task has its manifest: the files, the input and the image that made them.
    image_id = docker_client.images.get(process_image).id
    for i in range(3, 10):
        manifest = json.loads(read_body(s3, bucket, f"manifests/in{i}.dat.json"))
        assert [entry["key"] for entry in manifest["files"]] == [f"out{i}.dat"]
        assert manifest["files"][0]["etag"] == s3.head_object(Bucket=bucket, Key=f"out{i}.dat")["ETag"]
        assert manifest["input"]["etag"] == s3.head_object(Bucket=bucket, Key=f"in{i}.dat")["ETag"]
        assert manifest["image"] == {"name": "cicc-process:latest", "id": image_id}
        assert manifest["shared"][0]["key"] == "kernel.dat"


@pytest.mark.both_s3
def test_sixteen_workers_on_500_tasks_do_each_exactly_once(s3, bucket, make_worker, inline_runner):
    names = [f"in{i:03d}.dat" for i in range(500)]
    upload(s3, bucket, {name: os.urandom(64) for name in names})
    upload(s3, bucket, {"kernel.dat": os.urandom(8), "tasklist.txt": tq._lines(names)})
    workers = [make_worker(inline_runner, owner=f"w{i}") for i in range(16)]
    assert _run_all(workers) == [0] * 16

    assert sorted(inline_runner.runs) == names  # processed once each, never twice
    assert sorted(sum((w.done for w in workers), [])) == names
    _assert_drained(s3, bucket, names)
    outputs = [key for key in list_keys(s3, bucket) if key.startswith("out")]
    assert len(outputs) == 500


@pytest.mark.both_s3
def test_row2_killed_after_claiming_is_taken_over_once(s3, bucket, s3_endpoint, tmp_path, make_worker, inline_runner):
    """A worker process killed with SIGKILL while its task runs: its lease runs out and one of the workers
    after it takes the task over, once."""
    upload(s3, bucket, {"in1.dat": b"abcd", "kernel.dat": b"k", "tasklist.txt": b"in1.dat\n"})
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(xor_job(bucket).as_dict()))
    argv = _worker_command(str(job_file), s3_endpoint)
    argv += ["--workdir", str(tmp_path / "killed"), "--lease-seconds", "2", "--instance-id", "i-killed"]
    argv += ["--runner", "process", "--program", _slow_program(tmp_path, 60)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / ".collections")}
    killed = subprocess.Popen(argv, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not list_keys(s3, bucket, "locks/"):
            assert time.monotonic() < deadline and killed.poll() is None
            time.sleep(0.05)
        killed.kill()
        assert killed.wait(10) == -signal.SIGKILL
        workers = [make_worker(inline_runner, owner=f"w{i}", lease_seconds=2) for i in range(3)]
        assert _run_all(workers) == [0, 0, 0]
    finally:  # its processing child, orphaned, goes too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(killed.pid, signal.SIGKILL)
    assert inline_runner.runs == ["in1.dat"]
    assert json.loads(read_body(s3, bucket, tq.Queue(bucket).manifest_key("in1.dat")))["attempt"] == 2
    _assert_drained(s3, bucket, ["in1.dat"])


def _slow_program(tmp_path: Path, seconds: float) -> str:
    program = tmp_path / "slow_process.py"
    program.write_text(textwrap.dedent(f"""
            import runpy, sys, time
            time.sleep({seconds})
            sys.argv[0] = {str(ROOT / "container" / "process.py")!r}
            runpy.run_path(sys.argv[0], run_name="__main__")
            """))
    return str(program)


@pytest.mark.both_s3
def test_row4_paused_worker_is_refused_after_takeover(s3, bucket, s3_endpoint, tmp_path, make_worker, worker_module):
    upload(s3, bucket, {"in1.dat": os.urandom(100), "kernel.dat": b"key", "tasklist.txt": b"in1.dat\n"})
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(xor_job(bucket).as_dict()))
    argv = _worker_command(str(job_file), s3_endpoint)
    argv += ["--workdir", str(tmp_path / "paused"), "--lease-seconds", "2", "--instance-id", "i-paused"]
    argv += ["--runner", "process", "--program", _slow_program(tmp_path, 1.5)]
    paused = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": str(ROOT / ".collections")})
    deadline = time.monotonic() + 30
    while not list_keys(s3, bucket, "locks/"):
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


def test_a_task_claimed_ahead_and_taken_over_meanwhile_is_not_run(s3, bucket, make_worker, inline_runner):
    """The task claimed ahead waits while the one in hand runs (or, under throttling, while its outputs
    are published); if another worker took it over meanwhile, it is not run a second time."""
    names = ["t1.dat", "t2.dat"]
    upload(s3, bucket, {"kernel.dat": b"k", "t1.dat": b"one", "t2.dat": b"two", "tasklist.txt": b"t1.dat\nt2.dat\n"})
    queue = tq.Queue(bucket)

    class TakenOverMeanwhile:
        """Runs the first task once the look ahead holds the other, and meanwhile has that one taken
        over (with a short lease, so that the next worker can take it over in turn)."""

        def __init__(self) -> None:
            self.runs: list[str] = []

        def __getattr__(self, name):
            return getattr(inline_runner, name)

        def run(self, job, task, dirs, image_id):
            if not self.runs:
                (ahead,) = set(names) - {task}
                deadline = time.monotonic() + 30
                while tq.read_lock(s3, queue, ahead) is None:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                rescuer = tq.Lease(ahead, "rescuer", "r", "", 1, lease_seconds=3)
                s3.put_object(Bucket=bucket, Key=queue.lock_key(ahead), Body=rescuer.body())
                time.sleep(1.5)  # the task in hand runs on, longer than half a lease
            self.runs.append(task)
            return inline_runner.run(job, task, dirs, image_id)

    runner = TakenOverMeanwhile()
    worker = make_worker(runner, owner="ahead", slots=1, lease_seconds=2, max_tasks=2)
    assert worker.run() == 0 and len(runner.runs) == 1 and worker.done == runner.runs
    # the rescuer's lease runs out: the next worker takes the other task over and does it
    assert make_worker(inline_runner, owner="next").run() == 0
    assert sorted(inline_runner.runs) == names
    _assert_drained(s3, bucket, names)


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

tq.open = lambda file, mode="r": SlowOnTheWire(file)
tq.publish_file(s3, queue, lease, "out1.dat", path)
print("published", flush=True)
"""


@pytest.mark.both_s3
def test_row6_worker_killed_mid_upload_leaves_no_partial_output(
    s3, bucket, s3_endpoint, tmp_path, make_worker, inline_runner
):
    data = os.urandom(4 * 1024 * 1024)
    upload(s3, bucket, {"in1.dat": data, "kernel.dat": b"key", "tasklist.txt": b"in1.dat\n"})
    output = tmp_path / "out1.dat"
    output.write_bytes(os.urandom(len(data)))
    env = {**os.environ, "PYTHONPATH": str(ROOT / ".collections")}
    dying = subprocess.Popen(
        [sys.executable, "-c", _DYING_UPLOAD, s3_endpoint, bucket, str(output)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert dying.stdout.readline().strip() == "uploading"
        time.sleep(0.5)  # a few chunks are on the wire
    finally:
        dying.kill()
    assert dying.wait(10) == -signal.SIGKILL
    assert "out1.dat" not in list_keys(s3, bucket), "a partial output is visible"
    time.sleep(2.5)  # the dead worker's lease runs out
    assert make_worker(inline_runner, "next", lease_seconds=2).run() == 0
    assert read_body(s3, bucket, "out1.dat") == _expected(s3, bucket, "in1.dat")
    _assert_drained(s3, bucket, ["in1.dat"])


@pytest.mark.parametrize(
    "program, reason",
    [
        ("import sys; sys.exit(9)", "exited with code 9"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "exited with code -9"),
        ("import time; time.sleep(30)", "timed out"),
        ("print('done, honestly')", "wrote nothing"),
    ],
    ids=["non-zero", "killed", "timeout", "no-output"],
)
def test_row9_failing_processing_counts_attempts_then_fails(
    s3, bucket, tmp_path, make_worker, worker_module, program, reason
):
    upload(s3, bucket, {"in1.dat": b"x", "in2.dat": b"y", "kernel.dat": b"k", "tasklist.txt": b"in1.dat\nin2.dat\n"})
    script = tmp_path / "broken.py"
    script.write_text(program)
    worker = make_worker(worker_module.ProcessRunner(str(script)), attempts=2, timeout_seconds=1)
    assert worker.run() == 0
    assert sorted(worker.failed) == ["in1.dat", "in2.dat"]
    record = json.loads(read_body(s3, bucket, "failed/in1.dat.json"))
    assert record["attempts"] == 2 and reason in record["reason"]
    assert sorted(read_body(s3, bucket, "failed.txt").decode().split()) == ["in1.dat", "in2.dat"]
    assert read_body(s3, bucket, "tasklist.txt") == b""
    assert [key for key in list_keys(s3, bucket) if key.startswith("out")] == []
    assert list_keys(s3, bucket, "locks/") == []


@pytest.mark.both_s3
def test_row12_empty_or_finished_queue_every_worker_exits(s3, bucket, make_worker, inline_runner):
    upload(s3, bucket, {"kernel.dat": b"k", "tasklist.txt": b""})
    assert _run_all([make_worker(inline_runner, owner=f"w{i}") for i in range(3)]) == [0, 0, 0]
    # Done before: its manifest says so (an output alone would not).
    manifest = json.dumps({"task": "in1.dat", "files": [{"name": "out1.dat", "key": "out1.dat"}]}).encode()
    upload(s3, bucket, {"in1.dat": b"a", "out1.dat": b"done before", "manifests/in1.dat.json": manifest})
    upload(s3, bucket, {"tasklist.txt": b"in1.dat\n"})
    assert _run_all([make_worker(inline_runner, owner=f"w{i}") for i in range(3)]) == [0, 0, 0]
    assert inline_runner.runs == []
    _assert_drained(s3, bucket, ["in1.dat"])
    assert read_body(s3, bucket, "out1.dat") == b"done before"


@pytest.mark.both_s3
def test_output_left_by_another_run_is_never_overwritten(s3, bucket, make_worker, inline_runner):
    """An output key holding other bytes (an earlier run on other inputs): the task fails saying so, the
    object stays; one holding the very bytes this run makes (an attempt that died before its manifest) counts."""
    upload(s3, bucket, {"kernel.dat": b"k", "in1.dat": b"abc", "in2.dat": b"xyz", "out1.dat": b"stale"})
    upload(s3, bucket, {"out2.dat": bytes(a ^ ord("k") for a in b"xyz"), "tasklist.txt": b"in1.dat\nin2.dat\n"})
    worker = make_worker(inline_runner)
    assert worker.run() == 0
    assert worker.failed == ["in1.dat"] and worker.done == ["in2.dat"]
    assert read_body(s3, bucket, "out1.dat") == b"stale"
    assert "exists with other content" in json.loads(read_body(s3, bucket, "failed/in1.dat.json"))["reason"]
    assert json.loads(read_body(s3, bucket, "manifests/in2.dat.json"))["files"][0]["key"] == "out2.dat"


@pytest.mark.both_s3
def test_stale_outputs_are_made_again_only_on_request(s3, bucket, make_worker, inline_runner):
    """Changed inputs make their outputs stale: reported, and left alone by the next run. recompute() queues
    them again: the next attempt replaces exactly the output the old manifest lists (that manifest kept under
    superseded/, its attempt kept in the trace) and the new manifest says which ETag it replaced; an output
    someone changed since is still never overwritten (the task is recorded failed saying so)."""
    from ansible_collections.cicc.cloud.plugins.module_utils import run_trace

    names, stale = ["in1.dat", "in2.dat", "in3.dat"], ["in1.dat", "in2.dat"]
    upload(s3, bucket, {"kernel.dat": b"kk", **{name: name.encode() for name in names}})
    upload(s3, bucket, {"tasklist.txt": "".join(f"{name}\n" for name in names).encode()})
    assert make_worker(inline_runner).run() == 0
    queue = tq.Queue(bucket)
    before = {name: tq.read_manifest(s3, queue, name) for name in names}
    upload(s3, bucket, {"in1.dat": b"one, again", "in2.dat": b"two, again", "out2.dat": b"edited by hand"})
    checked = tq.check_outputs(s3, queue, names)
    assert [entry["task"] for entry in checked["stale"]] == stale and len(checked["wrong"]) == 1
    assert make_worker(inline_runner, owner="next").run() == 0 and sorted(inline_runner.runs) == names

    snapshot = {key: s3.head_object(Bucket=bucket, Key=key)["ETag"] for key in list_keys(s3, bucket)}
    assert tq.recompute(s3, queue, ["in1.dat", "in2.dat", "made-by-hand.dat"], check_mode=True) == stale
    assert {key: s3.head_object(Bucket=bucket, Key=key)["ETag"] for key in list_keys(s3, bucket)} == snapshot
    assert tq.recompute(s3, queue, stale) == stale
    assert tq.recompute(s3, queue, stale) == stale  # cut short or run twice: queued once
    assert read_body(s3, bucket, "tasklist.txt").decode().splitlines() == stale
    assert make_worker(inline_runner, owner="again").run() == 0
    assert sorted(inline_runner.runs) == sorted(names + stale)

    assert read_body(s3, bucket, "out1.dat") == _expected(s3, bucket, "in1.dat")
    made = tq.read_manifest(s3, queue, "in1.dat")
    assert made["input"]["etag"] == s3.head_object(Bucket=bucket, Key="in1.dat")["ETag"]
    assert made["files"][0]["replaced"] == before["in1.dat"]["files"][0]["etag"]
    assert tq.superseded_manifests(s3, queue, "in1.dat") == [before["in1.dat"]]
    assert read_body(s3, bucket, "out2.dat") == b"edited by hand" and tq.read_manifest(s3, queue, "in2.dat") is None
    assert "exists with other content" in json.loads(read_body(s3, bucket, queue.failed_key("in2.dat")))["reason"]
    assert tq.check_outputs(s3, queue, ["in1.dat", "in3.dat"])["stale"] == []
    outcomes = [(row["task"], row["outcome"]) for row in run_trace.read_trace(s3, bucket, "")]
    assert sorted(outcomes) == sorted([(name, "done") for name in names] + [("in1.dat", "done"), ("in2.dat", "failed")])
    assert read_body(s3, bucket, "tasklist.txt").strip() == b"" and list_keys(s3, bucket, "locks/") == []
    assert sorted(read_body(s3, bucket, "completed.txt").decode().splitlines()) == ["in1.dat", "in3.dat"]
    assert read_body(s3, bucket, "failed.txt").decode().splitlines() == ["in2.dat"]


def test_task_limit_stops_the_worker_and_leaves_the_rest(s3, bucket, make_worker, inline_runner, caplog):
    """max_tasks=1, the seed's one task per boot: each worker takes one task and stops; the queue drains."""
    names = [f"in{i}.dat" for i in range(3)]
    upload(s3, bucket, {"kernel.dat": b"k", **{name: b"data" for name in names}})
    upload(s3, bucket, {"tasklist.txt": "".join(f"{name}\n" for name in names).encode()})
    with caplog.at_level("INFO", logger="cicc-worker"):
        assert make_worker(inline_runner, owner="w1", max_tasks=1).run() == 0
    assert len(inline_runner.runs) == 1
    assert "task limit reached: 1 completed, 0 failed by w1" in caplog.text
    assert len(read_body(s3, bucket, "completed.txt").split()) == 1
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

    def prepare(self, job, fetch) -> str:
        return ""

    def run(self, job, task, dirs, image_id):
        self.runs.append(task)
        self.metadata.notice.set()
        if not self.cancelled.wait(job.timeout_seconds):
            raise AssertionError("never cancelled")
        raise self.error("processing stopped")

    def cancel(self) -> None:
        self.cancelled.set()


def test_row10_spot_notice_gives_back_the_task_and_stops(s3, bucket, make_worker, inline_runner, worker_module, caplog):
    names = ["in1.dat", "in2.dat"]
    upload(s3, bucket, {"kernel.dat": b"k", **{name: b"data" for name in names}})
    upload(s3, bucket, {"tasklist.txt": "".join(f"{name}\n" for name in names).encode()})
    metadata = FakeMetadata()
    try:
        runner = NoticeDuringTask(metadata, worker_module)
        worker = make_worker(runner, "spot", spot_watch=True, metadata_url=metadata.url, spot_poll_seconds=1, slots=2)
        with caplog.at_level("INFO", logger="cicc-worker"):
            assert worker.run() == 0
            # One claim a slot, cancelled (or stopped before its container started) and given back: no output,
            # no lock, no failure.
            assert worker.slots == 2 and runner.runs and runner.cancelled.is_set()
            assert caplog.text.count("gave back") == 2
            assert "spot interruption: 0 completed, 0 failed by spot" in caplog.text
            assert list_keys(s3, bucket, "locks/") == [] and list_keys(s3, bucket, "failed/") == []
            assert not [key for key in list_keys(s3, bucket) if key.startswith("out")]
            # The next worker takes both tasks, the given-back one at its first attempt again.
            assert make_worker(inline_runner, "next").run() == 0
    finally:
        metadata.shutdown()
    assert sorted(inline_runner.runs) == names
    _assert_drained(s3, bucket, names)
    assert caplog.text.count("(attempt 1)") == 4 and "(attempt 2)" not in caplog.text


def test_row11_refused_termination_falls_back_to_shutdown(worker_module, monkeypatch) -> None:
    """TerminateInstances refused: the worker shuts the OS down (the instance's shutdown behaviour terminates it)."""

    class Refusing:
        def client(self, *args, **kwargs):
            return self

        def terminate_instances(self, **kwargs):
            raise RuntimeError("UnauthorizedOperation")

    commands = []
    monkeypatch.setattr(worker_module.subprocess, "run", lambda argv, **kwargs: commands.append(argv))
    worker_module.terminate_self(worker_module.Settings(instance_id="i-1"), Refusing())
    assert commands == [["systemctl", "poweroff"]]


def test_bad_inputs_are_recorded_and_lose_nothing(s3, bucket, make_worker, inline_runner, worker_module, monkeypatch):
    tasklist = b"\xef\xbb\xbfin1.dat\r\nmissing.dat\r\n../escape.dat\r\nhuge.dat \r\nempty.dat\nin1.dat"
    upload(s3, bucket, {"in1.dat": b"abc", "huge.dat": b"x" * 4096, "empty.dat": b"", "kernel.dat": b"kk"})
    upload(s3, bucket, {"tasklist.txt": tasklist})
    real_usage = worker_module.shutil.disk_usage
    monkeypatch.setattr(worker_module.shutil, "disk_usage", lambda path: real_usage(path)._replace(free=3000))
    worker = make_worker(inline_runner)
    assert worker.run() == 0
    assert sorted(worker.done) == ["empty.dat", "in1.dat"]
    assert read_body(s3, bucket, "out_empty.dat") == b""
    assert "is missing" in json.loads(read_body(s3, bucket, "failed/missing.dat.json"))["reason"]
    assert "local disk allows" in json.loads(read_body(s3, bucket, "failed/huge.dat.json"))["reason"]
    assert "../escape.dat\tcontains a path separator" in read_body(s3, bucket, "rejected.txt").decode()
    assert read_body(s3, bucket, "tasklist.txt") == b""
    assert not list((Path(worker.settings.workdir)).glob("**/escape.dat"))


@pytest.mark.parametrize("kernel", [None, b""], ids=["missing", "empty"])
def test_unusable_kernel_claims_nothing(s3, bucket, make_worker, inline_runner, kernel):
    upload(s3, bucket, {"in1.dat": b"abc", "tasklist.txt": b"in1.dat\n"})
    if kernel is not None:
        upload(s3, bucket, {"kernel.dat": kernel})
    assert make_worker(inline_runner).run() == 2
    assert list_keys(s3, bucket, "locks/") == [] and read_body(s3, bucket, "tasklist.txt") == b"in1.dat\n"


# --- jobs: exit-code rules, slots, a bad job, an image from the bucket ------------------------------------


def test_exit_code_rules_retry_or_fail_at_once(s3, bucket, tmp_path, make_worker, worker_module):
    """As AWS Batch's evaluateOnExit: the first matching rule decides; 75 retries up to the attempts, 1 fails at once."""
    upload(s3, bucket, {"in1.dat": b"x", "in2.dat": b"y", "kernel.dat": b"k", "tasklist.txt": b"in1.dat\nin2.dat\n"})
    script = tmp_path / "exits.py"
    script.write_text("import sys\nsys.exit(75 if any(arg.endswith('in1.dat') for arg in sys.argv) else 1)\n")
    rules = [{"on_exit_code": "75", "action": "retry"}, {"on_exit_code": "*", "action": "fail"}]
    job = xor_job(bucket, retry={"attempts": 3, "evaluate_on_exit": rules})
    worker = make_worker(worker_module.ProcessRunner(str(script)), job=job, slots=1)
    assert worker.run() == 0
    retried = json.loads(read_body(s3, bucket, "failed/in1.dat.json"))
    assert retried["attempts"] == 3 and "gave up after 3 attempts" in retried["reason"]
    assert "exited with code 75 (retry by the job's rules)" in retried["reason"]
    failed = json.loads(read_body(s3, bucket, "failed/in2.dat.json"))
    assert failed["attempts"] == 1 and "exited with code 1 (fail by the job's rules)" in failed["reason"]
    assert sorted(worker.failed) == ["in1.dat", "in2.dat"] and list_keys(s3, bucket, "locks/") == []


def test_slots_run_two_tasks_of_one_machine_at_once(s3, bucket, make_worker, inline_runner, worker_module):
    """Two slots on this 2-vCPU machine for a job of 1 CPU: two tasks in flight at once, each done once."""
    names = [f"in{i}.dat" for i in range(6)]
    upload(s3, bucket, {"kernel.dat": b"k", **{name: name.encode() for name in names}})
    upload(s3, bucket, {"tasklist.txt": "".join(f"{name}\n" for name in names).encode()})
    together, met = threading.Barrier(2, timeout=30), set()

    class InPairs:
        def prepare(self, job, fetch):
            return ""

        def run(self, job, task, dirs, image_id):
            # A slot's first task returns only once the other slot runs a task too: two at once. Later
            # tasks go as they come (a slot may end up with more tasks than the other).
            slot = threading.current_thread().name
            if slot not in met:
                met.add(slot)
                together.wait()
            return inline_runner.run(job, task, dirs, image_id)

        def cancel(self):
            pass

    worker = make_worker(InPairs())
    assert worker.run() == 0
    assert worker.slots == 2
    assert sorted(inline_runner.runs) == names and sorted(worker.done) == names
    owners = {json.loads(read_body(s3, bucket, f"manifests/{name}.json"))["owner"] for name in names}
    assert owners == {"w1#0", "w1#1"}
    _assert_drained(s3, bucket, names)


def test_a_bad_job_at_boot_claims_nothing_and_says_why(s3, bucket, emulator, tmp_path):
    bad = {**xor_job(bucket).as_dict(), "name": "Bad Name", "cpus": 0}
    upload(s3, bucket, {"job.json": json.dumps(bad).encode(), "in1.dat": b"x", "kernel.dat": b"k"})
    upload(s3, bucket, {"tasklist.txt": b"in1.dat\n"})
    argv = _worker_command(f"s3://{bucket}/job.json", emulator)
    argv += ["--workdir", str(tmp_path), "--instance-id", "i-badjob"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / ".collections")}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    log = read_body(s3, bucket, "logs/i-badjob/log.txt").decode()
    assert f"the job s3://{bucket}/job.json is refused" in log and "no task claimed" in log
    assert "name is 'Bad Name'" in log and "cpus is 0" in log
    assert list_keys(s3, bucket, "locks/") == [] and read_body(s3, bucket, "tasklist.txt") == b"in1.dat\n"


def _summary_job(bucket: str, **image):
    import yaml

    from ansible_collections.cicc.cloud.plugins.module_utils import job as jobs

    data = yaml.safe_load((ROOT / "jobs" / "summary.yml").read_text())["cicc_job"]
    data["bucket"] = bucket
    data["image"] = {**data["image"], **image}
    return jobs.load(data)


def test_summary_job_image_comes_from_the_bucket(
    s3, bucket, make_worker, worker_module, docker_client, summary_archive
):
    """The second example job: its image loaded from the archive in the bucket (checked by ID), two outputs a
    task, each recomputed here independently."""
    import hashlib

    archive, image_id = summary_archive
    inputs = {f"in{i}.dat": os.urandom(1000 * (i + 1)) for i in range(3)}
    upload(s3, bucket, {**inputs, "kernel.dat": b"not an input"})
    s3.upload_file(str(archive), bucket, "summary/images/cicc-summary.tar")
    job = _summary_job(bucket, digest=image_id)
    queue = tq.Queue(bucket, job.prefix, input_prefix=job.input_prefix)
    assert tq.add_tasks(s3, queue, tq.list_inputs(s3, queue, job.tasks_pattern)) == sorted(inputs)
    docker_client.images.remove("cicc-summary:latest")  # the machine does not have it: the bucket brings it

    worker = make_worker(worker_module.DockerRunner(), owner="i-summary", job=job)
    assert worker.run() == 0 and sorted(worker.done) == sorted(inputs)
    assert docker_client.images.get("cicc-summary:latest").id == image_id
    for name, data in inputs.items():
        summary = json.loads(read_body(s3, bucket, f"summary/results/{name}/summary.json"))
        assert summary["size"] == len(data) and summary["sha256"] == hashlib.sha256(data).hexdigest()
        assert (summary["min"], summary["max"]) == (min(data), max(data))
        histogram = np.load(io.BytesIO(read_body(s3, bucket, f"summary/results/{name}/histogram.npy")))
        assert histogram.tolist() == [data.count(value) for value in range(256)]
        manifest = json.loads(read_body(s3, bucket, f"summary/manifests/{name}.json"))
        assert manifest["image"]["id"] == image_id
        assert sorted(entry["name"] for entry in manifest["files"]) == ["histogram.npy", "summary.json"]
    assert sorted(read_body(s3, bucket, "summary/completed.txt").decode().split()) == sorted(inputs)

    # An archive that is not the image the job names by ID: refused before any claim.
    upload(s3, bucket, {"summary/tasklist.txt": b"in9.dat\n", "in9.dat": b"pending"})
    wrong = _summary_job(bucket, digest="sha256:" + "0" * 64)
    assert make_worker(worker_module.DockerRunner(), owner="i-wrong", job=wrong).run() == 2
    assert (
        list_keys(s3, bucket, "summary/locks/") == [] and read_body(s3, bucket, "summary/tasklist.txt") == b"in9.dat\n"
    )


@pytest.mark.both_s3
def test_row13_sigterm_mid_task_gives_back_and_exits_within_ten_seconds(s3, bucket, s3_endpoint, tmp_path):
    """systemctl stop, a shutdown, Ctrl-C: no more claims, the running program stopped, the task given back without
    counting an attempt, the log uploaded, exit 0 within 10 s."""
    upload(s3, bucket, {"in1.dat": b"x", "in2.dat": b"y", "kernel.dat": b"k", "tasklist.txt": b"in1.dat\nin2.dat\n"})
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(xor_job(bucket).as_dict()))
    program = tmp_path / "forever.py"
    program.write_text(
        f"import os, time\nopen({str(tmp_path / 'pids')!r}, 'a').write(f'{{os.getpid()}}\\n')\ntime.sleep(300)\n"
    )
    argv = _worker_command(str(job_file), s3_endpoint)
    argv += ["--workdir", str(tmp_path / "work"), "--instance-id", "i-stopped", "--slots", "1"]
    argv += ["--runner", "process", "--program", str(program)]
    worker = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": str(ROOT / ".collections")})
    deadline = time.monotonic() + 30
    while not (tmp_path / "pids").exists():
        assert time.monotonic() < deadline and worker.poll() is None
        time.sleep(0.05)
    # Both tasks are claimed: one runs, the next is staged beside it.
    while len(list_keys(s3, bucket, "locks/")) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    stopped = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(10) == 0
    assert time.monotonic() - stopped < 10
    child = int((tmp_path / "pids").read_text().split()[0])
    assert not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text()
    assert list_keys(s3, bucket, "locks/") == [] and list_keys(s3, bucket, "failed/") == []
    assert read_body(s3, bucket, "tasklist.txt") == b"in1.dat\nin2.dat\n"
    log = read_body(s3, bucket, "logs/i-stopped/log.txt").decode()
    assert "stopped by SIGTERM: no more claims" in log and "stopped by SIGTERM: 0 completed, 0 failed" in log


def test_a_second_signal_exits_at_once(worker_module, monkeypatch):
    class Worker:
        stop_reason = ""

        def request_stop(self, reason):
            self.stop_reason = reason

    worker, exits, handlers = Worker(), [], {}
    monkeypatch.setattr(worker_module.signal, "signal", handlers.setdefault)
    monkeypatch.setattr(worker_module.os, "_exit", exits.append)
    worker_module.stop_on_signals(worker)
    handlers[signal.SIGINT](signal.SIGINT, None)
    deadline = time.monotonic() + 5
    while not worker.stop_reason and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.stop_reason == "stopped by SIGINT" and exits == []
    handlers[signal.SIGTERM](signal.SIGTERM, None)
    assert exits == [128 + signal.SIGTERM]


def test_an_unexpected_error_in_a_slot_ends_the_run_as_an_error(s3, bucket, make_worker, worker_module):
    """The slot stops and says why; the task it had claimed ahead is given back at once (its first attempt
    still), the one in hand keeps its lock until the lease runs out, as after a crash; the exit code is 1."""
    upload(s3, bucket, {"in1.dat": b"x", "in2.dat": b"y", "kernel.dat": b"k", "tasklist.txt": b"in1.dat\nin2.dat\n"})
    staged_ahead = threading.Event()

    class Broken:
        def prepare(self, job, fetch):
            return ""

        def run(self, job, task, dirs, image_id):
            staged_ahead.wait(10)  # the look ahead has the other task by then
            raise RuntimeError("a bug in the runner")

        def cancel(self):
            pass

    worker = make_worker(Broken(), slots=1)
    real_take = worker._take

    def take(picker, patient=True):
        claimed = real_take(picker, patient)
        if not patient and claimed is not None:
            staged_ahead.set()
        return claimed

    worker._take = take
    assert worker.run() == worker_module.EXIT_ERROR and worker.failed_slots == 1
    locks = list_keys(s3, bucket, "locks/")
    assert len(locks) == 1 and json.loads(read_body(s3, bucket, locks[0]))["owner"] == "w1"
    assert list_keys(s3, bucket, "failed/") == [] and read_body(s3, bucket, "tasklist.txt") == b"in1.dat\nin2.dat\n"


class _FaultyS3(http.server.ThreadingHTTPServer):
    """S3 on 127.0.0.1 as it answers under load or in an outage: every ``every``-th request gets 503
    SlowDown (or 500 InternalError, every ``every_500``-th; 0: never) without reaching the emulator - S3
    did not perform it -, and during an ``outage()`` every connection is dropped unanswered. The other
    requests are passed on to the emulator as they are."""

    def __init__(self, upstream: str, every: int = 0, every_500: int = 0) -> None:
        self.upstream = urlparse(upstream)
        self.every, self.every_500 = every, every_500
        self.count = self.refused = self.dropped = 0
        self.down_until = 0.0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _FaultyS3Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def outage(self, seconds: float) -> None:
        self.down_until = time.monotonic() + seconds

    def is_down(self) -> bool:
        if time.monotonic() >= self.down_until:
            return False
        with self.lock:
            self.dropped += 1
        return True

    def verify_request(self, request, client_address) -> bool:
        return not self.is_down()  # a new connection in an outage: closed at once


class _FaultyS3Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _relay(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.is_down():  # a kept-alive connection in an outage: closed unanswered
            self.close_connection = True
            return
        with self.server.lock:
            self.server.count += 1
            count = self.server.count
        server_error = self.server.every_500 and count % self.server.every_500 == 0
        if server_error or (self.server.every and count % self.server.every == 0):
            code, error = (500, "InternalError") if server_error else (503, "SlowDown")
            with self.server.lock:
                self.server.refused += 1
            payload = f"<Error><Code>{error}</Code><Message>try again</Message></Error>".encode()
            self.send_response_only(code)
            self.send_header("Date", self.date_time_string())
            self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        upstream = http.client.HTTPConnection(self.server.upstream.hostname, self.server.upstream.port, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
            answer = upstream.getresponse()
            payload = answer.read()
        finally:
            upstream.close()
        # The emulator's own Date: leases are timed by S3's clock.
        self.send_response_only(answer.status)
        for name, value in answer.getheaders():
            # A HEAD's Content-Length is the object's (it has no body): relayed as it is.
            if name.lower() not in ("transfer-encoding", "connection") and (
                name.lower() != "content-length" or self.command == "HEAD"
            ):
                self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.mark.both_s3
def test_row14_throttled_s3_loses_nothing_and_does_nothing_twice(s3, bucket, s3_endpoint, make_worker, inline_runner):
    """A third of the requests answered 503 SlowDown, some 500: the workers back off with jitter and retry; every
    task is done exactly once, nothing failed, the lists exact."""
    names = [f"in{i:02d}.dat" for i in range(30)]
    upload(s3, bucket, {"kernel.dat": b"kk", **{name: name.encode() for name in names}})
    upload(s3, bucket, {"tasklist.txt": "".join(f"{name}\n" for name in names).encode()})
    proxy = _FaultyS3(s3_endpoint, every=3, every_500=7)
    try:
        workers = [make_worker(inline_runner, owner=f"w{i}", endpoint_url=proxy.url) for i in range(4)]
        assert _run_all(workers) == [0, 0, 0, 0]
    finally:
        proxy.shutdown()
    assert proxy.refused >= proxy.count // 3 > 30
    assert sorted(inline_runner.runs) == names  # each processed once
    assert sorted(sum((w.done for w in workers), [])) == names and not sum((w.failed for w in workers), [])
    _assert_drained(s3, bucket, names)
    assert len(list_keys(s3, bucket, "manifests/")) == len(names)


@pytest.mark.both_s3
def test_row15_s3_unreachable_for_30_s_workers_wait_and_resume(s3, bucket, s3_endpoint, make_worker, inline_runner):
    """S3 drops every connection for 30 s mid-run: the workers wait and resume; a lease that ran out in the
    outage is taken over once, and every task still ends completed once, its output published once."""
    names = [f"in{i:02d}.dat" for i in range(24)]
    upload(s3, bucket, {"kernel.dat": b"kk", **{name: name.encode() for name in names}})
    upload(s3, bucket, {"tasklist.txt": "".join(f"{name}\n" for name in names).encode()})

    class Slow:
        def prepare(self, job, fetch):
            return ""

        def run(self, job, task, dirs, image_id):
            time.sleep(0.4)  # so that the outage finds tasks in the middle of their run
            return inline_runner.run(job, task, dirs, image_id)

        def cancel(self):
            pass

    proxy = _FaultyS3(s3_endpoint)
    try:
        settings = {"endpoint_url": proxy.url, "lease_seconds": 10, "slots": 1}
        workers = [make_worker(Slow(), owner=f"w{i}", **settings) for i in range(3)]
        codes: list[list[int]] = []
        run = threading.Thread(target=lambda: codes.append(_run_all(workers)))
        run.start()
        while len(inline_runner.runs) < 6 and run.is_alive():
            time.sleep(0.05)
        proxy.outage(30)
        run.join(600)
    finally:
        proxy.shutdown()
    assert codes == [[0, 0, 0]] and proxy.dropped > 0
    # A task whose completion went unanswered is not in its worker's count; the lists say it is done.
    _assert_drained(s3, bucket, names)
    assert not sum((w.failed for w in workers), []) and list_keys(s3, bucket, "failed/") == []
    attempts = {name: json.loads(read_body(s3, bucket, f"manifests/{name}.json"))["attempt"] for name in names}
    taken_over = {name for name, attempt in attempts.items() if attempt == 2}
    # At most the tasks in hand when S3 went: each worker's current one and the one it claimed ahead.
    assert max(attempts.values()) <= 2 and len(taken_over) <= 6
    assert {name for name in names if inline_runner.runs.count(name) > 1} <= taken_over
    for name in names:
        assert read_body(s3, bucket, f"out{name[2:]}") == _expected(s3, bucket, name)


@pytest.mark.both_s3
def test_every_attempt_is_traced_and_the_requests_add_up(
    s3, bucket, s3_endpoint, make_worker, inline_runner, worker_module
):
    """Each attempt ends as one trace row (outcome, ordered times, bytes, ETags, machine, code), each worker's
    run as one record; their S3 requests add up to what a counting proxy in front of S3 saw."""
    names = [f"in{i}.dat" for i in range(8)]
    upload(s3, bucket, {"kernel.dat": b"kk", **{name: name.encode() * 3 for name in names}})
    upload(s3, bucket, {"tasklist.txt": "".join(f"{name}\n" for name in names).encode()})

    class FailingSome:
        def prepare(self, job, fetch):
            return ""

        def run(self, job, task, dirs, image_id):
            if task == "in5.dat":  # 2: a bad input by the job's rules, failed at once
                return worker_module.RunResult(2, "bad input")
            if task == "in3.dat" and task not in inline_runner.runs:  # 1: retried
                inline_runner.runs.append(task)
                return worker_module.RunResult(1, "flaky")
            return inline_runner.run(job, task, dirs, image_id)

        def cancel(self):
            pass

    machine = {"instance_type": "c4.large", "availability_zone": "us-east-1a", "market": "spot", "ami_id": "ami-9"}
    proxy = _FaultyS3(s3_endpoint)
    try:
        workers = [make_worker(FailingSome(), owner=f"w{i}", endpoint_url=proxy.url, slots=1) for i in range(2)]
        for worker in workers:
            worker.machine = machine
        assert _run_all(workers) == [0, 0]
    finally:
        proxy.shutdown()

    from ansible_collections.cicc.cloud.plugins.module_utils import run_trace

    rows = run_trace.read_trace(s3, bucket, "")
    outcomes = {name: [row["outcome"] for row in rows if row["task"] == name] for name in names}
    assert outcomes == {**{name: ["done"] for name in names}, "in3.dat": ["retried", "done"], "in5.dat": ["failed"]}
    assert [row["attempt"] for row in rows if row["task"] == "in3.dat"] == [1, 2]
    for row in rows:
        assert row.items() >= {"job": "xor", "code_version": worker_module.CODE_VERSION, **machine}.items()
        assert row["worker"] in ("w0", "w1") and row["slot"] == row["worker"]
        assert row["input_etag"] == s3.head_object(Bucket=bucket, Key=row["task"])["ETag"]
        assert row["bytes_in"] == len(row["task"]) * 3 and row["requests"] >= 4
        if row["outcome"] == "done":
            output = s3.head_object(Bucket=bucket, Key=f"out{row['task'][2:]}")
            assert row["output_etags"] == [output["ETag"]] and row["bytes_out"] == output["ContentLength"]
            times = [row[name] for name in run_trace.TIMES]
            assert 0 < times[0] <= times[1] <= times[2] <= times[3] <= times[4], times
        else:
            assert row["exit_code"] in (1, 2) and row["reason"].startswith(f"exited with code {row['exit_code']}")
    records = run_trace.read_workers(s3, bucket, "")
    assert sorted(record["worker"] for record in records) == ["w0", "w1"]
    assert sum(record["completed"] for record in records) == 7 and sum(record["failed"] for record in records) == 1
    assert sum(record["attempts"] for record in records) == len(rows) == 9
    for record in records:
        assert record["started_at"] <= record["first_claim_at"] <= record["last_end_at"] <= record["stopped_at"]
    outside = sum(record["requests_outside_attempts"] for record in records)
    assert (
        sum(row["requests"] for row in rows) + outside == sum(record["requests"] for record in records) == proxy.count
    )
