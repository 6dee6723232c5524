"""The local cloud's machines: the real AWS emulator and the real Docker Engine, kept in step by local_cloud.reconcile.

Instances are launched through the EC2 API as the playbooks launch them (the Ubuntu AMI looked up by Canonical's
owner id and a name pattern, newest first), then reconcile makes the engine match and each container is booted
for real (systemd as PID 1). Every instance a test launches carries a tag unique to this run, and reconcile is
always given that filter, so the instances of other tests sharing the session's emulator are never touched.
Every container and image the tests make is removed at the end, whatever happened.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import boto3
import docker.errors
import pytest

from ansible_collections.cicc.cloud.plugins.module_utils import local_cloud as lc
from ansible_collections.cicc.cloud.tests.helpers import ad_hoc, ansible

REGION = "us-east-1"
CANONICAL = "099720109477"
UBUNTU_NAME = "ubuntu/images/*ubuntu-*-amd64-server-*"
BOOT_TIMEOUT = 60
BASE_IMAGE = os.environ.get("CICC_BASE_IMAGE", lc.DEFAULT_BASE_IMAGE)


class Cloud:
    """One test run's corner of the emulator and the engine: what it launched, and how to reconcile it."""

    def __init__(self, ec2, docker, endpoint: str, tmp: Path) -> None:
        self.ec2, self.docker, self.endpoint = ec2, docker, endpoint
        self.run_id = uuid.uuid4().hex[:10]
        self.state_dir = tmp / "state"
        self.work_dir = tmp / "work"
        self.instances: list[str] = []
        self.amis: list[str] = []
        self.extra_containers: list[str] = []

    @property
    def filters(self) -> dict:
        return {"tag:cicc-test": self.run_id}

    def ubuntu_ami(self) -> str:
        """The newest Ubuntu server AMI of Canonical, found the way the playbooks find it."""
        images = self.ec2.describe_images(
            Owners=[CANONICAL],
            Filters=[{"Name": "name", "Values": [UBUNTU_NAME]}, {"Name": "state", "Values": ["available"]}],
        )["Images"]
        assert images, f"the emulator has no Canonical AMI named {UBUNTU_NAME}"
        return max(images, key=lambda image: (image["CreationDate"], image["Name"]))["ImageId"]

    def launch(
        self, ami: str, role: str = "test", shutdown: str | None = None, project: str = "cicc-test", user_data: str = ""
    ) -> str:
        options = {"InstanceInitiatedShutdownBehavior": shutdown} if shutdown else {}
        if user_data:
            options["UserData"] = user_data
        tags = [
            {"Key": "cicc-test", "Value": self.run_id},
            {"Key": "project", "Value": project},
            {"Key": "role", "Value": role},
        ]
        instance = self.ec2.run_instances(
            ImageId=ami,
            MinCount=1,
            MaxCount=1,
            InstanceType="c4.large",
            TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
            **options,
        )["Instances"][0]
        self.instances.append(instance["InstanceId"])
        return instance["InstanceId"]

    def reconcile(self, check_mode: bool = False, remove_terminated: bool = False) -> dict:
        return lc.reconcile(
            self.ec2,
            self.docker,
            base_image=BASE_IMAGE,
            filters=self.filters,
            state_dir=str(self.state_dir),
            work_dir=str(self.work_dir),
            check_mode=check_mode,
            remove_terminated=remove_terminated,
        )

    def state(self, instance_id: str) -> str:
        return self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["State"][
            "Name"
        ]

    def container(self, instance_id: str):
        return self.docker.containers.get(instance_id)

    def sh(self, instance_id: str, script: str) -> str:
        code, output = self.container(instance_id).exec_run(["sh", "-c", script])
        text = output.decode("utf-8", "replace")
        assert code == 0, f"{script!r} in {instance_id} exited {code}: {text}"
        return text

    def power_off(self, instance_id: str, timeout: float = 30) -> None:
        """What the worker does last: `systemctl poweroff` inside, then the container stops by itself."""
        self.container(instance_id).exec_run(["systemctl", "poweroff"], detach=True)
        deadline = time.monotonic() + timeout
        while self.container(instance_id).status != "exited":
            assert time.monotonic() < deadline, f"{instance_id} did not power off within {timeout} s"
            time.sleep(0.2)

    def cleanup(self) -> None:
        names = set(self.instances) | set(self.extra_containers)
        for container in self.docker.containers.list(
            all=True, filters={"label": f"{lc.LABEL_ENDPOINT}={self.endpoint}"}
        ):
            names.add(container.name)
        for name in names:
            try:
                self.docker.containers.get(name).remove(force=True)
            except docker.errors.NotFound:
                pass
        for ami in self.amis:
            try:
                self.docker.images.remove(lc.ami_image(ami), force=True)
            except docker.errors.ImageNotFound:
                pass
        for image in self.docker.images.list(
            name=lc.IMAGE_REPOSITORY, filters={"label": f"{lc.LABEL_ENDPOINT}={self.endpoint}"}
        ):
            self.docker.images.remove(image.id, force=True)
        if self.instances:
            self.ec2.terminate_instances(InstanceIds=self.instances)


@pytest.fixture
def cloud(emulator, docker_client, tmp_path):
    try:
        docker_client.images.get(BASE_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"the base image {BASE_IMAGE} is missing: build it with scripts/base-image.sh")
    ec2 = boto3.client("ec2", endpoint_url=emulator, region_name=REGION)
    made = Cloud(ec2, docker_client, emulator, tmp_path)
    try:
        yield made
    finally:
        made.cleanup()


def _by_id(result: dict) -> dict:
    return {item["instance_id"]: item for item in result["instances"]}


def _images(result: dict) -> dict:
    return {item["ami_id"]: item for item in result["images"]}


def test_instance_image_fleet_and_termination(cloud):
    ubuntu = cloud.ubuntu_ami()
    assert lc.image_for_ami(cloud.docker, ubuntu, BASE_IMAGE) == BASE_IMAGE
    base = cloud.launch(ubuntu, role="base")

    planned = cloud.reconcile(check_mode=True)
    assert _by_id(planned)[base]["action"] == "created" and planned["changed"]
    with pytest.raises(docker.errors.NotFound):
        cloud.container(base)  # check mode created nothing

    applied = cloud.reconcile()
    entry = _by_id(applied)[base]
    assert (entry["container"], entry["image"], entry["action"]) == ("running", BASE_IMAGE, "created")
    assert lc.wait_for_boot(cloud.docker, base, BOOT_TIMEOUT)["system_state"] in ("running", "degraded")
    assert cloud.reconcile()["changed"] is False

    # The machine as the worker sees it.
    container = cloud.container(base)
    assert container.labels[lc.LABEL_INSTANCE] == base and container.labels[lc.LABEL_AMI] == ubuntu
    identity = json.loads(cloud.sh(base, f"cat {lc.IDENTITY_PATH}"))
    described = cloud.ec2.describe_instances(InstanceIds=[base])["Reservations"][0]["Instances"][0]
    zone = described["Placement"]
    facts = {"instance_type": "c4.large", "availability_zone": zone["AvailabilityZone"], "market": "on-demand"}
    facts["launched_at"] = f"{described['LaunchTime'].timestamp():.3f}"  # what an EC2 machine's uptime tells
    assert identity == {"instance_id": base, "ami_id": ubuntu, "region": REGION, "user_data": "", **facts}
    assert facts["availability_zone"].startswith(REGION)
    assert (
        cloud.container(base).exec_run(["sh", "-c", f"echo x > {lc.IDENTITY_PATH}"]).exit_code != 0
    ), "identity is writable"
    cloud.sh(base, f'test -S {lc.DOCKER_SOCKET} && test -c /dev/fuse && test "$(hostname)" = {base}')
    cloud.sh(base, f"echo from-{base} > {cloud.work_dir}/probe.txt")
    assert (cloud.work_dir / "probe.txt").read_text() == f"from-{base}\n", "the work directory is not the host's"

    # Configure the machine: a unit enabled now must start by itself on every machine of the image.
    cloud.sh(
        base,
        'printf \'[Service]\\nType=oneshot\\nExecStart=/bin/sh -c "cat /etc/cicc/identity.json > /run/booted-as"\\n'
        "[Install]\\nWantedBy=multi-user.target\\n' > /etc/systemd/system/cicc-probe.service"
        " && systemctl enable cicc-probe.service",
    )
    ami = cloud.ec2.create_image(
        InstanceId=base,
        Name=f"cicc-test-{cloud.run_id}",
        TagSpecifications=[{"ResourceType": "image", "Tags": [{"Key": lc.SOURCE_TAG, "Value": base}]}],
    )["ImageId"]
    cloud.amis.append(ami)
    assert _images(cloud.reconcile(check_mode=True))[ami]["committed"] is True
    assert lc.image_for_ami(cloud.docker, ami, BASE_IMAGE) == BASE_IMAGE, "check mode committed an image"
    committed = _images(cloud.reconcile())[ami]
    assert committed == {
        "ami_id": ami,
        "source_instance": base,
        "image": lc.ami_image(ami),
        "committed": True,
        "removed": False,
    }
    assert lc.image_for_ami(cloud.docker, ami, BASE_IMAGE) == lc.ami_image(ami)
    assert _images(cloud.reconcile())[ami]["committed"] is False

    # A fleet instance boots the committed image, and the unit starts with no other trigger; it sees the
    # user data it was launched with, as IMDS would serve it.
    worker = cloud.launch(ami, role="worker", user_data='{"max_tasks": 1}')
    assert _by_id(cloud.reconcile())[worker]["image"] == lc.ami_image(ami)
    assert cloud.container(worker).attrs["Config"]["Image"] == lc.ami_image(ami)
    lc.wait_for_boot(cloud.docker, worker, BOOT_TIMEOUT)
    booted_as = json.loads(cloud.sh(worker, "cat /run/booted-as"))
    assert (booted_as["instance_id"], booted_as["user_data"]) == (worker, '{"max_tasks": 1}')

    # Terminating through the API stops the container, which is kept for its logs.
    cloud.ec2.terminate_instances(InstanceIds=[base])
    stopped = _by_id(cloud.reconcile())[base]
    assert (stopped["state"], stopped["container"], stopped["action"]) == ("terminated", "exited", "stopped")
    assert cloud.container(base).status == "exited"
    assert cloud.reconcile()["changed"] is False

    # Teardown's pass removes the container of a terminated instance with its files; the running one stays.
    (cloud.work_dir / base).mkdir(exist_ok=True)
    assert _by_id(cloud.reconcile(check_mode=True, remove_terminated=True))[base]["action"] == "removed"
    assert cloud.container(base).status == "exited"
    removed = _by_id(cloud.reconcile(remove_terminated=True))
    assert (removed[base]["container"], removed[base]["action"]) == ("absent", "removed")
    assert removed[worker]["action"] == "none"
    with pytest.raises(docker.errors.NotFound):
        cloud.container(base)
    assert not (cloud.state_dir / base).exists() and not (cloud.work_dir / base).exists()
    assert cloud.reconcile(remove_terminated=True)["changed"] is False


def test_machine_that_powers_off_ends_its_instance(cloud):
    ubuntu = cloud.ubuntu_ami()
    fleet = cloud.launch(ubuntu, role="worker", shutdown="terminate")
    plain = cloud.launch(ubuntu, role="worker")  # EC2's default behaviour: stop
    cloud.reconcile()
    for instance_id in (fleet, plain):
        lc.wait_for_boot(cloud.docker, instance_id, BOOT_TIMEOUT)
        cloud.power_off(instance_id)

    planned = _by_id(cloud.reconcile(check_mode=True))
    assert planned[fleet]["action"] == "terminated" and cloud.state(fleet) == "running"

    result = _by_id(cloud.reconcile())
    assert result[fleet]["action"] == "terminated" and cloud.state(fleet) == "terminated"
    assert result[plain]["action"] == "stopped-instance" and cloud.state(plain) == "stopped"
    assert cloud.container(fleet).status == "exited"
    assert cloud.reconcile()["changed"] is False

    # Started again through the API, the stopped instance boots its container again.
    cloud.ec2.start_instances(InstanceIds=[plain])
    assert _by_id(cloud.reconcile())[plain]["action"] == "started"
    lc.wait_for_boot(cloud.docker, plain, BOOT_TIMEOUT)
    # Stopped through the API: its container is stopped, and starting it again is no power-off either.
    cloud.ec2.stop_instances(InstanceIds=[plain])
    assert _by_id(cloud.reconcile())[plain]["action"] == "stopped"
    cloud.ec2.start_instances(InstanceIds=[plain])
    assert _by_id(cloud.reconcile())[plain]["action"] == "started"
    assert cloud.state(plain) == "running"


def test_only_this_emulators_containers_are_touched(cloud):
    # A container of an instance this emulator never had (it was restarted, say) goes; one of another emulator stays.
    ghost, foreign = f"i-0dead{cloud.run_id}", f"i-0f0e1{cloud.run_id}"
    cloud.extra_containers += [ghost, foreign]
    for name, endpoint in ((ghost, cloud.endpoint), (foreign, "http://127.0.0.1:1")):
        labels = {lc.LABEL_INSTANCE: name, lc.LABEL_AMI: "ami-00000000", lc.LABEL_ENDPOINT: endpoint}
        cloud.docker.containers.create(BASE_IMAGE, name=name, labels=labels)
    outside = cloud.launch(cloud.ubuntu_ami())

    result = cloud.reconcile()
    assert _by_id(result)[ghost]["action"] == "removed"
    assert foreign not in _by_id(result) and cloud.container(foreign).status == "created"
    with pytest.raises(docker.errors.NotFound):
        cloud.container(ghost)
    # Instances the filters leave out are not started.
    narrow = lc.reconcile(
        cloud.ec2, cloud.docker, BASE_IMAGE, {"tag:cicc-test": "nothing"}, str(cloud.state_dir), str(cloud.work_dir)
    )
    assert outside not in _by_id(narrow)


def test_a_container_removed_while_being_listed_is_passed_over(cloud, monkeypatch):
    # Two runs at once share the engine: one's machine may be removed between the other's listing and inspection.
    passing = f"i-0ab5e{cloud.run_id}"
    cloud.extra_containers.append(passing)
    labels = {lc.LABEL_INSTANCE: passing, lc.LABEL_AMI: "ami-00000000", lc.LABEL_ENDPOINT: cloud.endpoint}
    victim = cloud.docker.containers.create(BASE_IMAGE, name=passing, labels=labels)
    inspect = cloud.docker.api.inspect_container

    def removed_first(container_id, *args, **kwargs):
        if container_id == victim.id:
            victim.remove(force=True)
        return inspect(container_id, *args, **kwargs)

    monkeypatch.setattr(cloud.docker.api, "inspect_container", removed_first)
    kept = cloud.launch(cloud.ubuntu_ami())
    result = cloud.reconcile()
    assert passing not in _by_id(result)
    assert _by_id(result)[kept]["action"] == "created"


def _module(cloud, check: bool) -> dict:
    """cicc.cloud.local_instances run ad hoc; the endpoint reaches it through AWS_URL, as module_defaults would."""
    args = {
        "filters": cloud.filters,
        "state_dir": str(cloud.state_dir),
        "work_dir": str(cloud.work_dir),
        "base_image": BASE_IMAGE,
    }
    return ad_hoc("cicc.cloud.local_instances", args, check=check)


def test_module_and_dynamic_inventory(cloud):
    project = f"cicc-{cloud.run_id}"
    instance_id = cloud.launch(cloud.ubuntu_ami(), role="base", project=project)

    planned = _module(cloud, check=True)
    assert planned["changed"] is True and _by_id(planned["local_cloud"])[instance_id]["action"] == "created"
    assert not cloud.docker.containers.list(all=True, filters={"name": instance_id})

    applied = _module(cloud, check=False)
    entry = _by_id(applied["local_cloud"])[instance_id]
    assert applied["changed"] is True and entry["system_state"] in ("running", "degraded")
    assert cloud.container(instance_id).status == "running"
    assert _module(cloud, check=False)["changed"] is False

    # The dynamic inventory finds the instance by the project tag and reaches its container.
    env = {"CICC_PROJECT": project, "CICC_TARGET": "local"}
    graph = ansible("ansible-inventory", "-i", "inventory/aws_ec2.yml", "--graph", env=env)
    assert graph.returncode == 0, graph.stderr
    assert "@role_base:" in graph.stdout and instance_id in graph.stdout, graph.stdout
    ping = ansible("ansible", "-i", "inventory/aws_ec2.yml", "all", "-m", "ansible.builtin.ping", env=env)
    assert ping.returncode == 0 and f"{instance_id} | SUCCESS" in ping.stdout, ping.stdout + ping.stderr
