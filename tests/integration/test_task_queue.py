"""The claim protocol on both S3 emulators (moto, LocalStack): rules, bad input, fault-matrix rows 1, 3, 4, 5, 7, 8, and
the answers it relies on from S3."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import boto3
import pytest
from botocore.exceptions import ClientError

from ansible_collections.cicc.cloud.plugins.module_utils import task_queue as tq
from ansible_collections.cicc.cloud.tests.helpers import list_keys, read_body

# On moto's S3 and on LocalStack's: where they differ, the test says which AWS does.
pytestmark = pytest.mark.both_s3


@pytest.fixture
def queue(bucket) -> tq.Queue:
    return tq.Queue(bucket, lease_seconds=30, max_attempts=2)


def _publish(s3, queue: tq.Queue, lease: tq.Lease, body: bytes, tmp_path, key: str = "") -> bool:
    """Publish one output of ``lease`` (out<N>.dat by default), then its manifest; True if the manifest is new."""
    key = key or queue.key("out" + lease.name[2:])
    path = tmp_path / f"{lease.name}.out"
    path.write_bytes(body)
    entry = tq.publish_file(s3, queue, lease, key, path)
    return tq.publish_manifest(s3, queue, lease, {"files": [entry]})


def _seed(s3, queue: tq.Queue, names: list[str], tasklist: bytes | None = None) -> None:
    for name in names:
        s3.put_object(Bucket=queue.bucket, Key=queue.key(name), Body=name.encode())
    s3.put_object(Bucket=queue.bucket, Key=queue.key(tq.TASKLIST), Body=tasklist or tq._lines(names))


# --- claim, lease, complete -----------------------------------------------------------------------


def test_claim_complete_and_compact_keep_lists_exact(s3, queue, tmp_path):
    _seed(s3, queue, ["in1.dat", "in2.dat"])
    lease = tq.claim(s3, queue, "in1.dat", "w1")
    assert json.loads(read_body(s3, queue.bucket, queue.lock_key("in1.dat")))["owner"] == "w1"
    with pytest.raises(tq.QueueError, match="no manifest"):
        tq.complete(s3, queue, lease)
    assert _publish(s3, queue, lease, b"result", tmp_path) is True
    assert tq.read_manifest(s3, queue, "in1.dat")["files"][0]["key"] == "out1.dat"
    tq.complete(s3, queue, lease)
    tq.complete(s3, queue, lease)  # idempotent
    assert read_body(s3, queue.bucket, queue.lock_key("in1.dat")) == tq.MARKS["completed"]  # the lock is its mark
    assert tq.queue_status(s3, queue)["completed_tasks"] == ["in1.dat"]  # counted before it is folded
    moved = tq.compact(s3, queue)
    assert moved["completed"] == 1
    assert read_body(s3, queue.bucket, "tasklist.txt") == b"in2.dat\n"
    assert read_body(s3, queue.bucket, "completed.txt") == b"in1.dat\n"
    assert list_keys(s3, queue.bucket, "locks/") == [] and list_keys(s3, queue.bucket, tq.COMPACTION) == []
    assert list_keys(s3, queue.bucket, tq.FOLDED) == []  # merged: completed.txt held less
    status = tq.queue_status(s3, queue)
    assert (status["pending"], status["completed"], status["claimed"]) == (1, 1, 0)


def test_live_lease_conflicts_and_output_is_never_overwritten(s3, queue, tmp_path):
    _seed(s3, queue, ["in1.dat"])
    lease = tq.claim(s3, queue, "in1.dat", "w1")
    for take_over in (False, True):
        with pytest.raises(tq.ClaimConflict):
            tq.claim(s3, queue, "in1.dat", "w2", take_over=take_over)
    s3.put_object(Bucket=queue.bucket, Key="out1.dat", Body=b"first")
    with pytest.raises(tq.OutputConflict, match="exists with other content"):
        _publish(s3, queue, lease, b"second", tmp_path)
    assert read_body(s3, queue.bucket, "out1.dat") == b"first"
    assert tq.read_manifest(s3, queue, "in1.dat") is None
    # The same bytes are taken as published (an attempt that died before its manifest), once.
    assert _publish(s3, queue, lease, b"first", tmp_path) is True
    assert _publish(s3, queue, lease, b"first", tmp_path) is False


def test_row1_many_workers_claim_the_same_task_at_once(s3_endpoint, s3, queue):
    _seed(s3, queue, ["in1.dat"])
    barrier, winners, losers = threading.Barrier(12), [], []

    def contend(owner: str) -> None:
        client = boto3.session.Session().client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        barrier.wait()
        try:
            winners.append(tq.claim(client, queue, "in1.dat", owner))
        except tq.ClaimConflict:
            losers.append(owner)

    threads = [threading.Thread(target=contend, args=(f"w{i}",)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1 and len(losers) == 11
    assert json.loads(read_body(s3, queue.bucket, queue.lock_key("in1.dat")))["owner"] == winners[0].owner


def test_row3_output_uploaded_then_worker_died(s3, bucket, tmp_path):
    queue = tq.Queue(bucket, lease_seconds=1)
    _seed(s3, queue, ["in1.dat"])
    dead = tq.claim(s3, queue, "in1.dat", "dead")
    assert _publish(s3, queue, dead, b"result", tmp_path)
    time.sleep(2.2)  # the dead worker's lease runs out by S3's clock
    with pytest.raises(tq.TaskFinished) as finished:
        tq.claim(s3, queue, "in1.dat", "next")
    assert finished.value.state == "completed"
    assert read_body(s3, queue.bucket, queue.lock_key("in1.dat")) == tq.MARKS["completed"]
    tq.compact(s3, queue)
    tq.compact(s3, queue, force=True)
    assert read_body(s3, queue.bucket, "completed.txt") == b"in1.dat\n"  # once
    assert read_body(s3, queue.bucket, "out1.dat") == b"result"  # not recomputed


def test_a_lock_left_on_a_finished_task_goes_at_the_forced_compaction(s3, queue, tmp_path):
    """A worker stopped between publishing its manifest and marking its task (killed, or S3 went away): no
    claim need look at that task again, so once its lease has run out the forced compaction (a worker's
    last, a person's) marks and folds it; a compaction in passing leaves it, and the lock of a task in
    progress is never touched."""
    _seed(s3, queue, ["in1.dat", "in2.dat"])
    stopped = tq.claim(s3, dataclasses.replace(queue, lease_seconds=1), "in1.dat", "stopped")
    assert _publish(s3, queue, stopped, b"result", tmp_path)  # then it stopped
    working = tq.claim(s3, queue, "in2.dat", "working")
    time.sleep(2.2)  # the stopped worker's lease runs out by S3's clock
    assert tq.compact(s3, queue)["locks"] == 0 and len(list_keys(s3, queue.bucket, "locks/")) == 2
    assert tq.compact(s3, queue, force=True)["locks"] == 1
    assert list_keys(s3, queue.bucket, "locks/") == ["locks/in2.dat"]
    tq.renew(s3, queue, working)  # still its holder's
    assert read_body(s3, queue.bucket, "completed.txt") == b"in1.dat\n"


@pytest.mark.parametrize("skew", [-600, 600])
def test_row5_worker_clock_off_by_ten_minutes(s3, bucket, monkeypatch, skew):
    """Leases are timed by S3's clock: a worker whose clock is 10 minutes off takes no live lease over
    and is not kept from an expired one."""
    # S3's times are to the second: 4 s leave a loaded machine 2 s to get from the claim to the conflict.
    queue = tq.Queue(bucket, lease_seconds=4)
    _seed(s3, queue, ["in1.dat"])
    holder = tq.claim(s3, queue, "in1.dat", "holder")
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + skew)
    with pytest.raises(tq.ClaimConflict):
        tq.claim(s3, queue, "in1.dat", "skewed")
    tq.renew(s3, queue, holder)
    time.sleep(4.5)  # the holder stops renewing; its lease runs out by S3's clock
    taken = tq.claim(s3, queue, "in1.dat", "skewed")
    assert (taken.owner, taken.attempts) == ("skewed", 2)


def test_row4_paused_worker_loses_its_lease_and_cannot_write(s3, bucket, tmp_path, s3_implementation):
    queue = tq.Queue(bucket, lease_seconds=1)
    _seed(s3, queue, ["in1.dat"])
    paused = tq.claim(s3, queue, "in1.dat", "paused")
    time.sleep(2.2)
    new = tq.claim(s3, queue, "in1.dat", "new")
    assert new.attempts == 2
    with pytest.raises(tq.LeaseLost):
        tq.renew(s3, queue, paused)
    paused.renewed_at -= 10  # resumed after a long pause: it must check before publishing
    with pytest.raises(tq.LeaseLost):
        _publish(s3, queue, paused, b"late", tmp_path)
    assert "out1.dat" not in list_keys(s3, queue.bucket)
    # Nor can it mark it finished or give it back counting the attempt: those writes name its old ETag.
    tq.complete(s3, queue, paused, published=True)
    with pytest.raises(tq.LeaseLost):
        tq.release(s3, queue, paused, "late failure")
    assert json.loads(read_body(s3, queue.bucket, queue.lock_key("in1.dat")))["owner"] == "new"
    if s3_implementation.deletes_if_match:
        # AWS (and moto) refuse a delete whose If-Match is stale: 412 PreconditionFailed.
        assert tq._delete_lock(s3, queue, paused) is False
        assert json.loads(read_body(s3, queue.bucket, queue.lock_key("in1.dat")))["owner"] == "new"
    else:
        # LocalStack ignores If-Match on DeleteObject: a first attempt given back after its lease was lost
        # (the one delete of a lock) removes the new owner's lock there.
        assert tq._delete_lock(s3, queue, paused) is True
        assert list_keys(s3, queue.bucket, "locks/") == []


def test_row8_reply_lost_after_claim_finds_own_lock(s3, queue):
    _seed(s3, queue, ["in1.dat"])
    first = tq.claim(s3, queue, "in1.dat", "w1")  # its reply "lost": the caller retries with its token
    again = tq.claim(s3, queue, "in1.dat", "w1", token=first.token)
    assert again.token == first.token and again.attempts == 1
    tq.renew(s3, queue, again)
    with pytest.raises(tq.ClaimConflict):
        tq.claim(s3, queue, "in1.dat", "w1")  # a different claim of the same owner is someone else


def test_a_renewal_whose_reply_was_lost_keeps_the_lease(s3, queue):
    """A renewal that S3 made but whose reply never came (a dropped connection) left the lease with an ETag
    its holder does not know: the next renewal finds the lock still its own and goes on; a lock another
    claim wrote, or a given-back one, is lost."""
    _seed(s3, queue, ["in1.dat", "in2.dat"])
    held = tq.claim(s3, queue, "in1.dat", "w1")
    known = held.etag
    tq.renew(s3, queue, held)  # "lost": the holder still knows the ETag before it
    held.etag = known
    tq.renew(s3, queue, held)
    assert held.etag == s3.head_object(Bucket=queue.bucket, Key=queue.lock_key("in1.dat"))["ETag"]
    other = tq.claim(s3, queue, "in2.dat", "w1")
    stale = dataclasses.replace(other, token="someone-else", guard=threading.Lock())
    tq.renew(s3, queue, other)
    with pytest.raises(tq.LeaseLost):
        tq.renew(s3, queue, stale)  # its ETag is out of date and the lock names another claim
    heartbeat = dataclasses.replace(held, guard=threading.Lock())
    assert tq.release(s3, queue, held, "exit code 1") == "pending"
    with pytest.raises(tq.LeaseLost):
        tq.renew(s3, queue, heartbeat)  # a renewal late after the give-back does not take the task back


def test_release_counts_attempts_until_failed_record(s3, queue):
    _seed(s3, queue, ["in1.dat", "in2.dat"])
    lease = tq.claim(s3, queue, "in1.dat", "w1")
    assert tq.release(s3, queue, lease, "exit code 9") == "pending"
    retry = tq.claim(s3, queue, "in1.dat", "w2")  # released leases are free at once
    assert retry.attempts == 2 and retry.last_error == "exit code 9"
    assert tq.release(s3, queue, retry, "exit code 9 again") == "failed"
    record = json.loads(read_body(s3, queue.bucket, queue.failed_key("in1.dat")))
    assert record["attempts"] == 2 and "exit code 9 again" in record["reason"]
    with pytest.raises(tq.TaskFinished) as finished:
        tq.claim(s3, queue, "in1.dat", "w3")
    assert finished.value.state == "failed"
    tq.compact(s3, queue)
    assert read_body(s3, queue.bucket, "failed.txt") == b"in1.dat\n"
    assert read_body(s3, queue.bucket, "tasklist.txt") == b"in2.dat\n"
    assert list_keys(s3, queue.bucket, "locks/") == []


def test_release_without_error_does_not_count(s3, queue):
    _seed(s3, queue, ["in1.dat"])
    lease = tq.claim(s3, queue, "in1.dat", "w1")
    assert tq.release(s3, queue, lease) == "pending"
    assert list_keys(s3, queue.bucket, "locks/") == []
    assert tq.claim(s3, queue, "in1.dat", "w2").attempts == 1


def test_expired_leases_exhaust_attempts(s3, bucket):
    queue = tq.Queue(bucket, lease_seconds=1, max_attempts=1)
    _seed(s3, queue, ["in1.dat"])
    tq.claim(s3, queue, "in1.dat", "crashed")
    time.sleep(2.2)
    with pytest.raises(tq.TaskFinished):
        tq.claim(s3, queue, "in1.dat", "next")
    assert "expired" in json.loads(read_body(s3, queue.bucket, queue.failed_key("in1.dat")))["reason"]


def test_bad_names_are_recorded_not_lost(s3, queue):
    raw = b"\xef\xbb\xbf# batch 1\r\nin1.dat\r\n../../etc/passwd\r\nin1.dat\r\n\xff\r\n"
    _seed(s3, queue, ["in1.dat"], tasklist=raw)
    with pytest.raises(tq.BadTaskName):
        tq.claim(s3, queue, "../../etc/passwd", "w1")
    tq.compact(s3, queue, force=True)
    rejected = read_body(s3, queue.bucket, "rejected.txt").decode()
    assert "../../etc/passwd\tcontains a path separator" in rejected and "not UTF-8" in rejected
    assert read_body(s3, queue.bucket, "tasklist.txt") == b"# batch 1\nin1.dat\n"
    tq.compact(s3, queue, force=True)
    assert read_body(s3, queue.bucket, "rejected.txt").decode() == rejected  # recorded once
    assert [key for key in list_keys(s3, queue.bucket) if ".." in key] == []


def test_row7_concurrent_compactions_and_edits_lose_nothing(s3_endpoint, s3, queue):
    names = [f"in{i}.dat" for i in range(60)]
    _seed(s3, queue, names)
    for name in names:
        s3.put_object(Bucket=queue.bucket, Key=queue.lock_key(name), Body=tq.MARKS["completed"])
    added = [f"new{i}.dat" for i in range(5)]

    def compact_now() -> None:
        client = boto3.session.Session().client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        tq.compact(client, queue)

    def append_task(name: str) -> None:  # a person adding work while compactions run
        client = boto3.session.Session().client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        for attempt in range(50):
            found = tq._get(client, queue.bucket, queue.key(tq.TASKLIST))
            try:
                body = found[0] + f"{name}\n".encode()
                client.put_object(Bucket=queue.bucket, Key="tasklist.txt", Body=body, IfMatch=found[1])
                return
            except client.exceptions.ClientError:
                tq._backoff(attempt)

    threads = [threading.Thread(target=compact_now) for _index in range(6)]
    threads += [threading.Thread(target=append_task, args=(name,)) for name in added]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    tq.compact(s3, queue, force=True)
    completed = read_body(s3, queue.bucket, "completed.txt").decode().splitlines()
    assert sorted(completed) == sorted(names)  # each exactly once
    assert sorted(read_body(s3, queue.bucket, "tasklist.txt").decode().splitlines()) == sorted(added)
    assert list_keys(s3, queue.bucket, "locks/") == []


def test_status_shows_owners_and_lease_ages(s3, queue):
    _seed(s3, queue, ["in1.dat", "in2.dat"])
    tq.claim(s3, queue, "in1.dat", "w1", instance_id="i-123")
    status = tq.queue_status(s3, queue)
    assert status["pending"] == 2 and status["claimed"] == 1 and not status["drained"]
    claim = status["claims"][0]
    assert (claim["task"], claim["owner"], claim["instance_id"], claim["expired"]) == ("in1.dat", "w1", "i-123", False)
    assert 0 <= claim["lease_age_seconds"] < 30


def test_a_listing_tells_finished_marks_and_when_leases_run_out(s3, queue, tmp_path):
    """Without reading a lock: its size says whether it is a finished mark or a lease and how long the lease
    is; its LastModified against the listing's Date, how old. A lease given back has run out at once."""
    _seed(s3, queue, ["in1.dat", "in2.dat", "in3.dat"])
    held = tq.claim(s3, queue, "in1.dat", "w1")
    given_back = tq.claim(s3, queue, "in2.dat", "w2")
    assert tq.release(s3, queue, given_back, "exit code 1") == "pending"
    done = tq.claim(s3, queue, "in3.dat", "w3")
    assert _publish(s3, queue, done, b"result", tmp_path)
    tq.complete(s3, queue, done)
    locks = tq.list_locks(s3, queue)
    assert {name: (entry.state, entry.lease_seconds) for name, entry in locks.items()} == {
        "in1.dat": ("held", queue.lease_seconds),
        "in2.dat": ("held", 0),
        "in3.dat": ("completed", None),
    }
    assert [name for name, entry in locks.items() if entry.expired] == ["in2.dat"]
    assert 0 <= locks["in1.dat"].age < queue.lease_seconds
    assert tq.finished_marks(locks) == {"completed": {"in3.dat"}, "failed": set()}
    tq.renew(s3, queue, held)


def test_folded_segments_are_merged_into_the_list_when_they_hold_as_much(s3, queue, tmp_path):
    """A compaction appends what it folds to a segment of its own; the segments are merged into completed.txt
    (without duplicates) once they hold as many bytes as it, or by a forced compaction. Meanwhile the queue's
    state counts them, and adding a folded task again adds nothing."""
    earlier = [f"done{i:02d}.dat" for i in range(10)]
    _seed(s3, queue, ["in1.dat", "in2.dat"])
    s3.put_object(Bucket=queue.bucket, Key=tq.COMPLETED, Body=tq._lines(earlier))
    for name in ("in1.dat", "done03.dat"):  # done03.dat marked again (a snapshot from before it was folded)
        s3.put_object(Bucket=queue.bucket, Key=queue.lock_key(name), Body=tq.MARKS["completed"])
    assert tq.compact(s3, queue)["completed"] == 2
    assert len(list_keys(s3, queue.bucket, tq.FOLDED)) == 1 and read_body(s3, queue.bucket, tq.COMPLETED) == tq._lines(
        earlier
    )
    status = tq.queue_status(s3, queue)
    assert status["completed"] == 11 and status["pending_tasks"] == ["in2.dat"] and status["unfolded"] == 0
    assert tq.add_tasks(s3, queue, ["in1.dat", "in3.dat"]) == ["in3.dat"]
    assert tq.recorded_completed(s3, queue, "in1.dat") and not tq.recorded_completed(s3, queue, "in2.dat")
    tq.compact(s3, queue, force=True)
    assert read_body(s3, queue.bucket, tq.COMPLETED) == tq._lines(earlier + ["in1.dat"])
    assert list_keys(s3, queue.bucket, tq.FOLDED) == [] and list_keys(s3, queue.bucket, "locks/") == []


def test_one_compaction_at_a_time(s3, queue, tmp_path):
    """While another compaction holds its turn, a compaction in passing is skipped and a forced one waits
    for the turn to end, then folds what is left; a turn whose compaction stopped runs out."""
    _seed(s3, queue, ["in1.dat"])
    lease = tq.claim(s3, queue, "in1.dat", "w1")
    assert _publish(s3, queue, lease, b"result", tmp_path)
    tq.complete(s3, queue, lease)
    other = s3.put_object(Bucket=queue.bucket, Key=tq.COMPACTION, Body=b"{}", IfNoneMatch="*")["ETag"]
    assert tq.compact(s3, queue)["busy"] and read_body(s3, queue.bucket, "tasklist.txt") == b"in1.dat\n"
    ended = threading.Timer(1.5, lambda: s3.delete_object(Bucket=queue.bucket, Key=tq.COMPACTION, IfMatch=other))
    ended.start()
    started = time.monotonic()
    moved = tq.compact(s3, queue, force=True)
    ended.join()
    assert moved["completed"] == 1 and time.monotonic() - started >= 1.4
    assert read_body(s3, queue.bucket, "completed.txt") == b"in1.dat\n" and list_keys(s3, queue.bucket, "locks/") == []
    assert list_keys(s3, queue.bucket, tq.COMPACTION) == []


def test_outputs_made_from_another_input_shared_file_or_image_are_reported_stale(s3, queue, tmp_path):
    """check_outputs says which outputs were made from what is no longer the job's: an input changed since, a
    shared file changed since, an image other than the newest manifest's; the outputs themselves are left as
    they are, and outputs with no manifest are named apart."""
    _seed(s3, queue, ["in1.dat", "in2.dat", "in3.dat"])
    s3.put_object(Bucket=queue.bucket, Key="kernel.dat", Body=b"k1")
    shared = [{"key": "kernel.dat", "etag": s3.head_object(Bucket=queue.bucket, Key="kernel.dat")["ETag"]}]
    for number, name in enumerate(["in1.dat", "in2.dat"]):
        lease = tq.claim(s3, queue, name, "w1")
        out = tmp_path / name
        out.write_bytes(b"made")
        entry = tq.publish_file(s3, queue, lease, queue.key("out" + name[2:]), out)
        made_from = {"key": name, "etag": s3.head_object(Bucket=queue.bucket, Key=name)["ETag"]}
        image = {"name": "proc", "id": f"sha256:{number}"}  # in2.dat by a newer image
        manifest = {"files": [entry], "input": made_from, "shared": shared, "image": image, "published_at": number}
        assert tq.publish_manifest(s3, queue, lease, manifest)
        tq.complete(s3, queue, lease, published=True)
    assert tq.check_outputs(s3, queue, ["in1.dat", "in2.dat", "in3.dat"])["stale"] == [
        {"task": "in1.dat", "why": "made by image sha256:0, the job now runs sha256:1"}
    ]
    s3.put_object(Bucket=queue.bucket, Key="in2.dat", Body=b"another input")
    s3.put_object(Bucket=queue.bucket, Key="kernel.dat", Body=b"k2")
    checked = tq.check_outputs(s3, queue, ["in1.dat", "in2.dat", "in3.dat"])
    assert checked["checked"] == 2 and checked["without_manifest"] == ["in3.dat"] and checked["wrong"] == []
    assert checked["stale"] == [
        {
            "task": "in1.dat",
            "why": "shared file kernel.dat changed since; made by image sha256:0, the job now runs sha256:1",
        },
        {"task": "in2.dat", "why": "input in2.dat changed since; shared file kernel.dat changed since"},
    ]
    assert read_body(s3, queue.bucket, "out1.dat") == b"made"  # reported, not recomputed


# --- a large tasklist, seen a window at a time ----------------------------------------------------


def test_stretches_of_a_tasklist_cover_every_line_once(s3, queue, monkeypatch):
    """Read by Range requests from anywhere, stretches of the tasklist go round it line by line: each name
    once, none cut, a line longer than a window skipped (the compaction records it rejected)."""
    monkeypatch.setattr(tq, "WINDOW_BYTES", 100)
    names = [f"in{i}{'x' * (i % 7)}.dat" for i in range(80)]
    text = tq._lines(names[:40] + ["#" + "long" * 60] + names[40:])
    s3.put_object(Bucket=queue.bucket, Key=tq.TASKLIST, Body=text)
    for start in (0, 1, 57, len(text) // 2, len(text) - 3):
        seen, position, covered = [], start, 0
        while covered < len(text):
            stretch, size, following = tq._read_stretch(s3, queue, position)
            assert size == len(text) and stretch.endswith(b"\n") or not stretch
            seen += tq.parse_tasklist(stretch).names
            covered += following - position
            position = following if following < size else 0
        # A start inside a line cuts it off the first stretch; going round reads it whole at the end (and may
        # read the first names again).
        assert set(seen) == set(names) and (start > 0 or sorted(seen) == sorted(names))


def _next_patiently(picker: tq.TaskPicker) -> tq.Lease | None:
    """The worker's way with a passing S3 error: look again (moto can answer a read that races a rewrite of
    the object with a short body)."""
    for _attempt in range(5):
        try:
            return picker.next()
        except Exception as error:  # noqa: BLE001
            if not tq.transient(error):
                raise
    return picker.next()


def test_workers_drain_a_large_tasklist_window_by_window(s3_endpoint, s3, queue, monkeypatch, tmp_path):
    """With windows of a few names, four workers claim every task of a longer list exactly once, folding
    as they go; once round the list with nothing free they fold what is finished and look again."""
    monkeypatch.setattr(tq, "WINDOW_BYTES", 96)
    names = [f"in{i:03d}.dat" for i in range(60)]
    _seed(s3, queue, names)
    claims: list[str] = []

    errors: list[BaseException] = []

    def work(owner: str) -> None:
        client = boto3.session.Session().client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
        picker = tq.TaskPicker(client, queue, owner, poll_seconds=0.2, compact_every=4)
        try:
            while (lease := _next_patiently(picker)) is not None:
                claims.append(lease.name)
                assert _publish(client, queue, lease, lease.name.encode(), tmp_path)
                tq.complete(client, queue, lease)
                if picker.compaction_due:
                    picker.compaction_due = False
                    tq.compact(client, queue)
            tq.compact(client, queue, force=True)
        except BaseException as error:  # noqa: BLE001 - the test fails on it below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and sorted(claims) == names  # each once
    assert sorted(read_body(s3, queue.bucket, tq.COMPLETED).decode().split()) == names
    assert tq.parse_tasklist(read_body(s3, queue.bucket, tq.TASKLIST)).names == []
    assert list_keys(s3, queue.bucket, "locks/") == []


# --- what the protocol asks of S3 -----------------------------------------------------------------


def _refusal(call, **request) -> tuple[int, str]:
    """The HTTP status and error code with which S3 refused ``call(**request)``."""
    with pytest.raises(ClientError) as refused:
        call(**request)
    return refused.value.response["ResponseMetadata"]["HTTPStatusCode"], refused.value.response["Error"]["Code"]


def _listed_etags(s3, bucket: str) -> dict[str, str]:
    return {item["Key"]: item["ETag"] for item in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}


def test_conditional_writes_answer_as_on_aws(s3, bucket):
    """What claim, renew and take-over read from S3's answers, as AWS gives them (README: "Two S3
    implementations"). AWS may also answer a concurrent conditional write with 409
    ConditionalRequestConflict; neither emulator does: they serialize such writes and refuse the
    losers with 412 (test_row1_...)."""
    put = s3.put_object
    etag = put(Bucket=bucket, Key="lock", Body=b"first", IfNoneMatch="*")["ETag"]
    assert _refusal(put, Bucket=bucket, Key="lock", Body=b"second", IfNoneMatch="*") == (412, "PreconditionFailed")
    assert _refusal(put, Bucket=bucket, Key="lock", Body=b"second", IfMatch='"0"') == (412, "PreconditionFailed")
    assert _refusal(put, Bucket=bucket, Key="no-lock", Body=b"second", IfMatch=etag) == (404, "NoSuchKey")
    renewed = put(Bucket=bucket, Key="lock", Body=b"second", IfMatch=etag)["ETag"]
    # ETags come quoted, the same from PutObject as from GetObject and the listing.
    assert renewed.startswith('"') and renewed != etag
    assert renewed == s3.get_object(Bucket=bucket, Key="lock")["ETag"] == _listed_etags(s3, bucket)["lock"]
    # A lease's age is S3's Date header less LastModified, both to the second.
    assert 0 <= tq._lease_age(s3.get_object(Bucket=bucket, Key="lock")) < 5


def test_stale_conditional_delete(s3, bucket, s3_implementation):
    """A lock is let go with DeleteObject If-Match on the holder's ETag. AWS honours it on general
    purpose buckets since September 2025 (and moto does): refused with 412 when the ETag is stale,
    404 NoSuchKey when the key is gone. LocalStack ignores the condition and deletes."""
    stale = s3.put_object(Bucket=bucket, Key="lock", Body=b"paused worker")["ETag"]
    s3.put_object(Bucket=bucket, Key="lock", Body=b"new owner", IfMatch=stale)
    delete = s3.delete_object
    if s3_implementation.deletes_if_match:
        assert _refusal(delete, Bucket=bucket, Key="lock", IfMatch=stale) == (412, "PreconditionFailed")
        assert _refusal(delete, Bucket=bucket, Key="no-lock", IfMatch=stale) == (404, "NoSuchKey")
        assert read_body(s3, bucket, "lock") == b"new owner"
    else:
        assert delete(Bucket=bucket, Key="lock", IfMatch=stale)["ResponseMetadata"]["HTTPStatusCode"] == 204
        assert delete(Bucket=bucket, Key="no-lock", IfMatch=stale)["ResponseMetadata"]["HTTPStatusCode"] == 204
        assert list_keys(s3, bucket) == []
