"""playbooks/dataset.yml against the emulator: check mode, apply, idempotent re-run, no blind overwrite, removal.

The playbook runs in a real ansible-playbook process. The AWS_* variables the emulator fixture exports are
removed from that process's environment, so the emulator is reached only through the playbook's
`module_defaults: {group/cicc.cloud.aws: "{{ cicc_aws_defaults }}"}`: the test proves that this one entry
reaches both amazon.aws.s3_bucket and cicc.cloud.dataset.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from ansible_collections.cicc.cloud.plugins.module_utils.dataset import build_dataset

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = "playbooks/dataset.yml"
INPUT_SIZE = 20_000
TIMEOUT = 300
_RECAP = re.compile(r"^localhost\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.MULTILINE)


def _settings() -> dict:
    return yaml.safe_load((ROOT / "inventory" / "group_vars" / "all" / "settings.yml").read_text())


def _env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    venv_bin = str(ROOT / ".venv" / "bin")
    env.update(
        PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",
        ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
    )
    return env


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, check=False)


def _recap(result: subprocess.CompletedProcess) -> dict[str, int]:
    found = _RECAP.search(result.stdout)
    assert found, f"no PLAY RECAP in:\n{result.stdout}\n{result.stderr}"
    return dict(zip(("ok", "changed", "unreachable", "failed"), map(int, found.groups())))


def _flat(result: subprocess.CompletedProcess) -> str:
    """stdout + stderr with the YAML callback's line wrapping undone."""
    return " ".join((result.stdout + result.stderr).split())


def _keys(s3, bucket: str) -> set[str]:
    return {item["Key"] for item in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}


def _body(s3, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def _buckets(s3) -> set[str]:
    return {item["Name"] for item in s3.list_buckets()["Buckets"]}


@pytest.fixture
def work_bucket(s3):
    """A bucket name the playbook creates; emptied and deleted afterwards, whatever happened."""
    name = f"cicc-it-{uuid.uuid4().hex[:12]}"
    yield name
    if name in _buckets(s3):
        for key in _keys(s3, name):
            s3.delete_object(Bucket=name, Key=key)
        s3.delete_bucket(Bucket=name)


def test_dataset_playbook(emulator, s3, work_bucket) -> None:
    port = urlparse(emulator).port
    playbook = [
        "ansible-playbook",
        PLAYBOOK,
        "-e",
        f"cicc_emulator_port={port}",
        "-e",
        f"cicc_bucket={work_bucket}",
        "-e",
        f"cicc_dataset_input_size={INPUT_SIZE}",
    ]
    settings = _settings()
    wanted = build_dataset(
        inputs=int(settings["cicc_dataset_inputs"]),
        input_size=INPUT_SIZE,
        kernel_size=int(settings["cicc_dataset_kernel_size"]),
        done=int(settings["cicc_dataset_done"]),
        seed=int(settings["cicc_dataset_seed"]),
    )
    prefix = settings["cicc_prefix"] or ""
    wanted = {prefix + name: body for name, body in wanted.items()}

    # Check mode: the data set would be written, but nothing is created.
    result = _run(playbook + ["--check"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert _recap(result)["changed"] >= 1
    assert work_bucket not in _buckets(s3)

    # Apply: the bucket with its protections, and every object with the right bytes.
    result = _run(playbook)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _recap(result)["changed"] == 2
    assert _keys(s3, work_bucket) == set(wanted)
    for key, body in wanted.items():
        assert _body(s3, work_bucket, key) == body, key
    tags = {tag["Key"]: tag["Value"] for tag in s3.get_bucket_tagging(Bucket=work_bucket)["TagSet"]}
    assert tags == {"project": settings["cicc_project"]}
    block = s3.get_public_access_block(Bucket=work_bucket)["PublicAccessBlockConfiguration"]
    assert block == dict.fromkeys(
        ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets"), True
    )
    rules = s3.get_bucket_encryption(Bucket=work_bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    ownership = s3.get_bucket_ownership_controls(Bucket=work_bucket)["OwnershipControls"]["Rules"]
    assert ownership == [{"ObjectOwnership": "BucketOwnerEnforced"}]

    # Idempotent: the second run changes nothing.
    result = _run(playbook)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _recap(result) == {"ok": 3, "changed": 0, "unreachable": 0, "failed": 0}

    # Once workers have moved a task, the lists are the queue's state: a re-run leaves them and fails on nothing.
    tasklist, completed = prefix + "tasklist.txt", prefix + "completed.txt"
    moved = _body(s3, work_bucket, tasklist).decode().split()[0]
    queue_state = {
        tasklist: "".join(f"{name}\n" for name in _body(s3, work_bucket, tasklist).decode().split()[1:]).encode(),
        completed: _body(s3, work_bucket, completed) + f"{moved}\n".encode(),
    }
    for key, body in queue_state.items():
        s3.put_object(Bucket=work_bucket, Key=key, Body=body)
    result = _run(playbook)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _recap(result) == {"ok": 3, "changed": 0, "unreachable": 0, "failed": 0}
    for key, body in queue_state.items():
        assert _body(s3, work_bucket, key) == body, key

    # An object changed by hand (same size, other bytes) is never overwritten blindly.
    altered_key = prefix + "in5.dat"
    altered = bytes(INPUT_SIZE)
    s3.put_object(Bucket=work_bucket, Key=altered_key, Body=altered)
    result = _run(playbook)
    assert result.returncode != 0
    assert _recap(result)["failed"] == 1
    message = _flat(result)
    assert f"with other content: {altered_key}." in message
    assert "set overwrite=true" in message and "use another prefix" in message
    assert _body(s3, work_bucket, altered_key) == altered
    assert _keys(s3, work_bucket) == set(wanted)

    # state=absent removes exactly the data set: a key the pipeline wrote later stays.
    extra_key = prefix + "out5.dat"
    s3.put_object(Bucket=work_bucket, Key=extra_key, Body=b"produced by a worker")
    adhoc = [
        "ansible",
        "localhost",
        "-m",
        "cicc.cloud.dataset",
        "-a",
        f"bucket={work_bucket} prefix='{prefix}' state=absent endpoint_url={emulator} "
        "access_key=testing secret_key=testing region=us-east-1",
    ]
    result = _run(adhoc + ["--check"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CHANGED" in result.stdout
    assert _keys(s3, work_bucket) == set(wanted) | {extra_key}

    result = _run(adhoc)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CHANGED" in result.stdout
    assert _keys(s3, work_bucket) == {extra_key}

    result = _run(adhoc)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "CHANGED" not in result.stdout
