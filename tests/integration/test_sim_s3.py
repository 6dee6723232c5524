"""The simulator's in-memory S3 (bench/sim_s3.py) answers as the moto emulator does: the same sequence of
requests, every conditional-write case the task queue relies on, listing pagination and the clock fields,
run against both, and each answer reduced to what the protocol reads of it."""

from __future__ import annotations

import datetime
import hashlib
import sys
from concurrent.futures import ThreadPoolExecutor
from email.utils import parsedate_to_datetime

import pytest
from botocore.exceptions import ClientError

from conftest import ROOT, _load_by_path

sys.path.insert(0, str(ROOT / "bench"))  # sim_s3 imports the benchmarks' common module
sim_s3 = _load_by_path("cicc_bench_sim_s3", ROOT / "bench" / "sim_s3.py")

LISTED_KEYS = 1001  # one more than S3's page


def answer(call) -> dict:
    """What the protocol reads of an answer: the error's code, status and class, or the fields it uses."""
    try:
        response = call()
    except ClientError as error:
        return {
            "error": error.response["Error"]["Code"],
            "status": error.response["ResponseMetadata"]["HTTPStatusCode"],
            "condition": error.response["Error"].get("Condition"),
            "no_such_key": type(error).__name__ == "NoSuchKey",
        }
    seen = {"status": response["ResponseMetadata"]["HTTPStatusCode"]}
    for field in ("ETag", "ContentLength", "ContentRange", "IsTruncated", "KeyCount", "Prefix", "StartAfter"):
        if field in response:
            seen[field] = response[field]
    if "Body" in response:
        seen["body"] = response["Body"].read()
    if "Contents" in response:
        seen["keys"] = [item["Key"] for item in response["Contents"]]
        seen["sizes"] = [item["Size"] for item in response["Contents"]]
        seen["etags"] = [item["ETag"] for item in response["Contents"]]
    if "CommonPrefixes" in response:
        seen["common"] = [item["Prefix"] for item in response["CommonPrefixes"]]
    seen["has_next_token"] = "NextContinuationToken" in response
    if "LastModified" in response:
        # The lease clock: LastModified against the answer's Date, both to the second.
        date = parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
        age = (date - response["LastModified"]).total_seconds()
        seen["lease_clock"] = isinstance(response["LastModified"], datetime.datetime) and 0 <= age < 5
    return seen


NEW_ETAG = f'"{hashlib.md5(b"new").hexdigest()}"'


def conditional_writes(client, bucket: str) -> list:
    put = client.put_object
    first = put(Bucket=bucket, Key="locks/a", Body=b"one")["ETag"]
    steps = [
        lambda: put(Bucket=bucket, Key="locks/a", Body=b"two", IfNoneMatch="*"),
        lambda: put(Bucket=bucket, Key="locks/a", Body=b"two", IfMatch='"0123456789abcdef0123456789abcdef"'),
        lambda: put(Bucket=bucket, Key="locks/missing", Body=b"two", IfMatch=first),
        lambda: put(Bucket=bucket, Key="locks/a", Body=b"two", IfMatch=first),
        lambda: put(Bucket=bucket, Key="locks/b", Body=b"new", IfNoneMatch="*"),
        lambda: client.get_object(Bucket=bucket, Key="locks/a"),
        lambda: client.get_object(Bucket=bucket, Key="locks/a", IfNoneMatch=first),  # changed since: the body
        lambda: client.head_object(Bucket=bucket, Key="locks/a"),
        lambda: client.head_object(Bucket=bucket, Key="locks/missing"),
        lambda: client.get_object(Bucket=bucket, Key="locks/missing"),
        lambda: client.delete_object(Bucket=bucket, Key="locks/a", IfMatch=first),
        lambda: client.delete_object(Bucket=bucket, Key="locks/missing", IfMatch=first),
        lambda: client.delete_object(Bucket=bucket, Key="locks/missing"),
        lambda: client.delete_object(Bucket=bucket, Key="locks/b", IfMatch='"2e7d2c03a9507ae265ecf5b5356885a5"'),
        lambda: client.get_object(Bucket=bucket, Key="locks/b"),
        lambda: client.get_object(Bucket=bucket, Key="locks/b", IfNoneMatch=NEW_ETAG),  # 304, no body
        lambda: client.get_object(Bucket=bucket, Key="locks/b", Range="bytes=1-100"),  # to the end at most
        lambda: client.get_object(Bucket=bucket, Key="locks/b", Range="bytes=3-5"),  # from the end on: 416
        lambda: client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "locks/b"}], "Quiet": True}),
        lambda: client.head_object(Bucket=bucket, Key="locks/b"),
    ]
    return [answer(step) for step in steps]


def listings(client, bucket: str) -> list:
    names = [f"in{i:04d}.dat" for i in range(LISTED_KEYS)] + ["journal/completed/x", "journal/failed/y", "tasklist.txt"]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda name: client.put_object(Bucket=bucket, Key=name, Body=name.encode()), names))
    first = client.list_objects_v2(Bucket=bucket, Prefix="in")
    pages = list(client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=""))
    steps = [
        lambda: first,
        lambda: client.list_objects_v2(Bucket=bucket, Prefix="in", ContinuationToken=first["NextContinuationToken"]),
        lambda: client.list_objects_v2(Bucket=bucket, Prefix="in", StartAfter="in0995.dat"),
        lambda: client.list_objects_v2(Bucket=bucket, Prefix="journal/"),
        lambda: client.list_objects_v2(Bucket=bucket, Prefix="journal/", MaxKeys=1),
        lambda: client.list_objects_v2(Bucket=bucket, Prefix="nothing/"),
        lambda: client.list_objects_v2(Bucket=bucket, Prefix="", Delimiter="/", StartAfter="in1000.dat"),
    ]
    return [answer(step) for step in steps] + [[len(page.get("Contents", [])) for page in pages]]


@pytest.fixture
def in_memory():
    client = sim_s3.SimS3().client()
    client.create_bucket(Bucket="sim-bucket")
    return client, "sim-bucket"


@pytest.mark.parametrize("sequence", [conditional_writes, listings])
def test_in_memory_s3_answers_as_moto(s3, bucket, in_memory, sequence):
    expected = sequence(s3, bucket)
    got = sequence(*in_memory)
    for step, (theirs, ours) in enumerate(zip(expected, got)):
        assert ours == theirs, f"step {step} of {sequence.__name__}"
    assert len(got) == len(expected)


def test_meter_counts_refusals_and_rates(in_memory):
    client, bucket = in_memory
    meter = sim_s3.SimMeter()
    client.meter = meter
    client.put_object(Bucket=bucket, Key="locks/a", Body=b"x", IfNoneMatch="*")
    with pytest.raises(ClientError):
        client.put_object(Bucket=bucket, Key="locks/a", Body=b"x", IfNoneMatch="*")
    client.get_object(Bucket=bucket, Key="locks/a")
    assert meter.total == 3
    assert meter.refused[("PutObject", "lock")] == 1
    assert meter.key_writes.result()[:2] == (2, "locks/a")
    assert meter.prefix_requests.result()[:2] == (3, "locks/")
