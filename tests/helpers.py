"""What the integration tests share to read the emulator and Ansible's output: one copy each, imported by its full
name (as the container tests' helpers are) so that no other ``helpers`` module on sys.path can stand in for it."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ANSIBLE_TIMEOUT = 300

LIVE_STATES = ["pending", "running", "shutting-down", "stopping", "stopped"]
_RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.MULTILINE)


def read_body(s3, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def list_keys(s3, bucket: str, prefix: str = "") -> list[str]:
    """Every key under ``prefix``, in S3's order (sorted), across pages."""
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def upload(s3, bucket: str, objects: dict[str, bytes]) -> None:
    for key, body in objects.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)


def play_recap(output: str) -> dict[str, dict[str, int]]:
    """The PLAY RECAP's counts by host (the last play's when several print one)."""
    return {
        host: dict(zip(("ok", "changed", "unreachable", "failed"), map(int, counts)))
        for host, *counts in _RECAP.findall(output)
    }


def tagged(aws: dict, project: str, bucket: str) -> dict[str, list[str]]:
    """Everything on the emulator that carries the project's tag (IAM: under its path), by kind; ``aws`` holds
    the s3, iam, ec2 and sts clients."""
    ec2, iam, s3 = aws["ec2"], aws["iam"], aws["s3"]
    tag = {"Name": "tag:project", "Values": [project]}
    owner = aws["sts"].get_caller_identity()["Account"]
    reservations = ec2.describe_instances(Filters=[tag, {"Name": "instance-state-name", "Values": LIVE_STATES}])
    endpoints = ec2.describe_vpc_endpoints(Filters=[tag])["VpcEndpoints"]
    found = {
        "instances": [i["InstanceId"] for r in reservations["Reservations"] for i in r["Instances"]],
        "images": [i["ImageId"] for i in ec2.describe_images(Owners=["self"], Filters=[tag])["Images"]],
        "snapshots": [
            s["SnapshotId"]
            for s in ec2.describe_snapshots(Filters=[tag, {"Name": "owner-id", "Values": [owner]}])["Snapshots"]
        ],
        "security_groups": [g["GroupId"] for g in ec2.describe_security_groups(Filters=[tag])["SecurityGroups"]],
        "key_pairs": [k["KeyName"] for k in ec2.describe_key_pairs(Filters=[tag])["KeyPairs"]],
        "roles": [r["RoleName"] for r in iam.list_roles(PathPrefix=f"/{project}/")["Roles"]],
        "instance_profiles": [
            p["InstanceProfileName"] for p in iam.list_instance_profiles(PathPrefix=f"/{project}/")["InstanceProfiles"]
        ],
        "buckets": [bucket] if bucket in {b["Name"] for b in s3.list_buckets()["Buckets"]} else [],
        "launch_templates": [
            t["LaunchTemplateName"] for t in ec2.describe_launch_templates(Filters=[tag])["LaunchTemplates"]
        ],
        "vpc_endpoints": [e["VpcEndpointId"] for e in endpoints if e["State"].lower() not in ("deleted", "deleting")],
        "route_tables": [t["RouteTableId"] for t in ec2.describe_route_tables(Filters=[tag])["RouteTables"]],
        "internet_gateways": [
            g["InternetGatewayId"] for g in ec2.describe_internet_gateways(Filters=[tag])["InternetGateways"]
        ],
        "subnets": [n["SubnetId"] for n in ec2.describe_subnets(Filters=[tag])["Subnets"]],
        "vpcs": [v["VpcId"] for v in ec2.describe_vpcs(Filters=[tag])["Vpcs"]],
    }
    return {kind: ids for kind, ids in found.items() if ids}


def ansible(*args: str, env: dict | None = None, aws_from_environment: bool = True) -> subprocess.CompletedProcess:
    """An Ansible command run from the repository, with its virtualenv and ansible.cfg, in this environment (the
    session emulator's AWS_URL included, unless ``aws_from_environment`` is false: then the playbooks reach the
    emulator only through their settings) and ``env``."""
    environment = {
        key: value for key, value in os.environ.items() if aws_from_environment or not key.startswith("AWS_")
    }
    environment.update(
        PATH=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{environment.get('PATH', '')}",
        ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_DEPRECATION_WARNINGS="0",
        **(env or {}),
    )
    return subprocess.run(
        args, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=ANSIBLE_TIMEOUT, check=False
    )


def module_result(module: str, args: dict, check: bool = False, env: dict | None = None) -> dict:
    """``module`` run ad hoc on localhost (with --check when ``check``); its result (``failed`` true if it failed)."""
    command = ["ansible", "localhost", "-m", module, "-a", json.dumps(args)] + (["--check"] if check else [])
    callback = {"ANSIBLE_LOAD_CALLBACK_PLUGINS": "1", "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json"}
    done = ansible(*command, env={**(env or {}), **callback})
    try:
        return json.loads(done.stdout)["plays"][0]["tasks"][0]["hosts"]["localhost"]
    except (ValueError, KeyError, IndexError):
        pytest.fail(f"{' '.join(command)} gave no JSON result (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")


def ad_hoc(module: str, args: dict, check: bool = False, env: dict | None = None) -> dict:
    """``module_result`` of a run that must not have failed."""
    result = module_result(module, args, check, env)
    assert not result.get("failed"), result.get("msg", result)
    return result
