"""The whole pipeline on the local cloud, end to end, as a user of the collection runs it: the collection built
and installed with ansible-galaxy, then `ansible-playbook cicc.cloud.site` from an empty directory, the settings
given with -e only (no inventory, no ansible.cfg, no environment beyond the collections path).

Against the session's fresh emulator and the real Docker Engine: the bucket with a small data set, IAM, the
base instance (a systemd container of the local base image), configured as a host found by its tags, the AMI
(`docker commit`), then a fleet of 3 that boots the committed image, drains the seed's 7 tasks and terminates
itself. The test then checks from the outside what the playbooks claim: every output is input XOR kernel,
the lists are exact, no lock is left, every instance is terminated and its container stopped. A second run
changes nothing; teardown.yml leaves nothing tagged. Containers, images and state files the run made are
removed at the end, whatever happened.

Each run has a project tag and a bucket of its own, so it never touches what other tests made on the session's
emulator. The wall times of the three runs are printed (pytest -s shows them).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import boto3
import docker.errors
import numpy as np
import pytest
import yaml

from ansible_collections.cicc.cloud.plugins.module_utils.dataset import build_dataset, xor_tiled
from ansible_collections.cicc.cloud.plugins.module_utils import local_cloud as lc
from ansible_collections.cicc.cloud.plugins.module_utils import run_report
from ansible_collections.cicc.cloud.plugins.module_utils import run_trace
from ansible_collections.cicc.cloud.tests.helpers import list_keys, play_recap, read_body, tagged

ROOT = Path(__file__).resolve().parents[2]
REGION = "us-east-1"
TIMEOUT = 1200
FLEET_SIZE = 3
INPUT_SIZE = 20_000
SEED_TASKS = [f"in{i}.dat" for i in range(3, 10)]
SEED_DONE = [f"in{i}.dat" for i in range(3)]
STATE_DIR = Path("/var/lib/cicc/instances")
WORK_DIR = Path("/var/lib/cicc/work")


def _pipeline(env: dict, settings: dict, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """A playbook of the installed collection run from the empty directory env["PWD"]: cicc.cloud.site, or
    cicc.cloud.NAME when args start with playbooks/NAME.yml; (its result, its wall time)."""
    playbook, args = "cicc.cloud.site", list(args)
    if args and args[0].startswith("playbooks/"):
        playbook = f"cicc.cloud.{Path(args.pop(0)).stem}"
    started = time.monotonic()
    result = subprocess.run(
        ["ansible-playbook", playbook, *args, "-e", json.dumps(settings)],
        cwd=env["PWD"],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    return result, time.monotonic() - started


def _from_repository(env: dict, settings: dict, playbook: str) -> subprocess.CompletedProcess:
    """A playbook run the repository's way, through scripts/pipeline.sh (its ansible.cfg, its collection link)."""
    port = str(settings["cicc_emulator_port"])
    env = {key: value for key, value in env.items() if key != "ANSIBLE_COLLECTIONS_PATH"} | {"CICC_EMULATOR_PORT": port}
    command = [str(ROOT / "scripts" / "pipeline.sh"), playbook, "-e", json.dumps(settings)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def _ok(result: subprocess.CompletedProcess) -> dict[str, dict[str, int]]:
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    recap = play_recap(result.stdout)
    assert recap, f"no PLAY RECAP in:\n{result.stdout}"
    return recap


def _assert_xor_outputs(s3, bucket: str) -> None:
    """Every seed task's output is its input XOR the kernel."""
    kernel = read_body(s3, bucket, "kernel.dat")
    for name in SEED_TASKS:
        data = read_body(s3, bucket, name)
        assert len(data) == INPUT_SIZE
        assert read_body(s3, bucket, name.replace("in", "out")) == xor_tiled(data, kernel), name


def _instances(ec2, project: str, states: list[str] | None = None) -> list[dict]:
    filters = [{"Name": "tag:project", "Values": [project]}]
    if states:
        filters.append({"Name": "instance-state-name", "Values": states})
    reservations = ec2.describe_instances(Filters=filters)["Reservations"]
    return [instance for reservation in reservations for instance in reservation["Instances"]]


def _role(instance: dict) -> str:
    return {tag["Key"]: tag["Value"] for tag in instance.get("Tags", [])}.get("role", "")


def _cleanup(docker_client, endpoint: str, instance_ids: set[str], ami_ids: set[str]) -> None:
    """Remove the containers, images and state files of this run's instances and AMIs."""
    for container in docker_client.containers.list(
        all=True, filters={"label": f"{lc.LABEL_ENDPOINT}={endpoint}"}, ignore_removed=True
    ):
        if container.name in instance_ids:
            container.remove(force=True)
    for image in docker_client.images.list(name="cicc-ami", filters={"label": f"{lc.LABEL_ENDPOINT}={endpoint}"}):
        if image.labels.get(lc.LABEL_AMI) in ami_ids:
            for tag in image.tags:
                try:
                    docker_client.images.remove(tag, force=True)
                except docker.errors.NotFound:
                    pass
    for instance_id in instance_ids:
        for directory in (STATE_DIR / instance_id, WORK_DIR / instance_id):
            shutil.rmtree(directory, ignore_errors=True)


def _tag(instance: dict, key: str) -> str:
    return {tag["Key"]: tag["Value"] for tag in instance.get("Tags", [])}.get(key, "")


def _own_amis(ec2, project: str) -> list[str]:
    tag = [{"Name": "tag:project", "Values": [project]}]
    return sorted(image["ImageId"] for image in ec2.describe_images(Owners=["self"], Filters=tag)["Images"])


def _committed_images(docker_client, endpoint: str) -> list[str]:
    """The local cloud's AMI images of this emulator: one per AMI build."""
    return sorted(
        image.id
        for image in docker_client.images.list(name="cicc-ami", filters={"label": f"{lc.LABEL_ENDPOINT}={endpoint}"})
    )


def _pipelines_at_once(env: dict, runs: list[tuple]) -> list[subprocess.CompletedProcess]:
    """scripts/pipeline.sh runs side by side, one per (settings, *args); their results in that order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(runs)) as pool:
        futures = [pool.submit(_pipeline, env, settings, *args) for settings, *args in runs]
        return [future.result()[0] for future in futures]


def _job_file(path: Path, job: dict) -> Path:
    path.write_text(yaml.safe_dump({"cicc_job": job}))
    return path


def _more_jobs(pipeline: dict, tmp_path: Path, docker_client, archive: Path, image_id: str):
    """The summary job, its image saved into the bucket; and an XOR job over a prefix filled by hand."""
    s3, bucket = pipeline["aws"]["s3"], pipeline["bucket"]
    s3.upload_file(str(archive), bucket, "summary/images/cicc-summary.tar")
    docker_client.images.remove("cicc-summary:latest")  # no machine has it: the bucket brings it
    summary = yaml.safe_load((ROOT / "jobs" / "summary.yml").read_text())["cicc_job"]
    summary["image"]["digest"] = image_id
    byhand = {**yaml.safe_load((ROOT / "jobs" / "xor.yml").read_text())["cicc_job"], "name": "byhand"}
    byhand.update(prefix="byhand/", dataset=None)
    objects = {f"byhand/{key}": body for key, body in build_dataset(input_size=INPUT_SIZE, seed=7).items()}
    for key, body in objects.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    return _job_file(tmp_path / "summary.yml", summary), _job_file(tmp_path / "byhand.yml", byhand), objects


def _check_summary_outputs(s3, bucket: str, names: list[str]) -> None:
    """Each input's summary.json and histogram.npy, recomputed here from the input itself."""
    for name in names:
        data = read_body(s3, bucket, name)
        summary = json.loads(read_body(s3, bucket, f"summary/results/{name}/summary.json"))
        assert summary["size"] == len(data) and summary["sha256"] == hashlib.sha256(data).hexdigest(), name
        assert summary["zero_bytes"] == data.count(0) and summary["distinct_bytes"] == len(set(data)), name
        histogram = np.load(io.BytesIO(read_body(s3, bucket, f"summary/results/{name}/histogram.npy")))
        assert histogram.tolist() == [data.count(value) for value in range(256)], name
    assert sorted(read_body(s3, bucket, "summary/completed.txt").decode().split()) == sorted(names)


@pytest.fixture(scope="module")
def installed_collection(tmp_path_factory) -> Path:
    """The collection as a user installs it: its tarball built, then installed into a collections path of its own."""
    work = tmp_path_factory.mktemp("collection")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ANSIBLE_", "AWS_", "CICC_"))}
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    def galaxy(*args: str) -> None:
        done = subprocess.run(
            ["ansible-galaxy", "collection", *args],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"ansible-galaxy collection {' '.join(args)}:\n{done.stdout}\n{done.stderr}"

    galaxy("build", "--output-path", str(work), str(ROOT))
    (tarball,) = work.glob("cicc-cloud-*.tar.gz")
    galaxy("install", "--no-deps", "-p", str(work / "collections"), str(tarball))
    assert (work / "collections" / "ansible_collections" / "cicc" / "cloud" / "MANIFEST.json").is_file()
    return work / "collections"


@pytest.fixture
def pipeline(emulator, docker_client, tmp_path_factory, installed_collection):
    """A project and bucket of this test's own, the environment of a user of the installed collection (an empty
    directory, the collections path), and the cleanup."""
    run_id = uuid.uuid4().hex[:8]
    project, bucket = f"e2e{run_id}", f"cicc-e2e-{run_id}"
    port = urlparse(emulator).port
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ANSIBLE_", "AWS_", "CICC_"))}
    env.update(
        PATH=f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        PWD=str(tmp_path_factory.mktemp("empty")),
        ANSIBLE_COLLECTIONS_PATH=str(installed_collection),
        ANSIBLE_CALLBACK_RESULT_FORMAT="yaml",
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_DEPRECATION_WARNINGS="0",
    )
    settings = {
        "cicc_project": project,
        "cicc_emulator_port": port,
        "cicc_bucket": bucket,
        "cicc_fleet_size": FLEET_SIZE,
        "cicc_dataset_input_size": INPUT_SIZE,
        "cicc_report_dir": str(tmp_path_factory.mktemp("report")),
    }
    session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION)
    aws = {name: session.client(name, endpoint_url=emulator) for name in ("s3", "iam", "ec2", "sts")}
    made = {"instances": set(), "images": set()}
    yield {"project": project, "bucket": bucket, "env": env, "settings": settings, "aws": aws, "made": made}

    ec2 = aws["ec2"]
    made["instances"] |= {instance["InstanceId"] for instance in _instances(ec2, project)}
    made["images"] |= {
        image["ImageId"]
        for image in ec2.describe_images(Owners=["self"])["Images"]
        if image["Name"].startswith(f"{project}-")
    }
    _cleanup(docker_client, emulator, made["instances"], made["images"])


def test_site_runs_the_whole_pipeline_on_the_local_cloud(
    pipeline, docker_client, emulator, capsys, tmp_path, summary_archive
):
    project, bucket, env, settings, aws = (pipeline[k] for k in ("project", "bucket", "env", "settings", "aws"))
    s3, ec2 = aws["s3"], aws["ec2"]

    # Check mode on nothing at all: nothing is made, nothing fails.
    check, check_seconds = _pipeline(env, settings, "--check")
    _ok(check)
    assert tagged(aws, project, bucket) == {}

    # The first run: the whole narrative, from an empty account to a drained queue.
    first, first_seconds = _pipeline(env, settings)
    _ok(first)
    instances = _instances(ec2, project)
    pipeline["made"]["instances"] |= {instance["InstanceId"] for instance in instances}
    images = ec2.describe_images(Owners=["self"], Filters=[{"Name": "tag:project", "Values": [project]}])["Images"]
    pipeline["made"]["images"] |= {image["ImageId"] for image in images}

    # The machines: one base instance and a fleet of 3 of the one AMI, all terminated, every container stopped.
    workers = [instance for instance in instances if _role(instance) == "worker"]
    bases = [instance for instance in instances if _role(instance) == "base"]
    assert len(workers) == FLEET_SIZE and len(bases) == 1
    assert len(images) == 1
    assert {worker["ImageId"] for worker in workers} == {images[0]["ImageId"]}
    assert {instance["State"]["Name"] for instance in instances} == {"terminated"}
    for instance in instances:
        container = docker_client.containers.get(instance["InstanceId"])
        assert container.status == "exited", f"{instance['InstanceId']}: container {container.status}"
        assert container.labels[lc.LABEL_ENDPOINT] == emulator
    for worker in workers:
        assert worker["MetadataOptions"]["HttpTokens"] == "required"
        assert docker_client.containers.get(worker["InstanceId"]).image.tags == [f"cicc-ami:{images[0]['ImageId']}"]
    base_image = docker_client.images.get(f"cicc-ami:{images[0]['ImageId']}")
    assert base_image.labels["cicc.source-instance"] == bases[0]["InstanceId"]

    # The queue: every seed task done once, nothing failed, no lock left, the lists exact.
    completed = read_body(s3, bucket, "completed.txt").decode().split()
    assert sorted(completed) == sorted(SEED_DONE + SEED_TASKS)
    assert len(completed) == len(set(completed))
    assert read_body(s3, bucket, "tasklist.txt").decode().split() == []
    assert list_keys(s3, bucket, "locks/") == []
    assert list_keys(s3, bucket, "failed/") == []
    _assert_xor_outputs(s3, bucket)

    # Each worker worked (the fleet shares the queue) and left its log; the summary says so.
    logs = list_keys(s3, bucket, "logs/")
    assert sorted(logs) == sorted(f"logs/{worker['InstanceId']}/log.txt" for worker in workers)
    drained = [
        re.search(r"queue drained: (\d+) completed, 0 failed", read_body(s3, bucket, key).decode()) for key in logs
    ]
    assert all(drained), logs
    assert sum(int(found.group(1)) for found in drained) == len(SEED_TASKS)
    # The trace: a row per attempt (one each here), each saying which fleet machine made it; a record per worker.
    fleet = {worker["InstanceId"]: worker for worker in workers}
    rows = run_trace.read_trace(s3, bucket, "")
    assert sorted(row["task"] for row in rows) == sorted(SEED_TASKS) and {row["outcome"] for row in rows} == {"done"}
    for row in rows:
        machine = fleet[row["instance_id"]]
        facts = (machine["InstanceType"], machine["Placement"]["AvailabilityZone"], images[0]["ImageId"], "on-demand")
        assert (row["instance_type"], row["availability_zone"], row["ami_id"], row["market"]) == facts
    records = run_trace.read_workers(s3, bucket, "")
    assert sorted(record["worker"] for record in records) == sorted(fleet)
    # The run's report: trace.tsv a line per attempt, the same files in the bucket, the cost from the table's price.
    report = Path(settings["cicc_report_dir"])
    table = list(csv.DictReader(io.StringIO((report / "trace.tsv").read_text()), delimiter="\t"))
    assert sorted((line["task"], line["outcome"]) for line in table) == [(name, "done") for name in sorted(SEED_TASKS)]
    for name in ("trace.tsv", "timeline.png", "report.html"):
        assert read_body(s3, bucket, f"report/{name}") == (report / name).read_bytes(), name
    assert (report / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (report / "report.html").read_text()
    assert all(f"<td>{name}</td>" in page for name in SEED_TASKS)
    hourly = run_report.PRICES["instances"][REGION][workers[0]["InstanceType"]]["on-demand"]
    # Each machine's time from its launch (EC2's LaunchTime, which its identity carries) to its worker's stop.
    launched = {worker["InstanceId"]: worker["LaunchTime"].timestamp() for worker in workers}
    assert all(abs(float(record["launched_at"]) - launched[record["instance_id"]]) < 0.01 for record in records)
    machine_seconds = sum(record["stopped_at"] - launched[record["instance_id"]] for record in records)
    requests = sum(
        record["write_requests"] * 0.005 / 1000 + record["read_requests"] * 0.0004 / 1000 for record in records
    )
    flat = " ".join(first.stdout.split())
    reported = re.search(r"USD ([0-9.]+) \(machines", flat)
    assert reported and float(reported.group(1)) == pytest.approx(machine_seconds / 3600 * hourly + requests, abs=2e-6)
    assert f"verified {len(SEED_DONE) + len(SEED_TASKS)}/{len(SEED_DONE) + len(SEED_TASKS)} outputs" in flat
    assert "tasks done 10/10" in flat
    assert "s from launch until every worker had terminated" in flat

    # status.yml says the same: the queue drained, no machine left; run from the repository, as `make demo` runs.
    status = _from_repository(env, settings, "playbooks/status.yml")
    _ok(status)
    flat = " ".join(status.stdout.split())
    assert f"queue s3://{bucket}/: 0 pending, 0 claimed, 10 completed, 0 failed, 0 rejected lines - drained" in flat
    assert f"machines of project {project} not terminated: 0" in flat

    # Run again: nothing changes, no machine is launched.
    second, second_seconds = _pipeline(env, settings)
    recap = _ok(second)
    assert {host: counts["changed"] for host, counts in recap.items()} == {"localhost": 0}, recap
    assert len(_instances(ec2, project)) == len(instances)
    assert "no fleet launched by this run" in " ".join(second.stdout.split())

    # Two more jobs at once from the same AMI, in the same bucket under prefixes of their own: the summary job
    # (its image delivered from the bucket at boot, two outputs a task) over the XOR job's inputs, and the XOR
    # program over a bucket prefix filled by hand in the seed's layout (no data set written). No AMI is built.
    amis_before = _own_amis(ec2, project)
    committed_before = _committed_images(docker_client, emulator)
    summary_file, byhand_file, byhand_objects = _more_jobs(pipeline, tmp_path, docker_client, *summary_archive)
    runs = _pipelines_at_once(
        env,
        [
            ({**settings, "cicc_fleet_size": 2}, "-e", f"@{summary_file}"),
            ({**settings, "cicc_fleet_size": 2}, "-e", f"@{byhand_file}"),
        ],
    )
    for result in runs:
        _ok(result)
    assert _own_amis(ec2, project) == amis_before
    assert _committed_images(docker_client, emulator) == committed_before
    instances = _instances(ec2, project)
    pipeline["made"]["instances"] |= {instance["InstanceId"] for instance in instances}
    per_job = {}
    for instance in instances:
        per_job.setdefault(_tag(instance, "cicc:job"), []).append(instance)
    assert {job: len(machines) for job, machines in per_job.items()} == {
        "": 1,
        "xor": FLEET_SIZE,
        "summary": 2,
        "byhand": 2,
    }
    assert {instance["State"]["Name"] for instance in instances} == {"terminated"}
    assert {instance["ImageId"] for instance in per_job["summary"] + per_job["byhand"]} == {amis_before[0]}
    _check_summary_outputs(s3, bucket, [f"in{i}.dat" for i in range(10)])
    assert "verified 10/10 outputs in s3://%s/byhand/" % bucket in " ".join(runs[1].stdout.split())
    for key, body in byhand_objects.items():  # the inputs made by hand are untouched, no data set was written
        if not key.startswith(("byhand/tasklist.txt", "byhand/completed.txt")):
            assert read_body(s3, bucket, key) == body, key
    assert sorted(read_body(s3, bucket, "byhand/completed.txt").decode().split()) == [f"in{i}.dat" for i in range(10)]

    # Tearing one job down leaves the others: the summary job's machines and identity go, its outputs stay.
    summary_down, _seconds = _pipeline(env, settings, "playbooks/teardown_job.yml", "-e", f"@{summary_file}")
    _ok(summary_down)
    roles = {role["RoleName"] for role in aws["iam"].list_roles(PathPrefix=f"/{project}/")["Roles"]}
    assert roles == {f"{project}-xor-worker-role", f"{project}-byhand-worker-role", f"{project}-builder-role"}
    for instance in per_job["summary"]:
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(instance["InstanceId"])
    for instance in per_job["byhand"]:
        assert docker_client.containers.get(instance["InstanceId"]).status == "exited"
    assert _own_amis(ec2, project) == amis_before
    assert list_keys(s3, bucket, "summary/results/in3.dat/") and not list_keys(s3, bucket, "summary/job.json")

    # More tasks for the XOR job: the plan, from the first run's trace, says how many machines (never more than there
    # is work for) and about how long; the fleet launches that many, and takes about that long.
    more = [f"in{i}.dat" for i in range(10, 14)]
    for name in more:
        s3.put_object(Bucket=bucket, Key=name, Body=os.urandom(INPUT_SIZE))
    s3.put_object(Bucket=bucket, Key="tasklist.txt", Body="".join(f"{name}\n" for name in more).encode())
    plan, _seconds = _pipeline(env, settings, "playbooks/plan.yml")
    _ok(plan)
    planned = re.search(
        r"4 pending, 0 failed; (\d+) machine\(s\) of \S+, 2 task\(s\) at once each; about (\d+) s",
        " ".join(plan.stdout.split()),
    )
    assert planned, plan.stdout[-3000:]
    machines, wall = int(planned.group(1)), int(planned.group(2))
    assert machines == 2  # ceil(4 tasks / 2 at once), not the fleet's 3
    again, _seconds = _pipeline(env, settings, "playbooks/fleet.yml")
    _ok(again)
    xor_machines = [instance for instance in _instances(ec2, project) if _tag(instance, "cicc:job") == "xor"]
    pipeline["made"]["instances"] |= {instance["InstanceId"] for instance in xor_machines}
    assert len(xor_machines) == FLEET_SIZE + machines
    took = float(
        re.search(r"([0-9.]+) s from launch until every worker had terminated", " ".join(again.stdout.split())).group(1)
    )
    assert wall / 4 <= took <= wall * 4, f"planned {wall} s, took {took:.0f} s"
    assert sorted(read_body(s3, bucket, "completed.txt").decode().split()) == sorted(SEED_DONE + SEED_TASKS + more)
    instances = _instances(ec2, project)

    # Teardown: nothing tagged is left, the bucket included.
    teardown, teardown_seconds = _pipeline(env, {**settings, "cicc_delete_bucket": True}, "playbooks/teardown.yml")
    _ok(teardown)
    assert tagged(aws, project, bucket) == {}
    # ... and nothing of the machines on this one: containers, their files, the AMI's image.
    for instance in instances:
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(instance["InstanceId"])
        assert not (STATE_DIR / instance["InstanceId"]).exists() and not (WORK_DIR / instance["InstanceId"]).exists()
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(f"cicc-ami:{images[0]['ImageId']}")

    with capsys.disabled():
        print(
            f"\nlocal pipeline: check mode {check_seconds:.0f} s, first run {first_seconds:.0f} s, "
            f"re-run {second_seconds:.0f} s (changed=0), teardown {teardown_seconds:.0f} s; "
            f"4 more tasks planned at {wall} s on {machines} machines, took {took:.0f} s ({took / wall:.2f}x)"
        )


def test_a_job_runs_on_machines_that_are_running_already(pipeline, docker_client):
    """Seed 001's way: the job started on a machine that is up (the configured base instance, reached through the
    dynamic inventory's docker connection) rather than at boot; the machine stays up, the queue is drained."""
    env, settings, aws, bucket = (pipeline[k] for k in ("env", "settings", "aws", "bucket"))
    s3, ec2 = aws["s3"], aws["ec2"]
    for step in ("bucket", "job", "iam", "network", "base_instance", "configure"):
        _ok(_pipeline(env, settings, f"playbooks/{step}.yml")[0])
    base = _instances(ec2, pipeline["project"], ["running"])
    assert [_role(instance) for instance in base] == ["base"]
    pipeline["made"]["instances"].add(base[0]["InstanceId"])

    result, seconds = _pipeline(env, settings, "playbooks/run_job.yml", "-e", "cicc_run_hosts=role_base")
    _ok(result)
    assert (
        "job xor, queue s3://%s/: 10 completed, 0 failed, 7 task(s) with outputs as their manifests say" % bucket
        in (" ".join(result.stdout.split()))
    )
    _assert_xor_outputs(s3, bucket)
    assert list_keys(s3, bucket, f"logs/{base[0]['InstanceId']}/") == [f"logs/{base[0]['InstanceId']}/log.txt"]
    assert (
        ec2.describe_instances(InstanceIds=[base[0]["InstanceId"]])["Reservations"][0]["Instances"][0]["State"]["Name"]
        == "running"
    )
    assert docker_client.containers.get(base[0]["InstanceId"]).status == "running"

    # Again: the queue is drained, nothing is started.
    again, _seconds = _pipeline(env, settings, "playbooks/run_job.yml", "-e", "cicc_run_hosts=role_base")
    assert {host: counts["changed"] for host, counts in _ok(again).items()} == {
        "localhost": 0,
        base[0]["InstanceId"]: 0,
    }

    _ok(_pipeline(env, {**settings, "cicc_delete_bucket": True}, "playbooks/teardown.yml")[0])
    assert tagged(aws, pipeline["project"], bucket) == {}
