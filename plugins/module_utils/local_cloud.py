# -*- coding: utf-8 -*-
# Copyright: cicc.cloud contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The local cloud's machines: the Docker Engine kept in step with the AWS emulator's EC2 state.

Against the emulator, every EC2 instance is backed by a container named after its instance id that
boots systemd from the image standing for its AMI. The playbooks launch, image and terminate
instances with amazon.aws modules exactly as on AWS; then ``reconcile`` makes the engine match:

  emulator                                       engine
  instance pending/running                       its container runs (created from the AMI's image)
  instance stopping/stopped/shutting-down/       its container is stopped, and kept so its logs can
    terminated                                     still be read
  instance the emulator no longer knows          its container is removed
  own AMI made from an instance                  ``docker commit`` of that instance's container
                                                   into ``cicc-ami:<ami-id>``
  own AMI deregistered                           its ``cicc-ami:<ami-id>`` image is removed (when no
                                                   container uses it any more)

and one rule goes the other way, from the machine to the emulator:

  the container stopped by itself while the emulator still has the instance running: the machine
  powered off (the worker's ``systemctl poweroff``), so the instance gets what EC2 does on an
  OS-initiated shutdown. Its ``instanceInitiatedShutdownBehavior`` decides: ``terminate`` (what the
  fleet is launched with) terminates it, ``stop`` (EC2's default) stops it. "By itself" means the
  container exited and the emulator was not told: every stop the emulator knows of (reconcile
  stopping the container of a stopped instance, a power-off it has passed on, both sides found down)
  leaves a ``stop-recorded`` marker in the instance's state directory, so a stopped instance started
  again through the API boots its container again instead. A container stopped with ``docker stop``
  by hand, or by a restart of the engine, looks exactly like a power-off and is treated as one.

The AMI an instance boots maps to a local image: ``cicc-ami:<ami-id>`` when one was committed, else
the base image (the looked-up Ubuntu AMI, or any other AMI: the base image stands for them all). An
own AMI is committed from the instance its ``cicc:source-instance`` tag names (the image playbook
adds it; on AWS it is a harmless tag), else from the ``SourceInstanceId`` EC2 reports for images
made with CreateImage. Cleaning the instance before the image (ssh keys, cloud-init state,
machine-id) is the image playbook's job, done inside the machine before CreateImage, as on AWS.

Containers and images carry the EC2 endpoint they belong to as a label: several emulators (a
developer's, a test session's) may share one engine, and each reconcile only ever touches its own.
An instance is created with the same flags everywhere: host networking, ``SYS_ADMIN`` (not
``--privileged``, which fails on these machines), /dev/fuse for s3fs, the cgroup tree read-only, the
Docker socket (the worker runs the processing container as a sibling), the work directory at the
same path inside as on the host (the sibling's bind mounts are resolved by the host's engine), and
``<state_dir>/<id>/identity.json`` read-only at /etc/cicc/identity.json, where the worker reads its
instance id and user data since the emulator has no metadata service for them.

Plain Python: the standard library, a guarded botocore and the docker SDK; no Ansible import. The
functions take ready clients (a boto3 EC2 client, a docker SDK client), return plain dicts and raise
``LocalCloudError`` with a message a person can act on; errors of the EC2 API are left to the caller
(botocore's ``BotoCoreError``/``ClientError``), which knows how to report them.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

try:
    import docker.errors as docker_errors
except ImportError:  # pragma: no cover - the callers check for the docker SDK and say what to install
    docker_errors = None

IMAGE_REPOSITORY = "cicc-ami"
DEFAULT_BASE_IMAGE = "cicc-base:bookworm"
DEFAULT_STATE_DIR = "/var/lib/cicc/instances"
DEFAULT_WORK_DIR = "/var/lib/cicc/work"
SOURCE_TAG = "cicc:source-instance"
LABEL_INSTANCE = "cicc.instance-id"
LABEL_AMI = "cicc.ami-id"
LABEL_ENDPOINT = "cicc.ec2-endpoint"
LABEL_SOURCE = "cicc.source-instance"
# On the processing containers a worker starts (worker/cicc_worker.py): the worker, i.e. its instance id.
LABEL_WORKER = "cicc.worker"
IDENTITY_PATH = "/etc/cicc/identity.json"
DOCKER_SOCKET = "/var/run/docker.sock"
# systemd halts cleanly on SIGRTMIN+3; SIGTERM (docker's default) only makes it re-execute.
STOP_SIGNAL = "SIGRTMIN+3"
STOP_TIMEOUT = 30

UP_STATES = ("pending", "running")
DOWN_STATES = ("stopping", "stopped", "shutting-down", "terminated")
# In an instance's state directory: its container's stop is already accounted for in the emulator.
_STOP_MARKER = "stop-recorded"
_BOOTED = ("running", "degraded")


class LocalCloudError(Exception):
    """The engine could not be brought in line with the emulator."""


@dataclass
class _Pass:
    """What one reconcile works with."""

    ec2: object
    docker: object
    base_image: str
    state_dir: Path
    work_dir: Path
    check_mode: bool
    remove_terminated: bool = False
    endpoint: str = ""
    region: str = ""
    # AMI ids whose image this pass commits (in check mode: would commit).
    committed: set = field(default_factory=set)
    # AMI id -> why its image cannot be made.
    unbuildable: dict = field(default_factory=dict)

    def marker(self, instance_id: str) -> Path:
        return self.state_dir / instance_id / _STOP_MARKER


def ami_image(ami_id: str) -> str:
    """Name of the local image committed for the AMI ``ami_id``."""
    return f"{IMAGE_REPOSITORY}:{ami_id}"


def image_for_ami(docker, ami_id: str, base_image: str = DEFAULT_BASE_IMAGE) -> str:
    """The local image standing for ``ami_id``: ``cicc-ami:<ami-id>`` when it exists, else ``base_image``."""
    return ami_image(ami_id) if _image_exists(docker, ami_image(ami_id)) else base_image


def boto3_filters(filters: dict | None) -> list[dict]:
    """EC2 filters as Ansible writes them (``{"tag:project": "cicc"}``, values scalar or list) in boto3's form."""
    result = []
    for name, value in (filters or {}).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        result.append({"Name": str(name), "Values": [str(item) for item in values]})
    return result


def reconcile(
    ec2,
    docker,
    base_image: str = DEFAULT_BASE_IMAGE,
    filters: dict | None = None,
    state_dir: str = DEFAULT_STATE_DIR,
    work_dir: str = DEFAULT_WORK_DIR,
    check_mode: bool = False,
    remove_terminated: bool = False,
) -> dict:
    """Bring the engine in line with the emulator (see the module's docstring for the rules).

    ``filters`` (EC2 filters, Ansible's dict form) narrow the instances reconciled; containers of
    instances the emulator knows but the filters leave out are not touched. Images are committed
    first, so an image made from an instance that is being terminated is still taken from its
    container, and instances launched from a new AMI in the same step boot it. The container of a
    terminated instance is kept, stopped, for its logs, unless ``remove_terminated`` (teardown): then
    it goes with the instance's state and work directories. In check mode nothing is changed and the
    result says what would be.

    Returns ``{"instances": [...], "images": [...], "changed": bool}``; each instance as
    ``{"instance_id", "state", "container": "running|exited|absent", "image", "action"}``, action
    one of none, created, started, stopped, removed, terminated, stopped-instance (the last two:
    the machine powered off by itself); each own AMI made from an instance as
    ``{"ami_id", "source_instance", "image", "committed", "removed"}``.
    """
    run = _Pass(ec2, docker, base_image, Path(state_dir), Path(work_dir), check_mode, remove_terminated)
    run.endpoint, run.region = ec2.meta.endpoint_url, ec2.meta.region_name
    containers = _our_containers(docker, run.endpoint)
    own_amis = _own_amis(ec2)

    images = _reconcile_images(run, own_amis, containers)

    everything = _describe_instances(ec2, None)
    known = {instance["InstanceId"] for instance in everything}
    selected = _describe_instances(ec2, filters) if filters else everything
    instances = [_reconcile_instance(run, item, containers.get(item["InstanceId"])) for item in selected]
    for instance_id, container in sorted(containers.items()):
        if instance_id not in known:
            instances.append(_remove_orphan(run, container, instance_id))

    images.extend(_remove_stale_images(run, own_amis))
    changed = any(item["action"] != "none" for item in instances) or any(
        item["committed"] or item["removed"] for item in images
    )
    return {"instances": instances, "images": images, "changed": changed}


def wait_for_boot(docker, instance_id: str, timeout: float = 120, interval: float = 0.5) -> dict:
    """Wait until systemd in the instance's container says the system is up.

    ``systemctl is-system-running`` answering ``running`` or ``degraded`` (booted, some unit failed)
    counts as booted. Returns ``{"instance_id", "system_state", "seconds"}``; raises LocalCloudError
    when the container is missing, stops, or does not boot within ``timeout`` seconds.
    """
    start = time.monotonic()
    deadline = start + timeout
    answer = "no answer"
    while True:
        container = _container(docker, instance_id)
        if container is None:
            raise LocalCloudError(f"instance {instance_id} has no container to boot")
        if container.status != "running":
            raise LocalCloudError(
                f"the container of instance {instance_id} stopped while booting ({_exit_summary(container)}); "
                f"its log ends with: {_log_tail(container)}"
            )
        try:
            code, output = container.exec_run(["systemctl", "is-system-running"])
            # Before systemd opens its bus the command fails ("Failed to connect to bus"): still booting.
            answer = output.decode("utf-8", "replace").strip() or f"exit code {code}"
        except _docker_error() as e:
            answer = str(e)
        if answer in _BOOTED:
            return {"instance_id": instance_id, "system_state": answer, "seconds": round(time.monotonic() - start, 1)}
        if time.monotonic() >= deadline:
            raise LocalCloudError(
                f"instance {instance_id} did not boot within {timeout} s: 'systemctl is-system-running' "
                f"last answered {answer!r}; see 'docker exec {instance_id} systemctl --failed'"
            )
        time.sleep(interval)


# --- images -----------------------------------------------------------------------------------------


def _own_amis(ec2) -> list[dict]:
    return ec2.describe_images(Owners=["self"])["Images"]


def _source_instance(ami: dict) -> str:
    tags = {tag["Key"]: tag["Value"] for tag in ami.get("Tags", [])}
    return tags.get(SOURCE_TAG) or ami.get("SourceInstanceId") or ""


def _reconcile_images(run: _Pass, own_amis: list[dict], containers: dict) -> list[dict]:
    """Commit the containers behind own AMIs that have no image yet; note in ``run`` what was committed and
    which AMIs cannot have an image (their source container is gone)."""
    report = []
    for ami in sorted(own_amis, key=lambda item: item["ImageId"]):
        ami_id, source = ami["ImageId"], _source_instance(ami)
        if not source or ami.get("State") in ("deregistered", "failed", "invalid"):
            continue
        name = ami_image(ami_id)
        entry = {"ami_id": ami_id, "source_instance": source, "image": name, "committed": False, "removed": False}
        if not _image_exists(run.docker, name):
            container = containers.get(source)
            if container is None:
                run.unbuildable[ami_id] = (
                    f"AMI {ami_id} was made from instance {source}, whose container is gone, so its image "
                    f"{name} cannot be committed; make the AMI again from a running instance"
                )
                entry.update(image=None, reason=run.unbuildable[ami_id])
            else:
                if not run.check_mode:
                    _commit(container, name, ami_id, source, run.endpoint)
                run.committed.add(ami_id)
                entry["committed"] = True
        report.append(entry)
    return report


def _commit(container, name: str, ami_id: str, source: str, endpoint: str) -> None:
    repository, tag = name.split(":", 1)
    changes = [f"LABEL {LABEL_ENDPOINT}={endpoint}", f"LABEL {LABEL_AMI}={ami_id}", f"LABEL {LABEL_SOURCE}={source}"]
    try:
        container.commit(repository=repository, tag=tag, changes=changes)
    except _docker_error() as e:
        raise LocalCloudError(f"Couldn't commit the container of instance {source} into {name}: {e}") from e


def _remove_stale_images(run: _Pass, own_amis: list[dict]) -> list[dict]:
    """Remove the committed images of this endpoint whose AMI is no longer registered."""
    registered = {ami["ImageId"] for ami in own_amis}
    try:
        ours = run.docker.images.list(name=IMAGE_REPOSITORY, filters={"label": f"{LABEL_ENDPOINT}={run.endpoint}"})
        used = _images_in_use(run.docker)
    except _docker_error() as e:
        raise LocalCloudError(f"Couldn't list the {IMAGE_REPOSITORY} images and their containers: {e}") from e
    removed = []
    for image in ours:
        ami_id = image.labels.get(LABEL_AMI, "")
        # A container (even a stopped one, kept for its logs) still uses it: it goes when they do.
        if not ami_id or ami_id in registered or image.id in used:
            continue
        name = ami_image(ami_id)
        if not run.check_mode:
            try:
                run.docker.images.remove(name)
            except _docker_error() as e:
                raise LocalCloudError(f"Couldn't remove image {name} of deregistered AMI {ami_id}: {e}") from e
        source = image.labels.get(LABEL_SOURCE, "")
        removed.append(
            {"ami_id": ami_id, "source_instance": source, "image": name, "committed": False, "removed": True}
        )
    return removed


def _images_in_use(docker) -> set[str]:
    # Every container of the engine, not only ours: an image is in use whoever uses it.
    return {container.attrs.get("ImageID", "") for container in docker.containers.list(all=True, sparse=True)}


def _image_exists(docker, name: str) -> bool:
    try:
        docker.images.get(name)
    except docker_errors.ImageNotFound:
        return False
    except _docker_error() as e:
        raise LocalCloudError(f"Couldn't inspect image {name}: {e}") from e
    return True


# --- instances --------------------------------------------------------------------------------------


def _describe_instances(ec2, filters) -> list[dict]:
    paginator = ec2.get_paginator("describe_instances")
    instances = []
    for page in paginator.paginate(Filters=boto3_filters(filters)):
        for reservation in page["Reservations"]:
            instances.extend(reservation["Instances"])
    return sorted(instances, key=lambda item: item["InstanceId"])


def _our_containers(docker, endpoint) -> dict:
    try:
        # ignore_removed: another run's machine may be removed between the listing and its inspection.
        found = docker.containers.list(all=True, filters={"label": f"{LABEL_ENDPOINT}={endpoint}"}, ignore_removed=True)
    except _docker_error() as e:
        raise LocalCloudError(f"Couldn't list containers on the Docker Engine: {e}") from e
    return {container.labels[LABEL_INSTANCE]: container for container in found if container.labels.get(LABEL_INSTANCE)}


def _container(docker, name):
    try:
        return docker.containers.get(name)
    except docker_errors.NotFound:
        return None
    except _docker_error() as e:
        raise LocalCloudError(f"Couldn't inspect container {name}: {e}") from e


def _container_state(container) -> str:
    if container is None:
        return "absent"
    # paused: only for the moment of a commit; restarting: on its way up.
    return "running" if container.status in ("running", "paused", "restarting") else "exited"


def _reconcile_instance(run: _Pass, instance: dict, container) -> dict:
    instance_id, ami_id = instance["InstanceId"], instance["ImageId"]
    state = instance["State"]["Name"]
    current = _container_state(container)
    image = container.attrs["Config"]["Image"] if container is not None else None
    entry = {"instance_id": instance_id, "state": state, "container": current, "image": image, "action": "none"}
    marker = run.marker(instance_id)

    if state in UP_STATES:
        if current == "absent":
            if ami_id in run.unbuildable:
                raise LocalCloudError(f"instance {instance_id} cannot be started: {run.unbuildable[ami_id]}")
            # In check mode an image about to be committed does not exist yet, but the instance would boot it.
            image = ami_image(ami_id) if ami_id in run.committed else image_for_ami(run.docker, ami_id, run.base_image)
            if not run.check_mode:
                _create(run, instance_id, ami_id, image)
            entry.update(container="running", image=image, action="created")
        elif container.status == "exited" and not marker.exists():
            # The machine powered off by itself: EC2's OS-initiated shutdown.
            entry.update(_power_off(run, instance_id))
        elif current == "exited":
            # Stopped for a stop the emulator knows of (the instance was stopped), or never started: boot it.
            if not run.check_mode:
                _start(container, instance_id, marker)
            entry.update(container="running", action="started")
    elif state in DOWN_STATES and current == "running":
        if not run.check_mode:
            # Recorded first: should the stop be interrupted, the stopped container is never taken for a power-off.
            _record_stop(marker, instance_id)
            _stop(container, instance_id)
        entry.update(container="exited", action="stopped")
    elif state in DOWN_STATES and current == "exited" and not run.check_mode and not marker.exists():
        # Bookkeeping, not a change: both sides are down already (the worker terminated its instance
        # through the API, then powered off). Recorded so that starting the instance again boots the
        # container instead of being taken for a new power-off.
        _record_stop(marker, instance_id)
    if run.remove_terminated and state == "terminated" and current != "absent":
        if not run.check_mode:
            _remove(run, container, instance_id)
        entry.update(container="absent", action="removed")
    return entry


def _power_off(run: _Pass, instance_id: str) -> dict:
    attribute = "instanceInitiatedShutdownBehavior"
    behaviour = run.ec2.describe_instance_attribute(InstanceId=instance_id, Attribute=attribute)
    if behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate":
        action, predicted = "terminated", "shutting-down"
    else:
        action, predicted = "stopped-instance", "stopping"
    if run.check_mode:
        return {"state": predicted, "action": action}
    if action == "terminated":
        change = run.ec2.terminate_instances(InstanceIds=[instance_id])["TerminatingInstances"][0]
    else:
        change = run.ec2.stop_instances(InstanceIds=[instance_id])["StoppingInstances"][0]
    _record_stop(run.marker(instance_id), instance_id)
    return {"state": change["CurrentState"]["Name"], "action": action}


def _user_data(run: _Pass, instance_id: str) -> str:
    """The instance's user data as text ("" without any): what IMDS would serve it on EC2."""
    found = run.ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData").get("UserData", {})
    return base64.b64decode(found.get("Value", "")).decode("utf-8", errors="replace")


def _instance_facts(run: _Pass, instance_id: str) -> dict:
    """What IMDS would say of the instance besides its id: type, zone and market (spot or on-demand); and when
    it was launched (seconds since the epoch), which an EC2 machine knows from its uptime."""
    instance = run.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    launched = instance.get("LaunchTime")
    return {
        "instance_type": instance.get("InstanceType", ""),
        "availability_zone": instance.get("Placement", {}).get("AvailabilityZone", ""),
        "market": "spot" if instance.get("InstanceLifecycle") == "spot" else "on-demand",
        "launched_at": f"{launched.timestamp():.3f}" if launched else "",
    }


def _write_identity(state_dir: Path, instance_id: str, ami_id: str, region: str, user_data: str, facts: dict) -> Path:
    directory = state_dir / instance_id
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "identity.json"
    identity = {"instance_id": instance_id, "ami_id": ami_id, "region": region, "user_data": user_data, **facts}
    body = json.dumps(identity, indent=2) + "\n"
    temporary = directory / ".identity.json.tmp"
    temporary.write_text(body)
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)
    return path


def _create(run: _Pass, instance_id: str, ami_id: str, image: str) -> None:
    if not _image_exists(run.docker, image):
        raise LocalCloudError(
            f"image {image} for instance {instance_id} (AMI {ami_id}) is not on the Docker Engine; "
            "build the base image with scripts/base-image.sh"
        )
    try:
        # A fresh container: a stop recorded for an earlier one of this instance no longer applies.
        run.marker(instance_id).unlink(missing_ok=True)
        identity = _write_identity(
            run.state_dir,
            instance_id,
            ami_id,
            run.region,
            _user_data(run, instance_id),
            _instance_facts(run, instance_id),
        )
        run.work_dir.mkdir(parents=True, exist_ok=True)
        work_dir = str(run.work_dir.resolve())
    except OSError as e:
        raise LocalCloudError(f"Couldn't prepare the files of instance {instance_id}: {e}") from e
    volumes = {
        "/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "ro"},
        DOCKER_SOCKET: {"bind": DOCKER_SOCKET, "mode": "rw"},
        str(identity.resolve()): {"bind": IDENTITY_PATH, "mode": "ro"},
        # The same path on both sides: the worker's sibling containers are mounted by the host's engine.
        work_dir: {"bind": work_dir, "mode": "rw"},
    }
    try:
        run.docker.containers.run(
            image,
            name=instance_id,
            hostname=instance_id,
            detach=True,
            network_mode="host",
            cap_add=["SYS_ADMIN"],
            devices=["/dev/fuse:/dev/fuse:rwm"],
            tmpfs={"/run": "", "/run/lock": ""},
            volumes=volumes,
            stop_signal=STOP_SIGNAL,
            labels={LABEL_INSTANCE: instance_id, LABEL_AMI: ami_id, LABEL_ENDPOINT: run.endpoint},
        )
    except _docker_error() as e:
        raise LocalCloudError(f"Couldn't start a container for instance {instance_id} from {image}: {e}") from e


def _start(container, instance_id: str, marker: Path) -> None:
    try:
        container.start()
    except _docker_error() as e:
        raise LocalCloudError(f"Couldn't start the container of instance {instance_id}: {e}") from e
    marker.unlink(missing_ok=True)


def _record_stop(marker: Path, instance_id: str) -> None:
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(datetime.now(timezone.utc).isoformat() + "\n")
    except OSError as e:
        raise LocalCloudError(f"Couldn't record the stop of instance {instance_id} in {marker}: {e}") from e


def _stop(container, instance_id: str) -> None:
    try:
        container.stop(timeout=STOP_TIMEOUT)
    except _docker_error() as e:
        raise LocalCloudError(f"Couldn't stop the container of instance {instance_id}: {e}") from e


def _remove_orphan(run: _Pass, container, instance_id: str) -> dict:
    entry = {
        "instance_id": instance_id,
        "state": "unknown",
        "container": "absent",
        "image": container.attrs["Config"]["Image"],
        "action": "removed",
    }
    if not run.check_mode:
        _remove(run, container, instance_id)
    return entry


def _remove(run: _Pass, container, instance_id: str) -> None:
    """Remove an instance's container and the processing containers its worker started (siblings on the
    same engine, labelled with the worker: one killed with its machine may be left), then its state and
    work directories."""
    try:
        siblings = run.docker.containers.list(
            all=True, filters={"label": f"{LABEL_WORKER}={instance_id}"}, ignore_removed=True
        )
        for sibling in siblings:
            sibling.remove(force=True)
        container.remove(force=True)
    except _docker_error() as e:
        raise LocalCloudError(f"Couldn't remove the container of instance {instance_id}: {e}") from e
    # The container is gone, which is what counts; a leftover file harms nothing.
    shutil.rmtree(run.state_dir / instance_id, ignore_errors=True)
    shutil.rmtree(run.work_dir / instance_id, ignore_errors=True)


# --- helpers ----------------------------------------------------------------------------------------


def _docker_error():
    return (docker_errors.DockerException, OSError) if docker_errors else (OSError,)


def _exit_summary(container) -> str:
    state = container.attrs.get("State", {})
    return f"status {container.status}, exit code {state.get('ExitCode')}"


def _log_tail(container, lines: int = 5) -> str:
    try:
        text = container.logs(tail=lines).decode("utf-8", "replace").strip()
    except _docker_error():
        return "(no log)"
    return " | ".join(text.splitlines()) or "(empty)"
