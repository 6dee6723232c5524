# -*- coding: utf-8 -*-
# Copyright: cicc.cloud contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""cicc-worker: the boot worker of a cicc.cloud instance.

At boot (systemd unit) or by hand, it loops: claim a task from the S3 queue, stage the input and
the kernel to local block storage, run the processing container on them with a bind mount,
upload the output, complete the task, let its lock go; until no task is left. It heartbeats
while a task runs; a failed task is recorded and the worker moves on. At the end it folds the
journal into the lists, uploads its log (logs/<instance>/log.txt) and runs its exit action:
terminate its own instance through the EC2 API, with OS shutdown as the fallback.

Settings come from a JSON file (--config, written by the worker role) and flags; the instance
id from IMDSv2 on EC2, or from the identity file on the local cloud. The instance's user data
may carry job parameters as a JSON object (JOB_SETTINGS: how many tasks to take, the spectator
pause), so one AMI serves every way of running the fleet. Credentials come from the instance
profile through boto3's usual chain: never from this file.

On a spot interruption notice it stops claiming, gives back the task in progress (the attempt
does not count) and exits within the notice.

Exit codes: 0 queue drained (or the task limit reached, or a spot interruption), 1 unexpected
error, 2 bad settings or the queue cannot be worked (for example the kernel is missing: no task
is claimed, so nothing is lost).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, fields
from pathlib import Path

import boto3
from botocore.config import Config

try:
    from ansible_collections.cicc.cloud.plugins.module_utils import task_queue
except ImportError:  # on an instance the worker role installs task_queue.py beside this file
    import task_queue  # type: ignore[no-redef]

LOG = logging.getLogger("cicc-worker")
EXIT_DRAINED, EXIT_ERROR, EXIT_UNWORKABLE = 0, 1, 2
IMDS = "http://169.254.169.254/latest"
# What an instance's user data may set: the job, never where the queue is or how to reach it.
JOB_SETTINGS = ("max_tasks", "spectator_pause")


class TaskError(Exception):
    """The processing of one task failed; the message is recorded as the attempt's reason."""


@dataclass
class Settings:
    bucket: str = ""
    prefix: str = ""
    region: str = "us-east-1"
    endpoint_url: str = ""
    instance_id: str = ""
    # On the local cloud each instance's container gets this file in place of IMDS.
    identity_file: str = "/etc/cicc/identity.json"
    workdir: str = "/var/lib/cicc/work"
    image: str = "cicc-process:latest"
    lease_seconds: int = 120
    max_attempts: int = 3
    task_timeout: int = 900
    compact_every: int = 20
    spectator_pause: int = 0
    # Tasks to take before stopping; 0: until the queue is drained. 1 is the seed's one task per boot.
    max_tasks: int = 0
    # The instance metadata service, asked every spot_poll_seconds for a spot interruption notice.
    metadata_url: str = IMDS
    spot_poll_seconds: int = 5
    exit_action: str = "none"

    @classmethod
    def load(cls, path: str | None, overrides: dict) -> Settings:
        data = json.loads(Path(path).read_text()) if path else {}
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown settings in {path}: {', '.join(sorted(unknown))}")
        data.update({key: value for key, value in overrides.items() if value is not None})
        settings = cls(**data)
        if not settings.bucket:
            raise ValueError("no bucket: set 'bucket' in the settings file or pass --bucket")
        if settings.exit_action not in ("none", "terminate"):
            raise ValueError(f"exit_action must be none or terminate, not {settings.exit_action!r}")
        return settings

    def apply_job(self, user_data: str) -> list[str]:
        """Take the job parameters from an instance's user data; returns what was ignored and why."""
        if not user_data.strip():
            return []
        try:
            job = json.loads(user_data)
        except ValueError:
            job = None
        if not isinstance(job, dict):
            return ["user data is not a JSON object of job parameters: ignored"]
        notes = []
        for key, value in job.items():
            if key not in JOB_SETTINGS:
                notes.append(f"user data sets {key!r}, which is not a job parameter ({', '.join(JOB_SETTINGS)}): ignored")
            elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
                notes.append(f"user data sets {key} to {value!r}, not a whole number of 0 or more: ignored")
            else:
                setattr(self, key, value)
                notes.append(f"user data sets {key} to {value}")
        return notes

    def queue(self) -> task_queue.Queue:
        return task_queue.Queue(self.bucket, self.prefix, self.lease_seconds, self.max_attempts)


def s3_client(settings: Settings, session=None):
    """The worker's S3 client: S3 answers 500/503 now and then under load; retry those patiently
    rather than give up a claimed task."""
    session = session or boto3.session.Session()
    config = Config(retries={"max_attempts": 10, "mode": "standard"}, max_pool_connections=4)
    return session.client("s3", region_name=settings.region, endpoint_url=settings.endpoint_url or None, config=config)


# --- processing -----------------------------------------------------------------------------------


class DockerRunner:
    """Runs the processing image on a staged task directory, bind-mounted at /data."""

    def __init__(self, image: str) -> None:
        import docker  # the docker SDK: only needed where containers run

        self.image = image
        self.client = docker.from_env()
        self._container = None

    def run(self, task_dir: Path, name: str, kernel: str, output: str, timeout: float) -> str:
        from requests.exceptions import ConnectionError as RequestsConnectionError, ReadTimeout

        self._container = container = self.client.containers.run(
            self.image,
            ["--input", name, "--kernel", kernel, "--output", output],
            volumes={str(task_dir): {"bind": "/data", "mode": "rw"}},
            network_mode="none",
            labels={"cicc.task": name},
            detach=True,
        )
        try:
            try:
                code = container.wait(timeout=timeout)["StatusCode"]
            except (ReadTimeout, RequestsConnectionError) as error:
                container.kill()
                raise TaskError(f"processing timed out after {timeout:.0f} s") from error
            report = container.logs(stdout=True, stderr=True).decode("utf-8", "replace").strip()
        finally:
            self._container = None
            container.remove(force=True)
        return _check_report(code, report)

    def cancel(self) -> None:
        """Stop the running container, if any: its run then fails without an output."""
        container = self._container
        if container is not None:
            try:
                container.kill()
            except Exception as error:  # noqa: BLE001 - it may have just ended by itself
                LOG.info("could not stop the processing container: %s", error)


class ProcessRunner:
    """Runs process.py as a plain program on the host: the same program, without a container."""

    def __init__(self, program: str) -> None:
        self.program = program
        self._process: subprocess.Popen | None = None

    def run(self, task_dir: Path, name: str, kernel: str, output: str, timeout: float) -> str:
        argv = [sys.executable, self.program, "--data", str(task_dir), "--input", name]
        argv += ["--kernel", kernel, "--output", output]
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
            self._process = process
            try:
                report = process.communicate(timeout=timeout)[0]
            except subprocess.TimeoutExpired as error:
                process.kill()
                raise TaskError(f"processing timed out after {timeout:.0f} s") from error
            finally:
                self._process = None
        return _check_report(process.returncode, report.strip())

    def cancel(self) -> None:
        """Stop the running program, if any: its run then fails without an output."""
        process = self._process
        if process is not None:
            process.kill()


def _check_report(code: int, report: str) -> str:
    last = report.splitlines()[-1] if report else ""
    if code != 0:
        raise TaskError(f"processing exited with code {code}: {last or 'no message'}")
    if not last.startswith("SUCCESS"):
        raise TaskError(f"processing exited 0 without a SUCCESS report: {last or 'no output'}")
    return last


# --- the worker -----------------------------------------------------------------------------------


class Heartbeat(threading.Thread):
    """Renews a lease every quarter lease until stopped; notes when the lease was lost."""

    def __init__(self, client, queue: task_queue.Queue, lease: task_queue.Lease) -> None:
        super().__init__(daemon=True)
        self.client, self.queue, self.lease = client, queue, lease
        self.lost = threading.Event()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.lease.lease_seconds / 4):
            try:
                task_queue.renew(self.client, self.queue, self.lease)
            except task_queue.LeaseLost as error:
                LOG.warning("%s", error)
                self.lost.set()
                return
            except Exception as error:  # noqa: BLE001 - a passing S3 error must not kill the heartbeat
                LOG.warning("heartbeat for %s failed, retrying: %s", self.lease.name, error)

    def stop(self) -> None:
        """Stop renewing (idempotent)."""
        self._halt.set()
        if self.is_alive():
            self.join()


class SpotWatch(threading.Thread):
    """Asks the metadata service for a spot interruption notice every few seconds. On a notice it
    sets ``noticed`` and cancels the running task, so the worker gives it back and stops within the
    two minutes AWS gives."""

    def __init__(self, settings: Settings, runner) -> None:
        super().__init__(daemon=True)
        self.settings, self.runner = settings, runner
        self.noticed = threading.Event()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.settings.spot_poll_seconds):
            if spot_interruption(self.settings):
                LOG.warning("spot interruption notice: no more claims, giving back the task in progress")
                self.noticed.set()
                self.runner.cancel()
                return

    def stop(self) -> None:
        self._halt.set()


class Worker:
    def __init__(self, settings: Settings, client, runner, owner: str = "", spot_watch: SpotWatch | None = None) -> None:
        self.settings, self.client, self.runner = settings, client, runner
        self.queue = settings.queue()
        self.owner = owner or settings.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        # Instances of the local cloud share the host's work directory: each worker keeps to its own.
        self.workdir = (Path(settings.workdir) / self.owner).resolve()
        self.done: list[str] = []
        self.failed: list[str] = []
        # Claims worked on, whatever their outcome: what max_tasks counts.
        self.taken = 0
        self.spot_watch = spot_watch

    def run(self) -> int:
        """Work the queue until it is drained. Returns the exit code."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._spectator_pause()
        try:
            kernel = self._stage_kernel()
        except TaskError as error:
            LOG.error("%s; no task claimed", error)
            return EXIT_UNWORKABLE
        picker = task_queue.TaskPicker(
            self.client, self.queue, self.owner, self.settings.instance_id, min(5.0, self.settings.lease_seconds / 4)
        )
        started = time.monotonic()
        if self.spot_watch:
            self.spot_watch.start()
        try:
            while not self._at_limit() and not self._interrupted() and (lease := picker.next()):
                self.taken += 1
                self.work(lease, kernel)
                if self.done and len(self.done) % self.settings.compact_every == 0:
                    self._compact(min_batch=self.settings.compact_every)
        finally:
            if self.spot_watch:
                self.spot_watch.stop()
        for line, reason in picker.rejected:
            LOG.warning("tasklist line %r rejected: %s (recorded in rejected.txt)", line, reason)
        self._compact(force=True)
        if self._interrupted():
            stopped = "spot interruption"
        else:
            stopped = "task limit reached" if self._at_limit() else "queue drained"
        LOG.info(
            "%s: %d completed, %d failed by %s in %.1f s",
            stopped,
            len(self.done),
            len(self.failed),
            self.owner,
            time.monotonic() - started,
        )
        return EXIT_DRAINED

    def _interrupted(self) -> bool:
        return self.spot_watch is not None and self.spot_watch.noticed.is_set()

    def _at_limit(self) -> bool:
        return 0 < self.settings.max_tasks <= self.taken

    def _compact(self, **kwargs) -> None:
        """Fold the journal into the lists, best effort: what is not folded stays journaled
        (task_status counts it) and the next compaction, by any worker or person, folds it."""
        try:
            task_queue.compact(self.client, self.queue, **kwargs)
        except Exception as error:  # noqa: BLE001 - an S3 error here must not stop the worker
            LOG.warning("compaction failed, left to the next one: %s", error)

    def work(self, lease: task_queue.Lease, kernel: Path) -> None:
        """Process one claimed task; whatever happens, the task ends published, released or failed."""
        name = lease.name
        task_dir = self._task_dir(name)
        heartbeat = Heartbeat(self.client, self.queue, lease)
        heartbeat.start()
        try:
            LOG.info("claimed %s (attempt %d)", name, lease.attempts)
            input_etag = self._stage_input(name, task_dir)
            os.link(kernel, task_dir / kernel.name)
            output = task_queue.output_name(name)
            if self._interrupted():  # the notice came while the input was staged
                raise TaskError("spot interruption")
            report = self.runner.run(task_dir, name, kernel.name, output, self.settings.task_timeout)
            heartbeat.stop()
            if heartbeat.lost.is_set():
                raise task_queue.LeaseLost(f"lease on {name} lost while processing")
            with open(task_dir / output, "rb") as body:
                task_queue.publish_output(self.client, self.queue, lease, body, {"input-etag": input_etag})
            task_queue.complete(self.client, self.queue, lease, published=True)
            self.done.append(name)
            LOG.info("completed %s: %s", name, report)
        except (task_queue.BadInput, TaskError) as error:
            heartbeat.stop()  # the lock is rewritten below: no renewal may race with it
            if self._interrupted():
                # Not the task's fault: the attempt does not count, the next worker takes it at once.
                task_queue.release(self.client, self.queue, lease)
                LOG.warning("gave back %s (spot interruption)", name)
            else:
                self._give_back(lease, error)
        except task_queue.LeaseLost as error:
            LOG.warning("%s: not publishing, moving on", error)
        finally:
            heartbeat.stop()
            shutil.rmtree(task_dir, ignore_errors=True)

    def _give_back(self, lease: task_queue.Lease, error: Exception) -> None:
        """Record a failed attempt: a bad input fails the task at once, a processing error counts
        an attempt (after max_attempts the task is recorded failed)."""
        try:
            if isinstance(error, task_queue.BadInput):
                task_queue.fail(self.client, self.queue, lease, str(error))
                state = "failed"
            else:
                state = task_queue.release(self.client, self.queue, lease, str(error))
        except task_queue.LeaseLost as lost:
            LOG.warning("attempt at %s failed (%s) but %s", lease.name, error, lost)
            return
        if state == "failed":
            self.failed.append(lease.name)
        LOG.error("attempt %d at %s failed (task now %s): %s", lease.attempts, lease.name, state, error)

    def _task_dir(self, name: str) -> Path:
        task_dir = (self.workdir / "tasks" / task_queue.check_name(name)).resolve()
        if task_dir.parent != self.workdir / "tasks":  # belt and braces: names never leave the work area
            raise task_queue.BadTaskName(f"task name {name!r} would leave the work area")
        shutil.rmtree(task_dir, ignore_errors=True)
        task_dir.mkdir(parents=True)
        return task_dir

    def _stage_kernel(self) -> Path:
        path = self.workdir / self.queue.kernel
        found = task_queue.download(self.client, self.queue, self.queue.key(self.queue.kernel), path)
        if found is None:
            raise TaskError(f"kernel s3://{self.queue.bucket}/{self.queue.key(self.queue.kernel)} is missing")
        if path.stat().st_size == 0:
            raise TaskError(f"kernel s3://{self.queue.bucket}/{self.queue.key(self.queue.kernel)} is empty")
        return path

    def _stage_input(self, name: str, task_dir: Path) -> str:
        free = shutil.disk_usage(task_dir).free
        etag = task_queue.download(self.client, self.queue, self.queue.key(name), task_dir / name, max_bytes=free // 3)
        if etag is None:
            raise task_queue.BadInput(f"input s3://{self.queue.bucket}/{self.queue.key(name)} is missing")
        return etag

    def _spectator_pause(self) -> None:
        """The seed's pause at boot, so that someone can log in and watch (off by default)."""
        remaining = self.settings.spectator_pause
        while remaining > 0:
            LOG.info("spectator pause: starting work in %d s", remaining)
            time.sleep(min(60, remaining))
            remaining -= 60


# --- identity, log and exit -----------------------------------------------------------------------


def instance_metadata(settings: Settings, timeout: float = 2.0) -> tuple[str, str]:
    """(instance id, user data) of this instance: from the identity file the local cloud provides,
    else through IMDSv2 (a session token first); ("", "") off EC2."""
    try:
        identity = json.loads(Path(settings.identity_file).read_text())
        return identity["instance_id"], identity.get("user_data", "")
    except (OSError, ValueError, KeyError):
        pass
    try:
        instance_id = _imds_get(settings, "meta-data/instance-id", timeout)
    except OSError:
        return "", ""
    try:
        return instance_id, _imds_get(settings, "user-data", timeout)
    except OSError:  # 404: launched without user data
        return instance_id, ""


def _imds_get(settings: Settings, path: str, timeout: float = 2.0) -> str:
    """GET a metadata path with an IMDSv2 session token; raises OSError (HTTPError on 404)."""
    request = urllib.request.Request(
        f"{settings.metadata_url}/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"}
    )
    token = urllib.request.urlopen(request, timeout=timeout).read().decode()
    request = urllib.request.Request(f"{settings.metadata_url}/{path}", headers={"X-aws-ec2-metadata-token": token})
    return urllib.request.urlopen(request, timeout=timeout).read().decode()


def spot_interruption(settings: Settings) -> bool:
    """Whether AWS has scheduled this spot instance's interruption (the path answers 404 until then)."""
    try:
        return bool(_imds_get(settings, "meta-data/spot/instance-action"))
    except OSError:
        return False


def upload_log(client, settings: Settings, owner: str, log_file: Path) -> None:
    key = f"{settings.prefix}logs/{owner}/log.txt"
    try:
        client.upload_file(str(log_file), settings.bucket, key)
    except Exception as error:  # noqa: BLE001 - the log is a courtesy; the queue state is already safe
        LOG.warning("could not upload the log to %s: %s", key, error)


def terminate_self(settings: Settings, session) -> None:
    """Terminate this instance through the API; if that is refused, shut the OS down (the
    instance is launched with shutdown behaviour 'terminate', so the result is the same)."""
    try:
        ec2 = session.client("ec2", region_name=settings.region, endpoint_url=settings.endpoint_url or None)
        ec2.terminate_instances(InstanceIds=[settings.instance_id])
        LOG.info("terminating instance %s", settings.instance_id)
    except Exception as error:  # noqa: BLE001
        LOG.error("TerminateInstances refused (%s); shutting down instead", error)
    subprocess.run(["systemctl", "poweroff"], check=False)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--config", help="JSON settings file (the worker role writes /etc/cicc/worker.json)")
    for field in fields(Settings):
        parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, type=type(field.default))
    parser.add_argument("--runner", choices=("docker", "process"), default="docker")
    parser.add_argument("--program", default=str(Path(__file__).resolve().parents[1] / "container" / "process.py"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {field.name: getattr(args, field.name) for field in fields(Settings)}
    try:
        settings = Settings.load(args.config, overrides)
    except (OSError, ValueError, TypeError) as error:
        print(f"cicc-worker: {error}", file=sys.stderr)
        return EXIT_UNWORKABLE
    runner = DockerRunner(settings.image) if args.runner == "docker" else ProcessRunner(args.program)
    job_notes, spot_watch = [], None
    if not settings.instance_id:
        settings.instance_id, user_data = instance_metadata(settings)
        job_notes = settings.apply_job(user_data)
        # On EC2 (not the local cloud, whose identity file stands in for the metadata service) a spot
        # instance may be reclaimed: watch for the notice.
        if settings.instance_id and not Path(settings.identity_file).exists():
            spot_watch = SpotWatch(settings, runner)
    session = boto3.session.Session()
    client = s3_client(settings, session)
    worker = Worker(settings, client, runner, spot_watch=spot_watch)
    log_file = worker.workdir / "log.txt"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        handlers=[logging.StreamHandler(), logging.FileHandler(log_file)],
    )
    for note in job_notes:
        LOG.log(logging.WARNING if note.endswith("ignored") else logging.INFO, note)
    try:
        code = worker.run()
    except Exception:  # noqa: BLE001 - logged in full, then the exit action still runs
        LOG.exception("worker stopped by an unexpected error")
        code = EXIT_ERROR
    upload_log(client, settings, worker.owner, log_file)
    if settings.exit_action == "terminate":
        terminate_self(settings, session)
    return code


if __name__ == "__main__":
    sys.exit(main())
