"""The task modules (task_claim, task_complete, task_release, task_info) run by the real `ansible` command against
the emulator (and one whole round on LocalStack's S3 as well).

Each call is an ad-hoc `ansible localhost -m cicc.cloud.<module>` in its own process, its result read from the
ansible.posix.json callback. The endpoint and credentials reach AnsibleAWSModule only through the AWS_* variables
that conftest.py exports for the test's S3 (AWS_URL is endpoint_url's fallback); the first test checks that they do.
"""

from __future__ import annotations

import json

import pytest

from ansible_collections.cicc.cloud.plugins.module_utils import task_queue as tq
from ansible_collections.cicc.cloud.tests.helpers import list_keys, module_result, read_body
from conftest import xor_job

NAMES = ["in0.dat", "in1.dat", "in2.dat"]


def run_module(module: str, check: bool = False, **args) -> dict:
    """The result of one module run on localhost (``failed`` is true when the module failed)."""
    return module_result(f"cicc.cloud.{module}", args, check)


def ok(module: str, check: bool = False, **args) -> dict:
    result = run_module(module, check, **args)
    assert not result.get("failed"), result.get("msg", result)
    return result


def _snapshot(s3, bucket: str) -> dict[str, str]:
    return {item["Key"]: item["ETag"] for item in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}


def _lease_args(task: dict) -> dict:
    """What task_complete and task_release take from task_claim's result."""
    return {key: task[key] for key in ("name", "owner", "token", "etag", "attempts")}


def _output(name: str) -> str:
    return "out" + name[2:]


def _complete_args(task: dict) -> dict:
    """What task_complete takes: the lease, and the task's output (the seed's naming)."""
    return {**_lease_args(task), "outputs": [_output(task["name"])]}


def _publish(s3, bucket: str, name: str) -> None:
    s3.put_object(Bucket=bucket, Key=_output(name), Body=b"output of " + name.encode())


@pytest.fixture
def queue_bucket(s3, bucket) -> str:
    """A bucket holding three small inputs, all listed in tasklist.txt."""
    for name in NAMES:
        s3.put_object(Bucket=bucket, Key=name, Body=name.encode() * 10)
    s3.put_object(Bucket=bucket, Key="kernel.dat", Body=b"k")
    s3.put_object(Bucket=bucket, Key=tq.TASKLIST, Body="".join(f"{name}\n" for name in NAMES).encode())
    return bucket


# One whole round on LocalStack too: the modules reach the test's S3 through AWS_URL whichever it is,
# and the protocol under them is tested on both in test_task_queue.py (each module run costs seconds).
@pytest.mark.both_s3
def test_claim_next_complete_then_info_after_compaction(s3, queue_bucket, s3_endpoint):
    claim = ok("task_claim", bucket=queue_bucket, owner="w1", instance_id="i-0123456789abcdef0")
    assert claim["invocation"]["module_args"]["endpoint_url"] == s3_endpoint  # AWS_URL reached the module
    assert claim["changed"] and claim["claimed"]
    task = claim["task"]
    assert (task["name"], task["owner"], task["attempts"]) == ("in0.dat", "w1", 1)
    assert task["instance_id"] == "i-0123456789abcdef0"
    assert task["token"] and task["etag"]
    assert json.loads(read_body(s3, queue_bucket, "locks/in0.dat"))["token"] == task["token"]

    info = ok("task_info", bucket=queue_bucket)["queue"]
    assert info["claimed"] == 1 and info["claims"][0]["task"] == "in0.dat" and info["claims"][0]["owner"] == "w1"
    assert info["claims"][0]["instance_id"] == "i-0123456789abcdef0" and not info["claims"][0]["expired"]

    _publish(s3, queue_bucket, "in0.dat")
    done = ok("task_complete", bucket=queue_bucket, **_complete_args(task))
    assert done["changed"] and done["task"] == {
        "name": "in0.dat",
        "state": "completed",
        "manifest": "manifests/in0.dat.json",
        "outputs": ["out0.dat"],
    }
    assert read_body(s3, queue_bucket, "locks/in0.dat") == tq.MARKS["completed"]  # the lock is its finished mark

    info = ok("task_info", bucket=queue_bucket, compact=True)
    assert info["changed"] and info["compacted"] == {"completed": 1, "failed": 0, "rejected": 0, "locks": 0}
    queue = info["queue"]
    assert queue["pending_tasks"] == ["in1.dat", "in2.dat"] and queue["pending"] == 2
    assert (queue["completed"], queue["failed"], queue["claimed"], queue["unfolded"]) == (1, 0, 0, 0)
    assert not queue["drained"]
    assert read_body(s3, queue_bucket, tq.COMPLETED) == b"in0.dat\n"
    assert read_body(s3, queue_bucket, tq.TASKLIST) == b"in1.dat\nin2.dat\n"
    assert list_keys(s3, queue_bucket, "locks/") == []

    again = ok("task_info", bucket=queue_bucket, compact=True)
    assert not again["changed"] and again["queue"] == queue

    # The next claim goes on with the next task of the list.
    assert ok("task_claim", bucket=queue_bucket, owner="w1")["task"]["name"] == "in1.dat"


def test_task_held_by_another_owner_is_not_claimed(s3, queue_bucket):
    first = ok("task_claim", bucket=queue_bucket, owner="alice", name="in1.dat")
    assert first["claimed"] and first["task"]["name"] == "in1.dat"
    lock = read_body(s3, queue_bucket, "locks/in1.dat")

    other = ok("task_claim", bucket=queue_bucket, owner="bob", name="in1.dat")
    assert not other["changed"] and not other["claimed"] and other["task"] == {}
    assert "held by alice" in other["reason"]
    assert read_body(s3, queue_bucket, "locks/in1.dat") == lock

    # Claiming the next task passes over the held one.
    names = [ok("task_claim", bucket=queue_bucket, owner="bob")["task"]["name"] for _claim in range(2)]
    assert names == ["in0.dat", "in2.dat"]
    rest = ok("task_claim", bucket=queue_bucket, owner="bob")
    assert not rest["changed"] and not rest["claimed"] and rest["task"] == {}
    assert rest["reason"] == "every pending task is under a live lease: in0.dat, in1.dat, in2.dat"


def test_check_mode_writes_nothing(s3, queue_bucket):
    done = ok("task_claim", bucket=queue_bucket, owner="w1")["task"]
    _publish(s3, queue_bucket, done["name"])
    ok("task_complete", bucket=queue_bucket, **_complete_args(done))  # in0.dat marked, not compacted
    held = ok("task_claim", bucket=queue_bucket, owner="w1")["task"]
    assert held["name"] == "in1.dat"
    before = _snapshot(s3, queue_bucket)

    would = ok("task_claim", check=True, bucket=queue_bucket, owner="w2")
    assert would["changed"] and would["claimed"] and would["task"]["name"] == "in2.dat" and would["task"]["etag"] == ""
    refused = ok("task_claim", check=True, bucket=queue_bucket, owner="w2", name="in1.dat")
    assert not refused["changed"] and not refused["claimed"] and "held by w1" in refused["reason"]

    no_output = run_module("task_complete", check=True, bucket=queue_bucket, **_complete_args(held))
    assert no_output["failed"] and f"output s3://{queue_bucket}/out1.dat does not exist" in no_output["msg"]
    _publish(s3, queue_bucket, "in1.dat")
    before["out1.dat"] = _snapshot(s3, queue_bucket)["out1.dat"]
    would_complete = ok("task_complete", check=True, bucket=queue_bucket, **_complete_args(held))
    assert would_complete["changed"] and would_complete["task"]["state"] == "completed"

    would_release = ok("task_release", check=True, bucket=queue_bucket, error="boom", **_lease_args(held))
    assert would_release["changed"] and would_release["task"] == {"name": "in1.dat", "state": "pending"}
    would_fail = ok("task_release", check=True, bucket=queue_bucket, state="failed", error="bad", **_lease_args(held))
    assert would_fail["changed"] and would_fail["task"]["state"] == "failed"

    info = ok("task_info", check=True, bucket=queue_bucket, compact=True)
    assert info["changed"] and "compacted" not in info and info["queue"]["unfolded"] == 1

    assert _snapshot(s3, queue_bucket) == before


def test_release_with_error_counts_attempts_until_failed(s3, queue_bucket):
    common = {"bucket": queue_bucket, "max_attempts": 2}
    first = ok("task_claim", name="in0.dat", owner="w1", **common)["task"]
    assert first["attempts"] == 1
    released = ok("task_release", error="exit status 1", **common, **_lease_args(first))
    assert released["changed"] and released["task"] == {"name": "in0.dat", "state": "pending"}
    rerun = ok("task_release", error="exit status 1", **common, **_lease_args(first))
    assert not rerun["changed"] and rerun["task"]["state"] == "pending"

    # The released lease is expired at once: the next claim takes it over and counts the attempt.
    second = ok("task_claim", owner="w2", **common)["task"]
    assert (second["name"], second["attempts"], second["last_error"]) == ("in0.dat", 2, "exit status 1")
    late = run_module("task_release", error="late", **common, **_lease_args(first))
    assert late["failed"] and "lost" in late["msg"]

    failed = ok("task_release", error="exit status 2", **common, **_lease_args(second))
    assert failed["changed"] and failed["task"] == {"name": "in0.dat", "state": "failed"}
    record = json.loads(read_body(s3, queue_bucket, "failed/in0.dat.json"))
    assert record["attempts"] == 2 and "exit status 2" in record["reason"] and record["owner"] == "w2"
    assert read_body(s3, queue_bucket, "locks/in0.dat") == tq.MARKS["failed"]
    rerun = ok("task_release", error="exit status 2", **common, **_lease_args(second))
    assert not rerun["changed"] and rerun["task"]["state"] == "failed"

    queue = ok("task_info", compact=True, **common)["queue"]
    assert queue["failed_tasks"] == ["in0.dat"] and queue["failed"] == 1
    assert queue["pending_tasks"] == ["in1.dat", "in2.dat"]
    assert read_body(s3, queue_bucket, tq.FAILED) == b"in0.dat\n" and list_keys(s3, queue_bucket, "locks/") == []
    refused = ok("task_claim", name="in0.dat", owner="w3", **common)
    assert not refused["claimed"] and refused["state"] == "failed"


def test_release_without_error_does_not_count(s3, queue_bucket):
    task = ok("task_claim", bucket=queue_bucket, owner="w1")["task"]
    released = ok("task_release", bucket=queue_bucket, **_lease_args(task))
    assert released["changed"] and released["task"] == {"name": "in0.dat", "state": "pending"}
    assert list_keys(s3, queue_bucket, "locks/") == []
    assert not ok("task_release", bucket=queue_bucket, **_lease_args(task))["changed"]
    again = ok("task_claim", bucket=queue_bucket, owner="w2")["task"]
    assert (again["name"], again["attempts"]) == ("in0.dat", 1)


def test_state_failed_records_the_reason(s3, queue_bucket):
    task = ok("task_claim", bucket=queue_bucket, owner="w1", name="in2.dat")["task"]
    missing = run_module("task_release", bucket=queue_bucket, state="failed", **_lease_args(task))
    assert missing["failed"] and "error" in missing["msg"]
    empty = run_module("task_release", bucket=queue_bucket, state="failed", error="", **_lease_args(task))
    assert empty["failed"] and "error" in empty["msg"]

    failed = ok("task_release", bucket=queue_bucket, state="failed", error="input is empty", **_lease_args(task))
    assert failed["changed"] and failed["task"] == {"name": "in2.dat", "state": "failed"}
    record = json.loads(read_body(s3, queue_bucket, "failed/in2.dat.json"))
    assert (record["reason"], record["attempts"]) == ("input is empty", 1)
    queue = ok("task_info", bucket=queue_bucket)["queue"]
    assert queue["failed_tasks"] == ["in2.dat"] and queue["unfolded"] == 1 and queue["claimed"] == 0


def test_complete_without_output_fails_clearly(s3, queue_bucket):
    task = ok("task_claim", bucket=queue_bucket, owner="w1")["task"]
    result = run_module("task_complete", bucket=queue_bucket, **_complete_args(task))
    assert result["failed"] and result["msg"] == f"output s3://{queue_bucket}/out0.dat does not exist; publish it first"
    result = run_module("task_complete", bucket=queue_bucket, **_lease_args(task))
    assert result["failed"] and result["msg"] == "task in0.dat has no manifest: name its outputs (outputs) to write one"
    assert list_keys(s3, queue_bucket, "locks/") == ["locks/in0.dat"]
    assert json.loads(read_body(s3, queue_bucket, "locks/in0.dat"))["owner"] == "w1"  # still the lease, not a mark


def test_complete_twice_changes_nothing_the_second_time(s3, queue_bucket):
    task = ok("task_claim", bucket=queue_bucket, owner="w1")["task"]
    _publish(s3, queue_bucket, task["name"])
    assert ok("task_complete", bucket=queue_bucket, **_complete_args(task))["changed"]
    marked = _snapshot(s3, queue_bucket)
    second = ok("task_complete", bucket=queue_bucket, **_complete_args(task))
    assert not second["changed"] and second["task"]["state"] == "completed"
    assert _snapshot(s3, queue_bucket) == marked

    ok("task_info", bucket=queue_bucket, compact=True)  # the mark is folded into completed.txt
    third = ok("task_complete", bucket=queue_bucket, **_complete_args(task))
    assert not third["changed"] and list_keys(s3, queue_bucket, "locks/") == []


def test_token_finds_a_claim_whose_reply_was_lost(s3, queue_bucket):
    lost = ok("task_claim", bucket=queue_bucket, owner="w1", name="in1.dat")["task"]

    # Without the token the claim is refused, even to its owner; with it, the claim is found and renewed.
    assert not ok("task_claim", bucket=queue_bucket, owner="w1", name="in1.dat")["claimed"]
    found = ok("task_claim", bucket=queue_bucket, owner="w1", name="in1.dat", token=lost["token"])
    assert found["changed"] and found["claimed"]
    assert (found["task"]["name"], found["task"]["token"]) == ("in1.dat", lost["token"])
    assert found["task"]["etag"] != lost["etag"]

    # Claiming "the next task" with the token finds that claim too, before any free task.
    would = ok("task_claim", check=True, bucket=queue_bucket, owner="w1", token=lost["token"])
    assert would["task"]["name"] == "in1.dat"
    again = ok("task_claim", bucket=queue_bucket, owner="w1", token=lost["token"])["task"]
    assert (again["name"], again["token"], again["attempts"]) == ("in1.dat", lost["token"], 1)
    assert list_keys(s3, queue_bucket, "locks/") == ["locks/in1.dat"]

    # Someone else's token is no key to it.
    stolen = ok("task_claim", bucket=queue_bucket, owner="w2", name="in1.dat", token="not-the-token")
    assert not stolen["claimed"]

    _publish(s3, queue_bucket, "in1.dat")
    assert ok("task_complete", bucket=queue_bucket, **_complete_args(again))["changed"]
    assert read_body(s3, queue_bucket, "locks/in1.dat") == tq.MARKS["completed"]


def test_prefix_and_bad_names(s3, bucket):
    s3.put_object(Bucket=bucket, Key="q/in5.dat", Body=b"x")
    s3.put_object(Bucket=bucket, Key="q/tasklist.txt", Body=b"../etc/passwd\nin5.dat\n")
    task = ok("task_claim", bucket=bucket, prefix="q/", owner="w1")["task"]
    assert task["name"] == "in5.dat" and list_keys(s3, bucket, "q/locks/") == ["q/locks/in5.dat"]

    bad = run_module("task_claim", bucket=bucket, prefix="q/", owner="w1", name="../etc/passwd")
    assert bad["failed"] and "path separator" in bad["msg"]
    bad = run_module("task_complete", bucket=bucket, prefix="q/", name="a/b", owner="w1", token="t", etag='"e"')
    assert bad["failed"] and "path separator" in bad["msg"]

    info = ok("task_info", bucket=bucket, prefix="q/", compact=True)
    assert info["changed"] and info["queue"]["rejected"] == []
    assert b"../etc/passwd" in read_body(s3, bucket, "q/rejected.txt")
    assert read_body(s3, bucket, "q/tasklist.txt") == b"in5.dat\n"


def _trace_run(s3, bucket: str, worker: str, started_at: float, tasks: list[str]) -> None:
    """A worker run's trace as the worker writes it: a row per task (done in 2 s each), then its run's record."""
    from ansible_collections.cicc.cloud.plugins.module_utils import run_trace

    common = {"job": "xor", "worker": worker, "instance_id": f"i-{worker}", "instance_type": "c4.large"}
    common.update(availability_zone="us-east-1a", market="on-demand", image="cicc-process:latest", code_version="c0")
    trace = run_trace.TraceLog(s3, bucket, "", worker, run_trace.run_id(started_at), common)
    for number, name in enumerate(tasks):
        attempt = run_trace.Attempt(name, 1, worker, write_requests=3, read_requests=4, requests=7)
        attempt.claimed_at = attempt.staged_at = attempt.started_at = started_at + 1 + 2 * number
        attempt.ended_at = attempt.published_at = attempt.claimed_at + 2
        attempt.ended(run_trace.DONE)
        trace.add(attempt)
    trace.flush()
    record = {**common, "run": run_trace.run_id(started_at), "started_at": started_at, "slots": 1}
    record.update(first_claim_at=started_at + 1, last_end_at=started_at + 1 + 2 * len(tasks))
    record.update(stopped_at=started_at + 2 + 2 * len(tasks), write_requests=50, read_requests=60, completed=len(tasks))
    key = run_trace.worker_key("", worker, record["run"])
    s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(record).encode())


def test_run_report_writes_the_report_once_and_check_mode_writes_nothing(s3, bucket, tmp_path):
    """The report of a traced run: its files locally and in the bucket, the cost from the shipped table and the given
    prices, check mode and a second run writing nothing, and ``since`` leaving out the runs before it."""
    _trace_run(s3, bucket, "w-old", 1_700_000_000.0, ["in9.dat"])
    _trace_run(s3, bucket, "w1", 1_800_000_000.0, NAMES[:2])
    _trace_run(s3, bucket, "w2", 1_800_000_003.0, NAMES[2:])
    dest = tmp_path / "report"
    args = {"bucket": bucket, "dest": str(dest), "since": 1_800_000_000.0, "prices": {"date": "2027-01-01"}}
    planned = ok("run_report", check=True, **args)
    assert planned["changed"] and not dest.exists() and list_keys(s3, bucket, "report/") == []
    first = ok("run_report", **args)
    files = ["report.html", "timeline.png", "trace.tsv"]
    assert first["changed"] and sorted(path.name for path in dest.iterdir()) == files
    assert list_keys(s3, bucket, "report/") == [f"report/{name}" for name in files]
    lines = (dest / "trace.tsv").read_text().splitlines()
    assert len(lines) == 1 + len(NAMES) and all("in9.dat" not in line for line in lines)  # the old run left out
    said = first["report"]
    assert said["summary"]["tasks"] == len(NAMES) and said["summary"]["outcomes"] == {"done": len(NAMES)}
    hourly = 0.100  # c4.large on demand in us-east-1, from the shipped table
    machine_seconds = (2 + 2 * 2) + (2 + 2 * 1)
    expected = machine_seconds / 3600 * hourly + 100 * 0.005 / 1000 + 120 * 0.0004 / 1000
    assert abs(said["cost"]["usd"] - expected) < 1e-12 and said["cost"]["prices_date"] == "2027-01-01"
    again = ok("run_report", **args)
    assert not again["changed"] and again["files"] == []
    assert not ok("run_report", check=True, **args)["changed"]


def test_the_job_module_queues_stale_tasks_again_only_when_asked(s3, queue_bucket, make_worker, inline_runner):
    """After a run, a changed input's task is queued again by the job module only with recompute_stale (check
    mode says so and writes nothing); asked twice, it is queued once."""
    assert make_worker(inline_runner).run() == 0 and sorted(inline_runner.runs) == NAMES
    s3.put_object(Bucket=queue_bucket, Key="in1.dat", Body=b"changed")
    job = xor_job(queue_bucket).as_dict()
    assert ok("job", job=job)["tasks_recomputed"] == []
    snapshot = _snapshot(s3, queue_bucket)
    expected = [{"task": "in1.dat", "why": "input in1.dat changed since"}]
    predicted = ok("job", check=True, job=job, recompute_stale=True)
    assert predicted["changed"] and predicted["tasks_recomputed"] == expected
    assert _snapshot(s3, queue_bucket) == snapshot
    done = ok("job", job=job, recompute_stale=True)
    assert done["changed"] and done["tasks_recomputed"] == expected
    assert read_body(s3, queue_bucket, tq.TASKLIST) == b"in1.dat\n"
    assert list_keys(s3, queue_bucket, "superseded/in1.dat/") and list_keys(s3, queue_bucket, "manifests/in1.dat") == []
    again = ok("job", job=job, recompute_stale=True)
    assert not again["changed"] and again["tasks_recomputed"] == []


def test_instance_prices_info_reads_the_spot_history_and_says_what_aws_would_not_price(emulator):
    """On the emulator: the spot price history of the region's zones is read and averaged (moto prices every zone
    alike); the Price List API, which the emulator does not serve, leaves the on-demand price to the table, said
    in a warning and in unpriced."""
    found = ok("instance_prices_info", region="us-east-1", instance_types=["c4.large"], since=1.8e9, until=1.8e9 + 600)
    prices = found["prices"]
    assert prices["instances"]["us-east-1"]["c4.large"] == {"spot": pytest.approx(0.00001)}
    assert found["unpriced"] == ["c4.large (on-demand)"] and "on-demand" in " ".join(found["warnings"])
    assert "us-east-1a" in prices["source"] and prices["date"].endswith("Z")
    assert (
        ok("instance_prices_info", region="us-east-1", instance_types=["c4.large"], spot=False)["prices"]["instances"]
        == {}
    )


def test_task_info_recomputes_the_clinics_outputs_and_names_the_wrong_one(s3, queue_bucket, make_worker, inline_runner):
    """check_xor recomputes every completed output as input XOR kernel, apart from the container that made it: one
    overwritten since is named (and, its ETag changed, also as changed since published); without a job file the
    module says which file it needs."""
    args = {"bucket": queue_bucket, "check_xor": True}
    assert "job file s3://%s/job.json" % queue_bucket in run_module("task_info", **args)["msg"]
    assert make_worker(inline_runner).run() == 0
    ok("job", job=xor_job(queue_bucket).as_dict())
    assert ok("task_info", **args)["outputs"]["wrong"] == []
    s3.put_object(Bucket=queue_bucket, Key="out1.dat", Body=b"not the XOR")
    wrong = ok("task_info", **args)["outputs"]["wrong"]
    assert len(wrong) == 2 and wrong[-1] == "in1.dat: output out1.dat differs from input XOR kernel"
